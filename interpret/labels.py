"""`faithlens features label RUN`: label the selected features, reusing cached labels for unchanged evidence.

A model backend (local, openai) labels the selection of `interpret.coverage`: a stratified random sample of
live features (`--sample`) and the most important ones (`--top`); the stats backend, which costs nothing,
labels every live feature. Either way the selection is recorded in labels.json, and `features score` scores
those features only.

labels.json keeps one record per (feature, label set), so labels from several backends and models coexist;
a label set is named after its backend unless `--label-set` names it:
    {"selection": {"sample", "top", "live", "seed", "strata"},
     "features": {"<id>": {"<label set>": {"label", "backend", "model", "prompt_version",
                                          "evidence_digest", "evidence": {...}, "created"}}}}
label_cache.json maps (backend, model, prompt version, examples shown, evidence digest) to a label,
so a rerun calls the backend only for features whose evidence changed.

A labeller sees a feature's first `--examples` top-activating contexts (and its promoted tokens), never its
quantile samples or negatives; the record keeps that count (`evidence.examples`) so that scoring can hold
out every context the label was made from (`examples_shown`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console

from interpret.coverage import Selection, live_density, select
from interpret.label_config import SCORE_KEYS, LabelConfig
from interpret.labelers import Labeler, StatsLabeler, echoes_prompt, make_labeler
from interpret.records import Example, FeatureEvidence, ShownLabel
from interpret.run import InterpretRun
from models.io import read_json, write_json_atomic
from models.progress import progress_bar

log = logging.getLogger(__name__)

LABEL_BACKENDS = ("openai", "local", "stats")
CACHE_SAVE_S = 10.0
"""Seconds between saves of label_cache.json while labelling."""


def run_label(cfg: LabelConfig, labeler: Labeler | None = None) -> dict:
    """Label the selection (every live feature with stats) with `cfg.backend`; `labeler` overrides the backend (tests)."""
    from interpret.evidence import load_evidence

    console = Console(soft_wrap=True)
    run = InterpretRun(cfg.run)
    all_evidence = load_evidence(run)
    selection = select(run, all_evidence, cfg.sample, cfg.top, cfg.seed)
    ids = sorted(live_density(all_evidence)) if cfg.backend == "stats" else selection.features
    cache = read_json_or(run.label_cache, {"entries": {}})
    model_id = labeler.model_id if labeler is not None else _model_id(cfg)

    # examples are rebuilt on every access: one feature at a time, so that every live feature fits in memory
    summaries = {fid: _evidence_summary(all_evidence[fid], cfg.examples) for fid in ids}
    keys = {fid: cache_key(cfg.backend, model_id, _prompt_version(cfg), cfg.examples, summaries[fid]["evidence_digest"])
            for fid in ids}
    misses = [fid for fid in ids if cfg.force or keys[fid] not in cache["entries"]
              or echoes_prompt(cache["entries"][keys[fid]]["label"])]  # cached before echoes were rejected
    log.info("%d features selected, %d cached, %d to label with %s", len(ids), len(ids) - len(misses),
             len(misses), cfg.backend)
    if misses:
        labeler = labeler or make_labeler(cfg.backend, cfg, examples=cfg.examples)
        _label_misses(labeler, misses, all_evidence, keys, cache, run, cfg.batch_size)

    labels = read_json_or(run.labels, {"features": {}})
    _record_selection(labels, selection)
    for fid in ids:
        labels["features"].setdefault(str(fid), {})[cfg.slot] = _record(
            cache["entries"][keys[fid]], cfg, model_id, summaries[fid])
    write_json_atomic(run.labels, labels)
    write_json_atomic(config_path(run, "label"), config_json(cfg))

    named = "" if cfg.slot == cfg.backend else f" as {cfg.slot!r}"
    console.print(f"labelled {len(ids)} features with {cfg.backend} ({model_id}){named}: "
                  f"{len(misses)} new, {len(ids) - len(misses)} from the cache")
    console.print(f"  selection  a stratified random sample of {len(selection.sample)} of {selection.live:,} live "
                  f"features (seed {selection.seed}) + the {len(selection.top)} most important")
    console.print(f"  labels  {run.labels}\n  cache   {run.label_cache}\n  config  {config_path(run, 'label')}")
    return {"features": ids, "sample": selection.sample, "top": selection.top, "labelled": len(misses),
            "cached": len(ids) - len(misses), "labels": str(run.labels)}


def _record_selection(labels: dict, selection: Selection) -> None:
    new = selection.to_json()
    old = labels.get("selection")
    if old and old != new:
        log.warning("labels.json: the selection changes (sample %d -> %d, top %d -> %d, seed %s -> %s); "
                    "`features score` follows the new one", len(old["sample"]), len(new["sample"]), len(old["top"]),
                    len(new["top"]), old["seed"], new["seed"])
    labels["selection"] = new


def cache_key(backend: str, model_id: str, prompt_version: str, examples: int, evidence_digest: str) -> str:
    return f"{backend}|{model_id}|{prompt_version}|n{examples}|{evidence_digest}"


def _prompt_version(cfg: LabelConfig) -> str:
    """The prompt behind `cfg`'s labels (the stats backend has none and keeps the first version's key)."""
    return StatsLabeler.prompt_version if cfg.backend == "stats" else cfg.prompt


def load_label_records(run: InterpretRun) -> dict[int, dict[str, dict]]:
    """Every stored label record: feature id → backend → record."""
    path = run.require(run.labels, "features label")
    return {int(fid): dict(by_backend) for fid, by_backend in read_json(path)["features"].items()}


def load_labels(run: InterpretRun, prefer: tuple[str, ...] = LABEL_BACKENDS) -> dict[int, str]:
    """The best label per feature: the first label set of `prefer` that labelled it, else of the other sets by name."""
    best = {}
    for fid, by_backend in load_label_records(run).items():
        for backend in [*prefer, *sorted(set(by_backend) - set(prefer))]:
            if backend in by_backend:
                best[fid] = by_backend[backend]["label"]
                break
    return best


def shown_labels(records: dict[int, dict[str, dict]], scored: dict[str, dict]) -> dict[int, ShownLabel]:
    """Per feature, what a dashboard may show (`ShownLabel`): its verified label with the best detection AUROC,
    else its statistics label, else its model label with the best AUROC, marked unverified. `scored` is
    scores.json's "features"; a score counts only for the label text it was made for."""
    shown = {}
    for fid, by_backend in records.items():
        rows = {b: row for b, row in scored.get(str(fid), {}).items()
                if b in by_backend and row.get("label") == by_backend[b]["label"]}
        verified = [b for b in by_backend if rows.get(b, {}).get("verified")]
        if verified:
            backend, status = _best_scored(verified, rows), "verified"
        elif "stats" in by_backend:
            backend, status = "stats", "statistic"
        else:
            backend, status = _best_scored(list(by_backend), rows), "unverified"
        row = rows.get(backend, {})
        shown[fid] = ShownLabel(by_backend[backend]["label"], backend, status,
                                {k: row[k] for k in SCORE_KEYS if isinstance(row.get(k), (int, float))})
    return shown


def _best_scored(backends: list[str], rows: dict[str, dict]) -> str:
    """The backend with the highest detection AUROC (unscored lowest; ties in LABEL_BACKENDS order)."""
    rank = {backend: i for i, backend in enumerate(LABEL_BACKENDS)}
    return max(backends, key=lambda b: (rows.get(b, {}).get("detection_auroc") or 0.0, -rank.get(b, len(rank))))


def load_shown_labels(run: InterpretRun) -> dict[int, ShownLabel]:
    """`shown_labels` of the run's labels.json and scores.json (every label unverified without scores)."""
    scored = read_json(run.scores).get("features", {}) if run.scores.is_file() else {}
    return shown_labels(load_label_records(run), scored)


def examples_shown(record: dict, ev: FeatureEvidence) -> list[Example]:
    """The contexts the labeller saw for this label record: its first `evidence.examples` top examples
    (all of them when the record does not say, so that none can leak into scoring)."""
    shown = record.get("evidence", {}).get("examples")
    return list(ev.top) if shown is None else list(ev.top[:int(shown)])


def config_path(run: InterpretRun, step: str) -> Path:
    """Where the config of `faithlens features STEP` is saved beside its output."""
    return run.dir / f"{step}_config.json"


def _label_misses(labeler: Labeler, misses: list[int], evidence: Mapping[int, FeatureEvidence], keys: dict[int, str],
                  cache: dict, run: InterpretRun, batch_size: int) -> None:
    # the cache is saved every CACHE_SAVE_S and at the end, so an interrupted run keeps (nearly) all it labelled
    # without rewriting a cache of thousands of stats labels after every batch
    saved = time.monotonic()
    with progress_bar(desc=f"labelling ({labeler.name})", total=len(misses), unit="feature", leave=False) as shown:
        for i in range(0, len(misses), batch_size):
            chunk = [evidence[fid] for fid in misses[i:i + batch_size]]
            labels = labeler.label(chunk)
            if len(labels) != len(chunk):
                raise RuntimeError(f"{labeler.name} labeller returned {len(labels)} labels for {len(chunk)} features")
            now = now_iso()
            for ev, label in zip(chunk, labels):
                cache["entries"][keys[ev.feature]] = {"label": label, "created": now}
            if time.monotonic() - saved >= CACHE_SAVE_S or i + batch_size >= len(misses):
                write_json_atomic(run.label_cache, cache)
                saved = time.monotonic()
            shown.update(len(chunk))


def _evidence_summary(ev: FeatureEvidence, examples: int) -> dict:
    """What a label record keeps of the evidence it was made from."""
    return {"evidence_digest": ev.digest(),
            "evidence": {"examples": min(examples, len(ev.top)), "top_activation": ev.max_activation,
                         "promoted": [t for t, _ in ev.promoted[:8]]}}


def _record(entry: dict, cfg: LabelConfig, model_id: str, summary: dict) -> dict:
    return {"label": entry["label"], "backend": cfg.backend, "model": model_id, "prompt_version": _prompt_version(cfg),
            "evidence_digest": summary["evidence_digest"], "created": entry["created"], "evidence": summary["evidence"]}


def _model_id(cfg: LabelConfig) -> str:
    return {"stats": "stats", "local": cfg.local_model, "openai": cfg.openai_model}[cfg.backend]


def config_json(cfg) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}


def read_json_or(path: Path, default: dict) -> dict:
    """A JSON file that a command adds to (labels, reviews, caches); `default` before the first run."""
    return read_json(path, "delete it to start over") if path.is_file() else default


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
