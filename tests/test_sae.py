import json
import math

import pytest
import torch

from corpus.cache import build_cache
from models.errors import ConfigError
from sae.config import SaeConfig, SaeTrainConfig
from sae.job import cache_config_for
from sae.metrics import SaeStats
from sae.model import SparseAutoencoder
from sae.train import SaeTrainer, l0_at, l1_at


def _train_cfg(tiny_model_dir, tmp_path, **kw):
    base = dict(model=str(tiny_model_dir), dtype="fp32", data="builtin:tasks", layer=2, latents=128, k=8,
                tokens=32 * 31 * 40, seq_len=32, batch_tokens=64, out=tmp_path / "run", cache_dir=tmp_path / "cache",
                dead_tokens=2_000, checkpoint_every=20, eval_tokens=0, lr=3e-3, encoder_dtype="fp32")
    return SaeTrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tiny_cache(tiny_model_dir, tiny_frozen, tmp_path_factory):
    cfg = _train_cfg(tiny_model_dir, tmp_path_factory.mktemp("sae"))
    return build_cache(cache_config_for(cfg), tiny_frozen, progress=False)


def test_metric_formulas_on_a_hand_computed_case():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 5.0]])
    acts = torch.tensor([[0.5, 0.0], [1.0, 2.0]])
    idx = torch.tensor([[0, 1], [0, 2]])
    stats = SaeStats(num_latents=4, d_in=2)
    stats.update(x[:1], x_hat[:1], acts[:1], idx[:1])
    stats.update(x[1:], x_hat[1:], acts[1:], idx[1:])
    m = stats.metrics()
    # Σ‖x − x̂‖² = 1 + 1 = 2; x̄ = (2, 3); Σ‖x − x̄‖² = (1 + 1) + (1 + 1) = 4
    assert m["fvu"] == pytest.approx(0.5) and m["explained_variance"] == pytest.approx(0.5)
    assert m["mse_normalized"] == pytest.approx(2 / 30)  # Σ‖x‖² = 1 + 4 + 9 + 16
    assert m["l0"] == pytest.approx(1.5)  # 1 and 2 non-zero latents
    assert m["dead_frac"] == pytest.approx(0.5)  # latents 1 and 3 never fire
    # firing counts (2, 0, 1, 0): p = (2/3, 1/3)
    assert m["usage_entropy_nats"] == pytest.approx(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)))


def test_dead_fraction_states_its_window_and_warns_when_it_is_too_short():
    from sae.metrics import DEAD_MIN_FIRES, metrics_table

    stats = SaeStats(num_latents=4, d_in=2)
    n = 1000
    idx = torch.zeros(n, 1, dtype=torch.long)
    idx[:3] = 1  # latent 1 fires 3 times in 1,000 tokens, latent 0 on the rest; 2 and 3 never
    stats.update(torch.randn(n, 2), torch.randn(n, 2), torch.ones(n, 1), idx)
    m = stats.metrics()
    assert m["dead_frac"] == 0.5 and m["dead_window_tokens"] == n and m["dead_density_bound"] == pytest.approx(3 / n)
    # the rarest live latent fired 3 < 10 times: its density ≈ 3/1000 needs 10 / 0.003 ≈ 3,334 tokens
    assert m["rarest_live_fires"] == 3 and m["dead_window_short"] is True
    assert m["dead_window_needed"] == math.ceil(DEAD_MIN_FIRES * n / 3)
    table = metrics_table({**m, "arch": "topk", "num_latents": 4, "k": 1, "layer": 2, "data": "d.txt", "split": "all"})
    assert "no activation in 1,000 tokens (density < 3.0e-03 at 95%)" in table
    assert "warning: the dead fraction over 1,000 tokens is an upper bound" in table and "3,334 tokens" in table
    idx[:3] = 0
    idx[:20] = 1  # now the rarest live latent fired 20 times: the window resolves it, no warning
    stats = SaeStats(num_latents=4, d_in=2)
    stats.update(torch.randn(n, 2), torch.randn(n, 2), torch.ones(n, 1), idx)
    m = stats.metrics()
    assert m["dead_window_short"] is False and "warning" not in metrics_table(
        {**m, "arch": "topk", "num_latents": 4, "k": 1, "layer": 2, "data": "d", "split": "eval"})


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu", "matryoshka"])
def test_save_load_round_trip_folds_the_input_scale(arch, tmp_path):
    torch.manual_seed(0)
    sae = SparseAutoencoder(SaeConfig(d_in=8, num_latents=32, arch=arch, k=4))
    sae.init_weights()
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.1)
        if arch == "jumprelu":
            sae.log_threshold.uniform_(-3, 0)
        else:
            sae.threshold.fill_(0.05)
    sae.eval()
    scale = 2.5
    x = torch.randn(16, 8)
    expected = sae(x * scale).sae_out_ND / scale  # trained on x·s; the saved SAE works on x
    sae.save(tmp_path / "sae", input_scale=scale, extra={"layer": 3, "unknown_future_key": 1})
    loaded = SparseAutoencoder.load(tmp_path / "sae")
    torch.testing.assert_close(loaded(x).sae_out_ND, expected, rtol=1e-5, atol=1e-5)
    assert loaded.meta["layer"] == 3
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["cfg.json", "sae.safetensors"]


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu", "matryoshka"])
def test_each_architecture_lowers_its_loss(arch, tiny_model_dir, tiny_cache, tmp_path):
    cfg = _train_cfg(tiny_model_dir, tmp_path, arch=arch, tokens=64 * 60, resample_every=0,
                     l1_schedule="1:0.0005", l0_schedule="1:0.0005", lr=1e-2)
    trainer = SaeTrainer(cfg, tiny_cache)
    trainer.start()
    losses = []
    batches = trainer.data.iterate()
    for _ in range(60):
        out = trainer._train_step(next(batches) * trainer.state.input_scale)
        losses.append(trainer.last_loss)
        trainer.state.step += 1
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:5]) / 5
    assert out.l0.item() > 0
    if arch == "topk":
        assert out.l0.item() <= cfg.k


def test_resampling_revives_dead_latents(tiny_model_dir, tiny_cache, tmp_path):
    cfg = _train_cfg(tiny_model_dir, tmp_path, arch="relu", dead_tokens=100)
    trainer = SaeTrainer(cfg, tiny_cache)
    trainer.start()
    x = next(trainer.data.iterate()) * trainer.state.input_scale
    with torch.no_grad():
        trainer.sae.b_enc[:40] = -1e3  # these latents can never fire
    dead_before = (trainer.sae.encode_dense(x)[:, :40] > 0).sum().item()
    trainer.state.since_fired[:40] = 10_000
    trainer._resample_dead(x)
    fired_after = (trainer.sae.encode_dense(x)[:, :40] > 0).any(0).sum().item()
    assert dead_before == 0 and fired_after >= 30 and trainer.state.resampled == 40


def test_auxk_sends_gradient_to_dead_latents(tiny_model_dir, tiny_cache, tmp_path):
    cfg = _train_cfg(tiny_model_dir, tmp_path, arch="topk")
    trainer = SaeTrainer(cfg, tiny_cache)
    trainer.start()
    x = next(trainer.data.iterate()) * trainer.state.input_scale
    dead = torch.zeros(cfg.latents, dtype=torch.bool)
    dead[64:] = True
    with torch.no_grad():
        trainer.sae.b_enc[64:] = -0.5  # never in the top k, but still ranked among the dead
    out = trainer.sae(x, dead, 16)
    (out.fvu + out.auxk_loss).backward()
    assert out.auxk_loss.item() > 0
    assert trainer.sae.W_enc.grad[64:].abs().sum(-1).gt(0).sum() > 0


def test_resumed_training_equals_uninterrupted(tiny_model_dir, tiny_cache, tmp_path):
    straight = SaeTrainer(_train_cfg(tiny_model_dir, tmp_path / "a", tokens=64 * 50), tiny_cache)
    straight.start()
    straight.run()
    first = SaeTrainer(_train_cfg(tiny_model_dir, tmp_path / "b", tokens=64 * 50, fail_at_step=30), tiny_cache)
    first.start()
    with pytest.raises(RuntimeError, match="injected failure at step 30"):
        first.run()
    resumed = SaeTrainer(_train_cfg(tiny_model_dir, tmp_path / "b", tokens=64 * 50), tiny_cache)
    resumed.start()  # finds checkpoints/latest (step 20)
    assert resumed.state.step == 20
    resumed.run()
    for (name, a), (_, b) in zip(straight.sae.state_dict().items(), resumed.sae.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(straight.state.since_fired, resumed.state.since_fired)


def test_l1_schedule_phases():
    cfg = SaeTrainConfig(l1_schedule="0.2:0.001,0.6:0.01,0.2:0.001", l1_warmup_frac=0.0, data="builtin:tasks")
    assert [l1_at(s, 100, cfg) for s in (0, 19, 20, 79, 80, 99)] == [0.001, 0.001, 0.01, 0.01, 0.001, 0.001]
    warm = SaeTrainConfig(l1_warmup_frac=0.1, data="builtin:tasks")
    assert l1_at(0, 100, warm) == pytest.approx(0.0001)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sparse_backward_equals_the_dense_reference(arch):
    torch.manual_seed(0)
    sae = SparseAutoencoder(SaeConfig(d_in=16, num_latents=64, arch=arch, k=4))
    sae.init_weights()
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    sae.train()
    x = torch.randn(32, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    out = sae(x, dead, 8)
    (out.fvu + out.auxk_loss).backward()
    sparse_grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    # the same selection, computed densely and differentiated by autograd
    enc = sae.encode(x, dead, 8)
    pre = torch.nn.functional.linear(x - sae.b_dec, sae.W_enc, sae.b_enc)
    keep = torch.zeros(32, 64).scatter_(1, enc.indices_NK, (enc.acts_NK > 0).float())
    keep_aux = torch.zeros(32, 64).scatter_(1, enc.aux_indices_NA, (enc.aux_acts_NA > 0).float())
    recon = (pre.relu() * keep) @ sae.W_dec + sae.b_dec
    e = (x - recon).detach()
    e_hat = (pre.relu() * keep_aux) @ sae.W_dec
    ref = ((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum() + ((e_hat - e) ** 2).sum() / ((e - e.mean(0)) ** 2).sum()
    ref.backward()
    torch.testing.assert_close(out.fvu + out.auxk_loss, ref)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(sparse_grads[name], p.grad, rtol=1e-4, atol=1e-6)


def test_jumprelu_saves_one_threshold_per_latent_and_encodes_pre_times_step(tmp_path):
    """The interface importers rely on: sae.safetensors holds threshold [latents]; acts = pre · (pre > threshold)."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    sae = SparseAutoencoder(SaeConfig(d_in=8, num_latents=32, arch="jumprelu", k=8))
    sae.init_weights()
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.log_threshold.uniform_(-2, 0)
    sae.save(tmp_path / "sae")
    tensors = load_file(str(tmp_path / "sae" / "sae.safetensors"))
    assert tensors["threshold"].shape == (32,) and "log_threshold" not in tensors
    torch.testing.assert_close(tensors["threshold"], sae.log_threshold.exp())
    loaded = SparseAutoencoder.load(tmp_path / "sae")
    x = torch.randn(16, 8)
    pre = (x - tensors["b_dec"]) @ tensors["W_enc"].T + tensors["b_enc"]
    torch.testing.assert_close(loaded.encode_dense(x), pre * (pre > tensors["threshold"]))
    # apply_b_dec_to_input = False (Gemma Scope): pre = x · W_encᵀ + b_enc
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps({**cfg, "apply_b_dec_to_input": False}))
    pre = x @ tensors["W_enc"].T + tensors["b_enc"]
    torch.testing.assert_close(SparseAutoencoder.load(tmp_path / "sae").encode_dense(x), pre * (pre > tensors["threshold"]))


def test_jumprelu_load_refuses_a_missing_or_scalar_threshold(tmp_path):
    from safetensors.torch import load_file, save_file

    sae = SparseAutoencoder(SaeConfig(d_in=8, num_latents=32, arch="jumprelu", k=8))
    sae.init_weights()
    sae.save(tmp_path / "sae")
    tensors = load_file(str(tmp_path / "sae" / "sae.safetensors"))
    save_file({**tensors, "threshold": torch.tensor(0.5)}, str(tmp_path / "sae" / "sae.safetensors"))
    with pytest.raises(ConfigError, match=r"jumprelu SAE needs threshold of shape \[32\], got \[\]"):
        SparseAutoencoder.load(tmp_path / "sae")


def test_jumprelu_threshold_gets_the_straight_through_gradient():
    """∂L/∂θ_i = −(θ_i/ε) Σ_n ∂L/∂f_ni · K((pre_ni − θ_i)/ε) from the reconstruction, −(λ/ε) Σ_n K(...)/N from L0."""
    sae = SparseAutoencoder(SaeConfig(d_in=2, num_latents=2, arch="jumprelu", k=2))
    sae.jumprelu_bandwidth = eps = 0.2
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.W_dec.copy_(torch.eye(2))
        sae.log_threshold.fill_(0.0)  # θ = 1
    # latent 0: pre 1.05 (fires, inside the kernel window |pre − θ| < ε/2), 0.95 (silent, inside), 3.0 (outside)
    # latent 1: pre 0.0 always: far from θ, no gradient
    x = torch.tensor([[1.05, 0.0], [0.95, 0.0], [3.0, 0.0]])
    out = sae(x)
    out.l0_penalty.backward()
    # L0 penalty = mean_n Σ_i H(pre − θ): two of three tokens of latent 0 in the window
    assert out.l0_penalty.item() == pytest.approx(2 / 3)  # pre 1.05 and 3.0 fire
    expected = -(1 / eps) * 2 / 3 * 1.0  # ∂/∂log θ = θ · ∂/∂θ, θ = 1
    torch.testing.assert_close(sae.log_threshold.grad, torch.tensor([expected, 0.0]))
    # and the opposite pseudo-derivative to pre (so to the encoder): +(1/ε)K/N on the two tokens in the window
    torch.testing.assert_close(sae.b_enc.grad, torch.tensor([(1 / eps) * 2 / 3, 0.0]))
    sae.zero_grad()
    out = sae(x)
    recon = (x - out.sae_out_ND).pow(2).sum()
    recon.backward()
    acts = x * (x > 1)
    grad_f = -2 * (x - acts)  # ∂recon/∂f with identity weights, b = 0
    window = ((x - 1).abs() < eps / 2).float()
    torch.testing.assert_close(sae.log_threshold.grad, -(1 / eps) * (grad_f * window).sum(0))
    assert sae.log_threshold.grad[0] != 0 and sae.W_enc.grad is not None


def test_jumprelu_l0_falls_as_the_coefficient_rises(tiny_model_dir, tiny_cache, tmp_path):
    l0 = {}
    for coefficient in (0.0, 0.05):
        cfg = _train_cfg(tiny_model_dir, tmp_path / str(coefficient), arch="jumprelu", tokens=64 * 80, lr=3e-3,
                         l0_schedule=f"1:{coefficient}", l0_warmup_frac=0.0)
        trainer = SaeTrainer(cfg, tiny_cache)
        trainer.start()
        trainer.run()
        l0[coefficient] = trainer.last_metrics["sae/l0"]
    assert l0[0.05] < 0.5 * l0[0.0]


def test_l0_schedule_phases_and_warm_up():
    cfg = SaeTrainConfig(l0_schedule="0.5:0.001,0.5:0.004", l0_warmup_frac=0.0, data="builtin:tasks")
    assert [l0_at(s, 100, cfg) for s in (0, 49, 50, 99)] == [0.001, 0.001, 0.004, 0.004]
    assert l0_at(0, 100, SaeTrainConfig(l0_schedule="1:0.002", l0_warmup_frac=0.1, data="builtin:tasks")) == \
        pytest.approx(0.0002)
    with pytest.raises(ConfigError, match="--l0-schedule"):
        SaeTrainConfig(l0_schedule="0.002", data="builtin:tasks")


def test_matryoshka_prefix_loss_is_each_prefix_s_own_reconstruction():
    torch.manual_seed(0)
    sae = SparseAutoencoder(SaeConfig(d_in=8, num_latents=32, arch="matryoshka", k=4, prefixes=(4, 12, 32)))
    sae.init_weights()
    with torch.no_grad():
        sae.b_dec.normal_()
    sae.train()
    x = torch.randn(16, 8)
    out = sae(x)
    enc = sae.encode(x)
    acts_NF = torch.zeros(16, 32).scatter_(1, enc.indices_NK, enc.acts_NK)
    assert (acts_NF > 0).sum() == 4 * 16  # BatchTopK: k x batch latents over the batch
    total_var = (x - x.mean(0)).pow(2).sum()
    for i, size in enumerate((4, 12, 32)):
        x_hat = acts_NF[:, :size] @ sae.W_dec[:size] + sae.b_dec  # only the prefix's latents
        torch.testing.assert_close(out.prefix_fvu[i], (x - x_hat).pow(2).sum() / total_var)
    torch.testing.assert_close(out.prefix_fvu[-1], out.fvu)
    # the loss reaches a latent through every prefix it belongs to: the first prefix's latents get more
    out.prefix_fvu.sum().backward()
    assert sae.W_dec.grad.abs().sum() > 0


def test_matryoshka_prefixes_default_to_doubling_and_are_checked():
    assert SaeConfig(d_in=8, num_latents=5760, arch="matryoshka").prefix_sizes == (360, 720, 1440, 2880, 5760)
    with pytest.raises(ConfigError, match="--prefixes: expected increasing sizes ending at the number of latents"):
        SaeConfig(d_in=8, num_latents=64, arch="matryoshka", prefixes=(16, 8, 64))
    with pytest.raises(ConfigError, match="--prefixes"):
        SaeTrainConfig(arch="matryoshka", latents=64, prefixes="16,32", data="builtin:tasks")
    with pytest.raises(ConfigError, match="--prefixes: expected comma-separated"):
        SaeTrainConfig(arch="matryoshka", latents=64, prefixes="16;64", data="builtin:tasks")


def test_duplicate_share_counts_latents_with_a_near_parallel_decoder_direction():
    from sae.metrics import duplicate_share

    W = torch.eye(8)  # 8 orthogonal directions
    W = torch.cat([W, W[:2] * 3 + 0.01, -W[2:3]])  # two near-copies (scaled) and one antiparallel, not a duplicate
    m = duplicate_share(W, chunk=3)  # chunks that cut the matrix unevenly
    # latents 0, 1 and their copies 8, 9 are duplicates: 4 of 11
    assert m["duplicate_latents"] == 4 and m["duplicate_frac"] == pytest.approx(4 / 11)
    live = torch.ones(11, dtype=torch.bool)
    live[8] = False  # a dead copy does not count, and does not make latent 0 a duplicate
    m = duplicate_share(W, live_F=live)
    assert m["duplicate_latents"] == 2 and m["duplicate_pool"] == 10
