"""`faithlens explain TEXT --run RUN`: why the decoder predicts the next token, and how faithful that account is.

Method 1 ranks features by their attribution to the decoder's log-prob of its predicted token y at the
last position (activation × gradient, summed over the positions where a feature fires; BOS excluded),
not by raw activation. The top `--top` features are the explanation. Its faithfulness, with p = the
decoder's probability of y:

- sufficiency = min(1, p_keep(y) / p(y)): only the named features are kept (every other feature at every
  position zeroed). 1 means the named features alone carry the prediction; `sufficient_top1` says
  whether y stays the argmax.
- comprehensiveness = max(0, (p(y) − p_ablate(y)) / p(y)): the named features are zeroed. 1 means the
  prediction disappears without them.
- top10_share = Σ of the 10 largest |attribution| / Σ |attribution| over all features.
Both are also measured for `--top` random active features (the `random_*` baselines), so a reader can
tell an informative explanation from a lucky one.
Method 2 (with a trained explainer in RUN/interpret/explainer) turns the features into a short text;
method 3 (--llm) has the labelling backend verbalise the ranked labels.
"""

from __future__ import annotations

import json
import logging
import random
import sys

import torch
from rich.console import Console

from interpret.attribution import ablate, decoder_attribution, per_feature, top_share
from interpret.components import Components, load_components
from interpret.config import ExplainConfig
from interpret.run import InterpretRun

log = logging.getLogger(__name__)


def encode_input(comp: Components, text: str, chat: bool = False) -> torch.Tensor:
    tok = comp.frozen.tokenizer
    if chat and getattr(tok, "chat_template", None):
        prompt = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        if ids[0] != comp.frozen.bos_token_id:
            ids = [comp.frozen.bos_token_id, *ids]
    else:
        ids = [comp.frozen.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]
    return torch.tensor([ids])


@torch.no_grad()
def _prob(comp: Components, indices: torch.Tensor, values: torch.Tensor, y: int) -> tuple[float, int]:
    probs = comp.decoder_logits(indices, values)[0, -1].softmax(-1)
    return float(probs[y]), int(probs.argmax())


def faithfulness(comp: Components, indices: torch.Tensor, values: torch.Tensor, y: int, named: list[int]) -> dict:
    """Sufficiency and comprehensiveness of naming `named` for the decoder's prediction y (BOS kept as context)."""
    p, _ = _prob(comp, indices, values, y)
    bos = values[:, :1]
    keep = torch.cat([bos, ablate(indices[:, 1:], values[:, 1:], named, keep=True)], 1)
    drop = torch.cat([bos, ablate(indices[:, 1:], values[:, 1:], named)], 1)
    p_keep, top_keep = _prob(comp, indices, keep, y)
    p_drop, _ = _prob(comp, indices, drop, y)
    return {"p": p, "p_keep": p_keep, "p_ablate": p_drop,
            "sufficiency": min(1.0, p_keep / p) if p > 0 else 0.0, "sufficient_top1": top_keep == y,
            "comprehensiveness": max(0.0, (p - p_drop) / p) if p > 0 else 0.0}


def explain(comp: Components, text: str, top: int = 10, chat: bool = False, labels: dict[int, str] | None = None,
            evidence=None, scores: dict | None = None, seed: int = 0) -> dict:
    labels, scores = labels or {}, scores or {}
    ids = encode_input(comp, text, chat)
    frozen_logits, store = comp.frozen.forward(ids, [comp.layer])
    frozen_probs = frozen_logits[0, -1].float().softmax(-1)
    h = store[comp.layer].float().clone()
    indices, values = comp.features(h)
    with torch.no_grad():
        probs = comp.decoder_logits(indices, values)[0, -1].softmax(-1)
    y = int(probs.argmax())
    T = ids.shape[1]
    targets = torch.full((1, T), y)
    weight = torch.zeros(1, T)
    weight[0, -1] = 1.0
    _, attr = decoder_attribution(comp, indices, values, targets, weight, "logprob")
    F_ = comp.sae.cfg.num_latents
    attr_F = per_feature(indices, attr, F_)
    ranked = [int(f) for f in attr_F.abs().argsort(descending=True) if attr_F[f] != 0]
    named = ranked[:top]
    faith = faithfulness(comp, indices, values, y, named)
    active = indices[0, 1:][values[0, 1:] > 0].unique().tolist()
    rng = random.Random(seed)
    rand = [faithfulness(comp, indices, values, y, rng.sample(active, min(top, len(active)))) for _ in range(5)] if active else []
    total = attr_F.abs().sum().item()
    last_act = {int(i): float(v) for i, v in zip(indices[0, -1].tolist(), values[0, -1].tolist()) if v > 0}
    features = []
    for f in named:
        pos_attr = (attr[0] * (indices[0] == f)).sum(-1)
        peak = int(pos_attr.abs().argmax())
        card = {"id": f, "label": labels.get(f), "activation": last_act.get(f, 0.0),
                "max_activation_in_input": float((values[0] * (indices[0] == f)).sum(-1).max()),
                "attribution": float(attr_F[f]), "share": abs(float(attr_F[f])) / total if total else 0.0,
                "peak_position": peak, "peak_token": comp.token_string(int(ids[0, peak])),
                "label_scores": scores.get(f, {})}
        if evidence is not None and f in evidence:
            fe = evidence[f]
            card.update({"density": fe.density, "examples": [_example_json(e) for e in fe.top[:3]],
                         "histogram": {"edges": fe.histogram[0], "counts": fe.histogram[1]},
                         "promoted": [list(p) for p in fe.promoted[:8]]})
        features.append(card)
    tokens = []
    for t in range(T):
        acts = [(float(v), int(i)) for i, v in zip(indices[0, t].tolist(), values[0, t].tolist()) if v > 0 and t > 0]
        acts.sort(reverse=True)
        tokens.append({"text": comp.token_string(int(ids[0, t])),
                       "features": [{"id": i, "activation": v, "label": labels.get(i)} for v, i in acts[:8]]})
    next_token = comp.token_string(y)
    top5 = probs.topk(5)
    result = {
        "text": text, "model": comp.frozen.name, "layer": comp.layer, "run": str(comp.run.root),
        "decoder": comp.meta.get("arch"), "chat": chat,
        "next_token": next_token, "next_token_id": y, "confidence": float(probs[y]),
        "frozen_next_token": comp.token_string(int(frozen_probs.argmax())), "frozen_confidence": float(frozen_probs.max()),
        "frozen_prob_of_prediction": float(frozen_probs[y]),
        "agrees_with_frozen": int(frozen_probs.argmax()) == y,
        "top_predictions": [{"token": comp.token_string(i), "prob": float(p)} for p, i in zip(top5.values.tolist(), top5.indices.tolist())],
        "tokens": tokens, "features": features, "active_features": len(active),
        "sufficiency": faith["sufficiency"], "comprehensiveness": faith["comprehensiveness"],
        "sufficient_top1": faith["sufficient_top1"], "kept_features": len(named),
        "random_sufficiency": sum(r["sufficiency"] for r in rand) / len(rand) if rand else None,
        "random_comprehensiveness": sum(r["comprehensiveness"] for r in rand) / len(rand) if rand else None,
        "top10_share": top_share(attr_F, 10),
        "trace": _trace(features),
        "explanations": {"attribution": _attribution_text(next_token, float(probs[y]), features), "decoder": None, "llm": None},
    }
    return result


def _example_json(e) -> dict:
    return {"tokens": e.tokens, "acts": e.acts, "center": e.center}


def _name(card: dict) -> str:
    return f"#{card['id']}" + (f" ({card['label']})" if card.get("label") else "")


def _trace(features: list[dict]) -> list[str]:
    """The named features in input order: where each acts most, and which way it pushes."""
    lines = []
    for card in sorted(features, key=lambda c: (c["peak_position"], -abs(c["attribution"]))):
        sign = "supports" if card["attribution"] > 0 else "opposes"
        lines.append(f"position {card['peak_position']} {card['peak_token']!r}: feature {_name(card)} {sign} the prediction "
                     f"(attribution {card['attribution']:+.3f}, {100 * card['share']:.0f}% of the total)")
    return lines


def _attribution_text(token: str, p: float, features: list[dict]) -> str:
    pro = [c for c in features if c["attribution"] > 0][:3]
    con = [c for c in features if c["attribution"] < 0][:2]
    text = f"Predicts {token!r} ({100 * p:.0f}%)"
    if pro:
        text += " mainly because of " + ", ".join(_name(c) for c in pro)
    if con:
        text += "; held back by " + ", ".join(_name(c) for c in con)
    return text + "."


def _load_side_data(run: InterpretRun) -> tuple[dict, object, dict]:
    labels, evidence, scores = {}, None, {}
    if run.labels.is_file():
        from interpret.labels import load_labels

        labels = load_labels(run)
    if run.evidence.is_file():
        from interpret.evidence import load_evidence

        evidence = load_evidence(run)
    if run.scores.is_file():
        data = json.loads(run.scores.read_text()).get("features", {})
        for f, by_backend in data.items():
            for backend in ("openai", "local", "stats"):
                if backend in by_backend:
                    scores[int(f)] = {k: v for k, v in by_backend[backend].items() if isinstance(v, (int, float))}
                    break
    return labels, evidence, scores


def run_explain(cfg: ExplainConfig) -> dict:
    run = InterpretRun(cfg.run)
    comp = load_components(run, cfg)
    labels, evidence, scores = _load_side_data(run)
    result = explain(comp, cfg.text, cfg.top, cfg.chat, labels, evidence, scores)
    if run.explainer.is_dir():
        from interpret.explainer import ExplanationDecoder

        result["explanations"]["decoder"] = ExplanationDecoder.load(run.explainer).describe(comp, cfg.text, cfg.chat)
    if cfg.llm:
        from interpret.verbalise import verbalise

        result["explanations"]["llm"] = verbalise(result, comp, cfg.llm_backend, cfg.local_model or None, cfg.openai_base_url,
                                                  cfg.openai_model, cfg.api_key_env)
    console = Console()
    if cfg.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        from interpret.dashboard import render_terminal

        render_terminal(result, console)
    if cfg.html is not None:
        from interpret.dashboard import write_html

        path = write_html(result, cfg.html)
        # with --json, stdout carries only the JSON object
        print(f"HTML dashboard: {path}", file=sys.stderr if cfg.json else sys.stdout)
    return result
