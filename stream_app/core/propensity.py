"""Propensity: an online logistic regression per campaign, learned with River, scored from explicit params.

Two roles, two types:
- ``PropensityLearner`` (one per campaign, owned by a single trainer): a running standardizer plus River's
  ``LogisticRegression`` with plain SGD. ``learn_one(x, y)`` on each delayed label.
- ``PropensityScorer`` (every worker): an immutable snapshot built from ``to_params()`` output, i.e. a
  list of weights, an intercept, the scaler's means and scales and a version. Scoring is a dot product
  with no River object in the hot path, and ``contributions`` explains a score feature by feature.

Parameters are plain JSON numbers (no pickle): they can travel through a Kafka topic and be restored
by another process, which then continues learning exactly where the previous one stopped.

Cold start: until ``min_labels`` labels have arrived the score is shrunk towards the campaign's
prior conversion rate (``n / (n + min_labels)`` weight on the model), and ``is_warm`` says so, so the
policy can explore instead of trusting an untrained model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from river import linear_model, optim

from stream_app.core.features import FEATURE_NAMES


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


class PropensityLearner:
    """Online logistic regression on standardized features (mutating ``learn_one``, River style)."""

    def __init__(
        self, campaign: str, prior: float = 0.02, min_labels: int = 200, lr: float = 0.02, l2: float = 1e-4
    ) -> None:
        self.campaign = campaign
        self.prior = prior
        self.min_labels = min_labels
        self.lr, self.l2 = lr, l2
        self.version = 0
        self.n_labels = 0
        self.n_positive = 0
        d = len(FEATURE_NAMES)
        self.mean = [0.0] * d
        self.m2 = [0.0] * d
        self.model = linear_model.LogisticRegression(optimizer=optim.SGD(lr), l2=l2, intercept_lr=lr)

    def learn_one(self, x: Sequence[float], y: bool) -> None:
        self.n_labels += 1
        self.n_positive += int(y)
        for i, xi in enumerate(x):  # Welford running mean / variance
            d = xi - self.mean[i]
            self.mean[i] += d / self.n_labels
            self.m2[i] += d * (xi - self.mean[i])
        self.model.learn_one(dict(zip(FEATURE_NAMES, self._scale(x), strict=True)), bool(y))

    def _scale(self, x: Sequence[float]) -> list[float]:
        return [(xi - m) / s for xi, m, s in zip(x, self.mean, self._scales(), strict=True)]

    def _scales(self) -> list[float]:
        n = max(self.n_labels - 1, 1)
        return [math.sqrt(v / n) or 1.0 for v in self.m2]

    def to_params(self) -> dict[str, Any]:
        weights = self.model._weights
        return {
            "campaign": self.campaign, "version": self.version, "prior": self.prior,
            "min_labels": self.min_labels, "lr": self.lr, "l2": self.l2,
            "n_labels": self.n_labels, "n_positive": self.n_positive,
            "mean": list(self.mean), "m2": list(self.m2), "scales": self._scales(),
            "weights": [float(weights.get(n, 0.0)) for n in FEATURE_NAMES],
            "intercept": float(self.model.intercept), "sgd_iterations": self.model.optimizer.n_iterations,
            "features": list(FEATURE_NAMES),
        }  # fmt: skip

    @classmethod
    def from_params(cls, p: dict[str, Any]) -> PropensityLearner:
        if tuple(p["features"]) != FEATURE_NAMES:
            raise ValueError("model parameters were trained on a different feature set")
        m = cls(p["campaign"], prior=p["prior"], min_labels=p["min_labels"], lr=p["lr"], l2=p["l2"])
        m.version, m.n_labels, m.n_positive = p["version"], p["n_labels"], p["n_positive"]
        m.mean, m.m2 = list(p["mean"]), list(p["m2"])
        for name, w in zip(FEATURE_NAMES, p["weights"], strict=True):
            m.model._weights[name] = w
        m.model.intercept = p["intercept"]
        m.model.optimizer.n_iterations = p["sgd_iterations"]
        return m


@dataclass(frozen=True)
class PropensityScorer:
    """An immutable, River-free snapshot for scoring on every worker."""

    campaign: str
    version: int
    weights: tuple[float, ...]
    intercept: float
    mean: tuple[float, ...]
    scales: tuple[float, ...]
    prior: float
    n_labels: int
    min_labels: int

    @classmethod
    def from_params(cls, p: dict[str, Any]) -> PropensityScorer:
        if tuple(p["features"]) != FEATURE_NAMES:
            raise ValueError("model parameters were trained on a different feature set")
        return cls(p["campaign"], p["version"], tuple(p["weights"]), p["intercept"], tuple(p["mean"]),
                   tuple(p["scales"]), p["prior"], p["n_labels"], p["min_labels"])  # fmt: skip

    @classmethod
    @lru_cache(maxsize=256)  # immutable; asked for on every decision of a campaign that has no model yet
    def cold(cls, campaign: str, prior: float = 0.02, min_labels: int = 200) -> PropensityScorer:
        d = len(FEATURE_NAMES)
        return cls(campaign, 0, (0.0,) * d, 0.0, (0.0,) * d, (1.0,) * d, prior, 0, min_labels)

    @property
    def is_warm(self) -> bool:
        return self.n_labels >= self.min_labels

    def predict_one(self, x: Sequence[float]) -> float:
        """P(convert | pushed now), shrunk towards the prior while labels are few.

        >>> s = PropensityScorer.cold("cart", prior=0.05)
        >>> s.predict_one([0.0] * len(FEATURE_NAMES)), s.is_warm
        (0.05, False)
        """
        z = self.intercept
        for xi, w, m, s in zip(x, self.weights, self.mean, self.scales, strict=True):
            z += w * (xi - m) / s
        trust = self.n_labels / (self.n_labels + self.min_labels)
        return trust * _sigmoid(z) + (1 - trust) * self.prior

    def contributions(self, x: Sequence[float], top: int = 3) -> list[tuple[str, float]]:
        """The features that moved this score most (signed log-odds contributions)."""
        columns = zip(FEATURE_NAMES, x, self.weights, self.mean, self.scales, strict=True)
        parts = [(n, w * (xi - m) / s) for n, xi, w, m, s in columns]
        parts.sort(key=lambda kv: -abs(kv[1]))
        return [(n, round(c, 4)) for n, c in parts[:top]]
