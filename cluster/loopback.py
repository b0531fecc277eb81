"""A real two-node Ray cluster on 127.0.0.1: `ray start --head`, `ray start --address`, the smoke sweep
submitted with `ray job submit --working-dir .`, its results checked, and the cluster stopped.

    .venv/bin/python cluster/loopback.py [--keep DIR]

Token authentication stays on: a token from Ray's own generator is written to RAY_AUTH_TOKEN_PATH (a
file in this run's temporary folder, mode 600) and RAY_AUTH_MODE=token makes the head, the worker
and every later `ray` command (status, job submit, stop) authenticate with it.
The decoder the sweep starts from is a tiny random Llama with a random SAE, built here, so the test
needs no data and no network. Exit status 0 means every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GCS_PORT, DASHBOARD_PORT = 6391, 8276


def sh(args: list[str], env: dict, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    print("$", " ".join(args), flush=True)
    proc = subprocess.run(args, env=env, cwd=REPO, timeout=timeout, capture_output=True, text=True)
    if proc.stdout.strip():
        print(proc.stdout.strip()[-4000:], flush=True)
    if check and proc.returncode != 0:
        print(proc.stderr.strip()[-4000:], file=sys.stderr, flush=True)
        raise SystemExit(f"loopback: `{' '.join(args[:3])} ...` failed with exit code {proc.returncode}")
    return proc


def build_tiny_decoder(root: Path) -> Path:
    """Tiny Llama + random SAE + readout decoder, the same recipe as the tests."""
    sys.path.insert(0, str(REPO))
    from distill.student import build_student_decoder
    from models import ModelConfig, load_frozen
    from sae.model import SparseAutoencoder
    from tests.conftest import build_tiny_model, save_random_sae

    model_dir = build_tiny_model(root / "tiny_model")
    frozen = load_frozen(ModelConfig(model=str(model_dir), dtype="fp32"))
    sae_dir = save_random_sae(frozen, root / "sae")
    decoder = build_student_decoder("readout", SparseAutoencoder.load(sae_dir), frozen, 2)
    decoder.save(root / "decoder" / "decoder", extra={"layer": 2, "model": str(model_dir), "sae": str(sae_dir),
                                                       "data": "builtin:tasks"})
    return root / "decoder"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary folder)")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="faithlens-loopback-"))
    root.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_AUTH_TOKEN_PATH": str(root / "auth_token"), "RAY_AUTH_MODE": "token", "HF_HUB_OFFLINE": "1",
           "FAITHLENS_CACHE": os.environ.get("FAITHLENS_CACHE", str(root / "faithlens_cache"))}
    os.environ.update({k: env[k] for k in ("HF_HUB_OFFLINE", "FAITHLENS_CACHE")})
    ray = str(bin_dir / "ray")
    t0 = time.perf_counter()
    decoder = build_tiny_decoder(root)
    experiment = root / "sweeps" / "smoke"
    from ray._private.authentication.authentication_token_generator import generate_new_authentication_token

    token_path = root / "auth_token"  # from Ray's own token generator; RAY_AUTH_MODE=token makes every command use it
    token_path.write_text(generate_new_authentication_token())
    token_path.chmod(0o600)
    try:
        sh([ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={GCS_PORT}", "--num-cpus=1",
            f"--dashboard-port={DASHBOARD_PORT}", "--dashboard-host=127.0.0.1", "--disable-usage-stats"], env)
        sh([ray, "start", f"--address=127.0.0.1:{GCS_PORT}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
            "--disable-usage-stats"], env)
        alive, deadline = 0, time.monotonic() + 60
        while alive < 2 and time.monotonic() < deadline:  # the worker takes a few seconds to register
            time.sleep(3)
            status = sh([ray, "status", f"--address=127.0.0.1:{GCS_PORT}"], env, check=False)
            active = status.stdout.split("Active:")[-1].split("Pending:")[0]
            alive = active.count("node_")
        if alive < 2:
            raise SystemExit(f"loopback: expected 2 alive nodes in `ray status`, found {alive}")
        print(f"loopback: {alive} nodes alive", flush=True)
        runtime_env = {"excludes": [".venv", "runs", ".git", "*.safetensors"],
                       "env_vars": {"FAITHLENS_SMOKE_DECODER": str(decoder), "HF_HUB_OFFLINE": "1",
                                    "FAITHLENS_CACHE": env["FAITHLENS_CACHE"]}}
        submit = [ray, "job", "submit", f"--address=http://127.0.0.1:{DASHBOARD_PORT}", "--working-dir", ".",
                  "--runtime-env-json", json.dumps(runtime_env), "--",
                  sys.executable, "-m", "faithlens_cli", "sweep", "tune_configs/smoke.yaml", "--out", str(experiment),
                  "--address", "auto"]
        for attempt in range(6):  # the head's job agent can take a while to come up on a busy machine
            proc = sh(submit, env, timeout=900, check=False)
            if proc.returncode == 0 or "No available agent" not in proc.stderr + proc.stdout:
                break
            print(f"loopback: the job agent is not ready yet (attempt {attempt + 1}); retrying in 10 s", flush=True)
            time.sleep(10)
        if proc.returncode != 0:
            print(proc.stderr.strip()[-4000:], file=sys.stderr, flush=True)
            raise SystemExit(f"loopback: `ray job submit` failed with exit code {proc.returncode}")
        summary = json.loads(sh([sys.executable, "-m", "faithlens_cli", "compare", str(experiment), "--json"], env).stdout)
        phases = sorted(t["params"]["phases"] for t in summary["trials"])
        if len(summary["trials"]) != 2 or len(set(phases)) != 2:
            raise SystemExit(f"loopback: expected 2 finished trials with different schedules, got {phases}")
        if not all(t["env_steps"] >= 512 and t["kl"] >= 0 for t in summary["trials"]):
            raise SystemExit("loopback: a trial did not run its 512 steps")
        if not list(experiment.glob("*/ppo/tb/events.out.tfevents.*")):
            raise SystemExit("loopback: no TensorBoard events under the experiment")
        print(f"loopback: OK — 2-node cluster, smoke sweep of {len(summary['trials'])} trials, "
              f"{time.perf_counter() - t0:.0f} s; results in {experiment}")
        return 0
    finally:
        sh([ray, "stop", "--force"], env, check=False)
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
