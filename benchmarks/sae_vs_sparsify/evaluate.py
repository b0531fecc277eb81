"""Step 5 and the report: sparsify's SAE converted to ours and checked against its own outputs, both SAEs
evaluated by `sae.metrics.evaluate_sae` on the same held-out tokens, and the results table."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from benchmarks.sae_vs_sparsify.config import BenchError, CompareConfig
from models.config import ModelConfig
from models.errors import ConfigError
from models.loading import load_frozen
from sae.config import SaeConfig
from sae.metrics import SaeEvalConfig, evaluate_sae
from sae.model import SparseAutoencoder

SPARSIFY_TENSORS = {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}
CONVERSION_RTOL = 1e-3


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
