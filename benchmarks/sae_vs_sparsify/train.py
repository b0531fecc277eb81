"""Steps 1-4: sparsify's venv, the shared training sequences, and the two trainings (each a logged
subprocess: sparsify through `benchmarks/_sparsify_child.py` in its venv, ours as `faithlens sae train`)."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.sae_vs_sparsify.config import REPO, BenchDirs, BenchError, CompareConfig
from corpus.cache import ActivationCache
from corpus.packing import sequences
from models.errors import ConfigError
from models.io import write_json_atomic
from models.loading import embedded_model_dir, load_frozen
from sae.config import SaeTrainConfig
from sae.job import cache_config_for

log = logging.getLogger(__name__)

CHILD = REPO / "benchmarks" / "_sparsify_child.py"


# -- 1. sparsify's venv ------------------------------------------------------------------------
def ensure_sparsify_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import sparsify, torch; print(sparsify.__version__, torch.__version__)"]
    if python.is_file() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    log.info("creating sparsify's venv at %s (torch==2.13.0 first, then eai-sparsify)", venv)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, "eai-sparsify", "torch==2.13.0"], check=True)  # the pin keeps pip from swapping torch
    subprocess.run(probe, check=True, capture_output=True)
    return python


# -- 2. the training sequences -----------------------------------------------------------------
def our_train_config(cfg: CompareConfig, dirs: BenchDirs) -> SaeTrainConfig:
    return SaeTrainConfig(model=cfg.model, dtype=cfg.dtype, data=cfg.data, tokens=cfg.tokens, seq_len=cfg.seq_len,
                          seed=cfg.seed, layer=cfg.layer, arch="topk", latents=cfg.latents, k=cfg.k,
                          batch_tokens=cfg.batch_sequences * cfg.seq_len, out=dirs.ours_run,
                          cache_dir=dirs.ours_cache, eval_tokens=0)


def train_sequences(train_cfg: SaeTrainConfig) -> tuple[np.ndarray, int]:
    """The packed sequences our cache build will hold (same config, same order), and the BOS id."""
    frozen = load_frozen(train_cfg)
    cache_cfg = cache_config_for(train_cfg)
    seqs = [p.tokens for p in sequences(cache_cfg, frozen.tokenizer, frozen.bos_token_id, frozen.eos_token_id, frozen)]
    return np.stack(seqs), frozen.bos_token_id


def sparsify_sequences(unique_ST: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n sequences: independently shuffled passes over the unique ones (sparsify does not shuffle)."""
    g = np.random.default_rng(seed)
    passes = [unique_ST[g.permutation(len(unique_ST))] for _ in range(math.ceil(n / len(unique_ST)))]
    return np.concatenate(passes)[:n]


def save_dataset(ids_ST: np.ndarray, path: Path) -> None:
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    Dataset.from_dict({"input_ids": ids_ST.tolist()}).save_to_disk(str(path))


def model_folder(model: str, tool: str = "sparsify") -> Path:
    """The local HF folder a peer tool loads (no hub here): an embedded model's dequantised folder or a local one."""
    if model.startswith("embedded:"):
        return embedded_model_dir(model.removeprefix("embedded:"))  # already a dequantised HF folder
    if Path(model).expanduser().is_dir():
        return Path(model).expanduser().resolve()
    raise ConfigError(f"--model: {tool} loads a local folder here; give a local HF folder or an embedded model, got {model!r}")


# -- 3 and 4. the two trainings ------------------------------------------------------------------
def run_logged(command: list[str], log_path: Path, env: dict | None = None) -> float:
    """Run to completion with output in log_path; wall seconds. Fails with the log's tail."""
    t0 = time.perf_counter()
    with log_path.open("w") as f:
        code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env).returncode
    wall = time.perf_counter() - t0
    if code != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
        raise BenchError(f"{' '.join(command[:4])} ... exited with {code}; end of {log_path}:\n{tail}")
    return wall


def run_sparsify(cfg: CompareConfig, dirs: BenchDirs, python: Path, model_dir: Path, bos_id: int,
                 train_cfg: SaeTrainConfig) -> dict:
    spec = {"model_dir": str(model_dir), "dataset_dir": str(dirs.dataset), "layer": cfg.layer,
            "latents": cfg.latents, "k": cfg.k, "batch_size": cfg.batch_sequences, "exclude_tokens": [bos_id],
            "dead_feature_threshold": train_cfg.dead_tokens, "save_dir": str(dirs.sparsify_ckpt),
            "log_path": str(dirs.sparsify / "train_log.jsonl"), "result_path": str(dirs.sparsify / "child.json")}
    spec_path = dirs.sparsify / "spec.json"
    write_json_atomic(spec_path, spec)
    load = os.getloadavg()[0]
    wall = run_logged([str(python), str(CHILD), str(spec_path)], dirs.log("sparsify_train"))
    child = json.loads((dirs.sparsify / "child.json").read_text())
    tokens = child["train_tokens"]
    last = _last_jsonl(dirs.sparsify / "train_log.jsonl")
    return {**child, "wall_s": wall, "loadavg_1m_before": load,
            "tokens_per_s_end_to_end": tokens / wall, "tokens_per_s_fit": tokens / child["fit_s"],
            "tokens_per_s_train_only": tokens / child["sae_train_s"],
            "train_fvu_last": last.get(f"fvu/{child['hookpoint']}"),
            "train_dead_frac_last": last.get(f"dead_pct/{child['hookpoint']}")}


def run_ours(cfg: CompareConfig, dirs: BenchDirs, train_cfg: SaeTrainConfig) -> dict:
    command = [str(REPO / ".venv" / "bin" / "faithlens"), "sae", "train", "--arch", "topk",
               "--latents", str(cfg.latents), "--k", str(cfg.k), "--tokens", str(cfg.tokens), "--data", cfg.data,
               "--layer", str(cfg.layer), "--model", cfg.model, "--dtype", cfg.dtype, "--seq-len", str(cfg.seq_len),
               "--batch-tokens", str(train_cfg.batch_tokens), "--seed", str(cfg.seed),
               "--out", str(dirs.ours_run), "--cache-dir", str(dirs.ours_cache), "--eval-tokens", "0"]
    env = {**os.environ, "RAY_ADDRESS": "local"}  # a fresh Ray instance, never another job's cluster
    load = os.getloadavg()[0]
    started = time.time()
    wall = run_logged(command, dirs.log("ours_train"), env)
    steps = max(1, train_cfg.tokens // train_cfg.batch_tokens)
    tokens = steps * train_cfg.batch_tokens
    train_s = _train_seconds_from_tensorboard(dirs.ours_run / "tb")
    cache = only_cache(dirs.ours_cache)
    return {"steps": steps, "batch_tokens": train_cfg.batch_tokens, "train_tokens": tokens, "wall_s": wall,
            "loadavg_1m_before": load, "cache_ready_s": (cache.root / "manifest.json").stat().st_mtime - started,
            "cache_tokens": cache.tokens, "train_loop_s": train_s, "tokens_per_s_end_to_end": tokens / wall,
            "tokens_per_s_train_only": tokens / train_s if train_s else None,
            "train_fvu_last": _last_scalar(dirs.ours_run / "tb", "sae/fvu"),
            "train_dead_frac_last": _last_scalar(dirs.ours_run / "tb", "sae/dead_frac"),
            "sae_dir": str(dirs.ours_run / "sae")}


def only_cache(cache_dir: Path) -> ActivationCache:
    roots = [p for p in cache_dir.iterdir() if (p / "manifest.json").is_file()]
    if len(roots) != 1:
        raise BenchError(f"{cache_dir}: expected exactly one activation cache, found {len(roots)}")
    return ActivationCache.open(roots[0], verify=False)


def _scalars(tb_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags().get("scalars", []):
        return {}
    return {e.step: e.value for e in acc.Scalars(tag)}  # a retried step keeps its last value


def _train_seconds_from_tensorboard(tb_dir: Path) -> float | None:
    """Σ window tokens / window rate over the logged `charts/tokens_per_s` windows (the whole loop)."""
    rates = _scalars(tb_dir, "charts/tokens_per_s")
    seconds, previous = 0.0, 0
    for step in sorted(rates):
        seconds += (step - previous) / rates[step]
        previous = step
    return seconds or None


def _last_scalar(tb_dir: Path, tag: str) -> float | None:
    values = _scalars(tb_dir, tag)
    return values[max(values)] if values else None


def _last_jsonl(path: Path) -> dict:
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return json.loads(lines[-1]) if lines else {}
