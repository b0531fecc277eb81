"""Training checkpoints: weights, optimizer moments and extra tensors as safetensors, counters as JSON.

Nothing is pickled, so a checkpoint can be read without the code that wrote it; a checkpoint folder
is written atomically (a killed save leaves the previous one in place).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from models.io import atomic_path, load_safetensors, read_json

STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"


def training_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Weights (`model.*`) and Adam/AdamW moments (`opt.<param index>.*`) as flat safetensors entries."""
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    for i, p in enumerate(model.parameters()):
        for name, value in opt.state.get(p, {}).items():
            tensors[f"opt.{i}.{name}"] = value.detach().reshape(-1).contiguous() if value.dim() == 0 else value.detach().contiguous()
    return tensors


def restore_training_tensors(tensors: dict[str, torch.Tensor], model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """The inverse of `training_tensors`."""
    model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    for i, p in enumerate(model.parameters()):
        state = {name: tensors[f"opt.{i}.{name}"] for name in ("step", "exp_avg", "exp_avg_sq") if f"opt.{i}.{name}" in tensors}
        if state:
            if "step" in state:
                state["step"] = state["step"].reshape(())
            opt.state[p] = state


def has_checkpoint(directory: Path) -> bool:
    return (Path(directory) / STATE_JSON).is_file()


def save_checkpoint(directory: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, scalars: dict,
                    extra: dict[str, torch.Tensor] | None = None) -> None:
    """Write model + optimizer + `extra` tensors (names outside model.* / opt.*) and the JSON `scalars` to `directory`, atomically."""
    tensors = {**training_tensors(model, opt), **{k: v.contiguous() for k, v in (extra or {}).items()}}
    with atomic_path(Path(directory)) as tmp:
        tmp.mkdir()
        save_file(tensors, str(tmp / STATE_TENSORS))
        (tmp / STATE_JSON).write_text(json.dumps(scalars))


def load_checkpoint(directory: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore model and optimizer from `directory`; returns (scalars, extra tensors)."""
    directory = Path(directory)
    tensors = load_safetensors(directory / STATE_TENSORS)
    restore_training_tensors(tensors, model, opt)
    extra = {k: v for k, v in tensors.items() if not k.startswith(("model.", "opt."))}
    return read_json(directory / STATE_JSON, f"delete {directory} to start the run over"), extra
