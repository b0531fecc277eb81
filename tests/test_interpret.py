"""Interpretation: attribution patching, importance, evidence, explanations and faithfulness (tiny models)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import save_random_sae


def make_run(frozen, root, arch: str = "readout", layer: int = 2, latents: int = 64, k: int = 8, rank: int = 16):
    """A run folder: a random TopK SAE and a decoder initialised from it (what `decoder train` writes)."""
    from distill.student import build_student_decoder
    from sae.model import SparseAutoencoder

    sae_dir = save_random_sae(frozen, root / "sae", layer=layer, latents=latents, k=k)
    sae = SparseAutoencoder.load(sae_dir)
    torch.manual_seed(0)
    decoder = build_student_decoder(arch, sae, frozen, layer, rank=rank, n_layers=1)
    decoder.save(root / "decoder", extra={"layer": layer, "model": str(frozen.name), "sae": str(sae_dir)})
    return root


@pytest.fixture(scope="module")
def readout_run(tiny_frozen, tmp_path_factory):
    return make_run(tiny_frozen, tmp_path_factory.mktemp("run_readout"), k=24)


@pytest.fixture(scope="module")
def context_run(tiny_frozen, tmp_path_factory):
    return make_run(tiny_frozen, tmp_path_factory.mktemp("run_context"), arch="context")


def components(run_dir, frozen):
    from interpret.components import load_components
    from interpret.run import InterpretRun

    return load_components(InterpretRun(run_dir), frozen=frozen)


def test_attribution_equals_exact_ablation_for_a_linear_decoder(tiny_frozen, tmp_path):
    from interpret.attribution import ablate, decoder_attribution, objective, per_feature

    # rank 0: the full feature x vocabulary matrix in fp32, so logits are exactly linear in the features
    comp = components(make_run(tiny_frozen, tmp_path, arch="linear", rank=0), tiny_frozen)
    with torch.no_grad():
        comp.decoder.A_FR.normal_()
    ids = torch.tensor([[tiny_frozen.bos_token_id, 40, 41, 42, 43, 44]])
    h = tiny_frozen.residuals(ids, [2])[2].float().clone()
    indices, values = comp.features(h)
    targets = torch.full(ids.shape, 7)
    weight = torch.ones(ids.shape)
    J, attr = decoder_attribution(comp, indices, values, targets, weight, "logit")
    est = per_feature(indices, attr, comp.sae.cfg.num_latents)
    base = (J * weight).sum()
    fired = indices[:, 1:][values[:, 1:] > 0].unique()
    assert len(fired) > 3
    for f in fired.tolist():
        with torch.no_grad():
            J_abl = objective(comp.decoder_logits(indices, ablate(indices, values, [f])), targets, "logit")
        # position 0 (BOS) is not attributed, so the ablation there is undone too
        J_abl[:, 0] = J[:, 0]
        assert est[f].item() == pytest.approx((base - J_abl.sum()).item(), rel=1e-5, abs=1e-5)


def test_importance_ranks_features_and_checks_them_by_ablation(readout_run, tiny_frozen):
    from interpret.config import ImportanceConfig
    from interpret.importance import compute_importance

    cfg = ImportanceConfig(run=readout_run, model=str(tiny_frozen.name), data="builtin:tasks", tokens=512, seq_len=32,
                           validate_top=10, validate_sequences=4, spliced_tokens=256, share_targets=8)
    result = compute_importance(cfg, components(readout_run, tiny_frozen), progress=False)
    imp = [f["importance"] for f in result["features"]]
    assert imp == sorted(imp, reverse=True) and imp[0] > 0
    assert 10 / 24 < result["top10_share"] < 1  # 24 active features per token; the top 10 carry more than a uniform share
    v = result["validation"]
    assert v["features"] == 10 and len(v["decoder"]["ablation"]) == 10
    assert v["decoder"]["spearman"] > 0.5  # first-order estimate ranks like exact ablation
    assert "spliced" in v and all(np.isfinite(v["spliced"]["ablation"]))


@pytest.fixture(scope="module")
def context_evidence(context_run, tiny_frozen):
    from interpret.config import EvidenceConfig
    from interpret.evidence import build_evidence, save_evidence
    from interpret.run import InterpretRun

    comp = components(context_run, tiny_frozen)
    cfg = EvidenceConfig(run=context_run, model=str(tiny_frozen.name), data="builtin:tasks", tokens=2048, seq_len=32,
                         context=4, top_examples=5, quantile_examples=3, negative_examples=40, batch_size=8)
    meta, tensors = build_evidence(cfg, comp, progress=False)
    save_evidence(InterpretRun(context_run), meta, tensors)
    return meta


def test_evidence_examples_point_at_real_activations(context_run, context_evidence, tiny_frozen):
    from interpret.evidence import Evidence, load_evidence
    from interpret.run import InterpretRun
    from interpret.scoring import is_dense

    comp = components(context_run, tiny_frozen)
    meta = context_evidence
    ev = load_evidence(InterpretRun(context_run))
    assert isinstance(ev, Evidence) and len(ev) == meta["live"] > 0
    densities = []
    for f in list(ev)[:10]:
        fe = ev[f]
        densities.append(fe.density)
        assert fe.top, f
        acts = [e.activation for e in fe.top]
        assert acts == sorted(acts, reverse=True) and acts[0] == pytest.approx(fe.max_activation, rel=1e-2)
        assert all(len(e.tokens) == len(e.acts) <= 9 for e in fe.top)
        q = [e.activation for e in fe.quantiles]
        assert q == sorted(q) and all(a > 0 for a in q)
        assert len(fe.promoted) == 10 and fe.promoted[0][1] >= fe.promoted[-1][1]
        assert sum(fe.histogram[1]) > 0
    dense = [f for f in ev if ev.stats(f)["dense"]]
    assert 0 < len(dense) == meta["dense"] < len(ev)  # a random top-8-of-64 SAE has features of both kinds
    for f in ev:
        fe = ev[f]
        assert len(fe.negatives) == 40 and is_dense(fe) == (f in dense)
        strength = [max(e.acts) for e in fe.negatives]
        if f in dense:  # too few windows without firing: the ones where it fires least, clean ones first
            assert strength == sorted(strength) and strength[-1] > 0
        else:  # the feature fires nowhere in the shown window
            assert strength == [0.0] * 40
    # the SAE is top-k: densities over all latents sum to k per token
    total = sum(ev.stats(f)["density"] for f in ev)
    assert total == pytest.approx(comp.sae.cfg.k, rel=1e-6)


def test_sufficiency_and_comprehensiveness_on_a_hand_built_case(tiny_frozen, tmp_path):
    from interpret.explain import faithfulness

    comp = components(make_run(tiny_frozen, tmp_path, arch="linear", rank=0), tiny_frozen)
    V = comp.frozen.vocab_size
    with torch.no_grad():
        comp.decoder.A_FR.zero_()
        comp.decoder.A_FR[0, 5] = 3.0  # feature 0 pushes token 5 hard, feature 1 a little, feature 2 pushes token 6
        comp.decoder.A_FR[1, 5] = 1.0
        comp.decoder.A_FR[2, 6] = 2.0
    indices = torch.tensor([[[0, 1, 2], [0, 1, 2]]])
    values = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]])

    def p5(z5: float, z6: float) -> float:
        return float(np.exp(z5) / (np.exp(z5) + np.exp(z6) + (V - 2)))

    out = faithfulness(comp, indices, values, 5, named=[0])
    assert out.p == pytest.approx(p5(4, 2), rel=1e-5)
    assert out.p_keep == pytest.approx(p5(3, 0), rel=1e-5)
    assert out.p_ablate == pytest.approx(p5(1, 2), rel=1e-5)
    assert out.sufficiency == pytest.approx(p5(3, 0) / p5(4, 2), rel=1e-5)
    assert out.comprehensiveness == pytest.approx(1 - p5(1, 2) / p5(4, 2), rel=1e-5)
    assert out.sufficient_top1
    everything = faithfulness(comp, indices, values, 5, named=[0, 1, 2])
    assert everything.sufficiency == pytest.approx(1.0) and everything.comprehensiveness > 0.9


def test_explain_ranks_features_by_attribution_and_reports_faithfulness(context_run, tiny_frozen):
    from interpret.explain import explain
    from interpret.explain_records import Explanation

    comp = components(context_run, tiny_frozen)
    expl = explain(comp, "What is 17 + 3?", top=5)
    assert expl.prediction.token and 0 < expl.prediction.confidence <= 1
    attrs = [abs(f.attribution) for f in expl.features]
    assert len(attrs) == 5 and attrs == sorted(attrs, reverse=True)
    assert 0 <= expl.faithfulness.sufficiency <= 1 and 0 <= expl.faithfulness.comprehensiveness <= 1
    assert expl.faithfulness.random_sufficiency is not None and expl.faithfulness.kept_features == 5
    assert 0 < expl.faithfulness.top10_share <= 1
    assert len(expl.tokens) == len(tiny_frozen.tokenizer("What is 17 + 3?", add_special_tokens=False)["input_ids"]) + 1
    result = json.loads(json.dumps(expl.to_json()))  # serialisable as is
    assert set(result) == EXPLAIN_JSON_KEYS
    assert result["next_token"] == expl.prediction.token and len(result["features"]) == 5
    assert Explanation.from_json(result) == expl


def test_clustering_groups_features_that_point_and_fire_together():
    import scipy.sparse as sp

    from interpret.cluster import cluster_features, cluster_label, similarity

    d = torch.tensor([[1.0, 0, 0], [0.99, 0.1, 0], [0, 1.0, 0], [0, 0.05, 1.0]])
    fires = sp.csr_matrix(np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float32))
    sim = similarity(d, fires, weight=0.5)
    assert sim[0, 1] == pytest.approx(0.5 * float(torch.nn.functional.cosine_similarity(d[0], d[1], dim=0)) + 0.5)
    assert sim[2, 3] == pytest.approx(0.5 * float(torch.nn.functional.cosine_similarity(d[2], d[3], dim=0)))
    groups = cluster_features(sim, threshold=0.5)
    assert groups[0] == groups[1] and len({groups[0], groups[2], groups[3]}) == 3
    assert cluster_label(["numbers in a list", "list of numbers"], []) .startswith(("numbers", "list"))
    assert cluster_label([], [[" cat", " dog"], [" cat"]]) == "promotes 'cat', 'dog'"


def test_explanation_decoder_learns_to_name_the_labels_of_active_features(context_run, context_evidence):
    from interpret.config import ExplainerConfig
    from interpret.explainer import ExplanationDecoder, train_explainer
    from interpret.run import InterpretRun

    run = InterpretRun(context_run)
    names = ["digits", "question words", "punctuation", "capital letters", "common words", "spaces"]
    labels = {f: names[f % len(names)] + f" {f % 3}" for f in range(0, 64, 2)}  # half the features labelled
    cfg = ExplainerConfig(run=context_run, positions=2000, names=1, steps=300, hidden=64, batch_size=64)
    model, metrics = train_explainer(cfg, labels, run, progress=False)
    assert metrics["eval_pairs"] == int(metrics["pairs"] * 0.1) > 100
    assert metrics["word_f1"] > 0.6, metrics["samples"]
    model.save(run.explainer)
    scored = train_explainer(cfg, labels, run, progress=False, simulator=MarkedTokenSimulator())[1]["simulator"]
    assert scored["chance"] == 0.5 and scored["generated"]["n"] > 50  # every held-out text judged on two contexts
    assert 0.0 <= scored["generated"]["auroc"] <= 1.0 and 0.0 <= scored["reference"]["auroc"] <= 1.0
    again = ExplanationDecoder.load(run.explainer)
    idx, val = torch.tensor([[0, 1, 3]]), torch.tensor([[5.0, 0.0, 0.0]])
    assert again.generate(idx, val) == model.generate(idx, val)


class MarkedTokenSimulator:
    """Says yes exactly when the label names the marked token: a perfect simulator for labels that are tokens."""

    model_id = "marked-token"

    def judge(self, label, contexts, task="detection"):
        return [1.0 if f"<<{label}>>" in c else 0.0 for c in contexts]


def test_simulator_auroc_is_one_for_texts_that_single_out_their_position_and_at_most_chance_for_shuffled_ones():
    from interpret.explainer import simulator_auroc

    words_ = ["cat", "dog", "bird", "fish", "cow", "owl"] * 5
    contexts = [(["the", " big", f" {w}"], 2) for w in words_]
    right = simulator_auroc(MarkedTokenSimulator(), words_, contexts, n=30, seed=0)
    assert right["auroc"] == 1.0 and right["n"] == 30 and right["own_mean"] == 1.0 and right["other_mean"] == 0.0
    shuffled = words_[1:] + words_[:1]  # every text names another position's token
    wrong = simulator_auroc(MarkedTokenSimulator(), shuffled, contexts, n=30, seed=0)
    assert wrong["auroc"] <= 0.5 and wrong["own_mean"] == 0.0
    assert simulator_auroc(MarkedTokenSimulator(), [""] * 3, contexts[:3], n=3, seed=0)["n"] == 0  # no text, no score


EXPLAIN_JSON_KEYS = {
    "text", "model", "layer", "run", "decoder", "chat", "next_token", "next_token_id", "confidence", "frozen_next_token",
    "frozen_confidence", "frozen_prob_of_prediction", "agrees_with_frozen", "top_predictions", "tokens", "features",
    "active_features", "sufficiency", "comprehensiveness", "sufficient_top1", "kept_features", "random_sufficiency",
    "random_comprehensiveness", "top10_share", "trace", "explanations"}


def test_explain_cli_prints_the_json_contract_and_writes_the_html(context_run, context_evidence, tiny_frozen, tmp_path, capsys):
    from faithlens_cli import main

    html = tmp_path / "out.html"
    code = main(["explain", "What is 17 + 3?", "--run", str(context_run), "--model", str(tiny_frozen.name),
                 "--json", "--html", str(html), "--top", "4"])
    assert code == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert set(result) == EXPLAIN_JSON_KEYS
    assert len(result["features"]) == 4
    assert all({"id", "label", "activation", "attribution"} <= set(f) for f in result["features"])
    assert all({"density", "examples", "histogram", "promoted"} <= set(f) for f in result["features"])
    assert all(f["examples"] for f in result["features"])  # evidence of the run is shown with each feature
    assert str(html) in captured.err and html.read_text().startswith("<!DOCTYPE html>")


def test_explain_rejects_an_empty_text(context_run, capsys):
    from faithlens_cli import main

    assert main(["explain", "  ", "--run", str(context_run)]) == 2
    assert "TEXT" in capsys.readouterr().err


HOSTILE = ('The page said <script>alert("pwned")</script> and then "quoted" text with \'single\' quotes. '
           '<img src=x onerror=alert(1)> 17 + 3 = 20. ')


def test_hostile_corpus_goes_through_labels_and_dashboard_without_executing(tiny_frozen, tmp_path):
    """A corpus with <script> and quotes → evidence → stats labels → explain --html → a real browser: nothing runs."""
    from faithlens_cli import main
    from interpret.labels import load_labels
    from interpret.run import InterpretRun
    from tests.test_dashboard import _browser_or_skip

    run = make_run(tiny_frozen, tmp_path / "run", arch="context")
    corpus = tmp_path / "hostile.txt"
    corpus.write_text("\n\n".join([HOSTILE] * 60))
    model = ["--model", str(tiny_frozen.name)]
    assert main(["features", "evidence", str(run), *model, "--data", str(corpus), "--tokens", "3000", "--seq-len", "32",
                 "--context", "6"]) == 0
    assert main(["features", "label", str(run), "--top", "30", "--backend", "stats"]) == 0
    labels = load_labels(InterpretRun(run))
    assert any("<" in text or '"' in text for text in labels.values())  # data-derived markup really reached the labels
    html = tmp_path / "explain.html"
    assert main(["explain", 'What is <script>alert("x")</script> 17 + 3?', "--run", str(run), *model,
                 "--html", str(html)]) == 0

    chromium, sync_playwright = _browser_or_skip()
    dialogs = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(html.as_uri())
            n_tokens = page.locator(".tok").count()
            assert n_tokens > 5
            for pos in range(1, n_tokens):
                page.hover(f'.tok[data-pos="{pos}"]')
                shown = page.locator("#token-features .lbl").all_inner_texts()
                if any(text != "unlabelled" for text in shown):
                    break
            assert any(text in labels.values() for text in shown), shown  # the hovered token's labelled features appear
            assert page.locator("img").count() == 0 and page.evaluate("typeof window.__pwned") == "undefined"
        finally:
            browser.close()
    assert dialogs == []


def test_explain_names_verified_labels_and_marks_the_others(context_run, context_evidence, tiny_frozen, tmp_path, capsys):
    """Labels and scores in the run: `explain` shows a verified label with its AUROC, marks a statistics label and
    an unverified model label as such, in --json and in the HTML page."""
    from faithlens_cli import main
    from interpret.run import InterpretRun

    run = InterpretRun(context_run)
    status = {0: "verified", 1: "unverified", 2: "statistic"}  # by feature id mod 3
    labels, scores = {}, {}
    for f in range(64):
        kind = status[f % 3]
        backend = "stats" if kind == "statistic" else "local"
        text = f"<i>label {f}</i>" if kind == "unverified" else f"label {f}"
        labels[str(f)] = {backend: {"label": text}}
        scores[str(f)] = {backend: {"label": text, "detection_auroc": 0.9 if kind == "verified" else 0.5,
                                    "verified": kind == "verified"}}
    try:
        run.labels.write_text(json.dumps({"features": labels}))
        run.scores.write_text(json.dumps({"features": scores}))
        html = tmp_path / "out.html"
        assert main(["explain", "What is 17 + 3?", "--run", str(context_run), "--model", str(tiny_frozen.name),
                     "--json", "--html", str(html), "--top", "10"]) == 0
        result = json.loads(capsys.readouterr().out)
    finally:
        run.labels.unlink()
        run.scores.unlink()
    page = html.read_text()
    for f in result["features"]:
        kind = status[f["id"] % 3]
        assert f["label_status"] == kind and f["label"].endswith(f"label {f['id']}</i>" if kind == "unverified"
                                                                 else f"label {f['id']}")
        assert f["label_scores"]["detection_auroc"] == (0.9 if kind == "verified" else 0.5)
        if kind == "unverified":
            assert f"&lt;i&gt;label {f['id']}&lt;/i&gt;" in page
    assert {status[f["id"] % 3] for f in result["features"]} == {"verified", "unverified", "statistic"}
    assert all(g["label_status"] == status[g["id"] % 3] for t in result["tokens"] for g in t["features"])
    assert "verified · detection AUROC 0.90" in page and "unverified · detection AUROC 0.50" in page
    assert "<i>label" not in page
