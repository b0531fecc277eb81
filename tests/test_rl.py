"""Environments, reward components, schedules, the RLModule and PPO trials on a tiny model."""

import json
import math

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from rl_env.config import EnvConfig
from rl_env.reward import RewardSchedule, mono_share, parse_phases, token_logp
from tests.conftest import REPO, save_random_sae


@pytest.fixture(scope="module")
def rl_setup(sharp_model_dir, tmp_path_factory):
    """Sharp tiny model, a random SAE at layer 2, a teacher cache, and an (undistilled) readout decoder."""
    from distill.config import TrainLoopConfig
    from distill.job import teacher_cache
    from distill.student import build_student_decoder
    from models import ModelConfig, load_frozen
    from sae.model import SparseAutoencoder

    root = tmp_path_factory.mktemp("rl")
    frozen = load_frozen(ModelConfig(model=str(sharp_model_dir), dtype="fp32"))
    sae_dir = save_random_sae(frozen, root / "sae")
    cache = teacher_cache(TrainLoopConfig(model=str(sharp_model_dir), dtype="fp32", data="builtin:tasks", tokens=6000,
                                          seq_len=64, cache_dir=root / "cache"), frozen, 2)
    decoder = build_student_decoder("readout", SparseAutoencoder.load(sae_dir), frozen, 2)
    decoder.save(root / "dec" / "decoder", extra={"layer": 2, "model": str(sharp_model_dir), "sae": str(sae_dir),
                                                  "data": "builtin:tasks"})
    return {"frozen": frozen, "sae": str(sae_dir), "cache": str(cache.root), "decoder": root / "dec", "root": root,
            "model": str(sharp_model_dir)}


def _env_cfg(s, **kw):
    return EnvConfig(**{"model": s["model"], "dtype": "fp32", "layer": 2, "sae": s["sae"], "cache": s["cache"],
                        "window": 4, "context": 0, "max_new_tokens": 4, **kw})


@pytest.mark.parametrize("kind,context,rows", [("token", 0, 1), ("token", 4, 5), ("generation", 0, 1),
                                               ("generation", 40, 41)])
def test_check_env_passes(kind, context, rows, rl_setup):
    from rl_env.generation_env import make_generation_env
    from rl_env.token_env import make_token_env

    make = make_token_env if kind == "token" else make_generation_env
    env = make(_env_cfg(rl_setup, env=kind, context=context), frozen=rl_setup["frozen"])
    check_env(env, skip_render_check=True)
    obs, info = env.reset(seed=0)
    assert obs["indices"].shape == (rows, 8) and obs["values"].dtype == np.float32
    assert info["teacher_ids"].shape == info["teacher_logp"].shape and np.isfinite(info["teacher_rest"])
    _, reward, _, _, info = env.step(5)
    assert {"r_faith", "r_mono", "r_task", "alpha", "beta", "gamma", "entropy_alpha", "anchor_lambda"} <= set(info)
    expected = info["alpha"] * info["r_faith"] + info["beta"] * info["r_mono"] + info["gamma"] * info["r_task"]
    assert reward == pytest.approx(expected, rel=1e-5)


def test_context_observations_are_the_sequence_from_bos_and_the_teacher_is_at_its_position(rl_setup):
    """A context decoder's episode is positions 1..window: each observation holds rows 0..t of the cached
    sequence's features (the rest zero), and its info the cached teacher targets at t."""
    from corpus.cache import ActivationCache
    from rl_env.token_env import TokenEngine

    engine = TokenEngine(_env_cfg(rl_setup, context=4), 2, frozen=rl_setup["frozen"])
    obs = engine.reset_all(seed=3)
    cache = ActivationCache.open(engine.cache.root, verify=False)
    for t in range(1, 5):
        assert (obs["length"] == t + 1).all()
        info = engine.obs_info()
        for r in range(2):
            shard, row = int(obs["sequence"][r]) >> 32, int(obs["sequence"][r]) & 0xFFFFFFFF
            data = cache.shard(shard)
            idx, val = engine.encode(data["resid.2"][row, : t + 1])
            np.testing.assert_array_equal(obs["indices"][r, : t + 1], idx)
            np.testing.assert_allclose(obs["values"][r, : t + 1], val, rtol=1e-5)  # matmul blocking varies with batch shape
            assert not obs["values"][r, t + 1 :].any()  # no future features
            np.testing.assert_array_equal(info["teacher_ids"][r], data["teacher.topk_ids"][row, t].numpy())
        obs, *_ = engine.step(np.array([1, 2]))


def test_vector_env_autoresets_on_the_step_after_an_episode_ends(rl_setup):
    from rl_env.token_env import make_token_vec_env

    env = make_token_vec_env(_env_cfg(rl_setup), num_envs=3, frozen=rl_setup["frozen"])
    obs, _ = env.reset(seed=1)
    assert obs["indices"].shape == (3, 1, 8)
    for _ in range(3):
        _, rewards, terminated, _, _ = env.step(np.array([1, 2, 3]))
        assert not terminated.any() and (rewards != 0).all()
    _, _, terminated, _, _ = env.step(np.array([1, 2, 3]))  # window of 4 positions
    assert terminated.all()
    _, rewards, terminated, _, _ = env.step(np.array([1, 2, 3]))  # the reset step: action ignored
    assert (rewards == 0).all() and not terminated.any()
    stats = env.engine.pop_stats()
    assert stats["steps"] == 12 and stats["phase"] == 0


def test_stats_and_per_phase_report_the_phase_the_steps_were_rewarded_in(rl_setup):
    """Steps rewarded in phase 0 are reported as phase 0 even when the window ends on the boundary, a window that
    straddles it gets the step-weighted mean, and each phase's end is the evaluation of its own last iteration."""
    from rl_env.ppo import per_phase
    from rl_env.token_env import make_token_vec_env

    env = make_token_vec_env(_env_cfg(rl_setup, phases="1:1/0/0,1:0/1/0", total_steps=12), num_envs=3,
                             frozen=rl_setup["frozen"])
    env.reset(seed=1)
    for _ in range(2):
        env.step(np.array([1, 2, 3]))
    stats = env.engine.pop_stats()  # steps 0-5: all in phase 0, the next step starts phase 1
    assert stats["steps"] == 6 and stats["phase"] == 0 and stats["alpha"] == 1 and stats["beta"] == 0
    env.engine.steps = 3
    for _ in range(2):
        env.step(np.array([1, 2, 3]))
    stats = env.engine.pop_stats()  # steps 3-8: half in each phase
    assert stats["phase"] == pytest.approx(0.5) and stats["alpha"] == pytest.approx(0.5)

    def row(it, phase, kl):
        return {"iteration": it, "env_steps_from": 4 * (it - 1), "env_steps": 4 * it, "eval/kl": kl, "eval/top1": 0.0,
                **{f"reward/{k}": 0.0 for k in ("reward", "r_faith", "r_mono", "r_task", "alpha", "beta", "gamma")},
                "reward/phase": phase}
    phases = per_phase([row(1, 0, 1.0), row(2, 0, 2.0), row(3, 1, 3.0)], after={"kl": 4.0})
    assert [(p["phase"], p["env_steps"], p["end"]["kl"]) for p in phases] == [(0, [0, 8], 2.0), (1, [8, 12], 4.0)]


def test_generation_env_batched_cache_matches_a_full_forward(rl_setup):
    from rl_env.generation_env import GenerationEngine

    frozen = rl_setup["frozen"]
    engine = GenerationEngine(_env_cfg(rl_setup, env="generation", max_new_tokens=6), 3, frozen=frozen)
    engine.reset_all(seed=0)
    prompts = [[frozen.bos_token_id, *frozen.tokenizer(e.prompt_text(), add_special_tokens=False)["input_ids"]]
               for e in engine.examples]
    actions = np.array([7, 8, 9])
    engine.step(actions)
    engine.step(actions + 1)
    for r, prompt in enumerate(prompts):
        full = torch.tensor([prompt + [int(actions[r]), int(actions[r]) + 1]])
        logits, _ = frozen.forward(full)
        torch.testing.assert_close(engine.logp[r], logits[0, -1].float().log_softmax(-1), atol=1e-4, rtol=1e-4)


def test_reward_components_on_hand_computed_cases():
    ids = torch.tensor([[4, 2, 9]])
    logp = torch.log(torch.tensor([[0.5, 0.2, 0.1]]))
    rest = torch.log(torch.tensor([0.2]))
    assert token_logp(torch.tensor([2]), ids, logp, rest, vocab=13).item() == pytest.approx(math.log(0.2))
    # outside the top 3: the rest mass 0.2 shared by the other 10 tokens
    assert token_logp(torch.tensor([5]), ids, logp, rest, vocab=13).item() == pytest.approx(math.log(0.02))
    share, needed = mono_share(torch.tensor([[3.0, -1.0, 1.0, 0.0, 1.0]]), top_m=1)
    assert share.item() == pytest.approx(3 / 5) and needed.item() == 1  # 3 of 5 positive units; 3 ≥ half
    share, _ = mono_share(torch.tensor([[-1.0, 0.0]]), top_m=1)
    assert share.item() == 0.0


def test_default_schedule_is_the_designs_three_phases():
    phases = parse_phases("2:0.5/0.3/0.2,6:0.4/0.3/0.3,2:0.3/0.2/0.5")
    schedule = RewardSchedule(phases, total_steps=1000)
    assert schedule.weights(0) == (0.5, 0.3, 0.2) and schedule.weights(199) == (0.5, 0.3, 0.2)
    assert schedule.weights(200) == (0.4, 0.3, 0.3) and schedule.weights(799) == (0.4, 0.3, 0.3)
    assert schedule.weights(800) == (0.3, 0.2, 0.5)
    schedule.alpha_scale, schedule.beta_scale = 0.5, 2.0
    assert schedule.weights(0) == (0.25, 0.6, 0.2)
    from models.errors import ConfigError

    with pytest.raises(ConfigError, match="RATIO:ALPHA/BETA/GAMMA"):
        parse_phases("2:0.5/0.3")


def _ppo(s, out, *extra):
    return _ppo_decoder(s, s["decoder"], out, *extra)


def _ppo_decoder(s, decoder, out, *extra):
    from faithlens_cli import main

    return main(["ppo", "--decoder", str(decoder), "--env", "token", "--out", str(out), "--dtype", "fp32",
                 "--cache", s["cache"], "--train-batch", "256", "--minibatch-size", "64", "--num-envs", "8",
                 "--eval-every", "2", "--eval-tokens", "512", "--task-examples", "4", "--window", "8", "--lr", "1e-3",
                 "--num-epochs", "4", *extra])


def test_ppo_learns_from_the_reward_and_not_from_noise(rl_setup, capsys):
    root = rl_setup["root"]
    assert _ppo(rl_setup, root / "ppo", "--steps", "1536", "--phases", "1:1/0/0") == 0
    assert _ppo(rl_setup, root / "ppo_random", "--steps", "1536", "--phases", "1:1/0/0", "--random-reward") == 0
    real = json.loads((root / "ppo" / "metrics.json").read_text())
    noise = json.loads((root / "ppo_random" / "metrics.json").read_text())
    for m in (real, noise):
        assert {"kl", "top1", "task_acc", "before", "after", "mean_rewards"} <= set(m)
        assert set(m["mean_rewards"]) == {"reward", "r_faith", "r_mono", "r_task"}
    # faithful reward: agreement with the frozen model rises; noise: it does not, and KL does not improve
    assert real["after"]["top1"] > real["before"]["top1"] + 0.1
    assert noise["after"]["top1"] < real["after"]["top1"] - 0.1
    assert noise["after"]["kl"] >= noise["before"]["kl"] - 0.05
    assert real["mean_rewards"]["r_faith"] > noise["mean_rewards"]["r_faith"]
    assert list((root / "ppo" / "tb").glob("events.out.tfevents.*"))
    assert "held-out KL" in capsys.readouterr().out


def test_entropy_bonus_in_reward_units_makes_ppo_lower_the_held_out_kl(rl_setup):
    """r_faith alone is mode-seeking (the policy collapses onto the frozen argmax); with −α·log π(a) added
    its expectation is −α·KL(π ‖ p_frozen), minimised at π = p_frozen, so the held-out KL falls."""
    root = rl_setup["root"]
    assert _ppo(rl_setup, root / "ppo_entropy", "--steps", "1536", "--phases", "1:1/0/0", "--entropy-reward", "1.0") == 0
    m = json.loads((root / "ppo_entropy" / "metrics.json").read_text())
    assert m["after"]["kl"] < m["before"]["kl"] - 0.3


def test_ppo_resumes_and_exports_a_decoder_that_decoder_eval_reads(rl_setup, capsys):
    from faithlens_cli import main

    root = rl_setup["root"]
    out = root / "ppo_resume"
    assert _ppo(rl_setup, out, "--steps", "512") == 0
    assert _ppo(rl_setup, out, "--steps", "1024") == 0
    assert "resumed from" in capsys.readouterr().out
    history = json.loads((out / "history.json").read_text())
    assert [r["iteration"] for r in history] == [1, 2, 3, 4]
    metrics = json.loads((out / "metrics.json").read_text())
    phases = metrics["per_phase"]  # the default 2:6:2 schedule over 1,024 steps: boundaries at 205 and 819
    assert [p["phase"] for p in phases] == sorted({p["phase"] for p in phases}) and len(phases) >= 2
    assert all("kl" in p["end"] and "top1" in p["end"] for p in phases)
    assert main(["ppo", "export", str(out), str(root / "exported"), "--which", "checkpoint"]) == 0
    capsys.readouterr()
    code = main(["decoder", "eval", str(root / "exported"), "--model", rl_setup["model"], "--dtype", "fp32",
                 "--data", "builtin:tasks", "--tokens", "200", "--seq-len", "32", "--task-examples", "3", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] > 0 and "spliced_sae" in result["baselines"]


def test_ppo_config_is_resolved_from_the_decoder(rl_setup):
    # --config files are read by the CLI: tests/test_cli.py
    from rl_env.ppo import resolve
    from rl_env.ppo_config import PpoConfig

    cfg = resolve(PpoConfig(decoder=rl_setup["decoder"], window=5))
    assert cfg.window == 5 and cfg.layer == 2 and cfg.gamma == 0.0 and cfg.sae == rl_setup["sae"]


def test_sweep_runs_trials_and_compare_ranks_them_by_held_out_score(rl_setup, tmp_path, capsys, monkeypatch):
    from faithlens_cli import main

    monkeypatch.setenv("FAITHLENS_SMOKE_DECODER", str(rl_setup["decoder"]))
    spec = (tmp_path / "s.yaml")
    smoke = (REPO / "tune_configs" / "smoke.yaml").read_text()
    spec.write_text(smoke.replace("cache_tokens: 4000", f"cache: {rl_setup['cache']}\n  dtype: fp32")
                    .replace("steps: 512", "steps: 256"))
    assert main(["sweep", str(spec), "--out", str(tmp_path / "exp")]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "exp"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert len(summary["trials"]) == 2
    scores = [t["score"] for t in summary["trials"]]
    assert scores == sorted(scores, reverse=True)
    for t in summary["trials"]:  # the score is the fixed-weight held-out one, not the return
        assert t["score"] == pytest.approx(-t["kl"] + t["top1"] + t["task_acc"])
    events = sorted((tmp_path / "exp").glob("*/ppo/tb/events.out.tfevents.*"))
    assert len(events) == 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for path in events:  # TensorBoard's own reader parses them
        acc = EventAccumulator(str(path))
        acc.Reload()
        tags = acc.Tags()["scalars"]
        assert {"reward/r_faith", "reward/r_mono", "eval/kl", "ppo/policy_loss"} <= set(tags)
        assert len(acc.Scalars("reward/r_faith")) >= 1


def test_sweep_file_errors_name_the_problem(tmp_path):
    from models.errors import ConfigError
    from rl_env.sweep import load_sweep

    (tmp_path / "a.yaml").write_text("base: {decoder: x}\nalgorithm: bayes\n")
    with pytest.raises(ConfigError, match="algorithm must be one of"):
        load_sweep(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("base: {decoder: x}\nspace: {learning_rate: {choice: [1]}}\n")
    with pytest.raises(ConfigError, match="unknown option.*learning_rate"):
        load_sweep(tmp_path / "b.yaml")
    (tmp_path / "c.yaml").write_text("base: {decoder: x}\nalgorithm: pbt\n")
    with pytest.raises(ConfigError, match="pbt.mutations"):
        load_sweep(tmp_path / "c.yaml")
    for name in ("smoke", "reward_weights", "schedules_pbt", "anchor"):  # the shipped files parse
        load_sweep(REPO / "tune_configs" / f"{name}.yaml")


def test_sweep_set_replaces_base_options_as_their_types_and_names_a_bad_one(tmp_path):
    from models.errors import ConfigError
    from rl_env.sweep import load_sweep

    anchor = REPO / "tune_configs" / "anchor.yaml"
    spec = load_sweep(anchor, ("steps=8192", "eval-every=2", "lr=3e-5"))
    assert (spec["base"]["steps"], spec["base"]["eval_every"], spec["base"]["lr"]) == (8192, 2, 3e-5)
    assert spec["base"]["train_batch"] == load_sweep(anchor)["base"]["train_batch"]  # the rest as in the file
    with pytest.raises(ConfigError, match="--set: 'stepz' is not"):
        load_sweep(anchor, ("stepz=1",))
    with pytest.raises(ConfigError, match="--set: expected OPTION=VALUE"):
        load_sweep(anchor, ("steps",))
    with pytest.raises(ConfigError, match="steps"):
        load_sweep(anchor, ("steps=many",))


def test_policy_module_shapes_value_head_and_export_round_trip(rl_setup, tmp_path):
    import gymnasium as gym
    from ray.rllib.core.columns import Columns

    from models.decoder import load_decoder
    from models.head import FrozenHead
    from models.policy import DecoderPolicy

    frozen = rl_setup["frozen"]
    obs_space = gym.spaces.Dict({"indices": gym.spaces.Box(0, 63, (1, 8), np.int32),
                                 "values": gym.spaces.Box(0, np.inf, (1, 8), np.float32),
                                 "length": gym.spaces.Box(1, 1, (), np.int64),
                                 "sequence": gym.spaces.Box(0, 2**40, (), np.int64)})
    module = DecoderPolicy(observation_space=obs_space, action_space=gym.spaces.Discrete(frozen.vocab_size),
                           model_config={"decoder": str(rl_setup["decoder"] / "decoder"), "model": rl_setup["model"],
                                         "dtype": "fp32"})
    batch = {Columns.OBS: {"indices": torch.randint(0, 64, (5, 1, 8), dtype=torch.int32), "values": torch.rand(5, 1, 8),
                           "length": torch.ones(5, dtype=torch.long), "sequence": torch.arange(5)}}
    explore = module.forward_exploration(batch)
    assert set(explore) == {Columns.ACTIONS, Columns.ACTION_LOGP}  # no 49k-wide logits per step
    assert explore[Columns.ACTIONS].shape == (5,) and (explore[Columns.ACTION_LOGP] <= 0).all()
    train = module.forward_train(batch)
    assert train[Columns.ACTION_DIST_INPUTS].shape == (5, frozen.vocab_size)
    values = module.compute_values(batch)
    assert values.shape == (5,)
    torch.testing.assert_close(values, module.compute_values(batch, embeddings=train[Columns.EMBEDDINGS]))
    with torch.no_grad():  # PPO changed the weights; the export must carry them
        module.decoder.W_FD.add_(0.5)
    module.export(tmp_path / "exported")
    reloaded = load_decoder(tmp_path / "exported", FrozenHead.from_frozen(frozen))
    idx, val = batch[Columns.OBS]["indices"][:, -1], batch[Columns.OBS]["values"][:, -1]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(idx, val), module.logits(batch[Columns.OBS]))


@pytest.fixture(scope="module")
def context_decoder(rl_setup):
    """A context decoder (blocks copied from the tiny model's upper layers) with its folder."""
    from distill.student import build_student_decoder
    from sae.model import SparseAutoencoder

    decoder = build_student_decoder("context", SparseAutoencoder.load(rl_setup["sae"]), rl_setup["frozen"], 2, n_layers=1)
    folder = rl_setup["root"] / "dec_ctx"
    decoder.save(folder / "decoder", extra={"layer": 2, "model": rl_setup["model"], "sae": rl_setup["sae"],
                                            "data": "builtin:tasks"})
    return folder


def _policy(rl_setup, folder, env):
    from models.policy import DecoderPolicy

    return DecoderPolicy(observation_space=env.single_observation_space, action_space=env.single_action_space,
                         model_config={"decoder": str(folder / "decoder"), "model": rl_setup["model"], "dtype": "fp32"})


def test_token_env_logits_of_a_context_decoder_equal_decoder_evals(rl_setup, context_decoder, monkeypatch):
    """What PPO optimises is what `decoder eval` measures: the policy's logits at the env's position t equal the
    decoder's logits at t of the whole cached sequence from BOS (as eval runs it); the learner's one-forward-per-
    sequence path gives the same logits."""
    from ray.rllib.core.columns import Columns

    from corpus.cache import ActivationCache
    from distill.student import sae_features
    from rl_env.token_env import make_token_vec_env

    monkeypatch.setattr("models.decoder_context.fast_bf16", lambda device: False)  # bf16 rounds by sequence length
    env = make_token_vec_env(_env_cfg(rl_setup, window=6, context=6), num_envs=3, frozen=rl_setup["frozen"])
    module = _policy(rl_setup, context_decoder, env)
    obs, _ = env.reset(seed=2)
    steps = []
    for _ in range(4):
        steps.append({k: torch.as_tensor(v) for k, v in obs.items()})
        obs, *_ = env.step(np.array([1, 2, 3]))
    cache = ActivationCache.open(env.engine.cache.root, verify=False)
    with torch.no_grad():
        for step in steps:
            logits = module.logits(step)
            for r in range(3):
                seq = int(step["sequence"][r])
                resid = cache.shard(seq >> 32)["resid.2"][seq & 0xFFFFFFFF][None].float()
                full = module.decoder(*sae_features(env.engine.sae, resid))[0]  # every position, from BOS
                t = int(step["length"][r]) - 1
                torch.testing.assert_close(logits[r], full[t], atol=2e-4, rtol=1e-4)
        batch = {k: torch.cat([s[k] for s in steps]) for k in steps[0]}
        torch.testing.assert_close(module.train_logits(batch), module.logits(batch), atol=2e-4, rtol=1e-4)
        explore = module.forward_exploration({Columns.OBS: steps[0]})
        assert explore[Columns.ACTIONS].shape == (3,)


def test_generation_episodes_end_terminated_at_the_tasks_end(rl_setup):
    """An answer cut at max_new_tokens is checked and paid like any other: the episode is over (terminated),
    not truncated, so GAE has nothing to bootstrap from."""
    from rl_env.generation_env import GenerationEngine

    engine = GenerationEngine(_env_cfg(rl_setup, env="generation", max_new_tokens=2, context=40), 2,
                              frozen=rl_setup["frozen"])
    engine.reset_all(seed=0)
    tok = engine.tok
    plain = [i for i in range(5, 200) if i != engine.frozen.eos_token_id and "\n" not in tok.decode([i])][:2]
    start = engine.length.copy()
    _, _, terminated, truncated, _ = engine.step(np.array(plain))
    assert not terminated.any() and not truncated.any()
    obs = engine._obs()
    assert (obs["length"] == start + 1).all()
    _, _, terminated, truncated, _ = engine.step(np.array(plain))
    assert terminated.all() and not truncated.any()


def test_entropy_reward_follows_alpha_per_step():
    from ray.rllib.core.columns import Columns

    from rl_env.learner import EntropyReward

    batch = {"p": {Columns.REWARDS: torch.tensor([1.0, 1.0, 1.0]), Columns.ACTION_LOGP: torch.tensor([-2.0, -2.0, -1.0]),
                   "entropy_alpha": torch.tensor([0.5, 0.25, 0.0])}}
    out = EntropyReward(2.0)(rl_module=None, batch=batch, episodes=[])
    torch.testing.assert_close(out["p"][Columns.REWARDS], torch.tensor([1.0 + 2.0, 1.0 + 1.0, 1.0]))


def test_anchor_weights_per_phase():
    from models.errors import ConfigError
    from rl_env.config import anchor_weights

    assert anchor_weights("0.5", 3) == [0.5, 0.5, 0.5] and anchor_weights("0,1,2", 3) == [0.0, 1.0, 2.0]
    schedule = RewardSchedule(parse_phases("1:1/0/0,1:0/1/0"), 100, tuple(anchor_weights("0,2", 2)))
    assert schedule.anchor_weight(10) == 0.0 and schedule.anchor_weight(60) == 2.0
    for bad in ("0,1", "-1", "x"):
        with pytest.raises(ConfigError, match="--anchor-kl"):
            anchor_weights(bad, 3)


def test_the_anchor_keeps_held_out_kl_where_monosemanticity_alone_raises_it(rl_setup):
    """β-only reward (r_mono) moves the policy away from the frozen model; λ·KL(p_frozen ‖ π) in the loss holds it."""
    root = rl_setup["root"]
    assert _ppo(rl_setup, root / "ppo_mono", "--steps", "1024", "--phases", "1:0/1/0", "--lr", "3e-3") == 0
    assert _ppo(rl_setup, root / "ppo_mono_anchor", "--steps", "1024", "--phases", "1:0/1/0", "--lr", "3e-3",
                "--anchor-kl", "1") == 0
    free = json.loads((root / "ppo_mono" / "metrics.json").read_text())
    held = json.loads((root / "ppo_mono_anchor" / "metrics.json").read_text())
    assert free["after"]["kl"] > free["before"]["kl"] + 0.05
    assert held["after"]["kl"] <= held["before"]["kl"] + 0.01
    for m in (free, held):
        assert {"kl", "top1", "next_token_acc", "top10_share", "task_acc"} <= set(m["before"]) & set(m["after"])
    history = json.loads((root / "ppo_mono_anchor" / "history.json").read_text())
    assert all("ppo/anchor_kl" in row for row in history)


def test_held_out_next_token_accuracy_scores_the_following_token(rl_setup):
    """Position t predicts the token at t + 1: an oracle of the next tokens scores 1, one that copies the current
    token scores what copying earns (not 1)."""
    from torch import nn

    from corpus.config import CorpusConfig
    from distill.heldout import HeldOut
    from sae.model import SparseAutoencoder

    frozen = rl_setup["frozen"]
    held = HeldOut(CorpusConfig(data="builtin:tasks", seq_len=32), frozen, 2, 256)

    class Replay(nn.Module):
        def __init__(self, targets):
            super().__init__()
            self.targets = targets

        def forward(self, indices, values, first=0):
            return torch.nn.functional.one_hot(next(self.targets)[:, first:], frozen.vocab_size).float() * 10

    sae = SparseAutoencoder.load(rl_setup["sae"])
    assert held.measure(Replay(iter(held.next_ids)), sae)["next_token_acc"] == 1.0
    copying = held.measure(Replay(iter(held.ids)), sae)["next_token_acc"]
    assert copying < 0.5


def test_random_reward_baseline_sends_no_entropy_reward_or_share_term_but_keeps_the_anchor(rl_setup):
    from rl_env.token_env import TokenEngine

    engine = TokenEngine(_env_cfg(rl_setup, anchor_kl="1", entropy_reward=1.0), 2, frozen=rl_setup["frozen"])
    engine.reset_all(seed=0)
    assert (engine.obs_info()["anchor_lambda"] == 1).all() and (engine.obs_info()["entropy_alpha"] > 0).all()
    noise = TokenEngine(_env_cfg(rl_setup, anchor_kl="1", entropy_reward=1.0, random_reward=True), 2,
                        frozen=rl_setup["frozen"])
    noise.reset_all(seed=0)
    info = noise.obs_info()
    assert not info["entropy_alpha"].any() and not info["share_beta"].any()
    assert (info["anchor_lambda"] == 1).all()


def test_policy_top_share_equals_the_evaluations_and_its_gradient_reaches_the_decoder(rl_setup, context_decoder,
                                                                                      monkeypatch):
    """The learner's differentiable share is the held-out top-10 share (interpret's one-backward-per-prediction
    reference) at the same positions, and it has a gradient in the decoder's block weights."""
    monkeypatch.setattr("models.decoder_context.fast_bf16", lambda device: False)  # bf16 rounds by sequence length
    from interpret.attribution import prediction_top_shares
    from models.decoder import load_decoder
    from models.head import FrozenHead
    from rl_env.reward import policy_top_share
    from rl_env.token_env import make_token_vec_env

    env = make_token_vec_env(_env_cfg(rl_setup, window=6, context=6), num_envs=3, frozen=rl_setup["frozen"])
    decoder = load_decoder(context_decoder / "decoder", FrozenHead.from_frozen(rl_setup["frozen"]))
    obs, _ = env.reset(seed=4)
    for _ in range(3):
        obs, *_ = env.step(np.array([1, 2, 3]))
    idx, val, length = (torch.as_tensor(obs[k]) for k in ("indices", "values", "length"))
    share = policy_top_share(decoder, idx, val, length, top=10)
    reference = [prediction_top_shares(decoder, idx[r : r + 1, : int(length[r])], val[r : r + 1, : int(length[r])],
                                       [(0, int(length[r]) - 1)])[0] for r in range(3)]
    torch.testing.assert_close(share.detach().double(), torch.tensor(reference, dtype=torch.float64), atol=1e-4, rtol=1e-4)
    assert ((0 < share) & (share < 1)).all()
    share.sum().backward()
    assert decoder.blocks[0].mlp.up_proj.weight.grad.abs().sum() > 0


def test_attribution_share_term_raises_the_policys_top10_share(rl_setup, context_decoder):
    """r_mono cannot move the decoder's own attribution; the learner's share term (β-weighted) does: the held-out
    top-10 share after PPO is higher with it than in the same run without it, and the term is logged."""
    root = rl_setup["root"]
    common = ("--steps", "512", "--phases", "1:0/1/0", "--lr", "1e-3", "--share-predictions", "24", "--train-batch", "128",
              "--minibatch-size", "64", "--window", "4", "--eval-every", "4")
    assert _ppo_decoder(rl_setup, context_decoder, root / "ppo_share_off", *common) == 0
    assert _ppo_decoder(rl_setup, context_decoder, root / "ppo_share_on", *common, "--attribution-share", "20") == 0
    off = json.loads((root / "ppo_share_off" / "metrics.json").read_text())
    on = json.loads((root / "ppo_share_on" / "metrics.json").read_text())
    assert off["before"]["top10_share"] == on["before"]["top10_share"]
    assert on["after"]["top10_share"] > off["after"]["top10_share"] + 0.02
    assert on["after"]["top10_share"] > on["before"]["top10_share"] + 0.02
    history = json.loads((root / "ppo_share_on" / "history.json").read_text())
    assert all(0 < row["ppo/attribution_share"] <= 1 for row in history)


def test_sampling_steps_a_context_decoder_from_its_kv_cache_and_equals_the_full_forward(rl_setup, context_decoder,
                                                                                       monkeypatch):
    """Consecutive steps of the same sequences run one position against the cached keys and values and give the
    full prefix's logits; a weight update (what the learner's sync does) or a reset refills the cache."""
    from rl_env.token_env import make_token_vec_env

    monkeypatch.setattr("models.decoder_context.fast_bf16", lambda device: False)
    env = make_token_vec_env(_env_cfg(rl_setup, window=6, context=6), num_envs=3, frozen=rl_setup["frozen"])
    module = _policy(rl_setup, context_decoder, env)
    obs, _ = env.reset(seed=5)
    caches = []
    for i in range(9):  # 6-step episodes: the autoreset falls inside
        step = {k: torch.as_tensor(v) for k, v in obs.items()}
        if i == 4:
            with torch.no_grad():
                module.decoder.blocks[0].mlp.up_proj.weight.mul_(1.5)
        torch.testing.assert_close(module.sample_logits(step), module.logits(step), atol=2e-4, rtol=1e-4)
        caches.append((id(module._kv["cache"]), step["sequence"], int(step["length"][0])))
        obs, *_ = env.step(np.array([1, 2, 3]))
    fills = [i for i in range(len(caches)) if i == 0 or caches[i][0] != caches[i - 1][0]]
    new_episode = [i for i in range(1, len(caches))
                   if caches[i][2] != caches[i - 1][2] + 1 or not (caches[i][1] == caches[i - 1][1]).all()]
    assert new_episode and fills == sorted({0, 4, *new_episode}) and len(fills) < len(caches)
