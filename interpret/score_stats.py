"""The statistics of label scoring: AUROC (Mann–Whitney), balanced accuracy at a calibrated threshold, the
exact chance rate of an uninformative label, Wilson intervals and the shuffled-label control's derangement."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

VERIFIED_AUROC = 0.8
"""Detection AUROC a label needs (besides beating the control) to be verified."""
CHANCE_TARGET = 0.01
"""Largest accepted probability that a label saying nothing reaches VERIFIED_AUROC; sets the default n_examples."""


def balanced_accuracy(y_true: Sequence[bool], p: Sequence[float], threshold: float = 0.5) -> float:
    """Mean of the true-positive and true-negative rates of `p >= threshold`."""
    pos = [pi >= threshold for yi, pi in zip(y_true, p) if yi]
    neg = [pi < threshold for yi, pi in zip(y_true, p) if not yi]
    if not pos or not neg:
        raise ValueError("balanced accuracy needs at least one positive and one negative example")
    return 0.5 * (sum(pos) / len(pos) + sum(neg) / len(neg))


def calibrated_threshold(y_true: Sequence[bool], p: Sequence[float]) -> float:
    """The threshold t that maximises the balanced accuracy of `p >= t` on these examples.

    Candidates: the lowest value, and the midpoints between neighbouring distinct values; the lowest best wins.
    """
    values = sorted(set(p))
    candidates = values[:1] + [(a + b) / 2 for a, b in zip(values, values[1:])]
    return max(candidates, key=lambda t: (balanced_accuracy(y_true, p, t), -t))


def auroc(y_true: Sequence[bool], scores: Sequence[float]) -> float:
    """P(score of a random positive > score of a random negative), ties counting half (Mann–Whitney U)."""
    n_pos = sum(1 for y in y_true if y)
    n_neg = len(y_true) - n_pos
    if not n_pos or not n_neg:
        raise ValueError("AUROC needs at least one positive and one negative example")
    rank_sum = sum(r for r, y in zip(_average_ranks(scores), y_true) if y)
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, tied values sharing the mean of their ranks."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for j in range(start, end + 1):
            ranks[order[j]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


@lru_cache(maxsize=256)
def chance_rate(n_pos: int, n_neg: int, threshold: float = VERIFIED_AUROC) -> float:
    """P(AUROC ≥ threshold) for scores that carry no information (every ordering equally likely, no ties).

    Dynamic programming over the null distribution of U (pairs with the positive ranked above): the largest
    of i positives and j negatives is a positive with probability i / (i + j), and then beats all j negatives.
    """
    if n_pos < 1 or n_neg < 1:
        raise ValueError("a chance rate needs at least one positive and one negative example")
    dist = [np.ones(1)] * (n_neg + 1)  # i = 0 positives: U = 0 whatever j
    for i in range(1, n_pos + 1):
        row = [np.ones(1)]
        for j in range(1, n_neg + 1):
            d = np.zeros(i * j + 1)
            d[j:] += i / (i + j) * dist[j]
            d[: i * (j - 1) + 1] += j / (i + j) * row[j - 1]
            row.append(d)
        dist = row
    u_min = math.ceil(threshold * n_pos * n_neg - 1e-9)
    return float(dist[n_neg][u_min:].sum())


def fewest_examples(target: float = CHANCE_TARGET, threshold: float = VERIFIED_AUROC, limit: int = 200) -> int:
    """The fewest n per class for which chance_rate(n, n) < target."""
    for n in range(1, limit + 1):
        if chance_rate(n, n, threshold) < target:
            return n
    raise ValueError(f"no n up to {limit} brings the chance rate below {target}")


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k / n (95% for the default z)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def derangement(n: int, rng: random.Random) -> list[int]:
    """A uniformly random permutation of range(n) that moves every element (rejection sampling, n ≥ 2)."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 elements, got {n}")
    while True:
        perm = list(range(n))
        rng.shuffle(perm)
        if all(i != p for i, p in enumerate(perm)):
            return perm
