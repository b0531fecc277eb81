"""`faithlens demo` (`make demo`): the whole pipeline on embedded defaults, each stage reusing what a previous run made.

builtin corpus → activation/teacher cache → layer baselines → TopK SAE → decoder distillation → a short PPO
phase → feature importance → evidence → labels (local LLM) → label scores → the eval table →
`explain "What is 17 + 3?"` with the HTML dashboard. Everything lands in one run folder (default runs/demo):

    cache/ baseline/ sae/ distill/decoder/ ppo/decoder/ interpret/ eval/ explain.html

A stage is reused when the config it was made with (its config.json or stage.json) equals the one
this run asks for; a stage that differs reruns with every stage after it, and the run says which
settings differ. So a rerun after an interruption continues where it stopped (the Ray Train stages
resume from their own checkpoints), and a rerun with another `--sae-k` retrains the SAE and what reads it.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console

from models import progress
from models.config import DEFAULT_MODEL
from models.errors import ConfigError
from models.io import read_json
from training import logs
from training.config import to_record
from training.layout import RunLayout
from training.stages import StagePlan

DEMO_DATA = "builtin:tasks:arithmetic+comparison+counting*0.5,builtin:self*0.5"
DEMO_OOD = "builtin:tasks:boolean+copying"

READS = {"baseline": (), "sae": (), "distill": ("sae",), "ppo": ("distill",), "importance": ("distill",),
         "evidence": ("distill",), "labels": ("importance", "evidence"), "scores": ("labels",),
         "explain": ("scores",), "eval": ("ppo", "scores")}
"""Each stage, in run order, and the stages whose output it reads (`training.stages.StagePlan`)."""


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
    """Run directory; a rerun reuses every stage whose saved config matches the one asked for."""

    cache_tokens: int = 32_768
    """Training tokens in the activation/teacher cache (SAE and decoder train on them)."""

    baseline_tokens: int = 2_048
    """Held-out tokens for the layer baselines."""

    sae_latents: int = 5760
    """SAE width (10x d_model for SmolLM2-135M)."""

    sae_k: int = 80
    """TopK k of the demo SAE."""

    sae_passes: int = 4
    """Passes of SAE training over the cache (the SAE trains on passes × --cache-tokens tokens)."""

    sae_eval_tokens: int = 4_096
    """Held-out tokens for the SAE metrics."""

    decoder_arch: str = "context"
    """Decoder architecture: context (best KL), readout or linear."""

    decoder_layers: int = 0
    """context: blocks of the decoder, copied from the frozen model's blocks above the layer (0: all of them, the
    SAE-spliced model, whose KL is the SAE's spliced KL before distillation)."""

    distill_tokens: int = 6_144
    """Distillation tokens (at lr 1e-4: the copied blocks start near the frozen model and need little)."""

    ppo_steps: int = 1_024
    """Environment steps of the short PPO phase (anchored to the frozen model: --anchor-kl 10)."""

    labeller: str = "auto"
    """Labeller and simulator: auto (embedded:qwen2.5-coder-1.5b-instruct when `make labeller` installed it, else the
    frozen model; the 1.5B model makes the label stage several times slower) or any model spec."""

    label_top: int = 8
    """Most important features labelled by the local model and scored."""

    score_examples: int = 5
    """Held-out contexts per class per label in the demo's scoring (`features score` uses 11: see the chance rate)."""

    label_sample: int = 16
    """Live features in the stratified random sample labelled by the local model and scored: the eval table's
    coverage is estimated on it (a real estimate needs `features label --sample 200` or more)."""

    eval_tokens: int = 2_048
    """Held-out tokens per corpus for the eval table."""

    task_examples: int = 4
    """Examples per task suite in the eval table."""

    explain: str = "What is 17 + 3?"
    """Input explained at the end."""

    def __post_init__(self) -> None:
        """Checks what would otherwise fail only at the stage that reads it, after the earlier stages ran."""
        import typing

        from corpus.sources import parse_sources
        from models.decoder import Arch

        sizes = ("cache_tokens", "baseline_tokens", "sae_latents", "sae_eval_tokens", "ppo_steps", "label_top", "eval_tokens")
        for name in sizes:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}: expected a positive number, got {getattr(self, name)}")
        if not 1 <= self.sae_k <= self.sae_latents:
            raise ConfigError(f"--sae-k: expected 1..{self.sae_latents} (--sae-latents), got {self.sae_k}")
        if self.decoder_arch not in typing.get_args(Arch):
            raise ConfigError(f"--decoder-arch: expected one of {', '.join(typing.get_args(Arch))}, got {self.decoder_arch!r}")
        parse_sources(self.data, "--data")
        if self.ood.strip():
            parse_sources(self.ood, "--ood")


class _Stages:
    """Each stage's numbered title, its one progress line (`models.progress.stage`) and its result line (the key
    figure, the time, where the output went), and each stage's reuse-or-run decision (`training.stages.StagePlan`)."""

    def __init__(self, console: Console, total: int, layout: RunLayout):
        self.console, self.total, self.i = console, total, 0
        self.t0 = time.perf_counter()
        self.plan = StagePlan({name: layout.stage(name) for name in READS}, READS,
                              say=lambda message: console.print(f"      {message}", markup=False, soft_wrap=True))

    @contextlib.contextmanager
    def stage(self, title: str, where: Path | str, figure: Callable[[], str] | None = None):
        """Within: the stage's work, drawn on one progress line. After: '      FIGURE · done in N s → WHERE'
        ('reused' when the body set `.reused` on what it was given); `figure` reads the stage's output."""
        self.i += 1
        self.console.rule(f"[bold][{self.i}/{self.total}] {title}", align="left")
        t, result = time.perf_counter(), _StageResult()
        with progress.stage(f"[{self.i}/{self.total}]"):
            yield result
        verb = "reused" if result.reused else f"done in {time.perf_counter() - t:.0f} s"
        shown = [figure()] if figure is not None else []
        self.console.print("      " + " · ".join([*shown, verb]) + f" → {result.where or where}", markup=False,
                           soft_wrap=True)

    def reuse_or_run(self, stage: str, cfg, work: Callable[[], object], report: bool = False) -> bool:
        """Reuse `stage` if it was made with `cfg`; else run `work()` and record `cfg` beside its output.
        What `work` prints goes to the log file (its progress stays on the stage's line), unless it is the
        stage's `report`."""
        wanted = to_record(cfg)
        if self.plan.reuse(stage, wanted):
            return True
        with contextlib.nullcontext() if report else logs.to_log_file():
            work()
        self.plan.finished(stage, wanted)
        return False

    def step(self, title: str, stage: str, cfg, work: Callable[[], object], where: Path,
             figure: Callable[[], str] | None = None, report: bool = False) -> None:
        with self.stage(title, where, figure) as result:
            result.reused = self.reuse_or_run(stage, cfg, work, report)


@dataclass
class _StageResult:
    reused: bool = False
    where: str = ""
    """Set by a stage whose output's description is known only after it ran."""


class _RaySession:
    """One Ray instance for the demo's Ray stages, started by the first that runs (each job would start its own,
    and a Ray start takes 5-30 s on a loaded 2-core machine)."""

    def __init__(self):
        self.started = False

    def __call__(self) -> None:
        import ray

        if not ray.is_initialized():
            logs.init_ray()
            self.started = True

    def stop(self) -> None:
        if self.started:
            import ray

            logs.keep_worker_logs("demo")
            ray.shutdown()
            self.started = False


def run_demo(cfg: DemoConfig) -> None:
    from corpus.cache import build_cache
    from corpus.config import CacheConfig
    from distill.baseline import BaselineConfig
    from distill.config import DistillConfig
    from models.loading import load_frozen
    from rl_env.ppo_config import PpoConfig
    from sae.config import SaeTrainConfig

    console = Console()
    ray_session = _RaySession()
    layout = RunLayout(cfg.out.resolve())
    stages = _Stages(console, 11, layout)
    console.rule("[bold]faithlens demo")
    if (line := logs.announce()) is not None:
        console.print(line, markup=False, soft_wrap=True)

    cache_cfg = CacheConfig(model=cfg.model, data=cfg.data, layers=str(cfg.layer), tokens=cfg.cache_tokens, out=layout.cache)
    with stages.stage(f"load {cfg.model}", cfg.model) as result, logs.to_log_file():
        frozen = load_frozen(cache_cfg)
        result.where = (f"{frozen.name}: {frozen.n_layers} blocks, d_model {frozen.d_model}, vocabulary "
                        f"{frozen.vocab_size:,}, {str(frozen.dtype).removeprefix('torch.')}")

    with stages.stage(f"corpus {cfg.data} → activation/teacher cache at layer {cfg.layer}", layout.cache) as result, \
            logs.to_log_file():
        cache = build_cache(cache_cfg, frozen)  # reused by its own key (what produced it)
        result.where = f"{cache.root} ({cache.tokens:,} tokens, {cache.size_bytes() / 2**20:.1f} MiB)"

    baseline_cfg = BaselineConfig(model=cfg.model, data=cfg.data, tokens=cfg.baseline_tokens)

    def baseline() -> None:
        from distill.baseline import baseline_markdown, measure_baseline
        from models.io import write_json_atomic, write_text_atomic

        result = measure_baseline(baseline_cfg, frozen)
        write_json_atomic(layout.baseline_json, result)
        write_text_atomic(layout.baseline_md, baseline_markdown(result) + "\n")

    stages.step("layer baselines on the held-out split", "baseline", baseline_cfg, baseline,
                layout.baseline_json, lambda: _baseline_figure(layout, cfg.layer))

    # the Ray and RLlib stacks load slowly: each stage imports its command only when it runs
    sae_cfg = SaeTrainConfig(model=cfg.model, data=cfg.data, layer=cfg.layer, arch="topk", latents=cfg.sae_latents,
                             k=cfg.sae_k, tokens=cfg.sae_passes * cache.tokens, out=layout.sae_run.root,
                             cache_dir=layout.cache, eval_tokens=cfg.sae_eval_tokens, batch_tokens=1024)

    def sae() -> None:
        from sae.job import train_and_evaluate

        ray_session()
        train_and_evaluate(sae_cfg, cache, frozen)  # passes over the demo's cache: no second forward pass

    stages.step(f"TopK SAE on layer {cfg.layer}, {sae_cfg.tokens:,} tokens = {cfg.sae_passes} passes over the cache "
                "(Ray Train job)", "sae", sae_cfg, sae, layout.sae_run.root, lambda: _sae_figure(layout))

    n_layers = cfg.decoder_layers or frozen.n_layers - cfg.layer
    distill_cfg = DistillConfig(model=cfg.model, data=cfg.data, sae=layout.sae_run.root, arch=cfg.decoder_arch,
                                n_layers=n_layers, bos_stream=cfg.decoder_arch == "context", lr=1e-4,
                                tokens=cfg.distill_tokens, cache=cache.root, out=layout.distill.root,
                                eval_tokens=2048, eval_points=2)

    def distill() -> None:
        from distill.job import run_decoder_train

        ray_session()
        run_decoder_train(distill_cfg)

    what = f"{cfg.decoder_arch} decoder" + (f" ({n_layers} blocks)" if cfg.decoder_arch == "context" else "")
    stages.step(f"{what} distilled to the frozen model, {cfg.distill_tokens:,} tokens (Ray Train job)", "distill",
                distill_cfg, distill, layout.distill.decoder, lambda: _distill_figure(layout))

    ppo_cfg = PpoConfig(decoder=layout.distill.root, out=layout.ppo.root, cache=str(cache.root), steps=cfg.ppo_steps,
                        train_batch=512, minibatch_size=128, lr=1e-4, eval_every=2, eval_tokens=1024, task_examples=4, anchor_kl="10",
                        entropy_reward=1.0)

    def ppo() -> None:
        from rl_env.ppo import run_ppo

        ray_session()
        run_ppo(ppo_cfg)

    stages.step(f"short PPO phase ({cfg.ppo_steps:,} steps, RLlib, anchored to the frozen model)", "ppo", ppo_cfg, ppo,
                layout.ppo.decoder, lambda: _ppo_figure(layout))

    with logs.to_log_file():
        ray_session.stop()
    _interpret_stages(cfg, layout, frozen, stages)
    console.rule(f"[bold]demo finished in {time.perf_counter() - stages.t0:.0f} s · outputs in {layout.root}")


def _interpret_stages(cfg: DemoConfig, run: RunLayout, frozen, stages: _Stages) -> None:
    from interpret.components import load_components
    from interpret.config import EvalConfig, EvidenceConfig, ExplainConfig, ImportanceConfig
    from interpret.label_config import LabelConfig, ScoreConfig

    out = run.root
    components = functools.cache(lambda: load_components(run, frozen=frozen))  # only when a stage here runs

    importance_cfg = ImportanceConfig(run=out, model=cfg.model, data=cfg.data, tokens=2048, seq_len=128,
                                      spliced_tokens=512, validate_top=10, validate_sequences=4, share_targets=64)

    def importance() -> None:
        from interpret.importance import compute_importance
        from models.io import write_json_atomic

        write_json_atomic(run.importance, compute_importance(importance_cfg, components()))

    stages.step("feature importance (attribution patching, checked by ablation)", "importance",
                importance_cfg, importance, run.importance, lambda: _importance_figure(run))

    evidence_cfg = EvidenceConfig(run=out, model=cfg.model, data=cfg.data, split="train", tokens=cfg.cache_tokens // 2,
                                  seq_len=128)

    def evidence() -> None:
        from interpret.evidence import build_evidence, save_evidence

        save_evidence(run, *build_evidence(evidence_cfg, components()))

    stages.step("feature evidence (top contexts, quantiles, density, promoted tokens)", "evidence",
                evidence_cfg, evidence, run.evidence, lambda: _evidence_figure(run))

    labeller = resolve_labeller(cfg.labeller, cfg.model)
    # the stats labels use the same settings as the local model's, which the record holds
    label_cfg = LabelConfig(run=out, sample=cfg.label_sample, top=cfg.label_top, backend="local", local_model=labeller)
    score_cfg = ScoreConfig(run=out, labels="local", n_examples=cfg.score_examples, n_calibration=3,
                            scorers="detection,embedding", local_model=labeller, batch_size=16)
    local = functools.cache(lambda: _local_labeler(frozen if labeller == cfg.model else labeller))

    def labels() -> None:
        from interpret.labels import run_label

        run_label(replace(label_cfg, backend="stats"))
        run_label(label_cfg, labeler=local())

    def scores() -> None:
        from interpret.scoring import run_score

        run_score(score_cfg, simulator=local())

    with stages.stage(f"labels by {labeller} for a random sample of {cfg.label_sample} live features and the "
                      f"{cfg.label_top} most important (statistics labels for all), scored on held-out contexts",
                      run.scores, lambda: _label_figure(run, score_cfg.labels)) as result:
        result.reused = stages.reuse_or_run("labels", label_cfg, labels)
        result.reused = stages.reuse_or_run("scores", score_cfg, scores) and result.reused

    explain_cfg = ExplainConfig(text=cfg.explain, run=out, model=cfg.model, html=run.explain_html, chat=True)

    def explain() -> None:
        from interpret.explain import run_explain

        run_explain(explain_cfg)

    stages.step(f"explain {cfg.explain!r}", "explain", explain_cfg, explain, run.explain_html, report=True)

    from interpret.eval_records import EvalReport
    from interpret.report import print_table, run_eval

    eval_cfg = EvalConfig(run=out, model=cfg.model, data=cfg.data, ood=cfg.ood, tokens=cfg.eval_tokens,
                          task_examples=cfg.task_examples, ppo=run.ppo.root)
    with stages.stage("eval table", run.eval.root) as result:
        result.reused = stages.reuse_or_run("eval", eval_cfg, lambda: run_eval(eval_cfg), report=True)
    if result.reused:
        print_table(EvalReport.from_json(read_json(run.eval_json)), stages.console)

    stages.console.print(f"[bold]HTML dashboard: {run.explain_html}")
    _say_what_was_shortened(cfg, stages.console)


def _say_what_was_shortened(cfg: DemoConfig, console: Console) -> None:
    """The demo's sizes buy a 10-minute run; the full-size commands of the published figures are in `faithlens
    reproduce`."""
    from interpret.score_stats import chance_rate

    chance = chance_rate(cfg.score_examples, cfg.score_examples)
    out = cfg.out
    console.print(
        "Shortened for a 10-minute run (full size: `faithlens reproduce --list`):\n"
        f"  · labels: {cfg.label_sample} sampled + {cfg.label_top} top features, detection scored on {cfg.score_examples} + "
        f"{cfg.score_examples} held-out contexts (a label with no signal passes with probability {chance:.1%}); full: "
        f"`faithlens features label {out} --sample 200 --top 50 && faithlens features score {out}` (11 + 11, {chance_rate(11, 11):.1%})\n"
        f"  · PPO: {cfg.ppo_steps:,} steps in one phase; full: `faithlens ppo --decoder {out}/distill --steps 20480 "
        "--anchor-kl 10 --attribution-share 30 --entropy-reward 1 --lr 1e-4 --train-batch 4096`\n"
        f"  · SAE and decoder on {cfg.cache_tokens:,} cached tokens of generated text; full: `faithlens reproduce` on WikiText-2, "
        "Gutenberg and State of the Union (2M SAE tokens)", markup=False, soft_wrap=True)


def resolve_labeller(labeller: str, model: str) -> str:
    """`auto`: the capable 1.5B labeller when its wheels are installed, else the frozen model (loaded once)."""
    if labeller != "auto":
        return labeller
    from models.loading import embedded_installed

    capable = "qwen2.5-coder-1.5b-instruct"
    return f"embedded:{capable}" if embedded_installed(capable) else model


def _local_labeler(model):
    from interpret.labelers import LocalLabeler

    return LocalLabeler(model, batch_size=16)


# -- each stage's key figure, read from what it wrote (so a reused stage shows it too) -----------------------------
def _baseline_figure(layout: RunLayout, layer: int) -> str:
    result = read_json(layout.baseline_json)
    lens = next((row for row in result["layers"] if row["layer"] == layer), None)
    frozen = f"frozen model top-1 {result['frozen']['top1_acc']:.1%} on {result['tokens']:,} tokens"
    return frozen + (f" · logit lens at layer {layer}: KL {lens['logit_lens_kl']:.2f}" if lens else "")


def _sae_figure(layout: RunLayout) -> str:
    m = read_json(layout.sae_run.metrics)
    window = f"{m['dead_window_tokens']:,}-token window" + (", too short to call a feature dead" if m.get("dead_window_short") else "")
    return (f"explained variance {m['explained_variance']:.3f} (design: > 0.95) · L0 {m['l0']:.0f} · "
            f"dead {m['dead_frac']:.1%} ({window})")


def _distill_figure(layout: RunLayout) -> str:
    m = read_json(layout.distill.metrics)
    end = m["curve"][-1]
    return f"held-out KL {end['kl']:.3f} (design: < 0.5) · top-1 {end['top1']:.1%} on {m['curve_tokens']:,} tokens"


def _ppo_figure(layout: RunLayout) -> str:
    m = read_json(layout.ppo.metrics)
    before, after = m["before"], m["after"]
    return (f"held-out KL {before['kl']:.3f} → {after['kl']:.3f} · top-10 share {before['top10_share']:.1%} → "
            f"{after['top10_share']:.1%}")


def _importance_figure(run: RunLayout) -> str:
    m = read_json(run.importance)
    check = m["validation"]["decoder"]["spearman"]
    return (f"top-10 share {m['top10_share']:.1%} of |attribution| per prediction (design: ≥ 30%) · Spearman with "
            f"exact ablation {check:.2f} (top {m['validation']['features']})")


def _evidence_figure(run: RunLayout) -> str:
    m = read_json(run.evidence)
    return f"{m['live']:,} of {m['num_latents']:,} features fire in {m['tokens']:,} tokens ({m['dense']:,} dense)"


def _label_figure(run: RunLayout, backend: str) -> str:
    scores = read_json(run.scores)
    sample = scores["summary"][backend]["sample"]
    low, high = sample["verified_ci95"]
    return (f"verified {sample['verified']}/{sample['n']} of the random sample [{low:.0%}, {high:.0%}] (design: > 85%; "
            f"a label with no signal passes with probability {scores['chance_rate']:.1%}, shuffled labels "
            f"{sample['control_verified_frac']:.0%})")
