"""The SAE training loop: one worker's view (Ray Train calls `train_worker` on every worker).

State that must survive a restart (weights, Adam moments, counters, input scale) lives in
`TrainState` and is checkpointed as safetensors + JSON, never pickled.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from corpus.cache import ActivationCache
from models.io import atomic_path
from models.loading import resolve_dtype
from sae.config import SaeConfig, SaeTrainConfig, parse_schedule
from sae.data import TokenBatches
from sae.model import SparseAutoencoder

log = logging.getLogger(__name__)

NORM_SAMPLE_TOKENS = 16_384


def training_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Weights (`model.*`) and Adam/AdamW moments (`opt.<param index>.*`) as flat safetensors entries."""
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    for i, p in enumerate(model.parameters()):
        for name, value in opt.state.get(p, {}).items():
            tensors[f"opt.{i}.{name}"] = value.detach().reshape(-1).contiguous() if value.dim() == 0 else value.detach().contiguous()
    return tensors


def restore_training_tensors(tensors: dict[str, torch.Tensor], model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """The inverse of `training_tensors`."""
    model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    for i, p in enumerate(model.parameters()):
        state = {name: tensors[f"opt.{i}.{name}"] for name in ("step", "exp_avg", "exp_avg_sq") if f"opt.{i}.{name}" in tensors}
        if state:
            if "step" in state:
                state["step"] = state["step"].reshape(())
            opt.state[p] = state


@dataclass
class TrainState:
    step: int = 0
    input_scale: float = 1.0
    """Training inputs are x·input_scale, so that E‖x·s‖² = d_in; folded into the weights at save."""
    threshold_sum: float = 0.0
    threshold_count: int = 0
    resampled: int = 0
    since_fired: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    """Training tokens since each latent last fired."""

    def save(self, directory: Path, sae: SparseAutoencoder, opt: torch.optim.Optimizer) -> None:
        tensors = {**training_tensors(sae, opt), "since_fired": self.since_fired}
        scalars = {k: v for k, v in asdict(self).items() if k != "since_fired"}
        with atomic_path(Path(directory)) as tmp:
            tmp.mkdir()
            save_file(tensors, str(tmp / "state.safetensors"))
            (tmp / "state.json").write_text(json.dumps(scalars))

    @classmethod
    def load(cls, directory: Path, sae: SparseAutoencoder, opt: torch.optim.Optimizer) -> TrainState:
        tensors = load_file(str(Path(directory) / "state.safetensors"))
        scalars = json.loads((Path(directory) / "state.json").read_text())
        restore_training_tensors(tensors, sae, opt)
        return cls(**scalars, since_fired=tensors["since_fired"])


def lr_at(step: int, total: int, cfg: SaeTrainConfig, base_lr: float) -> float:
    warm = max(1, int(cfg.lr_warmup_frac * total))
    decay_start = int((1 - cfg.lr_decay_frac) * total)
    if step < warm:
        return base_lr * (step + 1) / warm
    if step >= decay_start and cfg.lr_decay_frac > 0:
        return base_lr * max(0.0, (total - step) / max(1, total - decay_start))
    return base_lr


def l1_at(step: int, total: int, cfg: SaeTrainConfig) -> float:
    """The phase schedule (fractions of the run), ramped up from 0 over the warm-up."""
    phases = parse_schedule(cfg.l1_schedule)
    frac = step / max(1, total)
    value, edge = phases[-1][1], 0.0
    for f, v in phases:
        edge += f
        if frac < edge:
            value = v
            break
    warm = cfg.l1_warmup_frac * total
    return value * min(1.0, (step + 1) / warm) if warm > 0 else value


def default_lr(num_latents: int) -> float:
    return 2e-3 / math.sqrt(num_latents / 2**14)


def geometric_median(x: torch.Tensor, iters: int = 30) -> torch.Tensor:
    """Weiszfeld's algorithm."""
    y = x.mean(0)
    for _ in range(iters):
        w = 1 / (x - y).norm(dim=1).clamp_min(1e-6)
        y = (w[:, None] * x).sum(0) / w.sum()
    return y


class SaeTrainer:
    """Builds the SAE, optimizer and data for one worker; `run` trains to the end."""

    def __init__(self, cfg: SaeTrainConfig, cache: ActivationCache, rank: int = 0, world: int = 1,
                 device: str = "cpu", reporter=None):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.reporter = reporter  # callable(metrics, checkpoint_dir | None), e.g. ray.train.report
        self.sae_cfg = SaeConfig(d_in=cache.d_model, num_latents=cfg.latents, arch=cfg.arch, k=cfg.k)
        self.data = TokenBatches(cache, cfg.layer, cfg.batch_tokens // world, cfg.seed, rank, world, cfg.shuffle_shards)
        self.total_steps = max(1, cfg.tokens // cfg.batch_tokens)
        self.sae = SparseAutoencoder(self.sae_cfg, device=device)
        self.sae.encoder_dtype = resolve_dtype(cfg.encoder_dtype, device)
        self.forward_module = self.sae  # replaced by its DDP wrapper when world > 1
        self.base_lr = cfg.lr or default_lr(cfg.latents)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=self.base_lr, betas=(0.9, 0.999))
        self.ckpt_dir = Path(cfg.out) / "checkpoints" / "latest"
        self.state = TrainState(since_fired=torch.zeros(cfg.latents, dtype=torch.int64))

    # -- setup -----------------------------------------------------------------------------
    def start(self, resume_from: Path | None = None) -> None:
        if resume_from is None and (self.ckpt_dir / "state.json").is_file():
            resume_from = self.ckpt_dir
        if resume_from is not None:
            self.state = TrainState.load(resume_from, self.sae, self.opt)
            log.info("resumed at step %d from %s", self.state.step, resume_from)
            return
        sample = self.data.sample(NORM_SAMPLE_TOKENS).to(self.device)
        scale = math.sqrt(self.sae_cfg.d_in / sample.pow(2).sum(-1).mean().item())
        g = torch.Generator().manual_seed(self.cfg.seed)
        self.sae.init_weights(g)
        with torch.no_grad():
            x = sample * scale
            if self.cfg.b_dec_init == "geometric_median":
                self.sae.b_dec.copy_(geometric_median(x))
            elif self.cfg.b_dec_init == "mean":
                self.sae.b_dec.copy_(x.mean(0))
        self.state.input_scale = scale

    # -- the loop --------------------------------------------------------------------------
    def run(self, progress=None) -> TrainState:
        batches = self.data.iterate(start_batch=self.state.step)
        t_last, tokens_last = time.perf_counter(), 0
        while self.state.step < self.total_steps:
            x = next(batches).to(self.device) * self.state.input_scale
            out = self._train_step(x)
            tokens_last += x.shape[0] * self.world
            self.state.step += 1
            if progress is not None:
                progress.update(1)
            if self.cfg.resample_every and self.cfg.arch == "relu" and self.state.step % self.cfg.resample_every == 0:
                self._resample_dead(x)
            if self.state.step % 10 == 0 or self.state.step == self.total_steps:
                now = time.perf_counter()
                self._log(out, tokens_last / (now - t_last))
                t_last, tokens_last = now, 0
            if self.cfg.fail_at_step == self.state.step and not (Path(self.cfg.out) / ".failed_once").exists():
                (Path(self.cfg.out) / ".failed_once").write_text("")
                raise RuntimeError(f"injected failure at step {self.state.step} (--fail-at-step)")
            self._maybe_checkpoint()
        return self.state

    def _train_step(self, x: torch.Tensor):
        cfg, sae = self.cfg, self.sae
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.state.step, self.total_steps, cfg, self.base_lr)
        dead = self.state.since_fired >= cfg.dead_tokens
        k_aux = self.sae_cfg.d_in // 2 if cfg.auxk_alpha > 0 and cfg.arch != "relu" else 0
        out = self.forward_module(x, dead if k_aux else None, k_aux)
        if cfg.arch == "relu":
            loss = out.mse + l1_at(self.state.step, self.total_steps, cfg) * out.l1
        else:
            loss = out.fvu + cfg.auxk_alpha * out.auxk_loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        self.opt.step()
        sae.set_decoder_norm_to_unit_norm()
        self._update_counters(out, x.shape[0])
        self.last_loss = loss.item()
        return out

    def _update_counters(self, out, n_tokens: int) -> None:
        fired = torch.zeros(self.sae_cfg.num_latents, dtype=torch.int64, device=out.acts_NK.device)
        fired.index_fill_(0, out.indices_NK[out.acts_NK > 0], 1)
        if self.cfg.arch == "batchtopk":
            positive = out.acts_NK[out.acts_NK > 0]
            if positive.numel():
                self.state.threshold_sum += positive.min().item()
                self.state.threshold_count += 1
        if self.world > 1 and dist.is_initialized():
            dist.all_reduce(fired, op=dist.ReduceOp.MAX)
        self.state.since_fired += n_tokens * self.world
        self.state.since_fired[fired.cpu().bool()] = 0

    @torch.no_grad()
    def _resample_dead(self, x: torch.Tensor) -> None:
        """Anthropic-style resampling: dead latents take directions of badly reconstructed inputs."""
        dead = (self.state.since_fired >= self.cfg.dead_tokens).nonzero().flatten()
        if dead.numel() == 0:
            return
        sae = self.sae
        err = (x - sae(x).sae_out_ND).pow(2).sum(-1)
        g = torch.Generator().manual_seed(self.cfg.seed + self.state.step)
        picks = torch.multinomial(err / err.sum(), dead.numel(), replacement=True, generator=g)
        directions = x[picks] - sae.b_dec
        directions = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-8)
        alive = torch.ones(self.sae_cfg.num_latents, dtype=torch.bool)
        alive[dead] = False
        enc_norm = sae.W_enc[alive].norm(dim=1).mean() if alive.any() else torch.tensor(1.0)
        sae.W_dec[dead] = directions
        sae.W_enc[dead] = directions * enc_norm * 0.2
        sae.b_enc[dead] = 0.0
        for p in (sae.W_enc, sae.W_dec, sae.b_enc):
            st = self.opt.state.get(p)
            if st:
                st["exp_avg"][dead] = 0
                st["exp_avg_sq"][dead] = 0
        self.state.since_fired[dead] = 0
        self.state.resampled += int(dead.numel())

    def _log(self, out, tokens_per_s: float) -> None:
        dead_frac = (self.state.since_fired >= self.cfg.dead_tokens).float().mean().item()
        metrics = {
            "sae/fvu": out.fvu.item(), "sae/l0": out.l0.item(), "sae/dead_frac": dead_frac,
            "sae/auxk_loss": out.auxk_loss.item(), "sae/l1": out.l1.item(), "sae/loss": self.last_loss,
            "sae/lr": self.opt.param_groups[0]["lr"], "charts/tokens_per_s": tokens_per_s,
            "sae/resampled": self.state.resampled,
        }
        if self.cfg.arch == "relu":
            metrics["sae/l1_coefficient"] = l1_at(self.state.step, self.total_steps, self.cfg)
        self.last_metrics = metrics
        if self.reporter is not None:
            self.reporter(self.state.step, metrics)

    def _maybe_checkpoint(self) -> None:
        every = self.cfg.checkpoint_every
        if self.state.step % every and self.state.step != self.total_steps:
            return
        if self.rank == 0:
            self.state.save(self.ckpt_dir, self.sae, self.opt)
        if self.reporter is not None:  # every rank reports; only rank 0 hands over the checkpoint
            self.reporter(self.state.step, {"checkpoint_step": self.state.step},
                          checkpoint=self.ckpt_dir if self.rank == 0 else None)

    def finish(self) -> Path:
        """Save the final SAE (normalisation folded in) to OUT; returns its folder."""
        sae = self.sae
        if self.cfg.arch == "batchtopk" and self.state.threshold_count:
            sae.threshold.fill_(self.state.threshold_sum / self.state.threshold_count)
        extra = {"layer": self.cfg.layer, "model": self.cfg.model, "train_tokens": self.state.step * self.cfg.batch_tokens}
        sae.save(Path(self.cfg.out) / "sae", input_scale=self.state.input_scale, extra=extra)
        return Path(self.cfg.out) / "sae"
