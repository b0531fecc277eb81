"""Where faithlens keeps cached files, atomic writes (temporary sibling, then rename), and reads that fail clearly.

Every artifact a command reads (JSON records, YAML configs, safetensors weights) goes through `read_json`,
`read_yaml` or `load_safetensors`: a missing, truncated or malformed file is a `ConfigError` naming the file
and what was expected, never a parser's traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from models.errors import ConfigError

CACHE_ENV = "FAITHLENS_CACHE"


def cache_root() -> Path:
    """The user cache directory: $FAITHLENS_CACHE, else $XDG_CACHE_HOME/faithlens, else ~/.cache/faithlens."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "faithlens"


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; on success rename it onto `path`, on failure delete it.

    Works for files and directories, so a killed process never leaves a half-written artifact
    under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if path.is_dir() and target.is_dir():
            shutil.rmtree(path)
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(path: Path, obj: Any) -> None:
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(text)


def read_json(path: Path, hint: str = "") -> Any:
    """A JSON file's value; `hint` (e.g. "rerun `faithlens sae train`") ends the message when it is unreadable."""
    path = Path(path)
    tail = f"; {hint}" if hint else ""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file{tail}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}){tail}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON (not UTF-8 text at byte {e.start}){tail}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: expected a JSON file, found a folder") from None


def read_yaml(path: Path, what: str) -> Any:
    """A YAML file's value; `what` names it in messages (e.g. "--config F", "sweep file F")."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what}: no such file")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{what}: not valid YAML{where} ({getattr(e, 'problem', None) or type(e).__name__})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what}: not valid YAML (not UTF-8 text at byte {e.start})") from None


def load_safetensors(path: Path, device: str = "cpu") -> dict:
    """A safetensors file's tensors; a truncated or foreign file is a ConfigError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file (expected safetensors weights)")
    try:
        return load_file(str(path), device=device)
    except SafetensorError as e:
        raise ConfigError(f"{path}: truncated, or not a safetensors file ({e}); rerun the command that wrote it") from None
