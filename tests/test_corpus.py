import json

import numpy as np
import pytest

from corpus.answers import is_correct, normalize_answer
from corpus.config import CorpusConfig, parse_layers
from corpus.packing import pack_documents, sequences
from corpus.sources import parse_sources, read_text
from corpus.tasks import generate_tasks, suite_examples
from models import ConfigError
from tests.conftest import SHARED_DATA


def _seqs(frozen, **kw):
    cfg = CorpusConfig(**{"data": "builtin:tasks", "tokens": 256, "seq_len": 32, **kw})
    return list(sequences(cfg, frozen.tokenizer, frozen.bos_token_id, frozen.eos_token_id, frozen))


def test_task_suites_are_deterministic_and_correct():
    a = [next(g) for g in [generate_tasks(3)] for _ in range(50)]
    b = [t for t, _ in zip(generate_tasks(3), range(50))]
    assert a == b
    assert {t.suite for t in a} == {"arithmetic", "comparison", "counting", "boolean", "copying"}
    for t in a:
        if t.suite == "arithmetic":
            expr = t.prompt.removeprefix("What is ").removesuffix("?")
            assert str(eval(expr)) == t.answer
        if t.suite == "copying":
            assert t.prompt.endswith(t.answer)
        if t.suite == "counting":
            target = t.prompt.split("'")[1]
            assert t.prompt.split(": ", 1)[1].rstrip("?").split().count(target) == int(t.answer)
    assert next(generate_tasks(4)) != next(generate_tasks(3))
    assert a[0].text() == f"Question: {a[0].prompt}\nAnswer: {a[0].answer}"


@pytest.mark.parametrize("pred,ref,ok", [
    ("20", "20", True), (" 20.", "20", True), ("1,234", "1234", True), ("The cat", "cat", True),
    ("$18", "18", True), ("True", "true", True), ("21", "20", False), ("a1 b2", "a1  b2", True),
])
def test_answer_normalisation(pred, ref, ok):
    assert is_correct(pred, ref) is ok


def test_gsm8k_jsonl_becomes_a_task_suite(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps({"question": "Tom has 3 apples and buys 4. How many?", "answer": "3+4=7\n#### 7"}) + "\n")
    (ex,) = suite_examples(str(path))
    assert ex.answer == "7" and ex.prompt.startswith("Tom")
    if (SHARED_DATA / "gsm8k_train.jsonl").exists():
        real = suite_examples(str(SHARED_DATA / "gsm8k_train.jsonl"))
        assert len(real) == 7473 and all(normalize_answer(e.answer).lstrip("-").replace(".", "").isdigit() for e in real[:200])


def test_source_spec_parsing_and_errors(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("hello")
    sources = parse_sources(f"{f}*3,builtin:tasks")
    assert [(s.kind, s.weight) for s in sources] == [("file", 3.0), ("builtin:tasks", 1.0)]
    with pytest.raises(ConfigError, match="no such file or folder: .*missing.txt"):
        parse_sources(str(tmp_path / "missing.txt"))
    with pytest.raises(ConfigError, match="weight .* must be a number"):
        parse_sources("builtin:tasks*lots")
    with pytest.raises(ConfigError, match="unknown builtin source"):
        parse_sources("builtin:poetry")
    (tmp_path / "x.csv").write_text("1")
    with pytest.raises(ConfigError, match="x.csv is not a .txt/.jsonl/.parquet file"):
        parse_sources(str(tmp_path / "x.csv"))


def test_latin1_files_fall_back_or_fail_clearly(tmp_path):
    path = tmp_path / "speech.txt"
    path.write_bytes("Caf\xe9 society and na\xefve hopes".encode("latin-1"))
    assert read_text(path) == "Café society and naïve hopes"
    with pytest.raises(ConfigError, match=r"speech.txt: not valid utf-8 \(byte 3\)"):
        read_text(path, "utf-8")
    real = sorted((SHARED_DATA / "state_union").glob("*.txt"))
    bad = [p for p in real if not _is_utf8(p)]
    if bad:
        assert read_text(bad[0])  # the real Latin-1 files are read, with a logged warning


def _is_utf8(path):
    try:
        path.read_bytes().decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_packing_starts_with_bos_and_labels_every_position(tiny_frozen):
    tok = tiny_frozen.tokenizer
    docs = ["The quick brown fox jumps over the lazy dog. " * 3, "Repeat exactly: a1 b2 c3."] * 4
    packed = list(pack_documents(iter(docs), tok, 16, tiny_frozen.bos_token_id, tiny_frozen.eos_token_id))
    stream = []
    for d in docs:
        stream += tok(d, add_special_tokens=False)["input_ids"] + [tiny_frozen.eos_token_id]
    assert packed
    for i, (tokens, next_ids) in enumerate(packed):
        assert len(tokens) == 16 and tokens[0] == tiny_frozen.bos_token_id
        assert np.array_equal(next_ids[:-1], tokens[1:])
        assert list(tokens[1:]) == stream[i * 15 : i * 15 + 15]
        assert next_ids[-1] == stream[i * 15 + 15]


def test_splits_are_deterministic_disjoint_and_prefix_stable(tiny_frozen, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the river {i % 7} runs past stone {i * 13 % 11}." for i in range(400)))
    train = _seqs(tiny_frozen, data=str(text), tokens=2000, eval_fraction=0.2)
    again = _seqs(tiny_frozen, data=str(text), tokens=2000, eval_fraction=0.2)
    longer = _seqs(tiny_frozen, data=str(text), tokens=4000, eval_fraction=0.2)
    evals = _seqs(tiny_frozen, data=str(text), tokens=400, eval_fraction=0.2, split="eval")
    assert [s.tokens.tolist() for s in train] == [s.tokens.tolist() for s in again]
    assert [s.tokens.tolist() for s in longer[: len(train)]] == [s.tokens.tolist() for s in train]
    assert not {s.tokens.tobytes() for s in train} & {s.tokens.tobytes() for s in evals}
    builtin_train = _seqs(tiny_frozen)
    builtin_eval = _seqs(tiny_frozen, split="eval")
    assert builtin_train[0].tokens.tolist() != builtin_eval[0].tokens.tolist()


def test_split_all_reads_a_file_whole_in_stream_order(tiny_frozen, tmp_path):
    text = tmp_path / "held_out.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the river {i % 7} runs past stone {i * 13 % 11}." for i in range(400)))
    whole = _seqs(tiny_frozen, data=str(text), tokens=10**6, split="all")
    train = _seqs(tiny_frozen, data=str(text), tokens=10**6, split="train")
    evals = _seqs(tiny_frozen, data=str(text), tokens=10**6, split="eval")
    assert len(whole) == len(train) + len(evals) and evals  # every sequence, not the 5% eval split
    by_bytes = {s.tokens.tobytes() for s in whole}
    assert by_bytes == {s.tokens.tobytes() for s in train} | {s.tokens.tobytes() for s in evals}
    assert [s.tokens.tolist() for s in _seqs(tiny_frozen, data=str(text), tokens=32 * 5, split="all")] == \
        [s.tokens.tolist() for s in whole[:5]]  # a prefix of the file, in order


def test_mixture_follows_weights(tiny_frozen, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("Some plain prose about rivers and stones. " * 2000)
    seqs = _seqs(tiny_frozen, data=f"{text}*3,builtin:tasks*1", tokens=32 * 40, eval_fraction=0.0)
    counts = np.bincount([s.source for s in seqs], minlength=2)
    assert counts.tolist() == [30, 10]


def test_jsonl_parquet_and_folder_sources(tiny_frozen, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.jsonl").write_text("\n".join(json.dumps({"text": f"row {i} about stones"}) for i in range(200)))
    pq.write_table(pa.table({"body": [f"parquet row {i}" for i in range(200)]}), folder / "b.parquet")
    (folder / "README").write_text("not read: no text suffix")
    assert _seqs(tiny_frozen, data=str(folder / "a.jsonl"), eval_fraction=0.0)
    assert _seqs(tiny_frozen, data=str(folder / "b.parquet"), text_field="body", eval_fraction=0.0)
    with pytest.raises(ConfigError, match="no column 'text'"):
        _seqs(tiny_frozen, data=str(folder / "b.parquet"))
    with pytest.raises(ConfigError, match=r"a.jsonl:1: expected a JSON object with a 'body'"):
        _seqs(tiny_frozen, data=str(folder), text_field="body")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{not json\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: not valid JSON"):
        _seqs(tiny_frozen, data=str(bad))


def test_empty_corpus_is_refused(tiny_frozen, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ConfigError, match="yielded no complete 32-token sequence"):
        _seqs(tiny_frozen, data=str(empty))
    folder = tmp_path / "nothing"
    folder.mkdir()
    with pytest.raises(ConfigError, match="holds no .txt/.jsonl/.parquet files"):
        _seqs(tiny_frozen, data=str(folder))


def test_config_validation():
    with pytest.raises(ConfigError, match="--tokens"):
        CorpusConfig(tokens=0)
    with pytest.raises(ConfigError, match="--ood"):
        CorpusConfig(split="ood")
    assert parse_layers("9,3,last", 30) == [3, 9, 30]
    with pytest.raises(ConfigError, match=r"layer 31 is outside the model's range 0\.\.30"):
        parse_layers("31", 30)
    with pytest.raises(ConfigError, match="expected comma-separated layer numbers"):
        parse_layers("nine", 30)


def test_absolute_spec_keeps_weights_and_builtins(tmp_path, monkeypatch):
    from corpus.sources import absolute_spec

    (tmp_path / "a.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    assert absolute_spec("a.txt*2,builtin:tasks") == f"{tmp_path / 'a.txt'}*2,builtin:tasks"
    assert absolute_spec("") == ""
