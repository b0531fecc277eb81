"""`faithlens sae export-saelens`: an SAE in the SAELens 6.x on-disk format (SAELens, sae-vis, Neuronpedia).

The output folder holds what `sae_lens.SAE.load_from_disk` reads: `cfg.json` (the fields of the
architecture's `SAEConfig`, with `metadata` and `architecture`) and `sae_weights.safetensors` with
W_enc [d_in, d_sae] (ours transposed), b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in], plus
threshold [d_sae] for jumprelu only (SAELens loads the state dict strictly).

| ours       | SAELens  | SAELens encode                            | equal to ours                          |
|------------|----------|-------------------------------------------|----------------------------------------|
| relu       | standard | relu(pre)                                 | `forward` always; `encode` within width |
| topk       | topk (k) | top k of pre, then relu                   | always                                 |
| batchtopk  | jumprelu | relu(pre) · (pre > threshold), per latent | `encode` within width                  |
| matryoshka | jumprelu | relu(pre) · (pre > threshold), per latent | `encode` within width                  |
| jumprelu   | jumprelu | relu(pre) · (pre > threshold), per latent | `encode` within width                  |

with pre = (x − b_dec) W_enc + b_enc. batchtopk and matryoshka become jumprelu with every latent's
threshold set to our scalar one, as SAELens itself does when it saves a BatchTopK SAE for inference
(a Matryoshka SAE's nesting only shapes training); jumprelu keeps its per-latent thresholds. "Within
width": our `encode` first keeps only the top `sparse_width` latents of each token (4k by default)
and applies the activation to those, so on a token where more than `sparse_width` latents would
fire it drops the weakest and SAELens does not. `within_width` marks the tokens where the two
agree exactly; `python -m benchmarks.check_saelens_export` measures the difference on the others.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import torch
import tyro
from safetensors.torch import save_file
from torch import Tensor

from models.errors import ConfigError
from models.io import atomic_path
from sae.model import SAELENS_WEIGHTS, SparseAutoencoder
from training.layout import resolve_sae_dir

SAELENS_CFG = "cfg.json"
SAELENS_ARCH = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "matryoshka": "jumprelu",
                "jumprelu": "jumprelu"}
# Recorded as metadata.sae_lens_version: configs from 6.0 on skip SAELens's pre-6 key renaming.
SAELENS_FORMAT_VERSION = "6.0.0"


@dataclass
class SaeExportConfig:
    sae: Annotated[Path, tyro.conf.Positional] = Path("runs/sae/sae")
    """SAE folder (cfg.json + sae.safetensors), or a run folder holding sae/."""

    out: Annotated[Path, tyro.conf.Positional] = Path("runs/sae/saelens")
    """Output folder (cfg.json + sae_weights.safetensors); a previous export there is replaced."""

    hook_name: str | None = None
    """SAELens hook name; default model.layers.{layer-1} from the layer in the SAE's cfg.json."""


def hook_name_for_layer(layer: int) -> str:
    """The module of a Hugging Face decoder (as SAELens's HookedProxyLM names it) whose output is `layer`."""
    # Layer L is the output of block L-1; layer 0, the embedding output, is the input of block 0.
    return "model.embed_tokens" if layer == 0 else f"model.layers.{layer - 1}"


def saelens_cfg(sae: SparseAutoencoder, hook_name: str | None = None) -> dict:
    """The SAELens cfg.json of `sae`; the hook defaults to the one of the layer recorded in its cfg.json."""
    meta = getattr(sae, "meta", {})
    if hook_name is None and "layer" in meta:
        hook_name = hook_name_for_layer(int(meta["layer"]))
    cfg = {
        "architecture": SAELENS_ARCH[sae.cfg.arch],
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.num_latents,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": sae.cfg.apply_b_dec_to_input,
        "normalize_activations": "none",  # the training-time input scale is folded into the weights
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "sae_lens_training_version": None,  # trained by faithlens, not SAELens
            "model_name": meta.get("model"),
            "model_class_name": "AutoModelForCausalLM",
            "hook_name": hook_name,
            "hook_head_index": None,
            "prepend_bos": True,
            "training_architecture": sae.cfg.arch,
            "faithlens": {**meta, **asdict(sae.cfg), "sparse_width": sae.cfg.sparse_width},
        },
    }
    if sae.cfg.arch == "topk":
        cfg["k"] = sae.cfg.k
        cfg["rescale_acts_by_decoder_norm"] = False
    return cfg


def saelens_tensors(sae: SparseAutoencoder) -> dict[str, Tensor]:
    """The SAELens state dict of `sae`: float32, contiguous, on the CPU."""
    tensors = {
        "W_enc": sae.W_enc.detach().T,
        "b_enc": sae.b_enc.detach(),
        "W_dec": sae.W_dec.detach(),
        "b_dec": sae.b_dec.detach(),
    }
    if SAELENS_ARCH[sae.cfg.arch] == "jumprelu":
        tensors["threshold"] = sae.latent_thresholds()
    return {name: t.float().cpu().contiguous() for name, t in tensors.items()}


def within_width(sae: SparseAutoencoder, x_ND: Tensor) -> Tensor:
    """True for the tokens on which the SAELens export's encode equals our `encode` exactly.

    Those are the tokens where at most `sparse_width` latents fire before our width cap (always
    all tokens for topk, whose width is k itself).
    """
    if sae.cfg.arch == "topk":
        return torch.ones(x_ND.shape[0], dtype=torch.bool, device=x_ND.device)
    pre_NF = torch.nn.functional.linear(sae._encoder_input(x_ND), sae.W_enc, sae.b_enc)
    return (pre_NF > sae.latent_thresholds().clamp_min(0.0)).sum(-1) <= sae.cfg.sparse_width


def export_saelens(sae: SparseAutoencoder, out: Path, hook_name: str | None = None) -> Path:
    """Write `sae` to `out` in the SAELens format, atomically; returns `out`.

    Exact for relu and topk. batchtopk, matryoshka and jumprelu are exported as jumprelu, which matches our
    `encode` only on tokens where at most `sparse_width` latents exceed the threshold (see the module docstring
    and `within_width`).
    """
    out = Path(out)
    _check_replaceable(out)
    cfg = saelens_cfg(sae, hook_name)
    tensors = saelens_tensors(sae)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        save_file(tensors, str(tmp / SAELENS_WEIGHTS))
        (tmp / SAELENS_CFG).write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def _check_replaceable(out: Path) -> None:
    # The output replaces the folder whole: never let a mistyped path take a run folder with it.
    if not out.exists():
        return
    if out.is_dir() and (not any(out.iterdir()) or (out / SAELENS_WEIGHTS).is_file()):
        return
    raise ConfigError(f"{out}: exists and is not an SAELens export; choose an empty or new output folder")


def run_export_saelens(cfg: SaeExportConfig) -> Path:
    sae_dir = resolve_sae_dir(cfg.sae)
    sae = SparseAutoencoder.load(sae_dir)
    out = export_saelens(sae, cfg.out, cfg.hook_name)
    saelens = saelens_cfg(sae, cfg.hook_name)
    print(f"SAELens {saelens['architecture']} SAE ({sae.cfg.d_in} -> {sae.cfg.num_latents}, "
          f"hook {saelens['metadata']['hook_name']}) from {sae_dir} written to {out}")
    if saelens["metadata"]["hook_name"] is None:
        print(f"note: {sae_dir}/cfg.json records no layer, so the export has no hook name; pass --hook-name")
    return out
