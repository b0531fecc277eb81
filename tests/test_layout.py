"""The run-folder layout, stage reuse by config digest, and the demo's reruns on a tiny model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from models.errors import ConfigError
from training.config import to_record
from training.layout import RunLayout, Stage, decoder_dir, resolve_sae_dir
from training.stages import StagePlan, stage_is_current


def _touch(path: Path, text: str = "{}") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_layout_names_every_stage_folder_and_artifact(tmp_path):
    from interpret.run import InterpretRun

    run = RunLayout(tmp_path)
    assert InterpretRun is RunLayout
    assert run.sae_run.sae == tmp_path / "sae" / "sae"
    assert run.sae_run.latest_checkpoint == tmp_path / "sae" / "checkpoints" / "latest"
    assert run.distill.decoder == tmp_path / "distill" / "decoder"
    assert run.distill.config == tmp_path / "distill" / "config.json"
    assert run.ppo.tb == tmp_path / "ppo" / "tb"
    assert run.ppo.rllib_policy == tmp_path / "ppo" / "checkpoint" / "learner_group" / "learner" / "rl_module" / "default_policy"
    assert run.importance == tmp_path / "interpret" / "importance.json"
    assert run.step_config("label") == tmp_path / "interpret" / "label_config.json"
    assert (run.eval_json, run.explain_html) == (tmp_path / "eval" / "eval.json", tmp_path / "explain.html")
    assert run.stage("sae").record == run.sae_run.config and run.stage("sae").recorded_by_job
    assert run.stage("labels").record == tmp_path / "interpret" / "labels_stage.json"
    with pytest.raises(ValueError, match="no stage 'cache'"):
        run.stage("cache")


def test_decoder_and_sae_folders_resolve_from_a_run_or_a_stage(tmp_path):
    run = RunLayout(tmp_path)
    with pytest.raises(ConfigError, match="no decoder found"):
        run.decoder_dir
    _touch(run.distill.decoder / "decoder.json")
    assert run.decoder_dir == run.distill.decoder
    assert decoder_dir(run.distill.root) == decoder_dir(run.distill.decoder) == run.distill.decoder
    _touch(run.decoder / "decoder.json")
    assert run.decoder_dir == run.decoder  # RUN/decoder wins over RUN/distill/decoder

    with pytest.raises(ConfigError, match="no sae/ folder"):
        run.sae_dir()
    assert run.sae_dir(str(tmp_path / "elsewhere")) == tmp_path / "elsewhere"
    _touch(run.sae_run.sae / "cfg.json")
    assert run.sae_dir() == resolve_sae_dir(run.sae_run.root) == resolve_sae_dir(run.sae_run.sae) == run.sae_run.sae
    assert RunLayout.of_sae(run.sae_run.sae) == run.sae_run
    assert RunLayout.of_sae(tmp_path / "bare") == RunLayout(tmp_path / "bare")


def test_stage_is_current_compares_only_the_requested_settings(tmp_path):
    from sae.config import SaeTrainConfig

    stage = RunLayout(tmp_path).stage("sae")
    wanted = to_record(SaeTrainConfig(k=64, out=tmp_path / "sae"))
    assert stage_is_current(stage, wanted) == (False, [])  # never ran

    _touch(stage.done)
    current, why = stage_is_current(stage, wanted)
    assert not current and "has no saved config" in why[0]

    _touch(stage.record, json.dumps({**to_record(SaeTrainConfig(k=32, out=tmp_path / "sae")), "kind": "sae"}))
    assert stage_is_current(stage, wanted) == (False, ["k: 32 → 64"])

    # keys the job records beyond the request, and how it ran (workers), do not count
    _touch(stage.record, json.dumps({**wanted, "kind": "sae", "workers": 4}))
    assert stage_is_current(stage, wanted) == (True, [])
    stage.done.unlink()
    assert stage_is_current(stage, wanted) == (False, [])  # same settings, not finished: resume


def test_a_rerun_stage_forces_its_readers_and_removes_their_outputs(tmp_path):
    stages = {name: Stage(name, tmp_path / f"{name}.json", tmp_path / f"{name}.out",
                          (tmp_path / f"{name}.out", tmp_path / f"{name}.json")) for name in "abcd"}
    for stage in stages.values():
        _touch(stage.record, json.dumps({"x": 1}))
        _touch(stage.done)
    said: list[str] = []
    plan = StagePlan(stages, {"a": (), "b": ("a",), "c": ("b",), "d": ("a",)}, say=said.append)
    assert plan.readers("a") == ["b", "c", "d"] and plan.readers("b") == ["c"]

    assert plan.reuse("a", {"x": 1})
    assert not plan.reuse("b", {"x": 2})
    assert said == ["b: x: 1 → 2; rerunning b and the stages after it (c)"]
    assert not any(p.exists() for p in (*stages["b"].outputs, *stages["c"].outputs))
    plan.finished("b", {"x": 2})
    assert json.loads(stages["b"].record.read_text()) == {"x": 2}

    assert not plan.reuse("c", {"x": 1})  # its settings are the same, but it read b's old output
    assert said[-1] == "c: rerunning (it reads the output of b)"
    assert plan.reuse("d", {"x": 1})  # reads only a


# -- the demo on a tiny model ---------------------------------------------------------------------
STAGES = ("baseline", "sae", "distill", "ppo", "importance", "evidence", "labels", "explain", "eval")
"""The demo's reusable steps in the order it prints them (labels and their scores are one step)."""


def _demo(model: Path, out: Path, sae_k: int) -> None:
    from faithlens_cli import main

    assert main(["demo", "--model", str(model), "--layer", "2", "--out", str(out), "--data", "builtin:tasks:arithmetic+comparison",
                 "--cache-tokens", "3000", "--baseline-tokens", "256", "--sae-latents", "64", "--sae-k", str(sae_k),
                 "--sae-eval-tokens", "256", "--decoder-arch", "readout", "--ppo-steps", "512", "--label-top", "2", "--label-sample", "2",
                 "--eval-tokens", "256", "--task-examples", "1", "--distill-tokens", "2048", "--labeller", str(model)]) == 0


def _outcomes(printed: str) -> list[str]:
    """'reused' or 'done' for every numbered step after load and cache."""
    return [m.split()[0] for m in re.findall(r"(reused|done in \d+ s) → ", printed)][2:]


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def demo_run(tiny_model_dir, tmp_path_factory):
    """One demo run on the tiny model, inside one Ray instance for the module (each job would start its own)."""
    import ray

    out = tmp_path_factory.mktemp("demo") / "run"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        _demo(tiny_model_dir, out, sae_k=8)
        yield out
    finally:
        ray.shutdown()


def test_demo_rerun_with_the_same_settings_reuses_every_stage(demo_run, tiny_model_dir, capsys):
    capsys.readouterr()
    before = _mtimes(demo_run)
    _demo(tiny_model_dir, demo_run, sae_k=8)
    printed = capsys.readouterr().out
    assert _outcomes(printed) == ["reused"] * len(STAGES), printed
    assert "rerunning" not in printed
    assert _mtimes(demo_run) == before  # nothing was rewritten


def test_demo_rerun_with_another_sae_k_retrains_the_sae_and_every_stage_after_it(demo_run, tiny_model_dir, capsys):
    run = RunLayout(demo_run)
    capsys.readouterr()
    before = _mtimes(demo_run)
    _demo(tiny_model_dir, demo_run, sae_k=4)
    printed = capsys.readouterr().out
    assert "sae: k: 8 → 4; rerunning sae and the stages after it (distill, ppo," in printed
    assert _outcomes(printed) == ["reused"] + ["done"] * (len(STAGES) - 1), printed  # the baselines read no SAE
    after = _mtimes(demo_run)
    for path in (run.sae_run.metrics, run.distill.decoder / "decoder.json", run.ppo.metrics, run.importance,
                 run.evidence, run.labels, run.scores, run.explain_html, run.eval_json):
        key = str(path.relative_to(demo_run))
        assert after[key] != before.get(key), key
    assert after["baseline/baseline.json"] == before["baseline/baseline.json"]
    assert json.loads(run.sae_run.config.read_text())["k"] == 4
    assert json.loads((run.sae_run.sae / "cfg.json").read_text())["k"] == 4
