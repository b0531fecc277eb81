"""Shuffled batches of residual-stream tokens from an activation cache, for one worker.

The order is a pure function of (seed, epoch, shard group), so a resumed run skips to its
step arithmetically and sees exactly the batches an uninterrupted run would have seen.
BOS positions (an attention sink with an outsized norm) are left out.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from corpus.cache import ActivationCache


class TokenBatches:
    def __init__(self, cache: ActivationCache, layer: int, batch_tokens: int, seed: int,
                 rank: int = 0, world: int = 1, shuffle_shards: int = 4):
        if layer not in cache.layers:
            raise ValueError(f"layer {layer} is not in the cache (layers {cache.layers})")
        self.cache, self.layer, self.batch_tokens, self.seed = cache, layer, batch_tokens, seed
        self.rank, self.world, self.group = rank, world, max(1, shuffle_shards)
        if cache.n_shards < world:
            raise ValueError(f"{cache.n_shards} cache shards cannot be split over {world} workers")

    def _groups(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 7_919 + epoch)
        order = torch.randperm(self.cache.n_shards, generator=g).tolist()
        mine = order[self.rank :: self.world]
        return [mine[i : i + self.group] for i in range(0, len(mine), self.group)]

    def _group_tokens(self, shards: list[int]) -> int:
        entries = self.cache.manifest["shards"]
        return sum(entries[i]["sequences"] for i in shards) * (self.cache.seq_len - 1)

    def batches_per_epoch(self) -> int:
        return sum(self._group_tokens(g) // self.batch_tokens for g in self._groups(0))

    def iterate(self, start_batch: int = 0) -> Iterator[torch.Tensor]:
        """Endless fp32 batches [batch_tokens, d_model], epoch after epoch, from batch `start_batch` on."""
        skip = start_batch
        epoch = 0
        while True:
            for gi, shards in enumerate(self._groups(epoch)):
                n_batches = self._group_tokens(shards) // self.batch_tokens
                if skip >= n_batches:
                    skip -= n_batches
                    continue
                x = torch.cat([self.cache.shard(i)[f"resid.{self.layer}"][:, 1:].reshape(-1, self.cache.d_model)
                               for i in shards])
                g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1_009 + gi)
                perm = torch.randperm(x.shape[0], generator=g)
                for b in range(skip, n_batches):
                    yield x[perm[b * self.batch_tokens : (b + 1) * self.batch_tokens]].float()
                skip = 0
            epoch += 1

    def sample(self, n_tokens: int) -> torch.Tensor:
        """The first n_tokens of the stream (for normalisation and initialisation)."""
        out, have = [], 0
        for batch in self.iterate():
            out.append(batch)
            have += batch.shape[0]
            if have >= n_tokens:
                break
        return torch.cat(out)[:n_tokens]
