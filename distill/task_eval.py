"""Task-suite answer exact match of the frozen model and of decoders that answer from its features.

Examples come from the suites' held-out stream (`seed + EVAL_SEED_OFFSET`, the seed of the eval split of
`builtin:tasks` as a training source), so that a decoder is never scored on the tasks it was trained on.

Generation mode (greedy, batched with left padding and a KV cache): the frozen model answers on its
own; each decoder answers by choosing every next token itself from the SAE features of the frozen
model's layer-L residual (context decoders read the features of the whole prefix), while the frozen
model only advances its KV cache on the decoder's tokens, as in `rl_env.generation_env`. A reply ends
at EOS, at a newline after some text (GSM8K replies may span lines), or after `max_new_tokens`;
`corpus.answers.extract_answer` then takes the final answer out of it.

Teacher-forced mode: the reference answer is appended to the prompt, and an example counts as right
when every answer token is the argmax prediction (of the frozen model, or of the decoder); the samples
show the argmax tokens decoded.

Degradation = frozen accuracy − decoder accuracy, in percentage points.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from corpus.answers import answer_kind, extract_answer, is_correct
from corpus.packing import EVAL_SEED_OFFSET
from corpus.tasks import PromptFormat, TaskExample, load_suite, prompt_token_ids
from distill.student import sae_features
from models.decoder import FeatureDecoder
from models.errors import ConfigError
from models.frozen import FrozenLM
from models.progress import progress_bar

Mode = Literal["generate", "teacher_forced"]
SAMPLE_CHARS = 300  # long passages (BoolQ, SQuAD) are cut in the sample rows


@dataclass
class Reader:
    """A decoder and the SAE whose features it reads, at one layer of the frozen model."""

    decoder: FeatureDecoder
    sae: nn.Module
    layer: int

    def features(self, resid_BTD: Tensor) -> tuple[Tensor, Tensor]:
        return sae_features(self.sae, resid_BTD)

    @torch.inference_mode()
    def next_logits(self, idx_BTK: Tensor, val_BTK: Tensor, mask_BT: Tensor) -> Tensor:
        """Logits [B, V] for the token after each row's last position (rows are left-padded)."""
        # move each row's padding to its end, so that the row starts at position 0 (a decoder has no
        # padding mask: a context decoder would read the padding as positions)
        T = mask_BT.shape[1]
        lengths_B = mask_BT.sum(1)
        gather_BT = (torch.arange(T)[None] + (T - lengths_B)[:, None]).clamp(max=T - 1)
        idx = idx_BTK.gather(1, gather_BT[..., None].expand_as(idx_BTK))
        val = val_BTK.gather(1, gather_BT[..., None].expand_as(val_BTK))
        return self.decoder.last_logits(idx, val, lengths_B).float()


def _finished(tokens: list[int], text: str, eos_token_id: int, stop_at_newline: bool, max_new_tokens: int) -> bool:
    return (tokens[-1] == eos_token_id or len(tokens) >= max_new_tokens
            or (stop_at_newline and "\n" in text.lstrip()))


@torch.inference_mode()
def greedy_generate(frozen: FrozenLM, prompts: list[list[int]], max_new_tokens: int, stop_at_newline: bool = True,
                    reader: Reader | None = None) -> list[list[int]]:
    """Greedy replies to a batch of prompts: the frozen model's own, or the reader's from its features.

    Either way the frozen model runs with a KV cache over the chosen tokens; finished rows leave the
    batch. Returns the new tokens of every prompt (the stop token included).
    """
    tok, device = frozen.tokenizer, frozen.device
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else frozen.eos_token_id
    B, T = len(prompts), max(len(p) for p in prompts)
    ids_BT = torch.full((B, T), pad_id, dtype=torch.long)
    mask_BT = torch.zeros(B, T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids_BT[b, T - len(p):], mask_BT[b, T - len(p):] = torch.tensor(p), 1
    positions_BT = (mask_BT.cumsum(-1) - 1).clamp(min=0)
    logits_BV, cache, idx_BTK, val_BTK = _step(frozen, ids_BT, mask_BT, positions_BT, None, reader)
    last_pos_B = positions_BT[:, -1]
    live = list(range(B))  # the prompt of each batch row
    generated: list[list[int]] = [[] for _ in range(B)]
    for _ in range(max_new_tokens):
        next_B = (reader.next_logits(idx_BTK, val_BTK, mask_BT) if reader else logits_BV).argmax(-1).cpu()
        keep = []
        for row, b in enumerate(live):
            generated[b].append(int(next_B[row]))
            text = tok.decode(generated[b], skip_special_tokens=True)
            if not _finished(generated[b], text, frozen.eos_token_id, stop_at_newline, max_new_tokens):
                keep.append(row)
        if not keep:
            break
        if len(keep) < len(live):
            rows = torch.tensor(keep)
            cache.batch_select_indices(rows.to(device))
            mask_BT, last_pos_B, next_B = mask_BT[rows], last_pos_B[rows], next_B[rows]
            if reader:
                idx_BTK, val_BTK = idx_BTK[rows], val_BTK[rows]
            live = [live[r] for r in keep]
        mask_BT = torch.cat([mask_BT, torch.ones(len(live), 1, dtype=torch.long)], 1)
        last_pos_B = last_pos_B + 1
        logits_BV, cache, new_idx, new_val = _step(frozen, next_B[:, None], mask_BT, last_pos_B[:, None], cache, reader)
        if reader:
            idx_BTK, val_BTK = torch.cat([idx_BTK, new_idx], 1), torch.cat([val_BTK, new_val], 1)
    return generated


def _step(frozen: FrozenLM, ids_BT: Tensor, mask_BT: Tensor, positions_BT: Tensor, cache, reader: Reader | None):
    """One frozen-model call: next-token logits [B, V], the cache, and (with a reader) the new positions' features."""
    device = frozen.device
    layers = [reader.layer] if reader else []
    with frozen.hooks(read=layers) as store:
        out = frozen.model(input_ids=ids_BT.to(device), attention_mask=mask_BT.to(device), position_ids=positions_BT.to(device),
                           past_key_values=cache, use_cache=True, logits_to_keep=1)
    idx = val = None
    if reader:
        idx, val = reader.features(store[reader.layer])
        idx, val = idx.cpu(), val.cpu()
    return out.logits[:, -1].float(), out.past_key_values, idx, val


@torch.inference_mode()
def _teacher_forced(frozen: FrozenLM, layer: int, readers: dict[str, Reader], examples: list[TaskExample],
                    prompt_format: PromptFormat) -> tuple[dict[str, list[str]], dict[str, list[bool]]]:
    """Per model, the argmax tokens at the answer positions (decoded), and whether they are the reference's."""
    tok = frozen.tokenizer
    outputs: dict[str, list[str]] = {"frozen": [], **{name: [] for name in readers}}
    correct: dict[str, list[bool]] = {name: [] for name in outputs}
    for ex in examples:
        prompt = prompt_token_ids(ex, tok, prompt_format, frozen.bos_token_id)
        if prompt_format == "bare":
            full = [frozen.bos_token_id, *tok(ex.text(), add_special_tokens=False)["input_ids"]]
        else:
            full = [*prompt, *tok(ex.answer, add_special_tokens=False)["input_ids"]]
        answer = torch.tensor(full[len(prompt):])
        pos = torch.arange(len(prompt) - 1, len(full) - 1)  # position p predicts token p + 1
        logits, store = frozen.forward(torch.tensor([full]), [layer])
        choices = {"frozen": logits[0, pos].argmax(-1).cpu()}
        for name, reader in readers.items():
            idx, val = reader.features(store[layer])
            choices[name] = reader.decoder(idx, val, first=len(prompt) - 1)[0, :-1].argmax(-1).cpu()
        for name, chosen in choices.items():
            correct[name].append(torch.equal(chosen, answer))
            outputs[name].append(ex.answer if correct[name][-1] else tok.decode(chosen))
    return outputs, correct


def _generate_all(frozen: FrozenLM, reader: Reader | None, prompts: list[list[int]], suite: str, max_new_tokens: int,
                  batch_size: int, desc: str, progress: bool) -> list[str]:
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch: less padding
    replies: list[str] = [""] * len(prompts)
    stop_at_newline = answer_kind(suite) != "gsm8k"
    with progress_bar(total=len(prompts), desc=desc, unit="ex", disable=not progress, leave=False) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            tokens = greedy_generate(frozen, [prompts[i] for i in chunk], max_new_tokens, stop_at_newline, reader)
            for i, t in zip(chunk, tokens):
                replies[i] = frozen.tokenizer.decode(t, skip_special_tokens=True)
            bar.update(len(chunk))
    return replies


def task_answer_exact_match(frozen: FrozenLM, layer: int, decoders: dict[str, tuple[FeatureDecoder, nn.Module]],
                            suites: list[str], n: int, seed: int, mode: Mode = "generate",
                            prompt_format: PromptFormat = "auto", max_new_tokens: int = 32, batch_size: int = 16,
                            n_samples: int = 3, progress: bool = True) -> dict:
    """Answer exact match of the frozen model and of each (decoder, SAE) pair on `n` held-out examples of every suite.

    Returns {"mode", "prompt_format", "layer", "seed", "max_new_tokens", "seconds",
    "suites": {suite: {"examples", "frozen", "decoders": {name: {"accuracy", "degradation_points"}},
    "samples": [{"prompt", "reference", "frozen", name, …}]}}, "overall": {"examples", "frozen", "decoders"}};
    accuracies are fractions in [0, 1], degradation_points = 100 · (frozen − decoder).
    """
    if mode not in ("generate", "teacher_forced"):
        raise ConfigError(f"--mode: expected generate or teacher_forced, got {mode!r}")
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens: must be at least 1, got {max_new_tokens}")
    frozen.check_layer(layer)
    if prompt_format == "auto":
        prompt_format = "chat" if getattr(frozen.tokenizer, "chat_template", None) else "bare"
    readers = {name: Reader(decoder.eval(), sae, layer) for name, (decoder, sae) in decoders.items()}
    t0 = time.perf_counter()
    per_suite, pooled = {}, {"frozen": [], **{name: [] for name in readers}}
    for suite in suites:
        examples = load_suite(suite, n, seed + EVAL_SEED_OFFSET)
        if mode == "generate":
            prompts = [prompt_token_ids(ex, frozen.tokenizer, prompt_format, frozen.bos_token_id) for ex in examples]
            replies = {name: _generate_all(frozen, readers.get(name), prompts, suite, max_new_tokens, batch_size,
                                           f"{suite} · {name}", progress) for name in ["frozen", *readers]}
            correct = {name: [is_correct(extract_answer(r, suite), ex.references) for r, ex in zip(rs, examples)]
                       for name, rs in replies.items()}
        else:
            replies, correct = _teacher_forced(frozen, layer, readers, examples, prompt_format)
        for name, flags in correct.items():
            pooled[name] += flags
        per_suite[suite] = {**_accuracies(correct), "samples": [
            {"prompt": ex.question_text()[-SAMPLE_CHARS:], "reference": ex.answer,
             **{name: replies[name][i] for name in correct}, **{f"{name}_correct": correct[name][i] for name in correct}}
            for i, ex in enumerate(examples[:n_samples])]}
    return {"mode": mode, "prompt_format": prompt_format, "layer": layer, "seed": seed, "max_new_tokens": max_new_tokens,
            "seconds": time.perf_counter() - t0, "suites": per_suite, "overall": _accuracies(pooled)}


def _accuracies(correct: dict[str, list[bool]]) -> dict:
    n = len(correct["frozen"])
    acc = {name: sum(flags) / max(1, n) for name, flags in correct.items()}
    return {"examples": n, "frozen": acc["frozen"], "decoders": {
        name: {"accuracy": a, "degradation_points": 100 * (acc["frozen"] - a)} for name, a in acc.items() if name != "frozen"}}
