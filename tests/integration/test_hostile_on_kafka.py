"""Hostile input, consent and erase against a real worker on the real broker (issue 17).

One worker, exactly-once (the default). Before it starts, the compacted model-params topic already holds badly
typed versions (once they crashed every worker at every start). Then the fuzz corpus (tests/fuzzkit.py) goes to
the three input topics and the consent topic, layer-1 garbage to the trainer's topic, and a held push, an opt-out
and an erase to the topics a user's consent lives on. Checked: the worker starts and never stops, every bad record
has exactly one dead letter with the oracle's reason, every good one is applied once, the opt-out cancels the held
push on push-decisions, an erase leaves only the marker on the users changelog, the erase deadline and the
retentions are on the topics, and a record stamped 400 days ahead is refused by the broker.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections import Counter
from datetime import datetime

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError

from stream_app.core.timers import partition_for
from stream_app.engine import ERASED
from stream_app.kafka_io import create_topics, latest_by_key, produce, read_to_end
from tests.fuzzkit import CONSENT_SCHEMA, EVENT_SCHEMA, corpus, dead_letter_matches, expected, layer1
from tests.integration.conftest import running_worker, wait_until
from tests.integration.test_profiles_on_kafka import metric
from tests.integration.test_scenario import CAMPAIGNS, offset_for_local_hour

DAY_MS = 86_400_000


async def topic_configs(bootstrap: str, topics: list[str]) -> dict[str, dict[str, str]]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (response,) = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t) for t in topics])
        return {r[3]: {e[0]: e[1] for e in r[4]} for r in response.resources}
    finally:
        await admin.close()


def test_erase_deadline_retentions_and_record_time_bounds_are_on_the_topics(kafka_bootstrap, app_settings):
    s = app_settings
    asyncio.run(create_topics(kafka_bootstrap, s.topic_layout()))
    configs = asyncio.run(topic_configs(kafka_bootstrap, list(s.topic_layout())))
    users = configs[s.users_changelog_topic]
    assert users["cleanup.policy"] == "compact" and users["max.compaction.lag.ms"] == str(s.erase_deadline_s * 1000)
    assert configs[s.consent_topic]["cleanup.policy"] == "compact"
    for topic, seconds in (
        (s.audit_topic, s.audit_retention_s),
        (s.dead_letter_topic, s.dead_letter_retention_s),
        (s.decisions_topic, s.decisions_retention_s),
        (s.clicks_topic, s.input_retention_s),
    ):
        assert configs[topic]["retention.ms"] == str(seconds * 1000), topic  # fmt: skip
    for topic in (*s.input_topics, s.consent_topic):
        assert configs[topic]["message.timestamp.after.max.ms"] == str(s.record_max_lead_s * 1000), topic
        assert configs[topic]["message.timestamp.type"] == "CreateTime"  # replays of history keep their times

    async def stamp(ts_ms: int) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(s.clicks_topic, b"{}", key=b"u", timestamp_ms=ts_ms)
        finally:
            await producer.stop()

    now = int(time.time() * 1000)
    with pytest.raises(KafkaError) as refused:  # one producer cannot move event time 400 days ahead
        asyncio.run(stamp(now + 400 * DAY_MS))
    assert "Timestamp" in type(refused.value).__name__
    asyncio.run(stamp(now - 400 * DAY_MS))  # history (a replay with CreateTime) is still accepted


def test_hostile_records_on_every_topic_against_a_real_worker(kafka_bootstrap, app_settings, tmp_path):
    campaigns = tmp_path / "campaigns.yaml"
    campaigns.write_text(CAMPAIGNS)  # deterministic pushes: no holdout, no exploration
    s = app_settings.model_copy(update={"max_event_bytes": 16 * 1024, "campaigns_file": str(campaigns)})
    env = {**os.environ, **s.to_env()}
    asyncio.run(create_topics(kafka_bootstrap, s.topic_layout()))
    log, port = tmp_path / "worker.log", str(s.web_port)
    now = int(time.time() * 1000)
    t0 = now - 3_600_000

    # badly typed model versions, there before any worker starts
    bad_params = [(b"segments", orjson.dumps({"version": "2", "k": 3})), (b"propensity:cart_abandonment", b"[]"),
                  (b"propensity:cart_abandonment", b"{"), (b"\xff", b"{}"), (b"uplift:x", None),
                  (b"segments", orjson.dumps({"version": 3, "k": 2, "schema": "traits-v1", "dims": [],
                                              "centroids": [[1.0], [2.0]], "mean": [0.0],
                                              "scale": [1.0]}))]  # fmt: skip
    asyncio.run(produce(kafka_bootstrap, [(s.model_params_topic, k, v) for k, v in bad_params]))
    # and foreign records on the worker's own users changelog: a key that is not a JSON string, a value that is
    # not a state (user cz)
    home = partition_for("cz", s.topic_partitions)
    foreign = [(s.users_changelog_topic, b"not json", b"{}", home), (s.users_changelog_topic, b'"cz"', b"\xffx", home)]
    asyncio.run(produce(kafka_bootstrap, foreign))

    values = corpus(s.max_event_bytes, t0=t0)
    records, want = [], Counter()
    for topic in (*s.input_topics, s.consent_topic):
        schema = CONSENT_SCHEMA if topic == s.consent_topic else EVENT_SCHEMA
        for _, raw in values:
            verdict = expected(raw, s.max_event_bytes, schema)
            if verdict == "valid" and topic != s.consent_topic and not in_skew(layer1(raw, 1 << 30)[1], now, s):
                verdict = "semantic"
            records.append((topic, b"k", raw))
            want[(topic, verdict)] += 1
    trainer_junk = [raw for _, raw in values if layer1(raw, 1 << 30)[0] not in (None, "oversize")]
    night = offset_for_local_hour(2)
    held = [(s.clicks_topic, b"held", orjson.dumps({"event_id": f"h{i}", "type": "click", "user_id": "held",
             "ts": now + i, "tz_offset_min": night})) for i in range(3)]  # fmt: skip
    erased = [(s.likes_topic, b"gone", orjson.dumps({"event_id": "g1", "type": "like", "user_id": "gone", "ts": now}))]

    with running_worker(env, log) as proc:
        took = wait_until(lambda: metric(port, "stream_app_events_consumed_total{") >= 0, 90, proc, log, "start")
        assert metric(port, "stream_app_model_params_rejected_total{") >= 0
        t_start = time.monotonic()
        junk = [(s.model_inputs_topic, b"x", raw) for raw in trainer_junk]
        huge_key = [(s.clicks_topic, b"k" * 900_000, b"{oops")]  # its dead letter must still be sendable
        corrupt = [
            (s.clicks_topic, b"cz", orjson.dumps({"event_id": "cz1", "type": "click", "user_id": "cz", "ts": now}))
        ]
        asyncio.run(produce(kafka_bootstrap, [*held, *erased, *records, *junk, *huge_key, *corrupt]))
        n_dead = sum(n for (_, verdict), n in want.items() if verdict != "valid") + len(trainer_junk) + 2

        def dead() -> list[dict]:
            return [orjson.loads(v) for _, v in asyncio.run(read_to_end(kafka_bootstrap, s.dead_letter_topic, 30))]

        wait_until(lambda: len(dead()) >= n_dead, 120, proc, log, f"{n_dead} dead letters")
        asyncio.run(
            produce(
                kafka_bootstrap,
                [
                    (s.consent_topic, b"held", b'{"user_id":"held","action":"opt_out"}'),
                    (s.consent_topic, b"gone", b'{"user_id":"gone","action":"erase"}'),
                    (s.consent_topic, b"cz", b'{"user_id":"cz","action":"opt_out"}'),
                ],
            )
        )
        wait_until(lambda: metric(port, "stream_app_consent_commands_total{") >= 3 + want[(s.consent_topic, "valid")],
                   60, proc, log, "the consent commands")  # fmt: skip
        # the stream did not stall: a fresh event after all of it is applied
        last = orjson.dumps({"event_id": "last", "type": "click", "user_id": "last", "ts": int(time.time() * 1000)})
        before = metric(port, "stream_app_events_consumed_total{")
        asyncio.run(produce(kafka_bootstrap, [(s.clicks_topic, b"last", last)]))
        wait_until(lambda: metric(port, "stream_app_events_consumed_total{") > before, 30, proc, log, "the last event")
        elapsed = time.monotonic() - t_start
        letters = dead()
        # counted once their transaction committed (every commit interval): wait for the counts to settle
        per_kind = Counter("consent" if d["source_topic"] == s.consent_topic else d["source_topic"] for d in letters)
        n_events = sum(per_kind[t] for t in s.input_topics)
        wait_until(lambda: metric(port, "stream_app_events_rejected_total{") >= n_events
                   and metric(port, "stream_app_consent_rejected_total{") >= per_kind["consent"], 30, proc, log,
                   "the rejection counts")  # fmt: skip
        time.sleep(1.0)  # and no more than that
        rejected_events = metric(port, "stream_app_events_rejected_total{")
        rejected_consent = metric(port, "stream_app_consent_rejected_total{")
        params_rejected = metric(port, "stream_app_model_params_rejected_total{")
        assert proc.poll() is None  # never crashed
    print(f"\n{len(records) + len(trainer_junk)} hostile records, {len(letters)} dead letters, worker ready in "
          f"{took:.1f}s, all handled in {elapsed:.1f}s")  # fmt: skip

    # exactly one dead letter per bad record, with the oracle's reason and its original bytes
    assert len(letters) == n_dead
    by_source = Counter((d["source_topic"], d["source_partition"], d["source_offset"]) for d in letters)
    assert max(by_source.values()) == 1
    assert not [d for d in letters if d["error_code"] == "internal_error"]
    per_topic = Counter(d["source_topic"] for d in letters)
    for topic in (*s.input_topics, s.consent_topic):
        extra = 2 if topic == s.clicks_topic else 0  # the huge-key record, the corrupt user's event
        assert per_topic[topic] == sum(n for (t, v), n in want.items() if t == topic and v != "valid") + extra, topic
    assert per_topic[s.model_inputs_topic] == len(trainer_junk)
    assert [d["key_bytes"] for d in letters if "key_bytes" in d] == [900_000]
    for _, raw in values:  # layer-1 reasons are exact on every topic
        code = layer1(raw, s.max_event_bytes)[0]
        if code is not None:
            matching = [d for d in letters if d["source_topic"] in (*s.input_topics, s.consent_topic)
                        and dead_letter_matches(d, raw, d["source_topic"], d["source_offset"], code)]  # fmt: skip
            assert len(matching) == 4, (raw[:40] if raw else raw, code)
    assert rejected_events == sum(per_topic[t] for t in s.input_topics)  # counted apart, once written
    assert rejected_consent == per_topic[s.consent_topic]
    assert params_rejected == len(bad_params)  # the worker started anyway and counted each

    # good records applied once: the corpus' valid events, their repeats on two more topics are duplicates
    changelog = latest_by_key(asyncio.run(read_to_end(kafka_bootstrap, s.users_changelog_topic, 30)))
    users = {orjson.loads(k): v for k, v in changelog.items() if k != b"not json"}  # the foreign record we wrote
    valid_events = [layer1(raw, 1 << 30)[1] for _, raw in values
                    if expected(raw, s.max_event_bytes, EVENT_SCHEMA) == "valid" and in_skew(layer1(raw, 1 << 30)[1],
                                                                                             now, s)]  # fmt: skip
    for ev in valid_events:
        if ev["user_id"] not in ("z-9",):  # z-9 is erased by the corpus' consent commands
            state = orjson.loads(users[ev["user_id"]])
            assert sum(state["p"]["c"]) == sum(1 for e in valid_events if e["user_id"] == ev["user_id"]), ev
    assert users["gone"] == ERASED  # the erase is the last word on the changelog (compaction removes the rest)
    mine = [d for d in letters if d["source_topic"] == s.clicks_topic and b"cz1" in base64.b64decode(d["value_b64"])]
    assert [d["error_code"] for d in mine] == ["corrupt_state"]
    assert orjson.loads(users["cz"])["o"] is True  # the opt-out replaced the unreadable state

    # the opt-out cancelled the push held for the user's morning
    decisions = [orjson.loads(v) for _, v in asyncio.run(read_to_end(kafka_bootstrap, s.decisions_topic, 30))]
    pushes = [d for d in decisions if d["schema"] == "decision.v1" and d["user_id"] == "held"]
    cancels = [d for d in decisions if d["schema"] == "cancellation.v1"]
    assert len(pushes) == 1 and pushes[0]["send_at_ms"] > now
    assert [c["decision_id"] for c in cancels] == [pushes[0]["decision_id"]] and cancels[0]["cause"] == "opt_out"


def in_skew(obj: dict, now: int, s) -> bool:
    """Whether a schema-valid event's time is inside the worker's bounds (record time ~ now)."""
    ts = obj["ts"]
    if isinstance(ts, str):
        try:
            ts = datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() * 1000
        except (ValueError, OverflowError):
            return False
    return now - s.max_past_skew_s * 1000 + 600_000 <= ts <= now + s.max_future_skew_s * 1000 - 600_000


def test_an_erased_profile_is_compacted_away_by_the_erase_deadline(kafka_bootstrap, app_settings):
    """The users changelog's configs, with the deadline shortened from a day to a second and a dirty ratio the
    topic never reaches: the broker's cleaner removes the profile an erase overwrote, and on the same topic
    without max.compaction.lag.ms nothing forces it."""
    s = app_settings
    configs = s.topic_layout()[s.users_changelog_topic][1]
    assert configs["max.compaction.lag.ms"] == str(s.erase_deadline_s * 1000)
    lazy = configs | {"segment.ms": "1000", "min.cleanable.dirty.ratio": "0.99"}
    deadline, control = s.users_changelog_topic, f"{s.users_changelog_topic}-control"
    without = {k: v for k, v in lazy.items() if k != "max.compaction.lag.ms"}
    layout = {deadline: (1, lazy | {"max.compaction.lag.ms": "1000"}), control: (1, without)}
    asyncio.run(create_topics(kafka_bootstrap, layout))
    profile = orjson.dumps({"p": {"f": 1, "l": 1}, "o": False, "l": -1, "q": []})

    def values(topic: str, key: bytes) -> list[bytes | None]:
        return [v for k, v in asyncio.run(read_to_end(kafka_bootstrap, topic)) if k == key]

    def wait(cond, what: str) -> float:
        t0 = time.monotonic()
        while not cond():
            assert time.monotonic() - t0 < 60, f"{what}: not after 60 s"
            time.sleep(2.0)  # a later record rolls the active segment (segment.ms elapsed): the cleaner may take it
            asyncio.run(produce(kafka_bootstrap, [(t, b'"tick"', b"{}") for t in layout]))
        return time.monotonic() - t0

    # a first cleaning of both (a never-cleaned log counts as all dirty): from then on the control's dirty ratio
    # stays far below 0.99, so only a compaction deadline can make the cleaner take a new record
    asyncio.run(produce(kafka_bootstrap, [(t, f'"x{i % 20}"'.encode(), profile) for t in layout for i in range(40)]))
    wait(lambda: all(len(values(t, b'"x0"')) == 1 for t in layout), "first cleaning")
    asyncio.run(produce(kafka_bootstrap, [(t, b'"u1"', v) for t in layout for v in (profile, ERASED)]))
    took = wait(lambda: values(deadline, b'"u1"') == [ERASED], "the erased profile compacted away")
    assert values(control, b'"u1"') == [profile, ERASED]  # same time, no deadline: the old profile is still there
    print(f"\nerased profile compacted away {took:.0f}s after the erase; without the deadline it stays")
