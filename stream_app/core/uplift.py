"""Uplift: how much a push changes a user's chance to convert, learned online from pushed and holdout labels.

Why not the difference of two models: a campaign's uplift, P(convert | push) - P(convert | no push), is a few
percentage points, and subtracting two noisy estimates of similar size barely ranks users (rank correlation 0.10
with the true uplift in the simulator). ``UpliftLearner`` learns the uplift itself, in two parts:

- **attributed response**: when the label says whether the conversion came *through* the push (a click carrying
  its ``push_id``), P(attributed conversion | pushed, x) is learned from every pushed label with a Bayesian
  logistic regression (``OnlineLogit``). Pushed labels are ~90% of the campaign's labels, attributed
  conversions are rare but unambiguous, so this part sharpens quickly.
- **residual**: everything the attribution does not explain (conversions without the push's id, and what the
  user would have done anyway) is learned from the **transformed outcome**
  ``Z = T * Y_rest / e - (1 - T) * Y / (1 - e)``, whose expectation given x is exactly the rest of the uplift,
  ``E[Y_rest | T=1, x] - E[Y | T=0, x]`` when the treatment was randomised with probability ``e`` (the holdout:
  ``e = 1 - holdout_share``, known for every decision). ``Y_rest`` is the conversion minus its attributed part;
  without attribution it is the whole conversion and the residual is the whole uplift (the classic transformed
  outcome / IPW learner). Z is noisy (a holdout label weighs ``1/(1-e)``), so its ridge regression
  (``OnlineRidge``) is shrunk hard towards 0.

So ``predict_uplift_one(x) = P(attributed | push, x) + residual(x)``, an unbiased decomposition of the uplift:
the part with many clean labels is learned sharply, the noisy part is shrunk. Features are any dict of numbers;
unseen names are added as they come (up to ``max_features``; later new names are ignored and counted).
Everything is plain JSON numbers (``to_params``) so a model travels through Kafka and another process continues
exactly where this one stopped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


class _Linear:
    """Names -> indices and a Gaussian posterior over the weights (mean ``w``, covariance ``cov``); index 0 is
    the intercept. Grows as new feature names come, up to ``max_features``."""

    def __init__(self, prior_var: float, intercept: float, intercept_var: float, max_features: int) -> None:
        self.prior_var, self.max_features = prior_var, max_features
        self.names: list[str] = []
        self.index: dict[str, int] = {}
        self.w = np.array([intercept])
        self.cov = np.array([[intercept_var]])
        self.n = 0
        self.dropped = 0  # feature values ignored because max_features names were already known

    def vector(self, x: Mapping[str, float], grow: bool) -> np.ndarray:
        if grow:
            new = [k for k in x if k not in self.index]
            if new:
                room = self.max_features - len(self.names)
                self.dropped += max(len(new) - room, 0)
                new = new[: max(room, 0)]
                d = len(self.w)
                for k in new:
                    self.index[k] = len(self.names) + 1
                    self.names.append(k)
                self.w = np.concatenate([self.w, np.zeros(len(new))])
                cov = np.zeros((d + len(new), d + len(new)))
                cov[:d, :d] = self.cov
                cov[d:, d:] = np.eye(len(new)) * self.prior_var
                self.cov = cov
        v = np.zeros(len(self.w))
        v[0] = 1.0
        for k, value in x.items():
            i = self.index.get(k)
            if i is not None:
                v[i] = value
        return v

    def dot(self, x: Mapping[str, float]) -> float:
        z = float(self.w[0])
        for k, value in x.items():
            i = self.index.get(k)
            if i is not None:
                z += float(self.w[i]) * value
        return z

    def weights(self) -> dict[str, float]:
        return {k: float(self.w[i]) for k, i in self.index.items()}

    def state(self, with_covariance: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"names": list(self.names), "intercept": float(self.w[0]),
                               "weights": [float(v) for v in self.w[1:]], "n": self.n,
                               "dropped": self.dropped}  # fmt: skip
        if with_covariance:
            out["covariance"] = [[float(v) for v in row] for row in self.cov]
        return out

    def restore(self, p: dict[str, Any]) -> None:
        self.names = list(p["names"])
        self.index = {k: i + 1 for i, k in enumerate(self.names)}
        self.w = np.array([p["intercept"], *p["weights"]], dtype=float)
        d = len(self.w)
        cov = p.get("covariance")
        self.cov = np.array(cov, dtype=float) if cov else np.eye(d) * self.prior_var
        self.n, self.dropped = p["n"], p.get("dropped", 0)


class OnlineLogit(_Linear):
    """Bayesian logistic regression learned one example at a time (a Laplace / assumed-density update of a
    Gaussian posterior with full covariance: a Newton step per example, no learning rate to tune).

    >>> m = OnlineLogit(prior=0.1)
    >>> for i in range(400):
    ...     m.learn_one({"a": 1.0}, i % 3 == 0)
    ...     m.learn_one({"a": 0.0}, i % 10 == 0)
    >>> round(m.predict_one({"a": 1.0}), 2), round(m.predict_one({"a": 0.0}), 2)
    (0.33, 0.11)
    """

    def __init__(self, prior: float = 0.5, prior_var: float = 1.0, max_features: int = 256) -> None:
        prior = min(max(prior, 1e-6), 1 - 1e-6)
        super().__init__(prior_var, math.log(prior / (1 - prior)), 4.0, max_features)

    def learn_one(self, x: Mapping[str, float], y: bool) -> None:
        v = self.vector(x, grow=True)
        p = _sigmoid(float(self.w @ v))
        h = p * (1 - p)
        cv = self.cov @ v
        s = float(v @ cv)
        self.w = self.w + cv * ((float(y) - p) / (1 + h * s))
        self.cov = self.cov - np.outer(cv, cv) * (h / (1 + h * s))
        self.n += 1

    def predict_one(self, x: Mapping[str, float]) -> float:
        return _sigmoid(self.dot(x))


class OnlineRidge(_Linear):
    """Bayesian linear regression (recursive least squares with a ridge prior): the exact ridge solution after
    every example. ``strength``: the prior's weight on each coefficient being 0, in examples of unit noise.

    >>> m = OnlineRidge(strength=1.0)
    >>> for i in range(500):
    ...     m.learn_one({"a": float(i % 2)}, 2.0 * (i % 2) + 1.0)
    >>> round(m.predict_one({"a": 1.0}), 2), round(m.predict_one({"a": 0.0}), 2)
    (2.99, 1.01)
    """

    def __init__(self, strength: float = 1.0, intercept_strength: float = 1e-3, max_features: int = 256) -> None:
        super().__init__(1.0 / strength, 0.0, 1.0 / intercept_strength, max_features)

    def learn_one(self, x: Mapping[str, float], y: float, weight: float = 1.0) -> None:
        v = self.vector(x, grow=True)
        cv = self.cov @ v
        s = float(v @ cv)
        gain = cv / (1.0 / weight + s)
        self.w = self.w + gain * (y - float(self.w @ v))
        self.cov = self.cov - np.outer(gain, cv)
        self.n += 1

    def predict_one(self, x: Mapping[str, float]) -> float:
        return self.dot(x)


class UpliftLearner:
    """Online uplift model on any feature dict (River style: ``learn_one`` mutates, ``predict_uplift_one`` reads).

    ``learn_one(x, treated, converted)``: one outcome of a randomised treatment decision. Optional:
    ``propensity``, the probability the treatment was given (``treated`` or not, it is P(treated)); default: the
    running share of treated labels, which is right when assignment does not depend on x (an A/B split, a
    holdout group). ``attributed``: whether the conversion came through the treatment (a click on the push);
    when given, the attributed part is learned as a classifier on treated labels (see the module doc).

    Defaults work on data other than ours: no feature list to declare, no prior to know. ``residual_strength``
    (shrinkage of the transformed-outcome regression, in labels) and ``exclude`` (names the residual must not
    use: features that differ between the arms by construction, such as responses to earlier treatments) are
    the knobs.

    >>> import random
    >>> rng, m = random.Random(0), UpliftLearner()
    >>> for _ in range(20000):
    ...     x = {"young": float(rng.random() < 0.5)}
    ...     treated = rng.random() < 0.5
    ...     p = 0.05 + (0.10 if treated and x["young"] else 0.0)  # only the young respond
    ...     m.learn_one(x, treated, rng.random() < p)
    >>> round(m.predict_uplift_one({"young": 1.0}), 2), round(m.predict_uplift_one({"young": 0.0}), 2)  # 0.1, 0
    (0.1, 0.01)
    >>> m = UpliftLearner()
    >>> for _ in range(20000):  # the same, told which conversions came through the treatment
    ...     x = {"young": float(rng.random() < 0.5)}
    ...     treated = rng.random() < 0.9
    ...     organic, caused = rng.random() < 0.05, treated and x["young"] and rng.random() < 0.1
    ...     m.learn_one(x, treated, organic or caused, propensity=0.9, attributed=caused)
    >>> round(m.predict_uplift_one({"young": 1.0}), 2), round(m.predict_uplift_one({"young": 0.0}), 2)  # 0.1, 0
    (0.1, -0.02)
    """

    def __init__(self, residual_strength: float = 200.0, exclude: Iterable[str] = (), prior: float = 0.05,
                 max_features: int = 256) -> None:  # fmt: skip
        self.residual_strength = residual_strength
        self.exclude = frozenset(exclude)
        self.response = OnlineLogit(prior=prior, max_features=max_features)
        self.residual = OnlineRidge(strength=residual_strength, intercept_strength=residual_strength / 10,
                                    max_features=max_features)  # fmt: skip
        self.n_treated = 0
        self.n_control = 0
        self.n_attributed = 0  # treated labels whose attribution was known
        self.version = 0  # publications (the trainer counts them)

    def learn_one(self, x: Mapping[str, float], treated: bool, converted: bool, *, propensity: float | None = None,
                  attributed: bool | None = None) -> None:  # fmt: skip
        e = propensity if propensity is not None else (self.n_treated + 1) / (self.n_treated + self.n_control + 2)
        e = min(max(e, 0.01), 0.99)
        self.n_treated += int(treated)
        self.n_control += int(not treated)
        rest = float(converted)
        if treated and attributed is not None:
            self.n_attributed += 1
            self.response.learn_one(x, bool(attributed))
            rest = float(converted and not attributed)
        z = rest / e if treated else -float(converted) / (1 - e)
        # unweighted: E[Z | x] is the uplift only when both arms weigh alike (inverse-variance weights per arm
        # would tilt it towards the treated arm's mean)
        self.residual.learn_one(self._residual_x(x), z)

    def predict_uplift_one(self, x: Mapping[str, float]) -> float:
        """The estimated uplift at ``x`` (can be negative)."""
        attributed = self.response.predict_one(x) if self.n_attributed else 0.0
        return attributed + self.residual.predict_one(self._residual_x(x))

    def _residual_x(self, x: Mapping[str, float]) -> Mapping[str, float]:
        return {k: v for k, v in x.items() if k not in self.exclude} if self.exclude else x

    def to_params(self, with_covariance: bool = True) -> dict[str, Any]:
        return {"kind": "uplift_learner", "residual_strength": self.residual_strength,
                "exclude": sorted(self.exclude), "n_treated": self.n_treated, "n_control": self.n_control,
                "n_attributed": self.n_attributed, "response": self.response.state(with_covariance),
                "residual": self.residual.state(with_covariance)}  # fmt: skip

    @classmethod
    def from_params(cls, p: dict[str, Any]) -> UpliftLearner:
        m = cls(p["residual_strength"], p["exclude"])
        m.response.restore(p["response"])
        m.residual.restore(p["residual"])
        m.n_treated, m.n_control, m.n_attributed = p["n_treated"], p["n_control"], p["n_attributed"]
        m.version = p.get("version", 0)
        return m


@dataclass(frozen=True)
class UpliftScorer:
    """A campaign's uplift model as every worker scores with it: the published weights, no covariance."""

    campaign: str
    version: int
    response: dict[str, float]
    response_intercept: float
    residual: dict[str, float]
    residual_intercept: float
    exclude: frozenset[str]
    n_treated: int
    n_control: int
    n_attributed: int
    min_labels: int

    @classmethod
    def from_params(cls, p: dict[str, Any]) -> UpliftScorer:
        r, q = p["response"], p["residual"]
        return cls(p["campaign"], p["version"], dict(zip(r["names"], r["weights"], strict=True)), r["intercept"],
                   dict(zip(q["names"], q["weights"], strict=True)), q["intercept"], frozenset(p["exclude"]),
                   p["n_treated"], p["n_control"], p["n_attributed"], p["min_labels"])  # fmt: skip

    @classmethod
    def cold(cls, campaign: str, min_labels: int = 200) -> UpliftScorer:
        return cls(campaign, 0, {}, 0.0, {}, 0.0, frozenset(), 0, 0, 0, min_labels)

    @property
    def is_warm(self) -> bool:
        """Enough pushed labels to trust the attributed response (the residual is shrunk, so defined from 0)."""
        return self.n_treated >= self.min_labels

    @property
    def n_labels(self) -> int:
        return self.n_treated + self.n_control

    def predict_uplift_one(self, x: Mapping[str, float]) -> float:
        """The estimated uplift of treating at ``x``.

        >>> UpliftScorer.cold("c").predict_uplift_one({"a": 1.0})
        0.0
        """
        r, q = self.response, self.residual
        z = self.response_intercept
        rest = self.residual_intercept
        for k, v in x.items():
            w = r.get(k)
            if w is not None:
                z += w * v
            if k not in self.exclude:
                w = q.get(k)
                if w is not None:
                    rest += w * v
        return (_sigmoid(z) if self.n_attributed else 0.0) + rest


def uplift_params(campaign: str, min_labels: int, learner: UpliftLearner, with_covariance: bool) -> dict[str, Any]:
    """What the trainer publishes (``with_covariance=False``) or keeps as its state (True) for a campaign."""
    return {"campaign": campaign, "version": learner.version, "min_labels": min_labels,
            **learner.to_params(with_covariance)}  # fmt: skip


__all__ = ["OnlineLogit", "OnlineRidge", "UpliftLearner", "UpliftScorer", "uplift_params"]
