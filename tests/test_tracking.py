"""Weights & Biases logging (--wandb PROJECT) in W&B's offline mode: run files written locally, nothing sent."""

import json
import struct

import pytest

from faithlens_cli import main
from models import ConfigError
from tests.test_rl import _ppo, rl_setup  # noqa: F401  (the fixture, and the tiny PPO command line)
from training.tracking import MetricWriter, wandb_settings


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B in offline mode writing under tmp_path; no key, no network."""
    for var in ("WANDB_API_KEY", "WANDB_ENTITY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path / "wandb_dir"


def offline_runs(wandb_dir) -> list[dict]:
    """Every offline run under WANDB_DIR: {"project", "name", "config", "history": [{key: value}, ...]}, read from its
    run-*.wandb file (a LevelDB-style log of protobuf records: 7-byte header, 32 KiB blocks, 7-byte chunk headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    runs = []
    for path in sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, pending = path.read_bytes(), 7, b""
        assert data[:4] == b":W&B"
        run = {"history": []}
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
            if kind == 0:  # block padding
                pos += left
                continue
            pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind not in (1, 4):  # FULL or LAST chunk ends a record
                continue
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.HasField("run"):
                run.update(project=record.run.project, name=record.run.display_name,
                           config={i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif record.HasField("history"):
                run["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        runs.append(run)
    return runs


def _series(run: dict, key: str) -> list[tuple[int, float]]:
    return [(row["_step"], row[key]) for row in run["history"] if key in row]


def test_metric_writer_logs_the_same_scalars_to_tensorboard_and_wandb(offline, tmp_path):
    writer = MetricWriter(tmp_path / "stage" / "tb", wandb_settings("faithlens-test", "stage"), {"layer": 2})
    writer.log({"sae/fvu": 0.5, "sae/l0": 3.0}, 128)
    writer.log({"sae/fvu": 0.25}, 256)
    writer.close()
    [run] = offline_runs(offline)
    assert run["project"] == "faithlens-test" and run["name"] == "stage" and run["config"]["layer"] == 2
    assert _series(run, "sae/fvu") == [(128, 0.5), (256, 0.25)] and _series(run, "sae/l0") == [(128, 3.0)]
    assert list((tmp_path / "stage" / "tb").glob("events.out.tfevents.*"))


def test_wandb_needs_a_key_or_offline_mode(monkeypatch, tmp_path):
    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    assert wandb_settings("") is None
    with pytest.raises(ConfigError, match="--wandb: no W&B API key .* or set WANDB_MODE=offline"):
        wandb_settings("p")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_ENTITY", "lab")
    assert wandb_settings("p", "run") == {"project": "p", "name": "run", "mode": "offline", "entity": "lab"}


def test_sae_and_decoder_training_log_their_metrics_to_wandb(offline, tiny_model_dir, tmp_path):
    common = ["--model", str(tiny_model_dir), "--dtype", "fp32", "--data", "builtin:tasks", "--seq-len", "32",
              "--cache-dir", str(tmp_path / "cache"), "--wandb", "faithlens-test"]
    assert main(["sae", "train", *common, "--layer", "2", "--latents", "64", "--k", "4", "--tokens", "2048",
                 "--batch-tokens", "128", "--eval-tokens", "0", "--out", str(tmp_path / "sae")]) == 0
    assert main(["decoder", "train", *common, "--sae", str(tmp_path / "sae"), "--arch", "readout", "--tokens", "1024",
                 "--eval-tokens", "256", "--out", str(tmp_path / "dec")]) == 0
    runs = {run["name"]: run for run in offline_runs(offline)}
    assert set(runs) == {"sae", "dec"}
    sae, dec = runs["sae"], runs["dec"]
    assert sae["project"] == "faithlens-test" and sae["config"]["layer"] == 2 and sae["config"]["wandb"] == "faithlens-test"
    fvu = _series(sae, "sae/fvu")
    assert len(fvu) >= 2 and all(0 <= v < 10 for _, v in fvu) and [s for s, _ in fvu] == sorted({s for s, _ in fvu})
    assert {"sae/l0", "sae/dead_frac", "charts/tokens_per_s"} <= set().union(*sae["history"])
    assert _series(dec, "distill/kl") and _series(dec, "distill/heldout_kl")  # training and held-out curves
    assert list((tmp_path / "sae" / "tb").glob("events.out.tfevents.*"))  # TensorBoard as before


def test_ppo_logs_to_wandb(offline, rl_setup):  # noqa: F811
    out = rl_setup["root"] / "ppo_wandb"
    assert _ppo(rl_setup, out, "--steps", "512", "--wandb", "faithlens-test") == 0
    [run] = offline_runs(offline)
    assert run["name"] == "ppo_wandb" and run["config"]["env"] == "token"
    assert [s for s, _ in _series(run, "reward/r_faith")] == [256, 512]  # x axis: environment steps
    assert _series(run, "eval/kl") and _series(run, "ppo/policy_loss")


def test_sweep_logs_each_trial_through_tunes_wandb_callback(offline, rl_setup, tmp_path):  # noqa: F811
    spec = tmp_path / "s.yaml"
    spec.write_text(f"""name: wandb_smoke
base: {{decoder: {rl_setup['decoder']}, cache: {rl_setup['cache']}, dtype: fp32, env: token, steps: 256,
        train_batch: 128, minibatch_size: 64, num_envs: 4, eval_every: 2, eval_tokens: 256, task_examples: 3, window: 8}}
algorithm: grid
space: {{lr: {{grid: [1.0e-4, 1.0e-3]}}}}
""")
    assert main(["sweep", str(spec), "--out", str(tmp_path / "exp"), "--wandb", "faithlens-sweep"]) == 0
    runs = offline_runs(offline)
    assert len(runs) == 2 and {r["project"] for r in runs} == {"faithlens-sweep"}
    assert sorted(r["config"]["lr"] for r in runs) == [1e-4, 1e-3]
    for run in runs:
        assert _series(run, "score") and _series(run, "reward_r_faith") and _series(run, "kl")
    spec.write_text(spec.read_text().replace("window: 8}", "window: 8, wandb: p}"))
    assert main(["sweep", str(spec), "--out", str(tmp_path / "exp2")]) == 2
