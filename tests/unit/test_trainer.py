import math
import random

import orjson

from stream_app.campaigns import load_campaigns
from stream_app.core.features import FEATURE_NAMES, INDEX, TRAIT_NAMES, TRAITS_SCHEMA
from stream_app.core.trainer import SEGMENTS_KEY, Quality, Trainer, propensity_key, uplift_key

CAMPAIGNS, _ = load_campaigns()
D = len(FEATURE_NAMES)


def label(rnd: random.Random, campaign="cart_abandonment", action="push", t=0, segment=0):
    x = [rnd.gauss(0, 1) for _ in range(D)]
    z = -2.0 + 2.0 * x[INDEX["log_rate_6h"]]
    y = rnd.random() < 1 / (1 + math.exp(-z))
    return {"kind": "label", "campaign": campaign, "action": action, "converted": y, "features": x,
            "decided_at_ms": t, "labelled_at_ms": t + 3_600_000, "decision_id": f"d{rnd.random()}",
            "segment": segment}  # fmt: skip


def test_learns_publishes_versions_and_measures_quality():
    rnd = random.Random(1)
    trainer = Trainer(CAMPAIGNS, publish_every_ms=1000)
    for i in range(3000):
        assert trainer.learn(label(rnd, t=i)) == (propensity_key("cart_abandonment"),)
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
        traits = [rnd.gauss(0, 1) for _ in TRAIT_NAMES]
        assert t.learn({"kind": "segment_sample", "schema": TRAITS_SCHEMA, "traits": traits}) == (SEGMENTS_KEY,)
    assert len(t.segments.centroids) == 3
    before = t.state(SEGMENTS_KEY)
    # a worker of the previous version (propensity features, no schema) during a rolling upgrade
    assert t.learn({"kind": "segment_sample", "features": [0.0] * D}) == ()
    assert t.learn({"kind": "segment_sample", "schema": "traits-v0", "traits": [0.0] * len(TRAIT_NAMES)}) == ()
    assert t.state(SEGMENTS_KEY) == before
    t.restore(SEGMENTS_KEY, before | {"schema": "", "centroids": [[0.0] * D] * 3})  # learned on another vector
    assert t.state(SEGMENTS_KEY) == before
    assert t.learn({"kind": "label", "campaign": "retired_campaign"}) == ()
    assert t.learn({"kind": "mystery"}) == ()


def test_quality_auc_is_exact_and_uplift_compares_treated_with_holdout():
    q = Quality()
    for score, y, action in [(0.9, True, "push"), (0.8, False, "push"), (0.7, True, "holdout"),
                             (0.1, False, "holdout"), (0.8, True, "push")]:  # fmt: skip
        q.add(score, y, 1000, action)
    # positives 0.9, 0.7, 0.8 vs negatives 0.8, 0.1: 0.9 wins 2, 0.7 wins 1 (loses to 0.8), 0.8 ties 0.8 and
    # beats 0.1: 2 + 1 + 1.5 = 4.5 of 6 pairs
    assert math.isclose(q.auc, 4.5 / 6)
    assert math.isclose(q.uplift, 2 / 3 - 1 / 2)


def test_uplift_campaigns_learn_a_treated_and_a_control_model_and_target_their_difference():
    from dataclasses import replace

    from stream_app.core.policy import decide
    from stream_app.core.propensity import PropensityScorer
    from stream_app.core.trainer import control_key

    cart = replace(next(c for c in CAMPAIGNS if c.name == "cart_abandonment"), mode="uplift", min_labels=100,
                   holdout_share=0.0, exploration_share=0.0, threshold=0.1)  # fmt: skip
    trainer = Trainer((cart,), publish_every_ms=1)
    rnd = random.Random(5)

    def outcome(x, pushed):  # the push helps users with high log_rate_6h, no one else
        lift = 0.5 if pushed and x[INDEX["log_rate_6h"]] > 0 else 0.0
        return rnd.random() < 0.1 + lift

    for i in range(4000):
        pushed = i % 2 == 0
        rec = label(rnd, action="push" if pushed else "holdout", t=i)
        rec["converted"] = outcome(rec["features"], pushed)
        keys = trainer.learn(rec)
        model = propensity_key("cart_abandonment") if pushed else control_key("cart_abandonment")
        assert keys == (model, uplift_key("cart_abandonment"))
    published = trainer.due(now_ms=10_000)
    assert set(published) == {propensity_key("cart_abandonment"), control_key("cart_abandonment"),
                              uplift_key("cart_abandonment")}  # fmt: skip
    treated = PropensityScorer.from_params(published[propensity_key("cart_abandonment")])
    control = PropensityScorer.from_params(published[control_key("cart_abandonment")])
    assert treated.n_labels == control.n_labels == 2000

    def uplift_decision(rate):
        x = [0.0] * D
        x[INDEX["log_rate_6h"]] = rate
        return decide(user_id="u", profile=_profile(), features=x, segment=0, campaign=cart,
                      scorer=treated, guardrails=_guardrails(), trigger_id="t", now_ms=12 * 3_600_000,
                      control=control)  # fmt: skip

    helped, unmoved = uplift_decision(1.5), uplift_decision(-1.5)
    assert helped.score > 0.25 and abs(unmoved.score) < 0.1  # estimated uplift, not propensity
    assert helped.action == "push" and unmoved.action == "suppress"
    cold = decide(user_id="u", profile=_profile(), features=[0.0] * D, segment=0, campaign=cart, scorer=treated,
                  guardrails=_guardrails(), trigger_id="t2", now_ms=0,
                  control=PropensityScorer.cold("cart_abandonment", 0.02, 100))  # fmt: skip
    assert any(r.startswith("cold_start:") for r in cold.reasons)  # both arms must be warm to target


def _profile():
    from stream_app.core.events import Event
    from stream_app.core.profile import update_profile

    profile, _ = update_profile(None, Event("e0", "click", "u", 0))
    return profile


def _guardrails():
    from stream_app.core.policy import Guardrails

    return Guardrails(quiet_start_hour=0, quiet_end_hour=0)


def test_uplift_by_segment_ranks_the_segment_a_push_moves_above_one_it_does_not():
    """Segment 1 converts 0.30 pushed vs 0.10 held out, segment 2 0.30 vs 0.30: the models see the same
    features in both (they cannot tell the segments apart), the segment counts can."""
    from dataclasses import replace

    from stream_app.core.policy import decide
    from stream_app.core.propensity import PropensityScorer
    from stream_app.core.trainer import control_key
    from stream_app.core.uplift import SegmentUplift

    cart = replace(next(c for c in CAMPAIGNS if c.name == "cart_abandonment"), mode="uplift", min_labels=100,
                   holdout_share=0.0, exploration_share=0.0, threshold=0.1)  # fmt: skip
    trainer, rnd = Trainer((cart,), publish_every_ms=1), random.Random(6)
    for i in range(8000):
        segment, pushed = 1 + i % 2, i % 4 < 2
        rec = label(rnd, action="push" if pushed else "holdout", t=i, segment=segment)
        rec["features"] = [0.0] * D
        rec["converted"] = rnd.random() < (0.3 if pushed or segment == 2 else 0.1)
        trainer.learn(rec)
    published = trainer.due(now_ms=10_000)
    counts = SegmentUplift.from_params(orjson.loads(orjson.dumps(published[uplift_key("cart_abandonment")])))
    assert counts.n_labels == 8000 and counts.version == 1
    assert abs(counts.predict_one(1) - 0.2) < 0.04 and abs(counts.predict_one(2)) < 0.04

    def score(segment, uplift):
        return decide(user_id="u", profile=_profile(), features=[0.0] * D, segment=segment, campaign=cart,
                      scorer=PropensityScorer.from_params(published[propensity_key("cart_abandonment")]),
                      guardrails=_guardrails(), trigger_id="t", now_ms=12 * 3_600_000,
                      control=PropensityScorer.from_params(published[control_key("cart_abandonment")]),
                      uplift=uplift)  # fmt: skip

    moved, unmoved = score(1, counts), score(2, counts)
    assert moved.score > 0.15 > 0.05 > unmoved.score and moved.action == "push" and unmoved.action == "suppress"
    assert score(1, None).score == score(2, None).score  # the models alone cannot tell them apart
