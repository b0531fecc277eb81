"""Our TopK SAE against EleutherAI's sparsify: same model, layer, latents, k and training tokens.

    python -m benchmarks.sae_vs_sparsify --tokens 500000 --data FILE [--layer 9 --latents 5760 --k 64]

Steps, in one run:
1. sparsify gets its own venv (default runs/.venv-sparsify; it is never installed into ours).
2. The training sequences are made once with our corpus code (the train split of --data, exactly
   the sequences our activation cache holds), shuffled pass by pass and repeated as our trainer
   would cycle them, and saved as a `datasets.Dataset` with an `input_ids` column for sparsify.
3. sparsify trains in its venv through `_sparsify_child.py` (its `Trainer` called directly, fp32,
   the model cut at the hookpoint, 8 x 256-token batches, the BOS position excluded as ours does).
4. Ours runs end to end as `faithlens sae train` (cache build + Ray Train job), in a fresh cache
   folder so that its wall time includes the frozen forward.
5. sparsify's SAE is converted to our format and both are evaluated by `sae.metrics.evaluate_sae`
   on the same held-out tokens; one table is printed and results.{json,md} written to --out.

Both tools take the same number of optimizer steps (tokens // batch tokens). Ours trains on 256
positions per sequence minus BOS at 2,048 tokens per step; sparsify sees the same 8 x 256 batches
and skips the BOS position, so 2,040 trained tokens per step: each tool's exact count is reported.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import tyro
from safetensors.torch import load_file

from corpus.cache import ActivationCache
from corpus.packing import sequences
from models.config import DEFAULT_MODEL, ModelConfig
from models.errors import ConfigError
from models.io import write_json_atomic, write_text_atomic
from models.loading import embedded_model_dir, load_frozen
from sae.config import SaeConfig, SaeTrainConfig
from sae.job import cache_config_for
from sae.metrics import SaeEvalConfig, evaluate_sae
from sae.model import SparseAutoencoder

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
CHILD = Path(__file__).with_name("_sparsify_child.py")
MARKER = ".sae_vs_sparsify"
SPARSIFY_TENSORS = {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}
CONVERSION_RTOL = 1e-3


class BenchError(RuntimeError):
    """A step of the benchmark failed; the message says where its log is."""


@dataclass
class CompareConfig:
    """Train our TopK SAE and sparsify's on the same tokens, evaluate both with our metrics."""

    tokens: int
    """Training tokens (BOS positions excluded), as `faithlens sae train --tokens`."""

    data: str
    """Text source(s) as in `faithlens sae train --data`; train split to train, eval split to evaluate."""

    layer: int = 9
    """Our layer (output of HF block layer-1, i.e. sparsify hookpoint layers.{layer-1})."""

    latents: int = 5760
    """Number of latents of both SAEs."""

    k: int = 64
    """Active latents per token of both SAEs."""

    eval_tokens: int = 32_768
    """Held-out token positions for the evaluation of both SAEs."""

    out: Path = REPO / "runs" / "sae_vs_sparsify"
    """Results folder: results.json, results.md, logs, both runs (its ours/ and sparsify/ are replaced)."""

    sparsify_venv: Path = REPO / "runs" / ".venv-sparsify"
    """Venv holding eai-sparsify (created with torch==2.13.0 when missing)."""

    model: str = DEFAULT_MODEL
    """Frozen model: embedded:smollm2-135m-instruct or a local HF folder (sparsify needs a folder)."""

    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """Dtype of our frozen forward during training (auto = ours' default); sparsify always runs fp32."""

    eval_dtype: Literal["auto", "bf16", "fp32"] = "fp32"
    """Dtype of the frozen model in the evaluation of both SAEs."""

    seq_len: int = 256
    """Tokens per sequence, BOS included."""

    batch_sequences: int = 8
    """Sequences per optimizer step (batch tokens = batch_sequences x seq_len)."""

    seed: int = 0
    """Seed of our run and of the shuffling of sparsify's sequences."""

    json: bool = False
    """Print one JSON object instead of the table."""


@dataclass(frozen=True)
class BenchDirs:
    """Every path of one benchmark run."""

    root: Path

    @property
    def sparsify(self) -> Path:
        return self.root / "sparsify"

    @property
    def dataset(self) -> Path:
        return self.sparsify / "dataset"

    @property
    def sparsify_ckpt(self) -> Path:
        return self.sparsify / "ckpt"

    @property
    def sparsify_converted(self) -> Path:
        return self.sparsify / "sae_faithlens"

    @property
    def ours(self) -> Path:
        return self.root / "ours"

    @property
    def ours_run(self) -> Path:
        return self.ours / "run"

    @property
    def ours_cache(self) -> Path:
        return self.ours / "cache"

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def prepare(self) -> None:
        """Claim the folder (refusing one this script did not make) and clear the previous runs."""
        if self.root.exists() and any(self.root.iterdir()) and not (self.root / MARKER).exists():
            raise ConfigError(f"--out {self.root}: exists and was not made by this benchmark; choose another folder")
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / MARKER).write_text("")
        for folder in (self.sparsify, self.ours):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()


# -- 1. sparsify's venv ------------------------------------------------------------------------
def ensure_sparsify_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import sparsify, torch; print(sparsify.__version__, torch.__version__)"]
    if python.is_file() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    log.info("creating sparsify's venv at %s (torch==2.13.0 first, then eai-sparsify)", venv)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, "eai-sparsify", "torch==2.13.0"], check=True)  # the pin keeps pip from swapping torch
    subprocess.run(probe, check=True, capture_output=True)
    return python


# -- 2. the training sequences -----------------------------------------------------------------
def our_train_config(cfg: CompareConfig, dirs: BenchDirs) -> SaeTrainConfig:
    return SaeTrainConfig(model=cfg.model, dtype=cfg.dtype, data=cfg.data, tokens=cfg.tokens, seq_len=cfg.seq_len,
                          seed=cfg.seed, layer=cfg.layer, arch="topk", latents=cfg.latents, k=cfg.k,
                          batch_tokens=cfg.batch_sequences * cfg.seq_len, out=dirs.ours_run,
                          cache_dir=dirs.ours_cache, eval_tokens=0)


def train_sequences(train_cfg: SaeTrainConfig) -> tuple[np.ndarray, int]:
    """The packed sequences our cache build will hold (same config, same order), and the BOS id."""
    frozen = load_frozen(train_cfg)
    cache_cfg = cache_config_for(train_cfg)
    seqs = [p.tokens for p in sequences(cache_cfg, frozen.tokenizer, frozen.bos_token_id, frozen.eos_token_id, frozen)]
    return np.stack(seqs), frozen.bos_token_id


def sparsify_sequences(unique_ST: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n sequences: independently shuffled passes over the unique ones (sparsify does not shuffle)."""
    g = np.random.default_rng(seed)
    passes = [unique_ST[g.permutation(len(unique_ST))] for _ in range(math.ceil(n / len(unique_ST)))]
    return np.concatenate(passes)[:n]


def save_dataset(ids_ST: np.ndarray, path: Path) -> None:
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    Dataset.from_dict({"input_ids": ids_ST.tolist()}).save_to_disk(str(path))


def model_folder(model: str) -> Path:
    if model.startswith("embedded:"):
        return embedded_model_dir(model.removeprefix("embedded:"))  # already a dequantised HF folder
    if Path(model).expanduser().is_dir():
        return Path(model).expanduser().resolve()
    raise ConfigError(f"--model: sparsify needs a local HF folder or an embedded model, got {model!r}")


# -- 3 and 4. the two trainings ------------------------------------------------------------------
def run_logged(command: list[str], log_path: Path, env: dict | None = None) -> float:
    """Run to completion with output in log_path; wall seconds. Fails with the log's tail."""
    t0 = time.perf_counter()
    with log_path.open("w") as f:
        code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env).returncode
    wall = time.perf_counter() - t0
    if code != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
        raise BenchError(f"{' '.join(command[:4])} ... exited with {code}; end of {log_path}:\n{tail}")
    return wall


def run_sparsify(cfg: CompareConfig, dirs: BenchDirs, python: Path, model_dir: Path, bos_id: int,
                 train_cfg: SaeTrainConfig) -> dict:
    spec = {"model_dir": str(model_dir), "dataset_dir": str(dirs.dataset), "layer": cfg.layer,
            "latents": cfg.latents, "k": cfg.k, "batch_size": cfg.batch_sequences, "exclude_tokens": [bos_id],
            "dead_feature_threshold": train_cfg.dead_tokens, "save_dir": str(dirs.sparsify_ckpt),
            "log_path": str(dirs.sparsify / "train_log.jsonl"), "result_path": str(dirs.sparsify / "child.json")}
    spec_path = dirs.sparsify / "spec.json"
    write_json_atomic(spec_path, spec)
    load = os.getloadavg()[0]
    wall = run_logged([str(python), str(CHILD), str(spec_path)], dirs.log("sparsify_train"))
    child = json.loads((dirs.sparsify / "child.json").read_text())
    tokens = child["train_tokens"]
    last = _last_jsonl(dirs.sparsify / "train_log.jsonl")
    return {**child, "wall_s": wall, "loadavg_1m_before": load,
            "tokens_per_s_end_to_end": tokens / wall, "tokens_per_s_fit": tokens / child["fit_s"],
            "tokens_per_s_train_only": tokens / child["sae_train_s"],
            "train_fvu_last": last.get(f"fvu/{child['hookpoint']}"),
            "train_dead_frac_last": last.get(f"dead_pct/{child['hookpoint']}")}


def run_ours(cfg: CompareConfig, dirs: BenchDirs, train_cfg: SaeTrainConfig) -> dict:
    command = [str(REPO / ".venv" / "bin" / "faithlens"), "sae", "train", "--arch", "topk",
               "--latents", str(cfg.latents), "--k", str(cfg.k), "--tokens", str(cfg.tokens), "--data", cfg.data,
               "--layer", str(cfg.layer), "--model", cfg.model, "--dtype", cfg.dtype, "--seq-len", str(cfg.seq_len),
               "--batch-tokens", str(train_cfg.batch_tokens), "--seed", str(cfg.seed),
               "--out", str(dirs.ours_run), "--cache-dir", str(dirs.ours_cache), "--eval-tokens", "0"]
    env = {**os.environ, "RAY_ADDRESS": "local"}  # a fresh Ray instance, never another job's cluster
    load = os.getloadavg()[0]
    started = time.time()
    wall = run_logged(command, dirs.log("ours_train"), env)
    steps = max(1, train_cfg.tokens // train_cfg.batch_tokens)
    tokens = steps * train_cfg.batch_tokens
    train_s = _train_seconds_from_tensorboard(dirs.ours_run / "tb")
    cache = _only_cache(dirs.ours_cache)
    return {"steps": steps, "batch_tokens": train_cfg.batch_tokens, "train_tokens": tokens, "wall_s": wall,
            "loadavg_1m_before": load, "cache_ready_s": (cache.root / "manifest.json").stat().st_mtime - started,
            "cache_tokens": cache.tokens, "train_loop_s": train_s, "tokens_per_s_end_to_end": tokens / wall,
            "tokens_per_s_train_only": tokens / train_s if train_s else None,
            "train_fvu_last": _last_scalar(dirs.ours_run / "tb", "sae/fvu"),
            "train_dead_frac_last": _last_scalar(dirs.ours_run / "tb", "sae/dead_frac"),
            "sae_dir": str(dirs.ours_run / "sae")}


def _only_cache(cache_dir: Path) -> ActivationCache:
    roots = [p for p in cache_dir.iterdir() if (p / "manifest.json").is_file()]
    if len(roots) != 1:
        raise BenchError(f"{cache_dir}: expected exactly one activation cache, found {len(roots)}")
    return ActivationCache.open(roots[0], verify=False)


def _scalars(tb_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags().get("scalars", []):
        return {}
    return {e.step: e.value for e in acc.Scalars(tag)}  # a retried step keeps its last value


def _train_seconds_from_tensorboard(tb_dir: Path) -> float | None:
    """Σ window tokens / window rate over the logged `charts/tokens_per_s` windows (the whole loop)."""
    rates = _scalars(tb_dir, "charts/tokens_per_s")
    seconds, previous = 0.0, 0
    for step in sorted(rates):
        seconds += (step - previous) / rates[step]
        previous = step
    return seconds or None


def _last_scalar(tb_dir: Path, tag: str) -> float | None:
    values = _scalars(tb_dir, tag)
    return values[max(values)] if values else None


def _last_jsonl(path: Path) -> dict:
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return json.loads(lines[-1]) if lines else {}


# -- 5. conversion and evaluation ----------------------------------------------------------------
def convert_sparsify_sae(src: Path, dest: Path, layer: int, model: str) -> SparseAutoencoder:
    """sparsify's cfg.json + sae.safetensors as our SparseAutoencoder (same encode/decode maths).

    sparsify: relu(W x' + b) then top-k, x' = x - b_dec; ours: top-k then relu, which selects the
    same positive latents; both decode Σ f_i W_dec[i] + b_dec on raw (unscaled) activations.
    """
    meta = json.loads((src / "cfg.json").read_text())
    if meta.get("activation") != "topk" or meta.get("transcode") or meta.get("skip_connection"):
        raise ConfigError(f"{src}: only plain TopK sparsify SAEs convert (cfg {meta})")
    tensors = load_file(str(src / "sae.safetensors"))
    if set(tensors) != SPARSIFY_TENSORS:
        raise ConfigError(f"{src}: expected tensors {sorted(SPARSIFY_TENSORS)}, found {sorted(tensors)}")
    num_latents, d_in = tensors["W_dec"].shape
    sae = SparseAutoencoder(SaeConfig(d_in=d_in, num_latents=num_latents, arch="topk", k=meta["k"]))
    sae.load_state_dict({"W_enc": tensors["encoder.weight"], "b_enc": tensors["encoder.bias"],
                         "W_dec": tensors["W_dec"], "b_dec": tensors["b_dec"]}, strict=False)
    sae.save(dest, extra={"layer": layer, "model": model, "converted_from": "sparsify", "sparsify_cfg": meta})
    return SparseAutoencoder.load(dest)


def check_conversion(sae: SparseAutoencoder, check_file: Path) -> float:
    """Max error of our copy against sparsify's own outputs, relative to their largest value."""
    ref = load_file(str(check_file))
    with torch.inference_mode():
        enc = sae.encode(ref["x"])
        ours = sae.decode(enc.acts_NK, enc.indices_NK)
    rel = ((ours - ref["sae_out"]).abs().max() / ref["sae_out"].abs().max()).item()
    if rel > CONVERSION_RTOL:
        raise BenchError(f"converted sparsify SAE disagrees with sparsify's forward (max relative error {rel:.2e})")
    return rel


def evaluate_both(cfg: CompareConfig, saes: dict[str, SparseAutoencoder]) -> dict[str, dict]:
    frozen = load_frozen(ModelConfig(model=cfg.model, dtype=cfg.eval_dtype))
    eval_cfg = SaeEvalConfig(model=cfg.model, dtype=cfg.eval_dtype, data=cfg.data, tokens=cfg.eval_tokens,
                             seq_len=cfg.seq_len, seed=cfg.seed, split="eval")
    return {tool: evaluate_sae(sae, frozen, eval_cfg, cfg.layer, progress=not cfg.json) for tool, sae in saes.items()}


# -- 6. report ---------------------------------------------------------------------------------
def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def results_table(results: dict) -> str:
    c, ev = results["config"], results["eval"]
    lines = [f"SAE vs sparsify: {c['model']} layer {c['layer']} (sparsify {results['sparsify']['hookpoint']}), "
             f"TopK {c['latents']} latents, k={c['k']}, {results['ours']['steps']} steps of "
             f"{c['batch_sequences']} x {c['seq_len']} tokens; eval on {ev['ours']['tokens']:,} held-out tokens "
             f"of {c['data']} (frozen model {c['eval_dtype']})", "",
             "| tool | train tokens | L0 | FVU | explained var | dead frac | spliced KL | ΔCE | "
             "tok/s end-to-end | tok/s training-only | wall s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for tool, name in (("ours", "faithlens (ours)"), ("sparsify", f"sparsify {results['sparsify']['sparsify_version']}")):
        t, m = results[tool], ev[tool]
        lines.append(f"| {name} | {t['train_tokens']:,} | {m['l0']:.1f} | {m['fvu']:.4f} | {m['explained_variance']:.4f} | "
                     f"{m['dead_frac']:.3f} | {_fmt(m.get('spliced_kl'), '.4f')} | {_fmt(m.get('delta_ce'), '.4f')} | "
                     f"{t['tokens_per_s_end_to_end']:,.0f} | {_fmt(t['tokens_per_s_train_only'], ',.0f')} | "
                     f"{t['wall_s']:,.1f} |")
    o, s = results["ours"], results["sparsify"]
    lines += ["",
              f"- ours: wall {o['wall_s']:.1f} s = process + Ray start, model load and cache build "
              f"(cache ready after {o['cache_ready_s']:.1f} s, frozen model {c['dtype']}), then a training loop of "
              f"{_fmt(o['train_loop_s'], '.1f')} s (from TensorBoard charts/tokens_per_s), then saving.",
              f"- sparsify: wall {s['wall_s']:.1f} s = {s['startup_s']:.1f} s start-up + fit {s['fit_s']:.1f} s "
              f"({s['tokens_per_s_fit']:,.0f} tok/s), of which LM forward {s['lm_forward_s']:.1f} s; training-only = "
              f"fit minus LM forward. fp32, {s['optimizer']} lr {s['lr']:.2e}.",
              f"- dead frac = latents that never fire on the eval tokens. Load average before: ours "
              f"{o['loadavg_1m_before']:.2f}, sparsify {s['loadavg_1m_before']:.2f} (2 cores; timings are noisy).",
              f"- same training sequences: {results['same_sequences']}; converted sparsify SAE matches sparsify's "
              f"forward to {results['conversion_rel_err']:.1e} (relative)."]
    return "\n".join(lines)


def run_compare(cfg: CompareConfig) -> dict:
    if cfg.layer < 1:
        raise ConfigError("--layer: sparsify hooks block outputs, so the layer must be at least 1")
    dirs = BenchDirs(Path(cfg.out).resolve())
    train_cfg = our_train_config(cfg, dirs)  # validates --data, --latents, --k before any work
    model_dir = model_folder(cfg.model)
    dirs.prepare()

    log.info("[1/5] sparsify venv %s", cfg.sparsify_venv)
    python = ensure_sparsify_venv(Path(cfg.sparsify_venv))

    log.info("[2/5] training sequences from %s", cfg.data)
    unique_ST, bos_id = train_sequences(train_cfg)
    steps = max(1, train_cfg.tokens // train_cfg.batch_tokens)
    ids_ST = sparsify_sequences(unique_ST, steps * cfg.batch_sequences, cfg.seed)
    if (ids_ST[:, 1:] == bos_id).any():
        log.warning("BOS appears inside sequences: sparsify's exclude_tokens will drop those positions too")
    save_dataset(ids_ST, dirs.dataset)

    log.info("[3/5] sparsify: %d steps of %d x %d tokens", steps, cfg.batch_sequences, cfg.seq_len)
    sparsify = run_sparsify(cfg, dirs, python, model_dir, bos_id, train_cfg)
    log.info("[4/5] ours: faithlens sae train (%d steps)", steps)
    ours = run_ours(cfg, dirs, train_cfg)
    cache = _only_cache(dirs.ours_cache)
    cached = np.concatenate([cache.shard(i)["tokens"].numpy() for i in range(cache.n_shards)])
    same = cached.shape == unique_ST.shape and bool((cached == unique_ST).all())

    log.info("[5/5] converting sparsify's SAE and evaluating both on %d held-out tokens", cfg.eval_tokens)
    converted = convert_sparsify_sae(Path(sparsify["sae_dir"]), dirs.sparsify_converted, cfg.layer, cfg.model)
    rel_err = check_conversion(converted, dirs.sparsify / "conversion_check.safetensors")
    metrics = evaluate_both(cfg, {"ours": SparseAutoencoder.load(Path(ours["sae_dir"])), "sparsify": converted})

    results = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
               "ours": ours, "sparsify": sparsify, "eval": metrics, "same_sequences": same,
               "unique_train_sequences": len(unique_ST), "conversion_rel_err": rel_err}
    write_json_atomic(dirs.root / "results.json", results)
    write_text_atomic(dirs.root / "results.md", results_table(results) + "\n")
    return results


def main() -> None:
    cfg = tyro.cli(CompareConfig, prog="python -m benchmarks.sae_vs_sparsify", description=__doc__.split("\n")[0])
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "huggingface_hub", "datasets", "transformers", "tensorboard"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        results = run_compare(cfg)
    except (ConfigError, BenchError) as e:
        print(f"sae_vs_sparsify: error: {e}", file=sys.stderr)
        sys.exit(2)
    if cfg.json:
        print(json.dumps(results))
    else:
        print(results_table(results))
        print(f"\nresults written to {Path(cfg.out) / 'results.json'} and results.md")


if __name__ == "__main__":
    main()
