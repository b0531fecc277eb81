"""The distillation loop, one worker's view (Ray Train calls `distill.job.train_worker`).

State that must survive a restart (weights, AdamW moments, step, the held-out curve) lives in
`DistillState` and is checkpointed as safetensors + JSON, never pickled.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from corpus.cache import ActivationCache
from corpus.packing import sequences
from distill.config import DEFAULT_LR, TrainLoopConfig
from distill.data import SequenceBatches
from distill.loss import ce_argmax, kl_full, kl_topk
from distill.student import student_logits
from models.frozen import FrozenLM
from models.io import atomic_path
from sae.model import SparseAutoencoder
from sae.train import restore_training_tensors, training_tensors

log = logging.getLogger(__name__)


@dataclass
class DistillState:
    step: int = 0
    curve: list[dict] = field(default_factory=list)
    """Held-out points: {tokens, kl, top1} (exact KL over the full vocabulary)."""

    def save(self, directory: Path, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        tensors = training_tensors(model, opt)
        with atomic_path(Path(directory)) as tmp:
            tmp.mkdir()
            save_file(tensors, str(tmp / "state.safetensors"))
            (tmp / "state.json").write_text(json.dumps({"step": self.step, "curve": self.curve}))

    @classmethod
    def load(cls, directory: Path, model: nn.Module, opt: torch.optim.Optimizer) -> DistillState:
        restore_training_tensors(load_file(str(Path(directory) / "state.safetensors")), model, opt)
        return cls(**json.loads((Path(directory) / "state.json").read_text()))


def lr_at(step: int, total: int, cfg: TrainLoopConfig, base_lr: float) -> float:
    """Linear warm-up, constant, then linear decay to 10% over the last `lr_decay_frac` of the run."""
    warm = max(1, int(cfg.lr_warmup_frac * total))
    decay_start = int((1 - cfg.lr_decay_frac) * total)
    if step < warm:
        return base_lr * (step + 1) / warm
    if cfg.lr_decay_frac > 0 and step >= decay_start:
        return base_lr * (0.1 + 0.9 * max(0.0, (total - step) / max(1, total - decay_start)))
    return base_lr


class HeldOut:
    """A fixed held-out sample with exact teacher log-probs, for the KL-vs-tokens curve."""

    def __init__(self, cfg: TrainLoopConfig, frozen: FrozenLM, layer: int, batch_size: int = 4):
        eval_cfg = replace(cfg, split="eval", tokens=cfg.eval_tokens)
        seqs = list(sequences(eval_cfg, frozen.tokenizer, frozen.bos_token_id, frozen.eos_token_id, frozen))
        self.batches = []
        for start in range(0, len(seqs), batch_size):
            ids = torch.from_numpy(np.stack([p.tokens for p in seqs[start : start + batch_size]]))
            logits, store = frozen.forward(ids, [layer])
            # bf16 log-probs keep the sample small (~0.1 nat/token of rounding on tiny probabilities only)
            self.batches.append((store[layer].float(), logits[:, 1:].float().log_softmax(-1).to(torch.bfloat16)))
        self.tokens = sum(t.shape[0] * t.shape[1] for _, t in self.batches)

    @torch.no_grad()
    def measure(self, student: nn.Module, sae: SparseAutoencoder | None) -> dict:
        kl = kl_reverse = top1 = 0.0
        was_training = student.training
        student.eval()
        for resid, teacher_logp in self.batches:
            logits = student_logits(student, sae, resid)
            teacher = teacher_logp.flatten(0, 1).float()
            kl += kl_full(teacher, logits).sum().item()
            # KL(p_student ‖ p_frozen): what the RL reward r_faith − log π(a) optimises in expectation
            kl_reverse += kl_full(logits.float().log_softmax(-1), teacher).sum().item()
            top1 += (logits.argmax(-1) == teacher.argmax(-1)).sum().item()
        student.train(was_training)
        return {"kl": kl / self.tokens, "kl_reverse": kl_reverse / self.tokens, "top1": top1 / self.tokens}


class DistillTrainer:
    """Builds optimizer and data around a student for one worker; `run` trains to the end."""

    def __init__(self, cfg: TrainLoopConfig, kind: str, student: nn.Module, sae: SparseAutoencoder | None,
                 cache: ActivationCache, layer: int, rank: int = 0, world: int = 1, reporter=None,
                 held_out: HeldOut | None = None):
        self.cfg, self.kind, self.student, self.sae = cfg, kind, student, sae
        self.rank, self.world, self.reporter, self.held_out = rank, world, reporter, held_out
        self.forward_module = student  # replaced by its DDP wrapper when world > 1
        self.data = SequenceBatches(cache, layer, cfg.batch_sequences // world, cfg.seed, rank, world)
        self.tokens_per_step = cfg.batch_sequences * (cache.seq_len - 1)
        self.total_steps = max(1, -(-cfg.tokens // self.tokens_per_step))
        self.base_lr = cfg.lr or DEFAULT_LR[getattr(cfg, "arch", "lens")]
        params = [p for p in student.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=self.base_lr, weight_decay=cfg.weight_decay)
        self.ckpt_dir = Path(cfg.out) / "checkpoints" / "latest"
        self.state = DistillState()
        self.eval_steps = sorted({round(i * self.total_steps / cfg.eval_points) for i in range(cfg.eval_points + 1)})
        self.last_metrics: dict = {}

    def start(self, resume_from: Path | None = None) -> None:
        if resume_from is None and (self.ckpt_dir / "state.json").is_file():
            resume_from = self.ckpt_dir
        if resume_from is not None:
            self.state = DistillState.load(resume_from, self.student, self.opt)
            log.info("resumed at step %d from %s", self.state.step, resume_from)

    def run(self, progress=None) -> DistillState:
        batches = self.data.iterate(start_batch=self.state.step)
        t_last, tokens_last = time.perf_counter(), 0
        self.student.train()
        self._maybe_eval()
        while self.state.step < self.total_steps:
            loss, top1 = self._train_step(next(batches))
            self.state.step += 1
            tokens_last += self.tokens_per_step
            if progress is not None:
                progress.update(1)
            if self.state.step % 5 == 0 or self.state.step == self.total_steps:
                now = time.perf_counter()
                self._log(loss, top1, tokens_last / (now - t_last))
                t_last, tokens_last = now, 0
            if self.cfg.fail_at_step == self.state.step and not (Path(self.cfg.out) / ".failed_once").exists():
                (Path(self.cfg.out) / ".failed_once").write_text("")
                raise RuntimeError(f"injected failure at step {self.state.step} (--fail-at-step)")
            self._maybe_eval()
            self._maybe_checkpoint()
        return self.state

    def _train_step(self, batch: dict) -> tuple[float, float]:
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.state.step, self.total_steps, self.cfg, self.base_lr)
        logits = student_logits(self.forward_module, self.sae, batch["resid"])
        ids = batch["teacher.topk_ids"][:, 1:].flatten(0, 1)
        if self.cfg.loss == "kl":
            per_token = kl_topk(ids, batch["teacher.topk_logp"][:, 1:].flatten(0, 1),
                                batch["teacher.rest_logmass"][:, 1:].flatten(0, 1), logits)
        else:
            per_token = ce_argmax(ids, logits)
        loss = per_token.mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.grad_clip)
        self.opt.step()
        top1 = (logits.detach().argmax(-1) == ids[:, 0]).float().mean().item()
        return loss.item(), top1

    def _log(self, loss: float, top1: float, tokens_per_s: float) -> None:
        metrics = {f"distill/{'kl' if self.cfg.loss == 'kl' else 'ce_argmax'}": loss, "distill/top1": top1,
                   "distill/lr": self.opt.param_groups[0]["lr"], "charts/tokens_per_s": tokens_per_s}
        self.last_metrics = metrics
        if self.reporter is not None:
            self.reporter(self.state.step, metrics)

    def _maybe_eval(self) -> None:
        if self.held_out is None or self.state.step not in self.eval_steps:
            return
        if any(p["tokens"] == self.state.step * self.tokens_per_step for p in self.state.curve):
            return
        point = {"tokens": self.state.step * self.tokens_per_step, **self.held_out.measure(self.student, self.sae)}
        self.state.curve.append(point)
        log.info("held-out after %d tokens: KL %.3f nats/token, top-1 %.1f%%", point["tokens"], point["kl"], 100 * point["top1"])
        if self.reporter is not None:
            self.reporter(self.state.step, {"distill/heldout_kl": point["kl"], "distill/heldout_top1": point["top1"]})

    def _maybe_checkpoint(self) -> None:
        if self.state.step % self.cfg.checkpoint_every and self.state.step != self.total_steps:
            return
        if self.rank == 0:
            self.state.save(self.ckpt_dir, self.student, self.opt)
        if self.reporter is not None:
            self.reporter(self.state.step, {"checkpoint_step": self.state.step},
                          checkpoint=self.ckpt_dir if self.rank == 0 else None)
