"""`faithlens sae train`: the activation cache, then SAE training as a Ray Train job, then metrics.

The same code runs a laptop job (one CPU worker) and a cluster job (more workers, GPUs): only
`--workers` and `--use-gpu` change.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, fields
from pathlib import Path

import torch

from corpus.cache import ActivationCache, build_cache
from corpus.config import CacheConfig
from corpus.sources import absolute_spec
from models.io import write_json_atomic
from models.loading import load_frozen
from sae.config import SaeTrainConfig
from sae.ray_job import resume_and_run, run_torch_job, tensorboard_reporter
from sae.train import SaeTrainer

log = logging.getLogger(__name__)


def cache_config_for(cfg: SaeTrainConfig, layers: str | None = None) -> CacheConfig:
    """Residuals only (no teacher), enough positions that `tokens` non-BOS tokens remain."""
    tokens = cfg.tokens
    with_bos = math.ceil(tokens * cfg.seq_len / (cfg.seq_len - 1))
    return CacheConfig(model=cfg.model, dtype=cfg.dtype, device=cfg.device, data=cfg.data, tokens=with_bos,
                       seq_len=cfg.seq_len, split="train", eval_fraction=cfg.eval_fraction, ood=cfg.ood,
                       encoding=cfg.encoding, text_field=cfg.text_field, seed=cfg.seed, layers=layers or str(cfg.layer),
                       out=cfg.cache_dir, teacher=False)


def train_worker(config: dict) -> None:
    """Ray Train's per-worker entry point."""
    import ray.train

    cfg = SaeTrainConfig(**{**config["cfg"], "out": Path(config["cfg"]["out"]), "cache_dir": Path(config["cfg"]["cache_dir"])})
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads_per_worker"])  # not OMP_NUM_THREADS: a user's shell may pin it to 1
    device = "cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu"
    cache = ActivationCache.open(Path(config["cache_root"]), verify=False)
    reporter = tensorboard_reporter(cfg.out, rank, cfg.batch_tokens, lambda: trainer.last_metrics)
    trainer = SaeTrainer(cfg, cache, rank, world, device, reporter)
    if world > 1:
        trainer.forward_module = ray.train.torch.prepare_model(trainer.sae, move_to_device=False)
    resume_and_run(trainer, rank, f"sae {cfg.arch} L{cfg.layer}")
    if rank == 0:
        trainer.finish()
    reporter.close()


def _train_fields(cfg: SaeTrainConfig) -> dict:
    """The SaeTrainConfig part of `cfg` (a sweep config adds fields the workers do not take)."""
    return {f.name: getattr(cfg, f.name) for f in fields(SaeTrainConfig)}


def run_ray_training(cfg: SaeTrainConfig, cache: ActivationCache) -> None:
    out = Path(cfg.out).resolve()
    loop_config = {"cfg": {**_train_fields(cfg), "out": str(out), "cache_dir": str(Path(cfg.cache_dir).resolve()),
                           # workers run in another folder: relative paths must not reach them
                           "data": absolute_spec(cfg.data), "ood": absolute_spec(cfg.ood)},
                   "cache_root": str(cache.root.resolve())}
    run_torch_job(train_worker, loop_config, out, cfg.workers, cfg.use_gpu, "SAE training")


def run_sae_train(cfg: SaeTrainConfig) -> Path:
    frozen = load_frozen(cfg)
    frozen.check_layer(cfg.layer)
    cache = build_cache(cache_config_for(cfg), frozen)
    print(f"training cache: {cache.tokens:,} tokens at {cache.root}")
    return train_and_evaluate(cfg, cache, frozen)


def train_and_evaluate(cfg: SaeTrainConfig, cache: ActivationCache, frozen) -> Path:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "config.json", {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()})
    run_ray_training(cfg, cache)
    sae_dir = out / "sae"
    print(f"SAE saved to {sae_dir} (cfg.json, sae.safetensors); TensorBoard: tensorboard --logdir {out / 'tb'}")
    if cfg.eval_tokens:
        from sae.metrics import run_sae_eval

        run_sae_eval(eval_config_for(cfg, sae_dir), frozen=frozen)
    return sae_dir


def eval_config_for(cfg: SaeTrainConfig, sae_dir: Path):
    from sae.metrics import SaeEvalConfig

    return SaeEvalConfig(sae=sae_dir, model=cfg.model, dtype=cfg.dtype, data=cfg.data, ood=cfg.ood,
                         tokens=cfg.eval_tokens, seq_len=cfg.seq_len, eval_fraction=cfg.eval_fraction,
                         encoding=cfg.encoding, text_field=cfg.text_field, seed=cfg.seed,
                         out=Path(cfg.out) / "metrics.json")
