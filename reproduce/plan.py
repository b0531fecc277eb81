"""The reproduction plan: the Results page's commands as data (`reproduce.yaml`), each stage with what it reads,
where it writes and its expected wall time on the project's 2-core machine.

A plan file is a mapping with `data` (the corpus every `{data}` stands for) and `stages`, a list of stages in run
order. In a stage's command and paths, `{shared}` is `--shared` (the folder of the downloaded corpora), `{out}` the
`--out` root, `{dir}` the stage's own folder (`{out}/<out>`) and `{data}` the plan's corpus.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

from models.errors import ConfigError
from models.io import read_yaml
from training.config import typed_options

PLAN = Path(__file__).resolve().parent.parent / "reproduce.yaml"
"""The repository's plan: the published figures."""

_NAME = re.compile(r"^[a-z0-9][a-z0-9_]*$")
_PLACEHOLDER = re.compile(r"{([^{}]*)}")


@dataclass
class PlanStage:
    """One stage of the plan: one `faithlens` command."""

    name: str
    """Identifier (lower case, digits, underscores), unique in the plan; `--only` and `--from` take it."""

    command: str
    """The `faithlens` command line without `faithlens` (e.g. `sae train --layer 9 ... --out {dir}`)."""

    minutes: float
    """Expected wall time on the project's 2-core machine, from the Results page (or estimated, see `estimated`)."""

    out: str = ""
    """The stage's folder below the `--out` root (`{dir}` in its command), if it has one of its own."""

    reads: str = ""
    """Comma-separated names of earlier stages whose output it reads: when one of them reruns, so does this stage."""

    done: str = ""
    """A file the command writes last: the stage counts as finished only while it exists (a path as in the command)."""

    estimated: bool = False
    """True when `minutes` is an estimate (from measured throughput where the Results page has one), not a timing."""

    figures: str = ""
    """Where the Results page reports this stage's figures (a docs/ page and anchor)."""

    @property
    def args(self) -> list[str]:
        return shlex.split(self.command)

    @property
    def needs(self) -> list[str]:
        return [r.strip() for r in self.reads.split(",") if r.strip()]


@dataclass(frozen=True)
class Plan:
    stages: list[PlanStage]
    source: Path

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def select(self, only: str = "", start: str = "") -> list[PlanStage]:
        """The stages `--only NAME[,NAME]` and `--from NAME` leave, in plan order."""
        chosen = self.stages
        if start:
            i = self._index(start, "--from")
            chosen = chosen[i:]
        if only:
            wanted = [n.strip() for n in only.split(",") if n.strip()]
            for name in wanted:
                self._index(name, "--only")
            chosen = [s for s in chosen if s.name in wanted]
        return chosen

    def _index(self, name: str, flag: str) -> int:
        if name not in self.names:
            raise ConfigError(f"{flag}: no stage {name!r} in {self.source} (stages: {', '.join(self.names)})")
        return self.names.index(name)


def load_plan(path: Path, shared: Path, out: Path) -> Plan:
    """The plan in `path` with its placeholders filled in; a malformed plan is a one-line ConfigError."""
    from faithlens_cli import COMMANDS

    where = f"--plan {path}"
    raw = read_yaml(path, where)
    if not isinstance(raw, dict) or not isinstance(raw.get("stages"), list) or not raw["stages"]:
        raise ConfigError(f"{where}: expected a mapping with a non-empty list `stages` (and optionally `data`)")
    unknown = sorted(set(raw) - {"data", "stages"})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(str, unknown))} (expected data, stages)")
    values = {"shared": str(shared), "out": str(out)}
    values["data"] = _fill(str(raw.get("data", "")), values, f"{where}: data")
    required = [f.name for f in fields(PlanStage) if f.default is MISSING]
    stages: list[PlanStage] = []
    for i, entry in enumerate(raw["stages"], 1):
        at = f"{where}: stage {i}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{at}: expected a mapping of {', '.join(required)}, ..., got {entry!r}")
        missing = [k for k in required if k not in entry]
        if missing:
            raise ConfigError(f"{at}: missing {', '.join(missing)}")
        stage = PlanStage(**typed_options(PlanStage, entry, at))
        at = f"{where}: stage {stage.name!r}"
        if not _NAME.match(stage.name) or stage.name in {s.name for s in stages}:
            raise ConfigError(f"{at}: expected a new name of lower-case letters, digits and underscores")
        if stage.minutes < 0:
            raise ConfigError(f"{at}: minutes: expected a number ≥ 0, got {stage.minutes}")
        later = [r for r in stage.needs if r not in {s.name for s in stages}]
        if later:
            raise ConfigError(f"{at}: reads {', '.join(later)}, which is not an earlier stage")
        stage_values = {**values, "dir": str(out / stage.out) if stage.out else str(out)}
        stage.command = _fill(stage.command, stage_values, f"{at}: command")
        stage.done = _fill(stage.done, stage_values, f"{at}: done")
        _check_command(stage, at, COMMANDS)
        stages.append(stage)
    return Plan(stages, Path(path))


def _fill(text: str, values: dict[str, str], at: str) -> str:
    for key in _PLACEHOLDER.findall(text):
        if key not in values:
            raise ConfigError(f"{at}: unknown placeholder {{{key}}} (expected {', '.join('{' + k + '}' for k in values)})")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def _check_command(stage: PlanStage, at: str, commands) -> None:
    try:
        args = stage.args
    except ValueError as e:
        raise ConfigError(f"{at}: command: {e}") from None
    name = " ".join(args[:2]) if " ".join(args[:2]) in commands else (args[0] if args else "")
    if name not in commands or name in ("reproduce", "demo"):
        raise ConfigError(f"{at}: command: expected a faithlens command (e.g. `sae train ...`), got {stage.command[:40]!r}")


# -- what the runner records when a stage finishes ----------------------------------------------------------------

def marker(out: Path, name: str) -> Path:
    """The record `faithlens reproduce` writes when stage `name` finished (its command and wall time)."""
    return Path(out) / "reproduce" / f"{name}.json"


def read_marker(out: Path, name: str) -> dict | None:
    path = marker(out, name)
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None  # a marker cut short: the stage counts as unfinished
