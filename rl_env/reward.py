"""The multi-objective reward and its phase schedules (docs/cli.md, "Reinforcement learning (PPO in RLlib)").

reward = α·r_faith + β·r_mono + γ·r_task, for a batch of sub-environment steps at once:
- r_faith = log p_frozen(a) (nats). With an entropy bonus of α its expectation is −α·KL(π ‖ p_frozen).
- r_mono = share of the chosen token's positive direct attribution carried by the top-m features,
  attribution_i = f_i · (d_i ⊙ g)·u_a (feature activation × SAE decoder direction through the frozen
  final-norm gain · the token's unembedding row; the norm's positive per-position scale cancels in
  the share). It depends on the action, so the policy can change it.
- r_task = 1 if the action equals the reference token (the data's next token, or the frozen argmax),
  or, in the generation environment, if the final answer is right (paid at the end).

r_mono reads the frozen SAE's directions, not the decoder, so the policy's one lever on it is which token it
samples. `policy_top_share` is the decoder's own counterpart, the quantity evaluation reports as top-10 share:
a deterministic function of the decoder's weights, which the learner differentiates directly (pathwise)
instead of through the score function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from models.decoder import second_order
from training.schedule import Phase, phase_index
from training.schedule import parse_phases as parse_schedule_phases

DEFAULT_PHASES = "2:0.5/0.3/0.2,6:0.4/0.3/0.3,2:0.3/0.2/0.5"
"""The original design's three phases: (α, β, γ) with step counts in the ratio 2:6:2."""


WEIGHT_NAMES = ("alpha", "beta", "gamma")


def parse_phases(text: str, flag: str = "--phases") -> list[Phase]:
    """'2:0.5/0.3/0.2,6:...' → phases whose fractions sum to 1 (RATIO:ALPHA/BETA/GAMMA, comma-separated)."""
    return parse_schedule_phases(text, flag, WEIGHT_NAMES)


@dataclass
class RewardSchedule:
    """Weights at a given env step, with the design's dynamic adjustments applied on top."""

    phases: list[Phase]
    total_steps: int
    anchor: tuple[float, ...] = ()
    """λ of the forward-KL anchor per phase (empty: off)."""
    alpha_scale: float = 1.0
    """Multiplies α; the trainer lowers it once held-out KL < the faithfulness target."""
    beta_scale: float = 1.0
    """Multiplies β; raised while explanations need too many features."""

    def weights(self, step: int) -> tuple[float, float, float]:
        alpha, beta, gamma = self.phases[self.phase_index(step)].values
        return alpha * self.alpha_scale, beta * self.beta_scale, gamma

    def anchor_weight(self, step: int) -> float:
        return self.anchor[self.phase_index(step)] if self.anchor else 0.0

    def phase_index(self, step: int) -> int:
        return phase_index(self.phases, step, self.total_steps)


def token_logp(actions_N: Tensor, topk_ids_NK: Tensor, topk_logp_NK: Tensor, rest_logmass_N: Tensor, vocab: int) -> Tensor:
    """log p_frozen(a) from top-k targets; a token outside the top k gets an equal share of the rest mass."""
    hit = topk_ids_NK.long() == actions_N.long()[:, None]
    inside = (topk_logp_NK.float() * hit).sum(-1)
    outside = rest_logmass_N.float() - torch.log(torch.tensor(float(vocab - topk_ids_NK.shape[-1])))
    return torch.where(hit.any(-1), inside, outside)


def direct_attribution(actions_N: Tensor, indices_NK: Tensor, values_NK: Tensor, W_dec_FD: Tensor,
                       norm_gain_D: Tensor, unembed_VD: Tensor) -> Tensor:
    """attribution[n, k] = values[n, k] · (W_dec[indices[n, k]] ⊙ g) · U[actions[n]]."""
    u_ND = unembed_VD[actions_N.long()].float() * norm_gain_D.float()
    rows_NKD = W_dec_FD[indices_NK.long()].float()
    return values_NK.float() * torch.einsum("nkd,nd->nk", rows_NKD, u_ND)


def mono_share(attr_NK: Tensor, top_m: int) -> tuple[Tensor, Tensor]:
    """(share of positive attribution in the top-m features, features needed for half of it), per step."""
    pos = attr_NK.clamp_min(0)
    total = pos.sum(-1)
    ranked = pos.sort(-1, descending=True).values
    top = ranked[:, :top_m].sum(-1)
    share = torch.where(total > 0, top / total.clamp_min(1e-12), torch.zeros_like(total))
    cum = ranked.cumsum(-1)
    needed = (cum < 0.5 * total[:, None]).sum(-1) + 1
    return share, torch.where(total > 0, needed, torch.zeros_like(needed)).float()


def policy_top_share(decoder, indices_BRK: Tensor, values_BRK: Tensor, lengths_B: Tensor, top: int = 10) -> Tensor:
    """Top-`top` share of |attribution| of each row's prediction [B], differentiable in the decoder's weights.

    The prediction is the decoder's argmax y at row length − 1; attribution is activation × gradient of log p(y)
    for every feature slot the decoder reads (a context decoder: rows 0..length − 1, BOS row excluded), summed
    per feature id; share = Σ of the `top` largest |sums| / Σ |sums|. One backward serves every row (rows are
    independent), with create_graph so that the share's own gradient reaches the weights. Equals
    `interpret.attribution.prediction_top_shares` at the same positions.
    """
    values = values_BRK.detach().float().requires_grad_(True)
    indices = indices_BRK.long()
    # the double backward needs attention's math kernel (CPU flash attention's backward has no derivative) and
    # feature sums by gather (EmbeddingBag's has none either)
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH), second_order():
        logp_BV = decoder.last_logits(indices, values, lengths_B).float().log_softmax(-1)
        target = logp_BV.detach().argmax(-1, keepdim=True)
        (grad,) = torch.autograd.grad(logp_BV.gather(1, target).sum(), values, create_graph=True)
    attr = values.detach() * grad
    if decoder.needs_context:
        attr = torch.cat([torch.zeros_like(attr[:, :1]), attr[:, 1:]], 1)  # BOS
    B, F_ = attr.shape[0], decoder.cfg.num_latents
    per_feature = attr.new_zeros(B, F_).scatter_add(1, indices.flatten(1), attr.flatten(1)).abs()
    total = per_feature.sum(-1)
    top_sum = per_feature.topk(min(top, F_), -1).values.sum(-1)
    return torch.where(total > 0, top_sum / total.clamp_min(1e-30), torch.zeros_like(total))
