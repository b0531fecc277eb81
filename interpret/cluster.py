"""`faithlens features cluster RUN`: groups of features that point the same way and fire together.

similarity(i, j) = (1 − w)·cos(d_i, d_j) + w·J(i, j), with d the SAE decoder directions and J the
Jaccard index of the token sets on which they fire (from the evidence scan). Average-linkage
agglomerative clustering on 1 − similarity, cut at --threshold. A cluster's label is built from its
members' labels (their most frequent words) or, without labels, from their shared promoted tokens.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from interpret.config import ClusterConfig
from interpret.run import InterpretRun
from models.decoder import read_decoder_meta
from models.io import load_safetensors, read_json, write_json_atomic
from sae.model import SparseAutoencoder

_STOP = {"the", "a", "an", "of", "and", "or", "to", "in", "on", "for", "with", "is", "are", "token", "tokens", "word",
         "words", "feature", "fires", "at", "by", "as", "that", "this", "it", "its", "n-gram", "promotes", "·"}


def similarity(directions_ND: torch.Tensor, fires_TN, weight: float) -> np.ndarray:
    """(1 − w)·cosine of directions + w·Jaccard of firing sets; fires_TN is a scipy sparse 0/1 matrix."""
    d = torch.nn.functional.normalize(directions_ND.float(), dim=-1)
    cos = (d @ d.t()).numpy().astype(np.float64)
    if weight == 0 or fires_TN is None:
        return cos
    co = (fires_TN.T @ fires_TN).toarray().astype(np.float64)
    count = np.diag(co)
    union = count[:, None] + count[None, :] - co
    jac = np.divide(co, union, out=np.zeros_like(co), where=union > 0)
    return (1 - weight) * cos + weight * jac


def cluster_features(sim: np.ndarray, threshold: float) -> np.ndarray:
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    if len(sim) == 1:
        return np.ones(1, dtype=int)
    dist = np.clip(1 - sim, 0, None)
    np.fill_diagonal(dist, 0)
    return fcluster(linkage(squareform((dist + dist.T) / 2, checks=False), "average"), threshold, "distance")


def cluster_label(labels: list[str], promoted: list[list[str]]) -> str:
    words = Counter(w for text in labels for w in set(re.findall(r"[a-z][a-z'-]+", text.lower())) if w not in _STOP)
    common = [w for w, n in words.most_common(3) if n > 1 or len(labels) == 1]
    if common:
        return " / ".join(common)
    tokens = Counter(t.strip() for toks in promoted for t in toks if t.strip())
    return "promotes " + ", ".join(repr(t) for t, _ in tokens.most_common(3)) if tokens else "(unlabelled)"


def _firing_matrix(run: InterpretRun, features: list[int]):
    """Sparse [tokens, n] 0/1 matrix of where each chosen feature fires, from the evidence scan."""
    import scipy.sparse as sp

    path = run.dir / "evidence.safetensors"
    if not path.is_file():
        return None
    t = load_safetensors(path)
    idx = t["codes.indices"].flatten(0, 1).long()
    val = t["codes.values"].flatten(0, 1)
    col = torch.full((int(idx.max()) + 1,), -1, dtype=torch.long)
    col[torch.tensor(features)] = torch.arange(len(features))
    hit = (val > 0) & (col[idx] >= 0)
    rows = torch.arange(idx.shape[0])[:, None].expand_as(idx)[hit].numpy()
    cols = col[idx][hit].numpy()
    return sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(idx.shape[0], len(features)))


def run_cluster(cfg: ClusterConfig) -> dict:
    run = InterpretRun(cfg.run)
    meta = read_decoder_meta(run.decoder_dir)
    sae = SparseAutoencoder.load(run.sae_dir(meta.get("sae")))
    evidence = read_json(run.require(run.evidence, "features evidence"))["features"]
    if cfg.top and run.importance.is_file():
        ranked = [f["id"] for f in read_json(run.importance)["features"] if str(f["id"]) in evidence]
        features = ranked[: cfg.top]
    else:
        features = sorted(int(f) for f in evidence)[: cfg.top or None]
    labels: dict[int, str] = {}
    if run.labels.is_file():
        from interpret.labels import load_labels

        labels = load_labels(run)
    sim = similarity(sae.W_dec.detach()[torch.tensor(features)], _firing_matrix(run, features), cfg.coactivation_weight)
    assignment = cluster_features(sim, cfg.threshold)
    clusters = []
    for c in np.unique(assignment):
        members = [features[i] for i in np.nonzero(assignment == c)[0]]
        if len(members) < cfg.min_size:
            continue
        rows = [features.index(m) for m in members]
        block = sim[np.ix_(rows, rows)]
        mean_sim = float((block.sum() - len(rows)) / max(1, len(rows) * (len(rows) - 1)))
        label = cluster_label([labels[m] for m in members if m in labels],
                              [[t for t, _ in evidence[str(m)]["promoted"][:5]] for m in members])
        clusters.append({"features": members, "size": len(members), "label": label, "mean_similarity": mean_sim})
    clusters.sort(key=lambda c: -c["size"])
    for i, c in enumerate(clusters):
        c["id"] = i
    result = {"features": len(features), "threshold": cfg.threshold, "coactivation_weight": cfg.coactivation_weight,
              "clustered": sum(c["size"] for c in clusters), "clusters": clusters}
    write_json_atomic(run.clusters, result)
    table = Table(title=f"{len(clusters)} clusters of {len(features)} features")
    for col in ("cluster", "size", "mean similarity", "label", "features"):
        table.add_column(col)
    for c in clusters[:20]:
        table.add_row(str(c["id"]), str(c["size"]), f"{c['mean_similarity']:.2f}", escape(c["label"]),
                      escape(", ".join(map(str, c["features"][:8])) + (" …" if c["size"] > 8 else "")))
    Console().print(table)
    print(f"wrote {run.clusters}")
    return result
