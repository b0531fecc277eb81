"""A real OpenAI-compatible server: llama.cpp's (`python -m llama_cpp.server`, from llama-cpp-python[server]) on
127.0.0.1 with the embedded SmolLM2 GGUF and an API key it checks. faithlens labels and scores through it with the
`openai` client, the key read from the environment. `make server` installs it (a one-time native build that pip's
wheel cache keeps); CI always runs this test, elsewhere it skips when the server is not installed."""

from __future__ import annotations

import os
import secrets

import pytest

from benchmarks import llama_server as llama_server_module
from interpret.label_config import LabelConfig, ScoreConfig
from interpret.labels import load_label_records, load_labels, run_label
from interpret.scoring import run_score
from models.errors import ConfigError
from tests.test_labels import write_evidence
from tests.test_scoring import word_feature


def _server_or_skip() -> None:
    if llama_server_module.installed():
        return
    if os.environ.get("CI") == "true":
        pytest.fail("llama-cpp-python[server] is not installed; CI must run the real-server test (.ci/run: make server)")
    pytest.skip("llama-cpp-python[server] is not installed (make server)")


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """(base URL, API key) of a llama.cpp server with the embedded model, stopped after the module."""
    _server_or_skip()
    key = "sk-local-" + secrets.token_hex(12)
    gguf = llama_server_module.embedded_gguf_path("smollm2-135m-instruct")
    log = tmp_path_factory.mktemp("llama_server") / "server.log"
    with llama_server_module.serve(gguf, "smollm2", key, log) as url:
        yield url, key


def test_labels_and_scores_through_a_real_llama_cpp_server(llama_server, tmp_path, monkeypatch):
    url, key = llama_server
    monkeypatch.setenv("FL_SERVER_KEY", key)
    run = write_evidence(tmp_path, [word_feature(1, "cat"), word_feature(2, "dog"), word_feature(3, "tree")])
    backend = dict(openai_base_url=url, openai_model="smollm2", api_key_env="FL_SERVER_KEY", timeout_s=120.0)
    run_label(LabelConfig(run=tmp_path, backend="openai", top=3, batch_size=1, **backend))
    labels = load_labels(run)
    assert set(labels) == {1, 2, 3} and all(label.strip() for label in labels.values()), labels
    assert load_label_records(run)[1]["openai"]["model"] == "smollm2"

    result = run_score(ScoreConfig(run=tmp_path, labels="openai", simulator="openai", scorers="detection",
                                   n_examples=4, n_calibration=2, **backend))
    rows = [result["features"][str(f)]["openai"] for f in (1, 2, 3)]
    assert all(0.0 <= row["detection_auroc"] <= 1.0 for row in rows), rows  # every label judged on its contexts
    assert all("control" in row for row in rows)  # and its shuffled control
    assert result["simulator"]["backend"] == "openai"
    assert result["simulator_judge"] == "logprobs"  # P(yes) from llama.cpp's first-token log-probs, not a list

    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert not any(key in p.read_text(errors="replace") for p in written)  # the key never reaches disk

    monkeypatch.setenv("FL_SERVER_KEY", "sk-wrong")
    with pytest.raises(ConfigError, match="HTTP 401"):  # the server checks the key; the error says what happened
        run_label(LabelConfig(run=tmp_path, backend="openai", top=3, batch_size=1, force=True, **backend))
