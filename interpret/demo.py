"""`faithlens demo`: the pipeline on embedded defaults, each stage reusing what a previous run made."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from corpus.cache import build_cache
from corpus.config import DEFAULT_DATA, CacheConfig
from distill.baseline import BaselineConfig, baseline_markdown, measure_baseline
from models.config import DEFAULT_MODEL
from models.io import write_json_atomic, write_text_atomic
from models.loading import load_frozen


@dataclass
class DemoConfig:
    model: str = DEFAULT_MODEL
    """Frozen model: hub id, local directory, or embedded:smollm2-135m-instruct."""

    data: str = DEFAULT_DATA
    """Corpus; the default is generated (task suites and model samples) and needs no download."""

    layer: int = 9
    """Layer read by the SAE and decoder."""

    out: Path = Path("runs/demo")
    """Run directory; a rerun reuses what is already there."""

    cache_tokens: int = 40_000
    """Training tokens in the activation/teacher cache."""

    baseline_tokens: int = 8_192
    """Held-out tokens for the layer baselines."""


def run_demo(cfg: DemoConfig) -> None:
    console = Console()
    t0 = time.perf_counter()
    console.rule("[bold]faithlens demo")
    console.print(f"[1/3] loading {cfg.model}")
    cache_cfg = CacheConfig(model=cfg.model, data=cfg.data, layers=str(cfg.layer), tokens=cfg.cache_tokens,
                            out=cfg.out / "cache")
    frozen = load_frozen(cache_cfg)
    console.print(f"      {frozen.n_layers} blocks, d_model {frozen.d_model}, vocabulary {frozen.vocab_size:,}, {frozen.dtype}")

    console.print(f"[2/3] corpus {cfg.data} -> activation/teacher cache at layer {cfg.layer}")
    cache = build_cache(cache_cfg, frozen)
    console.print(f"      {cache.tokens:,} tokens, {cache.n_shards} shards, {cache.size_bytes() / 2**20:.1f} MiB at {cache.root}")

    console.print("[3/3] layer baselines on the held-out split")
    baseline_cfg = BaselineConfig(model=cfg.model, data=cfg.data, tokens=cfg.baseline_tokens)
    result = measure_baseline(baseline_cfg, frozen)
    markdown = baseline_markdown(result)
    write_json_atomic(cfg.out / "baseline" / "baseline.json", result)
    write_text_atomic(cfg.out / "baseline" / "baseline.md", markdown + "\n")
    console.print()
    console.print(markdown, markup=False, highlight=False)
    console.print()
    console.print(f"outputs in {cfg.out} (baseline/baseline.json, baseline/baseline.md, cache/); "
                  f"demo took {time.perf_counter() - t0:.0f} s")
