"""The online teacher (`--teacher online`): the frozen model runs inside each distillation step.

One forward pass (in the model's dtype: bf16 where it is fast, else fp32) gives both what the student reads (the
layer-L residual, through the SAE) and what it is trained towards (the exact next-token logits over
the full vocabulary), so nothing is cached but the token ids. The ids are packed once by the driver
into `OUT/train_tokens.safetensors`, keyed by the corpus settings that produced them, so every
worker (and every resumed run) reads the same table in the same order.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from corpus.config import CorpusConfig, with_bos
from corpus.packing import sequences
from models.errors import ConfigError
from models.frozen import FrozenLM
from models.io import atomic_path
from models.progress import progress_bar
from training.config import pick, to_record

TOKENS_FILE = "train_tokens.safetensors"


def _identity(cfg: CorpusConfig, frozen: FrozenLM, tokens: int) -> str:
    corpus = to_record(pick(cfg, CorpusConfig, split="train", tokens=tokens))
    return json.dumps({"corpus": corpus, "model": frozen.name, "vocab": frozen.vocab_size}, sort_keys=True)


def training_tokens(cfg: CorpusConfig, frozen: FrozenLM, tokens: int, out: Path) -> Path:
    """Pack the training split into whole BOS-led sequences covering `tokens` scored positions, once.

    An existing table made from the same settings is reused; one made from other settings is rebuilt."""
    path = Path(out) / TOKENS_FILE
    positions = with_bos(tokens, cfg.seq_len)
    identity = _identity(cfg, frozen, positions)
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("identity") == identity:
                return path
    seqs = sequences(pick(cfg, CorpusConfig, split="train", tokens=positions), frozen.tokenizer, frozen.bos_token_id,
                     frozen.eos_token_id, frozen)
    rows = [(p.tokens, p.next_ids) for p in progress_bar(seqs, total=math.ceil(positions / cfg.seq_len), desc="pack training tokens",
                                                 unit="seq", leave=False)]
    table = {"tokens": torch.from_numpy(np.stack([r[0] for r in rows]).astype(np.int32)),
             "next_ids": torch.from_numpy(np.stack([r[1] for r in rows]).astype(np.int32))}
    with atomic_path(path) as tmp:
        save_file(table, str(tmp), metadata={"identity": identity})
    return path


def load_training_tokens(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no training-token table (written by `decoder train --teacher online`)")
    with safe_open(str(path), "pt") as f:
        return f.get_tensor("tokens"), f.get_tensor("next_ids")


class OnlineTeacher:
    """The frozen model as the distillation target, computed for each batch as it is drawn."""

    def __init__(self, frozen: FrozenLM, layer: int, tokens_ST: torch.Tensor, next_ids_ST: torch.Tensor):
        self.frozen, self.layer = frozen, layer
        self.tokens, self.next_ids = tokens_ST, next_ids_ST

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])

    def fill(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch with `resid` [B, T, D] fp32 and `teacher.logits` [B, T, V] (model dtype) added."""
        logits, store = self.frozen.forward(batch["tokens"], [self.layer])
        return {**batch, "resid": store[self.layer].float(), "teacher.logits": logits}
