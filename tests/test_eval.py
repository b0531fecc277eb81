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
        "fvu", "mse", "top10_share"}


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
    for metric in ("kl", "top1", "l0", "next_token_degradation", "ood_accuracy_ratio", "task_degradation", "ood_kl", "fvu", "mse"):
        assert rows[metric]["value"] is not None and isinstance(rows[metric]["passed"], bool), metric
    assert rows["l0"]["value"] == 8.0 and rows["l0"]["passed"] is False  # TopK k=8 is below the 50–100 target
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
    assert MetricRow.measure("top1", 0.8125).shown_value == "81.2%" and MetricRow.measure("fvu", 0.1).shown_value == "0.100"
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
