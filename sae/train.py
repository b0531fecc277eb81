"""The SAE training loop: one worker's view (Ray Train builds it through `sae.job.build_trainer`).

The loop's outline (resume, step, log, checkpoint) is `training.trainer.Trainer`; this module adds the
SAE step, dead-latent bookkeeping and resampling. State that must survive a restart (counters, input
scale, firing history) lives in `TrainState` and is checkpointed with the weights and Adam moments.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from corpus.cache import ActivationCache
from models.loading import resolve_dtype
from sae.config import BATCH_THRESHOLD_ARCHS, L1_NAMES, SaeTrainConfig
from sae.data import TokenBatches
from sae.model import SparseAutoencoder
from training.layout import RunLayout
from training.schedule import parse_phases, phase_index
from training.trainer import Trainer

log = logging.getLogger(__name__)

NORM_SAMPLE_TOKENS = 16_384


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


@functools.lru_cache(maxsize=8)
def _phases(text: str, flag: str):
    return parse_phases(text, flag, L1_NAMES)


def coefficient_at(step: int, total: int, schedule: str, warmup_frac: float, flag: str) -> float:
    """A sparsity coefficient's phase schedule (fractions of the run), ramped up from 0 over the warm-up."""
    phases = _phases(schedule, flag)  # parsed once, not at every step
    value = phases[phase_index(phases, step, total)].values[0]
    warm = warmup_frac * total
    return value * min(1.0, (step + 1) / warm) if warm > 0 else value


def l1_at(step: int, total: int, cfg: SaeTrainConfig) -> float:
    """relu: the L1 coefficient at `step`."""
    return coefficient_at(step, total, cfg.l1_schedule, cfg.l1_warmup_frac, "--l1-schedule")


def l0_at(step: int, total: int, cfg: SaeTrainConfig) -> float:
    """jumprelu: the L0 coefficient at `step`."""
    return coefficient_at(step, total, cfg.l0_schedule, cfg.l0_warmup_frac, "--l0-schedule")


def default_lr(num_latents: int) -> float:
    return 2e-3 / math.sqrt(num_latents / 2**14)


def geometric_median(x: torch.Tensor, iters: int = 30) -> torch.Tensor:
    """Weiszfeld's algorithm."""
    y = x.mean(0)
    for _ in range(iters):
        w = 1 / (x - y).norm(dim=1).clamp_min(1e-6)
        y = (w[:, None] * x).sum(0) / w.sum()
    return y


class SaeTrainer(Trainer):
    """Builds the SAE, optimizer and data for one worker; `run` trains to the end."""

    def __init__(self, cfg: SaeTrainConfig, cache: ActivationCache, rank: int = 0, world: int = 1,
                 device: str = "cpu", reporter=None):
        super().__init__(cfg, rank, world, reporter)
        self.device = device
        self.sae_cfg = cfg.sae_config(cache.d_model)
        self.data = TokenBatches(cache, cfg.layer, cfg.batch_tokens // world, cfg.seed, rank, world, cfg.shuffle_shards)
        self.total_steps = max(1, cfg.tokens // cfg.batch_tokens)
        self.tokens_per_step = cfg.batch_tokens
        self.sae = self.model = SparseAutoencoder(self.sae_cfg, device=device)
        self.sae.encoder_dtype = resolve_dtype(cfg.encoder_dtype, device)
        self.sae.jumprelu_bandwidth = cfg.jumprelu_bandwidth
        self.forward_module = self.sae  # replaced by its DDP wrapper when world > 1
        self.base_lr = cfg.lr or default_lr(cfg.latents)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=self.base_lr, betas=(0.9, 0.999))
        self.state = TrainState(since_fired=torch.zeros(cfg.latents, dtype=torch.int64))

    def _fresh_start(self) -> None:
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
            if self.cfg.arch == "jumprelu":
                self.sae.log_threshold.copy_(self._initial_thresholds(x).log())
        self.state.input_scale = scale

    def _initial_thresholds(self, x_ND: torch.Tensor) -> torch.Tensor:
        """jumprelu: --jumprelu-init-threshold, or each latent's pre-activation that k/latents of the sample's
        tokens exceed, so that training starts at L0 ≈ k. Why: Adam moves log θ by about lr per step at most,
        so in a run of a few thousand steps the thresholds cannot travel far from where they start."""
        if self.cfg.jumprelu_init_threshold > 0:
            return torch.full((self.sae_cfg.num_latents,), self.cfg.jumprelu_init_threshold, device=x_ND.device)
        x_ND = x_ND[:4096]
        pre_NF = torch.nn.functional.linear(x_ND - self.sae.b_dec, self.sae.W_enc, self.sae.b_enc)
        n_fire = max(1, round(x_ND.shape[0] * self.cfg.k / self.sae_cfg.num_latents))
        return pre_NF.topk(n_fire, dim=0).values[-1].clamp_min(1e-3)

    def _batches(self, start_batch: int):
        for x in self.data.iterate(start_batch=start_batch):
            yield x.to(self.device) * self.state.input_scale

    def _train_step(self, x: torch.Tensor):
        cfg = self.cfg
        dead = self.state.since_fired >= cfg.dead_tokens
        k_aux = self.sae_cfg.d_in // 2 if cfg.auxk_alpha > 0 and cfg.arch not in ("relu", "jumprelu") else 0
        out = self.forward_module(x, dead if k_aux else None, k_aux)
        if cfg.arch == "relu":
            loss = out.mse + l1_at(self.state.step, self.total_steps, cfg) * out.l1
        elif cfg.arch == "jumprelu":
            loss = out.fvu + l0_at(self.state.step, self.total_steps, cfg) * out.l0_penalty
        elif cfg.arch == "matryoshka":
            # Bussmann et al.: the sum over the nested dictionaries of each one's reconstruction error
            loss = out.prefix_fvu.sum() + cfg.auxk_alpha * out.auxk_loss
        else:
            loss = out.fvu + cfg.auxk_alpha * out.auxk_loss
        self._clip_and_step(loss)
        self.sae.set_decoder_norm_to_unit_norm()
        self._update_counters(out, x.shape[0])
        self.last_loss = loss.item()
        self.last_x = x
        return out

    def _before_optimizer_step(self) -> None:
        self.sae.remove_gradient_parallel_to_decoder_directions()

    def _after_step(self, out) -> None:
        if self.cfg.resample_every and self.cfg.arch == "relu" and self.state.step % self.cfg.resample_every == 0:
            self._resample_dead(self.last_x)

    def _update_counters(self, out, n_tokens: int) -> None:
        fired = torch.zeros(self.sae_cfg.num_latents, dtype=torch.int64, device=out.acts_NK.device)
        fired.index_fill_(0, out.indices_NK[out.acts_NK > 0], 1)
        if self.cfg.arch in BATCH_THRESHOLD_ARCHS:
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

    def _log_metrics(self, out) -> dict:
        dead_frac = (self.state.since_fired >= self.cfg.dead_tokens).float().mean().item()
        metrics = {
            "sae/fvu": out.fvu.item(), "sae/l0": out.l0.item(), "sae/dead_frac": dead_frac,
            "sae/auxk_loss": out.auxk_loss.item(), "sae/l1": out.l1.item(), "sae/loss": self.last_loss,
            "sae/lr": self.opt.param_groups[0]["lr"], "sae/resampled": self.state.resampled,
        }
        if self.cfg.arch == "relu":
            metrics["sae/l1_coefficient"] = l1_at(self.state.step, self.total_steps, self.cfg)
        if self.cfg.arch == "jumprelu":
            metrics["sae/l0_coefficient"] = l0_at(self.state.step, self.total_steps, self.cfg)
            metrics["sae/threshold_mean"] = self.sae.log_threshold.detach().exp().mean().item()
        if out.prefix_fvu is not None:
            metrics.update({f"sae/fvu_prefix_{size}": v for size, v in
                            zip(self.sae_cfg.prefix_sizes, out.prefix_fvu.tolist(), strict=True)})
        return metrics

    def finish(self) -> Path:
        """Save the final SAE (normalisation folded in) to OUT; returns its folder."""
        sae = self.sae
        if self.cfg.arch in BATCH_THRESHOLD_ARCHS and self.state.threshold_count:
            sae.threshold.fill_(self.state.threshold_sum / self.state.threshold_count)
        extra = {"layer": self.cfg.layer, "model": self.cfg.model, "train_tokens": self.state.step * self.cfg.batch_tokens}
        sae_dir = RunLayout(self.cfg.out).sae
        sae.save(sae_dir, input_scale=self.state.input_scale, extra=extra)
        return sae_dir
