"""Task suites (spec parsing, dataset files, answer normalisation and extraction) and task evaluation."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from corpus.answers import extract_answer, is_correct, normalize_answer
from corpus.tasks import TaskExample, load_suite, prompt_token_ids
from models.errors import ConfigError

from .conftest import save_random_sae


# -- normalisation and extraction ------------------------------------------------------------------------
@pytest.mark.parametrize("pred,ref,ok", [
    ("1,000", "1000", True), ("$1,000.00", "1000", True), ("1000.0", "1000", True), ("-3.50", "-3.5", True),
    ("12,345,678", "12345678", True), ("1,00", "100", False), ("18", "18 dollars", False),
    ("The Eiffel Tower.", "eiffel tower", True), ("an apple", "Apple!", True), ("Denver Broncos", "Broncos", False),
    ("True", "yes", True), ("yes.", "True", True), ("No", "false", True), ("no", "yes", False),
    ("h2 t3 u2", "h2  t3 u2", True), ("h2 t3", "h2 t3 u2", False),
])
def test_answer_normalisation(pred, ref, ok):
    assert is_correct(pred, ref) is ok


def test_normalised_forms_and_multiple_references():
    assert normalize_answer("$1,000.00") == "1000" and normalize_answer("0.250") == "0.25"
    assert normalize_answer("  The   quick, brown fox. ") == "quick brown fox"
    assert normalize_answer("TRUE") == "yes" and normalize_answer("False.") == "no"
    refs = ("Denver Broncos", "the Broncos", "Broncos")
    assert is_correct("broncos", refs) and is_correct("Denver Broncos!", refs) and not is_correct("Panthers", refs)


@pytest.mark.parametrize("text,suite,answer", [
    (" 12 + 5 = 17\nThe answer is 17.", "arithmetic", "17"),
    ("74", "comparison", "74"),
    ("\n\nThe larger number is 1,074.", "comparison", "1,074"),
    ("Janet has 3 eggs. 3 * 2 = 6\n#### 6", "gsm8k", "6"),
    ("She pays 5 + 13 = 18 dollars.\nSo the total is $18.", "gsm8k", "$18"),
    ("Step 1\n#### $1,200.00", "gsm8k:/some/file.jsonl", "$1,200.00"),
    ("The expression evaluates to False because ...", "boolean", "False"),
    ("Yes, it is.", "boolq", "Yes"),
    ("Answer: h2 t3 u2\nmore", "copying", "h2 t3 u2"),
    ("Denver Broncos\n", "squad", "Denver Broncos"),
    ("Repeat exactly: h2 t3 u2", "copying", "h2 t3 u2"), ("The answer is: Paris.", "squad", "Paris."),
    ("Note that: it is 3: really", "squad", "it is 3: really"),
])
def test_extract_answer(text, suite, answer):
    assert extract_answer(text, suite) == answer


def test_extracted_numbers_normalise_to_the_reference():
    assert is_correct(extract_answer("so the total is $1,200.00.", "gsm8k"), "1200")
    assert is_correct(extract_answer("It is true.", "boolean"), "True")


# -- suites ----------------------------------------------------------------------------------------------
def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_builtin_specs_are_deterministic(tmp_path):
    a = load_suite("arithmetic", 5, seed=1)
    assert len(a) == 5 and {e.suite for e in a} == {"arithmetic"} and a == load_suite("arithmetic", 5, seed=1)
    assert a != load_suite("arithmetic", 5, seed=2)
    mixed = load_suite("builtin:tasks:arithmetic+copying", 4, seed=0)
    assert [e.suite for e in mixed] == ["arithmetic", "copying"] * 2
    assert load_suite("arithmetic+copying", 4, seed=0) == mixed
    assert len({e.suite for e in load_suite("builtin:tasks", 10, seed=0)}) == 5


def test_gsm8k_boolq_squad_and_generic_files(tmp_path):
    gsm = _jsonl(tmp_path / "gsm.jsonl", [{"question": f"Q{i}: 2 + {i}?", "answer": f"2+{i}={2 + i}\n#### {2 + i:,}"}
                                          for i in range(998, 1004)])
    ex = load_suite(f"gsm8k:{gsm}", 3, seed=0)
    assert len(ex) == 3 and all(e.suite == "gsm8k" for e in ex)
    assert all(is_correct(str(2 + int(e.prompt.split("+ ")[1].rstrip("?"))), e.answer) for e in ex)
    assert load_suite(f"gsm8k:{gsm}", 3, seed=0) == ex
    # the seed orders the file: two seeds give the same order of 6 with probability 1/720 (it happened), five with ~0
    assert len({tuple(e.prompt for e in load_suite(f"gsm8k:{gsm}", 6, seed=s)) for s in range(5)}) > 1
    assert len(load_suite(f"gsm8k:{gsm}", 100, seed=0)) == 6  # n larger than the file: all of it

    boolq = _jsonl(tmp_path / "boolq.jsonl", [
        {"question": "is the sky blue", "passage": "The sky is blue on clear days.", "answer": True},
        {"question": "is fire cold", "passage": "Fire is hot.", "label": 0},
    ])
    by_q = {e.prompt: e for e in load_suite(f"boolq:{boolq}", 2, seed=0)}
    assert by_q["Is the sky blue?"].answer == "yes" and by_q["Is fire cold?"].answer == "no"
    assert by_q["Is fire cold?"].context == "Fire is hot."
    assert "Fire is hot.\nQuestion: Is fire cold?" in by_q["Is fire cold?"].prompt_text()

    squad = _jsonl(tmp_path / "squad.jsonl", [{
        "context": "Super Bowl 50 was won by the Denver Broncos.", "question": "Who won Super Bowl 50?",
        "answers": {"text": ["Denver Broncos", "Denver Broncos", "Broncos"], "answer_start": [29, 29, 36]}}])
    (sq,) = load_suite(f"squad:{squad}", 1, seed=0)
    assert sq.references == ("Denver Broncos", "Broncos") and sq.question_text().startswith("Super Bowl 50")
    assert is_correct("the Broncos", sq.references)

    generic = _jsonl(tmp_path / "mine.jsonl", [{"question": "Capital of France?", "answers": ["Paris", "paris, france"]}])
    (g,) = load_suite(str(generic), 1, seed=0)
    assert g.suite == "mine" and g.references == ("Paris", "paris, france")


def test_bad_specs_and_files_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="unknown suite 'arithmatic'"):
        load_suite("arithmatic", 3, seed=0)
    with pytest.raises(ConfigError, match="unknown builtin suite.*nope"):
        load_suite("builtin:tasks:arithmetic+nope", 3, seed=0)
    with pytest.raises(ConfigError, match="no such file"):
        load_suite(f"squad:{tmp_path / 'missing.jsonl'}", 3, seed=0)
    bad = _jsonl(tmp_path / "bad.jsonl", [{"question": "q", "passage": "p"}])
    with pytest.raises(ConfigError, match="bad.jsonl: row 1: expected .*'answer'"):
        load_suite(f"boolq:{bad}", 1, seed=0)
    import corpus.tasks as tasks

    monkeypatch.setattr(tasks, "SHARED_DATA", tmp_path)  # no local BoolQ and (HF_HUB_OFFLINE) no hub
    with pytest.raises(ConfigError, match="boolq: no local file .*pass boolq:PATH"):
        load_suite("boolq", 3, seed=0)


def test_generation_env_and_data_sources_take_the_specs_load_suite_takes(tmp_path):
    from itertools import islice

    from corpus.sources import parse_sources
    from corpus.tasks import task_stream
    from rl_env.generation_env import _tasks

    squad = _jsonl(tmp_path / "squad.jsonl", [{"context": "Paris is in France.", "question": f"Where is Paris {i}?",
                                               "answers": ["France", "in France"]} for i in range(3)])
    for spec in ("arithmetic", "arithmetic+copying", "builtin:tasks:boolean", "builtin:tasks", f"squad:{squad}", str(squad)):
        n = len(load_suite(spec, 6, seed=0))
        assert sorted(map(repr, islice(_tasks(spec, 0), n))) == sorted(map(repr, load_suite(spec, n, seed=0))), spec
    assert [e.suite for e in islice(task_stream("copying+counting", 3), 4)] == ["copying", "counting"] * 2
    assert len(list(islice(task_stream(str(squad), 0), 7))) == 7  # a file's examples repeat
    for bad, message in (("arithmatic", "unknown suite 'arithmatic'"), ("builtin:tasks:nope", "unknown builtin suite.*nope")):
        with pytest.raises(ConfigError, match=message):
            load_suite(bad, 1, seed=0)
        with pytest.raises(ConfigError, match="--tasks: .*" + message):
            _tasks(bad, 0)
    (source,) = parse_sources("builtin:tasks:boolean+copying")
    assert source.kind == "builtin:tasks" and source.suites == ("boolean", "copying")
    with pytest.raises(ConfigError, match="--data: .*unknown builtin suite.*nope"):
        parse_sources("builtin:tasks:boolean+nope")


def test_bare_prompt_format_and_chat_without_a_template(tiny_frozen):
    ex = TaskExample("arithmetic", "What is 2 + 3?", "5")
    tok = tiny_frozen.tokenizer
    bare = prompt_token_ids(ex, tok, "bare", tiny_frozen.bos_token_id)
    assert bare[0] == tiny_frozen.bos_token_id and tok.decode(bare[1:]) == "Question: What is 2 + 3?\nAnswer:"
    assert prompt_token_ids(ex, tok, "auto", tiny_frozen.bos_token_id) == bare  # no chat template: bare
    with pytest.raises(ConfigError, match="--prompt-format chat: .*no chat template"):
        prompt_token_ids(ex, tok, "chat", tiny_frozen.bos_token_id)


@pytest.mark.embedded
def test_chat_prompt_format_uses_the_template_once(embedded_frozen):
    ex = TaskExample("arithmetic", "What is 2 + 3?", "5")
    tok = embedded_frozen.tokenizer
    ids = prompt_token_ids(ex, tok, "chat", embedded_frozen.bos_token_id)
    text = tok.decode(ids)
    assert ids[0] == embedded_frozen.bos_token_id and ids.count(tok.bos_token_id) == text.count("<|im_start|>")
    assert "What is 2 + 3?" in text and text.endswith("<|im_start|>assistant\n")
    assert prompt_token_ids(ex, tok, "auto", embedded_frozen.bos_token_id) == ids


# -- task evaluation -------------------------------------------------------------------------------------
def test_task_answer_exact_match_in_both_modes_returns_every_key(tiny_frozen, tmp_path):
    from corpus.packing import EVAL_SEED_OFFSET
    from distill.student import build_student_decoder
    from distill.task_eval import task_answer_exact_match
    from sae.model import SparseAutoencoder

    sae = SparseAutoencoder.load(save_random_sae(tiny_frozen, tmp_path / "sae", layer=2))
    decoders = {"context": (build_student_decoder("context", sae, tiny_frozen, 2, n_layers=1), sae),
                "readout": (build_student_decoder("readout", sae, tiny_frozen, 2), sae)}
    for mode in ("generate", "teacher_forced"):
        result = task_answer_exact_match(tiny_frozen, 2, decoders, ["arithmetic", "copying"], n=5, seed=0, mode=mode,
                                         prompt_format="auto", max_new_tokens=4, batch_size=3, n_samples=2, progress=False)
        assert result["mode"] == mode and result["prompt_format"] == "bare" and result["seconds"] > 0
        for block in (*result["suites"].values(), result["overall"]):
            assert 0 <= block["frozen"] <= 1 and set(block["decoders"]) == {"context", "readout"}
            for d in block["decoders"].values():
                assert d["degradation_points"] == pytest.approx(100 * (block["frozen"] - d["accuracy"]))
        assert result["overall"]["examples"] == 10 and result["suites"]["arithmetic"]["examples"] == 5
        sample = result["suites"]["copying"]["samples"][0]
        assert {"prompt", "reference", "frozen", "context", "readout", "frozen_correct"} <= sample.keys()
        assert sample["prompt"].startswith("Repeat exactly")
        # held out: the stream of builtin:tasks' eval split, not the one a decoder trains on
        assert sample["prompt"] == load_suite("copying", 5, seed=EVAL_SEED_OFFSET)[0].question_text()


class _IdentitySae(nn.Module):
    """Every residual dimension is a 'feature' whose value is the residual itself."""

    def encode(self, x_ND):
        return SimpleNamespace(indices_NK=torch.arange(x_ND.shape[1]).expand(x_ND.shape[0], -1), acts_NK=x_ND)


def _frozen_replay(frozen, layer):
    """A context 'decoder' whose logits are the frozen model's own: it splices the residual back in at the layer."""
    from models.decoder import FeatureDecoder

    class FrozenReplay(FeatureDecoder):
        needs_context = True

        def hidden(self, indices_BTK, values_BTK):  # its state is already the frozen model's logits
            dummy = torch.zeros(values_BTK.shape[:2], dtype=torch.long)
            logits, _ = frozen.forward(dummy, write={layer: lambda r: values_BTK.to(r.dtype)})
            return logits.float()

        def readout(self, hidden):
            return hidden

    return FrozenReplay()


def test_a_decoder_that_reproduces_the_frozen_model_loses_nothing(sharp_model_dir, monkeypatch):
    """The generation plumbing (left padding, KV cache, dropped rows, feature history) feeds the decoder the
    same prefix the frozen model sees: a decoder returning the frozen logits writes the same answers."""
    from distill.task_eval import Reader, greedy_generate, task_answer_exact_match
    from models import ModelConfig, load_frozen
    from models.frozen import FrozenLM

    frozen = load_frozen(ModelConfig(model=str(sharp_model_dir), dtype="fp32"))
    prompts = [[frozen.bos_token_id, *range(5, 5 + n)] for n in (3, 9, 5, 14)]
    free = greedy_generate(frozen, prompts, 8, stop_at_newline=False)
    # a stop token that ends some replies early and not others, so that finished rows leave the batch
    stop = next(t for reply in free for t in reply[1:6] if sum(t in r[:-1] for r in free) < len(free))
    monkeypatch.setattr(FrozenLM, "eos_token_id", property(lambda self: stop))
    mine = greedy_generate(frozen, prompts, 8, stop_at_newline=False)
    assert len({len(r) for r in mine}) > 1
    replay = greedy_generate(frozen, prompts, 8, stop_at_newline=False, reader=Reader(_frozen_replay(frozen, 2), _IdentitySae(), 2))
    assert replay == mine
    monkeypatch.undo()
    decoders = {"replay": (_frozen_replay(frozen, 2), _IdentitySae())}
    result = task_answer_exact_match(frozen, 2, decoders, ["arithmetic", "copying"], n=6, seed=0, mode="generate",
                                     prompt_format="bare", max_new_tokens=6, batch_size=4, n_samples=6, progress=False)
    for suite in result["suites"].values():
        assert [s["replay"] for s in suite["samples"]] == [s["frozen"] for s in suite["samples"]]
        assert any(s["frozen"] for s in suite["samples"])
    assert result["overall"]["decoders"]["replay"]["degradation_points"] == 0
    # teacher-forced: the decoder is scored on the same answer positions as the frozen model
    forced = task_answer_exact_match(frozen, 2, decoders, ["arithmetic", "copying"], n=6, seed=0, mode="teacher_forced",
                                     prompt_format="bare", n_samples=6, progress=False)
    for suite in forced["suites"].values():
        assert [s["replay_correct"] for s in suite["samples"]] == [s["frozen_correct"] for s in suite["samples"]]
        assert [s["replay"] for s in suite["samples"]] == [s["frozen"] for s in suite["samples"]]


def test_bad_mode_is_a_clear_error(tiny_frozen):
    from distill.task_eval import task_answer_exact_match

    with pytest.raises(ConfigError, match="--mode: expected generate or teacher_forced"):
        task_answer_exact_match(tiny_frozen, 2, {}, ["arithmetic"], n=1, seed=0, mode="sample")


@pytest.mark.embedded
def test_embedded_model_answers_arithmetic_in_chat_format(embedded_frozen):
    from distill.task_eval import task_answer_exact_match

    t0 = time.perf_counter()
    result = task_answer_exact_match(embedded_frozen, 9, {}, ["arithmetic"], n=5, seed=0, mode="generate",
                                     prompt_format="chat", max_new_tokens=12, n_samples=5, progress=False)
    assert result["prompt_format"] == "chat" and result["suites"]["arithmetic"]["examples"] == 5
    assert all(s["frozen"].strip() for s in result["suites"]["arithmetic"]["samples"])
    assert time.perf_counter() - t0 < 60
