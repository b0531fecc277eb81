"""builtin:self — text sampled from the frozen model itself, from varied prompts, batched and cached.

Samples are appended to a jsonl file keyed by (model, seed, generation settings), so a later
run reuses them and asks the model only for what it still needs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from itertools import count
from pathlib import Path

import torch

from models.frozen import FrozenLM
from models.io import cache_root

log = logging.getLogger(__name__)

_TOPICS = ("the ocean", "a small town", "volcanoes", "the history of writing", "bread baking",
           "prime numbers", "a train journey", "honey bees", "the moon landing", "chess openings",
           "a rainy afternoon", "photosynthesis", "ancient Rome", "learning to code", "a lost key",
           "mountain weather", "the printing press", "friendship", "electric cars", "a jazz concert")
_INSTRUCTIONS = ("Write a short story about {}.", "Explain {} to a ten-year-old.",
                 "Write three facts about {}.", "Describe {} in a few sentences.",
                 "Write a short poem about {}.", "What are the pros and cons of {}?")
_OPENINGS = ("The most surprising thing about {} is", "In this article we look at {}.",
             "Here is what I learned about {}:", "Chapter 1.", "Dear friend, I write to tell you about {}.")

GENERATION = {"max_new_tokens": 160, "temperature": 0.9, "top_p": 0.95, "batch_size": 32}


def _prompt(frozen: FrozenLM, i: int) -> str:
    topic = _TOPICS[i % len(_TOPICS)]
    if (i // len(_TOPICS)) % 3 == 2:
        return _OPENINGS[i % len(_OPENINGS)].format(topic)
    instruction = _INSTRUCTIONS[(i // len(_TOPICS)) % len(_INSTRUCTIONS)].format(topic)
    template = getattr(frozen.tokenizer, "chat_template", None)
    if template:
        return frozen.tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
        )
    return instruction + "\n"


def samples_path(frozen: FrozenLM, seed: int) -> Path:
    key = json.dumps({"model": frozen.fingerprint(), "seed": seed, "gen": GENERATION, "v": 1}, sort_keys=True)
    digest = hashlib.blake2b(key.encode(), digest_size=8).hexdigest()
    return cache_root() / "self_samples" / f"{digest}.jsonl"


def iter_self_samples(frozen: FrozenLM, seed: int = 0) -> Iterator[str]:
    """Endless model samples: first the cached ones in order, then new batches appended to the cache."""
    path = samples_path(frozen, seed)
    done = _read_cached(path)
    yield from done
    path.parent.mkdir(parents=True, exist_ok=True)
    bs = GENERATION["batch_size"]
    for batch in count(len(done) // bs):
        texts = _generate_batch(frozen, [_prompt(frozen, batch * bs + j) for j in range(bs)], seed * 1_000_003 + batch)
        with open(path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps({"text": t}) + "\n" for t in texts))
        yield from texts


def _read_cached(path: Path) -> list[str]:
    if not path.exists():
        return []
    texts, good_bytes = [], 0
    with open(path, "rb") as f:
        for line in f:
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
                break  # a run killed mid-write: keep what precedes the broken line
            good_bytes += len(line)
    if good_bytes != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
    bs = GENERATION["batch_size"]
    return texts[: len(texts) // bs * bs]  # whole batches only, so resumed batches line up


@torch.inference_mode()
def _generate_batch(frozen: FrozenLM, prompts: list[str], seed: int) -> list[str]:
    tok = frozen.tokenizer
    old_side = tok.padding_side
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    tok.padding_side = old_side
    torch.manual_seed(seed)
    out = frozen.model.generate(
        **{k: v.to(frozen.device) for k, v in enc.items()},
        do_sample=True,
        temperature=GENERATION["temperature"],
        top_p=GENERATION["top_p"],
        max_new_tokens=GENERATION["max_new_tokens"],
        pad_token_id=tok.pad_token_id,
    )
    texts = []
    for prompt, row in zip(prompts, out[:, enc["input_ids"].shape[1]:]):
        completion = tok.decode(row, skip_special_tokens=True)
        texts.append(prompt + completion)
    return texts
