"""Sparse autoencoders over a residual stream: ReLU + L1, TopK, BatchTopK, JumpReLU and Matryoshka
BatchTopK behind one interface.

Sparse latents travel as fixed-width (values, indices) pairs, so their cost does not grow with
the SAE width. For TopK-style SAEs the encoder's backward pass and the decoder run sparse (only
the selected latents' rows of the weights receive gradients), which is what makes CPU training fast.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from models.errors import ConfigError
from models.io import atomic_path, load_safetensors, read_json
from sae.config import BATCH_THRESHOLD_ARCHS, SaeConfig
from sae.kernels import JumpReLU, JumpStep, SparseDecode, SparseEncode

SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"  # the same name as ours: told apart by cfg.json


class EncoderOutput(NamedTuple):
    acts_NK: Tensor
    """Latent activations, zero where a slot is unused."""
    indices_NK: Tensor
    """Latent ids of the slots."""
    aux_acts_NA: Tensor | None = None
    """AuxK: activations of the top dead latents (training only)."""
    aux_indices_NA: Tensor | None = None


class ForwardOutput(NamedTuple):
    sae_out_ND: Tensor
    acts_NK: Tensor
    indices_NK: Tensor
    fvu: Tensor
    """Σ‖x − x̂‖² / Σ‖x − x̄‖² over the batch."""
    mse: Tensor
    """Mean squared error per element."""
    l1: Tensor
    """Mean over tokens of Σ_i f_i (decoder rows have unit norm, so this is Σ_i f_i‖d_i‖)."""
    auxk_loss: Tensor
    """Σ‖e − ê‖² / Σ‖e − ē‖² for the residual e = x − x̂ rebuilt from dead latents (0 when unused)."""
    l0: Tensor
    """Mean number of non-zero latents per token."""
    l0_penalty: Tensor | None = None
    """jumprelu: L0 with the threshold's straight-through gradient (the training penalty)."""
    prefix_fvu: Tensor | None = None
    """matryoshka: FVU of each nested dictionary's reconstruction (only its latents, + b_dec), smallest first."""


class SparseAutoencoder(nn.Module):
    """x̂ = Σ_i f_i(x) d_i + b_dec, with f from relu / topk / batchtopk / jumprelu / matryoshka encoders.

    Inputs are the raw residual stream: the training-time normalisation (E‖x‖² = d_in) is
    folded into the weights when the SAE is saved.

    Thresholds: batchtopk and matryoshka hold one scalar `threshold` buffer (saved as `threshold`, shape []);
    jumprelu holds one per latent, trained as `log_threshold` and saved as `threshold` (shape [num_latents],
    = exp(log_threshold)), with acts = pre · (pre > threshold).
    """

    jumprelu_bandwidth: float = 0.05
    """jumprelu training: ε of the threshold's straight-through gradient (set by the trainer)."""

    def __init__(self, cfg: SaeConfig, device: str | torch.device = "cpu"):
        super().__init__()
        self.cfg = cfg
        d, n = cfg.d_in, cfg.num_latents
        self.W_enc = nn.Parameter(torch.zeros(n, d, device=device))
        self.b_enc = nn.Parameter(torch.zeros(n, device=device))
        self.W_dec = nn.Parameter(torch.zeros(n, d, device=device))
        self.b_dec = nn.Parameter(torch.zeros(d, device=device))
        if cfg.arch == "jumprelu":
            self.log_threshold = nn.Parameter(torch.zeros(n, device=device))
        else:
            # BatchTopK at inference: latents fire above this activation (set from training batches).
            self.register_buffer("threshold", torch.zeros((), device=device))
        self.encoder_dtype = torch.float32

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Random unit-norm decoder rows; encoder = decoder transposed (tied initialisation)."""
        with torch.no_grad():
            w = torch.randn(self.W_dec.shape, generator=generator, device="cpu").to(self.W_dec.device)
            self.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
            self.W_enc.copy_(self.W_dec * (0.1 if self.cfg.arch == "relu" else 1.0))
            self.b_enc.zero_()
            self.b_dec.zero_()
            if self.cfg.arch == "jumprelu":
                self.log_threshold.fill_(math.log(0.5))

    def latent_thresholds(self) -> Tensor:
        """Every latent's inference threshold, shape [num_latents] (zeros for relu and topk)."""
        if self.cfg.arch == "jumprelu":
            return self.log_threshold.detach().exp()
        value = self.threshold.detach() if self.cfg.arch in BATCH_THRESHOLD_ARCHS else 0.0
        return torch.zeros(self.cfg.num_latents, device=self.W_enc.device) + value

    def _encoder_input(self, x_ND: Tensor) -> Tensor:
        x = x_ND.float()
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    # -- encode / decode -------------------------------------------------------------------
    def encode(self, x_ND: Tensor, dead_mask_F: Tensor | None = None, k_aux: int = 0) -> EncoderOutput:
        """Sparse latents of a batch: `sparse_width` (value, index) slots per token."""
        cfg = self.cfg
        x_in = self._encoder_input(x_ND)
        if cfg.arch in ("relu", "jumprelu"):
            pre_NF = F.linear(x_in, self.W_enc, self.b_enc)
            if cfg.arch == "relu":
                acts_NF = F.relu(pre_NF)
            else:
                acts_NF = pre_NF * (pre_NF > self.log_threshold.exp())
            vals, idx = acts_NF.topk(cfg.sparse_width, dim=-1, sorted=False)
            return EncoderOutput(vals, idx)
        batch_threshold = cfg.arch in BATCH_THRESHOLD_ARCHS
        width = cfg.k if cfg.arch == "topk" else cfg.sparse_width
        # BatchTopK needs its slots sorted so that the active ones form a prefix
        vals, idx, aux_vals, aux_idx = SparseEncode.apply(
            x_in, self.W_enc, self.b_enc, width, self.encoder_dtype, dead_mask_F, k_aux, batch_threshold)
        if batch_threshold:
            vals = vals * self._batchtopk_mask(vals)
            # slots are sorted, so active ones are a prefix: drop the columns no token uses
            width = max(1, int((vals > 0).sum(-1).max()))
            vals, idx = vals[:, :width], idx[:, :width]
        return EncoderOutput(vals, idx, aux_vals, aux_idx)

    def _batchtopk_mask(self, vals_NK: Tensor) -> Tensor:
        if not self.training:
            return (vals_NK > self.threshold).to(vals_NK.dtype)
        n_keep = min(self.cfg.k * vals_NK.shape[0], vals_NK.numel())
        flat = vals_NK.detach().flatten()
        kth = flat.topk(n_keep, sorted=False).values.min()
        return (vals_NK >= kth).to(vals_NK.dtype) * (vals_NK > 0)

    def decode(self, acts_NK: Tensor, indices_NK: Tensor) -> Tensor:
        return SparseDecode.apply(acts_NK, indices_NK, self.W_dec) + self.b_dec

    def encode_dense(self, x_ND: Tensor) -> Tensor:
        """All latents as a dense [N, num_latents] tensor (for analysis, not training)."""
        enc = self.encode(x_ND)
        return torch.zeros(x_ND.shape[0], self.cfg.num_latents, device=x_ND.device).scatter_(1, enc.indices_NK, enc.acts_NK)

    def forward(self, x_ND: Tensor, dead_mask_F: Tensor | None = None, k_aux: int = 0) -> ForwardOutput:
        x = x_ND.float()
        l0_penalty = prefix_fvu = None
        total_var = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
        if self.cfg.arch in ("relu", "jumprelu"):
            # Dense by nature: with encoder_dtype bf16 every matmul runs in bf16 (weights stay fp32).
            bf16 = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.encoder_dtype == torch.bfloat16)
            with bf16:
                pre_NF = F.linear(self._encoder_input(x), self.W_enc, self.b_enc)
            if self.cfg.arch == "relu":
                acts_NF = F.relu(pre_NF.float())
            else:
                theta_F = self.log_threshold.exp()
                acts_NF = JumpReLU.apply(pre_NF.float(), theta_F, self.jumprelu_bandwidth)
                l0_penalty = JumpStep.apply(pre_NF.float(), theta_F, self.jumprelu_bandwidth).sum(-1).mean()
            with bf16:
                sae_out = F.linear(acts_NF, self.W_dec.t()) + self.b_dec
            acts_NF, sae_out = acts_NF.float(), sae_out.float()
            l1 = acts_NF.sum(-1).mean()
            l0 = (acts_NF > 0).float().sum(-1).mean()
            vals, idx = acts_NF.detach().topk(self.cfg.sparse_width, dim=-1, sorted=False)
            auxk = sae_out.new_zeros(())
        else:
            enc = self.encode(x, dead_mask_F, k_aux)
            vals, idx = enc.acts_NK, enc.indices_NK
            sae_out = self.decode(vals, idx)
            l1 = vals.sum(-1).mean()
            l0 = (vals > 0).float().sum(-1).mean()
            auxk = self._auxk_loss(x, sae_out, enc)
            if self.cfg.arch == "matryoshka":
                prefix_fvu = self._prefix_fvu(x, vals, idx, total_var)
        residual = x - sae_out
        fvu = residual.pow(2).sum() / total_var
        mse = residual.pow(2).mean()
        return ForwardOutput(sae_out, vals, idx, fvu, mse, l1, auxk, l0, l0_penalty, prefix_fvu)

    def _prefix_fvu(self, x_ND: Tensor, vals_NK: Tensor, idx_NK: Tensor, total_var: Tensor) -> Tensor:
        """FVU of each nested dictionary: x rebuilt from the latents with id < its size only (+ b_dec).

        One embedding_bag over the active slots, bagged by (token, group), gives each group's contribution;
        their running sum over groups is the prefixes' reconstructions (one decode's work, not one per prefix).
        """
        sizes = torch.tensor(self.cfg.prefix_sizes, device=idx_NK.device)
        n, groups = x_ND.shape[0], len(sizes)
        active = vals_NK > 0
        token = torch.arange(n, device=idx_NK.device)[:, None].expand_as(idx_NK)[active]
        latent = idx_NK[active]
        bag = token * groups + torch.bucketize(latent, sizes, right=True)  # group g: sizes[g-1] <= id < sizes[g]
        order = bag.argsort()
        offsets = torch.bincount(bag, minlength=n * groups).cumsum(0).roll(1)
        offsets[0] = 0
        contrib_NGD = F.embedding_bag(latent[order], self.W_dec, offsets, mode="sum",
                                      per_sample_weights=vals_NK[active][order]).view(n, groups, -1)
        x_hat_NGD = contrib_NGD.cumsum(1) + self.b_dec
        return (x_ND[:, None] - x_hat_NGD).pow(2).sum((0, 2)) / total_var

    def _auxk_loss(self, x: Tensor, sae_out: Tensor, enc: EncoderOutput) -> Tensor:
        if enc.aux_acts_NA is None:
            return sae_out.new_zeros(())
        e = (x - sae_out).detach()
        e_hat = SparseDecode.apply(enc.aux_acts_NA, enc.aux_indices_NA, self.W_dec)
        return (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum().clamp_min(1e-12)

    # -- constraints -----------------------------------------------------------------------
    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(-1, keepdim=True)
        self.W_dec.grad.sub_(parallel * self.W_dec)

    # -- artifacts -------------------------------------------------------------------------
    def save(self, directory: Path, input_scale: float = 1.0, extra: dict | None = None) -> None:
        """Write cfg.json + sae.safetensors atomically, folding the input scale into the weights.

        Trained on x·s, the SAE becomes one on x: W_enc·s, b_dec/s, W_dec/s (rows then have norm 1/s).
        """
        s = float(input_scale)
        tensors = {
            "W_enc": (self.W_enc.detach() * s).contiguous().cpu(),
            "b_enc": self.b_enc.detach().contiguous().cpu(),
            "W_dec": (self.W_dec.detach() / s).contiguous().cpu(),
            "b_dec": (self.b_dec.detach() / s).contiguous().cpu(),
            # pre-activations do not change when the scale is folded in, so neither do thresholds
            "threshold": (self.latent_thresholds() if self.cfg.arch == "jumprelu"
                          else self.threshold.detach().reshape(())).contiguous().cpu(),
        }
        meta = {**asdict(self.cfg), **(extra or {}), "input_scale_folded": s}
        with atomic_path(Path(directory)) as tmp:
            tmp.mkdir()
            save_file(tensors, str(tmp / "sae.safetensors"))
            (tmp / "cfg.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
        """Load cfg.json + sae.safetensors; unknown cfg keys are ignored."""
        directory = Path(directory)
        if fmt := foreign_format(directory):
            raise ConfigError(f"{directory}: a {fmt} SAE, not a faithlens one; import it first: "
                              f"faithlens sae import {directory} --out DIR, then pass DIR")
        if not (directory / "cfg.json").is_file() or not (directory / "sae.safetensors").is_file():
            raise ConfigError(f"{directory}: not an SAE folder (expected cfg.json and sae.safetensors)")
        meta = read_json(directory / "cfg.json")
        if not isinstance(meta, dict) or "d_in" not in meta:
            raise ConfigError(f"{directory / 'cfg.json'}: expected a JSON object of the SAE's config (with d_in)")
        known = {f.name for f in fields(SaeConfig)}
        try:
            sae = cls(SaeConfig(**{k: v for k, v in meta.items() if k in known}), device=device)
        except ConfigError as e:
            raise ConfigError(f"{directory / 'cfg.json'}: {e}") from None
        state = load_safetensors(directory / "sae.safetensors", device=str(device))
        if sae.cfg.arch == "jumprelu":
            threshold = state.pop("threshold", None)
            if threshold is None or threshold.shape != (sae.cfg.num_latents,):
                got = "none" if threshold is None else list(threshold.shape)
                raise ConfigError(f"{directory / 'sae.safetensors'}: a jumprelu SAE needs threshold of shape "
                                  f"[{sae.cfg.num_latents}], got {got}")
            # acts = pre · (pre > threshold) with a threshold below 0 would pass negative pre-activations;
            # SAELens applies a ReLU first, which is a threshold of 0
            state["log_threshold"] = threshold.float().clamp_min(0).log()
        try:
            sae.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shapes that disagree with cfg.json
            problem = " ".join(str(e).split())[:300]
            raise ConfigError(f"{directory / 'sae.safetensors'}: weights do not match cfg.json ({problem})") from None
        sae.meta = meta
        return sae.eval().requires_grad_(False)


def foreign_format(directory: Path) -> str | None:
    """"saelens" or "sparsify" for an SAE folder another library saved (`faithlens sae import` reads it), else None.

    A sparsify hookpoint folder has our file names (cfg.json + sae.safetensors); its cfg.json has no `arch`.
    A sparsify run folder holds one such folder per hookpoint.
    """
    directory = Path(directory)
    if (directory / SAELENS_WEIGHTS).is_file():
        return "saelens"
    candidates = [directory, *(sorted(directory.iterdir()) if directory.is_dir() else [])]
    for folder in candidates:
        if (folder / SPARSIFY_WEIGHTS).is_file() and (folder / "cfg.json").is_file():
            try:
                cfg = json.loads((folder / "cfg.json").read_text())
            except (OSError, ValueError):
                continue
            if isinstance(cfg, dict) and "arch" not in cfg and ("activation" in cfg or "expansion_factor" in cfg):
                return "sparsify"
    return None
