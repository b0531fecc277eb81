"""`faithlens demo` (`make demo`): the whole pipeline on embedded defaults, each stage reusing what a previous run made.

builtin corpus → activation/teacher cache → layer baselines → TopK SAE → decoder distillation → a short PPO
phase → feature importance → evidence → labels (local LLM) → label scores → the eval table →
`explain "What is 17 + 3?"` with the HTML dashboard. Everything lands in one run folder (default runs/demo):

    cache/ baseline/ sae/ distill/decoder/ ppo/decoder/ interpret/ eval/ explain.html

A stage whose output exists is skipped, so a rerun after an interruption continues where it stopped
(the Ray Train stages also resume from their own checkpoints).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from models.config import DEFAULT_MODEL

DEMO_DATA = "builtin:tasks:arithmetic+comparison+counting*0.5,builtin:self*0.5"
DEMO_OOD = "builtin:tasks:boolean+copying"


@dataclass
class DemoConfig:
    model: str = DEFAULT_MODEL
    """Frozen model: hub id, local directory, or embedded:smollm2-135m-instruct."""

    data: str = DEMO_DATA
    """Training corpus; the default is generated (three task suites and model samples) and needs no download."""

    ood: str = DEMO_OOD
    """A whole domain held out from training, reported separately by the eval table."""

    layer: int = 9
    """Layer read by the SAE and decoder."""

    out: Path = Path("runs/demo")
    """Run directory; a rerun reuses what is already there."""

    cache_tokens: int = 40_000
    """Training tokens in the activation/teacher cache (SAE and decoder train on them)."""

    baseline_tokens: int = 8_192
    """Held-out tokens for the layer baselines."""

    sae_latents: int = 5760
    """SAE width (10x d_model for SmolLM2-135M)."""

    sae_k: int = 64
    """TopK k of the demo SAE."""

    sae_eval_tokens: int = 4_096
    """Held-out tokens for the SAE metrics."""

    decoder_arch: str = "context"
    """Decoder architecture: context (best KL), readout or linear."""

    ppo_steps: int = 2_048
    """Environment steps of the short PPO phase."""

    label_top: int = 40
    """Most important features labelled by the local model and scored."""

    eval_tokens: int = 4_096
    """Held-out tokens per corpus for the eval table."""

    task_examples: int = 10
    """Examples per task suite in the eval table."""

    explain: str = "What is 17 + 3?"
    """Input explained at the end."""


class _Stages:
    def __init__(self, console: Console, total: int):
        self.console, self.total, self.i = console, total, 0
        self.t0 = time.perf_counter()

    def start(self, title: str) -> float:
        self.i += 1
        self.console.rule(f"[bold][{self.i}/{self.total}] {title}", align="left")
        return time.perf_counter()

    def done(self, t: float, where: Path | str, reused: bool = False) -> None:
        verb = "reused" if reused else f"done in {time.perf_counter() - t:.0f} s"
        self.console.print(f"      {verb} → {where}")


def run_demo(cfg: DemoConfig) -> None:
    from corpus.cache import build_cache
    from corpus.config import CacheConfig
    from distill.baseline import BaselineConfig, baseline_markdown, measure_baseline
    from models.io import write_json_atomic, write_text_atomic
    from models.loading import load_frozen

    console = Console()
    out = cfg.out.resolve()
    stages = _Stages(console, 11)
    console.rule("[bold]faithlens demo")

    t = stages.start(f"load {cfg.model}")
    cache_cfg = CacheConfig(model=cfg.model, data=cfg.data, layers=str(cfg.layer), tokens=cfg.cache_tokens, out=out / "cache")
    frozen = load_frozen(cache_cfg)
    console.print(f"      {frozen.n_layers} blocks, d_model {frozen.d_model}, vocabulary {frozen.vocab_size:,}, {frozen.dtype}")
    stages.done(t, frozen.name)

    t = stages.start(f"corpus {cfg.data} → activation/teacher cache at layer {cfg.layer}")
    cache = build_cache(cache_cfg, frozen)
    stages.done(t, f"{cache.root} ({cache.tokens:,} tokens, {cache.size_bytes() / 2**20:.1f} MiB)")

    t = stages.start("layer baselines on the held-out split")
    baseline_json = out / "baseline" / "baseline.json"
    reused = baseline_json.is_file() and json.loads(baseline_json.read_text()).get("tokens", 0) >= cfg.baseline_tokens
    if not reused:
        result = measure_baseline(BaselineConfig(model=cfg.model, data=cfg.data, tokens=cfg.baseline_tokens), frozen)
        write_json_atomic(baseline_json, result)
        write_text_atomic(out / "baseline" / "baseline.md", baseline_markdown(result) + "\n")
    stages.done(t, baseline_json, reused)

    t = stages.start(f"TopK SAE on layer {cfg.layer} (Ray Train job)")
    reused = (out / "sae" / "metrics.json").is_file()
    if not reused:
        from sae.config import SaeTrainConfig
        from sae.job import run_sae_train

        run_sae_train(SaeTrainConfig(model=cfg.model, data=cfg.data, layer=cfg.layer, arch="topk", latents=cfg.sae_latents,
                                     k=cfg.sae_k, tokens=cfg.cache_tokens, out=out / "sae", cache_dir=out / "cache",
                                     eval_tokens=cfg.sae_eval_tokens, batch_tokens=1024))
    stages.done(t, out / "sae", reused)

    t = stages.start(f"{cfg.decoder_arch} decoder distilled to the frozen model (Ray Train job)")
    reused = (out / "distill" / "metrics.json").is_file()
    if not reused:
        from distill.config import DistillConfig
        from distill.job import run_decoder_train

        run_decoder_train(DistillConfig(model=cfg.model, data=cfg.data, sae=out / "sae", arch=cfg.decoder_arch,
                                        tokens=cfg.cache_tokens, cache=cache.root, out=out / "distill",
                                        eval_tokens=2048, eval_points=4))
    stages.done(t, out / "distill" / "decoder", reused)

    t = stages.start(f"short PPO phase ({cfg.ppo_steps:,} steps, RLlib)")
    reused = (out / "ppo" / "decoder" / "decoder.json").is_file()
    if not reused:
        from rl_env.ppo import run_ppo
        from rl_env.ppo_config import PpoConfig

        run_ppo(PpoConfig(decoder=out / "distill", out=out / "ppo", cache=str(cache.root), steps=cfg.ppo_steps,
                          train_batch=512, minibatch_size=128, eval_every=2, eval_tokens=1024, task_examples=10))
    stages.done(t, out / "ppo" / "decoder", reused)

    _interpret_stages(cfg, out, frozen, stages)
    console.rule(f"[bold]demo finished in {time.perf_counter() - stages.t0:.0f} s · outputs in {out}")


def _interpret_stages(cfg: DemoConfig, out: Path, frozen, stages: _Stages) -> None:
    from interpret.components import load_components
    from interpret.config import EvalConfig, EvidenceConfig, ExplainConfig, ImportanceConfig
    from interpret.run import InterpretRun

    console = stages.console
    run = InterpretRun(out)
    comp = load_components(run, frozen=frozen)

    t = stages.start("feature importance (attribution patching, checked by ablation)")
    reused = run.importance.is_file()
    if not reused:
        from interpret.importance import compute_importance
        from models.io import write_json_atomic

        result = compute_importance(ImportanceConfig(run=out, model=cfg.model, data=cfg.data, tokens=2048, seq_len=128,
                                                     spliced_tokens=512, validate_top=20, validate_sequences=4,
                                                     share_targets=64), comp)
        write_json_atomic(run.importance, result)
    stages.done(t, run.importance, reused)

    t = stages.start("feature evidence (top contexts, quantiles, density, promoted tokens)")
    reused = run.evidence.is_file()
    if not reused:
        from interpret.evidence import build_evidence, save_evidence

        meta, tensors = build_evidence(EvidenceConfig(run=out, model=cfg.model, data=cfg.data, split="train",
                                                      tokens=cfg.cache_tokens // 2, seq_len=128), comp)
        save_evidence(run, meta, tensors)
    stages.done(t, run.evidence, reused)

    t = stages.start(f"labels for the {cfg.label_top} most important features (local model) and their scores")
    from interpret.label_config import LabelConfig, ScoreConfig
    from interpret.labelers import LocalLabeler
    from interpret.labels import run_label
    from interpret.scoring import run_score

    local = LocalLabeler(frozen)  # the frozen model is the default labeller: load it once
    for backend in ("stats", "local"):
        run_label(LabelConfig(run=out, top=cfg.label_top, backend=backend), labeler=local if backend == "local" else None)
    if not run.scores.is_file():
        run_score(ScoreConfig(run=out, n_examples=6), simulator=local)
    stages.done(t, run.scores)

    t = stages.start(f"explain {cfg.explain!r}")
    from interpret.explain import run_explain

    html = out / "explain.html"
    run_explain(ExplainConfig(text=cfg.explain, run=out, model=cfg.model, html=html, chat=True))
    stages.done(t, html)

    t = stages.start("eval table")
    from interpret.eval_records import EvalReport
    from interpret.report import print_table, run_eval

    eval_json = out / "eval" / "eval.json"
    reused = eval_json.is_file()
    if reused:
        print_table(EvalReport.from_json(json.loads(eval_json.read_text())), console)
    else:
        run_eval(EvalConfig(run=out, model=cfg.model, data=cfg.data, ood=cfg.ood, tokens=cfg.eval_tokens,
                            task_examples=cfg.task_examples, ppo=out / "ppo"))
    stages.done(t, out / "eval", reused)

    console.print(f"[bold]HTML dashboard: {html}")
