"""`TokenPredictionEnv`: teacher-forced prediction over windows of cached text (a contextual bandit).

An episode is `window` consecutive positions of one cached sequence. The observation at position t
is the SAE features of positions t−C..t (C = `context`, zero-padded before the sequence start); the
action is a token id; the reward is computed from the cached teacher targets at t (log p_frozen of
the action from the top-k log-probs, the rest mass shared equally outside them), the features at t,
and the data's next token (or the frozen argmax). The positions an episode can observe are encoded
once, when it starts (all rows starting together in one SAE call).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from corpus.cache import ActivationCache
from models.errors import ConfigError
from rl_env.base import BatchedVectorEnv, Engine, SingleEnv
from rl_env.config import EnvConfig
from rl_env.reward import token_logp


class TokenEngine(Engine):
    def __init__(self, cfg: EnvConfig, num_envs: int, frozen=None):
        super().__init__(cfg, num_envs, frozen)
        self.cache = ActivationCache.open(Path(cfg.cache), verify=False)
        if cfg.layer not in self.cache.layers or not self.cache.has_teacher:
            raise ConfigError(f"--cache {cfg.cache}: needs layer {cfg.layer} with teacher targets")
        if cfg.window > self.cache.seq_len - 1:
            raise ConfigError(f"--window {cfg.window}: at most {self.cache.seq_len - 1} positions per cached sequence")
        counts = [e["sequences"] for e in self.cache.manifest["shards"]]
        self.index = np.concatenate([np.stack([np.full(n, s), np.arange(n)], 1) for s, n in enumerate(counts)])
        n, C, K = num_envs, cfg.context, self.width
        self.pos = np.zeros(n, dtype=np.int64)  # current position in the sequence
        self.end = np.zeros(n, dtype=np.int64)
        self.feat_idx = np.zeros((n, self.cache.seq_len + C, K), dtype=np.int64)  # C leading zero rows
        self.feat_val = np.zeros((n, self.cache.seq_len + C, K), dtype=np.float32)
        # each row's sequence targets, copied in at reset so that a step is one vectorised gather
        T, k = self.cache.seq_len, self.cache.manifest["top_k"]
        self.next_ids = np.zeros((n, T), dtype=np.int64)
        self.top_ids = np.zeros((n, T, k), dtype=np.int64)
        self.top_logp = np.zeros((n, T, k), dtype=np.float32)
        self.rest = np.zeros((n, T), dtype=np.float32)

    def reset_rows(self, rows: np.ndarray) -> dict:
        """New episodes for `rows`: a random sequence and window each; the positions an episode can observe
        (its window and the C before it) of all rows are SAE-encoded in one call."""
        C, T = self.cfg.context, self.cfg.window
        spans, resid = [], []
        for r in rows:
            shard, row = self.index[self.rng.integers(len(self.index))]
            data = self.cache.shard(int(shard))
            self.next_ids[r] = data["next_ids"][int(row)].numpy()
            self.top_ids[r] = data["teacher.topk_ids"][int(row)].numpy()
            self.top_logp[r] = data["teacher.topk_logp"][int(row)].numpy()
            self.rest[r] = data["teacher.rest_logmass"][int(row)].numpy()
            start = int(self.rng.integers(1, self.cache.seq_len - T + 1))  # position 0 (BOS) is never scored
            self.pos[r], self.end[r] = start, start + T
            first = max(0, start - C)
            spans.append((r, first, start + T))
            resid.append(data[f"resid.{self.cfg.layer}"][int(row), first : start + T])
        idx, val = self.encode(torch.cat(resid))
        offset = 0
        for r, first, stop in spans:
            n = stop - first
            self.feat_idx[r], self.feat_val[r] = 0, 0.0
            self.feat_idx[r, first + C : stop + C] = idx[offset : offset + n]
            self.feat_val[r, first + C : stop + C] = val[offset : offset + n]
            offset += n
        return self._obs()

    def _obs(self) -> dict:
        C = self.cfg.context
        window = self.pos[:, None] + np.arange(C + 1)[None]  # rows of feat_* are shifted by C
        take = np.arange(self.num_envs)[:, None]
        return {"indices": self.feat_idx[take, window].copy(), "values": self.feat_val[take, window].copy()}

    def step(self, actions: np.ndarray, skip: np.ndarray | None = None):
        live = np.flatnonzero(~skip) if skip is not None else np.arange(self.num_envs)
        rewards = np.zeros(self.num_envs, np.float32)
        info: dict = {}
        if len(live):
            pos = self.pos[live]
            top_ids = torch.from_numpy(self.top_ids[live, pos])
            a = torch.as_tensor(actions[live])
            logp = token_logp(a, top_ids, torch.from_numpy(self.top_logp[live, pos]), torch.from_numpy(self.rest[live, pos]),
                              self.vocab)
            if self.cfg.reference == "data":
                reference = torch.from_numpy(self.next_ids[live, pos])
            else:
                reference = top_ids[:, 0]
            C = self.cfg.context
            r_live, parts = self.reward(actions[live], logp, self.feat_idx[live, pos + C], self.feat_val[live, pos + C],
                                        (a == reference).numpy())
            rewards[live] = r_live
            info = {k: np.zeros(self.num_envs, np.float32) for k in parts}
            for k, v in parts.items():
                info[k][live] = v
            self.pos[live] += 1
        terminated = self.pos >= self.end
        if skip is not None:
            terminated &= ~skip
        obs = self._obs_safe()
        return obs, rewards, terminated, np.zeros(self.num_envs, bool), info

    def _obs_safe(self) -> dict:
        """Observations after a step; finished rows show their last position (they reset on the next step)."""
        pos = self.pos.copy()
        self.pos = np.minimum(self.pos, self.end - 1)
        obs = self._obs()
        self.pos = pos
        return obs


def make_token_env(cfg: EnvConfig, frozen=None) -> SingleEnv:
    return SingleEnv(TokenEngine(cfg, 1, frozen))


def make_token_vec_env(cfg: EnvConfig, num_envs: int, frozen=None) -> BatchedVectorEnv:
    return BatchedVectorEnv(TokenEngine(cfg, num_envs, frozen))


TokenPredictionEnv = make_token_env
