"""Off-policy evaluation: what another targeting policy would have achieved, estimated from the decision log.

The log's randomisation is the holdout: among the decisions the running policy made to push (pushes and
holdouts, each with a label), the push was withheld with a known probability (``holdout_share``, per user), so
``e = P(pushed) = 1 - holdout_share`` is exact for every labelled decision. A *target* policy decides, for each
of those decisions, push (``pi = 1``) or not (``pi = 0``) from what was known at decision time (the label's
features and segment). Its value is the conversion rate per decision it would reach,
``V(pi) = mean(pi * Y(push) + (1 - pi) * Y(no push))``, estimated two ways:

- **IPS** (inverse propensity scoring): ``mean(Y * 1[T == pi] / P(T == pi))``: unbiased, noisy;
- **doubly robust**: ``mean(m_pi(x) + 1[T == pi] / P(T == pi) * (Y - m_T(x)))`` with outcome models ``m_1``
  (pushed labels) and ``m_0`` (holdout labels) learned progressively and *cross-fitted by user*: a decision is
  predicted by the models of the other half of the users, so no prediction has learned from its own user's
  outcomes (the holdout is assigned per user: a model that learned from the user's earlier labels only when the
  user is held out would correlate with the user's arm, and was measured biased: its interval missed the truth
  in 4 of 9 simulator checks). Unbiased whatever the models, less noisy when they are good.

Both also give the target policy's **uplift per push**: ``(V(pi) - V(never)) / mean(pi)``, the conversions its
pushes add per push (x 1,000: incremental conversions per 1,000 pushes). Intervals: percentile bootstrap over
users (a holdout user is held out on every decision, so decisions are clustered by user). The population is
the decisions the logging policy chose to push or hold out: the log has no outcome for suppressed decisions.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stream_app.core.propensity import PropensityLearner


@dataclass(frozen=True)
class LoggedDecision:
    """One labelled push or holdout decision, in label order."""

    user: str
    treated: bool  # pushed (else held out)
    converted: bool
    e: float  # P(treated) for this decision: 1 - holdout_share
    x: Mapping[str, float]  # what was known at decision time


def outcome_predictions(log: Sequence[LoggedDecision]) -> tuple[np.ndarray, np.ndarray]:
    """Progressive, user-cross-fitted outcome models: P(convert | push, x) and P(convert | no push, x) for each
    decision, from the earlier labels of the *other* half of the users (each arm's labels teach its own model)."""
    models = [[PropensityLearner(prior=0.05, min_labels=50) for _ in range(2)] for _ in range(2)]  # [fold][arm]
    mu1, mu0 = np.empty(len(log)), np.empty(len(log))
    for i, d in enumerate(log):
        fold = zlib.crc32(d.user.encode()) & 1
        own = models[fold]
        mu0[i], mu1[i] = own[0].predict_proba_one(d.x)[True], own[1].predict_proba_one(d.x)[True]
        models[1 - fold][int(d.treated)].learn_one(d.x, d.converted)
    return mu1, mu0


def _terms(pi: np.ndarray, t: np.ndarray, y: np.ndarray, e: np.ndarray, mu1: np.ndarray,
           mu0: np.ndarray) -> dict[str, np.ndarray]:  # fmt: skip
    """Per-decision terms whose means are the estimates (value of pi, of never pushing, pi's push share)."""
    w1, w0 = t / e, (1 - t) / (1 - e)
    ips_pi = y * (pi * w1 + (1 - pi) * w0)
    ips_never = y * w0
    dr_pi = pi * (mu1 + w1 * (y - mu1)) + (1 - pi) * (mu0 + w0 * (y - mu0))
    dr_never = mu0 + w0 * (y - mu0)
    return {"ips": ips_pi, "ips_never": ips_never, "dr": dr_pi, "dr_never": dr_never, "pi": pi}


def _summaries(sums: dict[str, float], n: float) -> dict[str, float]:
    pushes = sums["pi"] / n
    out = {"push_share": pushes}
    for k in ("ips", "dr"):
        out[k] = sums[k] / n
        out[f"{k}_uplift_per_push"] = (sums[k] - sums[f"{k}_never"]) / sums["pi"] if sums["pi"] else math.nan
    return out


def evaluate_policy(log: Sequence[LoggedDecision], policy: Callable[[Mapping[str, float]], float],
                    reps: int = 500, seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """IPS and doubly robust estimates of ``policy`` (x -> probability of pushing) on the log, 95% intervals.

    >>> import random
    >>> rng, log = random.Random(1), []
    >>> for i in range(4000):  # users with a = 1 gain 0.2 from a push, the others nothing; 10% holdout
    ...     a, t = float(i % 2), rng.random() < 0.9
    ...     log.append(LoggedDecision(f"u{i}", t, rng.random() < 0.1 + (0.2 * a if t else 0.0), 0.9, {"a": a}))
    >>> r = evaluate_policy(log, lambda x: x["a"], reps=200)
    >>> round(r["dr_uplift_per_push"], 1), r["dr_uplift_per_push_ci"][0] > 0.1  # true 0.2
    (0.2, True)
    """
    t = np.array([d.treated for d in log], dtype=float)
    y = np.array([d.converted for d in log], dtype=float)
    e = np.array([d.e for d in log], dtype=float)
    pi = np.array([min(max(float(policy(d.x)), 0.0), 1.0) for d in log])
    mu1, mu0 = outcome_predictions(log)
    terms = _terms(pi, t, y, e, mu1, mu0)
    users, inverse = np.unique([d.user for d in log], return_inverse=True)
    per_user = {k: np.bincount(inverse, weights=v, minlength=len(users)) for k, v in terms.items()}
    count = np.bincount(inverse, minlength=len(users)).astype(float)
    out: dict[str, Any] = _summaries({k: float(v.sum()) for k, v in per_user.items()}, float(count.sum()))
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(reps):
        idx = rng.integers(0, len(users), len(users))
        boots.append(_summaries({k: float(v[idx].sum()) for k, v in per_user.items()}, float(count[idx].sum())))
    for k in ("ips", "dr", "ips_uplift_per_push", "dr_uplift_per_push"):
        values = [b[k] for b in boots if not math.isnan(b[k])]
        lo, hi = np.percentile(values, [2.5, 97.5]) if values else (math.nan, math.nan)
        out[f"{k}_ci"] = (float(lo), float(hi))
    out["decisions"], out["users"] = len(log), len(users)
    return out


__all__ = ["LoggedDecision", "evaluate_policy", "outcome_predictions"]
