"""The RLlib policy: a `TorchRLModule` + `ValueFunctionAPI` wrapping a decoder checkpoint.

- Observations are the environments' fixed-width sparse features, {"indices", "values"} of shape
  [B, R, K], with `length` (rows 0..length−1 are filled, the rest is padding) and `sequence` (steps
  with the same id are prefixes of one sequence); the policy's logits are the decoder's at row
  length − 1 (a context decoder reads the rows before it, from BOS).
- In training, steps of one sequence share one forward: the decoder runs each sequence's longest
  prefix in the batch once and every step reads its own row (causal attention makes this exact).
- Sampling with a context decoder is incremental: consecutive steps of a sequence (same `sequence`, length
  + 1) run only the new position against every block's cached keys and values (`KVCache`); any other batch,
  or weights changed since the cache was filled (a parameter's version counter moved), runs the full
  prefix and refills the cache. The result equals the full forward up to bf16 rounding.
- Sampling returns only the action and its log-prob: with ~49k actions, the full logits stored per
  step would cost 192 KiB each (RLlib keeps every module output in the episode). The learner
  recomputes the logits from the observation (see rl_env/ppo.py's slim PPO learner).
- The value head is separate and small (its own feature-embedding table → MLP), so value targets
  never run the 49k-wide policy head and value gradients never reach the decoder.
- `export` writes the decoder back in the plain checkpoint format every later stage reads.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis import ValueFunctionAPI
from ray.rllib.core.rl_module.torch import TorchRLModule
from ray.rllib.utils.annotations import override
from torch import nn

from models.config import ModelConfig
from models.decoder import load_decoder
from models.decoder_context import KVCache
from models.head import FrozenHead
from models.loading import load_frozen

VALUE_DIM = 64


class DecoderPolicy(TorchRLModule, ValueFunctionAPI):
    """model_config: {"decoder": DIR, "model": frozen model, "dtype": "auto"}."""

    @override(TorchRLModule)
    def setup(self):
        mc = self.model_config
        frozen = load_frozen(ModelConfig(model=mc["model"], dtype=mc.get("dtype", "auto")))
        self.decoder = load_decoder(Path(mc["decoder"]), FrozenHead.from_frozen(frozen))
        self.decoder.train()
        self.decoder_meta = dict(self.decoder.meta)
        num_latents = self.decoder.cfg.num_latents
        self.value_embed = nn.Parameter(torch.randn(num_latents, VALUE_DIM) * 0.01)
        self.value_mlp = nn.Sequential(nn.Linear(VALUE_DIM, VALUE_DIM), nn.Tanh(), nn.Linear(VALUE_DIM, 1))
        self._kv: dict = {}  # the sampling cache: KVCache, sequence ids and lengths it covers, weights version

    # -- the policy ------------------------------------------------------------------------
    def logits(self, obs: dict) -> torch.Tensor:
        return self.decoder.last_logits(obs["indices"].long(), obs["values"].float(), obs["length"].long())

    def train_logits(self, obs: dict) -> torch.Tensor:
        """The same logits, running each sequence once: its longest prefix in the batch, read at every step's row."""
        if not self.decoder.needs_context:
            return self.logits(obs)
        length = obs["length"].long()
        device = length.device
        _, group = torch.unique(obs["sequence"], return_inverse=True)
        longest = torch.full((int(group.max()) + 1,), -1, dtype=torch.long, device=device).scatter_reduce(
            0, group, length, "amax")
        order = torch.arange(len(length), device=device)
        # for each sequence, one step with its longest prefix; all R rows are run, as in sampling, so that
        # reduced-precision kernels see the same shapes and the PPO ratio starts at 1
        representative = torch.full_like(longest, -1).scatter_reduce(0, group, torch.where(length == longest[group], order, -1),
                                                                     "amax")
        hidden = self.decoder.hidden(obs["indices"][representative].long(), obs["values"][representative].float())
        return self.decoder.readout(hidden[group, length - 1])

    @torch.no_grad()
    def sample_logits(self, obs: dict) -> torch.Tensor:
        """`logits` for sampling: a context decoder steps from its key/value cache when every row is its cached
        sequence one position on, else runs the full prefixes and refills the cache."""
        if not hasattr(self.decoder, "hidden_step"):
            return self.logits(obs)
        length, sequence = obs["length"].long(), obs["sequence"].long()
        version = sum(p._version for p in self.decoder.parameters())
        kv = self._kv
        steps = (kv.get("version") == version and kv["sequence"].shape == sequence.shape
                 and bool((kv["sequence"] == sequence).all()) and bool((kv["length"] + 1 == length).all()))
        rows = torch.arange(len(length), device=length.device)
        if steps:
            last = length - 1
            hidden = self.decoder.hidden_step(obs["indices"][rows, last].long(), obs["values"][rows, last].float(), last,
                                              kv["cache"])
        else:
            cache = KVCache(obs["indices"].shape[1])
            T = int(length.max())
            hidden = self.decoder.hidden(obs["indices"][:, :T].long(), obs["values"][:, :T].float(), kv=cache)[rows, length - 1]
            self._kv = {"cache": cache, "version": version, "sequence": sequence.clone()}
        self._kv["length"] = length.clone()
        return self.decoder.readout(hidden)

    @override(TorchRLModule)
    def _forward_inference(self, batch, **kwargs):
        with torch.no_grad():
            return {Columns.ACTION_DIST_INPUTS: self.sample_logits(batch[Columns.OBS])}

    @override(TorchRLModule)
    def _forward_exploration(self, batch, **kwargs):
        with torch.no_grad():
            dist = torch.distributions.Categorical(logits=self.sample_logits(batch[Columns.OBS]))
            actions = dist.sample()
            return {Columns.ACTIONS: actions, Columns.ACTION_LOGP: dist.log_prob(actions)}

    @override(TorchRLModule)
    def _forward_train(self, batch, **kwargs):
        obs = batch[Columns.OBS]
        return {Columns.ACTION_DIST_INPUTS: self.train_logits(obs), Columns.EMBEDDINGS: self._value_features(obs)}

    # -- the value function ----------------------------------------------------------------
    def _value_features(self, obs: dict) -> torch.Tensor:
        """The value head reads the features of the step's own position (row length − 1)."""
        last = obs["length"].long() - 1
        rows = torch.arange(len(last), device=last.device)
        return F.embedding_bag(obs["indices"][rows, last].long(), self.value_embed,
                               per_sample_weights=obs["values"][rows, last].float(), mode="sum")

    @override(ValueFunctionAPI)
    def compute_values(self, batch, embeddings=None):
        if embeddings is None:
            embeddings = self._value_features(batch[Columns.OBS])
        return self.value_mlp(embeddings).squeeze(-1)

    # -- export ----------------------------------------------------------------------------
    def export(self, directory: Path, extra: dict | None = None) -> None:
        self.decoder.save(Path(directory), extra={**self.decoder_meta, **(extra or {})})
