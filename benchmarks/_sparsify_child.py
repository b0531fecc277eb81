"""Train one EleutherAI sparsify TopK SAE on CPU; run by `benchmarks.sae_vs_sparsify` in sparsify's own venv.

Runs there as a plain script (`VENV/bin/python _sparsify_child.py SPEC.json`), so it imports nothing
from faithlens. sparsify's CLI cannot be used on CPU (`load_artifacts` hard-codes a `cuda:{rank}`
device_map), so this calls `sparsify.Trainer` directly, which is the code path the CLI takes after
loading. The model is loaded with `num_hidden_layers` cut at the hookpoint: stock sparsify would
run every block above it on every batch for nothing.

SPEC.json holds: model_dir, dataset_dir, layer (faithlens numbering: hookpoint `layers.{layer-1}`),
latents, k, batch_size (sequences), exclude_tokens, save_dir, log_path, result_path.
"""

from __future__ import annotations

import json
import sys
import time
import types
from pathlib import Path

T_START = time.perf_counter()

import sparsify  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from sparsify import SparseCoder, SparseCoderConfig, TrainConfig, Trainer  # noqa: E402
from transformers import AutoModel  # noqa: E402

RUN_NAME = "run"
CHECK_SEQUENCES = 2  # sequences whose activations and SAE outputs are saved to check the conversion


def stub_wandb(log_path: Path) -> None:
    """sparsify reports metrics only to wandb; this stand-in appends them to a JSON-lines file."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("")
    start = time.perf_counter()

    def log(info: dict, step: int | None = None, **_) -> None:
        with log_path.open("a") as f:
            f.write(json.dumps({"step": step, "elapsed_s": time.perf_counter() - start, **info}) + "\n")

    module = types.ModuleType("wandb")
    module.init = lambda **_: None
    module.log = log
    module.finish = lambda **_: None
    sys.modules["wandb"] = module


class LmTimer:
    """Wall time of the LM forward up to the hookpoint, so fit time splits into LM and SAE parts.

    Starts at the model's forward pre-hook and stops at a forward hook on the hooked block that
    is registered before sparsify's own per-batch hook (hooks run in registration order).
    """

    def __init__(self, model: torch.nn.Module, block: torch.nn.Module):
        self.seconds = 0.0
        self._t0 = 0.0
        model.register_forward_pre_hook(self._start)
        block.register_forward_hook(self._stop)

    def _start(self, *_):
        self._t0 = time.perf_counter()

    def _stop(self, *_):
        self.seconds += time.perf_counter() - self._t0


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    stub_wandb(Path(spec["log_path"]))
    hookpoint = f"layers.{spec['layer'] - 1}"  # faithlens layer L = output of HF block L-1

    model = AutoModel.from_pretrained(spec["model_dir"], num_hidden_layers=spec["layer"], dtype=torch.float32)
    model.eval()
    dataset = Dataset.load_from_disk(spec["dataset_dir"]).with_format("torch")  # already shuffled
    cfg = TrainConfig(
        SparseCoderConfig(activation="topk", num_latents=spec["latents"], k=spec["k"]),
        batch_size=spec["batch_size"],
        loss_fn="fvu",
        hookpoints=[hookpoint],
        exclude_tokens=spec["exclude_tokens"],
        dead_feature_threshold=spec["dead_feature_threshold"],
        save_every=10**9,  # only the final save
        save_dir=spec["save_dir"],
        run_name=RUN_NAME,
        log_to_wandb=True,
    )
    trainer = Trainer(cfg, dataset, model)
    timer = LmTimer(model, model.get_submodule(hookpoint))
    t_fit = time.perf_counter()
    trainer.fit()
    fit_s, lm_forward_s = time.perf_counter() - t_fit, timer.seconds

    sae_dir = Path(spec["save_dir"]) / RUN_NAME / hookpoint
    steps = len(dataset) // cfg.batch_size
    ids = dataset[: steps * cfg.batch_size]["input_ids"]
    trained_tokens = int(torch.isin(ids, torch.tensor(cfg.exclude_tokens, dtype=torch.long), invert=True).sum())
    save_conversion_check(model, hookpoint, sae_dir, ids[:CHECK_SEQUENCES], Path(spec["result_path"]).parent)
    result = {
        "sparsify_version": sparsify.__version__, "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(), "hookpoint": hookpoint, "sae_dir": str(sae_dir),
        "steps": steps, "batch_sequences": cfg.batch_size, "train_tokens": trained_tokens,
        "lr": trainer.optimizers[0].param_groups[0]["lr"], "optimizer": cfg.optimizer,
        "startup_s": t_fit - T_START, "fit_s": fit_s, "lm_forward_s": lm_forward_s,
        "sae_train_s": fit_s - lm_forward_s,
    }
    Path(spec["result_path"]).write_text(json.dumps(result, indent=2) + "\n")


@torch.no_grad()
def save_conversion_check(model, hookpoint: str, sae_dir: Path, ids_BT: torch.Tensor, out_dir: Path) -> None:
    """Activations and the saved SAE's own reconstruction of them, to test the converted copy against."""
    store = {}
    handle = model.get_submodule(hookpoint).register_forward_hook(
        lambda _m, _i, out: store.setdefault("x", (out[0] if isinstance(out, tuple) else out).detach()))
    try:
        model(ids_BT)
    finally:
        handle.remove()
    x = store["x"][:, 1:].flatten(0, 1).float().contiguous()  # BOS positions are never trained on
    sae = SparseCoder.load_from_disk(sae_dir)
    save_file({"x": x, "sae_out": sae(x).sae_out.float().contiguous()}, str(out_dir / "conversion_check.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1])
