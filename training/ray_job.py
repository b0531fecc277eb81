"""Running a stage's trainer as a Ray Train job: one place for the Ray plumbing that the SAE and
distillation stages share (start Ray, size the workers, build the trainer on each worker, resume,
fail over, report failures, TensorBoard and W&B).

The same call runs a laptop job (one CPU worker) and a cluster job (more workers, GPUs). A stage
gives `run_stage_job` its config and the import path of a `build(cfg, job, rank, world, reporter)`
function that returns its `Trainer` and a `finish()` that rank 0 calls at the end to save the result.
"""

from __future__ import annotations

import importlib
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
    resume_and_run(trainer, rank, config["desc"])
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

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(log_to_driver=True, configure_logging=False)
    cpus = int(ray.available_resources().get("CPU", 1))
    per_worker = max(1, cpus // workers)
    out = Path(out).resolve()
    trainer = TorchTrainer(
        worker,
        train_loop_config={**loop_config, "threads_per_worker": per_worker},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": per_worker}),
        run_config=RunConfig(
            name="ray", storage_path=str(RunLayout(out).ray_results),
            failure_config=FailureConfig(max_failures=MAX_FAILURES),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise JobError(f"{what} failed after {MAX_FAILURES} retries ({first}); logs under {RunLayout(out).ray_results}") from e
    finally:
        if started_here:
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


def resume_and_run(trainer, rank: int, desc: str):
    """Inside a worker: start from Ray Train's checkpoint when it hands one over (a restarted worker),
    else from the trainer's own, then run with a progress bar on rank 0. Returns the final state.

    `trainer` is a `training.trainer.Trainer`."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            trainer.start(resume_from=Path(directory))
    else:
        trainer.start()
    progress = None
    if rank == 0:
        from ray.experimental.tqdm_ray import tqdm

        progress = tqdm(total=trainer.total_steps, desc=desc)
        progress.update(trainer.state.step)
    state = trainer.run(progress)
    if progress is not None:
        progress.close()
    return state
