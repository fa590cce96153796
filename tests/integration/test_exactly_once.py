"""Exactly-once on the real broker: a worker killed (SIGKILL) mid-stream and restarted.

An independent read_committed consumer must find every push decision exactly once, every audit record
once, and every user's state applied once, whatever the crash interrupted.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import threading
import time

import orjson
from aiokafka.admin import AIOKafkaAdminClient

from stream_app.kafka_io import create_topics, group_lag, latest_by_key, produce, read_to_end
from tests.integration.conftest import running_worker, wait_until
from tests.integration.test_profiles_on_kafka import metric
from tests.integration.test_scenario import CAMPAIGNS, offset_for_local_hour

USERS, CLICKS = 150, 5


def click_records(topic: str, per_user: int) -> list[tuple[str, bytes, bytes]]:
    """``per_user`` clicks of each of USERS users at local noon, a minute apart, round-robin over users."""
    tz, now = offset_for_local_hour(12), int(time.time() * 1000)
    return [
        (topic, f"u{u}".encode(), orjson.dumps({"event_id": f"u{u}-{i}", "type": "click", "user_id": f"u{u}",
                                                "ts": now + i * 60_000, "tz_offset_min": tz}))
        for i in range(per_user) for u in range(USERS)
    ]  # fmt: skip


def test_a_killed_worker_pushes_each_decision_once_after_restart(kafka_bootstrap, app_settings, tmp_path):
    campaigns = tmp_path / "campaigns.yaml"
    campaigns.write_text(CAMPAIGNS)  # cold start pushes every eligible user once: 3rd click, then cooldown
    s = app_settings.model_copy(update={"campaigns_file": str(campaigns), "session_timeout_s": 10.0})
    assert s.processing_guarantee == "exactly_once"
    env = {**os.environ, **s.to_env()}
    asyncio.run(create_topics(kafka_bootstrap, s.topic_layout()))
    records = click_records(s.clicks_topic, CLICKS)
    port, log = str(s.web_port), tmp_path / "worker.log"
    produced = {"n": 0}

    def produce_paced() -> None:
        """The stream keeps flowing while the worker is killed: 25 chunks, 0.25 s apart."""
        step = len(records) // 25
        for i in range(0, len(records), step):
            asyncio.run(produce(kafka_bootstrap, records[i : i + step]))
            produced["n"] = i + len(records[i : i + step])
            time.sleep(0.25)

    def pushes() -> list[dict]:
        return [orjson.loads(v) for _, v in asyncio.run(read_to_end(kafka_bootstrap, s.decisions_topic, 30))]

    producer = threading.Thread(target=produce_paced)
    with running_worker(env, log) as proc:
        wait_until(lambda: metric(port, "stream_app_events_consumed_total{") >= 0, 90, proc, log, "the web server")
        producer.start()
        # the first committed transaction makes pushes visible; kill while the stream is still flowing
        wait_until(lambda: len(pushes()) > 0, 90, proc, log, "the first committed pushes")
        processed_before_kill, produced_at_kill = metric(port, "stream_app_events_consumed_total{"), produced["n"]
        proc.kill()
        proc.wait()
    visible_at_kill = len(pushes())
    print(f"\n[eos] killed after {processed_before_kill:.0f} events processed, {produced_at_kill} produced, "
          f"{visible_at_kill} pushes committed")  # fmt: skip
    assert produced_at_kill < len(records), "the kill should land mid-stream"
    producer.join()

    t0 = time.monotonic()
    with running_worker(env, log) as proc:
        lag = lambda: asyncio.run(group_lag(kafka_bootstrap, s.app_id, s.input_topics))  # noqa: E731
        wait_until(lambda: lag() == 0 and len(pushes()) >= USERS, 120, proc, log, "all events after the restart")
        took = time.monotonic() - t0
        reprocessed = metric(port, "stream_app_events_consumed_total{", "stream_app_duplicates_dropped_total ")
    print(f"[eos] restart -> all committed in {took:.1f}s; the new worker handled {reprocessed:.0f} events")

    final = pushes()
    per_user = collections.Counter(d["user_id"] for d in final)
    assert len({d["decision_id"] for d in final}) == len(final) == USERS  # each decision exactly once
    assert set(per_user.values()) == {1}
    audit = [orjson.loads(v) for _, v in asyncio.run(read_to_end(kafka_bootstrap, s.audit_topic, 30))]
    assert len({d["decision_id"] for d in audit}) == len(audit) == USERS * (CLICKS - 2)  # clicks 3..5 decide
    changelog = latest_by_key(asyncio.run(read_to_end(kafka_bootstrap, f"{s.app_id}-users-changelog", 30)))
    clicks = {orjson.loads(k): orjson.loads(v)["p"]["c"][0] for k, v in changelog.items()}
    assert clicks == {f"u{u}": CLICKS for u in range(USERS)}  # every state update applied once


async def group_members(bootstrap: str, group: str) -> tuple[str, int]:
    """The consumer group's state and member count, as the coordinator sees them."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (response,) = await admin.describe_consumer_groups([group])
        _error, _group, state, _ptype, _protocol, members, *_ = response.groups[0]
        return state, len(members)
    finally:
        await admin.close()


def test_a_worker_stopped_mid_stream_commits_and_leaves_its_group(kafka_bootstrap, app_settings, tmp_path):
    """SIGTERM while events and model inputs flow: the worker ends its transactions, exits 0 and leaves the
    group at once, so its partitions move now rather than after the session timeout (Faust 0.15 ends the
    transactions twice at shutdown; an offset acked in between failed the consumer's stop)."""
    s = app_settings.model_copy(update={"session_timeout_s": 30.0})
    env = {**os.environ, **s.to_env()}
    asyncio.run(create_topics(kafka_bootstrap, s.topic_layout()))
    records = click_records(s.clicks_topic, 20)
    port, log = str(s.web_port), tmp_path / "worker.log"
    stop = threading.Event()

    def produce_until_stopped() -> None:
        for i in range(0, len(records), 50):
            if stop.is_set():
                return
            asyncio.run(produce(kafka_bootstrap, records[i : i + 50]))
            time.sleep(0.05)

    producer = threading.Thread(target=produce_until_stopped)
    with running_worker(env, log) as proc:
        wait_until(lambda: metric(port, "stream_app_events_consumed_total{") >= 0, 90, proc, log, "the web server")
        producer.start()
        wait_until(lambda: metric(port, "stream_app_events_consumed_total{") >= 500, 90, proc, log, "500 events")
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(45)
        stopped_at = time.monotonic()
    stop.set()
    producer.join()
    state, members = asyncio.run(group_members(kafka_bootstrap, s.app_id))
    text = log.read_text(errors="replace")
    print(f"\n[eos] SIGTERM mid-stream: rc={rc}, group {state} with {members} members "
          f"{time.monotonic() - stopped_at:.1f}s after the exit")  # fmt: skip
    assert "Error while stopping child" not in text, text[text.find("Error while stopping child") :][:2000]
    assert rc == 0
    assert members == 0, f"the stopped worker is still a member of its group ({state})"
