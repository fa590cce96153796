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
from dataclasses import dataclass, field
from typing import Any

import faust
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.producer.message_accumulator import BatchBuilder
from faust.sensors.prometheus import PrometheusMonitor, setup_prometheus_sensors
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from prometheus_client import CollectorRegistry

from stream_app.campaigns import load_campaigns
from stream_app.core.pipeline import Config, Models
from stream_app.core.segments import SegmentModel, drift
from stream_app.core.timers import Timers
from stream_app.core.trainer import SEGMENTS_KEY, Trainer
from stream_app.engine import Engine, Message, ModelStore, Record
from stream_app.kafka_io import partitions_of
from stream_app.metrics import Metrics
from stream_app.settings import Settings

log = logging.getLogger(__name__)


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
    engine: Engine


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

    def route(self, tp: TP) -> str | None:
        """The transactional id whose producer carries the effects of ``tp``'s messages (None: the plain
        producer). Faust keys it by co-partitioned topic group and partition, so a user's clicks, likes,
        payments and consent commands share one producer: their records keep processing order, and one
        transaction commits their offsets together."""
        if not self.app.in_transaction:
            return None
        return f"{self.app.conf.id}-{self.app.assignor.group_for_topic(tp.topic)}-{tp.partition}"

    async def flush(self, records: list[Record], tp: TP | None = None) -> None:
        """Send ``records``, the effects of input messages of ``tp`` (default: the current event's)."""
        if not records:
            return
        producer = self.app.producer
        if tp is None and self.app.in_transaction and (event := faust.current_event()) is not None:
            tp = event.message.tp
        if tp is None or not self.app.in_transaction:
            await send_records(producer._ensure_producer(), records)
            return
        tid = self.route(tp)
        transactional = producer._transaction_producers.get(tid)  # Faust's per-partition producer
        if transactional is None:
            raise RuntimeError(f"no transactional producer {tid} for {tp} (partition revoked mid-event?)")
        async with producer._trn_locks[tid]:
            await send_records(transactional, records)


BATCH_BYTES = 256 * 1024  # per record batch built by send_records: below brokers' default 1 MB message limit


async def send_records(producer: AIOKafkaProducer, records: list[Record]) -> None:
    """Send ``records`` in order per partition, as one record batch per topic-partition (more if full).

    aiokafka's ``send`` costs about 9 µs per record in Python (a future per record, metadata and transaction
    checks, the accumulator): 9% of the worker's event loop at two records per event. Here the records go
    into batches built directly (aiokafka's C batch builder) and each batch is handed over closed, so it is
    sent at the sender's next turn instead of lingering. Partitions are chosen by the producer's partitioner,
    as ``send`` would. Records are small (events are capped at ``max_event_bytes``, a state at about 1 KB),
    far below the broker's message size limit. Delivery is as with ``send``: the transaction commits them
    (exactly_once), or Faust flushes the producer before it commits offsets (at_least_once).
    """
    builders: dict[tuple[str, int], BatchBuilder] = {}
    known: set[str] = set()
    transactional = producer._txn_manager is not None and producer._txn_manager.transactional_id is not None
    accumulator = producer._message_accumulator  # its compression codec id, as its own builders use

    def new_builder() -> BatchBuilder:
        return BatchBuilder(BATCH_BYTES, accumulator._compression_type, is_transactional=transactional)

    for topic, key, value, partition in records:
        if topic not in known:
            await producer.client._wait_on_metadata(topic)
            known.add(topic)
        if partition is None:
            partition = producer._partition(topic, None, key, value, key, value)
        builder = builders.get((topic, partition))
        if builder is None:
            builder = builders[(topic, partition)] = new_builder()
        if builder.append(timestamp=None, key=key, value=value) is None:  # full: send it, start the next
            await producer.send_batch(builder, topic, partition=partition)
            builder = builders[(topic, partition)] = new_builder()
            builder.append(timestamp=None, key=key, value=value)  # a batch's first record always fits
    for (topic, partition), builder in builders.items():
        builder.close()
        await producer.send_batch(builder, topic, partition=partition)


class ChangelogStore:
    """Keyed state in memory, written to a compacted changelog topic by the Outbox, recovered by this class.

    Why not a Faust table: under exactly_once, Faust 0.15's table recovery cannot see the commit marker
    that ends a transactional changelog partition; it waits two 5 s read timeouts per rebalance, and in CI
    a restarted worker never finished recovering (> 120 s). Here a partition is loaded before the first
    message of that partition is processed: a plain read_committed consumer reads it from the beginning to
    its last stable offset (which, unlike the highwater, the reader can always reach once Faust's new
    transactional producers have fenced a crashed worker's open transactions). Keys and values are JSON,
    as Faust would write them, so the topic stays readable by any tool. Values are held as those bytes
    (``get``/``put``/``items``; ``store[key]`` decodes one for inspection), so recovery parses only keys.
    """

    def __init__(self, settings: Settings, topic: str, recover: bool = True) -> None:
        self.settings, self.topic, self.recover = settings, topic, recover
        self.data: dict[str, bytes] = {}
        self.partition_of: dict[str, int] = {}
        self.loaded: set[int] = set()
        self.nbytes = 0  # sum of the held values' sizes: the state-bytes gauge

    def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    def items(self) -> Any:
        return self.data.items()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: str) -> Any:
        return orjson.loads(self.data[key])

    def _set(self, key: str, value: bytes | None, partition: int) -> None:
        old = self.data.pop(key, None) if value is None else self.data.get(key)
        self.nbytes -= len(old) if old is not None else 0
        if value is None:
            self.partition_of.pop(key, None)
        else:
            self.data[key] = value
            self.partition_of[key] = partition
            self.nbytes += len(value)

    def put(self, batch: list[Record], key: str, value: bytes | None, partition: int) -> None:
        self._set(key, value, partition)
        batch.append((self.topic, orjson.dumps(key), value, partition))

    def forget(self) -> None:
        """After a revocation: whatever this worker owns next is loaded again from the changelog."""
        self.data.clear()
        self.partition_of.clear()
        self.loaded.clear()
        self.nbytes = 0

    async def ensure(self, partitions: set[int]) -> float:
        """Load the partitions not loaded yet; returns the seconds it took (0 if nothing to load)."""
        todo = sorted(set(partitions) - self.loaded)
        if not todo or not self.recover:
            self.loaded |= set(todo)
            return 0.0
        t0 = time.monotonic()
        consumer = AIOKafkaConsumer(**client_kwargs(self.settings), enable_auto_commit=False, group_id=None,
                                    isolation_level="read_committed", max_partition_fetch_bytes=4 << 20)  # fmt: skip
        await consumer.start()
        try:
            tps = [TopicPartition(self.topic, p) for p in todo]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            end = await consumer.end_offsets(tps)  # read_committed: the last stable offset
            while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
                for tp, msgs in (await consumer.getmany(timeout_ms=200, max_records=10_000)).items():
                    for msg in msgs:
                        self._set(orjson.loads(msg.key), msg.value, tp.partition)
        finally:
            await consumer.stop()
        self.loaded |= set(todo)
        took = time.monotonic() - t0
        log.info("state %s partitions %s recovered: %d keys in %.2fs", self.topic, todo, len(self.data), took)
        return took


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust 0.15 fixes the worker consumer's fetch_max_wait_ms at 1500. aiokafka keeps one fetch in flight
    per broker and leaves partitions with unconsumed records out of it, so once the busy partitions' records
    are buffered, the next fetch holds only idle ones (consent, model inputs, quiet partitions), the broker
    holds it for the full wait, and the busy partitions' next records wait behind it: measured 1.45 s median
    event-to-decision at 1,500 events/s with the worker half idle. A short wait fixes that but costs
    throughput under a backlog (smaller fetches, smaller batches: 20 ms took 28% more CPU per event than
    1,500 ms), so the wait follows the load (``FetchWait``)."""

    fetch_max_wait_ms = 1500
    worker_consumer: Any = None

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = self.fetch_max_wait_ms  # read when start() creates the fetcher
        self.worker_consumer = consumer
        return consumer

    def set_fetch_wait(self, ms: int) -> None:
        """The wait of the next fetch requests (the fetcher reads it per request; an int store is atomic)."""
        fetcher = getattr(self.worker_consumer, "_fetcher", None)
        if fetcher is not None:
            fetcher._fetch_max_wait_ms = ms


@dataclass
class FetchWait:
    """Short fetch waits while the worker keeps up (latency), long ones while it has a backlog (throughput).

    The backlog is the consumer lag of the partitions a fetch returned (their highwater, or last stable
    offset, minus the position): at least ``backlog`` events means records are waiting, the decisions trail
    by the backlog anyway and bigger fetches drain it sooner. Less means the worker caught up: short waits.
    (A fetch's size is the wrong signal: at 3,000 events/s a fetch after a 100 ms batch already holds 300-500
    events, and switching to long waits there put fetches of idle partitions in front of the busy ones again:
    at_least_once p99 400 ms instead of 100.)

    >>> w = FetchWait(short_ms=20, backlog_ms=1500, backlog=2000)
    >>> w.after_fetch(50_000), w.after_fetch(9_000), w.after_fetch(120)
    (1500, None, 20)
    """

    short_ms: int
    backlog_ms: int
    backlog: int
    current: int = 0

    def after_fetch(self, lag: int) -> int | None:
        """The wait to switch to after a fetch that left ``lag`` events behind (None: keep the current one)."""
        wanted = self.backlog_ms if lag >= self.backlog else self.short_ms
        if wanted == self.current:
            return None
        self.current = wanted
        return wanted


async def reopen_transactions(app: faust.App) -> None:
    """Faust 0.15 ends the transactions twice when a worker stops: once when the app waits for its streams,
    again when the consumer stops. An offset acked in between (an agent's last event) is then sent to a
    producer without an open transaction: IllegalOperation, the consumer never stops cleanly nor leaves the
    group, and a restarted worker waits out the session timeout (measured: 28 s instead of 4 s). Opening the
    ended transactions again lets the second call commit those offsets."""
    if not app.in_transaction:
        return
    producer = app.producer
    for tid, transactional in list(producer._transaction_producers.items()):
        if not transactional._txn_manager.is_in_transaction():
            await producer.begin_transaction(tid)


class Monitor(PrometheusMonitor):
    """Faust's Prometheus monitor, with the end-offset gauge bound once per partition: Faust sets it for every
    fetched message, and looking up its labelled child each time took 4% of the worker's event loop."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._end_offsets: dict[TP, Any] = {}

    def track_tp_end_offset(self, tp: TP, offset: int) -> None:
        self.tp_end_offsets[tp] = offset
        if (gauge := self._end_offsets.get(tp)) is None:
            gauge = self._end_offsets[tp] = self._metrics.topic_partition_end_offset.labels(
                topic=tp.topic, partition=tp.partition
            )
        gauge.set(offset)


@dataclass
class BatchFeed:
    """Messages of some topics (the events; the model inputs), handed from each fetch straight to one batch
    handler.

    Faust 0.15 moves every message through its own machinery before an agent sees it: per message a
    ``wait_first`` (four tasks and an ``asyncio.wait``), the conductor (flow control, sensors, decoding into
    an Event, a queue put) and the stream's iteration (sensors, acks): the minimal forwarding agent caps at
    4.5-5k events per CPU-second, about 200 µs per event before any work. Here the consumer's drain loop
    puts the event topics' messages of each fetch, as one list, into a bounded queue that a single task
    (``run``) hands to the handler. Faust still owns the group, the offsets, the commits and the
    transactions: a queued message counts as unacked (a rebalance or a stop waits for it, as for a
    stream's), and the handler acks each message after sending its effects, so a commit never precedes
    them. The queue holds at most two batches: a slow handler stops the fetching (back pressure). When Faust
    stops the flow (a rebalance, a stop) the rest of a fetch is dropped, as Faust drops its streams'
    buffers: a fetch under a backlog holds tens of thousands of events, and handing them all over first
    kept a rebalance waiting 18 s for them (measured with two workers).

    A batch keeps the order Faust's fetch iterates in (round robin over the partitions): the clicks, likes
    and payments of one partition progress together in event time, and that partition's watermark (the
    newest event time, which fires the timers) does not run ahead on one topic. Capping the fetch itself
    instead (max_poll_records) drains one partition at a time: measured 17% more decisions, timers fired
    early for users whose other events were still in another topic's backlog.
    """

    topics: frozenset[str]
    size: int = 500  # messages per batch, at most: a fetch may bring thousands
    on_fetch: Any = None  # called after each fetch with the lag of these topics' partitions it returned
    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(maxsize=2))

    async def put(self, consumer: Any, messages: list[Any]) -> None:
        await self.queue.put(messages)
        unacked = consumer._unacked_messages  # no await since the put: the handler cannot have run yet
        for message in messages:
            unacked.add(message)

    async def run(self, app: faust.App, handle: Any) -> None:
        """Hand each queued list to ``handle`` (which acks), until the app stops; a handler error crashes
        the worker (its unacked messages are consumed again after a restart)."""
        while True:
            messages = await self.queue.get()
            try:
                await handle(messages)
            except Exception as exc:
                log.exception("batch handler failed; stopping the worker")
                await app.crash(exc)
                raise


async def drain_in_batches(consumer: Any, fetcher: Any, feeds: list[BatchFeed]) -> None:
    """Faust's ``Consumer._drain_messages`` (0.15.3, same offset, gap and commit bookkeeping), except that
    messages of a feed's topics go to that feed as lists (per fetch, in batches of at most ``feed.size``)
    instead of one by one to the conductor."""
    callback = consumer.callback
    read_offset = consumer._read_offset
    acks_enabled_for = consumer.app.topics.acks_enabled_for
    commit_every = consumer._commit_every
    consumer_stopped, fetcher_stopped = consumer._stopped.is_set, fetcher._stopped.is_set
    feed_of = {topic: i for i, feed in enumerate(feeds) for topic in feed.topics}
    try:
        while not (consumer_stopped() or fetcher_stopped()):
            consumer.diag.set_flag(CONSUMER_FETCHING)
            ait = consumer.getmany(timeout=1.0)
            await consumer.sleep(0)  # getmany may return at once, again and again: let the loop run
            if consumer.should_stop:
                continue
            batches: list[list[Any]] = [[] for _ in feeds]
            last: list[dict[TP, int]] = [{} for _ in feeds]  # each feed's partitions: the last offset read
            async for tp, message in ait:
                offset = message.offset
                r_offset = read_offset[tp]
                if r_offset is not None and offset < r_offset:
                    continue  # already read (a fetch that raced a seek)
                if r_offset and offset - r_offset > 1 and acks_enabled_for(message.topic):
                    await consumer._add_gap(tp, r_offset + 1, offset)  # e.g. transaction markers
                if commit_every is not None and consumer._n_acked >= commit_every:
                    consumer._n_acked = 0
                    await consumer.commit()
                if (i := feed_of.get(message.topic)) is not None:
                    batches[i].append(message)
                    last[i][tp] = offset
                else:
                    await consumer.wait_first(callback(message), consumer.suspend_flow.wait())
                read_offset[tp] = offset
            for feed, batch, read in zip(feeds, batches, last, strict=True):
                if feed.on_fetch is not None:
                    feed.on_fetch(
                        sum(max(0, (consumer.highwater(tp) or 0) - offset - 1) for tp, offset in read.items())
                    )
                for start in range(0, len(batch), feed.size):
                    if not consumer.flow_active:  # a rebalance or a stop: the rest is not handed over (nor
                        break  # tracked); it is fetched again from the committed offsets, by whoever owns it
                    await feed.put(consumer, batch[start : start + feed.size])
            consumer.diag.unset_flag(CONSUMER_FETCHING)
    except consumer.consumer_stopped_errors:
        if consumer.transport.app.should_stop:
            return
        raise
    except asyncio.CancelledError:
        if consumer.transport.app.should_stop:
            return
        raise
    finally:
        consumer.diag.unset_flag(CONSUMER_FETCHING)


def transport_for(
    app: faust.App, fetch_max_wait_ms: int, feeds: list[BatchFeed] | None = None
) -> faust_aiokafka.Transport:
    """Faust's aiokafka transport, with the worker consumer's fetch wait from the settings, and the
    ``feeds``' topics delivered in batches."""
    thread = type("ConsumerThread", (_ConsumerThread,), {"fetch_max_wait_ms": fetch_max_wait_ms})

    class Consumer(faust_aiokafka.Consumer):
        def _new_consumer_thread(self) -> Any:
            return thread(self, loop=self.loop, beacon=self.beacon)

        async def _drain_messages(self, fetcher: Any) -> None:
            if not feeds:
                return await super()._drain_messages(fetcher)
            return await drain_in_batches(self, fetcher, feeds)

        async def commit_and_end_transactions(self) -> None:
            await reopen_transactions(self.app)
            await super().commit_and_end_transactions()

    transport = type("Transport", (faust_aiokafka.Transport,), {"Consumer": Consumer})
    return transport(app.conf.broker_consumer, app)


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
        store=settings.store,
        datadir=settings.datadir,
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication,
        processing_guarantee=settings.processing_guarantee,
        broker_commit_interval=settings.commit_interval_s,
        broker_session_timeout=settings.session_timeout_s,
        producer_linger=settings.producer_linger_ms / 1000,
        web_bind=settings.web_bind,
        web_port=settings.web_port,
        web_tables_enabled=settings.table_views,
        key_serializer="json",  # table keys (user ids) as JSON strings; topics below override to raw
        value_serializer="json",
        autodiscover=False,
    )

    def on_fetch(lag: int) -> None:
        if (wait_ms := fetch_wait.after_fetch(lag)) is not None:
            app.consumer._thread.set_fetch_wait(wait_ms)

    feed = BatchFeed(frozenset(settings.input_topics), settings.batch_max_events, on_fetch)
    train_feed = BatchFeed(frozenset([settings.model_inputs_topic]), settings.batch_max_events)
    app.transport = transport_for(app, settings.fetch_max_wait_ms, [feed, train_feed])
    fetch_wait = FetchWait(settings.fetch_max_wait_ms, settings.fetch_max_wait_backlog_ms,
                           settings.fetch_backlog_events, settings.fetch_max_wait_ms)  # fmt: skip
    setup_prometheus_sensors(app, pattern="/metrics", registry=metrics.registry, name_prefix="faust")
    app.monitor = Monitor(metrics=app.monitor._metrics)

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
    trainer = Trainer(campaigns, settings.segments_k, settings.model_publish_interval_ms)
    ownership = {"fresh": False}  # the trainer's in-memory state matches its table only while it owns it
    outbox = Outbox(app)
    engine = Engine(settings, config, users, models, metrics)
    user_topics = {*settings.input_topics, settings.consent_topic}

    async def ensure_users() -> None:
        """Before a message: every user-keyed partition this worker owns is loaded (all at once, so the
        timer index rebuilt next sees every user)."""
        owned = {tp.partition for tp in app.assignor.assigned_actives() if tp.topic in user_topics}
        if owned - users.loaded:
            m.state_recovery_seconds.observe(await users.ensure(owned))

    m = metrics

    def message(e: Any) -> Message:
        msg = e.message
        return Message(msg.topic, msg.partition, msg.offset, e.key, e.value, int(msg.timestamp * 1000))

    async def apply_consent(stream: Any) -> Any:
        """Consent commands (opt-out, opt-in, erase), through the engine."""
        async for e in stream.events():
            await ensure_users()
            batch: list[Record] = []
            result = engine.on_consent(batch, message(e))
            await outbox.flush(batch)
            yield result

    async def process_batch(messages: list[Any], ack: bool = True) -> list[tuple[str, str]]:
        """Events -> user state -> decisions, labels, for a batch of input messages; acks each message once
        its records are sent (``ack=False``: a Faust stream acks them) and returns the outcomes. One
        ownership check and one locked send per source partition instead of one per event."""
        t0 = time.perf_counter()
        await ensure_users()
        # records in processing order per producer: a user's state records must reach the changelog in
        # the order they were computed, and all of one user's input partitions share one producer
        groups: dict[str | None, tuple[TP, list[Record]]] = {}
        records_of: dict[TP, list[Record]] = {}  # a message's partition -> its producer's records
        results = []
        on_event = engine.on_event
        for msg in messages:
            tp = msg.tp
            if tp in lost:  # revoked while buffered: the partition's new owner processes it
                continue
            if (records := records_of.get(tp)) is None:
                key = outbox.route(tp)
                if key not in groups:
                    groups[key] = (tp, [])
                records = records_of[tp] = groups[key][1]
            result = on_event(records, Message(msg.topic, msg.partition, msg.offset, msg.key, msg.value,
                                               int(msg.timestamp * 1000)))  # fmt: skip
            results.append(result)
            if result[0] == "dead_letter":
                log.warning("dead-lettered %s[%s]@%s: %s", tp.topic, tp.partition, msg.offset, result[1])
        for tp, batch in groups.values():
            await outbox.flush(batch, tp=tp)
        if ack:
            acked, unacked = app.consumer.ack, app.consumer._unacked_messages
            for msg in messages:
                if msg.tp in lost:
                    unacked.discard(msg)  # not ours any more: nothing to commit, nothing to wait for
                else:
                    acked(msg)
        if results:
            per_event = (time.perf_counter() - t0) / len(results)
            observe = m.processing_seconds.observe
            for result in results:
                if result[0] == "applied":
                    observe(per_event)
        return results

    async def process_events(stream: Any) -> Any:
        """The event agent. In a worker the transport hands it each fetch's events as batches (BatchFeed)
        and this stream stays empty (iterating it subscribes the topics); Faust's test_context() goes through
        it one message at a time. Yields each message's outcome. (A ``take_events`` stream here woke every
        few ms to check its empty buffer: 2.5% of the worker's event loop.)"""
        async for e in stream.events():
            for result in await process_batch([e.message], ack=False):
                yield result

    async def process_fetched(messages: list[Any]) -> None:
        m.batch_events.observe(len(messages))
        await process_batch(messages)

    @app.task
    async def run_batches() -> None:
        await feed.run(app, process_fetched)

    @app.timer(5.0)
    async def observe_state() -> None:
        m.state_users.set(len(users))
        m.state_bytes.set(users.nbytes)
        m.timers_pending.set(len(engine.timers))
        observe_quality()  # exact AUC sorts a window: every few seconds, not on every model input

    lost: set[TP] = set()  # revoked and not assigned again: skip their events still in a take buffer

    def on_revoked(_sender: Any, revoked: set[TP], **__: Any) -> None:
        lost.update(revoked)
        ownership["fresh"] = False
        engine.index_fresh = False
        users.forget()
        trainer_state.forget()

    def on_assigned(_sender: Any, assigned: set[TP], **__: Any) -> None:
        lost.difference_update(assigned)

    app.on_partitions_revoked.connect(on_revoked)
    app.on_partitions_assigned.connect(on_assigned)

    segment_writes = [0]

    async def train_batch(messages: list[Any], ack: bool = True) -> list[str | None]:
        """The single trainer: learn from each label or sample, persist learning state, publish versions;
        one locked send per batch. Acks as ``process_batch`` does. Returns each message's first model key."""
        if not ownership["fresh"]:  # (re)gained the partition: continue from the persisted state
            await trainer_state.ensure({0})
            for key, params in list(trainer_state.items()):
                trainer.restore(key, orjson.loads(params))
            ownership["fresh"] = True
        batch: list[Record] = []
        results: list[str | None] = []
        # labels' learners are persisted once per batch, not per label: a batch is acked only after its
        # records are sent (under exactly_once, in one transaction), so a crash mid-batch learns it again
        learned: set[str] = set()
        for msg in messages:
            try:
                keys = trainer.learn(orjson.loads(msg.value))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as bad:
                log.warning("model input %s@%s ignored: %s", msg.partition, msg.offset, type(bad).__name__)
                m.model_inputs_ignored.inc()
                results.append(None)
                continue
            for key in keys:
                if key != SEGMENTS_KEY:
                    learned.add(key)
                else:
                    segment_writes[0] += 1
                    if segment_writes[0] % 50 == 0:  # samples are many; a crash loses at most 49 of them
                        trainer_state.put(batch, key, orjson.dumps(trainer.state(key)), 0)
            for name, params in trainer.due(int(msg.timestamp * 1000)).items():
                value = orjson.dumps(params)
                trainer_state.put(batch, name, value, 0)
                batch.append((settings.model_params_topic, name.encode(), value, None))
                m.models_published[(name,)].inc()
            results.append(keys[0] if keys else None)
        for key in sorted(learned):  # after the batch's publications: the newest state of the key wins
            trainer_state.put(batch, key, orjson.dumps(trainer.state(key)), 0)
        await outbox.flush(batch, tp=messages[-1].tp if messages else None)
        if ack:
            for msg in messages:
                app.consumer.ack(msg)
        return results

    async def train(stream: Any) -> Any:
        """The trainer agent. In a worker the transport hands it each fetch's model inputs as one batch
        (BatchFeed); Faust's test_context() goes through this stream, one message at a time."""
        async for e in stream.events():
            for result in await train_batch([e.message], ack=False):
                yield result

    @app.task
    async def run_training() -> None:
        await train_feed.run(app, train_batch)

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
        for name, scorer in cur.controls.items():
            m.model_version[(f"control:{name}",)].set(scorer.version)
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
        trainer_state, topics, engine.timers, outbox, engine,
    )  # fmt: skip
