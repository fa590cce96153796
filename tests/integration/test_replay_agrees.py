"""The same events through the real Kafka pipeline and through `stream-app replay` give the same decisions.

Ids, actions and segments must agree exactly, given the same order of each user's events (one topic
here; see the comment in the test). Scores may differ slightly: a worker scores with whatever
model version has reached it over Kafka when the event is processed, replay with the version published
on event time just before; both are valid. So scores must be identical where the model version is the
same, and the number of decisions scored by another version (and the largest score gap) is reported.
"""

from __future__ import annotations

import asyncio
import os
import random
import time

import orjson

from stream_app.kafka_io import create_topics, group_lag, produce, read_to_end
from stream_app.replay import replay
from tests.integration.conftest import running_worker, wait_until
from tests.integration.test_profiles_on_kafka import metric
from tests.integration.test_scenario import offset_for_local_hour


def test_kafka_and_replay_decide_the_same(kafka_bootstrap, app_settings, tmp_path):
    s = app_settings
    asyncio.run(create_topics(kafka_bootstrap, s.topic_layout()))
    rng, now, tz = random.Random(11), int(time.time() * 1000), offset_for_local_hour(12)
    lines = []
    for i in range(900):
        user = f"u{rng.randrange(60)}"
        etype = rng.choices(["click", "like", "payment"], weights=[75, 15, 10])[0]
        ev = {"event_id": f"e{i}", "type": etype, "user_id": user, "ts": now - 3_600_000 + i * 4000,
              "tz_offset_min": tz, "category": rng.choice(["shoes", "books"])}  # fmt: skip
        lines.append(orjson.dumps(ev | ({"amount": 20.0} if etype == "payment" else {})))
    lines.insert(100, b"{not json")
    # One topic: Kafka orders a user's events only within one partition of one topic. Spread over clicks,
    # likes and payments they interleave in whatever order the worker fetches them, and a decision sees the
    # state of the events processed before it, so replay in file order could then legitimately differ.
    records = []
    for line in lines:
        try:
            key = orjson.loads(line)["user_id"].encode()
        except orjson.JSONDecodeError:
            key = b"bad"
        records.append((s.clicks_topic, key, line))
    asyncio.run(produce(kafka_bootstrap, records))
    log = tmp_path / "worker.log"
    with running_worker({**os.environ, **s.to_env()}, log) as proc:
        lag = lambda: asyncio.run(group_lag(kafka_bootstrap, s.app_id, s.input_topics))  # noqa: E731
        wait_until(lambda: metric(str(s.web_port), "stream_app_events_consumed_total{") >= 0, 90, proc, log, "web")
        wait_until(lambda: lag() == 0, 120, proc, log, "every event processed and committed")
    kafka = {d["decision_id"]: d for d in
             (orjson.loads(v) for _, v in asyncio.run(read_to_end(kafka_bootstrap, s.audit_topic, 30)))}  # fmt: skip
    replayed = {d["decision_id"]: d for d in (orjson.loads(v) for v in replay(lines, s).records["audit"])}

    assert len(kafka) > 50 and kafka.keys() == replayed.keys()
    for did, k in kafka.items():
        r = replayed[did]
        assert (k["user_id"], k["campaign"], k["action"], k["segment"], k["trigger_event_id"], k["send_at_ms"]) == (
            r["user_id"], r["campaign"], r["action"], r["segment"], r["trigger_event_id"], r["send_at_ms"])  # fmt: skip
        if (k["model_version"], k["segment_version"]) == (r["model_version"], r["segment_version"]):
            # the same models give the same score, to the digit
            assert k["score"] == r["score"] and k["top_contributions"] == r["top_contributions"]
    differ = sum(kafka[d]["model_version"] != replayed[d]["model_version"] for d in kafka)
    worst = max(abs(kafka[d]["score"] - replayed[d]["score"]) for d in kafka)
    same = len(kafka) - differ
    print(f"\n[replay] {len(kafka)} decisions: ids, actions, segments agree; {same} scored by the same model version"
          f" (identical scores), {differ} by another version (max score gap {worst:.4f})")  # fmt: skip
    assert same > 0
