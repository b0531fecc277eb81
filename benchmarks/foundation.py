"""Model load (cold and warm), full forward vs activations-only forward, cache build."""

from __future__ import annotations

import os
import resource
import statistics
import tempfile
import time

import torch

from corpus.cache import build_cache
from corpus.config import CacheConfig
from models.config import ModelConfig
from models.loading import load_frozen


def _best_rate(fn, tokens: int, repeats: int) -> float:
    fn()  # warm-up: allocator, kernels
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return tokens / statistics.median(times)


def bench_foundation(model: str, layer: int, batch: int, seq_len: int, repeats: int, cache_tokens: int, dtype: str) -> dict:
    results: dict = {}
    embedded = model.startswith("embedded:")
    if embedded:  # cold = dequantise the GGUF into an empty cache directory
        old = os.environ.get("FAITHLENS_CACHE")
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["FAITHLENS_CACHE"] = tmp
            t0 = time.perf_counter()
            load_frozen(ModelConfig(model=model, dtype=dtype))
            results["model_load_cold_s"] = time.perf_counter() - t0
            if old is None:
                os.environ.pop("FAITHLENS_CACHE")
            else:
                os.environ["FAITHLENS_CACHE"] = old
    load_frozen(ModelConfig(model=model, dtype=dtype))  # make sure the warm cache exists
    t0 = time.perf_counter()
    frozen = load_frozen(ModelConfig(model=model, dtype=dtype))
    results["model_load_warm_s"] = time.perf_counter() - t0
    frozen.check_layer(layer)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, frozen.vocab_size, (batch, seq_len), generator=g)
    ids[:, 0] = frozen.bos_token_id
    n = ids.numel()
    results["dtype"] = str(frozen.dtype).removeprefix("torch.")
    results["batch_tokens"] = n
    results["full_forward_tok_s"] = _best_rate(lambda: frozen.forward(ids), n, repeats)
    results[f"activations_only_L{layer}_tok_s"] = _best_rate(lambda: frozen.residuals(ids, [layer]), n, repeats)
    results["activations_speedup"] = results[f"activations_only_L{layer}_tok_s"] / results["full_forward_tok_s"]

    with tempfile.TemporaryDirectory() as tmp:
        cfg = CacheConfig(model=model, dtype=dtype, data="builtin:tasks", layers=str(layer), tokens=cache_tokens,
                          seq_len=seq_len, batch_size=batch, out=tmp)
        t0 = time.perf_counter()
        cache = build_cache(cfg, frozen, progress=False)
        results["cache_build_tok_s"] = cache.tokens / (time.perf_counter() - t0)
        results["cache_bytes_per_token"] = cache.size_bytes() / cache.tokens
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return results
