"""Environment settings (the `env_config` RLlib hands to every environment) and reward settings."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Literal

from models.config import ModelConfig
from models.errors import ConfigError
from rl_env.reward import DEFAULT_PHASES, parse_phases


@dataclass
class RewardConfig:
    phases: str = DEFAULT_PHASES
    """(α, β, γ) phases as RATIO:ALPHA/BETA/GAMMA, step counts in proportion to the ratios (default: the
    design's 0.5/0.3/0.2 → 0.4/0.3/0.3 → 0.3/0.2/0.5 in the ratio 2:6:2)."""

    top_m: int = 5
    """r_mono: the share of positive direct attribution carried by this many top features."""

    reference: Literal["data", "frozen"] = "data"
    """r_task in the token environment: match the data's next token, or the frozen model's argmax."""

    dynamic: bool = True
    """The design's dynamic adjustment: lower α once held-out KL < kl_target; raise β while explanations
    need more than max_features features for half of the chosen token's positive attribution."""

    kl_target: float = 0.5
    """Held-out KL (nats/token) below which α is lowered (×0.5)."""

    max_features: float = 20.0
    """Mean features needed for half the attribution above which β is raised (×1.25 per check, at most ×4)."""

    random_reward: bool = False
    """Replace every reward by N(0, 1) noise (the baseline that shows the reward means something). The entropy reward
    and the attribution-share term are part of the objective and go with it; the forward-KL anchor is the learner's
    regulariser and stays, so the twin differs from its run in the reward alone."""

    anchor_kl: str = "0"
    """λ of the forward-KL anchor λ·KL(p_frozen ‖ π) in the PPO loss, over every position of the train batch:
    one value, or one per phase separated by commas (e.g. '0.5,1,1'). 0 = off."""

    entropy_reward: float = 0.0
    """c: add −c·α·log π(a) to every step's reward, α the step's faithfulness weight (the design's entropy bonus
    in reward units; c = 1 makes α·r_faith's expectation −α·KL(π ‖ p_frozen), whose optimum is π = p_frozen). 0 = off."""

    attribution_share: float = 0.0
    """μ: the learner adds −μ·β_t·share to the PPO loss, share = the top-`share_top` share of |attribution| of
    the policy's own prediction (gradient × activation of log π(argmax) over every feature it reads, summed per
    feature: the quantity evaluation reports as top-10 share), differentiated through the decoder. r_mono
    depends on the frozen features and the action only; this term reaches the decoder's weights. 0 = off."""

    share_top: int = 10
    """Features whose attribution counts as explained in the learner's share term (the design's top-10)."""

    share_rows: int = 8
    """Train-batch steps per minibatch on which the learner's share term is computed (each costs a forward and a
    double backward through the decoder)."""

    def __post_init__(self) -> None:
        anchor_weights(self.anchor_kl, len(parse_phases(self.phases)))
        if self.attribution_share < 0:
            raise ConfigError(f"--attribution-share: expected μ >= 0, got {self.attribution_share}")
        if self.share_top < 1 or self.share_rows < 1:
            raise ConfigError(f"--share-top and --share-rows: expected at least 1, got {self.share_top}, {self.share_rows}")
        if self.top_m < 1:
            raise ConfigError(f"--top-m: expected at least 1, got {self.top_m}")
        if self.entropy_reward < 0:
            raise ConfigError(f"--entropy-reward: expected c >= 0, got {self.entropy_reward}")


def anchor_weights(text: str, n_phases: int) -> list[float]:
    """--anchor-kl 'L' or 'L1,L2,...' (one per phase) → λ per phase."""
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 0 or len(values) not in (1, n_phases):
        raise ConfigError(f"--anchor-kl: expected one λ >= 0 or {n_phases} comma-separated (one per phase), got {text!r}")
    return values * n_phases if len(values) == 1 else values


@dataclass
class EnvConfig(RewardConfig, ModelConfig):
    """Everything an environment needs; plain values only, so it travels as RLlib's env_config."""

    env: Literal["token", "generation"] = "token"
    """token: teacher-forced windows of cached text; generation: the decoder writes answers to task prompts."""

    model: str = ""
    """Frozen model (default: the decoder's): a hub id, a local dir or embedded:smollm2-135m-instruct."""

    layer: int = 9
    sae: str = ""
    """SAE folder whose features the policy reads."""

    cache: str = ""
    """token: activation cache with teacher targets at the layer."""

    window: int = 0
    """token: positions per episode (0: 16 for a per-position decoder, 64 for a context decoder). A per-position
    decoder's window starts anywhere in a sequence; a context decoder's episode is positions 1..window of a
    sequence, each observation holding positions 0..t (from BOS)."""

    context: int = 0
    """Positions before t in each observation (0 for per-position decoders; a context decoder's observation
    rows: the token env's window, the generation env's longest prompt + answer, from BOS)."""

    width: int = 0
    """Feature slots per position in observations (0 = the SAE's sparse width)."""

    tasks: str = "builtin:tasks"
    """generation: task prompts, any task-suite spec (builtin:tasks[:SUITE], gsm8k[:PATH], boolq, squad, hf:NAME, a .jsonl file)."""

    max_new_tokens: int = 8
    """generation: tokens the decoder may write before the episode ends."""

    prompt_format: Literal["auto", "chat", "bare"] = "auto"
    """generation: chat = the tokenizer's chat template (the instruct model's own format); bare = "Question: …
    Answer:"; auto = chat when the tokenizer has a template."""

    anchor_k: int = 256
    """generation: the frozen model's top tokens (+ one bin for the rest) sent with each observation for the
    anchor (the token env sends its cache's top-k)."""

    total_steps: int = 10_000
    """Env steps of the whole run (sets the phase boundaries)."""

    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.anchor_k < 1:
            raise ConfigError(f"--anchor-k: expected at least 1, got {self.anchor_k}")
        if self.window < 0 or self.context < 0:
            raise ConfigError(f"--window and --context must be >= 0 (got {self.window}, {self.context})")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EnvConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
