"""Distillation losses. All return per-position values in nats, shape [N].

The cache keeps the teacher's top-k log-probs and the log of the remaining mass. From them,
`kl_topk` computes the KL between the two distributions coarse-grained to k + 1 outcomes (the k
tokens, and "any other token"). By the data-processing inequality it is a lower bound on the
full KL; it equals it when the student matches the teacher's shape inside the rest. Its gradient
pushes the student's rest mass to the teacher's but leaves the shape within it free. `kl_full` is
the exact KL over the full vocabulary (used for evaluation); `kl_exact` is the same value from the
teacher's logits with a fused backward, the loss of `--teacher online`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def kl_full(teacher_logp_NV: Tensor, student_logits_NV: Tensor) -> Tensor:
    """KL(p_teacher ‖ p_student) = Σ_v p_t(v) (log p_t(v) − log p_s(v))."""
    student_logp = student_logits_NV.float().log_softmax(-1)
    teacher_logp = teacher_logp_NV.float()
    return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)


class _ExactKL(torch.autograd.Function):
    """KL(softmax(t) ‖ softmax(s)) over the full vocabulary; ∂KL/∂s = q − p, formed in place.

    Autograd through two log_softmaxes keeps about five [N, V] fp32 buffers; this keeps two (p and q).
    """

    @staticmethod
    def forward(ctx, logits_NV, teacher_logits_NV):
        s = logits_NV.float()
        log_q = s - s.logsumexp(-1, keepdim=True)
        t = teacher_logits_NV.float()
        log_p = t - t.logsumexp(-1, keepdim=True)
        p = log_p.exp()
        kl = (p * (log_p - log_q)).sum(-1)
        ctx.save_for_backward(log_q.exp_(), p)  # log_q becomes q in place
        ctx.logits_dtype = logits_NV.dtype
        return kl

    @staticmethod
    def backward(ctx, grad_N):
        q, p = ctx.saved_tensors
        return q.sub_(p).mul_(grad_N[:, None]).to(ctx.logits_dtype), None


def kl_exact(teacher_logits_NV: Tensor, student_logits_NV: Tensor) -> Tensor:
    """KL(p_teacher ‖ p_student) from both sides' logits (the teacher's are constants: no gradient)."""
    return _ExactKL.apply(student_logits_NV, teacher_logits_NV.detach())


class _TopkKL(torch.autograd.Function):
    """Binned KL with a hand-written backward: two passes over the [N, V] logits instead of ~eight.

    With q = softmax(s), Q_r = Σ_{v ∉ top} q_v and P_r the teacher's rest mass, the gradient is
    ∂KL/∂s_v = q_v − p_v on the teacher's top-k tokens and q_v·(1 − P_r/Q_r) elsewhere.
    Q_r is summed over the tail itself, never taken as 1 − Σ_top q: a confident student puts less
    than fp32's resolution of 1 outside the top k, where the difference is rounding noise and P_r/Q_r
    explodes. Rows whose tail underflows fp32 altogether get log Q_r from a masked logsumexp.
    """

    @staticmethod
    def forward(ctx, logits_NV, ids_NK, logp_NK, rest_logmass_N):
        s = logits_NV.float()
        log_z = s.logsumexp(-1)
        log_q_top = s.gather(-1, ids_NK) - log_z[:, None]
        q = (s - log_z[:, None]).exp_()
        q_top = q.gather(-1, ids_NK)
        q_rest = q.scatter_(-1, ids_NK, 0.0).sum(-1)  # zero the top k in place, sum the tail, then put them back
        q.scatter_(-1, ids_NK, q_top)
        log_q_rest = q_rest.log()
        tiny = (q_rest < 1e-30).nonzero().flatten()
        # rows whose tail underflows: log Q_r and the tail's own distribution q_v / Q_r from the logits
        tail_dist = s.new_zeros(0, s.shape[-1])
        if tiny.numel():
            rows = s[tiny].scatter(-1, ids_NK[tiny], float("-inf"))
            log_q_rest[tiny] = rows.logsumexp(-1) - log_z[tiny]
            tail_dist = rows.softmax(-1)
        p_top = logp_NK.exp()
        top_term = (p_top * (logp_NK - log_q_top)).sum(-1)
        rest_term = torch.where(rest_logmass_N > -80, rest_logmass_N.exp() * (rest_logmass_N - log_q_rest), 0.0)
        ctx.save_for_backward(q, q_top, log_q_rest, p_top, ids_NK, rest_logmass_N, tiny, tail_dist)
        ctx.logits_dtype = logits_NV.dtype
        return top_term + rest_term

    @staticmethod
    def backward(ctx, grad_N):
        q, q_top, log_q_rest, p_top, ids, rest_logmass, tiny, tail_dist = ctx.saved_tensors
        p_rest = torch.where(rest_logmass > -80, rest_logmass.exp(), 0.0)
        rest_scale = torch.where(p_rest > 0, 1 - (rest_logmass - log_q_rest).exp(), 1.0)
        rest_scale[tiny] = 1.0  # their tail term q_v − P_r·q_v/Q_r is formed from tail_dist below
        grad = q.mul_(rest_scale[:, None])  # q is not needed afterwards: reuse its memory
        if tiny.numel():
            grad[tiny] -= p_rest[tiny, None] * tail_dist
        grad.scatter_(-1, ids, q_top - p_top)
        return grad.mul_(grad_N[:, None]).to(ctx.logits_dtype), None, None, None


def kl_topk(topk_ids_NK: Tensor, topk_logp_NK: Tensor, rest_logmass_N: Tensor, student_logits_NV: Tensor) -> Tensor:
    """KL over the k teacher tokens plus one bin for the rest of the vocabulary."""
    return _TopkKL.apply(student_logits_NV, topk_ids_NK.long(), topk_logp_NK.float(), rest_logmass_N.float())


def kl_topk_reference(topk_ids_NK: Tensor, topk_logp_NK: Tensor, rest_logmass_N: Tensor, student_logits_NV: Tensor) -> Tensor:
    """The same quantity through autograd (for tests): stable log-space formulas throughout."""
    logits = student_logits_NV.float()
    log_z = logits.logsumexp(-1)
    ids = topk_ids_NK.long()
    student_top = logits.gather(-1, ids) - log_z[:, None]
    student_rest = logits.scatter(-1, ids, float("-inf")).logsumexp(-1) - log_z
    p_top = topk_logp_NK.float().exp()
    top_term = (p_top * (topk_logp_NK.float() - student_top)).sum(-1)
    rest_logmass = rest_logmass_N.float()
    rest_term = torch.where(rest_logmass > -80, rest_logmass.exp() * (rest_logmass - student_rest), 0.0)
    return top_term + rest_term


def ce_argmax(topk_ids_NK: Tensor, student_logits_NV: Tensor) -> Tensor:
    """Cross-entropy to the teacher's most likely token (top-k slots are sorted, slot 0 is the argmax)."""
    return F.cross_entropy(student_logits_NV.float(), topk_ids_NK[:, 0].long(), reduction="none")
