"""The two faces of `faithlens explain`: a rich terminal dashboard and one self-contained HTML file.

Both read the plain explanation dict built by `interpret.explain`. Every string in it may come from
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


def _label(label: Any) -> str:
    return _e(label) if label else "[dim italic]unlabelled[/]"


# -- terminal ----------------------------------------------------------------------------------
def _bar(fraction: float | None, width: int = 20) -> str:
    fraction = min(max(fraction or 0.0, 0.0), 1.0)
    filled = round(fraction * width)
    return "[cyan]" + "█" * filled + "[/][dim]" + "░" * (width - filled) + "[/]"


def _input_panel(expl: dict) -> Panel:
    meta = " · ".join(f"{k} {_e(expl[k])}" for k in ("model", "layer", "run", "decoder") if expl.get(k) is not None)
    return Panel(f"[bold]{_e(expl.get('text', ''))}[/]\n[dim]{meta}[/]", title="INPUT", title_align="left")


def _next_token_panel(expl: dict) -> Panel:
    lines = [f"decoder  [bold green]'{_e(expl.get('next_token', ''))}'[/]  {_pct(expl.get('confidence'))}  "
             f"{_bar(_finite(expl.get('confidence')))}"]
    if expl.get("frozen_next_token") is not None:
        agrees = expl.get("agrees_with_frozen")
        verdict = "[green]✓ agrees[/]" if agrees else "[red]✗ disagrees[/]" if agrees is not None else ""
        lines.append(f"frozen   [bold]'{_e(expl['frozen_next_token'])}'[/]  {_pct(expl.get('frozen_confidence'))}  "
                     f"{verdict}")
    top = expl.get("top_predictions") or []
    if top:
        lines.append("[dim]top-5[/]    " + "  ".join(f"'{_e(p.get('token'))}' {_pct(p.get('prob'))}" for p in top))
    return Panel("\n".join(lines), title="NEXT TOKEN", title_align="left")


def _trace_panel(expl: dict) -> Panel:
    body = "\n".join(f"[dim]{i:>2}.[/] {_e(line)}" for i, line in enumerate(expl.get("trace") or [], 1))
    return Panel(body or "[dim]no trace[/]", title="REASONING TRACE", title_align="left")


def _interpretation_panel(expl: dict) -> Panel:
    table = Table(expand=True, box=None, header_style="bold")
    for name, justify in [("#", "right"), ("feature", "right"), ("label", "left"), ("act", "right"),
                          ("attr", "right"), ("share", "right"), ("detect", "right")]:
        table.add_column(name, justify=justify, ratio=4 if name == "label" else None)
    for rank, f in enumerate((expl.get("features") or [])[:TERMINAL_FEATURES], 1):
        attr = _finite(f.get("attribution")) or 0.0
        colour = "green" if attr >= 0 else "red"
        table.add_row(str(rank), _e(f.get("id")), _label(f.get("label")), _num(f.get("activation")),
                      f"[{colour}]{attr:+.3f}[/]", _pct(f.get("share")),
                      _num((f.get("label_scores") or {}).get("detection")))
    texts = [f"[bold]{EXPLANATION_TITLES.get(k, _e(k))}:[/] {_e(v)}"
             for k, v in (expl.get("explanations") or {}).items() if v]
    return Panel(Group(table, "", *texts) if texts else table, title="INTERPRETATION", title_align="left")


def _faithfulness_panel(expl: dict) -> Panel:
    table = Table(expand=True, box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_column(style="dim", ratio=1)
    table.add_row("sufficiency", _num(expl.get("sufficiency")), FAITHFULNESS_MEANINGS["sufficiency"]
                  + (" — top-1 kept" if expl.get("sufficient_top1") else " — top-1 lost"
                     if expl.get("sufficient_top1") is not None else ""))
    table.add_row("comprehensiveness", _num(expl.get("comprehensiveness")), FAITHFULNESS_MEANINGS["comprehensiveness"])
    if expl.get("random_sufficiency") is not None:
        table.add_row("random baseline", f"{_num(expl.get('random_sufficiency'))} / {_num(expl.get('random_comprehensiveness'))}",
                      FAITHFULNESS_MEANINGS["random"])
    table.add_row("kept features", _e(expl.get("kept_features", "—")), FAITHFULNESS_MEANINGS["kept_features"])
    table.add_row("top-10 share", _pct(expl.get("top10_share")), FAITHFULNESS_MEANINGS["top10_share"])
    return Panel(table, title="FAITHFULNESS", title_align="left")


def render_terminal(expl: dict, console: Console) -> None:
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


def _histogram_svg(hist: dict, marker: float | None, width: int = 240, height: int = 56) -> dict | None:
    edges = [e for e in (_finite(e) for e in hist.get("edges") or []) if e is not None]
    counts = [max(_finite(c) or 0.0, 0.0) for c in hist.get("counts") or []]
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


def _feature_view(f: dict, max_attr: float) -> dict:
    attr = _finite(f.get("attribution")) or 0.0
    examples = []
    for ex in (f.get("examples") or [])[:3]:
        acts = [_finite(a) or 0.0 for a in ex.get("acts") or []]
        scale = max(acts, default=0.0)
        center = ex.get("center")
        examples.append([_heat_token(t, acts[i] if i < len(acts) else 0.0, scale, center=(i == center))
                         for i, t in enumerate(ex.get("tokens") or [])])
    scores = [(k, _num(v)) for k, v in (f.get("label_scores") or {}).items()]
    promoted = [(_visible(str(p[0])), _num(p[1])) for p in (f.get("promoted") or [])[:8]
                if isinstance(p, (list, tuple)) and len(p) == 2]
    return {"id": int(f["id"]), "label": f.get("label") or None, "act": _num(f.get("activation")),
            "attr": f"{attr:+.3f}", "attr_w": f"{100 * abs(attr) / max_attr:.1f}" if max_attr > 0 else "0",
            "attr_neg": attr < 0, "share": _pct(f.get("share")), "density": _pct_small(f.get("density")),
            "scores": scores, "examples": examples, "promoted": promoted,
            "hist": _histogram_svg(f.get("histogram") or {}, _finite(f.get("activation")))}


def _pct_small(x: Any) -> str:
    x = _finite(x)
    return "—" if x is None else f"{100 * x:.2g}%"


def _view(expl: dict) -> dict:
    tokens = expl.get("tokens") or []
    peak = [max((_finite(f.get("activation")) or 0.0 for f in t.get("features") or []), default=0.0) for t in tokens]
    scale = max(peak, default=0.0)
    features = expl.get("features") or []
    max_attr = max((abs(_finite(f.get("attribution")) or 0.0) for f in features), default=0.0)
    sufficient = expl.get("sufficient_top1")
    agrees = expl.get("agrees_with_frozen")
    return {
        "text": str(expl.get("text") or ""),
        "meta": [(k, str(expl[k])) for k in ("model", "layer", "run", "decoder") if expl.get(k) is not None],
        "agrees": None if agrees is None else bool(agrees),
        "trace": [str(line) for line in expl.get("trace") or []],
        "tokens": [_heat_token(t.get("text", ""), p, scale, pos=i) for i, (t, p) in enumerate(zip(tokens, peak))],
        "features": [_feature_view(f, max_attr) for f in features],
        "confidence": _pct(expl.get("confidence")), "conf_w": f"{100 * min(max(_finite(expl.get('confidence')) or 0, 0), 1):.1f}",
        "frozen_confidence": _pct(expl.get("frozen_confidence")),
        "top": [(_visible(str(p.get("token", ""))), _pct(p.get("prob")),
                 f"{100 * min(max(_finite(p.get('prob')) or 0, 0), 1):.1f}") for p in expl.get("top_predictions") or []],
        "faith": [("Sufficiency", _num(expl.get("sufficiency")), FAITHFULNESS_MEANINGS["sufficiency"]
                   + ("" if sufficient is None else "; top-1 prediction kept" if sufficient else "; top-1 prediction lost")),
                  ("Comprehensiveness", _num(expl.get("comprehensiveness")), FAITHFULNESS_MEANINGS["comprehensiveness"]),
                  *([("Random baseline", f"{_num(expl.get('random_sufficiency'))} / {_num(expl.get('random_comprehensiveness'))}",
                      FAITHFULNESS_MEANINGS["random"])] if expl.get("random_sufficiency") is not None else []),
                  ("Kept features", str(expl.get("kept_features", "—")), FAITHFULNESS_MEANINGS["kept_features"]),
                  ("Top-10 share", _pct(expl.get("top10_share")), FAITHFULNESS_MEANINGS["top10_share"])],
        "explanations": [(EXPLANATION_TITLES.get(k, k), v) for k, v in (expl.get("explanations") or {}).items() if v],
        "next_token": _visible(str(expl.get("next_token", ""))),
        "frozen_next_token": None if expl.get("frozen_next_token") is None else _visible(str(expl["frozen_next_token"])),
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
def render_html(expl: dict) -> str:
    """One self-contained HTML page (inline CSS and JS, no external loads) for an explanation dict."""
    import jinja2

    data = _json_for_script(expl)
    # The nonce is derived from the page's data so the output is deterministic; data cannot contain it.
    nonce = hashlib.blake2b(data.encode(), digest_size=16).hexdigest()
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(_TEMPLATE)
    # Markup() marks only our own constants and the escaped JSON as safe; every data string is autoescaped.
    return template.render(v=_view(expl), data=Markup(data), nonce=nonce, css=Markup(_CSS), js=Markup(_JS))


def write_html(expl: dict, path: Path) -> Path:
    path = Path(path)
    write_text_atomic(path, render_html(expl))
    return path
