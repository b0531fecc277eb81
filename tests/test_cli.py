import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from faithlens_cli import COMMANDS, main


def _run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code, err, pattern):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("faithlens")]
    assert len(lines) == 1, err
    assert pattern in lines[0], lines[0]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help_from_its_config(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: faithlens {command}" in out
    without_model = {"sae export-saelens": "SAELens", "sae import": "--scaling-factor", "compare": "held-out score", "sweep": "YAML",
                     "ppo export": "plain decoder checkpoint", "features label": "--local-model",
                     "features score": "--simulator", "features review": "--reviewer", "features cluster": "--threshold",
                     "features explainer": "--names", "reproduce": "--plan"}
    if command in without_model:
        assert without_model[command] in out
    else:
        assert "--model" in out
        assert "embedded:smollm2-135m-instruct" in out  # the field docstring is the help text


def test_cache_command_end_to_end(tiny_model_dir, tmp_path, capsys):
    args = ["cache", "--model", str(tiny_model_dir), "--layers", "2", "--data", "builtin:tasks", "--tokens", "256",
            "--seq-len", "32", "--out", str(tmp_path), "--dtype", "fp32"]
    code, out, _ = _run(capsys, *args)
    assert code == 0
    assert "cache: 256 tokens, layers 2" in out and str(tmp_path) in out


def test_baseline_json_on_tiny_model(tiny_model_dir, tmp_path, capsys):
    code, out, _ = _run(capsys, "baseline", "--model", str(tiny_model_dir), "--data", "builtin:tasks", "--tokens", "128",
                        "--seq-len", "32", "--json", "--dtype", "fp32", "--out", str(tmp_path))
    assert code == 0
    result = json.loads(out)
    assert result["tokens"] == 128 and result["model"] == str(tiny_model_dir)
    assert set(result["frozen"]) == {"ce", "top1_acc", "tokens_per_s", "peak_mem_mb"}
    layers = {r["layer"]: r for r in result["layers"]}
    assert sorted(layers) == [3, 4]  # 6, 9, ... do not exist in a 4-block model; 'last' = 4
    assert layers[4]["logit_lens_kl"] == 0.0 and layers[4]["logit_lens_top1"] == 1.0
    assert layers[3]["logit_lens_kl"] > 0
    assert (tmp_path / "baseline.json").is_file() and "| layer |" in (tmp_path / "baseline.md").read_text()


def test_latin1_text_is_read_with_fallback(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "latin.txt").write_bytes("Caf\xe9 society. ".encode("latin-1") * 200)
    code, out, _ = _run(capsys, "cache", "--model", str(tiny_model_dir), "--seq-len", "32", "--tokens", "64",
                        "--out", str(tmp_path / "c"), "--data", str(tmp_path / "latin.txt"), "--layers", "2")
    assert code == 0 and "cache: 64 tokens" in out


def test_unknown_command(capsys):
    code, _, err = _run(capsys, "frobnicate")
    assert code == 2 and "unknown command 'frobnicate'" in err


@pytest.fixture
def ppo_configs(monkeypatch):
    """The configs `faithlens ppo` would run, without running the stage."""
    import rl_env.ppo

    seen = []
    monkeypatch.setattr(rl_env.ppo, "run_ppo", seen.append)
    return seen


def test_config_file_gives_defaults_that_any_flag_on_the_command_line_overrides(tmp_path, capsys, ppo_configs):
    from pathlib import Path

    trial = tmp_path / "trial.yaml"
    trial.write_text("lr: 0.5\nwindow: 6\nphases: '1:1/0/0'\nout: runs/from_yaml\ncache_tokens: 1e5\nminibatch_size: 2048\n")
    code, _, err = _run(capsys, "ppo", "--config", str(trial), "--lr", "1e-5", "--window", "16", "--train-batch", "4096")
    assert code == 0, err
    (cfg,) = ppo_configs
    assert cfg.lr == 1e-5 and cfg.window == 16  # typed with their default values, the flags still win
    assert cfg.phases == "1:1/0/0" and cfg.out == Path("runs/from_yaml") and cfg.cache_tokens == 100_000
    assert cfg.minibatch_size == 2048 and cfg.train_batch == 4096  # valid together, though not the file alone
    assert cfg.config == trial
    code, _, err = _run(capsys, "ppo", f"--config={trial}", "--train-batch", "4096")
    assert code == 0, err
    assert ppo_configs[-1].lr == 0.5 and ppo_configs[-1].window == 6  # no flag given: the file's values


@pytest.mark.parametrize("text,message", [
    ("lr: [0.5\n", "not valid YAML at line 2"),
    ("- lr\n- 0.5\n", "expected a mapping of option: value, got a list"),
    ("learning_rate: 0.1\nlr: 0.1\n", "unknown option(s) learning_rate"),
    ("lr: fast\n", "lr: expected float, got 'fast'"),
    ("env: tokens\n", "env: expected one of token, generation"),
    ("minibatch_size: 2048\n", "--minibatch-size 2048 must be at most --train-batch 1024"),
])
def test_bad_config_files_are_one_line_errors(text, message, tmp_path, capsys, ppo_configs):
    (tmp_path / "bad.yaml").write_text(text)
    code, _, err = _run(capsys, "ppo", "--config", str(tmp_path / "bad.yaml"))
    _one_line_error(code, err, message)
    code, _, err = _run(capsys, "ppo", "--config", str(tmp_path / "missing.yaml"))
    _one_line_error(code, err, "missing.yaml: no such file")
    assert not ppo_configs


def test_eval_commands_read_a_held_out_file_whole_with_split_all(tiny_frozen, tiny_model_dir, tmp_path, capsys, caplog):
    from corpus.config import CorpusConfig
    from corpus.packing import sequences
    from tests.test_interpret import make_run

    run = make_run(tiny_frozen, tmp_path / "run")
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("\n\n".join(f"Paragraph {i}: the river {i % 7} runs past stone {i * 13 % 11}." for i in range(40)))
    n_seqs = sum(1 for _ in sequences(CorpusConfig(data=str(held_out), seq_len=32, tokens=10**6, split="all"),
                                      tiny_frozen.tokenizer, tiny_frozen.bos_token_id, tiny_frozen.eos_token_id))
    common = ["--model", str(tiny_model_dir), "--dtype", "fp32", "--data", str(held_out), "--seq-len", "32",
              "--tokens", "100000"]
    code, out, _ = _run(capsys, "sae", "eval", str(run / "sae"), *common, "--split", "all", "--no-splice")
    assert code == 0
    assert f"{n_seqs * 31:,} tokens of {held_out} (split: all)" in out  # the whole file, BOS positions left out
    assert f"no activation in {n_seqs * 31:,} tokens" in out  # the dead fraction states its window
    code, out, _ = _run(capsys, "sae", "eval", str(run / "sae"), *common, "--no-splice", "--json", "--eval-fraction", "0.2")
    part = json.loads(out)
    assert code == 0 and part["split"] == "eval" and part["tokens"] < n_seqs * 31 / 2  # the default: its eval split
    assert "--split all reads a held-out file whole" in caplog.text
    code, out, _ = _run(capsys, "baseline", *common, "--split", "all", "--layers", "2", "--json")
    assert code == 0 and json.loads(out)["tokens"] == n_seqs * 32  # the baseline scores every position
    code, out, _ = _run(capsys, "decoder", "eval", str(run), *common, "--split", "all", "--task-suite", "",
                        "--out", str(tmp_path / "dec_eval"), "--json")
    assert code == 0 and json.loads(out)["corpora"]["in_domain"]["tokens"] == n_seqs * 31


# -- bad input, every command: one line naming the argument or file, exit status 2, no traceback, nothing written --

BAD_INPUTS = [  # (id, command line with {placeholders} of the `bad_world` fixture, what the error line must contain)
    ("cache: layer out of range", "cache {common} --layers 5 --data builtin:tasks", "layer 5 is outside the model's range 0..4"),
    ("cache: missing corpus", "cache {common} --data {w}/missing.txt", "no such file or folder: {w}/missing.txt"),
    ("cache: empty corpus", "cache {common} --data {w}/empty.txt", "empty.txt' yielded no complete"),
    ("cache: binary corpus", "cache {common} --data {w}/binary.txt", "binary.txt: not a text file"),
    ("cache: strict encoding", "cache {common} --data {w}/latin.txt --encoding utf-8", "latin.txt: not valid utf-8"),
    ("cache: malformed jsonl", "cache {common} --data {w}/bad.jsonl", "bad.jsonl:2: not valid JSON"),
    ("cache: not parquet", "cache {common} --data {w}/bad.parquet", "bad.parquet: not a Parquet file"),
    ("cache: unknown model", "cache --model nobody/no-such-model --data builtin:tasks", "not a local directory"),
    ("cache: zero tokens", "cache --model {model} --tokens 0", "--tokens: expected a positive number"),
    ("cache: wrong type", "cache --model {model} --tokens many", "--tokens"),
    ("cache: unknown option", "cache --model {model} --frobnicate 3", "--frobnicate"),
    ("baseline: layers beyond the model", "baseline {common} --layers 99 --data builtin:tasks", "layers 0..4"),
    ("baseline: ood split without --ood", "baseline --model {model} --split ood", "--split ood needs --ood"),
    ("sae train: k above latents", "sae train --model {model} --latents 16 --k 32", "--k: expected 1..16"),
    ("sae train: layer out of range", "sae train --model {model} --layer 99 --latents 16 --k 4 --out {w}/sae",
     "--layer: layer 99 is outside"),
    ("sae eval: truncated weights", "sae eval {w}/trunc/sae {small}", "{w}/trunc/sae/sae.safetensors: truncated"),
    ("sae eval: malformed cfg.json", "sae eval {w}/badjson/sae {small}", "{w}/badjson/sae/cfg.json: not valid JSON"),
    ("sae eval: missing folder", "sae eval {w}/nowhere {small}", "{w}/nowhere: not an SAE folder"),
    ("sae eval: layer out of range", "sae eval {w}/run/sae {small} --layer 99", "--layer: layer 99 is outside"),
    ("sae sweep-layers: layer out of range", "sae sweep-layers --model {model} --layers 2,99", "--layers: layer 99"),
    ("sae export-saelens: truncated weights", "sae export-saelens {w}/trunc/sae {w}/exported", "sae.safetensors: truncated"),
    ("decoder train: truncated SAE", "decoder train --model {model} --sae {w}/trunc/sae --out {w}/dec",
     "{w}/trunc/sae/sae.safetensors: truncated"),
    ("decoder eval: missing folder", "decoder eval {w}/nowhere {small}", "{w}/nowhere: not a decoder folder"),
    pytest.param("decoder eval: truncated weights", "decoder eval {w}/trunc {small} --out {w}/dec_eval",
                 "decoder.safetensors: truncated"),
    pytest.param("decoder eval: malformed decoder.json", "decoder eval {w}/badjson {small} --out {w}/dec_eval",
                 "decoder.json: not valid JSON"),
    ("decoder frontier: missing SAE", "decoder frontier --model {model} --sae {w}/nowhere", "{w}/nowhere: not an SAE folder"),
    ("lens train: layer out of range", "lens train --model {model} --layer 99", "--layer: layer 99 is outside"),
    ("ppo: malformed YAML", "ppo --config {w}/malformed.yaml", "malformed.yaml: not valid YAML at line 2"),
    ("ppo: unknown key", "ppo --config {w}/unknown_key.yaml", "unknown option(s) learning_rate"),
    ("ppo: wrong type", "ppo --config {w}/wrong_type.yaml", "lr: expected float, got 'fast'"),
    ("ppo: missing decoder", "ppo --decoder {w}/nowhere", "{w}/nowhere: not a decoder folder"),
    ("ppo: truncated SAE", "ppo --decoder {w}/run --sae {w}/trunc/sae --out {w}/ppo", "{w}/trunc/sae/sae.safetensors"),
    ("ppo: killed cache build", "ppo --decoder {w}/run --data builtin:tasks --cache {w}/killed_cache --out {w}/ppo",
     "killed_cache: the cache build did not finish"),
    ("ppo: corrupt cache manifest", "ppo --decoder {w}/run --data builtin:tasks --cache {w}/corrupt_cache --out {w}/ppo",
     "corrupt_cache/manifest.json: not valid JSON"),
    ("ppo export: missing run", "ppo export {w}/nowhere {w}/exported", "not a decoder folder"),
    ("ppo export: no checkpoint", "ppo export {w}/run {w}/exported --which checkpoint", "no RLlib checkpoint"),
    ("sweep: malformed YAML", "sweep {w}/malformed.yaml", "sweep file {w}/malformed.yaml: not valid YAML at line 2"),
    ("sweep: no decoder at the default path", "sweep {repo}/tune_configs/smoke.yaml --out {w}/sweep",
     "smoke.yaml: base: {w}/cwd/runs/decoder: not a decoder folder"),
    ("sweep: wrong type in base", "sweep {w}/sweep_type.yaml --out {w}/sweep", "base: steps: expected int, got 'many'"),
    ("sweep: unknown key", "sweep {w}/sweep_unknown.yaml --out {w}/sweep", "unknown key(s) trials"),
    ("sweep: missing cache", "sweep {w}/sweep_cache.yaml --out {w}/sweep", "base: --cache {w}/nowhere: not an activation cache"),
    ("compare: missing folder", "compare {w}/nowhere", "{w}/nowhere is not a folder"),
    ("compare: no trials", "compare {w}/run", "no finished trials"),
    ("compare: truncated trial metrics", "compare {w}/experiment", "metrics.json: not valid JSON"),
    ("features importance: run missing its decoder", "features importance {w}/empty_run --model {model}", "no decoder found"),
    ("features importance: truncated SAE", "features importance {w}/trunc --model {model}", "sae.safetensors: truncated"),
    ("features evidence: binary corpus", "features evidence {w}/run --model {model} --data {w}/binary.txt",
     "binary.txt: not a text file"),
    ("features label: run missing evidence", "features label {w}/run --backend stats", "evidence.json not found"),
    ("features label: unreachable endpoint", "features label {w}/interp --backend openai --openai-base-url "
     "http://127.0.0.1:9/v1 --top 2", "http://127.0.0.1:9/v1/chat/completions: cannot reach the endpoint"),
    ("features label: killed run resumed", "features label {w}/interp_killed --backend stats --top 2",
     "label_cache.json: not valid JSON"),
    ("features label: --top -1", "features label {w}/interp --backend stats --top -1", "--top: expected a number of features"),
    ("features label: wrong choice", "features label {w}/interp --backend gpt5", "--backend"),
    ("features score: run missing labels", "features score {w}/interp", "labels.json not found"),
    ("features review: run missing labels", "features review {w}/interp", "labels.json not found"),
    ("features cluster: run missing evidence", "features cluster {w}/run", "evidence.json not found"),
    ("features explainer: run missing labels", "features explainer {w}/interp", "labels.json not found"),
    ("explain: missing run", "explain hello --run {w}/nowhere", "no decoder found"),
    ("explain: truncated SAE", "explain hello --run {w}/trunc --model {model}", "sae.safetensors: truncated"),
    ("eval: missing OOD file", "eval {w}/run --model {model} --ood {w}/missing.txt", "--ood: no such file or folder"),
    ("eval: truncated SAE", "eval {w}/trunc --model {model}", "sae.safetensors: truncated"),
    ("demo: k of 0", "demo --sae-k 0 --out {w}/demo", "--sae-k: expected 1..5760"),
    ("demo: missing corpus", "demo --data {w}/missing.txt --out {w}/demo", "--data: no such file or folder"),
]


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


@pytest.fixture(scope="module")
def bad_world(tiny_frozen, tiny_model_dir, tmp_path_factory):
    """A run folder, broken copies of it and broken inputs: what each BAD_INPUTS case points at."""
    from tests.test_interpret import make_run

    w = tmp_path_factory.mktemp("bad_inputs")
    run = make_run(tiny_frozen, w / "run")
    for name in ("trunc", "badjson"):
        shutil.copytree(run, w / name)
    _truncate(w / "trunc" / "sae" / "sae.safetensors")
    _truncate(w / "trunc" / "decoder" / "decoder.safetensors")
    (w / "badjson" / "sae" / "cfg.json").write_text('{"d_in": 32, "num_latents": ')
    (w / "badjson" / "decoder" / "decoder.json").write_text('{"arch": ')
    (w / "empty.txt").write_text("")
    (w / "binary.txt").write_bytes(bytes(range(256)) * 40)
    (w / "latin.txt").write_bytes("Caf\xe9 ".encode("latin-1") * 200)
    (w / "bad.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    (w / "bad.parquet").write_text("not parquet at all")
    (w / "malformed.yaml").write_text("lr: [0.5\n")
    (w / "unknown_key.yaml").write_text("learning_rate: 0.1\n")
    (w / "wrong_type.yaml").write_text("lr: fast\n")
    (w / "sweep_type.yaml").write_text(f"base: {{decoder: {run}, steps: many}}\nalgorithm: grid\n")
    (w / "sweep_unknown.yaml").write_text(f"base: {{decoder: {run}}}\ntrials: 3\n")
    (w / "sweep_cache.yaml").write_text(f"base: {{decoder: {run}, data: builtin:tasks, cache: {w / 'nowhere'}}}\n")
    for name, manifest in (("killed_cache", '{"complete": false, "shards": []}'), ("corrupt_cache", '{"complete": tr')):
        (w / name).mkdir()
        (w / name / "manifest.json").write_text(manifest)
    (w / "experiment" / "trial_1" / "ppo").mkdir(parents=True)
    (w / "experiment" / "trial_1" / "ppo" / "metrics.json").write_text('{"score": 0.5, "kl"')
    (w / "empty_run").mkdir()
    (w / "cwd").mkdir()
    interp = make_run(tiny_frozen, w / "interp")
    assert main(["features", "evidence", str(interp), "--model", str(tiny_model_dir), "--data", "builtin:tasks",
                 "--tokens", "256", "--seq-len", "32", "--top-examples", "4", "--quantile-examples", "2"]) == 0
    shutil.copytree(interp, w / "interp_killed")
    (w / "interp_killed" / "interpret" / "label_cache.json").write_text('{"entries": {"a": ')
    return w


def _files(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case,command,message", BAD_INPUTS,
                         ids=[c.values[0] if hasattr(c, "values") else c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line_naming_it_with_status_2_and_nothing_written(case, command, message, bad_world,
                                                                             tiny_model_dir, capsys, monkeypatch):
    w = bad_world
    monkeypatch.chdir(w / "cwd")  # relative defaults (runs/decoder, ...) point at nothing
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    monkeypatch.delenv("FAITHLENS_SMOKE_DECODER", raising=False)
    fill = {"w": str(w), "model": str(tiny_model_dir), "repo": str(Path(__file__).resolve().parents[1]),
            "common": f"--model {tiny_model_dir} --seq-len 32 --tokens 64 --out {w}/cache --layers 2",
            "small": f"--model {tiny_model_dir} --seq-len 32 --tokens 64 --data builtin:tasks"}
    before = _files(w)
    code, out, err = _run(capsys, *command.format(**fill).split())
    assert "Traceback" not in out + err
    _one_line_error(code, err, message.format(**fill))
    assert _files(w) == before  # nothing written, nothing half-written
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()  # failed before Ray started


def test_a_truncated_training_checkpoint_names_its_file(tmp_path):
    import torch

    from models.errors import ConfigError
    from training.checkpoint import STATE_TENSORS, load_checkpoint, save_checkpoint

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path / "latest", model, opt, {"step": 3})
    assert load_checkpoint(tmp_path / "latest", model, opt)[0] == {"step": 3}
    _truncate(tmp_path / "latest" / STATE_TENSORS)
    with pytest.raises(ConfigError, match=f"{STATE_TENSORS}: truncated"):
        load_checkpoint(tmp_path / "latest", model, opt)


def test_a_sweep_checks_a_valid_base_before_ray_and_types_its_values(bad_world, monkeypatch):
    from rl_env.sweep import check_base, load_sweep

    monkeypatch.setenv("SWEEP_STEPS", "256")
    spec_file = bad_world / "cwd" / "valid.yaml"
    spec_file.write_text(f"base: {{decoder: {bad_world / 'run'}, data: builtin:tasks, steps: '${{SWEEP_STEPS}}'}}\n"
                         "algorithm: grid\nspace: {lr: {grid: [0.001, 0.01]}}\n")
    spec = load_sweep(spec_file)
    assert spec["base"]["steps"] == 256  # ${VAR} gives a string; the base holds the field's type
    check_base(spec, spec_file)
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
