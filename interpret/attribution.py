"""Attribution patching of SAE features, through the decoder and through the SAE-spliced frozen model.

attribution(feature f at position s) = a_{s,f} · ∂J/∂a_{s,f}: the first-order estimate of what zeroing
that activation does to the objective J. J is, per scored position t, the log-prob (or logit) of a target
token, or minus KL(p_frozen ‖ p). Position 0 (BOS) is never attributed: the SAE does not model it.

- Through the decoder, J is read from the decoder's logits. For a decoder whose logits are linear in
  the features (the linear decoder, target = logit), the attribution equals exact ablation.
- Through the spliced model, layer L's residual is replaced by SAE(h) + (h − SAE(h)): the same
  activations (so the model's output is unchanged), but the path from each latent to the output runs
  through the frozen upper blocks. The error term is held fixed.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

from interpret.components import Components

Target = Literal["logprob", "logit", "kl"]


def objective(logits_BTV: Tensor, targets_BT: Tensor, kind: Target, teacher_logp_BTV: Tensor | None = None) -> Tensor:
    """J per position [B, T]."""
    logits = logits_BTV.float()
    if kind == "logit":
        return logits.gather(-1, targets_BT[..., None])[..., 0]
    logp = logits.log_softmax(-1)
    if kind == "logprob":
        return logp.gather(-1, targets_BT[..., None])[..., 0]
    if teacher_logp_BTV is None:
        raise ValueError("objective kl needs the frozen model's log-probs")
    p = teacher_logp_BTV.float().exp()
    return -(p * (teacher_logp_BTV.float() - logp)).sum(-1)


def ablate(indices_BTK: Tensor, values_BTK: Tensor, feature_ids: Tensor | list[int], keep: bool = False) -> Tensor:
    """Values with the given features zeroed (or, with keep, every other feature zeroed)."""
    ids = torch.as_tensor(feature_ids, dtype=indices_BTK.dtype)
    hit = torch.isin(indices_BTK, ids)
    return values_BTK * (hit if keep else ~hit).to(values_BTK.dtype)


def _scored_mask(values_BTK: Tensor) -> Tensor:
    mask = torch.ones_like(values_BTK)
    mask[:, 0] = 0  # BOS
    return mask


def decoder_attribution(comp: Components, indices_BTK: Tensor, values_BTK: Tensor, targets_BT: Tensor,
                        weight_BT: Tensor, kind: Target = "logprob", teacher_logp_BTV: Tensor | None = None
                        ) -> tuple[Tensor, Tensor]:
    """(J_BT, attr_BTK) for the objective Σ_t weight_t · J_t through the decoder."""
    values = values_BTK.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        J = objective(comp.decoder_logits(indices_BTK, values), targets_BT, kind, teacher_logp_BTV)
        (J * weight_BT).sum().backward()
    return J.detach(), (values.detach() * values.grad) * _scored_mask(values_BTK)


def prediction_top_shares(decoder, indices_BTK: Tensor, values_BTK: Tensor, positions: list[tuple[int, int]],
                          k: int = 10) -> list[float]:
    """Top-k share of |attribution| of each prediction (b, t): the decoder's argmax at t, attributed to every
    feature slot it reads (objective log p(argmax), gradient × activation; BOS excluded), one backward each."""
    shares = []
    F_ = decoder.cfg.num_latents
    for b, t in positions:
        first = 0 if decoder.needs_context else t  # a per-position decoder reads position t only
        idx = indices_BTK[b : b + 1, first : t + 1]
        values = values_BTK[b : b + 1, first : t + 1].detach().float().clone().requires_grad_(True)
        with torch.enable_grad():
            logp = decoder.last_logits(idx, values)[0].float().log_softmax(-1)
            (grad,) = torch.autograd.grad(logp[logp.argmax()], values)  # the decoder's own .grad stays untouched
        attr = values.detach() * grad
        if first == 0:
            attr[:, 0] = 0  # BOS
        shares.append(top_share(per_feature(idx, attr, F_), k))
    return shares


def spliced_forward(comp: Components, ids_BT: Tensor, h_BTD: Tensor, indices_BTK: Tensor, values_BTK: Tensor,
                    error_BTD: Tensor) -> Tensor:
    """Frozen logits with layer L set to SAE-decode(values) + error (BOS kept as is); differentiable in values."""
    B, T, D = h_BTD.shape
    x_hat = comp.sae.decode(values_BTK.reshape(B * T, -1), indices_BTK.reshape(B * T, -1)).view(B, T, D)
    new_h = x_hat + error_BTD

    def patch(r: Tensor) -> Tensor:
        return torch.cat([r[:, :1], new_h[:, 1:].to(r.dtype)], 1)

    with comp.frozen.hooks(write={comp.layer: patch}):
        return comp.frozen.model(input_ids=ids_BT.to(comp.frozen.device), use_cache=False).logits.float()


def spliced_error(comp: Components, h_BTD: Tensor, indices_BTK: Tensor, values_BTK: Tensor) -> Tensor:
    B, T, D = h_BTD.shape
    with torch.no_grad():
        x_hat = comp.sae.decode(values_BTK.reshape(B * T, -1), indices_BTK.reshape(B * T, -1)).view(B, T, D)
    return h_BTD - x_hat


def spliced_attribution(comp: Components, ids_BT: Tensor, h_BTD: Tensor, indices_BTK: Tensor, values_BTK: Tensor,
                        targets_BT: Tensor, weight_BT: Tensor, kind: Target = "logprob",
                        teacher_logp_BTV: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(J_BT, attr_BTK) through the frozen upper blocks."""
    error = spliced_error(comp, h_BTD, indices_BTK, values_BTK)
    values = values_BTK.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        J = objective(spliced_forward(comp, ids_BT, h_BTD, indices_BTK, values, error), targets_BT, kind, teacher_logp_BTV)
        (J * weight_BT).sum().backward()
    return J.detach(), (values.detach() * values.grad) * _scored_mask(values_BTK)


def per_feature(indices_BTK: Tensor, attr_BTK: Tensor, num_latents: int) -> Tensor:
    """Attribution summed per feature id over positions and slots [F]."""
    return torch.zeros(num_latents, dtype=torch.float64).index_add_(0, indices_BTK.flatten().long(),
                                                                  attr_BTK.flatten().double())


def top_share(attr_F: Tensor, k: int = 10) -> float:
    """Share of total |attribution| carried by the k features with the largest |attribution|."""
    a = attr_F.abs()
    total = a.sum().item()
    return float(a.topk(min(k, a.numel())).values.sum().item() / total) if total > 0 else 0.0


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if len(x) < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    return float(spearmanr(x, y).statistic)
