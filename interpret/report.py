"""`faithlens eval RUN`: the success-metrics table, every value computed here on held-out data.

Rows (target, measured value, pass/fail), with the design's targets as written (interpret/eval_records.py
TARGETS): decoder faithfulness KL(p_frozen ‖ p_decoder) and top-1 agreement, next-token accuracy degradation
and out-of-domain accuracy ratio, SAE sparsity (L0) and reconstruction (explained variance, normalised MSE),
feature-label coverage (share of live features with a verified label: held-out detection AUROC ≥ 0.8, above
the shuffled-label control, not dense; estimated on the stratified random sample of `features label
--sample`, with its Wilson 95% interval; see interpret/coverage.py) and explanation coverage (top-10 share of
|attribution| per prediction, from `features importance`). Two rows have targets the project set itself, and
say so beside the design's wording: task-suite exact-match degradation and out-of-domain KL. Baselines beside them: the
logit lens, the tuned lens, the SAE-spliced model, and the supervised-only vs PPO-tuned decoder.
A row that cannot be measured for this run (no labels yet, no PPO run) is shown as not measured.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from interpret.config import EvalConfig
from interpret.coverage import Selection, coverage_note, verified_share
from interpret.eval_records import TARGETS, Baseline, CorpusScore, EvalReport, MetricRow
from interpret.run import InterpretRun
from models.errors import ConfigError
from models.io import read_json, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

PRIMARY = "supervised decoder"
"""The decoder the metrics rows judge; a PPO decoder, if any, is shown beside it in the baselines."""


def _resolve(run: InterpretRun, cfg: EvalConfig, meta: dict) -> tuple[EvalConfig, Path | None, Path | None]:
    data = cfg.data or meta.get("data") or ""
    if not data:
        from corpus.config import DEFAULT_DATA

        data = DEFAULT_DATA
    ood = cfg.ood or meta.get("ood_domain", "")
    ppo = cfg.ppo if cfg.ppo is not None else (run.ppo.root if run.ppo.root.is_dir() else None)
    if ppo is not None:
        from training.layout import decoder_dir

        ppo = decoder_dir(Path(ppo))
        if not (ppo / "decoder.json").is_file():
            log.warning("no exported decoder in %s; the PPO comparison is skipped", ppo)
            ppo = None
    lens = cfg.lens if cfg.lens is not None else run.lens_dir
    return replace(cfg, data=data, ood=ood), ppo, lens


def _label_coverage_row(run: InterpretRun) -> tuple[MetricRow, dict]:
    """The label-coverage row (the verified fraction of the scored random sample, with its Wilson 95% interval),
    and the label scores' summary it was computed from."""
    if not run.scores.is_file():
        return MetricRow.measure("label_coverage", None, "not measured: run `features label` and `features score`"), {}
    scores = json.loads(run.scores.read_text())
    selection = Selection.from_json(scores["selection"]) if scores.get("selection") else None
    if selection is None or not selection.sample:
        return MetricRow.measure("label_coverage", None, "not measured: no random sample of live features was scored; "
                                 "run `features label --sample N` and `features score`"), scores.get("summary", {})
    rows = scores.get("features", {})
    share = verified_share({fid: rows.get(str(fid), {}) for fid in selection.sample})
    top_only = [fid for fid in selection.top if fid not in set(selection.sample)]
    note = coverage_note(share, selection.live)
    if top_only:
        top = verified_share({fid: rows.get(str(fid), {}) for fid in top_only})
        note += f"; the {len(top_only)} --top features outside it are kept apart ({top['verified']} verified)"
    return MetricRow.measure("label_coverage", share["verified_frac"], note, share["verified_ci95"]), scores.get("summary", {})


def _importance_share_row(run: InterpretRun) -> MetricRow:
    if not run.importance.is_file():
        return MetricRow.measure("top10_share", None, "not measured: run `features importance`")
    imp = read_json(run.importance)
    return MetricRow.measure("top10_share", imp["top10_share"],
                             f"{imp['share_predictions']} predictions, decoder {imp.get('decoder')}")


def _load_methods(comp, ppo_dir: Path | None, lens_dir: Path | None) -> tuple[dict, object | None]:
    """The decoders to score (name → (decoder, SAE)) and the tuned lens, if the run has one."""
    from models.decoder import load_decoder
    from models.head import FrozenHead
    from models.lens import TunedLens

    head = FrozenHead.from_frozen(comp.frozen)
    decoders = {PRIMARY: (comp.decoder, comp.sae)}
    if ppo_dir is not None:
        ppo = load_decoder(ppo_dir, head)
        decoders["PPO decoder"] = (ppo, comp.sae)
        start = ppo_start(ppo_dir)
        if ppo.cfg.arch != comp.decoder.cfg.arch and start is not None:
            # PPO is judged against the supervised decoder it started from: the same architecture
            decoders[f"PPO's start (supervised {ppo.cfg.arch})"] = (load_decoder(start, head), comp.sae)
    return decoders, TunedLens.load(lens_dir, head) if lens_dir is not None else None


def ppo_start(ppo_decoder_dir: Path) -> Path | None:
    """The distilled decoder a PPO run started from (its config.json's `decoder`), if it is still there."""
    from models.decoder import read_decoder_meta
    from training.config import read_record
    from training.layout import RunLayout, decoder_dir

    config = RunLayout.of_decoder(ppo_decoder_dir).config
    start = read_record(config).get("decoder") if config.is_file() else None
    if not start:
        return None
    try:
        folder = decoder_dir(Path(start))
        read_decoder_meta(folder)
    except ConfigError:
        return None
    return folder


def _score_corpora(cfg: EvalConfig, comp, decoders: dict, lens, progress: bool) -> dict[str, dict]:
    """Every method (decoders, logit/tuned lens, spliced SAE) on the held-out in-domain data and, if given, the OOD source."""
    import torch

    from distill.evaluate import score_corpus

    torch.manual_seed(cfg.seed)
    corpora = {"in_domain": score_corpus(cfg, comp.frozen, comp.layer, decoders, comp.sae, lens, progress)}
    if cfg.ood:
        corpora["ood"] = score_corpus(replace(cfg, split="ood"), comp.frozen, comp.layer, decoders, comp.sae, lens, progress)
    return corpora


def _sae_metrics(cfg: EvalConfig, comp, progress: bool) -> dict:
    from sae.metrics import SaeEvalConfig, evaluate_sae

    sae_cfg = SaeEvalConfig(model=cfg.model, data=cfg.data, tokens=cfg.tokens, split=cfg.split, splice=False,
                            batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed)
    return evaluate_sae(comp.sae, comp.frozen, sae_cfg, comp.layer, progress)


def _layer_curve(cfg: EvalConfig, frozen, progress: bool) -> list[dict]:
    from distill.baseline import BaselineConfig, measure_baseline

    # the logit lens needs far fewer tokens than the decoders for a stable curve
    base_cfg = BaselineConfig(model=cfg.model, data=cfg.data, split=cfg.split, seq_len=cfg.seq_len,
                              tokens=min(cfg.tokens, 4096), batch_size=cfg.batch_size, seed=cfg.seed)
    return measure_baseline(base_cfg, frozen, progress)["layers"]


def _suites(cfg: EvalConfig) -> list[str]:
    return [s.strip() for s in cfg.tasks.split(",") if s.strip()]


def _tasks(cfg: EvalConfig, comp, decoders: dict) -> dict | None:
    from distill.task_eval import task_answer_exact_match

    suites = _suites(cfg)
    if not (suites and cfg.task_examples):
        return None
    return task_answer_exact_match(comp.frozen, comp.layer, decoders, suites, cfg.task_examples, cfg.seed,
                                   mode=cfg.task_mode, prompt_format=cfg.prompt_format)


def _decoder_rows(cfg: EvalConfig, corpora: dict[str, dict]) -> list[MetricRow]:
    in_domain = corpora["in_domain"]
    ind = in_domain["methods"][PRIMARY]
    ood = corpora.get("ood")
    not_measured = "not measured: pass --ood SOURCE"
    ratio = ood["methods"][PRIMARY]["next_token_acc"] / ood["frozen_next_token_acc"] if ood and ood["frozen_next_token_acc"] else None
    return [MetricRow.measure("kl", ind["kl"], f"{in_domain['tokens']:,} held-out tokens of {cfg.data}"),
            MetricRow.measure("top1", ind["top1"], f"the same {in_domain['tokens']:,} tokens"),
            MetricRow.measure("next_token_degradation", ind["next_token_degradation_points"],
                              f"frozen {in_domain['frozen_next_token_acc']:.1%} vs decoder {ind['next_token_acc']:.1%} "
                              f"on the same {in_domain['tokens']:,} tokens"),
            MetricRow.measure("ood_kl", ood["methods"][PRIMARY]["kl"] if ood else None,
                              f"{ood['tokens']:,} tokens of {cfg.ood}" if ood else not_measured),
            MetricRow.measure("ood_accuracy_ratio", ratio,
                              f"decoder {ood['methods'][PRIMARY]['next_token_acc']:.1%} vs frozen "
                              f"{ood['frozen_next_token_acc']:.1%} on {ood['tokens']:,} tokens of {cfg.ood}"
                              if ratio is not None else not_measured if not ood else
                              "not defined: the frozen model's out-of-domain accuracy is 0")]


def _sae_rows(comp, sae_metrics: dict) -> list[MetricRow]:
    sae_cfg = comp.sae.cfg
    tokens = f"{sae_metrics['tokens']:,} held-out tokens"
    return [MetricRow.measure("l0", sae_metrics["l0"], f"{sae_cfg.arch} SAE, {sae_cfg.num_latents:,} latents; {tokens}"),
            MetricRow.measure("explained_variance", sae_metrics["explained_variance"],
                              f"FVU {sae_metrics['fvu']:.3f} (the target is FVU < 0.05); {tokens}"),
            MetricRow.measure("mse", sae_metrics["mse_normalized"], tokens)]


def _task_row(cfg: EvalConfig, tasks: dict | None) -> MetricRow:
    if not tasks:
        return MetricRow.measure("task_degradation", None, "not measured (--tasks empty)")
    overall = tasks["overall"]
    primary = overall["decoders"][PRIMARY]
    return MetricRow.measure(
        "task_degradation", primary["degradation_points"],
        f"frozen {overall['frozen']:.1%} vs decoder {primary['accuracy']:.1%} over {overall['examples']} examples "
        f"({', '.join(_suites(cfg))}; {cfg.task_mode}, {tasks['prompt_format']} prompts)")


def _baselines(corpora: dict[str, dict], tasks: dict | None, decoders: dict) -> dict[str, Baseline]:
    baselines: dict[str, Baseline] = {}
    for corpus, res in corpora.items():
        for method, m in res["methods"].items():
            baselines.setdefault(method, Baseline()).corpora[corpus] = CorpusScore(m["ce"], m["kl"], m["top1"])
    if tasks:
        for name in decoders:
            baselines[name].task_accuracy = tasks["overall"]["decoders"][name]["accuracy"]
        baselines["frozen"] = Baseline({c: CorpusScore(r["frozen_ce"]) for c, r in corpora.items()},
                                       tasks["overall"]["frozen"])
    return baselines


def evaluate_run(cfg: EvalConfig, progress: bool = True) -> EvalReport:
    """Measure every metrics row and baseline for the run in `cfg.run` (plots and config are left to `run_eval`)."""
    from interpret.components import load_components

    run = InterpretRun(cfg.run)
    comp = load_components(run, cfg)
    cfg, ppo_dir, lens_dir = _resolve(run, cfg, comp.meta)
    decoders, lens = _load_methods(comp, ppo_dir, lens_dir)
    corpora = _score_corpora(cfg, comp, decoders, lens, progress)
    sae_metrics = _sae_metrics(cfg, comp, progress)
    layer_curve = _layer_curve(cfg, comp.frozen, progress)
    tasks = _tasks(cfg, comp, decoders)
    coverage, label_summary = _label_coverage_row(run)
    rows = {r.metric: r for r in [*_decoder_rows(cfg, corpora), *_sae_rows(comp, sae_metrics), _task_row(cfg, tasks),
                                  coverage, _importance_share_row(run)]}
    return EvalReport(
        run=str(run.root), model=comp.frozen.name, layer=comp.layer, data=cfg.data, ood=cfg.ood,
        rows=[rows[m] for m in TARGETS], baselines=_baselines(corpora, tasks, decoders), layer_curve=layer_curve,
        corpora=corpora, sae={k: v for k, v in sae_metrics.items() if not isinstance(v, (dict, list))}, tasks=tasks,
        labels=label_summary, decoders={PRIMARY: str(run.decoder_dir), "PPO decoder": str(ppo_dir) if ppo_dir else None},
        lens=str(lens_dir) if lens_dir else None)


def _baseline_cell(b: Baseline, corpus: str) -> str:
    s = b.corpora.get(corpus)
    return "—" if s is None or s.kl is None else f"{s.kl:.3f} · {s.top1:.1%}"


def report_markdown(report: EvalReport) -> str:
    lines = [f"faithlens eval — {report.run} ({report.model}, layer {report.layer})", "",
             "| metric | target | value | passed | note |", "|---|---|---:|---|---|"]
    for r in report.rows:
        passed = "not measured" if r.passed is None else ("yes" if r.passed else "**no**")
        lines.append(f"| {r.description} | {r.shown_target} | {r.shown_value} | {passed} | {r.note} |")
    lines += ["", "Baselines (KL nats/token · top-1):", "", "| method | " + " | ".join(report.corpora) + " |",
              "|---|" + "---:|" * len(report.corpora)]
    for method, b in report.baselines.items():
        if b.scored_kl:
            lines.append(f"| {method} | " + " | ".join(_baseline_cell(b, c) for c in report.corpora) + " |")
    if report.tasks:
        t = report.tasks
        names = list(t["overall"]["decoders"])
        lines += ["", f"Task accuracy (exact match after answer normalisation; {t['mode']}, {t['prompt_format']} prompts):", "",
                  "| suite | examples | frozen | " + " | ".join(names) + " |", "|---|" + "---:|" * (2 + len(names))]
        for suite, acc in [*t["suites"].items(), ("overall", t["overall"])]:
            lines.append(f"| {suite} | {acc['examples']} | {acc['frozen']:.1%} | "
                         + " | ".join(f"{acc['decoders'][n]['accuracy']:.1%}" for n in names) + " |")
    return "\n".join(lines)


def print_table(report: EvalReport, console: Console) -> None:
    from rich.markup import escape

    table = Table(title=f"faithlens eval · {escape(report.run)} · layer {report.layer}")
    for col, just in (("metric", "left"), ("target", "right"), ("value", "right"), ("", "center"), ("note", "left")):
        table.add_column(col, justify=just)
    for r in report.rows:
        mark = "[dim]not measured[/]" if r.passed is None else ("[green]✓ met[/]" if r.passed else "[red]✗ not met[/]")
        table.add_row(escape(r.description), escape(r.shown_target), r.shown_value, mark, escape(r.note))
    console.print(table)
    base = Table(title="baselines: KL (nats/token) · top-1")
    base.add_column("method")
    for c in report.corpora:
        base.add_column(c, justify="right")
    for method, b in report.baselines.items():
        if b.scored_kl:
            base.add_row(escape(method), *[_baseline_cell(b, c) for c in report.corpora])
    console.print(base)


def run_eval(cfg: EvalConfig) -> EvalReport:
    from interpret.plots import write_plots

    report = evaluate_run(cfg, progress=not cfg.json)
    out = InterpretRun(cfg.run).eval.root
    report.plots = [str(p) for p in write_plots(report, cfg.plots or out / "plots")]
    report.config = {k: str(v) for k, v in asdict(cfg).items()}
    write_json_atomic(out / "eval.json", report.to_json())
    write_text_atomic(out / "eval.md", report_markdown(report) + "\n")
    if cfg.json:
        print(json.dumps(report.to_json()))
    else:
        print_table(report, Console())
        print(f"wrote {out / 'eval.json'}, {out / 'eval.md'} and plots in {cfg.plots or out / 'plots'}")
    return report
