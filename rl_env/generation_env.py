"""`GenerationEnv`: the decoder writes the answer to a task prompt, on policy.

An episode is one task prompt of `--tasks` (any suite spec `corpus.tasks.load_suite` accepts), in the
instruct model's chat template (`--prompt-format auto`, as `faithlens eval` uses) or bare
("Question: …\\nAnswer:"). Each step the decoder's token is appended, the frozen model advances one
token with its KV cache, and the next observation is the SAE features at the new position: for a
context decoder the whole episode from BOS (rows 0..t filled, the rest zero padding, `length` =
t + 1; prompts too long for `context` + 1 rows with `max_new_tokens` after them are skipped, and
counted), for a per-position decoder the new position only. The episode ends at EOS, at the answer
delimiter (a newline), or after `max_new_tokens`; the answer is then checked (exact match after
normalisation, against any of the example's references) and r_task = 1 is paid on that final step if
it is right. Every end is the task's end, so the episode is terminated, never truncated (nothing
follows to bootstrap from). r_faith uses the frozen model's exact next-token distribution at every
step, and its top `anchor_k` tokens + rest mass go to the learner's anchor with each observation.

Natively batched: every step is one frozen-model call for all sub-environments. Each row keeps
its own KV cache; for the call they are left-padded into one batch (attention mask + explicit
position ids), and split back afterwards. A row that starts a new episode is prefilled alone.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from corpus.answers import is_correct
from corpus.tasks import prompt_token_ids, task_stream
from models.errors import ConfigError
from rl_env.base import BatchedVectorEnv, Engine, SingleEnv
from rl_env.config import EnvConfig


def _tasks(spec: str, seed: int):
    try:
        return task_stream(spec, seed)
    except ConfigError as e:
        raise ConfigError(f"--tasks: {e}") from None


class GenerationEngine(Engine):
    def __init__(self, cfg: EnvConfig, num_envs: int, frozen=None):
        super().__init__(cfg, num_envs, frozen)
        self.tasks = _tasks(cfg.tasks, cfg.seed)
        self.tok = self.frozen.tokenizer
        n = num_envs
        self.examples: list = [None] * n
        self.kv: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(n)]
        self.length = np.zeros(n, dtype=np.int64)  # tokens in each row's cache
        self.generated: list[list[int]] = [[] for _ in range(n)]
        self.logp: torch.Tensor = torch.zeros(n, self.vocab)  # frozen next-token log-probs at each row's last position
        K, R = self.width, self.rows
        self.feat_idx = np.zeros((n, R, K), dtype=np.int32)  # row i: position i (context) or the last position
        self.feat_val = np.zeros((n, R, K), dtype=np.float32)
        self.sequence = np.zeros(n, dtype=np.int64)
        self._first_id = int(np.random.default_rng().integers(1 << 40)) << 20  # episode ids unique across env runners
        self._episodes = self._first_id
        self.skipped_prompts = 0

    @property
    def rows(self) -> int:
        return self.observation_rows()

    @property
    def from_bos(self) -> bool:
        return self.cfg.context > 0

    def _put(self, row: int, at: int, idx: np.ndarray, val: np.ndarray) -> None:
        """Features of positions at..at+len−1 into `row` (a per-position decoder keeps the last one only)."""
        if not self.from_bos:
            self.feat_idx[row, 0], self.feat_val[row, 0] = idx[-1], val[-1]
            return
        self.feat_idx[row, at : at + len(idx)], self.feat_val[row, at : at + len(idx)] = idx, val

    def reseed(self, seed: int) -> None:
        super().reseed(seed)
        self.tasks = _tasks(self.cfg.tasks, seed)
        self._episodes = self._first_id  # the same seed gives the same observations

    # -- frozen-model calls ------------------------------------------------------------------
    @torch.inference_mode()
    def _prefill(self, row: int, ids: list[int]) -> None:
        with self.frozen.hooks(read=[self.cfg.layer]) as store:
            out = self.frozen.model(input_ids=torch.tensor([ids], device=self.frozen.device), use_cache=True)
        self.kv[row] = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        self.length[row] = len(ids)
        self.logp[row] = out.logits[0, -1].float().log_softmax(-1)
        idx, val = self.encode(store[self.cfg.layer][0, -self.rows:])
        self.feat_idx[row], self.feat_val[row] = 0, 0.0
        self._put(row, 0, idx, val)

    @torch.inference_mode()
    def _advance(self, rows: np.ndarray, tokens: np.ndarray) -> None:
        """One batched forward: each row in `rows` appends its token to its own cache."""
        S = int(self.length[rows].max())
        layers = []
        for li in range(len(self.kv[rows[0]])):
            keys = [F.pad(self.kv[r][li][0], (0, 0, S - self.length[r], 0)) for r in rows]
            values = [F.pad(self.kv[r][li][1], (0, 0, S - self.length[r], 0)) for r in rows]
            layers.append((torch.cat(keys), torch.cat(values)))
        mask = torch.zeros(len(rows), S + 1, dtype=torch.long)
        for i, r in enumerate(rows):
            mask[i, S - self.length[r]:] = 1
        device = self.frozen.device
        with self.frozen.hooks(read=[self.cfg.layer]) as store:
            out = self.frozen.model(input_ids=torch.as_tensor(tokens, device=device)[:, None],
                                    past_key_values=DynamicCache(ddp_cache_data=layers), attention_mask=mask.to(device),
                                    position_ids=torch.as_tensor(self.length[rows], device=device)[:, None], use_cache=True)
        new = out.past_key_values.layers
        idx, val = self.encode(store[self.cfg.layer][:, -1])
        for i, r in enumerate(rows):
            pad = S - self.length[r]
            self.kv[r] = [(layer.keys[i : i + 1, :, pad:], layer.values[i : i + 1, :, pad:]) for layer in new]
            self.length[r] += 1
            self.logp[r] = out.logits[i, -1].float().log_softmax(-1)
            self._put(r, int(self.length[r]) - 1, idx[i : i + 1], val[i : i + 1])

    # -- the batched protocol -------------------------------------------------------------------
    def reset_rows(self, rows: np.ndarray) -> dict:
        for r in rows:
            ex, prompt = self._next_prompt()
            self.examples[r] = ex
            self.generated[r] = []
            self.sequence[r] = self._episodes
            self._episodes += 1
            self._prefill(int(r), prompt)
        return self._obs()

    def _next_prompt(self, tries: int = 1000):
        """The next task whose prompt and longest answer fit the observation (a context decoder's rows)."""
        for _ in range(tries):
            ex = next(self.tasks)
            prompt = prompt_token_ids(ex, self.tok, self.cfg.prompt_format, self.frozen.bos_token_id)
            if not self.from_bos or len(prompt) + self.cfg.max_new_tokens <= self.rows:
                return ex, prompt
            self.skipped_prompts += 1
        raise ConfigError(f"--context {self.cfg.context}: no prompt of --tasks {self.cfg.tasks} in {tries} fits "
                          f"{self.rows} positions with --max-new-tokens {self.cfg.max_new_tokens} after it")

    def _obs(self) -> dict:
        if not self.from_bos:
            return {"indices": self.feat_idx.copy(), "values": self.feat_val.copy(),
                    "length": np.ones(self.num_envs, np.int64), "sequence": self.sequence.copy()}
        return {"indices": self.feat_idx.copy(), "values": self.feat_val.copy(), "length": self.length.copy(),
                "sequence": self.sequence.copy()}

    def teacher_targets(self) -> dict:
        logp, ids = self.logp.topk(self.cfg.anchor_k, dim=-1)
        rest = self.logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
        return {"teacher_ids": ids.numpy().astype(np.int32), "teacher_logp": logp.numpy(), "teacher_rest": rest.numpy()}

    def step(self, actions: np.ndarray, skip: np.ndarray | None = None):
        live = np.flatnonzero(~skip) if skip is not None else np.arange(self.num_envs)
        rewards = np.zeros(self.num_envs, np.float32)
        terminated = np.zeros(self.num_envs, bool)
        truncated = np.zeros(self.num_envs, bool)
        info: dict = {}
        if not len(live):
            return self._obs(), rewards, terminated, truncated, info
        a = actions[live]
        logp = self.logp[live].gather(1, torch.as_tensor(a)[:, None]).squeeze(1)
        task = np.zeros(len(live), np.float32)
        ends = np.zeros(len(live), bool)
        for i, r in enumerate(live):
            self.generated[r].append(int(a[i]))
            text = self.tok.decode(self.generated[r], skip_special_tokens=True)
            if int(a[i]) == self.frozen.eos_token_id or "\n" in text or len(self.generated[r]) >= self.cfg.max_new_tokens:
                ends[i] = terminated[r] = True
                task[i] = float(is_correct(text.split("\n")[0], self.examples[r].references))
        last = self.length[live] - 1 if self.from_bos else np.zeros(len(live), np.int64)
        r_live, parts = self.reward(a, logp, self.feat_idx[live, last], self.feat_val[live, last], task)
        rewards[live] = r_live
        info = {k: np.zeros(self.num_envs, np.float32) for k in parts}
        for k, v in parts.items():
            info[k][live] = v
        continuing = live[~ends]
        if len(continuing):
            self._advance(continuing, actions[continuing])
        return self._obs(), rewards, terminated, truncated, info


def make_generation_env(cfg: EnvConfig, frozen=None) -> SingleEnv:
    return SingleEnv(GenerationEngine(cfg, 1, frozen))


def make_generation_vec_env(cfg: EnvConfig, num_envs: int, frozen=None) -> BatchedVectorEnv:
    return BatchedVectorEnv(GenerationEngine(cfg, num_envs, frozen))


GenerationEnv = make_generation_env
