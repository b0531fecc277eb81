"""A quiet terminal: `faithlens demo` on a tiny model prints its stages, one progress line per stage, one result line
with the stage's key figure, and no line of Ray's, RLlib's or a library's own logging; those go to
RUN/logs/faithlens.log, whose path it prints once."""

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
    for figure in (r"explained variance \d\.\d{3} \(design: > 0\.95\) · L0 \d+", r"held-out KL \d\.\d{3} \(design: < 0\.5\)",
                   r"held-out KL \d\.\d{3} → \d\.\d{3}", r"top-10 share \d+\.\d% of \|attribution\|",
                   r"verified \d+/\d+ of the random sample", r"frozen model top-1 \d+\.\d% on 256 tokens"):
        assert re.search(figure + r".* · (reused|done in \d+ s) → ", done.stdout), (figure, done.stdout)
    # every line drawn on stderr is a stage's progress line, numbered like its title: one bar per stage
    drawn = [segment.strip() for segment in re.split(r"[\r\n]", done.stderr) if segment.strip()]
    assert drawn and all(re.match(r"\[\d+/11\]", segment) for segment in drawn), [
        segment for segment in drawn if not re.match(r"\[\d+/11\]", segment)][:5]
    assert any(segment.startswith("[4/11] · sae topk") for segment in drawn)


def test_a_stage_draws_one_line_whatever_its_loops_and_an_inner_loop_hands_it_back(monkeypatch):
    import io

    from models import progress
    from models.progress import progress_bar

    made = []

    class Counted(progress.tqdm):
        def __init__(self, *args, **kwargs):
            made.append(self)
            super().__init__(*args, **{**kwargs, "file": io.StringIO()})

    monkeypatch.setattr(progress, "tqdm", Counted)
    with progress.stage("[1/2]"):
        line = None
        for i in progress_bar(range(3), desc="outer", unit="batch"):
            line = made[0]
            assert (line.desc, line.total, line.n) == ("[1/2] · outer", 3, i)
            with progress_bar(total=5, desc="inner", unit="feature") as inner:
                inner.update(2)
                assert (line.desc, line.total, line.n, line.unit) == ("[1/2] · inner", 5, 2, "feature")
            assert (line.desc, line.total, line.n, line.unit) == ("[1/2] · outer", 3, i, "batch")  # handed back
    assert len(made) == 1
    progress_bar(range(2), desc="on its own")  # outside a stage: a bar of its own
    assert len(made) == 2 and made[1].desc == "on its own"
