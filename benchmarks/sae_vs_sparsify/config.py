"""The benchmark's settings (`CompareConfig`), the paths of one run (`BenchDirs`) and its error type."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from models.config import DEFAULT_MODEL
from models.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
MARKER = ".sae_vs_sparsify"


class BenchError(RuntimeError):
    """A step of the benchmark failed; the message says where its log is."""


@dataclass
class CompareConfig:
    """Train our TopK SAE and sparsify's on the same tokens, evaluate both with our metrics."""

    tokens: int
    """Training tokens (BOS positions excluded), as `faithlens sae train --tokens`."""

    data: str
    """Text source(s) as in `faithlens sae train --data`; train split to train, eval split to evaluate."""

    layer: int = 9
    """Our layer (output of HF block layer-1, i.e. sparsify hookpoint layers.{layer-1})."""

    latents: int = 5760
    """Number of latents of both SAEs."""

    k: int = 64
    """Active latents per token of both SAEs."""

    eval_tokens: int = 32_768
    """Held-out token positions for the evaluation of both SAEs."""

    out: Path = REPO / "runs" / "sae_vs_sparsify"
    """Results folder: results.json, results.md, logs, both runs (its ours/ and sparsify/ are replaced)."""

    sparsify_venv: Path = REPO / "runs" / ".venv-sparsify"
    """Venv holding eai-sparsify (created with torch==2.13.0 when missing)."""

    model: str = DEFAULT_MODEL
    """Frozen model: embedded:smollm2-135m-instruct or a local HF folder (sparsify needs a folder)."""

    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """Dtype of our frozen forward during training (auto = ours' default); sparsify always runs fp32."""

    eval_dtype: Literal["auto", "bf16", "fp32"] = "fp32"
    """Dtype of the frozen model in the evaluation of both SAEs."""

    seq_len: int = 256
    """Tokens per sequence, BOS included."""

    batch_sequences: int = 8
    """Sequences per optimizer step (batch tokens = batch_sequences x seq_len)."""

    seed: int = 0
    """Seed of our run and of the shuffling of sparsify's sequences."""

    json: bool = False
    """Print one JSON object instead of the table."""


@dataclass(frozen=True)
class BenchDirs:
    """Every path of one benchmark run."""

    root: Path

    @property
    def sparsify(self) -> Path:
        return self.root / "sparsify"

    @property
    def dataset(self) -> Path:
        return self.sparsify / "dataset"

    @property
    def sparsify_ckpt(self) -> Path:
        return self.sparsify / "ckpt"

    @property
    def sparsify_converted(self) -> Path:
        return self.sparsify / "sae_faithlens"

    @property
    def ours(self) -> Path:
        return self.root / "ours"

    @property
    def ours_run(self) -> Path:
        return self.ours / "run"

    @property
    def ours_cache(self) -> Path:
        return self.ours / "cache"

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def prepare(self) -> None:
        """Claim the folder (refusing one this script did not make) and clear the previous runs."""
        if self.root.exists() and any(self.root.iterdir()) and not (self.root / MARKER).exists():
            raise ConfigError(f"--out {self.root}: exists and was not made by this benchmark; choose another folder")
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / MARKER).write_text("")
        for folder in (self.sparsify, self.ours):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
