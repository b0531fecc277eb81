"""The explanation dashboards: hostile strings stay text (terminal and HTML), and the page works in a real browser."""

from __future__ import annotations

import json
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from rich.console import Console

from interpret.dashboard import render_html, render_terminal, write_html
from interpret.explain_records import Explanation, Explanations, Faithfulness, FeatureAttribution, Prediction, TokenActivations

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"

XSS_SCRIPT = "<script>window.__pwned = 1; alert(1)</script>"
XSS_IMG = "<img src=x onerror=\"window.__pwned = 2; alert(2)\">"
XSS_BREAKOUT = "\"quotes\" '</script><script>window.__pwned = 3</script>' {{ 7*7 }} `tick` </div>"


def _feature(fid: int, label: str | None, act: float, attr: float, share: float, peak: int, status: str | None = None,
             auroc: float = 0.81) -> dict:
    return {
        "id": fid, "label": label, "label_status": status, "label_backend": "local" if label else None,
        "activation": act, "max_activation_in_input": act, "attribution": attr,
        "share": share, "peak_position": peak, "peak_token": {3: " 17", 6: "?"}[peak],
        "label_scores": {"detection_auroc": auroc, "fuzzing_auroc": 0.7, "embedding_auroc": 0.66} if label else {},
        "density": 0.012,
        "examples": [
            {"tokens": ["Question", ":", " What", " is", " 4", "2", " +", " 1", "?"],
             "acts": [0.0, 0.0, 0.4, 0.1, 2.5, 3.3, 0.2, 1.1, 0.0], "center": 5},
            {"tokens": ["x", " =", " 9", "\n", "y"], "acts": [0.0, 0.3, 2.0, 0.0, 0.0], "center": 2},
            {"tokens": ["<b>", XSS_IMG, " 7"], "acts": [0.1, 0.5, 1.9], "center": 2},
        ],
        "histogram": {"edges": [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0],
                      "counts": [120, 80, 44, 20, 9, 5, 2, 1]},
        "promoted": [[" 2", 0.9], [" 20", 0.7], [XSS_SCRIPT, 0.1]],
    }


def sample_json() -> dict:
    """An explanation's `--json` object, with hostile strings in every data field."""
    features = [
        _feature(12, "numbers in arithmetic", 3.1, 0.52, 0.18, 3, "verified", 0.91),
        _feature(88, "[bold]x[/] " + XSS_SCRIPT, 2.4, 0.31, 0.11, 3, "verified"),
        _feature(7, XSS_IMG, 1.2, -0.12, 0.04, 3, "unverified", 0.52),
        _feature(301, None, 0.9, 0.05, 0.02, 6),
    ]
    tokens = [
        {"text": "<|im_start|>", "features": []},
        {"text": "What", "features": [{"id": 40, "activation": 2.2, "label": "question words", "label_status": "statistic"},
                                      {"id": 12, "activation": 0.3, "label": "numbers in arithmetic",
                                       "label_status": "verified"}]},
        {"text": " is", "features": [{"id": 41, "activation": 1.0, "label": None, "label_status": None}]},
        {"text": " 17", "features": [{"id": 12, "activation": 3.1, "label": "numbers in arithmetic", "label_status": "verified"},
                                     {"id": 88, "activation": 2.4, "label": "[bold]x[/] " + XSS_SCRIPT,
                                      "label_status": "verified"},
                                     {"id": 7, "activation": 1.2, "label": XSS_IMG, "label_status": "unverified"}]},
        {"text": " +", "features": [{"id": 9, "activation": 1.7, "label": XSS_BREAKOUT, "label_status": "unverified"}]},
        {"text": " 3", "features": [{"id": 12, "activation": 2.9, "label": "numbers in arithmetic", "label_status": "verified"}]},
        {"text": "?", "features": [{"id": 301, "activation": 0.9, "label": None, "label_status": None}]},
    ]
    return {
        "text": "What is 17 + 3? " + XSS_SCRIPT, "model": "embedded:smollm2-135m-instruct", "layer": 9,
        "run": "runs/demo", "decoder": "context", "chat": False,
        "next_token": " 2", "next_token_id": 216, "confidence": 0.41,
        "frozen_next_token": " 2", "frozen_confidence": 0.55, "frozen_prob_of_prediction": 0.5, "agrees_with_frozen": True,
        "top_predictions": [{"token": " 2", "prob": 0.41}, {"token": " 20", "prob": 0.22},
                            {"token": "\n", "prob": 0.08}, {"token": XSS_IMG, "prob": 0.05},
                            {"token": " The", "prob": 0.03}],
        "tokens": tokens,
        "features": features, "active_features": 7,
        "sufficiency": 0.83, "comprehensiveness": 0.64, "sufficient_top1": True, "kept_features": 10,
        "random_sufficiency": 0.21, "random_comprehensiveness": 0.05, "top10_share": 0.45,
        "trace": ["position 3 ' 17': features 12 (numbers in arithmetic), 88 ([bold]x[/])",
                  "position 5 ' 3': feature 12 " + XSS_SCRIPT],
        "explanations": {"attribution": "Numbers in arithmetic and question words drive ' 2'. " + XSS_BREAKOUT,
                         "decoder": "an addition whose answer starts with 2 " + XSS_IMG, "llm": None},
    }


def sample_explanation() -> Explanation:
    return Explanation.from_json(sample_json())


def test_explanation_json_round_trips_exactly():
    d = sample_json()
    assert Explanation.from_json(d).to_json() == d
    assert list(Explanation.from_json(d).to_json()) == list(d)  # same key order as the `--json` contract


class _MarkupAudit(HTMLParser):
    """Collects what a browser would treat as elements: scripts (with their type/id), tags, event-handler attributes."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.scripts: list[dict] = []
        self.tags: list[str] = []
        self.handlers: list[str] = []
        self._in_script: dict | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.handlers += [name for name, _ in attrs if name.startswith("on")]
        if tag == "script":
            self._in_script = {**dict(attrs), "text": ""}
            self.scripts.append(self._in_script)

    def handle_data(self, data):
        if self._in_script is not None:
            self._in_script["text"] += data

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = None


def test_html_escapes_hostile_strings():
    expl = sample_explanation()
    page = render_html(expl)
    audit = _MarkupAudit()
    audit.feed(page)

    assert "<script>alert" not in page and "<script>window.__pwned" not in page
    assert "<img" not in page and "onerror" not in audit.handlers
    assert audit.handlers == []
    assert "img" not in audit.tags
    # exactly the page's two scripts: the JSON data block and the nonce'd code
    assert [(s.get("type"), s.get("id")) for s in audit.scripts] == [("application/json", "data"), (None, None)]
    data_block = page.split('<script type="application/json" id="data">', 1)[1].split("</script>", 1)[0]
    assert "<" not in data_block and ">" not in data_block and "&" not in data_block
    assert json.loads(data_block) == sample_json()  # \u003c escapes round-trip to the same data
    # the strings are still shown, as text
    assert "&lt;img src=x onerror=" in page and "&lt;script&gt;window.__pwned = 1" in page
    assert "{{ 7*7 }}" in page  # not evaluated by the template
    # nothing outside the file is loaded, and only the nonce'd script may run
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    assert audit.scripts[1]["nonce"] and f"'nonce-{audit.scripts[1]['nonce']}'" in page
    for needle in ("http://", "https://", "//cdn", "@import", "url("):
        assert needle not in page.split("<footer>")[0].replace("https://www.w3.org", ""), needle


def test_html_data_block_escapes_line_separators_and_nan():
    expl = sample_explanation()
    expl.features[0].label = "line\u2028sep\u2029para"
    expl.features[0].context.density = float("nan")
    page = render_html(expl)
    data_block = page.split('id="data">', 1)[1].split("</script>", 1)[0]
    assert "\u2028" not in data_block and "\u2029" not in data_block
    parsed = json.loads(data_block)
    assert parsed["features"][0]["label"] == "line\u2028sep\u2029para"
    assert parsed["features"][0]["density"] is None


def test_html_renders_missing_optional_fields():
    """No evidence, labels, scores, random baseline, decoder arch or method 2/3 texts: the page still renders."""
    expl = Explanation(
        text="hi", model="m", layer=1, run="r", decoder=None, chat=False,
        prediction=Prediction("!", 0, 0.5, "?", 0.6, 0.1, False), tokens=[TokenActivations("hi")],
        features=[FeatureAttribution(1, None, 1.0, 1.0, 0.2, 1.0, 0, "hi")], active_features=1,
        faithfulness=Faithfulness(0.5, 0.5, False, 1, 1.0), trace=[], explanations=Explanations("Predicts '!'."))
    page = render_html(expl)
    assert "feature 1" in page and "unlabelled" in page and "disagrees" in page
    render_terminal(expl, Console(record=True, width=120))


def test_write_html_is_atomic_and_returns_path(tmp_path):
    out = write_html(sample_explanation(), tmp_path / "sub" / "explain.html")
    assert out == tmp_path / "sub" / "explain.html" and out.read_text().startswith("<!DOCTYPE html>")
    assert [p.name for p in out.parent.iterdir()] == ["explain.html"]


def test_terminal_prints_markup_and_control_characters_literally():
    expl = sample_explanation()
    expl.explanations.llm = "[red]not red[/red] \x1b[31mESC\x1b[0m"
    console = Console(record=True, width=160, force_terminal=True, color_system="truecolor")
    render_terminal(expl, console)
    text = console.export_text()
    for title in ("INPUT", "NEXT TOKEN", "REASONING TRACE", "INTERPRETATION", "FAITHFULNESS"):
        assert title in text
    assert "[bold]x[/]" in text  # the label, literally
    assert "[red]not red[/red]" in text
    assert "\x1b" not in console.export_text(styles=False) and "\\x1b[31mESC" in text
    assert "numbers in arithmetic" in text and XSS_SCRIPT in text
    assert "0.83" in text and "0.64" in text and "45%" in text and "agrees" in text
    assert "unlabelled" in text


# -- label status: verified labels with their AUROC, the rest marked -------------------------------
def _status_explanation() -> Explanation:
    d = sample_json()
    stats = _feature(40, 'tokens " 17" · n-gram "is 17"', 0.9, 0.05, 0.02, 6, "statistic")
    d["features"] = [_feature(12, "numbers in arithmetic", 3.1, 0.52, 0.18, 3, "verified", 0.91),
                     _feature(7, "<b>guess</b> & co", 1.2, -0.12, 0.04, 3, "unverified", 0.52),
                     {**stats, "label_backend": "stats", "label_scores": {}}]
    return Explanation.from_json(d)


def test_verified_labels_show_their_auroc_and_the_others_are_marked():
    expl = _status_explanation()
    by_id = {f["id"]: f for f in json.loads(json.dumps(expl.to_json()))["features"]}
    assert [by_id[i]["label_status"] for i in (12, 7, 40)] == ["verified", "unverified", "statistic"]
    assert by_id[12]["label_scores"]["detection_auroc"] == 0.91
    assert [f.name for f in expl.features] == ["#12 (numbers in arithmetic)", "#7 (unverified: <b>guess</b> & co)",
                                               '#40 (statistic: tokens " 17" · n-gram "is 17")']

    console = Console(record=True, width=200)
    render_terminal(expl, console)
    text = console.export_text()
    assert "✓ numbers in arithmetic" in text and "0.91" in text
    assert "unverified <b>guess</b> & co" in text and "0.52" in text
    assert 'statistic tokens " 17"' in text
    assert "unverified: a model's label that failed scoring or was not scored" in text  # the legend says what it means

    page = render_html(expl)
    assert "verified · detection AUROC 0.91" in page and "unverified · detection AUROC 0.52" in page
    assert '<span class="badge statistic"' in page and ">statistic</span>" in page
    assert "&lt;b&gt;guess&lt;/b&gt; &amp; co" in page and "<b>guess" not in page  # the label is text


def test_a_label_saved_without_a_status_reads_as_unverified():
    d = sample_json()
    for f in d["features"]:
        f.pop("label_status")
    expl = Explanation.from_json(d)
    assert [f.label_status for f in expl.features] == ["unverified", "unverified", "unverified", None]
    assert "unverified · detection AUROC 0.81" in render_html(expl)


def test_the_llm_is_given_verified_labels_only():
    from interpret.verbalise import verbalise_prompt

    prompt = verbalise_prompt(_status_explanation())
    assert "- numbers in arithmetic: +0.52" in prompt
    assert "guess" not in prompt and "- feature #7 (no verified label): -0.12" in prompt
    assert '- feature #40 (no verified label; statistics: tokens " 17" · n-gram "is 17"): +0.05' in prompt


# -- a real browser ----------------------------------------------------------------------------
def _browser_or_skip():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if chromium and sync_playwright:
        return chromium, sync_playwright
    missing = "chromium" if not chromium else "playwright"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{missing} is not installed; CI must run the browser test (.ci/run installs it)")
    pytest.skip(f"{missing} is not installed (apt-get install chromium / pip install playwright)")


def test_dashboard_in_headless_chromium(tmp_path):
    chromium, sync_playwright = _browser_or_skip()
    expl = sample_explanation()
    page_path = write_html(expl, tmp_path / "explain.html")

    dialogs, errors, requests = [], [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_path.as_uri())
            panel = page.locator("#token-features")

            # the last token's features (the position that predicts) are shown first; hovering ' 17' replaces them
            assert panel.locator(".lbl").all_inner_texts() == ["unlabelled"] and "Position 6" in panel.inner_text()
            page.hover('.tok[data-pos="3"]')
            labels = panel.locator(".lbl").all_inner_texts()
            assert labels == ["numbers in arithmetic", "[bold]x[/] " + XSS_SCRIPT, XSS_IMG]
            assert panel.locator(".status").all_inner_texts() == ["verified", "verified", "unverified"]
            assert panel.locator("img, script").count() == 0
            assert "Position 3" in panel.inner_text() and "3.10" in panel.inner_text()

            # keyboard: focus a token, arrow to the next one
            page.focus('.tok[data-pos="1"]')
            assert panel.locator(".lbl").all_inner_texts() == ["question words", "numbers in arithmetic"]
            page.keyboard.press("ArrowRight")
            assert panel.locator(".lbl").all_inner_texts() == ["unlabelled"]
            page.click('.tok[data-pos="4"]')
            assert panel.locator(".lbl").all_inner_texts() == [XSS_BREAKOUT]

            page.hover('.tok[data-pos="3"]')
            assert page.evaluate("window.__pwned === undefined")
            assert page.locator("img").count() == 0
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        finally:
            browser.close()

    assert dialogs == []
    assert errors == []  # includes CSP violations, so the page's own script was allowed to run
    assert requests == [page_path.as_uri()]  # self-contained: nothing else was fetched
