"""`GenerationEnv`: the decoder writes the answer to a task prompt, on policy.

An episode is one task prompt ("Question: …\\nAnswer:") of `--tasks`, which takes any suite spec
`corpus.tasks.load_suite` accepts. Each step the decoder's token is appended, the frozen model
advances one token with its KV cache, and the next observation is the SAE features at the new
position (and the C before it). The episode ends at EOS, at the answer delimiter (a newline), or
after `max_new_tokens`; the answer is then checked (exact match after normalisation, against any
of the example's references) and r_task = 1 is paid on the final step if it is right. r_faith uses
the frozen model's exact next-token distribution at every step.

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
from corpus.tasks import task_stream
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
        K, C = self.width, cfg.context
        self.feat_idx = np.zeros((n, C + 1, K), dtype=np.int64)
        self.feat_val = np.zeros((n, C + 1, K), dtype=np.float32)

    def reseed(self, seed: int) -> None:
        super().reseed(seed)
        self.tasks = _tasks(self.cfg.tasks, seed)

    # -- frozen-model calls ------------------------------------------------------------------
    @torch.inference_mode()
    def _prefill(self, row: int, ids: list[int]) -> None:
        with self.frozen.hooks(read=[self.cfg.layer]) as store:
            out = self.frozen.model(input_ids=torch.tensor([ids], device=self.frozen.device), use_cache=True)
        self.kv[row] = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        self.length[row] = len(ids)
        self.logp[row] = out.logits[0, -1].float().log_softmax(-1)
        idx, val = self.encode(store[self.cfg.layer][0, -(self.cfg.context + 1):])
        C1 = self.cfg.context + 1
        self.feat_idx[row], self.feat_val[row] = 0, 0.0
        self.feat_idx[row, C1 - len(idx):], self.feat_val[row, C1 - len(idx):] = idx, val

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
            self.feat_idx[r] = np.roll(self.feat_idx[r], -1, axis=0)
            self.feat_val[r] = np.roll(self.feat_val[r], -1, axis=0)
            self.feat_idx[r, -1], self.feat_val[r, -1] = idx[i], val[i]

    # -- the batched protocol -------------------------------------------------------------------
    def reset_rows(self, rows: np.ndarray) -> dict:
        for r in rows:
            ex = next(self.tasks)
            self.examples[r] = ex
            self.generated[r] = []
            prompt = self.tok(ex.prompt_text(), add_special_tokens=False)["input_ids"]
            self._prefill(int(r), [self.frozen.bos_token_id, *prompt])
        return self._obs()

    def _obs(self) -> dict:
        return {"indices": self.feat_idx.copy(), "values": self.feat_val.copy()}

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
                ends[i] = True
                task[i] = float(is_correct(text.split("\n")[0], self.examples[r].references))
                truncated[r] = len(self.generated[r]) >= self.cfg.max_new_tokens and "\n" not in text \
                    and int(a[i]) != self.frozen.eos_token_id
                terminated[r] = not truncated[r]
        r_live, parts = self.reward(a, logp, self.feat_idx[live, -1], self.feat_val[live, -1], task)
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
