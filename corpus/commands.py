"""`faithlens cache`: build (or resume) an activation and teacher cache."""

from __future__ import annotations

from corpus.cache import ActivationCache, build_cache
from corpus.config import CacheConfig
from models.loading import load_frozen


def run_cache(cfg: CacheConfig) -> ActivationCache:
    frozen = load_frozen(cfg)
    cache = build_cache(cfg, frozen)
    print(
        f"cache: {cache.tokens:,} tokens, layers {','.join(map(str, cache.layers))}, {cache.n_shards} shards, "
        f"{cache.size_bytes() / 2**20:.1f} MiB at {cache.root}"
    )
    return cache
