"""PPO's clipped-surrogate loss without the rollout's full action distribution, the design's entropy
bonus in reward units, and the forward-KL anchor.

RLlib's stock PPO learner reads the sampled steps' `action_dist_inputs` (the full logits) even with
the KL penalty off; with ~49k actions those cost 192 KiB per step in every episode and batch. The
ratio only needs the sampled action's log-prob, which the policy returns at sampling time, so this
learner computes the same loss as the stock one (use_kl_loss=False) from `action_logp` alone.

Every observation's info carries the frozen model's distribution at its position (top-k ids and
log-probs + the log of the rest mass; 0.5 KiB per step at k = 64, never full-vocabulary logits) and
the weights of the step taken from it (`Engine.obs_info`). `TeacherColumns` moves them into the
train batch, where
- the entropy reward: with `learner_config_dict={"entropy_reward": c}`, −c·α_t·log π(a_t) is added to
  every step's reward before advantages are computed. With c = 1, α·r_faith plus it has expectation
  −α·KL(π ‖ p_frozen) whatever α the phase (and the dynamic ×0.5) set; RLlib's entropy coefficient
  acts on standardised advantages instead;
- the anchor: the loss gains λ_t·KL(p_frozen ‖ π) at every position of the batch (binned over the
  teacher's top k + one bin for the rest, `distill.loss.kl_topk`), λ_t the step's phase weight
  (`--anchor-kl`), logged as `anchor_kl` (its unweighted mean);
- the attribution-share term: with `learner_config_dict={"attribution_share": μ}`, the loss gains
  −μ·β_t·share on up to `share_rows` loss-masked steps of each minibatch (steps with β_t > 0), share = the
  top-`share_top` share of |attribution| of the policy's own prediction (`rl_env.reward.policy_top_share`),
  logged as `attribution_share` (its unweighted mean). r_mono cannot reach the decoder's weights; this can.
"""

from __future__ import annotations

import numpy as np
import torch
from ray.rllib.algorithms.ppo.ppo import (
    LEARNER_RESULTS_KL_KEY,
    LEARNER_RESULTS_VF_EXPLAINED_VAR_KEY,
    LEARNER_RESULTS_VF_LOSS_UNCLIPPED_KEY,
)
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.connectors.learner import AddColumnsFromEpisodesToTrainBatch, GeneralAdvantageEstimation
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.learner import ENTROPY_KEY, POLICY_LOSS_KEY, VF_LOSS_KEY
from ray.rllib.evaluation.postprocessing import Postprocessing
from ray.rllib.utils.annotations import override
from ray.rllib.utils.torch_utils import explained_variance

from distill.loss import kl_topk
from rl_env.reward import policy_top_share

TEACHER_COLUMNS = ("teacher_ids", "teacher_logp", "teacher_rest", "entropy_alpha", "anchor_lambda", "share_beta")
"""Info keys every environment sends with each observation (rl_env.base.Engine.obs_info)."""
ANCHOR_KL_KEY = "anchor_kl"
SHARE_KEY = "attribution_share"


class TeacherColumns(ConnectorV2):
    """The teacher targets and step weights of each observation's info, as batch columns (one row per step)."""

    def __call__(self, *, rl_module, batch, episodes, **kwargs):
        for episode in self.single_agent_episode_iterator(episodes, agents_that_stepped_only=False):
            n = len(episode)
            infos = episode.get_infos(slice(0, n))
            for key in TEACHER_COLUMNS:
                self.add_n_batch_items(batch, key, np.stack([np.asarray(info[key]) for info in infos]), num_items=n,
                                       single_agent_episode=episode)
        return batch


class EntropyReward(ConnectorV2):
    """reward ← reward − c·α_t·log π(a_t), per step, before GAE (nothing on the artificial bootstrap step)."""

    def __init__(self, coefficient: float, **kwargs):
        super().__init__(**kwargs)
        self.coefficient = coefficient

    def __call__(self, *, rl_module, batch, episodes, **kwargs):
        for module_batch in batch.values():
            if Columns.REWARDS in module_batch and Columns.ACTION_LOGP in module_batch:
                scale = self.coefficient * module_batch["entropy_alpha"]
                if Columns.LOSS_MASK in module_batch:  # the artificial bootstrap step earns nothing
                    scale = scale * module_batch[Columns.LOSS_MASK]
                module_batch[Columns.REWARDS] = module_batch[Columns.REWARDS] - scale * module_batch[Columns.ACTION_LOGP]
        return batch


class SlimPPOLearner(PPOTorchLearner):
    @override(PPOTorchLearner)
    def build(self) -> None:
        super().build()
        if self._learner_connector is None:
            return
        self._learner_connector.insert_before(AddColumnsFromEpisodesToTrainBatch, TeacherColumns())
        coefficient = float(self.config.learner_config_dict.get("entropy_reward", 0.0))
        if coefficient:
            self._learner_connector.insert_before(GeneralAdvantageEstimation, EntropyReward(coefficient))

    @override(PPOTorchLearner)
    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        if config.use_kl_loss:
            raise ValueError("SlimPPOLearner needs use_kl_loss=False (the rollout logits are not stored)")
        module = self.module[module_id].unwrapped()
        if Columns.LOSS_MASK in batch:
            mask = batch[Columns.LOSS_MASK]
            n = mask.sum().clamp_min(1)

            def mean(x):
                return x[mask].sum() / n
        else:
            mean = torch.mean
        dist = module.get_train_action_dist_cls().from_logits(fwd_out[Columns.ACTION_DIST_INPUTS])
        logp_ratio = torch.exp(dist.logp(batch[Columns.ACTIONS]) - batch[Columns.ACTION_LOGP])
        advantages = batch[Postprocessing.ADVANTAGES]
        surrogate = torch.min(advantages * logp_ratio,
                              advantages * torch.clamp(logp_ratio, 1 - config.clip_param, 1 + config.clip_param))
        values = module.compute_values(batch, embeddings=fwd_out.get(Columns.EMBEDDINGS))
        vf_loss = torch.pow(values - batch[Postprocessing.VALUE_TARGETS], 2.0)
        vf_loss_clipped = torch.clamp(vf_loss, 0, config.vf_clip_param)
        entropy = dist.entropy()
        entropy_coeff = self.entropy_coeff_schedulers_per_module[module_id].get_current_value()
        total = mean(-surrogate + config.vf_loss_coeff * vf_loss_clipped - entropy_coeff * entropy)
        lam = batch["anchor_lambda"].float()
        anchored = bool((lam > 0).any())  # with λ = 0 everywhere the anchor KL is only logged, without gradient
        logits = fwd_out[Columns.ACTION_DIST_INPUTS]
        anchor = kl_topk(batch["teacher_ids"], batch["teacher_logp"], batch["teacher_rest"],
                         logits if anchored else logits.detach())
        if anchored:
            total = total + mean(lam * anchor)
        share = self._share_term(module, batch)
        if share is not None:
            rows, share_R = share
            coefficient = float(self.config.learner_config_dict["attribution_share"])
            total = total - coefficient * (batch["share_beta"][rows].float() * share_R).mean()
            self.metrics.log_value((module_id, SHARE_KEY), share_R.detach().mean(), window=1)
        self.metrics.log_dict({
            ANCHOR_KL_KEY: mean(anchor.detach()),
            POLICY_LOSS_KEY: -mean(surrogate), VF_LOSS_KEY: mean(vf_loss_clipped),
            LEARNER_RESULTS_VF_LOSS_UNCLIPPED_KEY: mean(vf_loss),
            LEARNER_RESULTS_VF_EXPLAINED_VAR_KEY: explained_variance(batch[Postprocessing.VALUE_TARGETS], values),
            ENTROPY_KEY: mean(entropy), LEARNER_RESULTS_KL_KEY: torch.tensor(0.0),
        }, key=module_id, window=1)
        return total

    def _share_term(self, module, batch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows, the policy's top-m attribution share at each) on up to `share_rows` random steps with β > 0."""
        settings = self.config.learner_config_dict
        if not float(settings.get("attribution_share", 0.0)):
            return None
        eligible = batch["share_beta"] > 0
        if Columns.LOSS_MASK in batch:
            eligible = eligible & batch[Columns.LOSS_MASK].bool()
        candidates = torch.nonzero(eligible).flatten()
        if not len(candidates):
            return None
        n = min(int(settings.get("share_rows", 8)), len(candidates))
        rows = candidates[torch.randperm(len(candidates), device=candidates.device)[:n]]
        obs = batch[Columns.OBS]
        return rows, policy_top_share(module.decoder, obs["indices"][rows], obs["values"][rows], obs["length"][rows],
                                      int(settings.get("share_top", 10)))
