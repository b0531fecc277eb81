"""Method 2 of `explain`: an explanation decoder, features of one position → a short text.

Pairs come from the evidence scan: at each sampled position, the target text names the labels of the
`--names` most strongly active labelled features there ("label a; label b"). The model embeds the
position's sparse features (an EmbeddingBag weighted by activation) into the initial state of a GRU
that writes the text word by word. Held-out pairs measure it two ways: by what its text predicts (a
simulator model reads the text and judges whether it describes the marked token of its own position's context,
against another held-out position's: `simulator_auroc`, chance 0.5, beside the same for the target texts), and by
word overlap with the target (exact match, word F1), which only says how well it copies the labels.
`faithlens features explainer RUN` trains it into RUN/interpret/explainer.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from interpret.config import ExplainerConfig
from interpret.labelers import Simulator, mark_tokens
from interpret.run import InterpretRun
from interpret.score_stats import auroc
from models.io import atomic_path, load_safetensors, read_json, write_json_atomic
from models.progress import progress_bar

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
PAD, BOS, EOS, UNK = range(4)


def words(text: str) -> list[str]:
    return re.findall(r"[\w'-]+|[^\w\s]", text.lower())


class ExplanationDecoder(nn.Module):
    def __init__(self, num_latents: int, vocab: list[str], hidden: int, max_words: int = 24):
        super().__init__()
        self.vocab, self.max_words = vocab, max_words
        self.index = {w: i for i, w in enumerate(vocab)}
        self.features = nn.EmbeddingBag(num_latents, hidden, mode="sum")
        self.to_state = nn.Linear(hidden, hidden)
        self.embed = nn.Embedding(len(vocab), hidden, padding_idx=PAD)
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.out = nn.Linear(hidden, len(vocab))

    def encode_text(self, text: str) -> list[int]:
        return [BOS, *(self.index.get(w, UNK) for w in words(text))][: self.max_words - 1] + [EOS]

    def _state(self, indices_NK: Tensor, values_NK: Tensor) -> Tensor:
        return torch.tanh(self.to_state(self.features(indices_NK, per_sample_weights=values_NK.float())))[None]

    def forward(self, indices_NK: Tensor, values_NK: Tensor, words_NL: Tensor) -> Tensor:
        out, _ = self.gru(self.embed(words_NL), self._state(indices_NK, values_NK))
        return self.out(out)

    @torch.no_grad()
    def generate(self, indices_NK: Tensor, values_NK: Tensor) -> list[str]:
        h = self._state(indices_NK, values_NK)
        tok = torch.full((indices_NK.shape[0], 1), BOS)
        outs: list[list[str]] = [[] for _ in range(indices_NK.shape[0])]
        done = torch.zeros(indices_NK.shape[0], dtype=torch.bool)
        for _ in range(self.max_words):
            o, h = self.gru(self.embed(tok), h)
            tok = self.out(o[:, -1]).argmax(-1, keepdim=True)
            for i, t in enumerate(tok[:, 0].tolist()):
                if not done[i] and t not in (EOS, PAD):
                    outs[i].append(self.vocab[t])
            done |= tok[:, 0] == EOS
            if done.all():
                break
        return [_join(o) for o in outs]

    def save(self, directory) -> None:
        with atomic_path(directory) as tmp:
            tmp.mkdir()
            save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(tmp / "explainer.safetensors"))
            (tmp / "explainer.json").write_text(json.dumps({"vocab": self.vocab, "hidden": self.to_state.in_features,
                                                            "num_latents": self.features.num_embeddings,
                                                            "max_words": self.max_words}))

    @classmethod
    def load(cls, directory) -> ExplanationDecoder:
        meta = read_json(directory / "explainer.json")
        model = cls(meta["num_latents"], meta["vocab"], meta["hidden"], meta["max_words"])
        model.load_state_dict(load_safetensors(directory / "explainer.safetensors"))
        return model.eval()

    def describe(self, comp, text: str, chat: bool = False) -> str:
        from interpret.explain import encode_input

        ids = encode_input(comp, text, chat)
        h = comp.frozen.residuals(ids, [comp.layer])[comp.layer].float()
        indices, values = comp.features(h)
        return self.generate(indices[0, -1:], values[0, -1:])[0]


def _join(ws: list[str]) -> str:
    return re.sub(r"\s+([^\w\s'-])", r"\1", " ".join(ws))


def word_f1(pred: str, ref: str) -> float:
    p, r = words(pred), words(ref)
    common = sum(min(p.count(w), r.count(w)) for w in set(p))
    if not p or not r or common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)


def build_pairs(t: dict[str, Tensor], labels: dict[int, str], cfg: ExplainerConfig) -> tuple[Tensor, Tensor, list[str], Tensor]:
    """(indices_NK, values_NK, texts, rows) for positions of the evidence scan's tensors `t` with at least one
    labelled feature active; rows index its flattened (sequence, position) grid."""
    idx = t["codes.indices"].flatten(0, 1).long()
    val = t["codes.values"].flatten(0, 1).float()
    labelled = torch.zeros(int(idx.max()) + 1 if len(labels) == 0 else max(int(idx.max()), max(labels)) + 1, dtype=torch.bool)
    labelled[torch.tensor(sorted(labels), dtype=torch.long)] = True
    strength = val * labelled[idx]
    ok = (strength > 0).any(-1).nonzero().flatten()
    gen = torch.Generator().manual_seed(cfg.seed)
    chosen = ok[torch.randperm(len(ok), generator=gen)[: cfg.positions]]
    texts = []
    for row in chosen.tolist():
        order = strength[row].argsort(descending=True)[: cfg.names]
        names = [labels[int(idx[row, j])] for j in order.tolist() if strength[row, j] > 0]
        texts.append("; ".join(dict.fromkeys(names)))
    return idx[chosen], val[chosen], texts, chosen


def train_explainer(cfg: ExplainerConfig, labels: dict[int, str], run: InterpretRun, progress: bool = True,
                    simulator: Simulator | None = None) -> tuple[ExplanationDecoder, dict]:
    """The trained explanation decoder and its held-out metrics (with `simulator`: what its texts predict)."""
    torch.manual_seed(cfg.seed)
    evidence = load_safetensors(run.dir / "evidence.safetensors")
    indices, values, texts, rows = build_pairs(evidence, labels, cfg)
    if len(texts) < 10:
        from models.errors import ConfigError

        raise ConfigError(f"features explainer: only {len(texts)} positions have a labelled feature; label more features first")
    n_eval = max(1, int(len(texts) * cfg.eval_fraction))
    counts: dict[str, int] = {}
    for text in texts[n_eval:]:
        for w in words(text):
            counts[w] = counts.get(w, 0) + 1
    vocab = SPECIALS + sorted(counts)
    num_latents = int(read_json(run.evidence)["num_latents"])
    model = ExplanationDecoder(num_latents, vocab, cfg.hidden)
    encoded = [model.encode_text(t) for t in texts]
    L = max(len(e) for e in encoded)
    target = torch.full((len(texts), L), PAD)
    for i, e in enumerate(encoded):
        target[i, : len(e)] = torch.tensor(e)
    train = torch.arange(n_eval, len(texts))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    losses = []
    for step in progress_bar(range(cfg.steps), desc="explainer", unit="step", disable=not progress):
        b = train[torch.randint(len(train), (cfg.batch_size,))]
        logits = model(indices[b], values[b], target[b, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), target[b, 1:].flatten(), ignore_index=PAD)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    preds = []
    for start in range(0, n_eval, 512):
        preds += model.generate(indices[start : min(n_eval, start + 512)], values[start : min(n_eval, start + 512)])
    refs = [_join(words(t)) for t in texts[:n_eval]]
    metrics = {"pairs": len(texts), "eval_pairs": n_eval, "vocab": len(vocab), "final_loss": float(np.mean(losses[-50:])),
               "exact_match": float(np.mean([p == r for p, r in zip(preds, refs)])),
               "word_f1": float(np.mean([word_f1(p, r) for p, r in zip(preds, refs)])),
               "samples": [{"reference": r, "generated": p} for p, r in list(zip(preds, refs))[:5]]}
    if simulator is not None and cfg.score_pairs:
        contexts = position_contexts(evidence["tokens"], read_json(run.evidence)["vocab"], rows[:n_eval])
        metrics["simulator"] = {"model": getattr(simulator, "model_id", None), "chance": 0.5,
                                "generated": simulator_auroc(simulator, preds, contexts, cfg.score_pairs, cfg.seed),
                                "reference": simulator_auroc(simulator, refs, contexts, cfg.score_pairs, cfg.seed)}
    return model, metrics


def position_contexts(tokens: Tensor, vocab: list[str], rows: Tensor, before: int = 12) -> list[tuple[list[str], int]]:
    """Each row's context in the evidence scan's tokens [S, T]: up to `before` tokens before its position and the
    position itself (what the model had read there), with the position's index in that window."""
    T = tokens.shape[1]
    out = []
    for row in rows.tolist():
        s, p = divmod(int(row), T)
        lo = max(0, p - before)
        out.append(([vocab[t] for t in tokens[s, lo:p + 1].tolist()], p - lo))
    return out


def simulator_auroc(simulator: Simulator, texts: list[str], contexts: list[tuple[list[str], int]], n: int,
                    seed: int) -> dict:
    """What the texts predict: for each of the first `n` (text, context) pairs with a text, the simulator's P(the text
    describes the marked token) on its own context, and on the context of another pair whose text differs (the
    negative). AUROC of own against other over all of them: 1 = every text singles out its own position, 0.5 =
    chance. {auroc, n (texts scored), own_mean, other_mean}."""
    rng = random.Random(seed)
    pairs = [i for i in range(min(n, len(texts))) if texts[i].strip()]
    own, other = [], []
    for i in progress_bar(pairs, desc="simulator judges the texts", unit="text", leave=False):
        candidates = [j for j in range(len(texts)) if j != i and texts[j] != texts[i]]
        if not candidates:
            continue
        j = rng.choice(candidates)
        marked = [mark_tokens(tokens, [at]) for tokens, at in (contexts[i], contexts[j])]
        p_own, p_other = simulator.judge(texts[i], marked, "fuzzing")
        own.append(p_own)
        other.append(p_other)
    if not own:
        return {"auroc": None, "n": 0, "own_mean": None, "other_mean": None}
    return {"auroc": auroc([True] * len(own) + [False] * len(other), own + other), "n": len(own),
            "own_mean": float(np.mean(own)), "other_mean": float(np.mean(other))}


def run_explainer(cfg: ExplainerConfig) -> dict:
    from interpret.labels import load_labels

    run = InterpretRun(cfg.run)
    run.require(run.labels, "features label")
    labels = load_labels(run)
    simulator = None
    if cfg.score_pairs:
        from interpret.labelers import LocalLabeler

        simulator = LocalLabeler(cfg.simulator_model)
    model, metrics = train_explainer(cfg, labels, run, simulator=simulator)
    model.save(run.explainer)
    write_json_atomic(run.explainer.parent / "explainer_metrics.json", {**metrics, "config": {k: str(v) for k, v in asdict(cfg).items()}})
    sim = metrics.get("simulator")
    if sim and sim["generated"]["n"]:
        g, r = sim["generated"], sim["reference"]
        print(f"explanation decoder: simulator AUROC of its texts {g['auroc']:.3f} on {g['n']} held-out positions "
              f"(own context vs another; chance 0.5; the target labels' {r['auroc']:.3f}; simulator {sim['model']})")
    print(f"  word overlap with the target labels (how well it copies them): exact match {metrics['exact_match']:.3f}, "
          f"word F1 {metrics['word_f1']:.3f} on {metrics['eval_pairs']} pairs -> {run.explainer}")
    return metrics
