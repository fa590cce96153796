"""Hostile input against the engine, one issue-17 item per test (no Kafka: the engine is what the worker runs).

Every record is applied or dead-lettered exactly once with its true reason and counted where it belongs; an
exception while applying one record dead-letters that record and nothing else; consent outlives the profile;
one producer cannot move event time for a partition; consent and events of a user share one path and order.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import orjson
import pytest
from jsonschema import Draft202012Validator

from stream_app.campaigns import load_campaigns
from stream_app.core.features import FEATURE_NAMES
from stream_app.core.pipeline import Config, Models
from stream_app.core.profile import DAY_MS, HOUR_MS
from stream_app.core.propensity import PropensityLearner, PropensityScorer
from stream_app.core.segments import SegmentModel
from stream_app.core.trainer import Trainer
from stream_app.core.uplift import UpliftLearner, uplift_params
from stream_app.engine import ERASED, Engine, Message, ModelStore, decode_state
from stream_app.metrics import Metrics
from stream_app.replay import DictStore
from stream_app.settings import Settings

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
CAMPAIGNS, GUARDRAILS = load_campaigns()
CONFIG = Config(tuple(replace(c, holdout_share=0.0, exploration_share=0.0) for c in CAMPAIGNS), GUARDRAILS)
SCORERS = {c.name: replace(PropensityScorer.cold(c.name), intercept=2.0, n_labels=10_000, min_labels=10, version=3)
           for c in CAMPAIGNS}  # fmt: skip
MODELS = Models(SegmentModel(k=3), SCORERS)
SETTINGS = Settings(topic_partitions=1)
T = 400 * DAY_MS + 12 * HOUR_MS  # noon UTC, 1971
CLICKS, CONSENT, DLQ = SETTINGS.clicks_topic, SETTINGS.consent_topic, SETTINGS.dead_letter_topic


class RecordingStore(DictStore):
    """The replay store, also keeping every state write in order (what the changelog would receive)."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, bytes | None]] = []

    def put(self, batch, key, value, partition) -> None:
        super().put(batch, key, value, partition)
        self.log.append((key, value))
        batch.append((SETTINGS.users_changelog_topic, orjson.dumps(key), value, partition))


def make(settings: Settings = SETTINGS, clock=None, config: Config = CONFIG) -> Engine:
    return Engine(settings, config, RecordingStore(), ModelStore(MODELS), Metrics.create(), clock=clock)


def event(eid: str, user: str, ts: int, etype: str = "click", **extra) -> bytes:
    body = {"event_id": eid, "type": etype, "user_id": user, "ts": ts, "category": "shoes"}
    return orjson.dumps(body | ({"amount": 10.0} if etype == "payment" else {}) | extra)


def consent(user: str, action: str) -> bytes:
    return orjson.dumps({"user_id": user, "action": action})


def msg(value: bytes | None, topic: str = CLICKS, ts: int = T, offset: int = 0, key: bytes | None = b"k") -> Message:
    return Message(topic, 0, offset, key, value, ts)


def run(engine: Engine, *messages: Message) -> tuple[list[tuple[str, str]], list]:
    batch: list = []
    return [engine.apply(batch, m) for m in messages], batch


def on(batch, topic: str) -> list[dict]:
    return [orjson.loads(v) for t, _, v, _ in batch if t == topic]


def count(counter) -> float:
    return counter._value.get()


def validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(json.loads((SCHEMAS / name).read_text()))


DEAD_LETTER = validator("dead-letter.v1.json")


# -- items 1-3, 11: poison records are dead letters with their true reason, counted where they belong -----------


def test_tombstones_on_inputs_and_consent_are_dead_letters_not_crashes():
    e = make()
    results, batch = run(e, msg(None), msg(None, CONSENT), msg(event("e1", "u", T)))
    assert results == [("dead_letter", "tombstone"), ("dead_letter", "tombstone"), ("applied", "click")]
    dead = on(batch, DLQ)
    assert [d["value_is_null"] for d in dead] == [True, True] and all(DEAD_LETTER.is_valid(d) for d in dead)
    assert [d["source_topic"] for d in dead] == [CLICKS, CONSENT]
    assert count(e.metrics.events_rejected["tombstone"]) == 1 and count(e.metrics.consent_rejected["tombstone"]) == 1


def test_a_huge_key_on_a_rejected_record_gives_a_dead_letter_that_can_be_sent():
    from stream_app.outbox import MAX_RECORD_BYTES

    e = make()
    huge = b"k" * 950_000  # a record near Kafka's 1 MB limit, almost all key
    for topic in (CLICKS, CONSENT):
        (result,), batch = run(e, msg(b"{oops", topic, key=huge))
        (record,) = [r for r in batch if r[0] == DLQ]
        assert result == ("dead_letter", "malformed_json")
        assert len(record[1]) == 1024 and len(record[1]) + len(record[2]) < MAX_RECORD_BYTES
        dead = orjson.loads(record[2])
        assert dead["key_bytes"] == len(huge) and DEAD_LETTER.is_valid(dead)


def test_huge_amounts_never_reach_state_and_the_user_can_still_opt_out():
    e = make()
    results, _ = run(
        e,
        msg(event("p0", "u", T, "payment")),
        msg(b'{"event_id":"p1","type":"payment","user_id":"u","ts":%d,"amount":1e308}' % T),
        msg(b'{"event_id":"p2","type":"payment","user_id":"u","ts":%d,"amount":1e308}' % T),
        msg(b'{"event_id":"p3","type":"payment","user_id":"u","ts":%d,"amount":1e999}' % T),
        msg(consent("u", "opt_out"), CONSENT),
        msg(event("p4", "u", T + 1000, "payment")),
    )
    assert [r[1] for r in results] == ["payment", "bad_amount", "bad_amount", "non_finite_number", "opt_out", "payment"]
    state = decode_state(e.users.get("u"))
    assert state.opted_out and state.profile.spend_total == 20.0 and state.profile.counts == [0, 0, 2]


def test_dead_letter_reasons_are_true():
    deep_object = b'{"a":' * 10_000 + b"1" + b"}" * 10_000
    cases = {
        b"": "empty_value",
        b"\xff\xfe": "bad_utf8",
        deep_object: "too_deep",
        b'{"event_id":"a","type":"click","user_id":"u","ts":NaN}': "non_finite_number",
        b"{oops": "malformed_json",
        b'"a string"': "not_an_object",
    }
    e = make(Settings(topic_partitions=1, max_event_bytes=1 << 20))
    for raw, code in cases.items():
        for topic in (CLICKS, CONSENT):
            (result,), batch = run(e, msg(raw, topic))
            assert result == ("dead_letter", code), (raw[:20], topic)
            (dead,) = on(batch, DLQ)
            assert dead["error_code"] == code and DEAD_LETTER.is_valid(dead)
    assert sum(count(c) for c in e.metrics.events_rejected.values()) == len(cases)
    assert sum(count(c) for c in e.metrics.consent_rejected.values()) == len(cases)


def test_year_10000_with_a_time_zone_is_a_bad_timestamp():
    e = make()
    for ts in (253_402_300_800_000, '"10000-01-01T00:00:00+01:00"', 10**30):
        raw = b'{"event_id":"y","type":"click","user_id":"u","ts":%s,"tz":"Europe/Berlin"}' % str(ts).encode()
        (result,), _ = run(e, msg(raw))
        assert result == ("dead_letter", "bad_timestamp")


def test_rejections_are_counted_only_once_their_dead_letter_is_written():
    e = make()
    e.count_on_write = True  # the worker: the shell counts what it sent
    results, _ = run(e, msg(b"{oops"), msg(b"{oops", CONSENT))
    assert count(e.metrics.events_rejected["malformed_json"]) == 0  # not sent yet
    for m, (_, code) in zip((msg(b"{oops"), msg(b"{oops", CONSENT)), results, strict=True):
        e.counted(m.topic, code)  # what the shell does once the batch was sent
    assert count(e.metrics.events_rejected["malformed_json"]) == 1
    assert count(e.metrics.consent_rejected["malformed_json"]) == 1  # consent apart from events


def test_an_exception_while_applying_one_record_dead_letters_it_and_nothing_else(monkeypatch):
    import stream_app.engine as engine_module

    e = make()
    run(e, msg(event("e0", "v", T)), msg(event("e1", "u", T)))
    before_u, before_v = e.users.get("u"), e.users.get("v")
    real = engine_module.process

    def flaky(state, ev, models, config):
        if ev.user_id == "u":
            raise ZeroDivisionError("secret detail about u")
        return real(state, ev, models, config)

    monkeypatch.setattr(engine_module, "process", flaky)
    results, batch = run(e, msg(event("e2", "u", T + 1000), offset=7), msg(event("e3", "v", T + 2000)))
    assert results == [("dead_letter", "internal_error"), ("applied", "click")]
    (dead,) = on(batch, DLQ)
    assert dead["error_code"] == "internal_error" and dead["exception"] == "ZeroDivisionError"
    assert dead["source_offset"] == 7 and DEAD_LETTER.is_valid(dead)
    assert "secret" not in dead["reason"] and "Traceback" not in dead["reason"] and ".py" not in dead["reason"]
    assert e.users.get("u") == before_u and e.users.get("v") != before_v  # nothing of the failed record stayed
    assert not [v for t, k, v, _ in batch if t == SETTINGS.users_changelog_topic and k == b'"u"']
    assert count(e.metrics.events_rejected["internal_error"]) == 1


def test_a_corrupt_stored_state_dead_letters_events_but_consent_still_wins():
    e = make()
    e.users.data["u"] = b'{"p": 7}'  # a foreign record on the changelog
    (result,), _ = run(e, msg(event("e1", "u", T)))
    assert result == ("dead_letter", "corrupt_state")
    (result,), _ = run(e, msg(consent("u", "opt_out"), CONSENT))
    assert result == ("consent", "opt_out") and decode_state(e.users.get("u")).opted_out
    (result,), _ = run(e, msg(event("e2", "u", T)))
    assert result == ("applied", "click")


# -- item 5: trainer inputs and model parameters ---------------------------------------------------------------


def test_model_inputs_that_are_not_labels_are_dead_lettered_and_the_trainer_goes_on():
    e, trainer, batch = make(), Trainer(CAMPAIGNS), []
    label = {"kind": "label", "campaign": CAMPAIGNS[0].name, "decision_id": "0" * 24, "action": "push",
             "converted": True, "features": [0.0] * len(FEATURE_NAMES), "model_version": 0,
             "action_probability": 1.0, "segment": -1, "decided_at_ms": 0, "labelled_at_ms": 1}  # fmt: skip
    inputs = [b"[1, 2]", b'"label"', None, orjson.dumps(label | {"features": "x"}),
              orjson.dumps(label | {"segment": 99}),
              orjson.dumps({k: v for k, v in label.items() if k != "converted"}),
              orjson.dumps({"kind": "segment_sample", "schema": "traits-v1", "traits": [1.0]}),
              orjson.dumps(label | {"converted": "yes"}), orjson.dumps(label)]  # fmt: skip
    topic = SETTINGS.model_inputs_topic
    out = [e.on_model_input(batch, msg(v, topic, offset=i), trainer) for i, v in enumerate(inputs)]
    assert out[:-1] == [None] * (len(inputs) - 1) and out[-1] == (f"propensity:{CAMPAIGNS[0].name}",)
    codes = [d["error_code"] for d in on(batch, DLQ)]
    assert codes == ["not_an_object", "not_an_object", "tombstone", "wrong_type", "wrong_type", "missing_field",
                     "wrong_type", "wrong_type"]  # fmt: skip
    assert sum(count(c) for c in e.metrics.model_inputs_rejected.values()) == 8
    assert sum(count(c) for c in e.metrics.events_rejected.values()) == 0


def test_badly_typed_model_params_are_refused_with_a_reason_and_never_raise():
    store = ModelStore(MODELS)
    learner = PropensityLearner("c", 0.02, 100)
    learner.learn_one([1.0] * len(FEATURE_NAMES), True)
    good = learner.to_params(with_covariance=False) | {"version": 3}
    uplift = UpliftLearner()
    uplift.learn_one({"a": 1.0}, True, True, attributed=True)
    up = uplift_params("c", 100, uplift, with_covariance=False) | {"version": 2}
    seg = SegmentModel(k=2, warmup=2)
    seg.learn_one([0.0]), seg.learn_one([5.0])  # a model of a one-number vector: it cannot score traits
    bad = [
        (b"propensity:c", orjson.dumps(good | {"version": "4"}), "wrong_type"),
        (b"propensity:c", orjson.dumps(good | {"weights": [None] * len(FEATURE_NAMES)}), "wrong_type"),
        (b"propensity:c", orjson.dumps(good | {"scales": [0.0] * len(FEATURE_NAMES)}), "wrong_type"),
        (b"propensity:c", orjson.dumps(good | {"campaign": "other"}), "wrong_type"),
        (
            b"propensity:c",
            orjson.dumps(good | {"posterior": good["posterior"] | {"weights": [1.0, 2.0]}}),
            "wrong_type",
        ),
        (b"propensity:c", orjson.dumps(good | {"features": ["a"]}), "wrong_type"),  # another feature set
        (b"uplift:c", orjson.dumps(up | {"response": up["response"] | {"names": ["a", "b"]}}), "wrong_type"),
        (b"uplift:c", orjson.dumps(up | {"residual": up["residual"] | {"covariance": [[1.0]]}}), "wrong_type"),
        (b"uplift:c", orjson.dumps(up | {"residual": up["residual"] | {"intercept": "0"}}), "wrong_type"),
        (b"uplift:c", orjson.dumps(up | {"exclude": [1]}), "wrong_type"),
        (b"uplift:c", orjson.dumps(up | {"n_treated": -1}), "wrong_type"),
        (b"uplift:c", orjson.dumps(up | {"campaign": "d"}), "wrong_type"),
        (b"uplift:c", orjson.dumps(up | {"residual_strength": 0}), "wrong_type"),
        (b"propensity:c", b"[]", "not_an_object"),
        (b"propensity:c", None, "tombstone"),
        (b"propensity:c", b"{", "malformed_json"),
        (b"\xff", orjson.dumps(good), "bad_utf8"),
        (None, orjson.dumps(good), "wrong_type"),
        (b"weather", orjson.dumps(good), "unknown_type"),
        (b"segments", orjson.dumps(seg.to_params() | {"version": 1}), "wrong_type"),
        (
            b"uplift:c",
            orjson.dumps(
                {"kind": "segment_uplift", "campaign": "c", "strength": 1, "version": 1, "arms": {"0": [1, "2", 3, 4]}}
            ),
            "wrong_type",
        ),
    ]
    for key, value, code in bad:
        assert store.apply_record(key, value) == code, (key, value)
    assert store.current is MODELS  # nothing was installed
    assert store.apply_record(b"propensity:c", orjson.dumps(good)) is None
    assert store.current.scorers["c"].version == 3
    assert store.apply_record(b"uplift:c", orjson.dumps(up)) is None
    assert store.current.uplifts["c"].predict_uplift_one({"a": 1.0}) > 0.5  # learned one attributed conversion
    old = {"campaign": "c", "strength": 1, "version": 9, "arms": {"0": [1, 2, 3, 4]}}  # an older trainer's counts
    assert store.apply_record(b"uplift:c", orjson.dumps(old)) is None and store.current.uplifts["c"].version == 2


# -- item 6: consent outlives the profile ---------------------------------------------------------------------------


def pushes(batch) -> list[dict]:
    return [d for d in on(batch, SETTINGS.decisions_topic) if d.get("action") == "push"]


@pytest.mark.parametrize("retention_days", [0, 200, 30])
def test_an_opt_out_outlives_the_profile_ttl(retention_days):
    e = make(Settings(topic_partitions=1, consent_retention_s=retention_days * 86_400))
    run(e, msg(event("o0", "o", T)), msg(consent("o", "opt_out"), CONSENT, ts=T + HOUR_MS))
    later = T + 91 * DAY_MS  # another user's events move the watermark past o's 90-day TTL
    run(e, msg(event("w0", "w", later, "like"), ts=later))
    back = later + DAY_MS
    if retention_days == 30:  # kept 30 days after the user's last event or command: gone with the profile
        assert e.users.get("o") is None
    else:  # 0: for ever (the default); 200 days: still within
        kept = decode_state(e.users.get("o"))
        assert kept.profile is None and kept.opted_out  # the profile (activity) went, the opt-out did not
        assert orjson.loads(e.users.get("o")).keys() == {"p", "o", "l", "q", "c"}  # and nothing else of the user's
    _, batch = run(e, *[msg(event(f"o{i}", "o", back + i * 60_000), ts=back + i * 60_000) for i in range(1, 5)])
    audit = [d for d in on(batch, SETTINGS.audit_topic) if d["user_id"] == "o"]
    if retention_days == 30:
        assert pushes(batch)  # as documented: a finite retention ends the opt-out
    else:
        assert audit and all(d["action"] == "suppress" and "suppress:opted_out" in d["reasons"] for d in audit)
        assert not pushes(batch)


def test_an_opt_out_before_any_event_is_kept_for_ever_by_default():
    e = make()
    run(e, msg(consent("n", "opt_out"), CONSENT))
    far = T + 3 * 365 * DAY_MS
    run(e, msg(event("w0", "w", far), ts=far))
    _, batch = run(e, *[msg(event(f"n{i}", "n", far + i), ts=far + i) for i in range(5)])
    assert not pushes(batch) and decode_state(e.users.get("n")).opted_out


# -- item 7: one producer cannot move a partition's event time -----------------------------------------------------


def open_windows(e: Engine) -> Engine:
    """Users with open label windows (pushes at noon) and a lapsing buyer, on one partition."""
    msgs = [msg(event(f"{u}{i}", u, T + i * 60_000), ts=T + i * 60_000) for u in ("a", "b") for i in range(3)]
    msgs.append(msg(event("pay", "c", T, "payment")))
    _, batch = run(e, *msgs)
    assert {d["user_id"] for d in pushes(batch)} == {"a", "b", "c"}  # cart pushes; a cross-sell after the payment
    return e


@pytest.mark.parametrize("clock", [None, lambda: T + HOUR_MS])
def test_one_record_stamped_400_days_ahead_expires_nobody(clock):
    e = open_windows(make(clock=clock))
    states = dict(e.users.data)
    ahead = T + 400 * DAY_MS
    # the record time is the broker's (LogAppendTime-like, or bounded by message.timestamp.after.max.ms): honest
    (result,), batch = run(e, msg(event("x1", "x", ahead), ts=T + HOUR_MS))
    assert result == ("dead_letter", "ts_out_of_range")
    if clock is not None:  # a worker also checks its own clock: a forged record time does not help either
        (result,), batch2 = run(e, msg(event("x2", "x", ahead), ts=ahead))
        assert result == ("dead_letter", "ts_out_of_range")
        batch += batch2
    # just under a day ahead of the record time is within the accepted skew: applied to x's own profile, but the
    # watermark stays bounded (else the 24 h cart windows of a and b would close now, as negatives)
    soon = T + HOUR_MS + DAY_MS - 60_000
    (result,), batch3 = run(e, msg(event("x3", "x", soon), ts=T + HOUR_MS))
    assert result == ("applied", "click")
    for user in ("a", "b", "c"):
        assert e.users.get(user) == states[user], user  # no label window closed, no win-back, nobody expired
    assert not on(batch + batch3, SETTINGS.model_inputs_topic) or all(
        r.get("kind") != "label" for r in on(batch + batch3, SETTINGS.model_inputs_topic)
    )
    assert count(e.metrics.timers_fired) == 0
    assert e.timers.watermarks[0] <= T + HOUR_MS + SETTINGS.watermark_max_lead_s * 1000


def test_the_watermark_still_follows_honest_time():
    e = open_windows(make())
    later = T + 10 * DAY_MS  # every window closed, the buyer lapsed (7 days): honest time fires them
    _, batch = run(e, msg(event("z", "z", later), ts=later))
    labels = [r for r in on(batch, SETTINGS.model_inputs_topic) if r.get("kind") == "label"]
    assert len(labels) == 3 and not any(r["converted"] for r in labels)  # the three windows closed, negative
    assert "winback" in [d["campaign"] for d in on(batch, SETTINGS.audit_topic) if d["user_id"] == "c"]


# -- item 8: consent and events of one user, one path, one order ----------------------------------------------------


def test_an_erase_is_never_followed_by_the_old_profile_on_the_changelog():
    e = make()
    msgs = [msg(event("e1", "u", T)), msg(consent("u", "erase"), CONSENT), msg(event("e2", "u", T + 1)),
            msg(consent("u", "opt_in"), CONSENT), msg(event("e3", "u", T + 2))]  # fmt: skip
    results, batch = run(e, *msgs)
    assert [r[0] for r in results] == ["applied", "consent", "erased", "consent", "erased"]
    writes = [v for k, v in e.users.log if k == "u"]
    assert writes[-1] == ERASED and writes.index(ERASED) == len(writes) - 1
    changelog = [v for t, k, v, _ in batch if t == SETTINGS.users_changelog_topic and k == b'"u"']
    assert changelog[-1] == ERASED and changelog.count(ERASED) == 1


# -- item 9: an opt-out cancels the pushes still held for quiet hours ----------------------------------------------


@pytest.mark.parametrize("action", ["opt_out", "erase"])
def test_an_opt_out_cancels_held_pushes(action):
    e = make()
    night = T + 11 * HOUR_MS  # 23:00 UTC = 07:00 in UTC+8: quiet until 08:00 local
    _, batch = run(e, *[msg(event(f"n{i}", "n", night + i * 60_000, tz_offset_min=480), ts=night) for i in range(3)])
    (held,) = pushes(batch)
    assert held["send_at_ms"] > night + 2 * 60_000
    _, batch = run(e, msg(consent("n", action), CONSENT, ts=night + 10 * 60_000))
    cancels = on(batch, SETTINGS.decisions_topic)
    assert [c["decision_id"] for c in cancels] == [held["decision_id"]]
    assert cancels == on(batch, SETTINGS.audit_topic)
    schema = validator("cancellation.v1.json")
    assert schema.is_valid(cancels[0]) and cancels[0]["cause"] == action
    assert count(e.metrics.pushes_cancelled) == 1
    _, batch = run(e, msg(consent("n", action), CONSENT, ts=night + 11 * 60_000))
    assert not on(batch, SETTINGS.decisions_topic)  # once: an erased user has nothing left to cancel
