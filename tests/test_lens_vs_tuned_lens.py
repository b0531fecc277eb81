"""benchmarks.lens_vs_tuned_lens: the token plan, the tuned-lens → faithlens lens conversion and its check,
and the command's errors on bad input. Only the last test needs tuned-lens's venv (skipped without it)."""

import json
import subprocess

import pytest
import torch
from safetensors.torch import save_file

from benchmarks.lens_vs_tuned_lens.__main__ import main
from benchmarks.lens_vs_tuned_lens.config import REPO, BenchError, plan_tokens
from benchmarks.lens_vs_tuned_lens.evaluate import check_conversion, convert_tuned_lens
from models.errors import ConfigError
from models.head import FrozenHead

PEER_PYTHON = REPO / "runs" / "venvs" / "tuned_lens" / "bin" / "python"


def _tuned_lens_artifact(directory, n_layers: int, d_model: int) -> dict[str, torch.Tensor]:
    """A folder as `tuned_lens.TunedLens.save` writes it: params.pt ({i}.weight, {i}.bias) + config.json."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for i in range(n_layers):
        state[f"{i}.weight"] = 0.1 * torch.randn(d_model, d_model, generator=g)
        state[f"{i}.bias"] = 0.1 * torch.randn(d_model, generator=g)
    directory.mkdir()
    torch.save(state, directory / "params.pt")
    config = {"base_model_name_or_path": "tiny", "d_model": d_model, "num_hidden_layers": n_layers, "bias": True,
              "base_model_revision": None, "unembed_hash": None, "lens_type": "linear_tuned_lens"}
    (directory / "config.json").write_text(json.dumps(config))
    return state


def test_plan_takes_whole_steps_of_both_tools():
    real = plan_tokens(1_000_000, 256, 8, 250)
    assert (real.tuned_lens_steps, real.batches_per_tuned_lens_step, real.sequences) == (246, 2, 3936)
    assert real.scored_tokens == 3936 * 255 >= 1_000_000 and real.our_steps == 492
    assert real.our_steps * real.batch_sequences == real.tuned_lens_steps * real.tuned_lens_step_sequences
    exact = plan_tokens(250 * 8 * 255, 256, 8, 250)
    assert (exact.tuned_lens_steps, exact.batches_per_tuned_lens_step, exact.scored_tokens) == (250, 1, 510_000)
    tiny = plan_tokens(4096, 256, 8, 250)  # fewer sequences than 250 steps: one batch per step
    assert (tiny.tuned_lens_steps, tiny.batches_per_tuned_lens_step, tiny.sequences) == (3, 1, 24)


def test_converted_translator_computes_head_of_h_plus_Wh_plus_b(tiny_frozen, tmp_path):
    head = FrozenHead.from_frozen(tiny_frozen)
    state = _tuned_lens_artifact(tmp_path / "tl", tiny_frozen.n_layers, tiny_frozen.d_model)
    lens = convert_tuned_lens(tmp_path / "tl", tmp_path / "ours", 2, head, extra={"model": "tiny"})
    assert lens.meta["layer"] == 2 and lens.meta["converted_from"] == "tuned-lens"
    h_BTD = torch.randn(2, 5, tiny_frozen.d_model)
    expected = head(h_BTD + h_BTD @ state["2.weight"].T + state["2.bias"])
    with torch.no_grad():
        assert torch.allclose(lens(h_BTD), expected, atol=1e-5)


def test_conversion_refuses_a_layer_the_artifact_lacks(tiny_frozen, tmp_path):
    head = FrozenHead.from_frozen(tiny_frozen)
    _tuned_lens_artifact(tmp_path / "tl", tiny_frozen.n_layers, tiny_frozen.d_model)
    with pytest.raises(ConfigError, match="no translator for layer 4"):
        convert_tuned_lens(tmp_path / "tl", tmp_path / "ours", 4, head)


def test_conversion_check_passes_equal_outputs_and_catches_a_mismatch(tiny_frozen, tmp_path):
    head = FrozenHead.from_frozen(tiny_frozen)
    _tuned_lens_artifact(tmp_path / "tl", tiny_frozen.n_layers, tiny_frozen.d_model)
    lens = convert_tuned_lens(tmp_path / "tl", tmp_path / "ours", 1, head)
    h = torch.randn(6, tiny_frozen.d_model)
    with torch.no_grad():
        ref = {"h": h, "translated": h + lens.translator(h), "logits": lens(h[None])[0]}
    save_file(ref, str(tmp_path / "check.safetensors"))
    assert max(check_conversion(lens, tmp_path / "check.safetensors").values()) <= 1e-5
    save_file({**ref, "logits": ref["logits"] * 1.001}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(BenchError, match="disagrees with tuned-lens's forward"):
        check_conversion(lens, tmp_path / "bad.safetensors")


def test_ours_cli_command_parses_to_the_config_it_was_made_from(tmp_path):
    import tyro

    from benchmarks.lens_vs_tuned_lens.config import BenchDirs, CompareConfig
    from benchmarks.lens_vs_tuned_lens.train import _cli_command, our_lens_config
    from distill.config import LensTrainConfig
    from training.config import to_record

    data = tmp_path / "corpus.txt"
    data.write_text("text\n")
    cfg = CompareConfig(tokens=5000, data=str(data), teacher="online")
    lens_cfg = our_lens_config(cfg, BenchDirs(tmp_path / "out"), plan_tokens(5000, 256, 8, 250))
    command = _cli_command(lens_cfg)
    assert command[1:3] == ["lens", "train"]
    assert to_record(tyro.cli(LensTrainConfig, args=command[3:])) == to_record(lens_cfg)


@pytest.mark.parametrize("args, message", [
    (["--data", "no/such/file.txt"], "--data: no such file"),
    (["--layer", "4"], "--layer 4: expected 0..3"),
    (["--model", "org/not-local"], "--model: tuned-lens loads a local folder"),
    (["--tokens", "0"], "--tokens: expected a positive"),
])
def test_bad_input_is_one_line_and_exit_status_2(args, message, tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "corpus.txt"
    data.write_text("a few words of text\n")
    defaults = {"--tokens": "64", "--data": str(data), "--model": str(tiny_model_dir), "--out": str(tmp_path / "out")}
    given = dict(zip(args[::2], args[1::2]))
    with pytest.raises(SystemExit) as exit_info:
        main([part for flag, value in {**defaults, **given}.items() for part in (flag, value)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.skipif(not PEER_PYTHON.is_file(), reason="tuned-lens's venv (runs/venvs/tuned_lens) is not installed")
def test_child_trains_with_tuned_lens_and_its_translator_converts(tiny_model_dir, tiny_frozen, tmp_path):
    from datasets import Dataset

    ids = torch.randint(3, tiny_frozen.vocab_size, (16, 24), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = tiny_frozen.bos_token_id
    Dataset.from_dict({"input_ids": ids.tolist()}).save_to_disk(str(tmp_path / "ds"))
    spec = {"model_dir": str(tiny_model_dir), "dataset_dir": str(tmp_path / "ds"), "layer": 2, "steps": 2,
            "batches_per_step": 1, "batch_sequences": 8, "seed": 0, "train_dir": str(tmp_path / "train"),
            "lens_dir": str(tmp_path / "lens"), "check_path": str(tmp_path / "check.safetensors"),
            "result_path": str(tmp_path / "child.json")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    child = REPO / "benchmarks" / "lens_vs_tuned_lens" / "_tuned_lens_child.py"
    subprocess.run([str(PEER_PYTHON), str(child), str(tmp_path / "spec.json")], check=True, capture_output=True)
    result = json.loads((tmp_path / "child.json").read_text())
    assert result["versions"]["tuned-lens"] == "0.2.0" and result["train_tokens"] == 16 * 23
    lens = convert_tuned_lens(tmp_path / "lens", tmp_path / "ours", 2, FrozenHead.from_frozen(tiny_frozen))
    assert lens.translator.weight.abs().sum() > 0  # trained, not the zero initialisation
    assert max(check_conversion(lens, tmp_path / "check.safetensors").values()) <= 1e-5
