"""The `faithlens` console script: one sub-command per stage, each parsed from its config dataclass."""

from __future__ import annotations

import importlib
import logging
import signal
import sys

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
    "decoder train": ("distill.job", "distill.config:DistillConfig", "run_decoder_train",
                      "Distil a decoder (SAE features → next-token distribution) to the frozen model (Ray Train)."),
    "decoder eval": ("distill.evaluate", "distill.config:DecoderEvalConfig", "run_decoder_eval",
                     "Decoders and lens baselines: KL, top-1, CE in and out of domain, task accuracy."),
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
                       "Score labels: detection, fuzzing (simulated) and embedding balanced accuracy."),
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
}


def _usage() -> str:
    lines = ["usage: faithlens COMMAND [--help] [options]", "", "commands:"]
    lines += [f"  {name:<20} {help_}" for name, (_, _, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
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
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "huggingface_hub", "datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    import tyro

    from models.errors import ConfigError, JobError

    config_module, config_name = config_ref.split(":")
    config_cls = getattr(importlib.import_module(config_module), config_name)
    try:
        cfg = tyro.cli(config_cls, args=rest, prog=f"faithlens {name}", description=help_)
        func = getattr(importlib.import_module(module_name), func_name)
        func(cfg)
    except (ConfigError, JobError) as e:
        print(f"faithlens {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"faithlens {name}: interrupted; completed work is kept, rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
