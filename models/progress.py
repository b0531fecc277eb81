"""Progress bars: one per loop in a command, one per stage in a pipeline.

Every loop draws its bar through `progress_bar(...)`, which takes tqdm's arguments. Run on its own, a command gets a tqdm
bar per loop. Within `stage(title)` (the demo's stages) the loops share the stage's one line instead: it shows the
stage's title, the loop running now and its count, and it is cleared when the stage ends, where the stage prints
its result line. Loops nest (an ablation inside an attribution pass): the inner loop takes the line until it ends,
then the outer one gets it back.

The stage is process-wide, not per thread: the Ray Train driver draws its workers' progress from a thread.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator

from tqdm.auto import tqdm

_lock = threading.Lock()
_stages: list[_Stage] = []


class _Loop:
    """What `progress_bar` returns inside a stage: the subset of tqdm's interface the loops use (iterate, `update`, `n`,
    `refresh`, `close`, context manager), moving the stage's one bar."""

    def __init__(self, stage: _Stage, iterable: Iterable | None, desc: str, total: float | None, unit: str,
                 initial: float, unit_scale: bool = False):
        self.stage, self.iterable, self.desc, self.unit = stage, iterable, desc, unit
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self._n, self.closed = total, initial, False
        self.unit_scale = unit_scale
        stage.push(self)

    @property
    def n(self) -> float:
        return self._n

    @n.setter
    def n(self, value: float) -> None:
        self._n = value
        self.stage.show(self)

    def update(self, n: float = 1) -> None:
        self.n = self._n + n

    def refresh(self) -> None:
        self.stage.show(self)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.stage.pop(self)

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> _Loop:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Stage:
    def __init__(self, title: str):
        self.title = title
        self.loops: list[_Loop] = []
        self.bar = tqdm(total=None, desc=title, leave=False, dynamic_ncols=True)

    def push(self, loop: _Loop) -> None:
        with _lock:
            self.loops.append(loop)
            self._switch(loop)

    def pop(self, loop: _Loop) -> None:
        with _lock:
            if loop in self.loops:
                self.loops.remove(loop)
            if self.loops:
                self._switch(self.loops[-1])

    def _switch(self, loop: _Loop) -> None:
        """The line now shows `loop`: its description, total and count (tqdm's rate restarts with it)."""
        self.bar.unit, self.bar.unit_scale = loop.unit, loop.unit_scale
        self.bar.set_description_str(f"{self.title} · {loop.desc}" if loop.desc else self.title, refresh=False)
        self.bar.reset(total=loop.total)
        self.bar.n = loop.n
        self.bar.refresh()

    def show(self, loop: _Loop) -> None:
        with _lock:
            if self.loops and self.loops[-1] is loop:
                self.bar.update(loop.n - self.bar.n)  # tqdm redraws at most every mininterval, not on every step

    def close(self) -> None:
        self.bar.close()


@contextlib.contextmanager
def stage(title: str) -> Iterator[None]:
    """Within: every `progress_bar` draws on this stage's one line, which is cleared at the end."""
    current = _Stage(title)
    _stages.append(current)
    try:
        yield
    finally:
        _stages.remove(current)
        current.close()


def progress_bar(iterable: Iterable | None = None, *, desc: str = "", total: float | None = None, unit: str = "it",
                 disable: bool = False, leave: bool = True, initial: float = 0, **tqdm_kwargs):
    """tqdm(iterable, desc=..., ...) on its own; inside `stage`, a loop on the stage's line."""
    if disable:
        return tqdm(iterable, total=total, disable=True)
    if _stages:
        return _Loop(_stages[-1], iterable, desc, total, unit, initial, bool(tqdm_kwargs.get("unit_scale")))
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, initial=initial, **tqdm_kwargs)
