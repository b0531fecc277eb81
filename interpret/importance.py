"""`faithlens features importance RUN`: which features the predictions depend on.

For every scored position of a held-out corpus, the decoder's predicted token is attributed to the
features (attribution patching, see `interpret.attribution`); a feature's importance is its mean
|attribution| per scored token. The same is done through the SAE-spliced frozen model (targets: the
frozen model's predicted tokens). Exact ablation of the top features checks the first-order estimate:
the Spearman correlation between attribution and the measured effect of zeroing the feature.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict
from itertools import islice

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from corpus.packing import sequences
from interpret.attribution import (
    ablate,
    decoder_attribution,
    objective,
    per_feature,
    spearman,
    spliced_attribution,
    spliced_error,
    spliced_forward,
    top_share,
)
from interpret.components import Components, load_components
from interpret.config import ImportanceConfig
from interpret.run import InterpretRun
from models.io import write_json_atomic
from models.progress import progress_bar

log = logging.getLogger(__name__)


class _Batch:
    def __init__(self, comp: Components, ids_BT: torch.Tensor, kind: str, need_teacher: bool):
        self.ids = ids_BT
        if need_teacher:
            logits, store = comp.frozen.forward(ids_BT, [comp.layer])
            self.teacher = logits.float().log_softmax(-1).clone()
            self.h = store[comp.layer].float().clone()
        else:
            self.teacher = None
            self.h = comp.frozen.residuals(ids_BT, [comp.layer])[comp.layer].float().clone()
        self.indices, self.values = comp.features(self.h)
        with torch.no_grad():
            self.targets = comp.decoder_logits(self.indices, self.values).argmax(-1)
        self.weight = torch.ones(ids_BT.shape, dtype=torch.float32)
        self.weight[:, 0] = 0  # BOS is not scored


def _token_shares(comp: Components, batch: _Batch, attr: torch.Tensor, cfg: ImportanceConfig, n: int,
                  rng: random.Random) -> list[float]:
    """Per-prediction top-10 share of |attribution|, one prediction at a time (exact for any decoder).

    `attr` is the batch's attribution of all its predictions together; without context, positions are
    independent, so it already holds every prediction's own attribution.
    """
    F_ = comp.sae.cfg.num_latents
    if not comp.decoder.needs_context:
        a = attr[:, 1:].flatten(0, 1).abs().double()
        total = a.sum(-1)
        top = a.topk(min(10, a.shape[-1]), dim=-1).values.sum(-1)
        return (top / total.clamp_min(1e-12))[total > 0].tolist()
    B, T = batch.ids.shape
    shares = []
    for _ in range(n):
        b, t = rng.randrange(B), rng.randrange(1, T)
        w = torch.zeros_like(batch.weight)
        w[b, t] = 1
        _, attr = decoder_attribution(comp, batch.indices[b : b + 1], batch.values[b : b + 1], batch.targets[b : b + 1],
                                      w[b : b + 1], cfg.target,
                                      None if batch.teacher is None else batch.teacher[b : b + 1])
        shares.append(top_share(per_feature(batch.indices[b : b + 1], attr, F_)))
    return shares


def _validate(comp: Components, batch: _Batch, top_ids: list[int], cfg: ImportanceConfig, spliced: bool) -> dict:
    """Attribution vs exact ablation for each of the top features on one batch."""
    F_ = comp.sae.cfg.num_latents
    _, attr = decoder_attribution(comp, batch.indices, batch.values, batch.targets, batch.weight, cfg.target, batch.teacher)
    est = per_feature(batch.indices, attr, F_)[top_ids].numpy()
    with torch.no_grad():
        base = (objective(comp.decoder_logits(batch.indices, batch.values), batch.targets, cfg.target, batch.teacher)
                * batch.weight).sum().item()
        effect = np.array([base - (objective(comp.decoder_logits(batch.indices, ablate(batch.indices, batch.values, [f])),
                                             batch.targets, cfg.target, batch.teacher) * batch.weight).sum().item()
                           for f in progress_bar(top_ids, desc="ablation (decoder)", unit="feature", leave=False)])
    out = {"features": len(top_ids), "tokens": int(batch.weight.sum().item()),
           "decoder": {"spearman": spearman(est, effect), "spearman_abs": spearman(np.abs(est), np.abs(effect)),
                       "attribution": est.tolist(), "ablation": effect.tolist()}}
    if spliced:
        frozen_targets = batch.teacher.argmax(-1)  # a spliced-check batch always carries the frozen logits
        _, attr_s = spliced_attribution(comp, batch.ids, batch.h, batch.indices, batch.values, frozen_targets,
                                        batch.weight, cfg.target, batch.teacher)
        est_s = per_feature(batch.indices, attr_s, F_)[top_ids].numpy()
        error = spliced_error(comp, batch.h, batch.indices, batch.values)
        with torch.no_grad():
            def J(values):
                logits = spliced_forward(comp, batch.ids, batch.h, batch.indices, values, error)
                return (objective(logits, frozen_targets, cfg.target, batch.teacher) * batch.weight).sum().item()
            base_s = J(batch.values)
            effect_s = np.array([base_s - J(ablate(batch.indices, batch.values, [f]))
                                 for f in progress_bar(top_ids, desc="ablation (spliced)", unit="feature", leave=False)])
        out["spliced"] = {"spearman": spearman(est_s, effect_s), "spearman_abs": spearman(np.abs(est_s), np.abs(effect_s)),
                          "attribution": est_s.tolist(), "ablation": effect_s.tolist()}
    return out


def compute_importance(cfg: ImportanceConfig, comp: Components, progress: bool = True) -> dict:
    F_ = comp.sae.cfg.num_latents
    tok = comp.frozen.tokenizer
    seqs = [p.tokens for p in sequences(cfg, tok, comp.frozen.bos_token_id, comp.frozen.eos_token_id, comp.frozen)]
    need_teacher = cfg.target == "kl"
    abs_sum, signed_sum, fires = (torch.zeros(F_, dtype=torch.float64) for _ in range(3))
    spliced_abs = torch.zeros(F_, dtype=torch.float64)
    n_tokens = n_spliced = 0
    shares: list[float] = []
    rng = random.Random(cfg.seed)
    n_batches = (len(seqs) + cfg.batch_size - 1) // cfg.batch_size
    first = None
    for i in progress_bar(range(n_batches), desc="attribution", unit="batch", disable=not progress):
        ids = torch.from_numpy(np.stack(seqs[i * cfg.batch_size : (i + 1) * cfg.batch_size])).long()
        splice_now = cfg.spliced and n_spliced < cfg.spliced_tokens
        batch = _Batch(comp, ids, cfg.target, need_teacher or splice_now)
        first = first or batch
        _, attr = decoder_attribution(comp, batch.indices, batch.values, batch.targets, batch.weight, cfg.target, batch.teacher)
        idx = batch.indices.flatten().long()
        abs_sum.index_add_(0, idx, attr.abs().flatten().double())
        signed_sum.index_add_(0, idx, attr.flatten().double())
        fires.index_add_(0, idx, ((batch.values > 0) * batch.weight[..., None]).flatten().double())
        n_tokens += int(batch.weight.sum().item())
        shares += _token_shares(comp, batch, attr, cfg, max(0, cfg.share_targets // n_batches + 1), rng)
        if splice_now:
            frozen_targets = batch.teacher.argmax(-1)
            _, attr_s = spliced_attribution(comp, ids, batch.h, batch.indices, batch.values, frozen_targets, batch.weight,
                                            cfg.target, batch.teacher if need_teacher else None)
            spliced_abs.index_add_(0, idx, attr_s.abs().flatten().double())
            n_spliced += int(batch.weight.sum().item())
    importance = abs_sum / max(1, n_tokens)
    order = [int(f) for f in importance.argsort(descending=True) if fires[f] > 0]
    spliced_imp = spliced_abs / max(1, n_spliced)
    val_batch = first
    if cfg.validate_sequences < first.ids.shape[0] or (cfg.spliced and first.teacher is None):
        val_batch = _Batch(comp, first.ids[: cfg.validate_sequences], cfg.target, need_teacher or cfg.spliced)
    validation = _validate(comp, val_batch, order[: cfg.validate_top], cfg, cfg.spliced) if order else {}
    spliced_rank = {int(f): r for r, f in enumerate(spliced_imp.argsort(descending=True).tolist())}
    result = {
        "model": comp.frozen.name, "layer": comp.layer, "decoder": comp.meta.get("arch"), "target": cfg.target,
        "tokens": n_tokens, "spliced_tokens": n_spliced,
        "top10_share": float(np.mean(shares)) if shares else float("nan"), "share_predictions": len(shares),
        "top10_share_corpus": top_share(importance, 10),
        "spliced_vs_decoder_spearman": spearman(importance[order].numpy(), spliced_imp[order].numpy()) if cfg.spliced else None,
        "validation": validation,
        "features": [{"id": f, "importance": float(importance[f]), "mean_attribution": float(signed_sum[f] / max(1, n_tokens)),
                      "density": float(fires[f] / max(1, n_tokens)),
                      **({"spliced_importance": float(spliced_imp[f]), "spliced_rank": spliced_rank[f]} if cfg.spliced else {})}
                     for f in order],
    }
    return result


def run_importance(cfg: ImportanceConfig) -> dict:
    run = InterpretRun(cfg.run)
    comp = load_components(run, cfg)
    result = compute_importance(cfg, comp)
    write_json_atomic(run.importance, result)
    write_json_atomic(run.dir / "importance_config.json", {k: str(v) for k, v in asdict(cfg).items()})
    _print_summary(result, run)
    return result


def _print_summary(result: dict, run: InterpretRun) -> None:
    console = Console()
    table = Table(title=f"feature importance ({result['tokens']:,} predictions, target {result['target']})")
    for col in ("rank", "feature", "importance", "mean attribution", "density", "spliced rank"):
        table.add_column(col, justify="right")
    for r, f in enumerate(islice(result["features"], 15)):
        table.add_row(str(r + 1), str(f["id"]), f"{f['importance']:.4f}", f"{f['mean_attribution']:+.4f}",
                      f"{f['density']:.4f}", str(f.get("spliced_rank", "-")))
    console.print(table)
    v = result.get("validation") or {}
    if v:
        line = f"ablation check on {v['features']} features: Spearman(attribution, ablation) decoder {v['decoder']['spearman']:.3f}"
        if "spliced" in v:
            line += f", spliced {v['spliced']['spearman']:.3f}"
        console.print(line)
    console.print(f"top-10 share of |attribution| per prediction: {result['top10_share']:.3f} "
                  f"(over {result['share_predictions']} predictions)")
    console.print(f"wrote {run.importance}")
