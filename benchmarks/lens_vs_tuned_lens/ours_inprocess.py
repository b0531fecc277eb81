"""`faithlens lens train` without Ray: the same steps in one plain process (`--runner inprocess`).

    python -m benchmarks.lens_vs_tuned_lens.ours_inprocess CONFIG.json

CONFIG.json is a `LensTrainConfig` record (`training.config.to_record`). The teacher source is made as the
command makes it (`distill.job.teacher_source`: the cache build, or the online token table), then the trainer a
Ray Train worker would build (`distill.job.build_trainer`, rank 0 of 1) runs to the end and saves the lens and
metrics.json as rank 0 does. Only the Ray plumbing is left out: TensorBoard gets the same scalars, checkpoints
are written but handed to no one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from distill.config import LensTrainConfig
from distill.job import build_trainer, teacher_source
from models.io import write_json_atomic
from models.loading import load_frozen
from training.config import from_record, to_record
from training.layout import RunLayout


def local_reporter(out: Path, get_trainer):
    """`training.ray_job.tensorboard_reporter` without Ray: scalars at x = tokens; checkpoint hand-overs ignored."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(RunLayout(out).tb))

    def reporter(step, metrics, checkpoint=None):
        if "checkpoint_step" in metrics:
            return
        for key, value in metrics.items():
            writer.add_scalar(key, value, step * get_trainer().tokens_per_step)
        writer.flush()

    reporter.close = writer.close
    return reporter


def main(config_path: str) -> None:
    cfg = from_record(LensTrainConfig, json.loads(Path(config_path).read_text()))
    frozen = load_frozen(cfg)
    frozen.check_layer(cfg.layer)
    source = teacher_source(cfg, frozen, cfg.layer)
    del frozen  # build_trainer loads its own copy, as a worker does
    write_json_atomic(RunLayout(cfg.out).config, {"kind": "lens", "layer": cfg.layer, **to_record(cfg), **source})
    holder: dict = {}
    reporter = local_reporter(Path(cfg.out), lambda: holder["trainer"])
    trainer, finish = build_trainer(cfg, {"layer": cfg.layer, **source}, 0, 1, reporter)
    holder["trainer"] = trainer
    trainer.start()
    trainer.run()
    finish()
    reporter.close()


if __name__ == "__main__":
    main(sys.argv[1])
