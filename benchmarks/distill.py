"""Distillation throughput and peak memory per student (linear, readout, context decoders of each depth;
tuned lens) and per teacher: `cache` (targets read from a teacher cache) and `online` (the frozen model
runs in the step; exact full-vocabulary KL).

Each (student, teacher) trains in its own spawned process, so its peak RSS is its own (frozen model, SAE,
student, optimizer, one batch of full-vocabulary logits). Both teachers see the same token sequences: those
of a small teacher cache of builtin:tasks, whose build rate is reported too (a cached run pays it once per
cache, an online run in every step). The SAE is a random TopK one of the given width unless --sae is given.
"""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path

from benchmarks._spawn import in_child

STUDENTS = ("linear", "readout", "context", "lens")
TEACHERS = ("cache", "online")


def _child(kind: str, depth: int, teacher: str, model: str, dtype: str, layer: int, steps: int, batch_sequences: int,
           cache_root: str, sae_dir: str, out: str) -> dict:
    import torch

    from corpus.cache import ActivationCache
    from distill.config import DistillConfig, LensTrainConfig
    from distill.student import build_lens, build_student_decoder
    from distill.teacher import OnlineTeacher
    from distill.train import DistillTrainer
    from models.loading import load_frozen
    from sae.model import SparseAutoencoder

    torch.manual_seed(0)
    common = dict(model=model, dtype=dtype, data="builtin:tasks", tokens=steps * batch_sequences * 255,
                  out=Path(out) / kind, batch_sequences=batch_sequences, eval_tokens=0, checkpoint_every=10**9)
    if kind == "lens":
        cfg, sae = LensTrainConfig(layer=layer, **common), None
    else:
        cfg, sae = DistillConfig(arch=kind, **common), SparseAutoencoder.load(Path(sae_dir))
    frozen = load_frozen(cfg)
    student = build_lens(frozen) if kind == "lens" else build_student_decoder(kind, sae, frozen, layer, n_layers=depth)
    cache = ActivationCache.open(Path(cache_root))
    source = cache
    if teacher == "online":
        shards = [cache.shard(i) for i in range(cache.n_shards)]
        source = OnlineTeacher(frozen, layer, torch.cat([s["tokens"] for s in shards]), torch.cat([s["next_ids"] for s in shards]))
    trainer = DistillTrainer(cfg, student, sae, source, layer)
    batches = trainer.data.iterate()
    trainer._train_step(next(batches))  # warm-up (allocations, kernels)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer._train_step(next(batches))
    seconds = time.perf_counter() - t0
    params = sum(p.numel() for p in student.parameters() if p.requires_grad)
    return {"tok_s": steps * trainer.tokens_per_step / seconds, "trainable_params": params,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def bench_distill(model: str, layer: int, latents: int, k: int, dtype: str, steps: int = 4, batch_sequences: int = 8,
                  sae: str = "", depths: tuple[int, ...] = (4,), teachers: tuple[str, ...] = TEACHERS) -> dict:
    """{student}_{teacher}_{tok_s, peak_rss_mb, trainable_params} for every student (context{depth} for each
    depth), and cache_build_tok_s."""
    from corpus.cache import build_cache
    from corpus.config import CacheConfig
    from models.loading import load_frozen
    from sae.config import SaeConfig
    from sae.model import SparseAutoencoder

    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache_cfg = CacheConfig(model=model, dtype=dtype, data="builtin:tasks", tokens=(steps + 1) * batch_sequences * 256,
                                layers=str(layer), out=Path(tmp) / "cache", teacher=True)
        frozen = load_frozen(cache_cfg)
        started = time.perf_counter()
        cache = build_cache(cache_cfg, frozen, progress=False)
        results["cache_build_tok_s"] = cache.tokens / (time.perf_counter() - started)
        sae_dir = sae
        if not sae_dir:
            random_sae = SparseAutoencoder(SaeConfig(d_in=frozen.d_model, num_latents=latents, arch="topk", k=k))
            random_sae.init_weights()
            sae_dir = str(Path(tmp) / "sae")
            random_sae.save(Path(sae_dir), extra={"layer": layer})
        depths = tuple(d for d in depths if d <= frozen.n_layers - layer) or (frozen.n_layers - layer,)
        del frozen
        students = [(kind, d) for kind in STUDENTS for d in (depths if kind == "context" else (0,))]
        for kind, depth in students:
            name = f"context{depth}" if kind == "context" else kind
            for teacher in teachers:
                figures = in_child(_child, kind, depth, teacher, model, dtype, layer, steps, batch_sequences,
                                   str(cache.root), sae_dir, tmp)
                for key, value in figures.items():
                    results[f"{name}_{teacher}_{key}"] = value
    results["tokens_per_step"] = batch_sequences * 255
    return results
