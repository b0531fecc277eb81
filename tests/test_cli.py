import json

import pytest

from faithlens_cli import COMMANDS, main


def _run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code, err, pattern):
    assert code == 2
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
    without_model = {"sae export-saelens": "SAELens", "compare": "held-out score", "sweep": "YAML",
                     "ppo export": "plain decoder checkpoint", "features label": "--local-model",
                     "features score": "--simulator", "features review": "--reviewer", "features cluster": "--threshold",
                     "features explainer": "--names"}
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


def test_bad_inputs_give_one_line_errors(tiny_model_dir, tmp_path, capsys):
    common = ["--model", str(tiny_model_dir), "--seq-len", "32", "--tokens", "64", "--out", str(tmp_path / "c"), "--layers", "2"]
    code, _, err = _run(capsys, "cache", *common, "--layers", "5", "--data", "builtin:tasks")
    _one_line_error(code, err, "layer 5 is outside the model's range 0..4")
    code, _, err = _run(capsys, "cache", *common, "--data", str(tmp_path / "missing.txt"))
    _one_line_error(code, err, "no such file or folder")
    (tmp_path / "empty.txt").write_text("")
    code, _, err = _run(capsys, "cache", *common, "--data", str(tmp_path / "empty.txt"))
    _one_line_error(code, err, "yielded no complete")
    (tmp_path / "latin.txt").write_bytes("Caf\xe9 ".encode("latin-1") * 200)
    code, _, err = _run(capsys, "cache", *common, "--data", str(tmp_path / "latin.txt"), "--encoding", "utf-8")
    _one_line_error(code, err, "latin.txt: not valid utf-8")
    code, _, err = _run(capsys, "cache", "--model", "nobody/no-such-model", "--data", "builtin:tasks")
    _one_line_error(code, err, "not a local directory")
    code, _, err = _run(capsys, "cache", "--model", str(tiny_model_dir), "--tokens", "0")
    _one_line_error(code, err, "--tokens: expected a positive number")
    assert not list((tmp_path / "c").rglob("*.safetensors"))  # nothing half-written was left


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
