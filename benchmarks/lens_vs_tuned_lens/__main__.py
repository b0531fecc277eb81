"""`python -m benchmarks.lens_vs_tuned_lens`: the five steps in order, then the table and results.{json,md}."""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path

import tyro

import benchmarks.lens_vs_tuned_lens as package
from benchmarks.lens_vs_tuned_lens.config import BenchDirs, BenchError, CompareConfig, check_layer, plan_tokens
from benchmarks.lens_vs_tuned_lens.evaluate import check_conversion, convert_tuned_lens, evaluate_lenses, results_table
from benchmarks.lens_vs_tuned_lens.train import (
    RSS_SAMPLE_S,
    ensure_tuned_lens_venv,
    model_folder,
    our_lens_config,
    our_training_sequences,
    run_ours,
    run_tuned_lens,
)
from benchmarks.sae_vs_sparsify.train import save_dataset
from models.config import ModelConfig
from models.errors import ConfigError
from models.head import FrozenHead
from models.io import write_json_atomic, write_text_atomic
from models.lens import TunedLens
from models.loading import load_frozen, resolve_dtype
from training.layout import RunLayout

log = logging.getLogger(__name__)


def run_compare(cfg: CompareConfig) -> dict:
    dirs = BenchDirs(Path(cfg.out).resolve())
    model_dir = model_folder(cfg.model)
    check_layer(cfg.layer, model_dir)
    plan = plan_tokens(cfg.tokens, cfg.seq_len, cfg.batch_sequences, cfg.tuned_lens_steps)
    lens_cfg = our_lens_config(cfg, dirs, plan)  # what `lens train` would refuse fails here, before any work
    dirs.prepare()

    log.info("[1/5] tuned-lens venv %s", cfg.venv)
    python = ensure_tuned_lens_venv(Path(cfg.venv))
    log.info("[2/5] ours: faithlens lens train (%s), %d steps of %d sequences", cfg.runner, plan.our_steps, plan.batch_sequences)
    ours = run_ours(cfg, dirs, lens_cfg)
    log.info("[3/5] the %d sequences ours trained on, for tuned-lens", plan.sequences)
    ids_ST, table_rows = our_training_sequences(dirs, lens_cfg, ours["steps"])
    save_dataset(ids_ST, dirs.dataset)
    log.info("[4/5] tuned-lens: %d steps of %d x %d sequences", plan.tuned_lens_steps, plan.batches_per_tuned_lens_step,
             plan.batch_sequences)
    tuned = run_tuned_lens(cfg, dirs, python, model_dir, plan)

    log.info("[5/5] converting tuned-lens's translator and evaluating both on %d held-out tokens", cfg.eval_tokens)
    frozen32 = load_frozen(ModelConfig(model=cfg.model, dtype="fp32"))
    converted = convert_tuned_lens(dirs.tuned_lens_lens, dirs.tuned_lens_converted, cfg.layer, FrozenHead.from_frozen(frozen32),
                                   extra={"model": cfg.model, "train_tokens": tuned["train_tokens"]})
    rel_err = check_conversion(converted, dirs.conversion_check)
    same_dtype = resolve_dtype(cfg.eval_dtype) == frozen32.dtype
    frozen = frozen32 if same_dtype else load_frozen(ModelConfig(model=cfg.model, dtype=cfg.eval_dtype))
    head = FrozenHead.from_frozen(frozen)
    lenses = {"ours": TunedLens.load(RunLayout(dirs.ours_run).lens, head),
              "tuned_lens": TunedLens.load(dirs.tuned_lens_converted, head)}
    metrics = evaluate_lenses(cfg, frozen, lenses, progress=not cfg.json)

    results = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
               "plan": {**asdict(plan), "scored_tokens": plan.scored_tokens, "our_steps": plan.our_steps},
               "ours": ours, "tuned_lens": tuned, "eval": metrics, "conversion_rel_err": rel_err,
               "same_sequences": tuned["sequences"] == len(ids_ST) == ours["steps"] * cfg.batch_sequences,
               "table_sequences": table_rows, "rss_sample_s": RSS_SAMPLE_S, "cpus": os.cpu_count()}
    write_json_atomic(dirs.root / "results.json", results)
    write_text_atomic(dirs.root / "results.md", results_table(results) + "\n")
    return results


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "huggingface_hub", "datasets", "transformers", "tensorboard"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        cfg = tyro.cli(CompareConfig, args=argv, prog="python -m benchmarks.lens_vs_tuned_lens",
                       description=package.__doc__.split("\n")[0])
        results = run_compare(cfg)
    except (ConfigError, BenchError) as e:
        print(f"lens_vs_tuned_lens: error: {e}", file=sys.stderr)
        sys.exit(2)
    if cfg.json:
        print(json.dumps(results))
    else:
        print(results_table(results))
        print(f"\nresults written to {Path(cfg.out) / 'results.json'} and results.md")


if __name__ == "__main__":
    main()
