"""The Faust shell: app factory, topics, tables and thin agents around the pure core.

An agent decodes, loads state, calls a core step, writes the new state back (a table writes its
changelog only on assignment), sends outputs and observes metrics. Nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import ssl
import time
from dataclasses import dataclass
from typing import Any

import faust
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from faust.sensors.prometheus import setup_prometheus_sensors
from prometheus_client import CollectorRegistry

from stream_app.campaigns import load_campaigns
from stream_app.core.events import EventLimits, InvalidEvent, parse_event
from stream_app.core.pipeline import Config, Models, Outputs, UserState, advance, next_due_ms, process, set_consent
from stream_app.core.policy import suppression_code, uniform
from stream_app.core.propensity import PropensityScorer
from stream_app.core.segments import SegmentModel, drift
from stream_app.core.timers import Timers, partition_for
from stream_app.core.trainer import SEGMENTS_KEY, Trainer
from stream_app.kafka_io import partitions_of
from stream_app.metrics import Metrics
from stream_app.settings import Settings
from stream_app.wire import dead_letter, decision_record, label_record, parse_consent, sample_record

log = logging.getLogger(__name__)


@dataclass
class ModelStore:
    """The models this worker scores with; replaced whole (copy on write) when a new version arrives."""

    current: Models

    def apply(self, key: str, params: dict) -> None:
        """Install one published model version (older or equal versions are ignored)."""
        cur = self.current
        if key == SEGMENTS_KEY:
            if params["version"] > cur.segments.version:
                self.current = Models(SegmentModel.from_params(params), cur.scorers)
        elif key.startswith("propensity:"):
            old = cur.scorers.get(params["campaign"])
            if old is None or params["version"] > old.version:
                scorer = PropensityScorer.from_params(params)
                self.current = Models(cur.segments, {**cur.scorers, params["campaign"]: scorer})


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
    campaigns, guardrails = load_campaigns(settings.campaigns_file or None)
    config = Config(campaigns=campaigns, guardrails=guardrails)
    models = ModelStore(Models(SegmentModel(k=settings.segments_k), {}))
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
        key_serializer="json",  # table keys (user ids) as JSON strings; topics below override to raw
        value_serializer="json",
        autodiscover=False,
    )
    setup_prometheus_sensors(app, pattern="/metrics", registry=metrics.registry, name_prefix="faust")

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
    inputs = {t: app.topic(t, **raw) for t in settings.input_topics}  # to forward mis-keyed messages
    topics |= {f"input:{t}": topic for t, topic in inputs.items()}
    users = app.Table("users", default=None, partitions=settings.topic_partitions)
    trainer_state = app.Table("trainer_state", default=None, partitions=1)
    trainer = Trainer(campaigns, settings.segments_k, settings.model_publish_interval_ms)
    ownership = {"fresh": False}  # the trainer's in-memory state matches its table only while it owns it
    timers = Timers()
    index = {"fresh": False}  # the timer index matches the users table only until the next rebalance
    nparts = settings.topic_partitions
    size = {"mean": 0.0, "n": 0}  # sampled mean bytes of a user's state
    limits = EventLimits(
        max_bytes=settings.max_event_bytes,
        max_future_ms=settings.max_future_skew_s * 1000,
        max_past_ms=settings.max_past_skew_s * 1000,
    )
    m = metrics
    sample_rate = settings.segment_sample_rate
    dead_letters, decisions, audit, model_inputs = (
        topics["dead_letters"], topics["decisions"], topics["audit"], topics["model_inputs"],
    )  # fmt: skip

    async def reject(e: Any, bad: InvalidEvent) -> tuple[str, str]:
        msg = e.message
        await dead_letters.send(
            key=e.key, value=dead_letter(e.value, msg.topic, msg.partition, msg.offset, bad.code, bad.reason)
        )
        m.events_rejected[bad.code].inc()
        log.warning("dead-lettered %s[%s]@%s: %s", msg.topic, msg.partition, msg.offset, bad.code)
        return ("dead_letter", bad.code)

    async def emit(out: Outputs, event_id: str, event_ms: int | None = None) -> None:
        for d in out.decisions:
            record = decision_record(d)
            await audit.send(key=d.user_id.encode(), value=record)
            if d.action == "push":
                await decisions.send(key=d.user_id.encode(), value=record)
            m.decisions[(d.campaign, d.action)].inc()
            if (code := suppression_code(d)) is not None:
                m.suppressions[(d.campaign, code)].inc()
        if event_ms is not None and out.decisions:
            m.event_to_decision_seconds.observe(max(0.0, time.time() - event_ms / 1000))
        for name in out.ineligible:
            m.ineligible[(name,)].inc()
        for label in out.labels:
            await model_inputs.send(key=label.campaign.encode(), value=label_record(label))
            m.labels[(label.campaign, label.converted)].inc()
        if out.segment_sample is not None and uniform("segment_sample", event_id) < sample_rate:
            await model_inputs.send(key=b"segments", value=sample_record(out.segment_sample))

    async def apply_consent(stream: Any) -> Any:
        """Opt-out, opt-in and erase commands. Opt-out wins at once; erase keeps only a suppression marker."""
        async for e in stream.events():
            try:
                user_id, action = parse_consent(e.value)
            except InvalidEvent as bad:
                yield await reject(e, bad)
                continue
            stored = users.get(user_id)
            if action == "erase":
                users[user_id] = {"erased": True}  # no personal data; keeps the user suppressed
            elif stored is None or not stored.get("erased"):
                state = set_consent(UserState.from_dict(stored) if stored else None, opted_out=action == "opt_out")
                if state is not None:
                    users[user_id] = state.to_dict()
            m.consent[action].inc()
            yield ("consent", action)

    def rebuild_timers() -> None:
        """After a rebalance: schedule every user this worker holds (partitions are recovered by now)."""
        timers.clear()
        for user_id, stored in users.items():
            if stored is not None and not stored.get("erased"):
                due = next_due_ms(UserState.from_dict(stored), config)
                timers.schedule(partition_for(user_id, nparts), user_id, due)
        index["fresh"] = True
        log.info("timer index rebuilt: %d users scheduled", len(timers))

    def store(user_id: str, state: UserState | None, partition: int) -> None:
        if state is None:
            users.pop(user_id, None)  # expired: a tombstone in the changelog
            return
        d = state.to_dict()
        users[user_id] = d
        timers.schedule(partition, user_id, next_due_ms(state, config))
        if uniform("size_sample", user_id) < 0.01:  # estimate bytes per user without serializing twice
            size["n"] += 1
            size["mean"] += (len(orjson.dumps(d)) - size["mean"]) / min(size["n"], 1000)

    async def fire_timers(partition: int, event_ms: int) -> None:
        """Tick every user of this partition whose timer the partition's event-time watermark passed."""
        watermark = timers.advance(partition, event_ms)
        for user_id in timers.pop_due(partition):
            stored = users.get(user_id)
            if stored is None or stored.get("erased"):
                continue
            new, out = advance(UserState.from_dict(stored), user_id, watermark, models.current, config)
            store(user_id, new, partition)
            await emit(out, user_id)
            m.timers_fired.inc()

    async def process_events(stream: Any) -> Any:
        """Events -> user state -> decisions, labels. Yields each message's outcome."""
        async for e in stream.events():
            t0 = time.perf_counter()
            msg = e.message
            try:
                event = parse_event(e.value, limits, ref_ms=int(msg.timestamp * 1000))
            except InvalidEvent as bad:
                yield await reject(e, bad)
                continue
            home = partition_for(event.user_id, nparts)
            if msg.partition != home:  # keyed otherwise: move it to its user's partition, process it there
                by_type = inputs[settings.input_topics[("click", "like", "payment").index(event.type)]]
                await inputs.get(msg.topic, by_type).send(key=event.user_id.encode(), value=e.value, partition=home)
                m.repartitioned.inc()
                yield ("repartitioned", event.type)
                continue
            if not index["fresh"]:
                rebuild_timers()
            await fire_timers(msg.partition, event.ts_ms)
            stored = users.get(event.user_id)
            if stored is not None and stored.get("erased"):
                m.suppressed_erased.inc()
                yield ("erased", event.type)
                continue
            state = UserState.from_dict(stored) if stored else None
            new, out = process(state, event, models.current, config)
            if out.duplicate:
                m.duplicates_dropped.inc()
                yield ("duplicate", event.type)
                continue
            store(event.user_id, new, msg.partition)
            await emit(out, event.event_id, event.ts_ms)
            m.events_consumed[event.type].inc()
            m.processing_seconds.observe(time.perf_counter() - t0)
            yield ("applied", event.type)

    @app.timer(5.0)
    async def observe_state() -> None:
        m.state_users.set(len(users))
        m.state_bytes.set(len(users) * size["mean"])
        m.timers_pending.set(len(timers))

    def on_revoked(*_: Any, **__: Any) -> None:
        ownership["fresh"] = False
        index["fresh"] = False

    app.on_partitions_revoked.connect(on_revoked)

    async def train(stream: Any) -> Any:
        """The single trainer: learn from each label or sample, persist learning state, publish versions."""
        segment_writes = 0
        async for e in stream.events():
            if not ownership["fresh"]:  # (re)gained the partition: continue from the persisted state
                for key, params in list(trainer_state.items()):
                    trainer.restore(key, params)
                ownership["fresh"] = True
            try:
                record = orjson.loads(e.value)
                key = trainer.learn(record)
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as bad:
                log.warning("model input %s@%s ignored: %s", e.message.partition, e.message.offset, type(bad).__name__)
                m.model_inputs_ignored.inc()
                yield None
                continue
            if key is not None and key != SEGMENTS_KEY:
                trainer_state[key] = trainer.state(key)  # a label is rare: persist every one
            elif key == SEGMENTS_KEY:
                segment_writes += 1
                if segment_writes % 50 == 0:  # samples are many and a lost few do not matter
                    trainer_state[key] = trainer.state(key)
            for name, params in trainer.due(int(e.message.timestamp * 1000)).items():
                trainer_state[name] = params
                await topics["model_params"].send(key=name.encode(), value=orjson.dumps(params))
                m.models_published[(name,)].inc()
            observe_quality()
            yield key

    def observe_quality() -> None:
        for name, q in trainer.quality.items():
            for gauge, value in ((m.model_log_loss, q.log_loss), (m.model_auc, q.auc),
                                 (m.label_delay, q.mean_delay_s), (m.uplift, q.uplift)):  # fmt: skip
                if not math.isnan(value):
                    gauge[(name,)].set(value)

    @app.task
    async def follow_models() -> None:
        """Every worker: read the compacted model-params topic from the start, then follow it."""
        consumer = AIOKafkaConsumer(**client_kwargs(settings), enable_auto_commit=False, group_id=None,
                                    isolation_level="read_committed")  # fmt: skip
        await consumer.start()
        try:
            kw = client_kwargs(settings)
            while not (parts := await partitions_of(kw.pop("bootstrap_servers"), settings.model_params_topic, **kw)):
                kw = client_kwargs(settings)
                await asyncio.sleep(1.0)  # not created yet: the first publication will create it
            tps = [TopicPartition(settings.model_params_topic, p) for p in parts]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            while True:
                batch = await consumer.getmany(timeout_ms=500)
                for msgs in batch.values():
                    for msg in msgs:
                        with contextlib.suppress(orjson.JSONDecodeError, KeyError, ValueError):
                            before = models.current.segments
                            models.apply(msg.key.decode(), orjson.loads(msg.value))
                            observe_models(before)
        finally:
            await consumer.stop()

    def observe_models(before: SegmentModel) -> None:
        cur = models.current
        for name, scorer in cur.scorers.items():
            m.model_version[(f"propensity:{name}",)].set(scorer.version)
        seg = cur.segments
        m.model_version[(SEGMENTS_KEY,)].set(seg.version)
        for j, size in enumerate(seg.counts):
            m.segment_size[(str(j),)].set(size)
        if seg is not before and before.centroids:
            for j, d in enumerate(drift(before, seg)):
                m.segment_drift[(str(j),)].set(d)

    events_agent = app.agent(topics["events"], name="process_events")(process_events)
    consent_agent = app.agent(topics["consent"], name="apply_consent")(apply_consent)
    train_agent = app.agent(topics["model_inputs"], name="train")(train)
    return StreamApp(
        app, settings, metrics, config, models, users, events_agent, consent_agent, train_agent, trainer,
        trainer_state, topics, timers,
    )  # fmt: skip
