"""A quiet terminal: `faithlens demo` on a tiny model prints its stages, one progress bar per Ray job and no line
of Ray's, RLlib's or a library's own logging; those go to RUN/logs/faithlens.log, whose path it prints once."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.conftest import REPO

RAY_LOGGING = [
    r"\(\w+ pid=\d+\)", r"\(pid=\d+\)", r"Checkpoint\(filesystem",
    r"ray\.rllib", r"DeprecationWarning", r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", r"^\[\d{4}-\d\d-\d\d", r"INFO worker\.py",
    r"gputil", r"This will raise an error in the future", r"Token authentication is enabled", r"new API stack",
    r"\b(INFO|WARNING) ray\.", r"core_worker\.cc",
]


def test_demo_terminal_shows_no_ray_or_rllib_logging_and_the_log_file_holds_it(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    args = ["demo", "--model", str(tiny_model_dir), "--layer", "2", "--out", str(out),
            "--data", "builtin:tasks:arithmetic+comparison", "--cache-tokens", "3000", "--baseline-tokens", "256",
            "--sae-latents", "64", "--sae-k", "8", "--sae-eval-tokens", "256", "--decoder-arch", "readout",
            "--ppo-steps", "512", "--label-top", "2", "--label-sample", "2", "--eval-tokens", "256", "--task-examples", "1"]
    env = {**os.environ, "RAY_ADDRESS": "local", "COLUMNS": "200"}  # a Ray instance of its own
    done = subprocess.run([sys.executable, str(REPO / "faithlens_cli.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1800)
    terminal = done.stdout + done.stderr
    assert done.returncode == 0, terminal[-3000:]
    for line in re.split(r"[\r\n]", terminal):
        for pattern in RAY_LOGGING:
            assert not re.search(pattern, line), f"{pattern!r} reached the terminal: {line!r}"

    log = out / "logs" / "faithlens.log"
    assert terminal.count(str(log)) == 1  # its path, printed once
    text = log.read_text()
    assert "ray." in text and "ray.rllib" in text  # Ray's and RLlib's own records went there
    assert list((out / "logs" / "ray").glob("*/worker-*.err"))  # and the Ray workers' output

    bars = done.stderr.split("distill decoder")
    assert len(bars) > 1 and "sae topk" in bars[0], done.stderr[-2000:]  # the Ray Train jobs' bars, drawn by the driver,
    assert "sae topk" not in "".join(bars[1:])  # and a finished job's bar is never drawn again
    steps = re.findall(r"(reused|done in \d+ s) → ", done.stdout)
    assert len(steps) == 11, done.stdout  # one result line per stage
