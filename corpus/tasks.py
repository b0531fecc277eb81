"""Verifiable task suites: generated from a seed, or read from GSM8K-style jsonl, with checkable answers."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Callable, Iterator

from models.errors import ConfigError


@dataclass(frozen=True)
class TaskExample:
    suite: str
    prompt: str
    """The question, without the answer."""
    answer: str
    """The reference answer, checked by exact match after `normalize_answer`."""

    def prompt_text(self) -> str:
        """What a model is given; the answer follows after one space."""
        return f"Question: {self.prompt}\nAnswer:"

    def text(self) -> str:
        return f"{self.prompt_text()} {self.answer}"


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    op = rng.choice("+-*")
    digits = rng.choice((1, 2, 2, 3))
    a, b = rng.randrange(10 ** digits), rng.randrange(10 ** rng.choice((1, digits)))
    if op == "*":
        b = rng.randrange(2, 13)
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"What is {a} {op} {b}?", str(value)


def _comparison(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(range(1000), 2)
    word = rng.choice(("larger", "smaller"))
    answer = max(a, b) if word == "larger" else min(a, b)
    return f"Which number is {word}, {a} or {b}?", str(answer)


_WORDS = ("apple", "river", "stone", "cloud", "lamp", "tiger", "bread", "chair", "music", "garden",
          "pencil", "ocean", "window", "candle", "forest", "silver", "rabbit", "mirror", "bottle", "engine")


def _counting(rng: random.Random) -> tuple[str, str]:
    target = rng.choice(_WORDS)
    others = [w for w in _WORDS if w != target]
    n = rng.randrange(0, 6)
    items = [target] * n + rng.sample(others, rng.randrange(2, 7))
    rng.shuffle(items)
    return f"How many times does the word '{target}' appear in: {' '.join(items)}?", str(n)


def _boolean(rng: random.Random) -> tuple[str, str]:
    values = [rng.choice((True, False)) for _ in range(3)]
    ops = [rng.choice(("and", "or")) for _ in range(2)]
    negate = [rng.random() < 0.3 for _ in range(3)]
    terms = [("not " if n else "") + str(v) for v, n in zip(values, negate)]
    expr = f"{terms[0]} {ops[0]} {terms[1]} {ops[1]} {terms[2]}"
    return f"What is {expr}?", str(eval(expr))  # the expression is built above from literals only


def _copying(rng: random.Random) -> tuple[str, str]:
    symbols = [rng.choice("abcdefghjkmnpqrstuvwxyz") + str(rng.randrange(10)) for _ in range(rng.randrange(3, 7))]
    seq = " ".join(symbols)
    return f"Repeat exactly: {seq}", seq


SUITES: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "arithmetic": _arithmetic,
    "comparison": _comparison,
    "counting": _counting,
    "boolean": _boolean,
    "copying": _copying,
}


def generate_tasks(seed: int = 0, suites: tuple[str, ...] = tuple(SUITES)) -> Iterator[TaskExample]:
    """An endless, deterministic round-robin over the suites; example i depends only on (seed, suite, i)."""
    for name in suites:
        if name not in SUITES:
            raise ConfigError(f"task suite: unknown suite {name!r}; known: {', '.join(SUITES)}")
    for i in count():
        name = suites[i % len(suites)]
        prompt, answer = SUITES[name](random.Random(f"{seed}:{name}:{i}"))
        yield TaskExample(name, prompt, answer)


def load_task_file(path: Path) -> list[TaskExample]:
    """GSM8K-style jsonl: one {"question", "answer"} per line, the final answer after '####'."""
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                question, answer = row["question"], row["answer"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConfigError(f"{path}:{lineno}: expected a JSON object with 'question' and 'answer' ({e})") from e
            final = answer.split("####")[-1].strip()
            examples.append(TaskExample(Path(path).stem, question.strip(), final))
    if not examples:
        raise ConfigError(f"{path}: no task examples found")
    return examples


def normalize_answer(text: str) -> str:
    """Lower-case, drop surrounding punctuation, thousands separators and articles; collapse spaces."""
    text = text.strip().lower()
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    text = re.sub(r"^[\s\"'`.,:;!?$]+|[\s\"'`.,:;!?]+$", "", text)
    return " ".join(text.split())


def is_correct(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)
