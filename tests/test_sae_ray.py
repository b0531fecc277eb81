"""The Ray Train path end to end on a tiny model: a worker that dies is restarted from its checkpoint."""

import json

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
