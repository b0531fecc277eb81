"""The `faithlens` console script: one sub-command per stage, each parsed from its config dataclass."""

from __future__ import annotations

import dataclasses
import importlib
import signal
import sys
from pathlib import Path

from training import logs

# command -> (module, config class, function taking the config); imported only when used,
# so `faithlens --help` stays fast.
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "cache": ("corpus.commands", "corpus.config:CacheConfig", "run_cache",
              "Build or resume the activation and teacher cache."),
    "baseline": ("distill.baseline", "distill.baseline:BaselineConfig", "run_baseline",
                 "Layer baselines: frozen-model CE/accuracy and logit-lens KL by layer."),
    "sae train": ("sae.job", "sae.config:SaeTrainConfig", "run_sae_train",
                  "Train a sparse autoencoder on one layer (a Ray Train job)."),
    "sae eval": ("sae.metrics", "sae.metrics:SaeEvalConfig", "run_sae_eval",
                 "SAE quality metrics on held-out tokens."),
    "sae sweep-layers": ("sae.sweep", "sae.sweep:SaeSweepConfig", "run_sweep_layers",
                         "One SAE per layer on the same tokens; the layer-selection rule applied."),
    "sae export-saelens": ("sae.export", "sae.export:SaeExportConfig", "run_export_saelens",
                           "Export an SAE to the SAELens on-disk format."),
    "sae import": ("sae.importer", "sae.importer:SaeImportConfig", "run_sae_import",
                   "Import a SAELens or sparsify SAE (its hook mapped to a layer) as an SAE run folder."),
    "decoder train": ("distill.job", "distill.config:DistillConfig", "run_decoder_train",
                      "Distil a decoder (SAE features → next-token distribution) to the frozen model (Ray Train)."),
    "decoder eval": ("distill.evaluate", "distill.config:DecoderEvalConfig", "run_decoder_eval",
                     "Decoders and lens baselines: KL, top-1, CE in and out of domain, task accuracy."),
    "decoder frontier": ("distill.frontier", "distill.frontier:FrontierConfig", "run_frontier",
                         "Decoders of several depths, block choices and layers on the same tokens: KL against depth, "
                         "tokens and layer (JSON + PNG)."),
    "lens train": ("distill.job", "distill.config:LensTrainConfig", "run_lens_train",
                   "Train the tuned-lens baseline (affine translator on the raw residual)."),
    "ppo": ("rl_env.ppo", "rl_env.ppo_config:PpoConfig", "run_ppo",
            "One PPO trial (RLlib) of a distilled decoder against the multi-objective reward."),
    "ppo export": ("rl_env.ppo", "rl_env.ppo_config:PpoExportConfig", "run_ppo_export",
                   "Write a PPO run's policy as a plain decoder checkpoint."),
    "sweep": ("rl_env.sweep", "rl_env.sweep:SweepConfig", "run_sweep",
              "A Ray Tune sweep of PPO trials (reward weights, schedules, PPO settings) from a YAML file."),
    "compare": ("rl_env.sweep", "rl_env.sweep:CompareConfig", "run_compare",
                "Rank a sweep's trials by their held-out score."),
    "features importance": ("interpret.importance", "interpret.config:ImportanceConfig", "run_importance",
                            "Rank features by attribution to the predictions (decoder and spliced model), checked by ablation."),
    "features evidence": ("interpret.evidence", "interpret.config:EvidenceConfig", "run_evidence",
                          "Top-activating contexts, quantile samples, density and promoted tokens of every live feature."),
    "features label": ("interpret.labels", "interpret.label_config:LabelConfig", "run_label",
                       "Label the most important features (local LLM, OpenAI-compatible endpoint, or statistics)."),
    "features score": ("interpret.scoring", "interpret.label_config:ScoreConfig", "run_score",
                       "Score labels: detection, fuzzing and embedding AUROC on held-out contexts, against a shuffled-label control."),
    "features review": ("interpret.review", "interpret.label_config:ReviewConfig", "run_review",
                        "Review labels by hand in the terminal (scores 0-1 stored beside the automatic ones)."),
    "features cluster": ("interpret.cluster", "interpret.config:ClusterConfig", "run_cluster",
                         "Cluster features by decoder-direction cosine and co-activation, with cluster labels."),
    "features explainer": ("interpret.explainer", "interpret.config:ExplainerConfig", "run_explainer",
                           "Train the explanation decoder (features -> short text) on pairs built from the labels."),
    "explain": ("interpret.explain", "interpret.config:ExplainConfig", "run_explain",
                "Explain the next-token prediction for TEXT: features by attribution, labels, faithfulness, dashboards."),
    "eval": ("interpret.report", "interpret.config:EvalConfig", "run_eval",
             "The success-metrics table of a run (targets, measured values, baselines) with JSON, markdown and PNG plots."),
    "demo": ("interpret.demo", "interpret.demo:DemoConfig", "run_demo",
             "The end-to-end demo on embedded defaults."),
    "reproduce": ("reproduce.run", "reproduce.run:ReproduceConfig", "run_reproduce",
                  "The Results page's runs at full size, stage by stage, resumable (--list: the plan and expected times)."),
}


def _usage() -> str:
    lines = ["usage: faithlens COMMAND [--help] [--verbose] [options]", "",
             "Ray, RLlib and library logs go to RUN/logs/faithlens.log (RUN: the command's --out or run folder);",
             "--verbose shows them on the terminal too.", "", "commands:"]
    lines += [f"  {name:<20} {help_}" for name, (_, _, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def _log_folder(cfg) -> Path:
    """The folder whose logs/ holds the command's log file: its run folder, else its output, else runs/."""
    for name in ("run", "out", "experiment"):
        value = getattr(cfg, name, None)
        if isinstance(value, (str, Path)):
            return Path(value)
    return Path("runs")


def _config_file(args: list[str]) -> Path | None:
    """The FILE of the last `--config FILE` (or `--config=FILE`) in args: as in argparse, the last one wins."""
    found = None
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            found = args[i + 1]
        elif arg.startswith("--config="):
            found = arg.removeprefix("--config=")
    return Path(found) if found is not None else None


def _file_defaults(cls, path: Path):
    """An instance of the config class `cls` holding the YAML file's values over the class defaults.

    It is handed to tyro as the defaults, so every flag on the command line overrides the file, even one
    given with its default value. It is not validated: the file may hold values that are only valid
    together with the command line's flags, and tyro builds (and validates) the final config anyway.
    """
    from models.errors import ConfigError
    from models.io import read_yaml
    from training.config import typed_options

    data = read_yaml(path, f"--config {path}")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option: value, got a {type(data).__name__}")
    values = {f.name: _field_default(f) for f in dataclasses.fields(cls)}
    values.update(typed_options(cls, data, f"--config {path}"))
    defaults = object.__new__(cls)  # bypasses __init__, and so __post_init__'s validation (see above)
    defaults.__dict__.update(values)
    return defaults


def _field_default(field: dataclasses.Field):
    import tyro

    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return tyro.MISSING  # still required on the command line


def _parse(config_cls, args: list[str], prog: str, description: str, defaults):
    """The config tyro parses from `args`; a usage error (tyro prints it as a box) becomes a one-line ConfigError."""
    import contextlib
    import io

    import tyro

    from models.errors import ConfigError

    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            cfg = tyro.cli(config_cls, args=args, prog=prog, description=description, default=defaults)
    except SystemExit as e:
        if e.code not in (0, None):
            raise ConfigError(_box_to_line(captured.getvalue()) + f" (see {prog} --help)") from None
        sys.stderr.write(captured.getvalue())
        raise
    except BaseException:
        sys.stderr.write(captured.getvalue())  # what was printed before a config's own check failed
        raise
    sys.stderr.write(captured.getvalue())  # warnings printed while parsing
    return cfg


def _box_to_line(text: str) -> str:
    """The first paragraph of tyro's boxed error message, on one line."""
    frame = "╭╮╰╯│─━┃┏┓┗┛+|-= "
    words: list[str] = []
    for line in text.splitlines()[1:]:  # the first line is the box's title
        content = line.strip().strip("│┃|").strip()
        if not content.strip(frame):  # a rule: the first paragraph has ended
            if words:
                break
            continue
        words.append(content)
    return " ".join(words) or "invalid arguments"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    argv = [arg for arg in argv if arg != "--verbose"]
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if rest and f"{name} {rest[0]}" in COMMANDS:  # two-word commands: `faithlens sae train`
        name, rest = f"{name} {rest[0]}", rest[1:]
    if name not in COMMANDS:
        print(f"faithlens: error: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, config_ref, func_name, help_ = COMMANDS[name]
    # Ctrl-C must stop a long build cleanly even where a parent shell started us with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    logs.setup(None, verbose)  # until the config names the run folder

    import tyro

    from models.errors import ConfigError, JobError

    config_module, config_name = config_ref.split(":")
    config_cls = getattr(importlib.import_module(config_module), config_name)
    try:
        config_file = _config_file(rest) if "config" in {f.name for f in dataclasses.fields(config_cls)} else None
        defaults = _file_defaults(config_cls, config_file) if config_file is not None else tyro.MISSING_NONPROP
        cfg = _parse(config_cls, rest, f"faithlens {name}", help_, defaults)
        logs.setup(_log_folder(cfg), verbose)
        func = getattr(importlib.import_module(module_name), func_name)
        func(cfg)
    except ConfigError as e:
        print(f"faithlens {name}: error: {e}", file=sys.stderr)
        logs.close(discard=True)
        return 2
    except JobError as e:
        print(f"faithlens {name}: error: {e}", file=sys.stderr)
        _announce_logs()
        return 2
    except KeyboardInterrupt:
        print(f"faithlens {name}: interrupted; completed work is kept, rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        logs.close()
    _announce_logs()
    return 0


def _announce_logs() -> None:
    """The log file's path, once per command, if something was written to it."""
    path = logs.log_file()
    if path is not None and path.is_file():
        line = logs.announce()
        if line is not None:
            print(line, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
