"""`faithlens eval RUN`: the success-metrics table, every value computed here on held-out data.

Rows (target, measured value, pass/fail): decoder faithfulness KL(p_frozen ‖ p_decoder) and top-1
agreement, SAE sparsity (L0) and reconstruction (FVU, normalised MSE), task-accuracy degradation
(frozen − decoder exact match, in accuracy points), feature-label coverage (share of live features
whose best label has detection balanced accuracy ≥ 0.7), out-of-domain KL, and explanation coverage
(top-10 share of |attribution| per prediction, from `features importance`). Baselines beside them: the
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
from interpret.run import InterpretRun
from models.io import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

# metric key -> (description, target text, test)
TARGETS = {
    "kl": ("decoder faithfulness: KL(p_frozen ‖ p_decoder), nats/token", "< 0.5", lambda v: v < 0.5),
    "top1": ("decoder top-1 agreement with the frozen model", "> 75%", lambda v: v > 0.75),
    "l0": ("sparsity: active SAE features per token (L0)", "50–100", lambda v: 50 <= v <= 100),
    "task_degradation": ("task-accuracy loss vs the frozen model (accuracy points)", "< 3", lambda v: v < 3.0),
    "label_coverage": ("live features with a verified label (detection ≥ 0.7)", "> 85%", lambda v: v > 0.85),
    "ood_kl": ("out-of-domain decoder KL, nats/token", "< 1.0", lambda v: v < 1.0),
    "fvu": ("SAE reconstruction: fraction of variance unexplained", "< 0.2", lambda v: v < 0.2),
    "mse": ("SAE reconstruction: MSE on normalised activations (E‖x‖² = d)", "< 0.2", lambda v: v < 0.2),
    "top10_share": ("explanation coverage: top-10 share of attribution magnitude per prediction", "≥ 30%", lambda v: v >= 0.30),
}
PERCENT = {"top1", "label_coverage", "top10_share"}


def row(metric: str, value: float | None, note: str = "") -> dict:
    desc, target, test = TARGETS[metric]
    return {"metric": metric, "description": desc, "target": target, "value": value,
            "passed": None if value is None else bool(test(value)), "note": note}


def _resolve(run: InterpretRun, cfg: EvalConfig, meta: dict) -> tuple[EvalConfig, Path | None, Path | None]:
    data = cfg.data or meta.get("data") or ""
    if not data:
        from corpus.config import DEFAULT_DATA

        data = DEFAULT_DATA
    ood = cfg.ood or meta.get("ood_domain", "")
    ppo = cfg.ppo if cfg.ppo is not None else (run.root / "ppo" if (run.root / "ppo").is_dir() else None)
    if ppo is not None:
        from distill.evaluate import decoder_dir

        ppo = decoder_dir(Path(ppo))
        if not (ppo / "decoder.json").is_file():
            log.warning("no exported decoder in %s; the PPO comparison is skipped", ppo)
            ppo = None
    lens = cfg.lens if cfg.lens is not None else (run.root / "lens" if (run.root / "lens").is_dir() else None)
    return replace(cfg, data=data, ood=ood), ppo, lens


def _label_coverage(run: InterpretRun) -> tuple[float | None, str, dict]:
    if not (run.scores.is_file() and run.evidence.is_file()):
        return None, "not measured: run `features label` and `features score`", {}
    live = int(json.loads(run.evidence.read_text())["live"])
    scores = json.loads(run.scores.read_text())
    best: dict[str, float] = {}
    for f, by_backend in scores.get("features", {}).items():
        values = [s.get("detection") for s in by_backend.values() if s.get("detection") is not None]
        if values:
            best[f] = max(values)
    verified = sum(v >= 0.7 for v in best.values())
    note = (f"{verified} of {live:,} live features verified; {len(best)} scored"
            + (f", of which {verified / len(best):.0%} pass" if best else ""))
    return verified / max(1, live), note, scores.get("summary", {})


def _top10_share(run: InterpretRun) -> tuple[float | None, str]:
    if not run.importance.is_file():
        return None, "not measured: run `features importance`"
    imp = json.loads(run.importance.read_text())
    return imp["top10_share"], f"{imp['share_predictions']} predictions, decoder {imp.get('decoder')}"


def evaluate_run(cfg: EvalConfig, progress: bool = True) -> dict:
    import torch

    from distill.evaluate import score_corpus
    from distill.task_eval import evaluate_tasks
    from interpret.components import load_components
    from models.decoder import load_decoder
    from models.head import FrozenHead
    from models.lens import TunedLens
    from sae.metrics import SaeEvalConfig, evaluate_sae

    run = InterpretRun(cfg.run)
    comp = load_components(run, cfg)
    cfg, ppo_dir, lens_dir = _resolve(run, cfg, comp.meta)
    frozen, sae, layer = comp.frozen, comp.sae, comp.layer
    head = FrozenHead.from_frozen(frozen)
    decoders = {"supervised decoder": (comp.decoder, sae)}
    if ppo_dir is not None:
        decoders["PPO decoder"] = (load_decoder(ppo_dir, head), sae)
    lens = TunedLens.load(lens_dir, head) if lens_dir is not None else None
    torch.manual_seed(cfg.seed)
    corpora = {"in_domain": score_corpus(cfg, frozen, layer, decoders, sae, lens, progress)}
    if cfg.ood:
        corpora["ood"] = score_corpus(replace(cfg, split="ood"), frozen, layer, decoders, sae, lens, progress)
    sae_cfg = SaeEvalConfig(model=cfg.model, data=cfg.data, tokens=cfg.tokens, split=cfg.split, splice=False,
                            batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed)
    sae_metrics = evaluate_sae(sae, frozen, sae_cfg, layer, progress)
    from distill.baseline import BaselineConfig, measure_baseline

    layer_curve = measure_baseline(BaselineConfig(model=cfg.model, data=cfg.data, split=cfg.split, seq_len=cfg.seq_len,
                                                  tokens=min(cfg.tokens, 4096), batch_size=cfg.batch_size, seed=cfg.seed),
                                   frozen, progress)["layers"]
    suites = [s.strip() for s in cfg.tasks.split(",") if s.strip()]
    tasks = (evaluate_tasks(frozen, layer, decoders, suites, cfg.task_examples, cfg.seed, mode=cfg.task_mode,
                            prompt_format=cfg.prompt_format) if suites and cfg.task_examples else None)
    primary = "supervised decoder"
    ind = corpora["in_domain"]["methods"]
    coverage, coverage_note, label_summary = _label_coverage(run)
    share, share_note = _top10_share(run)
    degradation = None
    task_note = "not measured (--tasks empty)"
    if tasks:
        overall = tasks["overall"]
        degradation = overall["decoders"][primary]["degradation_points"]
        task_note = (f"frozen {overall['frozen']:.1%} vs decoder {overall['decoders'][primary]['accuracy']:.1%} over "
                     f"{overall['examples']} examples ({', '.join(suites)}; {cfg.task_mode}, {tasks['prompt_format']} prompts)")
    rows = [
        row("kl", ind[primary]["kl"], f"{corpora['in_domain']['tokens']:,} held-out tokens of {cfg.data}"),
        row("top1", ind[primary]["top1"]),
        row("l0", sae_metrics["l0"], f"{sae.cfg.arch} SAE, {sae.cfg.num_latents:,} latents"),
        row("task_degradation", degradation, task_note),
        row("label_coverage", coverage, coverage_note),
        row("ood_kl", corpora["ood"]["methods"][primary]["kl"] if "ood" in corpora else None,
            f"{corpora['ood']['tokens']:,} tokens of {cfg.ood}" if "ood" in corpora else "not measured: pass --ood SOURCE"),
        row("fvu", sae_metrics["fvu"]),
        row("mse", sae_metrics["mse_normalized"]),
        row("top10_share", share, share_note),
    ]
    baselines = {}
    for corpus, res in corpora.items():
        for method, m in res["methods"].items():
            key = {"logit_lens": "logit_lens", "tuned_lens": "tuned_lens", "spliced_sae": "spliced_sae"}.get(method, method)
            baselines.setdefault(key, {})[corpus] = {k: m[k] for k in ("kl", "top1", "ce")}
    if tasks:
        for name in decoders:
            baselines[name]["task_accuracy"] = tasks["overall"]["decoders"][name]["accuracy"]
        baselines["frozen"] = {"task_accuracy": tasks["overall"]["frozen"],
                               **{c: {"ce": r["frozen_ce"]} for c, r in corpora.items()}}
    return {"run": str(run.root), "model": frozen.name, "layer": layer, "data": cfg.data, "ood": cfg.ood,
            "rows": rows, "baselines": baselines, "layer_curve": layer_curve, "corpora": corpora, "sae": {k: v for k, v in sae_metrics.items()
                                                                            if not isinstance(v, (dict, list))},
            "tasks": tasks, "labels": label_summary, "decoders": {"supervised decoder": str(run.decoder_dir),
                                                                   "PPO decoder": str(ppo_dir) if ppo_dir else None},
            "lens": str(lens_dir) if lens_dir else None}


def _fmt(metric: str, value) -> str:
    if value is None:
        return "—"
    return f"{value:.1%}" if metric in PERCENT else f"{value:.3f}"


def report_markdown(result: dict) -> str:
    lines = [f"faithlens eval — {result['run']} ({result['model']}, layer {result['layer']})", "",
             "| metric | target | value | passed | note |", "|---|---|---:|---|---|"]
    for r in result["rows"]:
        passed = "not measured" if r["passed"] is None else ("yes" if r["passed"] else "**no**")
        lines.append(f"| {r['description']} | {r['target']} | {_fmt(r['metric'], r['value'])} | {passed} | {r['note']} |")
    lines += ["", "Baselines (KL nats/token · top-1):", "", "| method | " + " | ".join(result["corpora"]) + " |",
              "|---|" + "---:|" * len(result["corpora"])]
    for method, by_corpus in result["baselines"].items():
        cells = [f"{by_corpus[c]['kl']:.3f} · {by_corpus[c]['top1']:.1%}" if c in by_corpus and "kl" in by_corpus[c] else "—"
                 for c in result["corpora"]]
        if "kl" in json.dumps(by_corpus):
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if result.get("tasks"):
        t = result["tasks"]
        names = list(t["overall"]["decoders"])
        lines += ["", f"Task accuracy (exact match after answer normalisation; {t['mode']}, {t['prompt_format']} prompts):", "",
                  "| suite | examples | frozen | " + " | ".join(names) + " |", "|---|" + "---:|" * (2 + len(names))]
        for suite, acc in [*t["suites"].items(), ("overall", t["overall"])]:
            lines.append(f"| {suite} | {acc['examples']} | {acc['frozen']:.1%} | "
                         + " | ".join(f"{acc['decoders'][n]['accuracy']:.1%}" for n in names) + " |")
    return "\n".join(lines)


def print_table(result: dict, console: Console) -> None:
    from rich.markup import escape

    table = Table(title=f"faithlens eval · {escape(result['run'])} · layer {result['layer']}")
    for col, just in (("metric", "left"), ("target", "right"), ("value", "right"), ("", "center"), ("note", "left")):
        table.add_column(col, justify=just)
    for r in result["rows"]:
        mark = "[dim]not measured[/]" if r["passed"] is None else ("[green]✓ met[/]" if r["passed"] else "[red]✗ not met[/]")
        table.add_row(escape(r["description"]), r["target"], _fmt(r["metric"], r["value"]), mark, escape(r["note"]))
    console.print(table)
    base = Table(title="baselines: KL (nats/token) · top-1")
    base.add_column("method")
    for c in result["corpora"]:
        base.add_column(c, justify="right")
    for method, by_corpus in result["baselines"].items():
        if any("kl" in by_corpus.get(c, {}) for c in result["corpora"]):
            base.add_row(escape(method), *[f"{by_corpus[c]['kl']:.3f} · {by_corpus[c]['top1']:.1%}" if "kl" in by_corpus.get(c, {})
                                           else "—" for c in result["corpora"]])
    console.print(base)


def run_eval(cfg: EvalConfig) -> dict:
    from interpret.plots import write_plots

    result = evaluate_run(cfg, progress=not cfg.json)
    out = InterpretRun(cfg.run).root / "eval"
    result["plots"] = [str(p) for p in write_plots(result, InterpretRun(cfg.run), cfg.plots or out / "plots", cfg)]
    result["config"] = {k: str(v) for k, v in asdict(cfg).items()}
    write_json_atomic(out / "eval.json", result)
    write_text_atomic(out / "eval.md", report_markdown(result) + "\n")
    if cfg.json:
        print(json.dumps(result))
    else:
        print_table(result, Console())
        print(f"wrote {out / 'eval.json'}, {out / 'eval.md'} and plots in {cfg.plots or out / 'plots'}")
    return result
