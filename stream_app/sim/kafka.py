"""Producing simulated events to Kafka (the demo and benchmarks): aiokafka is imported only here, lazily."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

import orjson

from stream_app.settings import Settings


def to_record(envelope: dict[str, Any], settings: Settings) -> tuple[str, bytes, bytes, int]:
    """(topic, key, value, timestamp_ms) of an envelope: the configured topic, keyed by user_id.

    >>> to_record({"topic": "like", "value": {"user_id": "u1"}, "timestamp_ms": 5}, Settings())[:3]
    ('likes', b'u1', b'{"user_id":"u1"}')
    """
    topics = {"click": settings.clicks_topic, "like": settings.likes_topic, "payment": settings.payments_topic,
              "consent": settings.consent_topic}  # fmt: skip
    value = envelope["value"]
    if isinstance(value, str):  # malformed on purpose: the raw text, keyed by nobody
        return topics[envelope["topic"]], b"", value.encode(), envelope["timestamp_ms"]
    key = str(value.get("user_id", "")).encode()
    return topics[envelope["topic"]], key, orjson.dumps(value), envelope["timestamp_ms"]


async def produce_envelopes(envelopes: Iterable[dict[str, Any]], settings: Settings, rate: float = 0.0,
                            use_event_time: bool = False) -> int:  # fmt: skip
    """Send every envelope to its topic at ``rate`` messages/s (0: as fast as possible); wait for acks.

    The record timestamp is the send time unless ``use_event_time`` (then the event's own time), since
    the worker bounds event time against the record time.
    """
    from aiokafka import AIOKafkaProducer

    from stream_app.app import client_kwargs

    producer = AIOKafkaProducer(acks="all", linger_ms=5, enable_idempotence=True, **client_kwargs(settings))
    await producer.start()
    sent, start = 0, time.monotonic()
    pending = []
    try:
        for envelope in envelopes:
            topic, key, value, ts = to_record(envelope, settings)
            pending.append(await producer.send(topic, value=value, key=key or None,
                                               timestamp_ms=ts if use_event_time else None))  # fmt: skip
            sent += 1
            if rate > 0 and (ahead := sent / rate - (time.monotonic() - start)) > 0:
                await asyncio.sleep(ahead)
            if len(pending) >= 10_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
        return sent
    finally:
        await producer.stop()
