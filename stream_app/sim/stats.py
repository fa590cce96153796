"""Measures for the evaluation, in numpy: ROC AUC, log loss, calibration, adjusted Rand index, intervals."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Exact ROC AUC (Mann-Whitney, ties count half); NaN unless both classes occur.

    >>> roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    0.75
    >>> roc_auc([0.5, 0.5], [0, 1])
    0.5
    """
    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels, dtype=bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if not pos or not neg:
        return math.nan
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (ties broken by order; enough for continuous scores).

    >>> spearman([1, 2, 3, 4], [10, 20, 30, 40]), spearman([1, 2, 3], [3, 2, 1])
    (1.0, -1.0)
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(x) < 3:
        return math.nan
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    if rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def log_loss(probs: Sequence[float], labels: Sequence[bool]) -> float:
    """Mean negative log likelihood.

    >>> round(log_loss([0.5, 0.5], [0, 1]), 4)
    0.6931
    """
    p = np.clip(np.asarray(probs, dtype=float), 1e-7, 1 - 1e-7)
    y = np.asarray(labels, dtype=bool)
    if not len(p):
        return math.nan
    return float(-np.mean(np.where(y, np.log(p), np.log(1 - p))))


def calibration(probs: Sequence[float], labels: Sequence[bool], truth: Sequence[float], bins: int = 10) -> list[dict]:
    """Per quantile bin of the predicted probability: mean prediction, observed rate, mean true probability."""
    p, y, t = (np.asarray(a, dtype=float) for a in (probs, labels, truth))
    if not len(p):
        return []
    edges = np.unique(np.quantile(p, np.linspace(0, 1, bins + 1)))
    which = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, max(len(edges) - 2, 0))
    out = []
    for b in range(max(len(edges) - 1, 1)):
        m = which == b
        if m.any():
            out.append({"n": int(m.sum()), "predicted": float(p[m].mean()), "observed": float(y[m].mean()),
                        "true": float(t[m].mean())})  # fmt: skip
    return out


def _comb2(n: np.ndarray | float) -> np.ndarray | float:
    return n * (n - 1) / 2


def adjusted_rand_index(a: Sequence[int], b: Sequence[int]) -> float:
    """Hubert and Arabie's adjusted Rand index of two labelings (1: identical partitions, ~0: chance).

    The examples are scikit-learn's documented values for ``adjusted_rand_score``.

    >>> adjusted_rand_index([0, 0, 1, 1], [1, 1, 0, 0])
    1.0
    >>> round(adjusted_rand_index([0, 0, 1, 2], [0, 0, 1, 1]), 4)
    0.5714
    >>> adjusted_rand_index([0, 0, 0, 0], [0, 1, 2, 3])
    0.0
    """
    x, y = np.asarray(a), np.asarray(b)
    if len(x) != len(y):
        raise ValueError("labelings differ in length")
    n = len(x)
    if n < 2:
        return 1.0
    _, xi = np.unique(x, return_inverse=True)
    _, yi = np.unique(y, return_inverse=True)
    table = np.zeros((xi.max() + 1, yi.max() + 1))
    np.add.at(table, (xi, yi), 1)
    index = _comb2(table).sum()
    rows, cols = _comb2(table.sum(axis=1)).sum(), _comb2(table.sum(axis=0)).sum()
    expected = rows * cols / _comb2(n)
    top = (rows + cols) / 2
    if top == expected:
        return 1.0
    return float((index - expected) / (top - expected))


def mean_ci(values: Sequence[float], z: float = 1.96) -> tuple[float, float, float]:
    """Mean and a normal-approximation 95% interval (t-free; with 3 seeds read it as rough)."""
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=float)
    if not len(v):
        return math.nan, math.nan, math.nan
    m = float(v.mean())
    half = z * float(v.std(ddof=1)) / math.sqrt(len(v)) if len(v) > 1 else math.nan
    return m, m - half, m + half


def bootstrap_ci(
    groups: Sequence[np.ndarray], statistic: Callable[[list[np.ndarray]], float], reps: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Percentile 95% interval of ``statistic`` over resamples of the rows of each group (e.g. users per seed).

    >>> x = np.arange(100.0).reshape(-1, 1)
    >>> lo, hi = bootstrap_ci([x], lambda g: float(g[0].mean()), reps=500)
    >>> 40 < lo < 49.5 < hi < 59
    True
    """
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(reps):
        stats.append(statistic([g[rng.integers(0, len(g), len(g))] for g in groups]))
    lo, hi = np.nanpercentile(stats, [2.5, 97.5])
    return float(lo), float(hi)
