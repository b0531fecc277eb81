"""Running a stage's trainer as a Ray Train job: one place for the Ray plumbing that the SAE and
distillation stages share (start Ray, size the workers, build the trainer on each worker, resume,
fail over, report failures, TensorBoard and W&B).

The same call runs a laptop job (one CPU worker) and a cluster job (more workers, GPUs). A stage
gives `run_stage_job` its config and the import path of a `build(cfg, job, rank, world, reporter)`
function that returns its `Trainer` and a `finish()` that rank 0 calls at the end to save the result.
"""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from models.errors import JobError
from training.config import from_record, to_record
from training.layout import RunLayout
from training.tracking import MetricWriter, wandb_settings

MAX_FAILURES = 3
"""Worker failures Ray Train recovers from (each restart resumes from the last checkpoint)."""


def run_stage_job(cfg: Any, build: str, job: dict, what: str) -> None:
    """Train on `cfg.workers` Ray Train workers: each rebuilds `cfg` from its record (paths absolute,
    since workers run in another folder), calls `build` ("module:function") and runs the trainer.
    `job` is stage data the builder needs beyond the config (JSON values)."""
    loop_config = {"cls": f"{type(cfg).__module__}:{type(cfg).__qualname__}", "cfg": to_record(cfg),
                   "build": build, "job": job, "desc": what, "wandb": wandb_settings(cfg.wandb, Path(cfg.out).name)}
    run_torch_job(stage_worker, loop_config, Path(cfg.out), cfg.workers, cfg.use_gpu, what)


def _import(ref: str):
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def stage_worker(config: dict) -> None:
    """Ray Train's per-worker entry point for every stage."""
    import ray.train

    cfg = from_record(_import(config["cls"]), config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads_per_worker"])  # not OMP_NUM_THREADS: a user's shell may pin it to 1
    holder: dict = {}
    reporter = metric_reporter(cfg.out, rank, lambda: holder["trainer"], config["wandb"], config["cfg"])
    trainer, finish = _import(config["build"])(cfg, config["job"], rank, world, reporter)
    holder["trainer"] = trainer
    if world > 1:
        trainer.forward_module = ray.train.torch.prepare_model(trainer.model, move_to_device=False)
    resume_and_run(trainer, rank, config["progress"])
    if rank == 0:
        finish()
    reporter.close()


def run_torch_job(worker: Callable[[dict], None], loop_config: dict, out: Path, workers: int, use_gpu: bool,
                  what: str) -> None:
    """Run `worker(loop_config)` on `workers` Ray Train workers; results under OUT/ray_results.

    `loop_config` gets `threads_per_worker` added (the CPUs each worker may use).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from training.logs import init_ray, keep_worker_logs, route_ray_loggers

    started_here = not ray.is_initialized()
    if started_here:
        init_ray()
    route_ray_loggers()
    cpus = int(ray.available_resources().get("CPU", 1))
    per_worker = max(1, cpus // workers)
    out = Path(out).resolve()
    bar = DriverProgress(what)
    trainer = TorchTrainer(
        worker,
        train_loop_config={**loop_config, "threads_per_worker": per_worker, "progress": bar.queue},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": per_worker}),
        run_config=RunConfig(
            name="ray", storage_path=str(RunLayout(out).ray_results),
            failure_config=FailureConfig(max_failures=MAX_FAILURES),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    try:
        with bar:
            trainer.fit()
    except ray.train.TrainingFailedError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise JobError(f"{what} failed after {MAX_FAILURES} retries ({first}); logs under {RunLayout(out).ray_results}") from e
    finally:
        if started_here:
            keep_worker_logs(what)
            ray.shutdown()


def metric_reporter(out: Path, rank: int, get_trainer: Callable[[], Any], wandb: dict | None = None,
                    record: dict | None = None):
    """A `reporter(step, metrics, checkpoint=None)` for training loops: scalars on rank 0 to TensorBoard and, with
    `wandb` (`training.tracking.wandb_settings`), to W&B (x axis = step × the trainer's tokens per step, i.e.
    tokens), and checkpoints handed to Ray Train on every rank with the trainer's last metrics."""
    import ray.train

    writer = MetricWriter(RunLayout(out).tb, wandb, record) if rank == 0 else None

    def reporter(step, metrics, checkpoint=None):
        if "checkpoint_step" in metrics:
            ckpt = ray.train.Checkpoint.from_directory(str(checkpoint)) if checkpoint is not None else None
            ray.train.report({"step": step, **get_trainer().last_metrics}, checkpoint=ckpt)
        elif writer is not None:
            writer.log(metrics, step * get_trainer().tokens_per_step)

    reporter.close = (lambda: writer.close()) if writer is not None else (lambda: None)
    return reporter


def resume_and_run(trainer, rank: int, queue=None):
    """Inside a worker: start from Ray Train's checkpoint when it hands one over (a restarted worker),
    else from the trainer's own, then run, rank 0 sending its progress to the driver's bar through `queue`
    (`DriverProgress.queue`). Returns the final state.

    `trainer` is a `training.trainer.Trainer`."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            trainer.start(resume_from=Path(directory))
    else:
        trainer.start()
    progress = WorkerProgress(queue, trainer.total_steps, trainer.state.step) if rank == 0 and queue is not None else None
    state = trainer.run(progress)
    if progress is not None:
        progress.close()
    return state


class WorkerProgress:
    """The `update` of a tqdm bar, in a Ray Train worker: the step count goes to the driver, which draws the bar
    once, live (a bar drawn in the worker reaches the terminal only through Ray's log forwarding, which
    replays finished bars after later stages)."""

    EVERY_S = 0.5

    def __init__(self, queue, total: int, step: int):
        self.queue, self.n, self.sent_at = queue, step, 0.0
        self.queue.put(("start", total, step))

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.sent_at >= self.EVERY_S:
            self._send()

    def _send(self) -> None:
        self.queue.put(("step", self.n))
        self.sent_at = time.monotonic()

    def close(self) -> None:
        self._send()


class DriverProgress:
    """The driver's progress bar of a Ray Train job, fed by its workers' `WorkerProgress` through a Ray queue
    (a zero-CPU actor, so it also works when the workers run on other nodes)."""

    def __init__(self, desc: str):
        from ray.util.queue import Queue

        self.desc = desc
        self.queue = Queue(actor_options={"num_cpus": 0})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._draw, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        import ray

        ray.kill(self.queue.actor)

    def _draw(self) -> None:
        from ray.util.queue import Empty

        from models.progress import progress_bar

        bar = None
        try:
            while not (self._stop.is_set() and self.queue.empty()):
                try:
                    message = self.queue.get(timeout=0.2)
                except Empty:
                    continue
                if message[0] == "start":  # the first worker, or one Ray Train restarted from a checkpoint
                    if bar is None:
                        bar = progress_bar(total=message[1], desc=self.desc, unit="step")
                    bar.n = message[2]
                elif bar is not None:
                    bar.n = message[1]
                if bar is not None:
                    bar.refresh()
        finally:
            if bar is not None:
                bar.close()
