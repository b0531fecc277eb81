"""`faithlens demo`: the pipeline on embedded defaults, each stage reusing what a previous run made."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from sae.config import SaeTrainConfig
from sae.job import run_sae_train
from sae.metrics import metrics_table

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

    sae_latents: int = 5760
    """SAE width (10x d_model for SmolLM2-135M)."""

    sae_k: int = 64
    """TopK k of the demo SAE."""

    sae_eval_tokens: int = 4_096
    """Held-out tokens for the SAE metrics."""


def run_demo(cfg: DemoConfig) -> None:
    console = Console()
    t0 = time.perf_counter()
    console.rule("[bold]faithlens demo")
    console.print(f"[1/4] loading {cfg.model}")
    cache_cfg = CacheConfig(model=cfg.model, data=cfg.data, layers=str(cfg.layer), tokens=cfg.cache_tokens,
                            out=cfg.out / "cache")
    frozen = load_frozen(cache_cfg)
    console.print(f"      {frozen.n_layers} blocks, d_model {frozen.d_model}, vocabulary {frozen.vocab_size:,}, {frozen.dtype}")

    console.print(f"[2/4] corpus {cfg.data} -> activation/teacher cache at layer {cfg.layer}")
    cache = build_cache(cache_cfg, frozen)
    console.print(f"      {cache.tokens:,} tokens, {cache.n_shards} shards, {cache.size_bytes() / 2**20:.1f} MiB at {cache.root}")

    console.print("[3/4] layer baselines on the held-out split")
    baseline_json = cfg.out / "baseline" / "baseline.json"
    if baseline_json.is_file() and json.loads(baseline_json.read_text()).get("tokens", 0) >= cfg.baseline_tokens:
        result = json.loads(baseline_json.read_text())
        console.print(f"      reusing {baseline_json}")
    else:
        result = measure_baseline(BaselineConfig(model=cfg.model, data=cfg.data, tokens=cfg.baseline_tokens), frozen)
        write_json_atomic(baseline_json, result)
    markdown = baseline_markdown(result)
    write_text_atomic(cfg.out / "baseline" / "baseline.md", markdown + "\n")
    console.print()
    console.print(markdown, markup=False, highlight=False)
    console.print()

    console.print(f"[4/4] TopK SAE on layer {cfg.layer} (Ray Train job, {cfg.cache_tokens:,} tokens)")
    sae_cfg = SaeTrainConfig(model=cfg.model, data=cfg.data, layer=cfg.layer, arch="topk", latents=cfg.sae_latents,
                             k=cfg.sae_k, tokens=cfg.cache_tokens, out=cfg.out / "sae", cache_dir=cfg.out / "cache",
                             eval_tokens=cfg.sae_eval_tokens, batch_tokens=1024)
    if (cfg.out / "sae" / "metrics.json").is_file():
        console.print(f"      reusing {cfg.out / 'sae'}")
        console.print(metrics_table(json.loads((cfg.out / "sae" / "metrics.json").read_text())), markup=False)
    else:
        run_sae_train(sae_cfg)
    console.print()
    console.print(f"outputs in {cfg.out} (baseline/, cache/, sae/); demo took {time.perf_counter() - t0:.0f} s")
