"""Integration tests on the real embedded SmolLM2-135M-Instruct (installed by `make`; run in CI)."""

import json

import pytest
import torch

from faithlens_cli import main
from tests.conftest import SHARED_DATA

pytestmark = pytest.mark.embedded


def test_embedded_model_loads_with_its_real_shape(embedded_frozen):
    assert embedded_frozen.n_layers == 30 and embedded_frozen.d_model == 576 and embedded_frozen.vocab_size == 49152
    assert embedded_frozen.bos_token_id is not None
    from models import ModelConfig, load_frozen

    warm = load_frozen(ModelConfig(dtype="fp32"))  # second load comes from the dequantised cache
    assert warm.dtype == torch.float32


def test_embedded_model_predicts_arithmetic(embedded_frozen):
    tok = embedded_frozen.tokenizer
    ids = torch.tensor([[embedded_frozen.bos_token_id] + tok("The capital of France is", add_special_tokens=False)["input_ids"]])
    logits, store = embedded_frozen.forward(ids, [9, 30])
    assert tok.decode(logits[0, -1].argmax()).strip() == "Paris"
    assert torch.equal(embedded_frozen.logit_lens(store[30]), logits)
    only9 = embedded_frozen.residuals(ids, [9])
    assert torch.equal(only9[9], store[9])


def test_baseline_on_real_text(capsys):
    data = SHARED_DATA / "wikitext2_train.txt"
    if not data.exists():
        pytest.skip("../shared/data is not beside the repository")
    code = main(["baseline", "--data", str(data), "--tokens", "1024", "--layers", "9,last", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert 2.0 < result["frozen"]["ce"] < 5.0  # SmolLM2-135M on WikiText: ~3.5 nats/token
    last = result["layers"][-1]
    assert last["layer"] == 30 and last["logit_lens_kl"] == 0.0 and last["logit_lens_top1"] == 1.0
    assert result["layers"][0]["logit_lens_kl"] > 5.0


def test_cache_on_real_text_with_latin1_files(tmp_path, capsys):
    data = SHARED_DATA / "state_union"
    if not data.exists():
        pytest.skip("../shared/data is not beside the repository")
    code = main(["cache", "--data", str(data), "--tokens", "2048", "--layers", "9", "--out", str(tmp_path)])
    assert code == 0
    assert "cache: 2,048 tokens, layers 9" in capsys.readouterr().out
