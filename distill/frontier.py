"""`faithlens decoder frontier`: how faithful a decoder gets against its depth, its training tokens and the
layer it reads, on the same tokens, with the tuned lens at each layer as the reference line.

Every cell is an ordinary `decoder train` (or `lens train`) run in `OUT/cells/<name>/`: a finished cell
whose saved config is the one asked for is reused, an unfinished one resumes from its checkpoint, so the
whole frontier resumes after a stop. Each run's held-out curve gives KL against tokens; the cells give it
against depth (context decoders of `--depths` blocks, each starting blocks as `--inits`, plus the
readout / linear decoders) and against the layer (`--layer-saes`). The greedy block-removal path of the
SAE-spliced model gives KL at initialisation against depth.

Written: OUT/frontier.json (every cell: curve, final KL / top-1, trainable parameters and FLOPs per token
as a share of the frozen model above the layer; the verdict) and OUT/frontier.png.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from distill.config import DistillConfig, LensTrainConfig, TrainLoopConfig
from models.errors import ConfigError
from models.io import read_json, write_json_atomic
from sae.model import SparseAutoencoder
from training.config import differences, from_record, read_record, to_record
from training.layout import RunLayout, resolve_sae_dir

log = logging.getLogger(__name__)

TARGET_KL, TARGET_TOP1 = 0.5, 0.75
"""The design's decoder targets: KL(p_frozen ‖ p_decoder) < 0.5 nats/token, top-1 agreement > 75%."""


@dataclass
class FrontierConfig(TrainLoopConfig):
    """`faithlens decoder frontier`: decoders of several depths, initialisations and layers on the same tokens."""

    sae: Path = Path("runs/sae")
    """The SAE at the main layer (its layer is the one the depth and token axes are measured at)."""

    depths: str = "2,4,8,12"
    """Context-decoder depths (blocks) at the main layer."""

    inits: str = "even,greedy"
    """How those blocks start (`decoder train --blocks`): even, greedy, or both."""

    baselines: str = "readout,linear"
    """Per-position decoders trained beside them for reference (empty: none)."""

    layer_saes: tuple[Path, ...] = ()
    """SAEs at other layers (e.g. the layer<L>/ folders of `sae sweep-layers`): the layer axis."""

    layer_depth: int = 4
    """Depth of the context decoder trained at each of the --layer-saes layers (and at the main layer)."""

    layer_init: str = "greedy"
    """--blocks of the layer-axis decoders."""

    layer_tokens: int = 0
    """Training tokens of the layer-axis cells and lenses (0: --tokens)."""

    lens: bool = True
    """Train the tuned lens at every layer of the frontier on the same tokens (the reference line)."""

    select_tokens: int = 2048
    """Training-split tokens on which greedy block removal is measured (`decoder train --select-tokens`)."""

    bos_stream: bool = True
    """Context decoders start position 0 from the model's own BOS residual (`decoder train --bos-stream`)."""

    out: Path = Path("runs/frontier")
    """Output folder: cells/<name>/ (one training run each), frontier.json, frontier.png."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.depth_list = _ints(self.depths, "--depths")
        self.init_list = [s.strip() for s in self.inits.split(",") if s.strip()]
        for init in self.init_list:
            if init not in ("even", "greedy"):
                raise ConfigError(f"--inits: expected even and/or greedy, got {init!r}")
        self.baseline_list = [s.strip() for s in self.baselines.split(",") if s.strip()]
        for arch in self.baseline_list:
            if arch not in ("readout", "linear"):
                raise ConfigError(f"--baselines: expected readout and/or linear, got {arch!r}")
        if self.layer_depth < 1:
            raise ConfigError(f"--layer-depth: expected at least 1 block, got {self.layer_depth}")


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = sorted({int(p) for p in text.split(",") if p.strip()})
    except ValueError:
        raise ConfigError(f"{flag}: expected comma-separated whole numbers, got {text!r}") from None
    if not values or values[0] < 1:
        raise ConfigError(f"{flag}: expected positive numbers, got {text!r}")
    return values


# -- the cells --------------------------------------------------------------------------------
@dataclass
class Cell:
    name: str
    cfg: DistillConfig | LensTrainConfig
    layer: int
    axis: str
    """depth (main layer), layer (the layer sweep) or both."""


def plan_cells(cfg: FrontierConfig) -> tuple[int, list[Cell]]:
    """The main layer and every run the frontier needs, in the order they train."""
    main_sae = resolve_sae_dir(cfg.sae)
    main_layer = _sae_layer(main_sae, "--sae")
    base = to_record(cfg)
    cells: list[Cell] = []

    def decoder(name: str, sae: Path, layer: int, axis: str, **fields) -> None:
        tokens = cfg.tokens if axis != "layer" else (cfg.layer_tokens or cfg.tokens)
        record = {**base, "sae": str(sae), "tokens": tokens, "bos_stream": cfg.bos_stream,
                  "select_tokens": cfg.select_tokens, **fields,
                  "out": str(Path(cfg.out).resolve() / "cells" / name)}
        cells.append(Cell(name, from_record(DistillConfig, record), layer, axis))

    for arch in cfg.baseline_list:
        decoder(f"L{main_layer}-{arch}", main_sae, main_layer, "depth", arch=arch)
    for depth in cfg.depth_list:
        for init in cfg.init_list:
            axis = "both" if depth == cfg.layer_depth and init == cfg.layer_init else "depth"
            decoder(f"L{main_layer}-context{depth}-{init}", main_sae, main_layer, axis, arch="context",
                    n_layers=depth, blocks=init)
    if not any(c.axis == "both" for c in cells):
        decoder(f"L{main_layer}-context{cfg.layer_depth}-{cfg.layer_init}", main_sae, main_layer, "layer",
                arch="context", n_layers=cfg.layer_depth, blocks=cfg.layer_init)
    layers = [main_layer]
    for path in cfg.layer_saes:
        sae = resolve_sae_dir(path)
        layer = _sae_layer(sae, "--layer-saes")
        layers.append(layer)
        decoder(f"L{layer}-context{cfg.layer_depth}-{cfg.layer_init}", sae, layer, "layer", arch="context",
                n_layers=cfg.layer_depth, blocks=cfg.layer_init)
    if cfg.lens:
        for layer in sorted(set(layers)):
            record = {**base, "layer": layer, "tokens": cfg.layer_tokens or cfg.tokens,
                      "out": str(Path(cfg.out).resolve() / "cells" / f"L{layer}-lens")}
            cells.append(Cell(f"L{layer}-lens", from_record(LensTrainConfig, record), layer, "layer"))
    return main_layer, cells


def _sae_layer(sae_dir: Path, flag: str) -> int:
    meta = SparseAutoencoder.load(sae_dir).meta
    if "layer" not in meta:
        raise ConfigError(f"{flag} {sae_dir}: cfg.json records no layer (was it trained by faithlens?)")
    return int(meta["layer"])


CELL_KEYS = ("sae", "layer", "arch", "n_layers", "blocks", "init", "bos_stream", "rank", "tokens", "teacher", "teacher_k",
             "loss", "lr", "batch_sequences", "seed", "seq_len", "data")
"""What makes a cell the cell asked for (other settings, e.g. workers, may change between resumes)."""


def cell_is_done(cell: Cell) -> bool:
    """Finished with this config; a cell trained with other settings is removed so it retrains."""
    run = RunLayout(cell.cfg.out)
    if not run.config.is_file():
        return False
    record = to_record(cell.cfg)
    wanted = {k: record[k] for k in CELL_KEYS if k in record}
    saved = {k: read_record(run.config).get(k) for k in wanted}
    changed = differences(saved, wanted)
    if changed:
        print(f"frontier: {cell.name} was trained with other settings ({'; '.join(changed[:3])}); retraining it")
        shutil.rmtree(run.root)
        return False
    return run.metrics.is_file()


def _run_cell(cell: Cell, caches: dict[int, Path]) -> None:
    from distill.job import run_decoder_train, run_lens_train

    if cell.cfg.teacher == "cache":
        cell.cfg.cache = caches[cell.layer]
    if isinstance(cell.cfg, LensTrainConfig):
        run_lens_train(cell.cfg)
    else:
        run_decoder_train(cell.cfg)


def _shared_caches(cfg: FrontierConfig, cells: list[Cell]) -> dict[int, Path]:
    """One teacher cache holding every layer the cells read, built once for the most tokens any cell trains on."""
    from corpus.cache import build_cache
    from corpus.config import CacheConfig
    from models.loading import load_frozen

    if cfg.teacher != "cache":
        return {}
    layers = sorted({c.layer for c in cells})
    tokens = max(c.cfg.tokens for c in cells)
    cache_cfg = CacheConfig.covering(cfg, tokens, ",".join(map(str, layers)), cfg.cache_dir, teacher=True, top_k=cfg.teacher_k)
    cache = build_cache(cache_cfg, load_frozen(cfg))
    print(f"frontier: one teacher cache for layers {layers}, {cache.tokens:,} positions at {cache.root}")
    return {layer: cache.root for layer in layers}


# -- what each cell costs -----------------------------------------------------------------------
def block_flops(d: int, n_heads: int, n_kv: int, d_mlp: int, context: float) -> float:
    """Multiply-adds ×2 per token of one Llama-style block: projections, SwiGLU, and attention over
    `context` earlier positions on average."""
    kv = n_kv * (d // n_heads)
    return 2 * (2 * d * d + 2 * d * kv + 3 * d * d_mlp) + 4 * context * d


def cell_cost(meta: dict, frozen_cfg: dict, layer: int, sae_k: int, seq_len: int) -> dict:
    """Trainable parameters and FLOPs per token of a student, and the share of the frozen model's FLOPs
    above the layer (its upper blocks + final norm and unembedding); the head counts on both sides."""
    d, vocab = frozen_cfg["hidden_size"], frozen_cfg["vocab_size"]
    n_heads = frozen_cfg.get("num_attention_heads") or max(1, d // 64)
    n_kv = frozen_cfg.get("num_key_value_heads") or n_heads
    d_mlp = frozen_cfg.get("intermediate_size") or 4 * d
    context = seq_len / 2
    head = 2 * d * vocab
    upper = (frozen_cfg["num_hidden_layers"] - layer) * block_flops(d, n_heads, n_kv, d_mlp, context) + head
    arch = meta.get("arch", "lens")
    if arch == "context":
        flops = 2 * sae_k * d + meta["n_layers"] * block_flops(d, n_heads, n_kv, d_mlp, context) + head
    elif arch == "readout":
        flops = 2 * sae_k * d + (2 * d * d if meta.get("readout_affine") else 0) + head
    elif arch == "linear":
        rank = meta.get("rank") or vocab
        flops = 2 * sae_k * rank + (2 * rank * vocab if meta.get("rank") else 0)
    else:  # the tuned lens: an affine map on the residual, then the head
        flops = 2 * d * d + head
    return {"flops_per_token": flops, "flops_share_of_upper_model": flops / upper}


def _trainable_parameters(weights: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


# -- reading the cells ---------------------------------------------------------------------------
def extrapolate(curve: list[dict], target: float, key: str = "kl") -> float | None:
    """Tokens at which a log-linear fit y = a + b·ln(tokens) of `key` (kl falling, top1 rising) over the
    curve's second half reaches `target` (None: the curve is not moving towards it)."""
    points = [(p["tokens"], p[key]) for p in curve if p["tokens"] > 0]
    points = points[len(points) // 2 :]
    if len(points) < 2:
        return None
    xs, ys = [math.log(t) for t, _ in points], [k for _, k in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    if slope == 0 or (slope > 0) != (key == "top1"):
        return None
    return math.exp(mx + (target - my) / slope)


def cell_result(cell: Cell, frozen_cfg: dict, wall_s: float | None) -> dict:
    run = RunLayout(cell.cfg.out)
    metrics = read_json(run.metrics)
    is_lens = isinstance(cell.cfg, LensTrainConfig)
    folder = run.lens if is_lens else run.decoder
    meta = json.loads((folder / ("lens.json" if is_lens else "decoder.json")).read_text())
    weights = folder / ("lens.safetensors" if is_lens else "decoder.safetensors")
    sae_k = 0
    if not is_lens:
        sae_k = int(SparseAutoencoder.load(resolve_sae_dir(cell.cfg.sae)).cfg.k or 0)
    last = metrics["curve"][-1] if metrics["curve"] else {}
    name_arch = "lens" if is_lens else cell.cfg.arch
    result = {
        "name": cell.name, "layer": cell.layer, "axis": cell.axis, "arch": name_arch,
        "n_layers": getattr(cell.cfg, "n_layers", 0) if name_arch == "context" else 0,
        "init": getattr(cell.cfg, "blocks", None) if name_arch == "context" else None,
        "blocks": meta.get("source_blocks"), "teacher": cell.cfg.teacher,
        "train_tokens": metrics["train_tokens"], "curve": metrics["curve"], "curve_tokens": metrics.get("curve_tokens"),
        "kl": last.get("kl"), "top1": last.get("top1"), "wall_s": wall_s,
        "trainable_parameters": _trainable_parameters(weights),
        **cell_cost({"arch": name_arch, **meta}, frozen_cfg, cell.layer, sae_k, cell.cfg.seq_len),
    }
    if name_arch == "context":
        blocks = RunLayout(cell.cfg.out).root / "blocks.json"
        if blocks.is_file():
            result["greedy_path"] = read_json(blocks)["path"]
    return result


def verdict(results: list[dict], main_layer: int) -> dict:
    """The smallest main-layer decoder meeting the design's targets, or how far each got and what its curve
    says it would take."""
    main = [r for r in results if r["layer"] == main_layer and r["arch"] != "lens" and r["kl"] is not None]
    meeting = [r for r in main if r["kl"] < TARGET_KL and r["top1"] > TARGET_TOP1]
    if meeting:
        best = min(meeting, key=lambda r: r["flops_per_token"])
        return {"met": True, "smallest": best["name"], "kl": best["kl"], "top1": best["top1"],
                "flops_share_of_upper_model": best["flops_share_of_upper_model"]}
    gaps = []
    for r in sorted(main, key=lambda r: r["kl"]):
        gaps.append({"name": r["name"], "kl": r["kl"], "top1": r["top1"], "kl_met": r["kl"] < TARGET_KL,
                     "top1_met": r["top1"] > TARGET_TOP1,
                     "tokens_to_target_kl": None if r["kl"] < TARGET_KL else extrapolate(r["curve"], TARGET_KL),
                     "tokens_to_target_top1": None if r["top1"] > TARGET_TOP1 else extrapolate(r["curve"], TARGET_TOP1,
                                                                                               "top1")})
    return {"met": False, "closest": gaps[0]["name"] if gaps else None, "decoders": gaps}


def run_frontier(cfg: FrontierConfig) -> dict:
    from models.config import DEFAULT_MODEL
    from models.loading import load_frozen
    from training.config import inherit_corpus

    sae_dir = resolve_sae_dir(cfg.sae)
    meta = SparseAutoencoder.load(sae_dir).meta
    if cfg.model == DEFAULT_MODEL and meta.get("model"):
        cfg.model = meta["model"]
    sae_run = RunLayout.of_sae(sae_dir)
    if sae_run.config.is_file():  # every cell then trains on the corpus its SAE was trained on
        cfg = inherit_corpus(cfg, sae_run.config, "decoder frontier", "the SAE stage")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    main_layer, cells = plan_cells(cfg)
    frozen_cfg = load_frozen(cfg).model.config.to_dict()
    previous = _previous_walls(out / "frontier.json")
    todo = [c for c in cells if not cell_is_done(c)]
    print(f"frontier: {len(cells)} runs ({len(cells) - len(todo)} already done) in {out / 'cells'}")
    caches = _shared_caches(cfg, todo) if todo else {}
    walls = {}
    for i, cell in enumerate(todo, 1):
        print(f"frontier [{i}/{len(todo)}]: {cell.name}")
        started = time.perf_counter()
        _run_cell(cell, caches)
        walls[cell.name] = time.perf_counter() - started
    results = [cell_result(c, frozen_cfg, walls.get(c.name, previous.get(c.name))) for c in cells]
    report = {"main_layer": main_layer, "target": {"kl": TARGET_KL, "top1": TARGET_TOP1}, "teacher": cfg.teacher,
              "tokens": cfg.tokens, "cells": results, "verdict": verdict(results, main_layer)}
    write_json_atomic(out / "frontier.json", report)
    from distill.frontier_plot import plot_frontier

    plot_frontier(report, out / "frontier.png")
    print(frontier_table(report))
    print(f"wrote {out / 'frontier.json'} and {out / 'frontier.png'}")
    return report


def _previous_walls(path: Path) -> dict:
    if not path.is_file():
        return {}
    return {c["name"]: c.get("wall_s") for c in read_json(path).get("cells", [])}


def frontier_table(report: dict) -> str:
    lines = ["| run | layer | blocks | trained tokens | KL | top-1 | trainable params | FLOPs/token (share above L) | wall s |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["cells"]:
        blocks = ",".join(map(str, r["blocks"])) if r.get("blocks") else "—"
        wall = f"{r['wall_s']:.0f}" if r.get("wall_s") else "—"
        kl = f"{r['kl']:.3f}" if r["kl"] is not None else "—"
        top1 = f"{r['top1']:.1%}" if r["top1"] is not None else "—"
        cost = f"{r['flops_per_token'] / 1e6:.0f}M ({r['flops_share_of_upper_model']:.0%})"
        lines.append(f"| {r['name']} | {r['layer']} | {blocks} | {r['train_tokens']:,} | {kl} | {top1} | "
                     f"{r['trainable_parameters'] / 1e6:.1f}M | {cost} | {wall} |")
    v, goal = report["verdict"], f"KL < {TARGET_KL} and top-1 > {TARGET_TOP1:.0%}"
    if v["met"]:
        lines.append(f"\nSmallest decoder at layer {report['main_layer']} with {goal}: {v['smallest']} (KL {v['kl']:.3f}, "
                     f"top-1 {v['top1']:.1%}, {v['flops_share_of_upper_model']:.0%} of the upper model's FLOPs)")
        return "\n".join(lines)
    lines.append(f"\nNo decoder at layer {report['main_layer']} reached {goal} (the design's targets).")
    def need(g: dict, key: str, target: str) -> str:
        if g[f"{key}_met"]:
            return f"{target} met"
        tokens = g[f"tokens_to_target_{key}"]
        return f"{target} at {tokens:,.0f} tokens" if tokens else f"{target}: curve not moving towards it"

    lines.append("(tokens by each curve's log-linear trend over its second half: an extrapolation, optimistic for short curves)")
    for g in v["decoders"]:
        lines.append(f"- {g['name']}: KL {g['kl']:.3f}, top-1 {g['top1']:.1%}; {need(g, 'kl', f'KL < {TARGET_KL}')}; "
                     f"{need(g, 'top1', f'top-1 > {TARGET_TOP1:.0%}')}")
    return "\n".join(lines)
