"""Decoders: sparse SAE features → logits over the frozen model's full vocabulary.

`FeatureDecoder` is what every architecture offers its callers, so that none of them needs to know
which one it holds: `forward(indices_BTK, values_BTK, first=0)` takes fixed-width sparse features
(slots with value 0 are unused) and returns logits_BTV; `last_logits` the logits at each row's last
position; `forward_dense(feats_BTF)` the same as `forward` through a separate (matmul) path;
`needs_context` whether a position's logits read earlier positions; `direct_effects` each feature's
logit change per unit activation along the path that skips any mixing across positions. Decoders
take feature ids and values, never an SAE object, so this module does not depend on `sae/`.

- `linear`: features → vocabulary, optionally through a rank-r bottleneck.
- `readout`: features → d_model → the frozen final norm and unembedding (+ optional vocabulary
  bias). Its logits decompose exactly over features (`contributions`).
- `context` (models/decoder_context.py): a small causal transformer over the features of all
  positions ≤ t, ending in the frozen head.

A checkpoint is `decoder.json` + `decoder.safetensors`; the frozen head is not stored (it comes
from the model named in the config), so a checkpoint is small.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from models.errors import ConfigError
from models.head import FrozenHead
from models.io import atomic_path, load_safetensors, read_json
from models.loading import fast_bf16

Arch = Literal["linear", "readout", "context"]
WEIGHTS, CONFIG = "decoder.safetensors", "decoder.json"

_SECOND_ORDER: ContextVar[bool] = ContextVar("second_order", default=False)


@contextmanager
def second_order():
    """Inside, feature sums take a gather path whose gradient in the values can itself be differentiated
    (EmbeddingBag's per-sample-weight gradient has no derivative), for losses on attributions."""
    token = _SECOND_ORDER.set(True)
    try:
        yield
    finally:
        _SECOND_ORDER.reset(token)


def feature_sum(indices_NK: Tensor, table_FD: Tensor, values_NK: Tensor) -> Tensor:
    """Σ_k values[n, k] · table[indices[n, k]], [N, D]."""
    if _SECOND_ORDER.get():
        return torch.einsum("nk,nkd->nd", values_NK.float(), table_FD[indices_NK])
    return F.embedding_bag(indices_NK, table_FD, per_sample_weights=values_NK.float(), mode="sum")


@dataclass
class DecoderConfig:
    arch: Arch
    num_latents: int
    """SAE width (feature ids are 0..num_latents-1)."""
    d_model: int
    """Residual width of the frozen model (the readout's and the context decoder's stream)."""
    vocab_size: int
    rank: int = 256
    """linear: bottleneck rank; 0 = a full num_latents × vocab matrix (large: 5,760 × 49,152 is 283M weights)."""
    vocab_bias: bool = True
    """A trainable bias over the vocabulary, added to the logits."""
    readout_affine: bool = True
    """readout: a shared affine map x + A·x + c (zero-initialised) after the feature sum. Every feature's
    direction then learns from every token, not only from the tokens it fires on; the logits stay linear
    in the features."""
    n_layers: int = 4
    """context: transformer blocks."""
    n_heads: int = 9
    n_kv_heads: int = 3
    d_mlp: int = 1536
    rope_theta: float = 100_000.0
    norm_eps: float = 1e-5
    max_context: int = 4096
    """context: longest sequence the position tables cover."""
    bos_stream: bool = False
    """context: position 0 (BOS) starts from a stored stream (the frozen model's layer-L residual of BOS)
    instead of its features."""

    def __post_init__(self):
        if self.arch not in ("linear", "readout", "context"):
            raise ConfigError(f"--arch: expected linear, readout or context, got {self.arch!r}")
        if self.rank < 0:
            raise ConfigError(f"--rank: expected 0 (full) or a positive rank, got {self.rank}")
        if self.arch == "context" and (self.d_model % self.n_heads or self.n_heads % self.n_kv_heads):
            raise ConfigError(f"context decoder: d_model {self.d_model} must divide into --n-heads {self.n_heads}, "
                              f"and n_heads into --n-kv-heads {self.n_kv_heads}")


def dense_to_sparse(feats_BTF: Tensor, width: int | None = None) -> tuple[Tensor, Tensor]:
    """The `width` largest features per position as (indices, values); default width = max L0."""
    if width is None:
        width = max(1, int((feats_BTF != 0).sum(-1).max()))
    values, indices = feats_BTF.topk(width, dim=-1)
    return indices, values


class FeatureDecoder(nn.Module):
    """The interface of every decoder: sparse features → logits over the vocabulary.

    An architecture implements `hidden` (its state per position), `hidden_dense` (the same from dense
    features), `readout` (state → logits) and `direct_effects`; a context decoder also returns True from
    `needs_context`. Everything callers use is built from those here, in one place.
    """

    @property
    def needs_context(self) -> bool:
        """Whether a position's logits read the features of earlier positions (then inputs are [B, T, K])."""
        return False

    def hidden(self, indices_BTK: Tensor, values_BTK: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement hidden()")

    def hidden_dense(self, feats_BTF: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement hidden_dense()")

    def readout(self, hidden: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement readout()")

    def direct_effects(self, feature_ids: Tensor) -> Tensor:
        """Logit change per unit activation of each feature through the decoder's direct path [n, V]."""
        raise NotImplementedError(f"{type(self).__name__} must implement direct_effects()")

    def forward(self, indices_BTK: Tensor, values_BTK: Tensor, first: int = 0) -> Tensor:
        """Logits of positions first..T−1. Positions before `first` are only context: a context decoder
        reads them, the others skip them. Per-position decoders also take any [..., K] shape (first = 0)."""
        if self.needs_context:
            return self.readout(self.hidden(indices_BTK, values_BTK)[:, first:])
        return self.readout(self.hidden(indices_BTK[:, first:], values_BTK[:, first:]))

    def forward_dense(self, feats_BTF: Tensor) -> Tensor:
        return self.readout(self.hidden_dense(feats_BTF))

    def last_logits(self, indices_BTK: Tensor, values_BTK: Tensor, lengths_B: Tensor | None = None) -> Tensor:
        """Logits [B, V] at each row's last position, lengths_B − 1 (default T − 1); rows start at position 0.

        The readout (for most decoders the 49k-wide head) runs on one position per row; a context decoder
        reads each row up to its last position (what follows it never reaches it: attention is causal).
        """
        B, T = indices_BTK.shape[:2]
        rows = torch.arange(B, device=indices_BTK.device)
        last_B = lengths_B.to(indices_BTK.device) - 1 if lengths_B is not None else torch.full_like(rows, T - 1)
        if self.needs_context:
            return self.readout(self.hidden(indices_BTK, values_BTK)[rows, last_B])
        return self.readout(self.hidden(indices_BTK[rows, last_B], values_BTK[rows, last_B]))


class Decoder(FeatureDecoder):
    """The architectures saved as checkpoints: config, frozen head, vocabulary bias, initialisation."""

    def __init__(self, cfg: DecoderConfig, head: FrozenHead | None):
        super().__init__()
        self.cfg = cfg
        self.head = head
        self.bias_V = nn.Parameter(torch.zeros(cfg.vocab_size)) if cfg.vocab_bias else None
        self.blocks = nn.ModuleList()  # between features and head; only the context decoder has any
        self.source_blocks: list[int] | None = None  # the frozen layers the blocks were copied from, for decoder.json
        self.meta: dict = {}  # decoder.json, once loaded

    def _add_bias(self, logits: Tensor) -> Tensor:
        return logits + self.bias_V if self.bias_V is not None else logits

    def readout(self, hidden: Tensor) -> Tensor:
        return self._add_bias(self.head(hidden))

    def init_from_sae(self, W_dec_FD: Tensor, b_dec_D: Tensor) -> None:
        """Start from the SAE's decoder, so that the stream starts as the SAE reconstruction."""
        raise NotImplementedError(f"{type(self).__name__} must implement init_from_sae()")

    @torch.no_grad()
    def init_from_blocks(self, frozen_blocks: list[nn.Module]) -> list[str]:
        """Copy Llama-family blocks (one per decoder block: same names, same rotary convention); returns what was loaded."""
        if len(frozen_blocks) != len(self.blocks):
            raise ConfigError(f"init_from_blocks: {len(frozen_blocks)} source blocks for {len(self.blocks)} decoder blocks")
        for mine, theirs in zip(self.blocks, frozen_blocks):
            state = {k: v.float() for k, v in theirs.state_dict().items()}
            missing, _ = mine.load_state_dict(state, strict=False)
            if missing:
                raise ConfigError(f"--init upper-blocks: the model's blocks ({type(theirs).__name__}) lack {missing[:3]}; "
                                  "use --init zero for this architecture")
        return [type(b).__name__ for b in frozen_blocks]

    # -- artifacts -------------------------------------------------------------------------
    def save(self, directory: Path, extra: dict | None = None) -> None:
        """decoder.json (config + `extra` metadata) and decoder.safetensors, written atomically."""
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        meta = {**asdict(self.cfg), **(extra or {})}
        with atomic_path(Path(directory)) as tmp:
            tmp.mkdir()
            save_file(tensors, str(tmp / WEIGHTS))
            (tmp / CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def read_decoder_meta(directory: Path) -> dict:
    directory = Path(directory)
    if not (directory / CONFIG).is_file() or not (directory / WEIGHTS).is_file():
        raise ConfigError(f"{directory}: not a decoder folder (expected {CONFIG} and {WEIGHTS})")
    return read_json(directory / CONFIG)


def build_decoder(cfg: DecoderConfig, head: FrozenHead | None) -> Decoder:
    if cfg.arch == "linear":
        return LinearDecoder(cfg, head)
    if cfg.arch == "readout":
        return ReadoutDecoder(cfg, head)
    from models.decoder_context import ContextDecoder

    return ContextDecoder(cfg, head)


def load_decoder(directory: Path, head: FrozenHead | None) -> Decoder:
    """Load a checkpoint; `head` must come from the model named in its `model` field (unknown keys ignored)."""
    meta = read_decoder_meta(directory)
    known = {f.name for f in fields(DecoderConfig)}
    # checkpoints written before the readout's affine map existed have none
    cfg = DecoderConfig(**{"readout_affine": False, **{k: v for k, v in meta.items() if k in known}})
    if cfg.arch != "linear" and head is None:
        raise ConfigError(f"{directory}: a {cfg.arch} decoder needs the frozen model's head")
    if head is not None and head.vocab_size != cfg.vocab_size:
        raise ConfigError(f"{directory}: decoder vocabulary {cfg.vocab_size} ≠ model vocabulary {head.vocab_size} "
                          f"(trained on {meta.get('model', 'another model')})")
    decoder = build_decoder(cfg, head)
    decoder.load_state_dict(load_safetensors(Path(directory) / WEIGHTS))
    decoder.meta = meta
    return decoder.eval()


class LinearDecoder(Decoder):
    """logits = Σ_k v_k A[i_k] (B) + bias: a sparse gather of rows, then the rank-r up-projection."""

    def __init__(self, cfg: DecoderConfig, head: FrozenHead | None = None):
        super().__init__(cfg, None)  # never uses the frozen head
        width = cfg.rank or cfg.vocab_size
        self.A_FR = nn.Parameter(torch.randn(cfg.num_latents, width) * (1 / width**0.5))
        self.B_RV = nn.Parameter(torch.zeros(cfg.rank, cfg.vocab_size)) if cfg.rank else None

    def init_from_sae(self, W_dec_FD: Tensor, b_dec_D: Tensor) -> None:
        """Nothing to take: the features map to the vocabulary directly, not through d_model."""

    def hidden(self, indices_BTK: Tensor, values_BTK: Tensor) -> Tensor:
        z = feature_sum(indices_BTK.reshape(-1, indices_BTK.shape[-1]), self.A_FR, values_BTK.reshape(-1, values_BTK.shape[-1]))
        return z.reshape(*indices_BTK.shape[:-1], -1)

    def hidden_dense(self, feats_BTF: Tensor) -> Tensor:
        return feats_BTF.float() @ self.A_FR

    def readout(self, z: Tensor) -> Tensor:
        if self.B_RV is None:
            return self._add_bias(z)
        with torch.autocast(z.device.type, dtype=torch.bfloat16, enabled=fast_bf16(z.device.type)):
            logits = z @ self.B_RV
        return self._add_bias(logits.float())

    @torch.no_grad()
    def direct_effects(self, feature_ids: Tensor) -> Tensor:
        """The features' rows through the up-projection (in fp32), without the vocabulary bias."""
        rows = self.A_FR[feature_ids].float()
        return rows @ self.B_RV.float() if self.B_RV is not None else rows


class ReadoutDecoder(Decoder):
    """h = Σ_k v_k W[i_k] + b (initialised to the SAE decoder), then the frozen head."""

    def __init__(self, cfg: DecoderConfig, head: FrozenHead):
        super().__init__(cfg, head)
        self.W_FD = nn.Parameter(torch.zeros(cfg.num_latents, cfg.d_model))
        self.b_D = nn.Parameter(torch.zeros(cfg.d_model))
        self.affine = nn.Linear(cfg.d_model, cfg.d_model) if cfg.readout_affine else None
        if self.affine is not None:
            nn.init.zeros_(self.affine.weight)
            nn.init.zeros_(self.affine.bias)

    @torch.no_grad()
    def init_from_sae(self, W_dec_FD: Tensor, b_dec_D: Tensor) -> None:
        """Start as the logit lens on the SAE's reconstruction."""
        self.W_FD.copy_(W_dec_FD)
        self.b_D.copy_(b_dec_D)

    def _translate(self, x: Tensor, with_bias: bool = True) -> Tensor:
        if self.affine is None:
            return x
        return x + (self.affine(x) if with_bias else x @ self.affine.weight.t())

    def hidden(self, indices_BTK: Tensor, values_BTK: Tensor) -> Tensor:
        """The estimate of the layer's residual that the frozen head reads."""
        flat_i = indices_BTK.reshape(-1, indices_BTK.shape[-1])
        flat_v = values_BTK.reshape(-1, values_BTK.shape[-1]).float()
        h = feature_sum(flat_i, self.W_FD, flat_v) + self.b_D
        return self._translate(h).reshape(*indices_BTK.shape[:-1], -1)

    def hidden_dense(self, feats_BTF: Tensor) -> Tensor:
        return self._translate(feats_BTF.float() @ self.W_FD + self.b_D)

    @torch.no_grad()
    def direct_effects(self, feature_ids: Tensor) -> Tensor:
        """Each feature's direction after the affine map's linear part, through the head's linear part
        (the norm's per-position scale left out)."""
        return self.head.direction_logits(self._translate(self.W_FD[feature_ids].float(), with_bias=False))

    @torch.no_grad()
    def contributions(self, indices_NK: Tensor, values_NK: Tensor) -> tuple[Tensor, Tensor]:
        """Exact decomposition of the logits of N positions: (per-slot [N, K, V], rest [N, V]).

        With the norm's per-position scale s fixed, the head is affine, so
        logits = Σ_k v_k·s·U(center(W'_k)⊙g) + s·U(center(b')⊙g) + constant + vocab bias, where W'_k and b'
        are the feature directions and bias after the affine map (its linear part applies to directions).
        Summing the slots and the rest gives `forward` up to rounding.
        """
        head = self.head
        s_N1 = head.scale(self.hidden(indices_NK, values_NK))
        rows_NKD = self._translate(self.W_FD[indices_NK], with_bias=False)
        per_slot = head.direction_logits(rows_NKD) * (values_NK.float() * s_N1)[..., None]
        rest = head.direction_logits(self._translate(self.b_D[None])) * s_N1 + head.constant_logits()
        return per_slot, self._add_bias(rest)
