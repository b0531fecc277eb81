"""Tokenize documents, pack them into fixed-length sequences starting with BOS, split and mix.

Every packed sequence also carries the token that follows it in the stream, so each of its
positions has a data next-token label. The train/eval split hashes the packed tokens, so it
does not depend on how many tokens are asked for: a larger build extends a smaller one.
Generated sources (builtin:tasks, builtin:self) draw their eval split from a separate seed.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np

from corpus.config import CorpusConfig
from corpus.sources import Source, iter_documents, parse_sources
from models.errors import ConfigError

log = logging.getLogger(__name__)

_SPLIT_BUCKETS = 10_000
EVAL_SEED_OFFSET = 1_000_003


@dataclass
class Packed:
    tokens: np.ndarray
    """int64 [seq_len]: BOS, then seq_len - 1 stream tokens."""
    next_ids: np.ndarray
    """int64 [seq_len]: the data's next token at every position."""
    source: int
    """Index of the source in the mixture."""


def pack_documents(docs: Iterator[str], tokenizer, seq_len: int, bos_id: int, eos_id: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Concatenate documents (each followed by EOS) and cut [BOS] + seq_len - 1 token windows."""
    body = seq_len - 1
    buffer: list[int] = []
    for doc in docs:
        buffer.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        buffer.append(eos_id)
        start = 0
        while len(buffer) - start > body:  # one extra token: the label of the last position
            window = np.array(buffer[start : start + body + 1], dtype=np.int64)
            start += body
            yield np.concatenate(([bos_id], window[:body])), window
        del buffer[:start]


def in_split(tokens: np.ndarray, split: str, eval_fraction: float) -> bool:
    bucket = int.from_bytes(hashlib.blake2b(tokens.tobytes(), digest_size=8).digest(), "little") % _SPLIT_BUCKETS
    is_eval = bucket < round(eval_fraction * _SPLIT_BUCKETS)
    return is_eval if split == "eval" else not is_eval


def sequences(cfg: CorpusConfig, tokenizer, bos_id: int, eos_id: int, frozen=None) -> Iterator[Packed]:
    """The corpus as packed sequences of one split, sources interleaved in proportion to their weights.

    Deterministic for a given config. Yields ceil(tokens / seq_len) sequences unless every finite
    source runs out first (then warns). Raises ConfigError when the corpus yields nothing.
    """
    spec = cfg.ood if cfg.split == "ood" else cfg.data
    sources = parse_sources(spec, "--ood" if cfg.split == "ood" else "--data")
    streams = [_source_stream(s, cfg, tokenizer, bos_id, eos_id, frozen) for s in sources]
    wanted = math.ceil(cfg.tokens / cfg.seq_len)
    taken = [0] * len(sources)
    alive = set(range(len(sources)))
    produced = 0
    while produced < wanted and alive:
        # stride scheduling: the source furthest behind its share goes next (ties: lowest index)
        i = min(alive, key=lambda j: ((taken[j] + 1) / sources[j].weight, j))
        item = next(streams[i], None)
        if item is None:
            alive.discard(i)
            log.warning("source %s ran out after %d sequences", sources[i].spec, taken[i])
            continue
        taken[i] += 1
        produced += 1
        yield Packed(item[0], item[1], i)
    if produced == 0:
        raise ConfigError(
            f"--data: the corpus {spec!r} yielded no complete {cfg.seq_len}-token sequence for the "
            f"{cfg.split} split (is it empty, or shorter than --seq-len?)"
        )
    if produced < wanted:
        hint = (f"; --split eval reads only the {cfg.eval_fraction:.0%} eval split of --data, --split all reads a "
                "held-out file whole" if cfg.split == "eval" else "")
        log.warning("corpus gave %d of the %d sequences asked for (%d tokens)%s", produced, wanted,
                    produced * cfg.seq_len, hint)


def _source_stream(source: Source, cfg: CorpusConfig, tokenizer, bos_id: int, eos_id: int, frozen):
    # Generated sources are endless: their eval split is drawn from its own seed instead of
    # hashing, which would cost 1/eval_fraction generated tokens per eval token.
    if not source.finite:
        seed = cfg.seed + (EVAL_SEED_OFFSET if cfg.split == "eval" else 0)
        docs = iter_documents(source, replace(cfg, seed=seed), frozen)
        yield from pack_documents(docs, tokenizer, cfg.seq_len, bos_id, eos_id)
        return
    docs = iter_documents(source, cfg, frozen)
    for tokens, next_ids in pack_documents(docs, tokenizer, cfg.seq_len, bos_id, eos_id):
        if cfg.split in ("all", "ood") or in_split(tokens, cfg.split, cfg.eval_fraction):
            yield tokens, next_ids
