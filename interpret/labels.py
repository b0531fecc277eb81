"""`faithlens features label RUN`: label the top features, reusing cached labels for unchanged evidence.

labels.json keeps one record per (feature, backend), so labels from several backends coexist:
    {"features": {"<id>": {"<backend>": {"label", "backend", "model", "prompt_version",
                                          "evidence_digest", "evidence": {...}, "created"}}}}
label_cache.json maps (backend, model, PROMPT_VERSION, examples shown, evidence digest) to a label,
so a rerun calls the backend only for features whose evidence changed.

A labeller sees a feature's first `--examples` top-activating contexts (and its promoted tokens), never its
quantile samples or negatives; the record keeps that count (`evidence.examples`) so that scoring can hold
out every context the label was made from (`examples_shown`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from interpret.label_config import LabelConfig
from interpret.labelers import PROMPT_VERSION, Labeler, make_labeler
from interpret.records import Example, FeatureEvidence
from interpret.run import InterpretRun
from models.io import read_json, write_json_atomic

log = logging.getLogger(__name__)

LABEL_BACKENDS = ("openai", "local", "stats")


def run_label(cfg: LabelConfig, labeler: Labeler | None = None) -> dict:
    """Label the top `cfg.top` features with `cfg.backend`; `labeler` overrides the backend (tests)."""
    from interpret.evidence import load_evidence

    console = Console(soft_wrap=True)
    run = InterpretRun(cfg.run)
    all_evidence = load_evidence(run)
    ids = select_features(run, all_evidence, cfg.top)
    evidence = {fid: all_evidence[fid] for fid in ids}  # examples are rebuilt on every access: once only
    cache = read_json_or(run.label_cache, {"entries": {}})
    model_id = labeler.model_id if labeler is not None else _model_id(cfg)

    keys = {fid: cache_key(cfg.backend, model_id, cfg.examples, evidence[fid]) for fid in ids}
    misses = [fid for fid in ids if cfg.force or keys[fid] not in cache["entries"]]
    log.info("%d features selected, %d cached, %d to label with %s", len(ids), len(ids) - len(misses),
             len(misses), cfg.backend)
    if misses:
        labeler = labeler or make_labeler(cfg.backend, cfg, examples=cfg.examples)
        _label_misses(labeler, [evidence[fid] for fid in misses], keys, cache, run, cfg.batch_size)

    labels = read_json_or(run.labels, {"features": {}})
    for fid in ids:
        labels["features"].setdefault(str(fid), {})[cfg.backend] = _record(
            cache["entries"][keys[fid]], cfg, model_id, evidence[fid])
    write_json_atomic(run.labels, labels)
    write_json_atomic(config_path(run, "label"), config_json(cfg))

    console.print(f"labelled {len(ids)} features with {cfg.backend} ({model_id}): "
                  f"{len(misses)} new, {len(ids) - len(misses)} from the cache")
    console.print(f"  labels  {run.labels}\n  cache   {run.label_cache}\n  config  {config_path(run, 'label')}")
    return {"features": ids, "labelled": len(misses), "cached": len(ids) - len(misses), "labels": str(run.labels)}


def select_features(run: InterpretRun, evidence: Mapping[int, FeatureEvidence], top: int) -> list[int]:
    """The first `top` ids of importance.json that have evidence, else the `top` densest live features."""
    available = set(evidence)  # iterating ids is cheap; `in`/values() would rebuild every feature's examples
    if run.importance.is_file():
        ranked = [int(f["id"]) for f in read_json(run.importance)["features"]]
        missing = [fid for fid in ranked[:top] if fid not in available]
        if missing:
            log.warning("%d of the top %d important features have no evidence and are skipped (e.g. %s)",
                        len(missing), top, missing[:5])
        return [fid for fid in ranked if fid in available][:top]
    log.info("%s not found: labelling the %d densest live features instead", run.importance, top)
    density = {fid: _density(evidence, fid) for fid in available}
    live = sorted((fid for fid in available if density[fid] > 0), key=lambda fid: (-density[fid], fid))
    return live[:top]


def _density(evidence: Mapping[int, FeatureEvidence], fid: int) -> float:
    stats = getattr(evidence, "stats", None)  # interpret.evidence.Evidence reads it without building examples
    return float(stats(fid)["density"]) if stats else evidence[fid].density


def cache_key(backend: str, model_id: str, examples: int, ev: FeatureEvidence) -> str:
    return f"{backend}|{model_id}|{PROMPT_VERSION}|n{examples}|{ev.digest()}"


def load_label_records(run: InterpretRun) -> dict[int, dict[str, dict]]:
    """Every stored label record: feature id → backend → record."""
    path = run.require(run.labels, "features label")
    return {int(fid): dict(by_backend) for fid, by_backend in read_json(path)["features"].items()}


def load_labels(run: InterpretRun, prefer: tuple[str, ...] = LABEL_BACKENDS) -> dict[int, str]:
    """The best label per feature: the first backend of `prefer` that labelled it."""
    best = {}
    for fid, by_backend in load_label_records(run).items():
        for backend in prefer:
            if backend in by_backend:
                best[fid] = by_backend[backend]["label"]
                break
    return best


def examples_shown(record: dict, ev: FeatureEvidence) -> list[Example]:
    """The contexts the labeller saw for this label record: its first `evidence.examples` top examples
    (all of them when the record does not say, so that none can leak into scoring)."""
    shown = record.get("evidence", {}).get("examples")
    return list(ev.top) if shown is None else list(ev.top[:int(shown)])


def config_path(run: InterpretRun, step: str) -> Path:
    """Where the config of `faithlens features STEP` is saved beside its output."""
    return run.dir / f"{step}_config.json"


def _label_misses(labeler: Labeler, batch: list[FeatureEvidence], keys: dict[int, str], cache: dict,
                  run: InterpretRun, batch_size: int) -> None:
    # the cache is saved after every batch, so an interrupted run keeps what it labelled
    with Progress(transient=True) as progress:
        task = progress.add_task(f"labelling ({labeler.name})", total=len(batch))
        for i in range(0, len(batch), batch_size):
            chunk = batch[i:i + batch_size]
            labels = labeler.label(chunk)
            if len(labels) != len(chunk):
                raise RuntimeError(f"{labeler.name} labeller returned {len(labels)} labels for {len(chunk)} features")
            now = now_iso()
            for ev, label in zip(chunk, labels):
                cache["entries"][keys[ev.feature]] = {"label": label, "created": now}
            write_json_atomic(run.label_cache, cache)
            progress.advance(task, len(chunk))


def _record(entry: dict, cfg: LabelConfig, model_id: str, ev: FeatureEvidence) -> dict:
    return {
        "label": entry["label"], "backend": cfg.backend, "model": model_id, "prompt_version": PROMPT_VERSION,
        "evidence_digest": ev.digest(), "created": entry["created"],
        "evidence": {"examples": min(cfg.examples, len(ev.top)), "top_activation": ev.max_activation,
                     "promoted": [t for t, _ in ev.promoted[:8]]},
    }


def _model_id(cfg: LabelConfig) -> str:
    return {"stats": "stats", "local": cfg.local_model, "openai": cfg.openai_model}[cfg.backend]


def config_json(cfg) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}


def read_json_or(path: Path, default: dict) -> dict:
    """A JSON file that a command adds to (labels, reviews, caches); `default` before the first run."""
    return read_json(path, "delete it to start over") if path.is_file() else default


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
