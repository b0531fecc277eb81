"""`faithlens ppo`: one PPO trial in RLlib on the decoder-on-features environment.

The loop: held-out evaluation of the distilled decoder (before) → PPO iterations (RLlib's
`algo.train()`), each logging every reward component and PPO statistic to TensorBoard; every
`eval_every` iterations held-out KL / top-1 / task accuracy, the design's dynamic α adjustment and
a checkpoint (a rerun with the same --out resumes from it) → the policy exported as a plain
decoder checkpoint, and metrics.json with before/after figures.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

from models.errors import ConfigError
from models.io import atomic_path, read_json, write_json_atomic
from rl_env.config import EnvConfig
from rl_env.learner import SlimPPOLearner
from rl_env.ppo_config import SCORE_WEIGHTS, PpoConfig, PpoExportConfig
from rl_env.reward import RewardSchedule, parse_phases
from training.layout import RunLayout, decoder_dir
from training.tracking import MetricWriter, wandb_settings

log = logging.getLogger(__name__)

ENV_NAMES = {"token": "faithlens-token", "generation": "faithlens-generation"}


def make_env(env_config: dict):
    """RLlib's env creator: a VectorEnv when asked for `num_envs` sub-environments, else a single env."""
    cfg = EnvConfig.from_dict(dict(env_config))
    num_envs = int(env_config.get("num_envs", 0))
    if cfg.env == "token":
        from rl_env.token_env import make_token_env, make_token_vec_env

        return make_token_vec_env(cfg, num_envs) if num_envs else make_token_env(cfg)
    from rl_env.generation_env import make_generation_env, make_generation_vec_env

    return make_generation_vec_env(cfg, num_envs) if num_envs else make_generation_env(cfg)


def register_envs() -> None:
    from ray.tune.registry import register_env

    for name in ENV_NAMES.values():
        register_env(name, make_env)


def _engine(env):
    while not hasattr(env, "engine"):
        env = env.env
    return env.engine


def engines_call(algo, fn) -> list:
    """Apply fn(engine) on every env runner's environment (the local one when there are no remote runners)."""
    results = algo.env_runner_group.foreach_env_runner(
        lambda runner: fn(_engine(runner.env)) if getattr(runner, "env", None) is not None else None,
        local_env_runner=True)  # with remote runners, the local one has no environment
    return [r for r in results if r is not None]


# -- configuration ----------------------------------------------------------------------------------
def resolve(cfg: PpoConfig) -> PpoConfig:
    """Fill in model / layer / SAE / data from the decoder, and the discount and context the run's
    environment and decoder imply."""
    from models.decoder import read_decoder_meta

    dec_dir = decoder_dir(cfg.decoder).resolve()
    meta = read_decoder_meta(dec_dir)
    updates = {"decoder": dec_dir, "model": cfg.model or meta.get("model", ""), "layer": int(meta.get("layer", cfg.layer)),
               "sae": cfg.sae or meta.get("sae", ""), "data": cfg.data or meta.get("data", "")}
    if not updates["sae"]:
        raise ConfigError(f"{dec_dir}: decoder.json records no SAE; pass --sae")
    if cfg.gamma < 0:
        updates["gamma"] = 0.0 if cfg.env == "token" else 1.0
    context = meta.get("arch") == "context"
    if cfg.window == 0:
        updates["window"] = CONTEXT_WINDOW if context else 16
    if context and cfg.env == "token":
        updates["context"] = updates.get("window", cfg.window)  # observations hold the sequence from BOS
    elif context and cfg.context == 0:
        updates["context"] = GENERATION_CONTEXT - 1
    elif not context and cfg.context:
        raise ConfigError(f"--context {cfg.context}: a {meta.get('arch')} decoder reads one position; leave --context at 0")
    return replace(cfg, **updates)


def check_inputs(cfg: PpoConfig):
    """What a trial reads, checked before Ray starts (on a resolved config): the SAE, the token env's cache and
    the held-out corpus. Returns the corpus (`decoder_corpus`)."""
    from corpus.cache import ActivationCache
    from sae.model import SparseAutoencoder

    sae = SparseAutoencoder.load(Path(cfg.sae))
    if cfg.env == "token" and cfg.cache:
        try:
            cache = ActivationCache.open(Path(cfg.cache), verify=False)  # the environments verify the shards they read
        except ConfigError as e:
            raise ConfigError(f"--cache {e}") from None
        if cfg.layer not in cache.layers or not cache.has_teacher:
            raise ConfigError(f"--cache {cfg.cache}: expected layer {cfg.layer} with teacher targets; it holds layers "
                              f"{cache.layers}{'' if cache.has_teacher else ' without teacher targets'}")
        if cache.d_model != sae.cfg.d_in:
            raise ConfigError(f"--cache {cfg.cache}: residuals of width {cache.d_model}, the SAE reads {sae.cfg.d_in}")
    return decoder_corpus(cfg)


CONTEXT_WINDOW = 64
"""Token env, context decoder: an episode is positions 1..64 of a sequence (observations of 65 rows from BOS)."""
GENERATION_CONTEXT = 96
"""Generation env, context decoder: rows per observation (prompt from BOS + answer)."""


def algo_config(cfg: PpoConfig, env_config: dict):
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from models.policy import DecoderPolicy

    return (
        PPOConfig()
        .environment(env=ENV_NAMES[cfg.env], env_config=env_config)
        .env_runners(num_env_runners=cfg.env_runners, num_envs_per_env_runner=cfg.num_envs,
                     gym_env_vectorize_mode="vector_entry_point", rollout_fragment_length="auto")
        .training(lr=cfg.lr, gamma=cfg.gamma, lambda_=cfg.lambda_, clip_param=cfg.clip_param,
                  entropy_coeff=cfg.entropy_coeff, vf_loss_coeff=cfg.vf_loss_coeff, use_kl_loss=False,
                  num_epochs=cfg.num_epochs, minibatch_size=cfg.minibatch_size, train_batch_size_per_learner=cfg.train_batch,
                  grad_clip=1.0, shuffle_batch_per_epoch=cfg.context == 0)
        .rl_module(rl_module_spec=RLModuleSpec(module_class=DecoderPolicy, model_config={
            "decoder": str(cfg.decoder), "model": cfg.model, "dtype": cfg.dtype}))
        # a context decoder's minibatches hold whole episodes (unshuffled), so the learner runs each sequence once
        .learners(num_learners=0, learner_class=SlimPPOLearner, learner_config_dict={
            "entropy_reward": cfg.entropy_reward, "attribution_share": cfg.attribution_share, "share_top": cfg.share_top,
            "share_rows": cfg.share_rows})
        .debugging(seed=cfg.seed, log_level="ERROR")
    )


def env_config_for(cfg: PpoConfig, cache_root: str) -> dict:
    env = EnvConfig.from_dict(asdict(cfg))
    return {**env.to_dict(), "cache": cache_root, "total_steps": cfg.steps}


# -- evaluation ---------------------------------------------------------------------------------------
class Evaluator:
    """Held-out KL / top-1 (exact, full vocabulary) and task accuracy of a decoder."""

    def __init__(self, cfg: PpoConfig, frozen, sae, corpus):
        from distill.heldout import HeldOut

        self.cfg, self.frozen, self.sae = cfg, frozen, sae
        self.held_out = HeldOut(corpus, frozen, cfg.layer, cfg.eval_tokens)

    def __call__(self, decoder) -> dict:
        from distill.task_eval import task_answer_exact_match

        was_training = decoder.training
        decoder.eval()
        out = self.held_out.measure(decoder, self.sae, self.cfg.share_predictions, self.cfg.seed)
        if self.cfg.task_suite:
            # the generation env is judged as it trains: generated answers in its prompt format
            mode, fmt = ("generate", self.cfg.prompt_format) if self.cfg.env == "generation" else ("teacher_forced", "bare")
            tasks = task_answer_exact_match(self.frozen, self.cfg.layer, {"decoder": (decoder, self.sae)},
                                            [self.cfg.task_suite], self.cfg.task_examples, self.cfg.seed,
                                            mode=mode, prompt_format=fmt, n_samples=0,
                                            max_new_tokens=self.cfg.max_new_tokens, progress=False)["overall"]
            out.update(task_acc=tasks["decoders"]["decoder"]["accuracy"], frozen_task_acc=tasks["frozen"])
        decoder.train(was_training)
        return out


# -- the trial -------------------------------------------------------------------------------------------
def decoder_corpus(cfg: PpoConfig):
    """The corpus the decoder was distilled on (its distillation run's config.json: data, sequence
    length, split fraction and seed, encoding, text field), with --data overriding the data, and
    saying so. A decoder exported by an earlier PPO run is followed back to the run it started from."""
    from corpus.config import CorpusConfig
    from corpus.sources import absolute_spec
    from training.config import from_record, read_record

    saved, record = RunLayout.of_decoder(cfg.decoder).config, {}
    for _ in range(4):  # PPO run → ... → distillation run
        record = read_record(saved) if saved.is_file() else {}
        if "seq_len" in record or "decoder" not in record:
            break
        saved = RunLayout.of_decoder(Path(record["decoder"])).config
    if cfg.data and record.get("data") and absolute_spec(cfg.data) != record["data"]:
        print(f"ppo: --data {cfg.data!r} overrides the decoder's training data {record['data']!r} ({saved})")
    return from_record(CorpusConfig, record, data=cfg.data or record.get("data") or "")


def _token_cache(cfg: PpoConfig, frozen, corpus) -> str:
    if cfg.cache:
        return str(Path(cfg.cache).resolve())
    from corpus.cache import build_cache
    from corpus.config import CacheConfig

    cache_cfg = CacheConfig.covering(corpus, cfg.cache_tokens, str(cfg.layer), Path(cfg.out).parent / "cache",
                                     teacher=True, model=cfg)
    return str(build_cache(cache_cfg, frozen).root.resolve())


def _learner_stats(result: dict) -> dict:
    stats = result.get("learners", {}).get("default_policy", {})
    keys = ("policy_loss", "vf_loss", "entropy", "vf_explained_var", "total_loss", "anchor_kl", "attribution_share")
    return {f"ppo/{k}": float(stats[k]) for k in keys if k in stats}


def held_out_score(ev: dict, weights: dict | None = None) -> float:
    return sum(w * ev.get(k, 0.0) for k, w in (weights or SCORE_WEIGHTS).items())


class PpoTrial:
    """One PPO trial as short named steps, shared by `faithlens ppo` and the Tune trainable."""

    def __init__(self, cfg: PpoConfig, out: Path, score_weights: dict | None = None, corpus=None):
        from models.loading import load_frozen
        from sae.model import SparseAutoencoder

        self.cfg, self.out, self.score_weights = cfg, Path(out), score_weights
        self.out.mkdir(parents=True, exist_ok=True)
        wandb = wandb_settings(cfg.wandb, self.out.name)  # checked before the model loads
        frozen = load_frozen(cfg.model_config())
        sae = SparseAutoencoder.load(Path(cfg.sae))
        corpus = corpus or decoder_corpus(cfg)
        cache_root = _token_cache(cfg, frozen, corpus) if cfg.env == "token" else ""
        record = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
        write_json_atomic(self.out / "config.json", record)
        self.evaluate = Evaluator(cfg, frozen, sae, corpus)
        register_envs()
        self.algo = algo_config(cfg, env_config_for(cfg, cache_root)).build_algo()
        self.writer = MetricWriter(self.out / "tb", wandb, record)
        self.schedule = RewardSchedule(parse_phases(cfg.phases), cfg.steps)  # which phase the run's next step is in
        self.history: list[dict] = []
        self.before: dict | None = None
        self.alpha_scale, self.env_steps, self.iteration = 1.0, 0, 0
        self.last_eval: dict = {}
        self.t0 = time.perf_counter()

    # -- state -------------------------------------------------------------------------------
    def start(self, resume_from: Path | None = None) -> None:
        if resume_from is not None and (Path(resume_from) / "faithlens_state.json").is_file():
            self.algo.restore_from_path(str(resume_from))
            state = read_json(Path(resume_from) / "faithlens_state.json", f"delete {resume_from} to start the run over")
            self.before, self.alpha_scale = state["before"], state["alpha_scale"]
            self.env_steps, self.iteration, self.last_eval = state["env_steps"], state["iteration"], state["last_eval"]
            self.history = state["history"]
            steps = self.env_steps
            engines_call(self.algo, lambda e: (e.set_alpha_scale(state["alpha_scale"]), setattr(e, "steps", steps)))
            print(f"resumed from {resume_from} at {self.env_steps:,} env steps")
            return
        self.before = self.evaluate(_module(self.algo).decoder)
        self.last_eval = {**self.before, "score": held_out_score(self.before, self.score_weights)}

    def save(self, directory: Path) -> None:
        """An RLlib checkpoint plus our counters, written to a sibling and renamed into place."""
        _save(self.algo, Path(directory), {"before": self.before, "alpha_scale": self.alpha_scale, "env_steps": self.env_steps,
                                           "iteration": self.iteration, "last_eval": self.last_eval,
                                           "history": self.history})

    # -- one iteration --------------------------------------------------------------------------
    def step(self) -> dict:
        result = self.algo.train()
        self.iteration += 1
        stats = [s for s in engines_call(self.algo, lambda e: e.pop_stats()) if s["steps"]]
        sampled = sum(s["steps"] for s in stats)
        self.env_steps += sampled
        total = self.env_steps  # every engine's phase follows the run's step count, whatever the number of runners
        engines_call(self.algo, lambda e: setattr(e, "steps", total))
        row = {"iteration": self.iteration, "env_steps_from": self.env_steps - sampled, "env_steps": self.env_steps,
               **_learner_stats(result)}
        for key in ("reward", "r_faith", "r_mono", "r_task", "features_needed", "alpha", "beta", "gamma", "phase"):
            if stats:
                row[f"reward/{key}"] = sum(s[key] * s["steps"] for s in stats) / max(1, sampled)
        row["charts/env_steps_per_s"] = self.env_steps / (time.perf_counter() - self.t0)
        # the iteration's steps were rewarded in `phase`; if the next steps fall in another, this one closes it
        phase = int(round(row.get("reward/phase", 0)))
        closes_phase = self.schedule.phase_index(self.env_steps) != phase
        if self.iteration % self.cfg.eval_every == 0 or self.env_steps >= self.cfg.steps or closes_phase:
            self._evaluate(row)
        self.writer.log({k: v for k, v in row.items() if k not in ("iteration", "env_steps_from", "env_steps")}, self.env_steps)
        self.history.append(row)
        return row

    def _evaluate(self, row: dict) -> None:
        ev = self.evaluate(_module(self.algo).decoder)
        self.last_eval = {**ev, "score": held_out_score(ev, self.score_weights)}
        row.update({f"eval/{k}": v for k, v in self.last_eval.items()})
        if self.cfg.dynamic and ev["kl"] < self.cfg.kl_target and self.alpha_scale == 1.0:
            self.alpha_scale = 0.5  # the design's dynamic adjustment: faithful enough, shift weight to the rest
            engines_call(self.algo, lambda e: e.set_alpha_scale(0.5))

    @property
    def done(self) -> bool:
        return self.env_steps >= self.cfg.steps

    # -- the end ----------------------------------------------------------------------------------
    def finish(self) -> dict:
        after = self.evaluate(_module(self.algo).decoder)
        _module(self.algo).export(self.out / "decoder", extra={"ppo": {
            "steps": self.env_steps, "random_reward": self.cfg.random_reward, "env": self.cfg.env, "phases": self.cfg.phases}})
        rewards = [r for r in self.history if "reward/reward" in r]
        mean = {k: sum(r[f"reward/{k}"] for r in rewards) / max(1, len(rewards)) for k in ("reward", "r_faith", "r_mono", "r_task")}
        metrics = {"before": self.before, "after": after, "mean_rewards": mean, "env_steps": self.env_steps,
                   "iterations": self.iteration, "random_reward": self.cfg.random_reward, "env": self.cfg.env,
                   "decoder": str(self.out / "decoder"), "kl": after["kl"], "top1": after["top1"],
                   "task_acc": after.get("task_acc"), "score": held_out_score(after, self.score_weights)}
        metrics["per_phase"] = per_phase(self.history, after)
        write_json_atomic(self.out / "metrics.json", metrics)
        write_json_atomic(self.out / "history.json", self.history)
        return metrics

    def close(self) -> None:
        self.writer.close()
        self.algo.stop()


def per_phase(history: list[dict], after: dict) -> list[dict]:
    """For each reward phase: its weights, env steps, mean reward components and the held-out figures at its end."""
    phases: dict[int, dict] = {}
    for row in history:
        if "reward/phase" not in row:
            continue
        p = int(round(row["reward/phase"]))
        entry = phases.setdefault(p, {"phase": p, "rows": [], "end": None})
        entry["rows"].append(row)
        if "eval/kl" in row:  # the phase's last evaluation (the trial evaluates at every phase's last iteration)
            entry["end"] = {k.removeprefix("eval/"): v for k, v in row.items() if k.startswith("eval/")}
    out = []
    for p in sorted(phases):
        rows = phases[p]["rows"]
        mean = {k: sum(r[f"reward/{k}"] for r in rows) / len(rows) for k in ("reward", "r_faith", "r_mono", "r_task")}
        weights = {k: rows[-1][f"reward/{k}"] for k in ("alpha", "beta", "gamma")}
        end = phases[p]["end"] if p != max(phases) else after
        out.append({"phase": p, "env_steps": [rows[0]["env_steps_from"], rows[-1]["env_steps"]],
                    "weights": weights, "mean_rewards": mean, "end": end})
    return out


def run_ppo(cfg: PpoConfig) -> dict:
    import ray

    from models.progress import progress_bar

    cfg = resolve(cfg)
    corpus = check_inputs(cfg)
    out = Path(cfg.out).resolve()
    from training.logs import init_ray, keep_worker_logs, route_ray_loggers

    started_here = not ray.is_initialized()
    if started_here:
        init_ray(address="local", num_cpus=max(2, cfg.env_runners + 1), include_dashboard=False)
    route_ray_loggers()
    try:
        trial = PpoTrial(cfg, out, corpus=corpus)
        try:
            trial.start(resume_from=RunLayout(out).rllib_checkpoint)
            label = f"ppo {cfg.env}{' (random reward)' if cfg.random_reward else ''}"
            with progress_bar(total=cfg.steps, initial=min(trial.env_steps, cfg.steps), desc=label, unit="step") as progress:
                while not trial.done:
                    row = trial.step()
                    progress.update(min(row["env_steps"], cfg.steps) - progress.n)
                    if "eval/kl" in row:
                        trial.save(RunLayout(out).rllib_checkpoint)
                        write_json_atomic(out / "history.json", trial.history)
            metrics = trial.finish()
        finally:
            trial.close()
    finally:
        if started_here:
            keep_worker_logs("ppo")
            ray.shutdown()
    _print_summary(metrics, out)
    return metrics


def _module(algo):
    """The env runner's copy of the policy (weights synced after every training step)."""
    return algo.get_module()


def _save(algo, ckpt: Path, state: dict) -> None:
    with atomic_path(ckpt) as tmp:
        algo.save_to_path(str(tmp))
        (tmp / "faithlens_state.json").write_text(json.dumps(state))


def _print_summary(metrics: dict, out: Path) -> None:
    b, a = metrics["before"], metrics["after"]
    print(f"held-out KL {b['kl']:.3f} → {a['kl']:.3f} nats/token, top-1 {b['top1']:.1%} → {a['top1']:.1%}"
          + (f", task accuracy {b['task_acc']:.1%} → {a['task_acc']:.1%}" if "task_acc" in a else ""))
    for ph in metrics.get("per_phase", []):
        end = ph["end"] or {}
        w = ph["weights"]
        print(f"  phase {ph['phase']} (α {w['alpha']:.2f}, β {w['beta']:.2f}, γ {w['gamma']:.2f}; env steps "
              f"{ph['env_steps'][0]:,}–{ph['env_steps'][1]:,}): at its end KL {end.get('kl', float('nan')):.3f}, top-1 "
              f"{end.get('top1', float('nan')):.1%}, task {end.get('task_acc', float('nan')):.1%}; "
              f"mean reward {ph['mean_rewards']['reward']:.3f}")
    m = metrics["mean_rewards"]
    print(f"mean rewards: total {m['reward']:.3f}, r_faith {m['r_faith']:.3f}, r_mono {m['r_mono']:.3f}, r_task {m['r_task']:.3f}"
          + (" (the reward was replaced by noise)" if metrics["random_reward"] else ""))
    print(f"wrote {out / 'metrics.json'}, the policy as a decoder in {out / 'decoder'}; TensorBoard: tensorboard --logdir {out / 'tb'}")


def run_ppo_export(cfg: PpoExportConfig) -> Path:
    from models.decoder import read_decoder_meta

    run = Path(cfg.run)
    if cfg.which == "final":
        src = RunLayout(run).decoder
        read_decoder_meta(src)  # refuses a folder without a decoder
        with atomic_path(Path(cfg.dest)) as tmp:
            shutil.copytree(src, tmp)
    else:
        ckpt = RunLayout(run).rllib_policy
        if not ckpt.is_dir():
            raise ConfigError(f"{run}: no RLlib checkpoint (expected {ckpt})")
        from ray.rllib.core.rl_module.rl_module import RLModule

        module = RLModule.from_checkpoint(str(ckpt))
        module.export(Path(cfg.dest), extra={"ppo": {"from_checkpoint": str(ckpt)}})
    print(f"decoder written to {cfg.dest} (faithlens decoder eval {cfg.dest} ... reads it)")
    return Path(cfg.dest)
