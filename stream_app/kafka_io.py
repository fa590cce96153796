"""Plain aiokafka helpers for the edges: topic creation, producing samples, reading a topic to its end.

Used by the CLI's demo and by integration tests, so both observe Kafka the way an outside service does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from stream_app.settings import Settings


def client_kwargs(settings: Settings) -> dict:
    """Connection settings for plain aiokafka clients, matching the Faust app's (incl. SASL over TLS)."""
    kw: dict = {"bootstrap_servers": settings.bootstrap_servers}
    if settings.broker_credentials_mechanism:
        kw |= {
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": settings.broker_credentials_mechanism,
            "sasl_plain_username": settings.broker_username,
            "sasl_plain_password": settings.broker_password.get_secret_value(),
            "ssl_context": ssl.create_default_context(cafile=settings.broker_cafile or None),
        }
    return kw


async def create_topics(
    bootstrap: str, layout: dict[str, tuple[int, dict[str, str]]], replication: int = 1, **client_kw: Any
) -> list[str]:
    """Create missing topics from ``{name: (partitions, configs)}``; return the names created."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **client_kw)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [n for n in layout if n not in existing]
        if wanted:
            new = [NewTopic(n, layout[n][0], replication, topic_configs=layout[n][1]) for n in wanted]
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(new)
            await wait_for_leaders(admin, wanted)
        return wanted
    finally:
        await admin.close()


async def wait_for_leaders(admin: AIOKafkaAdminClient, topics: list[str], timeout: float = 30.0) -> None:
    """Until the broker's metadata shows every partition of ``topics`` with a leader. Creation returns once
    the controller has the topics; a worker that joins its group before the broker's metadata has them gets
    an empty assignment and idles until its next metadata refresh (seen on a freshly started broker)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        described = await admin.describe_topics(topics)
        ready = {d["topic"] for d in described if not d.get("error_code") and d.get("partitions")
                 and all(p.get("leader", -1) >= 0 for p in d["partitions"])}  # fmt: skip
        if ready >= set(topics):
            return
        if loop.time() > deadline:
            raise TimeoutError(f"topics without leaders after {timeout}s: {sorted(set(topics) - ready)}")
        await asyncio.sleep(0.1)


async def produce(bootstrap: str, records: Iterable[tuple]) -> int:
    """Send (topic, key, value) or (topic, key, value, partition) records and wait for every ack."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, enable_idempotence=True)
    await producer.start()
    try:
        futures = [await producer.send(t, value=v, key=k, partition=p[0] if p else None) for t, k, v, *p in records]
        await asyncio.gather(*futures)
        return len(futures)
    finally:
        await producer.stop()


async def read_to_end(
    bootstrap: str, topic: str, timeout: float = 10.0, isolation_level: str = "read_committed"
) -> list[tuple[bytes | None, bytes | None]]:
    """Every (key, value) in ``topic`` from the beginning up to its end offsets at call time."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level=isolation_level,
        auto_offset_reset="earliest", group_id=None,
    )  # fmt: skip
    await consumer.start()
    try:
        parts = await partitions_of(bootstrap, topic)
        if not parts:
            return []
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        out: list[tuple[bytes | None, bytes | None]] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
            if loop.time() > deadline:
                raise TimeoutError(f"reading {topic} to its end took over {timeout}s")
            batch = await consumer.getmany(timeout_ms=200)
            for msgs in batch.values():
                out.extend((m.key, m.value) for m in msgs)
        return out
    finally:
        await consumer.stop()


async def partitions_of(bootstrap: str, topic: str, **client_kw: Any) -> list[int]:
    """Partition ids of ``topic`` ([] if it does not exist)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **client_kw)
    await admin.start()
    try:
        (desc,) = await admin.describe_topics([topic])
        return sorted(p["partition"] for p in desc.get("partitions", []))
    finally:
        await admin.close()


async def group_lag(bootstrap: str, group: str, topics: Iterable[str]) -> int:
    """Messages in ``topics`` not yet committed by consumer group ``group`` (its lag)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await admin.start()
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in topics for p in await partitions_of(bootstrap, t)]
        committed = await admin.list_consumer_group_offsets(group, partitions=tps)
        end = await consumer.end_offsets(tps)
        return sum(end[tp] - max(committed.get(tp).offset if committed.get(tp) else 0, 0) for tp in tps)
    finally:
        await consumer.stop()
        await admin.close()


def latest_by_key(records: Iterable[tuple[bytes | None, bytes | None]]) -> dict[bytes, bytes]:
    """Compact a changelog: the last value per key; a None value (tombstone) deletes the key."""
    state: dict[bytes, bytes] = {}
    for k, v in records:
        if k is None:
            continue
        if v is None:
            state.pop(k, None)
        else:
            state[k] = v
    return state
