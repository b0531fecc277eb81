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
from interpret.explain_records import (
    AblationScore,
    Explanation,
    Explanations,
    Faithfulness,
    FeatureAttribution,
    FeatureContext,
    Prediction,
    TokenActivations,
    TokenFeature,
    TokenProb,
)
from interpret.run import InterpretRun
from models.io import read_json

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


def faithfulness(comp: Components, indices: torch.Tensor, values: torch.Tensor, y: int, named: list[int]) -> AblationScore:
    """Sufficiency and comprehensiveness of naming `named` for the decoder's prediction y (BOS kept as context)."""
    p, _ = _prob(comp, indices, values, y)
    bos = values[:, :1]
    keep = torch.cat([bos, ablate(indices[:, 1:], values[:, 1:], named, keep=True)], 1)
    drop = torch.cat([bos, ablate(indices[:, 1:], values[:, 1:], named)], 1)
    p_keep, top_keep = _prob(comp, indices, keep, y)
    p_drop, _ = _prob(comp, indices, drop, y)
    return AblationScore(p=p, p_keep=p_keep, p_ablate=p_drop,
                         sufficiency=min(1.0, p_keep / p) if p > 0 else 0.0,
                         comprehensiveness=max(0.0, (p - p_drop) / p) if p > 0 else 0.0,
                         sufficient_top1=top_keep == y)


def _prediction(comp: Components, probs: torch.Tensor, frozen_probs: torch.Tensor) -> Prediction:
    y = int(probs.argmax())
    top5 = probs.topk(5)
    return Prediction(token=comp.token_string(y), token_id=y, confidence=float(probs[y]),
                      frozen_token=comp.token_string(int(frozen_probs.argmax())),
                      frozen_confidence=float(frozen_probs.max()), frozen_prob_of_prediction=float(frozen_probs[y]),
                      agrees_with_frozen=int(frozen_probs.argmax()) == y,
                      top=[TokenProb(comp.token_string(i), float(p)) for p, i in zip(top5.values.tolist(), top5.indices.tolist())])


def _feature_context(fe) -> FeatureContext:
    return FeatureContext(density=fe.density, examples=fe.top[:3], histogram=fe.histogram,
                          promoted=[tuple(p) for p in fe.promoted[:8]])


def _named_features(comp: Components, ids: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                    attr: torch.Tensor, attr_F: torch.Tensor, named: list[int], labels: dict[int, str], evidence,
                    scores: dict) -> list[FeatureAttribution]:
    total = attr_F.abs().sum().item()
    last_act = {int(i): float(v) for i, v in zip(indices[0, -1].tolist(), values[0, -1].tolist()) if v > 0}
    features = []
    for f in named:
        pos_attr = (attr[0] * (indices[0] == f)).sum(-1)
        peak = int(pos_attr.abs().argmax())
        features.append(FeatureAttribution(
            id=f, label=labels.get(f), activation=last_act.get(f, 0.0),
            max_activation_in_input=float((values[0] * (indices[0] == f)).sum(-1).max()),
            attribution=float(attr_F[f]), share=abs(float(attr_F[f])) / total if total else 0.0,
            peak_position=peak, peak_token=comp.token_string(int(ids[0, peak])), label_scores=scores.get(f, {}),
            context=_feature_context(evidence[f]) if evidence is not None and f in evidence else None))
    return features


def _token_strip(comp: Components, ids: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                 labels: dict[int, str]) -> list[TokenActivations]:
    tokens = []
    for t in range(ids.shape[1]):
        acts = [(float(v), int(i)) for i, v in zip(indices[0, t].tolist(), values[0, t].tolist()) if v > 0 and t > 0]
        acts.sort(reverse=True)
        tokens.append(TokenActivations(comp.token_string(int(ids[0, t])),
                                       [TokenFeature(i, v, labels.get(i)) for v, i in acts[:8]]))
    return tokens


def explain(comp: Components, text: str, top: int = 10, chat: bool = False, labels: dict[int, str] | None = None,
            evidence=None, scores: dict | None = None, seed: int = 0) -> Explanation:
    """Name the `top` features behind the decoder's next token for `text`, and test that account (see the module doc).

    `labels`, `evidence` and `scores` are the run's side data (any may be missing); `seed` draws the random baseline.
    """
    labels, scores = labels or {}, scores or {}
    ids = encode_input(comp, text, chat)
    frozen_logits, store = comp.frozen.forward(ids, [comp.layer])
    frozen_probs = frozen_logits[0, -1].float().softmax(-1)
    h = store[comp.layer].float().clone()
    indices, values = comp.features(h)
    with torch.no_grad():
        probs = comp.decoder_logits(indices, values)[0, -1].softmax(-1)
    prediction = _prediction(comp, probs, frozen_probs)
    y = prediction.token_id
    T = ids.shape[1]
    targets = torch.full((1, T), y)
    weight = torch.zeros(1, T)
    weight[0, -1] = 1.0
    _, attr = decoder_attribution(comp, indices, values, targets, weight, "logprob")
    attr_F = per_feature(indices, attr, comp.sae.cfg.num_latents)
    ranked = [int(f) for f in attr_F.abs().argsort(descending=True) if attr_F[f] != 0]
    named = ranked[:top]
    active = indices[0, 1:][values[0, 1:] > 0].unique().tolist()
    rng = random.Random(seed)
    rand = [faithfulness(comp, indices, values, y, rng.sample(active, min(top, len(active)))) for _ in range(5)] if active else []
    faith = Faithfulness.measure(faithfulness(comp, indices, values, y, named), len(named), top_share(attr_F, 10), rand)
    features = _named_features(comp, ids, indices, values, attr, attr_F, named, labels, evidence, scores)
    return Explanation(
        text=text, model=comp.frozen.name, layer=comp.layer, run=str(comp.run.root), decoder=comp.meta.get("arch"),
        chat=chat, prediction=prediction, tokens=_token_strip(comp, ids, indices, values, labels), features=features,
        active_features=len(active), faithfulness=faith, trace=_trace(features),
        explanations=Explanations(attribution=_attribution_text(prediction.token, prediction.confidence, features)))


def _trace(features: list[FeatureAttribution]) -> list[str]:
    """The named features in input order: where each acts most, and which way it pushes."""
    lines = []
    for card in sorted(features, key=lambda c: (c.peak_position, -abs(c.attribution))):
        sign = "supports" if card.attribution > 0 else "opposes"
        lines.append(f"position {card.peak_position} {card.peak_token!r}: feature {card.name} {sign} the prediction "
                     f"(attribution {card.attribution:+.3f}, {100 * card.share:.0f}% of the total)")
    return lines


def _attribution_text(token: str, p: float, features: list[FeatureAttribution]) -> str:
    pro = [c for c in features if c.attribution > 0][:3]
    con = [c for c in features if c.attribution < 0][:2]
    text = f"Predicts {token!r} ({100 * p:.0f}%)"
    if pro:
        text += " mainly because of " + ", ".join(c.name for c in pro)
    if con:
        text += "; held back by " + ", ".join(c.name for c in con)
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
        from interpret.scoring import SCORE_KEYS

        data = read_json(run.scores).get("features", {})
        for f, by_backend in data.items():
            for backend in ("openai", "local", "stats"):
                if backend in by_backend:
                    scores[int(f)] = {k: by_backend[backend][k] for k in SCORE_KEYS
                                      if isinstance(by_backend[backend].get(k), (int, float))}
                    break
    return labels, evidence, scores


def run_explain(cfg: ExplainConfig) -> Explanation:
    run = InterpretRun(cfg.run)
    comp = load_components(run, cfg)
    labels, evidence, scores = _load_side_data(run)
    result = explain(comp, cfg.text, cfg.top, cfg.chat, labels, evidence, scores)
    if run.explainer.is_dir():
        from interpret.explainer import ExplanationDecoder

        result.explanations.decoder = ExplanationDecoder.load(run.explainer).describe(comp, cfg.text, cfg.chat)
    if cfg.llm:
        from interpret.verbalise import verbalise

        result.explanations.llm = verbalise(result, comp, cfg.llm_backend, cfg.local_model or None, cfg.openai_base_url,
                                            cfg.openai_model, cfg.api_key_env)
    console = Console()
    if cfg.json:
        print(json.dumps(result.to_json(), ensure_ascii=False))
    else:
        from interpret.dashboard import render_terminal

        render_terminal(result, console)
    if cfg.html is not None:
        from interpret.dashboard import write_html

        path = write_html(result, cfg.html)
        # with --json, stdout carries only the JSON object
        print(f"HTML dashboard: {path}", file=sys.stderr if cfg.json else sys.stdout)
    return result
