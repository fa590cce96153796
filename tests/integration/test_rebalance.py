"""A second worker joins while the first works through a backlog: the rebalance must not wait for the backlog.

Under a backlog one fetch holds tens of thousands of events. Faust stops the flow at a rebalance and waits
until every message handed to a handler is acked; a version that kept handing over the rest of its fetch
kept the group waiting 18 s in the bench. Here the joining worker must process events soon after it
starts, the first worker must not log Faust's ``wait_empty`` warning (printed after about ten rounds of
waiting), and every event must be applied exactly once across the two workers (the state below).
"""

from __future__ import annotations

import asyncio
import time

import orjson

from stream_app.core.events import EVENT_TYPES
from stream_app.kafka_io import create_topics, group_lag, latest_by_key, produce, read_to_end
from tests.integration.conftest import free_port, running_worker, wait_until
from tests.integration.test_profiles_on_kafka import metric

# a backlog that outlasts the second worker's start (5-10 s) at the worker's speed (about 10,000 events/s):
# with 40,000 the first worker finished before the second got partitions (CI, once the worker got faster)
N_EVENTS, N_USERS = 200_000, 2_000


def applied(port: str) -> float:
    return metric(port, "stream_app_events_consumed_total{")


def applied_when_served(port: str, timeout: float = 30.0) -> float:
    """``applied``, asked again while the worker does not answer within the 2 s request timeout (a busy
    event loop on a loaded 2-core machine; seen once)."""
    deadline = time.monotonic() + timeout
    while (value := applied(port)) < 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    return value


def test_a_joining_worker_gets_partitions_while_the_first_has_a_backlog(
    kafka_bootstrap, app_settings, worker_env, tmp_path
):
    s = app_settings
    topic = dict(zip(EVENT_TYPES, s.input_topics, strict=True))
    asyncio.run(create_topics(kafka_bootstrap, s.topic_layout()))
    t0 = int(time.time() * 1000)
    records = [
        (topic["click"], f"u{i % N_USERS}".encode(),
         orjson.dumps({"event_id": f"e{i}", "type": "click", "user_id": f"u{i % N_USERS}", "ts": t0 + i}))
        for i in range(N_EVENTS)
    ]  # fmt: skip
    asyncio.run(produce(kafka_bootstrap, records))
    port_a, port_b = str(s.web_port), str(free_port())
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    env_b = {**worker_env, "STREAM_APP_WEB_PORT": port_b}
    with running_worker(worker_env, log_a) as a:
        wait_until(lambda: applied(port_a) >= 1_000, 90, a, log_a, "worker A under way")
        with running_worker(env_b, log_b) as b:
            joined = wait_until(lambda: applied(port_b) >= 1, 60, b, log_b, "worker B's first event")
            lag = lambda: asyncio.run(group_lag(kafka_bootstrap, s.app_id, topic.values()))  # noqa: E731
            wait_until(lambda: lag() == 0, 120, b, log_b, "the backlog drained by both workers")
            a_done, b_done = applied_when_served(port_a), applied_when_served(port_b)
    print(f"\n[rebalance] B's first event {joined:.1f}s after it started; applied A {a_done:.0f}, B {b_done:.0f}")
    assert b_done > 0 and a_done > 0
    assert "wait_empty: Waiting for tasks" not in log_a.read_text()
    state = latest_by_key(asyncio.run(read_to_end(kafka_bootstrap, s.users_changelog_topic, timeout=30)))
    clicks = {orjson.loads(k): orjson.loads(v)["p"]["c"][0] for k, v in state.items()}
    assert clicks == {f"u{u}": N_EVENTS // N_USERS for u in range(N_USERS)}  # each event once, none lost
