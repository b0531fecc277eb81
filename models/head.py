"""The frozen model's output head (final norm + unembedding), shared by lenses and decoders.

Besides the plain forward it exposes the head as an affine map once the norm's per-position
statistics are fixed, which is what makes a readout decoder's logit decompose exactly over
features: logit_v = Σ_i contribution_iv + constant_v. A model with a final logit soft cap (Gemma-2:
cap · tanh(logit / cap)) gets the cap in `forward`; the decomposition is then of the logits before
the cap, which the cap maps monotonically to the model's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.errors import ConfigError


class FrozenHead(nn.Module):
    """final_norm → unembedding, with weights borrowed (not copied) from the frozen model.

    The weights are plain attributes, not parameters or buffers, so they never reach a decoder's
    state dict or optimizer, and gradients flow through them to the inputs only.
    """

    def __init__(self, norm_weight_D: Tensor, norm_bias_D: Tensor | None, eps: float, kind: str,
                 unembed_VD: Tensor, unembed_bias_V: Tensor | None = None, softcap: float | None = None):
        super().__init__()
        if kind not in ("rms", "layer"):
            raise ConfigError(f"unsupported final norm kind {kind!r} (expected 'rms' or 'layer')")
        self.kind, self.eps, self.softcap = kind, eps, softcap
        self.norm_weight_D, self.norm_bias_D = norm_weight_D.detach(), None if norm_bias_D is None else norm_bias_D.detach()
        self.unembed_VD = unembed_VD.detach()
        self.unembed_bias_V = None if unembed_bias_V is None else unembed_bias_V.detach()

    @classmethod
    def from_frozen(cls, frozen) -> FrozenHead:
        """The model's final norm and unembedding (weights on `frozen.device`), checked on a probe against the
        model's own modules, so that a head this class cannot reproduce is refused, never approximated."""
        norm, unembed = frozen.final_norm, frozen.unembed
        n, u = frozen.weights(norm), frozen.weights(unembed)
        if isinstance(norm, nn.LayerNorm):
            kind, eps = "layer", norm.eps
        else:
            eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
            if eps is None or "weight" not in n:
                raise ConfigError(f"--model: final norm {type(norm).__name__} is neither LayerNorm nor an RMSNorm with weight/eps")
            kind = "rms"
        # Gemma's RMSNorm scales by (1 + weight); which convention a norm follows is read off its output.
        gains = [n["weight"], 1.0 + n["weight"].float()] if kind == "rms" else [n["weight"]]
        for gain in gains:
            head = cls(gain, n.get("bias"), float(eps), kind, u["weight"], u.get("bias"), frozen.logit_softcap)
            if head.reproduces(frozen):
                return head
        raise ConfigError(f"--model: the output head of {frozen.name} ({type(norm).__name__} → {type(unembed).__name__}) is not "
                          "a LayerNorm/RMSNorm followed by an unembedding; this architecture is not supported yet")

    @torch.no_grad()
    def reproduces(self, frozen, positions: int = 4) -> bool:
        """Whether this head gives the model's own logits (its final norm, unembedding and soft cap) on random states."""
        h = torch.randn(positions, self.d_model, generator=torch.Generator().manual_seed(0)).to(frozen.device, frozen.dtype)
        theirs, mine = frozen.logit_lens(h).float(), self(h).float()
        return bool((mine - theirs).abs().max() <= 0.02 * theirs.abs().max() + 1e-5)

    @property
    def vocab_size(self) -> int:
        return self.unembed_VD.shape[0]

    @property
    def d_model(self) -> int:
        return self.unembed_VD.shape[1]

    def scale(self, h_ND: Tensor) -> Tensor:
        """1 / (the norm's per-position scale), [N, 1], in fp32."""
        h = h_ND.float()
        if self.kind == "layer":
            h = h - h.mean(-1, keepdim=True)
        return torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)

    def center(self, x_ND: Tensor) -> Tensor:
        """The linear part of the norm before scaling (mean removal for LayerNorm)."""
        return x_ND - x_ND.mean(-1, keepdim=True) if self.kind == "layer" else x_ND

    def normed(self, h_ND: Tensor) -> Tensor:
        out = self.center(h_ND.float()) * self.scale(h_ND) * self.norm_weight_D.float()
        return out + self.norm_bias_D.float() if self.norm_bias_D is not None else out

    def unembed(self, normed_ND: Tensor) -> Tensor:
        """Logits in fp32 from normed states (soft-capped where the model caps them); the matmul runs in the
        unembedding's dtype (bf16 is fast)."""
        logits = self._affine_unembed(normed_ND)
        return torch.tanh(logits / self.softcap) * self.softcap if self.softcap else logits

    def _affine_unembed(self, normed_ND: Tensor) -> Tensor:
        w = self.unembed_VD
        logits = (normed_ND.to(w.dtype) @ w.t()).float()
        return logits + self.unembed_bias_V.float() if self.unembed_bias_V is not None else logits

    def forward(self, h_ND: Tensor) -> Tensor:
        return self.unembed(self.normed(h_ND))

    def direction_logits(self, x_ND: Tensor) -> Tensor:
        """The head's linear part once the norm's per-position scale is fixed (here to 1): U·(center(x) ⊙ g), fp32.

        Biases are left out (see `constant_logits`), so that the logits of a sum of directions are the sum
        of their logits.
        """
        w = self.unembed_VD
        return ((self.center(x_ND.float()) * self.norm_weight_D.float()).to(w.dtype) @ w.t()).float()

    def constant_logits(self) -> Tensor:
        """The part of the logits that does not depend on the input (norm and unembedding biases), [V]."""
        if self.norm_bias_D is not None:
            return self._affine_unembed(self.norm_bias_D.float()[None])[0]
        if self.unembed_bias_V is not None:
            return self.unembed_bias_V.float()
        return torch.zeros(self.vocab_size, device=self.unembed_VD.device)
