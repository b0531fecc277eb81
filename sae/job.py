"""`faithlens sae train`: the activation cache, then SAE training as a Ray Train job, then metrics.

The same code runs a laptop job (one CPU worker) and a cluster job (more workers, GPUs): only
`--workers` and `--use-gpu` change.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from corpus.cache import ActivationCache, build_cache
from corpus.config import CacheConfig
from models.io import write_json_atomic
from models.loading import load_frozen
from sae.config import SaeTrainConfig
from sae.train import SaeTrainer
from training.config import pick, to_record
from training.layout import RunLayout
from training.ray_job import run_stage_job
from training.tracking import wandb_settings

log = logging.getLogger(__name__)


def cache_config_for(cfg: SaeTrainConfig, layers: str | None = None) -> CacheConfig:
    """Residuals only (no teacher), enough positions that `tokens` non-BOS tokens remain."""
    return CacheConfig.covering(cfg, cfg.tokens, layers or str(cfg.layer), cfg.cache_dir, teacher=False)


def build_trainer(cfg: SaeTrainConfig, job: dict, rank: int, world: int, reporter):
    """Ray Train's per-worker builder (see `training.ray_job.stage_worker`): the trainer, and what
    rank 0 runs at the end (save the SAE)."""
    device = "cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu"
    cache = ActivationCache.open(Path(job["cache_root"]), verify=False)
    trainer = SaeTrainer(cfg, cache, rank, world, device, reporter)
    return trainer, trainer.finish


def run_ray_training(cfg: SaeTrainConfig, cache: ActivationCache) -> None:
    """Train on `cfg`'s SaeTrainConfig fields (a sweep config adds fields the workers do not take)."""
    run_stage_job(pick(cfg, SaeTrainConfig), "sae.job:build_trainer", {"cache_root": str(cache.root.resolve())},
                  f"sae {cfg.arch} L{cfg.layer}")


def run_sae_train(cfg: SaeTrainConfig) -> Path:
    wandb_settings(cfg.wandb)  # a missing package or login fails before the cache is built
    frozen = load_frozen(cfg)
    frozen.check_layer(cfg.layer)
    cache = build_cache(cache_config_for(cfg), frozen)
    print(f"training cache: {cache.tokens:,} tokens at {cache.root}")
    return train_and_evaluate(cfg, cache, frozen)


def train_and_evaluate(cfg: SaeTrainConfig, cache: ActivationCache, frozen) -> Path:
    run = RunLayout(cfg.out)
    run.root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run.config, to_record(pick(cfg, SaeTrainConfig)))
    run_ray_training(cfg, cache)
    sae_dir = run.sae
    print(f"SAE saved to {sae_dir} (cfg.json, sae.safetensors); TensorBoard: tensorboard --logdir {run.tb}")
    if cfg.eval_tokens:
        from sae.metrics import run_sae_eval

        run_sae_eval(eval_config_for(cfg, sae_dir), frozen=frozen)
    return sae_dir


def eval_config_for(cfg: SaeTrainConfig, sae_dir: Path):
    from sae.metrics import SaeEvalConfig

    return pick(cfg, SaeEvalConfig, sae=sae_dir, tokens=cfg.eval_tokens, split="eval", out=RunLayout(cfg.out).metrics)
