"""Checking answers: `normalize_answer` (SQuAD's normalisation, plus canonical numbers and yes/no),
`is_correct` (exact match after it) and `extract_answer` (the final answer in a model's free-text reply)."""

from __future__ import annotations

import re
import string
from collections.abc import Iterable
from decimal import Decimal, InvalidOperation
from typing import Literal

_NUMBER = re.compile(r"[-−]?\$?\d[\d,]*(?:\.\d+)?|[-−]?\$?\.\d+")
_YES_NO = {"yes": "yes", "true": "yes", "no": "no", "false": "no"}
_PUNCT = set(string.punctuation)
# suites whose answers are one number, or yes/no (`answer_kind`)
_NUMERIC_SUITES = ("arithmetic", "comparison", "counting")
_BOOLEAN_SUITES = ("boolean", "boolq")


def canonical_number(text: str) -> str | None:
    """The value of a text that is one number (optionally with $ or %, thousands commas), in plain
    decimal notation without trailing zeros; None if the text is not a single number."""
    core = text.strip().rstrip(".").replace("−", "-")
    core = re.sub(r"^(-?)[$€£]", r"\1", core).removesuffix("%").replace(" ", "")
    if not re.fullmatch(r"-?(\d{1,3}(,\d{3})+|\d+)?(\.\d+)?", core) or not any(c.isdigit() for c in core):
        return None
    try:
        value = Decimal(core.replace(",", ""))
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def normalize_answer(text: str) -> str:
    """The form answers are compared in.

    A single number becomes its value ("$1,000.00" → "1000", "-3.50" → "-3.5"); yes/no/true/false
    become "yes"/"no"; any other text is lower-cased with punctuation and the articles a/an/the
    removed and whitespace collapsed (SQuAD's normalisation), except that numbers inside it are
    canonicalised the same way ("3.50 apples" → "3.5 apples"). Unit words are not stripped here:
    `extract_answer` takes the number out of "18 dollars" for the numeric suites.
    """
    text = text.strip()
    number = canonical_number(text)
    if number is not None:
        return number
    words = [_normalize_word(w) for w in text.lower().split()]
    text = " ".join(w for w in words if w and w not in ("a", "an", "the"))
    return _YES_NO.get(text, text)


def _normalize_word(word: str) -> str:
    number = canonical_number(word.strip(string.punctuation.replace("$", "").replace("-", "")))
    if number is not None:
        return number
    word = re.sub(r"(?<=\d)[^\w\s](?=\d)", " ", word)  # "1,00" is no valid number: keep its digit groups apart
    return " ".join("".join(c for c in word if c not in _PUNCT).split())


def is_correct(prediction: str, reference: str | Iterable[str]) -> bool:
    """Exact match after normalisation against one reference or any of several."""
    references = [reference] if isinstance(reference, str) else list(reference)
    return normalize_answer(prediction) in {normalize_answer(r) for r in references}


def answer_kind(suite: str) -> Literal["numeric", "gsm8k", "boolean", "text"]:
    name = suite.split(":")[0].lower()
    if name.startswith("gsm8k"):
        return "gsm8k"
    if name in _NUMERIC_SUITES:
        return "numeric"
    if name in _BOOLEAN_SUITES:
        return "boolean"
    return "text"


def extract_answer(generated_text: str, suite: str) -> str:
    """The final answer in a model's free-text reply, by the suite's kind of answer.

    gsm8k: the number after '####' if there is one, else the last number of the reply. numeric
    (arithmetic, comparison, counting): the last number of the first non-empty line ("12 + 5 = 17"
    → "17"). boolean, boolq: the first yes/no/true/false word. Otherwise: the first non-empty line,
    without a leading "The answer is" or a label of up to three words and a colon ("Answer:",
    "Repeat exactly:" — instruct models often echo the instruction).
    """
    lines = [line.strip() for line in generated_text.strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    kind = answer_kind(suite)
    if kind == "gsm8k":
        if "####" in generated_text:
            tail = generated_text.split("####")[-1].strip()
            numbers = _NUMBER.findall(tail.splitlines()[0] if tail else "")
            return numbers[0] if numbers else tail
        numbers = _NUMBER.findall(generated_text)
        return numbers[-1].rstrip(".,") if numbers else first
    if kind == "numeric":
        numbers = _NUMBER.findall(first)
        return numbers[-1].rstrip(".,") if numbers else first
    if kind == "boolean":
        match = re.search(r"\b(yes|no|true|false)\b", generated_text, re.IGNORECASE)
        return match.group(1) if match else first
    first = re.sub(r"^(?:the\s+)?answer\s+is\b\s*:?\s*", "", first, flags=re.IGNORECASE)
    return re.sub(r"^[A-Za-z]+(?:\s+[A-Za-z]+){0,2}\s*:\s*", "", first).strip()  # a label: "Answer:", "Repeat exactly:"
