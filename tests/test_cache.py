import json

import pytest
import torch

import corpus.cache as cache_mod
from corpus.cache import ActivationCache, build_cache, mmap_safetensors
from corpus.config import CacheConfig
from models import ConfigError


def _cfg(tiny_model_dir, out, **kw):
    base = dict(model=str(tiny_model_dir), dtype="fp32", data="builtin:tasks", layers="1,3", tokens=32 * 20,
                seq_len=32, top_k=8, batch_size=2, shard_tokens=128, out=out)
    return CacheConfig(**{**base, **kw})


def _all_tensors(cache):
    return [cache.shard(i) for i in range(cache.n_shards)]


def _assert_same(a, b):
    assert a.n_shards == b.n_shards
    for sa, sb in zip(_all_tensors(a), _all_tensors(b)):
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k


def test_cache_contents_match_the_model(tiny_model_dir, tiny_frozen, tmp_path):
    cache = build_cache(_cfg(tiny_model_dir, tmp_path), tiny_frozen, progress=False)
    assert cache.tokens == 640 and cache.n_shards == 5 and cache.layers == [1, 3]
    shard = cache.shard(0)
    assert shard["resid.1"].dtype == torch.bfloat16 and shard["resid.1"].shape == (4, 32, tiny_frozen.d_model)
    ids = shard["tokens"].long()
    logits, resid = tiny_frozen.forward(ids, [1, 3])
    assert torch.equal(shard["resid.3"], resid[3].to(torch.bfloat16))
    logp = logits.float().log_softmax(-1)
    top, top_ids = logp.topk(8, -1)
    torch.testing.assert_close(shard["teacher.topk_logp"], top)
    assert torch.equal(shard["teacher.topk_ids"].long(), top_ids)
    # top-k mass plus rest mass is the whole distribution
    total = torch.logaddexp(shard["teacher.topk_logp"].logsumexp(-1), shard["teacher.rest_logmass"])
    torch.testing.assert_close(total, torch.zeros_like(total), atol=1e-5, rtol=0)
    assert torch.equal(shard["next_ids"][:, :-1], shard["tokens"][:, 1:])
    reopened = ActivationCache.open(cache.root)
    _assert_same(cache, reopened)
    assert build_cache(_cfg(tiny_model_dir, tmp_path), tiny_frozen, progress=False).root == cache.root


def test_interrupted_build_resumes_to_the_same_cache(tiny_model_dir, tiny_frozen, tmp_path, monkeypatch):
    reference = build_cache(_cfg(tiny_model_dir, tmp_path / "ref"), tiny_frozen, progress=False)
    real_write = cache_mod._write_shard
    calls = []

    def write_then_die(root, index, tensors):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(index)
        return real_write(root, index, tensors)

    monkeypatch.setattr(cache_mod, "_write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        build_cache(_cfg(tiny_model_dir, tmp_path / "run"), tiny_frozen, progress=False)
    (root,) = (tmp_path / "run").iterdir()
    assert sorted(p.name for p in root.iterdir()) == ["manifest.json", "shard_00000.safetensors", "shard_00001.safetensors"]
    with pytest.raises(ConfigError, match="did not finish"):
        ActivationCache.open(root)
    monkeypatch.setattr(cache_mod, "_write_shard", real_write)
    resumed = build_cache(_cfg(tiny_model_dir, tmp_path / "run"), tiny_frozen, progress=False)
    _assert_same(reference, resumed)


def test_corrupt_shard_is_detected_and_rebuilt(tiny_model_dir, tiny_frozen, tmp_path):
    cache = build_cache(_cfg(tiny_model_dir, tmp_path), tiny_frozen, progress=False)
    shard_file = cache.root / "shard_00002.safetensors"
    data = shard_file.read_bytes()
    shard_file.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ConfigError, match="shard_00002.safetensors: shard is missing or corrupt"):
        ActivationCache.open(cache.root)
    rebuilt = build_cache(_cfg(tiny_model_dir, tmp_path), tiny_frozen, progress=False)
    reference = build_cache(_cfg(tiny_model_dir, tmp_path / "ref"), tiny_frozen, progress=False)
    _assert_same(reference, rebuilt)
    flipped = bytearray(shard_file.read_bytes())
    flipped[-1] ^= 0xFF  # same size, different content
    shard_file.write_bytes(bytes(flipped))
    with pytest.raises(ConfigError, match="corrupt"):
        ActivationCache.open(cache.root)


def test_activations_only_cache_has_no_teacher(tiny_model_dir, tiny_frozen, tmp_path):
    cache = build_cache(_cfg(tiny_model_dir, tmp_path, teacher=False, act_dtype="fp16"), tiny_frozen, progress=False)
    shard = cache.shard(0)
    assert not cache.has_teacher and "teacher.topk_ids" not in shard and shard["resid.1"].dtype == torch.float16
    manifest = json.loads((cache.root / "manifest.json").read_text())
    assert manifest["key"]["top_k"] is None


def test_key_changes_with_what_produced_it(tiny_model_dir, tiny_frozen, tmp_path):
    a = cache_mod.cache_key(_cfg(tiny_model_dir, tmp_path), tiny_frozen, [1, 3])[0]
    b = cache_mod.cache_key(_cfg(tiny_model_dir, tmp_path, seed=1), tiny_frozen, [1, 3])[0]
    c = cache_mod.cache_key(_cfg(tiny_model_dir, tmp_path), tiny_frozen, [1])[0]
    assert len({a, b, c}) == 3


def test_mmap_reader_matches_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = {"a": torch.randn(3, 4).to(torch.bfloat16), "b": torch.arange(6, dtype=torch.int32).reshape(2, 3),
               "c": torch.randn(5), "d": torch.randn(2, 2).half()}
    save_file(tensors, tmp_path / "x.safetensors")
    mapped = mmap_safetensors(tmp_path / "x.safetensors")
    loaded = load_file(tmp_path / "x.safetensors")
    for k in tensors:
        assert torch.equal(mapped[k], loaded[k])
