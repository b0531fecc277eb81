"""Where a command's logs go: the terminal shows faithlens's own lines and progress bars; Ray's, RLlib's and
other libraries' logs, Python warnings and the Ray workers' output go to LOGS/faithlens.log in the run folder
(its path printed once). `--verbose` shows them on the terminal as well.

Ray and RLlib attach their own stderr handlers to the `ray` and `ray.rllib` loggers when they are imported
(and `ray.init` logs before it returns), so whatever starts Ray goes through `init_ray`, which routes them here.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
from pathlib import Path

OWN_PACKAGES = frozenset({"corpus", "models", "training", "sae", "distill", "rl_env", "interpret", "benchmarks",
                          "faithlens_cli", "__main__"})
"""Top-level packages whose log records the terminal shows without --verbose."""

LOG_NAME = "faithlens.log"


class _State:
    verbose = False
    path: Path | None = None
    announced = False
    handlers: list[logging.Handler] = []
    created: list[Path] = []
    """The log file's folder and those of its parents that did not exist at `setup`, innermost first."""


class _LazyFileHandler(logging.FileHandler):
    """A file handler that creates its folder and file at the first record, so a command that fails on its
    input leaves nothing behind."""

    def __init__(self, path: Path):
        self._path = Path(path)
        super().__init__(self._path, encoding="utf-8", delay=True)

    def _open(self):
        self._path.parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


class _OwnOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.split(".")[0] in OWN_PACKAGES


def log_dir(run: Path) -> Path:
    return Path(run) / "logs"


def setup(run: Path | None, verbose: bool) -> None:
    """Log to RUN/logs/faithlens.log (everything, INFO and up) and to stderr (faithlens's own records; with
    `verbose`, all). Where logging is already configured (pytest, an application embedding faithlens), stderr is
    left to that configuration. Idempotent: a second call replaces what the first installed."""
    close()
    root = logging.getLogger()
    _State.verbose, _State.announced = verbose, False
    _State.path = log_dir(run) / LOG_NAME if run is not None else None
    _State.created = [] if _State.path is None else [p for p in _State.path.parents if not p.exists()]
    embedded = bool(root.handlers)
    if not embedded:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        if not verbose:
            console.addFilter(_OwnOnly())
        _State.handlers.append(console)
        logging.captureWarnings(True)  # warnings.warn → the py.warnings logger → the log file
    if _State.path is not None:
        file = _LazyFileHandler(_State.path)
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        _State.handlers.append(file)
    for handler in _State.handlers:
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    for noisy in ("httpx", "urllib3", "huggingface_hub", "datasets", "transformers", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    route_ray_loggers()


def close(discard: bool = False) -> None:
    """Remove the handlers `setup` installed; with `discard` (a command refused its input), also the log folder
    and the parents it created, so a refused command leaves nothing behind."""
    root = logging.getLogger()
    for handler in _State.handlers:
        root.removeHandler(handler)
        handler.close()
    _State.handlers = []
    if discard and _State.created:
        shutil.rmtree(_State.created[0], ignore_errors=True)
        for folder in _State.created[1:]:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty


def verbose() -> bool:
    return _State.verbose


def log_file() -> Path | None:
    """This command's log file (it exists once something was logged to it)."""
    return _State.path


def announce() -> str | None:
    """'logs: PATH' the first time it is asked for in a command (when the command has a log file), else None."""
    if _State.path is None or _State.announced:
        return None
    _State.announced = True
    shown = "shown here too" if _State.verbose else "--verbose shows them here"
    return f"Ray, RLlib and library logs: {_State.path} ({shown})"


def route_ray_loggers() -> None:
    """Ray's and RLlib's loggers to the root logger (and so to the log file), instead of their own stderr
    handlers; a no-op until Ray is imported. With --verbose their handlers stay."""
    if _State.verbose or "ray" not in sys.modules:
        return
    for name in [n for n in logging.root.manager.loggerDict if n == "ray" or n.startswith("ray.")]:
        logger = logging.getLogger(name)
        streams = [h for h in logger.handlers if type(h) in (logging.StreamHandler, logging._StderrHandler)
                   or type(h).__name__ == "PlainRayHandler"]
        for handler in streams:
            logger.removeHandler(handler)
        if streams:
            logger.propagate = True


def init_ray(**kwargs) -> None:
    """`ray.init(**kwargs)` with Ray's logs routed to the log file and the workers' output kept out of the
    terminal (unless --verbose): it stays in Ray's session folder, copied beside the log by `keep_worker_logs`."""
    import ray

    route_ray_loggers()
    kwargs.setdefault("log_to_driver", _State.verbose)
    kwargs.setdefault("configure_logging", False)
    ray.init(**kwargs)
    route_ray_loggers()
    logging.getLogger(__name__).debug("Ray session folder: %s", _session_logs())


def _session_logs() -> Path | None:
    try:
        import ray._private.worker as worker

        return Path(worker._global_node.get_logs_dir_path())
    except Exception:  # another Ray version, or a client connection: nothing to copy
        return None


def keep_worker_logs(what: str) -> None:
    """Copy the Ray workers' stdout/stderr of this session into LOGS/ray/<what>/ (call before `ray.shutdown`)."""
    source = _session_logs()
    if source is None or _State.path is None or not source.is_dir():
        return
    dest = _State.path.parent / "ray" / what.replace(" ", "-")
    dest.mkdir(parents=True, exist_ok=True)
    for path in source.glob("worker-*"):
        if path.suffix in (".out", ".err") and path.stat().st_size:
            shutil.copyfile(path, dest / path.name)
    logging.getLogger(__name__).info("Ray workers' output of %s copied to %s (from %s)", what, dest, source)


@contextlib.contextmanager
def to_log_file():
    """Within: stdout, and faithlens's own log records, go to the log file only (the demo shows one line per
    stage; the stage's detailed report is in the log). Progress bars (stderr) stay. A no-op with --verbose or
    without a log file."""
    if _State.verbose or _State.path is None:
        yield
        return
    _State.path.parent.mkdir(parents=True, exist_ok=True)
    consoles = [h for h in _State.handlers if not isinstance(h, logging.FileHandler)]
    levels = [h.level for h in consoles]
    with open(_State.path, "a", encoding="utf-8", buffering=1) as stream, contextlib.redirect_stdout(stream):
        for h in consoles:
            h.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for h, level in zip(consoles, levels):
                h.setLevel(level)
