"""Verifiable task suites: generated from a seed, or read from GSM8K / BoolQ / SQuAD style files, with
checkable answers.

A suite spec (`load_suite`) is one of
- a builtin suite: `arithmetic`, `comparison`, `counting`, `boolean`, `copying`, several joined by `+`,
  or `builtin:tasks[:SUITE[+SUITE]]`;
- `gsm8k[:PATH]`, `boolq[:PATH]`, `squad[:PATH]`: a local .jsonl/.parquet file with the dataset's
  standard fields; without PATH a file in ../shared/data/ next to the repository if there is one,
  else the Hugging Face dataset when the hub is reachable;
- `hf:NAME[:CONFIG[:SPLIT]]` read as a GSM8K-style question/answer dataset;
- a path to a .jsonl/.parquet file with `question` and `answer` (or `answers`) fields.

Answers are compared after `normalize_answer` (SQuAD's normalisation, plus canonical numbers and
yes/no); `extract_answer` pulls the final answer out of a model's free-text reply first.
"""

from __future__ import annotations

import json
import os
import random
import re
import string
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from itertools import count, islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal

from models.errors import ConfigError

PromptFormat = Literal["bare", "chat", "auto"]
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@dataclass(frozen=True)
class TaskExample:
    suite: str
    prompt: str
    """The question, without the answer."""
    answer: str
    """The reference answer, checked by exact match after `normalize_answer`."""
    answers: tuple[str, ...] = ()
    """Further accepted references (SQuAD lists several); `answer` is always accepted too."""
    context: str = ""
    """A passage the question is about (BoolQ, SQuAD), shown before the question."""

    @property
    def references(self) -> tuple[str, ...]:
        return (self.answer, *(a for a in self.answers if a != self.answer))

    def question_text(self) -> str:
        """The user's message: the passage (if any), then the question."""
        return f"{self.context}\n\n{self.prompt}" if self.context else self.prompt

    def prompt_text(self) -> str:
        """What a model is given in the bare format; the answer follows after one space."""
        passage = f"{self.context}\n" if self.context else ""
        return f"{passage}Question: {self.prompt}\nAnswer:"

    def text(self) -> str:
        return f"{self.prompt_text()} {self.answer}"


# -- builtin suites ----------------------------------------------------------------------------------
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
DATASETS = ("gsm8k", "boolq", "squad")
_NUMERIC_SUITES = ("arithmetic", "comparison", "counting")
_BOOLEAN_SUITES = ("boolean", "boolq")


def generate_tasks(seed: int = 0, suites: tuple[str, ...] = tuple(SUITES)) -> Iterator[TaskExample]:
    """An endless, deterministic round-robin over the suites; example i depends only on (seed, suite, i)."""
    for name in suites:
        if name not in SUITES:
            raise ConfigError(f"task suite: unknown suite {name!r}; known: {', '.join(SUITES)}")
    for i in count():
        name = suites[i % len(suites)]
        prompt, answer = SUITES[name](random.Random(f"{seed}:{name}:{i}"))
        yield TaskExample(name, prompt, answer)


# -- dataset files ------------------------------------------------------------------------------------
def load_task_file(path: Path) -> list[TaskExample]:
    """GSM8K-style jsonl: one {"question", "answer"} per line, the final answer after '####'."""
    return _examples(Path(path).stem, "qa", _read_rows(Path(path)), str(path))


# Where each dataset lives: a default local file name in ../shared/data/, and its hub id.
_DATASET_SOURCES = {
    "gsm8k": ("gsm8k_train.jsonl", "hf:openai/gsm8k:main:test"),
    "boolq": ("boolq_validation.jsonl", "hf:google/boolq::validation"),
    "squad": ("squad_validation.jsonl", "hf:rajpurkar/squad::validation"),
}


def load_suite(spec: str, n: int, seed: int) -> list[TaskExample]:
    """`n` examples of one suite spec (see the module docstring), chosen deterministically by `seed`."""
    spec = spec.strip()
    if n <= 0:
        raise ConfigError(f"task suite {spec}: the number of examples must be positive, got {n}")
    builtin = _builtin_names(spec)
    if builtin is not None:
        return list(islice(generate_tasks(seed, builtin), n))
    kind, _, path = spec.partition(":")
    if kind in DATASETS:
        rows, where = _dataset_rows(kind, path)
        examples = _examples(kind, kind, rows, where)
    elif spec.startswith("hf:"):
        examples = _examples(spec.split(":")[1].split("/")[-1], "qa", _hf_rows(spec), spec)
    elif Path(spec).expanduser().suffix in (".jsonl", ".parquet"):
        examples = _examples(Path(spec).stem, "qa", _read_rows(Path(spec).expanduser()), spec)
    else:
        raise ConfigError(
            f"task suite: unknown suite {spec!r}; expected one of {', '.join(SUITES)} (or several joined by +), "
            f"builtin:tasks[:SUITE], {', '.join(d + '[:PATH]' for d in DATASETS)}, hf:NAME[:CONFIG[:SPLIT]] "
            "or a .jsonl/.parquet file with question and answer fields"
        )
    order = random.Random(f"{seed}:{spec}").sample(range(len(examples)), min(n, len(examples)))
    return [examples[i] for i in order]


def _builtin_names(spec: str) -> tuple[str, ...] | None:
    if spec.startswith("builtin:tasks"):
        names = tuple(s for s in spec.removeprefix("builtin:tasks").lstrip(":").split("+") if s) or tuple(SUITES)
    elif all(part in SUITES for part in spec.split("+")):
        names = tuple(spec.split("+"))
    else:
        return None
    unknown = [s for s in names if s not in SUITES]
    if unknown:
        raise ConfigError(f"task suite {spec}: unknown builtin suite(s) {', '.join(unknown)}; known: {', '.join(SUITES)}")
    return names


def _dataset_rows(kind: str, path: str) -> tuple[list[dict], str]:
    if path:
        if path.startswith("hf:"):
            return _hf_rows(path), path
        return _read_rows(Path(path).expanduser()), path
    local_name, hub = _DATASET_SOURCES[kind]
    local = SHARED_DATA / local_name
    if local.is_file():
        return _read_rows(local), str(local)
    if _hub_reachable():
        return _hf_rows(hub), hub
    raise ConfigError(
        f"task suite {kind}: no local file {local} and the Hugging Face hub is not reachable; "
        f"pass {kind}:PATH with a .jsonl or .parquet file of the dataset's standard fields, or go online for {hub}"
    )


def _hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        return False
    from models.loading import _reachable

    return _reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise ConfigError(f"task suite: no such file: {path}")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    return rows


def _hf_rows(spec: str) -> list[dict]:
    name, config, split = (spec.removeprefix("hf:").split(":") + [None, None])[:3]
    try:
        import datasets

        return list(datasets.load_dataset(name, config or None, split=split or "test"))
    except Exception as e:  # datasets raises many types for offline / unknown datasets
        raise ConfigError(f"task suite {spec}: could not open the Hugging Face dataset ({type(e).__name__}: {str(e)[:200]})") from None


def _examples(suite: str, kind: str, rows: Iterable[dict], where: str) -> list[TaskExample]:
    examples = []
    for i, row in enumerate(rows, 1):
        try:
            examples.append(_ROW_READERS[kind](suite, row))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"{where}: row {i}: expected {_ROW_FIELDS[kind]} ({type(e).__name__}: {e})") from None
    if not examples:
        raise ConfigError(f"{where}: no task examples found")
    return examples


def _qa_row(suite: str, row: dict) -> TaskExample:
    references = row["answers"] if "answer" not in row else [row["answer"]]
    references = [str(a).split("####")[-1].strip() for a in _answer_texts(references)]
    if not references:
        raise ValueError("no reference answer")
    context = str(row.get("context") or row.get("passage") or "").strip()
    return TaskExample(suite, str(row["question"]).strip(), references[0], tuple(references[1:]), context)


def _boolq_row(suite: str, row: dict) -> TaskExample:
    label = row["answer"] if "answer" in row else row["label"]  # google/boolq: bool; SuperGLUE: 0/1
    if isinstance(label, str):
        label = normalize_answer(label) == "yes"
    question = str(row["question"]).strip()
    question = question[0].upper() + question[1:] + ("" if question.endswith("?") else "?")
    return TaskExample(suite, question, "yes" if label else "no", context=str(row["passage"]).strip())


def _squad_row(suite: str, row: dict) -> TaskExample:
    references = _answer_texts(row["answers"])
    if not references:
        raise ValueError("no reference answer (SQuAD 2.0 unanswerable questions are not supported)")
    return TaskExample(suite, str(row["question"]).strip(), references[0], tuple(references[1:]), str(row["context"]).strip())


def _answer_texts(answers) -> list[str]:
    """SQuAD's {"text": [...], "answer_start": [...]}, a list of strings, or one string."""
    if isinstance(answers, dict):
        answers = answers["text"]
    if isinstance(answers, str):
        answers = [answers]
    return list(dict.fromkeys(str(a).strip() for a in answers if str(a).strip()))


_ROW_READERS = {"qa": _qa_row, "gsm8k": _qa_row, "boolq": _boolq_row, "squad": _squad_row}
_ROW_FIELDS = {
    "qa": "a JSON object with 'question' and 'answer' (or 'answers')",
    "gsm8k": "a JSON object with 'question' and 'answer' (the final answer after '####')",
    "boolq": "a JSON object with 'question', 'passage' and a boolean 'answer' (or 0/1 'label')",
    "squad": "a JSON object with 'context', 'question' and 'answers' ({'text': [...]} or a list of strings)",
}


# -- prompts ------------------------------------------------------------------------------------------
def prompt_token_ids(example: TaskExample, tokenizer, prompt_format: PromptFormat, bos_token_id: int) -> list[int]:
    """Token ids of the prompt, starting with BOS.

    bare: "Question: …\\nAnswer:"; chat: the tokenizer's chat template with the question as the user's
    turn and the assistant's turn opened; auto: chat when the tokenizer has a chat template.
    """
    if prompt_format == "auto":
        prompt_format = "chat" if getattr(tokenizer, "chat_template", None) else "bare"
    if prompt_format == "bare":
        ids = tokenizer(example.prompt_text(), add_special_tokens=False)["input_ids"]
    elif prompt_format == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("--prompt-format chat: the model's tokenizer has no chat template; use --prompt-format bare")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": example.question_text()}],
                                            add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if not isinstance(ids, list) else ids)
    else:
        raise ConfigError(f"--prompt-format: expected bare, chat or auto, got {prompt_format!r}")
    return ids if ids[:1] == [bos_token_id] else [bos_token_id, *ids]


# -- answers -----------------------------------------------------------------------------------------
_NUMBER = re.compile(r"[-−]?\$?\d[\d,]*(?:\.\d+)?|[-−]?\$?\.\d+")
_YES_NO = {"yes": "yes", "true": "yes", "no": "no", "false": "no"}
_PUNCT = set(string.punctuation)


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
