"""Virtual environments for the peers the benchmarks compare with (sae-lens, sparsify, delphi): none of them is a
faithlens dependency, and each gets the local CPU torch 2.13.0, pinned, so that no CUDA build comes in."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TORCH = "torch==2.13.0"


def ensure_venv(venv: Path, packages: tuple[str, ...], check: str, no_deps: tuple[str, ...] = ()) -> Path:
    """The python of `venv` holding `packages` (and `no_deps`, installed without their dependencies) beside the CPU
    torch; created on first use, reused while `import {check}` works in it."""
    python = venv / "bin" / "python"
    if python.is_file() and subprocess.run([python, "-c", f"import {check}"], capture_output=True).returncode == 0:
        return python
    print(f"creating {venv} with {', '.join(packages + no_deps)} (a few minutes) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, TORCH], check=True)  # first and pinned: a plain torch is a multi-GB CUDA build
    subprocess.run([*pip, TORCH, *packages], check=True)
    if no_deps:
        subprocess.run([*pip, "--no-deps", *no_deps], check=True)
    return python
