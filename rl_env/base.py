"""What both environments share: observation/action spaces, the reward computation for a batch of
sub-environment steps, reward statistics, and the Gymnasium facades (single env and VectorEnv).

An environment "engine" steps all of its sub-environments at once (one SAE encode, one frozen-model
call); `SingleEnv` and `BatchedVectorEnv` expose an engine as a `gymnasium.Env` (num_envs = 1) or
a `gymnasium.vector.VectorEnv` with next-step autoreset, which RLlib samples natively.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from models.head import FrozenHead
from models.loading import load_frozen
from rl_env.config import EnvConfig, anchor_weights
from rl_env.reward import RewardSchedule, direct_attribution, mono_share, parse_phases
from sae.model import SparseAutoencoder

COMPONENTS = ("reward", "r_faith", "r_mono", "r_task", "features_needed")
WEIGHTS = ("alpha", "beta", "gamma", "phase")


class Engine(ABC):
    """Base engine: spaces, SAE features, reward, statistics. Subclasses implement `reset_rows` and `step`."""

    def __init__(self, cfg: EnvConfig, num_envs: int, frozen=None):
        self.cfg, self.num_envs = cfg, num_envs
        self.frozen = frozen or load_frozen(cfg.model_config())
        self.sae = SparseAutoencoder.load(Path(cfg.sae))
        self.head = FrozenHead.from_frozen(self.frozen)
        self.width = cfg.width or self.sae.cfg.sparse_width
        self.vocab = self.frozen.vocab_size
        phases = parse_phases(cfg.phases)
        self.schedule = RewardSchedule(phases, cfg.total_steps, tuple(anchor_weights(cfg.anchor_kl, len(phases))))
        self.steps = 0
        self.rng = np.random.default_rng(cfg.seed)
        self.noise = torch.Generator().manual_seed(cfg.seed + 17)
        rows = self.observation_rows()
        self.single_observation_space = gym.spaces.Dict({
            "indices": gym.spaces.Box(0, self.sae.cfg.num_latents - 1, (rows, self.width), np.int32),
            "values": gym.spaces.Box(0.0, np.inf, (rows, self.width), np.float32),
            "length": gym.spaces.Box(1, rows, (), np.int64),
            "sequence": gym.spaces.Box(0, 2**62, (), np.int64),
        })
        self.single_action_space = gym.spaces.Discrete(self.vocab)
        self._reset_stats()

    def observation_rows(self) -> int:
        """Positions per observation: t and the `context` before it."""
        return self.cfg.context + 1

    # -- features --------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, resid_ND: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """SAE features of N positions as fixed-width (indices int64, values float32) arrays."""
        enc = self.sae.encode(resid_ND.float())
        idx, val = enc.indices_NK, enc.acts_NK
        if idx.shape[1] < self.width:
            pad = self.width - idx.shape[1]
            idx = torch.nn.functional.pad(idx, (0, pad))
            val = torch.nn.functional.pad(val, (0, pad))
        return idx[:, : self.width].numpy().astype(np.int32), val[:, : self.width].clamp_min(0).numpy().astype(np.float32)

    # -- reward ----------------------------------------------------------------------------
    @torch.no_grad()
    def reward(self, actions: np.ndarray, logp_frozen: torch.Tensor, idx_NK: np.ndarray, val_NK: np.ndarray,
               task: np.ndarray) -> tuple[np.ndarray, dict]:
        """α·r_faith + β·r_mono + γ·r_task for N steps (or noise with random_reward); components in the dict."""
        a = torch.as_tensor(actions)
        attr = direct_attribution(a, torch.as_tensor(idx_NK), torch.as_tensor(val_NK), self.sae.W_dec,
                                  self.head.norm_weight_D, self.head.unembed_VD)
        r_mono, needed = mono_share(attr, self.cfg.top_m)
        alpha, beta, gamma = self.schedule.weights(self.steps)
        r_faith = logp_frozen.float()
        r_task = torch.as_tensor(task, dtype=torch.float32)
        reward = alpha * r_faith + beta * r_mono + gamma * r_task
        if self.cfg.random_reward:
            reward = torch.randn(reward.shape, generator=self.noise)
        parts = {"reward": reward, "r_faith": r_faith, "r_mono": r_mono, "r_task": r_task, "features_needed": needed}
        for key, value in parts.items():
            self._sums[key] += float(value.sum())
        n = len(actions)  # the weights the steps were rewarded with, not those after them
        for key, value in zip(WEIGHTS, (alpha, beta, gamma, self.schedule.phase_index(self.steps))):
            self._sums[key] += value * n
        self._count += n
        self.steps += len(actions)
        self._maybe_adjust_beta()
        info = {k: v.numpy().astype(np.float32) for k, v in parts.items()}
        info.update(alpha=np.full(len(actions), alpha, np.float32), beta=np.full(len(actions), beta, np.float32),
                    gamma=np.full(len(actions), gamma, np.float32))
        return reward.numpy().astype(np.float32), info

    def _maybe_adjust_beta(self, every: int = 2048) -> None:
        if not self.cfg.dynamic or self._count < every:
            return
        if self._sums["features_needed"] / self._count > self.cfg.max_features and self.schedule.beta_scale < 4:
            self.schedule.beta_scale = min(4.0, self.schedule.beta_scale * 1.25)

    def obs_info(self) -> dict:
        """What the learner needs about each current observation, sent in its info: the frozen model's
        distribution at its position (top-k ids and log-probs + the log of the rest mass) and the weights
        of the step taken from it (`entropy_alpha`: α for the entropy reward; `anchor_lambda`: λ of the
        forward-KL anchor; `share_beta`: β for the learner's attribution-share term)."""
        alpha, beta, _ = self.schedule.weights(self.steps)
        anchor = self.schedule.anchor_weight(self.steps)
        # the random-reward twin's objective is noise: no entropy reward or share term. The anchor stays: it is the
        # learner's regulariser, the same in both runs, so the twins differ in the reward alone
        if self.cfg.random_reward:
            alpha = beta = 0.0
        n = self.num_envs
        return {**self.teacher_targets(), "entropy_alpha": np.full(n, alpha, np.float32),
                "anchor_lambda": np.full(n, anchor, np.float32), "share_beta": np.full(n, beta, np.float32)}

    @abstractmethod
    def teacher_targets(self) -> dict:
        """teacher_ids [n, k] int32, teacher_logp [n, k], teacher_rest [n] at each row's observed position."""

    def set_alpha_scale(self, scale: float) -> None:
        self.schedule.alpha_scale = scale

    # -- statistics ------------------------------------------------------------------------
    def _reset_stats(self) -> None:
        self._sums = dict.fromkeys(COMPONENTS + WEIGHTS, 0.0)
        self._count = 0

    def pop_stats(self) -> dict:
        """Mean of each reward component since the last call, and of the weights and phase the steps were rewarded
        under (a window that straddles a phase boundary gets the step-weighted mean)."""
        n = max(1, self._count)
        out = {k: v / n for k, v in self._sums.items()}
        out.update(steps=self._count, total_env_steps=self.steps)
        self._reset_stats()
        return out

    # -- the batched protocol --------------------------------------------------------------
    def reset_all(self, seed: int | None = None) -> dict:
        if seed is not None:
            self.reseed(seed)
        return self.reset_rows(np.arange(self.num_envs))

    def reseed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.noise = torch.Generator().manual_seed(seed + 17)

    @abstractmethod
    def reset_rows(self, rows: np.ndarray) -> dict:
        """Start a new episode in each of `rows`; the observations of all sub-environments."""

    @abstractmethod
    def step(self, actions: np.ndarray, skip: np.ndarray | None = None) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray, dict]:
        """One step of every sub-environment except the rows set in `skip` (they get reward 0):
        observations, rewards, terminated, truncated, and per-step info (reward components and weights)."""


class BatchedVectorEnv(VectorEnv):
    """A VectorEnv over an engine, with next-step autoreset (what RLlib's env runner expects)."""

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(self, engine: Engine):
        self.engine = engine
        self.num_envs = engine.num_envs
        self.single_observation_space = engine.single_observation_space
        self.single_action_space = engine.single_action_space
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._needs_reset = np.zeros(self.num_envs, dtype=bool)

    def reset(self, *, seed=None, options=None):
        self._needs_reset[:] = False
        obs = self.engine.reset_all(seed)
        return obs, self.engine.obs_info()

    def step(self, actions):
        actions = np.asarray(actions, dtype=np.int64).reshape(self.num_envs)
        obs, rewards, terminated, truncated, info = self.engine.step(actions, skip=self._needs_reset.copy())
        done = terminated | truncated
        if self._needs_reset.any():  # these rows restart now: their action is ignored, reward 0
            rows = np.flatnonzero(self._needs_reset)
            fresh = self.engine.reset_rows(rows)
            for key in obs:
                obs[key][rows] = fresh[key][rows]
            rewards[rows] = 0.0
            terminated[rows] = truncated[rows] = False
        self._needs_reset = done & ~self._needs_reset
        return obs, rewards, terminated, truncated, {**info, **self.engine.obs_info()}


class SingleEnv(gym.Env):
    """The same engine with one sub-environment, as a plain gymnasium.Env."""

    def __init__(self, engine: Engine):
        assert engine.num_envs == 1
        self.engine = engine
        self.observation_space = engine.single_observation_space
        self.action_space = engine.single_action_space

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        obs = self.engine.reset_all(seed)
        return {k: v[0] for k, v in obs.items()}, {k: v[0] for k, v in self.engine.obs_info().items()}

    def step(self, action):
        obs, rewards, terminated, truncated, info = self.engine.step(np.array([int(action)], dtype=np.int64))
        info = {**{k: float(v[0]) for k, v in info.items()}, **{k: v[0] for k, v in self.engine.obs_info().items()}}
        return {k: v[0] for k, v in obs.items()}, float(rewards[0]), bool(terminated[0]), bool(truncated[0]), info
