"""`faithlens baseline`: the frozen model's held-out CE and accuracy, and the logit lens by layer."""

from __future__ import annotations

import json
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from corpus.config import CorpusConfig, Split, parse_layers
from corpus.packing import sequences
from models.config import ModelConfig
from models.frozen import FrozenLM
from models.io import write_json_atomic, write_text_atomic
from models.loading import load_frozen
from models.progress import progress_bar

DEFAULT_LAYERS = "3,6,9,12,15,20,25,last"


@dataclass
class BaselineConfig(CorpusConfig, ModelConfig):
    layers: str = DEFAULT_LAYERS
    """Layers for the logit lens (layers beyond the model's depth are dropped; 'last' = last block)."""

    split: Split = "eval"
    """Split of --data to read: eval (its held-out hash split), all (the whole of --data: a file held out for
    evaluation), train, or ood (the --ood sources)."""

    tokens: int = 20_000
    """Token positions to measure on."""

    batch_size: int = 4
    """Sequences per forward pass."""

    json: bool = False
    """Print one JSON object on stdout instead of the markdown table."""

    out: Path | None = None
    """Optional folder for baseline.json and baseline.md."""


def measure_baseline(cfg: BaselineConfig, frozen: FrozenLM, progress: bool = True) -> dict:
    """Frozen CE / top-1 accuracy / tokens/s / peak memory, and logit-lens KL and top-1 per layer.

    KL(p_frozen || p_lens) in nats/token over the full vocabulary; every position is scored
    (position t predicts token t+1; the last position's label is the next token in the stream).
    """
    layers = parse_layers(cfg.layers, frozen.n_layers, drop_beyond=True)
    seqs = list(sequences(cfg, frozen.tokenizer, frozen.bos_token_id, frozen.eos_token_id, frozen))
    sums = {"ce": 0.0, "top1": 0.0, **{f"kl{L}": 0.0 for L in layers}, **{f"agree{L}": 0.0 for L in layers}}
    n_tokens, forward_s = 0, 0.0
    for start in progress_bar(range(0, len(seqs), cfg.batch_size), desc="baseline", unit="batch", disable=not progress):
        batch = seqs[start : start + cfg.batch_size]
        ids = torch.from_numpy(np.stack([p.tokens for p in batch]))
        labels = torch.from_numpy(np.stack([p.next_ids for p in batch]))
        t0 = time.perf_counter()
        logits, resid = frozen.forward(ids, layers)
        forward_s += time.perf_counter() - t0
        logp = logits.float().log_softmax(-1)
        sums["ce"] += F.nll_loss(logp.flatten(0, 1), labels.flatten(), reduction="sum").item()
        final_top1 = logp.argmax(-1)
        sums["top1"] += (final_top1 == labels).sum().item()
        for L in layers:
            lens_logp = frozen.logit_lens(resid[L]).float().log_softmax(-1)
            sums[f"kl{L}"] += F.kl_div(lens_logp, logp, log_target=True, reduction="sum").item()
            sums[f"agree{L}"] += (lens_logp.argmax(-1) == final_top1).sum().item()
        n_tokens += labels.numel()
    return {
        "model": frozen.name,
        "tokens": n_tokens,
        "data": cfg.data if cfg.split != "ood" else cfg.ood,
        "split": cfg.split,
        "dtype": str(frozen.dtype).removeprefix("torch."),
        "frozen": {
            "ce": sums["ce"] / n_tokens,
            "top1_acc": sums["top1"] / n_tokens,
            "tokens_per_s": n_tokens / forward_s,
            "peak_mem_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        },
        "layers": [
            {"layer": L, "logit_lens_kl": sums[f"kl{L}"] / n_tokens, "logit_lens_top1": sums[f"agree{L}"] / n_tokens}
            for L in layers
        ],
    }


def baseline_markdown(result: dict) -> str:
    f = result["frozen"]
    lines = [
        f"Layer baselines: {result['model']} ({result['dtype']}), {result['tokens']:,} tokens of "
        f"{result['data']} ({result['split']} split)",
        "",
        f"Frozen model: CE {f['ce']:.3f} nats/token, next-token accuracy {f['top1_acc']:.1%}, "
        f"{f['tokens_per_s']:,.0f} tokens/s (full forward), peak RSS {f['peak_mem_mb']:,.0f} MB",
        "",
        "| layer | logit-lens KL (nats/token) | logit-lens top-1 agreement |",
        "|---:|---:|---:|",
    ]
    lines += [f"| {r['layer']} | {r['logit_lens_kl']:.3f} | {r['logit_lens_top1']:.1%} |" for r in result["layers"]]
    return "\n".join(lines)


def run_baseline(cfg: BaselineConfig) -> dict:
    frozen = load_frozen(cfg)
    result = measure_baseline(cfg, frozen, progress=not cfg.json)
    result["config"] = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
    markdown = baseline_markdown(result)
    if cfg.out is not None:
        write_json_atomic(Path(cfg.out) / "baseline.json", result)
        write_text_atomic(Path(cfg.out) / "baseline.md", markdown + "\n")
    if cfg.json:
        print(json.dumps(result))
    else:
        print(markdown)
        if cfg.out is not None:
            print(f"\nwrote {Path(cfg.out) / 'baseline.json'} and baseline.md")
    return result
