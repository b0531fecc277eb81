"""The context decoder: a small causal transformer over the sparse features of positions ≤ t.

Each position's features enter as a sum of learned feature embeddings weighted by activation
(EmbeddingBag), so the cost does not grow with the SAE width; the embedding starts as the SAE
decoder, so the stream starts as the SAE reconstruction of the residual. Pre-norm blocks (RMSNorm,
grouped-query attention with rotary positions, SwiGLU MLP) then write into that stream, and the
frozen final norm + unembedding read it out.

Position 0 is BOS in every sequence faithlens builds. Its residual is the model's attention sink, which
the SAE does not model; with `bos_stream` the decoder starts position 0 from that residual itself (a
constant of the model, `bos_D`, trainable) instead of from its features, as the SAE-spliced model does.

Blocks can start from copies of the frozen model's upper blocks (Llama-family weights: same
names, same rotary convention; `Decoder.init_from_blocks`), or with their output projections at
zero, so that the decoder starts as the readout decoder on the SAE reconstruction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.decoder import Decoder, DecoderConfig, feature_sum
from models.head import FrozenHead
from models.loading import fast_bf16


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight.to(x.dtype)


def rotary_tables(head_dim: int, max_len: int, theta: float) -> tuple[Tensor, Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x_BHTd: Tensor, cos_Td: Tensor, sin_Td: Tensor) -> Tensor:
    half = x_BHTd.shape[-1] // 2
    rotated = torch.cat([-x_BHTd[..., half:], x_BHTd[..., :half]], dim=-1)
    return x_BHTd * cos_Td.to(x_BHTd.dtype) + rotated * sin_Td.to(x_BHTd.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.n_heads, self.n_kv = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        d, kv = cfg.d_model, cfg.n_kv_heads * (cfg.d_model // cfg.n_heads)
        self.q_proj, self.k_proj = nn.Linear(d, d, bias=False), nn.Linear(d, kv, bias=False)
        self.v_proj, self.o_proj = nn.Linear(d, kv, bias=False), nn.Linear(d, d, bias=False)

    def qkv(self, x_BTD: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Rotated queries [B, H, T, d] and keys, values [B, H_kv, T, d]; cos/sin broadcast over heads."""
        B, T, _ = x_BTD.shape
        q = self.q_proj(x_BTD).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x_BTD).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x_BTD).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        B, _, T, _ = q.shape
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def forward(self, x_BTD: Tensor, cos: Tensor, sin: Tensor, kv: KVCache | None = None) -> Tensor:
        q, k, v = self.qkv(x_BTD, cos, sin)
        if kv is not None:
            kv.keep(self, k, v)
        return self.attend(q, k, v)

    def step(self, x_B1D: Tensor, cos_B11d: Tensor, sin_B11d: Tensor, kv: KVCache) -> Tensor:
        """One new position per row, attending to the cached positions before it (and itself)."""
        q, k, v = self.qkv(x_B1D, cos_B11d, sin_B11d)
        keys, values, mask = kv.append(self, k, v)
        return self.attend(q, keys, values, mask)


class KVCache:
    """Every block's keys and values for `capacity` positions of B rows, for one-position steps (inference only).

    Filled by a full forward (`ContextDecoder.hidden(..., kv=cache)`), then extended by
    `ContextDecoder.hidden_step`, which writes each row's new position at its own index and masks the keys
    after it. Attention is causal, so a step's output equals the full forward's at that position (up to
    reduced-precision rounding, which depends on the matmul shapes).
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}
        self.positions_B: Tensor | None = None

    def keep(self, attn: nn.Module, k: Tensor, v: Tensor) -> None:
        pad = (0, 0, 0, self.capacity - k.shape[2])
        self.keys[id(attn)], self.values[id(attn)] = F.pad(k.detach(), pad), F.pad(v.detach(), pad)

    def append(self, attn: nn.Module, k_B1: Tensor, v_B1: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        keys, values, pos = self.keys[id(attn)], self.values[id(attn)], self.positions_B
        rows = torch.arange(len(pos), device=pos.device)
        keys[rows, :, pos] = k_B1[:, :, 0].to(keys.dtype)
        values[rows, :, pos] = v_B1[:, :, 0].to(values.dtype)
        mask = torch.arange(self.capacity, device=pos.device)[None, :] <= pos[:, None]
        return keys.to(k_B1.dtype), values.to(v_B1.dtype), mask[:, None, None, :]


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.down_proj = nn.Linear(cfg.d_mlp, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Parameter names match transformers' LlamaDecoderLayer, so its weights load directly."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv: KVCache | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv)
        return x + self.mlp(self.post_attention_layernorm(x))

    def step(self, x: Tensor, cos: Tensor, sin: Tensor, kv: KVCache) -> Tensor:
        x = x + self.self_attn.step(self.input_layernorm(x), cos, sin, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class ContextDecoder(Decoder):
    def __init__(self, cfg: DecoderConfig, head: FrozenHead):
        super().__init__(cfg, head)
        self.embed_FD = nn.Parameter(torch.zeros(cfg.num_latents, cfg.d_model))
        self.b_D = nn.Parameter(torch.zeros(cfg.d_model))
        self.bos_D = nn.Parameter(torch.zeros(cfg.d_model)) if cfg.bos_stream else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        cos, sin = rotary_tables(cfg.d_model // cfg.n_heads, cfg.max_context, cfg.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self._init_blocks()

    @property
    def needs_context(self) -> bool:
        return True

    @torch.no_grad()
    def _init_blocks(self) -> None:
        for block in self.blocks:
            for module in block.modules():
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=0.02)
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()

    @torch.no_grad()
    def init_from_sae(self, W_dec_FD: Tensor, b_dec_D: Tensor) -> None:
        self.embed_FD.copy_(W_dec_FD)
        self.b_D.copy_(b_dec_D)

    @torch.no_grad()
    def init_bos(self, bos_resid_D: Tensor) -> None:
        """Start position 0 from the frozen model's layer-L residual of BOS (needs `bos_stream`)."""
        if self.bos_D is None:
            raise ValueError("context decoder: built without bos_stream, it has no BOS stream to set")
        self.bos_D.copy_(bos_resid_D.float())

    def stream(self, indices_BTK: Tensor, values_BTK: Tensor) -> Tensor:
        """The stream before the blocks, [B, T, D]: the weighted feature embeddings (+ the BOS stream)."""
        if indices_BTK.dim() != 3:
            raise ValueError(f"context decoder: expected [batch, positions, slots] features, got shape {tuple(indices_BTK.shape)}")
        B, T, K = indices_BTK.shape
        x = feature_sum(indices_BTK.reshape(-1, K), self.embed_FD, values_BTK.reshape(-1, K)).view(B, T, -1) + self.b_D
        return self._with_bos(x)

    def _with_bos(self, x_BTD: Tensor) -> Tensor:
        if self.bos_D is None:
            return x_BTD
        return torch.cat([self.bos_D.expand(x_BTD.shape[0], 1, -1), x_BTD[:, 1:]], 1)

    def hidden(self, indices_BTK: Tensor, values_BTK: Tensor, kv: KVCache | None = None) -> Tensor:
        """The stream after the blocks, [B, T, D]; with `kv`, every block's keys and values are kept in it."""
        return self.run_blocks(self.stream(indices_BTK, values_BTK), kv=kv)

    def hidden_step(self, indices_BK: Tensor, values_BK: Tensor, positions_B: Tensor, kv: KVCache) -> Tensor:
        """The stream after the blocks at one new position per row (≥ 1), [B, D], given `kv` holding every
        position before it; the new keys and values are written into `kv`."""
        if int(positions_B.min()) < 1 or int(positions_B.max()) >= kv.capacity:
            raise ValueError(f"context decoder: step positions must be in 1..{kv.capacity - 1}")
        x = feature_sum(indices_BK, self.embed_FD, values_BK)[:, None] + self.b_D
        cos, sin = self.cos[positions_B][:, None, None], self.sin[positions_B][:, None, None]
        kv.positions_B = positions_B
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=fast_bf16(x.device.type)):
            for block in self.blocks:
                x = block.step(x, cos, sin, kv)
        return x[:, 0].float()

    def hidden_dense(self, feats_BTF: Tensor) -> Tensor:
        return self.run_blocks(self._with_bos(feats_BTF.float() @ self.embed_FD + self.b_D))

    def run_blocks(self, x_BTD: Tensor, blocks: list[nn.Module] | None = None, kv: KVCache | None = None) -> Tensor:
        """`blocks` (default: all of them, in order) applied to a stream."""
        T = x_BTD.shape[1]
        if T > self.cfg.max_context:
            raise ValueError(f"context decoder: sequence of {T} positions exceeds max_context {self.cfg.max_context}")
        cos, sin = self.cos[:T], self.sin[:T]
        with torch.autocast(x_BTD.device.type, dtype=torch.bfloat16, enabled=fast_bf16(x_BTD.device.type)):
            for block in self.blocks if blocks is None else blocks:
                x_BTD = block(x_BTD, cos, sin, kv)
        return x_BTD.float()

    @torch.no_grad()
    def direct_effects(self, feature_ids: Tensor) -> Tensor:
        """Each feature's embedding row straight through the head's linear part: the path that skips the
        blocks (the norm's per-position scale left out)."""
        return self.head.direction_logits(self.embed_FD[feature_ids].float())
