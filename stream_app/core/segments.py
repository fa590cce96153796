"""Online segments: sequential k-means over standardized profile features, with stable segment ids.

Why hand-written rather than River's KMeans: its state is not exposed as explicit parameters (and pickle
is not allowed on topics), and a lean version costs a few microseconds per point. The model is small
(``k`` centroids, a running mean/variance) and serializes to plain numbers (``to_params``).

Stable ids: a segment id is the index of a centroid, and centroids are never reordered or re-seeded
after initialisation; they only move (MacQueen updates with a floor on the learning rate, so they
follow drift). "Segment 3" therefore keeps meaning the same region while the model learns, and the
drift of each centroid between two published versions is measurable (``drift``).
Initialisation is seeded and deterministic: ``warmup`` points fix the scaler, then k-means++ and a few
Lloyd passes over them place the centroids; from then on updates are online and O(k·d) per point.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SegmentModel:
    k: int = 6
    dims: tuple[int, ...] = ()
    min_rate: float = 0.002  # centroids keep learning at >= this rate, so they can follow drift
    warmup: int = 500  # points buffered (scaler + k-means++ seeding) before online updates start
    seed: int = 0
    version: int = 0
    n: int = 0
    mean: list[float] = field(default_factory=list)
    m2: list[float] = field(default_factory=list)
    centroids: list[list[float]] = field(default_factory=list)
    counts: list[float] = field(default_factory=list)
    buffer: list[list[float]] = field(default_factory=list)  # only during warm-up

    # -- River-style API -----------------------------------------------------------------------
    def predict_one(self, x: Sequence[float]) -> int:
        """Segment id of a feature vector; -1 while the model is still warming up. Never mutates."""
        if len(self.centroids) < self.k:
            return -1
        return _nearest(self.centroids, self._scale(x))

    def learn_one(self, x: Sequence[float]) -> None:
        """Learn from one feature vector (mutates, like River's ``learn_one``)."""
        v = [x[i] for i in self.dims] if self.dims else list(x)
        if len(self.centroids) < self.k:
            self._observe(v)
            if self.n >= self.warmup and len(self.buffer) >= self.k:
                self._seed()
            return
        z = self._scale(x)
        j = _nearest(self.centroids, z)
        self.counts[j] += 1.0
        rate = max(1.0 / self.counts[j], self.min_rate)
        c = self.centroids[j]
        for i, zi in enumerate(z):
            c[i] += rate * (zi - c[i])

    def _observe(self, v: list[float]) -> None:
        """Warm-up: update the scaler (Welford) and keep the point for seeding."""
        if not self.mean:
            self.mean, self.m2 = [0.0] * len(v), [0.0] * len(v)
        self.n += 1
        for i, xi in enumerate(v):
            d = xi - self.mean[i]
            self.mean[i] += d / self.n
            self.m2[i] += d * (xi - self.mean[i])
        if len(self.buffer) < 2 * self.warmup:  # bounded even if fewer than k distinct points ever arrive
            self.buffer.append(v)

    def _seed(self) -> None:
        """k-means++ on the warm-up buffer (seeded), then a few Lloyd passes; the scaler is fixed from here
        on, so a segment id keeps meaning the same region."""
        rnd = random.Random(self.seed)
        pts = [self._scale(v, already_selected=True) for v in self.buffer]
        centroids = [list(pts[rnd.randrange(len(pts))])]
        while len(centroids) < self.k:
            d2 = [min(_dist2(c, z) for c in centroids) for z in pts]
            total = sum(d2)
            if total == 0:
                break
            r, acc = rnd.random() * total, 0.0
            for z, w in zip(pts, d2, strict=True):
                acc += w
                if acc >= r:
                    centroids.append(list(z))
                    break
        if len(centroids) < self.k:
            return  # fewer distinct points than segments so far: keep warming up
        for _ in range(10):
            groups: list[list[list[float]]] = [[] for _ in centroids]
            for z in pts:
                groups[_nearest(centroids, z)].append(z)
            centroids = [[sum(col) / len(g) for col in zip(*g, strict=True)] if g else c
                         for g, c in zip(groups, centroids, strict=True)]  # fmt: skip
        self.centroids = centroids
        self.counts = [float(max(len(g), 1)) for g in groups]
        self.buffer = []

    # -- parameters ----------------------------------------------------------------------------
    def to_params(self, with_buffer: bool = True) -> dict[str, Any]:
        """Explicit parameters. Scoring workers need no warm-up buffer (up to 2 x warmup raw vectors,
        ~180 KB): published versions leave it out, the trainer's learning state keeps it."""
        return {
            "k": self.k, "dims": list(self.dims), "min_rate": self.min_rate, "warmup": self.warmup,
            "seed": self.seed, "version": self.version, "n": self.n, "mean": self.mean, "m2": self.m2,
            "centroids": self.centroids, "counts": self.counts,
            "buffer": self.buffer if with_buffer else [],
        }  # fmt: skip

    @classmethod
    def from_params(cls, p: dict[str, Any]) -> SegmentModel:
        return cls(
            k=p["k"], dims=tuple(p["dims"]), min_rate=p["min_rate"], warmup=p["warmup"], seed=p["seed"],
            version=p["version"], n=p["n"], mean=list(p["mean"]), m2=list(p["m2"]),
            centroids=[list(c) for c in p["centroids"]], counts=list(p["counts"]),
            buffer=[list(b) for b in p["buffer"]],
        )  # fmt: skip

    def _scale(self, x: Sequence[float], already_selected: bool = False) -> list[float]:
        v = [x[i] for i in self.dims] if self.dims and not already_selected else x
        n = max(self.n - 1, 1)
        return [(xi - m) / (math.sqrt(s / n) or 1.0) for xi, m, s in zip(v, self.mean, self.m2, strict=True)]


def drift(old: SegmentModel, new: SegmentModel) -> list[float]:
    """Euclidean distance each centroid moved between two versions (scaled units).

    >>> m = SegmentModel(k=2, warmup=4)
    >>> for x in ([0.0], [10.0], [0.0], [10.0]): m.learn_one(x)
    >>> before = SegmentModel.from_params(m.to_params())
    >>> m.learn_one([10.0]); m.learn_one([12.0]); m.predict_one([0.0]) != m.predict_one([12.0])
    True
    >>> sorted(round(d, 3) for d in drift(before, m))
    [0.0, 0.087]
    """
    return [math.sqrt(_dist2(a, b)) for a, b in zip(old.centroids, new.centroids, strict=False)]


def _nearest(centroids: list[list[float]], z: Sequence[float]) -> int:
    dist = math.dist  # C loop: about 5x faster than a Python sum over 18 dimensions
    best, best_d = 0, math.inf
    for j, c in enumerate(centroids):
        d = dist(c, z)
        if d < best_d:
            best, best_d = j, d
    return best


def _dist2(a: Sequence[float], b: Sequence[float]) -> float:
    return math.dist(a, b) ** 2
