"""The two trainings, each a logged and measured subprocess: ours (`faithlens lens train`, or the same trainer
without Ray), then tuned-lens in its own venv through `_tuned_lens_child.py`, on the sequences ours trained on."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil
import torch

from benchmarks.lens_vs_tuned_lens.config import REPO, BenchDirs, BenchError, CompareConfig, TokenPlan
from benchmarks.sae_vs_sparsify.train import _train_seconds_from_tensorboard, only_cache
from benchmarks.sae_vs_sparsify.train import model_folder as sparsify_model_folder
from distill.config import DEFAULT_LR, LensTrainConfig
from distill.data import TokenBatches
from distill.teacher import TOKENS_FILE, load_training_tokens
from distill.train import DistillTrainer
from models.io import write_json_atomic
from models.loading import resolve_dtype
from training.config import to_record
from training.layout import RunLayout

log = logging.getLogger(__name__)

CHILD = Path(__file__).with_name("_tuned_lens_child.py")
TORCH_PIN = "torch==2.13.0"
PEER_PACKAGES = ("tuned-lens==0.2.0", "torchdata==0.8.0", "transformers==5.24.0", "accelerate==1.16.0", "datasets==5.2.0",
                 "numpy==2.4.6")
"""tuned-lens 0.2.0 and the versions that import together with torch 2.13: torchdata 0.8 is the last release with the
`dataloader2`/`datapipes` its loop uses (and asks only torch>=2); the rest match our venv, so both tools run the same
model code. None of them pins torch, so nothing needs --no-deps; the torch pin rides on the same pip command so that
pip fails rather than pull another (multi-GB CUDA) torch."""

RSS_SAMPLE_S = 0.25


# -- the peer venv ----------------------------------------------------------------------------------
def ensure_tuned_lens_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    probe = [str(python), "-W", "ignore", "-c",
             "import importlib.metadata as m, torch, tuned_lens.scripts.train_loop; "
             "assert m.version('tuned-lens') == '0.2.0' and torch.__version__.startswith('2.13.0'); print('ok')"]
    if python.is_file() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    log.info("creating tuned-lens's venv at %s (%s first, then %s)", venv, TORCH_PIN, " ".join(PEER_PACKAGES))
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, TORCH_PIN], check=True)
    subprocess.run([*pip, *PEER_PACKAGES, TORCH_PIN], check=True)
    if subprocess.run(probe, capture_output=True).returncode != 0:
        raise BenchError(f"{venv}: tuned-lens does not import after the install; try `{python} -c 'import tuned_lens.scripts.train_loop'`")
    return python


def model_folder(model: str) -> Path:
    """The local HF folder both tools load (tuned-lens gets no hub here)."""
    return sparsify_model_folder(model, "tuned-lens")


# -- measured subprocesses --------------------------------------------------------------------------
@dataclass
class Measured:
    wall_s: float
    peak_rss_mb: float
    """Largest sum of RSS over the process and its descendants (Ray's processes, for ours through the CLI)."""
    peak_process_rss_mb: float
    loadavg_1m_before: float


def _tree_rss_mb(proc: psutil.Process) -> tuple[float, float]:
    """(sum, max) of RSS over `proc` and its descendants, in MB."""
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0, 0.0
    rss = []
    for p in procs:
        try:
            rss.append(p.memory_info().rss / 2**20)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return sum(rss), max(rss, default=0.0)


def run_measured(command: list[str], log_path: Path, env: dict | None = None) -> Measured:
    """Run to completion with output in log_path, sampling its memory; fails with the log's tail."""
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    peak_sum = peak_one = 0.0
    with log_path.open("w") as f:
        popen = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        proc = psutil.Process(popen.pid)
        while popen.poll() is None:
            total, largest = _tree_rss_mb(proc)
            peak_sum, peak_one = max(peak_sum, total), max(peak_one, largest)
            time.sleep(RSS_SAMPLE_S)
    wall = time.perf_counter() - t0
    if popen.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
        raise BenchError(f"{' '.join(command[:4])} ... exited with {popen.returncode}; end of {log_path}:\n{tail}")
    return Measured(wall, peak_sum, peak_one, load)


# -- ours ---------------------------------------------------------------------------------------------
def our_lens_config(cfg: CompareConfig, dirs: BenchDirs, plan: TokenPlan) -> LensTrainConfig:
    """`lens train`'s config for the plan: its defaults, no held-out curve (tuned-lens measures none while training)."""
    return LensTrainConfig(model=cfg.model, dtype=cfg.dtype, data=cfg.data, tokens=plan.scored_tokens, seq_len=cfg.seq_len,
                           seed=cfg.seed, layer=cfg.layer, batch_sequences=cfg.batch_sequences, teacher=cfg.teacher,
                           out=dirs.ours_run, cache_dir=dirs.ours_cache, eval_tokens=0)


def _cli_command(c: LensTrainConfig) -> list[str]:
    record = to_record(c)  # local paths absolute: the command runs in the repository folder
    names = ("layer", "tokens", "data", "model", "dtype", "seq_len", "batch_sequences", "seed", "teacher", "out", "cache_dir",
             "eval_tokens")
    flags = {name.replace("_", "-"): record[name] for name in names}
    return [str(Path(sys.executable).with_name("faithlens")), "lens", "train",
            *[part for name, value in flags.items() for part in (f"--{name}", str(value))]]


def run_ours(cfg: CompareConfig, dirs: BenchDirs, lens_cfg: LensTrainConfig) -> dict:
    if cfg.runner == "cli":
        command = _cli_command(lens_cfg)
        env = {**os.environ, "RAY_ADDRESS": "local"}  # a fresh Ray instance, never another job's cluster
    else:
        write_json_atomic(dirs.spec("ours"), to_record(lens_cfg))
        command = [sys.executable, "-m", "benchmarks.lens_vs_tuned_lens.ours_inprocess", str(dirs.spec("ours"))]
        env = None
    started = time.time()
    measured = run_measured(command, dirs.log("ours_train"), env)
    run = RunLayout(dirs.ours_run)
    metrics = json.loads(run.metrics.read_text())
    tokens = metrics["train_tokens"]
    train_s = _train_seconds_from_tensorboard(run.tb)
    ready = _teacher_source_path(dirs, lens_cfg)
    return {**asdict(measured), "runner": cfg.runner, "steps": metrics["steps"], "train_tokens": tokens,
            "tokens_per_step": tokens // metrics["steps"], "train_loop_s": train_s,
            "data_kind": "teacher-cache build" if lens_cfg.teacher == "cache" else "token packing",
            "data_ready_s": ready.stat().st_mtime - started, "end_to_end_s": measured.wall_s,
            "tokens_per_s_end_to_end": tokens / measured.wall_s,
            "tokens_per_s_train_only": tokens / train_s if train_s else None, "final_train": metrics["final_train"],
            "lr": lens_cfg.lr or DEFAULT_LR["lens"], "weight_decay": lens_cfg.weight_decay,
            "warmup_frac": lens_cfg.lr_warmup_frac, "decay_frac": lens_cfg.lr_decay_frac, "lr_floor": DistillTrainer.lr_floor,
            "grad_clip": lens_cfg.grad_clip, "frozen_dtype": str(resolve_dtype(lens_cfg.dtype, lens_cfg.device)).removeprefix("torch."),
            "lens_dir": str(run.lens)}


def _teacher_source_path(dirs: BenchDirs, lens_cfg: LensTrainConfig) -> Path:
    """The file whose writing ends ours' data preparation: the cache manifest or the online token table."""
    if lens_cfg.teacher == "online":
        return dirs.ours_run / TOKENS_FILE
    return only_cache(dirs.ours_cache).root / "manifest.json"


def our_training_sequences(dirs: BenchDirs, lens_cfg: LensTrainConfig, steps: int) -> tuple[np.ndarray, int]:
    """The sequences ours trained on, in its order (its batch iterator replayed for its steps), and how many
    rows its table holds (fewer than the sequences when the corpus ran short and ours went round again)."""
    if lens_cfg.teacher == "online":
        table, _ = load_training_tokens(dirs.ours_run / TOKENS_FILE)
    else:
        cache = only_cache(dirs.ours_cache)
        table = torch.cat([cache.shard(i)["tokens"] for i in range(cache.n_shards)])
    batches = TokenBatches(table, table, lens_cfg.batch_sequences, lens_cfg.seed).iterate()
    return torch.cat([next(batches)["tokens"] for _ in range(steps)]).numpy(), len(table)


# -- tuned-lens -------------------------------------------------------------------------------------
def run_tuned_lens(cfg: CompareConfig, dirs: BenchDirs, python: Path, model_dir: Path, plan: TokenPlan) -> dict:
    spec = {"model_dir": str(model_dir), "dataset_dir": str(dirs.dataset), "layer": cfg.layer,
            "steps": plan.tuned_lens_steps, "batches_per_step": plan.batches_per_tuned_lens_step,
            "batch_sequences": plan.batch_sequences, "seed": cfg.seed, "train_dir": str(dirs.tuned_lens_train),
            "lens_dir": str(dirs.tuned_lens_lens), "check_path": str(dirs.conversion_check),
            "result_path": str(dirs.child_result("tuned_lens"))}
    write_json_atomic(dirs.spec("tuned_lens"), spec)
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}  # single process
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"})
    measured = run_measured([str(python), str(CHILD), str(dirs.spec("tuned_lens"))], dirs.log("tuned_lens_train"), env)
    child = json.loads(dirs.child_result("tuned_lens").read_text())
    tokens = child["train_tokens"]
    end_to_end_s = measured.wall_s - child["benchmark_extra_s"]
    return {**child, **asdict(measured), "tokens_per_step": plan.tuned_lens_step_sequences * (plan.seq_len - 1),
            "end_to_end_s": end_to_end_s, "tokens_per_s_end_to_end": tokens / end_to_end_s,
            "tokens_per_s_fit": tokens / child["fit_s"],
            "tokens_per_s_train_only": tokens / child["train_only_s"]}
