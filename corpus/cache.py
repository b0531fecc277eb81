"""The activation and teacher cache: residuals at chosen layers, teacher top-k log-probs, labels.

Layout of one cache (a folder named by a hash of everything that produced it):

    manifest.json            key payload, shapes, and one entry per complete shard (size, blake2b)
    shard_00000.safetensors  tokens [S,T] i32, next_ids [S,T] i32, resid.L [S,T,D] bf16/fp16,
                             teacher.topk_ids [S,T,k] i32, teacher.topk_logp [S,T,k] f32,
                             teacher.rest_logmass [S,T] f32  (log of the probability outside the top k)

Shards are written to a temporary sibling and renamed, then recorded in the manifest; a build
that is killed resumes at the first shard that is missing or fails its checksum.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import struct
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from corpus.config import CacheConfig, parse_layers
from corpus.packing import Packed, sequences
from corpus.sources import parse_sources
from models.errors import ConfigError
from models.frozen import FrozenLM
from models.io import atomic_path, read_json, write_json_atomic
from models.progress import progress_bar

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_ST_DTYPES = {"BF16": (np.uint16, torch.bfloat16), "F16": (np.float16, None), "F32": (np.float32, None),
              "I32": (np.int32, None), "I64": (np.int64, None)}


class ActivationCache:
    """A complete cache on disk; shards are memory-mapped, never loaded whole."""

    def __init__(self, root: Path, manifest: dict):
        self.root = Path(root)
        self.manifest = manifest
        self._maps: dict[int, dict[str, torch.Tensor]] = {}

    @classmethod
    def open(cls, root: Path, verify: bool = True) -> ActivationCache:
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise ConfigError(f"{root}: not an activation cache (no {MANIFEST})")
        manifest = read_json(path, "rerun the `faithlens cache` command that built it to rebuild it")
        if not isinstance(manifest, dict) or not manifest.get("complete"):
            raise ConfigError(f"{root}: the cache build did not finish; rerun the same `faithlens cache` command to resume it")
        if verify:
            for entry in manifest["shards"]:
                if not _shard_ok(root, entry):
                    raise ConfigError(f"{root / entry['file']}: shard is missing or corrupt; rerun `faithlens cache` to rebuild it")
        return cls(root, manifest)

    @property
    def layers(self) -> list[int]:
        return self.manifest["layers"]

    @property
    def seq_len(self) -> int:
        return self.manifest["seq_len"]

    @property
    def d_model(self) -> int:
        return self.manifest["d_model"]

    @property
    def n_shards(self) -> int:
        return len(self.manifest["shards"])

    @property
    def n_sequences(self) -> int:
        return sum(e["sequences"] for e in self.manifest["shards"])

    @property
    def tokens(self) -> int:
        return self.n_sequences * self.seq_len

    @property
    def has_teacher(self) -> bool:
        return self.manifest["top_k"] is not None

    def shard(self, index: int) -> dict[str, torch.Tensor]:
        """All tensors of one shard as memory-mapped (copy-on-write) tensors."""
        if index not in self._maps:
            self._maps[index] = mmap_safetensors(self.root / self.manifest["shards"][index]["file"])
        return self._maps[index]

    def iter_batches(self, batch_sequences: int, shards: range | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of whole sequences, in cache order, over the given shard range."""
        for index in shards if shards is not None else range(self.n_shards):
            data = self.shard(index)
            n = data["tokens"].shape[0]
            for start in range(0, n, batch_sequences):
                yield {name: t[start : start + batch_sequences] for name, t in data.items()}

    def size_bytes(self) -> int:
        return sum(e["bytes"] for e in self.manifest["shards"])


def mmap_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file through np.memmap, so tensors are views of the file, not copies."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    raw = np.memmap(path, dtype=np.uint8, mode="c", offset=8 + header_len)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        np_dtype, torch_view = _ST_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        array = raw[begin:end].view(np_dtype).reshape(info["shape"])
        tensor = torch.from_numpy(array)
        tensors[name] = tensor.view(torch_view) if torch_view is not None else tensor
    return tensors


def cache_key(cfg: CacheConfig, frozen: FrozenLM, layers: list[int]) -> tuple[str, dict]:
    payload = {
        "format": FORMAT_VERSION,
        "model": frozen.fingerprint(),
        "layers": layers,
        "corpus": {
            "sources": [s.identity() for s in parse_sources(cfg.ood if cfg.split == "ood" else cfg.data)],
            "tokens": cfg.tokens, "seq_len": cfg.seq_len, "split": cfg.split, "eval_fraction": cfg.eval_fraction,
            "encoding": cfg.encoding, "text_field": cfg.text_field, "seed": cfg.seed,
        },
        "top_k": cfg.top_k if cfg.teacher else None,
        "act_dtype": cfg.act_dtype,
        "batch_size": cfg.batch_size,
        "shard_sequences": _shard_sequences(cfg),
    }
    payload = json.loads(json.dumps(payload, sort_keys=True, default=str))  # as the manifest will hold it
    digest = hashlib.blake2b(json.dumps(payload, sort_keys=True).encode(), digest_size=8).hexdigest()
    slug = re.sub(r"[^A-Za-z0-9]+", "-", frozen.name.split("/")[-1].removeprefix("embedded:")).strip("-").lower()
    name = f"{slug}-L{'-'.join(map(str, layers))}-{cfg.split}-{digest}"
    return name, payload


def build_cache(cfg: CacheConfig, frozen: FrozenLM, progress: bool = True) -> ActivationCache:
    """Build (or resume, or reuse) the cache that `cfg` describes and return it opened."""
    layers = parse_layers(cfg.layers, frozen.n_layers)
    name, payload = cache_key(cfg, frozen, layers)
    root = Path(cfg.out) / name
    manifest = _load_manifest(root, payload, frozen, layers, cfg)
    if manifest["complete"] and all(_shard_ok(root, e) for e in manifest["shards"]):
        return ActivationCache(root, manifest)

    done = {e["index"]: e for e in manifest["shards"] if _shard_ok(root, e)}
    shard_seqs = _shard_sequences(cfg)
    wanted = math.ceil(cfg.tokens / cfg.seq_len)
    seq_iter = sequences(cfg, frozen.tokenizer, frozen.bos_token_id, frozen.eos_token_id, frozen)
    resumed = sum(e["sequences"] for e in done.values()) * cfg.seq_len
    if resumed:
        log.info("resuming %s: %d complete shards (%d tokens) kept", root, len(done), resumed)
    with progress_bar(total=wanted * cfg.seq_len, unit="tok", unit_scale=True, desc="cache", disable=not progress,
              initial=resumed) as bar:
        for index in range(math.ceil(wanted / shard_seqs)):
            chunk = list(islice(seq_iter, min(shard_seqs, wanted - index * shard_seqs)))
            if not chunk:
                break
            if index in done and done[index]["sequences"] == len(chunk):
                continue
            tensors = _compute_shard(frozen, chunk, layers, cfg)
            done[index] = _write_shard(root, index, tensors)
            manifest["shards"] = [done[i] for i in sorted(done)]
            write_json_atomic(root / MANIFEST, manifest)
            bar.update(len(chunk) * cfg.seq_len)
    manifest["shards"] = [done[i] for i in sorted(done) if i <= index]
    manifest["complete"] = True
    write_json_atomic(root / MANIFEST, manifest)
    return ActivationCache(root, manifest)


def _shard_sequences(cfg: CacheConfig) -> int:
    return max(1, round(cfg.shard_tokens / cfg.seq_len / cfg.batch_size)) * cfg.batch_size


def _load_manifest(root: Path, payload: dict, frozen: FrozenLM, layers: list[int], cfg: CacheConfig) -> dict:
    path = root / MANIFEST
    if path.is_file():
        try:
            manifest = json.loads(path.read_text())
            if manifest.get("key") == payload:
                return manifest
            log.warning("%s: manifest does not match this build; starting over", root)
        except json.JSONDecodeError:
            log.warning("%s: unreadable manifest; starting over", root)
    manifest = {
        "key": payload, "complete": False, "shards": [], "layers": layers, "seq_len": cfg.seq_len,
        "d_model": frozen.d_model, "vocab_size": frozen.vocab_size, "model": frozen.name,
        "top_k": payload["top_k"], "data": cfg.ood if cfg.split == "ood" else cfg.data, "split": cfg.split,
    }
    return manifest  # written with the first shard, so a corpus that yields nothing leaves nothing behind


def _compute_shard(frozen: FrozenLM, chunk: list[Packed], layers: list[int], cfg: CacheConfig) -> dict[str, torch.Tensor]:
    act_dtype = torch.bfloat16 if cfg.act_dtype == "bf16" else torch.float16
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(chunk), cfg.batch_size):
        batch = chunk[start : start + cfg.batch_size]
        ids = torch.from_numpy(np.stack([p.tokens for p in batch]))
        out = {"tokens": ids.to(torch.int32), "next_ids": torch.from_numpy(np.stack([p.next_ids for p in batch])).to(torch.int32)}
        if cfg.teacher:
            logits, resid = frozen.forward(ids, layers)
            out.update(teacher_targets(logits, cfg.top_k))
        else:
            resid = frozen.residuals(ids, layers)
        for layer in layers:
            out[f"resid.{layer}"] = resid[layer].to("cpu", act_dtype)
        for name, t in out.items():
            parts.setdefault(name, []).append(t)
    return {name: torch.cat(ts).contiguous() for name, ts in parts.items()}


def teacher_targets(logits_BTV: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """Top-k log-probabilities and the log of the remaining probability mass, in fp32."""
    logp = logits_BTV.float().log_softmax(-1)
    k = min(k, logp.shape[-1])
    top_logp, top_ids = logp.topk(k, dim=-1)
    rest = logp.scatter_(-1, top_ids, float("-inf")).logsumexp(-1)
    return {"teacher.topk_ids": top_ids.to(torch.int32).cpu(), "teacher.topk_logp": top_logp.cpu(),
            "teacher.rest_logmass": rest.cpu()}


def _write_shard(root: Path, index: int, tensors: dict[str, torch.Tensor]) -> dict:
    name = f"shard_{index:05d}.safetensors"
    with atomic_path(root / name) as tmp:
        save_file(tensors, str(tmp), metadata={"format": str(FORMAT_VERSION)})
        size, digest = tmp.stat().st_size, _file_digest(tmp)
    return {"index": index, "file": name, "sequences": int(tensors["tokens"].shape[0]), "bytes": size, "blake2b": digest}


def _file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _shard_ok(root: Path, entry: dict) -> bool:
    path = root / entry["file"]
    return path.is_file() and path.stat().st_size == entry["bytes"] and _file_digest(path) == entry["blake2b"]
