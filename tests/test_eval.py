"""`faithlens eval`: every row of the success-metrics table on a tiny run, JSON contract, plots."""

from __future__ import annotations

import json
import shutil

import pytest
from rich.console import Console

from interpret.eval_records import Baseline, CorpusScore, EvalReport, MetricRow
from interpret.report import print_table, report_markdown
from tests.test_interpret import make_run

ROWS = {"kl", "top1", "l0", "next_token_degradation", "ood_accuracy_ratio", "task_degradation", "label_coverage", "ood_kl",
        "explained_variance", "mse", "top10_share"}


def test_eval_table_on_a_tiny_run_has_every_row_and_baseline(tiny_frozen, tmp_path, capsys):
    from faithlens_cli import main

    run = make_run(tiny_frozen, tmp_path / "run", arch="context")
    (run / "ppo").mkdir()
    shutil.copytree(run / "decoder", run / "ppo" / "decoder")  # stands in for an exported PPO policy
    history = [{"env_steps": 256 * i, "reward/r_faith": -3.0 + i, "reward/r_mono": 0.4, "reward/r_task": 0.1,
                "reward/reward": -1.0 + i, **({"eval/kl": 2.0 - 0.1 * i, "eval/top1": 0.3} if i % 2 else {})} for i in range(4)]
    (run / "ppo" / "history.json").write_text(json.dumps(history))
    code = main(["eval", str(run), "--model", str(tiny_frozen.name), "--data", "builtin:tasks:arithmetic+comparison",
                 "--ood", "builtin:tasks:copying", "--tokens", "512", "--seq-len", "32", "--tasks", "arithmetic,copying",
                 "--task-examples", "3", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    rows = {r["metric"]: r for r in result["rows"]}
    assert set(rows) == ROWS
    assert all({"metric", "target", "value", "passed"} <= set(r) for r in result["rows"])
    for metric in ("kl", "top1", "l0", "next_token_degradation", "ood_accuracy_ratio", "task_degradation", "ood_kl",
                   "explained_variance", "mse"):
        assert rows[metric]["value"] is not None and isinstance(rows[metric]["passed"], bool), metric
    assert rows["l0"]["value"] == 8.0 and rows["l0"]["passed"] is False  # TopK k=8 is below the 50–100 target
    assert rows["explained_variance"]["value"] == pytest.approx(1 - result["sae"]["fvu"])
    assert "FVU" in rows["explained_variance"]["note"] and "held-out tokens" in rows["mse"]["note"]
    project_own = {m for m, r in rows.items() if r["design"]}
    assert project_own == {"task_degradation", "ood_kl"}  # every other target is the design's as written
    ind, ood = result["corpora"]["in_domain"], result["corpora"]["ood"]
    primary = "supervised decoder"
    assert rows["next_token_degradation"]["value"] == pytest.approx(
        100 * (ind["frozen_next_token_acc"] - ind["methods"][primary]["next_token_acc"]))
    assert rows["ood_accuracy_ratio"]["value"] == pytest.approx(
        ood["methods"][primary]["next_token_acc"] / ood["frozen_next_token_acc"])
    assert rows["label_coverage"]["passed"] is None and "features label" in rows["label_coverage"]["note"]
    for method in ("logit_lens", "spliced_sae", "supervised decoder", "PPO decoder"):
        assert {"in_domain", "ood"} <= set(result["baselines"][method]), method
    # the PPO copy is the same decoder, so it must score exactly the same
    assert result["baselines"]["PPO decoder"]["in_domain"]["kl"] == result["baselines"]["supervised decoder"]["in_domain"]["kl"]
    assert {p.rsplit("/", 1)[1] for p in result["plots"]} == {"kl_by_layer.png", "ppo_training.png"}
    for p in result["plots"]:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    md = (run / "eval" / "eval.md").read_text()
    assert "not met" in md or "**no**" in md
    saved = json.loads((run / "eval" / "eval.json").read_text())
    assert saved == result  # eval.json is what --json printed
    assert EvalReport.from_json(saved).to_json() == saved  # and reads back unchanged (the demo reprints it)
    assert set(saved["baselines"]["frozen"]) == {"task_accuracy", "in_domain", "ood"}


def test_rows_judge_targets_and_every_view_renders_the_report():
    assert MetricRow.measure("kl", 0.4).passed is True and MetricRow.measure("kl", 0.6).passed is False
    assert MetricRow.measure("l0", 50.0).passed is True and MetricRow.measure("l0", 101.0).passed is False
    assert MetricRow.measure("top10_share", 0.3).passed is True  # "≥ 30%": the boundary passes
    missing = MetricRow.measure("label_coverage", None, "not measured: run `features label`")
    assert missing.passed is None and missing.shown_value == "—"
    assert MetricRow.measure("top1", 0.8125).shown_value == "81.2%"
    assert MetricRow.measure("explained_variance", 0.9).shown_value == "0.900"
    report = EvalReport(
        run="runs/x", model="m", layer=2, data="d", ood="", rows=[MetricRow.measure("kl", 0.25, "512 tokens"), missing],
        baselines={"logit_lens": Baseline({"in_domain": CorpusScore(3.0, 1.5, 0.25)}),
                   "supervised decoder": Baseline({"in_domain": CorpusScore(2.5, 0.25, 0.5)}, task_accuracy=0.5),
                   "frozen": Baseline({"in_domain": CorpusScore(2.0)}, task_accuracy=0.75)},
        layer_curve=[], corpora={"in_domain": {}}, sae={"l0": 8.0}, tasks=None, labels={},
        decoders={"supervised decoder": "runs/x/decoder", "PPO decoder": None}, lens=None)
    d = report.to_json()
    assert d["baselines"]["frozen"] == {"in_domain": {"ce": 2.0}, "task_accuracy": 0.75}
    assert d["baselines"]["logit_lens"] == {"in_domain": {"kl": 1.5, "top1": 0.25, "ce": 3.0}}
    assert EvalReport.from_json(json.loads(json.dumps(d))) == report
    md = report_markdown(report)
    assert "| 0.250 | yes | 512 tokens |" in md and "| not measured |" in md
    assert "| supervised decoder | 0.250 · 50.0% |" in md and "| frozen |" not in md  # the reference has no KL
    console = Console(record=True, width=200)
    print_table(report, console)
    text = console.export_text()
    assert "✓ met" in text and "not measured" in text and "1.500 · 25.0%" in text


@pytest.mark.parametrize("metric,target,passing,failing", [
    ("explained_variance", "> 0.95", 0.951, 0.95),  # the design's "explained variance > 0.95" (FVU < 0.05)
    ("mse", "< 0.01", 0.0099, 0.01),  # on normalised activations
    ("kl", "< 0.5", 0.49, 0.5),
    ("top1", "> 75%", 0.751, 0.75),
    ("next_token_degradation", "< 3 points", 2.9, 3.0),
    ("label_coverage", "> 85%", 0.851, 0.85),
    ("ood_accuracy_ratio", "≥ 80%", 0.80, 0.79),
    ("top10_share", "≥ 30%", 0.30, 0.29),
    ("l0", "50–100", 100.0, 49.0),
])
def test_targets_are_the_designs_as_written(metric, target, passing, failing):
    row = MetricRow.measure(metric, passing)
    assert row.target == target and row.shown_target == target and row.design == ""
    assert row.passed is True and MetricRow.measure(metric, failing).passed is False


def test_targets_the_project_set_itself_say_so_beside_the_designs_wording():
    ood_kl = MetricRow.measure("ood_kl", 0.9)
    assert ood_kl.passed is True and ood_kl.shown_target.startswith("< 1.0 (the project's own; the design: ")
    assert "accuracy ≥ 80%" in ood_kl.shown_target
    task = MetricRow.measure("task_degradation", 2.0)
    assert "the project's own" in task.shown_target and "next-token accuracy" in task.shown_target
    assert MetricRow.from_json(task.to_json()) == task
    md = report_markdown(EvalReport(run="r", model="m", layer=2, data="d", ood="", rows=[ood_kl], baselines={},
                                    layer_curve=[], corpora={}, sae={}, tasks=None, labels={}, decoders={}, lens=None))
    assert "(the project's own; the design: no out-of-domain KL target" in md
