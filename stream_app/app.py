"""The Faust shell's factory: the app, its topics, and the agents and tasks that call into the ``Worker``.

The shell is split by concern: ``transport`` (batches straight from each fetch, fetch waits, commits),
``outbox`` (sending effects and transactions), ``store`` (the changelog-backed state), ``agents`` (what a
worker does with each batch) and this factory. The functional core (``stream_app.core``, ``engine``)
never sees Faust.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import dataclass
from typing import Any

import faust
from prometheus_client import CollectorRegistry

from stream_app import faust_metrics, health
from stream_app.agents import Worker
from stream_app.campaigns import load_campaigns
from stream_app.core.pipeline import Config, Models
from stream_app.core.segments import SegmentModel
from stream_app.core.timers import Timers
from stream_app.core.trainer import Trainer
from stream_app.engine import Engine, ModelStore, build_trainer
from stream_app.kafka_io import client_kwargs
from stream_app.metrics import Metrics
from stream_app.ordering import EventTimeMerge
from stream_app.outbox import Outbox, quiet_fenced_futures, send_records
from stream_app.settings import Settings
from stream_app.store import ChangelogStore
from stream_app.transport import BatchFeed, EndOffsets, FetchWait, transport_for

log = logging.getLogger(__name__)

__all__ = ["ChangelogStore", "ModelStore", "Outbox", "StreamApp", "client_kwargs", "create_app", "send_records"]


@dataclass
class StreamApp:
    """The Faust app plus the handles tests and the CLI need."""

    app: faust.App
    settings: Settings
    metrics: Metrics
    config: Config
    models: ModelStore
    users: Any
    process_events: Any
    apply_consent: Any
    train: Any
    trainer: Trainer
    trainer_state: Any
    topics: dict[str, Any]
    timers: Timers
    outbox: Outbox
    engine: Engine
    worker: Worker


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


def create_app(
    settings: Settings | None = None, registry: CollectorRegistry | None = None, recover: bool = True
) -> StreamApp:
    """The Faust app and its agents. ``recover=False`` skips loading state from Kafka (agent unit tests)."""
    settings = settings or Settings()
    campaigns, guardrails = load_campaigns(settings.campaigns_file or None)
    config = Config(campaigns=campaigns, guardrails=guardrails, segment_sample_rate=settings.segment_sample_rate)
    models = ModelStore(Models(SegmentModel(k=settings.segments_k), {}))
    metrics = Metrics.create(registry)
    app = faust.App(
        settings.app_id,
        broker=settings.broker,
        broker_credentials=broker_credentials(settings),
        datadir=settings.datadir,
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication or 1,  # 0: the CLI resolves it from the cluster
        processing_guarantee=settings.processing_guarantee,
        broker_commit_interval=settings.commit_interval_s,
        broker_session_timeout=settings.session_timeout_s,
        producer_linger=settings.producer_linger_ms / 1000,
        web_bind=settings.web_bind,
        web_port=settings.web_port,
        key_serializer="json",  # table keys (user ids) as JSON strings; topics below override to raw
        value_serializer="json",
        autodiscover=False,
    )

    def on_fetch(lag: int) -> None:
        if (wait_ms := fetch_wait.after_fetch(lag)) is not None:
            app.consumer._thread.set_fetch_wait(wait_ms)

    # consent commands ride with the events: one handler applies a user's events and consent in fetch order
    feed = BatchFeed(frozenset([*settings.input_topics, settings.consent_topic]), settings.batch_max_events, on_fetch,
                     merge=EventTimeMerge(settings.input_topics, settings.merge_max_held))  # fmt: skip
    train_feed = BatchFeed(frozenset([settings.model_inputs_topic]), settings.batch_max_events)
    app.transport = transport_for(app, settings.fetch_max_wait_ms, [feed, train_feed])
    fetch_wait = FetchWait(settings.fetch_max_wait_ms, settings.fetch_max_wait_backlog_ms,
                           settings.fetch_backlog_events, settings.fetch_max_wait_ms)  # fmt: skip
    app.monitor = faust_metrics.install(app, metrics.registry)  # Faust's sensors, conventional names; /metrics

    raw = {"key_serializer": "raw", "value_serializer": "raw"}
    topics = {
        "events": app.topic(*settings.input_topics, key_type=bytes, value_type=bytes, **raw),
        "consent": app.topic(settings.consent_topic, key_type=bytes, value_type=bytes, **raw),
        "dead_letters": app.topic(settings.dead_letter_topic, **raw),
        "decisions": app.topic(settings.decisions_topic, **raw),
        "audit": app.topic(settings.audit_topic, **raw),
        "model_inputs": app.topic(settings.model_inputs_topic, partitions=1, key_type=bytes, value_type=bytes, **raw),
        "model_params": app.topic(settings.model_params_topic, partitions=1, **raw),
    }
    users = ChangelogStore(settings, settings.users_changelog_topic, recover)
    trainer_state = ChangelogStore(settings, settings.trainer_changelog_topic, recover)
    trainer = build_trainer(settings, campaigns)
    outbox = Outbox(app)
    # the worker's clock bounds event time and the watermark (replay passes none); dead letters are counted
    # once the shell has sent them
    engine = Engine(settings, config, users, models, metrics, clock=lambda: int(time.time() * 1000),
                    count_on_write=True)  # fmt: skip
    worker = Worker(app, settings, engine, users, trainer, trainer_state, models, metrics, outbox)
    app.on_partitions_revoked.connect(worker.on_revoked)
    app.on_partitions_assigned.connect(worker.on_assigned)
    ready = health.install(app, health.Health(on_ready=metrics.worker_ready.set))
    joined: list[bool] = []

    def on_joined(_sender: Any, assigned: set, **__: Any) -> None:
        joined[:] = [True]

    app.on_partitions_assigned.connect(on_joined)

    def assigned() -> tuple[bool, str]:
        return bool(
            joined
        ) and not app.rebalancing, "rebalancing" if app.rebalancing else "joined" if joined else "joining"

    ready.add_check("assigned", assigned)
    ready.add_check("state", lambda: health.recovered(app, users, worker.user_topics))
    ready.add_check("models", lambda: (worker.models_caught_up, worker.models_detail))

    @app.task
    async def bind_transactions() -> None:
        """The consumer exists once the app starts: give its transaction manager the outbox."""
        consumer = app.consumer
        consumer.on_failed = lambda tps: worker.on_failure(tps, RuntimeError("commit failed"))
        consumer.transactions.outbox = outbox
        quiet_fenced_futures(asyncio.get_running_loop())

    async def process_events(stream: Any) -> Any:
        """The event agent. In a worker the transport hands it each fetch's events as batches (BatchFeed)
        and this stream stays empty (iterating it subscribes the topics); Faust's test_context() goes through
        it one message at a time. Yields each message's outcome."""
        async for e in stream.events():
            for result in await worker.process_batch([e.message], ack=False):
                yield result

    async def apply_consent(stream: Any) -> Any:
        """Consent commands (opt-out, opt-in, erase): in a worker they arrive with the events' batches (one
        order per user); this stream serves test_context() and subscribes the topic."""
        async for e in stream.events():
            for result in await worker.process_batch([e.message], ack=False):
                yield result

    async def train(stream: Any) -> Any:
        """The trainer agent. In a worker the transport hands it each fetch's model inputs as one batch
        (BatchFeed); Faust's test_context() goes through this stream, one message at a time."""
        async for e in stream.events():
            for result in await worker.train_batch([e.message], ack=False):
                yield result

    async def process_fetched(messages: list[Any]) -> None:
        metrics.batch_events.observe(len(messages))
        await worker.process_batch(messages)

    @app.task
    async def run_batches() -> None:
        await feed.run(app, process_fetched)

    @app.task
    async def run_training() -> None:
        await train_feed.run(app, worker.train_batch)

    @app.task
    async def follow_models() -> None:
        await worker.follow_models()

    @app.timer(5.0)
    async def observe_state() -> None:
        if not app.rebalancing:
            await worker.ensure_users()  # recover owned state before traffic needs it: /readyz reports it
        worker.observe_state()
        ready.ready()  # sets the readiness gauge also when no probe asks
        metrics.event_loop_lag_seconds.set(ready.loop_lag_s)

    isolation = "read_committed" if settings.processing_guarantee == "exactly_once" else "read_uncommitted"
    end_offsets = EndOffsets(client_kwargs(settings), isolation)  # the worker consumer's isolation (Faust's rule)

    @app.task
    async def refresh_end_offsets() -> None:
        """The end-offset gauge from the broker every lag_refresh_s, fetching or not (transport.EndOffsets)."""
        try:
            while not app.should_stop:
                await asyncio.sleep(settings.lag_refresh_s)
                if app.rebalancing or app.should_stop:
                    continue
                try:
                    await end_offsets.refresh(app.monitor, app.consumer.assignment)
                except Exception as exc:  # the broker unreachable, a leader moving: next time
                    log.warning("end offsets not refreshed: %r", exc)
        finally:
            await end_offsets.stop()

    @app.timer(settings.model_publish_interval_ms / 1000)
    async def flush_models() -> None:
        await worker.nudge_trainer(topics["model_inputs"].get_topic_name())

    events_agent = app.agent(topics["events"], name="process_events")(process_events)
    consent_agent = app.agent(topics["consent"], name="apply_consent")(apply_consent)
    train_agent = app.agent(topics["model_inputs"], name="train")(train)
    return StreamApp(
        app, settings, metrics, config, models, users, events_agent, consent_agent, train_agent, trainer,
        trainer_state, topics, engine.timers, outbox, engine, worker,
    )  # fmt: skip
