"""The SAELens export: the on-disk layout SAELens 6.x reads, and the numbers it then computes.

The expectations are hard-coded from sae-lens 6.54.12 (`SAE.load_from_disk`, `sae_lens_disk_loader`,
`StandardSAE` / `TopKSAE` / `JumpReLUSAE`); `python -m benchmarks.check_saelens_export` checks
against the real package.
"""

import json
from pathlib import Path

import pytest
import torch
import tyro
from safetensors.torch import load_file

from models.errors import ConfigError
from sae.config import SaeConfig
from sae.export import SaeExportConfig, export_saelens, hook_name_for_layer, run_export_saelens, within_width
from sae.model import SparseAutoencoder

D_IN, LATENTS, K = 16, 64, 4
ARCHS = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "matryoshka": "jumprelu", "jumprelu": "jumprelu"}
# Fields of sae_lens.SAEConfig (its cfg.json) plus "architecture"; TopKSAEConfig adds two.
SAELENS_KEYS = {"architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input",
                "normalize_activations", "reshape_activations", "metadata"}
TOPK_KEYS = {"k", "rescale_acts_by_decoder_norm"}


def _random_sae(arch: str, seed: int = 0) -> SparseAutoencoder:
    g = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(SaeConfig(d_in=D_IN, num_latents=LATENTS, arch=arch, k=K))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(LATENTS, D_IN, generator=g) / D_IN**0.5)
        sae.W_dec.copy_(torch.randn(LATENTS, D_IN, generator=g) / D_IN**0.5)
        sae.b_enc.copy_(0.1 * torch.randn(LATENTS, generator=g) - (1.5 if arch == "relu" else 0.0))
        sae.b_dec.copy_(0.1 * torch.randn(D_IN, generator=g))
        if arch == "jumprelu":  # per-latent thresholds around 1.5
            sae.log_threshold.copy_((1.5 + 0.2 * torch.rand(LATENTS, generator=g)).log())
        else:
            sae.threshold.fill_(1.5)
    return sae.eval()


def _saelens_forward(folder: Path, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens 6.x inference encode and decode, written out from its source, on an exported folder."""
    cfg = json.loads((folder / "cfg.json").read_text())
    w = load_file(str(folder / "sae_weights.safetensors"))
    pre = (x_ND - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    if cfg["architecture"] == "standard":
        acts = pre.relu()
    elif cfg["architecture"] == "topk":
        vals, idx = pre.topk(cfg["k"], dim=-1)
        acts = torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
    else:
        acts = pre.relu() * (pre > w["threshold"])
    return acts, acts @ w["W_dec"] + w["b_dec"]


@pytest.mark.parametrize("arch", ARCHS)
def test_export_has_the_files_keys_and_tensors_saelens_loads(arch, tmp_path):
    sae = _random_sae(arch)
    sae.meta = {"layer": 3, "model": "some/model"}
    out = export_saelens(sae, tmp_path / "saelens")
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    cfg = json.loads((out / "cfg.json").read_text())
    assert set(cfg) == SAELENS_KEYS | (TOPK_KEYS if arch == "topk" else set())
    assert cfg["architecture"] == ARCHS[arch]
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (D_IN, LATENTS, "float32")
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    if arch == "topk":
        assert cfg["k"] == K and cfg["rescale_acts_by_decoder_norm"] is False
    meta = cfg["metadata"]
    # from 6.0 on SAELens reads the config as is (older versions get keys renamed)
    assert int(meta["sae_lens_version"].split(".")[0]) >= 6
    assert meta["hook_name"] == "model.layers.2" and meta["model_name"] == "some/model"
    tensors = load_file(str(out / "sae_weights.safetensors"))
    shapes = {"W_enc": (D_IN, LATENTS), "b_enc": (LATENTS,), "W_dec": (LATENTS, D_IN), "b_dec": (D_IN,)}
    if ARCHS[arch] == "jumprelu":
        shapes["threshold"] = (LATENTS,)  # strict load: only jumprelu may have it
    assert {k: tuple(v.shape) for k, v in tensors.items()} == shapes
    assert all(v.dtype == torch.float32 for v in tensors.values())


@pytest.mark.parametrize("arch", ARCHS)
def test_exported_weights_round_trip(arch, tmp_path):
    sae = _random_sae(arch)
    tensors = load_file(str(export_saelens(sae, tmp_path / "saelens") / "sae_weights.safetensors"))
    torch.testing.assert_close(tensors["W_enc"].T, sae.W_enc, rtol=0, atol=0)
    torch.testing.assert_close(tensors["W_dec"], sae.W_dec, rtol=0, atol=0)
    torch.testing.assert_close(tensors["b_enc"], sae.b_enc, rtol=0, atol=0)
    torch.testing.assert_close(tensors["b_dec"], sae.b_dec, rtol=0, atol=0)
    if arch in ("batchtopk", "matryoshka"):
        assert torch.equal(tensors["threshold"], torch.full((LATENTS,), 1.5))
    if arch == "jumprelu":
        torch.testing.assert_close(tensors["threshold"], sae.log_threshold.exp(), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_math_on_the_export_reproduces_our_encode_and_decode(arch, tmp_path):
    sae = _random_sae(arch)
    x_ND = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(1))
    x_ND[-4:] *= 10  # loud tokens on which more than sparse_width latents fire
    acts, x_hat = _saelens_forward(export_saelens(sae, tmp_path / "saelens"), x_ND)
    enc = sae.encode(x_ND)
    exact = within_width(sae, x_ND)
    assert exact[:-4].all()
    torch.testing.assert_close(acts[exact], sae.encode_dense(x_ND)[exact], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat[exact], sae.decode(enc.acts_NK, enc.indices_NK)[exact], rtol=1e-5, atol=1e-5)
    if arch == "relu":  # SAELens standard is our dense forward on every token
        torch.testing.assert_close(x_hat, sae(x_ND).sae_out_ND, rtol=1e-5, atol=1e-5)
    if arch == "topk":
        assert exact.all()
    else:  # the documented mismatch: on capped tokens SAELens keeps more latents than our encode
        assert not exact[-4:].any()
        assert ((acts[~exact] > 0).sum(-1) > sae.cfg.sparse_width).all()


def test_hook_name_follows_hf_module_numbering():
    assert hook_name_for_layer(0) == "model.embed_tokens"
    assert hook_name_for_layer(1) == "model.layers.0"
    assert hook_name_for_layer(9) == "model.layers.8"


def test_hook_name_override_and_unknown_layer(tmp_path):
    sae = _random_sae("topk")  # not loaded from disk: no recorded layer
    cfg = json.loads((export_saelens(sae, tmp_path / "a") / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] is None
    cfg = json.loads((export_saelens(sae, tmp_path / "b", hook_name="transformer.h.4") / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "transformer.h.4"


def test_run_export_from_a_run_folder_replaces_a_previous_export(tmp_path, capsys):
    _random_sae("batchtopk").save(tmp_path / "run" / "sae", input_scale=2.0, extra={"layer": 5, "model": "m"})
    cfg = SaeExportConfig(sae=tmp_path / "run", out=tmp_path / "export")
    out = run_export_saelens(cfg)
    assert out == tmp_path / "export" and str(out) in capsys.readouterr().out
    saved = json.loads((out / "cfg.json").read_text())
    assert saved["metadata"]["hook_name"] == "model.layers.4" and saved["metadata"]["model_name"] == "m"
    assert saved["metadata"]["faithlens"]["input_scale_folded"] == 2.0
    run_export_saelens(cfg)  # a second export over the first
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]


def test_export_refuses_to_replace_a_folder_that_is_not_an_export(tmp_path):
    _random_sae("relu").save(tmp_path / "run" / "sae")
    with pytest.raises(ConfigError, match="not an SAELens export"):
        run_export_saelens(SaeExportConfig(sae=tmp_path / "run", out=tmp_path / "run"))
    assert (tmp_path / "run" / "sae" / "sae.safetensors").is_file()


def test_cli_takes_two_positionals():
    cfg = tyro.cli(SaeExportConfig, args=["runs/x", "runs/x/saelens", "--hook-name", "model.layers.0"])
    assert cfg == SaeExportConfig(sae=Path("runs/x"), out=Path("runs/x/saelens"), hook_name="model.layers.0")
