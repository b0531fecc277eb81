"""Shuffled batches of whole sequences for one worker: cached residuals + teacher targets
(`SequenceBatches`, `--teacher cache`), or token ids alone (`TokenBatches`, `--teacher online`, where the
frozen model computes both in the step).

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


class _ShuffledRows:
    """Batches of rows of a table of `n_rows` sequences, reshuffled every epoch, split over workers."""

    def __init__(self, n_rows: int, batch_sequences: int, seed: int, rank: int, world: int, where: str):
        if n_rows < batch_sequences * world:
            raise ConfigError(f"{where}: {n_rows} sequences, fewer than one batch ({batch_sequences} × {world} workers)")
        self.n_rows, self.batch, self.seed, self.rank, self.world = n_rows, batch_sequences, seed, rank, world

    @property
    def batches_per_epoch(self) -> int:
        return self.n_rows // (self.batch * self.world)

    def _batch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def iterate(self, start_batch: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        per_epoch = self.batches_per_epoch
        epoch, b = divmod(start_batch, per_epoch)
        while True:
            perm = np.random.default_rng(self.seed * 7_919 + epoch).permutation(self.n_rows)
            for i in range(b, per_epoch):
                start = (i * self.world + self.rank) * self.batch
                yield self._batch(perm[start : start + self.batch])
            epoch, b = epoch + 1, 0


class SequenceBatches(_ShuffledRows):
    """Endless batches from a teacher cache: tokens/next_ids [B, T], resid [B, T, D] fp32, teacher.* [B, T(, k)]."""

    def __init__(self, cache: ActivationCache, layer: int, batch_sequences: int, seed: int, rank: int = 0, world: int = 1):
        if layer not in cache.layers:
            raise ConfigError(f"layer {layer} is not in the cache at {cache.root} (layers {cache.layers})")
        if not cache.has_teacher:
            raise ConfigError(f"{cache.root}: the cache has no teacher targets (built with --no-teacher)")
        self.cache, self.layer = cache, layer
        counts = [e["sequences"] for e in cache.manifest["shards"]]
        self.index = np.concatenate([np.stack([np.full(n, s), np.arange(n)], 1) for s, n in enumerate(counts)])
        super().__init__(len(self.index), batch_sequences, seed, rank, world, str(cache.root))

    def _batch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        out: dict[str, list[torch.Tensor]] = {}
        for shard, row in self.index[rows]:
            data = self.cache.shard(int(shard))
            for key in ("tokens", "next_ids", f"resid.{self.layer}", *TEACHER_KEYS):
                out.setdefault(key, []).append(data[key][int(row)])
        batch = {k: torch.stack(v) for k, v in out.items()}
        batch["resid"] = batch.pop(f"resid.{self.layer}").float()
        return batch


class TokenBatches(_ShuffledRows):
    """Endless batches of packed token sequences: tokens/next_ids [B, T] int64."""

    def __init__(self, tokens_ST: torch.Tensor, next_ids_ST: torch.Tensor, batch_sequences: int, seed: int,
                 rank: int = 0, world: int = 1, where: str = "training tokens"):
        self.tokens, self.next_ids = tokens_ST, next_ids_ST
        super().__init__(len(tokens_ST), batch_sequences, seed, rank, world, where)

    def _batch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        rows_t = torch.from_numpy(rows)
        return {"tokens": self.tokens[rows_t].long(), "next_ids": self.next_ids[rows_t].long()}
