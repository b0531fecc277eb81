"""Feature labelling, label scoring and hand review on hand-built evidence (no corpus pass needed)."""

from __future__ import annotations

import json
import math
import random
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import torch

from interpret.label_config import PROMPTS, LabelConfig, ReviewConfig, ScoreConfig
from interpret.labelers import PROMPT_VERSION, LocalLabeler, OpenAILabeler, StatsLabeler, _label_prompt, clean_label, finish_label
from interpret.labels import load_label_records, load_labels, run_label
from interpret.records import Example, FeatureEvidence
from interpret.review import run_review
from interpret.run import InterpretRun
from interpret.scoring import Contexts, auroc, balanced_accuracy, fuzz_pair, fuzzing_auroc, run_score, score_detection
from models.errors import ConfigError


# -- hand-built evidence --------------------------------------------------------------------------
def example(tokens: list[str], peak: int, act: float = 2.0) -> Example:
    acts = [0.0] * len(tokens)
    acts[peak] = act
    return Example(tokens=tokens, acts=acts, center=peak)


def feature(fid: int, word: str, density: float = 0.01, promoted=(("cat", 1.5), ("dog", 1.2))) -> FeatureEvidence:
    top = [example(["I", " saw", " the", f" {word}", " today"], 3, 3.0),
           example(["the", f" {word}", " ran", " off"], 1, 2.5),
           example(["a", f" {word}", " and", " the", f" {word}"], 4, 2.0)]
    quantiles = [example(["my", f" {word}", verb], 1, 0.5) for verb in (" sleeps", " eats", " waits", " plays")]
    negatives = [Example(tokens=list(text), acts=[0.0] * len(text), center=1)
                 for text in (["17", " +", " 3", " =", " 20"], ["True", " and", " False"], ["x", " = ", "1"], ["a", "1", "b"])]
    return FeatureEvidence(feature=fid, density=density, max_activation=3.0, mean_activation=1.5, top=top,
                           quantiles=quantiles, negatives=negatives, promoted=list(promoted))


def write_evidence(root: Path, features: list[FeatureEvidence]) -> InterpretRun:
    """RUN/interpret/evidence.json in the plain format: every feature's FeatureEvidence.to_json()."""
    run = InterpretRun(root)
    run.dir.mkdir(parents=True, exist_ok=True)
    run.evidence.write_text(json.dumps({"model": "tiny", "layer": 2, "tokens": 100,
                                        "features": {str(f.feature): f.to_json() for f in features}}))
    return run


def write_importance(run: InterpretRun, ids: list[int]) -> None:
    run.importance.write_text(json.dumps({"features": [{"id": i, "importance": 10.0 - n} for n, i in enumerate(ids)]}))


class CountingLabeler(StatsLabeler):
    """The stats labeller, counting how many features it was asked to label."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def label(self, batch):
        self.calls += len(batch)
        return super().label(batch)


# -- labelling and its cache ----------------------------------------------------------------------
def test_label_cache_skips_unchanged_features(tmp_path):
    features = [feature(1, "cat"), feature(2, "dog"), feature(3, "bird")]
    run = write_evidence(tmp_path, features)
    write_importance(run, [3, 1, 2, 7])  # 7 has no evidence: skipped
    cfg = LabelConfig(run=tmp_path, backend="local", sample=0, top=3)

    first = CountingLabeler()
    out = run_label(cfg, labeler=first)
    assert first.calls == 3 and out["features"] == [3, 1, 2]

    again = CountingLabeler()
    run_label(cfg, labeler=again)
    assert again.calls == 0

    features[1].top[0].acts[2] = 9.0  # feature 2's evidence changes: only it is relabelled
    write_evidence(tmp_path, features)
    changed = CountingLabeler()
    out = run_label(cfg, labeler=changed)
    assert changed.calls == 1 and out["labelled"] == 1 and out["cached"] == 2

    forced = CountingLabeler()
    run_label(LabelConfig(run=tmp_path, backend="local", sample=0, top=3, force=True), labeler=forced)
    assert forced.calls == 3

    other_prompt, other = CountingLabeler(), next(p for p in PROMPTS if p != PROMPT_VERSION)
    run_label(LabelConfig(run=tmp_path, backend="local", sample=0, top=3, prompt=other), labeler=other_prompt)
    assert other_prompt.calls == 3 and load_label_records(run)[2]["local"]["prompt_version"] == other  # not cached
    run_label(cfg, labeler=CountingLabeler())  # back to the default prompt: its labels are still cached

    records = load_label_records(run)
    assert set(records) == {1, 2, 3}
    rec = records[2]["local"]
    assert rec["prompt_version"] == PROMPT_VERSION and rec["evidence_digest"] == features[1].digest()
    assert rec["evidence"]["promoted"] == ["cat", "dog"] and rec["evidence"]["top_activation"] == 3.0
    assert json.loads((run.dir / "label_config.json").read_text())["backend"] == "local"


def test_top_falls_back_to_densest_live_features(tmp_path):
    write_evidence(tmp_path, [feature(1, "cat", 0.01), feature(2, "dog", 0.2), feature(3, "bird", 0.0)])
    out = run_label(LabelConfig(run=tmp_path, backend="local", sample=0, top=5), labeler=CountingLabeler())
    assert out["features"] == [2, 1]  # densest first; the dead feature 3 is not labelled


def test_labels_from_several_backends_coexist_and_best_is_preferred(tmp_path):
    run = write_evidence(tmp_path, [feature(1, "cat")])
    run_label(LabelConfig(run=tmp_path, backend="stats", top=1))

    class Fixed(StatsLabeler):
        name, model_id = "local", "fake-llm"

        def label(self, batch):
            return ["cats"] * len(batch)

    run_label(LabelConfig(run=tmp_path, backend="local", top=1), labeler=Fixed())
    assert set(load_label_records(run)[1]) == {"stats", "local"}
    assert load_labels(run) == {1: "cats"}
    assert load_labels(run, prefer=("stats",))[1].startswith('tokens " cat"')


def test_dashboards_show_the_best_verified_label_else_a_marked_one():
    from interpret.labels import shown_labels

    def rec(label):
        return {"label": label}

    def row(label, auroc, verified):
        return {"label": label, "detection_auroc": auroc, "verified": verified, "fuzzing_auroc": None}

    records = {1: {"local": rec("cats"), "stats": rec("tokens cat"), "openai": rec("felines")},
               2: {"local": rec("guess"), "stats": rec("tokens dog")},
               3: {"local": rec("guess")},
               4: {"local": rec("relabelled")},
               5: {"openai": rec("noise"), "local": rec("birds")}}
    scored = {"1": {"local": row("cats", 0.93, True), "stats": row("tokens cat", 0.97, True),
                    "openai": row("felines", 0.5, False)},
              "2": {"local": row("guess", 0.61, False), "stats": row("tokens dog", 0.55, False)},
              "3": {"local": row("guess", 0.62, False)},
              "4": {"local": row("old label", 0.95, True)},  # scored before relabelling: not this label's score
              "5": {"openai": row("noise", 0.52, False), "local": row("birds", 0.7, False)}}
    shown = shown_labels(records, scored)
    assert (shown[1].text, shown[1].backend, shown[1].status) == ("tokens cat", "stats", "verified")  # best AUROC
    assert shown[1].scores == {"detection_auroc": 0.97}
    assert (shown[2].text, shown[2].status, shown[2].scores) == ("tokens dog", "statistic", {"detection_auroc": 0.55})
    assert (shown[3].text, shown[3].status, shown[3].scores) == ("guess", "unverified", {"detection_auroc": 0.62})
    assert (shown[4].text, shown[4].status, shown[4].scores) == ("relabelled", "unverified", {})
    assert (shown[5].text, shown[5].status) == ("birds", "unverified")  # the better of two unverified labels
    assert {fid: s.status for fid, s in shown_labels(records, {}).items()} == {
        1: "statistic", 2: "statistic", 3: "unverified", 4: "unverified", 5: "unverified"}


def test_the_second_prompt_counts_the_marked_tokens():
    ev = feature(1, "cat")
    v1, v2 = _label_prompt(ev, 8, "label-v1"), _label_prompt(ev, 8, "label-v2")
    assert "Marked tokens" not in v1 and "What does the feature detect?" in v1
    assert 'Marked tokens, commonest first: "cat" x3' in v2 and "have in common" in v2
    assert v1.splitlines()[:4] == v2.splitlines()[:4]  # the same marked excerpts
    assert finish_label("Cats", ev, 8, "label-v2") == 'Cats ("cat")' and finish_label("Cats", ev, 8, "label-v1") == "Cats"
    assert finish_label("", ev, 8, "label-v2") == "(no label)"


def test_stats_labeller_reports_peak_tokens_ngrams_and_promoted():
    ev = feature(5, "cat")
    ev.top.append(example(["the", " dog"], 1))
    label = StatsLabeler().label([ev])[0]
    assert label == 'tokens " cat"/" dog" · n-gram "the cat" · promotes "cat"/"dog"'
    assert StatsLabeler().label([ev]) == [label]  # deterministic


def test_markup_and_quotes_in_evidence_are_stored_verbatim(tmp_path):
    nasty = '<script>alert(1)</script>'
    ev = FeatureEvidence(feature=4, density=0.1, max_activation=1.0, mean_activation=1.0,
                         top=[example(["x", nasty, ' "quoted"'], 1), example(["y", nasty, " 'q'"], 1)],
                         promoted=[('"><img src=x>', 1.0)])
    run = write_evidence(tmp_path, [ev])
    run_label(LabelConfig(run=tmp_path, backend="stats", top=1))
    record = load_label_records(run)[4]["stats"]
    assert f'tokens "{nasty}"' in record["label"]
    assert record["evidence"]["promoted"] == ['"><img src=x>']
    assert "&lt;" not in run.labels.read_text()  # data, not HTML: escaping is the dashboard's job


def test_clean_label_keeps_one_short_line():
    assert clean_label('\n  Label: "Animal nouns, esp. cats."\nmore text') == "Animal nouns, esp. cats"
    assert clean_label(" \"cat\" and \"dog\"\n\nThe token") == "\"cat\" and \"dog\""
    assert clean_label("**\"cats\".**") == "cats"
    assert len(clean_label("word " * 40).split()) == 12


def test_labels_that_echo_the_prompt_are_rejected():
    for echo in ("Language model feature detection", "Language model features.", "Label: the marked tokens"):
        assert clean_label(echo) == ""
    for real in ("Language names", "feature films", "Government spending"):
        assert clean_label(real) == real


def test_an_echoed_label_in_the_cache_is_asked_again(tmp_path):
    run = write_evidence(tmp_path, [feature(1, "cat")])
    answers = iter(["Language model feature detection", "cats"])

    class Echo(StatsLabeler):
        name, model_id = "local", "fake-llm"

        def label(self, batch):
            return [next(answers) for _ in batch]

    run_label(LabelConfig(run=tmp_path, backend="local", top=1), labeler=Echo())
    run_label(LabelConfig(run=tmp_path, backend="local", top=1), labeler=Echo())
    assert load_labels(run) == {1: "cats"}


def test_config_errors_name_the_flag(tmp_path):
    with pytest.raises(ConfigError, match="--top"):
        LabelConfig(run=tmp_path, top=-1)
    with pytest.raises(ConfigError, match="--sample: expected a number of features ≥ 0"):
        LabelConfig(run=tmp_path, sample=-5)
    with pytest.raises(ConfigError, match="--sample, --top: expected at least one feature"):
        LabelConfig(run=tmp_path, sample=0, top=0)
    with pytest.raises(ConfigError, match="--api-key-env: expected the NAME"):
        LabelConfig(run=tmp_path, api_key_env="sk-live-1234")
    with pytest.raises(ConfigError, match="--scorers"):
        ScoreConfig(run=tmp_path, scorers="detection,vibes")
    with pytest.raises(ConfigError, match="evidence.json not found"):
        run_label(LabelConfig(run=tmp_path, backend="stats"))


# -- OpenAI-compatible backend against a local fake server ----------------------------------------
class _FakeOpenAI(BaseHTTPRequestHandler):
    requests: list[dict] = []
    busy = 0
    logprobs = True  # whether it answers `logprobs` requests as llama.cpp's and OpenAI's servers do

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if not self.path.endswith("/v1/chat/completions"):
            self.send_response(404)
            self.end_headers()
            self.wfile.write(b"no such route")
            return
        prompt = body["messages"][0]["content"]
        if "BUSY" in prompt and type(self).busy > 0:  # rate-limited until `busy` refusals are spent
            type(self).busy -= 1
            self.send_response(429)
            self.send_header("Retry-After", "0")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if "JSON object" in prompt:
            n = prompt.count("### Feature")
            content = "Sure:\n```json\n" + json.dumps({str(i): f"topic {i}." for i in range(1, n + 1)}) + "\n```"
        elif "JSON list" in prompt:
            n = sum(1 for line in prompt.splitlines() if line[:1].isdigit() and ". " in line)
            content = json.dumps([1 if "cat" in line else 0 for line in prompt.splitlines()
                                  if line[:1].isdigit() and ". " in line][:n])
        else:
            content = "Single topic"
        choice = {"message": {"role": "assistant", "content": content}}
        if body.get("logprobs") and type(self).logprobs:  # a judge prompt: "Yes" likelier where the text has a cat
            text = next(line for line in prompt.splitlines() if line.startswith("Text: "))
            yes, no = (-0.2, -1.8) if "cat" in text else (-2.5, -0.1)
            tops = [{"token": "Yes", "logprob": yes}, {"token": " no", "logprob": no}, {"token": "The", "logprob": -4.0}]
            choice = {"message": {"role": "assistant", "content": tops[0]["token"]},
                      "logprobs": {"content": [{"token": "Yes", "logprob": yes, "top_logprobs": tops}]}}
        payload = json.dumps({"choices": [choice]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture()
def fake_openai():
    _FakeOpenAI.requests = []
    server = HTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_openai_backend_sends_key_only_in_header(tmp_path, fake_openai, monkeypatch):
    secret = "sk-test-SECRET-0123456789"
    monkeypatch.setenv("FL_TEST_KEY", secret)
    run = write_evidence(tmp_path, [feature(1, "cat"), feature(2, "dog"), feature(3, "bird")])
    cfg = LabelConfig(run=tmp_path, backend="openai", top=3, openai_base_url=fake_openai + "/v1",
                      openai_model="my-model", api_key_env="FL_TEST_KEY", batch_size=2)
    run_label(cfg)

    assert len(_FakeOpenAI.requests) == 2  # 3 features in batches of 2
    assert all(r["auth"] == f"Bearer {secret}" for r in _FakeOpenAI.requests)
    assert all(r["body"]["model"] == "my-model" for r in _FakeOpenAI.requests)
    assert load_labels(run) == {1: 'topic 1 ("cat")', 2: 'topic 2 ("dog")', 3: 'Single topic ("bird")'}  # a batch of one: plain prompt
    assert load_label_records(run)[1]["openai"]["model"] == "my-model"

    sim = OpenAILabeler(fake_openai + "/v1", "my-model", "FL_TEST_KEY")
    _FakeOpenAI.requests = []
    p_yes = sim.judge("cats", ["a cat sat", "17 + 3", "the cat"])
    yes, no = math.exp(-0.2), math.exp(-1.8)  # P(yes | yes or no) from the first token's log-probs
    assert p_yes == pytest.approx([yes / (yes + no), math.exp(-2.5) / (math.exp(-2.5) + math.exp(-0.1)), yes / (yes + no)])
    assert sim.judge_mode == "logprobs" and len(_FakeOpenAI.requests) == 3  # one request per context
    assert all(r["body"]["max_tokens"] == 1 and r["body"]["top_logprobs"] == 20 for r in _FakeOpenAI.requests)

    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert run.labels in written and (run.dir / "label_config.json") in written
    assert not any(secret in p.read_text(errors="replace") for p in written)


def test_openai_simulator_falls_back_to_a_json_list_without_logprobs(fake_openai, monkeypatch):
    monkeypatch.setenv("FL_TEST_KEY", "k")
    monkeypatch.setattr(_FakeOpenAI, "logprobs", False)
    sim = OpenAILabeler(fake_openai + "/v1", "m", "FL_TEST_KEY")
    assert sim.judge("cats", ["a cat sat", "17 + 3", "the cat"]) == [1.0, 0.0, 1.0]
    assert sim.judge_mode == "json-list"
    _FakeOpenAI.requests = []
    assert sim.judge("cats", ["no", "cat"]) == [0.0, 1.0]
    assert len(_FakeOpenAI.requests) == 1  # it does not ask for log-probs again


def test_openai_backend_errors_are_clear(tmp_path, fake_openai, monkeypatch):
    monkeypatch.delenv("FL_MISSING_KEY", raising=False)
    write_evidence(tmp_path, [feature(1, "cat")])
    cfg = LabelConfig(run=tmp_path, backend="openai", top=1, openai_base_url=fake_openai + "/v1",
                      api_key_env="FL_MISSING_KEY")
    with pytest.raises(ConfigError, match="FL_MISSING_KEY is not set"):
        run_label(cfg)
    assert _FakeOpenAI.requests == []

    monkeypatch.setenv("FL_MISSING_KEY", "k")
    bad = OpenAILabeler(fake_openai + "/nope", "m", "FL_MISSING_KEY")
    with pytest.raises(ConfigError, match=r"/nope/chat/completions: HTTP 404"):
        bad.chat("hi")
    closed = OpenAILabeler("http://127.0.0.1:9/v1", "m", "FL_MISSING_KEY", timeout_s=2, max_retries=0)
    with pytest.raises(ConfigError, match="cannot reach"):
        closed.chat("hi")


def test_openai_backend_retries_a_rate_limit_then_reports_it(fake_openai, monkeypatch):
    monkeypatch.setenv("FL_KEY", "k")
    _FakeOpenAI.busy = 2
    assert OpenAILabeler(fake_openai + "/v1", "m", "FL_KEY", max_retries=3).chat("BUSY hi") == "Single topic"
    assert len(_FakeOpenAI.requests) == 3  # two 429s, then the answer
    _FakeOpenAI.busy = 5
    with pytest.raises(ConfigError, match="HTTP 429"):
        OpenAILabeler(fake_openai + "/v1", "m", "FL_KEY", max_retries=1).chat("BUSY again")


# -- scoring --------------------------------------------------------------------------------------
class ScriptedSimulator:
    """Answers from a rule on the context text, recording what it was shown."""

    name, model_id = "fake", "fake"

    def __init__(self, rule):
        self.rule = rule
        self.seen: list[tuple[str, str]] = []

    def judge(self, label, contexts, task="detection"):
        self.seen += [(task, c) for c in contexts]
        return [self.rule(c) for c in contexts]


def test_balanced_accuracy_and_auroc_hand_computed():
    # positives 0.9, 0.4, 0.7 → TPR 2/3; negatives 0.2, 0.6 → TNR 1/2
    assert balanced_accuracy([1, 1, 1, 0, 0], [0.9, 0.4, 0.7, 0.2, 0.6]) == pytest.approx(7 / 12)
    assert auroc([1, 1, 0, 0], [0.9, 0.3, 0.5, 0.1]) == pytest.approx(3 / 4)
    assert auroc([1, 1, 0, 0], [0.5, 0.3, 0.5, 0.1]) == pytest.approx(2.5 / 4)  # a tie counts half
    with pytest.raises(ValueError, match="positive and one negative"):
        balanced_accuracy([1, 1], [0.9, 0.1])


def test_detection_score_on_a_scripted_simulator():
    active = [example(["a", " cat"], 1), example(["the", " cat", " sat"], 1), example(["a", " dog"], 1)]
    negatives = [Example(["17", " cat"], [0, 0], 0), Example(["1", " +", " 2"], [0, 0, 0], 0)]
    sim = ScriptedSimulator(lambda text: 0.8 if "cat" in text else 0.1)
    # positive-negative pairs: the two cat contexts beat "1 + 2" and tie "17 cat"; "a dog" ties "1 + 2" → 3.5 / 6
    row = score_detection(sim, "cats", Contexts(active, negatives, [], [], dense=False))
    assert row == {"detection_auroc": pytest.approx(7 / 12), "detection_threshold": None, "detection_balanced_acc": None}
    assert [t for t, _ in sim.seen] == ["detection"] * 5 and "<<" not in "".join(c for _, c in sim.seen)


def test_fuzzing_marks_real_vs_random_tokens():
    ex = Example(tokens=["a", " cat", " and", " a", " dog", " sat"], acts=[0, 2.0, 0, 0, 1.0, 0], center=1)
    right, wrong = fuzz_pair(ex, random.Random(0))
    assert right == "a <<cat>> and a <<dog>> sat"
    assert wrong.count("<<") == 2 and "<<cat>>" not in wrong and "<<dog>>" not in wrong

    active = [example(["the", " cat", " sat"], 1), example(["a", " cat", " ran"], 1)]
    sim = ScriptedSimulator(lambda text: 1.0 if "<<cat>>" in text and "sat" in text else 0.0)
    # correct marks: "sat" one 1, "ran" one 0; decoys never mark cat: 0, 0 → pairs 1 + 1 + ½ + ½ of 4
    assert fuzzing_auroc(sim, "cats", active, random.Random(0)) == pytest.approx(0.75)
    assert {t for t, _ in sim.seen} == {"fuzzing"}


def test_run_score_writes_scores_and_summary(tmp_path):
    run = write_evidence(tmp_path, [feature(1, "cat"), feature(2, "dog"), feature(3, "bird")])
    run_label(LabelConfig(run=tmp_path, backend="stats", top=3))
    oracle = ScriptedSimulator(lambda text: 1.0 if ("cat" in text or "dog" in text) and "<<" not in text
                               or "<<cat>>" in text or "<<dog>>" in text else 0.0)
    cfg = ScoreConfig(run=tmp_path, scorers="detection,fuzzing", n_examples=3, n_calibration=1)
    result = run_score(cfg, simulator=oracle)
    saved = json.loads(run.scores.read_text())
    assert saved == json.loads(json.dumps(result))
    row = saved["features"]["1"]["stats"]
    assert row["detection_auroc"] == 1.0 and row["detection_balanced_acc"] == 1.0 and row["fuzzing_auroc"] == 1.0
    assert row["label"].startswith('tokens " cat"') and not row["dense"]
    # the 3 top examples were shown to the labeller: the 4 quantile samples are what is left to score
    assert (row["n_active"], row["n_negative"], row["n_calibration_active"], row["n_calibration_negative"]) == (3, 3, 1, 1)
    assert row["chance_rate"] == pytest.approx(2 / 20) and saved["chance_rate"] == row["chance_rate"]  # U ≥ 8 of 9
    # the simulator ignores the label, so the shuffled labels score as well and nothing is verified
    assert row["control"]["feature"] != 1 and row["control"]["detection_auroc"] == 1.0 and row["verified"] is False
    summary = saved["summary"]["stats"]
    assert summary["n"] == 3 and summary["mean_detection_auroc"] == pytest.approx(2.5 / 3) and summary["verified"] == 0
    assert summary["control_verified_frac"] == 0.0 and summary["dense"] == {"n": 0}
    with pytest.raises(ConfigError, match="--labels openai"):
        run_score(ScoreConfig(run=tmp_path, labels="openai", scorers="detection"), simulator=oracle)
    # a rerun with the same settings resumes: nothing is judged again
    seen = len(oracle.seen)
    assert run_score(cfg, simulator=oracle) == result
    assert len(oracle.seen) == seen
    run_score(ScoreConfig(run=tmp_path, scorers="detection,fuzzing", n_examples=2), simulator=oracle)  # other settings
    assert len(oracle.seen) > seen


def test_embedding_scorer_separates_related_contexts():
    from interpret.scoring import Embedder, embedding_model_dir

    try:
        embedding_model_dir()
    except ConfigError as e:
        pytest.skip(str(e))
    active = [Example(t.split(" "), [1.0] * 4, 0) for t in ("the cat purred softly", "my dog barked loudly",
                                                            "a kitten chased mice")]
    negatives = [Example(t.split(" "), [0.0] * 4, 0) for t in ("17 + 3 = 20", "True and not False",
                                                              "invoice total due Friday")]
    assert Embedder().score("pets and animals", active, negatives) >= 0.85


# -- local backend on a tiny model ----------------------------------------------------------------
def test_local_labeler_batched_matches_one_at_a_time(tiny_frozen):
    labeler = LocalLabeler(tiny_frozen, batch_size=3, max_new_tokens=4)
    contexts = ["the cat", "What is 17 + 3? Answer: 20 and more words here", "a"]
    batched = labeler.judge("cats", contexts)
    single = [LocalLabeler(tiny_frozen, batch_size=1).judge("cats", [c])[0] for c in contexts]
    assert batched == pytest.approx(single, abs=1e-4)
    assert all(0.0 <= p <= 1.0 for p in batched)
    labels = labeler.label([feature(1, "cat"), feature(2, "dog")])
    assert len(labels) == 2 and all(label and "\n" not in label for label in labels)


def test_judging_many_labels_on_a_shared_text_equals_judging_each_whole_prompt(tiny_frozen):
    labeler = LocalLabeler(tiny_frozen, batch_size=2)
    labels = ["cats", "a much longer label about dogs and birds, fish, owls, cows and the rest of the farm", "dogs"]
    contexts = ["the cat", "What is 17 + 3? Answer: 20 and more words here", "a"]
    shared = labeler.judge_many(labels, contexts)
    tok = labeler.tokenizer
    for i, label in enumerate(labels):
        for j, context in enumerate(contexts):
            head, tail = labeler._split_at_label(context, "detection")
            ids = torch.cat([labeler._encode([head])["input_ids"][0],
                             labeler._encode([f" {label}{tail}"], special=False)["input_ids"][0]])
            logits = tiny_frozen.model(input_ids=ids[None]).logits[0, -1]
            yes, no = (torch.logsumexp(logits[idx], 0) for idx in (labeler._yes_ids, labeler._no_ids))
            assert shared[i][j] == pytest.approx(torch.sigmoid(yes - no).item(), abs=1e-5)
    assert tok.decode(labeler._encode([head])["input_ids"][0]).endswith("Feature:")


def test_length_groups_bound_the_padding():
    from interpret.labelers import length_groups

    assert length_groups([5, 40, 6, 42, 5]) == [[0, 4, 2], [1, 3]]
    assert length_groups([]) == [] and length_groups([7]) == [[0]]
    for lengths in ([1, 2, 3, 50, 60, 3, 1], [10] * 5):
        groups = length_groups(lengths)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        for g in groups:
            assert len(g) * max(lengths[i] for i in g) <= 1.25 * sum(lengths[i] for i in g)


def test_local_labeler_retries_an_echo_with_samples(tiny_frozen, monkeypatch):
    labeler = LocalLabeler(tiny_frozen, max_new_tokens=4, prompt="label-v1")  # v1: the answers as they are
    calls = []

    def generate(prompts, samples=0):
        calls.append(samples)
        if not samples:
            return ["Language model feature detection", "Dogs"][:len(prompts)]
        return ["Feature detection", "Language model cat detection", "Cat nouns", "x"][:samples]

    monkeypatch.setattr(labeler, "_generate", generate)
    assert labeler.label([feature(1, "cat"), feature(2, "dog")]) == ["Cat nouns", "Dogs"]
    assert calls == [0, 4]
    labeler.prompt_version = "label-v2"  # v2: each followed by its feature's commonest marked tokens
    assert labeler.label([feature(1, "cat"), feature(2, "dog")]) == ['Cat nouns ("cat")', 'Dogs ("dog")']


# -- review ---------------------------------------------------------------------------------------
def test_review_saves_each_answer_and_resumes(tmp_path):
    from rich.console import Console

    run = write_evidence(tmp_path, [feature(1, "cat", 0.3), feature(2, "dog", 0.2), feature(3, "<b>x</b>", 0.1)])
    run_label(LabelConfig(run=tmp_path, backend="stats", top=3))
    quiet = Console(file=open("/dev/null", "w"))

    answers = iter(["0.8", "maybe", "1.5", "s", "q"])
    out = run_review(ReviewConfig(run=tmp_path, reviewer="ann"), ask=lambda _: next(answers), console=quiet)
    assert out["reviewed"] == 1 and out["skipped"] == 1
    reviews = json.loads(run.reviews.read_text())
    assert list(reviews) == ["1"] and reviews["1"]["stats"]["score"] == 0.8
    assert reviews["1"]["stats"]["reviewer"] == "ann" and reviews["1"]["stats"]["label"] == load_labels(run)[1]

    asked = []
    answers = iter(["0", "1"])
    run_review(ReviewConfig(run=tmp_path, reviewer="bob"), ask=lambda p: asked.append(p) or next(answers),
               console=quiet)
    reviews = json.loads(run.reviews.read_text())
    assert len(asked) == 2  # feature 1 was not asked again; 2 (skipped before) and 3 were
    assert reviews["1"]["stats"]["reviewer"] == "ann"
    assert reviews["2"]["stats"]["score"] == 0.0 and reviews["3"]["stats"]["score"] == 1.0


# -- the real embedded model ----------------------------------------------------------------------
@pytest.mark.embedded
def test_local_labeler_on_embedded_model(embedded_frozen):
    labeler = LocalLabeler(embedded_frozen, batch_size=2, max_new_tokens=12)
    labels = labeler.label([feature(1, "cat"), feature(2, "river")])
    assert len(labels) == 2
    for label in labels:
        assert label.strip() and "\n" not in label and len(label.split()) <= 12
    probs = labeler.judge(labels[0], ["I saw the cat today", "17 + 3 = 20"])
    assert len(probs) == 2 and all(0.0 <= p <= 1.0 for p in probs)


def test_a_named_label_set_keeps_a_second_models_labels_beside_the_first(tmp_path):
    run = write_evidence(tmp_path, [feature(1, "cat")])

    class Fixed(StatsLabeler):
        def __init__(self, name, label):
            super().__init__()
            self.name, self.model_id, self.answer = "local", name, label

        def label(self, batch):
            return [self.answer] * len(batch)

    run_label(LabelConfig(run=tmp_path, backend="local", top=1), labeler=Fixed("small", "cats"))
    run_label(LabelConfig(run=tmp_path, backend="local", top=1, label_set="big"), labeler=Fixed("big", "felines"))
    records = load_label_records(run)[1]
    assert {k: r["label"] for k, r in records.items()} == {"local": "cats", "big": "felines"}
    assert records["big"]["backend"] == "local" and records["big"]["model"] == "big"
    assert load_labels(run, prefer=("big",)) == {1: "felines"}
    with pytest.raises(ConfigError, match="--label-set"):
        LabelConfig(run=tmp_path, label_set="all")
