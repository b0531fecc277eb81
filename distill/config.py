"""Configs of the distillation stage: decoder training, tuned-lens training, decoder evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import tyro

from corpus.config import CorpusConfig, Split
from models.config import ModelConfig
from models.decoder import Arch
from models.errors import ConfigError
from training.config import TrainConfig

DEFAULT_LR = {"linear": 1e-3, "readout": 1e-3, "context": 3e-4, "lens": 1e-3}


@dataclass
class TrainLoopConfig(TrainConfig, CorpusConfig, ModelConfig):
    """What every distillation run shares: data, teacher targets, optimisation, checkpoints."""

    tokens: int = 1_000_000
    """Training token positions (BOS positions are not scored); the teacher cache is built for them if needed."""

    out: Path = Path("runs/decoder")
    """Output folder: weights, config.json, metrics.json, curve.json, tb/, checkpoints/."""

    teacher: Literal["cache", "online"] = "cache"
    """cache: train on a teacher cache's top-k + rest-mass target (a lower bound of the KL; built once and
    reusable by other runs); online: run the frozen model inside every step and train on the exact
    full-vocabulary KL (only token ids are stored)."""

    cache: Path | None = None
    """An existing activation cache with teacher targets at the layer, used instead of building one (--teacher cache)."""

    teacher_k: int = 64
    """Teacher log-probs kept per position in the cache (the rest as one 'other' mass)."""

    loss: Literal["kl", "ce_argmax"] = "kl"
    """kl: KL(p_frozen ‖ p_student) (exact with --teacher online, the top-k + rest-mass bound with the cache);
    ce_argmax: cross-entropy to the frozen model's argmax (the original design's objective)."""

    batch_sequences: int = 8
    """Sequences per optimizer step over all workers (× (seq_len - 1) scored tokens)."""

    lr: float = 0.0
    """AdamW learning rate; 0 = a per-architecture default (linear/readout/lens 1e-3, context 3e-4)."""

    weight_decay: float = 0.0
    """AdamW weight decay."""

    lr_decay_frac: float = 0.3
    """Fraction of final steps over which the learning rate decays linearly to 10%."""

    eval_tokens: int = 4096
    """Held-out tokens (eval split of --data) on which the exact KL curve is measured during training."""

    eval_points: int = 10
    """How many times the held-out KL is measured over the run (the KL-vs-tokens curve)."""

    checkpoint_every: int = 50
    """Steps between checkpoints (the unit of resume)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_sequences % self.workers:
            raise ConfigError(f"--batch-sequences {self.batch_sequences} must divide evenly over --workers {self.workers}")
        if self.teacher_k < 1:
            raise ConfigError(f"--teacher-k: expected at least 1, got {self.teacher_k}")
        if self.eval_points < 1:
            raise ConfigError(f"--eval-points: expected at least 1, got {self.eval_points}")
        if self.teacher == "online" and self.cache is not None:
            raise ConfigError(f"--cache {self.cache}: a teacher cache is read with --teacher cache; --teacher online reads none")


@dataclass
class DistillConfig(TrainLoopConfig):
    """`faithlens decoder train`: distil a decoder on SAE features to the frozen model (a Ray Train job)."""

    sae: Path = Path("runs/sae")
    """SAE folder (cfg.json + sae.safetensors, or a training run holding sae/); sets the layer and, by default, the model."""

    arch: Arch = "readout"
    """linear (features → vocabulary), readout (features → d_model → frozen head) or context (causal transformer)."""

    rank: int = 256
    """linear: bottleneck rank (0 = full matrix)."""

    vocab_bias: bool = True
    """Train a bias over the vocabulary."""

    n_layers: int = 4
    """context: transformer blocks."""

    init: Literal["upper-blocks", "zero"] = "upper-blocks"
    """context: start the blocks as copies of frozen blocks above the layer (Llama-family models; which ones:
    --blocks), or from scratch with zeroed output projections (the decoder then starts as the readout)."""

    blocks: str = "even"
    """context, --init upper-blocks: the frozen blocks copied. even: evenly spaced above the layer (first and last
    included); greedy: remove blocks from the SAE-spliced model one at a time, each time the one whose removal
    costs the least KL, until --n-layers remain (the path goes to OUT/blocks.json); or layer numbers, 10,17,23,30."""

    select_tokens: int = 2048
    """--blocks greedy: training-split tokens on which each removal's KL is measured."""

    bos_stream: bool = False
    """context: start position 0 (BOS, the model's attention sink, which the SAE does not model) from the frozen
    model's own layer-L residual of BOS, a constant, instead of from its features."""


@dataclass
class LensTrainConfig(TrainLoopConfig):
    """`faithlens lens train`: the tuned-lens baseline (affine translator on the raw residual)."""

    layer: int = 9
    """Layer whose residual stream the lens reads."""

    out: Path = Path("runs/lens")
    """Output folder: lens/ (lens.json + lens.safetensors), metrics, tb/, checkpoints/."""


@dataclass
class DecoderEvalConfig(CorpusConfig, ModelConfig):
    """`faithlens decoder eval`: decoders and lens baselines on the same held-out tokens, in one table."""

    decoders: Annotated[tuple[Path, ...], tyro.conf.Positional] = ()
    """Decoder run folders (or decoder/ folders inside them)."""

    split: Split = "eval"
    """Split of --data scored as in-domain: eval (its held-out hash split), all (the whole of --data: a file held
    out for evaluation), or train."""

    tokens: int = 20_000
    """Token positions per corpus (BOS positions are not scored)."""

    lens: Path | None = None
    """A tuned-lens folder to include as a baseline."""

    sae: Path | None = None
    """SAE for the spliced baseline and the features (default: the one the first decoder was trained on)."""

    task_suite: str = "arithmetic"
    """Builtin task suite whose answer tokens are scored (empty = skip)."""

    task_examples: int = 100
    """Task examples scored."""

    batch_size: int = 4
    """Sequences per forward pass."""

    json: bool = False
    """Print one JSON object instead of the table."""

    out: Path | None = None
    """Folder for eval.json and eval.md (default: the first decoder's run folder)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.decoders:
            raise ConfigError("decoder eval: give at least one decoder folder (faithlens decoder eval DIR)")
