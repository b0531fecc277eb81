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

`load_suite` takes a fixed number of examples; `task_stream` is the endless stream of the same specs
that the generation environment draws prompts from. Answers are checked with `corpus.answers`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import count, cycle, islice
from pathlib import Path
from typing import Literal

from corpus.answers import normalize_answer
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


def generate_tasks(seed: int = 0, suites: tuple[str, ...] = tuple(SUITES)) -> Iterator[TaskExample]:
    """An endless, deterministic round-robin over the suites; example i depends only on (seed, suite, i)."""
    for name in suites:
        if name not in SUITES:
            raise ConfigError(f"task suite: unknown suite {name!r}; known: {', '.join(SUITES)}")
    for i in count():
        name = suites[i % len(suites)]
        prompt, answer = SUITES[name](random.Random(f"{seed}:{name}:{i}"))
        yield TaskExample(name, prompt, answer)


# -- suite specs --------------------------------------------------------------------------------------
def load_suite(spec: str, n: int, seed: int) -> list[TaskExample]:
    """`n` examples of one suite spec (see the module docstring), chosen deterministically by `seed`."""
    spec = spec.strip()
    if n <= 0:
        raise ConfigError(f"task suite {spec}: the number of examples must be positive, got {n}")
    builtin = builtin_suites(spec)
    if builtin is not None:
        return list(islice(generate_tasks(seed, builtin), n))
    examples = suite_examples(spec)
    order = random.Random(f"{seed}:{spec}").sample(range(len(examples)), min(n, len(examples)))
    return [examples[i] for i in order]


def task_stream(spec: str, seed: int) -> Iterator[TaskExample]:
    """An endless stream of a suite spec's examples (any spec `load_suite` accepts): builtin suites are
    generated from `seed`; a dataset's examples repeat in file order."""
    spec = spec.strip()
    builtin = builtin_suites(spec)
    return generate_tasks(seed, builtin) if builtin is not None else cycle(suite_examples(spec))


def builtin_suites(spec: str) -> tuple[str, ...] | None:
    """The builtin suites a spec names, or None if it names something else (a dataset or a file).

    `builtin:tasks` names all of them, `builtin:tasks:A+B` and `A+B` the ones listed; an unknown name
    after `builtin:tasks:` is an error naming it.
    """
    if spec == "builtin:tasks" or spec.startswith("builtin:tasks:"):
        names = tuple(s for s in spec.removeprefix("builtin:tasks").lstrip(":").split("+") if s) or tuple(SUITES)
    elif all(part in SUITES for part in spec.split("+")):
        names = tuple(spec.split("+"))
    else:
        return None
    unknown = [s for s in names if s not in SUITES]
    if unknown:
        raise ConfigError(f"task suite {spec}: unknown builtin suite(s) {', '.join(unknown)}; known: {', '.join(SUITES)}")
    return names


def suite_examples(spec: str) -> list[TaskExample]:
    """Every example of a dataset or file spec, in file order."""
    kind, _, path = spec.partition(":")
    if kind in DATASETS:
        rows, where = _dataset_rows(kind, path)
        return _examples(kind, kind, rows, where)
    if spec.startswith("hf:"):
        return _examples(spec.split(":")[1].split("/")[-1], "qa", _hf_rows(spec), spec)
    if Path(spec).expanduser().suffix in (".jsonl", ".parquet"):
        return _examples(Path(spec).stem, "qa", _read_rows(Path(spec).expanduser()), spec)
    raise ConfigError(
        f"task suite: unknown suite {spec!r}; expected one of {', '.join(SUITES)} (or several joined by +), "
        f"builtin:tasks[:SUITE], {', '.join(d + '[:PATH]' for d in DATASETS)}, hf:NAME[:CONFIG[:SPLIT]] "
        "or a .jsonl/.parquet file with question and answer fields"
    )


# -- dataset files ------------------------------------------------------------------------------------
# Where each dataset lives: a default local file name in ../shared/data/, and its hub id.
_DATASET_SOURCES = {
    "gsm8k": ("gsm8k_train.jsonl", "hf:openai/gsm8k:main:test"),
    "boolq": ("boolq_validation.jsonl", "hf:google/boolq::validation"),
    "squad": ("squad_validation.jsonl", "hf:rajpurkar/squad::validation"),
}


def _dataset_rows(kind: str, path: str) -> tuple[list[dict], str]:
    if path:
        if path.startswith("hf:"):
            return _hf_rows(path), path
        return _read_rows(Path(path).expanduser()), path
    local_name, hub = _DATASET_SOURCES[kind]
    local = SHARED_DATA / local_name
    if local.is_file():
        return _read_rows(local), str(local)
    from models.loading import hub_reachable  # models.loading imports torch; a suite from a file needs none

    if hub_reachable():
        return _hf_rows(hub), hub
    raise ConfigError(
        f"task suite {kind}: no local file {local} and the Hugging Face hub is not reachable; "
        f"pass {kind}:PATH with a .jsonl or .parquet file of the dataset's standard fields, or go online for {hub}"
    )


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
