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
    mc = frozen.model.config
    n_heads = getattr(mc, "num_attention_heads", None) or max(1, frozen.d_model // 64)
    n_kv = getattr(mc, "num_key_value_heads", None) or n_heads
    rope = getattr(mc, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    return DecoderConfig(
        arch=arch, num_latents=sae.cfg.num_latents, d_model=frozen.d_model, vocab_size=frozen.vocab_size,
        rank=rank, vocab_bias=vocab_bias, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
        d_mlp=getattr(mc, "intermediate_size", None) or 4 * frozen.d_model,
        rope_theta=float(theta or getattr(mc, "rope_theta", 10_000.0)),
        norm_eps=float(getattr(mc, "rms_norm_eps", None) or 1e-5),
        max_context=max(4096, int(getattr(mc, "max_position_embeddings", 0) or 0)),
    )


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
        ids = block_ids or even_block_ids(layer, frozen.n_layers, len(decoder.blocks))
        decoder.init_from_blocks([frozen.blocks[i - 1] for i in ids])
        decoder.source_blocks = ids
        log.info("%s decoder blocks start as copies of the frozen model's layers %s", arch, ids)
    return decoder


def build_lens(frozen: FrozenLM) -> TunedLens:
    return TunedLens(frozen.d_model, FrozenHead.from_frozen(frozen))
