"""`faithlens sweep FILE.yaml` (Ray Tune over PPO trials) and `faithlens compare DIR`.

A sweep file (see tune_configs/README.md):

    name: reward_weights          # experiment folder name (default: the file's stem)
    base: {decoder: runs/decoder, env: token, steps: 4096, ...}   # fixed `faithlens ppo` options
    algorithm: grid | random | optuna | pbt
    num_samples: 4                # samples per grid point (grid/random/pbt) or trials (optuna)
    max_concurrent: 2
    cpus_per_trial: 1
    score: {kl: -1.0, top1: 1.0, task_acc: 1.0}   # fixed-weight held-out score used for ranking
    space:                        # option: domain; alpha/beta/gamma build a one-phase schedule
      lr: {loguniform: [1.0e-6, 1.0e-4]}
      phases: {grid: ["2:0.5/0.3/0.2,6:0.4/0.3/0.3,2:0.3/0.2/0.5", "1:1/0/0"]}
    pbt: {perturbation_interval: 2, mutations: {phases: [...], lr: {loguniform: [...]}}}

Trials are ranked by the held-out score, never by the training return (whose scale moves with
the reward weights). Each trial writes its own TensorBoard events, so `tensorboard --logdir DIR`
shows every trial side by side.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated

import tyro

from models.errors import ConfigError
from models.io import read_json, read_yaml, write_json_atomic
from rl_env.ppo_config import SCORE_WEIGHTS, PpoConfig
from training import logs
from training.config import typed_options
from training.tracking import wandb_settings

ALGORITHMS = ("grid", "random", "optuna", "pbt")
WEIGHT_KEYS = ("alpha", "beta", "gamma")
PATH_FIELDS = ("decoder", "cache", "sae", "out")


@dataclass
class SweepConfig:
    """`faithlens sweep`: a Ray Tune search over PPO trials described by a YAML file."""

    file: Annotated[Path, tyro.conf.Positional]
    """The sweep file (tune_configs/*.yaml)."""

    out: Path | None = None
    """Experiment folder (default: runs/sweeps/NAME). A cloud URI works via --storage-path."""

    address: str = ""
    """Ray cluster address (auto, ray://HOST:10001, ...); empty = start a local Ray."""

    storage_path: str = ""
    """Tune storage_path (e.g. s3://bucket/faithlens) instead of the folder above --out."""

    wandb: str = ""
    """Weights & Biases project: one run per trial, logged by Ray Tune's WandbLoggerCallback (off when empty;
    WANDB_MODE=offline keeps the runs on this machine)."""

    set: tuple[str, ...] = ()
    """OPTION=VALUE pairs that replace the sweep file's base options for this run (e.g. --set steps=8192 for
    shorter trials); the experiment's trials record what they ran with."""


@dataclass
class CompareConfig:
    """`faithlens compare`: the trials of a sweep, ranked by their held-out score."""

    experiment: Annotated[Path, tyro.conf.Positional]
    """Experiment folder written by `faithlens sweep`."""

    json: bool = False
    """Print one JSON object instead of the table."""


# -- the sweep file ---------------------------------------------------------------------------------
def load_sweep(path: Path, overrides: tuple[str, ...] = ()) -> dict:
    """The sweep file, checked, with `overrides` ('OPTION=VALUE', from --set) replacing its base options."""
    path = Path(path)
    spec = read_yaml(path, f"sweep file {path}") or {}
    if not isinstance(spec, dict):
        raise ConfigError(f"sweep file {path}: expected a mapping of key: value, got a {type(spec).__name__}")
    spec = _expand(spec)
    if overrides:
        spec["base"] = {**(spec.get("base") or {}), **_overrides(overrides)}
    known = {"name", "base", "algorithm", "num_samples", "max_concurrent", "cpus_per_trial", "score", "space", "pbt", "seed"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ConfigError(f"sweep file {path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    spec.setdefault("name", path.stem)
    spec.setdefault("algorithm", "random")
    if spec["algorithm"] not in ALGORITHMS:
        raise ConfigError(f"sweep file {path}: algorithm must be one of {', '.join(ALGORITHMS)}, got {spec['algorithm']!r}")
    if "wandb" in (spec.get("base") or {}) or "wandb" in (spec.get("space") or {}):
        raise ConfigError(f"sweep file {path}: W&B logging of a sweep is `faithlens sweep --wandb PROJECT` (one run per trial)")
    options = {f.name for f in fields(PpoConfig)} - {"config"}  # only the CLI reads --config files; base holds the options
    for section in ("base", "space"):
        bad = sorted(set(spec.get(section) or {}) - options - (set(WEIGHT_KEYS) if section == "space" else set()))
        if bad:
            raise ConfigError(f"sweep file {path}: {section} has unknown option(s) {', '.join(bad)}")
    for section in ("base", "space", "score", "pbt"):
        if not isinstance(spec.get(section) or {}, dict):
            raise ConfigError(f"sweep file {path}: {section}: expected a mapping of option: value")
    if "decoder" not in (spec.get("base") or {}):
        raise ConfigError(f"sweep file {path}: base.decoder (the distilled decoder to start from) is required")
    # the trials' fixed options as their fields' types (YAML and ${VAR} give strings), JSON values for Tune
    typed = typed_options(PpoConfig, spec["base"], f"sweep file {path}: base")
    spec["base"] = {k: str(v) if isinstance(v, Path) else v for k, v in typed.items()}
    if spec["algorithm"] == "pbt" and not (spec.get("pbt") or {}).get("mutations"):
        raise ConfigError(f"sweep file {path}: algorithm pbt needs pbt.mutations")
    if spec["algorithm"] == "optuna" and any("grid" in (d or {}) for d in (spec.get("space") or {}).values() if isinstance(d, dict)):
        raise ConfigError(f"sweep file {path}: optuna cannot search a grid domain; use choice")
    return spec


def _overrides(pairs: tuple[str, ...]) -> dict:
    options = {f.name for f in fields(PpoConfig)} - {"config"}
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"--set: expected OPTION=VALUE (a `faithlens ppo` option), got {pair!r}")
        if key not in options:
            raise ConfigError(f"--set: {key!r} is not a `faithlens ppo` option")
        out[key] = value
    return out


def _expand(value):
    """${VAR} and ${VAR:-default} in string values, from the environment."""
    if isinstance(value, dict):
        return {k: _expand(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v) for v in value]
    if isinstance(value, str) and "${" in value:
        return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: os.environ.get(m.group(1), m.group(2) or ""), value)
    return value


def domain(name: str, value):
    """YAML → a Tune domain: {grid|choice: [...]}, {uniform|loguniform|randint: [lo, hi]}, or a constant."""
    from ray import tune

    if not isinstance(value, dict):
        return value
    if len(value) != 1:
        raise ConfigError(f"space.{name}: expected one of grid, choice, uniform, loguniform, randint")
    kind, args = next(iter(value.items()))
    makers = {"grid": tune.grid_search, "choice": tune.choice, "uniform": lambda a: tune.uniform(*a),
              "loguniform": lambda a: tune.loguniform(*a), "randint": lambda a: tune.randint(*a)}
    if kind not in makers:
        raise ConfigError(f"space.{name}: unknown domain {kind!r} (grid, choice, uniform, loguniform, randint)")
    return makers[kind](args)


def trial_options(base: dict, sampled: dict) -> dict:
    """PpoConfig options of one trial: base, then sampled values; alpha/beta/gamma make a one-phase schedule."""
    options = {**base, **{k: v for k, v in sampled.items() if k not in WEIGHT_KEYS}}
    if any(k in sampled for k in WEIGHT_KEYS):
        a, b, g = (float(sampled.get(k, 0.0)) for k in WEIGHT_KEYS)
        options["phases"] = f"1:{a}/{b}/{g}"
    return {k: Path(v) if k in PATH_FIELDS and v is not None else v for k, v in options.items()}


# -- the Tune trainable -------------------------------------------------------------------------------
def ppo_trainable(config: dict) -> None:
    """One trial: PpoTrial stepped under Tune, reporting the held-out score every iteration."""
    import tempfile

    import torch
    from ray import tune

    from rl_env.ppo import PpoTrial, resolve

    torch.set_num_threads(max(1, int(config["__cpus"])))
    sampled = {k: v for k, v in config.items() if not k.startswith("__")}
    cfg = resolve(PpoConfig(**trial_options(config["__base"], sampled)))
    trial_dir = Path(tune.get_context().get_trial_dir())
    trial = PpoTrial(cfg, trial_dir / "ppo", config["__score"])
    try:
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:  # a PBT exploit or a restored trial
            with checkpoint.as_directory() as directory:
                trial.start(resume_from=Path(directory))
        else:
            trial.start()
        while not trial.done:
            row = trial.step()
            metrics = _report_metrics(trial, row)
            if "eval/kl" in row:
                with tempfile.TemporaryDirectory() as tmp:
                    trial.save(Path(tmp) / "ckpt")
                    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(Path(tmp) / "ckpt")))
            else:
                tune.report(metrics)
        final = trial.finish()
        tune.report({**_report_metrics(trial, {}), "score": final["score"], "kl": final["kl"], "top1": final["top1"],
                     "task_acc": final.get("task_acc") or 0.0, "done": True})
    finally:
        trial.close()


def _report_metrics(trial, row: dict) -> dict:
    ev = trial.last_eval
    out = {"score": ev["score"], "kl": ev["kl"], "top1": ev["top1"], "task_acc": ev.get("task_acc", 0.0),
           "env_steps": trial.env_steps}
    out.update({k.replace("/", "_"): v for k, v in row.items() if k.startswith(("reward/", "ppo/"))})
    return out


# -- commands ---------------------------------------------------------------------------------------------
def _absolute(base: dict, root: Path) -> dict:
    """Trials run in their own folders (and possibly on other nodes): paths must be absolute."""
    out = dict(base)
    for key in ("decoder", "cache", "sae"):
        if out.get(key):
            out[key] = str((root / out[key]).resolve()) if not Path(out[key]).is_absolute() else out[key]
    if out.get("data"):
        from corpus.sources import absolute_spec

        out["data"] = absolute_spec(out["data"])
    return out


def build_tuner(spec: dict, experiment: Path, storage_path: str = "", wandb: dict | None = None):
    """The Tune run of `spec`; with `wandb` (`training.tracking.wandb_settings`), every trial's reported metrics
    also go to W&B through Tune's own callback."""
    from ray import tune

    algorithm = spec["algorithm"]
    cpus = float(spec.get("cpus_per_trial", 1))
    space = {k: domain(k, v) for k, v in (spec.get("space") or {}).items()}
    param_space = {**space, "__base": spec["base"], "__score": spec.get("score") or None, "__cpus": cpus}
    if param_space["__score"] is None:
        param_space["__score"] = SCORE_WEIGHTS
    search_alg = scheduler = None
    if algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=spec.get("seed", 0))
    elif algorithm == "pbt":
        from ray.tune.schedulers import PopulationBasedTraining

        pbt = spec["pbt"]
        scheduler = PopulationBasedTraining(
            time_attr="training_iteration", perturbation_interval=int(pbt.get("perturbation_interval", 2)),
            hyperparam_mutations={k: (v if isinstance(v, list) else domain(k, v)) for k, v in pbt["mutations"].items()})
        for key, mutation in pbt["mutations"].items():  # every mutated option needs a starting value
            param_space.setdefault(key, tune.choice(mutation) if isinstance(mutation, list) else domain(key, mutation))
    storage = storage_path or str(Path(experiment).parent)
    return tune.Tuner(
        tune.with_resources(ppo_trainable, {"cpu": cpus}),
        param_space=param_space,
        tune_config=tune.TuneConfig(metric="score", mode="max", search_alg=search_alg, scheduler=scheduler,
                                    num_samples=int(spec.get("num_samples", 1)),
                                    max_concurrent_trials=int(spec.get("max_concurrent", 1))),
        run_config=tune.RunConfig(name=Path(experiment).name, storage_path=storage, callbacks=_wandb_callbacks(wandb),
                                  verbose=None if logs.verbose() else 1,  # 1: the trials' status, no per-result rows
                                  # PBT copies other trials' checkpoints: it must find them on storage
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=None if algorithm == "pbt" else 2)),
    )


def check_base(spec: dict, path: Path) -> None:
    """The trials' fixed options checked before Ray starts: valid together, and the decoder, SAE, cache and data
    they name exist (a sampled option may still fail a trial; a bad base would fail every one)."""
    from rl_env.ppo import check_inputs, resolve

    try:
        check_inputs(resolve(PpoConfig(**trial_options(spec["base"], {}))))
    except ConfigError as e:
        raise ConfigError(f"sweep file {path}: base: {e}") from None
def _wandb_callbacks(wandb: dict | None) -> list:
    if wandb is None:
        return []
    from ray.air.integrations.wandb import WandbLoggerCallback

    return [WandbLoggerCallback(**{k: v for k, v in wandb.items() if k != "name"})]  # Tune names each trial's run


def run_sweep(cfg: SweepConfig) -> dict:
    import ray

    spec = load_sweep(cfg.file, cfg.set)
    wandb = wandb_settings(cfg.wandb)
    # resolve paths before Ray starts: a job's working folder can change under the driver afterwards
    spec["base"] = _absolute(spec["base"], Path.cwd())
    check_base(spec, cfg.file)
    experiment = (Path(cfg.out) if cfg.out is not None else Path("runs/sweeps") / spec["name"]).resolve()
    experiment.parent.mkdir(parents=True, exist_ok=True)
    from training.logs import init_ray, keep_worker_logs, route_ray_loggers

    started_here = not ray.is_initialized()
    if started_here:
        if cfg.address:
            init_ray(address=cfg.address)
        else:
            init_ray(address="local", include_dashboard=False)
    route_ray_loggers()
    # Under `ray job submit`, the driver's working folder is an unpacked package that Ray may remove
    # while trials run; everything is absolute by now, so work from the experiment's parent instead.
    os.chdir(experiment.parent)
    try:
        results = build_tuner(spec, experiment, cfg.storage_path, wandb).fit()
    finally:
        if started_here:
            keep_worker_logs(f"sweep {spec['name']}")
            ray.shutdown()
    errors = [str(r.error) for r in results if r.error is not None]
    summary = compare(experiment) if not cfg.storage_path else {"trials": []}
    summary["errors"] = errors
    if not cfg.storage_path:
        write_json_atomic(experiment / "sweep_summary.json", summary)
        print(compare_table(summary))
        print(f"\nexperiment: {experiment.resolve()}; compare: faithlens compare {experiment}; "
              f"TensorBoard: tensorboard --logdir {experiment}")
    if errors:
        print(f"{len(errors)} trial(s) failed; first error: {errors[0].splitlines()[-1] if errors[0] else '?'}")
    return summary


def compare(experiment: Path) -> dict:
    """Every finished trial under EXPERIMENT with its parameters and held-out figures, best score first."""
    experiment = Path(experiment)
    if not experiment.is_dir():
        raise ConfigError(f"compare: {experiment} is not a folder")
    trials = []
    for metrics_path in sorted(experiment.glob("*/ppo/metrics.json")):
        trial_dir = metrics_path.parent.parent
        params_path = trial_dir / "params.json"
        params = read_json(params_path) if params_path.is_file() else {}
        metrics = read_json(metrics_path, "the trial did not finish writing it; rerun the sweep to resume")
        after, before = metrics.get("after") or {}, metrics["before"]
        trials.append({"trial": trial_dir.name, "params": {k: v for k, v in params.items() if not k.startswith("__")},
                       "score": metrics["score"], "score_weights": params.get("__score") or SCORE_WEIGHTS,
                       "kl": metrics["kl"], "top1": metrics["top1"],
                       "task_acc": metrics.get("task_acc"), "env_steps": metrics["env_steps"],
                       "kl_before": before["kl"], "mean_reward": metrics["mean_rewards"]["reward"],
                       "next_token_acc": after.get("next_token_acc"), "next_token_acc_before": before.get("next_token_acc"),
                       "top10_share": after.get("top10_share"), "top10_share_before": before.get("top10_share")})
    if not trials:
        raise ConfigError(f"compare: no finished trials under {experiment} (expected */ppo/metrics.json)")
    trials.sort(key=lambda t: -t["score"])
    return {"experiment": str(experiment), "trials": trials}


def compare_table(summary: dict) -> str:
    weights = (summary["trials"][0].get("score_weights") if summary["trials"] else None) or SCORE_WEIGHTS
    formula = " + ".join(f"{w:g}·{name}" for name, w in weights.items())
    lines = [f"Trials of {summary['experiment']}, best held-out score first (score = {formula}, held-out)",
             "", "| rank | trial | score | KL nats/token (before → after) | top-1 | next-token acc | top-10 share | task acc "
             "| mean reward | params |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]

    def change(t: dict, key: str) -> str:
        before, after = t.get(f"{key}_before"), t.get(key)
        if after is None:
            return "—"
        return f"{before:.1%} → {after:.1%}" if before is not None else f"{after:.1%}"

    for i, t in enumerate(summary["trials"], 1):
        params = ", ".join(f"{k}={v}" for k, v in t["params"].items())
        task = f"{t['task_acc']:.1%}" if t["task_acc"] is not None else "—"
        lines.append(f"| {i} | {t['trial'][:40]} | {t['score']:.3f} | {t['kl_before']:.3f} → {t['kl']:.3f} | {t['top1']:.1%} | "
                     f"{change(t, 'next_token_acc')} | {change(t, 'top10_share')} | {task} | {t['mean_reward']:.3f} | {params} |")
    return "\n".join(lines)


def run_compare(cfg: CompareConfig) -> dict:
    summary = compare(cfg.experiment)
    print(json.dumps(summary) if cfg.json else compare_table(summary))
    return summary
