"""Hugging Face models beyond Llama, by path: GPT-2, GPT-NeoX (Pythia), Qwen2 and Gemma-2 on tiny random configs."""

import pytest
import torch

from corpus.cache import build_cache
from corpus.config import CacheConfig
from distill.student import build_student_decoder
from faithlens_cli import main
from models import ConfigError, ModelConfig, load_frozen
from models.head import FrozenHead
from tests.conftest import blocks_that_run, build_tiny_model, random_ids, save_random_sae

ARCHS = ("gpt2", "gpt_neox", "qwen2", "gemma2")


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request, tmp_path_factory):
    directory = build_tiny_model(tmp_path_factory.mktemp(request.param), arch=request.param)
    return request.param, directory, load_frozen(ModelConfig(model=str(directory), dtype="fp32"))



def test_hooks_read_the_block_outputs_and_the_head_gives_the_logits(arch_model):
    _, _, frozen = arch_model
    ids = random_ids(frozen)
    out = frozen.model(input_ids=ids, output_hidden_states=True)
    last = frozen.n_layers
    logits, store = frozen.forward(ids, range(last + 1))
    assert torch.equal(logits, out.logits)
    for layer in range(last):  # hidden_states[last] has the final norm applied; ours is the raw block output
        assert torch.equal(store[layer], out.hidden_states[layer]), layer
    torch.testing.assert_close(frozen.logit_lens(store[last]), logits)
    torch.testing.assert_close(FrozenHead.from_frozen(frozen)(store[last]), logits)  # what decoders read out through


def test_early_exit_and_patches(arch_model):
    _, _, frozen = arch_model
    ids = random_ids(frozen)
    calls, early = blocks_that_run(frozen, lambda: frozen.residuals(ids, [1, 2]))
    clean, store = frozen.forward(ids, [2])
    assert calls == [0, 1] and torch.equal(early[2], store[2])
    same, _ = frozen.forward(ids, write={2: lambda h: h})
    zeroed, _ = frozen.forward(ids, write={2: torch.zeros_like})
    assert torch.equal(same, clean) and not torch.allclose(zeroed, clean)


def test_teacher_cache_holds_the_models_log_probs(arch_model, tmp_path):
    _, directory, frozen = arch_model
    cfg = CacheConfig(model=str(directory), dtype="fp32", data="builtin:tasks", layers="2", tokens=64, seq_len=32,
                      top_k=8, batch_size=2, out=tmp_path)
    shard = build_cache(cfg, frozen, progress=False).shard(0)
    logits, resid = frozen.forward(shard["tokens"].long(), [2])
    top, top_ids = logits.float().log_softmax(-1).topk(8, -1)
    torch.testing.assert_close(shard["teacher.topk_logp"], top)
    assert torch.equal(shard["teacher.topk_ids"].long(), top_ids)
    assert torch.equal(shard["resid.2"], resid[2].to(torch.bfloat16))


def test_context_decoder_refuses_to_copy_other_blocks_and_starts_from_zero(arch_model, tmp_path):
    arch, _, frozen = arch_model
    sae_dir = save_random_sae(frozen, tmp_path / "sae", layer=1, latents=32, k=4)
    from sae.model import SparseAutoencoder

    sae = SparseAutoencoder.load(sae_dir)
    with pytest.raises(ConfigError, match=r"--init upper-blocks: .* differ from the context decoder's Llama-style blocks "
                                          r"\(extra parameters .*\); use --init zero") as refused:
        build_student_decoder("context", sae, frozen, 1, n_layers=2)
    assert "\n" not in str(refused.value)
    decoder = build_student_decoder("context", sae, frozen, 1, n_layers=2, init="zero")
    ids = random_ids(frozen, batch=1)
    _, store = frozen.forward(ids, [1])
    enc = sae.encode(store[1][0].float())
    logits = decoder(enc.indices_NK[None], enc.acts_NK[None])
    assert logits.shape == (1, ids.shape[1], frozen.vocab_size) and torch.isfinite(logits).all()


def test_decoder_train_refusal_is_one_line_before_any_cache(tmp_path, capsys):
    directory = build_tiny_model(tmp_path / "neox", arch="gpt_neox")
    frozen = load_frozen(ModelConfig(model=str(directory), dtype="fp32"))
    sae_dir = save_random_sae(frozen, tmp_path / "sae", layer=1, latents=32, k=4)
    code = main(["decoder", "train", "--model", str(directory), "--sae", str(sae_dir), "--arch", "context", "--n-layers", "2",
                 "--dtype", "fp32", "--data", "builtin:tasks", "--tokens", "256", "--seq-len", "32", "--out", str(tmp_path / "dec")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "GPTNeoXLayer) differ from the context decoder's Llama-style blocks" in err and "use --init zero" in err
    assert not list(tmp_path.rglob("manifest.json"))  # refused before the teacher cache was built


def test_a_head_that_cannot_be_reproduced_is_refused(tiny_model_dir):
    frozen = load_frozen(ModelConfig(model=str(tiny_model_dir), dtype="fp32"))

    class CubedNorm(type(frozen.final_norm)):  # an RMSNorm by its attributes, not by what it computes
        def forward(self, h):
            return super().forward(h) ** 3

    frozen.final_norm.__class__ = CubedNorm
    with pytest.raises(ConfigError, match=r"output head of .* \(CubedNorm → Linear\) is not a LayerNorm/RMSNorm followed by"):
        FrozenHead.from_frozen(frozen)
