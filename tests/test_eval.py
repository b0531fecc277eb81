"""`faithlens eval`: every row of the success-metrics table on a tiny run, JSON contract, plots."""

from __future__ import annotations

import json
import shutil

from tests.test_interpret import make_run

ROWS = {"kl", "top1", "l0", "task_degradation", "label_coverage", "ood_kl", "fvu", "mse", "top10_share"}


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
    for metric in ("kl", "top1", "l0", "task_degradation", "ood_kl", "fvu", "mse"):
        assert rows[metric]["value"] is not None and isinstance(rows[metric]["passed"], bool), metric
    assert rows["l0"]["value"] == 8.0 and rows["l0"]["passed"] is False  # TopK k=8 is below the 50–100 target
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
