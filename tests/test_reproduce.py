"""`faithlens reproduce`: the published plan lists without running; a plan runs stage by stage and a rerun skips
what finished; bad plans and stage names are one-line errors with exit status 2."""

import importlib

import pytest
import tyro

import faithlens_cli
from faithlens_cli import main
from models.errors import ConfigError
from reproduce.plan import PLAN, load_plan, marker


def _run(capsys, *args):
    code = main(["reproduce", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_published_plan_lists_every_stage_with_its_expected_time_and_runs_nothing(tmp_path, capsys):
    code, out, _ = _run(capsys, "--list", "--out", tmp_path)
    assert code == 0
    plan = load_plan(PLAN, tmp_path / "shared", tmp_path)
    for stage in plan.stages:
        assert any(line.split()[1:2] == [stage.name] and "todo" in line for line in out.splitlines()), stage.name
    for name in ("sae_topk80", "dec_g20", "ppo_share_l10", "eval_context"):
        assert name in plan.names
    assert "7.6 min" in out and "h expected on the 2-core machine" in out
    assert list(tmp_path.iterdir()) == []


def test_every_published_command_is_accepted_by_its_parser(tmp_path):
    """Each stage's flags exist (a stage may still stop at a missing input folder, which reproduce makes first)."""
    plan = load_plan(PLAN, tmp_path / "shared", tmp_path)
    for stage in plan.stages:
        args = stage.args
        name = " ".join(args[:2]) if " ".join(args[:2]) in faithlens_cli.COMMANDS else args[0]
        _, config_ref, _, help_ = faithlens_cli.COMMANDS[name]
        module, cls = config_ref.split(":")
        config_cls = getattr(importlib.import_module(module), cls)
        try:
            faithlens_cli._parse(config_cls, args[len(name.split()):], f"faithlens {name}", help_, tyro.MISSING_NONPROP)
        except ConfigError as e:
            assert "--help)" not in str(e), f"{stage.name}: {e}"  # a parse error, not a missing input


def _tiny_plan(path, model):
    common = f"--model {model} --data builtin:tasks --seq-len 32 --dtype fp32"
    path.write_text(f"""
stages:
  - name: baseline
    command: baseline {common} --tokens 64 --out {{dir}}
    out: baseline
    done: "{{dir}}/baseline.json"
    minutes: 0.1
  - name: cache
    command: cache {common} --layers 2 --tokens 128 --out {{dir}}
    out: cache
    reads: baseline
    minutes: 0.2
    estimated: true
""")
    return path


def test_a_plan_runs_stage_by_stage_and_a_rerun_skips_the_finished_stages(tiny_model_dir, tmp_path, capsys):
    plan, out = _tiny_plan(tmp_path / "plan.yaml", tiny_model_dir), tmp_path / "runs"
    code, stdout, err = _run(capsys, "--plan", plan, "--out", out)
    assert code == 0, err
    assert "[1/2] baseline: running" in stdout and "[2/2] cache: running" in stdout
    assert (out / "baseline" / "baseline.json").is_file()
    assert "$ faithlens baseline" in marker(out, "baseline").with_suffix(".log").read_text()
    assert "cache: 128 tokens" in marker(out, "cache").with_suffix(".log").read_text()

    code, stdout, _ = _run(capsys, "--plan", plan, "--out", out, "--list")
    assert code == 0 and all(" done " in line for line in stdout.splitlines()[1:3]), stdout
    code, stdout, _ = _run(capsys, "--plan", plan, "--out", out)
    assert code == 0 and "baseline: done, skipped" in stdout and "cache: done, skipped" in stdout

    # a stage whose output went missing runs again; so does a stage reading one that reran
    (out / "baseline" / "baseline.json").unlink()
    code, stdout, _ = _run(capsys, "--plan", plan, "--out", out, "--only", "baseline")
    assert code == 0 and "[1/1] baseline: resuming" in stdout and "cache" not in stdout
    code, stdout, _ = _run(capsys, "--plan", plan, "--out", out, "--from", "cache")
    assert code == 0 and "[1/1] cache: rerunning" in stdout


def test_a_failed_stage_names_its_log_and_leaves_no_record(tmp_path, capsys):
    plan = tmp_path / "plan.yaml"
    plan.write_text("stages:\n  - {name: broken, command: 'cache --data builtin:nonesuch --out {dir}', out: c, minutes: 1}\n")
    code, _, err = _run(capsys, "--plan", plan, "--out", tmp_path / "runs")
    assert code == 2 and "stage broken failed (exit status 2" in err and "broken.log" in err
    assert not marker(tmp_path / "runs", "broken").exists()


@pytest.mark.parametrize(("plan_text", "args", "message"), [
    (None, ["--only", "nonesuch"], "--only: no stage 'nonesuch'"),
    (None, ["--from", "sae_topk"], "--from: no stage 'sae_topk'"),
    ("stages: [\n", [], "not valid YAML"),
    ("- a list\n", [], "expected a mapping with a non-empty list `stages`"),
    ("stages: []\nextra: 1\n", [], "non-empty list `stages`"),
    ("stages: [{name: a, command: baseline, minutes: 1}]\nextra: 1\n", [], "unknown key(s) extra"),
    ("stages: [{name: a, command: baseline}]\n", [], "stage 1: missing minutes"),
    ("stages: [{name: a, command: baseline, minutes: soon}]\n", [], "minutes: expected float"),
    ("stages: [{name: a, command: baseline, minutes: 1, colour: red}]\n", [], "unknown option(s) colour"),
    ("stages: [{name: a, command: frobnicate --x, minutes: 1}]\n", [], "expected a faithlens command"),
    ("stages: [{name: a, command: 'baseline --out {nowhere}', minutes: 1}]\n", [], "unknown placeholder {nowhere}"),
    ("stages: [{name: a, command: baseline, minutes: 1, reads: b}]\n", [], "reads b, which is not an earlier stage"),
    ("stages: [{name: A b, command: baseline, minutes: 1}]\n", [], "expected a new name"),
])
def test_bad_plans_and_stage_names_are_one_line_errors(plan_text, args, message, tmp_path, capsys):
    plan = PLAN
    if plan_text is not None:
        plan = tmp_path / "plan.yaml"
        plan.write_text(plan_text)
    code, _, err = _run(capsys, "--plan", plan, "--out", tmp_path / "runs", *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "runs").exists()
