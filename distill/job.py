"""`faithlens decoder train` and `faithlens lens train`: the teacher cache, then distillation as a
Ray Train job (same pattern as the SAE stage), then the trained student saved beside its curve.

Run folder (OUT): config.json, decoder/ (or lens/), metrics.json (train summary and the held-out
KL-vs-tokens curve), tb/, checkpoints/latest, ray_results/.
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
from distill.config import DistillConfig, LensTrainConfig, TrainLoopConfig
from models.config import DEFAULT_MODEL
from models.errors import ConfigError
from models.io import write_json_atomic
from models.loading import load_frozen
from sae.metrics import resolve_sae_dir
from sae.model import SparseAutoencoder
from sae.ray_job import resume_and_run, run_torch_job, tensorboard_reporter

log = logging.getLogger(__name__)


class RunDir:
    """Paths inside a distillation run folder, computed in one place."""

    def __init__(self, root: Path):
        self.root = Path(root)

    config = property(lambda self: self.root / "config.json")
    metrics = property(lambda self: self.root / "metrics.json")
    decoder = property(lambda self: self.root / "decoder")
    lens = property(lambda self: self.root / "lens")
    tb = property(lambda self: self.root / "tb")


def sae_for(cfg: DistillConfig) -> tuple[Path, dict]:
    """The SAE folder and its metadata; fills in the model from it when --model was left at the default."""
    sae_dir = resolve_sae_dir(cfg.sae)
    meta = SparseAutoencoder.load(sae_dir).meta
    if "layer" not in meta:
        raise ConfigError(f"--sae {sae_dir}: cfg.json records no layer (was it trained by faithlens?)")
    return sae_dir, meta


def teacher_cache(cfg: TrainLoopConfig, frozen, layer: int) -> ActivationCache:
    """The cache for `cfg.tokens` scored positions (whole sequences: BOS + seq_len - 1 scored)."""
    with_bos = math.ceil(cfg.tokens * cfg.seq_len / (cfg.seq_len - 1))
    cache_cfg = CacheConfig(model=cfg.model, dtype=cfg.dtype, device=cfg.device, data=cfg.data, tokens=with_bos,
                            seq_len=cfg.seq_len, split="train", eval_fraction=cfg.eval_fraction, ood=cfg.ood,
                            encoding=cfg.encoding, text_field=cfg.text_field, seed=cfg.seed, layers=str(layer),
                            out=cfg.cache_dir, teacher=True, top_k=cfg.teacher_k)
    return build_cache(cache_cfg, frozen)


def open_cache(path: Path, layer: int) -> ActivationCache:
    cache = ActivationCache.open(Path(path))
    if layer not in cache.layers or not cache.has_teacher:
        raise ConfigError(f"--cache {path}: needs layer {layer} and teacher targets (it has layers {cache.layers}, "
                          f"teacher {'yes' if cache.has_teacher else 'no'})")
    return cache


def _serialisable(cfg) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}


# -- the worker ------------------------------------------------------------------------------
def train_worker(config: dict) -> None:
    """Ray Train's per-worker entry point (decoders and the tuned lens)."""
    import ray.train

    from distill.student import build_lens, build_student_decoder
    from distill.train import DistillTrainer, HeldOut

    kind = config["kind"]
    cls = LensTrainConfig if kind == "lens" else DistillConfig
    raw = config["cfg"]
    cfg = cls(**{**raw, **{k: Path(raw[k]) for k in ("out", "cache_dir", "sae", "cache") if k in raw and raw[k] is not None}})
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads_per_worker"])
    torch.manual_seed(cfg.seed)
    frozen = load_frozen(cfg)
    layer = config["layer"]
    sae = None
    if kind == "lens":
        student = build_lens(frozen)
    else:
        sae = SparseAutoencoder.load(Path(config["sae_dir"]))
        student = build_student_decoder(cfg.arch, sae, frozen, layer, cfg.rank, cfg.vocab_bias, cfg.n_layers, cfg.init)
    cache = ActivationCache.open(Path(config["cache_root"]), verify=False)
    held_out = HeldOut(cfg, frozen, layer) if rank == 0 and cfg.eval_tokens > 0 else None
    tokens_per_step = cfg.batch_sequences * (cache.seq_len - 1)
    reporter = tensorboard_reporter(cfg.out, rank, tokens_per_step, lambda: trainer.last_metrics)
    trainer = DistillTrainer(cfg, kind, student, sae, cache, layer, rank, world, reporter, held_out)
    if world > 1:
        trainer.forward_module = ray.train.torch.prepare_model(student, move_to_device=False)
    state = resume_and_run(trainer, rank, f"distill {kind} L{layer}")
    if rank == 0:
        run = RunDir(cfg.out)
        extra = {"model": cfg.model, "layer": layer, "train_tokens": state.step * tokens_per_step,
                 "data": cfg.data, "loss": cfg.loss}
        if kind == "lens":
            student.save(run.lens, extra=extra)
        else:
            extra.update({"sae": config["sae_dir"], "init": cfg.init,
                          "source_blocks": getattr(student, "source_blocks", None)})
            student.save(run.decoder, extra=extra)
        write_json_atomic(run.metrics, {"kind": kind, "layer": layer, "train_tokens": state.step * tokens_per_step,
                                        "steps": state.step, "final_train": trainer.last_metrics,
                                        "curve": state.curve, "curve_tokens": held_out.tokens if held_out else 0})
    reporter.close()


# -- commands ----------------------------------------------------------------------------------
def _launch(cfg: TrainLoopConfig, kind: str, layer: int, cache: ActivationCache, extra: dict) -> None:
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RunDir(out).config, {"kind": kind, "layer": layer, "cache": str(cache.root), **_serialisable(cfg)})
    cls = LensTrainConfig if kind == "lens" else DistillConfig
    raw = {f.name: getattr(cfg, f.name) for f in fields(cls)}
    raw.update({"out": str(out), "cache_dir": str(Path(cfg.cache_dir).resolve()),
                # workers run in another folder: relative paths must not reach them
                "data": absolute_spec(cfg.data), "ood": absolute_spec(cfg.ood),
                "model": str(Path(cfg.model).resolve()) if Path(cfg.model).exists() else cfg.model})
    for key in ("sae", "cache"):
        if raw.get(key) is not None:
            raw[key] = str(Path(raw[key]).resolve())
    loop_config = {"cfg": raw, "kind": kind, "layer": layer, "cache_root": str(cache.root.resolve()), **extra}
    run_torch_job(train_worker, loop_config, out, cfg.workers, cfg.use_gpu, f"{kind} distillation")


def _report(cfg: TrainLoopConfig, what: Path) -> None:
    import json

    run = RunDir(cfg.out)
    metrics = json.loads(run.metrics.read_text())
    for point in metrics["curve"]:
        print(f"  held-out after {point['tokens']:>9,} tokens: KL {point['kl']:.3f} nats/token, top-1 {point['top1']:.1%}")
    print(f"saved {what}; metrics {run.metrics}; TensorBoard: tensorboard --logdir {run.tb}")


def run_decoder_train(cfg: DistillConfig) -> Path:
    sae_dir, meta = sae_for(cfg)
    if cfg.model == DEFAULT_MODEL and meta.get("model"):
        cfg.model = meta["model"]
    layer = int(meta["layer"])
    frozen = load_frozen(cfg)
    frozen.check_layer(layer)
    if frozen.d_model != meta["d_in"]:
        raise ConfigError(f"--sae {sae_dir}: SAE width d_in={meta['d_in']} does not match --model {cfg.model} "
                          f"(d_model={frozen.d_model})")
    cache = open_cache(cfg.cache, layer) if cfg.cache else teacher_cache(cfg, frozen, layer)
    print(f"teacher cache: {cache.tokens:,} positions at {cache.root}")
    _launch(cfg, "decoder", layer, cache, {"sae_dir": str(sae_dir.resolve())})
    _report(cfg, RunDir(cfg.out).decoder)
    return RunDir(cfg.out).decoder


def run_lens_train(cfg: LensTrainConfig) -> Path:
    frozen = load_frozen(cfg)
    frozen.check_layer(cfg.layer)
    cache = open_cache(cfg.cache, cfg.layer) if cfg.cache else teacher_cache(cfg, frozen, cfg.layer)
    print(f"teacher cache: {cache.tokens:,} positions at {cache.root}")
    _launch(cfg, "lens", cfg.layer, cache, {})
    _report(cfg, RunDir(cfg.out).lens)
    return RunDir(cfg.out).lens
