"""`python -m benchmarks.sae_vs_sparsify`: the five steps in order, then the table and results.{json,md}."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import tyro

import benchmarks.sae_vs_sparsify as package
from benchmarks.sae_vs_sparsify.config import BenchDirs, BenchError, CompareConfig
from benchmarks.sae_vs_sparsify.evaluate import check_conversion, convert_sparsify_sae, evaluate_both, results_table
from benchmarks.sae_vs_sparsify.train import (
    ensure_sparsify_venv,
    model_folder,
    only_cache,
    our_train_config,
    run_ours,
    run_sparsify,
    save_dataset,
    sparsify_sequences,
    train_sequences,
)
from models.errors import ConfigError
from models.io import write_json_atomic, write_text_atomic
from sae.model import SparseAutoencoder

log = logging.getLogger(__name__)


def run_compare(cfg: CompareConfig) -> dict:
    if cfg.layer < 1:
        raise ConfigError("--layer: sparsify hooks block outputs, so the layer must be at least 1")
    dirs = BenchDirs(Path(cfg.out).resolve())
    train_cfg = our_train_config(cfg, dirs)  # validates --data, --latents, --k before any work
    model_dir = model_folder(cfg.model)
    dirs.prepare()

    log.info("[1/5] sparsify venv %s", cfg.sparsify_venv)
    python = ensure_sparsify_venv(Path(cfg.sparsify_venv))

    log.info("[2/5] training sequences from %s", cfg.data)
    unique_ST, bos_id = train_sequences(train_cfg)
    steps = max(1, train_cfg.tokens // train_cfg.batch_tokens)
    ids_ST = sparsify_sequences(unique_ST, steps * cfg.batch_sequences, cfg.seed)
    if (ids_ST[:, 1:] == bos_id).any():
        log.warning("BOS appears inside sequences: sparsify's exclude_tokens will drop those positions too")
    save_dataset(ids_ST, dirs.dataset)

    log.info("[3/5] sparsify: %d steps of %d x %d tokens", steps, cfg.batch_sequences, cfg.seq_len)
    sparsify = run_sparsify(cfg, dirs, python, model_dir, bos_id, train_cfg)
    log.info("[4/5] ours: faithlens sae train (%d steps)", steps)
    ours = run_ours(cfg, dirs, train_cfg)
    cache = only_cache(dirs.ours_cache)
    cached = np.concatenate([cache.shard(i)["tokens"].numpy() for i in range(cache.n_shards)])
    same = cached.shape == unique_ST.shape and bool((cached == unique_ST).all())

    log.info("[5/5] converting sparsify's SAE and evaluating both on %d held-out tokens", cfg.eval_tokens)
    converted = convert_sparsify_sae(Path(sparsify["sae_dir"]), dirs.sparsify_converted, cfg.layer, cfg.model)
    rel_err = check_conversion(converted, dirs.sparsify / "conversion_check.safetensors")
    metrics = evaluate_both(cfg, {"ours": SparseAutoencoder.load(Path(ours["sae_dir"])), "sparsify": converted})

    results = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
               "ours": ours, "sparsify": sparsify, "eval": metrics, "same_sequences": same,
               "unique_train_sequences": len(unique_ST), "conversion_rel_err": rel_err}
    write_json_atomic(dirs.root / "results.json", results)
    write_text_atomic(dirs.root / "results.md", results_table(results) + "\n")
    return results


def main() -> None:
    cfg = tyro.cli(CompareConfig, prog="python -m benchmarks.sae_vs_sparsify", description=package.__doc__.split("\n")[0])
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "huggingface_hub", "datasets", "transformers", "tensorboard"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        results = run_compare(cfg)
    except (ConfigError, BenchError) as e:
        print(f"sae_vs_sparsify: error: {e}", file=sys.stderr)
        sys.exit(2)
    if cfg.json:
        print(json.dumps(results))
    else:
        print(results_table(results))
        print(f"\nresults written to {Path(cfg.out) / 'results.json'} and results.md")


if __name__ == "__main__":
    main()
