import math
import random

import orjson

from stream_app.campaigns import load_campaigns
from stream_app.core.features import FEATURE_NAMES, INDEX, TRAIT_NAMES, TRAITS_SCHEMA
from stream_app.core.trainer import (
    RING_CHUNK,
    RING_PREFIX,
    SEGMENTS_KEY,
    Quality,
    Trainer,
    check_state,
    propensity_key,
    uplift_key,
)

CAMPAIGNS, _ = load_campaigns()
D = len(FEATURE_NAMES)


DAY = 86_400_000  # labels a day apart: a positive is learned when its (24 h) window has closed, by the next label


def label(rnd: random.Random, campaign="cart_abandonment", action="push", t=0, segment=0):
    x = [rnd.gauss(0, 1) for _ in range(D)]
    z = -2.0 + 2.0 * x[INDEX["log_rate_6h"]]
    y = rnd.random() < 1 / (1 + math.exp(-z))
    return {"kind": "label", "campaign": campaign, "action": action, "converted": y, "features": x,
            "decided_at_ms": t * DAY, "labelled_at_ms": t * DAY + 3_600_000, "decision_id": f"d{rnd.random()}",
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


def test_uplift_campaigns_learn_the_uplift_and_target_it():
    from dataclasses import replace

    from stream_app.core.policy import decide
    from stream_app.core.propensity import PropensityScorer
    from stream_app.core.uplift import UpliftScorer

    cart = replace(next(c for c in CAMPAIGNS if c.name == "cart_abandonment"), mode="uplift", min_labels=100,
                   holdout_share=0.5, exploration_share=0.0, threshold=0.1)  # fmt: skip
    trainer = Trainer((cart,), publish_every_ms=1)
    rnd = random.Random(5)

    for i in range(4000):  # the push helps users with high log_rate_6h (clicks on it), no one else
        pushed = i % 2 == 0
        rec = label(rnd, action="push" if pushed else "holdout", t=i)
        caused = pushed and rec["features"][INDEX["log_rate_6h"]] > 0 and rnd.random() < 0.5
        rec["converted"], rec["attributed"] = caused or rnd.random() < 0.1, caused
        keys = trainer.learn(rec)
        # P(convert | push) learns pushed labels only (a positive waits for its window: the next label's keys)
        assert uplift_key("cart_abandonment") in keys or rec["converted"]
    published = trainer.due(now_ms=10_000)
    assert set(published) == {propensity_key("cart_abandonment"), uplift_key("cart_abandonment")}
    treated = PropensityScorer.from_params(published[propensity_key("cart_abandonment")])
    uplift = UpliftScorer.from_params(orjson.loads(orjson.dumps(published[uplift_key("cart_abandonment")])))
    assert treated.n_labels == uplift.n_treated and 1999 <= uplift.n_treated <= 2000 and uplift.n_control >= 1999
    assert "covariance" not in published[uplift_key("cart_abandonment")]["response"]  # the trainer's state only

    def uplift_decision(rate):
        x = [0.0] * D
        x[INDEX["log_rate_6h"]] = rate
        return decide(user_id="u", profile=_profile(), features=x, segment=0, campaign=cart,
                      scorer=treated, guardrails=_guardrails(), trigger_id="t", now_ms=12 * 3_600_000,
                      uplift=uplift)  # fmt: skip

    helped, unmoved = uplift_decision(1.5), uplift_decision(-1.5)
    assert helped.score > 0.25 and abs(unmoved.score) < 0.1  # estimated uplift, not propensity
    assert helped.action in ("push", "holdout") and unmoved.action == "suppress"
    assert helped.model_version == uplift.version  # the decision names the uplift model's version
    cold = decide(user_id="u", profile=_profile(), features=[0.0] * D, segment=0, campaign=cart, scorer=treated,
                  guardrails=_guardrails(), trigger_id="t2", now_ms=0,
                  uplift=UpliftScorer.cold("cart_abandonment", 100))  # fmt: skip
    assert any(r.startswith("cold_start:") for r in cold.reasons)  # targets once it has min_labels pushed labels


def _profile():
    from stream_app.core.events import Event
    from stream_app.core.profile import update_profile

    profile, _ = update_profile(None, Event("e0", "click", "u", 0))
    return profile


def _guardrails():
    from stream_app.core.policy import Guardrails

    return Guardrails(quiet_start_hour=0, quiet_end_hour=0)


def test_uplift_by_segment_ranks_the_segment_a_push_moves_above_one_it_does_not():
    """Segment 1 converts 0.30 pushed vs 0.10 held out, segment 2 0.30 vs 0.30, identical features otherwise:
    the uplift model reads the segment (one-hot) and tells them apart; attributed conversions are known."""
    from dataclasses import replace

    from stream_app.core.policy import decide
    from stream_app.core.propensity import PropensityScorer
    from stream_app.core.uplift import UpliftScorer

    cart = replace(next(c for c in CAMPAIGNS if c.name == "cart_abandonment"), mode="uplift", min_labels=100,
                   holdout_share=0.5, exploration_share=0.0, threshold=0.1)  # fmt: skip
    trainer, rnd = Trainer((cart,), publish_every_ms=1), random.Random(6)
    for i in range(8000):
        segment, pushed = 1 + i % 2, i % 4 < 2
        rec = label(rnd, action="push" if pushed else "holdout", t=i, segment=segment)
        rec["features"] = [0.0] * D
        caused = pushed and segment == 1 and rnd.random() < 0.2 / 0.9  # 1 - 0.9 * (1 - 0.2 / 0.9) = 0.3
        rec["converted"] = caused or rnd.random() < (0.1 if segment == 1 else 0.3)
        rec["attributed"] = caused
        trainer.learn(rec)
    published = trainer.due(now_ms=10_000)
    uplift = UpliftScorer.from_params(orjson.loads(orjson.dumps(published[uplift_key("cart_abandonment")])))
    assert uplift.n_labels >= 7999 and uplift.version == 1 and uplift.n_attributed >= 3999  # the last may wait

    def score(segment):
        return decide(user_id="u", profile=_profile(), features=[0.0] * D, segment=segment, campaign=cart,
                      scorer=PropensityScorer.from_params(published[propensity_key("cart_abandonment")]),
                      guardrails=_guardrails(), trigger_id="t", now_ms=12 * 3_600_000, uplift=uplift)  # fmt: skip

    moved, unmoved = score(1), score(2)
    assert abs(moved.score - 0.2) < 0.05 and abs(unmoved.score) < 0.05
    assert moved.action in ("push", "holdout") and unmoved.action == "suppress"


def test_the_quality_gate_keeps_the_serving_version_when_a_new_one_scores_worse():
    """After version 1 the labels' relation to log_rate_6h flips. The version workers serve is replaced by the new
    regime's truth (as if a better model had been published); the learner, still carrying the old regime's
    weights, scores the same new labels worse, so its versions are refused (and counted) until it catches up."""
    from stream_app.core.propensity import PropensityScorer

    cart = next(c for c in CAMPAIGNS if c.name == "cart_abandonment")
    trainer = Trainer((cart,), publish_every_ms=1, gate_margin=0.02, gate_window=300, gate_min_labels=200)
    key = propensity_key(cart.name)
    rnd = random.Random(9)
    for i in range(2000):
        trainer.learn(label(rnd, t=i))
    first = trainer.due(now_ms=1)[key]
    assert first["version"] == 1  # the first version is never gated
    i = INDEX["log_rate_6h"]
    weights = [0.0] * D
    weights[i] = -2.0 * first["scales"][i]  # z = -2 - 2 x, in the scorer's standardized form
    truth = {**first, "weights": weights, "intercept": -2.0 - 2.0 * first["mean"][i], "n_labels": 10**6}
    trainer.serving[key] = PropensityScorer.from_params(truth)
    for t in range(250):
        rec = label(rnd, t=5000 + t)
        rec["converted"] = rnd.random() < 1 / (1 + math.exp(2.0 + 2.0 * rec["features"][i]))
        trainer.learn(rec)
    assert trainer.due(now_ms=2) == {}  # refused: both scored these labels, the served version did better
    assert trainer.rejected[key] == 1 and key in trainer.dirty  # counted, and evaluated again next time


def test_positives_are_learned_when_their_window_closes_and_survive_a_trainer_restart():
    cart = next(c for c in CAMPAIGNS if c.name == "cart_abandonment")  # 24 h attribution window
    key = propensity_key(cart.name)
    trainer = Trainer((cart,), publish_every_ms=1, decision_order=True)
    rnd = random.Random(3)
    pos = label(rnd, t=0)
    pos["converted"], pos["labelled_at_ms"] = True, 3_600_000  # converted 1 h after the decision
    assert trainer.learn(pos) == (key,)  # buffered: its state changed, nothing learned yet
    assert trainer.learners[key].n_labels == 0 and not trainer.dirty
    state = orjson.loads(orjson.dumps(trainer.state(key)))
    assert len(state["delayed"]) == 1
    successor = Trainer((cart,), publish_every_ms=1, decision_order=True)
    successor.restore(key, state)
    for t in (trainer, successor):
        neg = label(random.Random(4), t=0)
        neg["converted"], neg["decided_at_ms"], neg["labelled_at_ms"] = False, 3_600_000, 3_600_000 + DAY
        t.learn(neg)  # its window closed at 25 h: the positive's (24 h) closed before, so both are learned now
        assert t.learners[key].n_labels == 2 and t.learners[key].n_positive == 1 and not t.delayed[key]


def _persist(t: Trainer, keys, changelog: dict) -> None:
    for k, v in t.states(sorted(keys)):
        changelog[k] = orjson.loads(orjson.dumps(v))  # what the changelog holds: JSON


def _successor(changelog: dict) -> Trainer:
    s = Trainer(CAMPAIGNS, segments_k=3)
    for k, v in changelog.items():
        assert check_state(k, v) is None
        s.restore(k, v)
    assert s.restored() is None
    return s


def test_a_successor_trainer_resumes_the_segment_model_exactly_from_the_changelog_of_any_batch():
    """The segment state was persisted only at publications: a trainer crash lost every sample since the last
    one. Now each batch writes the model's core and the ring chunks it touched: a successor that restores the
    changelog at any batch boundary, ring wrapped or not, learns on to exactly the uninterrupted model."""
    rnd = random.Random(11)
    samples = [{"kind": "segment_sample", "schema": TRAITS_SCHEMA, "traits": [rnd.gauss(0, 1) for _ in TRAIT_NAMES]}
               for _ in range(2600)]  # fmt: skip
    whole = Trainer(CAMPAIGNS, segments_k=3)
    for r in samples:
        whole.learn(r)
    for crash_at in (7, 499, 1000, 1234, 2599):
        t, changelog, keys, i = Trainer(CAMPAIGNS, segments_k=3), {}, set(), 0
        while i < crash_at:  # batches of 1-60 inputs, each persisted as the worker does
            for r in samples[i : min(crash_at, i + rnd.randint(1, 60))]:
                keys.update(t.learn(r))
                i += 1
            _persist(t, keys, changelog)
            keys.clear()
        chunks = [k for k in changelog if k.startswith(RING_PREFIX)]
        assert len(chunks) == -(-min(crash_at, t.segments.reservoir) // RING_CHUNK)
        s = _successor(changelog)
        for r in samples[crash_at:]:
            s.learn(r)
        assert s.state(SEGMENTS_KEY) == whole.state(SEGMENTS_KEY) and s.segments.buffer == whole.segments.buffer


def test_an_older_single_record_segment_state_is_rewritten_in_chunks_and_a_lost_chunk_is_not_used():
    rnd = random.Random(12)
    t = Trainer(CAMPAIGNS, segments_k=3)
    for _ in range(700):
        t.learn({"kind": "segment_sample", "schema": TRAITS_SCHEMA, "traits": [rnd.gauss(0, 1) for _ in TRAIT_NAMES]})
    old = orjson.loads(orjson.dumps(t.segments.to_params()))  # how a trainer before chunks persisted it
    s = Trainer(CAMPAIGNS, segments_k=3)
    s.restore(SEGMENTS_KEY, old)
    assert s.restored() is None and s.segments.buffer == t.segments.buffer
    changelog: dict = {}
    _persist(s, {SEGMENTS_KEY}, changelog)  # the first write after the upgrade chunks the whole ring
    assert _successor(changelog).segments.buffer == t.segments.buffer
    del changelog[f"{RING_PREFIX}3"]  # a chunk lost (or refused by check_state): the ring is not trusted
    u = Trainer(CAMPAIGNS, segments_k=3)
    for k, v in changelog.items():
        u.restore(k, v)
    assert u.restored() == "segment_ring_incomplete"
    assert u.segments.buffer == [] and u.segments.centroids == t.segments.centroids  # the model itself kept
    for _ in range(600):  # refills the ring; no refit on a short ring
        u.learn({"kind": "segment_sample", "schema": TRAITS_SCHEMA, "traits": [rnd.gauss(0, 1) for _ in TRAIT_NAMES]})
    assert len(u.segments.buffer) == 600 and len(u.segments.centroids) == 3
    assert check_state(f"{RING_PREFIX}x", {"schema": TRAITS_SCHEMA, "samples": []}) == "wrong_type"
    assert check_state(f"{RING_PREFIX}0", {"schema": TRAITS_SCHEMA, "samples": [[0.0]]}) == "wrong_type"
