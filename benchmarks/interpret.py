"""Interpretation throughput and peak memory: attribution, evidence scan, labelling and label scoring.

One spawned process (its peak RSS is its own) builds a run from a random TopK SAE and a readout decoder
(or uses --decoder), then times: attribution patching through the decoder (predictions/s) and through
the spliced frozen model, the evidence scan (tokens/s), the statistics labeller and the local LLM
labeller (features/s and per minute; `--labeller-model` for another one than the frozen model, e.g.
embedded:qwen2.5-coder-1.5b-instruct, with its load time), and the local simulator's detection judgments
(contexts/s: one label; pairs/s: SHARED_LABELS labels on each text, as `features score` judges three label sets and
their controls). The peak RSS holds the frozen model, the run and the labeller.
"""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path

from benchmarks._spawn import in_child

SHARED_LABELS = 6


def _child(model: str, dtype: str, layer: int, latents: int, k: int, decoder: str, tokens: int, n_label: int, tmp: str,
           labeller: str = "") -> dict:
    import torch

    from interpret.components import load_components
    from interpret.config import EvidenceConfig, ImportanceConfig
    from interpret.evidence import Evidence, build_evidence
    from interpret.importance import compute_importance
    from interpret.labelers import LocalLabeler, StatsLabeler
    from interpret.run import InterpretRun
    from models.config import ModelConfig
    from models.loading import load_frozen

    torch.manual_seed(0)
    frozen = load_frozen(ModelConfig(model=model, dtype=dtype))
    run_dir = Path(decoder) if decoder else _random_run(frozen, Path(tmp) / "run", layer, latents, k)
    comp = load_components(InterpretRun(run_dir), frozen=frozen)
    out: dict = {}

    def timed(key: str, amount: int, fn) -> None:
        t0 = time.perf_counter()
        result = fn()
        out[key] = amount / (time.perf_counter() - t0)
        return result

    imp = ImportanceConfig(run=run_dir, model=model, data="builtin:tasks", tokens=tokens, seq_len=128, spliced=False,
                           validate_top=0, share_targets=0, batch_size=8)
    res = timed("attribution_decoder_predictions_s", tokens, lambda: compute_importance(imp, comp, progress=False))
    spliced = ImportanceConfig(run=run_dir, model=model, data="builtin:tasks", tokens=tokens // 2, seq_len=128,
                               spliced_tokens=tokens // 2, validate_top=0, share_targets=0, batch_size=8)
    t0 = time.perf_counter()
    compute_importance(spliced, comp, progress=False)
    out["attribution_with_spliced_predictions_s"] = res["tokens"] / 2 / (time.perf_counter() - t0)
    ev_cfg = EvidenceConfig(run=run_dir, model=model, data="builtin:tasks", tokens=tokens * 2, seq_len=128)
    meta, tensors = timed("evidence_scan_tok_s", tokens * 2, lambda: build_evidence(ev_cfg, comp, progress=False))
    evidence = Evidence(meta, tensors)
    batch = [evidence[f] for f in list(evidence)[:n_label]]
    timed("label_stats_features_s", len(batch), lambda: StatsLabeler().label(batch))
    t0 = time.perf_counter()
    local = LocalLabeler(labeller or frozen, batch_size=8)  # --labeller-model: e.g. the capable 1.5B model
    out["labeller"] = local.model_id
    out["labeller_load_s"] = time.perf_counter() - t0
    labels = timed("label_local_features_s", len(batch), lambda: local.label(batch))
    out["label_local_features_min"] = out["label_local_features_s"] * 60
    contexts = ["".join(e.tokens) for fe in batch for e in fe.top[:4]]
    timed("judge_local_contexts_s", len(contexts), lambda: local.judge(labels[0], contexts))
    # `features score`'s load: three label sets and their shuffled controls on each text, the text read once
    shared = (labels * SHARED_LABELS)[:SHARED_LABELS]
    timed("judge_local_shared_pairs_s", len(contexts) * len(shared), lambda: local.judge_many(shared, contexts))
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _random_run(frozen, root: Path, layer: int, latents: int, k: int) -> Path:
    from distill.student import build_student_decoder
    from sae.config import SaeConfig
    from sae.model import SparseAutoencoder

    sae = SparseAutoencoder(SaeConfig(d_in=frozen.d_model, num_latents=latents, arch="topk", k=k))
    sae.init_weights()
    sae.save(root / "sae", extra={"layer": layer})
    decoder = build_student_decoder("readout", sae, frozen, layer)
    decoder.save(root / "decoder", extra={"layer": layer, "model": frozen.name, "sae": str(root / "sae")})
    return root


def bench_interpret(model: str, layer: int, latents: int, k: int, dtype: str, decoder: str = "", tokens: int = 2048,
                    n_label: int = 16, labeller: str = "") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        return in_child(_child, model, dtype, layer, latents, k, decoder, tokens, n_label, tmp, labeller)
