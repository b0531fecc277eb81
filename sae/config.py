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

Arch = Literal["relu", "topk", "batchtopk", "jumprelu", "matryoshka"]
ARCHS = ("relu", "topk", "batchtopk", "jumprelu", "matryoshka")
BATCH_THRESHOLD_ARCHS = ("batchtopk", "matryoshka")
"""Archs that select k x batch latents per batch in training and use one learned threshold at inference."""

L1_NAMES = ("value",)
"""The one value of each `--l1-schedule` (and `--l0-schedule`) phase (RATIO:VALUE)."""


@dataclass
class SaeConfig:
    """The architecture; saved as cfg.json beside sae.safetensors."""

    d_in: int
    """Width of the residual stream."""

    num_latents: int = 5760
    """Number of latents (features)."""

    arch: Arch = "topk"
    """relu (ReLU + L1 penalty), topk (k largest per token), batchtopk (k x batch largest per batch),
    jumprelu (pre · H(pre − threshold), a learned threshold per latent) or matryoshka (BatchTopK over
    nested prefixes of the dictionary)."""

    k: int = 64
    """Active latents per token (topk, batchtopk, matryoshka); also the fixed width of sparse outputs for relu
    and jumprelu (4k)."""

    k_max: int = 0
    """Width of sparse (index, value) outputs; 0 = k for topk, 4k for the others."""

    apply_b_dec_to_input: bool = True
    """Encode x − b_dec (True, every SAE trained here) or x itself (some imported SAEs, e.g. Gemma Scope):
    pre = (x − b_dec if apply_b_dec_to_input else x) · W_encᵀ + b_enc."""

    prefixes: tuple[int, ...] = ()
    """matryoshka: sizes of the nested dictionaries (increasing, the last = num_latents); () = doubling,
    num_latents/16, /8, /4, /2, num_latents."""

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(f"--arch: expected one of {', '.join(ARCHS)}, got {self.arch!r}")
        if not 0 < self.k <= self.num_latents:
            raise ConfigError(f"--k: expected 1..{self.num_latents} (the number of latents), got {self.k}")
        if self.num_latents < 1:
            raise ConfigError(f"--latents: expected a positive number, got {self.num_latents}")
        self.prefixes = tuple(int(p) for p in self.prefixes)
        if self.prefixes and (list(self.prefixes) != sorted(set(self.prefixes)) or self.prefixes[0] < 1
                              or self.prefixes[-1] != self.num_latents):
            raise ConfigError(f"--prefixes: expected increasing sizes ending at the number of latents "
                              f"({self.num_latents}), got {','.join(map(str, self.prefixes))}")

    @property
    def prefix_sizes(self) -> tuple[int, ...]:
        """matryoshka: the nested dictionary sizes, smallest first (the last is the whole dictionary)."""
        if self.prefixes:
            return self.prefixes
        return tuple(sorted({max(1, self.num_latents >> i) for i in range(4, -1, -1)}))

    @property
    def sparse_width(self) -> int:
        if self.k_max:
            return min(self.k_max, self.num_latents)
        return min(self.k if self.arch == "topk" else 4 * self.k, self.num_latents)


def parse_prefixes(text: str, flag: str = "--prefixes") -> tuple[int, ...]:
    """'360,720,5760' → (360, 720, 5760); '' → () (the default doubling)."""
    try:
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ConfigError(f"{flag}: expected comma-separated dictionary sizes, e.g. 360,720,1440,2880,5760; "
                          f"got {text!r}") from None


@dataclass
class SaeTrainConfig(TrainConfig, CorpusConfig, ModelConfig):
    """`faithlens sae train`: an SAE on one layer's residual stream, as a Ray Train job."""

    layer: int = 9
    """Layer whose residual stream the SAE reads (0 = embeddings)."""

    arch: Arch = "topk"
    """relu (ReLU + L1, the original design), topk, batchtopk, jumprelu (L0 penalty, straight-through
    threshold training as in Gemma Scope) or matryoshka (BatchTopK over nested dictionaries)."""

    latents: int = 5760
    """Number of latents."""

    k: int = 64
    """Active latents per token for topk / batchtopk / matryoshka; jumprelu: the L0 training starts at."""

    prefixes: str = ""
    """matryoshka: nested dictionary sizes, comma-separated, increasing, the last = --latents
    ('' = doubling: latents/16, /8, /4, /2, latents). The loss sums each prefix's reconstruction FVU."""

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

    l0_schedule: str = "1:0.0003"
    """jumprelu: L0 coefficient phases as RATIO:VALUE (ratios of the run's length); loss = FVU + coefficient · L0."""

    l0_warmup_frac: float = 0.1
    """jumprelu: fraction of steps over which the L0 coefficient ramps up from 0."""

    jumprelu_bandwidth: float = 0.05
    """jumprelu: width ε of the rectangle kernel of the threshold's straight-through gradient (in units of the
    pre-activations of inputs normalised to E‖x‖² = d_in)."""

    jumprelu_init_threshold: float = 0.0
    """jumprelu: initial threshold of every latent; 0 = each latent's (1 − k/latents) quantile of its
    pre-activations on a sample, so that training starts at L0 ≈ --k."""

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
        self.sae_config(d_in=1)
        parse_phases(self.l1_schedule, "--l1-schedule", L1_NAMES)
        parse_phases(self.l0_schedule, "--l0-schedule", L1_NAMES)
        if self.jumprelu_bandwidth <= 0 or self.jumprelu_init_threshold < 0:
            raise ConfigError("--jumprelu-bandwidth, --jumprelu-init-threshold: expected > 0 and >= 0, got "
                              f"{self.jumprelu_bandwidth} and {self.jumprelu_init_threshold}")
        if self.batch_tokens % self.workers:
            raise ConfigError(f"--batch-tokens {self.batch_tokens} must divide evenly over --workers {self.workers}")

    def sae_config(self, d_in: int) -> SaeConfig:
        """The architecture this run trains, on a residual stream of width `d_in`."""
        return SaeConfig(d_in=d_in, num_latents=self.latents, arch=self.arch, k=self.k,
                         prefixes=parse_prefixes(self.prefixes) if self.arch == "matryoshka" else ())
