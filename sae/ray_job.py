"""Running a training function as a Ray Train job: one place for the Ray plumbing that the SAE and
distillation stages share (start Ray if needed, size the workers, fail over, report failures).

The same call runs a laptop job (one CPU worker) and a cluster job (more workers, GPUs).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from models.errors import JobError

MAX_FAILURES = 3
"""Worker failures Ray Train recovers from (each restart resumes from the last checkpoint)."""


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
            name="ray", storage_path=str(out / "ray_results"),
            failure_config=FailureConfig(max_failures=MAX_FAILURES),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise JobError(f"{what} failed after {MAX_FAILURES} retries ({first}); logs under {out / 'ray_results'}") from e
    finally:
        if started_here:
            ray.shutdown()


def tensorboard_reporter(out: Path, rank: int, step_scale: int, get_metrics: Callable[[], dict]):
    """A `reporter(step, metrics, checkpoint=None)` for training loops: TensorBoard scalars on rank 0
    (x axis = step × step_scale, i.e. tokens), and checkpoints handed to Ray Train on every rank."""
    import ray.train

    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(Path(out) / "tb"))

    def reporter(step, metrics, checkpoint=None):
        if "checkpoint_step" in metrics:
            ckpt = ray.train.Checkpoint.from_directory(str(checkpoint)) if checkpoint is not None else None
            ray.train.report({"step": step, **get_metrics()}, checkpoint=ckpt)
        elif writer is not None:
            for key, value in metrics.items():
                writer.add_scalar(key, value, step * step_scale)
            writer.flush()

    reporter.close = (lambda: writer.close()) if writer is not None else (lambda: None)
    return reporter


def resume_and_run(trainer, rank: int, desc: str):
    """Inside a worker: start from Ray Train's checkpoint when it hands one over (a restarted worker),
    else from the trainer's own, then run with a progress bar on rank 0. Returns the final state.

    `trainer` has `start(resume_from)`, `run(progress)`, `total_steps` and `state.step`."""
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
