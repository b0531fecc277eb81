"""The tuned-lens translator converted to our lens and checked against tuned-lens's own forward, both lenses
scored by our evaluation code on the same held-out tokens, and the results table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from benchmarks.lens_vs_tuned_lens.config import BenchError, CompareConfig
from corpus.config import CorpusConfig
from corpus.packing import sequences
from distill.evaluate import Scores
from distill.student import student_logits
from models.errors import ConfigError
from models.frozen import FrozenLM
from models.head import FrozenHead
from models.lens import TunedLens

CONVERSION_TOL = 1e-5
"""Largest error of the converted lens against tuned-lens's forward, relative to the largest reference value."""


# -- conversion ------------------------------------------------------------------------------------
def convert_tuned_lens(src: Path, dest: Path, layer: int, head: FrozenHead, extra: dict | None = None) -> TunedLens:
    """Translator `layer` of a tuned-lens artifact (config.json + params.pt) as our lens, saved in `dest`.

    Both compute head(h + W·h + b) on the raw residual, the same final norm and unembedding after it; tuned-lens's
    translator i reads hidden_states[i], our layer i.
    """
    meta = json.loads((src / "config.json").read_text())
    if meta.get("lens_type", "linear_tuned_lens") != "linear_tuned_lens" or not meta.get("bias", True):
        raise ConfigError(f"{src}: only linear tuned lenses with a bias convert (config {meta})")
    if not 0 <= layer < meta["num_hidden_layers"]:
        raise ConfigError(f"{src}: no translator for layer {layer} (the lens has {meta['num_hidden_layers']})")
    state = torch.load(src / "params.pt", map_location="cpu", weights_only=True)
    weight, bias = state[f"{layer}.weight"], state[f"{layer}.bias"]
    if tuple(weight.shape) != (head.d_model, head.d_model):
        raise ConfigError(f"{src}: translator {layer} is {tuple(weight.shape)}, the model's d_model is {head.d_model}")
    lens = TunedLens(head.d_model, head)
    lens.translator.load_state_dict({"weight": weight.float(), "bias": bias.float()})
    lens.save(dest, extra={"layer": layer, "converted_from": "tuned-lens", "tuned_lens_config": meta, **(extra or {})})
    return TunedLens.load(dest, head)


def check_conversion(lens: TunedLens, check_file: Path) -> dict[str, float]:
    """Our copy's translated states and logits against tuned-lens's own on the same residuals (relative max error)."""
    ref = load_file(str(check_file))
    with torch.inference_mode():
        h = ref["h"].to(lens.translator.weight.dtype)
        translated = h + lens.translator(h)
        logits = lens(h[None])[0]
    errors = {name: ((ours.float() - ref[name]).abs().max() / ref[name].abs().max()).item()
              for name, ours in (("translated", translated), ("logits", logits))}
    if max(errors.values()) > CONVERSION_TOL:
        raise BenchError(f"converted tuned lens disagrees with tuned-lens's forward (relative errors {errors}; "
                         f"tolerance {CONVERSION_TOL:g}); is the frozen model fp32?")
    return errors


# -- evaluation ------------------------------------------------------------------------------------
@torch.inference_mode()
def evaluate_lenses(cfg: CompareConfig, frozen: FrozenLM, lenses: dict[str, TunedLens], progress: bool = True) -> dict:
    """KL(p_frozen ‖ p_lens) over the full vocabulary, top-1 agreement, CE and next-token accuracy of each lens
    and of the logit lens, on `cfg.eval_tokens` positions of the eval split, BOS not scored: the lens rows of
    `faithlens decoder eval --lens`, same per-batch steps."""
    eval_cfg = CorpusConfig(data=cfg.data, tokens=cfg.eval_tokens, seq_len=cfg.seq_len, split="eval", seed=cfg.seed)
    seqs = list(sequences(eval_cfg, frozen.tokenizer, frozen.bos_token_id, frozen.eos_token_id, frozen))
    scores = Scores()
    batch_size = 4
    for start in tqdm(range(0, len(seqs), batch_size), desc="lens eval", unit="batch", disable=not progress):
        batch = seqs[start : start + batch_size]
        ids = torch.from_numpy(np.stack([p.tokens for p in batch]))
        labels = torch.from_numpy(np.stack([p.next_ids for p in batch]))[:, 1:].flatten()
        logits, store = frozen.forward(ids, [cfg.layer])
        h = store[cfg.layer].float()
        teacher = logits[:, 1:].float().log_softmax(-1).flatten(0, 1)
        for name, lens in lenses.items():
            scores.add(name, student_logits(lens, None, h), teacher, labels)
        scores.add("logit_lens", frozen.logit_lens(store[cfg.layer][:, 1:]).flatten(0, 1), teacher, labels)
        scores.n += labels.numel()
    return {"tokens": scores.n, "dtype": str(frozen.dtype).removeprefix("torch."), "methods": scores.result()}


# -- report ------------------------------------------------------------------------------------------
def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def results_table(results: dict) -> str:
    c, ev, plan = results["config"], results["eval"], results["plan"]
    o, t = results["ours"], results["tuned_lens"]
    tl_name = f"tuned-lens {t['versions']['tuned-lens']}"
    lines = [f"Tuned lens vs tuned-lens: {c['model']} layer {c['layer']}, the same {plan['sequences']:,} training sequences "
             f"of {c['seq_len']} tokens ({plan['scored_tokens']:,} positions, BOS excluded) of {c['data']}; both lenses "
             f"evaluated by our code on {ev['tokens']:,} held-out tokens (eval split, frozen model {ev['dtype']}, exact "
             "full-vocabulary KL(p_frozen ‖ p_lens) in nats/token, top-1 agreement with the frozen argmax)", "",
             "| tool | train tokens | steps × tokens | held-out KL | top-1 | CE | tok/s training only | tok/s end to end | "
             "end-to-end s | peak RSS MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, name in (("ours", "faithlens `lens train`"), ("tuned_lens", tl_name)):
        r, m = results[key], ev["methods"][key]
        lines.append(f"| {name} | {r['train_tokens']:,} | {r['steps']} × {r['tokens_per_step']:,} | {m['kl']:.4f} | "
                     f"{m['top1']:.1%} | {m['ce']:.3f} | {_fmt(r['tokens_per_s_train_only'], ',.0f')} | "
                     f"{r['tokens_per_s_end_to_end']:,.0f} | {r['end_to_end_s']:,.1f} | {r['peak_rss_mb']:,.0f} |")
    ll = ev["methods"]["logit_lens"]
    lines.append(f"| logit lens (untrained, reference) | – | – | {ll['kl']:.4f} | {ll['top1']:.1%} | {ll['ce']:.3f} | – | – | – | – |")
    opt = t["optimizer"]
    teacher = ("the teacher cache's top-64 + rest-mass target (a lower bound of the exact KL; the cache holds the "
               f"frozen model's {o['frozen_dtype']} log-probs)" if c["teacher"] == "cache"
               else f"the exact full-vocabulary KL, the frozen model ({o['frozen_dtype']}) run in every step")
    lines += ["", "How each was configured:", "",
              f"- ours (`faithlens lens train`, {o['runner']}): AdamW lr {o['lr']:g} (weight decay {o['weight_decay']:g}), "
              f"{o['warmup_frac']:.0%} warm-up, linear decay over the last {o['decay_frac']:.0%} of steps to "
              f"{o['lr_floor']:.0%}, gradient clip {o['grad_clip']:g}; {o['steps']} steps of {c['batch_sequences']} "
              f"sequences; loss: {teacher}; translator fp32, the head's matmul in the frozen model's dtype.",
              f"- tuned-lens (`Train.execute`, its defaults): {opt['name'].upper()} with Nesterov momentum "
              f"{opt['momentum']:g}, lr_scale {opt['lr_scale']:g} (torch lr {opt['torch_lr']:.3g} = lr_scale × "
              f"(1 − momentum)), weight decay {opt['weight_decay']:g}, {opt['warmup_steps']} warm-up steps, linear "
              f"decay to 0, gradient clip {opt['grad_clip']:g}, loss {opt['loss'].upper()} against the model's own "
              f"logits ({t['model_dtype']} model, lens and loss under {opt['autocast']} autocast); {t['steps']} steps "
              f"(its default is 250 steps of 2^18 tokens, here rescaled to the token budget) of "
              f"{t['batches_per_step']} × {t['batch_sequences']} sequences (gradient accumulation).",
              f"- tuned-lens trains one translator per layer in one run; here its loop sees layer {c['layer']} only "
              "(see `_tuned_lens_child.py`), and BOS positions are dropped as ours drops them.",
              "", "Timings:", "",
              f"- ours: wall {o['wall_s']:.1f} s = start-up{' (Ray included)' if o['runner'] == 'cli' else ''}, model "
              f"load and {o['data_kind']} (ready after "
              f"{_fmt(o['data_ready_s'], '.1f')} s), then the training loop ({_fmt(o['train_loop_s'], '.1f')} s, from "
              "TensorBoard charts/tokens_per_s; training only), then saving.",
              f"- tuned-lens: wall {t['wall_s']:.1f} s = {t['startup_s']:.1f} s imports and model load + loop and its save "
              f"{t['fit_s']:.1f} s (of which LM forward {t['lm_forward_s']:.1f} s) + the rest; end to end = wall minus "
              f"{t['benchmark_extra_s']:.1f} s of the benchmark's own work after the loop (the full-size artifact and the "
              f"conversion check); training only = loop minus LM forward ({t['train_only_s']:.1f} s, "
              f"{t['tokens_per_s_train_only']:,.0f} tok/s; the loop with its LM forward: {t['tokens_per_s_fit']:,.0f} tok/s). "
              "Its sequences were tokenised by ours, not counted in its time.",
              *([f"- ours with --teacher online runs the frozen model ({o['frozen_dtype']}) inside its training loop, so its "
                 "training-only figure includes that forward; compare it with tuned-lens's loop with its LM forward."]
                if c["teacher"] == "online" else []),
              f"- peak RSS = the largest sum over the process tree, sampled every {results['rss_sample_s']:g} s "
              f"(largest single process: ours {o['peak_process_rss_mb']:,.0f} MB, tuned-lens "
              f"{t['peak_process_rss_mb']:,.0f} MB). Load average before: ours {o['loadavg_1m_before']:.2f}, tuned-lens "
              f"{t['loadavg_1m_before']:.2f} ({results['cpus']} cores; timings are noisy).",
              f"- same training sequences: {results['same_sequences']}; the converted tuned-lens translator matches "
              f"tuned-lens's forward to {results['conversion_rel_err']['logits']:.1e} (logits) and "
              f"{results['conversion_rel_err']['translated']:.1e} (translated states), relative."]
    return "\n".join(lines)
