"""Fuzz: hostile records on every topic the product reads, against the engine in-process (issue 17).

Invariant, checked record by record against an independent model (tests/fuzzkit.py): the engine never raises
and never stalls; every bad record is dead-lettered exactly once, carrying its original bytes, with the reason
the oracle gives (never ``internal_error``); every good record is applied exactly once (repartitioned ones
after their one forward); an opted-out or erased user gets no push; rejections are counted by topic kind; the
users' final states are the fold of the good records. Inputs: a corpus (tests/fuzzkit.corpus) on each topic,
and Hypothesis streams mixing valid traffic, duplicates, consent, corrupt stored states, corpus values, random
bytes and mutated events over four partitions.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field, replace
from datetime import datetime

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream_app.campaigns import load_campaigns
from stream_app.core.features import FEATURE_NAMES, TRAIT_NAMES, feature_dict
from stream_app.core.pipeline import Config, Models
from stream_app.core.propensity import PropensityLearner, PropensityScorer
from stream_app.core.segments import SegmentModel
from stream_app.core.trainer import Trainer, check_state, uplift_key
from stream_app.core.uplift import UpliftLearner, uplift_params
from stream_app.engine import ERASED, Engine, Message, ModelStore, decode_state
from stream_app.metrics import REJECT_CODES, Metrics
from stream_app.replay import DictStore
from stream_app.settings import Settings
from tests.fuzzkit import (
    CONSENT_SCHEMA,
    DAY_MS,
    EVENT_SCHEMA,
    LAYER1,
    SEMANTIC,
    T0,
    corpus,
    dead_letter_matches,
    expected,
    layer1,
)

CAMPAIGNS, GUARDRAILS = load_campaigns()
CONFIG = Config(tuple(replace(c, holdout_share=0.0) for c in CAMPAIGNS), GUARDRAILS)
SCORERS = {c.name: replace(PropensityScorer.cold(c.name), intercept=2.0, n_labels=10_000, min_labels=10, version=3)
           for c in CAMPAIGNS}  # fmt: skip
MODELS = Models(SegmentModel(k=3), SCORERS)
SETTINGS = Settings(topic_partitions=4)
MAX = SETTINGS.max_event_bytes
CORPUS = corpus(MAX)
CLOCK = T0 + DAY_MS  # the worker's clock
INPUTS = SETTINGS.input_topics
CONSENT = SETTINGS.consent_topic
CORRUPT = {"c-1": b"\xff\x00garbage", "c-2": b'{"p": 7}', "c-3": b"[]", "c-4": b'{"q": [[1]]}'}
CASES = {"records": 0}  # how many records the fuzz tests ran (printed by the last test with -s)


def encode(obj: object) -> bytes:
    """As a producer would send it: orjson, or Python's json for what orjson refuses (NaN, 2**64, int keys)."""
    try:
        return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)
    except (TypeError, orjson.JSONEncodeError):
        return json.dumps(obj).encode()


def ts_of(obj: dict) -> int | None:
    """The event time the oracle reads from a schema-valid event (None: beyond Python's datetimes)."""
    ts = obj["ts"]
    if isinstance(ts, int | float):
        return int(ts)
    try:
        return int(datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() * 1000)
    except (ValueError, OverflowError):
        return None


@dataclass
class User:
    erased: bool = False
    opted_out: bool = False
    corrupt: bool = False
    counts: list[int] = field(default_factory=lambda: [0, 0, 0])
    seen: list[str] = field(default_factory=list)


class Harness:
    """Feeds records to an engine as a partition's consumer would, and checks each outcome against the model."""

    def __init__(self) -> None:
        self.store = DictStore()
        self.engine = Engine(SETTINGS, CONFIG, self.store, ModelStore(MODELS), Metrics.create(), clock=lambda: CLOCK)
        self.users: dict[str, User] = {}
        self.offset = 0
        self.dead = {"event": 0, "consent": 0}
        for user, value in CORRUPT.items():
            self.store.data[user] = value
            self.users[user] = User(corrupt=True)

    def user(self, user_id: str) -> User:
        return self.users.setdefault(user_id, User())

    def feed(
        self, topic: str, raw: bytes | None, partition: int, ts: int, key: bytes | None = b"key"
    ) -> tuple[str, str]:
        self.offset += 1
        CASES["records"] += 1
        msg = Message(topic, partition, self.offset, key, raw, ts)
        batch: list = []
        result = self.engine.apply(batch, msg)  # never raises: an exception here fails the test
        if result[0] == "repartitioned":
            (fwd,) = [r for r in batch if r[0] == topic and r[2] == raw]
            assert fwd[3] != partition and len(batch) == 1
            self.offset += 1
            batch = []
            home = Message(topic, fwd[3], self.offset, fwd[1], raw, ts)
            result = self.engine.apply(batch, home)
            assert result[0] != "repartitioned"  # forwarded once, then processed where the user lives
            msg = home
        self.check(msg, result, batch)
        return result

    def check(self, msg: Message, result: tuple[str, str], batch: list) -> None:
        s = SETTINGS
        kind = "consent" if msg.topic == CONSENT else "event"
        want = expected(msg.value, MAX, CONSENT_SCHEMA if kind == "consent" else EVENT_SCHEMA)
        obj = layer1(msg.value, MAX)[1] if want == "valid" else None
        if want == "valid" and kind == "event":
            ts = ts_of(obj)
            if ts is None or not (msg.timestamp_ms - s.max_past_skew_s * 1000 <= ts
                                  <= min(msg.timestamp_ms, CLOCK) + s.max_future_skew_s * 1000):  # fmt: skip
                want = "semantic"
            elif self.user(obj["user_id"]).corrupt and not self.user(obj["user_id"]).erased:
                want = "corrupt_state"
        dead = [orjson.loads(v) for t, _, v, _ in batch if t == s.dead_letter_topic]
        assert all(len(k or b"") <= 1024 for t, k, _, _ in batch if t == s.dead_letter_topic)  # always sendable
        assert result != ("dead_letter", "internal_error"), msg
        if want in LAYER1 or want == "corrupt_state":
            assert result == ("dead_letter", want), (msg.value[:80] if msg.value else None, want, result)
        elif want == "semantic":
            assert result[0] == "dead_letter" and result[1] in SEMANTIC, (msg.value[:120], result)
        else:
            assert result[0] != "dead_letter", (msg.value[:120], result)
        if result[0] == "dead_letter":
            assert len(dead) == 1 and dead_letter_matches(dead[0], msg.value, msg.topic, msg.offset, result[1])
            self.dead[kind] += 1
        else:
            assert not dead
        pushes = [orjson.loads(v) for t, _, v, _ in batch if t == s.decisions_topic]
        if kind == "consent" and result[0] == "consent":
            self.apply_consent(obj["user_id"], obj["action"], pushes)
        else:
            assert all(p["schema"] == "decision.v1" for p in pushes)  # cancellations come from consent only
        if kind == "event" and result[0] != "dead_letter":
            self.apply_event(obj, result)
        for p in pushes:
            if p["schema"] == "decision.v1":
                u = self.user(p["user_id"])
                assert not u.opted_out and not u.erased, p  # consent honoured, also by timers' decisions

    def apply_event(self, obj: dict, result: tuple[str, str]) -> None:
        u = self.user(obj["user_id"])
        if u.erased:
            assert result[0] == "erased"
        elif obj["event_id"] in u.seen:
            assert result[0] == "duplicate"
        else:
            assert result == ("applied", obj["type"]), (obj, result)
            u.counts[("click", "like", "payment").index(obj["type"])] += 1
            u.seen = [*u.seen, obj["event_id"]][-CONFIG.profile.dedup_ids :]

    def apply_consent(self, user_id: str, action: str, records: list[dict]) -> None:
        u = self.user(user_id)
        assert all(r["schema"] == "cancellation.v1" and r["user_id"] == user_id for r in records)
        assert not records or action in ("opt_out", "erase")
        if action == "erase":
            u.erased, u.corrupt = True, False
            u.counts, u.seen = [0, 0, 0], []
        elif not u.erased:
            if u.corrupt:  # the command replaced the unreadable state: a fresh start
                u.corrupt, u.counts, u.seen = False, [0, 0, 0], []
            u.opted_out = action == "opt_out"

    def finish(self) -> None:
        """The final states are the fold of the good records; rejections were counted by kind, once each."""
        for user_id, u in self.users.items():
            stored = self.store.get(user_id)
            if u.erased:
                assert stored == ERASED
            elif u.corrupt:
                assert stored == CORRUPT[user_id]
            elif stored is not None:
                state = decode_state(stored)
                assert state.opted_out == u.opted_out
                assert (state.profile.counts if state.profile else [0, 0, 0]) == u.counts, user_id
            else:
                assert u.counts == [0, 0, 0] and not u.opted_out
        m = self.engine.metrics
        assert sum(c._value.get() for c in m.events_rejected.values()) == self.dead["event"]
        assert sum(c._value.get() for c in m.consent_rejected.values()) == self.dead["consent"]


def test_every_corpus_value_on_every_topic_is_applied_or_dead_lettered_with_its_true_reason():
    h = Harness()
    rnd = random.Random(5)
    for topic in (*INPUTS, CONSENT):
        for _name, raw in CORPUS:
            h.feed(topic, raw, rnd.randrange(4), T0 + rnd.randrange(3_600_000))
    h.finish()
    codes = {c for c, counter in h.engine.metrics.events_rejected.items() if counter._value.get()}
    assert codes >= LAYER1 | {"wrong_type", "bad_timestamp", "bad_amount", "ts_out_of_range", "missing_field"}


# -- streams -------------------------------------------------------------------------------------------------------

USERS = ["a", "b", "c", "d", *CORRUPT]
TEXT = st.text(max_size=8)
SCALARS = st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats() | TEXT
STEP = st.one_of(
    st.tuples(
        st.just("event"),
        st.sampled_from(USERS),
        st.sampled_from(["click", "click", "like", "payment"]),
        st.integers(0, 600_000),
        st.sampled_from([None, "Europe/Berlin", "Mars/Olympus"]),
    ),
    st.tuples(st.just("duplicate")),
    st.tuples(st.just("consent"), st.sampled_from(USERS), st.sampled_from(["opt_out", "opt_out", "opt_in", "erase"])),
    st.tuples(st.just("corpus"), st.integers(0, len(CORPUS) - 1), st.booleans()),
    st.tuples(st.just("bytes"), st.binary(max_size=80), st.booleans()),
    st.tuples(
        st.just("mutant"),
        st.sampled_from(USERS),
        st.dictionaries(
            st.sampled_from(["event_id", "type", "user_id", "ts", "amount", "tz", "tz_offset_min", "item_id", "x"]),
            SCALARS,
            max_size=3,
        ),
    ),
)


KEYS = st.sampled_from([b"key", b"key", None, b"", b"k" * 3000])


@given(st.lists(st.tuples(STEP, st.integers(0, 3), KEYS), min_size=5, max_size=60))
@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_hostile_streams_keep_every_invariant(steps):
    h = Harness()
    t, last, n = T0, None, 0
    for step, partition, key in steps:
        kind = step[0]
        t += 1000
        if kind == "event":
            _, user, etype, dt, tz = step
            n += 1
            ev = {"event_id": f"e{n}", "type": etype, "user_id": user, "ts": t + dt} | ({"tz": tz} if tz else {})
            last = orjson.dumps(ev | ({"amount": 12.5} if etype == "payment" else {}))
            h.feed(INPUTS[("click", "like", "payment").index(etype)], last, partition, t)
        elif kind == "duplicate" and last is not None:
            h.feed(INPUTS[0], last, partition, t + 5000)  # a redelivery (on any input topic)
        elif kind == "consent":
            h.feed(CONSENT, orjson.dumps({"user_id": step[1], "action": step[2]}), partition, t)
        elif kind == "corpus":
            h.feed(CONSENT if step[2] else INPUTS[1], CORPUS[step[1]][1], partition, t, key)
        elif kind == "bytes":
            h.feed(CONSENT if step[2] else INPUTS[2], step[1], partition, t, key)
        elif kind == "mutant":
            n += 1
            ev = {"event_id": f"m{n}", "type": "click", "user_id": step[1], "ts": t} | step[2]
            h.feed(INPUTS[0], encode(ev), partition, t, key)
    h.finish()


# -- trainer inputs and model parameters -----------------------------------------------------------------------------

LABEL = {"kind": "label", "campaign": CAMPAIGNS[0].name, "decision_id": "0" * 24, "action": "push", "converted": True,
         "features": [0.5] * len(FEATURE_NAMES), "model_version": 0, "action_probability": 0.5, "segment": -1,
         "decided_at_ms": 0, "labelled_at_ms": 1}  # fmt: skip
UPLIFT = replace(CAMPAIGNS[0], name="uplift_test", mode="uplift")  # learns both arms and the attribution
UPLIFT_LABEL = LABEL | {"campaign": UPLIFT.name, "action": "holdout", "segment": 2, "attributed": False}
SAMPLE = {"kind": "segment_sample", "schema": "traits-v1", "traits": [0.1] * len(TRAIT_NAMES)}
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                    max_leaves=8)  # fmt: skip


@given(st.lists(st.one_of(
    st.builds(lambda change: LABEL | change, st.dictionaries(st.sampled_from(sorted(LABEL)), JSON, max_size=2)),
    st.builds(lambda change: UPLIFT_LABEL | change,
              st.dictionaries(st.sampled_from(sorted(UPLIFT_LABEL)), JSON | st.integers(-(2**70), 2**70), max_size=2)),
    st.builds(lambda change: SAMPLE | change, st.dictionaries(st.sampled_from(sorted(SAMPLE)), JSON, max_size=1)),
    JSON, st.sampled_from([v for _, v in CORPUS]),
), min_size=1, max_size=30))  # fmt: skip
@settings(max_examples=300, deadline=None)
def test_the_trainer_never_stops_on_its_inputs(records):
    engine = Engine(SETTINGS, CONFIG, DictStore(), ModelStore(MODELS), Metrics.create())
    trainer, rejected = Trainer((*CAMPAIGNS, UPLIFT), segments_k=3, publish_every_ms=1, decision_order=True), 0
    for i, record in enumerate(records):
        CASES["records"] += 1
        raw = record if isinstance(record, bytes | None) else encode(record)
        batch: list = []
        keys = engine.on_model_input(batch, Message(SETTINGS.model_inputs_topic, 0, i, b"k", raw, T0), trainer)
        dead = [orjson.loads(v) for t, _, v, _ in batch if t == SETTINGS.dead_letter_topic]
        assert (keys is None) == (len(dead) == 1) and len(dead) <= 1
        if dead:
            assert dead[0]["error_code"] in REJECT_CODES and dead[0]["error_code"] != "internal_error", dead[0]
            rejected += 1
        trainer.due(i)  # publishing what was learned never raises either
    assert f"propensity:{LABEL['campaign']}" in trainer.learn(LABEL | {"converted": False})  # and it still learns
    assert uplift_key(UPLIFT.name) in trainer.learn(UPLIFT_LABEL | {"converted": False})
    # its persisted state (the segments' ring in chunks) is what a successor restores
    records = {k: orjson.loads(orjson.dumps(v)) for k, v in trainer.states([*trainer.learners, *trainer.uplifts,
                                                                             "segments"])}  # fmt: skip
    successor = Trainer((*CAMPAIGNS, UPLIFT), segments_k=3, publish_every_ms=1, decision_order=True)
    for key, state in records.items():
        assert check_state(key, state) is None, key
        successor.restore(key, state)
    assert successor.restored() is None
    for key in [*trainer.learners, *trainer.uplifts, "segments"]:
        assert orjson.dumps(successor.state(key)) == orjson.dumps(trainer.state(key))
    assert successor.segments.buffer == trainer.segments.buffer
    assert sum(c._value.get() for c in engine.metrics.model_inputs_rejected.values()) == rejected


PARAM_KEYS = st.sampled_from([b"segments", b"propensity:cart_abandonment", b"control:cart_abandonment",
                              b"uplift:cart_abandonment", b"weather", b"\xff", b""]) | st.none()  # fmt: skip


def _learned(n: int = 50) -> tuple[dict, dict]:
    """Published versions of a real propensity and a real uplift learner (the shapes the trainer writes)."""
    rnd = random.Random(7)
    prop, uplift = PropensityLearner("cart_abandonment", 0.02, 100), UpliftLearner()
    for i in range(n):
        x = [rnd.random() for _ in FEATURE_NAMES]
        prop.learn_one(x, i % 7 == 0)
        uplift.learn_one(feature_dict(x, i % 3), i % 5 != 0, i % 7 == 0, propensity=0.8, attributed=i % 14 == 0)
    prop.version, uplift.version = 9, 9
    return prop.to_params(with_covariance=False), uplift_params("cart_abandonment", 100, uplift, False)


GOOD, GOOD_UPLIFT = _learned()
LINEAR_FIELDS = st.sampled_from(["names", "intercept", "weights", "n", "dropped", "covariance"])


def _nested(params: dict, field: str, change: dict) -> dict:
    return params | {field: params[field] | change}


SEGMENT_FIELDS = st.sampled_from(["centroids", "mean", "scale", "dims", "k", "schema"])


@given(st.lists(st.tuples(PARAM_KEYS, st.one_of(
    st.builds(lambda change: GOOD | change, st.dictionaries(st.sampled_from(sorted(GOOD)), JSON, max_size=2)),
    st.builds(lambda change: GOOD_UPLIFT | change,
              st.dictionaries(st.sampled_from(sorted(GOOD_UPLIFT)), JSON, max_size=2)),
    st.builds(_nested, st.just(GOOD_UPLIFT), st.sampled_from(["response", "residual"]),
              st.dictionaries(LINEAR_FIELDS, JSON | st.lists(st.floats(), max_size=40), max_size=2)),
    st.builds(_nested, st.just(GOOD), st.just("posterior"), st.dictionaries(LINEAR_FIELDS, JSON, max_size=2)),
    st.builds(lambda change: SegmentModel(k=3).to_params() | {"version": 2} | change,
              st.dictionaries(SEGMENT_FIELDS, JSON, max_size=2)),
    JSON,
)), min_size=1, max_size=20))  # fmt: skip
@settings(max_examples=300, deadline=None)
def test_no_model_params_record_stops_a_worker_or_breaks_scoring(records):
    store = ModelStore(MODELS)
    features, traits = [0.3] * len(FEATURE_NAMES), [0.2] * len(TRAIT_NAMES)
    for key, params in records:
        CASES["records"] += 1
        why = store.apply_record(key, encode(params))
        assert why is None or why in REJECT_CODES
        models = store.current  # whatever was installed scores the real vectors
        for c in CAMPAIGNS:
            assert 0.0 <= models.scorer(c).predict_one(features) <= 1.0
            if (u := models.uplifts.get(c.name)) is not None:
                u.predict_uplift_one(feature_dict(features, models.segments.predict_one(traits)))
        models.segments.predict_one(traits)


def test_the_unmutated_versions_install_so_the_fuzz_above_starts_from_valid_records():
    store = ModelStore(MODELS)
    assert store.apply_record(b"propensity:cart_abandonment", encode(GOOD)) is None
    assert store.apply_record(b"uplift:cart_abandonment", encode(GOOD_UPLIFT)) is None
    assert store.current.scorers["cart_abandonment"].version == 9
    assert store.current.uplifts["cart_abandonment"].version == 9


def test_zz_report_the_number_of_cases():
    print(f"\nfuzz records run in-process: {CASES['records']}")
    assert CASES["records"] > 0
