"""Feature evidence: one pass over a corpus, stored once, read by labelling, scoring, clustering and the dashboard.

For every live feature: its firing density, mean and max activation, the top-activating contexts
(± `context` tokens), contexts sampled across its activation quantiles (from a uniform reservoir of
its activations), negatives, an activation histogram, and the tokens it most promotes / suppresses
through the decoder's direct path (`Components.direct_effects`).

Negatives are windows, drawn at random from the same corpus, in which the feature fires nowhere in the
shown ± `context` tokens (label scoring asks whether it fires anywhere in the text). A feature with fewer
than `negative_examples` such windows in the pool is marked `"dense": true` in evidence.json and gets the
pool windows where it fires least instead (the lowest decile by the window's largest activation: the pool
holds at least 10 × `negative_examples` windows); scoring counts dense features apart.

On disk (RUN/interpret/): evidence.json holds the per-feature statistics and references to token
positions; evidence.safetensors holds the scanned tokens and every position's sparse code, from which
an example's per-token activations are rebuilt on load. `load_evidence` also reads a plain
evidence.json whose features carry their examples inline (FeatureEvidence.to_json()).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import asdict

import numpy as np
import torch
from safetensors.torch import save_file

from corpus.packing import sequences
from interpret.components import Components, load_components
from interpret.config import EvidenceConfig
from interpret.records import Example, FeatureEvidence
from interpret.run import InterpretRun
from models.io import atomic_path, load_safetensors, read_json, write_json_atomic
from models.progress import progress_bar

log = logging.getLogger(__name__)

TENSORS = "evidence.safetensors"


def _merge_topk(key_FS: torch.Tensor, pay_FS: torch.Tensor, feat_E: torch.Tensor, key_E: torch.Tensor,
                pay_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep, per feature, the S entries with the largest key among the current ones and a new batch."""
    F_, S = key_FS.shape
    order = key_E.argsort(descending=True, stable=True)
    order = order[feat_E[order].argsort(stable=True)]
    feat_sorted = feat_E[order]
    counts = torch.bincount(feat_sorted, minlength=F_)
    starts = counts.cumsum(0) - counts
    rank = torch.arange(len(order)) - starts[feat_sorted]
    keep = rank < S
    new_key = torch.full_like(key_FS, -float("inf"))
    new_pay = torch.full_like(pay_FS, -1)
    new_key[feat_sorted[keep], rank[keep]] = key_E[order][keep]
    new_pay[feat_sorted[keep], rank[keep]] = pay_E[order][keep]
    all_key, all_pay = torch.cat([key_FS, new_key], 1), torch.cat([pay_FS, new_pay], 1)
    top = all_key.topk(S, dim=1)
    return top.values, all_pay.gather(1, top.indices)


class _Scan:
    """Running per-feature statistics over batches of sparse codes."""

    def __init__(self, num_latents: int, cfg: EvidenceConfig, seed: int):
        F_ = num_latents
        self.fires = torch.zeros(F_, dtype=torch.float64)
        self.act_sum = torch.zeros(F_, dtype=torch.float64)
        self.act_max = torch.zeros(F_)
        self.top_val = torch.full((F_, cfg.top_examples), -float("inf"))
        self.top_pos = torch.full((F_, cfg.top_examples), -1, dtype=torch.long)
        self.res_key = torch.full((F_, cfg.reservoir), -float("inf"))
        self.res_pos = torch.full((F_, cfg.reservoir), -1, dtype=torch.long)
        self.gen = torch.Generator().manual_seed(seed)

    def add(self, idx_NK: torch.Tensor, val_NK: torch.Tensor, pos_N: torch.Tensor) -> None:
        live = val_NK > 0
        feat = idx_NK[live].long()
        val = val_NK[live].float()
        pos = pos_N[:, None].expand_as(idx_NK)[live]
        self.fires.index_add_(0, feat, torch.ones_like(val, dtype=torch.float64))
        self.act_sum.index_add_(0, feat, val.double())
        self.act_max.scatter_reduce_(0, feat, val, reduce="amax")
        self.top_val, self.top_pos = _merge_topk(self.top_val, self.top_pos, feat, val, pos)
        # a uniform sample of each feature's firings: keep the largest random priorities
        self.res_key, self.res_pos = _merge_topk(self.res_key, self.res_pos, feat, torch.rand(len(val), generator=self.gen), pos)


def build_evidence(cfg: EvidenceConfig, comp: Components, progress: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    tok = comp.frozen.tokenizer
    seqs = [p.tokens for p in sequences(cfg, tok, comp.frozen.bos_token_id, comp.frozen.eos_token_id, comp.frozen)]
    tokens_ST = torch.from_numpy(np.stack(seqs)).long()
    S, T = tokens_ST.shape
    F_ = comp.sae.cfg.num_latents
    scan = _Scan(F_, cfg, cfg.seed)
    codes_idx, codes_val = [], []
    for start in progress_bar(range(0, S, cfg.batch_size), desc="evidence scan", unit="batch", disable=not progress):
        ids = tokens_ST[start : start + cfg.batch_size]
        h = comp.frozen.residuals(ids, [comp.layer])[comp.layer]
        indices, values = comp.features(h)
        values = values.clone()
        values[:, 0] = 0  # BOS is an attention sink the SAE does not model
        B = ids.shape[0]
        pos = (torch.arange(start, start + B)[:, None] * T + torch.arange(T)[None]).flatten()
        scan.add(indices.flatten(0, 1), values.flatten(0, 1), pos)
        codes_idx.append(indices.to(torch.int32))
        codes_val.append(values.half())
    n_scored = S * (T - 1)
    live = (scan.fires > 0).nonzero().flatten().tolist()
    promoted, suppressed = _direct_tokens(comp, live, cfg.promoted)
    pool = torch.randperm(n_scored, generator=torch.Generator().manual_seed(cfg.seed + 1))[: max(10 * cfg.negative_examples, 512)]
    pool = (pool // (T - 1)) * T + pool % (T - 1) + 1  # scored positions only
    tensors = {"tokens": tokens_ST.to(torch.int32), "codes.indices": torch.cat(codes_idx), "codes.values": torch.cat(codes_val),
               "pool": pool}
    window_max_PF = _window_max(tensors, pool, cfg.context, F_)
    features = {}
    for f in progress_bar(live, desc="evidence examples", unit="feature", disable=not progress):
        top = [int(p) for v, p in zip(scan.top_val[f].tolist(), scan.top_pos[f].tolist()) if p >= 0 and v > 0]
        res = scan.res_pos[f][scan.res_pos[f] >= 0]
        res_vals = _acts_at(tensors, res, f)
        order = res_vals.argsort()
        res, res_vals = res[order], res_vals[order]
        nq = min(cfg.quantile_examples, len(res))
        qs = [(i + 0.5) / nq for i in range(nq)]
        quant = [[int(res[int(q * len(res))]), q] for q in qs]
        negatives, dense = negative_windows(window_max_PF[:, f], cfg.negative_examples)
        counts, edges = np.histogram(res_vals.numpy(), bins=20, range=(0.0, float(scan.act_max[f]) or 1.0))
        features[str(f)] = {
            "feature": f, "density": scan.fires[f].item() / n_scored, "max_activation": float(scan.act_max[f]),
            "mean_activation": (scan.act_sum[f] / scan.fires[f]).item(),
            "top": top, "quantiles": quant, "negatives": negatives, "dense": dense,
            "promoted": promoted[f], "suppressed": suppressed[f],
            "histogram": {"edges": [round(float(e), 5) for e in edges], "counts": counts.tolist()},
        }
    meta = {"format": "refs", "model": comp.frozen.name, "layer": comp.layer, "sae": str(comp.run.sae_dir(comp.meta.get("sae"))),
            "data": cfg.data, "split": cfg.split, "tokens": n_scored, "sequences": S, "context": cfg.context,
            "num_latents": F_, "live": len(live), "dense": sum(d["dense"] for d in features.values()),
            "vocab": comp.token_strings, "features": features}
    return meta, tensors


def _direct_tokens(comp: Components, live: list[int], n: int) -> tuple[dict, dict]:
    strings = comp.token_strings
    promoted, suppressed = {}, {}
    for start in range(0, len(live), 256):
        ids = torch.tensor(live[start : start + 256])
        eff = comp.direct_effects(ids)
        eff = eff - eff.mean(-1, keepdim=True)
        top, bottom = eff.topk(n, dim=-1), (-eff).topk(n, dim=-1)
        for row, f in enumerate(ids.tolist()):
            promoted[f] = [[strings[i], round(v, 4)] for v, i in zip(top.values[row].tolist(), top.indices[row].tolist())]
            suppressed[f] = [[strings[i], round(-v, 4)] for v, i in zip(bottom.values[row].tolist(), bottom.indices[row].tolist())]
    return promoted, suppressed


def _acts_at(tensors: dict, pos: torch.Tensor, f: int) -> torch.Tensor:
    """Feature f's activation at flat positions `pos`."""
    idx = tensors["codes.indices"].flatten(0, 1)[pos]
    val = tensors["codes.values"].flatten(0, 1)[pos].float()
    return (val * (idx == f)).sum(-1)


def _window_max(tensors: dict, pool: torch.Tensor, context: int, F_: int) -> torch.Tensor:
    """[P, F] each feature's largest activation anywhere in each pool window (0: it fires nowhere there)."""
    T = tensors["tokens"].shape[1]
    max_PF = torch.zeros(len(pool), F_, dtype=torch.float16)
    idx = tensors["codes.indices"].flatten(0, 1)
    val = tensors["codes.values"].flatten(0, 1)
    for row, p in enumerate(pool.tolist()):
        s, t = divmod(p, T)
        lo, hi = s * T + max(1, t - context), s * T + min(T, t + context + 1)  # the window `_window` shows
        fires = val[lo:hi] > 0
        max_PF[row].scatter_reduce_(0, idx[lo:hi][fires].long(), val[lo:hi][fires].half(), reduce="amax")
    return max_PF


def negative_windows(window_max_P: torch.Tensor, n: int) -> tuple[list[int], bool]:
    """One feature's negatives as pool rows, and whether it is dense.

    The first n rows (the pool is in random order) whose window shows no firing; a feature with fewer than
    n such rows is dense and gets the n rows where it fires least, clean ones first.
    """
    clean = (window_max_P == 0).nonzero().flatten()
    if len(clean) >= n:
        return clean[:n].tolist(), False
    return window_max_P.float().argsort(stable=True)[:n].tolist(), True


def _window(tensors: dict, vocab: list[str], pos: int, f: int, context: int, quantile: float | None = None) -> Example:
    T = tensors["tokens"].shape[1]
    s, t = divmod(int(pos), T)
    lo, hi = max(1, t - context), min(T, t + context + 1)  # BOS is not shown
    flat = torch.arange(s * T + lo, s * T + hi)
    acts = _acts_at(tensors, flat, f)
    return Example(tokens=[vocab[i] for i in tensors["tokens"][s, lo:hi].tolist()],
                   acts=[round(a, 4) for a in acts.tolist()], center=t - lo, quantile=quantile)


class Evidence(Mapping):
    """Read-only mapping feature id → FeatureEvidence, examples rebuilt on access."""

    def __init__(self, meta: dict, tensors: dict[str, torch.Tensor] | None):
        self.meta = meta
        self.tensors = tensors
        self._features = meta["features"]

    def __getitem__(self, f: int) -> FeatureEvidence:
        d = self._features[str(int(f))]
        if self.meta.get("format") != "refs":
            return FeatureEvidence.from_json(d)
        vocab, tens, c = self.meta["vocab"], self.tensors, self.meta["context"]
        pool = tens["pool"]
        return FeatureEvidence(
            feature=int(d["feature"]), density=d["density"], max_activation=d["max_activation"],
            mean_activation=d["mean_activation"],
            top=[_window(tens, vocab, p, f, c) for p in d["top"]],
            quantiles=[_window(tens, vocab, p, f, c, q) for p, q in d["quantiles"]],
            negatives=[_window(tens, vocab, int(pool[i]), f, c) for i in d["negatives"]],
            promoted=[(t, v) for t, v in d["promoted"]], suppressed=[(t, v) for t, v in d["suppressed"]],
            histogram=(d["histogram"]["edges"], d["histogram"]["counts"]),
        )

    def __iter__(self) -> Iterator[int]:
        return (int(k) for k in self._features)

    def __len__(self) -> int:
        return len(self._features)

    def stats(self, f: int) -> dict:
        """Density / activation statistics and the dense flag, without building examples."""
        d = self._features[str(int(f))]
        return {**{k: d[k] for k in ("density", "max_activation", "mean_activation")}, "dense": bool(d.get("dense", False))}


def save_evidence(run: InterpretRun, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    with atomic_path(run.dir / TENSORS) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    write_json_atomic(run.evidence, meta)


def load_evidence(run: InterpretRun) -> Evidence:
    meta = read_json(run.require(run.evidence, "features evidence"))
    tensors = load_safetensors(run.dir / TENSORS) if meta.get("format") == "refs" else None
    return Evidence(meta, tensors)


def run_evidence(cfg: EvidenceConfig) -> Evidence:
    run = InterpretRun(cfg.run)
    comp = load_components(run, cfg)
    meta, tensors = build_evidence(cfg, comp)
    save_evidence(run, meta, tensors)
    write_json_atomic(run.dir / "evidence_config.json", {k: str(v) for k, v in asdict(cfg).items()})
    print(f"evidence for {meta['live']:,} live features of {meta['num_latents']:,} over {meta['tokens']:,} tokens "
          f"({meta['dense']:,} dense: too few windows without firing) -> {run.evidence} (+ {TENSORS})")
    return Evidence(meta, tensors)
