"""The consumer-lag metric the alerts use stays true while a real worker does not fetch.

A real worker on the real broker whose event handler is held (a stall file makes it wait, as a handler
stuck on a slow dependency would): the batch queue fills, back pressure stops the fetch loop, and Faust
would export the end offsets of its last fetch for ever. Records produced meanwhile must show up in
``faust_topic_partition_end_offset - faust_topic_partition_offset_committed`` (the alerts' recording rule)
within a few lag refreshes, exactly: the lag equals the records produced after the stall.
With ``STREAM_APP_LAG_REFRESH_S`` huge (the refresh off) the same test fails: the lag stays stale.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from stream_app.demo import stop_process
from stream_app.kafka_io import produce
from tests.integration.conftest import wait_until

# the real worker command, with the event handler held while STALL_FILE exists
STALLABLE_WORKER = """
import asyncio, os
from stream_app import agents
stall = os.environ["STALL_FILE"]
handle = agents.Worker.process_batch
async def process_batch(self, messages, ack=True):
    while os.path.exists(stall):
        await asyncio.sleep(0.1)
    return await handle(self, messages, ack)
agents.Worker.process_batch = process_batch
from stream_app.cli import main
main(["worker"])
"""


def _metrics(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as r:
            return r.read().decode()
    except OSError:
        return ""


def _by_partition(body: str, name: str, topic: str) -> dict[int, float]:
    pattern = re.compile(rf'^{name}\{{partition="(\d+)",topic="{re.escape(topic)}"\}} (\S+)$', re.M)
    return {int(p): float(v) for p, v in pattern.findall(body)}


def _lag(body: str, topic: str) -> float | None:
    """The recording rule stream_app:consumer_lag:sum for one topic (None: a side has no sample)."""
    ends = _by_partition(body, "faust_topic_partition_end_offset", topic)
    committed = _by_partition(body, "faust_topic_partition_offset_committed", topic)
    both = set(ends) & set(committed)
    return sum(ends[p] - committed[p] for p in both) if both else None


def _consumed(body: str) -> float:
    return sum(float(v) for v in re.findall(r"^stream_app_events_consumed_total\{[^}]*\} (\S+)$", body, re.M))


async def _end_offsets(bootstrap: str, topic: str, partitions: int) -> int:
    client = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await client.start()
    try:
        ends = await client.end_offsets([TopicPartition(topic, p) for p in range(partitions)])
        return sum(ends.values())
    finally:
        await client.stop()


def _clicks(topic: str, first: int, n: int) -> list[tuple[str, bytes, bytes]]:
    now = int(time.time() * 1000)
    out = []
    for i in range(first, first + n):
        user = f"lag-user-{i % 40}"
        ev = {"event_id": f"lag-{i}", "type": "click", "user_id": user, "ts": now + i}
        out.append((topic, user.encode(), orjson.dumps(ev)))
    return out


def _run(kafka_bootstrap, app_settings, worker_env, tmp_path: Path, refresh_s: str) -> tuple[float | None, int]:
    stall = tmp_path / "stall"
    env = {**worker_env, "STREAM_APP_LAG_REFRESH_S": refresh_s, "STALL_FILE": str(stall),
           "STREAM_APP_BATCH_MAX_EVENTS": "50"}  # fmt: skip
    port, topic = app_settings.web_port, app_settings.clicks_topic
    log = tmp_path / "worker.log"
    made = subprocess.run([sys.executable, "-m", "stream_app", "topics"], env=env, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-c", STALLABLE_WORKER], env=env, stdout=out, stderr=out)
    try:
        wait_until(lambda: "stream_app_worker_ready 1.0" in _metrics(port), 120, proc, log, "worker ready")
        asyncio.run(produce(kafka_bootstrap, _clicks(topic, 0, 200)))
        wait_until(lambda: _consumed(_metrics(port)) >= 200 and _lag(_metrics(port), topic) == 0, 60, proc, log,
                   "200 events processed and committed, lag 0")  # fmt: skip
        stall.touch()  # the handler now holds every batch: the queue fills and the fetch loop stops
        after = 0
        for _ in range(6):  # rounds: the fetch loop takes a few, then stops fetching
            asyncio.run(produce(kafka_bootstrap, _clicks(topic, 200 + after, 300)))
            after += 300
            time.sleep(1.0)
        truth = asyncio.run(_end_offsets(kafka_bootstrap, topic, app_settings.topic_partitions))
        assert truth == 200 + after
        deadline = time.monotonic() + 15
        lag = _lag(_metrics(port), topic)
        while lag != after and time.monotonic() < deadline:
            time.sleep(0.5)
            lag = _lag(_metrics(port), topic)
        assert _consumed(_metrics(port)) == 200  # nothing after the stall was processed
        stall.unlink()  # the handler recovers: the backlog drains and the lag goes back to 0
        wait_until(lambda: _consumed(_metrics(port)) >= 200 + after and _lag(_metrics(port), topic) == 0, 60, proc,
                   log, "backlog drained, lag 0")  # fmt: skip
        return lag, after
    finally:
        stop_process(proc)


def test_lag_counts_records_produced_while_the_worker_does_not_fetch(
    kafka_bootstrap, app_settings, worker_env, tmp_path
):
    lag, after = _run(kafka_bootstrap, app_settings, worker_env, tmp_path, refresh_s="1")
    assert lag == after, f"lag metric {lag}, but {after} records arrived after the handler stalled"
