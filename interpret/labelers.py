"""Labelling backends (explainers) and simulators: turn a feature's evidence into a short label, and
judge from a label whether contexts activate the feature.

Backends compute and return strings and probabilities; they neither print nor touch files. Prompts
change with `PROMPT_VERSION`, which is recorded with every label and keys the label cache.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import zlib
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, Protocol

import torch

from interpret.label_config import PROMPT_VERSION, BackendConfig
from interpret.records import Example, FeatureEvidence
from models.errors import ConfigError

log = logging.getLogger(__name__)

Task = Literal["detection", "fuzzing"]
LOCAL_LABEL_PREFIX = "Common theme:"
"""Start of the local model's answer (prefilled in the assistant turn)."""
MAX_LABEL_WORDS = 12
"""Labels are asked for in at most 8 words; longer generations are cut here."""
PROMPT_WORDS = frozenset(
    "a an the of and or in on language model models feature features detect detects detecting detection detector "
    "text texts excerpt excerpts token tokens marked fire fires firing label labels common theme".split())
"""The labelling prompt's own vocabulary: a label made of these words only names the task, not the feature."""
RETRY_SAMPLES = 4
"""Sampled answers drawn when the local model's greedy label is empty or echoes the prompt; the one with the
smallest share of prompt words is kept."""
TOP_LOGPROBS = 20
"""Most likely first answer tokens an OpenAI-compatible simulator is asked for (the OpenAI API's maximum)."""


class Labeler(Protocol):
    name: str
    model_id: str

    def label(self, batch: Sequence[FeatureEvidence]) -> list[str]: ...


class Simulator(Protocol):
    name: str
    model_id: str

    def judge(self, label: str, contexts: Sequence[str], task: Task = "detection") -> list[float]:
        """P(each context activates the feature) for detection; P(the marks are correct) for fuzzing."""
        ...


def make_labeler(kind: str, cfg: BackendConfig, examples: int = 8):
    """The labeller/simulator named `kind` built from the shared backend options."""
    if kind == "stats":
        return StatsLabeler(examples=examples)
    prompt = getattr(cfg, "prompt", PROMPT_VERSION)  # a simulator's config has no labelling prompt
    if kind == "local":
        return LocalLabeler(cfg.local_model, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
                            examples=examples, prompt=prompt)
    if kind == "openai":
        return OpenAILabeler(cfg.openai_base_url, cfg.openai_model, cfg.api_key_env, timeout_s=cfg.timeout_s,
                             batch_size=cfg.batch_size, examples=examples, prompt=prompt)
    raise ConfigError(f"--backend: expected local, openai or stats, got {kind!r}")


# -- prompt material --------------------------------------------------------------------------
def peak_index(ex: Example) -> int:
    return max(range(len(ex.acts)), key=lambda i: ex.acts[i]) if ex.acts else ex.center


def mark_tokens(tokens: Sequence[str], marked: set[int] | Sequence[int]) -> str:
    """The text with the tokens at `marked` wrapped in <<…>> (leading whitespace kept outside the marks)."""
    marked = set(marked)
    parts = []
    for i, tok in enumerate(tokens):
        if i in marked:
            stripped = tok.lstrip()
            parts.append(f"{tok[:len(tok) - len(stripped)]}<<{stripped}>>")
        else:
            parts.append(tok)
    return "".join(parts)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def marked_token_counts(ev: FeatureEvidence, examples: int) -> Counter[str]:
    """How often each token is the peak of the first `examples` top contexts (stripped; bare whitespace quoted)."""
    peaks = (ex.tokens[peak_index(ex)] for ex in ev.top[:examples] if ex.tokens)
    return Counter(token.strip() or repr(token) for token in peaks)


def with_marked_tokens(label: str, ev: FeatureEvidence, examples: int, n: int = 3) -> str:
    """label-v2's label: the model's words, then the `n` commonest marked tokens, which a lexical feature is about."""
    tokens = ", ".join(f'"{t}"' for t, _ in marked_token_counts(ev, examples).most_common(n))
    return f"{label} ({tokens})" if tokens else label


def finish_label(label: str, ev: FeatureEvidence, examples: int, version: str) -> str:
    """A cleaned model answer as stored: "(no label)" when empty, with the marked tokens under label-v2."""
    if not label:
        return "(no label)"
    return with_marked_tokens(label, ev, examples) if version == "label-v2" else label


def _label_prompt(ev: FeatureEvidence, examples: int, version: str = PROMPT_VERSION) -> str:
    lines = [
        "Below are text excerpts where one feature of a language model fires. "
        "The token where it fires most is marked <<like this>>.",
    ]
    for i, ex in enumerate(ev.top[:examples], 1):
        lines.append(f"{i}. {_one_line(mark_tokens(ex.tokens, [peak_index(ex)]))}")
    if version == "label-v2":
        counts = marked_token_counts(ev, examples)
        lines.append("Marked tokens, commonest first: " + ", ".join(f'"{t}" x{n}' for t, n in counts.most_common(8)))
    if ev.promoted:
        lines.append("Tokens the feature makes more likely next: " + ", ".join(repr(t) for t, _ in ev.promoted[:8]))
    if version == "label-v2":
        lines.append("Features like this one usually respond to one word or word family, or to one kind of token "
                     "(numbers, names, punctuation, a part of speech) in a certain context. Say what the marked "
                     "tokens have in common: quote the word if one repeats, else name their kind, and add the "
                     "context only if it matters. Answer with a short label of at most 8 words and nothing else.")
    else:
        lines.append("What does the feature detect? Answer with a short label of at most 8 words and nothing else.")
    return "\n".join(lines)


JUDGE_PROMPT_VERSION = "judge-v2"
"""Version of the local simulator's prompt (recorded with every score): the text comes first and the label
last, so that one forward over a text serves every label judged on it (`LocalLabeler.judge_many`)."""
LABEL_SLOT = "\u2063label\u2063"
"""Stands for the label while a judge prompt is split into the part before it and the part after it."""


def _judge_prompt(label: str, context: str, task: Task) -> str:
    if task == "detection":
        head = ("Below are a text and the description of a feature of a language model. "
                "Does the feature fire anywhere in the text? Answer Yes or No.")
    else:
        head = ("Below are a text in which some tokens are marked <<like this>> and the description of a feature of a "
                "language model. Are the marked tokens exactly where the feature fires? Answer Yes or No.")
    return f"{head}\nText: {_one_line(context)}\nFeature: {label}"


def prompt_word_share(label: str) -> float:
    """The share of `label`'s words that are the prompt's own (PROMPT_WORDS); 1.0 for a label without words."""
    words = re.findall(r"[a-z]+", label.lower())
    return sum(w in PROMPT_WORDS for w in words) / len(words) if words else 1.0


def echoes_prompt(label: str) -> bool:
    """Whether `label` only repeats the task ("Language model feature detection"): every word in PROMPT_WORDS."""
    return bool(re.search(r"[a-z]", label.lower())) and prompt_word_share(label) == 1.0


def clean_label(text: str) -> str:
    """One clean line: the first non-empty line, without a 'Label:' prefix, quotes or a final period; empty when
    the answer only echoes the prompt (`echoes_prompt`)."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = re.sub(r"^(label|answer|feature)\s*[:\-]\s*", "", line, flags=re.IGNORECASE)
    line = line.strip().strip("*").strip().rstrip(".")
    if len(line) >= 2 and line[0] == line[-1] and line[0] in "\"'`" and line[0] not in line[1:-1]:
        line = line[1:-1]  # one quoted phrase; keep quotes that delimit several
    line = line.rstrip(".").strip()
    return "" if echoes_prompt(line) else " ".join(line.split()[:MAX_LABEL_WORDS])


# -- stats ------------------------------------------------------------------------------------
class StatsLabeler:
    """No model: the tokens at the activation peaks, the commonest n-grams around them, the promoted tokens."""

    name = "stats"
    model_id = "stats"
    prompt_version = "label-v1"  # no prompt; kept so that the stats labels already cached stay valid

    def __init__(self, examples: int = 8, n_tokens: int = 3, n_promoted: int = 3):
        self.examples = examples
        self.n_tokens = n_tokens
        self.n_promoted = n_promoted

    def label(self, batch: Sequence[FeatureEvidence]) -> list[str]:
        return [self._label_one(ev) for ev in batch]

    def _label_one(self, ev: FeatureEvidence) -> str:
        peaks: Counter[str] = Counter()
        ngrams: Counter[str] = Counter()
        for ex in ev.top[:self.examples]:
            p = peak_index(ex)
            peaks[ex.tokens[p]] += 1
            if p > 0:
                ngrams["".join(ex.tokens[p - 1:p + 1])] += 1
            if p + 1 < len(ex.tokens):
                ngrams["".join(ex.tokens[p:p + 2])] += 1
        parts = []
        if peaks:
            parts.append("tokens " + "/".join(f'"{t}"' for t, _ in peaks.most_common(self.n_tokens)))
        if ngrams:
            gram, _ = ngrams.most_common(1)[0]
            parts.append(f'n-gram "{gram.strip()}"')
        # byte fragments and bare whitespace say nothing once quoted in a label
        promoted = [t.strip() for t, _ in ev.promoted if t.strip() and "\ufffd" not in t][:self.n_promoted]
        if promoted:
            parts.append("promotes " + "/".join(f'"{t}"' for t in promoted))
        return " · ".join(parts) or "no activations"


# -- local HF model -----------------------------------------------------------------------------
class LocalLabeler:
    """An HF instruct model: greedy labels from a chat prompt; as simulator P(Yes) vs P(No) in one pass."""

    name = "local"
    judge_mode = "logprobs"

    def __init__(self, model: str | object = "embedded:smollm2-135m-instruct", batch_size: int = 8,
                 max_new_tokens: int = 24, examples: int = 8, prompt: str = PROMPT_VERSION):
        """`model`: a model spec for load_frozen, or an already loaded FrozenLM."""
        if isinstance(model, str):
            from models.config import ModelConfig
            from models.loading import load_frozen

            model = load_frozen(ModelConfig(model=model))
        self.lm = model.model
        self.tokenizer = model.tokenizer
        self.model_id = str(model.name)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.examples = examples
        self.prompt_version = prompt
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._yes_ids = self._first_token_ids(["Yes", " Yes", "yes", " yes"])
        self._no_ids = self._first_token_ids(["No", " No", "no", " no"])

    def _first_token_ids(self, words: list[str]) -> list[int]:
        return sorted({self.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words})

    def _prompt(self, user: str, answer_prefix: str, chat_prefix: str = "") -> str:
        """The chat-templated prompt (assistant turn opened, starting with `chat_prefix`), or plain text."""
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": user}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + chat_prefix
        return f"{user}\n{answer_prefix}"

    def _encode(self, prompts: list[str], special: bool = True) -> dict[str, torch.Tensor]:
        """Left-padded token ids and mask; `special` adds the BOS/special tokens where no chat template does."""
        self.tokenizer.padding_side = "left"  # generation and last-position logits need the prompt end aligned
        # chat templates already carry the BOS/special tokens
        add_special = special and not getattr(self.tokenizer, "chat_template", None)
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special)
        device = next(self.lm.parameters()).device
        return {k: v.to(device) for k, v in enc.items()}

    @torch.no_grad()
    def label(self, batch: Sequence[FeatureEvidence]) -> list[str]:
        # small instruct models answer with the instructions themselves unless the answer is started for them
        prefix = LOCAL_LABEL_PREFIX if self.prompt_version == "label-v1" else "Label:"
        prompts = [self._prompt(_label_prompt(ev, self.examples, self.prompt_version), "Label:", prefix) for ev in batch]
        labels = []
        for i in range(0, len(prompts), self.batch_size):
            labels += [clean_label(t) for t in self._generate(prompts[i:i + self.batch_size])]
        for i, label in enumerate(labels):
            if not label:  # greedy decoding repeats itself: retry with a few seeded samples
                labels[i] = self._sampled_label(prompts[i], seed=zlib.crc32(prompts[i].encode()))
        return [finish_label(label, ev, self.examples, self.prompt_version) for label, ev in zip(labels, batch)]

    def _generate(self, prompts: list[str], samples: int = 0) -> list[str]:
        """Greedy continuations of `prompts`, or `samples` sampled ones of each (temperature 0.7, top-p 0.9)."""
        enc = self._encode(prompts)
        sampling = ({"do_sample": True, "temperature": 0.7, "top_p": 0.9, "num_return_sequences": samples} if samples
                    else {"do_sample": False})
        out = self.lm.generate(**enc, max_new_tokens=self.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                               **sampling)
        return self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    def _sampled_label(self, prompt: str, seed: int) -> str:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            texts = self._generate([prompt], samples=RETRY_SAMPLES)
        candidates = [c for c in map(clean_label, texts) if c]
        label = min(candidates, key=prompt_word_share, default="")  # the one that least repeats the task
        log.info("local labeller: greedy answer was empty or echoed the prompt; sampled retry gave %r (raw %r)",
                 label, texts)
        return label

    def judge(self, label: str, contexts: Sequence[str], task: Task = "detection") -> list[float]:
        return self.judge_many([label], contexts, task)[0]

    @torch.no_grad()
    def judge_many(self, labels: Sequence[str], contexts: Sequence[str], task: Task = "detection") -> list[list[float]]:
        """P(yes) of every (label, context) pair, [len(labels)][len(contexts)]. The prompt puts the text before the
        label: each text's part is run once (batch_size texts per forward) and its KV cache is shared by the label
        parts that follow it, so k labels on a text cost one text plus k labels, not k whole prompts. Label parts
        of similar length go together (`length_groups`), so that a long label does not pad every short one."""
        probs_LC = torch.empty(len(labels), len(contexts))
        for i in range(0, len(contexts) if labels else 0, self.batch_size):
            chunk = contexts[i:i + self.batch_size]
            heads, tails = zip(*(self._split_at_label(c, task) for c in chunk))
            head = self._encode(list(heads))
            cache = self.lm(**head, position_ids=_positions(head["attention_mask"]), use_cache=True,
                            logits_to_keep=1).cache
            # the label part starts at the space before the label, as the whole prompt would tokenise it
            suffixes = [f" {label}{tails[0]}" for label in labels]
            lengths = [len(ids) for ids in self.tokenizer(suffixes, add_special_tokens=False)["input_ids"]]
            groups = length_groups(lengths)
            for g, rows in enumerate(groups):
                shared = cache if g == len(groups) - 1 else copy.deepcopy(cache)
                suffix = self._encode([suffixes[r] for r in rows], special=False)
                p_B = self._p_yes_after(head["attention_mask"], shared, suffix)
                probs_LC[rows, i:i + len(chunk)] = p_B.view(len(chunk), len(rows)).T
        return probs_LC.tolist()

    def _split_at_label(self, context: str, task: Task) -> tuple[str, str]:
        """The chat-templated judge prompt as (everything before ' <label>', everything after it)."""
        head, tail = self._prompt(_judge_prompt(LABEL_SLOT, context, task), "Answer:").rsplit(LABEL_SLOT, 1)
        return head.removesuffix(" "), tail

    def _p_yes_after(self, head_mask: torch.Tensor, cache, suffix: dict[str, torch.Tensor]) -> torch.Tensor:
        """P(yes) at the end of every head + suffix pair, row c·L + l for head c and suffix l (both left-padded);
        `cache` holds the heads' keys and values and is expanded in place."""
        n_heads, n_suffixes = head_mask.shape[0], suffix["input_ids"].shape[0]
        cache.batch_repeat_interleave(n_suffixes)
        mask = torch.cat([head_mask.repeat_interleave(n_suffixes, 0), suffix["attention_mask"].repeat(n_heads, 1)], dim=1)
        ids = suffix["input_ids"].repeat(n_heads, 1)
        logits_BV = self.lm(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True,
                            position_ids=_positions(mask)[:, -ids.shape[1]:], logits_to_keep=1).logits[:, -1].float()
        yes_B = torch.logsumexp(logits_BV[:, self._yes_ids], dim=-1)  # not [B, T, V]: a 151k vocabulary
        no_B = torch.logsumexp(logits_BV[:, self._no_ids], dim=-1)
        return torch.sigmoid(yes_B - no_B)


def length_groups(lengths: Sequence[int], max_padding: float = 0.25) -> list[list[int]]:
    """Indices of `lengths` grouped by length (shortest first) so that padding each group to its longest adds at
    most `max_padding` of its real tokens."""
    groups: list[list[int]] = []
    total = 0
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if groups and (len(groups[-1]) + 1) * lengths[i] <= (1 + max_padding) * (total + lengths[i]):
            groups[-1].append(i)
            total += lengths[i]
        else:
            groups.append([i])
            total = lengths[i]
    return groups


def _positions(mask_BT: torch.Tensor) -> torch.Tensor:
    """Position ids that skip the padding of a (left- or middle-) padded attention mask."""
    return (mask_BT.cumsum(1) - 1).clamp(min=0)


def judge_pairs(simulator: Simulator, labels: Sequence[str], contexts: Sequence[str],
                task: Task = "detection") -> list[list[float]]:
    """P(yes) of every (label, context) pair: one `judge_many` call where the simulator shares work across labels."""
    many = getattr(simulator, "judge_many", None)
    return many(labels, contexts, task) if many else [simulator.judge(label, contexts, task) for label in labels]


# -- OpenAI-compatible endpoint -------------------------------------------------------------------
class OpenAILabeler:
    """Any OpenAI-compatible /chat/completions endpoint, through the `openai` client (timeouts, retries with backoff)."""

    name = "openai"

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 60.0,
                 batch_size: int = 8, examples: int = 8, max_retries: int = 3, concurrency: int = 4,
                 prompt: str = PROMPT_VERSION):
        from openai import OpenAI

        self.base_url = base_url.rstrip("/")
        self.endpoint = self.base_url + "/chat/completions"
        self.model_id = model
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.batch_size = batch_size
        self.examples = examples
        self.concurrency = concurrency
        self.prompt_version = prompt
        self.judge_mode = "logprobs"
        # the key lives in this process only (never in a config, label record or log line); the client retries
        # connection errors, 408/409/429 and 5xx with exponential backoff, honouring Retry-After
        for name in ("openai", "httpx", "httpx2", "httpcore"):  # their debug lines carry request options
            logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger(name).level))
        self._client = OpenAI(base_url=self.base_url, api_key=self._api_key(), timeout=timeout_s, max_retries=max_retries)

    def _api_key(self) -> str:
        key = os.environ.get(self.api_key_env, "")
        if not key:
            raise ConfigError(
                f"--api-key-env: the environment variable {self.api_key_env} is not set (or empty); "
                f"export it with the API key for {self.endpoint}"
            )
        return key

    def _create(self, user: str, **options):
        """One chat completion (temperature 0) of `user`, its failures turned into one clear ConfigError line."""
        import openai

        try:
            return self._client.chat.completions.create(
                model=self.model_id, temperature=0, messages=[{"role": "user", "content": user}], **options)
        except openai.APITimeoutError as e:
            raise ConfigError(f"{self.endpoint}: no answer within --timeout-s {self.timeout_s}") from e
        except openai.APIConnectionError as e:
            raise ConfigError(f"{self.endpoint}: cannot reach the endpoint ({e.__cause__ or e}); check --openai-base-url") from e
        except openai.APIStatusError as e:
            raise ConfigError(f"{self.endpoint}: HTTP {e.status_code}: {str(e)[:300]}") from e
        except openai.APIResponseValidationError as e:
            raise ConfigError(f"{self.endpoint}: the answer is not a chat completion ({e})") from e

    def chat(self, user: str, max_tokens: int = 256) -> str:
        response = self._create(user, max_tokens=max_tokens)
        try:
            return response.choices[0].message.content or ""
        except (AttributeError, IndexError, TypeError) as e:
            raise ConfigError(f"{self.endpoint}: unexpected answer shape (no choices[0].message.content)") from e

    def label(self, batch: Sequence[FeatureEvidence]) -> list[str]:
        labels: list[str] = []
        for i in range(0, len(batch), self.batch_size):
            labels += self._label_batch(batch[i:i + self.batch_size])
        return [finish_label(label, ev, self.examples, self.prompt_version) for label, ev in zip(labels, batch)]

    def _label_batch(self, batch: Sequence[FeatureEvidence]) -> list[str]:
        if len(batch) == 1:
            return [clean_label(self.chat(_label_prompt(batch[0], self.examples, self.prompt_version), max_tokens=40))]
        sections = [f"### Feature {i}\n{_label_prompt(ev, self.examples, self.prompt_version)}" for i, ev in enumerate(batch, 1)]
        user = ("Label each feature below.\n\n" + "\n\n".join(sections) +
                f"\n\nReply with only a JSON object mapping each feature number (1 to {len(batch)}) to its label.")
        answer = _parse_json(self.chat(user, max_tokens=40 * len(batch)), dict) or {}
        labels = []
        for i, ev in enumerate(batch, 1):
            label = clean_label(str(answer.get(str(i), answer.get(i, ""))))
            if not label:  # the batch answer missed this one: ask for it alone
                log.info("feature %d missing from the batched answer; asking for it alone", ev.feature)
                label = self._label_batch([ev])[0]
            labels.append(label)
        return labels

    def judge(self, label: str, contexts: Sequence[str], task: Task = "detection") -> list[float]:
        """P(yes) of each context, from the log-probabilities of the first answer token to the local simulator's
        prompt, one request per context (`concurrency` in flight). A server that returns no log-probabilities is
        asked once for a JSON list of probabilities instead (`judge_mode` then says "json-list")."""
        if self.judge_mode == "logprobs":
            with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(contexts)))) as pool:
                probs = list(pool.map(lambda c: self._p_yes(_judge_prompt(label, c, task)), contexts))
            if all(p is not None for p in probs):
                return probs
            log.warning("%s returns no log-probabilities; the simulator asks for a JSON list of probabilities instead "
                        "(a generated list is coarser and can miss texts)", self.endpoint)
            self.judge_mode = "json-list"
        return self._judge_by_list(label, contexts, task)

    def _p_yes(self, prompt: str) -> float | None:
        """P(yes | yes or no) of the answer's first token over its `TOP_LOGPROBS` most likely spellings; None when
        the server gives no log-probabilities, 0.5 when neither a yes nor a no spelling is among them."""
        choice = self._create(prompt, max_tokens=1, logprobs=True, top_logprobs=TOP_LOGPROBS).choices[0]
        first = (getattr(choice.logprobs, "content", None) or [None])[0]
        if first is None or not first.top_logprobs:
            return None
        mass = {"yes": 0.0, "no": 0.0}
        for top in first.top_logprobs:
            word = top.token.strip().lower()
            if word in mass:
                mass[word] += math.exp(top.logprob)
        if mass["yes"] + mass["no"] == 0.0:
            log.info("simulator: no yes/no spelling among the top %d first tokens (%r); P(yes) = 0.5",
                     TOP_LOGPROBS, [t.token for t in first.top_logprobs[:5]])
            return 0.5
        return mass["yes"] / (mass["yes"] + mass["no"])

    def _judge_by_list(self, label: str, contexts: Sequence[str], task: Task) -> list[float]:
        question = ("Does the feature fire anywhere in the text?" if task == "detection"
                    else "Are the tokens marked <<like this>> exactly where the feature fires?")
        numbered = "\n".join(f"{i}. {_one_line(c)}" for i, c in enumerate(contexts, 1))
        user = (f"A feature of a language model is described as: {label}\n{question}\n\n{numbered}\n\n"
                f"Reply with only a JSON list of {len(contexts)} numbers, one per text in order: "
                "the probability (0 to 1) that the answer is yes.")
        values = _parse_json(self.chat(user, max_tokens=8 * len(contexts) + 16), list)
        if values is None or len(values) != len(contexts):
            log.warning("simulator answer for %r had %s values for %d texts; missing ones count as 0.5",
                        label, "no" if values is None else len(values), len(contexts))
            values = list(values or [])[:len(contexts)]
            values += [0.5] * (len(contexts) - len(values))
        return [_as_probability(v) for v in values]


def _parse_json(text: str, kind: type):
    """The first JSON value of type `kind` in `text` (tolerating code fences and prose around it)."""
    opener = "{" if kind is dict else "["
    for start in (m.start() for m in re.finditer(re.escape(opener), text)):
        try:
            value, _ = json.JSONDecoder().raw_decode(text[start:])
        except json.JSONDecodeError:
            continue
        if isinstance(value, kind):
            return value
    return None


def _as_probability(v) -> float:
    if isinstance(v, str):
        v = {"yes": 1.0, "no": 0.0, "true": 1.0, "false": 0.0}.get(v.strip().lower(), v)
    try:
        return min(1.0, max(0.0, float(v)))
    except (TypeError, ValueError):
        return 0.5
