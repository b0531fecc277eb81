"""The result of `faithlens explain`: one typed record that the terminal, the HTML page and `--json` all render.

`Explanation.to_json()` is the `--json` contract (a flat object: prediction and faithfulness keys sit at the
top level, features and tokens are lists of objects); `Explanation.from_json` reads that object back, so a
saved `--json` output can be rendered again. Like `interpret.records`, these hold decoded strings and
floats, never tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from interpret.records import Example, LabelStatus


@dataclass
class AblationScore:
    """How well one set of named features accounts for the decoder's prediction y (see `interpret.explain`)."""

    p: float
    """The decoder's probability of y with every feature present."""
    p_keep: float
    """Probability of y when only the named features are kept."""
    p_ablate: float
    """Probability of y when the named features are zeroed."""
    sufficiency: float
    """min(1, p_keep / p)."""
    comprehensiveness: float
    """max(0, (p − p_ablate) / p)."""
    sufficient_top1: bool
    """Whether y stays the argmax with only the named features kept."""


@dataclass
class Faithfulness:
    """The faithfulness block of an explanation: the named features against as many random active ones."""

    sufficiency: float
    comprehensiveness: float
    sufficient_top1: bool
    kept_features: int
    """How many features were named (and kept or ablated)."""
    top10_share: float
    """Σ of the 10 largest |attribution| / Σ |attribution| over all features."""
    random_sufficiency: float | None = None
    """Mean sufficiency of random active features (None when no feature is active)."""
    random_comprehensiveness: float | None = None

    @classmethod
    def measure(cls, named: AblationScore, kept: int, top10_share: float,
                random: list[AblationScore]) -> Faithfulness:
        def mean(xs: list[float]) -> float | None:
            return sum(xs) / len(xs) if xs else None

        return cls(named.sufficiency, named.comprehensiveness, named.sufficient_top1, kept, top10_share,
                   mean([r.sufficiency for r in random]), mean([r.comprehensiveness for r in random]))

    def to_json(self) -> dict:
        return {"sufficiency": self.sufficiency, "comprehensiveness": self.comprehensiveness,
                "sufficient_top1": self.sufficient_top1, "kept_features": self.kept_features,
                "random_sufficiency": self.random_sufficiency, "random_comprehensiveness": self.random_comprehensiveness,
                "top10_share": self.top10_share}

    @classmethod
    def from_json(cls, d: dict) -> Faithfulness:
        return cls(d["sufficiency"], d["comprehensiveness"], d["sufficient_top1"], d["kept_features"], d["top10_share"],
                   d.get("random_sufficiency"), d.get("random_comprehensiveness"))


@dataclass
class TokenProb:
    token: str
    prob: float

    def to_json(self) -> dict:
        return {"token": self.token, "prob": self.prob}


@dataclass
class Prediction:
    """The decoder's next token at the last position, beside the frozen model's."""

    token: str
    token_id: int
    confidence: float
    """The decoder's probability of its token."""
    frozen_token: str
    frozen_confidence: float
    """The frozen model's probability of its own argmax."""
    frozen_prob_of_prediction: float
    """The frozen model's probability of the decoder's token."""
    agrees_with_frozen: bool
    """Same token id as the frozen model's argmax (two ids may decode to the same string)."""
    top: list[TokenProb] = field(default_factory=list)
    """The decoder's five most likely tokens."""

    def to_json(self) -> dict:
        return {"next_token": self.token, "next_token_id": self.token_id, "confidence": self.confidence,
                "frozen_next_token": self.frozen_token, "frozen_confidence": self.frozen_confidence,
                "frozen_prob_of_prediction": self.frozen_prob_of_prediction,
                "agrees_with_frozen": self.agrees_with_frozen, "top_predictions": [p.to_json() for p in self.top]}

    @classmethod
    def from_json(cls, d: dict) -> Prediction:
        return cls(d["next_token"], int(d["next_token_id"]), d["confidence"], d["frozen_next_token"],
                   d["frozen_confidence"], d["frozen_prob_of_prediction"], bool(d["agrees_with_frozen"]),
                   [TokenProb(p["token"], p["prob"]) for p in d.get("top_predictions", [])])


@dataclass
class FeatureContext:
    """What the run's evidence says about a named feature (present only when RUN/interpret has evidence)."""

    density: float
    examples: list[Example]
    """Its top-activating contexts (at most three)."""
    histogram: tuple[list[float], list[int]]
    """(bin edges, counts) of its non-zero activations."""
    promoted: list[tuple[str, float]]
    """Tokens whose logits it raises most (at most eight)."""

    def to_json(self) -> dict:
        return {"density": self.density,
                "examples": [{"tokens": e.tokens, "acts": e.acts, "center": e.center} for e in self.examples],
                "histogram": {"edges": self.histogram[0], "counts": self.histogram[1]},
                "promoted": [list(p) for p in self.promoted]}

    @classmethod
    def from_json(cls, d: dict) -> FeatureContext:
        hist = d.get("histogram") or {"edges": [], "counts": []}
        return cls(d["density"], [Example.from_json(e) for e in d.get("examples", [])],
                   (list(hist["edges"]), list(hist["counts"])), [(str(t), v) for t, v in d.get("promoted", [])])


@dataclass
class FeatureAttribution:
    """One named feature: its attribution to the prediction and where in the input it acts most."""

    id: int
    label: str | None
    activation: float
    """Its activation at the last position (0 if it does not fire there)."""
    max_activation_in_input: float
    attribution: float
    """Signed attribution to the decoder's log-prob of the predicted token, summed over positions."""
    share: float
    """|attribution| / Σ |attribution| over all features."""
    peak_position: int
    """The position carrying most of its |attribution|."""
    peak_token: str
    label_scores: dict[str, float] = field(default_factory=dict)
    """The label's scores (detection_auroc, detection_balanced_acc, fuzzing_auroc, embedding_auroc), if the run has scores."""
    context: FeatureContext | None = None
    label_status: LabelStatus | None = None
    """verified, statistic or unverified (`records.LabelStatus`); None without a label."""
    label_backend: str | None = None
    """The backend that made the label (local, openai, stats)."""

    @property
    def name(self) -> str:
        """"#id (label)" for a verified label; an unverified or statistics label is named as such."""
        if not self.label:
            return f"#{self.id}"
        return f"#{self.id} ({self.label})" if self.label_status == "verified" else f"#{self.id} ({self.label_status}: {self.label})"

    def to_json(self) -> dict:
        d = {"id": self.id, "label": self.label, "label_status": self.label_status, "label_backend": self.label_backend,
             "activation": self.activation, "max_activation_in_input": self.max_activation_in_input,
             "attribution": self.attribution, "share": self.share, "peak_position": self.peak_position,
             "peak_token": self.peak_token, "label_scores": self.label_scores}
        return {**d, **self.context.to_json()} if self.context is not None else d

    @classmethod
    def from_json(cls, d: dict) -> FeatureAttribution:
        return cls(int(d["id"]), d.get("label"), d["activation"], d["max_activation_in_input"], d["attribution"],
                   d["share"], int(d["peak_position"]), d["peak_token"], dict(d.get("label_scores") or {}),
                   FeatureContext.from_json(d) if "density" in d else None, _status(d), d.get("label_backend"))


def _status(d: dict) -> LabelStatus | None:
    """A label's status; a label saved without one (older output) is taken as unverified."""
    return d.get("label_status") or ("unverified" if d.get("label") else None)


@dataclass
class TokenFeature:
    id: int
    activation: float
    label: str | None = None
    label_status: LabelStatus | None = None

    def to_json(self) -> dict:
        return {"id": self.id, "activation": self.activation, "label": self.label, "label_status": self.label_status}


@dataclass
class TokenActivations:
    """One input token and its strongest active features (none at BOS)."""

    text: str
    features: list[TokenFeature] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"text": self.text, "features": [f.to_json() for f in self.features]}

    @classmethod
    def from_json(cls, d: dict) -> TokenActivations:
        return cls(d["text"], [TokenFeature(int(f["id"]), f["activation"], f.get("label"), _status(f))
                               for f in d.get("features", [])])


@dataclass
class Explanations:
    """The prediction in words, by each method that ran (None where it did not)."""

    attribution: str
    """Method 1: built from the signed attributions."""
    decoder: str | None = None
    """Method 2: the trained explanation decoder."""
    llm: str | None = None
    """Method 3: an LLM rewording the ranked labels."""

    def to_json(self) -> dict:
        return {"attribution": self.attribution, "decoder": self.decoder, "llm": self.llm}


@dataclass
class Explanation:
    """Why the decoder predicts its next token for one input, and how faithful that account is."""

    text: str
    model: str
    layer: int
    run: str
    decoder: str | None
    """The decoder's architecture."""
    chat: bool
    """Whether the input was wrapped in the chat template."""
    prediction: Prediction
    tokens: list[TokenActivations]
    features: list[FeatureAttribution]
    """The named features, by |attribution|, strongest first."""
    active_features: int
    """Distinct features active anywhere after BOS."""
    faithfulness: Faithfulness
    trace: list[str]
    """The named features in input order, one line each."""
    explanations: Explanations

    def to_json(self) -> dict:
        return {"text": self.text, "model": self.model, "layer": self.layer, "run": self.run, "decoder": self.decoder,
                "chat": self.chat, **self.prediction.to_json(), "tokens": [t.to_json() for t in self.tokens],
                "features": [f.to_json() for f in self.features], "active_features": self.active_features,
                **self.faithfulness.to_json(), "trace": self.trace, "explanations": self.explanations.to_json()}

    @classmethod
    def from_json(cls, d: dict) -> Explanation:
        words = d.get("explanations") or {}
        return cls(d["text"], d["model"], int(d["layer"]), d["run"], d.get("decoder"), bool(d.get("chat", False)),
                   Prediction.from_json(d), [TokenActivations.from_json(t) for t in d["tokens"]],
                   [FeatureAttribution.from_json(f) for f in d["features"]], int(d["active_features"]),
                   Faithfulness.from_json(d), list(d.get("trace", [])),
                   Explanations(words.get("attribution", ""), words.get("decoder"), words.get("llm")))
