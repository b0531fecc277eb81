"""Which frozen model to load and how to run it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DEFAULT_MODEL = "embedded:smollm2-135m-instruct"


@dataclass
class ModelConfig:
    model: str = DEFAULT_MODEL
    """A Hugging Face hub id, a local model directory, or embedded:smollm2-135m-instruct."""

    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """Compute dtype of the frozen model: auto = bf16 where the CPU/GPU supports it, else fp32."""

    device: str = "cpu"
    """Torch device for the frozen model (cpu, cuda, cuda:1, ...)."""
