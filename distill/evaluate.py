"""`faithlens decoder eval`: decoders and the layer's baselines on the same held-out tokens.

For every method: KL(p_frozen ‖ p_method) over the full vocabulary (nats/token), top-1 agreement
with the frozen model's argmax, and cross-entropy against the data's next token, in domain (the
eval split of --data) and out of domain (--ood). Methods: each decoder; the logit lens; the tuned
lens (with --lens); the SAE-spliced frozen model (all upper layers kept: the upper bound).
Decoders also report `kl_topk`, the KL to the cached-style top-k + rest target, to show what the
training target loses against the exact one. Position 0 (BOS) is not scored.
Task accuracy: teacher-forced exact match on a builtin suite's answer tokens (every answer token
must be the argmax), for the frozen model and each decoder.
"""

from __future__ import annotations

import json
from dataclasses import replace
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from corpus.cache import teacher_targets
from corpus.packing import EVAL_SEED_OFFSET, sequences
from corpus.tasks import generate_tasks
from distill.config import DecoderEvalConfig
from distill.loss import kl_full, kl_topk
from distill.student import student_logits
from models.config import DEFAULT_MODEL
from models.decoder import load_decoder, read_decoder_meta
from models.errors import ConfigError
from models.frozen import FrozenLM
from models.head import FrozenHead
from models.io import write_json_atomic, write_text_atomic
from models.lens import TunedLens
from models.loading import load_frozen
from sae.model import SparseAutoencoder

TEACHER_K = 64


def decoder_dir(path: Path) -> Path:
    path = Path(path)
    return path / "decoder" if (path / "decoder" / "decoder.json").is_file() else path


class Scores:
    """Running sums of KL, top-1 agreement and CE per method."""

    def __init__(self):
        self.sums: dict[str, dict[str, float]] = {}
        self.n = 0

    def add(self, method: str, logits_NV: torch.Tensor, teacher_logp_NV: torch.Tensor, labels_N: torch.Tensor,
            teacher_top: dict | None = None) -> None:
        s = self.sums.setdefault(method, {"kl": 0.0, "top1": 0.0, "ce": 0.0})
        logits = logits_NV.float()
        s["kl"] += kl_full(teacher_logp_NV, logits).sum().item()
        s["top1"] += (logits.argmax(-1) == teacher_logp_NV.argmax(-1)).sum().item()
        s["ce"] += F.cross_entropy(logits, labels_N, reduction="sum").item()
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
    frozen_ce = 0.0
    for start in tqdm(range(0, len(seqs), cfg.batch_size), desc=f"decoder eval ({cfg.split})", unit="batch",
                      disable=not progress):
        batch = seqs[start : start + cfg.batch_size]
        ids = torch.from_numpy(np.stack([p.tokens for p in batch]))
        labels = torch.from_numpy(np.stack([p.next_ids for p in batch]))[:, 1:].flatten()
        logits, store = frozen.forward(ids, [layer])
        h = store[layer].float()
        teacher = logits[:, 1:].float().log_softmax(-1).flatten(0, 1)
        top = {k: v.flatten(0, 1) for k, v in teacher_targets(logits[:, 1:], TEACHER_K).items()}
        frozen_ce += F.nll_loss(teacher, labels, reduction="sum").item()
        for name, (decoder, dec_sae) in decoders.items():
            scores.add(name, student_logits(decoder, dec_sae, h), teacher, labels, top)
        scores.add("logit_lens", frozen.logit_lens(store[layer][:, 1:]).flatten(0, 1), teacher, labels)
        if lens is not None:
            scores.add("tuned_lens", student_logits(lens, None, h), teacher, labels)
        x_hat = _reconstruct(sae, h)
        spliced, _ = frozen.forward(ids, write={layer: lambda r: torch.cat([r[:, :1], x_hat.to(r.dtype)], 1)})
        scores.add("spliced_sae", spliced[:, 1:].flatten(0, 1), teacher, labels)
        scores.n += labels.numel()
    return {"tokens": scores.n, "frozen_ce": frozen_ce / scores.n, "methods": scores.result()}


def _reconstruct(sae: SparseAutoencoder, h_BTD: torch.Tensor) -> torch.Tensor:
    x = h_BTD[:, 1:].reshape(-1, h_BTD.shape[-1])
    enc = sae.encode(x)
    return sae.decode(enc.acts_NK, enc.indices_NK).view(h_BTD.shape[0], -1, h_BTD.shape[-1])


@torch.inference_mode()
def task_accuracy(frozen: FrozenLM, layer: int, decoders: dict, suite: str, n: int, seed: int) -> dict:
    """Teacher-forced exact match on the answer tokens of `n` held-out examples of a builtin suite."""
    examples = list(islice(generate_tasks(seed + EVAL_SEED_OFFSET, (suite,)), n))
    correct = {"frozen": 0, **{name: 0 for name in decoders}}
    for ex in examples:
        prompt = frozen.tokenizer(ex.prompt_text(), add_special_tokens=False)["input_ids"]
        full = frozen.tokenizer(ex.text(), add_special_tokens=False)["input_ids"]
        ids = torch.tensor([[frozen.bos_token_id, *full]])
        answer_pos = torch.arange(len(prompt), len(full))  # position p predicts token p + 1 (BOS shifts by one)
        targets = ids[0, answer_pos + 1]
        logits, store = frozen.forward(ids, [layer])
        correct["frozen"] += bool((logits[0, answer_pos].argmax(-1) == targets).all())
        for name, (decoder, dec_sae) in decoders.items():
            dec_logits = student_logits(decoder, dec_sae, store[layer].float()).view(len(full), -1)
            correct[name] += bool((dec_logits[answer_pos - 1].argmax(-1) == targets).all())
    return {"suite": suite, "examples": len(examples), **{k: v / max(1, len(examples)) for k, v in correct.items()}}


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
            from sae.metrics import resolve_sae_dir

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
    tasks = task_accuracy(frozen, layer, decoders, cfg.task_suite, cfg.task_examples, cfg.seed) if cfg.task_suite else None
    ind = corpora["in_domain"]
    first = next(iter(decoders))
    baselines = {m: {k: ind["methods"][m][k] for k in ("kl", "top1", "ce")} for m in ("logit_lens", "tuned_lens", "spliced_sae")
                 if m in ind["methods"]}
    result = {
        **{k: ind["methods"][first][k] for k in ("kl", "top1", "ce")}, "frozen_ce": ind["frozen_ce"], "tokens": ind["tokens"],
        "decoder": first, "baselines": baselines, "layer": layer, "model": frozen.name, "data": cfg.data, "ood": cfg.ood,
        "decoders": {name: str(d) for name, d in zip(decoders, dirs)}, "corpora": corpora, "tasks": tasks,
    }
    return result


def eval_markdown(result: dict) -> str:
    corpora = result["corpora"]
    names = list(corpora["in_domain"]["methods"])
    head = ["method"] + [f"{c} {k}" for c in corpora for k in ("KL", "top-1", "CE")]
    lines = [f"Decoders and baselines at layer {result['layer']} of {result['model']}: KL(p_frozen ‖ p) in nats/token "
             "over the full vocabulary, top-1 agreement with the frozen argmax, CE vs the data (nats/token); "
             + ", ".join(f"{c}: {v['tokens']:,} tokens, frozen CE {v['frozen_ce']:.3f}" for c, v in corpora.items()),
             "", "| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for name in names:
        cells = [name]
        for c in corpora.values():
            m = c["methods"][name]
            cells += [f"{m['kl']:.3f}", f"{m['top1']:.1%}", f"{m['ce']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    gaps = [f"{n}: exact {m['kl']:.3f} vs top-{TEACHER_K} target {m['kl_topk']:.3f}"
            for n, m in corpora["in_domain"]["methods"].items() if "kl_topk" in m]
    if gaps:
        lines += ["", "Training-target check (in domain, nats/token): " + "; ".join(gaps)]
    if result["tasks"]:
        t = result["tasks"]
        accs = ", ".join(f"{k} {t[k]:.1%}" for k in ["frozen", *result["decoders"]])
        lines += ["", f"Task accuracy ({t['suite']}, {t['examples']} held-out examples, teacher-forced exact match): {accs}"]
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
