"""A frozen model spread by accelerate over cpu and disk offload computes what the undispatched model does."""

import json
from dataclasses import replace

import pytest
import torch

from corpus.cache import build_cache
from corpus.config import CacheConfig
from faithlens_cli import main
from models import ConfigError, ModelConfig, load_frozen
from models.head import FrozenHead
from models.placement import parse_device_map, parse_max_memory
from tests.conftest import blocks_that_run, build_tiny_model, random_ids

# Half the blocks and the whole head on disk: every offloaded module is loaded on the fly by accelerate's hooks.
SPLIT = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
         "model.layers.2": "cpu", "model.layers.3": "disk", "model.norm": "disk", "lm_head": "disk"}



@pytest.fixture(scope="module")
def dispatched(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("dispatch")
    (root / "map.json").write_text(json.dumps(SPLIT))
    return load_frozen(ModelConfig(model=str(tiny_model_dir), dtype="fp32", device_map=str(root / "map.json"),
                                   offload_folder=str(root / "offload")))


def test_weights_really_are_offloaded(dispatched):
    assert dispatched.model.hf_device_map == SPLIT
    assert dispatched.unembed.weight.device.type == "meta" and dispatched.blocks[1].mlp.up_proj.weight.device.type == "meta"
    assert dispatched.device == torch.device("cpu")


def test_residuals_logits_and_early_exit_equal_the_undispatched_model(dispatched, tiny_frozen):
    ids = random_ids(tiny_frozen)
    logits, store = tiny_frozen.forward(ids, [0, 2, 4])
    d_logits, d_store = dispatched.forward(ids, [0, 2, 4])
    assert torch.equal(d_logits, logits)
    for layer in (0, 2, 4):
        assert torch.equal(d_store[layer], store[layer])
    calls, early = blocks_that_run(dispatched, lambda: dispatched.residuals(ids, [1, 2]))
    assert calls == [0, 1] and torch.equal(early[2], store[2])  # the disk-offloaded block 3 never ran
    assert torch.equal(dispatched.logit_lens(store[4]), logits)
    patched, _ = dispatched.forward(ids, write={2: torch.zeros_like})
    reference, _ = tiny_frozen.forward(ids, write={2: torch.zeros_like})
    assert torch.equal(patched, reference)


def test_head_and_teacher_cache_equal_the_undispatched_model(dispatched, tiny_frozen, tiny_model_dir, tmp_path):
    h = torch.randn(5, tiny_frozen.d_model)
    assert torch.equal(FrozenHead.from_frozen(dispatched)(h), FrozenHead.from_frozen(tiny_frozen)(h))
    assert dispatched.unembed.weight.device.type == "meta"  # the head's weights were loaded, not the module kept
    assert dispatched.fingerprint() == tiny_frozen.fingerprint()  # the same cache key either way
    cfg = CacheConfig(model=str(tiny_model_dir), dtype="fp32", data="builtin:tasks", layers="2", tokens=128, seq_len=32,
                      top_k=8, batch_size=2, shard_tokens=64)
    ours = build_cache(replace(cfg, out=tmp_path / "a"), dispatched, progress=False)
    theirs = build_cache(replace(cfg, out=tmp_path / "b"), tiny_frozen, progress=False)
    assert ours.root.name == theirs.root.name and ours.n_shards == theirs.n_shards == 2
    for i in range(ours.n_shards):
        a, b = ours.shard(i), theirs.shard(i)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_auto_map_with_a_memory_limit_offloads_a_tied_head(tmp_path):
    directory = build_tiny_model(tmp_path / "gpt2", arch="gpt2")  # lm_head tied to the token embedding
    plain = load_frozen(ModelConfig(model=str(directory), dtype="fp32"))
    spread = load_frozen(ModelConfig(model=str(directory), dtype="fp32", device_map="auto", max_memory="cpu:40KB",
                                     offload_folder=str(tmp_path / "offload")))
    assert "disk" in set(spread.model.hf_device_map.values())
    ids = random_ids(plain)
    (logits, store), (d_logits, d_store) = plain.forward(ids, [1]), spread.forward(ids, [1])
    assert torch.equal(d_logits, logits) and torch.equal(d_store[1], store[1])
    h = torch.randn(3, plain.d_model)
    assert torch.equal(FrozenHead.from_frozen(spread)(h), FrozenHead.from_frozen(plain)(h))


def test_cache_command_with_a_device_map(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "map.json").write_text(json.dumps(SPLIT))
    code = main(["cache", "--model", str(tiny_model_dir), "--layers", "2", "--data", "builtin:tasks", "--tokens", "64",
                 "--seq-len", "32", "--out", str(tmp_path / "c"), "--dtype", "fp32", "--device-map", str(tmp_path / "map.json")])
    assert code == 0 and "cache: 64 tokens, layers 2" in capsys.readouterr().out


def test_device_map_and_max_memory_parsing(tmp_path):
    assert parse_device_map("balanced") == "balanced"
    assert parse_max_memory("0:20GiB, cuda:1:20GiB,cpu:60GiB") == {0: "20GiB", 1: "20GiB", "cpu": "60GiB"}
    (tmp_path / "m.json").write_text(json.dumps({"model.layers.0": 0, "lm_head": "cuda:1", "model.norm": "disk"}))
    assert parse_device_map(str(tmp_path / "m.json")) == {"model.layers.0": 0, "lm_head": 1, "model.norm": "disk"}
    cases = [
        (dict(device_map="everywhere"), "--device-map: expected auto, .* no such file: everywhere"),
        (dict(device_map="auto", max_memory="cpu=3GB"), "--max-memory: expected DEVICE:SIZE pairs .*, got 'cpu=3GB'"),
        (dict(device_map="auto", max_memory="gpu0:3GB"), "--max-memory: unknown device 'gpu0'"),
        (dict(device_map="auto", max_memory="cpu:lots"), "--max-memory: 'lots' is not a size"),
        (dict(device_map="auto", max_memory="disk:9GB"), "disk takes whatever does not fit"),
        (dict(max_memory="cpu:3GB"), "apply to a dispatched model; add --device-map auto"),
        (dict(device_map="auto", device="cuda:1"), "--device cuda:1 and --device-map auto: give one"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_frozen(ModelConfig(model=str(tmp_path), **kwargs))
    (tmp_path / "bad.json").write_text(json.dumps({"lm_head": "gpu0"}))
    with pytest.raises(ConfigError, match="module 'lm_head': unknown device 'gpu0'"):
        parse_device_map(str(tmp_path / "bad.json"))


def test_context_decoder_copies_offloaded_blocks(dispatched, tiny_frozen, tmp_path):
    from distill.student import build_student_decoder
    from sae.model import SparseAutoencoder
    from tests.conftest import save_random_sae

    sae = SparseAutoencoder.load(save_random_sae(tiny_frozen, tmp_path / "sae", layer=1, latents=32, k=4))
    ours, theirs = (build_student_decoder("context", sae, f, 1, n_layers=3, bos_stream=True) for f in (dispatched, tiny_frozen))
    assert ours.source_blocks == [2, 3, 4]  # blocks 1 and 3 (layers 2, 4) sit on disk
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert dispatched.blocks[3].mlp.up_proj.weight.device.type == "meta"  # offloaded again afterwards
