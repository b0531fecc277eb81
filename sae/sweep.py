"""`faithlens sae sweep-layers`: one SAE per layer on the same tokens, and the design's layer choice."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from corpus.cache import build_cache
from corpus.config import parse_layers
from models.io import write_json_atomic, write_text_atomic
from models.loading import load_frozen
from sae.config import SaeTrainConfig
from sae.job import cache_config_for, eval_config_for, run_ray_training
from sae.metrics import dead_window_warning, evaluate_sae
from sae.model import SparseAutoencoder
from training.layout import RunLayout


@dataclass
class SaeSweepConfig(SaeTrainConfig):
    layers: str = "6,9,12,15"
    """Layers to compare, comma-separated; one cache holds them all (the forward stops at the highest)."""

    out: Path = Path("runs/sae_sweep")
    """Output folder: layer<L>/ per layer, sweep.json and sweep.md."""


def choose_layer(rows: list[dict]) -> tuple[int, str]:
    """The design's rule: highest explained variance and interpretability (token purity here).

    Each layer gets its rank on both; the best mean rank wins, ties go to higher explained variance.
    """
    by_ev = sorted(rows, key=lambda r: -r["explained_variance"])
    by_purity = sorted(rows, key=lambda r: -r["token_purity"])
    rank = {r["layer"]: by_ev.index(r) + by_purity.index(r) for r in rows}
    best = min(rows, key=lambda r: (rank[r["layer"]], -r["explained_variance"]))
    why = (f"layer {best['layer']}: explained variance {best['explained_variance']:.3f} "
           f"(rank {by_ev.index(best) + 1} of {len(rows)}), token purity {best['token_purity']:.3f} "
           f"(rank {by_purity.index(best) + 1} of {len(rows)}); the rule takes the best mean rank over the two, "
           "ties to higher explained variance")
    return best["layer"], why


def sweep_table(rows: list[dict], chosen: int, why: str) -> str:
    tokens = " / ".join(f"{n:,}" for n in sorted({r["tokens"] for r in rows}))
    lines = [f"Each layer's SAE on {tokens} held-out tokens; dead = no activation in those tokens.", "",
             "| layer | FVU | explained variance | L0 | dead | spliced KL (nats/token) | ΔCE (nats/token) | token purity |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mark = " ←" if r["layer"] == chosen else ""
        lines.append(f"| {r['layer']}{mark} | {r['fvu']:.4f} | {r['explained_variance']:.4f} | {r['l0']:.1f} | "
                     f"{r['dead_frac']:.2%} | {r.get('spliced_kl', float('nan')):.4f} | "
                     f"{r.get('delta_ce', float('nan')):.4f} | {r['token_purity']:.3f} |")
    lines += [f"\nwarning: layer {r['layer']}: {w}" for r in rows if (w := dead_window_warning(r))]
    lines += ["", f"Chosen: {why}."]
    return "\n".join(lines)


def run_sweep_layers(cfg: SaeSweepConfig) -> dict:
    frozen = load_frozen(cfg)
    layers = parse_layers(cfg.layers, frozen.n_layers)
    cache = build_cache(cache_config_for(cfg, layers=",".join(map(str, layers))), frozen)
    print(f"training cache: {cache.tokens:,} tokens, layers {layers}, at {cache.root}")
    rows = []
    for layer in layers:
        sub = replace(cfg, layer=layer, out=Path(cfg.out) / f"layer{layer}")
        run_ray_training(sub, cache)
        stage = RunLayout(sub.out)
        sae = SparseAutoencoder.load(stage.sae)
        result = evaluate_sae(sae, frozen, eval_config_for(sub, stage.sae), layer)
        write_json_atomic(stage.metrics, result)
        rows.append(result)
    chosen, why = choose_layer(rows)
    table = sweep_table(rows, chosen, why)
    write_json_atomic(Path(cfg.out) / "sweep.json", {"rows": rows, "chosen_layer": chosen, "reason": why})
    write_text_atomic(Path(cfg.out) / "sweep.md", table + "\n")
    print(table)
    print(f"\nwrote {Path(cfg.out) / 'sweep.json'} and sweep.md")
    return {"rows": rows, "chosen_layer": chosen}
