"""Which text to read, how much, and how to cut it into sequences."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

from models.config import ModelConfig
from models.errors import ConfigError

DEFAULT_DATA = "builtin:tasks*0.5,builtin:self*0.5"

Split = Literal["train", "eval", "all", "ood"]
"""train / eval: a deterministic hash split of the packed sequences of --data (eval: --eval-fraction of them);
all: every sequence of --data, read whole (a file held out for evaluation); ood: the --ood sources, read whole."""


@dataclass
class CorpusConfig:
    data: str = DEFAULT_DATA
    """Text source(s): a file (.txt/.jsonl/.parquet), a folder, hf:NAME[:CONFIG[:SPLIT]], builtin:tasks
    or builtin:self; several joined by commas form a mixture, each optionally weighted as SOURCE*WEIGHT."""

    tokens: int = 50_000
    """Number of token positions to read (rounded up to whole sequences)."""

    seq_len: int = 256
    """Tokens per packed sequence, BOS included."""

    split: Split = "train"
    """train / eval: deterministic hash split of the packed sequences of --data (eval: --eval-fraction of them);
    all: every sequence of --data, read whole (a held-out file); ood: the --ood sources, read whole."""

    eval_fraction: float = 0.05
    """Share of packed sequences that belong to the eval split."""

    ood: str = ""
    """Out-of-domain source(s), same syntax as --data, read whole when --split ood."""

    encoding: str = "auto"
    """Text-file encoding; auto = UTF-8, falling back to Latin-1 (with a warning naming the file)."""

    text_field: str = "text"
    """Field holding the text in jsonl / parquet / Hugging Face datasets."""

    seed: int = 0
    """Seed of the generated sources (task suites, model samples)."""

    def __post_init__(self) -> None:
        if self.tokens <= 0:
            raise ConfigError(f"--tokens: expected a positive number of tokens, got {self.tokens}")
        if self.seq_len < 2:
            raise ConfigError(f"--seq-len: expected at least 2, got {self.seq_len}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"--eval-fraction: expected a value in [0, 1), got {self.eval_fraction}")
        if self.split == "ood" and not self.ood.strip():
            raise ConfigError("--split ood needs --ood SOURCE (the out-of-domain corpus)")
        from corpus.sources import parse_sources  # checks files exist before any model is loaded

        parse_sources(self.data, "--data")
        if self.ood.strip():
            parse_sources(self.ood, "--ood")


def parse_layers(text: str, n_layers: int, flag: str = "--layers", drop_beyond: bool = False) -> list[int]:
    """'9,12' -> [9, 12]; 'last' names the last block; each layer must lie in 0..n_layers.

    With drop_beyond, layers deeper than the model are skipped instead of refused (a default list
    such as 3,...,25,last then fits shallow models too).
    """
    layers, beyond = [], []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        if part == "last":
            layers.append(n_layers)
            continue
        try:
            layer = int(part)
        except ValueError:
            raise ConfigError(f"{flag}: expected comma-separated layer numbers or 'last', got {part!r}") from None
        if drop_beyond and layer > n_layers:
            beyond.append(layer)
            continue
        if not 0 <= layer <= n_layers:
            raise ConfigError(f"{flag}: layer {layer} is outside the model's range 0..{n_layers} "
                              f"(0 = embeddings, {n_layers} = 'last')")
        layers.append(layer)
    if not layers and beyond:
        raise ConfigError(f"{flag}: layer(s) {', '.join(map(str, beyond))} beyond the model's last block; it has "
                          f"layers 0..{n_layers} (0 = embeddings, {n_layers} = 'last')")
    if not layers:
        raise ConfigError(f"{flag}: no layer given")
    return sorted(set(layers))


def with_bos(tokens: int, seq_len: int) -> int:
    """Positions to read so that `tokens` scored positions remain once each sequence's BOS is left out."""
    return math.ceil(tokens * seq_len / (seq_len - 1))


@dataclass
class CacheConfig(CorpusConfig, ModelConfig):
    layers: str = "9"
    """Layers whose residual stream is cached, comma-separated (0 = embeddings, 'last' = last block)."""

    out: Path = Path("runs/cache")
    """Folder that holds caches; each build goes to a sub-folder named by its key."""

    top_k: int = 64
    """Teacher log-probabilities kept per position (plus the log of the remaining mass)."""

    teacher: bool = True
    """Run the full model and cache teacher log-probs; off = stop after the highest layer."""

    act_dtype: Literal["bf16", "fp16"] = "bf16"
    """Storage dtype of cached residuals."""

    batch_size: int = 8
    """Sequences per forward pass."""

    shard_tokens: int = 32_768
    """Token positions per shard file (rounded to whole batches); the unit of resume."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.top_k < 1:
            raise ConfigError(f"--top-k: expected at least 1, got {self.top_k}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size: expected at least 1, got {self.batch_size}")

    @classmethod
    def covering(cls, cfg: CorpusConfig, tokens: int, layers: str, out: Path, teacher: bool, top_k: int = 64,
                 model: ModelConfig | None = None) -> CacheConfig:
        """The training-split cache of `cfg`'s corpus and of `model` (default: `cfg`, when it holds the
        model fields too) with enough whole sequences that `tokens` positions remain once each
        sequence's BOS is left out."""
        model = model or cfg
        shared = {f.name: getattr(cfg, f.name) for f in fields(CorpusConfig)}
        shared.update({f.name: getattr(model, f.name) for f in fields(ModelConfig) if hasattr(model, f.name)})
        return cls(**{**shared, "tokens": with_bos(tokens, cfg.seq_len), "split": "train", "layers": layers, "out": out,
                      "teacher": teacher, "top_k": top_k})
