"""Which frozen model to load and how to run it."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

DEFAULT_MODEL = "embedded:smollm2-135m-instruct"


@dataclass
class ModelConfig:
    model: str = DEFAULT_MODEL
    """A Hugging Face hub id, a local model directory, or embedded:smollm2-135m-instruct."""

    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """Compute dtype of the frozen model: auto = bf16 where the CPU/GPU supports it, else fp32."""

    device: str = "cpu"
    """Torch device for the frozen model (cpu, cuda, cuda:1, ...); with --device-map, leave it at cpu."""

    device_map: str = ""
    """Spread the frozen model over devices with accelerate: auto, balanced, balanced_low_0, sequential, or a
    JSON file mapping module names to devices (0, "cuda:1", "cpu", "disk"); empty = the whole model on --device."""

    max_memory: str = ""
    """With --device-map: memory per device for the weights, e.g. 0:20GiB,1:20GiB,cpu:60GiB (what does not fit
    goes to disk)."""

    offload_folder: str = ""
    """With --device-map: folder for weights offloaded to disk (empty = a temporary folder in the faithlens cache,
    removed at exit)."""

    def model_config(self, **overrides) -> ModelConfig:
        """These settings as a plain ModelConfig (from a stage config that holds them), with `overrides`."""
        return ModelConfig(**{**{f.name: getattr(self, f.name) for f in fields(ModelConfig)}, **overrides})
