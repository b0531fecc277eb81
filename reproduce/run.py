"""`faithlens reproduce` (`make reproduce`): run the plan's stages in order, each in its own process with its own
log, skipping the finished ones.

A stage is finished when its record (`OUT/reproduce/<stage>.json`, written once its command succeeded) holds the
command the plan asks for now, the file its `done` names exists, and no stage it reads finished after it. Anything
else runs the command again: an interrupted stage resumes from its own checkpoint (the training commands do), a
finished one whose command changed reruns.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro
from rich.console import Console

from models.errors import JobError
from models.io import write_json_atomic
from reproduce.plan import PLAN, Plan, PlanStage, load_plan, marker, read_marker


@dataclass
class ReproduceConfig:
    plan: Path = PLAN
    """The plan file (YAML): the stages, their commands and expected wall times; default the published results'."""

    out: Path = Path("runs")
    """Root folder of every stage's output (`{out}` in the plan), and of the stage records and logs (OUT/reproduce/)."""

    shared: Annotated[Path, tyro.conf.arg(aliases=("--data",))] = Path("../shared/data")
    """Folder of the downloaded corpora (`{shared}` in the plan): wikitext2_train.txt, gutenberg/, state_union/,
    gsm8k_train.jsonl."""

    list: bool = False
    """Print the plan (expected wall time, status and folder of every stage) and run nothing."""

    only: str = ""
    """Run only these stages (comma-separated names)."""

    start: Annotated[str, tyro.conf.arg(name="from")] = ""
    """Start at this stage (the earlier ones are neither checked nor run)."""


def stage_status(stage: PlanStage, out: Path, finished_at: dict[str, float]) -> str:
    """done, changed (finished with another command or before a stage it reads), started (output without a
    record: it resumes) or todo."""
    record = read_marker(out, stage.name)
    if record is not None:
        stale = any(finished_at.get(r, 0.0) > record.get("finished", 0.0) for r in stage.needs)
        if record.get("command") != stage.args or stale:
            return "changed"
        if not stage.done or Path(stage.done).exists():
            return "done"
    return "started" if stage.out and (out / stage.out).exists() else "todo"


def _finish_times(plan: Plan, out: Path) -> dict[str, float]:
    return {s.name: (read_marker(out, s.name) or {}).get("finished", 0.0) for s in plan.stages}


def _minutes(m: float, estimated: bool = False) -> str:
    text = f"{m:.0f} min" if m >= 10 else f"{m:.1f} min"
    return f"~{text}" if estimated else text


def print_plan(plan: Plan, chosen: list[PlanStage], out: Path, console: Console) -> None:
    finished = _finish_times(plan, out)
    rows, left = [], 0.0
    for i, stage in enumerate(chosen, 1):
        status = stage_status(stage, out, finished)
        if status != "done":
            left += stage.minutes
        rows.append((str(i), stage.name, _minutes(stage.minutes, stage.estimated), status, stage.out or "-"))
    widths = [max(len(r[c]) for r in rows + [("#", "stage", "expected", "status", "folder")]) for c in range(5)]
    for row in [("#", "stage", "expected", "status", "folder"), *rows]:
        console.print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip(), highlight=False, markup=False)
    total = sum(s.minutes for s in chosen)
    console.print(f"{len(chosen)} stages, {total / 60:.1f} h expected on the 2-core machine, {left / 60:.1f} h of it "
                  f"not done (~ marks an estimate; the others are the wall times the Results page reports)",
                  highlight=False)


def run_stage(stage: PlanStage, out: Path) -> float:
    """Run one stage's command in a child process of this Python, its output in OUT/reproduce/<stage>.log."""
    import faithlens_cli

    log = marker(out, stage.name).with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log.open("a", encoding="utf-8") as f:
        f.write(f"$ faithlens {stage.command}\n")
        f.flush()
        # the script by its path, so the child imports this checkout's modules whatever the working directory
        code = subprocess.run([sys.executable, faithlens_cli.__file__, *stage.args], stdout=f, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL).returncode
    seconds = time.perf_counter() - t0
    if code != 0:
        last = _last_line(log)
        raise JobError(f"stage {stage.name} failed (exit status {code}{': ' + last if last else ''}); its log is {log}; "
                       "rerun the same command to resume from it")
    write_json_atomic(marker(out, stage.name), {"command": stage.args, "seconds": round(seconds, 1), "finished": time.time()})
    return seconds


def _last_line(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""


def run_reproduce(cfg: ReproduceConfig) -> None:
    console = Console(highlight=False, soft_wrap=True)
    plan = load_plan(cfg.plan, cfg.shared, cfg.out)
    chosen = plan.select(cfg.only, cfg.start)
    if cfg.list:
        print_plan(plan, chosen, cfg.out, console)
        return
    console.print(f"reproduce: {len(chosen)} stages into {cfg.out}; logs in {marker(cfg.out, 'x').parent}")
    for i, stage in enumerate(chosen, 1):
        head = f"[{i}/{len(chosen)}] {stage.name}"
        status = stage_status(stage, cfg.out, _finish_times(plan, cfg.out))
        if status == "done":
            console.print(f"{head}: done, skipped")
            continue
        how = {"changed": "rerunning (its command or an input changed)", "started": "resuming"}.get(status, "running")
        console.print(f"{head}: {how}, expected {_minutes(stage.minutes, stage.estimated)}: faithlens {stage.command}")
        seconds = run_stage(stage, cfg.out)
        console.print(f"{head}: finished in {seconds / 60:.1f} min")
    console.print("reproduce: done; compare the figures with the Results page (docs/results.md)")
