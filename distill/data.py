"""Shuffled batches of whole cached sequences (residuals + teacher targets), for one worker.

The order is a pure function of (seed, epoch), so a resumed run skips to its step
arithmetically and sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from corpus.cache import ActivationCache
from models.errors import ConfigError

TEACHER_KEYS = ("teacher.topk_ids", "teacher.topk_logp", "teacher.rest_logmass")


class SequenceBatches:
    def __init__(self, cache: ActivationCache, layer: int, batch_sequences: int, seed: int, rank: int = 0, world: int = 1):
        if layer not in cache.layers:
            raise ConfigError(f"layer {layer} is not in the cache at {cache.root} (layers {cache.layers})")
        if not cache.has_teacher:
            raise ConfigError(f"{cache.root}: the cache has no teacher targets (built with --no-teacher)")
        self.cache, self.layer, self.batch, self.seed, self.rank, self.world = cache, layer, batch_sequences, seed, rank, world
        counts = [e["sequences"] for e in cache.manifest["shards"]]
        self.index = np.concatenate([np.stack([np.full(n, s), np.arange(n)], 1) for s, n in enumerate(counts)])
        if len(self.index) < batch_sequences * world:
            raise ConfigError(f"{cache.root}: {len(self.index)} cached sequences, fewer than one batch "
                              f"({batch_sequences} × {world} workers)")

    @property
    def batches_per_epoch(self) -> int:
        return len(self.index) // (self.batch * self.world)

    def _batch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        out: dict[str, list[torch.Tensor]] = {}
        for shard, row in rows:
            data = self.cache.shard(int(shard))
            for key in ("tokens", "next_ids", f"resid.{self.layer}", *TEACHER_KEYS):
                out.setdefault(key, []).append(data[key][int(row)])
        batch = {k: torch.stack(v) for k, v in out.items()}
        batch["resid"] = batch.pop(f"resid.{self.layer}").float()
        return batch

    def iterate(self, start_batch: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Endless batches: tokens/next_ids [B, T], resid [B, T, D] fp32, teacher.* [B, T(, k)]."""
        per_epoch = self.batches_per_epoch
        epoch, b = divmod(start_batch, per_epoch)
        while True:
            perm = np.random.default_rng(self.seed * 7_919 + epoch).permutation(len(self.index))
            for i in range(b, per_epoch):
                start = (i * self.world + self.rank) * self.batch
                yield self._batch(self.index[perm[start : start + self.batch]])
            epoch, b = epoch + 1, 0
