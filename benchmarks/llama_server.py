"""A llama.cpp OpenAI-compatible server (`python -m llama_cpp.server`, from llama-cpp-python[server]: `make server`)
on 127.0.0.1 with one GGUF and an API key it checks; used by tests/test_server.py and benchmarks.check_delphi."""

from __future__ import annotations

import contextlib
import importlib.util
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None and importlib.util.find_spec("uvicorn") is not None


def embedded_gguf_path(name: str) -> Path:
    """The GGUF file of an embedded model (`embedded:NAME`), assembled and checked on first use."""
    from models.loading import EMBEDDED_MODELS, embedded_gguf

    return embedded_gguf(name, EMBEDDED_MODELS[name])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(gguf: Path, alias: str, api_key: str, log: Path, threads: int = 1, n_ctx: int = 2048,
          wait_s: float = 180.0) -> Iterator[str]:
    """The server's base URL (…/v1) while it runs; it is stopped on exit. Raises RuntimeError with the end of its
    log when it exits early or does not answer /v1/models within `wait_s`. One thread: with another job on a 2-core
    machine, two threads made generation several times slower."""
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", alias,
                                 "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(threads),
                                 "--n_ctx", str(n_ctx), "--api_key", api_key], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + wait_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the llama.cpp server exited ({proc.returncode}): {log.read_text()[-2000:]}")
            try:
                request = urllib.request.Request(url + "/models", headers={"Authorization": f"Bearer {api_key}"})
                with urllib.request.urlopen(request, timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the llama.cpp server did not answer /v1/models within {wait_s:.0f} s: "
                                   f"{log.read_text()[-2000:]}")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
