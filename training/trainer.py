"""The outline every training loop follows: start or resume, step, log, checkpoint, finish.

A stage subclasses `Trainer` with its own `_train_step` (and, where it needs them, `_fresh_start`,
`_before_loop`, `_after_step`, `_log_metrics`); the loop, the timing, the checkpoint cadence, the
hand-over to Ray Train and the step hooks (where tests inject failures) live here once. All mutable
training state besides weights and optimizer moments is one dataclass, `state` (with a `step`
field): its numbers go to the checkpoint's JSON, its tensors to the safetensors file.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from training.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from training.layout import RunLayout
from training.schedule import lr_at

log = logging.getLogger(__name__)

Reporter = Callable[..., None]
"""`reporter(step, metrics, checkpoint=None)`: TensorBoard scalars, or (with `checkpoint_step` in the
metrics) a checkpoint handed to Ray Train."""


def fail_once_at(step: int, marker: Path) -> Callable[[int], None]:
    """A step hook that raises once at `step` (the marker file keeps the restarted worker from raising again)."""

    def hook(current: int) -> None:
        if current == step and not marker.exists():
            marker.write_text("")
            raise RuntimeError(f"injected failure at step {step} (--fail-at-step)")

    return hook


class Trainer:
    """One worker's training loop. Subclasses set `model`, `opt`, `state`, `total_steps`,
    `tokens_per_step` and `base_lr` in their constructor and implement `_batches` and `_train_step`."""

    lr_floor = 0.0
    """The learning rate decays to lr_floor × base_lr at the end of the run."""
    log_every = 10
    """Steps between logged training metrics."""

    model: torch.nn.Module
    opt: torch.optim.Optimizer
    total_steps: int
    tokens_per_step: int
    base_lr: float
    state: Any

    def __init__(self, cfg: Any, rank: int = 0, world: int = 1, reporter: Reporter | None = None):
        self.cfg, self.rank, self.world, self.reporter = cfg, rank, world, reporter
        self.out = Path(cfg.out)
        self.ckpt_dir = RunLayout(self.out).latest_checkpoint
        self.last_metrics: dict = {}
        self.step_hooks: list[Callable[[int], None]] = []
        if cfg.fail_at_step >= 0:
            self.step_hooks.append(fail_once_at(cfg.fail_at_step, self.out / ".failed_once"))

    # -- what a stage provides -------------------------------------------------------------
    def _fresh_start(self) -> None:
        """Initialise a run that has no checkpoint (weights are already built)."""

    def _batches(self, start_batch: int) -> Iterator:
        raise NotImplementedError

    def _train_step(self, batch) -> Any:
        raise NotImplementedError

    def _before_loop(self) -> None:
        """Stage work before the first step of this (possibly resumed) run."""

    def _after_step(self, out: Any) -> None:
        """Stage work between steps (resampling, held-out evaluation)."""

    def _log_metrics(self, out: Any) -> dict:
        return {}

    # -- the outline -----------------------------------------------------------------------
    def start(self, resume_from: Path | None = None) -> None:
        """Resume from `resume_from` (a checkpoint Ray Train hands over) or this run's own latest
        checkpoint; otherwise start fresh."""
        if resume_from is None and has_checkpoint(self.ckpt_dir):
            resume_from = self.ckpt_dir
        if resume_from is None:
            self._fresh_start()
            return
        scalars, tensors = load_checkpoint(resume_from, self.model, self.opt)
        known = {f.name for f in fields(self.state)}
        self.state = type(self.state)(**{k: v for k, v in {**scalars, **tensors}.items() if k in known})
        log.info("resumed at step %d from %s", self.state.step, resume_from)

    def run(self, progress=None) -> Any:
        """Train to `total_steps`; returns the final state."""
        batches = self._batches(self.state.step)
        t_last, tokens_last = time.perf_counter(), 0
        self.model.train()
        self._before_loop()
        while self.state.step < self.total_steps:
            self._set_lr()
            out = self._train_step(next(batches))
            self.state.step += 1
            tokens_last += self.tokens_per_step
            if progress is not None:
                progress.update(1)
            self._after_step(out)
            if self.state.step % self.log_every == 0 or self.state.step == self.total_steps:
                now = time.perf_counter()
                self._log(out, tokens_last / (now - t_last))
                t_last, tokens_last = now, 0
            for hook in self.step_hooks:
                hook(self.state.step)
            self._maybe_checkpoint()
        return self.state

    def lr(self, step: int) -> float:
        c = self.cfg
        return lr_at(step, self.total_steps, self.base_lr, c.lr_warmup_frac, c.lr_decay_frac, self.lr_floor)

    def _set_lr(self) -> None:
        for group in self.opt.param_groups:
            group["lr"] = self.lr(self.state.step)

    def _clip_and_step(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self._before_optimizer_step()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]], self.cfg.grad_clip)
        self.opt.step()

    def _before_optimizer_step(self) -> None:
        """Gradient surgery between backward and the optimizer step (none by default)."""

    def _log(self, out: Any, tokens_per_s: float) -> None:
        self.last_metrics = {**self._log_metrics(out), "charts/tokens_per_s": tokens_per_s}
        self.report(self.last_metrics)

    def report(self, metrics: dict) -> None:
        if self.reporter is not None:
            self.reporter(self.state.step, metrics)

    def _maybe_checkpoint(self) -> None:
        step = self.state.step
        if step % self.cfg.checkpoint_every and step != self.total_steps:
            return
        if self.rank == 0:
            values = asdict(self.state)
            tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
            scalars = {k: v for k, v in values.items() if k not in tensors}
            save_checkpoint(self.ckpt_dir, self.model, self.opt, scalars, tensors)
        if self.reporter is not None:  # every rank reports; only rank 0 hands over the checkpoint
            self.reporter(step, {"checkpoint_step": step}, checkpoint=self.ckpt_dir if self.rank == 0 else None)
