"""`faithlens sae import`: hook names mapped to this project's layers (checked on a tiny Llama), SAELens and
sparsify folders written here from their formats, the export -> import round trip, and bad input.

The folder formats are those of sae-lens 6.x (`SAE.save_model`: cfg.json + sae_weights.safetensors, W_enc
[d_in, d_sae]) and sparsify 1.x (`SparseCoder.save_to_disk`: <hookpoint>/cfg.json + sae.safetensors with
encoder.weight [latents, d_in]); `python -m benchmarks.check_sae_import` checks against the real packages.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from faithlens_cli import main
from models.errors import ConfigError
from sae.config import SaeConfig
from sae.export import export_saelens
from sae.importer import SaeImportConfig, import_sae, layer_of_hook
from sae.metrics import SaeEvalConfig, run_sae_eval
from sae.model import SparseAutoencoder
from tests.conftest import random_ids

D_IN, LATENTS, K = 16, 64, 4


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _x(n=48):
    return 2 * _randn(n, D_IN, seed=7)


# -- hooks -> layers ----------------------------------------------------------------------------
@pytest.mark.parametrize("hook,layer", [
    ("blocks.0.hook_resid_pre", 0), ("blocks.2.hook_resid_pre", 2), ("blocks.2.hook_resid_post", 3),
    ("model.layers.2", 3), ("layers.2", 3), ("layers.2/seed1", 3), ("model.embed_tokens", 0),
    ("transformer.h.1", 2), ("gpt_neox.layers.0", 1),
])
def test_hook_names_map_to_layers(hook, layer):
    assert layer_of_hook(hook) == layer


@pytest.mark.parametrize("hook", ["blocks.3.hook_resid_mid", "blocks.3.attn.hook_z", "blocks.3.hook_mlp_out",
                                  "layers.3.mlp", "model.layers.3.self_attn", "ln_final.hook_normalized", "hook_embed"])
def test_hooks_off_the_residual_stream_are_refused_by_name(hook):
    with pytest.raises(ConfigError, match=f"hook '{hook}'"):
        layer_of_hook(hook)


def test_each_hook_reads_our_layer_residual_on_a_tiny_llama(tiny_frozen):
    """The residual each hook name stands for, read from the HF modules, equals FrozenLM's layer residual."""
    model, n = tiny_frozen.model, tiny_frozen.n_layers
    ids = random_ids(tiny_frozen)
    seen: dict[str, torch.Tensor] = {}
    handles = [model.model.embed_tokens.register_forward_hook(
        lambda m, a, out: seen.__setitem__("model.embed_tokens", out))]
    for i, block in enumerate(model.model.layers):
        # TransformerLens: hook_resid_pre is block i's input, hook_resid_post its output
        handles.append(block.register_forward_pre_hook(
            lambda m, args, kwargs, i=i: seen.__setitem__(f"blocks.{i}.hook_resid_pre",
                                                          args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True))
        # sparsify hooks module `layers.{i}` of model.base_model; SAELens's HF proxy names `model.layers.{i}`
        handles.append(block.register_forward_hook(
            lambda m, a, out, i=i: seen.update({f"blocks.{i}.hook_resid_post": out[0] if isinstance(out, tuple) else out,
                                                f"layers.{i}": out[0] if isinstance(out, tuple) else out})))
    assert model.base_model.get_submodule("layers.1") is model.get_submodule("model.layers.1")
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    ours = tiny_frozen.residuals(ids, range(n + 1))
    seen.update({f"model.layers.{i}": seen[f"layers.{i}"] for i in range(n)})
    assert len(seen) == 1 + 4 * n
    for hook, h in seen.items():
        torch.testing.assert_close(h, ours[layer_of_hook(hook)], rtol=0, atol=0, msg=hook)


# -- SAELens folders ----------------------------------------------------------------------------
def _saelens_folder(path: Path, arch: str, *, apply_b_dec=True, norm="none", rescale=False, hook="blocks.1.hook_resid_post",
                    extra_files=None) -> dict:
    """A SAELens 6.x folder with random weights, and the tensors it holds."""
    w = {"W_enc": _randn(D_IN, LATENTS, seed=1) / D_IN**0.5, "b_enc": 0.1 * _randn(LATENTS, seed=2) - 0.3,
         "W_dec": _randn(LATENTS, D_IN, seed=3) * (0.5 + torch.rand(LATENTS, 1, generator=torch.Generator().manual_seed(9))),
         "b_dec": 0.1 * _randn(D_IN, seed=4)}
    if arch == "jumprelu":
        w["threshold"] = 0.5 * torch.rand(LATENTS, generator=torch.Generator().manual_seed(5))
    cfg = {"architecture": arch, "d_in": D_IN, "d_sae": LATENTS, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": apply_b_dec, "normalize_activations": norm, "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.5.0", "model_name": "tiny", "hook_name": hook, "hook_head_index": None}}
    if arch == "topk":
        cfg.update(k=K, rescale_acts_by_decoder_norm=rescale)
    path.mkdir(parents=True)
    save_file(w, str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps(cfg))
    for name, text in (extra_files or {}).items():
        (path / name).write_text(text)
    return w


def _saelens_forward(w: dict, arch: str, x: torch.Tensor, *, apply_b_dec=True, scale=1.0, rescale=False):
    """SAELens 6.x inference on x·scale (the ActivationScaler), unscaled back: latents and x̂, from its source."""
    pre = (x * scale - w["b_dec"] * apply_b_dec) @ w["W_enc"] + w["b_enc"]
    norm = w["W_dec"].norm(dim=-1)
    if arch == "standard":
        acts = pre.relu()
    elif arch == "topk":
        pre = pre * norm if rescale else pre
        vals, idx = pre.topk(K, dim=-1)
        acts = torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
    else:
        acts = pre.relu() * (pre > w["threshold"])
    out = (acts / norm if rescale else acts) @ w["W_dec"] + w["b_dec"]
    return acts, out / scale


def _ours(out_dir: Path, x: torch.Tensor):
    sae = SparseAutoencoder.load(out_dir / "sae")
    with torch.no_grad():
        enc = sae.encode(x)
        return sae, sae.encode_dense(x), sae.decode(enc.acts_NK, enc.indices_NK)


@pytest.mark.parametrize("arch,options", [
    ("standard", {}), ("standard", {"apply_b_dec": False}), ("topk", {}), ("topk", {"rescale": True}),
    ("jumprelu", {}), ("jumprelu", {"apply_b_dec": False}),
])
def test_saelens_import_reproduces_saelens_encode_and_decode(arch, options, tmp_path):
    w = _saelens_folder(tmp_path / "src", arch, **options)
    import_sae(SaeImportConfig(src=tmp_path / "src", out=tmp_path / "out", k_max=LATENTS))
    x = _x()
    sae, latents, x_hat = _ours(tmp_path / "out", x)
    acts, out = _saelens_forward(w, arch, x, **options)
    assert sae.cfg.arch == {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}[arch]
    assert (acts > 0).any() and (acts == 0).any()
    torch.testing.assert_close(latents, acts, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat, out, rtol=1e-5, atol=1e-5)
    assert sae.meta["layer"] == 2 and sae.meta["model"] == "tiny"
    assert sae.meta["imported_from"]["format"] == "saelens"
    assert sae.meta["imported_from"]["hook"] == "blocks.1.hook_resid_post"


@pytest.mark.parametrize("stored", [True, False])
def test_saelens_expected_average_scaling_is_folded(stored, tmp_path):
    s = 0.37
    files = {"activation_scaler.json": json.dumps({"scaling_factor": s})} if stored else {}
    w = _saelens_folder(tmp_path / "src", "topk", norm="expected_average_only_in", extra_files=files)
    import_sae(SaeImportConfig(src=tmp_path / "src", out=tmp_path / "out", scaling_factor=0.0 if stored else s))
    x = _x()
    _, latents, x_hat = _ours(tmp_path / "out", x)
    acts, out = _saelens_forward(w, "topk", x, scale=s)
    torch.testing.assert_close(latents, acts, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat, out, rtol=1e-5, atol=1e-5)


# -- sparsify folders ----------------------------------------------------------------------------
def _sparsify_folder(root: Path, hookpoint="layers.1", transposed=False, **cfg_overrides) -> dict:
    w = {"encoder.weight": _randn(LATENTS, D_IN, seed=1) / D_IN**0.5, "encoder.bias": 0.1 * _randn(LATENTS, seed=2),
         "W_dec": _randn(LATENTS, D_IN, seed=3) / D_IN**0.5, "b_dec": 0.1 * _randn(D_IN, seed=4)}
    cfg = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": LATENTS, "k": K,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D_IN, **cfg_overrides}
    folder = root / hookpoint
    folder.mkdir(parents=True)
    stored = {**w, "W_dec": w["W_dec"].T.contiguous()} if transposed else w
    save_file(stored, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return w


def _sparsify_forward(w: dict, x: torch.Tensor):
    """sparsify's encode (relu, then the top k) and decode, from its source."""
    pre = torch.relu((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
    vals, idx = pre.topk(K, dim=-1)
    acts = torch.zeros_like(pre).scatter_(-1, idx, vals)
    return acts, acts @ w["W_dec"] + w["b_dec"]


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("src", ["hookpoint", "run"])
def test_sparsify_import_reproduces_sparsify(src, transposed, tmp_path):
    w = _sparsify_folder(tmp_path / "run", transposed=transposed, multi_topk=True)
    path = tmp_path / "run" / "layers.1" if src == "hookpoint" else tmp_path / "run"
    import_sae(SaeImportConfig(src=path, out=tmp_path / "out"))
    x = _x()
    sae, latents, x_hat = _ours(tmp_path / "out", x)
    acts, out = _sparsify_forward(w, x)
    torch.testing.assert_close(latents, acts, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat, out, rtol=1e-5, atol=1e-5)
    assert (sae.cfg.arch, sae.cfg.k, sae.meta["layer"]) == ("topk", K, 2)
    assert sae.meta["imported_from"]["hook"] == "layers.1"


def test_sparsify_run_with_several_hookpoints_needs_hook(tmp_path):
    _sparsify_folder(tmp_path / "run", "layers.0")
    _sparsify_folder(tmp_path / "run", "layers.2")
    with pytest.raises(ConfigError, match="layers.0, layers.2; choose one with --hook"):
        import_sae(SaeImportConfig(src=tmp_path / "run", out=tmp_path / "out"))
    assert SparseAutoencoder.load(import_sae(SaeImportConfig(src=tmp_path / "run", out=tmp_path / "out",
                                                             hook="layers.2"))).meta["layer"] == 3


# -- round trip ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu"])
def test_export_then_import_is_exact(arch, tmp_path):
    sae = SparseAutoencoder(SaeConfig(d_in=D_IN, num_latents=LATENTS, arch=arch, k=K))
    with torch.no_grad():
        for i, p in enumerate(sae.parameters()):
            p.copy_(_randn(*p.shape, seed=i) * 0.3)
        if arch == "batchtopk":
            sae.threshold.fill_(0.2)
    sae.eval()
    sae.meta = {"layer": 3, "model": "tiny"}
    export_saelens(sae, tmp_path / "saelens")
    import_sae(SaeImportConfig(src=tmp_path / "saelens", out=tmp_path / "out", k_max=sae.cfg.sparse_width))
    back = SparseAutoencoder.load(tmp_path / "out" / "sae")
    assert back.meta["layer"] == 3
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(back, name), getattr(sae, name)), name
    # batchtopk comes back as jumprelu with its threshold on every latent; thresholds pass through log/exp
    torch.testing.assert_close(back.latent_thresholds(), sae.latent_thresholds(), rtol=1e-6, atol=0)
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(back.encode_dense(x), sae.encode_dense(x), rtol=0, atol=0)


# -- the CLI, eval, and --sae --------------------------------------------------------------------
def test_cli_import_then_sae_eval_reads_it(tiny_frozen, tiny_model_dir, tmp_path, capsys):
    _sparsify_folder(tmp_path / "run", "layers.1", num_latents=LATENTS, d_in=tiny_frozen.d_model)
    src = tmp_path / "run" / "layers.1"  # d_in must be the model's: rewrite with its width
    for p in src.iterdir():
        p.unlink()
    d = tiny_frozen.d_model
    save_file({"encoder.weight": _randn(LATENTS, d, seed=1), "encoder.bias": torch.zeros(LATENTS),
               "W_dec": _randn(LATENTS, d, seed=2) / d**0.5, "b_dec": torch.zeros(d)}, str(src / "sae.safetensors"))
    (src / "cfg.json").write_text(json.dumps({"activation": "topk", "k": K, "num_latents": LATENTS, "d_in": d}))
    assert main(["sae", "import", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    assert "layer 2" in capsys.readouterr().out
    result = run_sae_eval(SaeEvalConfig(sae=tmp_path / "out", model=str(tiny_model_dir), dtype="fp32",
                                        data="builtin:tasks", tokens=128, seq_len=32, json=True), frozen=tiny_frozen)
    assert result["layer"] == 2 and result["fvu"] > 0 and "spliced_kl" in result


def test_a_foreign_folder_given_as_sae_says_to_import_it(tmp_path):
    _sparsify_folder(tmp_path / "run")
    _saelens_folder(tmp_path / "saelens", "standard")
    for path, fmt in ((tmp_path / "run" / "layers.1", "sparsify"), (tmp_path / "saelens", "saelens")):
        with pytest.raises(ConfigError, match=f"a {fmt} SAE, not a faithlens one; import it first"):
            SparseAutoencoder.load(path)


def _bad_cases(tmp_path: Path) -> list[tuple[list[str], str]]:
    _saelens_folder(tmp_path / "attn", "standard", hook="blocks.1.attn.hook_z")
    _saelens_folder(tmp_path / "gated", "gated")
    _saelens_folder(tmp_path / "lnorm", "standard", norm="layer_norm")
    _saelens_folder(tmp_path / "noscale", "standard", norm="expected_average_only_in")
    _saelens_folder(tmp_path / "nocfg", "standard")
    (tmp_path / "nocfg" / "cfg.json").unlink()
    _saelens_folder(tmp_path / "trunc", "topk")
    data = (tmp_path / "trunc" / "sae_weights.safetensors").read_bytes()
    (tmp_path / "trunc" / "sae_weights.safetensors").write_bytes(data[: len(data) // 2])
    _saelens_folder(tmp_path / "shape", "standard")
    cfg = json.loads((tmp_path / "shape" / "cfg.json").read_text())
    (tmp_path / "shape" / "cfg.json").write_text(json.dumps({**cfg, "d_sae": LATENTS * 2}))
    _sparsify_folder(tmp_path / "skip", skip_connection=True)
    _sparsify_folder(tmp_path / "mlp", "layers.1.mlp")
    (tmp_path / "empty").mkdir()
    return [
        ([str(tmp_path / "attn")], "hook 'blocks.1.attn.hook_z': not a residual stream"),
        ([str(tmp_path / "gated")], "architecture 'gated' is not supported"),
        ([str(tmp_path / "lnorm")], "normalize_activations 'layer_norm'"),
        ([str(tmp_path / "noscale")], "pass --scaling-factor"),
        ([str(tmp_path / "nocfg"), "--format", "saelens"], "no cfg.json"),
        ([str(tmp_path / "trunc")], "truncated, or not a safetensors file"),
        ([str(tmp_path / "shape")], "W_enc has shape [16, 64], expected [16, 128]"),
        ([str(tmp_path / "skip")], "skip_connection is true"),
        ([str(tmp_path / "mlp")], "hook 'layers.1.mlp'"),
        ([str(tmp_path / "empty")], "neither a SAELens folder"),
        ([str(tmp_path / "missing")], "no such folder"),
    ]


def test_bad_input_is_one_line_with_status_2_and_nothing_written(tmp_path, capsys):
    cases = _bad_cases(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    for args, message in cases:
        code = main(["sae", "import", *args, "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        assert err.count("\n") == 1 and err.startswith("faithlens sae import: error: "), err
        assert message in err, (message, err)
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_import_refuses_to_replace_a_folder_that_is_not_an_import(tmp_path):
    _saelens_folder(tmp_path / "src", "standard")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a previous import"):
        import_sae(SaeImportConfig(src=tmp_path / "src", out=tmp_path / "out"))
    import_sae(SaeImportConfig(src=tmp_path / "src", out=tmp_path / "new"))
    import_sae(SaeImportConfig(src=tmp_path / "src", out=tmp_path / "new"))  # a previous import is replaced
