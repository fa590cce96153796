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
    outbox: Outbox


Record = tuple[str, bytes | None, bytes | None, int | None]  # topic, key, value, partition


@dataclass
class Outbox:
    """Writes all effects of one input message (state changelog records and outputs) atomically.

    Faust 0.15's exactly_once is not enough on its own, as measured by the SIGKILL test: (1) it picks a
    transactional producer by the *destination* topic and partition, so for topics the app does not
    consume (push-decisions, audit, dead letters, model-params) it sends outside any transaction, and for
    another partition (model-inputs, a repartitioned event) it fails unless this worker owns that
    partition; (2) table changelog writes go through a background buffer, so a commit can separate an
    event's state from its outputs. Here every record of one input message is sent by the source
    partition's transactional producer while holding that producer's lock, so the commit task cannot
    split them: state and outputs commit together, in the same transaction as, or one before, the input
    offset. A message whose offset did not commit is processed again and the event-id dedup then finds
    its state already applied, so nothing is pushed twice. Outside an event (timers) and under
    at_least_once the records are sent by the plain producer, in order.
    """

    app: faust.App

    async def flush(self, records: list[Record]) -> None:
        if not records:
            return
        producer = self.app.producer
        event = faust.current_event() if self.app.in_transaction else None
        if event is None:
            for topic, key, value, partition in records:
                await producer.send(topic, key, value, partition, None, None)
            return
        tp = event.message.tp
        tid = f"{self.app.conf.id}-{self.app.assignor.group_for_topic(tp.topic)}-{tp.partition}"
        transactional = producer._transaction_producers.get(tid)  # Faust's per-partition producer
        if transactional is None:
            raise RuntimeError(f"no transactional producer {tid} for {tp} (partition revoked mid-event?)")
        async with producer._trn_locks[tid]:
            for topic, key, value, partition in records:
                await transactional.send(topic, value=value, key=key, partition=partition)


class StateTable:
    """A Faust table whose changelog records are written by the Outbox, in the event's transaction.

    Reads and recovery are Faust's (the changelog topic, key and value formats are unchanged); only the
    write path differs: the in-memory store is updated directly and the changelog record is queued.
    """

    def __init__(self, table: Any) -> None:
        self.table = table
        self.topic = table.changelog_topic.get_topic_name()

    def get(self, key: str) -> Any:
        return self.table.get(key)

    def put(self, batch: list[Record], key: str, value: dict | None, partition: int) -> None:
        store = self.table.data
        if value is None:
            store.pop(key, None)
        else:
            store[key] = value
        if hasattr(store, "_key_partition"):  # the memory store drops keys of partitions it loses by this
            store._key_partition[key] = partition
        batch.append((self.topic, orjson.dumps(key), None if value is None else orjson.dumps(value), partition))


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
        broker_commit_interval=settings.commit_interval_s,
        broker_session_timeout=settings.session_timeout_s,
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
    outbox = Outbox(app)
    user_state, learning_state = StateTable(users), StateTable(trainer_state)
    sample_rate = settings.segment_sample_rate
    name_of = {k: t.get_topic_name() for k, t in topics.items() if k != "events"}
    by_type = dict(zip(("click", "like", "payment"), settings.input_topics, strict=True))

    def reject(batch: list[Record], e: Any, bad: InvalidEvent) -> tuple[str, str]:
        msg = e.message
        value = dead_letter(e.value, msg.topic, msg.partition, msg.offset, bad.code, bad.reason)
        batch.append((name_of["dead_letters"], e.key, value, None))
        m.events_rejected[bad.code].inc()
        log.warning("dead-lettered %s[%s]@%s: %s", msg.topic, msg.partition, msg.offset, bad.code)
        return ("dead_letter", bad.code)

    def collect(batch: list[Record], out: Outputs, event_id: str, event_ms: int | None = None) -> None:
        """Queue a step's outputs: every decision to the audit, pushes to push services, model inputs."""
        for d in out.decisions:
            record = decision_record(d)
            key = d.user_id.encode()
            batch.append((name_of["audit"], key, record, None))
            if d.action == "push":
                batch.append((name_of["decisions"], key, record, None))
            m.decisions[(d.campaign, d.action)].inc()
            if (code := suppression_code(d)) is not None:
                m.suppressions[(d.campaign, code)].inc()
        if event_ms is not None and out.decisions:
            m.event_to_decision_seconds.observe(max(0.0, time.time() - event_ms / 1000))
        for name in out.ineligible:
            m.ineligible[(name,)].inc()
        for label in out.labels:
            batch.append((name_of["model_inputs"], label.campaign.encode(), label_record(label), None))
            m.labels[(label.campaign, label.converted)].inc()
        if out.segment_sample is not None and uniform("segment_sample", event_id) < sample_rate:
            batch.append((name_of["model_inputs"], b"segments", sample_record(out.segment_sample), None))

    async def apply_consent(stream: Any) -> Any:
        """Opt-out, opt-in and erase commands. Opt-out wins at once; erase keeps only a suppression marker."""
        async for e in stream.events():
            batch: list[Record] = []
            result = consent_step(batch, e)
            await outbox.flush(batch)
            yield result

    def consent_step(batch: list[Record], e: Any) -> tuple[str, str]:
        try:
            user_id, action = parse_consent(e.value, limits)
        except InvalidEvent as bad:
            return reject(batch, e, bad)
        home = partition_for(user_id, nparts)
        if e.message.partition != home:  # consent must land where the user's state lives
            batch.append((name_of["consent"], user_id.encode(), e.value, home))
            m.repartitioned.inc()
            return ("repartitioned", action)
        stored = user_state.get(user_id)
        if action == "erase":
            user_state.put(batch, user_id, {"erased": True}, home)  # no personal data; stays suppressed
        elif stored is None or not stored.get("erased"):
            state = set_consent(UserState.from_dict(stored) if stored else None, opted_out=action == "opt_out")
            if state is not None:
                user_state.put(batch, user_id, state.to_dict(), home)
        m.consent[action].inc()
        return ("consent", action)

    def rebuild_timers() -> None:
        """After a rebalance: schedule every user this worker holds (partitions are recovered by now)."""
        timers.clear()
        for user_id, stored in users.items():
            if stored is not None and not stored.get("erased"):
                due = next_due_ms(UserState.from_dict(stored), config)
                timers.schedule(partition_for(user_id, nparts), user_id, due)
        index["fresh"] = True
        log.info("timer index rebuilt: %d users scheduled", len(timers))

    def store(batch: list[Record], user_id: str, state: UserState | None, partition: int) -> None:
        if state is None:
            user_state.put(batch, user_id, None, partition)  # expired: a tombstone in the changelog
            return
        d = state.to_dict()
        user_state.put(batch, user_id, d, partition)
        timers.schedule(partition, user_id, next_due_ms(state, config))
        if uniform("size_sample", user_id) < 0.01:  # estimate bytes per user without serializing twice
            size["n"] += 1
            size["mean"] += (len(orjson.dumps(d)) - size["mean"]) / min(size["n"], 1000)

    def fire_timers(batch: list[Record], partition: int, event_ms: int) -> None:
        """Tick every user of this partition whose timer the partition's event-time watermark passed."""
        watermark = timers.advance(partition, event_ms)
        for user_id in timers.pop_due(partition):
            stored = user_state.get(user_id)
            if stored is None or stored.get("erased"):
                continue
            new, out = advance(UserState.from_dict(stored), user_id, watermark, models.current, config)
            store(batch, user_id, new, partition)
            collect(batch, out, user_id)
            m.timers_fired.inc()

    def event_step(batch: list[Record], e: Any) -> tuple[str, str]:
        """One input message: validate, repartition, fire due timers, apply the event. Effects go to batch."""
        msg = e.message
        try:
            event = parse_event(e.value, limits, ref_ms=int(msg.timestamp * 1000))
        except InvalidEvent as bad:
            return reject(batch, e, bad)
        home = partition_for(event.user_id, nparts)
        if msg.partition != home:  # keyed otherwise: move it to its user's partition, process it there
            topic = msg.topic if msg.topic in settings.input_topics else by_type[event.type]
            batch.append((topic, event.user_id.encode(), e.value, home))
            m.repartitioned.inc()
            return ("repartitioned", event.type)
        if not index["fresh"]:
            rebuild_timers()
        fire_timers(batch, home, event.ts_ms)
        stored = user_state.get(event.user_id)
        if stored is not None and stored.get("erased"):
            m.suppressed_erased.inc()
            return ("erased", event.type)
        state = UserState.from_dict(stored) if stored else None
        new, out = process(state, event, models.current, config)
        if out.duplicate:
            m.duplicates_dropped.inc()
            return ("duplicate", event.type)
        store(batch, event.user_id, new, home)
        collect(batch, out, event.event_id, event.ts_ms)
        m.events_consumed[event.type].inc()
        return ("applied", event.type)

    async def process_events(stream: Any) -> Any:
        """Events -> user state -> decisions, labels. Yields each message's outcome."""
        async for e in stream.events():
            t0 = time.perf_counter()
            batch: list[Record] = []
            result = event_step(batch, e)
            await outbox.flush(batch)
            if result[0] == "applied":
                m.processing_seconds.observe(time.perf_counter() - t0)
            yield result

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
            batch: list[Record] = []
            if key is not None and key != SEGMENTS_KEY:
                learning_state.put(batch, key, trainer.state(key), 0)  # a label is rare: persist every one
            elif key == SEGMENTS_KEY:
                segment_writes += 1
                if segment_writes % 50 == 0:  # samples are many; a crash loses at most 49 of them
                    learning_state.put(batch, key, trainer.state(key), 0)
            for name, params in trainer.due(int(e.message.timestamp * 1000)).items():
                learning_state.put(batch, name, params, 0)
                batch.append((name_of["model_params"], name.encode(), orjson.dumps(params), None))
                m.models_published[(name,)].inc()
            await outbox.flush(batch)
            observe_quality()
            yield key

    @app.timer(settings.model_publish_interval_ms / 1000)
    async def flush_models() -> None:
        """Publication rides on trainer input; when inputs pause, nudge the trainer so no learned label waits.

        A flush record is harmless if repeated or lost (the trainer ignores it beyond publishing what is due).
        """
        if ownership["fresh"] and trainer.dirty:
            # a plain send: inside the trainer's own open transaction it would wait for the trainer to commit
            await app.producer.send(topics["model_inputs"].get_topic_name(), b"flush", b'{"kind": "flush"}', None,
                                    None, None)  # fmt: skip

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
        trainer_state, topics, timers, outbox,
    )  # fmt: skip
