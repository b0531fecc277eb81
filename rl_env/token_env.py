"""`TokenPredictionEnv`: teacher-forced prediction over cached text (a contextual bandit).

An episode is `window` consecutive positions of one cached sequence; the action is a token id; the
reward is computed from the cached teacher targets at t (log p_frozen of the action from the top-k
log-probs, the rest mass shared equally outside them), the features at t, and the data's next token
(or the frozen argmax).

What an observation holds depends on the decoder, so that the policy sees what `decoder eval` shows it:
- a per-position decoder (context 0): the features of position t, one row; windows start anywhere
  after BOS;
- a context decoder (context > 0): the sequence from BOS, rows 0..window, of which rows 0..t are
  filled and the rest are zero padding (`length` = t + 1). The episode is positions 1..window of
  the sequence, so every observation is a prefix of the sequence `decoder eval` runs, and the
  decoder's logits at row t equal eval's at position t (attention is causal: the padding after t
  never reaches it). `sequence` names the cached sequence, so the learner runs each sequence's
  longest prefix in a batch once for all of its steps.

The positions an episode can observe are SAE-encoded once, when it starts (all rows starting
together in one SAE call). Each observation comes with the teacher targets at its position and the
step's reward weights in its info (`Engine.obs_info`), for the learner's forward-KL anchor.
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
        self.cache = ActivationCache.open(Path(cfg.cache), verify=False)
        if cfg.layer not in self.cache.layers or not self.cache.has_teacher:
            raise ConfigError(f"--cache {cfg.cache}: needs layer {cfg.layer} with teacher targets")
        if not 1 <= cfg.window <= self.cache.seq_len - 1:
            raise ConfigError(f"--window {cfg.window}: at most {self.cache.seq_len - 1} positions per cached sequence")
        self.from_bos = cfg.context > 0
        super().__init__(cfg, num_envs, frozen)
        counts = [e["sequences"] for e in self.cache.manifest["shards"]]
        self.index = np.concatenate([np.stack([np.full(n, s), np.arange(n)], 1) for s, n in enumerate(counts)])
        n, K = num_envs, self.width
        self.span = cfg.window + 1 if self.from_bos else cfg.window  # positions encoded per episode
        self.pos = np.zeros(n, dtype=np.int64)  # current position in the sequence
        self.end = np.zeros(n, dtype=np.int64)
        self.first = np.zeros(n, dtype=np.int64)  # the sequence position of feat_* row 0
        self.sequence = np.zeros(n, dtype=np.int64)
        self.feat_idx = np.zeros((n, self.span, K), dtype=np.int32)
        self.feat_val = np.zeros((n, self.span, K), dtype=np.float32)
        # each row's sequence targets, copied in at reset so that a step is one vectorised gather
        T, k = self.cache.seq_len, self.cache.manifest["top_k"]
        self.next_ids = np.zeros((n, T), dtype=np.int64)
        self.top_ids = np.zeros((n, T, k), dtype=np.int64)
        self.top_logp = np.zeros((n, T, k), dtype=np.float32)
        self.rest = np.zeros((n, T), dtype=np.float32)

    def observation_rows(self) -> int:
        return self.cfg.window + 1 if self.from_bos else 1

    @property
    def teacher_k(self) -> int:
        return int(self.cache.manifest["top_k"])

    def reset_rows(self, rows: np.ndarray) -> dict:
        """New episodes for `rows`: a random sequence (and window) each; the positions an episode can observe
        of all rows are SAE-encoded in one call."""
        T = self.cfg.window
        resid = []
        for r in rows:
            shard, row = self.index[self.rng.integers(len(self.index))]
            data = self.cache.shard(int(shard))
            self.next_ids[r] = data["next_ids"][int(row)].numpy()
            self.top_ids[r] = data["teacher.topk_ids"][int(row)].numpy()
            self.top_logp[r] = data["teacher.topk_logp"][int(row)].numpy()
            self.rest[r] = data["teacher.rest_logmass"][int(row)].numpy()
            # position 0 (BOS) is never scored
            start = 1 if self.from_bos else int(self.rng.integers(1, self.cache.seq_len - T + 1))
            self.pos[r], self.end[r] = start, start + T
            self.first[r] = 0 if self.from_bos else start
            self.sequence[r] = (int(shard) << 32) | int(row)
            resid.append(data[f"resid.{self.cfg.layer}"][int(row), self.first[r] : self.first[r] + self.span])
        idx, val = self.encode(torch.cat(resid))
        n = self.span
        for i, r in enumerate(rows):
            self.feat_idx[r], self.feat_val[r] = idx[i * n : (i + 1) * n], val[i * n : (i + 1) * n]
        return self._obs()

    def _shown(self) -> np.ndarray:
        """Each row's observed position (a finished row shows its last one until it resets)."""
        return np.minimum(self.pos, self.end - 1)

    def _obs(self) -> dict:
        pos = self._shown()
        take = np.arange(self.num_envs)
        if not self.from_bos:
            row = (pos - self.first)[:, None]
            return {"indices": self.feat_idx[take[:, None], row], "values": self.feat_val[take[:, None], row],
                    "length": np.ones(self.num_envs, np.int64), "sequence": self.sequence.copy()}
        filled = (np.arange(self.span)[None] <= pos[:, None])[..., None]  # rows after t are padding
        return {"indices": self.feat_idx * filled, "values": self.feat_val * filled, "length": pos + 1,
                "sequence": self.sequence.copy()}

    def teacher_targets(self) -> dict:
        pos, take = self._shown(), np.arange(self.num_envs)
        return {"teacher_ids": self.top_ids[take, pos].astype(np.int32), "teacher_logp": self.top_logp[take, pos],
                "teacher_rest": self.rest[take, pos]}

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
            row = pos - self.first[live]
            r_live, parts = self.reward(actions[live], logp, self.feat_idx[live, row], self.feat_val[live, row],
                                        (a == reference).numpy())
            rewards[live] = r_live
            info = {k: np.zeros(self.num_envs, np.float32) for k in parts}
            for k, v in parts.items():
                info[k][live] = v
            self.pos[live] += 1
        terminated = self.pos >= self.end
        if skip is not None:
            terminated &= ~skip
        return self._obs(), rewards, terminated, np.zeros(self.num_envs, bool), info


def make_token_env(cfg: EnvConfig, frozen=None) -> SingleEnv:
    return SingleEnv(TokenEngine(cfg, 1, frozen))


def make_token_vec_env(cfg: EnvConfig, num_envs: int, frozen=None) -> BatchedVectorEnv:
    return BatchedVectorEnv(TokenEngine(cfg, num_envs, frozen))


TokenPredictionEnv = make_token_env
