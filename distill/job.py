"""`faithlens decoder train` and `faithlens lens train`: the teacher cache (or, with `--teacher online`,
the packed training tokens), the decoder's starting blocks, then distillation as a Ray Train job (same
runner as the SAE stage), then the trained student saved beside its curve.

Run folder (OUT): config.json, decoder/ (or lens/), metrics.json (train summary and the held-out
KL-vs-tokens curve), tb/, checkpoints/latest, ray_results/; train_tokens.safetensors (--teacher online),
blocks.json (--blocks greedy: the removal path).
"""

from __future__ import annotations

import logging
from pathlib import Path

from corpus.cache import ActivationCache, build_cache
from corpus.config import CacheConfig
from distill.config import DistillConfig, LensTrainConfig, TrainLoopConfig
from models.config import DEFAULT_MODEL
from models.errors import ConfigError
from models.io import read_json, write_json_atomic
from models.loading import load_frozen
from sae.model import SparseAutoencoder
from training.config import inherit_corpus, pick, to_record
from training.layout import RunLayout, resolve_sae_dir
from training.ray_job import run_stage_job
from training.tracking import wandb_settings

log = logging.getLogger(__name__)


def sae_for(cfg: DistillConfig) -> tuple[Path, dict]:
    """The SAE folder and its metadata."""
    sae_dir = resolve_sae_dir(cfg.sae)
    meta = SparseAutoencoder.load(sae_dir).meta
    if "layer" not in meta:
        raise ConfigError(f"--sae {sae_dir}: cfg.json records no layer (was it trained by faithlens?)")
    return sae_dir, meta


def teacher_cache(cfg: TrainLoopConfig, frozen, layer: int) -> ActivationCache:
    """The cache for `cfg.tokens` scored positions (whole sequences: BOS + seq_len - 1 scored)."""
    return build_cache(CacheConfig.covering(cfg, cfg.tokens, str(layer), cfg.cache_dir, teacher=True, top_k=cfg.teacher_k),
                       frozen)


def teacher_source(cfg: TrainLoopConfig, frozen, layer: int) -> dict:
    """What the workers read their targets from: {"cache_root": …} or, online, {"tokens_file": …}."""
    if cfg.teacher == "online":
        from distill.teacher import training_tokens

        path = training_tokens(cfg, frozen, cfg.tokens, Path(cfg.out))
        print(f"online teacher: training tokens at {path}")
        return {"tokens_file": str(path.resolve())}
    cache = open_cache(cfg.cache, layer) if cfg.cache else teacher_cache(cfg, frozen, layer)
    print(f"teacher cache: {cache.tokens:,} positions at {cache.root}")
    return {"cache_root": str(cache.root.resolve())}


def choose_blocks(cfg: DistillConfig, frozen, sae_dir: Path, layer: int) -> list[int] | None:
    """The frozen layers a context decoder's blocks start from (None: no copies), per `--blocks`."""
    from distill.blocks import parse_block_ids
    from distill.student import check_block_copy, even_block_ids

    if cfg.arch != "context" or cfg.init != "upper-blocks":
        return None
    check_block_copy(frozen)
    if cfg.blocks == "even":
        return even_block_ids(layer, frozen.n_layers, cfg.n_layers)
    if cfg.blocks != "greedy":
        return parse_block_ids(cfg.blocks, layer, frozen.n_layers, cfg.n_layers)
    even_block_ids(layer, frozen.n_layers, cfg.n_layers)  # refuses a depth above the blocks there are
    record_path = Path(cfg.out) / "blocks.json"
    settings = {"sae": str(sae_dir.resolve()), "layer": layer, "n_layers": cfg.n_layers, "tokens": cfg.select_tokens,
                "bos_stream": cfg.bos_stream, "data": to_record(cfg)["data"], "seq_len": cfg.seq_len, "seed": cfg.seed}
    if record_path.is_file():
        saved = read_json(record_path)
        if saved.get("settings") == settings:
            return saved["kept"]
    kept, path = greedy_blocks(cfg, frozen, sae_dir, layer, cfg.n_layers)
    write_json_atomic(record_path, {"settings": settings, "kept": kept, "path": path})
    print(f"blocks: kept {kept} of the {frozen.n_layers - layer} above layer {layer} (KL of the SAE-spliced model "
          f"{path[0]['kl']:.3f} with all, {path[-1]['kl']:.3f} with these; path in {record_path})")
    return kept


def greedy_blocks(cfg: DistillConfig, frozen, sae_dir: Path, layer: int, n_blocks: int) -> tuple[list[int], list[dict]]:
    """Greedy removal down to `n_blocks` (distill.blocks), on `cfg.select_tokens` training-split tokens."""
    from distill.blocks import SplicedStack, greedy_block_ids
    from distill.heldout import HeldOut
    from distill.student import build_student_decoder

    sae = SparseAutoencoder.load(sae_dir)
    upper = list(range(layer + 1, frozen.n_layers + 1))
    whole = build_student_decoder("context", sae, frozen, layer, n_layers=len(upper), block_ids=upper,
                                  bos_stream=cfg.bos_stream)
    sample = HeldOut(cfg, frozen, layer, cfg.select_tokens, split="train")
    return greedy_block_ids(SplicedStack(whole, sae, sample, layer + 1), upper, n_blocks)


def open_cache(path: Path, layer: int) -> ActivationCache:
    cache = ActivationCache.open(Path(path))
    if layer not in cache.layers or not cache.has_teacher:
        raise ConfigError(f"--cache {path}: needs layer {layer} and teacher targets (it has layers {cache.layers}, "
                          f"teacher {'yes' if cache.has_teacher else 'no'})")
    return cache


# -- the worker ------------------------------------------------------------------------------
def build_trainer(cfg: TrainLoopConfig, job: dict, rank: int, world: int, reporter):
    """Ray Train's per-worker builder (see `training.ray_job.stage_worker`), decoders and the tuned lens:
    the trainer, and what rank 0 runs at the end (save the student and metrics.json)."""
    import torch

    from distill.heldout import HeldOut
    from distill.student import build_lens, build_student_decoder
    from distill.train import DistillTrainer

    torch.manual_seed(cfg.seed)
    frozen = load_frozen(cfg)
    layer = job["layer"]
    sae = None
    if isinstance(cfg, LensTrainConfig):
        student = build_lens(frozen)
    else:
        sae = SparseAutoencoder.load(Path(job["sae_dir"]))
        student = build_student_decoder(cfg.arch, sae, frozen, layer, cfg.rank, cfg.vocab_bias, cfg.n_layers, cfg.init,
                                        job.get("block_ids"), cfg.bos_stream)
    if "tokens_file" in job:
        from distill.teacher import OnlineTeacher, load_training_tokens

        source = OnlineTeacher(frozen, layer, *load_training_tokens(Path(job["tokens_file"])))
    else:
        source = ActivationCache.open(Path(job["cache_root"]), verify=False)
    held_out = HeldOut(cfg, frozen, layer, cfg.eval_tokens) if rank == 0 and cfg.eval_tokens > 0 else None
    trainer = DistillTrainer(cfg, student, sae, source, layer, rank, world, reporter, held_out)
    return trainer, lambda: _save_student(trainer, job)


def _save_student(trainer, job: dict) -> None:
    cfg, state, layer = trainer.cfg, trainer.state, job["layer"]
    run = RunLayout(cfg.out)
    kind = "lens" if isinstance(cfg, LensTrainConfig) else "decoder"
    train_tokens = state.step * trainer.tokens_per_step
    extra = {"model": cfg.model, "layer": layer, "train_tokens": train_tokens, "data": cfg.data, "loss": cfg.loss,
             "teacher": cfg.teacher}
    if kind == "lens":
        trainer.student.save(run.lens, extra=extra)
    else:
        extra.update({"sae": job["sae_dir"], "init": cfg.init, "source_blocks": trainer.student.source_blocks})
        trainer.student.save(run.decoder, extra=extra)
    held_out = trainer.held_out
    write_json_atomic(run.metrics, {"kind": kind, "layer": layer, "train_tokens": train_tokens, "steps": state.step,
                                    "final_train": trainer.last_metrics, "curve": state.curve,
                                    "curve_tokens": held_out.tokens if held_out else 0})


# -- commands ----------------------------------------------------------------------------------
def _launch(cfg: TrainLoopConfig, kind: str, layer: int, source: dict, job: dict) -> None:
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    record = to_record(cfg)
    write_json_atomic(RunLayout(out).config, {"kind": kind, "layer": layer, **record, **source})
    run_stage_job(cfg, "distill.job:build_trainer", {"layer": layer, **source, **job}, f"distill {kind} L{layer}")


def _report(cfg: TrainLoopConfig, what: Path) -> None:
    run = RunLayout(cfg.out)
    metrics = read_json(run.metrics)
    for point in metrics["curve"]:
        print(f"  held-out after {point['tokens']:>9,} tokens: KL {point['kl']:.3f} nats/token, top-1 {point['top1']:.1%}")
    print(f"saved {what}; metrics {run.metrics}; TensorBoard: tensorboard --logdir {run.tb}")


def run_decoder_train(cfg: DistillConfig) -> Path:
    wandb_settings(cfg.wandb)  # a missing package or login fails before the cache is built
    sae_dir, meta = sae_for(cfg)
    if cfg.model == DEFAULT_MODEL and meta.get("model"):
        cfg.model = meta["model"]
    sae_run = RunLayout.of_sae(sae_dir)
    if sae_run.config.is_file():
        cfg = inherit_corpus(cfg, sae_run.config, "decoder train", "the SAE stage")
    layer = int(meta["layer"])
    frozen = load_frozen(cfg)
    frozen.check_layer(layer, f"--sae {sae_dir}/cfg.json: layer")
    if frozen.d_model != meta["d_in"]:
        raise ConfigError(f"--sae {sae_dir}: SAE width d_in={meta['d_in']} does not match --model {cfg.model} "
                          f"(d_model={frozen.d_model})")
    block_ids = choose_blocks(cfg, frozen, sae_dir, layer)  # first: it refuses blocks it cannot copy
    source = teacher_source(cfg, frozen, layer)
    _launch(pick(cfg, DistillConfig), "decoder", layer, source, {"sae_dir": str(sae_dir.resolve()), "block_ids": block_ids})
    _report(cfg, RunLayout(cfg.out).decoder)
    return RunLayout(cfg.out).decoder


def run_lens_train(cfg: LensTrainConfig) -> Path:
    wandb_settings(cfg.wandb)
    frozen = load_frozen(cfg)
    frozen.check_layer(cfg.layer)
    _launch(pick(cfg, LensTrainConfig), "lens", cfg.layer, teacher_source(cfg, frozen, cfg.layer), {})
    _report(cfg, RunLayout(cfg.out).lens)
    return RunLayout(cfg.out).lens
