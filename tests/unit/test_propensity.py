import math
import random

import orjson

from stream_app.core.features import FEATURE_NAMES, INDEX
from stream_app.core.propensity import PropensityLearner, PropensityScorer

D = len(FEATURE_NAMES)


def synthetic(n: int, seed: int) -> list[tuple[list[float], bool]]:
    """Labels depend on two features: recent activity up, hours since payment down."""
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        x = [rnd.gauss(0, 1) for _ in range(D)]
        z = -3.0 + 1.5 * x[INDEX["log_rate_6h"]] - 1.0 * x[INDEX["log_hours_since_payment"]]
        out.append((x, rnd.random() < 1 / (1 + math.exp(-z))))
    return out


def auc(scores: list[float], labels: list[bool]) -> float:
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def test_learns_the_signal_and_explains_it():
    learner = PropensityLearner("cart", prior=0.05, min_labels=100)
    for x, y in synthetic(6000, seed=1):
        learner.learn_one(x, y)
    scorer = PropensityScorer.from_params(learner.to_params())
    test = synthetic(3000, seed=2)
    assert auc([scorer.predict_one(x) for x, _ in test], [y for _, y in test]) > 0.8
    x = [0.0] * D
    x[INDEX["log_rate_6h"]] = 3.0
    top = dict(scorer.contributions(x, top=2))
    assert "log_rate_6h" in top and top["log_rate_6h"] > 0


def test_params_round_trip_and_learning_resumes_identically():
    data = synthetic(1500, seed=3)
    a = PropensityLearner("cart")
    for x, y in data[:700]:
        a.learn_one(x, y)
    b = PropensityLearner.from_params(orjson.loads(orjson.dumps(a.to_params())))
    for x, y in data[700:]:
        a.learn_one(x, y)
        b.learn_one(x, y)
    pa, pb = a.to_params(), b.to_params()
    assert pa["n_labels"] == pb["n_labels"] == 1500
    assert all(
        math.isclose(u, v, rel_tol=1e-9, abs_tol=1e-12) for u, v in zip(pa["weights"], pb["weights"], strict=True)
    )
    assert math.isclose(pa["intercept"], pb["intercept"], rel_tol=1e-9)


def test_cold_start_shrinks_to_the_prior():
    learner = PropensityLearner("winback", prior=0.03, min_labels=200)
    for x, y in synthetic(20, seed=4):
        learner.learn_one(x, y)
    scorer = PropensityScorer.from_params(learner.to_params())
    assert not scorer.is_warm
    scores = [scorer.predict_one(x) for x, _ in synthetic(200, seed=5)]
    trust = 20 / (20 + 200)  # the model's share of the score with 20 labels
    assert all(abs(s - 0.03) <= trust * 0.97 + 1e-12 for s in scores)
    assert len({round(s, 9) for s in scores}) > 1  # but the model does contribute
