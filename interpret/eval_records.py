"""The result of `faithlens eval`: the success-metrics rows and the baselines, as one typed record.

`EvalReport.to_json()` is eval.json (and `eval --json`); `EvalReport.from_json` reads eval.json back, so a
saved report renders again (the demo prints the table of an earlier run this way). The blocks that other
stages produce (score_corpus's corpora, the tasks result, the layer curve, the SAE metrics) are kept as
those stages return them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple


class Target(NamedTuple):
    """A success metric: what it measures, its target and the test of a value against it."""

    description: str
    target: str
    """The target as text, in the design's wording where the design sets it."""
    test: Callable[[float], bool]
    design: str = ""
    """Empty when the target is the design's as written; otherwise the project set the target itself and this
    is what the design says instead, shown beside it."""


TARGETS: dict[str, Target] = {
    "kl": Target("decoder faithfulness: KL(p_frozen ‖ p_decoder), nats/token", "< 0.5", lambda v: v < 0.5),
    "top1": Target("decoder top-1 agreement with the frozen model", "> 75%", lambda v: v > 0.75),
    "l0": Target("sparsity: active SAE features per token (L0)", "50–100", lambda v: 50 <= v <= 100),
    "next_token_degradation": Target(
        "next-token accuracy degradation vs the frozen model (points; P(argmax = the data's next token))", "< 3 points",
        lambda v: v < 3.0),
    "ood_accuracy_ratio": Target("out-of-domain next-token accuracy on the held-out domain, as a share of the frozen "
                                 "model's", "≥ 80%", lambda v: v >= 0.80),
    "task_degradation": Target("task-suite exact-match degradation vs the frozen model (points)", "< 3 points",
                               lambda v: v < 3.0, "no task-suite target; its < 3 points is the next-token accuracy "
                               "degradation (the row above)"),
    "label_coverage": Target("live features with a verified label (held-out detection AUROC ≥ 0.8, above the "
                             "shuffled-label control), in a stratified random sample", "> 85%", lambda v: v > 0.85),
    "ood_kl": Target("out-of-domain decoder KL, nats/token", "< 1.0", lambda v: v < 1.0,
                     "no out-of-domain KL target; its out-of-domain target is accuracy ≥ 80% of the frozen model's"),
    "explained_variance": Target("SAE reconstruction: explained variance (1 − FVU)", "> 0.95", lambda v: v > 0.95),
    "mse": Target("SAE reconstruction: MSE on normalised activations (E‖x‖² = d), per element", "< 0.01",
                  lambda v: v < 0.01),
    "top10_share": Target("explanation coverage: top-10 share of attribution magnitude per prediction", "≥ 30%",
                          lambda v: v >= 0.30),
}
"""metric key → its target; the report lists its rows in this order."""
PERCENT = {"top1", "label_coverage", "top10_share", "ood_accuracy_ratio"}
"""Metrics shown as percentages."""


@dataclass
class MetricRow:
    """One row of the success-metrics table."""

    metric: str
    """A key of TARGETS."""
    description: str
    target: str
    value: float | None
    """None when the run has nothing to measure it on (see `note`)."""
    passed: bool | None
    note: str = ""
    design: str = ""
    """See `Target.design`: empty when `target` is the design's own."""
    ci95: list[float] | None = None
    """A 95% interval of `value` when it is an estimate from a sample (label coverage)."""

    @classmethod
    def measure(cls, metric: str, value: float | None, note: str = "", ci95: list[float] | None = None) -> MetricRow:
        """The row for `metric`, judged against its target (on the point estimate)."""
        t = TARGETS[metric]
        return cls(metric, t.description, t.target, value, None if value is None else bool(t.test(value)), note, t.design,
                   ci95)

    @property
    def shown_target(self) -> str:
        return self.target if not self.design else f"{self.target} (the project's own; the design: {self.design})"

    @property
    def shown_value(self) -> str:
        if self.value is None:
            return "—"
        shown = f"{self.value:.1%}" if self.metric in PERCENT else f"{self.value:.3f}"
        if self.ci95 is None:
            return shown
        lo, hi = self.ci95
        return f"{shown} [{lo:.1%}, {hi:.1%}]" if self.metric in PERCENT else f"{shown} [{lo:.3f}, {hi:.3f}]"

    def to_json(self) -> dict:
        d = {"metric": self.metric, "description": self.description, "target": self.target, "value": self.value,
             "passed": self.passed, "note": self.note, "design": self.design}
        return d if self.ci95 is None else {**d, "ci95": self.ci95}

    @classmethod
    def from_json(cls, d: dict) -> MetricRow:
        return cls(d["metric"], d["description"], d["target"], d["value"], d["passed"], d.get("note", ""),
                   d.get("design", ""), d.get("ci95"))


@dataclass
class CorpusScore:
    """One method on one corpus. The frozen model has only its cross-entropy."""

    ce: float
    """Cross-entropy on the data's next token, nats/token."""
    kl: float | None = None
    """KL(p_frozen ‖ p_method), nats/token."""
    top1: float | None = None
    """Agreement with the frozen model's argmax."""

    def to_json(self) -> dict:
        return {"ce": self.ce} if self.kl is None else {"kl": self.kl, "top1": self.top1, "ce": self.ce}

    @classmethod
    def from_json(cls, d: dict) -> CorpusScore:
        return cls(d["ce"], d.get("kl"), d.get("top1"))


@dataclass
class Baseline:
    """A method (lens, spliced SAE, decoder, the frozen model) scored on each corpus and, if run, the task suites."""

    corpora: dict[str, CorpusScore] = field(default_factory=dict)
    """Corpus name (in_domain, ood) → score."""
    task_accuracy: float | None = None
    """Overall task-suite exact-match accuracy."""

    @property
    def scored_kl(self) -> bool:
        """Whether it has a KL anywhere (the frozen model, which is the reference, has none)."""
        return any(s.kl is not None for s in self.corpora.values())

    def to_json(self) -> dict:
        d: dict = {c: s.to_json() for c, s in self.corpora.items()}
        if self.task_accuracy is not None:
            d["task_accuracy"] = self.task_accuracy
        return d

    @classmethod
    def from_json(cls, d: dict) -> Baseline:
        return cls({c: CorpusScore.from_json(s) for c, s in d.items() if c != "task_accuracy"}, d.get("task_accuracy"))


@dataclass
class EvalReport:
    """Everything `faithlens eval` measured on one run."""

    run: str
    model: str
    layer: int
    data: str
    """The in-domain source scored."""
    ood: str
    """The out-of-domain source scored ("" if none)."""
    rows: list[MetricRow]
    baselines: dict[str, Baseline]
    """Method name → scores; the supervised (and PPO) decoder rows are the ones the metrics rows judge."""
    layer_curve: list[dict]
    """The logit lens at every layer (`distill.baseline.measure_baseline`'s "layers")."""
    corpora: dict[str, dict]
    """Corpus name → `distill.evaluate.score_corpus` result (tokens, frozen_ce, methods)."""
    sae: dict[str, float]
    """The scalar SAE metrics (l0, fvu, mse_normalized, ...)."""
    tasks: dict | None
    """The task-suite result, or None when no suites were run."""
    labels: dict
    """The label scores' summary from RUN/interpret (empty before `features score`)."""
    decoders: dict[str, str | None]
    """Decoder name → the folder it was loaded from (None: not evaluated)."""
    lens: str | None
    """The tuned lens folder, if one was scored."""
    plots: list[str] = field(default_factory=list)
    """PNG files written for this report."""
    config: dict[str, str] = field(default_factory=dict)
    """The EvalConfig that produced it, every value as a string."""

    def to_json(self) -> dict:
        return {"run": self.run, "model": self.model, "layer": self.layer, "data": self.data, "ood": self.ood,
                "rows": [r.to_json() for r in self.rows],
                "baselines": {m: b.to_json() for m, b in self.baselines.items()},
                "layer_curve": self.layer_curve, "corpora": self.corpora, "sae": self.sae, "tasks": self.tasks,
                "labels": self.labels, "decoders": self.decoders, "lens": self.lens, "plots": self.plots,
                "config": self.config}

    @classmethod
    def from_json(cls, d: dict) -> EvalReport:
        return cls(d["run"], d["model"], int(d["layer"]), d["data"], d["ood"], [MetricRow.from_json(r) for r in d["rows"]],
                   {m: Baseline.from_json(b) for m, b in d["baselines"].items()}, d["layer_curve"], d["corpora"],
                   d["sae"], d.get("tasks"), d.get("labels", {}), d["decoders"], d.get("lens"), d.get("plots", []),
                   d.get("config", {}))
