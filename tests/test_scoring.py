"""Label scoring protocol: clean negatives, held-out contexts, AUROC and calibration, chance, the shuffled control."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

from interpret.evidence import _window, _window_max, negative_windows
from interpret.label_config import LabelConfig, ScoreConfig
from interpret.labelers import StatsLabeler
from interpret.labels import run_label
from interpret.records import Example, FeatureEvidence
from interpret.scoring import (
    auroc,
    balanced_accuracy,
    calibrated_threshold,
    chance_rate,
    control_labels,
    fewest_examples,
    held_out_contexts,
    run_score,
    score_detection,
    wilson_interval,
)
from tests.test_labels import write_evidence

SHOWN = 4
"""Top examples the labeller is shown in these tests (`--examples`)."""


# -- hand-built evidence --------------------------------------------------------------------------
def context(word: str, i: int, act: float) -> Example:
    tokens = ["item", f" {i}", ":", f" {word}"]
    return Example(tokens=tokens, acts=[0.0, 0.0, 0.0, act], center=3)


def word_feature(fid: int, word: str, dense: bool = False) -> FeatureEvidence:
    """8 top examples, 12 quantile samples and 16 negatives; a dense feature fires weakly in its negatives."""
    top = [context(word, i, 5.0 - 0.1 * i) for i in range(8)]
    quantiles = [context(word, 100 + i, 0.1 * (i + 1)) for i in range(12)]
    negatives = [Example(tokens=["row", f" {i}", " =", f" {i * 7}"], acts=[0.0, 0.0, 0.3 if dense else 0.0, 0.0], center=1)
                 for i in range(16)]
    return FeatureEvidence(feature=fid, density=0.3 if dense else 0.01, max_activation=5.0, mean_activation=1.0,
                           top=top, quantiles=quantiles, negatives=negatives)


class WordLabeler(StatsLabeler):
    """Labels every feature with a fixed word."""

    name, model_id = "local", "fake-llm"

    def __init__(self, words: dict[int, str]):
        super().__init__()
        self.words = words

    def label(self, batch):
        return [self.words[ev.feature] for ev in batch]


class WordSimulator:
    """A perfect but miscalibrated reader: P(yes) 0.9 when the label's word is in the text, else 0.6."""

    name, model_id = "word", "word"

    def __init__(self):
        self.seen: list[str] = []

    def judge(self, label, contexts, task="detection"):
        self.seen += list(contexts)
        return [0.9 if f" {label}" in c else 0.6 for c in contexts]


# -- negatives ------------------------------------------------------------------------------------
def test_negatives_never_fire_in_their_windows():
    S, T, context_ = 6, 24, 2
    g = torch.Generator().manual_seed(0)
    positions_ST = torch.arange(T).expand(S, T)
    rare_ST = torch.rand(S, T, generator=g) < 0.03
    idx = torch.stack([torch.ones(S, T), torch.where(rare_ST, 0, 2)], -1).to(torch.int32)
    # feature 1 fires everywhere (dense), feature 0 rarely, feature 2 at every 7th position
    val = torch.stack([1 + torch.rand(S, T, generator=g),
                       torch.where(rare_ST | (positions_ST % 7 == 0), 0.5 + torch.rand(S, T, generator=g), 0.0)], -1)
    val[:, 1:, 0] *= torch.rand(S, T - 1, generator=g)  # so that feature 1's windows differ in strength
    tensors = {"tokens": torch.randint(0, 10, (S, T), generator=g).to(torch.int32), "codes.indices": idx,
               "codes.values": val.half()}
    pool = torch.tensor([s * T + t for s in range(S) for t in range(1, T)])[torch.randperm(S * (T - 1), generator=g)]
    vocab = [f"t{i}" for i in range(10)]
    max_PF = _window_max(tensors, pool, context_, 3)
    n = 5
    for f in (0, 2):
        rows, dense = negative_windows(max_PF[:, f], n)
        assert not dense and len(rows) == n
        for row in rows:
            shown = _window(tensors, vocab, int(pool[row]), f, context_)
            assert len(shown.tokens) >= context_ + 1 and max(shown.acts) == 0
        clean = [r for r in range(len(pool)) if max(_window(tensors, vocab, int(pool[r]), f, context_).acts) == 0]
        assert rows == clean[:n]  # the first clean windows of the (random) pool, none skipped
    rows, dense = negative_windows(max_PF[:, 1], n)
    assert dense and len(rows) == n
    strength = [max(_window(tensors, vocab, int(pool[r]), 1, context_).acts) for r in range(len(pool))]
    assert max(strength[r] for r in rows) <= sorted(strength)[n - 1] + 1e-3  # the windows where it fires least


# -- held-out contexts ----------------------------------------------------------------------------
def test_scoring_contexts_are_held_out_from_the_labeller_and_split_deterministically():
    ev = word_feature(1, "cat")
    shown = ev.top[:SHOWN]
    ctx = held_out_contexts(ev, shown, 11, 5, random.Random("0-1"))
    scored = ctx.active + ctx.calibration_active
    assert len(ctx.active) == 11 and len(ctx.calibration_active) == 5 and len(ctx.negatives) == 11
    assert len(ctx.calibration_negatives) == 5 and not ctx.dense
    assert not {ex.text for ex in shown} & {ex.text for ex in scored}
    assert len({ex.text for ex in scored}) == 16  # calibration and scored contexts are disjoint
    assert not {ex.text for ex in ctx.negatives} & {ex.text for ex in ctx.calibration_negatives}
    assert held_out_contexts(ev, shown, 11, 5, random.Random("0-1")) == ctx
    assert held_out_contexts(word_feature(2, "dog", dense=True), [], 11, 5, random.Random(0)).dense


# -- AUROC and calibration ------------------------------------------------------------------------
def test_perfect_ranking_miscalibrated_simulator():
    ev = word_feature(1, "cat")
    ctx = held_out_contexts(ev, ev.top[:SHOWN], 11, 5, random.Random(0))
    sim = WordSimulator()
    row = score_detection(sim, "cat", ctx)
    p = sim.judge("cat", [ex.text for ex in ctx.active + ctx.negatives])
    y = [True] * len(ctx.active) + [False] * len(ctx.negatives)
    assert min(p) > 0.5
    assert row["detection_auroc"] == 1.0
    assert balanced_accuracy(y, p, 0.5) == 0.5  # every context called active at a fixed 0.5
    assert row["detection_balanced_acc"] == 1.0 and row["detection_threshold"] == pytest.approx(0.75)


def test_calibrated_threshold_maximises_balanced_accuracy():
    # candidates 0.6 (BA ½), 0.65 and 0.8 (both ¾): the lowest best
    assert calibrated_threshold([1, 1, 0, 0], [0.9, 0.7, 0.7, 0.6]) == pytest.approx(0.65)
    assert calibrated_threshold([1, 0], [0.2, 0.8]) == 0.2  # inverted: nothing beats calling every context active


# -- chance ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_pos,n_neg", [(1, 1), (2, 3), (3, 3), (4, 3), (5, 4), (5, 5)])
def test_chance_rate_matches_brute_force(n_pos, n_neg):
    orderings = list(itertools.combinations(range(n_pos + n_neg), n_pos))
    for threshold in (0.5, 0.7, 0.8):
        passing = 0
        for pos in orderings:
            y = [i in pos for i in range(n_pos + n_neg)]
            passing += auroc(y, list(range(n_pos + n_neg))) >= threshold - 1e-12
        assert chance_rate(n_pos, n_neg, threshold) == pytest.approx(passing / len(orderings), rel=1e-12)


def test_default_n_keeps_the_chance_rate_below_one_percent(tmp_path):
    n = ScoreConfig(run=tmp_path).n_examples
    assert n == fewest_examples() == 11
    assert chance_rate(n, n) < 0.01 <= chance_rate(n - 1, n - 1)
    assert chance_rate(n, n) == pytest.approx(0.007885, abs=1e-6)


def test_wilson_interval_hand_computed():
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)


# -- the shuffled-label control -------------------------------------------------------------------
def test_control_is_a_seeded_derangement_within_each_backend():
    jobs = [(fid, backend, {"label": f"{backend} {fid}"}) for backend in ("local", "stats") for fid in range(10)]
    jobs.append((3, "openai", {"label": "alone"}))
    controls = control_labels(jobs, seed=0)
    assert controls == control_labels(jobs, seed=0) and controls != control_labels(jobs, seed=1)
    assert ("openai" not in {b for _, b in controls})  # one label: nothing to shuffle it with
    for backend in ("local", "stats"):
        sources = [controls[(fid, backend)] for fid in range(10)]
        assert all(src != fid for fid, (src, _) in enumerate(sources))  # no feature keeps its own label
        assert sorted(src for src, _ in sources) == list(range(10))  # every label used once
        assert all(label == f"{backend} {src}" for src, label in sources)


def test_a_label_right_only_for_its_own_feature_is_verified_and_shuffled_ones_are_not(tmp_path):
    words = {1: "cat", 2: "dog", 3: "bird", 4: "fish", 5: "frog", 6: "zebra", 7: "the"}
    features = [word_feature(fid, word) for fid, word in list(words.items())[:5]]
    features.append(word_feature(6, "horse"))  # labelled "zebra": wrong
    features.append(word_feature(7, "the", dense=True))
    run = write_evidence(tmp_path, features)
    run_label(LabelConfig(run=tmp_path, backend="local", top=7, examples=SHOWN), labeler=WordLabeler(words))
    sim = WordSimulator()
    result = run_score(ScoreConfig(run=tmp_path, scorers="detection"), simulator=sim)
    assert json.loads(run.scores.read_text()) == json.loads(json.dumps(result))

    shown = {ex.text for ev in features for ex in ev.top[:SHOWN]}
    assert sim.seen and not shown & set(sim.seen)
    rows = {int(f): by_backend["local"] for f, by_backend in result["features"].items()}
    for fid in range(1, 6):
        assert rows[fid]["detection_auroc"] == 1.0 and rows[fid]["verified"] is True
    assert rows[6]["detection_auroc"] == 0.5 and rows[6]["verified"] is False
    assert all(row["control"]["feature"] != fid and row["control"]["verified"] is False for fid, row in rows.items())
    assert all(row["control"]["detection_auroc"] == 0.5 for row in rows.values())
    assert rows[1]["n_active"] == rows[1]["n_negative"] == 11 and rows[1]["chance_rate"] == result["chance_rate"] < 0.01

    summary = result["summary"]["local"]
    assert summary["n"] == 6 and summary["verified"] == 5 and summary["verified_frac"] == pytest.approx(5 / 6)
    assert summary["verified_ci95"] == pytest.approx(list(wilson_interval(5, 6)))
    assert summary["control_verified_frac"] == 0.0 and summary["control_bar"] == 0.5
    assert rows[7]["dense"] and summary["dense"]["n"] == 1  # counted apart, not in the 5 of 6

    from interpret.report import _label_coverage_row

    row, saved_summary = _label_coverage_row(run)
    # the random sample is every live feature here: 5 verified of 7, the dense one counted unverified
    assert row.value == pytest.approx(5 / 7) and row.ci95 == pytest.approx(list(wilson_interval(5, 7)))
    assert saved_summary == result["summary"] and "1 dense" in row.note


class SharingWordSimulator(WordSimulator):
    """WordSimulator with judge_many: records which labels each call judged together."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[list[str], int]] = []

    def judge_many(self, labels, contexts, task="detection"):
        self.calls.append((list(labels), len(contexts)))
        return [self.judge(label, contexts, task) for label in labels]


def test_label_sets_of_a_feature_are_judged_together_with_the_same_scores(tmp_path):
    words = {1: "cat", 2: "dog", 3: "bird"}
    run = write_evidence(tmp_path, [word_feature(fid, word) for fid, word in words.items()])
    run_label(LabelConfig(run=tmp_path, backend="local", top=3, examples=SHOWN), labeler=WordLabeler(words))
    wrong = WordLabeler({1: "dog", 2: "bird", 3: "owl"})
    wrong.model_id = "another-llm"  # not the first labeller's cached labels
    run_label(LabelConfig(run=tmp_path, backend="local", top=3, examples=SHOWN, label_set="other"), labeler=wrong)
    shared = SharingWordSimulator()
    together = run_score(ScoreConfig(run=tmp_path, scorers="detection"), simulator=shared)
    run.scores.unlink()
    apart = run_score(ScoreConfig(run=tmp_path, scorers="detection"), simulator=WordSimulator())
    assert together["features"] == apart["features"]
    # per feature: the scored contexts once for both label sets' labels and controls, the calibration ones once
    assert len(shared.calls) == 2 * len(words)
    first_scored, first_calibration = shared.calls[:2]
    assert first_scored[1] == 22 and len(first_scored[0]) >= 3 and first_calibration == (["cat", "dog"], 10)


def test_scoring_the_sample_then_the_top_adds_up_to_one_whole_run(tmp_path):
    words = {1: "cat", 2: "dog", 3: "bird", 4: "fish", 5: "frog"}
    run = write_evidence(tmp_path, [word_feature(fid, word) for fid, word in words.items()])
    run_label(LabelConfig(run=tmp_path, backend="local", sample=2, top=2, examples=SHOWN), labeler=WordLabeler(words))
    run_label(LabelConfig(run=tmp_path, backend="stats", sample=2, top=2, examples=SHOWN))
    whole = run_score(ScoreConfig(run=tmp_path, scorers="detection"), simulator=WordSimulator())
    run.scores.unlink()
    sample = run_score(ScoreConfig(run=tmp_path, scorers="detection", subset="sample"), simulator=WordSimulator())
    assert all(by_set["local"]["sample"] for by_set in sample["features"].values())
    run_score(ScoreConfig(run=tmp_path, scorers="detection", subset="top", labels="stats"), simulator=WordSimulator())
    last = run_score(ScoreConfig(run=tmp_path, scorers="detection", subset="top"), simulator=WordSimulator())
    assert last["features"] == whole["features"] and last["summary"] == whole["summary"]
