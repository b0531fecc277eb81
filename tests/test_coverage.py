"""Coverage of every live feature: stats labels for all, a stratified random sample plus the top features for the
model labels and scores, and the eval table's coverage row estimated on the sample alone."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from interpret.coverage import density_strata, load_selection, stratified_sample
from interpret.eval_records import MetricRow
from interpret.label_config import LabelConfig, ScoreConfig
from interpret.labels import load_label_records, run_label
from interpret.report import _label_coverage_row
from interpret.score_stats import wilson_interval
from interpret.scoring import run_score
from tests.test_labels import CountingLabeler, feature, write_evidence, write_importance
from tests.test_scoring import WordLabeler, WordSimulator, word_feature


def densities(n_live: int, n_dead: int = 0) -> dict[int, float]:
    """Live features with distinct, shuffled densities (ids unrelated to density order), then dead ones."""
    live = {fid: ((fid * 37) % n_live + 1) / (10 * n_live) for fid in range(n_live)}
    return {**live, **{n_live + i: 0.0 for i in range(n_dead)}}


def live_only(density: dict[int, float]) -> dict[int, float]:
    return {fid: d for fid, d in density.items() if d > 0}


# -- the stratified random sample -----------------------------------------------------------------
def test_sample_takes_each_density_decile_in_proportion():
    density = live_only(densities(1000))
    sample, counts = stratified_sample(density, 200, seed=0)
    assert len(sample) == len(set(sample)) == 200 and counts == [20] * 10
    decile = {fid: h for h, stratum in enumerate(density_strata(density)) for fid in stratum}
    assert Counter(decile[fid] for fid in sample) == {h: 20 for h in range(10)}
    assert [len(s) for s in density_strata(density)] == [100] * 10
    strata = density_strata(density)
    assert max(density[f] for f in strata[0]) < min(density[f] for f in strata[1])  # deciles by density

    uneven = live_only(densities(205))  # strata of 20 and 21 features: 50 drawn, each within one of 50·N_h/N
    sample, counts = stratified_sample(uneven, 50, seed=3)
    sizes = [len(s) for s in density_strata(uneven)]
    assert sum(counts) == len(sample) == 50 and all(abs(k - 50 * n / 205) < 1 for k, n in zip(counts, sizes))


def test_sample_is_seeded_and_takes_every_live_feature_when_there_are_fewer():
    density = live_only(densities(300))
    assert stratified_sample(density, 60, seed=0) == stratified_sample(density, 60, seed=0)
    assert stratified_sample(density, 60, seed=0)[0] != stratified_sample(density, 60, seed=1)[0]
    assert stratified_sample(density, 500, seed=0)[0] == sorted(density)


def test_label_records_a_sample_of_live_features_plus_the_top_ones(tmp_path):
    density = densities(100, n_dead=5)
    run = write_evidence(tmp_path, [feature(fid, f"w{fid}", d) for fid, d in density.items()])
    write_importance(run, [102, 7, 3, 50, 11, 60])  # 102 is dead: skipped
    labeler = CountingLabeler()
    out = run_label(LabelConfig(run=tmp_path, backend="local", sample=20, top=4, seed=5), labeler=labeler)

    selection = load_selection(run)
    assert selection.top == [7, 3, 50, 11] and selection.live == 100 and selection.seed == 5
    assert len(selection.sample) == 20 and not set(selection.sample) & set(range(100, 105))  # no dead feature
    decile = {fid: h for h, stratum in enumerate(density_strata(live_only(density))) for fid in stratum}
    assert Counter(decile[fid] for fid in selection.sample) == {h: 2 for h in range(10)}
    assert out["features"] == selection.features and set(out["features"]) == set(selection.sample) | {7, 3, 50, 11}
    assert labeler.calls == len(out["features"]) and set(load_label_records(run)) == set(out["features"])

    again = run_label(LabelConfig(run=tmp_path, backend="local", sample=20, top=4, seed=5), labeler=CountingLabeler())
    assert again["sample"] == selection.sample  # reproducible
    other = run_label(LabelConfig(run=tmp_path, backend="local", sample=20, top=4, seed=6), labeler=CountingLabeler())
    assert other["sample"] != selection.sample and load_selection(run).seed == 6


def test_stats_labels_cover_every_live_feature(tmp_path):
    density = densities(60, n_dead=3)
    run = write_evidence(tmp_path, [feature(fid, f"w{fid}", d) for fid, d in density.items()])
    out = run_label(LabelConfig(run=tmp_path, backend="stats", sample=10, top=2))
    assert out["features"] == list(range(60))  # every live feature, whatever --sample and --top
    records = load_label_records(run)
    assert set(records) == set(range(60)) and all(set(r) == {"stats"} for r in records.values())
    assert len(load_selection(run).sample) == 10  # the selection is recorded all the same


# -- scoring follows the selection; the coverage row is the sample's --------------------------------
def test_score_follows_the_selection_and_coverage_counts_only_the_random_sample(tmp_path):
    features = [word_feature(fid, f"w{fid}z") for fid in range(1, 41)]  # no word inside another
    for ev in features:
        ev.density = ev.feature / 1000
    run = write_evidence(tmp_path, features)
    top = [2, 4, 6, 8]
    write_importance(run, top)
    # even features get their own word (verified), odd ones a word found nowhere (chance)
    words = {fid: f"w{fid}z" if fid % 2 == 0 else "nothing" for fid in range(1, 41)}
    cfg = LabelConfig(run=tmp_path, backend="local", sample=10, top=len(top), examples=4)
    run_label(cfg, labeler=WordLabeler(words))
    run_label(LabelConfig(run=tmp_path, backend="stats", sample=10, top=len(top)))  # every live feature
    result = run_score(ScoreConfig(run=tmp_path, scorers="detection"), simulator=WordSimulator())

    selection = load_selection(run)
    assert set(result["features"]) == {str(f) for f in selection.features}  # not the 40 stats labels
    assert result["selection"] == selection.to_json()
    for fid, by_backend in result["features"].items():
        assert all(row["sample"] == (int(fid) in selection.sample) and row["top"] == (int(fid) in top)
                   for row in by_backend.values())
    top_only = [fid for fid in top if fid not in selection.sample]
    assert top_only and all(result["features"][str(fid)]["local"]["verified"] for fid in top_only)

    k = sum(1 for fid in selection.sample if fid % 2 == 0)
    row, _ = _label_coverage_row(run)
    assert row.value == pytest.approx(k / 10) and row.ci95 == pytest.approx(list(wilson_interval(k, 10)))
    lo, hi = wilson_interval(k, 10)
    assert f"verified in the stratified random sample of 10 of 40 live features: {k / 10:.1%} [{lo:.1%}, {hi:.1%}]" in row.note
    assert f"the {len(top_only)} --top features outside it are kept apart ({len(top_only)} verified)" in row.note
    sample = result["summary"]["local"]["sample"]
    assert (sample["n"], sample["verified"]) == (10, k) and sample["verified_ci95"] == pytest.approx([lo, hi])
    assert result["summary"]["local"]["sample"]["control_verified_frac"] == 0.0


def test_coverage_is_not_measured_without_a_random_sample(tmp_path):
    run = write_evidence(tmp_path, [word_feature(fid, f"w{fid}") for fid in range(1, 6)])
    run_label(LabelConfig(run=tmp_path, backend="local", sample=0, top=5, examples=4),
              labeler=WordLabeler({fid: f"w{fid}" for fid in range(1, 6)}))
    run_score(ScoreConfig(run=tmp_path, scorers="detection"), simulator=WordSimulator())
    row, _ = _label_coverage_row(run)
    assert row.value is None and row.passed is None and "--sample" in row.note

    scores = json.loads(run.scores.read_text())
    run.scores.write_text(json.dumps({k: v for k, v in scores.items() if k != "selection"}))  # made before samples
    assert _label_coverage_row(run)[0].value is None


def test_coverage_row_shows_its_interval_and_round_trips():
    row = MetricRow.measure("label_coverage", 0.125, "verified in the stratified random sample …", [0.086, 0.178])
    assert row.shown_value == "12.5% [8.6%, 17.8%]" and row.passed is False
    assert MetricRow.from_json(json.loads(json.dumps(row.to_json()))) == row
    assert "ci95" not in MetricRow.measure("kl", 0.3).to_json()
