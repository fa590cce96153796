"""Propensity: an online logistic regression per campaign, learned one label at a time, scored from explicit params.

Two roles, two types:
- ``PropensityLearner`` (one per campaign, owned by a single trainer): Bayesian logistic regression with a full
  covariance (``core/uplift.py``'s ``OnlineLogit``: a Newton step per label, no learning rate to tune) and a
  running standardizer kept only to express the weights per standard deviation (explanations).
  ``learn_one(x, y)`` on each delayed label; ``x`` is the product's feature vector or any dict of numbers.
- ``PropensityScorer`` (every worker): an immutable snapshot built from ``to_params()`` output, i.e. a
  list of weights, an intercept, the scaler's means and scales and a version. Scoring is a dot product
  with no learner object in the hot path, and ``contributions`` explains a score feature by feature.

Parameters are plain JSON numbers (no pickle): they can travel through a Kafka topic and be restored
by another process, which then continues learning exactly where the previous one stopped.

Cold start: until ``min_labels`` labels have arrived the score is shrunk towards the campaign's
prior conversion rate (``n / (n + min_labels)`` weight on the model), and ``is_warm`` says so, so the
policy can explore instead of trusting an untrained model. Used alone (defaults: prior 0.5, ``min_labels`` 0)
there is no shrinkage.

A first version used River's ``LogisticRegression`` with plain SGD (lr 0.02): on the simulator's labels its
progressive ROC AUC was 0.80 x the Bayes-optimal AUC with the 26 features, 0.88-0.90 x with this learner.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from stream_app.core.features import FEATURE_NAMES
from stream_app.core.uplift import OnlineLogit, _sigmoid

Features = Sequence[float] | Mapping[str, float]


class PropensityLearner:
    """P(y | x), learned online (mutating ``learn_one``, River style), on the product's feature vector or any dict.

    >>> import random
    >>> rng, m = random.Random(0), PropensityLearner()
    >>> for _ in range(3000):
    ...     x = {"visits": rng.random() * 4, "age": rng.random()}
    ...     m.learn_one(x, rng.random() < 1 / (1 + math.exp(3 - x["visits"])))  # only visits matter
    >>> p = m.predict_proba_one({"visits": 3.0, "age": 0.5})
    >>> round(p[True], 1), round(m.predict_proba_one({"visits": 0.0, "age": 0.5})[True], 2)  # true: 0.5, 0.05
    (0.5, 0.04)
    >>> round(m.model.weights()["visits"], 1), abs(m.model.weights()["age"]) < 0.3
    (1.0, True)
    """

    def __init__(self, campaign: str = "model", prior: float = 0.5, min_labels: int = 0, prior_var: float = 1.0,
                 features: Sequence[str] | None = None) -> None:  # fmt: skip
        self.campaign = campaign
        self.prior = prior
        self.min_labels = min_labels
        self.prior_var = prior_var
        self.features = tuple(features) if features is not None else None  # vector inputs: the names, in order
        self.version = 0
        self.n_labels = 0
        self.n_positive = 0
        self.mean: dict[str, float] = {}
        self.m2: dict[str, float] = {}
        self.model = OnlineLogit(prior=prior, prior_var=prior_var)

    def _dict(self, x: Features) -> Mapping[str, float]:
        if isinstance(x, Mapping):
            return x
        names = self.features if self.features is not None else FEATURE_NAMES
        return dict(zip(names, x, strict=True))

    def learn_one(self, x: Features, y: bool) -> None:
        d = self._dict(x)
        self.n_labels += 1
        self.n_positive += int(y)
        n = self.n_labels
        for k, v in d.items():  # Welford running mean / variance (for explanations only)
            m = self.mean.get(k, 0.0)
            delta = v - m
            m += delta / n
            self.mean[k] = m
            self.m2[k] = self.m2.get(k, 0.0) + delta * (v - m)
        self.model.learn_one(d, bool(y))

    def predict_proba_one(self, x: Features) -> dict[bool, float]:
        """{False: 1 - p, True: p}, as River's classifiers answer (shrunk to ``prior`` below ``min_labels``)."""
        p = _sigmoid(self.model.dot(self._dict(x)))
        if self.min_labels:
            trust = self.n_labels / (self.n_labels + self.min_labels)
            p = trust * p + (1 - trust) * self.prior
        return {False: 1 - p, True: p}

    def _names(self) -> tuple[str, ...]:
        return self.features if self.features is not None else (FEATURE_NAMES if not self.model.names
                                                                 else tuple(self.model.names))  # fmt: skip

    def to_params(self, with_covariance: bool = True) -> dict[str, Any]:
        """The scorer's view (weights per standard deviation around the running mean, the same score) and, with
        ``with_covariance``, the posterior a successor trainer continues from."""
        names = self._names()
        raw = self.model.weights()
        n = max(self.n_labels - 1, 1)
        mean = [self.mean.get(k, 0.0) for k in names]
        scales = [math.sqrt(self.m2.get(k, 0.0) / n) or 1.0 for k in names]
        weights = [raw.get(k, 0.0) for k in names]
        intercept = float(self.model.w[0]) + sum(w * m for w, m in zip(weights, mean, strict=True))
        return {
            "campaign": self.campaign, "version": self.version, "prior": self.prior,
            "min_labels": self.min_labels, "prior_var": self.prior_var,
            "n_labels": self.n_labels, "n_positive": self.n_positive,
            "mean": mean, "m2": [self.m2.get(k, 0.0) for k in names], "scales": scales,
            "weights": [w * s for w, s in zip(weights, scales, strict=True)], "intercept": intercept,
            "features": list(names), "posterior": self.model.state(with_covariance),
        }  # fmt: skip

    @classmethod
    def from_params(cls, p: dict[str, Any]) -> PropensityLearner:
        features = tuple(p["features"])
        m = cls(p["campaign"], prior=p["prior"], min_labels=p["min_labels"], prior_var=p["prior_var"],
                features=None if features == FEATURE_NAMES else features)  # fmt: skip
        m.version, m.n_labels, m.n_positive = p["version"], p["n_labels"], p["n_positive"]
        m.mean = dict(zip(features, p["mean"], strict=True))
        m.m2 = dict(zip(features, p["m2"], strict=True))
        m.model.restore(p["posterior"])
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

    features: tuple[str, ...] = FEATURE_NAMES

    @classmethod
    def from_params(cls, p: dict[str, Any], features: tuple[str, ...] = FEATURE_NAMES) -> PropensityScorer:
        """``features``: the vector order the caller scores with; parameters for another feature set are refused."""
        if tuple(p["features"]) != features:
            raise ValueError("model parameters were trained on a different feature set")
        return cls(p["campaign"], p["version"], tuple(p["weights"]), p["intercept"], tuple(p["mean"]),
                   tuple(p["scales"]), p["prior"], p["n_labels"], p["min_labels"], features)  # fmt: skip

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
        trust = self.n_labels / (self.n_labels + self.min_labels) if self.min_labels else 1.0
        return trust * _sigmoid(z) + (1 - trust) * self.prior

    def contributions(self, x: Sequence[float], top: int = 3) -> list[tuple[str, float]]:
        """The features that moved this score most (signed log-odds contributions)."""
        columns = zip(self.features, x, self.weights, self.mean, self.scales, strict=True)
        parts = [(n, w * (xi - m) / s) for n, xi, w, m, s in columns]
        parts.sort(key=lambda kv: -abs(kv[1]))
        return [(n, round(c, 4)) for n, c in parts[:top]]
