"""Where a frozen model's weights live: one device, or spread by accelerate over GPUs, CPU and disk.

`--device-map` and `--max-memory` become transformers' `from_pretrained(device_map=, max_memory=,
offload_folder=)`; accelerate then moves activations between devices with hooks on the modules, so
FrozenLM's block hooks, early stop and teacher forward run unchanged on a dispatched model.
"""

from __future__ import annotations

import atexit
import functools
import json
import re
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from models.config import ModelConfig
from models.errors import ConfigError
from models.io import cache_root

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
"""accelerate's named device-map strategies."""

_DEVICE = re.compile(r"^(\d+|cpu|disk|mps|(cuda|xpu|npu):\d+)$")


def dispatch_kwargs(cfg: ModelConfig) -> dict:
    """The `from_pretrained` arguments that place the model per `cfg` (empty without --device-map)."""
    if not cfg.device_map:
        if cfg.max_memory or cfg.offload_folder:
            raise ConfigError("--max-memory and --offload-folder apply to a dispatched model; add --device-map auto")
        return {}
    if cfg.device != "cpu":
        raise ConfigError(f"--device {cfg.device} and --device-map {cfg.device_map}: give one (the device map names the devices)")
    kwargs: dict = {"device_map": parse_device_map(cfg.device_map)}
    if cfg.max_memory:
        kwargs["max_memory"] = parse_max_memory(cfg.max_memory)
    kwargs["offload_folder"] = cfg.offload_folder or _temporary_offload_folder()
    return kwargs


def parse_device_map(text: str) -> str | dict[str, int | str]:
    """A strategy name, or the JSON file's {module name: device} (GPU indices as ints, as accelerate wants them)."""
    if text in STRATEGIES:
        return text
    path = Path(text).expanduser()
    if not path.is_file():
        raise ConfigError(f"--device-map: expected {', '.join(STRATEGIES)} or a JSON file of module: device; no such file: {text}")
    try:
        mapping = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--device-map {text}: not valid JSON ({e})") from None
    if not isinstance(mapping, dict) or not mapping:
        raise ConfigError(f"--device-map {text}: expected a JSON object of module name: device")
    return {str(module): _device(str(device), f"--device-map {text}: module {module!r}") for module, device in mapping.items()}


def parse_max_memory(text: str) -> dict[int | str, str]:
    """'0:20GiB,1:20GiB,cpu:60GiB' -> {0: '20GiB', 1: '20GiB', 'cpu': '60GiB'}."""
    from accelerate.utils import convert_file_size_to_int

    memory: dict[int | str, str] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        device, sep, size = part.rpartition(":")
        if not sep or not device:
            raise ConfigError(f"--max-memory: expected DEVICE:SIZE pairs such as 0:20GiB,cpu:60GiB, got {part!r}")
        key = _device(device, "--max-memory")
        if key == "disk":
            raise ConfigError("--max-memory: disk takes whatever does not fit elsewhere; list GPUs and cpu only")
        try:
            convert_file_size_to_int(size)
        except ValueError:
            raise ConfigError(f"--max-memory: {size!r} is not a size (e.g. 20GiB, 500MB)") from None
        memory[key] = size
    if not memory:
        raise ConfigError("--max-memory: no DEVICE:SIZE given")
    return memory


def _device(text: str, flag: str) -> int | str:
    text = text.strip()
    if not _DEVICE.match(text):
        raise ConfigError(f"{flag}: unknown device {text!r} (expected a GPU index, cuda:N, cpu, mps or disk)")
    if text.isdigit():
        return int(text)
    return int(text.split(":")[1]) if text.startswith("cuda:") else text


@functools.cache
def _temporary_offload_folder() -> str:
    root = cache_root() / "offload"
    root.mkdir(parents=True, exist_ok=True)
    folder = tempfile.mkdtemp(prefix="run-", dir=root)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def main_device(model: nn.Module, fallback: torch.device) -> torch.device:
    """Where a dispatched model takes its inputs and returns its outputs: accelerate's main device, the first
    accelerator in the device map (cpu when there is none); `fallback` for a model on one device."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return fallback
    accelerators = [d for d in device_map.values() if d not in ("cpu", "disk")]
    if not accelerators:
        return torch.device("cpu")
    first = accelerators[0]
    return torch.device(f"cuda:{first}" if isinstance(first, int) else first)


def module_tensors(module: nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
    """`module`'s own parameters on `device`: the same tensors when they are there already, else copies (loaded
    from accelerate's CPU or disk offload when the module's weights sit on the meta device)."""
    params = dict(module.named_parameters(recurse=False))
    if all(p.device.type != "meta" for p in params.values()):
        return {name: p.detach().to(device) for name, p in params.items()}
    from accelerate.utils import align_module_device

    with align_module_device(module, device):  # loads the offloaded weights for the duration
        return {name: p.detach() for name, p in module.named_parameters(recurse=False)}
