"""Run a measurement in a fresh spawned process (so its peak RSS is its own) and get its result back,
or its error: a child that fails or dies never leaves the parent waiting."""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_mod
import traceback


def _entry(fn, args, queue) -> None:
    try:
        queue.put(("ok", fn(*args)))
    except BaseException:  # noqa: BLE001  (reported to the parent, which raises)
        queue.put(("error", traceback.format_exc()))


def in_child(fn, *args) -> dict:
    """fn(*args) in a spawned process; fn must be importable (module level) and return a picklable value."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_entry, args=(fn, args, queue))
    proc.start()
    while True:
        try:
            status, value = queue.get(timeout=5)
            break
        except queue_mod.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"benchmark child {fn.__name__} died with exit code {proc.exitcode}") from None
    proc.join()
    if status == "error":
        raise RuntimeError(f"benchmark child {fn.__name__} failed:\n{value}")
    return value
