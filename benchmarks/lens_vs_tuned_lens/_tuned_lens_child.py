"""Train one AlignmentResearch tuned-lens translator on CPU; run by `benchmarks.lens_vs_tuned_lens` in
tuned-lens's own venv as a plain script (`VENV/bin/python _tuned_lens_child.py SPEC.json`), so it imports
nothing from faithlens.

tuned-lens's own training loop, `Train.execute` (its shuffling data loader, SGD with Nesterov momentum at its
default lr, linear decay, bf16 autocast, KL loss, gradient clipping, saving), runs unchanged. Its CLI would
fetch the model and the dataset from the hub, so three of its config ingredients are swapped for local ones:

- `Model.load` loads the local model folder, and wraps it in `OneLayerView`: the loop trains one translator
  per entry of `hidden_states`, and stock tuned-lens would train all of them at once. The view hands it
  the one layer asked for, without the BOS position (ours never scores BOS either).
- `Data.load` returns the pre-tokenised sequences our run trained on instead of tokenising a dataset.
- `Train.get_lens` builds a lens with that one translator.

After training, the translator is written into a full-size tuned-lens artifact (one translator per layer,
the others untouched, as `TunedLens.from_model` makes them), and tuned-lens's own forward on a few
residuals is saved so that the converted copy can be checked against it.

SPEC.json holds: model_dir, dataset_dir, layer, steps, batches_per_step, batch_sequences, seed,
train_dir, lens_dir, check_path, result_path.
"""

from __future__ import annotations

import importlib.metadata
import json
import resource
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

T_START = time.perf_counter()

import torch  # noqa: E402
import tuned_lens.scripts.ingredients as ing  # noqa: E402
from datasets import Dataset  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from tuned_lens import TunedLens  # noqa: E402
from tuned_lens.nn.lenses import TunedLensConfig  # noqa: E402
from tuned_lens.nn.unembed import Unembed  # noqa: E402
from tuned_lens.scripts.train_loop import Train  # noqa: E402

CHECK_SEQUENCES, CHECK_POSITIONS = 2, 32  # residuals on which tuned-lens's forward is saved for the check


class OneLayerView(torch.nn.Module):
    """The model as tuned-lens's loop sees it: `hidden_states` = (layer `layer`, a last entry the loop drops),
    both it and the logits without position 0 (BOS). Times the model's forward passes and counts the sequences."""

    def __init__(self, model: torch.nn.Module, layer: int):
        super().__init__()
        self.model, self.layer = model, layer
        self.lm_forward_s = 0.0
        self.sequences = 0
        self.first_forward_at: float | None = None

    def forward(self, input_ids: torch.Tensor, **_) -> types.SimpleNamespace:
        t0 = time.perf_counter()
        if self.first_forward_at is None:
            self.first_forward_at = t0
        out = self.model(input_ids=input_ids, output_hidden_states=True)
        self.lm_forward_s += time.perf_counter() - t0
        self.sequences += input_ids.shape[0]
        return types.SimpleNamespace(logits=out.logits[:, 1:], hidden_states=(out.hidden_states[self.layer][:, 1:], None))


@dataclass
class LocalModel(ing.Model):
    """The model ingredient, from a local folder (no hub), wrapped in `OneLayerView` (kept as `view`)."""

    layer: int = 0
    """The layer the view hands to the loop."""

    def load(self, device, must_use_cache: bool = False):
        model = AutoModelForCausalLM.from_pretrained(self.name, dtype="auto", local_files_only=True)  # "auto", its default
        model.eval().requires_grad_(False)
        self.view = OneLayerView(model.to(device), self.layer)
        return self.view, AutoTokenizer.from_pretrained(self.name, local_files_only=True)


class PretokenizedData(ing.Data):
    """The data ingredient: sequences already tokenised and packed (the ones ours trained on)."""

    def load(self, tokenizer):
        # nats_to_bpb only scales the wandb loss curves, which are off
        return Dataset.load_from_disk(self.name[0]).with_format("torch"), 1.0


class OneTranslatorTrain(Train):
    def get_lens(self, model: OneLayerView) -> TunedLens:
        """A lens with one translator: index 0, the view's only hidden state."""
        hf = model.model
        config = TunedLensConfig(base_model_name_or_path=str(hf.config.name_or_path), d_model=hf.config.hidden_size,
                                 num_hidden_layers=1)
        return TunedLens(Unembed(hf), config)


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    layer, steps = spec["layer"], spec["steps"]
    batch = spec["batch_sequences"]
    seq_len = len(Dataset.load_from_disk(spec["dataset_dir"])[0]["input_ids"])
    model_cfg = LocalModel(name=spec["model_dir"], layer=layer)
    opt_cfg = ing.Optimizer()  # SGD + Nesterov, lr_scale 1.0, momentum 0.9, weight decay 1e-3: tuned-lens's defaults
    train = OneTranslatorTrain(
        model=model_cfg, data=PretokenizedData(name=[spec["dataset_dir"]]), opt=opt_cfg,
        dist=ing.Distributed(per_gpu_batch_size=batch), output=Path(spec["train_dir"]), seed=spec["seed"],
        num_steps=steps, tokens_per_step=spec["batches_per_step"] * batch * seq_len,
    )
    train.execute()
    t_end = time.perf_counter()
    view = model_cfg.view
    fit_s = t_end - view.first_forward_at

    hf = view.model
    lens = TunedLens.from_model(hf)
    trained = torch.load(Path(spec["train_dir"]) / "params.pt", weights_only=True)
    lens.layer_translators[layer].load_state_dict({"weight": trained["0.weight"], "bias": trained["0.bias"]})
    lens.save(spec["lens_dir"])
    save_conversion_check(hf, lens, layer, Dataset.load_from_disk(spec["dataset_dir"]).with_format("torch"),
                          Path(spec["check_path"]))
    extra_s = time.perf_counter() - t_end  # the full-size artifact and the check: the benchmark's work, not tuned-lens's

    sgd = opt_cfg.create_optim([torch.nn.Parameter(torch.zeros(1))]).param_groups[0]
    result = {
        "versions": {p: importlib.metadata.version(p) for p in ("tuned-lens", "torch", "transformers", "torchdata",
                                                                  "datasets", "accelerate")},
        "torch_threads": torch.get_num_threads(), "model_dtype": str(hf.dtype).removeprefix("torch."),
        "layer": layer, "steps": steps, "batches_per_step": spec["batches_per_step"], "batch_sequences": batch,
        "sequences": view.sequences, "train_tokens": view.sequences * (seq_len - 1),
        "optimizer": {"name": opt_cfg.optimizer.value, "lr_scale": opt_cfg.lr_scale, "torch_lr": sgd["lr"],
                      "momentum": sgd["momentum"], "nesterov": sgd["nesterov"], "weight_decay": sgd["weight_decay"],
                      "warmup_steps": opt_cfg.warmup_steps, "schedule": "linear to 0", "grad_clip": 1.0,
                      "loss": train.loss.value, "autocast": "bf16"},
        "startup_s": view.first_forward_at - T_START, "fit_s": fit_s, "lm_forward_s": view.lm_forward_s,
        "train_only_s": fit_s - view.lm_forward_s, "benchmark_extra_s": extra_s,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "lens_dir": spec["lens_dir"],
    }
    Path(spec["result_path"]).write_text(json.dumps(result, indent=2) + "\n")


@torch.no_grad()
def save_conversion_check(model, lens: TunedLens, layer: int, dataset: Dataset, path: Path) -> None:
    """Residuals at `layer` and tuned-lens's own translated states and logits of them (no autocast)."""
    ids = dataset[:CHECK_SEQUENCES]["input_ids"]
    h = model(input_ids=ids, output_hidden_states=True).hidden_states[layer][:, 1 : 1 + CHECK_POSITIONS]
    h = h.flatten(0, 1).float().contiguous()
    save_file({"h": h, "translated": lens.transform_hidden(h, layer).float().contiguous(),
               "logits": lens(h, idx=layer).float().contiguous()}, str(path))


if __name__ == "__main__":
    main(sys.argv[1])
