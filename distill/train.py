"""The distillation loop, one worker's view (Ray Train builds it through `distill.job.build_trainer`).

The loop's outline (resume, step, log, checkpoint) is `training.trainer.Trainer`; this module adds the
distillation step and the held-out curve. The targets come from a teacher cache (`--teacher cache`: the
top-k + rest-mass bound) or from the frozen model inside the step (`--teacher online`: exact KL). State
that must survive a restart (step, the curve) lives in `DistillState` and is checkpointed with the
weights and AdamW moments.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from corpus.cache import ActivationCache
from distill.config import DEFAULT_LR, TrainLoopConfig
from distill.data import SequenceBatches, TokenBatches
from distill.heldout import HeldOut
from distill.loss import ce_argmax, kl_exact, kl_topk
from distill.student import student_logits
from distill.teacher import OnlineTeacher
from sae.model import SparseAutoencoder
from training.trainer import Trainer

log = logging.getLogger(__name__)


@dataclass
class DistillState:
    step: int = 0
    curve: list[dict] = field(default_factory=list)
    """Held-out points: {tokens, kl, top1} (exact KL over the full vocabulary)."""


class DistillTrainer(Trainer):
    """Builds optimizer and data around a student for one worker; `run` trains to the end."""

    lr_floor = 0.1
    log_every = 5

    def __init__(self, cfg: TrainLoopConfig, student: nn.Module, sae: SparseAutoencoder | None,
                 source: ActivationCache | OnlineTeacher, layer: int, rank: int = 0, world: int = 1, reporter=None,
                 held_out: HeldOut | None = None):
        super().__init__(cfg, rank, world, reporter)
        self.student = self.model = student
        self.sae, self.held_out = sae, held_out
        self.forward_module = student  # replaced by its DDP wrapper when world > 1
        per_worker = cfg.batch_sequences // world
        if isinstance(source, OnlineTeacher):
            self.teacher: OnlineTeacher | None = source
            self.data = TokenBatches(source.tokens, source.next_ids, per_worker, cfg.seed, rank, world)
        else:
            self.teacher = None
            self.data = SequenceBatches(source, layer, per_worker, cfg.seed, rank, world)
        self.tokens_per_step = cfg.batch_sequences * (source.seq_len - 1)
        self.total_steps = max(1, -(-cfg.tokens // self.tokens_per_step))
        self.base_lr = cfg.lr or DEFAULT_LR[getattr(cfg, "arch", "lens")]
        params = [p for p in student.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=self.base_lr, weight_decay=cfg.weight_decay)
        self.state = DistillState()
        self.eval_steps = sorted({round(i * self.total_steps / cfg.eval_points) for i in range(cfg.eval_points + 1)})

    def _batches(self, start_batch: int):
        return self.data.iterate(start_batch=start_batch)

    def _train_step(self, batch: dict) -> tuple[float, float]:
        if self.teacher is not None:
            batch = self.teacher.fill(batch)
        logits = student_logits(self.forward_module, self.sae, batch["resid"])
        if "teacher.logits" in batch:  # online: the exact distribution
            teacher_logits = batch["teacher.logits"][:, 1:].flatten(0, 1)
            ids = teacher_logits.argmax(-1, keepdim=True)
            per_token = kl_exact(teacher_logits, logits) if self.cfg.loss == "kl" else ce_argmax(ids, logits)
        else:
            ids = batch["teacher.topk_ids"][:, 1:].flatten(0, 1)
            if self.cfg.loss == "kl":
                per_token = kl_topk(ids, batch["teacher.topk_logp"][:, 1:].flatten(0, 1),
                                    batch["teacher.rest_logmass"][:, 1:].flatten(0, 1), logits)
            else:
                per_token = ce_argmax(ids, logits)
        loss = per_token.mean()
        self._clip_and_step(loss)
        top1 = (logits.detach().argmax(-1) == ids[:, 0]).float().mean().item()
        return loss.item(), top1

    def _log_metrics(self, out: tuple[float, float]) -> dict:
        loss, top1 = out
        return {f"distill/{'kl' if self.cfg.loss == 'kl' else 'ce_argmax'}": loss, "distill/top1": top1,
                "distill/lr": self.opt.param_groups[0]["lr"]}

    def _before_loop(self) -> None:
        self._maybe_eval()

    def _after_step(self, out) -> None:
        self._maybe_eval()

    def _maybe_eval(self) -> None:
        if self.held_out is None or self.state.step not in self.eval_steps:
            return
        if any(p["tokens"] == self.state.step * self.tokens_per_step for p in self.state.curve):
            return
        point = {"tokens": self.state.step * self.tokens_per_step, **self.held_out.measure(self.student, self.sae)}
        self.state.curve.append(point)
        log.info("held-out after %d tokens: KL %.3f nats/token, top-1 %.1f%%", point["tokens"], point["kl"], 100 * point["top1"])
        self.report({"distill/heldout_kl": point["kl"], "distill/heldout_top1": point["top1"]})
