"""`python -m benchmarks.check_sae_import [--keep-venv DIR]`: import SAEs saved by the real sae-lens and sparsify.

In two virtual environments (neither library is a faithlens dependency; both get the local CPU torch 2.13.0,
pinned so that no CUDA build comes in), each library builds random SAEs of its architectures, saves them
in its own format, loads them back with its own loader and encodes and decodes fixed inputs. faithlens then
imports every folder with `sae import` and encodes and decodes the same inputs. Prints the max |Δ| per case
(latents and x̂) and exits 1 if one exceeds the tolerance relative to the library's largest value.

relu and jumprelu imports get a sparse width of every latent here (`--k-max`), so no token is capped.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro
from safetensors.torch import load_file, save_file

from benchmarks._venv import ensure_venv
from sae.importer import SaeImportConfig, import_sae
from sae.model import SparseAutoencoder

RTOL = 1e-5
D_IN, LATENTS, K, N_TOKENS = 64, 512, 16, 256
SCALE = 0.25  # expected_average_only_in: the ActivationScaler's factor

# Runs in the sae-lens venv: argv = root folder. Saves every case under root/<case>/src, and the library's
# own outputs (after loading the folder back with SAE.load_from_disk) as root/<case>/ref.safetensors.
_SAELENS_CHILD = '''
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
import sae_lens
from sae_lens import SAE, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig, JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.training.activation_scaler import ActivationScaler

root = Path(sys.argv[1])
D_IN, LATENTS, K, SCALE = %(D_IN)d, %(LATENTS)d, %(K)d, %(SCALE)r
x = load_file(str(root / "inputs.safetensors"))["x"]
torch.manual_seed(0)

def randomise(sae, threshold=None):
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn_like(sae.W_enc) / D_IN ** 0.5)
        sae.W_dec.copy_(torch.randn_like(sae.W_dec) / D_IN ** 0.5 * (0.5 + torch.rand(LATENTS, 1)))
        sae.b_enc.copy_(0.1 * torch.randn_like(sae.b_enc) - 0.5)
        sae.b_dec.copy_(0.1 * torch.randn_like(sae.b_dec))
        if threshold is not None:
            threshold.copy_(torch.rand_like(threshold) if threshold.dim() else torch.tensor(0.7))
    return sae

def meta(cfg, hook="blocks.2.hook_resid_post"):
    cfg.metadata.hook_name = hook
    cfg.metadata.model_name = "check-sae-import"
    return cfg

cases = {
    "standard": lambda: randomise(StandardSAE(meta(StandardSAEConfig(d_in=D_IN, d_sae=LATENTS)))),
    "standard, no b_dec on input": lambda: randomise(StandardSAE(meta(StandardSAEConfig(
        d_in=D_IN, d_sae=LATENTS, apply_b_dec_to_input=False)))),
    "topk": lambda: randomise(TopKSAE(meta(TopKSAEConfig(d_in=D_IN, d_sae=LATENTS, k=K)))),
    "topk, rescale_acts_by_decoder_norm": lambda: randomise(TopKSAE(meta(TopKSAEConfig(
        d_in=D_IN, d_sae=LATENTS, k=K, rescale_acts_by_decoder_norm=True)))),
    "topk, expected_average_only_in": lambda: randomise(TopKSAE(meta(TopKSAEConfig(
        d_in=D_IN, d_sae=LATENTS, k=K, normalize_activations="expected_average_only_in")))),
}
versions = {"sae_lens": sae_lens.__version__, "torch": torch.__version__}
loaded = {}
for i, (name, build) in enumerate(list(cases.items()) + [("jumprelu", None), ("batchtopk (saved as jumprelu)", None)]):
    folder = root / f"saelens-{i}"
    if name == "jumprelu":
        sae = JumpReLUSAE(meta(JumpReLUSAEConfig(d_in=D_IN, d_sae=LATENTS)))
        randomise(sae, sae.threshold)
        sae.save_model(folder / "src")
    elif name.startswith("batchtopk"):
        sae = BatchTopKTrainingSAE(meta(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=LATENTS, k=K)))
        randomise(sae, sae.topk_threshold)
        sae.save_inference_model(folder / "src")
    else:
        build().save_model(folder / "src")
    scaler = ActivationScaler(SCALE if "expected_average" in name else None)
    if scaler.scaling_factor is not None:  # what a SAELens training checkpoint keeps beside the SAE
        scaler.save(str(folder / "src" / "activation_scaler.json"))
    sae = SAE.load_from_disk(folder / "src")
    with torch.no_grad():
        latents = sae.encode(scaler(x))
        x_hat = scaler.unscale(sae.decode(latents))
    save_file({"latents": latents.contiguous(), "x_hat": x_hat.contiguous()}, str(folder / "ref.safetensors"))
    (folder / "case.json").write_text(json.dumps({"name": name, "library": "sae-lens",
                                                  "saved_as": json.loads((folder / "src" / "cfg.json").read_text())["architecture"],
                                                  "loaded_as": type(sae).__name__}))
print(json.dumps(versions))
'''

# Runs in the sparsify venv: a random SparseCoder saved as a run folder with one hookpoint, layers.2.
_SPARSIFY_CHILD = '''
import json, sys
from importlib.metadata import version
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
from sparsify import SparseCoder, SparseCoderConfig

root = Path(sys.argv[1])
D_IN, LATENTS, K = %(D_IN)d, %(LATENTS)d, %(K)d
x = load_file(str(root / "inputs.safetensors"))["x"]
torch.manual_seed(1)
for i, (name, options) in enumerate([("topk", {}), ("topk, multi_topk", {"multi_topk": True})]):
    folder = root / f"sparsify-{i}"
    sae = SparseCoder(D_IN, SparseCoderConfig(num_latents=LATENTS, k=K, **options))
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.randn_like(sae.encoder.weight) / D_IN ** 0.5)
        sae.encoder.bias.copy_(0.1 * torch.randn_like(sae.encoder.bias))
        sae.W_dec.copy_(torch.randn_like(sae.W_dec) / D_IN ** 0.5)
        sae.b_dec.copy_(0.1 * torch.randn_like(sae.b_dec))
    sae.save_to_disk(folder / "src" / "layers.2")
    sae = SparseCoder.load_from_disk(folder / "src" / "layers.2")
    with torch.no_grad():
        enc = sae.encode(x)
        latents = torch.zeros(x.shape[0], LATENTS).scatter_(1, enc.top_indices, enc.top_acts)
        x_hat = sae.decode(enc.top_acts, enc.top_indices)
    save_file({"latents": latents.contiguous(), "x_hat": x_hat.contiguous()}, str(folder / "ref.safetensors"))
    (folder / "case.json").write_text(json.dumps({"name": name, "library": "sparsify", "saved_as": "topk",
                                                  "loaded_as": type(sae).__name__}))
print(json.dumps({"sparsify": version("eai-sparsify"), "torch": torch.__version__}))
'''


@dataclass
class CheckConfig:
    keep_venv: Path | None = None
    """Folder for the two venvs (.venv-saelens, .venv-sparsify): created if missing, reused if present;
    default a temporary folder removed at the end."""


def _run_child(python: Path, code: str, root: Path) -> dict:
    script = root / f"child-{python.parent.parent.name}.py"
    script.write_text(code % {"D_IN": D_IN, "LATENTS": LATENTS, "K": K, "SCALE": SCALE})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "SPARSIFY_DISABLE_TRITON": "1"}
    done = subprocess.run([python, script, root], cwd=root, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{python}: the library failed to build or run its SAEs:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(case_dir: Path, x_ND: torch.Tensor) -> dict:
    case = json.loads((case_dir / "case.json").read_text())
    sae_dir = import_sae(SaeImportConfig(src=case_dir / "src", out=case_dir / "imported", k_max=LATENTS))
    sae = SparseAutoencoder.load(sae_dir)
    ref = load_file(str(case_dir / "ref.safetensors"))
    with torch.no_grad():
        enc = sae.encode(x_ND)
        ours = {"latents": sae.encode_dense(x_ND), "x_hat": sae.decode(enc.acts_NK, enc.indices_NK)}
    row = {**case, "ours": sae.cfg.arch, "hook": sae.meta["imported_from"]["hook"], "layer": sae.meta["layer"],
           "l0": (ref["latents"] > 0).float().sum(-1).mean().item()}
    for key in ("latents", "x_hat"):
        row[key] = (ours[key] - ref[key]).abs().max().item()
        row[f"{key}_rel"] = row[key] / ref[key].abs().max().item()
    row["pass"] = row["latents_rel"] <= RTOL and row["x_hat_rel"] <= RTOL
    return row


def table(rows: list[dict], versions: dict) -> str:
    lines = [f"sae-lens {versions['sae_lens']}, sparsify {versions['sparsify']} (torch {versions['torch']}): "
             f"max |Δ| of the faithlens import vs the library's own encode/decode; d_in {D_IN}, {LATENTS} latents, "
             f"k {K}, {N_TOKENS} tokens; tolerance {RTOL:g} of the library's largest value", "",
             "| library | case | saved as | imported as | hook → layer | L0 | latents max abs Δ (rel) | "
             "x̂ max abs Δ (rel) | result |",
             "|---|---|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['library']} | {r['name']} | {r['saved_as']} | {r['ours']} | {r['hook']} → {r['layer']} "
                     f"| {r['l0']:.1f} | {r['latents']:.2e} ({r['latents_rel']:.1e}) | {r['x_hat']:.2e} "
                     f"({r['x_hat_rel']:.1e}) | {'PASS' if r['pass'] else 'FAIL'} |")
    return "\n".join(lines)


def main(cfg: CheckConfig) -> int:
    with tempfile.TemporaryDirectory(prefix="sae-import-check-") as tmp:
        venvs = cfg.keep_venv.resolve() if cfg.keep_venv else Path(tmp)
        saelens = ensure_venv(venvs / ".venv-saelens", ("sae-lens",), "sae_lens")
        sparsify = ensure_venv(venvs / ".venv-sparsify", ("eai-sparsify",), "sparsify")
        root = Path(tmp) / "cases"
        root.mkdir()
        x_ND = 2 * torch.randn(N_TOKENS, D_IN, generator=torch.Generator().manual_seed(0))
        save_file({"x": x_ND}, str(root / "inputs.safetensors"))
        try:
            versions = {**_run_child(saelens, _SAELENS_CHILD, root), **_run_child(sparsify, _SPARSIFY_CHILD, root)}
        except RuntimeError as e:
            print(e, file=sys.stderr)
            return 1
        cases = sorted((p for p in root.iterdir() if (p / "case.json").is_file()),
                       key=lambda p: (p.name.split("-")[0] != "saelens", int(p.name.split("-")[1])))
        rows = [compare(case, x_ND) for case in cases]
    print(table(rows, versions))
    ok = all(r["pass"] for r in rows) and not any(math.isnan(r["x_hat"]) for r in rows)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main(tyro.cli(CheckConfig)))
