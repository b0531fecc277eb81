"""Evaluation measures of next-token predictions (the KL family lives in distill/loss.py, where training uses it)."""

from __future__ import annotations

from torch import Tensor


def next_token_accuracy(logits_NV: Tensor, labels_N: Tensor) -> float:
    """P(argmax = the data's next token) over N positions: ARCHITECTURE.md's "next-token accuracy"."""
    return (logits_NV.argmax(-1) == labels_N).float().mean().item()
