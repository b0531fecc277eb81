"""Method 3 of `explain`: an LLM turns the attribution-ranked features into one or two sentences.

The LLM only rewords what attribution found (the prompt lists the prediction and the ranked features with
their signed attributions, named by verified labels only: a statistics label is given as such, an unverified
label not at all); the faithfulness figures stay those of method 1.
"""

from __future__ import annotations

import torch

from interpret.explain_records import Explanation, FeatureAttribution

VERBALISE_PROMPT_VERSION = "verbalise-v2"


def verbalise_prompt(result: Explanation, n: int = 6) -> str:
    pred = result.prediction
    lines = [f"A language model read the text {result.text!r} and predicts the next token {pred.token!r} "
             f"with probability {pred.confidence:.2f}. The internal features that drove this prediction, "
             "strongest first (positive = supports it, negative = works against it):"]
    for card in result.features[:n]:
        lines.append(f"- {_feature_text(card)}: {card.attribution:+.2f}")
    lines.append("In one or two plain sentences, explain why the model predicts this token.")
    return "\n".join(lines)


def _feature_text(card: FeatureAttribution) -> str:
    """A verified label as is; a statistics label as what it is; an unverified label not at all."""
    if card.label and card.label_status == "verified":
        return card.label
    if card.label and card.label_status == "statistic":
        return f"feature #{card.id} (no verified label; statistics: {card.label})"
    return f"feature #{card.id} (no verified label)"


@torch.no_grad()
def _local_generate(frozen, prompt: str, max_new_tokens: int) -> str:
    tok = frozen.tokenizer
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
    else:
        enc = tok(prompt + "\nExplanation:", return_tensors="pt")
    out = frozen.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def verbalise(result: Explanation, comp, backend: str = "local", local_model: str | None = None, openai_base_url: str = "",
              openai_model: str = "", api_key_env: str = "OPENAI_API_KEY", max_new_tokens: int = 60) -> str:
    prompt = verbalise_prompt(result)
    if backend == "openai":
        from interpret.labelers import OpenAILabeler

        return OpenAILabeler(openai_base_url, openai_model, api_key_env).chat(prompt, max_tokens=max_new_tokens).strip()
    frozen = comp.frozen
    if local_model and local_model != comp.frozen.name:
        from models.config import ModelConfig
        from models.loading import load_frozen

        frozen = load_frozen(ModelConfig(model=local_model))
    return " ".join(_local_generate(frozen, prompt, max_new_tokens).split())
