"""The Faust shell: app factory, topics, tables and thin agents around the pure core.

An agent decodes, loads state, calls a core step, writes the new state back (a table writes its
changelog only on assignment), sends outputs and observes metrics. Nothing else.
"""

from __future__ import annotations

import logging
import ssl
import time
from dataclasses import dataclass
from typing import Any

import faust
from faust.sensors.prometheus import setup_prometheus_sensors
from prometheus_client import CollectorRegistry

from stream_app.core.events import EventLimits, InvalidEvent, parse_event
from stream_app.core.profile import Profile, update_profile
from stream_app.metrics import Metrics
from stream_app.settings import Settings
from stream_app.wire import dead_letter

log = logging.getLogger(__name__)


@dataclass
class StreamApp:
    """The Faust app plus the handles tests and the CLI need."""

    app: faust.App
    settings: Settings
    metrics: Metrics
    events_topic: Any
    dead_letters: Any
    profiles: Any
    update_profiles: Any


def broker_credentials(settings: Settings) -> faust.SASLCredentials | None:
    """SASL (SCRAM/PLAIN) over TLS when a mechanism is configured; None for a plaintext broker."""
    if not settings.broker_credentials_mechanism:
        return None
    ctx = ssl.create_default_context(cafile=settings.broker_cafile or None)
    return faust.SASLCredentials(
        username=settings.broker_username,
        password=settings.broker_password.get_secret_value(),
        mechanism=settings.broker_credentials_mechanism,
        ssl_context=ctx,
    )


def create_app(settings: Settings | None = None, registry: CollectorRegistry | None = None) -> StreamApp:
    settings = settings or Settings()
    metrics = Metrics.create(registry)
    app = faust.App(
        settings.app_id,
        broker=settings.broker,
        broker_credentials=broker_credentials(settings),
        store=settings.store,
        datadir=settings.datadir,
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication,
        processing_guarantee=settings.processing_guarantee,
        web_bind=settings.web_bind,
        web_port=settings.web_port,
        web_tables_enabled=settings.table_views,
        key_serializer="json",  # table keys (user ids) as JSON strings; input topics override to raw
        value_serializer="json",
        autodiscover=False,
    )
    setup_prometheus_sensors(app, pattern="/metrics", registry=metrics.registry, name_prefix="faust")

    events_topic = app.topic(
        *settings.input_topics, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )
    dead_letters = app.topic(settings.dead_letter_topic, key_serializer="raw", value_serializer="raw")
    profiles = app.Table("profiles", default=None, partitions=settings.topic_partitions)
    limits = EventLimits(
        max_bytes=settings.max_event_bytes,
        max_future_ms=settings.max_future_skew_s * 1000,
        max_past_ms=settings.max_past_skew_s * 1000,
    )
    consumed, rejected, seconds = metrics.events_consumed, metrics.events_rejected, metrics.processing_seconds
    duplicates = metrics.duplicates_dropped

    async def update_profiles(stream: Any) -> Any:
        """Fold valid events into user profiles; dead-letter the rest and keep going. Yields each outcome."""
        async for e in stream.events():
            t0 = time.perf_counter()
            try:
                event = parse_event(e.value, limits, ref_ms=int(e.message.timestamp * 1000))
            except InvalidEvent as bad:
                msg = e.message
                await dead_letters.send(
                    key=e.key,
                    value=dead_letter(e.value, msg.topic, msg.partition, msg.offset, bad.code, bad.reason),
                )
                rejected[bad.code].inc()
                log.warning("dead-lettered %s[%s]@%s: %s", msg.topic, msg.partition, msg.offset, bad.code)
                yield ("dead_letter", bad.code)
                continue
            stored = profiles.get(event.user_id)
            profile, applied = update_profile(Profile.from_dict(stored) if stored else None, event)
            if not applied:
                duplicates.inc()
                yield ("duplicate", event.type)
                continue
            profiles[event.user_id] = profile.to_dict()
            consumed[event.type].inc()
            seconds.observe(time.perf_counter() - t0)
            yield ("applied", event.type)

    agent = app.agent(events_topic, name="update_profiles")(update_profiles)
    return StreamApp(app, settings, metrics, events_topic, dead_letters, profiles, agent)
