"""Text sources: local files and folders, Hugging Face datasets, generated task suites, model samples.

A source spec is `SOURCE[*WEIGHT]`, several joined by commas. Each source yields documents
(strings); `corpus.packing` tokenizes and mixes them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from corpus.tasks import builtin_suites, generate_tasks
from models.errors import ConfigError

if TYPE_CHECKING:
    from corpus.config import CorpusConfig

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
BUILTINS = ("builtin:tasks", "builtin:self")
_BLOCK_CHARS = 32_000  # a long text file is read as blocks of whole paragraphs of about this size


@dataclass(frozen=True)
class Source:
    spec: str
    """The source as written, without its weight."""
    weight: float

    @property
    def kind(self) -> str:
        if self.spec == "builtin:self":
            return self.spec
        if self.suites:
            return "builtin:tasks"
        if self.spec.startswith("hf:"):
            return "hf"
        return "folder" if Path(self.spec).expanduser().is_dir() else "file"

    @property
    def suites(self) -> tuple[str, ...]:
        """The task suites of a builtin:tasks[:A+B] source; empty for any other source."""
        # only the prefixed form: a bare suite name here would shadow a folder of that name
        return (builtin_suites(self.spec) or ()) if self.spec.startswith("builtin:") else ()

    @property
    def finite(self) -> bool:
        return self.kind not in BUILTINS

    def files(self) -> list[Path]:
        path = Path(self.spec).expanduser()
        if self.kind == "file":
            return [path]
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise ConfigError(f"--data: folder {self.spec} holds no {'/'.join(TEXT_SUFFIXES)} files")
        return files

    def identity(self) -> dict:
        """What determines this source's text, for cache keys (file contents are hashed)."""
        if self.kind in ("file", "folder"):
            digest = hashlib.blake2b(digest_size=16)
            for path in self.files():
                digest.update(str(path.relative_to(Path(self.spec).expanduser()) if self.kind == "folder" else path.name).encode())
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        digest.update(block)
            return {"kind": self.kind, "content": digest.hexdigest(), "weight": self.weight}
        return {"kind": self.kind, "spec": self.spec, "weight": self.weight}


def parse_sources(spec: str, flag: str = "--data") -> list[Source]:
    """Parse `A*2,B,C*0.5`; check that files exist and weights are positive."""
    sources = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, _, weight_text = part.partition("*")
        try:
            weight = float(weight_text) if weight_text else 1.0
        except ValueError:
            raise ConfigError(f"{flag}: weight of {name!r} must be a number, got {weight_text!r}") from None
        if weight <= 0:
            raise ConfigError(f"{flag}: weight of {name!r} must be positive, got {weight}")
        source = Source(name.strip(), weight)
        try:
            kind = source.kind
        except ConfigError as e:  # an unknown name in builtin:tasks:A+B
            raise ConfigError(f"{flag}: {e}") from None
        if name.startswith("builtin:") and kind not in BUILTINS:
            raise ConfigError(f"{flag}: unknown builtin source {name!r}; known: {', '.join(BUILTINS)} "
                              "(and builtin:tasks:SUITE+SUITE)")
        if kind == "file":
            path = Path(source.spec).expanduser()
            if not path.exists():
                raise ConfigError(f"{flag}: no such file or folder: {source.spec}")
            if path.suffix not in TEXT_SUFFIXES:
                raise ConfigError(f"{flag}: {source.spec} is not a {'/'.join(TEXT_SUFFIXES)} file")
        sources.append(source)
    if not sources:
        raise ConfigError(f"{flag}: no source given (expected e.g. builtin:tasks or a file path)")
    return sources


def iter_documents(source: Source, cfg: CorpusConfig, frozen=None) -> Iterator[str]:
    """The documents of one source, in a deterministic order."""
    kind = source.kind
    if kind == "builtin:tasks":
        for example in generate_tasks(cfg.seed, source.suites):
            yield example.text()
    elif kind == "builtin:self":
        if frozen is None:
            raise ConfigError("builtin:self needs the frozen model to sample from")
        from corpus.selfsample import iter_self_samples

        yield from iter_self_samples(frozen, cfg.seed)
    elif kind == "hf":
        yield from _iter_hf(source.spec, cfg.text_field)
    else:
        for path in source.files():
            yield from _iter_file(path, cfg)


def _iter_file(path: Path, cfg: CorpusConfig) -> Iterator[str]:
    if path.suffix == ".txt":
        yield from _paragraph_blocks(read_text(path, cfg.encoding))
    elif path.suffix == ".jsonl":
        yield from _iter_jsonl(path, cfg.text_field)
    else:
        yield from _iter_parquet(path, cfg.text_field)


def read_text(path: Path, encoding: str = "auto") -> str:
    """Read a text file; auto = UTF-8, else Latin-1 with a warning; an explicit encoding is strict."""
    data = path.read_bytes()
    if (nul := data.find(b"\x00")) >= 0:
        raise ConfigError(f"{path}: not a text file (a NUL byte at offset {nul}); expected UTF-8 or Latin-1 text")
    if encoding != "auto":
        try:
            return data.decode(encoding)
        except LookupError:
            raise ConfigError(f"--encoding: unknown encoding {encoding!r}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"{path}: not valid {encoding} (byte {e.start}); pass --encoding latin-1 or --encoding auto"
            ) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        log.warning("%s is not UTF-8 (byte %d); reading it as Latin-1", path, e.start)
        return data.decode("latin-1")


def _paragraph_blocks(text: str) -> Iterator[str]:
    block: list[str] = []
    size = 0
    for paragraph in text.split("\n\n"):
        block.append(paragraph)
        size += len(paragraph) + 2
        if size >= _BLOCK_CHARS:
            yield "\n\n".join(block) + "\n\n"
            block, size = [], 0
    if block and "".join(block).strip():
        yield "\n\n".join(block)


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise ConfigError(f"{path}:{lineno}: not UTF-8 text (byte {e.start} of the line); expected JSON lines") from None
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if isinstance(row, dict) and isinstance(row.get(text_field), str):
                yield row[text_field]
            elif isinstance(row, dict) and {"question", "answer"} <= row.keys():
                yield f"Question: {row['question']}\nAnswer: {row['answer']}"
            else:
                raise ConfigError(
                    f"{path}:{lineno}: expected a JSON object with a {text_field!r} string "
                    "(set --text-field) or 'question' and 'answer'"
                )


def _iter_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise ConfigError(f"{path}: not a Parquet file ({e})") from None
    if text_field not in table.schema_arrow.names:
        raise ConfigError(f"{path}: no column {text_field!r} (columns: {', '.join(table.schema_arrow.names)}); set --text-field")
    for batch in table.iter_batches(columns=[text_field], batch_size=1024):
        yield from (t for t in batch.column(0).to_pylist() if t)


def _iter_hf(spec: str, text_field: str) -> Iterator[str]:
    import datasets

    name, config, split = (spec.removeprefix("hf:").split(":") + [None, None])[:3]
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
        for row in ds:
            if text_field not in row:
                raise ConfigError(f"--data {spec}: no field {text_field!r} (fields: {', '.join(row)}); set --text-field")
            if row[text_field]:
                yield row[text_field]
    except ConfigError:
        raise
    except Exception as e:  # datasets raises many types for offline / unknown datasets
        raise ConfigError(f"--data {spec}: could not open the Hugging Face dataset ({type(e).__name__}: {str(e)[:200]})") from None


def absolute_spec(spec: str) -> str:
    """The same source spec with local paths made absolute (for jobs that run in another folder)."""
    parts = []
    for source in parse_sources(spec) if spec.strip() else []:
        name = source.spec
        if source.kind in ("file", "folder"):
            name = str(Path(name).expanduser().resolve())
        parts.append(name if source.weight == 1.0 else f"{name}*{source.weight:g}")
    return ",".join(parts)
