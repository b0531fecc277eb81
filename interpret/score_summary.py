"""Verification and summary of label scores (scores.json's "verified" flags and "summary"); see interpret/scoring.py.

A label is verified when its detection AUROC ≥ VERIFIED_AUROC and it exceeds the CONTROL_QUANTILE of its
backend's shuffled-label AUROCs (dense features against the controls of dense features).
"""

from __future__ import annotations

import numpy as np
from rich.table import Table

from interpret.coverage import verified_share
from interpret.label_config import SCORE_KEYS, SCORER_KEYS
from interpret.score_stats import VERIFIED_AUROC, wilson_interval

CONTROL_QUANTILE = 0.95
"""A verified label's detection AUROC exceeds this quantile of its backend's shuffled-label AUROCs."""
HEADERS = dict(zip(SCORE_KEYS, ("detection AUROC", "bal. acc (calibrated)", "fuzzing AUROC", "embedding AUROC")))


def verify(features: dict[str, dict]) -> dict[tuple[str, bool], float]:
    """Mark every row (and its control) verified or not; return the bar per (backend, dense): the
    CONTROL_QUANTILE of that group's control AUROCs."""
    controls: dict[tuple[str, bool], list[float]] = {}
    for by_backend in features.values():
        for backend, row in by_backend.items():
            if (row.get("control") or {}).get("detection_auroc") is not None:
                controls.setdefault((backend, bool(row.get("dense"))), []).append(row["control"]["detection_auroc"])
    bars = {group: float(np.quantile(values, CONTROL_QUANTILE)) for group, values in controls.items()}

    def passes(value: float | None, bar: float | None) -> bool | None:
        return None if value is None or bar is None else value >= VERIFIED_AUROC and value > bar

    for by_backend in features.values():
        for backend, row in by_backend.items():
            bar = bars.get((backend, bool(row.get("dense"))))
            row["verified"] = passes(row.get("detection_auroc"), bar)
            if row.get("control"):
                row["control"]["verified"] = passes(row["control"]["detection_auroc"], bar)
    return bars


def summarise(features: dict[str, dict]) -> dict[str, dict]:
    """Per label backend: the non-dense features' mean scores, verified fraction (Wilson 95% interval) and
    control, the same for the dense features under "dense", and the random sample's verified fraction under
    "sample" (its features without a label of this backend count as unscored)."""
    bars = verify(features)
    groups: dict[str, dict[bool, list[dict]]] = {}
    for by_backend in features.values():
        for backend, row in by_backend.items():
            groups.setdefault(backend, {False: [], True: []})[bool(row.get("dense"))].append(row)
    sample = {fid: by_backend for fid, by_backend in features.items() if any(r.get("sample") for r in by_backend.values())}
    return {backend: {**_group_summary(by_dense[False], bars.get((backend, False))),
                      "dense": _group_summary(by_dense[True], bars.get((backend, True))),
                      "sample": _sample_summary(sample, backend)}
            for backend, by_dense in sorted(groups.items())}


def _sample_summary(sample: dict[str, dict], backend: str) -> dict:
    s = verified_share(sample, backend)
    controls = [row["control"]["verified"] for by_backend in sample.values() for b, row in by_backend.items()
                if b == backend and (row.get("control") or {}).get("verified") is not None]
    if controls:
        s["control_verified_frac"] = sum(controls) / len(controls)
    return s


def _group_summary(rows: list[dict], bar: float | None) -> dict:
    s: dict = {"n": len(rows)}
    for key in SCORE_KEYS:
        values = [r[key] for r in rows if r.get(key) is not None]
        if values:
            s[f"mean_{key}"] = sum(values) / len(values)
    judged = [r["verified"] for r in rows if r.get("verified") is not None]
    if judged:
        k = sum(judged)
        s.update(verified=k, verified_frac=k / len(judged), verified_ci95=list(wilson_interval(k, len(judged))))
    controls = [r["control"] for r in rows if (r.get("control") or {}).get("detection_auroc") is not None]
    if controls:
        s.update(control_mean_detection_auroc=sum(c["detection_auroc"] for c in controls) / len(controls),
                 control_bar=bar, control_verified_frac=sum(bool(c["verified"]) for c in controls) / len(controls))
    return s


def summary_table(summary: dict[str, dict], scorers: list[str], n: int, chance: float) -> Table:
    table = Table(title=f"label scores (means) on {n} + {n} held-out contexts per feature; verified: detection AUROC "
                        f"≥ {VERIFIED_AUROC} and above the {CONTROL_QUANTILE:.0%} quantile of shuffled labels; "
                        f"P(AUROC ≥ {VERIFIED_AUROC} by chance) = {chance:.2%}")
    columns = [key for name in scorers for key in SCORER_KEYS[name] if key in SCORE_KEYS]
    table.add_column("labels")
    for name in ["n", *(HEADERS[key] for key in columns), "verified (95% CI)", "control verified", "dense (verified)",
                 "random sample: verified (95% CI)", "control"]:
        table.add_column(name, justify="right")
    for backend, s in summary.items():
        cells = [f"{s[f'mean_{key}']:.3f}" if f"mean_{key}" in s else "–" for key in columns]
        dense, sample = s["dense"], s.get("sample", {})
        table.add_row(backend, str(s["n"]), *cells, _verified_cell(s), _frac_cell(s.get("control_verified_frac")),
                      f"{dense['n']} ({dense.get('verified', 0)})", _verified_cell(sample),
                      _frac_cell(sample.get("control_verified_frac")))
    return table


def _verified_cell(s: dict) -> str:
    if s.get("verified_frac") is None:
        return "–"
    lo, hi = s["verified_ci95"]
    return f"{s['verified']} = {s['verified_frac']:.0%} ({lo:.0%}–{hi:.0%})"


def _frac_cell(frac: float | None) -> str:
    return "–" if frac is None else f"{frac:.0%}"
