"""Plain records passed between the interpretation steps (evidence → labels → scores → explanations).

They hold decoded strings, not tensors, so labelling backends, scorers and the dashboards can be
written and tested without a model. `to_json`/`from_json` round-trip them through labels.json,
explanation JSON and the HTML dashboard's embedded data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Literal


@dataclass
class Example:
    """A window of text around one position, with one feature's activation at every token."""

    tokens: list[str]
    """Decoded tokens of the window (each token as its own string, whitespace kept)."""
    acts: list[float]
    """The feature's activation at each token of the window (0 where it does not fire)."""
    center: int
    """Index in `tokens` of the position the example was chosen for."""
    quantile: float | None = None
    """For quantile samples: the activation quantile the example was drawn from."""

    @property
    def activation(self) -> float:
        return self.acts[self.center]

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    @classmethod
    def from_json(cls, d: dict) -> Example:
        return cls(tokens=list(d["tokens"]), acts=[float(a) for a in d["acts"]], center=int(d["center"]),
                   quantile=d.get("quantile"))


@dataclass
class FeatureEvidence:
    """Everything known about one SAE latent from a corpus pass; what labellers and scorers read."""

    feature: int
    density: float
    """Fraction of scored tokens on which the feature fires."""
    max_activation: float
    mean_activation: float
    """Mean activation over the tokens where it fires."""
    top: list[Example] = field(default_factory=list)
    """Top-activating contexts, highest first."""
    quantiles: list[Example] = field(default_factory=list)
    """Contexts sampled across the activation distribution (lowest quantile first)."""
    negatives: list[Example] = field(default_factory=list)
    """Contexts from the same corpus where the feature does not fire at all."""
    promoted: list[tuple[str, float]] = field(default_factory=list)
    """Tokens whose logits the feature raises most through the decoder's readout (token, logit per unit activation)."""
    suppressed: list[tuple[str, float]] = field(default_factory=list)
    histogram: tuple[list[float], list[int]] = field(default_factory=lambda: ([], []))
    """(bin edges, counts) of the feature's non-zero activations."""

    def digest(self) -> str:
        """A hash of the evidence a label is built from, for the labelling cache."""
        payload = json.dumps({"top": [asdict(e) for e in self.top], "promoted": self.promoted}, sort_keys=True)
        return hashlib.blake2b(payload.encode(), digest_size=12).hexdigest()

    def to_json(self) -> dict:
        d = asdict(self)
        d["histogram"] = {"edges": list(self.histogram[0]), "counts": list(self.histogram[1])}
        return d

    @classmethod
    def from_json(cls, d: dict) -> FeatureEvidence:
        hist = d.get("histogram") or {"edges": [], "counts": []}
        return cls(
            feature=int(d["feature"]), density=float(d["density"]), max_activation=float(d["max_activation"]),
            mean_activation=float(d["mean_activation"]),
            top=[Example.from_json(e) for e in d.get("top", [])],
            quantiles=[Example.from_json(e) for e in d.get("quantiles", [])],
            negatives=[Example.from_json(e) for e in d.get("negatives", [])],
            promoted=[(str(t), float(v)) for t, v in d.get("promoted", [])],
            suppressed=[(str(t), float(v)) for t, v in d.get("suppressed", [])],
            histogram=(list(hist["edges"]), list(hist["counts"])),
        )


LabelStatus = Literal["verified", "statistic", "unverified"]
"""verified: held-out detection AUROC ≥ 0.8 and above the shuffled-label control; statistic: the stats backend's
summary of the evidence (tokens, n-grams), a description rather than an explanation; unverified: a model's label
that failed scoring or was not scored."""


@dataclass
class ShownLabel:
    """The label the dashboards show for a feature: its best verified label, else its statistics label, else a
    model's unverified label, marked as such."""

    text: str
    backend: str
    """The label backend that made it (local, openai, stats)."""
    status: LabelStatus
    scores: dict[str, float] = field(default_factory=dict)
    """Its scores from scores.json (detection_auroc, ...), when it was scored."""
