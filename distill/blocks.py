"""Which of the frozen model's blocks above layer L a context decoder's blocks start as copies of.

- `even`: evenly spaced in L+1..n_layers, first and last included (`distill.student.even_block_ids`).
- `greedy`: by measured effect. A context decoder holding copies of *every* upper block is the
  SAE-spliced model (the SAE reconstruction fed to the model's own upper blocks). Blocks are removed from
  it one at a time, each time the one whose removal raises the KL(p_frozen ‖ p) least, until N remain.
  The KL is measured on training-split tokens (the eval split stays held out), and the whole path
  (blocks kept, KL) is returned, so the cost of every depth is visible.
- a list of layer numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from distill.heldout import HeldOut
from distill.loss import kl_full
from distill.student import sae_features
from models.errors import ConfigError
from sae.model import SparseAutoencoder

log = logging.getLogger(__name__)


def parse_block_ids(text: str, layer: int, n_layers_model: int, n_blocks: int) -> list[int]:
    """'10,17,23,30' → [10, 17, 23, 30]: distinct layers above `layer`, one per decoder block, in order."""
    try:
        ids = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ConfigError(f"--blocks: expected even, greedy or comma-separated layer numbers, got {text!r}") from None
    if len(ids) != n_blocks:
        raise ConfigError(f"--blocks {text}: {len(ids)} layers for --n-layers {n_blocks}")
    if sorted(set(ids)) != ids or ids[0] <= layer or ids[-1] > n_layers_model:
        raise ConfigError(f"--blocks {text}: expected increasing layers in {layer + 1}..{n_layers_model} (the blocks above the layer read)")
    return ids


class SplicedStack:
    """The SAE-spliced upper model as a context decoder with every upper block, evaluated with subsets."""

    def __init__(self, decoder, sae: SparseAutoencoder, sample: HeldOut, first_layer: int):
        self.decoder, self.first_layer = decoder, first_layer
        with torch.no_grad():
            self.streams = [(decoder.stream(*sae_features(sae, resid)), teacher) for resid, teacher in sample.batches]
        self.tokens = sample.tokens

    @torch.no_grad()
    def kl(self, layers: list[int]) -> float:
        """Mean KL(p_frozen ‖ p) over the sample with only the copies of `layers` kept, in order."""
        blocks = [self.decoder.blocks[i - self.first_layer] for i in layers]
        total = 0.0
        for x, teacher in self.streams:
            logits = self.decoder.readout(self.decoder.run_blocks(x, blocks)[:, 1:])
            total += kl_full(teacher.flatten(0, 1).float(), logits.flatten(0, 1)).sum().item()
        return total / self.tokens


def greedy_block_ids(stack: SplicedStack, all_layers: list[int], n_blocks: int,
                     progress: Callable | None = None) -> tuple[list[int], list[dict]]:
    """Drop blocks greedily down to `n_blocks`; returns the kept layers and the path [{blocks, kl}, …]."""
    kept = list(all_layers)
    path = [{"blocks": list(kept), "kl": stack.kl(kept)}]
    total = sum(range(n_blocks + 1, len(kept) + 1))
    with tqdm(total=total, desc=f"choose {n_blocks} blocks", unit="trial", leave=False) as bar:
        while len(kept) > n_blocks:
            trials = []
            for drop in kept:
                trials.append((stack.kl([b for b in kept if b != drop]), drop))
                bar.update(1)
            kl, drop = min(trials)
            kept.remove(drop)
            path.append({"blocks": list(kept), "kl": kl, "dropped": drop})
            log.info("without block %d: KL %.3f with %d blocks", drop, kl, len(kept))
    return kept, path
