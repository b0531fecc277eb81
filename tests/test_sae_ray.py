"""The Ray Train path end to end on a tiny model: a worker that dies is restarted from its checkpoint."""

import json

import pytest

from faithlens_cli import main


def test_sae_train_survives_a_worker_failure(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["sae", "train", "--model", str(tiny_model_dir), "--dtype", "fp32", "--data", "builtin:tasks",
                 "--layer", "2", "--latents", "64", "--k", "4", "--tokens", "4096", "--seq-len", "32",
                 "--batch-tokens", "128", "--checkpoint-every", "8", "--fail-at-step", "12", "--eval-tokens", "512",
                 "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--lr", "0.01"])
    assert code == 0
    assert (out / ".failed_once").exists()  # the injected failure happened, and training still finished
    assert sorted(p.name for p in (out / "sae").iterdir()) == ["cfg.json", "sae.safetensors"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["l0"] <= 4 and 0 <= metrics["fvu"] < 1
    assert list((out / "tb").glob("events.out.tfevents.*"))
    printed = capsys.readouterr().out
    assert "| FVU |" in printed and "spliced KL" in printed


def test_sweep_layers_trains_one_sae_per_layer_and_explains_its_choice(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main(["sae", "sweep-layers", "--layers", "1,3", "--model", str(tiny_model_dir), "--dtype", "fp32",
                 "--data", "builtin:tasks", "--latents", "64", "--k", "4", "--tokens", "2048", "--seq-len", "32",
                 "--batch-tokens", "128", "--eval-tokens", "512", "--out", str(out), "--cache-dir", str(tmp_path / "c"),
                 "--lr", "0.01"])
    assert code == 0
    sweep = json.loads((out / "sweep.json").read_text())
    assert [r["layer"] for r in sweep["rows"]] == [1, 3] and sweep["chosen_layer"] in (1, 3)
    assert "best mean rank" in sweep["reason"]
    assert (out / "layer1" / "sae" / "cfg.json").is_file() and (out / "layer3" / "sae" / "cfg.json").is_file()
    assert "Chosen: layer" in capsys.readouterr().out


def test_choose_layer_rule():
    from sae.sweep import choose_layer

    rows = [{"layer": 6, "explained_variance": 0.95, "token_purity": 0.5},
            {"layer": 9, "explained_variance": 0.93, "token_purity": 0.45},
            {"layer": 12, "explained_variance": 0.90, "token_purity": 0.6}]
    layer, why = choose_layer(rows)
    assert layer == 6 and "layer 6" in why  # rank sums: 6 -> 0+1, 9 -> 1+2, 12 -> 2+0


@pytest.mark.parametrize("arch", ["jumprelu", "matryoshka"])
def test_sae_train_job_trains_and_evaluates_jumprelu_and_matryoshka(arch, tiny_model_dir, tmp_path, capsys):
    from sae.model import SparseAutoencoder

    out = tmp_path / arch
    code = main(["sae", "train", "--arch", arch, "--model", str(tiny_model_dir), "--dtype", "fp32",
                 "--data", "builtin:tasks", "--layer", "2", "--latents", "64", "--k", "4", "--tokens", "2048",
                 "--seq-len", "32", "--batch-tokens", "128", "--eval-tokens", "512",
                 *(["--prefixes", "8,16,64"] if arch == "matryoshka" else ["--l0-schedule", "1:0.001"]),
                 "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--lr", "0.01"])
    assert code == 0
    sae = SparseAutoencoder.load(out / "sae")
    assert sae.cfg.arch == arch
    if arch == "matryoshka":
        assert sae.cfg.prefix_sizes == (8, 16, 64) and float(sae.threshold) > 0  # the BatchTopK inference threshold
    else:
        assert sae.latent_thresholds().shape == (64,) and (sae.latent_thresholds() > 0).all()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["arch"] == arch and 0 <= metrics["fvu"] < 1 and metrics["l0"] > 0
    assert 0 <= metrics["duplicate_frac"] <= 1 and metrics["duplicate_pool"] <= 64
    assert "| duplicates |" in capsys.readouterr().out
