"""SAE training throughput: from the cache, and end to end (frozen forward to layer L + training)."""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path

from corpus.cache import build_cache
from models.loading import load_frozen
from sae.config import SaeTrainConfig
from sae.job import cache_config_for
from sae.train import SaeTrainer


def bench_sae(model: str, layer: int, tokens: int, latents: int, k: int, dtype: str, data: str = "builtin:tasks") -> dict:
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = cache_s = None
        for arch in ("topk", "relu"):
            cfg = SaeTrainConfig(model=model, dtype=dtype, data=data, layer=layer, latents=latents, k=k, tokens=tokens,
                                 arch=arch, out=Path(tmp) / arch, cache_dir=Path(tmp) / "cache", eval_tokens=0,
                                 checkpoint_every=10**9)
            if cache is None:  # one cache serves both architectures; its build time counts for both
                frozen = load_frozen(cfg)
                t0 = time.perf_counter()
                cache = build_cache(cache_config_for(cfg), frozen, progress=False)
                cache_s = time.perf_counter() - t0
                results["activations_cache_tok_s"] = cache.tokens / cache_s
            trainer = SaeTrainer(cfg, cache)
            trainer.start()
            t0 = time.perf_counter()
            trainer.run()
            train_s = time.perf_counter() - t0
            trained = trainer.total_steps * cfg.batch_tokens
            results[f"{arch}_train_tok_s"] = trained / train_s
            results[f"{arch}_end_to_end_tok_s"] = trained / (train_s + cache_s * trained / cache.tokens)
            results[f"{arch}_final_fvu_train_batch"] = trainer.last_metrics["sae/fvu"]
    results["latents"], results["k"], results["tokens"] = latents, k, tokens
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return results
