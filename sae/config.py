"""SAE architecture and training configs (the architecture config is what `cfg.json` stores)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from corpus.config import CorpusConfig
from models.config import ModelConfig
from models.errors import ConfigError
from training.config import TrainConfig
from training.schedule import parse_phases

Arch = Literal["relu", "topk", "batchtopk"]

L1_NAMES = ("value",)
"""The one value of each `--l1-schedule` phase (RATIO:VALUE)."""


@dataclass
class SaeConfig:
    """The architecture; saved as cfg.json beside sae.safetensors."""

    d_in: int
    """Width of the residual stream."""

    num_latents: int = 5760
    """Number of latents (features)."""

    arch: Arch = "topk"
    """relu (ReLU + L1 penalty), topk (k largest per token) or batchtopk (k x batch largest per batch)."""

    k: int = 64
    """Active latents per token (topk, batchtopk); also the fixed width of sparse outputs for relu."""

    k_max: int = 0
    """Width of sparse (index, value) outputs; 0 = k for topk, 4k for batchtopk and relu."""

    def __post_init__(self) -> None:
        if self.arch not in ("relu", "topk", "batchtopk"):
            raise ConfigError(f"--arch: expected relu, topk or batchtopk, got {self.arch!r}")
        if not 0 < self.k <= self.num_latents:
            raise ConfigError(f"--k: expected 1..{self.num_latents} (the number of latents), got {self.k}")
        if self.num_latents < 1:
            raise ConfigError(f"--latents: expected a positive number, got {self.num_latents}")

    @property
    def sparse_width(self) -> int:
        if self.k_max:
            return min(self.k_max, self.num_latents)
        return min(self.k if self.arch == "topk" else 4 * self.k, self.num_latents)


@dataclass
class SaeTrainConfig(TrainConfig, CorpusConfig, ModelConfig):
    """`faithlens sae train`: an SAE on one layer's residual stream, as a Ray Train job."""

    layer: int = 9
    """Layer whose residual stream the SAE reads (0 = embeddings)."""

    arch: Arch = "topk"
    """relu (ReLU + L1, the original design), topk, or batchtopk."""

    latents: int = 5760
    """Number of latents."""

    k: int = 64
    """Active latents per token for topk / batchtopk."""

    tokens: int = 2_000_000
    """Training tokens (BOS positions excluded); the cache is built for them if needed."""

    out: Path = Path("runs/sae")
    """Output folder: cfg.json, sae.safetensors, config.json, metrics, tb/, checkpoints/."""

    batch_tokens: int = 2048
    """Tokens per optimizer step (over all workers)."""

    lr: float = 0.0
    """Adam learning rate; 0 = 2e-3 / sqrt(latents / 2**14) (scaled by width)."""

    lr_decay_frac: float = 0.2
    """Fraction of final steps over which the learning rate decays linearly to 0."""

    l1_schedule: str = "0.2:0.001,0.6:0.01,0.2:0.001"
    """relu: L1 coefficient phases as RATIO:VALUE (ratios of the run's length; the design's three phases)."""

    l1_warmup_frac: float = 0.05
    """relu: fraction of steps over which the L1 coefficient ramps up from 0."""

    resample_every: int = 250
    """relu: resample dead latents every N steps (0 = never)."""

    dead_tokens: int = 500_000
    """A latent is dead if it has not fired in this many training tokens."""

    auxk_alpha: float = 1 / 32
    """topk/batchtopk: weight of the auxiliary-k loss that revives dead latents (0 = off)."""

    encoder_dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """Dtype of the encoder matmul: bf16 where the CPU is fast at it (values then carry ~0.4% rounding)."""

    b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    """Decoder-bias initialisation from a sample of activations."""

    checkpoint_every: int = 100
    """Steps between checkpoints (the unit of resume)."""

    eval_tokens: int = 32_768
    """Held-out tokens for the metrics written at the end (0 = skip)."""

    shuffle_shards: int = 4
    """Cache shards mixed together when shuffling tokens."""

    seed: int = 0
    """Seed for initialisation, shuffling and the generated corpora."""

    def __post_init__(self) -> None:
        super().__post_init__()
        SaeConfig(d_in=1, num_latents=self.latents, arch=self.arch, k=self.k)
        parse_phases(self.l1_schedule, "--l1-schedule", L1_NAMES)
        if self.batch_tokens % self.workers:
            raise ConfigError(f"--batch-tokens {self.batch_tokens} must divide evenly over --workers {self.workers}")

