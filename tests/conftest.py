"""Tiny random models built from a config (no hub), and an isolated faithlens cache per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

_TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog. Question: What is 17 + 3? Answer: 20",
    "Which number is larger, 47 or 74? Answer: 74. How many times does the word apple appear?",
    "Repeat exactly: a1 b2 c3. True and not False or True. The river runs to the ocean.",
    "0123456789 + - * = ? ! , . ' : ; ( ) abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
] * 20


def build_tokenizer(bos: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<pad>"]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_TRAIN_TEXT, trainer)
    kwargs = {"eos_token": "</s>", "pad_token": "<pad>"}
    if bos:
        kwargs["bos_token"] = "<s>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


TINY_ARCHS = ("llama", "gpt2", "gpt_neox", "qwen2", "gemma2")


def build_tiny_model(directory: Path, arch: str = "llama", bos: bool = True) -> Path:
    import torch
    import transformers as tf

    tokenizer = build_tokenizer(bos=bos)
    torch.manual_seed(0)
    common = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    decoder = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=512)
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common, **decoder, num_key_value_heads=2))
    elif arch == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(**common, n_embd=32, n_layer=3, n_head=4, n_positions=512))
    elif arch == "gpt_neox":  # Pythia: parallel residual, partial rotary, LayerNorms with bias, untied embed_out
        model = tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**common, **decoder, rotary_pct=0.25))
    elif arch == "qwen2":  # Llama's blocks plus q/k/v biases
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, **decoder, num_key_value_heads=2))
    elif arch == "gemma2":  # scaled embeddings, (1 + w) RMSNorms, four norms a block, soft-capped logits
        config = tf.Gemma2Config(**common, **decoder, num_key_value_heads=2, head_dim=8, sliding_window=8,
                                 final_logit_softcapping=2.0, pad_token_id=tokenizer.pad_token_id)
        model = tf.Gemma2ForCausalLM(config)
        with torch.no_grad():  # a random init leaves the norms' weights at 0 (a gain of 1): make them count
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0, 0.5)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def random_ids(frozen, batch: int = 2, length: int = 12, seed: int = 0):
    """Random token ids starting with BOS, [batch, length]."""
    import torch

    ids = torch.randint(3, frozen.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = frozen.bos_token_id
    return ids


def blocks_that_run(frozen, fn):
    """(the indices of the frozen blocks that ran during fn(), its result)."""
    calls = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, b in enumerate(frozen.blocks)]
    try:
        result = fn()
    finally:
        for h in handles:
            h.remove()
    return calls, result


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    os.environ["FAITHLENS_CACHE"] = str(tmp_path_factory.mktemp("faithlens_cache"))
    yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_frozen(tiny_model_dir):
    from models import ModelConfig, load_frozen

    return load_frozen(ModelConfig(model=str(tiny_model_dir), dtype="fp32"))


@pytest.fixture(scope="session")
def embedded_frozen():
    from models import ModelConfig, load_frozen

    return load_frozen(ModelConfig())


@pytest.fixture(scope="session")
def sharp_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama whose next-token distributions are peaked (a random init is near uniform: KL ~ 0)."""
    from safetensors.torch import load_file, save_file

    directory = build_tiny_model(tmp_path_factory.mktemp("sharp"))
    weights = load_file(str(directory / "model.safetensors"))
    weights["lm_head.weight"] = weights["lm_head.weight"] * 40
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def save_random_sae(frozen, directory: Path, layer: int = 2, latents: int = 64, k: int = 8) -> Path:
    """A random TopK SAE for `frozen`, saved with its layer (enough for decoder and RL plumbing tests)."""
    import torch

    from sae.config import SaeConfig
    from sae.model import SparseAutoencoder

    sae = SparseAutoencoder(SaeConfig(d_in=frozen.d_model, num_latents=latents, arch="topk", k=k))
    sae.init_weights(torch.Generator().manual_seed(0))
    sae.save(directory, extra={"layer": layer, "model": str(frozen.name)})
    return directory
