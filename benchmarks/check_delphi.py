"""`python -m benchmarks.check_delphi RUN [--labels local] [--features 20] [--keep-venv DIR]`: faithlens' detection and
fuzzing scores beside delphi's (EleutherAI's `eai-delphi` 0.1.3, in its own venv) on the same features, labels and
held-out contexts, through the same local OpenAI-compatible server and model.

1. A llama.cpp server (`benchmarks.llama_server`, needs `make server`) with the GGUF of `--server-model` on
   127.0.0.1; its API key is random, lives in this process's environment and is handed to the delphi child the
   same way, never written to a file.
2. For each of the first `--features` non-dense labelled features of RUN's selection (its `--labels` backend), the
   held-out contexts of `features score` (`interpret.scoring.held_out_contexts`, the same seeds): `--n-examples`
   activating contexts the labeller never saw and as many clean negatives.
3. faithlens scores them with its openai simulator: detection AUROC (P(yes) of each context from the first answer
   token's log-probs, one request per context, as its local simulator reads them) and fuzzing AUROC (the real
   firing tokens marked against as many random ones).
4. delphi's DetectionScorer and FuzzingScorer score the same label and contexts with their own prompts (few-shot,
   `--shown` contexts per request, a 0/1 list parsed from the answer), through a delphi `Client` that calls the
   same server. Per feature: delphi's accuracy over parsed answers, its AUROC (from the answer tokens' log-probs
   when the server returns them, else from the 0/1 predictions) and the share of requests whose answer it could
   not parse.

Prints both protocols' means, the per-feature Spearman correlation between them, and writes OUT (default
RUN/interpret/delphi_check.json). delphi's package requires vllm, faiss, sentence-transformers and sparsify at
import time for modules these scorers never call: the child stubs those four and installs only what the scorers use.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro

from benchmarks._venv import ensure_venv
from interpret.coverage import load_selection
from interpret.evidence import load_evidence
from interpret.labelers import OpenAILabeler
from interpret.labels import examples_shown, load_label_records
from interpret.run import InterpretRun
from interpret.score_stats import _average_ranks
from interpret.scoring import fuzzing_auroc, held_out_contexts, score_detection
from models.errors import ConfigError
from models.io import write_json_atomic

DELPHI = "eai-delphi==0.1.3"
DELPHI_DEPS = ("transformers", "safetensors", "numpy", "httpx", "orjson", "jaxtyping", "beartype", "asyncer",
               "blobfile", "tqdm", "simple_parsing", "tiktoken")
"""What the detection and fuzzing scorers import (delphi's own requirements pull vllm and a CUDA torch)."""
KEY_ENV = "FAITHLENS_DELPHI_CHECK_KEY"


@dataclass
class DelphiCheckConfig:
    run: Annotated[Path, tyro.conf.Positional]
    """A run folder with evidence and labels (`features evidence`, `features label`)."""

    labels: str = "local"
    """The label backend whose labels both protocols score."""

    features: int = 20
    """Features scored (the first non-dense ones of the label selection: its random sample, then --top)."""

    n_examples: int = 10
    """Held-out activating contexts and clean negatives per feature (each)."""

    shown: int = 5
    """delphi: contexts per request (its n_examples_shown); --n-examples must be a multiple of it."""

    server_model: str = "smollm2-135m-instruct"
    """The embedded model the server runs (its GGUF): smollm2-135m-instruct or qwen2.5-coder-1.5b-instruct."""

    threads: int = 2
    """Threads of the llama.cpp server (1 when another job shares a 2-core machine)."""

    keep_venv: Path | None = None
    """Folder for the delphi venv (.venv-delphi): created if missing, reused if present; default a temporary one."""

    out: Path | None = None
    """The result JSON (default RUN/interpret/delphi_check.json)."""

    def __post_init__(self) -> None:
        if self.features < 1 or self.n_examples < 1 or self.shown < 1 or self.threads < 1:
            raise ConfigError("--features, --n-examples, --shown and --threads must be at least 1")
        if self.n_examples % self.shown:
            raise ConfigError(f"--n-examples {self.n_examples} must be a multiple of --shown {self.shown} (delphi "
                              "drops a last, shorter request as unparsable)")


# Runs in the delphi venv: argv = input JSON, output JSON. The API key comes from the environment.
_CHILD = r'''
import asyncio, importlib.machinery, json, os, sys, types
from types import SimpleNamespace as NS

def _stub(name, **attrs):  # modules delphi imports at package import time, never used by these scorers
    m = types.ModuleType(name); m.__dict__.update(attrs); m.__spec__ = importlib.machinery.ModuleSpec(name, None)
    m.__getattr__ = lambda attr: None
    sys.modules[name] = m
for name in ("vllm", "vllm.distributed", "vllm.distributed.parallel_state", "vllm.inputs", "faiss",
             "sentence_transformers", "sparsify", "sparsify.data"):
    _stub(name)

import httpx, torch
import delphi
from delphi.clients import Client
from delphi.clients.client import Response
from delphi.latents import ActivatingExample, Latent, LatentRecord, NonActivatingExample
from delphi.scorers import DetectionScorer, FuzzingScorer

spec = json.loads(open(sys.argv[1]).read())

class Server(Client):
    """delphi's Client for an OpenAI-compatible /chat/completions with a bearer key (its OpenRouter client drops
    the log-prob arguments)."""
    def __init__(self, model, base_url, key):
        super().__init__(model)
        self.url, self.headers = base_url.rstrip("/") + "/chat/completions", {"Authorization": f"Bearer {key}"}
        self.http = httpx.AsyncClient(timeout=600)
    async def generate(self, prompt, **kw):
        body = {"model": self.model, "messages": prompt, "max_tokens": 48, "temperature": kw.get("temperature", 0.0)}
        if kw.get("logprobs"):
            body.update(logprobs=True, top_logprobs=kw.get("top_logprobs", 5))
        r = await self.http.post(self.url, json=body, headers=self.headers)
        r.raise_for_status()
        choice = r.json()["choices"][0]
        content = (choice.get("logprobs") or {}).get("content")
        logprobs = [NS(token=t["token"], top_logprobs=[NS(token=x["token"], logprob=x["logprob"])
                                                        for x in t.get("top_logprobs") or []]) for t in content or []]
        return Response(text=choice["message"]["content"] or "", logprobs=logprobs or None)

def example(ex, active):
    acts = torch.tensor(ex["acts"], dtype=torch.float)
    ids = torch.zeros(len(ex["tokens"]), dtype=torch.long)
    if active:
        return ActivatingExample(ids, acts, str_tokens=ex["tokens"])
    return NonActivatingExample(ids, acts, str_tokens=ex["tokens"])

def auroc(y, p):
    pos = [s for t, s in zip(y, p) if t]; neg = [s for t, s in zip(y, p) if not t]
    if not pos or not neg:
        return None
    return sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg))

client = Server(spec["model"], spec["url"], os.environ[spec["key_env"]])
out = {"delphi": delphi.__version__, "torch": torch.__version__, "features": {}}

async def main():
    for f in spec["features"]:
        active = [example(ex, True) for ex in f["active"]]
        negatives = [example(ex, False) for ex in f["negatives"]]
        record = LatentRecord(latent=Latent("faithlens", int(f["id"])), examples=active, test=active,
                              not_active=negatives, explanation=f["label"])
        row = {}
        for name, scorer in (("detection", DetectionScorer(client, n_examples_shown=spec["shown"], log_prob=True)),
                             ("fuzzing", FuzzingScorer(client, n_examples_shown=spec["shown"], log_prob=True))):
            results = (await scorer(record)).score
            parsed = [r for r in results if r.prediction is not None]
            scores = [(r.activating, r.probability if r.probability is not None else float(r.prediction)) for r in parsed]
            row[name] = {"n": len(results), "parsed": len(parsed),
                         "accuracy": sum(bool(r.correct) for r in parsed) / len(parsed) if parsed else None,
                         "auroc": auroc(*zip(*scores)) if scores else None,
                         "from_logprobs": any(r.probability is not None for r in parsed)}
        out["features"][str(f["id"])] = row
        print(json.dumps({"feature": f["id"], **row}), flush=True)

asyncio.run(main())
open(sys.argv[2], "w").write(json.dumps(out))
'''


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's ρ (Pearson correlation of the average ranks); None for fewer than 3 pairs or a constant side."""
    if len(a) < 3:
        return None
    ra, rb = _average_ranks(a), _average_ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / (va * vb) ** 0.5 if va and vb else None


def chosen_contexts(cfg: DelphiCheckConfig) -> list[dict]:
    """(id, label, held-out activating and negative contexts) of the features both protocols score."""
    run = InterpretRun(cfg.run)
    records = load_label_records(run)
    evidence = load_evidence(run)
    selection = load_selection(run)
    order = list(dict.fromkeys([*selection.sample, *selection.top])) if selection else sorted(records)
    chosen = []
    for fid in order:
        rec = records.get(int(fid), {}).get(cfg.labels)
        if rec is None or int(fid) not in evidence:
            continue
        ev = evidence[int(fid)]
        ctx = held_out_contexts(ev, examples_shown(rec, ev), cfg.n_examples, 0, random.Random(f"0-{fid}"))
        if ctx.dense or len(ctx.active) < cfg.n_examples or len(ctx.negatives) < cfg.n_examples:
            continue  # delphi's non-activating contexts must not fire; too few contexts cannot be compared
        chosen.append({"id": int(fid), "label": rec["label"], "ctx": ctx,
                       "active": [{"tokens": ex.tokens, "acts": ex.acts} for ex in ctx.active],
                       "negatives": [{"tokens": ex.tokens, "acts": ex.acts} for ex in ctx.negatives]})
        if len(chosen) == cfg.features:
            break
    if not chosen:
        raise ConfigError(f"{cfg.run}: no non-dense feature with a {cfg.labels} label and {cfg.n_examples} held-out "
                          "contexts per class")
    return chosen


def main(cfg: DelphiCheckConfig) -> dict:
    from benchmarks import llama_server

    if not llama_server.installed():
        raise ConfigError("the llama.cpp server is not installed: `make server`")
    features = chosen_contexts(cfg)
    out_path = cfg.out or InterpretRun(cfg.run).dir / "delphi_check.json"
    os.environ[KEY_ENV] = "sk-local-" + secrets.token_hex(12)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        venv = (cfg.keep_venv.resolve() if cfg.keep_venv else tmp) / ".venv-delphi"
        python = ensure_venv(venv, DELPHI_DEPS, "delphi, httpx, torch", no_deps=(DELPHI,))
        gguf = llama_server.embedded_gguf_path(cfg.server_model)
        with llama_server.serve(gguf, cfg.server_model, os.environ[KEY_ENV], tmp / "server.log", n_ctx=4096,
                                threads=cfg.threads) as url:
            simulator = OpenAILabeler(url, cfg.server_model, KEY_ENV, timeout_s=600.0)
            ours = {}
            for f in features:
                rng = random.Random(f"0-{f['id']}-fuzz")
                detection = score_detection(simulator, f["label"], f["ctx"], calibrate=False)["detection_auroc"]
                ours[str(f["id"])] = {"detection_auroc": detection,
                                      "fuzzing_auroc": fuzzing_auroc(simulator, f["label"], f["ctx"].active, rng)}
                print(json.dumps({"feature": f["id"], "faithlens": ours[str(f["id"])]}), flush=True)
            spec = {"model": cfg.server_model, "url": url, "key_env": KEY_ENV, "shown": cfg.shown,
                    "features": [{k: v for k, v in f.items() if k != "ctx"} for f in features]}
            (tmp / "in.json").write_text(json.dumps(spec))
            child = tmp / "delphi_child.py"
            child.write_text(_CHILD)
            done = subprocess.run([python, child, tmp / "in.json", tmp / "out.json"], env={**os.environ, "OMP_NUM_THREADS": "1"},
                                  stderr=subprocess.PIPE, text=True)  # its per-feature lines go to the terminal
            if done.returncode:
                raise RuntimeError(f"the delphi child failed:\n{done.stderr[-3000:]}")
            theirs = json.loads((tmp / "out.json").read_text())
    result = {"server_model": cfg.server_model, "labels": cfg.labels, "n_examples": cfg.n_examples, "shown": cfg.shown,
              "delphi": theirs["delphi"], "faithlens_judge": simulator.judge_mode, "features": {}, "summary": {}}
    for fid, row in ours.items():
        result["features"][fid] = {"label": next(f["label"] for f in features if str(f["id"]) == fid),
                                   "faithlens": row, "delphi": theirs["features"][fid]}
    for scorer in ("detection", "fuzzing"):
        pairs = [(r["faithlens"][f"{scorer}_auroc"], r["delphi"][scorer]["auroc"]) for r in result["features"].values()
                 if r["delphi"][scorer]["auroc"] is not None]
        parsed = sum(r["delphi"][scorer]["parsed"] for r in result["features"].values())
        total = sum(r["delphi"][scorer]["n"] for r in result["features"].values())
        accs = [r["delphi"][scorer]["accuracy"] for r in result["features"].values() if r["delphi"][scorer]["accuracy"] is not None]
        result["summary"][scorer] = {
            "features": len(result["features"]), "compared": len(pairs),
            "faithlens_mean_auroc": sum(a for a, _ in pairs) / len(pairs) if pairs else None,
            "delphi_mean_auroc": sum(b for _, b in pairs) / len(pairs) if pairs else None,
            "delphi_mean_accuracy": sum(accs) / len(accs) if accs else None,
            "delphi_parsed_share": parsed / total if total else None,
            "spearman": spearman([a for a, _ in pairs], [b for _, b in pairs])}
    write_json_atomic(out_path, result)
    for scorer, s in result["summary"].items():
        fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"{scorer}: {s['compared']} of {s['features']} features compared; mean AUROC faithlens {fmt(s['faithlens_mean_auroc'])}, "
              f"delphi {fmt(s['delphi_mean_auroc'])} (delphi accuracy {fmt(s['delphi_mean_accuracy'])}, answers parsed "
              f"{fmt(s['delphi_parsed_share'])}); Spearman {fmt(s['spearman'])}; chance AUROC 0.5")
    print(f"wrote {out_path}")
    return result


if __name__ == "__main__":
    try:
        main(tyro.cli(DelphiCheckConfig))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
