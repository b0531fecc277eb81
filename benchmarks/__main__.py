"""`python -m benchmarks [--json]`: print the throughput and peak memory of each stage."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass

import tyro

from benchmarks.foundation import bench_foundation
from models.config import DEFAULT_MODEL


@dataclass
class BenchConfig:
    model: str = DEFAULT_MODEL
    """Frozen model: hub id, local directory, or embedded:smollm2-135m-instruct."""

    dtype: str = "auto"
    """auto, bf16 or fp32."""

    layer: int = 9
    """Layer for the activations-only pass and the cache."""

    batch: int = 8
    """Sequences per forward pass."""

    seq_len: int = 256
    """Tokens per sequence."""

    repeats: int = 3
    """Timed repeats per measurement (median)."""

    cache_tokens: int = 16_384
    """Tokens in the benchmark cache build (builtin:tasks corpus, teacher on)."""

    sae_tokens: int = 262_144
    """Training tokens for the SAE benchmark (builtin:tasks corpus)."""

    latents: int = 5760
    """SAE width for the SAE benchmark."""

    k: int = 64
    """TopK k for the SAE benchmark."""

    distill_steps: int = 4
    """Timed optimizer steps per student in the distillation benchmark."""

    distill_depths: str = "4"
    """Context-decoder depths in the distillation benchmark (comma-separated)."""

    distill_teachers: str = "cache,online"
    """Teachers in the distillation benchmark: cache (cached top-k targets) and/or online (exact KL)."""

    sae: str = ""
    """An SAE folder for the distillation benchmark (default: a random TopK SAE of --latents/--k)."""

    decoder: str = ""
    """A decoder run for the RL benchmark (default: a readout decoder on a random SAE)."""

    ppo_iterations: int = 2
    """Timed PPO iterations in the RL benchmark."""

    ppo_batch: int = 1024
    """Env steps per PPO iteration in the RL benchmark."""

    anchor_kl: str = "1"
    """λ of the forward-KL anchor in the RL benchmark's PPO iterations (`faithlens ppo --anchor-kl`)."""

    interpret_tokens: int = 2048
    """Predictions attributed in the interpretation benchmark (the evidence scan reads twice as many tokens)."""

    label_features: int = 16
    """Features labelled in the interpretation benchmark."""

    labeller_model: str = ""
    """The local labeller and simulator of the interpretation benchmark (default: the frozen model; the capable one is
    embedded:qwen2.5-coder-1.5b-instruct)."""

    stages: str = "foundation,sae,distill,rl,interpret"
    """Comma-separated stages to benchmark."""

    json: bool = False
    """Print one JSON object instead of a table."""


def main(argv: list[str] | None = None) -> None:
    cfg = tyro.cli(BenchConfig, prog="python -m benchmarks", args=argv)
    logging.basicConfig(level=logging.WARNING)
    stages = {s.strip() for s in cfg.stages.split(",")}
    results: dict = {"config": asdict(cfg)}
    if "foundation" in stages:
        results["foundation"] = bench_foundation(cfg.model, cfg.layer, cfg.batch, cfg.seq_len, cfg.repeats,
                                                 cfg.cache_tokens, cfg.dtype)
    if "sae" in stages:
        from benchmarks.sae import bench_sae

        results["sae"] = bench_sae(cfg.model, cfg.layer, cfg.sae_tokens, cfg.latents, cfg.k, cfg.dtype)
    if "distill" in stages:
        from benchmarks.distill import bench_distill

        results["distill"] = bench_distill(cfg.model, cfg.layer, cfg.latents, cfg.k, cfg.dtype, cfg.distill_steps,
                                           cfg.batch, cfg.sae, tuple(int(d) for d in cfg.distill_depths.split(",")),
                                           tuple(t.strip() for t in cfg.distill_teachers.split(",")))
    if "rl" in stages:
        from benchmarks.rl import bench_rl

        results["rl"] = bench_rl(cfg.model, cfg.layer, cfg.latents, cfg.k, cfg.dtype, cfg.decoder, cfg.ppo_iterations,
                                 cfg.ppo_batch, cfg.batch, cfg.anchor_kl)
    if "interpret" in stages:
        from benchmarks.interpret import bench_interpret

        results["interpret"] = bench_interpret(cfg.model, cfg.layer, cfg.latents, cfg.k, cfg.dtype, cfg.decoder,
                                               cfg.interpret_tokens, cfg.label_features, cfg.labeller_model)
    if cfg.json:
        print(json.dumps(results))
        return
    print(f"benchmarks: {cfg.model}, batch {cfg.batch} x {cfg.seq_len} tokens")
    for stage, figures in results.items():
        if stage == "config":
            continue
        print(f"\n[{stage}]")
        for key, value in figures.items():
            print(f"  {key:<32} {value:,.3f}" if isinstance(value, float) else f"  {key:<32} {value}")


if __name__ == "__main__":
    main()
