"""`faithlens decoder eval`: decoders and the layer's baselines on the same held-out tokens.

For every method: KL(p_frozen ‖ p_method) over the full vocabulary (nats/token), top-1 agreement
with the frozen model's argmax, cross-entropy against the data's next token and next-token accuracy
(P(argmax = the data's next token); its degradation, frozen − method in points, is the design's
"task accuracy" row), in domain (the eval split of --data) and out of domain (--ood). Methods: each
decoder; the logit lens; the tuned lens (with --lens); the SAE-spliced frozen model (all upper layers
kept: the upper bound).
Decoders also report `kl_topk`, the KL to the cached-style top-k + rest target, to show what the
training target loses against the exact one. Position 0 (BOS) is not scored.
Task-suite accuracy, a separate measure: teacher-forced answer exact match on held-out examples of
--task-suite (`distill.task_eval`), for the frozen model and each decoder.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from corpus.cache import teacher_targets
from corpus.packing import sequences
from distill.config import DecoderEvalConfig
from distill.loss import kl_full, kl_topk
from distill.metrics import next_token_accuracy
from distill.student import student_logits
from distill.task_eval import task_answer_exact_match
from models.config import DEFAULT_MODEL
from models.decoder import load_decoder, read_decoder_meta
from models.errors import ConfigError
from models.frozen import FrozenLM
from models.head import FrozenHead
from models.io import write_json_atomic, write_text_atomic
from models.lens import TunedLens
from models.loading import load_frozen
from models.progress import progress_bar
from sae.model import SparseAutoencoder
from training.layout import decoder_dir, resolve_sae_dir

TEACHER_K = 64


class Scores:
    """Running sums of KL, top-1 agreement, CE and next-token accuracy per method."""

    def __init__(self):
        self.sums: dict[str, dict[str, float]] = {}
        self.n = 0

    def add(self, method: str, logits_NV: torch.Tensor, teacher_logp_NV: torch.Tensor, labels_N: torch.Tensor,
            teacher_top: dict | None = None) -> None:
        s = self.sums.setdefault(method, {"kl": 0.0, "top1": 0.0, "ce": 0.0, "next_token_acc": 0.0})
        logits = logits_NV.float()
        s["kl"] += kl_full(teacher_logp_NV, logits).sum().item()
        s["top1"] += (logits.argmax(-1) == teacher_logp_NV.argmax(-1)).sum().item()
        s["ce"] += F.cross_entropy(logits, labels_N, reduction="sum").item()
        s["next_token_acc"] += next_token_accuracy(logits, labels_N) * labels_N.numel()
        if teacher_top is not None:
            s["kl_topk"] = s.get("kl_topk", 0.0) + kl_topk(teacher_top["teacher.topk_ids"], teacher_top["teacher.topk_logp"],
                                                          teacher_top["teacher.rest_logmass"], logits).sum().item()

    def result(self) -> dict[str, dict[str, float]]:
        return {m: {k: v / self.n for k, v in s.items()} for m, s in self.sums.items()}


@torch.inference_mode()
def score_corpus(cfg: DecoderEvalConfig, frozen: FrozenLM, layer: int, decoders: dict, sae: SparseAutoencoder,
                 lens: TunedLens | None, progress: bool) -> dict:
    seqs = list(sequences(cfg, frozen.tokenizer, frozen.bos_token_id, frozen.eos_token_id, frozen))
    scores = Scores()
    frozen_ce = frozen_acc = 0.0
    for start in progress_bar(range(0, len(seqs), cfg.batch_size), desc=f"decoder eval ({cfg.split})", unit="batch",
                      disable=not progress):
        batch = seqs[start : start + cfg.batch_size]
        ids = torch.from_numpy(np.stack([p.tokens for p in batch]))
        labels = torch.from_numpy(np.stack([p.next_ids for p in batch]))[:, 1:].flatten()
        logits, store = frozen.forward(ids, [layer])
        h = store[layer].float()
        teacher = logits[:, 1:].float().log_softmax(-1).flatten(0, 1)
        top = {k: v.flatten(0, 1) for k, v in teacher_targets(logits[:, 1:], TEACHER_K).items()}
        frozen_ce += F.nll_loss(teacher, labels, reduction="sum").item()
        frozen_acc += next_token_accuracy(teacher, labels) * labels.numel()
        for name, (decoder, dec_sae) in decoders.items():
            scores.add(name, student_logits(decoder, dec_sae, h), teacher, labels, top)
        scores.add("logit_lens", frozen.logit_lens(store[layer][:, 1:]).flatten(0, 1), teacher, labels)
        if lens is not None:
            scores.add("tuned_lens", student_logits(lens, None, h), teacher, labels)
        x_hat = _reconstruct(sae, h)
        spliced, _ = frozen.forward(ids, write={layer: lambda r: torch.cat([r[:, :1], x_hat.to(r.dtype)], 1)})
        scores.add("spliced_sae", spliced[:, 1:].flatten(0, 1), teacher, labels)
        scores.n += labels.numel()
    methods = scores.result()
    frozen_acc /= scores.n
    for m in methods.values():
        m["next_token_degradation_points"] = 100 * (frozen_acc - m["next_token_acc"])
    return {"tokens": scores.n, "frozen_ce": frozen_ce / scores.n, "frozen_next_token_acc": frozen_acc, "methods": methods}


def _reconstruct(sae: SparseAutoencoder, h_BTD: torch.Tensor) -> torch.Tensor:
    x = h_BTD[:, 1:].reshape(-1, h_BTD.shape[-1])
    enc = sae.encode(x)
    return sae.decode(enc.acts_NK, enc.indices_NK).view(h_BTD.shape[0], -1, h_BTD.shape[-1])


def _load(cfg: DecoderEvalConfig):
    dirs = [decoder_dir(d) for d in cfg.decoders]
    metas = [read_decoder_meta(d) for d in dirs]
    layers = {int(m.get("layer", -1)) for m in metas}
    if len(layers) != 1 or -1 in layers:
        raise ConfigError(f"decoder eval: all decoders must read one recorded layer (got {sorted(layers)})")
    if cfg.model == DEFAULT_MODEL and metas[0].get("model"):
        cfg = replace(cfg, model=metas[0]["model"])
    frozen = load_frozen(cfg)
    head = FrozenHead.from_frozen(frozen)
    saes: dict[str, SparseAutoencoder] = {}
    decoders = {}
    for d, meta in zip(dirs, metas):
        sae_path = str(cfg.sae) if cfg.sae is not None else meta.get("sae")
        if not sae_path:
            raise ConfigError(f"{d}: decoder.json records no SAE; pass --sae")
        if sae_path not in saes:
            saes[sae_path] = SparseAutoencoder.load(resolve_sae_dir(Path(sae_path)))
        folder = d.parent.name if d.name == "decoder" else d.name
        name = meta["arch"] if len(dirs) == 1 else f"{meta['arch']} ({folder})"
        if name in decoders:
            name = f"{name} #{len(decoders) + 1}"
        decoders[name] = (load_decoder(d, head), saes[sae_path])
    lens = TunedLens.load(cfg.lens, head) if cfg.lens is not None else None
    first_sae = next(iter(saes.values()))
    return cfg, frozen, layers.pop(), decoders, first_sae, lens, dirs


def evaluate_decoders(cfg: DecoderEvalConfig, progress: bool = True) -> dict:
    cfg, frozen, layer, decoders, sae, lens, dirs = _load(cfg)
    corpora = {"in_domain": score_corpus(cfg, frozen, layer, decoders, sae, lens, progress)}
    if cfg.ood.strip():
        ood_cfg = replace(cfg, split="ood")
        corpora["ood"] = score_corpus(ood_cfg, frozen, layer, decoders, sae, lens, progress)
    tasks = _task_suite(frozen, layer, decoders, cfg, progress) if cfg.task_suite and cfg.task_examples else None
    ind = corpora["in_domain"]
    first = next(iter(decoders))
    keys = ("kl", "top1", "ce", "next_token_acc")
    baselines = {m: {k: ind["methods"][m][k] for k in keys} for m in ("logit_lens", "tuned_lens", "spliced_sae")
                 if m in ind["methods"]}
    result = {
        **{k: ind["methods"][first][k] for k in (*keys, "next_token_degradation_points")}, "frozen_ce": ind["frozen_ce"],
        "frozen_next_token_acc": ind["frozen_next_token_acc"], "tokens": ind["tokens"],
        "decoder": first, "baselines": baselines, "layer": layer, "model": frozen.name, "data": cfg.data, "ood": cfg.ood,
        "decoders": {name: str(d) for name, d in zip(decoders, dirs)}, "corpora": corpora, "tasks": tasks,
    }
    return result


def _task_suite(frozen: FrozenLM, layer: int, decoders: dict, cfg: DecoderEvalConfig, progress: bool) -> dict:
    """The `tasks` block of eval.json: {"suite", "examples", "mode", "frozen": accuracy, decoder name: accuracy, …}."""
    tasks = task_answer_exact_match(frozen, layer, decoders, [cfg.task_suite], cfg.task_examples, cfg.seed,
                                    mode="teacher_forced", prompt_format="bare", n_samples=0, progress=progress)
    overall = tasks["overall"]
    return {"suite": cfg.task_suite, "examples": overall["examples"], "mode": tasks["mode"], "frozen": overall["frozen"],
            **{name: d["accuracy"] for name, d in overall["decoders"].items()}}


def eval_markdown(result: dict) -> str:
    corpora = result["corpora"]
    names = list(corpora["in_domain"]["methods"])
    head = ["method"] + [f"{c} {k}" for c in corpora for k in ("KL", "top-1", "CE", "next-token acc")]
    lines = [f"Decoders and baselines at layer {result['layer']} of {result['model']}: KL(p_frozen ‖ p) in nats/token "
             "over the full vocabulary, top-1 agreement with the frozen argmax, CE vs the data (nats/token), next-token "
             "accuracy P(argmax = the data's next token); "
             + ", ".join(f"{c}: {v['tokens']:,} tokens, frozen CE {v['frozen_ce']:.3f}, frozen next-token acc "
                         f"{v['frozen_next_token_acc']:.1%}" for c, v in corpora.items()),
             "", "| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for name in names:
        cells = [name]
        for c in corpora.values():
            m = c["methods"][name]
            cells += [f"{m['kl']:.3f}", f"{m['top1']:.1%}", f"{m['ce']:.3f}", f"{m['next_token_acc']:.1%}"]
        lines.append("| " + " | ".join(cells) + " |")
    drops = [f"{n} {m['next_token_degradation_points']:+.1f}" for n, m in corpora["in_domain"]["methods"].items()
             if n in result["decoders"]]
    lines += ["", "Next-token accuracy degradation (in domain, frozen − decoder, accuracy points): " + "; ".join(drops)]
    gaps = [f"{n}: exact {m['kl']:.3f} vs top-{TEACHER_K} target {m['kl_topk']:.3f}"
            for n, m in corpora["in_domain"]["methods"].items() if "kl_topk" in m]
    if gaps:
        lines += ["", "Training-target check (in domain, nats/token): " + "; ".join(gaps)]
    if result["tasks"]:
        t = result["tasks"]
        accs = ", ".join(f"{k} {t[k]:.1%}" for k in ["frozen", *result["decoders"]])
        lines += ["", f"Task-suite accuracy ({t['suite']}, {t['examples']} held-out examples, teacher-forced answer exact "
                      f"match): {accs}"]
    return "\n".join(lines)


def run_decoder_eval(cfg: DecoderEvalConfig) -> dict:
    result = evaluate_decoders(cfg, progress=not cfg.json)
    markdown = eval_markdown(result)
    out = Path(cfg.out) if cfg.out is not None else decoder_dir(cfg.decoders[0]).parent
    write_json_atomic(out / "eval.json", result)
    write_text_atomic(out / "eval.md", markdown + "\n")
    if cfg.json:
        print(json.dumps(result))
    else:
        print(markdown)
        print(f"\nwrote {out / 'eval.json'} and {out / 'eval.md'}")
    return result
