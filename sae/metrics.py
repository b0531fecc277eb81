"""SAE quality metrics on held-out tokens (definitions in docs/concepts.md, "Metric definitions"), and `faithlens sae eval`.

BOS positions are excluded everywhere: they are an attention sink whose residual the SAE does
not model, and splicing leaves them untouched.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
import tyro

from corpus.config import CorpusConfig, Split
from corpus.packing import sequences
from models.config import ModelConfig
from models.frozen import FrozenLM
from models.io import write_json_atomic
from models.loading import load_frozen
from models.progress import progress_bar
from sae.model import SparseAutoencoder
from training.layout import resolve_sae_dir

log = logging.getLogger(__name__)

DEAD_MIN_FIRES = 10
"""The dead-window rule. A latent of firing density p shows no activation in N tokens with probability e^(−pN).
The rarest live latent in the window fired c times (density ≈ c/N); once N ≥ DEAD_MIN_FIRES/p, i.e. c ≥ 10, a
live latent that rare would go unseen with probability < e^(−10) ≈ 5·10⁻⁵, so the dead count holds no live
latents of the densities the window has shown. With c < 10 the window is too short: latents as rare as the
rarest live one may be counted dead by chance, and the dead fraction is an upper bound."""

DUPLICATE_COSINE = 0.9
"""Two latents are duplicates when their decoder directions have cosine above this (the design's "no obvious
duplicates, < 5% semantic overlap")."""

L0_BINS = [0, 1, 8, 16, 32, 48, 64, 80, 96, 128, 192, 256, 512, 1024, 1 << 30]
DENSITY_BINS = [-math.inf, -7, -6, -5, -4, -3, -2, -1, 0.01]  # log10 firing frequency


class SaeStats:
    """Running sums from which every reconstruction and sparsity metric is computed."""

    def __init__(self, num_latents: int, d_in: int):
        self.n = 0
        self.sq_err = 0.0
        self.sum_x = torch.zeros(d_in, dtype=torch.float64)
        self.sum_sq_x = 0.0
        self.fire_counts = torch.zeros(num_latents, dtype=torch.int64)
        self.l0_counts = torch.zeros(len(L0_BINS) - 1, dtype=torch.int64)
        self.l0_sum = 0
        self._pairs: list[torch.Tensor] = []
        self._mass: list[torch.Tensor] = []

    def update_tokens(self, token_ids_N: torch.Tensor, acts_NK: torch.Tensor, idx_NK: torch.Tensor) -> None:
        """Accumulate activation mass per (latent, input token), for the token-purity proxy."""
        active = acts_NK > 0
        tokens = token_ids_N[:, None].expand_as(idx_NK)[active].long()
        self._pairs.append((idx_NK[active].long() << 32) | tokens)
        self._mass.append(acts_NK[active].double())

    def token_purity(self) -> float:
        """Mean over live latents of (activation mass on its most frequent input token) / (its total mass).

        An automatic interpretability proxy: 1 means a latent fires on one token only.
        """
        if not self._pairs:
            return float("nan")
        keys, inverse = torch.unique(torch.cat(self._pairs), return_inverse=True)
        mass = torch.zeros(len(keys), dtype=torch.float64).index_add_(0, inverse, torch.cat(self._mass))
        latent = keys >> 32
        total = torch.zeros(len(self.fire_counts), dtype=torch.float64).index_add_(0, latent, mass)
        best = torch.zeros(len(self.fire_counts), dtype=torch.float64).scatter_reduce_(0, latent, mass, "amax")
        live = total > 0
        return (best[live] / total[live]).mean().item()

    def update(self, x_ND: torch.Tensor, x_hat_ND: torch.Tensor, acts_NK: torch.Tensor, idx_NK: torch.Tensor) -> None:
        x, x_hat = x_ND.double(), x_hat_ND.double()
        self.n += x.shape[0]
        self.sq_err += (x - x_hat).pow(2).sum().item()
        self.sum_x += x.sum(0)
        self.sum_sq_x += x.pow(2).sum().item()
        active = acts_NK > 0
        self.fire_counts.index_add_(0, idx_NK[active], torch.ones(int(active.sum()), dtype=torch.int64))
        l0 = active.sum(-1)
        self.l0_sum += int(l0.sum())
        self.l0_counts += torch.histogram(l0.double(), torch.tensor(L0_BINS, dtype=torch.float64)).hist.long()

    def dead_window(self) -> dict:
        """The dead fraction, its window and whether the window is long enough for it (`DEAD_MIN_FIRES`)."""
        live_counts = self.fire_counts[self.fire_counts > 0]
        rarest = int(live_counts.min()) if live_counts.numel() else 0
        return {
            "dead_frac": (self.fire_counts == 0).double().mean().item(),
            "dead_window_tokens": self.n,
            # a latent with no activation in N tokens has density < 3/N at 95% confidence (e^-3 ≈ 0.05)
            "dead_density_bound": 3 / self.n,
            "rarest_live_fires": rarest,
            "dead_window_needed": math.ceil(DEAD_MIN_FIRES * self.n / rarest) if rarest else None,
            "dead_window_short": 0 < rarest < DEAD_MIN_FIRES,
        }

    def metrics(self) -> dict:
        total_var = self.sum_sq_x - self.sum_x.pow(2).sum().item() / self.n  # Σ‖x − x̄‖²
        fvu = self.sq_err / total_var
        density = self.fire_counts.double() / self.n
        p = self.fire_counts.double() / max(1, int(self.fire_counts.sum()))
        entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
        log_density = torch.where(density > 0, density.log10(), torch.full_like(density, -math.inf))
        hist = np.histogram(log_density.clamp_min(-100).numpy(), bins=[-101] + DENSITY_BINS[1:])[0]
        return {
            "tokens": self.n,
            "fvu": fvu,
            "explained_variance": 1 - fvu,
            "mse_normalized": self.sq_err / self.sum_sq_x,  # MSE of x·s with s² = N·d_in / Σ‖x‖²
            "l0": self.l0_sum / self.n,
            "l0_histogram": {"bins": L0_BINS, "counts": self.l0_counts.tolist()},
            **self.dead_window(),
            "density_histogram": {"log10_bins": ["never"] + DENSITY_BINS[1:], "counts": hist.tolist()},
            "usage_entropy_nats": entropy,
            "usage_entropy_normalized": entropy / math.log(len(p)),
            "token_purity": self.token_purity(),
        }


@torch.no_grad()
def duplicate_share(W_dec_FD: torch.Tensor, live_F: torch.Tensor | None = None, cosine: float = DUPLICATE_COSINE,
                    chunk: int = 1024) -> dict:
    """The share of (live) latents whose decoder direction has cosine > `cosine` with another (live) latent's.

    Computed in row chunks of the F x F cosine matrix, so memory stays chunk x F (5,760 x 576: ~0.1 s).
    Also returns the largest cosine per latent summarised as its mean.
    """
    W = W_dec_FD.detach().float()
    if live_F is not None:
        W = W[live_F.to(W.device)]
    n = W.shape[0]
    if n < 2:
        return {"duplicate_frac": 0.0, "duplicate_latents": 0, "duplicate_pool": n, "max_cosine_mean": float("nan")}
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    max_cos = torch.empty(n)
    for s in range(0, n, chunk):
        sims = W[s : s + chunk] @ W.T
        rows = torch.arange(sims.shape[0])
        sims[rows, rows + s] = -math.inf  # a latent is not its own duplicate
        max_cos[s : s + chunk] = sims.max(dim=1).values.cpu()
    dup = int((max_cos > cosine).sum())
    return {"duplicate_frac": dup / n, "duplicate_latents": dup, "duplicate_pool": n,
            "max_cosine_mean": max_cos.mean().item()}


@dataclass
class SaeEvalConfig(CorpusConfig, ModelConfig):
    sae: Annotated[Path, tyro.conf.Positional] = Path("runs/sae/sae")
    """SAE folder (cfg.json + sae.safetensors), or a run folder holding sae/."""

    layer: int = -1
    """Layer the SAE reads; -1 = the layer recorded in its cfg.json."""

    tokens: int = 32_768
    """Held-out token positions to evaluate on."""

    split: Split = "eval"
    """Split of --data to read: eval (its held-out hash split), all (the whole of --data: a file held out for
    evaluation), train, or ood (the --ood sources)."""

    batch_size: int = 8
    """Sequences per forward pass."""

    splice: bool = True
    """Also run the frozen model with the reconstruction spliced in (KL, ΔCE, CE recovered)."""

    json: bool = False
    """Print one JSON object instead of the table."""

    out: Path | None = None
    """Optional JSON file for the metrics."""


@torch.inference_mode()
def evaluate_sae(sae: SparseAutoencoder, frozen: FrozenLM, cfg: SaeEvalConfig, layer: int, progress: bool = True) -> dict:
    frozen.check_layer(layer)
    stats = SaeStats(sae.cfg.num_latents, sae.cfg.d_in)
    sums = {"kl": 0.0, "ce_clean": 0.0, "ce_spliced": 0.0, "ce_zero": 0.0}
    n_pred = 0
    seqs = list(sequences(cfg, frozen.tokenizer, frozen.bos_token_id, frozen.eos_token_id, frozen))
    for start in progress_bar(range(0, len(seqs), cfg.batch_size), desc="sae eval", unit="batch", disable=not progress):
        batch = seqs[start : start + cfg.batch_size]
        ids = torch.from_numpy(np.stack([p.tokens for p in batch]))
        labels = torch.from_numpy(np.stack([p.next_ids for p in batch]))[:, 1:].reshape(-1)
        if cfg.splice:
            logits, store = frozen.forward(ids, [layer])
        else:
            logits, store = None, frozen.residuals(ids, [layer])
        h = store[layer]
        x = h[:, 1:].reshape(-1, h.shape[-1]).float()
        enc = sae.encode(x)
        x_hat = sae.decode(enc.acts_NK, enc.indices_NK)
        stats.update(x, x_hat, enc.acts_NK, enc.indices_NK)
        stats.update_tokens(ids[:, 1:].reshape(-1), enc.acts_NK, enc.indices_NK)
        if not cfg.splice:
            continue
        x_hat_BTD = x_hat.reshape(h.shape[0], -1, h.shape[-1])
        spliced, _ = frozen.forward(ids, write={layer: lambda r: torch.cat([r[:, :1], x_hat_BTD.to(r.dtype)], 1)})
        zeroed, _ = frozen.forward(ids, write={layer: lambda r: torch.cat([r[:, :1], torch.zeros_like(r[:, 1:])], 1)})
        logp = logits[:, 1:].float().log_softmax(-1).flatten(0, 1)
        logp_s = spliced[:, 1:].float().log_softmax(-1).flatten(0, 1)
        logp_z = zeroed[:, 1:].float().log_softmax(-1).flatten(0, 1)
        sums["kl"] += F.kl_div(logp_s, logp, log_target=True, reduction="sum").item()
        sums["ce_clean"] += F.nll_loss(logp, labels, reduction="sum").item()
        sums["ce_spliced"] += F.nll_loss(logp_s, labels, reduction="sum").item()
        sums["ce_zero"] += F.nll_loss(logp_z, labels, reduction="sum").item()
        n_pred += labels.numel()
    result = stats.metrics()
    result.update(duplicate_share(sae.W_dec, live_F=stats.fire_counts > 0))
    if cfg.splice:
        ce = {k: v / n_pred for k, v in sums.items()}
        result.update({
            "spliced_kl": ce["kl"], "delta_ce": ce["ce_spliced"] - ce["ce_clean"],
            "ce_recovered": (ce["ce_zero"] - ce["ce_spliced"]) / (ce["ce_zero"] - ce["ce_clean"]),
            "ce_clean": ce["ce_clean"], "ce_spliced": ce["ce_spliced"], "ce_zero": ce["ce_zero"],
        })
    result.update({"layer": layer, "arch": sae.cfg.arch, "num_latents": sae.cfg.num_latents, "k": sae.cfg.k,
                   "data": cfg.data if cfg.split != "ood" else cfg.ood, "split": cfg.split})
    return result


ROWS = [("fvu", "FVU", "{:.4f}", ""), ("explained_variance", "explained variance", "{:.4f}", ""),
        ("mse_normalized", "MSE (normalised, E‖x‖²=d_in)", "{:.4f}", "per element"),
        ("l0", "L0", "{:.1f}", "latents/token"), ("dead_frac", "dead", "{:.2%}", "of latents (window below)"),
        ("usage_entropy_normalized", "usage entropy", "{:.3f}", "÷ log(latents)"),
        ("token_purity", "token purity", "{:.3f}", "mass on a latent's top input token"),
        ("duplicate_frac", "duplicates", "{:.2%}", f"of live latents: decoder cosine > {DUPLICATE_COSINE} with another"),
        ("spliced_kl", "spliced KL", "{:.4f}", "nats/token"), ("delta_ce", "ΔCE", "{:.4f}", "nats/token"),
        ("ce_recovered", "CE recovered", "{:.2%}", "vs zero-ablation")]


def metrics_table(result: dict) -> str:
    lines = [f"SAE {result['arch']} ({result['num_latents']} latents, k={result['k']}) at layer {result['layer']}, "
             f"{result['tokens']:,} tokens of {result['data']} (split: {result['split']})", "",
             "| metric | value | unit |", "|---|---:|---|"]
    for key, name, fmt, unit in ROWS:
        if key in result:
            if key == "dead_frac" and "dead_density_bound" in result:
                unit = (f"of latents: no activation in {result['dead_window_tokens']:,} tokens "
                        f"(density < {result['dead_density_bound']:.1e} at 95%)")
            lines.append(f"| {name} | {fmt.format(result[key])} | {unit} |")
    warning = dead_window_warning(result)
    return "\n".join(lines + ([f"\nwarning: {warning}"] if warning else []))


def dead_window_warning(result: dict) -> str | None:
    """The warning printed with the dead fraction when its window is too short (`DEAD_MIN_FIRES`), else None."""
    if not result.get("dead_window_short"):
        return None
    return (f"the dead fraction over {result['dead_window_tokens']:,} tokens is an upper bound: the rarest live latent "
            f"fired {result['rarest_live_fires']} time(s) there, so latents as rare can show no activation by chance; "
            f"a window of ≥ {result['dead_window_needed']:,} tokens (where it would fire {DEAD_MIN_FIRES} times) "
            "separates rare from dead (--tokens, with --split all for a held-out file)")


def run_sae_eval(cfg: SaeEvalConfig, frozen: FrozenLM | None = None) -> dict:
    sae_dir = resolve_sae_dir(cfg.sae)
    sae = SparseAutoencoder.load(sae_dir)
    layer = cfg.layer if cfg.layer >= 0 else int(sae.meta.get("layer", -1))
    if layer < 0:
        from models.errors import ConfigError

        raise ConfigError(f"{sae_dir}/cfg.json records no layer; pass --layer")
    frozen = frozen or load_frozen(cfg)
    frozen.check_layer(layer, "--layer" if cfg.layer >= 0 else f"{sae_dir / 'cfg.json'}: layer")
    result = evaluate_sae(sae, frozen, cfg, layer, progress=not cfg.json)
    if cfg.out is not None:
        write_json_atomic(Path(cfg.out), result)
    if cfg.json:
        print(json.dumps(result))
        if warning := dead_window_warning(result):
            log.warning(warning)
    else:
        print(metrics_table(result))
        if cfg.out is not None:
            print(f"\nmetrics written to {cfg.out}")
    return result
