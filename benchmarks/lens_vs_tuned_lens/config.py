"""The benchmark's settings (`CompareConfig`), how the token budget is split into steps (`TokenPlan`), and the
paths of one run (`BenchDirs`)."""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from benchmarks.sae_vs_sparsify.config import BenchError
from models.config import DEFAULT_MODEL
from models.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
MARKER = ".lens_vs_tuned_lens"

__all__ = ["BenchDirs", "BenchError", "CompareConfig", "TokenPlan", "check_layer", "plan_tokens"]


@dataclass
class CompareConfig:
    """Train our tuned lens and AlignmentResearch's tuned-lens on the same tokens, evaluate both with our metrics."""

    tokens: int
    """Training tokens (BOS positions excluded), rounded up to whole steps of both tools (see results.md)."""

    data: str
    """Text source(s) as in `faithlens lens train --data`; train split to train, eval split to evaluate."""

    layer: int = 9
    """Layer whose residual stream both lenses read (hidden_states[layer]; tuned-lens has none after the last block)."""

    eval_tokens: int = 20_000
    """Held-out token positions (eval split of --data) on which both lenses are evaluated."""

    out: Path = REPO / "runs" / "lens_vs_tuned_lens"
    """Results folder: results.json, results.md, logs, both runs (its ours/ and tuned_lens/ are replaced)."""

    venv: Path = REPO / "runs" / "venvs" / "tuned_lens"
    """Venv holding tuned-lens 0.2.0 (created with torch==2.13.0 when missing; never our venv)."""

    model: str = DEFAULT_MODEL
    """Frozen model: embedded:smollm2-135m-instruct or a local HF folder (tuned-lens loads the same folder)."""

    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """Dtype of our frozen forward during training (auto = ours' default); tuned-lens loads the folder's dtype."""

    eval_dtype: Literal["auto", "bf16", "fp32"] = "fp32"
    """Dtype of the frozen model in the evaluation of both lenses."""

    teacher: Literal["cache", "online"] = "cache"
    """Our lens's teacher (`lens train --teacher`): cache = the top-64 + rest-mass target (the default);
    online = the exact full-vocabulary KL with the frozen model in every step, as tuned-lens trains."""

    runner: Literal["cli", "inprocess"] = "cli"
    """How ours runs: cli = `faithlens lens train` end to end (a Ray Train job); inprocess = the same trainer
    (`distill.job.build_trainer`) in one plain process, without starting Ray."""

    tuned_lens_steps: int = 250
    """tuned-lens's optimizer steps at most (its default, 250); each step takes whole --batch-sequences batches."""

    seq_len: int = 256
    """Tokens per sequence, BOS included."""

    batch_sequences: int = 8
    """Sequences per forward pass of both tools, and per optimizer step of ours."""

    seed: int = 0
    """Seed of our run and of tuned-lens's data shuffling."""

    json: bool = False
    """Print one JSON object instead of the table."""

    def __post_init__(self) -> None:
        from corpus.sources import parse_sources

        if self.tokens <= 0:
            raise ConfigError(f"--tokens: expected a positive number of tokens, got {self.tokens}")
        if self.eval_tokens <= 0:
            raise ConfigError(f"--eval-tokens: expected a positive number of tokens, got {self.eval_tokens}")
        if self.tuned_lens_steps < 1:
            raise ConfigError(f"--tuned-lens-steps: expected at least 1, got {self.tuned_lens_steps}")
        if self.batch_sequences < 1:
            raise ConfigError(f"--batch-sequences: expected at least 1, got {self.batch_sequences}")
        if self.seq_len < 2:
            raise ConfigError(f"--seq-len: expected at least 2, got {self.seq_len}")
        parse_sources(self.data, "--data")  # a missing file fails here, before any model or venv


def check_layer(layer: int, model_dir: Path) -> int:
    """`layer` if both tools have a lens there: 0..n_layers-1 (tuned-lens trains none after the last block)."""
    from transformers import AutoConfig

    n_layers = AutoConfig.from_pretrained(model_dir, local_files_only=True).num_hidden_layers
    if not 0 <= layer < n_layers:
        raise ConfigError(f"--layer {layer}: expected 0..{n_layers - 1} ({n_layers} blocks; tuned-lens has no translator "
                          f"for layer {n_layers}, the last block's output)")
    return layer


@dataclass(frozen=True)
class TokenPlan:
    """The shared training sequences and how each tool steps through them."""

    sequences: int
    """Training sequences both tools see (each once, unless the corpus is shorter)."""

    batch_sequences: int
    """Sequences per forward pass of both tools; one step of ours."""

    tuned_lens_steps: int
    """tuned-lens's optimizer steps."""

    batches_per_tuned_lens_step: int
    """Forward batches per tuned-lens step (its gradient accumulation)."""

    seq_len: int

    @property
    def scored_tokens(self) -> int:
        """Training positions of either tool: every position but BOS."""
        return self.sequences * (self.seq_len - 1)

    @property
    def our_steps(self) -> int:
        return self.sequences // self.batch_sequences

    @property
    def tuned_lens_step_sequences(self) -> int:
        return self.batch_sequences * self.batches_per_tuned_lens_step


def plan_tokens(tokens: int, seq_len: int, batch_sequences: int, max_tuned_lens_steps: int) -> TokenPlan:
    """Whole sequences for `tokens` scored positions, rounded up to whole steps of both tools.

    A tuned-lens step takes m batches (m = the fewest that fit the sequences into `max_tuned_lens_steps`
    steps), so the shared sequences are a whole number of ours' batches as well.
    """
    needed = math.ceil(tokens / (seq_len - 1))
    per_step = math.ceil(needed / (batch_sequences * max_tuned_lens_steps))
    steps = math.ceil(needed / (batch_sequences * per_step))
    return TokenPlan(sequences=steps * per_step * batch_sequences, batch_sequences=batch_sequences,
                     tuned_lens_steps=steps, batches_per_tuned_lens_step=per_step, seq_len=seq_len)


@dataclass(frozen=True)
class BenchDirs:
    """Every path of one benchmark run."""

    root: Path

    @property
    def ours(self) -> Path:
        return self.root / "ours"

    @property
    def ours_run(self) -> Path:
        return self.ours / "run"

    @property
    def ours_cache(self) -> Path:
        return self.ours / "cache"

    @property
    def tuned_lens(self) -> Path:
        return self.root / "tuned_lens"

    @property
    def dataset(self) -> Path:
        return self.tuned_lens / "dataset"

    @property
    def tuned_lens_train(self) -> Path:
        """Train.execute's output: its one-translator lens (the loop trains one layer; see the child)."""
        return self.tuned_lens / "train"

    @property
    def tuned_lens_lens(self) -> Path:
        """The trained translator in a full-size tuned-lens artifact (params.pt + config.json)."""
        return self.tuned_lens / "lens"

    @property
    def tuned_lens_converted(self) -> Path:
        return self.tuned_lens / "lens_faithlens"

    @property
    def conversion_check(self) -> Path:
        return self.tuned_lens / "conversion_check.safetensors"

    def spec(self, tool: str) -> Path:
        return (self.ours if tool == "ours" else self.tuned_lens) / "spec.json"

    def child_result(self, tool: str) -> Path:
        return (self.ours if tool == "ours" else self.tuned_lens) / "child.json"

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def prepare(self) -> None:
        """Claim the folder (refusing one this script did not make) and clear the previous runs."""
        if self.root.exists() and any(self.root.iterdir()) and not (self.root / MARKER).exists():
            raise ConfigError(f"--out {self.root}: exists and was not made by this benchmark; choose another folder")
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / MARKER).write_text("")
        for folder in (self.tuned_lens, self.ours):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
