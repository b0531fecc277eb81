"""`python -m benchmarks.check_saelens_export [--keep-venv DIR]`: open our SAELens exports with the real sae-lens.

Builds one small random SAE per architecture (nothing is trained), exports each, and in a separate
virtual environment (sae-lens is not a faithlens dependency) loads them with `SAE.load_from_disk`
and encodes and decodes the same inputs. Prints the largest differences from our outputs and exits
1 if one exceeds the tolerance.

A few inputs are loud (4x the norm) so that more than `sparse_width` latents fire on them: there
our relu `encode` and our batchtopk SAE cap the latents and SAELens does not (see sae/export.py).
Those tokens are reported apart and not held to the tolerance; relu is also compared with our
dense `forward` on every token.
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
from sae.config import SaeConfig
from sae.export import SAELENS_ARCH, export_saelens, within_width
from sae.model import SparseAutoencoder

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4
D_IN, LATENTS, K = 64, 512, 16
N_TOKENS, N_LOUD = 256, 16
THRESHOLD = 2.0  # batchtopk, matryoshka, jumprelu (±20% per latent); ~12 of 512 latents fire per quiet token

# Runs inside the sae-lens venv: argv = folder, then one sub-folder per architecture.
_CHILD = '''
import json, sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import sae_lens
from sae_lens import SAE

torch.set_num_threads(1)
root = Path(sys.argv[1])
loaded = {}
for arch in sys.argv[2:]:
    sae = SAE.load_from_disk(root / arch / "saelens")
    inputs = load_file(str(root / arch / "inputs.safetensors"))
    with torch.no_grad():
        latents = sae.encode(inputs["x"])
        outputs = {"latents": latents, "x_hat": sae(inputs["x"]), "decoded_ours": sae.decode(inputs["latents"])}
    save_file({k: v.contiguous() for k, v in outputs.items()}, str(root / arch / "saelens_out.safetensors"))
    loaded[arch] = type(sae).__name__
print(json.dumps({"sae_lens": sae_lens.__version__, "torch": torch.__version__, "loaded": loaded}))
'''


@dataclass
class CheckConfig:
    keep_venv: Path = REPO / "runs" / ".venv-saelens"
    """Virtual environment with sae-lens: created if missing, reused if present."""


def random_sae(arch: str, g: torch.Generator) -> SparseAutoencoder:
    """Unit-scale random weights, nonzero biases; relu gets a negative b_enc so it is sparse like a trained one."""
    sae = SparseAutoencoder(SaeConfig(d_in=D_IN, num_latents=LATENTS, arch=arch, k=K))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(LATENTS, D_IN, generator=g) / D_IN**0.5)
        sae.W_dec.copy_(torch.randn(LATENTS, D_IN, generator=g) / D_IN**0.5)
        sae.b_enc.copy_(0.1 * torch.randn(LATENTS, generator=g) - (THRESHOLD if arch == "relu" else 0.0))
        sae.b_dec.copy_(0.1 * torch.randn(D_IN, generator=g))
        if arch == "jumprelu":  # one threshold per latent, around THRESHOLD
            sae.log_threshold.copy_((THRESHOLD * (0.8 + 0.4 * torch.rand(LATENTS, generator=g))).log())
        else:
            sae.threshold.fill_(THRESHOLD)
    sae.meta = {"layer": 3, "model": "check-saelens-export"}
    return sae.eval()


def random_inputs(g: torch.Generator) -> torch.Tensor:
    x_ND = torch.randn(N_TOKENS, D_IN, generator=g)
    x_ND[-N_LOUD:] *= 4  # loud tokens: more than sparse_width latents fire
    return x_ND


def _max_abs(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    diff = (a - b).abs()
    if mask is not None:
        diff = diff[mask]
    return diff.max().item() if diff.numel() else float("nan")


def compare(arch: str, sae: SparseAutoencoder, x_ND: torch.Tensor, theirs: dict) -> dict:
    """Max |Δ| between SAELens's outputs and ours: held to TOL where the export is exact, reported elsewhere."""
    with torch.no_grad():
        enc = sae.encode(x_ND)
        latents_NF = sae.encode_dense(x_ND)
        x_hat_ND = sae.decode(enc.acts_NK, enc.indices_NK)
        forward_ND = sae(x_ND).sae_out_ND
    exact_N = within_width(sae, x_ND)
    row = {
        "arch": arch, "saelens": SAELENS_ARCH[arch],
        "latents": _max_abs(theirs["latents"], latents_NF, exact_N),
        "decode": _max_abs(theirs["decoded_ours"], x_hat_ND),
        "x_hat": _max_abs(theirs["x_hat"], x_hat_ND, exact_N),
        "capped": int((~exact_N).sum()),
        "x_hat_capped": _max_abs(theirs["x_hat"], x_hat_ND, ~exact_N),
        # relu: SAELens standard is our dense forward, on every token
        "forward": _max_abs(theirs["x_hat"], forward_ND) if arch == "relu" else None,
    }
    judged = [row["latents"], row["decode"], row["x_hat"]] + ([row["forward"]] if arch == "relu" else [])
    row["pass"] = all(v <= TOL for v in judged)
    return row


def _fmt(v: float | None) -> str:
    return "—" if v is None or math.isnan(v) else f"{v:.2e}"


def table(rows: list[dict], saelens_version: str) -> str:
    lines = [
        f"SAELens {saelens_version}: max |Δ| vs faithlens, d_in {D_IN}, {LATENTS} latents, k {K}, "
        f"{N_TOKENS} tokens ({N_LOUD} loud), tolerance {TOL:g}", "",
        "| ours | SAELens | latents | decode | x̂ | capped tokens | x̂ on capped | relu forward() | result |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['saelens']} | {_fmt(r['latents'])} | {_fmt(r['decode'])} | {_fmt(r['x_hat'])} "
                     f"| {r['capped']}/{N_TOKENS} | {_fmt(r['x_hat_capped'])} | {_fmt(r['forward'])} "
                     f"| {'PASS' if r['pass'] else 'FAIL'} |")
    lines += ["", "latents, x̂ = SAELens encode, forward vs our encode_dense, decode(encode) on uncapped tokens; "
              "decode = SAELens decode of our latents vs ours, all tokens.",
              "capped = tokens where more than sparse_width latents fire: our encode keeps the top sparse_width, "
              "SAELens all (not judged).",
              "relu forward() = SAELens standard vs our dense forward(), all tokens."]
    return "\n".join(lines)


def main(cfg: CheckConfig) -> int:
    venv = cfg.keep_venv.resolve()
    if venv == (REPO / ".venv").resolve():
        print("--keep-venv: sae-lens must not go into faithlens's own .venv", file=sys.stderr)
        return 2
    python = ensure_venv(venv, ("sae-lens",), "sae_lens")
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="saelens-check-") as tmp:
        root = Path(tmp)
        cases = {}
        for arch in SAELENS_ARCH:
            sae, x_ND = random_sae(arch, g), random_inputs(g)
            export_saelens(sae, root / arch / "saelens")
            with torch.no_grad():
                save_file({"x": x_ND, "latents": sae.encode_dense(x_ND)}, str(root / arch / "inputs.safetensors"))
            cases[arch] = (sae, x_ND)
        (root / "child.py").write_text(_CHILD)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        done = subprocess.run([python, root / "child.py", root, *cases], cwd=root, env=env, capture_output=True, text=True)
        if done.returncode:
            print(f"sae-lens failed to load or run the exports:\n{done.stderr}", file=sys.stderr)
            return 1
        report = json.loads(done.stdout.strip().splitlines()[-1])
        rows = [compare(arch, sae, x_ND, load_file(str(root / arch / "saelens_out.safetensors")))
                for arch, (sae, x_ND) in cases.items()]
    print(table(rows, report["sae_lens"]))
    print(f"\nloaded as {', '.join(f'{a} -> {c}' for a, c in report['loaded'].items())} (torch {report['torch']})")
    ok = all(r["pass"] for r in rows)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main(tyro.cli(CheckConfig)))
