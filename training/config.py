"""Stage configs as JSON records: one round trip for config.json, Ray workers and stage reuse.

A record is the config's fields as JSON values, with local paths made absolute (a Ray worker and a
later stage run in other folders), so that the same record rebuilds the same config anywhere and its
digest says whether a saved stage matches the one requested.
"""

from __future__ import annotations

import hashlib
import json
import types
import typing
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from models.errors import ConfigError
from models.io import read_json
from training.tracking import TrackingConfig

C = TypeVar("C")

VOLATILE = frozenset({"fail_at_step", "workers", "use_gpu", "checkpoint_every", "config", "verbose", "device_map",
                      "max_memory", "offload_folder", "wandb"})
"""Fields that change how a stage runs, not what it produces: ignored when comparing stages."""

SPEC_FIELDS = ("data", "ood")
"""Source-spec fields whose local paths are made absolute."""


def _path_fields(cls: type) -> tuple[set[str], set[str]]:
    """(fields typed Path or Path | None, fields typed tuple[Path, ...])."""
    single, many = set(), set()
    for name, hint in typing.get_type_hints(cls).items():  # Annotated[...] comes back unwrapped
        args = typing.get_args(hint)
        if typing.get_origin(hint) is tuple and Path in args:
            many.add(name)
        elif hint is Path or Path in args:
            single.add(name)
    return single, many


def _absolute_model(model: str) -> str:
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def to_record(cfg: Any) -> dict:
    """The config's fields as JSON values; Paths and local data/model paths absolute."""
    from corpus.sources import absolute_spec

    paths, path_tuples = _path_fields(type(cfg))
    record = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in paths and value is not None:
            value = str(Path(value).expanduser().resolve())
        elif f.name in SPEC_FIELDS and isinstance(value, str) and value.strip():
            value = absolute_spec(value)
        elif f.name == "model" and isinstance(value, str):
            value = _absolute_model(value)
        elif f.name in path_tuples:
            value = [str(Path(v).expanduser().resolve()) for v in value]
        elif isinstance(value, tuple):
            value = list(value)
        record[f.name] = value
    return record


def from_record(cls: type[C], record: dict, **overrides: Any) -> C:
    """Rebuild `cls` from a record (unknown keys are ignored, so older and newer records load)."""
    paths, path_tuples = _path_fields(cls)
    known = {f.name for f in fields(cls)}
    values = {k: v for k, v in {**record, **overrides}.items() if k in known}
    for name in paths & values.keys():
        if values[name] is not None:
            values[name] = Path(values[name])
    for name in path_tuples & values.keys():
        values[name] = tuple(Path(v) for v in values[name])
    return cls(**values)


def typed_options(cls: type, data: dict, where: str) -> dict:
    """A mapping of option: value read from a file (YAML) as `cls`'s fields, each value as its field's type.

    `where` names the file in messages (e.g. "--config F"); unknown options and values of the wrong type are
    ConfigErrors. The values are not validated together: that is `cls`'s own `__post_init__`.
    """
    known = {f.name for f in fields(cls)}
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)} (option names are field names, "
                          "with underscores: train_batch)")
    hints = typing.get_type_hints(cls)
    return {name: _as_field_type(where, name, hints[name], value) for name, value in data.items()}


def _as_field_type(where: str, name: str, hint, value):
    """A YAML value as its field's type: YAML reads paths as strings, and `1e-5` (no dot) as a string too."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    for kind in typing.get_args(hint) if union else (hint,):
        if typing.get_origin(kind) is typing.Literal:
            if value in typing.get_args(kind):
                return value
        elif kind is type(None) or kind is bool or kind is str:
            if isinstance(value, kind):
                return value
        elif kind is Path:
            if isinstance(value, str):
                return Path(value)
        elif kind in (int, float) and not isinstance(value, bool):
            if isinstance(value, int):
                return kind(value)
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue
            if kind is float or number.is_integer():
                return kind(number)
        else:  # a type without a YAML spelling to check: tyro's construction is the check
            return value
    raise ConfigError(f"{where}: {name}: expected {_type_name(hint)}, got {value!r}")


def _type_name(hint) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def pick(cfg: Any, cls: type[C], **overrides: Any) -> C:
    """The `cls` part of a config that holds its fields (e.g. the CorpusConfig of a training config)."""
    assert is_dataclass(cls)
    values = {f.name: getattr(cfg, f.name) for f in fields(cls) if hasattr(cfg, f.name)}
    return cls(**{**values, **overrides})


CORPUS_FIELDS = ("data", "seq_len", "eval_fraction", "ood", "encoding", "text_field")
"""What a later stage reads from the stage before it unless a flag says otherwise."""


def inherit_corpus(cfg: C, earlier: Path, command: str, stage: str) -> C:
    """`cfg` with the corpus settings of the stage whose config.json is `earlier`: a field left at its
    default takes the earlier stage's value; a field set to something else overrides it, and says so."""
    record = read_record(earlier)
    defaults = {f.name: f.default for f in fields(cfg)}
    updates = {}
    for name in CORPUS_FIELDS:
        if name not in record or not hasattr(cfg, name):
            continue
        value, theirs = getattr(cfg, name), record[name]
        if name in SPEC_FIELDS and isinstance(value, str) and value.strip():
            value = to_record(cfg)[name]  # compare specs with absolute paths
        if value == theirs:
            continue
        if getattr(cfg, name) == defaults[name]:
            updates[name] = theirs
        else:
            print(f"{command}: --{name.replace('_', '-')} {getattr(cfg, name)!r} overrides {stage}'s {theirs!r} ({earlier})")
    if updates:
        print(f"{command}: from {stage} ({earlier}): " + ", ".join(f"{k}={v!r}" for k, v in updates.items()))
    return replace(cfg, **updates) if updates else cfg


def digest(record: dict) -> str:
    """A short hash of what a stage produces (volatile fields left out)."""
    stable = {k: v for k, v in record.items() if k not in VOLATILE}
    return hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()[:16]


def differences(saved: dict, wanted: dict) -> list[str]:
    """'name: saved → wanted' for every non-volatile field that differs."""
    keys = sorted((saved.keys() | wanted.keys()) - VOLATILE)
    return [f"{k}: {saved.get(k)!r} → {wanted.get(k)!r}" for k in keys if saved.get(k) != wanted.get(k)]


def read_record(path: Path) -> dict:
    """A saved config.json; a clear error when it is missing or not a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file (the stage's saved config)")
    record = read_json(path)
    if not isinstance(record, dict):
        raise ConfigError(f"{path}: expected a JSON object of option: value")
    return record


@dataclass
class TrainConfig(TrackingConfig):
    """What every training job (SAE, decoder, lens) shares: where it runs, how it fails over, where metrics go."""

    cache_dir: Path = Path("runs/cache")
    """Where activation/teacher caches are kept (and reused)."""

    workers: int = 1
    """Ray Train workers (data-parallel; DDP when > 1)."""

    use_gpu: bool = False
    """Give each worker a GPU."""

    lr_warmup_frac: float = 0.02
    """Fraction of steps of linear learning-rate warm-up."""

    grad_clip: float = 1.0
    """Clip the gradient norm to this value (0 = off)."""

    fail_at_step: int = -1
    """Testing aid: the worker raises once at this step (to exercise Ray's failure recovery)."""

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"--workers: expected at least 1, got {self.workers}")
        super_post = getattr(super(), "__post_init__", None)
        if super_post is not None:
            super_post()
