import math
import random

import orjson

from stream_app.campaigns import load_campaigns
from stream_app.core.features import FEATURE_NAMES, INDEX
from stream_app.core.trainer import SEGMENTS_KEY, Quality, Trainer, propensity_key

CAMPAIGNS, _ = load_campaigns()
D = len(FEATURE_NAMES)


def label(rnd: random.Random, campaign="cart_abandonment", action="push", t=0):
    x = [rnd.gauss(0, 1) for _ in range(D)]
    z = -2.0 + 2.0 * x[INDEX["log_rate_6h"]]
    y = rnd.random() < 1 / (1 + math.exp(-z))
    return {"kind": "label", "campaign": campaign, "action": action, "converted": y, "features": x,
            "decided_at_ms": t, "labelled_at_ms": t + 3_600_000, "decision_id": f"d{rnd.random()}"}  # fmt: skip


def test_learns_publishes_versions_and_measures_quality():
    rnd = random.Random(1)
    trainer = Trainer(CAMPAIGNS, publish_every_ms=1000)
    for i in range(3000):
        assert trainer.learn(label(rnd, t=i)) == propensity_key("cart_abandonment")
    q = trainer.quality["cart_abandonment"]
    assert q.n == 3000 and q.auc > 0.75 and q.log_loss < 0.6 and q.mean_delay_s == 3600
    first = trainer.due(now_ms=10_000)
    key = propensity_key("cart_abandonment")
    assert set(first) == {key} and first[key]["version"] == 1
    trainer.learn(label(rnd))
    assert trainer.due(now_ms=10_500) == {}  # not yet: at most one publication per interval
    assert trainer.due(now_ms=11_000)[key]["version"] == 2
    assert trainer.due(now_ms=20_000) == {}  # nothing changed


def test_a_successor_trainer_continues_exactly_from_the_saved_state():
    rnd = random.Random(2)
    labels = [label(rnd) for _ in range(400)]
    a = Trainer(CAMPAIGNS)
    for r in labels[:200]:
        a.learn(r)
    key = propensity_key("cart_abandonment")
    b = Trainer(CAMPAIGNS)
    b.restore(key, orjson.loads(orjson.dumps(a.state(key))))
    for r in labels[200:]:
        a.learn(r)
        b.learn(r)
    assert a.state(key) == b.state(key)


def test_segment_samples_train_the_segment_model_and_unknown_records_are_ignored():
    rnd = random.Random(3)
    t = Trainer(CAMPAIGNS, segments_k=3)
    for _ in range(t.segments.warmup + 10):
        assert t.learn({"kind": "segment_sample", "features": [rnd.gauss(0, 1) for _ in range(D)]}) == SEGMENTS_KEY
    assert len(t.segments.centroids) == 3
    assert t.learn({"kind": "label", "campaign": "retired_campaign"}) is None
    assert t.learn({"kind": "mystery"}) is None


def test_quality_auc_is_exact_and_uplift_compares_treated_with_holdout():
    q = Quality()
    for score, y, action in [(0.9, True, "push"), (0.8, False, "push"), (0.7, True, "holdout"),
                             (0.1, False, "holdout"), (0.8, True, "push")]:  # fmt: skip
        q.add(score, y, 1000, action)
    # positives 0.9, 0.7, 0.8 vs negatives 0.8, 0.1: 0.9 wins 2, 0.7 wins 1 (loses to 0.8), 0.8 ties 0.8 and
    # beats 0.1: 2 + 1 + 1.5 = 4.5 of 6 pairs
    assert math.isclose(q.auc, 4.5 / 6)
    assert math.isclose(q.uplift, 2 / 3 - 1 / 2)
