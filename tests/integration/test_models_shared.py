"""Two real workers: labels from any partition train one model that every worker then scores with."""

from __future__ import annotations

import asyncio
import os
import time
from datetime import UTC, datetime

import orjson
import pytest

from stream_app.kafka_io import create_topics, produce, read_to_end
from tests.integration.conftest import free_port, running_worker, wait_until
from tests.integration.test_profiles_on_kafka import metric

CAMPAIGN = "cart_abandonment"


def midday_offset_min() -> int:
    """A UTC offset that puts 'now' at 12:xx local time, so quiet hours never hold the test's pushes."""
    hour = datetime.now(UTC).hour
    offset = ((12 - hour + 12) % 24 - 12) * 60
    return offset if offset >= -720 else offset + 1440


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
def test_labels_from_any_partition_update_the_model_on_every_worker(kafka_bootstrap, app_settings, tmp_path, guarantee):
    s = app_settings.model_copy(update={"model_publish_interval_ms": 500, "processing_guarantee": guarantee})
    asyncio.run(create_topics(kafka_bootstrap, s.topic_layout()))
    ports = [free_port(), free_port()]
    envs = [{**os.environ, **s.model_copy(update={"web_port": p, "datadir": str(tmp_path / f"w{p}")}).to_env()}
            for p in ports]  # fmt: skip
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    version = f'stream_app_model_version{{model="propensity:{CAMPAIGN}"}}'
    tz = midday_offset_min()
    with running_worker(envs[0], logs[0]) as a, running_worker(envs[1], logs[1]) as b:
        for proc, port, log in ((a, ports[0], logs[0]), (b, ports[1], logs[1])):
            wait_until(lambda port=port: metric(str(port), "stream_app_events") >= 0, 90, proc, log, "web server")
        now = int(time.time() * 1000)
        users = [f"user-{i}" for i in range(120)]
        clicks = [
            (s.clicks_topic, u.encode(), orjson.dumps({"event_id": f"{u}-c{j}", "type": "click", "user_id": u,
                                                       "ts": now + j * 1000, "tz_offset_min": tz}))
            for u in users for j in range(3)
        ]  # fmt: skip
        asyncio.run(produce(kafka_bootstrap, clicks))

        def pushes() -> list[dict]:
            return [orjson.loads(v) for _, v in asyncio.run(read_to_end(kafka_bootstrap, s.decisions_topic, 20))]

        wait_until(lambda: len(pushes()) >= 10, 90, a, logs[0], "cold-start pushes")
        time.sleep(3)  # let the remaining decisions land
        pushed = pushes()
        assert {d["model_version"] for d in pushed} == {0}  # decided by the cold model
        payments = [
            (s.payments_topic, d["user_id"].encode(), orjson.dumps({
                "event_id": f"pay-{d['decision_id']}", "type": "payment", "user_id": d["user_id"],
                "ts": now + 60_000, "amount": 20, "push_id": d["decision_id"], "tz_offset_min": tz}))
            for d in pushed[::2]  # half of the pushed users convert
        ]  # fmt: skip
        t_labels = time.monotonic()
        asyncio.run(produce(kafka_bootstrap, payments))
        labelled = lambda: sum(metric(str(p), "stream_app_labels_total{") for p in ports)  # noqa: E731
        wait_until(lambda: labelled() >= len(payments), 60, a, logs[0], "every conversion labelled")
        joined = time.monotonic() - t_labels
        published = f'stream_app_models_published_total{{model="propensity:{CAMPAIGN}"}}'
        wait_until(lambda: sum(max(metric(str(p), published), 0) for p in ports) >= 1, 60, a, logs[0], "publication")
        trained = time.monotonic() - t_labels
        for proc, port, log in ((a, ports[0], logs[0]), (b, ports[1], logs[1])):
            wait_until(lambda port=port: metric(str(port), version) >= 1, 60, proc, log, "the new model version")
        propagation = time.monotonic() - t_labels
        labels = [metric(str(p), "stream_app_labels_total{") for p in ports]
        versions = [metric(str(p), version) for p in ports]
    print(f"\n[models] {guarantee}: labels joined after {joined:.1f}s, first publication after {trained:.1f}s")
    print(f"\n[models] {len(pushed)} pushes, {len(payments)} conversions; labels per worker {labels}; "
          f"model versions {versions}; payment -> new version on both workers in {propagation:.1f}s")  # fmt: skip
    assert sum(labels) == len(payments)
    # every worker scores with a published version (the same one, unless a newer one is mid-flight)
    assert min(versions) >= 1 and max(versions) - min(versions) <= 1
