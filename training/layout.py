"""The run-folder layout: every stage's folder and artifact, computed in one place.

A run folder (the demo's `--out`; a RUN for the interpretation commands) holds one folder per stage,
and each stage folder (the OUT of `sae train`, `decoder train`, `lens train` or `ppo`) holds its
config, metrics, TensorBoard events, checkpoints and weights, under the same names at every level:

    RUN/cache/<key>/                      activation/teacher caches, keyed by what produced them
    RUN/baseline/                         baseline.json, baseline.md, stage.json
    RUN/sae/                              config.json, metrics.json, sae/ (cfg.json + sae.safetensors),
                                          tb/, checkpoints/latest, ray_results/
    RUN/distill/                          config.json, metrics.json, decoder/ (or lens/), tb/, checkpoints/latest
    RUN/ppo/                              config.json, metrics.json, history.json, decoder/ (the exported
                                          policy), checkpoint/ (RLlib's), tb/, stage.json
    RUN/interpret/                        one file per interpretation step, and its <step>_config.json
    RUN/eval/                             eval.json, eval.md, plots/
    RUN/explain.html                      the demo's dashboard
    RUN/lens/                             optional: a tuned lens (a `lens train` OUT) the eval table compares

`stage.json` is the config record (`training.config.to_record`) of a stage whose command does not
write a config.json the pipeline can compare; see `training.stages`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from models.errors import ConfigError

STAGE_RECORD = "stage.json"


def resolve_sae_dir(path: Path) -> Path:
    """The SAE weights folder (cfg.json + sae.safetensors), given it or the `sae train` OUT holding it."""
    weights = RunLayout(path).sae
    return weights if (weights / "cfg.json").is_file() else Path(path)


def decoder_dir(path: Path) -> Path:
    """The decoder folder (decoder.json + weights), given it or the OUT (`decoder train`, `ppo`) holding it."""
    weights = RunLayout(path).decoder
    return weights if (weights / "decoder.json").is_file() else Path(path)


@dataclass(frozen=True)
class Stage:
    """One stage of a run as the pipeline sees it: the record of the config that produced it, the
    artifact that says it finished, and everything it writes (removed before it reruns)."""

    name: str
    record: Path
    done: Path
    outputs: tuple[Path, ...]
    recorded_by_job: bool = False
    """The stage's own command writes `record` (a config.json); else the pipeline writes it once the stage finished."""


@dataclass(frozen=True)
class RunLayout:
    """A run folder, or one stage's folder inside it (the artifact names are the same at both levels)."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def of_sae(cls, sae_dir: Path) -> RunLayout:
        """The `sae train` OUT that holds the SAE weights at `sae_dir` (its config.json may be absent)."""
        sae_dir = Path(sae_dir)
        parent = cls(sae_dir.parent)
        return parent if parent.sae == sae_dir else cls(sae_dir)

    @classmethod
    def of_decoder(cls, dec_dir: Path) -> RunLayout:
        """The `decoder train` / `ppo` OUT that holds the decoder weights at `dec_dir`."""
        dec_dir = Path(dec_dir)
        parent = cls(dec_dir.parent)
        return parent if parent.decoder == dec_dir else cls(dec_dir)

    # -- a stage folder's artifacts -----------------------------------------------------------------
    config = property(lambda self: self.root / "config.json")
    metrics = property(lambda self: self.root / "metrics.json")
    history = property(lambda self: self.root / "history.json")
    tb = property(lambda self: self.root / "tb")
    checkpoints = property(lambda self: self.root / "checkpoints")
    ray_results = property(lambda self: self.root / "ray_results")
    stage_record = property(lambda self: self.root / STAGE_RECORD)
    sae = property(lambda self: self.root / "sae")
    """The SAE weights of an `sae train` OUT (in a run folder: the SAE stage's folder, see `sae_run`)."""
    decoder = property(lambda self: self.root / "decoder")
    lens = property(lambda self: self.root / "lens")
    rllib_checkpoint = property(lambda self: self.root / "checkpoint")
    """A PPO run's RLlib checkpoint (`faithlens ppo` resumes from it)."""

    @property
    def latest_checkpoint(self) -> Path:
        """A Ray Train stage's own checkpoint (the unit of resume)."""
        return self.checkpoints / "latest"

    @property
    def rllib_policy(self) -> Path:
        """The policy module inside RLlib's checkpoint (what `ppo export --which checkpoint` reads)."""
        return self.rllib_checkpoint / "learner_group" / "learner" / "rl_module" / "default_policy"

    # -- a run folder's stages ----------------------------------------------------------------------
    cache = property(lambda self: self.root / "cache")
    baseline = property(lambda self: RunLayout(self.root / "baseline"))
    sae_run = property(lambda self: RunLayout(self.root / "sae"))
    distill = property(lambda self: RunLayout(self.root / "distill"))
    ppo = property(lambda self: RunLayout(self.root / "ppo"))
    eval = property(lambda self: RunLayout(self.root / "eval"))
    explain_html = property(lambda self: self.root / "explain.html")

    @property
    def baseline_json(self) -> Path:
        return self.baseline.root / "baseline.json"

    @property
    def baseline_md(self) -> Path:
        return self.baseline.root / "baseline.md"

    @property
    def eval_json(self) -> Path:
        return self.eval.root / "eval.json"

    @property
    def decoder_dir(self) -> Path:
        """The run's supervised decoder: RUN/decoder, RUN/distill/decoder, or RUN itself."""
        for d in (self.decoder, self.distill.decoder, self.root):
            if (d / "decoder.json").is_file():
                return d
        raise ConfigError(
            f"RUN {self.root}: no decoder found (expected {self.decoder / 'decoder.json'}); "
            "point RUN at a `faithlens decoder train` or `ppo export` output folder"
        )

    def sae_dir(self, recorded: str | None = None) -> Path:
        """RUN/sae if present, else the SAE recorded in decoder.json (`recorded`)."""
        if self.sae_run.root.is_dir():
            return resolve_sae_dir(self.sae_run.root)
        if not recorded:
            raise ConfigError(f"RUN {self.root}: no sae/ folder and decoder.json records no SAE path")
        return resolve_sae_dir(Path(recorded))

    @property
    def lens_dir(self) -> Path | None:
        """The run's tuned lens folder (RUN/lens), if it has one."""
        return self.lens if self.lens.is_dir() else None

    # -- the interpretation steps' outputs ----------------------------------------------------------
    dir = property(lambda self: self.root / "interpret")
    """RUN/interpret: one file per interpretation step."""
    importance = property(lambda self: self.dir / "importance.json")
    evidence = property(lambda self: self.dir / "evidence.json")
    evidence_tensors = property(lambda self: self.dir / "evidence.safetensors")
    labels = property(lambda self: self.dir / "labels.json")
    label_cache = property(lambda self: self.dir / "label_cache.json")
    scores = property(lambda self: self.dir / "scores.json")
    reviews = property(lambda self: self.dir / "reviews.json")
    clusters = property(lambda self: self.dir / "clusters.json")
    explainer = property(lambda self: self.dir / "explainer")
    explainer_metrics = property(lambda self: self.dir / "explainer_metrics.json")

    def step_config(self, step: str) -> Path:
        """Where `faithlens features STEP` saves its config beside its output."""
        return self.dir / f"{step}_config.json"

    def step_record(self, step: str) -> Path:
        """The pipeline's config record of an interpretation step (see `Stage`)."""
        return self.dir / f"{step}_{STAGE_RECORD}"

    def require(self, path: Path, command: str) -> Path:
        if not path.is_file():
            raise ConfigError(f"RUN {self.root}: {path.name} not found; run `faithlens {command} {self.root}` first")
        return path

    # -- the stages of the demo pipeline ------------------------------------------------------------
    def stage(self, name: str) -> Stage:
        """A stage of the demo pipeline: baseline, sae, distill, ppo, importance, evidence, labels, scores,
        explain or eval."""
        folder = {"baseline": self.baseline, "sae": self.sae_run, "distill": self.distill, "ppo": self.ppo,
                  "eval": self.eval}
        if name in ("sae", "distill"):  # Ray Train jobs: their config.json is the record
            run = folder[name]
            # the SAE's metrics.json exists only with --eval-tokens; what later stages read is its weights
            done = run.sae / "cfg.json" if name == "sae" else run.metrics
            return Stage(name, run.config, done, (run.root,), recorded_by_job=True)
        if name in folder:
            run = folder[name]
            done = {"baseline": self.baseline_json, "ppo": run.metrics, "eval": self.eval_json}[name]
            return Stage(name, run.stage_record, done, (run.root,))
        steps = {
            "importance": (self.importance, self.step_config("importance")),
            "evidence": (self.evidence, self.evidence_tensors, self.step_config("evidence")),
            # what later commands derived from the labels goes with them (`explain` reads the explainer);
            # the label cache stays: it is keyed by the evidence it was made from
            "labels": (self.labels, self.step_config("label"), self.clusters, self.explainer, self.explainer_metrics),
            "scores": (self.scores, self.step_config("score")),
            "explain": (self.explain_html,),
        }
        if name not in steps:
            raise ValueError(f"no stage {name!r} in a run folder")
        return Stage(name, self.step_record(name), steps[name][0], (*steps[name], self.step_record(name)))
