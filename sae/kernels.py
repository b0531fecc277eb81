"""The SAE's custom autograd functions: sparse TopK encode / decode, and JumpReLU's straight-through step.

Sparse latents travel as fixed-width (values, indices) pairs; the backward passes only touch the selected
latents' rows of the weights, which is what makes CPU training fast.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

_CHUNK = 256  # tokens per chunk when gathering decoder rows in backward passes
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")



def _csr_t_matmul(indices_NK: Tensor, values_NK: Tensor, dense_ND: Tensor, n_rows: int) -> Tensor:
    """Σ_n Σ_j values[n, j] · dense[n] into row indices[n, j] of an [n_rows, D] result (zeros skipped)."""
    n = indices_NK.shape[0]
    nonzero = values_NK != 0
    counts = nonzero.sum(-1)
    crow = torch.zeros(n + 1, dtype=torch.int64, device=indices_NK.device)
    crow[1:] = counts.cumsum(0)
    g = torch.sparse_csr_tensor(crow, indices_NK[nonzero], values_NK[nonzero].to(dense_ND.dtype), (n, n_rows),
                                check_invariants=False)
    return g.t() @ dense_ND


def _gather_dot(weight_FD: Tensor, indices_NK: Tensor, grad_ND: Tensor) -> Tensor:
    """out[n, j] = weight[indices[n, j]] · grad[n], in chunks to bound memory."""
    out = torch.empty(indices_NK.shape, dtype=grad_ND.dtype, device=grad_ND.device)
    for s in range(0, indices_NK.shape[0], _CHUNK):
        rows = F.embedding(indices_NK[s : s + _CHUNK], weight_FD)  # [c, K, D]; index_select, faster than [] here
        out[s : s + _CHUNK] = torch.bmm(rows, grad_ND[s : s + _CHUNK, :, None]).squeeze(-1)
    return out


class SparseEncode(torch.autograd.Function):
    """relu(x Wᵀ + b) restricted to the top `width` latents per token (+ the AuxK dead latents).

    Forward does one dense matmul (optionally in bf16, for selection speed); backward only
    touches the selected latents.
    """

    @staticmethod
    def forward(ctx, x_ND, W_FD, b_F, width, compute_dtype, dead_mask_F, k_aux, sort):
        pre_NF = F.linear(x_ND.to(compute_dtype), W_FD.to(compute_dtype)).float() + b_F
        acts, idx = pre_NF.topk(width, dim=-1, sorted=sort)
        acts = acts.relu()
        aux_acts = aux_idx = None
        if dead_mask_F is not None and k_aux > 0 and bool(dead_mask_F.any()):
            # AuxK ranks the dead latents only (as in Gao et al. and sparsify): a gather of their
            # columns, not a second pass over all latents.
            dead_idx = dead_mask_F.nonzero().squeeze(1)
            aux_acts, j = pre_NF[:, dead_idx].topk(min(k_aux, len(dead_idx)), dim=-1, sorted=False)
            aux_idx = dead_idx[j]
            aux_acts = aux_acts.relu()
        ctx.save_for_backward(x_ND, W_FD, idx, acts, aux_idx, aux_acts)
        ctx.mark_non_differentiable(idx)
        if aux_idx is not None:
            ctx.mark_non_differentiable(aux_idx)
        return acts, idx, aux_acts, aux_idx

    @staticmethod
    def backward(ctx, grad_acts, grad_idx, grad_aux, grad_aux_idx):
        x, W, idx, acts, aux_idx, aux_acts = ctx.saved_tensors
        grads, ids = [grad_acts * (acts > 0)], [idx]
        if aux_idx is not None and grad_aux is not None:
            grads.append(grad_aux * (aux_acts > 0))
            ids.append(aux_idx)
        g = torch.cat(grads, dim=1)
        i = torch.cat(ids, dim=1)
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(i, W, per_sample_weights=g, mode="sum")
        if ctx.needs_input_grad[1]:
            grad_W = _csr_t_matmul(i, g, x.float(), W.shape[0])
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(W.shape[0], dtype=g.dtype, device=g.device).index_add_(0, i.reshape(-1), g.reshape(-1))
        return grad_x, grad_W, grad_b, None, None, None, None, None


class SparseDecode(torch.autograd.Function):
    """Σ_j acts[n, j] · W[indices[n, j]] with a sparse backward."""

    @staticmethod
    def forward(ctx, acts_NK, indices_NK, W_FD):
        ctx.save_for_backward(acts_NK, indices_NK, W_FD)
        return F.embedding_bag(indices_NK, W_FD, per_sample_weights=acts_NK, mode="sum")

    @staticmethod
    def backward(ctx, grad_ND):
        acts, idx, W = ctx.saved_tensors
        grad_acts = _gather_dot(W, idx, grad_ND) if ctx.needs_input_grad[0] else None
        grad_W = _csr_t_matmul(idx, acts, grad_ND, W.shape[0]) if ctx.needs_input_grad[2] else None
        return grad_acts, None, grad_W


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLU(torch.autograd.Function):
    """pre · H(pre − θ); ∂/∂pre = H(pre − θ), and the pseudo-derivative ∂/∂θ = −(θ/ε)·K((pre − θ)/ε) with the
    rectangle kernel K (Rajamanoharan et al. 2024, "Jumping Ahead")."""

    @staticmethod
    def forward(ctx, pre_NF, theta_F, bandwidth):
        ctx.save_for_backward(pre_NF, theta_F)
        ctx.bandwidth = bandwidth
        return pre_NF * (pre_NF > theta_F)

    @staticmethod
    def backward(ctx, grad_NF):
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad_NF * (pre > theta)
        grad_theta = -(theta / eps) * (grad_NF * _rectangle((pre - theta) / eps)).sum(0)
        return grad_pre, grad_theta, None


class JumpStep(torch.autograd.Function):
    """H(pre − θ) for the L0 penalty, with pseudo-derivatives ∂/∂θ = −(1/ε)·K((pre − θ)/ε) and ∂/∂pre = −∂/∂θ.

    Gemma Scope uses the θ one only; we also send it to pre, so that the encoder (not only the thresholds, which
    Adam moves by about lr in log space per step) answers the L0 coefficient within a run of ~1,000 steps.
    """

    @staticmethod
    def forward(ctx, pre_NF, theta_F, bandwidth):
        ctx.save_for_backward(pre_NF, theta_F)
        ctx.bandwidth = bandwidth
        return (pre_NF > theta_F).to(pre_NF.dtype)

    @staticmethod
    def backward(ctx, grad_NF):
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        kernel_NF = grad_NF * _rectangle((pre - theta) / eps) / eps
        return kernel_NF if ctx.needs_input_grad[0] else None, -kernel_NF.sum(0), None
