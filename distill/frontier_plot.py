"""frontier.png: held-out KL against training tokens, depth and layer, and top-1 against tokens."""

from __future__ import annotations

from pathlib import Path

from distill.frontier import TARGET_KL, TARGET_TOP1
from interpret.plots import _figure, _save

_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def _label(r: dict) -> str:
    return f"context {r['n_layers']} ({r['init']})" if r["arch"] == "context" else r["arch"]


def plot_frontier(report: dict, path: Path) -> Path:
    plt = _figure()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    main = [r for r in report["cells"] if r["layer"] == report["main_layer"]]
    depths = sorted({r["n_layers"] for r in main if r["arch"] == "context"})
    color = {d: _COLORS[i % len(_COLORS)] for i, d in enumerate(depths)}

    def style(r: dict) -> dict:
        if r["arch"] != "context":
            return {"color": "#777", "linestyle": ":" if r["arch"] == "lens" else "-.", "marker": "."}
        return {"color": color[r["n_layers"]], "linestyle": "-" if r["init"] == "greedy" else "--", "marker": "o", "markersize": 3}

    ax_tokens, ax_top1, ax_depth, ax_layer = axes[0, 0], axes[0, 1], axes[1, 0], axes[1, 1]
    for r in main:
        points = [p for p in r["curve"] if p["tokens"] > 0]
        if points:
            ax_tokens.plot([p["tokens"] for p in points], [p["kl"] for p in points], label=_label(r), **style(r))
            ax_top1.plot([p["tokens"] for p in points], [p["top1"] for p in points], label=_label(r), **style(r))
    for ax, target, name in ((ax_tokens, TARGET_KL, "KL (nats/token)"), (ax_top1, TARGET_TOP1, "top-1 agreement")):
        ax.axhline(target, color="k", linewidth=0.8, linestyle=":")
        ax.set_xscale("log")
        ax.set_xlabel("training tokens")
        ax.set_ylabel(f"held-out {name}")
        ax.grid(alpha=0.3)
    ax_tokens.set_title(f"layer {report['main_layer']}: KL against tokens (target {TARGET_KL})")
    ax_top1.set_title(f"top-1 against tokens (target {TARGET_TOP1:.0%})")
    ax_tokens.legend(fontsize=7, ncol=2)

    for init, marker in (("even", "s"), ("greedy", "o")):
        trained = sorted((r["n_layers"], r["kl"]) for r in main if r["arch"] == "context" and r["init"] == init and r["kl"] is not None)
        if trained:
            ax_depth.plot(*zip(*trained), marker=marker, label=f"{init} blocks, trained")
    paths = [r["greedy_path"] for r in main if r.get("greedy_path")]
    if paths:
        longest = max(paths, key=len)
        ax_depth.plot([len(p["blocks"]) for p in longest], [p["kl"] for p in longest], color="#999", linestyle="--",
                      label="greedy blocks at init (SAE-spliced, untrained)")
    for r in main:
        if r["arch"] in ("readout", "linear") and r["kl"] is not None:
            ax_depth.axhline(r["kl"], color="#777", linestyle="-." if r["arch"] == "linear" else ":", linewidth=1, label=r["arch"])
    ax_depth.axhline(TARGET_KL, color="k", linewidth=0.8, linestyle=":")
    ax_depth.set_yscale("log")
    ax_depth.set_xlabel("context-decoder blocks")
    ax_depth.set_ylabel("held-out KL (nats/token)")
    ax_depth.set_title("KL against depth")
    ax_depth.grid(alpha=0.3)
    ax_depth.legend(fontsize=7)

    for arch, marker in (("context", "o"), ("lens", "s")):
        rows = sorted((r["layer"], r["kl"]) for r in report["cells"] if r["axis"] in ("layer", "both") and r["arch"] == arch
                      and r["kl"] is not None)
        if rows:
            ax_layer.plot(*zip(*rows), marker=marker, label="tuned lens" if arch == "lens" else "context decoder")
    ax_layer.axhline(TARGET_KL, color="k", linewidth=0.8, linestyle=":")
    ax_layer.set_xlabel("layer read")
    ax_layer.set_ylabel("held-out KL (nats/token)")
    ax_layer.set_title("KL against the layer (same tokens)")
    ax_layer.grid(alpha=0.3)
    ax_layer.legend(fontsize=7)
    fig.tight_layout()
    path = _save(fig, Path(path))
    plt.close(fig)
    return path
