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

import torch

from distill.heldout import HeldOut
from distill.loss import kl_full
from distill.student import sae_features
from models.errors import ConfigError
from models.progress import progress_bar
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

    def _blocks(self, layers: list[int]) -> list:
        return [self.decoder.blocks[i - self.first_layer] for i in layers]

    def _kl_of(self, states: list, layers: list[int]) -> float:
        total = 0.0
        for x, (_, teacher) in zip(states, self.streams):
            logits = self.decoder.readout(self.decoder.run_blocks(x, self._blocks(layers))[:, 1:])
            total += kl_full(teacher.flatten(0, 1).float(), logits.flatten(0, 1)).sum().item()
        return total / self.tokens

    @torch.no_grad()
    def kl(self, layers: list[int]) -> float:
        """Mean KL(p_frozen ‖ p) over the sample with only the copies of `layers` kept, in order."""
        return self._kl_of([x for x, _ in self.streams], layers)

    @torch.no_grad()
    def removal_costs(self, kept: list[int]) -> list[tuple[float, int]]:
        """(KL without it, layer) for every layer of `kept`. The stream before each candidate is the same as
        with all of `kept`, so it is computed once and each trial runs only the blocks after it."""
        prefixes = [[x for x, _ in self.streams]]
        for block in self._blocks(kept[:-1]):
            prefixes.append([self.decoder.run_blocks(x, [block]) for x in prefixes[-1]])
        return [(self._kl_of(prefixes[i], kept[i + 1 :]), layer) for i, layer in enumerate(kept)]


def greedy_block_ids(stack: SplicedStack, all_layers: list[int], n_blocks: int) -> tuple[list[int], list[dict]]:
    """Drop blocks greedily down to `n_blocks`; returns the kept layers and the path [{blocks, kl}, …]."""
    kept = list(all_layers)
    path = [{"blocks": list(kept), "kl": stack.kl(kept)}]
    with progress_bar(total=len(kept) - n_blocks, desc=f"choose {n_blocks} blocks", unit="block", leave=False) as bar:
        while len(kept) > n_blocks:
            kl, drop = min(stack.removal_costs(kept))
            kept.remove(drop)
            path.append({"blocks": list(kept), "kl": kl, "dropped": drop})
            log.info("without block %d: KL %.3f with %d blocks", drop, kl, len(kept))
            bar.update(1)
    return kept, path
