"""The two faces of `faithlens explain`: a rich terminal dashboard and one self-contained HTML file.

Both render the `Explanation` record built by `interpret.explain` (the HTML page also embeds its `--json` object).
Every string in it may come from
data (corpus text, model output, LLM labels), so the terminal side escapes rich markup and control
characters, and the HTML side autoescapes all markup, embeds the data as JSON with `<`, `>`, `&`,
U+2028/9 escaped, builds the token panel with `textContent` only, and ships a Content-Security-Policy
that allows nothing but the page's own nonce'd script and inline styles.
"""

from __future__ import annotations

import hashlib
import json
import math
import unicodedata
from pathlib import Path
from typing import Any

from markupsafe import Markup
from rich.console import Console, Group
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from interpret.dashboard_assets import _CSS, _JS, _TEMPLATE
from interpret.explain_records import Explanation, Faithfulness, FeatureAttribution
from models.io import write_text_atomic

TERMINAL_FEATURES = 12
"""Rows of the terminal INTERPRETATION table (the HTML page shows every feature it is given)."""

FAITHFULNESS_MEANINGS = {
    "sufficiency": "share of the prediction recovered from the kept features alone (1 = they suffice)",
    "comprehensiveness": "drop in the prediction when the kept features are removed (high = nothing important left out)",
    "kept_features": "features kept for the sufficiency / comprehensiveness tests",
    "random": "sufficiency / comprehensiveness of as many random active features (mean of 5 draws)",
    "top10_share": "share of total |attribution| carried by the 10 strongest features (high = concentrated)",
}

EXPLANATION_TITLES = {"attribution": "From feature attributions", "decoder": "Explanation decoder", "llm": "LLM"}

LABEL_STATUS_MEANINGS = {
    "verified": "verified: held-out detection AUROC ≥ 0.8, above the shuffled-label control",
    "statistic": "statistic: tokens and n-grams where the feature fires, a description, not a verified explanation",
    "unverified": "unverified: a model's label that failed scoring or was not scored; not an explanation",
}
"""What each label status means (`records.LabelStatus`), shown beside the labels in both dashboards."""


# -- shared formatting -------------------------------------------------------------------------
def _finite(x: Any) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _num(x: Any, digits: int = 2) -> str:
    x = _finite(x)
    return "—" if x is None else f"{x:.{digits}f}"


def _pct(x: Any) -> str:
    x = _finite(x)
    return "—" if x is None else f"{100 * x:.0f}%"


def _visible(token: str) -> str:
    """A token with its whitespace made visible and control characters spelled out."""
    out = []
    for ch in str(token):
        if ch == "\n":
            out.append("⏎")
        elif ch == "\t":
            out.append("⇥")
        elif unicodedata.category(ch) in ("Cc", "Cf"):  # ESC, NUL, bidi overrides...: never reach the terminal raw
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def _e(text: Any) -> str:
    """Data → safe rich markup (literal brackets, no raw control characters)."""
    return escape(_visible("" if text is None else str(text)))


def _meta(expl: Explanation) -> list[tuple[str, str]]:
    return [(k, str(v)) for k, v in (("model", expl.model), ("layer", expl.layer), ("run", expl.run),
                                     ("decoder", expl.decoder)) if v is not None]


def _status(status: Any) -> str:
    """A known label status; anything else (e.g. from a hand-edited JSON) is shown as unverified."""
    return status if status in LABEL_STATUS_MEANINGS else "unverified"


def _label(f: FeatureAttribution) -> str:
    if not f.label:
        return "[dim italic]unlabelled[/]"
    status = _status(f.label_status)
    if status == "verified":
        return f"[green]✓[/] {_e(f.label)}"
    return f"[yellow]{status}[/] [dim]{_e(f.label)}[/]"


# -- terminal ----------------------------------------------------------------------------------
def _bar(fraction: float | None, width: int = 20) -> str:
    fraction = min(max(fraction or 0.0, 0.0), 1.0)
    filled = round(fraction * width)
    return "[cyan]" + "█" * filled + "[/][dim]" + "░" * (width - filled) + "[/]"


def _input_panel(expl: Explanation) -> Panel:
    meta = " · ".join(f"{k} {_e(v)}" for k, v in _meta(expl))
    return Panel(f"[bold]{_e(expl.text)}[/]\n[dim]{meta}[/]", title="INPUT", title_align="left")


def _next_token_panel(expl: Explanation) -> Panel:
    pred = expl.prediction
    verdict = "[green]✓ agrees[/]" if pred.agrees_with_frozen else "[red]✗ disagrees[/]"
    lines = [f"decoder  [bold green]'{_e(pred.token)}'[/]  {_pct(pred.confidence)}  {_bar(_finite(pred.confidence))}",
             f"frozen   [bold]'{_e(pred.frozen_token)}'[/]  {_pct(pred.frozen_confidence)}  {verdict}"]
    if pred.top:
        lines.append("[dim]top-5[/]    " + "  ".join(f"'{_e(p.token)}' {_pct(p.prob)}" for p in pred.top))
    return Panel("\n".join(lines), title="NEXT TOKEN", title_align="left")


def _trace_panel(expl: Explanation) -> Panel:
    body = "\n".join(f"[dim]{i:>2}.[/] {_e(line)}" for i, line in enumerate(expl.trace, 1))
    return Panel(body or "[dim]no trace[/]", title="REASONING TRACE", title_align="left")


def _interpretation_panel(expl: Explanation) -> Panel:
    table = Table(expand=True, box=None, header_style="bold")
    # "peak act": its largest activation over the input (a feature carrying attribution from an earlier position
    # may not fire at the last one)
    for name, justify in [("#", "right"), ("feature", "right"), ("label", "left"), ("peak act", "right"),
                          ("attr", "right"), ("share", "right"), ("det. AUROC", "right")]:
        table.add_column(name, justify=justify, ratio=4 if name == "label" else None)
    for rank, f in enumerate(expl.features[:TERMINAL_FEATURES], 1):
        attr = _finite(f.attribution) or 0.0
        colour = "green" if attr >= 0 else "red"
        table.add_row(str(rank), _e(f.id), _label(f), _num(f.max_activation_in_input), f"[{colour}]{attr:+.3f}[/]",
                      _pct(f.share), _num(f.label_scores.get("detection_auroc")))
    statuses = {_status(f.label_status) for f in expl.features[:TERMINAL_FEATURES] if f.label}
    legend = [f"[dim]{_e(LABEL_STATUS_MEANINGS[s])}[/]" for s in LABEL_STATUS_MEANINGS if s in statuses]
    texts = [f"[bold]{EXPLANATION_TITLES[k]}:[/] {_e(v)}" for k, v in expl.explanations.to_json().items() if v]
    return Panel(Group(table, *legend, *([""] + texts if texts else [])), title="INTERPRETATION", title_align="left")


def _faithfulness_rows(faith: Faithfulness, top1_kept: str, top1_lost: str) -> list[tuple[str, str, str]]:
    """(name, value, meaning) rows shared by the terminal panel and the HTML card."""
    rows = [("Sufficiency", _num(faith.sufficiency),
             FAITHFULNESS_MEANINGS["sufficiency"] + (top1_kept if faith.sufficient_top1 else top1_lost)),
            ("Comprehensiveness", _num(faith.comprehensiveness), FAITHFULNESS_MEANINGS["comprehensiveness"])]
    if faith.random_sufficiency is not None:
        rows.append(("Random baseline", f"{_num(faith.random_sufficiency)} / {_num(faith.random_comprehensiveness)}",
                     FAITHFULNESS_MEANINGS["random"]))
    rows += [("Kept features", str(faith.kept_features), FAITHFULNESS_MEANINGS["kept_features"]),
             ("Top-10 share", _pct(faith.top10_share), FAITHFULNESS_MEANINGS["top10_share"])]
    return rows


def _faithfulness_panel(expl: Explanation) -> Panel:
    table = Table(expand=True, box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_column(style="dim", ratio=1)
    for name, value, meaning in _faithfulness_rows(expl.faithfulness, " — top-1 kept", " — top-1 lost"):
        table.add_row(name.lower(), _e(value), meaning)
    return Panel(table, title="FAITHFULNESS", title_align="left")


def render_terminal(expl: Explanation, console: Console) -> None:
    """Print the explanation as five rich panels: input, next token, trace, interpretation, faithfulness."""
    for panel in (_input_panel(expl), _next_token_panel(expl), _trace_panel(expl),
                  _interpretation_panel(expl), _faithfulness_panel(expl)):
        console.print(panel)


# -- HTML: view model --------------------------------------------------------------------------
def _heat(x: float) -> str:
    """Background for an activation already scaled to [0, 1] (transparent at 0)."""
    x = min(max(x, 0.0), 1.0)
    return "transparent" if x <= 0 else f"rgba(245, 140, 20, {0.10 + 0.80 * x:.3f})"


def _heat_token(text: str, act: float, scale: float, **extra) -> dict:
    x = act / scale if scale > 0 else 0.0
    return {"text": _visible(text), "act": _num(act, 3), "bg": _heat(x), "hot": x > 0.6, **extra}


def _histogram_svg(edges: list[float], counts: list[int], marker: float | None, width: int = 240,
                   height: int = 56) -> dict | None:
    edges = [e for e in (_finite(e) for e in edges) if e is not None]
    counts = [max(_finite(c) or 0.0, 0.0) for c in counts]
    if len(counts) == 0 or len(edges) != len(counts) + 1 or edges[-1] <= edges[0]:
        return None
    top = max(math.log1p(c) for c in counts) or 1.0
    bw = width / len(counts)
    bars = [{"x": f"{i * bw:.2f}", "w": f"{max(bw - 1, 0.5):.2f}", "h": f"{height * math.log1p(c) / top:.2f}",
             "y": f"{height - height * math.log1p(c) / top:.2f}", "count": int(c),
             "lo": _num(edges[i]), "hi": _num(edges[i + 1])} for i, c in enumerate(counts)]
    mx = None
    if marker is not None and edges[0] <= marker <= edges[-1]:
        mx = f"{width * (marker - edges[0]) / (edges[-1] - edges[0]):.2f}"
    return {"w": width, "h": height, "bars": bars, "marker": mx, "lo": _num(edges[0]), "hi": _num(edges[-1])}


def _feature_view(f: FeatureAttribution, max_attr: float) -> dict:
    attr = _finite(f.attribution) or 0.0
    ctx = f.context
    examples = []
    for ex in (ctx.examples if ctx else [])[:3]:
        acts = [_finite(a) or 0.0 for a in ex.acts]
        scale = max(acts, default=0.0)
        examples.append([_heat_token(t, acts[i] if i < len(acts) else 0.0, scale, center=(i == ex.center))
                         for i, t in enumerate(ex.tokens)])
    status = _status(f.label_status) if f.label else None
    return {"id": f.id, "label": f.label or None, "status": status,
            "status_text": _status_text(status, f.label_scores.get("detection_auroc")) if status else None,
            "status_meaning": LABEL_STATUS_MEANINGS.get(status, ""), "act": _num(f.max_activation_in_input),
            "attr": f"{attr:+.3f}", "attr_w": f"{100 * abs(attr) / max_attr:.1f}" if max_attr > 0 else "0",
            "attr_neg": attr < 0, "share": _pct(f.share), "density": _pct_small(ctx.density if ctx else None),
            "scores": [(k, _num(v)) for k, v in f.label_scores.items()], "examples": examples,
            "promoted": [(_visible(str(t)), _num(v)) for t, v in (ctx.promoted if ctx else [])[:8]],
            "hist": _histogram_svg(*ctx.histogram, _finite(f.max_activation_in_input)) if ctx else None}


def _status_text(status: str, auroc: Any) -> str:
    """The badge beside a label: its status and detection AUROC ("not scored" for an unscored model label)."""
    if _finite(auroc) is not None:
        return f"{status} · detection AUROC {_num(auroc)}"
    return status if status == "statistic" else f"{status} · not scored"


def _pct_small(x: Any) -> str:
    x = _finite(x)
    return "—" if x is None else f"{100 * x:.2g}%"


def _width(p: Any) -> str:
    return f"{100 * min(max(_finite(p) or 0, 0), 1):.1f}"


def _view(expl: Explanation) -> dict:
    peak = [max((_finite(f.activation) or 0.0 for f in t.features), default=0.0) for t in expl.tokens]
    scale = max(peak, default=0.0)
    max_attr = max((abs(_finite(f.attribution) or 0.0) for f in expl.features), default=0.0)
    pred = expl.prediction
    return {
        "text": expl.text,
        "meta": _meta(expl),
        "agrees": pred.agrees_with_frozen,
        "trace": expl.trace,
        "tokens": [_heat_token(t.text, p, scale, pos=i) for i, (t, p) in enumerate(zip(expl.tokens, peak))],
        "features": [_feature_view(f, max_attr) for f in expl.features],
        "confidence": _pct(pred.confidence), "conf_w": _width(pred.confidence),
        "frozen_confidence": _pct(pred.frozen_confidence),
        "top": [(_visible(p.token), _pct(p.prob), _width(p.prob)) for p in pred.top],
        "faith": _faithfulness_rows(expl.faithfulness, "; top-1 prediction kept", "; top-1 prediction lost"),
        "explanations": [(EXPLANATION_TITLES[k], v) for k, v in expl.explanations.to_json().items() if v],
        "next_token": _visible(pred.token),
        "frozen_next_token": _visible(pred.frozen_token),
    }


def _json_for_script(obj: Any) -> str:
    """JSON that can sit inside <script type="application/json">: nothing in it can close the tag or start markup."""
    text = json.dumps(_sanitize(obj), ensure_ascii=False, allow_nan=False)
    for ch, esc in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def _sanitize(obj: Any) -> Any:
    """NaN/inf → null (JSON.parse rejects them), tuples → lists, keys → strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_sanitize(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return _sanitize(float(obj)) if isinstance(_finite(obj), float) else str(obj)


# -- HTML: rendering ---------------------------------------------------------------------------
def render_html(expl: Explanation) -> str:
    """One self-contained HTML page (inline CSS and JS, no external loads) for an explanation."""
    import jinja2

    # the page embeds the `--json` object itself; its script reads the token strip from it
    data = _json_for_script(expl.to_json())
    # The nonce is derived from the page's data so the output is deterministic; data cannot contain it.
    nonce = hashlib.blake2b(data.encode(), digest_size=16).hexdigest()
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(_TEMPLATE)
    # Markup() marks only our own constants and the escaped JSON as safe; every data string is autoescaped.
    return template.render(v=_view(expl), data=Markup(data), nonce=nonce, css=Markup(_CSS), js=Markup(_JS))


def write_html(expl: Explanation, path: Path) -> Path:
    path = Path(path)
    write_text_atomic(path, render_html(expl))
    return path
