"""Which features get model labels and scores, and the coverage estimate they support.

The selection, recorded in labels.json under "selection" by `features label` and followed by `features score`:
- sample: a stratified random sample of the live features (density > 0). Live features are ranked by density
  (ties by id) and cut into DENSITY_STRATA equal-count strata (the density deciles); each stratum gives a share
  of the sample proportional to its size (largest remainders), drawn with a seeded RNG. Proportional
  allocation makes the sample self-weighting, so its verified fraction k/n estimates coverage (verified / live)
  without weights, and the Wilson interval of k/n is a (slightly conservative) 95% interval for it.
- top: the most important features (importance.json order, else the densest): labelled and scored too, but
  chosen rather than drawn, so they are kept apart from the estimate. A top feature that the draw also picked
  counts in the sample.

A sampled feature counts as verified when a label of it is verified (scoring.verify) and it is not dense:
a dense feature cannot meet the definition (negatives in which it never fires in the shown window), and a
feature left unscored has no verified label, so both count as unverified.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass, field

from interpret.records import FeatureEvidence
from interpret.run import InterpretRun
from interpret.score_stats import wilson_interval

log = logging.getLogger(__name__)

DENSITY_STRATA = 10
"""Strata of the random sample: density deciles of the live features."""


@dataclass
class Selection:
    """The features a model labels and `features score` scores."""

    sample: list[int]
    """The stratified random sample of live features, sorted by id."""
    top: list[int]
    """The most important features, most important first."""
    live: int
    """Live features the sample was drawn from."""
    seed: int
    """Seed of the draw."""
    strata: list[int] = field(default_factory=list)
    """Sampled features per density stratum, sparsest first."""

    @property
    def features(self) -> list[int]:
        """Top features first, then the rest of the sample."""
        top = set(self.top)
        return self.top + [fid for fid in self.sample if fid not in top]

    def to_json(self) -> dict:
        return {"sample": self.sample, "top": self.top, "live": self.live, "seed": self.seed, "strata": self.strata}

    @classmethod
    def from_json(cls, d: dict) -> Selection:
        return cls([int(f) for f in d["sample"]], [int(f) for f in d["top"]], int(d["live"]), int(d["seed"]),
                   [int(n) for n in d.get("strata", [])])


def live_density(evidence: Mapping[int, FeatureEvidence]) -> dict[int, float]:
    """Feature id → density, for the features of `evidence` that fire at all."""
    stats = getattr(evidence, "stats", None)  # interpret.evidence.Evidence reads it without building examples
    density = {fid: float(stats(fid)["density"]) if stats else evidence[fid].density for fid in list(evidence)}
    return {fid: d for fid, d in density.items() if d > 0}


def density_strata(density: Mapping[int, float], n_strata: int = DENSITY_STRATA) -> list[list[int]]:
    """The features cut into `n_strata` equal-count strata by density (ties by id), sparsest first."""
    ranked = sorted(density, key=lambda fid: (density[fid], fid))
    n = len(ranked)
    return [ranked[h * n // n_strata:(h + 1) * n // n_strata] for h in range(n_strata)]


def stratified_sample(density: Mapping[int, float], n: int, seed: int,
                      n_strata: int = DENSITY_STRATA) -> tuple[list[int], list[int]]:
    """(sorted sample of min(n, live) features, count per stratum): proportional allocation, largest remainders."""
    strata = density_strata(density, n_strata)
    total = sum(len(s) for s in strata)
    n = min(n, total)
    quotas = [n * len(s) / total if total else 0.0 for s in strata]
    counts = [int(q) for q in quotas]
    by_remainder = sorted(range(n_strata), key=lambda h: (-(quotas[h] - counts[h]), h))
    for h in by_remainder[:n - sum(counts)]:
        counts[h] += 1
    rng = random.Random(f"sample-{seed}")
    sample = [fid for stratum, k in zip(strata, counts) for fid in rng.sample(stratum, k)]
    return sorted(sample), counts


def most_important(run: InterpretRun, density: Mapping[int, float], top: int) -> list[int]:
    """The first `top` live features of importance.json, else the `top` densest live features."""
    if run.importance.is_file():
        ranked = [int(f["id"]) for f in json.loads(run.importance.read_text())["features"]]
        missing = [fid for fid in ranked[:top] if fid not in density]
        if missing:
            log.warning("%d of the top %d important features have no evidence or never fire and are skipped (e.g. %s)",
                        len(missing), top, missing[:5])
        return [fid for fid in ranked if fid in density][:top]
    log.info("%s not found: taking the %d densest live features as the most important", run.importance, top)
    return sorted(density, key=lambda fid: (-density[fid], fid))[:top]


def select(run: InterpretRun, evidence: Mapping[int, FeatureEvidence], sample: int, top: int, seed: int) -> Selection:
    """The stratified random sample of `sample` live features and the `top` most important ones."""
    density = live_density(evidence)
    drawn, strata = stratified_sample(density, sample, seed)
    return Selection(drawn, most_important(run, density, top), len(density), seed, strata)


def load_selection(run: InterpretRun) -> Selection | None:
    """The selection recorded in labels.json (None for labels made before it was recorded)."""
    if not run.labels.is_file():
        return None
    d = json.loads(run.labels.read_text()).get("selection")
    return Selection.from_json(d) if d else None


def verified_share(features: Mapping[int, Mapping[str, dict]], backend: str | None = None) -> dict:
    """How many of `features` (id → label backend → scores.json row) have a verified label (of `backend`, else
    of any backend), not counting dense ones; the fraction with its Wilson 95% interval."""
    n = verified = dense = unscored = 0
    for by_backend in features.values():
        rows = [row for b, row in by_backend.items() if backend in (None, b)]
        n += 1
        if any(row.get("dense") for row in rows):
            dense += 1
        elif any(row.get("verified") for row in rows):
            verified += 1
        elif not any(row.get("verified") is not None for row in rows):
            unscored += 1
    lo, hi = wilson_interval(verified, n)
    return {"n": n, "verified": verified, "verified_frac": verified / n if n else None, "verified_ci95": [lo, hi],
            "dense": dense, "unscored": unscored}


def coverage_note(share: dict, live: int) -> str:
    """The coverage row's note: what was estimated, on what, and how."""
    lo, hi = share["verified_ci95"]
    note = (f"verified in the stratified random sample of {share['n']} of {live:,} live features: "
            f"{share['verified_frac']:.1%} [{lo:.1%}, {hi:.1%}] (Wilson 95%)")
    if share["dense"]:
        note += f"; {share['dense']} dense (unverifiable: counted unverified)"
    if share["unscored"]:
        note += f"; {share['unscored']} not scored"
    return note
