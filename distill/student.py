"""Students of the distillation stage (decoders on SAE features, the tuned lens on raw residuals):
how each is built from a config, and how each turns a batch of layer-L residuals into logits.

Position 0 (BOS) is never scored: its residual is an attention sink the SAE does not model, and
its prediction (the first token of a window) carries no context. Context decoders still see it.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from models.decoder import Decoder, DecoderConfig, build_decoder
from models.errors import ConfigError
from models.frozen import FrozenLM
from models.head import FrozenHead
from models.lens import TunedLens
from sae.model import SparseAutoencoder

log = logging.getLogger(__name__)


def sae_features(sae: SparseAutoencoder, resid_BTD: Tensor) -> tuple[Tensor, Tensor]:
    """The SAE's sparse code of every position: (indices_BTK, values_BTK)."""
    B, T, D = resid_BTD.shape
    with torch.no_grad():
        enc = sae.encode(resid_BTD.reshape(-1, D).float())
    return enc.indices_NK.view(B, T, -1), enc.acts_NK.view(B, T, -1)


def student_logits(student: nn.Module, sae: SparseAutoencoder | None, resid_BTD: Tensor) -> Tensor:
    """Logits [B·(T-1), V] for positions 1..T-1 (position 0 = BOS is not scored, but context decoders read it).

    A decoder reads the SAE's features of the residual, a lens (sae None) the residual itself. The student
    is called, not one of its methods, so that a DDP wrapper sees the forward pass.
    """
    inputs = (resid_BTD,) if sae is None else sae_features(sae, resid_BTD)
    return student(*inputs, first=1).flatten(0, 1)


def decoder_config(arch: str, sae: SparseAutoencoder, frozen: FrozenLM, rank: int, vocab_bias: bool, n_layers: int) -> DecoderConfig:
    """Shapes from the SAE and the frozen model; context blocks mirror the model's own block shape."""
    return DecoderConfig(arch=arch, num_latents=sae.cfg.num_latents, d_model=frozen.d_model, vocab_size=frozen.vocab_size,
                         rank=rank, vocab_bias=vocab_bias, n_layers=n_layers, **block_shape(frozen))


def block_shape(frozen: FrozenLM) -> dict:
    """The frozen model's block settings, as DecoderConfig fields."""
    mc = frozen.model.config
    n_heads = getattr(mc, "num_attention_heads", None) or max(1, frozen.d_model // 64)
    rope = getattr(mc, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    return {"n_heads": n_heads, "n_kv_heads": getattr(mc, "num_key_value_heads", None) or n_heads,
            "d_mlp": getattr(mc, "intermediate_size", None) or 4 * frozen.d_model,
            "rope_theta": float(theta or getattr(mc, "rope_theta", 10_000.0)),
            "norm_eps": float(getattr(mc, "rms_norm_eps", None) or 1e-5),
            "max_context": max(4096, int(getattr(mc, "max_position_embeddings", 0) or 0))}


def check_block_copy(frozen: FrozenLM) -> None:
    """Refuse `--init upper-blocks` (one line, naming the difference) unless the frozen blocks compute what the
    context decoder's Llama-style blocks do: the same parameters with the same shapes (no biases, no extra norms), a
    SiLU-gated MLP, plain RMSNorms, full rotary positions without frequency scaling, no attention soft cap."""
    cfg = DecoderConfig(arch="context", num_latents=1, d_model=frozen.d_model, vocab_size=frozen.vocab_size,
                        **block_shape(frozen))
    why = _block_difference(frozen, cfg)
    if why is not None:
        raise ConfigError(f"--init upper-blocks: the blocks of {frozen.name} ({type(frozen.blocks[0]).__name__}) differ from "
                          f"the context decoder's Llama-style blocks ({why}); use --init zero")


def _block_difference(frozen: FrozenLM, cfg: DecoderConfig) -> str | None:
    from models.decoder_context import Block

    with torch.device("meta"):
        mine = {k: tuple(p.shape) for k, p in Block(cfg).named_parameters()}
    for block in frozen.blocks:
        theirs = {k: tuple(p.shape) for k, p in block.named_parameters()}
        if extra := sorted(theirs.keys() - mine.keys()):
            return f"extra parameters {', '.join(extra[:3])}"
        if missing := sorted(mine.keys() - theirs.keys()):
            return f"no {', '.join(missing[:3])}"
        if shape := next((k for k in mine if mine[k] != theirs[k]), None):
            return f"{shape} is {'×'.join(map(str, theirs[shape]))}, the decoder's {'×'.join(map(str, mine[shape]))}"
    mc = frozen.model.config
    act = getattr(mc, "hidden_act", None) or getattr(mc, "hidden_activation", None)
    rope = getattr(mc, "rope_parameters", None) or getattr(mc, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    partial = rope.get("partial_rotary_factor") if isinstance(rope, dict) else None
    partial = partial or getattr(mc, "partial_rotary_factor", None) or 1.0
    if act != "silu":
        return f"MLP activation {act}, not silu"
    if rope_type != "default":
        return f"rotary scaling {rope_type!r}"
    if partial != 1.0:
        return f"rotary on {partial:.0%} of each head"
    if getattr(mc, "attn_logit_softcapping", None):
        return "attention logit soft cap"
    if getattr(mc, "query_pre_attn_scalar", None) not in (None, cfg.d_model // cfg.n_heads):
        return "query scale other than 1/sqrt(head_dim)"
    for name in ("input_layernorm", "post_attention_layernorm"):
        if not _plain_rms_norm(frozen, getattr(frozen.blocks[0], name)):
            return f"{name} is not x·rsqrt(mean(x²) + ε)·weight"
    return None


@torch.no_grad()
def _plain_rms_norm(frozen: FrozenLM, norm: nn.Module) -> bool:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    weight = frozen.weights(norm).get("weight")
    if eps is None or weight is None:
        return False
    x = torch.randn(4, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(frozen.device, frozen.dtype)
    theirs = norm(x).float().to(frozen.device)
    mine = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return bool((mine - theirs).abs().max() <= 0.02 * mine.abs().max() + 1e-5)


def even_block_ids(layer: int, n_layers_model: int, n_blocks: int) -> list[int]:
    """Evenly spaced layers in layer+1..n_layers_model (first and last included), one per decoder block."""
    above = list(range(layer + 1, n_layers_model + 1))
    if n_blocks > len(above):
        raise ConfigError(f"--n-layers {n_blocks}: only {len(above)} blocks lie above layer {layer}")
    if n_blocks == 1:
        return [above[-1]]
    return [above[round(i * (len(above) - 1) / (n_blocks - 1))] for i in range(n_blocks)]


def bos_residual(frozen: FrozenLM, layer: int) -> Tensor:
    """The layer-`layer` residual of a lone BOS token: what every sequence's position 0 holds, [D]."""
    return frozen.residuals(torch.tensor([[frozen.bos_token_id]]), [layer])[layer][0, 0].float()


def build_student_decoder(arch: str, sae: SparseAutoencoder, frozen: FrozenLM, layer: int, rank: int = 256,
                          vocab_bias: bool = True, n_layers: int = 4, init: str = "upper-blocks",
                          block_ids: list[int] | None = None, bos_stream: bool = False) -> Decoder:
    """A decoder for `arch`; a context one starts from copies of the frozen blocks `block_ids` (default: evenly
    spaced above the layer) and, with `bos_stream`, from the model's own BOS residual at position 0."""
    head = FrozenHead.from_frozen(frozen)
    cfg = decoder_config(arch, sae, frozen, rank, vocab_bias, n_layers)
    cfg.bos_stream = bos_stream and arch == "context"
    decoder = build_decoder(cfg, head)
    decoder.init_from_sae(sae.W_dec.detach(), sae.b_dec.detach())
    if cfg.bos_stream:
        decoder.init_bos(bos_residual(frozen, layer))
    if init == "upper-blocks" and len(decoder.blocks):
        check_block_copy(frozen)
        ids = block_ids or even_block_ids(layer, frozen.n_layers, len(decoder.blocks))
        sources = [frozen.blocks[i - 1] for i in ids]
        with frozen.loaded(sources):
            decoder.init_from_blocks(sources)
        decoder.source_blocks = ids
        log.info("%s decoder blocks start as copies of the frozen model's layers %s", arch, ids)
    return decoder


def build_lens(frozen: FrozenLM) -> TunedLens:
    return TunedLens(frozen.d_model, FrozenHead.from_frozen(frozen))
