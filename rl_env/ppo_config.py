"""`faithlens ppo`: one PPO trial's configuration (environment + reward + PPO + evaluation)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import tyro

from models.errors import ConfigError
from rl_env.config import EnvConfig
from training.tracking import TrackingConfig

SCORE_WEIGHTS = {"kl": -1.0, "top1": 1.0, "task_acc": 1.0}
"""The fixed-weight held-out score trials are ranked by (reward weights change the return's scale)."""


@dataclass
class PpoConfig(EnvConfig, TrackingConfig):
    """A single PPO trial on the decoder-on-features environment (a local RLlib run)."""

    decoder: Path = Path("runs/decoder")
    """Distilled decoder run folder (or its decoder/ folder): the policy's initialisation."""

    steps: int = 4096
    """Environment steps to train for."""

    out: Path = Path("runs/ppo")
    """Output folder: metrics.json, decoder/ (the exported policy), checkpoint/, tb/."""

    config: Path | None = None
    """A YAML file of field: value defaults (read by the CLI; any flag on the command line overrides it)."""

    data: str = ""
    """Corpus for the teacher cache (token env) and held-out evaluation (default: the decoder's training data)."""

    cache_tokens: int = 100_000
    """token env: positions in the teacher cache built when --cache is not given."""

    num_envs: int = 8
    """Sub-environments per env runner (stepped together: one SAE encode / frozen-model call)."""

    env_runners: int = 0
    """RLlib env runners (0 = sample in the main process)."""

    lr: float = 1e-5
    gamma: float = -1.0
    """Discount; -1 = 0 for the token env (a contextual bandit) and 1 for generation episodes."""

    lambda_: float = 0.95
    clip_param: float = 0.2
    entropy_coeff: float = 0.0
    """Entropy bonus in the PPO loss (advantages are standardised, so it is not the reward-scale α)."""

    vf_loss_coeff: float = 0.5
    num_epochs: int = 2
    minibatch_size: int = 256
    train_batch: int = 1024
    """Env steps per PPO iteration."""

    eval_every: int = 2
    """Iterations between held-out evaluations (KL, top-1, task accuracy) and checkpoints."""

    eval_tokens: int = 2048
    """Held-out tokens for KL / top-1."""

    task_suite: str = "arithmetic"
    """Builtin task suite for task accuracy (teacher-forced exact match on answer tokens)."""

    task_examples: int = 50

    share_predictions: int = 64
    """Held-out predictions whose top-10 share of |attribution| is measured at each evaluation (0 = off)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps < 1 or self.train_batch < 1 or self.minibatch_size < 1:
            raise ConfigError("--steps, --train-batch and --minibatch-size must be positive")
        if self.minibatch_size > self.train_batch:
            raise ConfigError(f"--minibatch-size {self.minibatch_size} must be at most --train-batch {self.train_batch}")
        if self.num_envs < 1:
            raise ConfigError(f"--num-envs: expected at least 1, got {self.num_envs}")


@dataclass
class PpoExportConfig:
    """`faithlens ppo export RUN OUT`: the trained policy as a plain decoder checkpoint."""

    run: Annotated[Path, tyro.conf.Positional]
    """PPO run folder."""

    dest: Annotated[Path, tyro.conf.Positional]
    """Where to write decoder.json + decoder.safetensors."""

    which: Literal["final", "checkpoint"] = "final"
    """final: the decoder exported at the end of the run; checkpoint: the latest RLlib checkpoint."""
