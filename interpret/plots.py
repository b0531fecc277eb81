"""PNG plots of `faithlens eval`: KL by layer for every method, and PPO reward components / held-out KL over training."""

from __future__ import annotations

from pathlib import Path

from interpret.eval_records import EvalReport
from models.io import atomic_path, read_json


def _figure():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return path


def kl_by_layer(report: EvalReport, path: Path) -> Path:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    layers = report.layer_curve
    if layers:
        # the last layer's logit lens is the model itself (KL 0): floored so the log axis can show it
        ax.plot([r["layer"] for r in layers], [max(r["logit_lens_kl"], 1e-3) for r in layers], "o-", color="#888",
                label="logit lens")
    markers = iter("sD^vP*X")
    for method, b in report.baselines.items():
        in_domain = b.corpora.get("in_domain")
        if method == "logit_lens" or in_domain is None or in_domain.kl is None:
            continue
        ax.plot([report.layer], [in_domain.kl], next(markers, "o"), markersize=9, label=method.replace("_", " "))
    ax.axhline(0.5, color="#c33", linestyle="--", linewidth=1, label="target 0.5")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("KL(p_frozen ‖ p_method), nats/token")
    ax.set_title(f"{report.model}: held-out KL by layer (run layer {report.layer})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    out = _save(fig, path)
    plt.close(fig)
    return out


def ppo_curves(history: list[dict], path: Path, title: str) -> Path:
    plt = _figure()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [h.get("env_steps", i) for i, h in enumerate(history)]
    for key in ("reward/r_faith", "reward/r_mono", "reward/r_task", "reward/reward"):
        if any(key in h for h in history):
            ax1.plot(steps, [h.get(key) for h in history], label=key.split("/")[1])
    ax1.set_xlabel("environment steps")
    ax1.set_title("reward components (mean per step)")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    evals = [(s, h) for s, h in zip(steps, history) if "eval/kl" in h]
    if evals:
        ax2.plot([s for s, _ in evals], [h["eval/kl"] for _, h in evals], "o-", label="held-out KL (nats/token)")
        ax2b = ax2.twinx()
        ax2b.plot([s for s, _ in evals], [h.get("eval/top1") for _, h in evals], "s--", color="#e80", label="top-1")
        ax2b.set_ylabel("top-1 agreement")
    ax2.set_xlabel("environment steps")
    ax2.set_ylabel("held-out KL (nats/token)")
    ax2.set_title("held-out faithfulness during PPO")
    ax2.grid(alpha=0.3)
    fig.suptitle(title)
    out = _save(fig, path)
    plt.close(fig)
    return out


def write_plots(report: EvalReport, folder: Path) -> list[Path]:
    """KL by layer, and the PPO run's training curves when a PPO decoder with a history.json was evaluated."""
    folder = Path(folder)
    paths = [kl_by_layer(report, folder / "kl_by_layer.png")]
    ppo_decoder = report.decoders.get("PPO decoder")
    if ppo_decoder:
        history = Path(ppo_decoder).parent / "history.json"
        if history.is_file():
            paths.append(ppo_curves(read_json(history), folder / "ppo_training.png", f"PPO run {history.parent}"))
    return paths
