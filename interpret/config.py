"""Configs of the interpretation commands that the lead modules own: importance, evidence, clusters, explain.

(Labelling, scoring and review configs live in `interpret/label_config.py`.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro

from corpus.config import CorpusConfig, Split
from models.config import DEFAULT_MODEL, ModelConfig
from models.errors import ConfigError


@dataclass
class RunConfig(ModelConfig):
    run: tyro.conf.Positional[Path] = Path("runs/demo")
    """Run directory holding a decoder (RUN/decoder or decoder.json) and an SAE (RUN/sae or the one decoder.json records)."""

    def __post_init__(self):
        if not Path(self.run).is_dir():
            raise ConfigError(f"RUN: {self.run} is not a directory (expected a run folder holding a decoder)")


@dataclass
class ImportanceConfig(CorpusConfig, RunConfig):
    tokens: int = 16_384
    """Token positions whose predictions are attributed (rounded up to whole sequences)."""

    seq_len: int = 128
    """Tokens per sequence."""

    split: Split = "eval"
    """Which split of --data to read (held-out by default; all: the whole of --data)."""

    target: Literal["logprob", "logit", "kl"] = "logprob"
    """What is attributed: the log-prob (or logit) of the predicted token, or the KL to the frozen model."""

    spliced: bool = True
    """Also attribute through the SAE-spliced frozen model (the real computation, slower)."""

    spliced_tokens: int = 4_096
    """Token positions for the spliced attribution (a prefix of --tokens)."""

    validate_top: int = 50
    """Exact ablation of this many top features, to check attribution patching (rank correlation)."""

    validate_sequences: int = 8
    """Sequences in the ablation check."""

    share_targets: int = 128
    """Predictions whose per-token top-10 attribution share is measured one backward each (context decoders)."""

    batch_size: int = 8
    """Sequences per forward/backward pass."""

    def __post_init__(self):
        RunConfig.__post_init__(self)
        CorpusConfig.__post_init__(self)


@dataclass
class EvidenceConfig(CorpusConfig, RunConfig):
    tokens: int = 200_000
    """Token positions scanned for top-activating contexts and densities."""

    seq_len: int = 128
    """Tokens per sequence."""

    context: int = 16
    """Tokens shown on each side of an example's position."""

    top_examples: int = 20
    """Top-activating contexts kept per feature."""

    quantile_examples: int = 10
    """Contexts sampled across each feature's activation quantiles."""

    negative_examples: int = 20
    """Contexts where the feature never fires (for label scoring)."""

    reservoir: int = 256
    """Uniformly sampled activations kept per feature (quantile samples and histogram)."""

    promoted: int = 10
    """Most promoted / suppressed tokens per feature (direct effect through the readout)."""

    batch_size: int = 16
    """Sequences per forward pass."""

    def __post_init__(self):
        RunConfig.__post_init__(self)
        CorpusConfig.__post_init__(self)
        for flag, value in (("--context", self.context), ("--top-examples", self.top_examples),
                            ("--reservoir", self.reservoir)):
            if value < 1:
                raise ConfigError(f"{flag}: expected a positive number, got {value}")


@dataclass
class ClusterConfig(RunConfig):
    top: int = 0
    """Cluster only the N most important features (0 = every live feature with evidence)."""

    threshold: float = 0.6
    """Agglomerative clustering distance threshold on 1 − similarity (average linkage)."""

    coactivation_weight: float = 0.5
    """Similarity = (1 − w)·decoder-direction cosine + w·co-activation Jaccard."""

    min_size: int = 2
    """Clusters smaller than this are reported as singletons."""


@dataclass
class ExplainConfig(ModelConfig):
    text: tyro.conf.Positional[str] = ""
    """The input whose next token is explained."""

    run: Path = Path("runs/demo")
    """Run directory (decoder + SAE, and labels/evidence if made)."""

    html: Path | None = None
    """Also write a self-contained HTML dashboard here."""

    json: bool = False
    """Print the explanation as one JSON object instead of the terminal dashboard."""

    top: int = 10
    """Features named by the explanation (kept for sufficiency, ablated for comprehensiveness)."""

    chat: bool = False
    """Wrap the text in the model's chat template (as a user turn) before explaining."""

    llm: bool = False
    """Method 3: have an LLM word the ranked features as one or two sentences."""

    llm_backend: Literal["local", "openai"] = "local"
    """Which LLM words it: the local instruct model (default: the run's own frozen model) or an OpenAI-compatible endpoint."""

    local_model: str = ""
    """Local instruct model for --llm (empty = the run's frozen model)."""

    openai_base_url: str = "http://127.0.0.1:8000/v1"
    """OpenAI-compatible endpoint for --llm-backend openai."""

    openai_model: str = "gpt-4o-mini"
    """Model name sent to the endpoint."""

    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the endpoint's key (the key itself is never stored)."""

    def __post_init__(self):
        if not self.text.strip():
            raise ConfigError("TEXT: expected a non-empty input to explain, e.g. faithlens explain \"What is 17 + 3?\" --run RUN")
        if self.top < 1:
            raise ConfigError(f"--top: expected at least 1 feature, got {self.top}")


@dataclass
class ExplainerConfig(RunConfig):
    positions: int = 20_000
    """Training pairs (token positions from the evidence scan that have at least one labelled feature active)."""

    names: int = 2
    """Labels per target text: those of the most strongly active labelled features at the position."""

    steps: int = 1_500
    """Optimizer steps."""

    batch_size: int = 128
    hidden: int = 192
    """Width of the feature embedding and the GRU."""

    lr: float = 3e-3
    eval_fraction: float = 0.1
    """Held-out share of the pairs, for exact-match and word-F1."""

    seed: int = 0

    score_pairs: int = 100
    """Held-out pairs whose generated text a simulator judges (what the text predicts: AUROC of its own position
    against another held-out position, `explainer.simulator_auroc`); 0 = word overlap only."""

    simulator_model: str = DEFAULT_MODEL
    """The simulator reading the texts: a local instruct model (embedded:qwen2.5-coder-1.5b-instruct is the capable
    one; the default 135M model is at chance as a simulator)."""

    def __post_init__(self):
        super().__post_init__()
        if self.score_pairs < 0:
            raise ConfigError(f"--score-pairs: expected 0 or more, got {self.score_pairs}")


@dataclass
class EvalConfig(CorpusConfig, RunConfig):
    data: str = ""
    """In-domain text (its eval split is scored); empty = the data the run's decoder was trained on."""

    tokens: int = 8_192
    """Held-out token positions for KL / top-1 / L0 / FVU (in and out of domain each)."""

    split: Split = "eval"
    """Split of --data scored as in-domain: eval (its held-out hash split), all (the whole of --data: a file held
    out for evaluation), or train."""

    ood: str = ""
    """Out-of-domain source (a whole domain held out from training, e.g. builtin:tasks:boolean+copying or a GSM8K
    jsonl); empty = the run's recorded held-out domain, if any."""

    tasks: str = "arithmetic,comparison,counting,boolean,copying"
    """Task suites for the accuracy row (builtin names, gsm8k[:PATH], boolq[:PATH], squad[:PATH])."""

    task_examples: int = 30
    """Examples per task suite."""

    task_mode: Literal["generate", "teacher_forced"] = "generate"
    """generate: each model writes its answer (the decoder picks every token); teacher_forced: exact match of the answer tokens."""

    prompt_format: Literal["auto", "chat", "bare"] = "auto"
    """chat: the model's chat template (instruct models answer in it); bare: 'Question: …\\nAnswer:'; auto: chat when the
    tokenizer has a template."""

    ppo: Path | None = None
    """A PPO run (or decoder folder) to compare with the supervised decoder; default RUN/ppo if present."""

    lens: Path | None = None
    """A tuned lens folder; default RUN/lens if present."""

    batch_size: int = 4
    """Sequences per forward pass."""

    json: bool = False
    """Print one JSON object ({rows, baselines, ...}) instead of the table."""

    plots: Path | None = None
    """Folder for the PNG plots (default RUN/eval/plots)."""

    def __post_init__(self):
        RunConfig.__post_init__(self)
        if self.data:
            CorpusConfig.__post_init__(self)
        if self.task_examples < 0:
            raise ConfigError(f"--task-examples: expected 0 or more, got {self.task_examples}")
