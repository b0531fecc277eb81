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


def build_tiny_model(directory: Path, arch: str = "llama", bos: bool = True) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(bos=bos)
    torch.manual_seed(0)
    if arch == "llama":
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=3, n_head=4, n_positions=512)
        model = GPT2LMHeadModel(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


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
