"""Distillation throughput and peak memory per student (linear, readout, context decoders; tuned lens).

Each student trains in its own spawned process, so its peak RSS is its own (frozen model, SAE,
student, optimizer, one batch of full-vocabulary logits). Batches come from a small teacher
cache of builtin:tasks; the SAE is a random TopK one of the given width unless --sae is given.
"""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path

from benchmarks._spawn import in_child

STUDENTS = ("linear", "readout", "context", "lens")


def _child(kind: str, model: str, dtype: str, layer: int, latents: int, k: int, steps: int, batch_sequences: int,
           cache_root: str, sae_dir: str, out: str) -> dict:
    import torch

    from corpus.cache import ActivationCache
    from distill.config import DistillConfig, LensTrainConfig
    from distill.student import build_lens, build_student_decoder
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
    n_layers = min(4, frozen.n_layers - layer)
    student = build_lens(frozen) if kind == "lens" else build_student_decoder(kind, sae, frozen, layer, n_layers=n_layers)
    trainer = DistillTrainer(cfg, student, sae, ActivationCache.open(Path(cache_root)), layer)
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
                  sae: str = "") -> dict:
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
        cache = build_cache(cache_cfg, frozen, progress=False)
        sae_dir = sae
        if not sae_dir:
            random_sae = SparseAutoencoder(SaeConfig(d_in=frozen.d_model, num_latents=latents, arch="topk", k=k))
            random_sae.init_weights()
            sae_dir = str(Path(tmp) / "sae")
            random_sae.save(Path(sae_dir), extra={"layer": layer})
        del frozen
        for kind in STUDENTS:
            figures = in_child(_child, kind, model, dtype, layer, latents, k, steps, batch_sequences, str(cache.root),
                               sae_dir, tmp)
            for key, value in figures.items():
                results[f"{kind}_{key}"] = value
    results["tokens_per_step"] = batch_sequences * 255
    return results
