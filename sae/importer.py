"""`faithlens sae import SRC --out DIR`: a pretrained SAELens or sparsify SAE as a faithlens SAE run folder.

The result is what `sae train` writes, OUT/sae/ (cfg.json + sae.safetensors), so `faithlens sae eval OUT`
and every `--sae` read it; its cfg.json records the layer and, under `imported_from`, the source format,
folder, hook and the source's own cfg.json.

| source                          | ours     | how                                                          |
|---------------------------------|----------|--------------------------------------------------------------|
| SAELens standard                | relu     | W_enc transposed                                             |
| SAELens topk (k)                | topk     | rescale_acts_by_decoder_norm folded: W_enc, b_enc ·‖d_i‖, W_dec/‖d_i‖ |
| SAELens jumprelu (and BatchTopK / Matryoshka saved as jumprelu) | jumprelu | per-latent threshold kept |
| sparsify topk                   | topk     | encoder.weight is W_enc; W_dec taken as [latents, d_in] even if stored transposed |

SAELens `normalize_activations: expected_average_only_in` means the SAE was trained on x·s; s (from
--scaling-factor or the folder's activation_scaler.json) is folded into the weights as SAELens's own
`fold_activation_norm_scaling_factor` does. Per-token normalisations (constant_norm_rescale, layer_norm),
gated SAEs, transcoders, skip connections, attention-head hooks and finetuning scaling factors are refused.
`python -m benchmarks.check_sae_import` checks the imports against the libraries' own encode/decode.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, NamedTuple

import torch
import tyro
from torch import Tensor

from models.errors import ConfigError
from models.io import load_safetensors, read_json
from sae.config import SaeConfig
from sae.model import SAELENS_WEIGHTS, SPARSIFY_WEIGHTS, SparseAutoencoder, foreign_format
from training.layout import RunLayout

Format = Literal["auto", "saelens", "sparsify"]

# SAELens architecture -> ours (BatchTopK and Matryoshka SAEs are saved by SAELens as jumprelu for inference)
SAELENS_TO_OURS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}
SAELENS_NORMS = ("none", "expected_average_only_in")
ACTIVATION_SCALER = "activation_scaler.json"
"""SAELens's training checkpoints keep the unfolded input scaling factor here: {"scaling_factor": s}."""


@dataclass
class SaeImportConfig:
    src: Annotated[Path, tyro.conf.Positional, tyro.conf.arg(metavar="SRC")]
    """A SAELens folder (cfg.json + sae_weights.safetensors), a sparsify hookpoint folder (cfg.json +
    sae.safetensors, named after its hookpoint, e.g. layers.8) or a sparsify run folder holding several."""

    format: Format = "auto"
    """saelens or sparsify; auto = from the files in SRC."""

    out: Path = Path("runs/sae-import")
    """Output folder, an `sae train` OUT: sae/ (cfg.json + sae.safetensors). A previous import there is replaced."""

    hook: str | None = None
    """The hook the SAE reads, overriding the one recorded in SRC (sparsify: the hookpoint sub-folder to import)."""

    scaling_factor: float = 0.0
    """SAELens expected_average_only_in: the input scale s the SAE was trained with (x·s); 0 = from
    SRC/activation_scaler.json."""

    k_max: int = 0
    """relu and jumprelu imports: sparse (index, value) slots per token; 0 = 256. Tokens on which more latents
    fire keep the strongest (SAELens keeps all)."""


class Imported(NamedTuple):
    cfg: SaeConfig
    tensors: dict[str, Tensor]
    """Ours: W_enc [latents, d_in], b_enc, W_dec [latents, d_in], b_dec, threshold ([latents], jumprelu only)."""
    hook: str
    source_cfg: dict


# -- hooks -> layers ------------------------------------------------------------------------------
_HOOKS = (
    # TransformerLens (SAELens on a HookedTransformer): the residual entering / leaving block i
    (re.compile(r"blocks\.(\d+)\.hook_resid_pre"), 0),
    (re.compile(r"blocks\.(\d+)\.hook_resid_post"), 1),
    # a Hugging Face block module's output (SAELens HookedProxyLM names, sparsify hookpoints under base_model)
    (re.compile(r"(?:model\.|transformer\.|gpt_neox\.|model\.decoder\.)?(?:layers|h)\.(\d+)"), 1),
)
_EMBED_HOOKS = ("model.embed_tokens", "embed_tokens", "transformer.wte", "wte", "gpt_neox.embed_in", "embed_in")


def layer_of_hook(hook: str) -> int:
    """This project's layer (the output of that many blocks; 0 = the embeddings) read by `hook`.

    blocks.{i}.hook_resid_pre is the input of block i: layer i. blocks.{i}.hook_resid_post, a Hugging Face
    block module `model.layers.{i}` and a sparsify hookpoint `layers.{i}` are the output of block i: layer i+1.
    The embedding module's output is layer 0 (for models that do not rescale it afterwards, e.g. not Gemma).
    """
    name = hook.split("/")[0]  # sparsify: hookpoint/seedN
    if name in _EMBED_HOOKS:
        return 0
    for pattern, offset in _HOOKS:
        if m := pattern.fullmatch(name):
            return int(m.group(1)) + offset
    raise ConfigError(
        f"hook {hook!r}: not a residual stream at a block boundary, which is all faithlens reads "
        "(blocks.N.hook_resid_pre/post, model.layers.N, layers.N, model.embed_tokens); attention, MLP, "
        "hook_z and mid-block hooks cannot be imported")


# -- SAELens --------------------------------------------------------------------------------------
def read_saelens(src: Path, hook: str | None = None, scaling_factor: float = 0.0, k_max: int = 0) -> Imported:
    """A SAELens 5.x/6.x folder as our architecture and tensors (nothing written)."""
    cfg_path = src / "cfg.json"
    raw = read_json(cfg_path)
    if not isinstance(raw, dict) or "d_in" not in raw:
        raise ConfigError(f"{cfg_path}: expected SAELens's config, a JSON object with d_in")
    meta = {**raw, **(raw.get("metadata") or {})}  # 6.x keeps the hook etc. under metadata, 5.x at the top
    arch = _saelens_arch(raw, cfg_path)
    if meta.get("hook_head_index") is not None or raw.get("reshape_activations", "none") != "none":
        raise ConfigError(f"{cfg_path}: an SAE on attention heads (hook_head_index / hook_z) cannot be imported")
    hook = hook or meta.get("hook_name") or meta.get("hook_point")
    if not hook:
        raise ConfigError(f"{cfg_path}: records no hook_name; pass --hook")
    layer_of_hook(hook)

    w = load_safetensors(src / SAELENS_WEIGHTS)
    d_in, d_sae = int(raw["d_in"]), int(raw.get("d_sae", 0))
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if arch == "jumprelu":
        if "log_threshold" in w and "threshold" not in w:  # a JumpReLU training SAE's state
            w["threshold"] = w.pop("log_threshold").float().exp()
        shapes["threshold"] = (d_sae,)
    _check_shapes(src / SAELENS_WEIGHTS, w, shapes)
    if "scaling_factor" in w and not torch.all(w["scaling_factor"] == 1):
        raise ConfigError(f"{src / SAELENS_WEIGHTS}: holds a finetuning scaling_factor other than 1 "
                          "(SAELens < 6); load and re-save it with SAELens 6 first")
    w = {name: t.float() for name, t in w.items()}

    W_enc, b_enc, W_dec, b_dec = w["W_enc"].T, w["b_enc"], w["W_dec"], w["b_dec"]
    s = _saelens_scale(src, raw, scaling_factor)
    # trained on x·s: an SAE on x is W_enc·s, W_dec/s, b_dec/s (SAELens's fold_activation_norm_scaling_factor)
    W_enc, W_dec, b_dec = W_enc * s, W_dec / s, b_dec / s
    if arch == "topk" and raw.get("rescale_acts_by_decoder_norm"):
        # SAELens ranks pre·‖d_i‖ and decodes acts/‖d_i‖: scale latent i's encoder up and its decoder row down
        norm = W_dec.norm(dim=1)
        W_enc, b_enc, W_dec = W_enc * norm[:, None], b_enc * norm, W_dec / norm[:, None]
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if arch == "jumprelu":
        tensors["threshold"] = w["threshold"]
    k = int(raw["k"]) if arch == "topk" else min(64, d_sae)
    cfg = _sae_config(cfg_path, d_in=d_in, num_latents=d_sae, arch=arch, k=k,
                      k_max=0 if arch == "topk" else k_max or 256,
                      apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)))
    return Imported(cfg, tensors, hook, {**raw, "input_scale_folded": s})


def _saelens_arch(raw: dict, cfg_path: Path) -> str:
    arch = raw.get("architecture", "standard")
    if raw.get("activation_fn", raw.get("activation_fn_str")) == "topk":  # SAELens < 6
        arch = "topk"
        raw.setdefault("k", (raw.get("activation_fn_kwargs") or {}).get("k"))
    elif raw.get("activation_fn", "relu") != "relu" and arch == "standard":
        raise ConfigError(f"{cfg_path}: activation_fn {raw['activation_fn']!r} is not supported (relu or topk)")
    if arch not in SAELENS_TO_OURS:
        raise ConfigError(f"{cfg_path}: architecture {arch!r} is not supported "
                          f"(expected one of {', '.join(SAELENS_TO_OURS)})")
    if arch == "topk" and not raw.get("k"):
        raise ConfigError(f"{cfg_path}: a topk SAE without k")
    return SAELENS_TO_OURS[arch]


def _saelens_scale(src: Path, raw: dict, scaling_factor: float) -> float:
    norm = raw.get("normalize_activations", "none")
    norm = {True: "expected_average_only_in", False: "none", None: "none"}.get(norm, norm)  # SAELens < 6: a bool
    if norm not in SAELENS_NORMS:
        raise ConfigError(f"{src / 'cfg.json'}: normalize_activations {norm!r} rescales every token by its own norm, "
                          "which an SAE with fixed weights on the raw residual cannot reproduce; not supported")
    if norm == "none":
        if scaling_factor:
            raise ConfigError(f"--scaling-factor: {src / 'cfg.json'} has normalize_activations none; "
                              "its scale is already in the weights")
        return 1.0
    if scaling_factor > 0:
        return float(scaling_factor)
    stored = read_json(src / ACTIVATION_SCALER) if (src / ACTIVATION_SCALER).is_file() else {}
    s = stored.get("scaling_factor") if isinstance(stored, dict) else None
    if not isinstance(s, (int, float)) or s <= 0:
        raise ConfigError(f"{src / 'cfg.json'}: normalize_activations expected_average_only_in, but no scaling factor "
                          f"is stored ({ACTIVATION_SCALER}); pass --scaling-factor (the release's norm_scaling_factor)")
    return float(s)


# -- sparsify -------------------------------------------------------------------------------------
def sparsify_folder(src: Path, hook: str | None) -> Path:
    """The hookpoint folder to import: SRC itself, or its sub-folder named `hook` (or its only one)."""
    if (src / SPARSIFY_WEIGHTS).is_file():
        return src
    subs = sorted(p.name for p in src.iterdir() if (p / SPARSIFY_WEIGHTS).is_file()) if src.is_dir() else []
    if hook in subs:
        return src / hook
    if hook is None and len(subs) == 1:
        return src / subs[0]
    if not subs:
        raise ConfigError(f"{src}: no {SPARSIFY_WEIGHTS} in it or in its sub-folders; not a sparsify SAE")
    raise ConfigError(f"{src}: holds SAEs for the hookpoints {', '.join(subs)}; choose one with --hook")


def read_sparsify(src: Path, hook: str | None = None) -> Imported:
    folder = sparsify_folder(src, hook)
    cfg_path = folder / "cfg.json"
    raw = read_json(cfg_path)
    if not isinstance(raw, dict) or "d_in" not in raw:
        raise ConfigError(f"{cfg_path}: expected sparsify's config, a JSON object with d_in")
    if raw.get("activation", "topk") != "topk":
        raise ConfigError(f"{cfg_path}: activation {raw['activation']!r} is not supported (topk)")
    for flag in ("transcode", "skip_connection"):
        if raw.get(flag):
            raise ConfigError(f"{cfg_path}: {flag} is true; only plain sparse autoencoders can be imported")
    hook = hook or folder.name
    layer_of_hook(hook)

    w = load_safetensors(folder / SPARSIFY_WEIGHTS)
    if "W_skip" in w:
        raise ConfigError(f"{folder / SPARSIFY_WEIGHTS}: has a skip connection (W_skip), which cannot be imported")
    d_in = int(raw["d_in"])
    n = int(w["encoder.weight"].shape[0]) if "encoder.weight" in w else 0
    if "W_dec" in w and n and w["W_dec"].shape == (d_in, n) and d_in != n:
        w["W_dec"] = w["W_dec"].T  # some versions store it [d_in, latents]
    _check_shapes(folder / SPARSIFY_WEIGHTS, w,
                  {"encoder.weight": (n, d_in), "encoder.bias": (n,), "W_dec": (n, d_in), "b_dec": (d_in,)})
    # normalize_decoder and multi_topk shape training only; inference is relu then the top k either way
    tensors = {"W_enc": w["encoder.weight"], "b_enc": w["encoder.bias"], "W_dec": w["W_dec"], "b_dec": w["b_dec"]}
    cfg = _sae_config(cfg_path, d_in=d_in, num_latents=n, arch="topk", k=int(raw.get("k", 0)))
    return Imported(cfg, {name: t.float().contiguous() for name, t in tensors.items()}, hook, raw)


# -- shared -------------------------------------------------------------------------------------
def _check_shapes(path: Path, tensors: dict[str, Tensor], shapes: dict[str, tuple]) -> None:
    for name, shape in shapes.items():
        if name not in tensors:
            raise ConfigError(f"{path}: no tensor {name!r} (has {', '.join(sorted(tensors)) or 'none'})")
        if tuple(tensors[name].shape) != shape:
            raise ConfigError(f"{path}: {name} has shape {list(tensors[name].shape)}, expected {list(shape)} "
                              "from cfg.json")


def _sae_config(cfg_path: Path, **fields) -> SaeConfig:
    try:
        return SaeConfig(**fields)
    except ConfigError as e:
        raise ConfigError(f"{cfg_path}: {e}") from None


def read_foreign(src: Path, fmt: Format = "auto", hook: str | None = None, scaling_factor: float = 0.0,
                 k_max: int = 0) -> Imported:
    """A SAELens or sparsify SAE folder as our architecture and tensors, checked, nothing written."""
    src = Path(src)
    if not src.is_dir():
        raise ConfigError(f"SRC {src}: no such folder")
    if fmt == "auto":
        fmt = foreign_format(src)
        if fmt is None:
            raise ConfigError(f"SRC {src}: neither a SAELens folder (cfg.json + {SAELENS_WEIGHTS}) nor a sparsify one "
                              f"(cfg.json + {SPARSIFY_WEIGHTS}, or sub-folders holding them)")
    if fmt == "saelens":
        if not (src / "cfg.json").is_file():
            raise ConfigError(f"SRC {src}: no cfg.json; not a SAELens SAE folder")
        return read_saelens(src, hook, scaling_factor, k_max)
    if scaling_factor:
        raise ConfigError("--scaling-factor: only for SAELens SAEs (sparsify trains on the raw residual)")
    return read_sparsify(src, hook)


def build_sae(imported: Imported) -> SparseAutoencoder:
    sae = SparseAutoencoder(imported.cfg)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(imported.tensors[name])
        if imported.cfg.arch == "jumprelu":
            # as SparseAutoencoder.load does: SAELens applies a ReLU first, a threshold of 0 at the least
            sae.log_threshold.copy_(imported.tensors["threshold"].clamp_min(0).log())
    return sae.eval().requires_grad_(False)


def import_sae(cfg: SaeImportConfig) -> Path:
    """Write SRC as OUT/sae (atomically); returns that folder."""
    imported = read_foreign(cfg.src, cfg.format, cfg.hook, cfg.scaling_factor, cfg.k_max)
    layout = RunLayout(cfg.out)
    _check_replaceable(layout)
    fmt = cfg.format if cfg.format != "auto" else foreign_format(Path(cfg.src))
    meta = imported.source_cfg.get("metadata") or imported.source_cfg
    extra = {"layer": layer_of_hook(imported.hook), "model": meta.get("model_name"),
             "imported_from": {"format": fmt, "src": str(Path(cfg.src).resolve()), "hook": imported.hook,
                               "cfg": imported.source_cfg}}
    build_sae(imported).save(layout.sae, extra=extra)
    return layout.sae


def _check_replaceable(layout: RunLayout) -> None:
    # only a previous import (or nothing) may be replaced: never a training run's folder
    if not layout.root.exists() or (layout.root.is_dir() and not any(layout.root.iterdir())):
        return
    cfg = layout.sae / "cfg.json"
    if cfg.is_file() and isinstance(meta := read_json(cfg), dict) and "imported_from" in meta:
        return
    raise ConfigError(f"--out {layout.root}: exists and is not a previous import; choose an empty or new folder")


def run_sae_import(cfg: SaeImportConfig) -> Path:
    sae_dir = import_sae(cfg)
    sae = SparseAutoencoder.load(sae_dir)
    src = sae.meta["imported_from"]
    print(f"imported {src['format']} SAE {cfg.src} (hook {src['hook']}) as {sae.cfg.arch}, "
          f"{sae.cfg.d_in} -> {sae.cfg.num_latents}, layer {sae.meta['layer']}, into {sae_dir}")
    print(f"check it on the model: faithlens sae eval {cfg.out} --model MODEL  (FVU and spliced KL)")
    return sae_dir
