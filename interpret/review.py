"""`faithlens features review RUN`: score labels by hand in the terminal.

Each answer is saved at once (atomically) to reviews.json, so quitting or a crash loses nothing, and a
rerun skips what was already reviewed:
    {"<id>": {"<backend>": {"score", "reviewer", "label", "time"}}}
"""

from __future__ import annotations

import getpass
import logging
from collections.abc import Callable

from rich.console import Console
from rich.markup import escape
from rich.prompt import Prompt

from interpret.coverage import live_density, most_important
from interpret.label_config import ReviewConfig
from interpret.labels import load_label_records, now_iso, read_json_or
from interpret.records import FeatureEvidence
from interpret.run import InterpretRun
from models.errors import ConfigError
from models.io import read_json, write_json_atomic

log = logging.getLogger(__name__)

Ask = Callable[[str], str]
SHOWN_EXAMPLES = 5


def run_review(cfg: ReviewConfig, ask: Ask | None = None, console: Console | None = None) -> dict:
    """Ask a 0–1 score for each unreviewed label; `ask(prompt) -> answer` replaces the terminal (tests)."""
    console = console or Console()
    ask = ask or (lambda prompt: Prompt.ask(prompt, console=console))
    run = InterpretRun(cfg.run)
    records = load_label_records(run)
    evidence = _evidence_or_empty(run)
    reviewer = cfg.reviewer or getpass.getuser()
    reviews = read_json_or(run.reviews, {})

    queue = [(fid, backend, rec) for fid in _order(run, records, evidence, cfg.top)
             for backend, rec in sorted(records[fid].items())
             if cfg.backend in ("all", backend) and backend not in reviews.get(str(fid), {})]
    console.print(f"{len(queue)} labels to review ({_count(reviews)} already reviewed); "
                  "answer a score 0–1, s to skip, q to quit")
    done = skipped = 0
    for i, (fid, backend, rec) in enumerate(queue, 1):
        _show(console, i, len(queue), fid, backend, rec["label"], evidence.get(fid))
        answer = _ask_score(ask, console)
        if answer == "q":
            break
        if answer == "s":
            skipped += 1
            continue
        reviews.setdefault(str(fid), {})[backend] = {"score": answer, "reviewer": reviewer, "label": rec["label"],
                                                     "time": now_iso()}
        write_json_atomic(run.reviews, reviews)
        done += 1
    console.print(f"reviewed {done}, skipped {skipped}; saved in {run.reviews}")
    return {"reviewed": done, "skipped": skipped, "remaining": len(queue) - done - skipped,
            "reviews": str(run.reviews)}


def _ask_score(ask: Ask, console: Console) -> float | str:
    while True:
        try:
            answer = ask("score 0–1 (s skip, q quit)").strip().lower()
        except EOFError:  # end of input (Ctrl-D, or no terminal): stop, keeping what was saved
            return "q"
        if answer in ("q", "s"):
            return answer
        try:
            score = float(answer)
        except ValueError:
            score = -1.0
        if 0.0 <= score <= 1.0:
            return score
        console.print(f"[red]expected a number from 0 to 1, s or q; got {escape(answer)!s}[/red]")


def _show(console: Console, i: int, n: int, fid: int, backend: str, label: str, ev: FeatureEvidence | None) -> None:
    console.rule(f"[{i}/{n}] feature {fid} · {backend}")
    console.print(f"[bold]{escape(label)}[/bold]")
    if ev is None:
        return
    for ex in ev.top[:SHOWN_EXAMPLES]:
        peak = max(range(len(ex.acts)), key=lambda j: ex.acts[j]) if ex.acts else ex.center
        before, tok, after = "".join(ex.tokens[:peak]), ex.tokens[peak], "".join(ex.tokens[peak + 1:])
        text = f"{escape(before)}[reverse bold]{escape(tok)}[/reverse bold]{escape(after)}"
        console.print(f"  {ex.acts[peak]:7.2f}  " + " ".join(text.split()))
    if ev.promoted:
        console.print("  promotes: " + escape(", ".join(repr(t) for t, _ in ev.promoted[:8])))


def _order(run: InterpretRun, records: dict, evidence: dict, top: int) -> list[int]:
    if run.importance.is_file():
        ranked = [int(f["id"]) for f in read_json(run.importance)["features"]]
        return [fid for fid in ranked if fid in records][:top]
    if evidence:
        return [fid for fid in most_important(run, live_density(evidence), len(evidence)) if fid in records][:top]
    return sorted(records)[:top]


def _evidence_or_empty(run: InterpretRun) -> dict[int, FeatureEvidence]:
    try:
        from interpret.evidence import load_evidence

        return load_evidence(run)
    except (ImportError, ConfigError) as e:
        log.info("reviewing without examples: %s", e)
        return {}


def _count(reviews: dict) -> int:
    return sum(len(v) for v in reviews.values())
