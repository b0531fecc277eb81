"""The RLlib policy: a `TorchRLModule` + `ValueFunctionAPI` wrapping a decoder checkpoint.

- Observations are the environments' fixed-width sparse features, {"indices", "values"} of shape
  [B, C+1, K] (positions t−C..t); the policy's logits are the decoder's at the last one (a context
  decoder reads them all).
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

    # -- the policy ------------------------------------------------------------------------
    def logits(self, obs: dict) -> torch.Tensor:
        return self.decoder.last_logits(obs["indices"].long(), obs["values"].float())

    @override(TorchRLModule)
    def _forward_inference(self, batch, **kwargs):
        with torch.no_grad():
            return {Columns.ACTION_DIST_INPUTS: self.logits(batch[Columns.OBS])}

    @override(TorchRLModule)
    def _forward_exploration(self, batch, **kwargs):
        with torch.no_grad():
            dist = torch.distributions.Categorical(logits=self.logits(batch[Columns.OBS]))
            actions = dist.sample()
            return {Columns.ACTIONS: actions, Columns.ACTION_LOGP: dist.log_prob(actions)}

    @override(TorchRLModule)
    def _forward_train(self, batch, **kwargs):
        obs = batch[Columns.OBS]
        return {Columns.ACTION_DIST_INPUTS: self.logits(obs), Columns.EMBEDDINGS: self._value_features(obs)}

    # -- the value function ----------------------------------------------------------------
    def _value_features(self, obs: dict) -> torch.Tensor:
        return F.embedding_bag(obs["indices"][:, -1].long(), self.value_embed,
                               per_sample_weights=obs["values"][:, -1].float(), mode="sum")

    @override(ValueFunctionAPI)
    def compute_values(self, batch, embeddings=None):
        if embeddings is None:
            embeddings = self._value_features(batch[Columns.OBS])
        return self.value_mlp(embeddings).squeeze(-1)

    # -- export ----------------------------------------------------------------------------
    def export(self, directory: Path, extra: dict | None = None) -> None:
        self.decoder.save(Path(directory), extra={**self.decoder_meta, **(extra or {})})
