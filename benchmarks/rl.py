"""Environment steps/s (token and generation, natively batched) and PPO iteration time + peak RSS (anchor on).

Runs in a spawned process so the peak RSS is the RL stage's own. Without --decoder, the policy is a
readout decoder initialised from a random TopK SAE of the given width (the costs do not depend on
its training); the token environment reads a small builtin:tasks teacher cache.
"""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path

from benchmarks._spawn import in_child


def _child(model: str, dtype: str, layer: int, latents: int, k: int, decoder: str, iterations: int, train_batch: int,
           num_envs: int, anchor_kl: str, root: str) -> dict:
    import numpy as np
    import ray

    from distill.config import TrainLoopConfig
    from distill.job import teacher_cache
    from distill.student import build_student_decoder
    from models.loading import load_frozen
    from rl_env.config import EnvConfig
    from rl_env.generation_env import make_generation_env, make_generation_vec_env
    from rl_env.ppo import PpoTrial, resolve
    from rl_env.ppo_config import PpoConfig
    from rl_env.token_env import make_token_env, make_token_vec_env
    from sae.config import SaeConfig
    from sae.model import SparseAutoencoder

    root_p = Path(root)
    frozen = load_frozen(TrainLoopConfig(model=model, dtype=dtype))
    cache = teacher_cache(TrainLoopConfig(model=model, dtype=dtype, data="builtin:tasks", tokens=16_384,
                                          cache_dir=root_p / "cache"), frozen, layer)
    if not decoder:
        sae = SparseAutoencoder(SaeConfig(d_in=frozen.d_model, num_latents=latents, arch="topk", k=k))
        sae.init_weights()
        sae.save(root_p / "sae", extra={"layer": layer})
        dec = build_student_decoder("readout", SparseAutoencoder.load(root_p / "sae"), frozen, layer)
        dec.save(root_p / "decoder" / "decoder", extra={"layer": layer, "model": model, "sae": str(root_p / "sae"),
                                                        "data": "builtin:tasks"})
        decoder = str(root_p / "decoder")
    cfg = resolve(PpoConfig(decoder=Path(decoder), dtype=dtype, cache=str(cache.root), steps=iterations * train_batch,
                            train_batch=train_batch, minibatch_size=min(256, train_batch), num_envs=num_envs, eval_every=10**6,
                            eval_tokens=256, anchor_kl=anchor_kl, task_examples=2, out=root_p / "ppo"))
    results = {}
    env_cfg = EnvConfig.from_dict({**cfg.__dict__, "cache": str(cache.root)})
    rng = np.random.default_rng(0)
    for kind, make_vec, make_one in (("token", make_token_vec_env, make_token_env),
                                     ("generation", make_generation_vec_env, make_generation_env)):
        kind_cfg = EnvConfig.from_dict({**env_cfg.__dict__, "env": kind})
        env = make_vec(kind_cfg, num_envs, frozen=frozen)
        env.reset(seed=0)
        steps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 5:
            env.step(rng.integers(0, frozen.vocab_size, num_envs))
            steps += num_envs
        results[f"{kind}_env_steps_per_s_batched"] = steps / (time.perf_counter() - t0)
        single = make_one(kind_cfg, frozen=frozen)  # one sub-environment per call: the unbatched baseline
        single.reset(seed=0)
        steps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 5:
            _, _, terminated, truncated, _ = single.step(int(rng.integers(0, frozen.vocab_size)))
            steps += 1
            if terminated or truncated:
                single.reset()
        results[f"{kind}_env_steps_per_s_one_at_a_time"] = steps / (time.perf_counter() - t0)
        results[f"{kind}_batching_speedup"] = results[f"{kind}_env_steps_per_s_batched"] / results[f"{kind}_env_steps_per_s_one_at_a_time"]
    results.update(_incremental_sampling(cfg, env_cfg, frozen, num_envs))
    ray.init(address="local", num_cpus=2, log_to_driver=False, configure_logging=False, include_dashboard=False)
    trial = PpoTrial(cfg, root_p / "ppo")
    trial.before = {}
    trial.last_eval = {"kl": 0.0, "top1": 0.0, "score": 0.0}
    trial.step()  # warm-up iteration (allocations)
    t0 = time.perf_counter()
    for _ in range(iterations):
        trial.step()
    results["ppo_iteration_s"] = (time.perf_counter() - t0) / iterations
    results["ppo_env_steps_per_s"] = iterations * train_batch / (time.perf_counter() - t0)
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    trial.close()
    ray.shutdown()
    results.update(train_batch=train_batch, num_envs=num_envs, anchor_kl=anchor_kl, window=cfg.window,
                   observation_rows=cfg.context + 1)
    return results


def _incremental_sampling(cfg, env_cfg, frozen, num_envs: int) -> dict:
    """A context decoder's sampling path (key/value cache, one new position per step) against the full prefix the
    learner recomputes: the mean and largest |Δ log π(a)| of the sampled actions over one episode of every
    sub-environment (bf16 rounds differently for different matmul shapes), and both paths' speeds."""
    import numpy as np
    import torch

    from models.policy import DecoderPolicy
    from rl_env.token_env import make_token_vec_env

    env = make_token_vec_env(env_cfg, num_envs, frozen=frozen)
    module = DecoderPolicy(observation_space=env.single_observation_space, action_space=env.single_action_space,
                           model_config={"decoder": str(cfg.decoder), "model": cfg.model, "dtype": cfg.dtype})
    if not module.decoder.needs_context:
        return {}
    obs, _ = env.reset(seed=0)
    gaps, t_step, t_full = [], 0.0, 0.0
    with torch.no_grad():
        for _ in range(cfg.window):
            batch = {k: torch.as_tensor(v) for k, v in obs.items()}
            t0 = time.perf_counter()
            step = module.sample_logits(batch).log_softmax(-1)
            t1 = time.perf_counter()
            full = module.logits(batch).log_softmax(-1)
            t_step, t_full = t_step + t1 - t0, t_full + time.perf_counter() - t1
            actions = torch.distributions.Categorical(logits=step).sample()
            rows = torch.arange(len(actions))
            gaps.append((step[rows, actions] - full[rows, actions]).abs())
            obs, *_ = env.step(np.asarray(actions))
    gaps = torch.cat(gaps)
    return {"sampling_logp_mean_abs_gap": float(gaps.mean()), "sampling_logp_max_abs_gap": float(gaps.max()),
            "sampling_steps_per_s_kv_cache": cfg.window * num_envs / t_step,
            "sampling_steps_per_s_full_prefix": cfg.window * num_envs / t_full}


def bench_rl(model: str, layer: int, latents: int, k: int, dtype: str, decoder: str = "", iterations: int = 2,
             train_batch: int = 1024, num_envs: int = 8, anchor_kl: str = "1") -> dict:
    """PPO iterations with the forward-KL anchor on (λ = `anchor_kl`), as the anchored runs train."""
    with tempfile.TemporaryDirectory() as tmp:
        return in_child(_child, model, dtype, layer, latents, k, decoder, iterations, train_batch, num_envs, anchor_kl, tmp)
