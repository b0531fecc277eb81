"""Stage reuse in a multi-stage run: a saved stage is reused only when the config that produced it is
the one requested; otherwise it reruns, and so does every stage after it that reads its output.

A stage's record is `training.config.to_record` of its config: the config.json a Ray Train job writes,
or a stage record the pipeline writes once the stage finished (see `training.layout.Stage`).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping, Sequence

from models.io import write_json_atomic
from training.config import differences, digest, read_record
from training.layout import Stage


def stage_is_current(stage: Stage, wanted: dict) -> tuple[bool, list[str]]:
    """Whether `stage` finished with the config `wanted` (a record), and if not, why.

    The reasons are the settings that differ ('k: 64 → 32'), or that outputs exist without a record;
    none when the stage simply has not run or not finished with these settings (a Ray Train job then
    resumes from its checkpoint). Only the keys of `wanted` are compared: a job may record more."""
    if not stage.record.is_file():
        left = [p for p in stage.outputs if p.exists()]
        return False, [f"{left[0]} has no saved config"] if left else []
    saved = read_record(stage.record)
    saved = {k: saved.get(k) for k in wanted}
    if digest(saved) != digest(wanted):
        return False, differences(saved, wanted)
    return stage.done.exists(), []


def remove_outputs(stage: Stage) -> None:
    for path in stage.outputs:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


class StagePlan:
    """Decides, stage by stage, which stages of a run folder to reuse.

    `reads` names, for every stage (in the order they run), the stages whose output it reads. A stage
    reruns when its saved config differs from the one requested, or when a stage it reads (directly or
    not) reran. Before a stage reruns, its outputs and those of every stage that reads it are removed,
    so an interrupted rerun never leaves a stale stage behind that a later run would take for current.
    """

    def __init__(self, stages: Mapping[str, Stage], reads: Mapping[str, Sequence[str]],
                 say: Callable[[str], None] = print):
        self.stages, self.reads, self.say = dict(stages), dict(reads), say
        self.forced: dict[str, str] = {}
        """Stage → the stage it reads whose rerun forces it to rerun."""
        self.removed: set[str] = set()
        """Forced stages that had outputs (removed)."""

    def readers(self, name: str) -> list[str]:
        """Every stage that reads `name`'s output, directly or through other stages, in run order."""
        found: list[str] = []
        for other, inputs in self.reads.items():  # a stage is listed after the stages it reads
            if name in inputs or any(i in found for i in inputs):
                found.append(other)
        return found

    def reuse(self, name: str, wanted: dict) -> bool:
        """True if stage `name` can be reused for the config record `wanted`; else it is cleared to rerun."""
        stage = self.stages[name]
        if name in self.forced:
            if name in self.removed:
                self.say(f"{name}: rerunning (it reads the output of {self.forced[name]})")
            return False
        current, why = stage_is_current(stage, wanted)
        if current:
            return True
        readers = self.readers(name)
        if why:
            after = f" and the stages after it ({', '.join(readers)})" if readers else ""
            self.say(f"{name}: {'; '.join(why)}; rerunning {name}{after}")
            remove_outputs(stage)
        for reader in readers:
            self.forced.setdefault(reader, name)
            if any(p.exists() for p in self.stages[reader].outputs):
                self.removed.add(reader)
                remove_outputs(self.stages[reader])
        return False

    def finished(self, name: str, wanted: dict) -> None:
        """Record the config a stage ran with (a Ray Train job already wrote its own)."""
        stage = self.stages[name]
        if not stage.recorded_by_job:
            write_json_atomic(stage.record, wanted)
