"""Faust 0.15's aiokafka transport, adapted: batches straight from each fetch, fetch waits that follow the
load, commits that never take effects without their offsets (or offsets without their effects), and
committed offsets that reach the end of a partition whose last offset is a transaction marker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import faust
from aiokafka import AIOKafkaConsumer, TopicPartition
from faust.sensors.prometheus import PrometheusMonitor
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP

from stream_app.ordering import EventTimeMerge
from stream_app.outbox import Transactions, transactional_id

log = logging.getLogger(__name__)


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

    async def _fetch_records(self, consumer: Any, active_partitions: Any, timeout: Any = None,
                             max_records: Any = None) -> Any:  # fmt: skip
        """Faust's fetch, also noting each fetched partition's position right after it (this thread runs a
        fetch only when the drain loop asks for one, so the drain loop reads them before the next)."""
        records = await super()._fetch_records(consumer, active_partitions, timeout, max_records)
        assignment = consumer._subscription.subscription
        positions = {}
        if assignment is not None and active_partitions:
            for tp in active_partitions:
                with contextlib.suppress(Exception):
                    state = assignment.assignment.state_value(tp)
                    if state is not None and state.has_valid_position:
                        positions[tp] = state.position
        self.last_positions = positions
        return records

    last_positions: dict = {}  # noqa: RUF012 (replaced whole, never mutated)

    def last_poll_ms(self, tp: Any) -> int | None:
        """Wall ms of the last fetch response that updated ``tp``'s highwater (aiokafka's partition state)."""
        with contextlib.suppress(Exception):
            return self._ensure_consumer().last_poll_timestamp(tp)
        return None

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


class EndOffsets:
    """The end offsets of the worker's partitions, asked of the broker every few seconds, into the end-offset
    gauge the lag alerts read (``faust_topic_partition_end_offset - faust_topic_partition_offset_committed``).

    Faust sets that gauge only while a fetch returns records of the partition, so a worker that stopped
    fetching (a handler stuck on a slow dependency holds the fetch loop by back pressure; the merge pauses
    partitions) kept exporting the end offset of its last fetch: lag looked flat while the backlog grew.
    A plain client of its own (no group; the worker's isolation level, so under exactly_once the end is the
    last stable offset the worker can reach) lists the offsets, independent of the consumer's fetch loop.
    An end offset never moves back: the larger of this and the last fetch's is kept.
    """

    def __init__(self, client_kwargs: dict[str, Any], isolation_level: str) -> None:
        self.client_kwargs, self.isolation_level = client_kwargs, isolation_level
        self._client: Any = None

    async def read(self, tps: list[TP]) -> dict[TP, int]:
        """``tps``' end offsets now (one ListOffsets request per partition leader)."""
        if not tps:
            return {}
        if self._client is None:
            client = AIOKafkaConsumer(**self.client_kwargs, group_id=None, enable_auto_commit=False,
                                      isolation_level=self.isolation_level)  # fmt: skip
            await client.start()
            self._client = client
        found = await self._client.end_offsets([TopicPartition(tp.topic, tp.partition) for tp in tps])
        return {TP(tp.topic, tp.partition): offset for tp, offset in found.items()}

    async def refresh(self, monitor: Monitor, assignment: Any) -> dict[TP, int]:
        """Set the gauge of every partition still assigned after the request (``assignment()`` is asked
        again: a rebalance during the request must not bring back a revoked partition's child)."""
        found = await self.read(sorted(assignment()))
        still = assignment()
        ends = {tp: max(offset, monitor.tp_end_offsets.get(tp) or 0) for tp, offset in found.items() if tp in still}
        for tp, offset in ends.items():
            monitor.track_tp_end_offset(tp, offset)
        return ends

    async def stop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.stop()


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
    merge: EventTimeMerge | None = None  # hands these topics' messages over in event-time order per partition
    paused: set[TP] = field(default_factory=set)  # by the merge: fetching them would only grow what it holds
    resumed_at: dict[TP, int] = field(default_factory=dict)  # wall ms: until a fetch after it, a stale highwater

    def reset(self) -> None:
        """A rebalance or a stop: what the merge holds is read again from the committed offsets."""
        if self.merge is not None:
            self.merge.clear()
        self.paused.clear()
        self.resumed_at.clear()

    def arrange(self, consumer: Any, messages: list[Any], positions: dict[TP, int]) -> list[Any]:
        """This fetch's messages in the order they are handed over: consent and other topics outside the
        merge first, as fetched, then what the merge releases; fetching pauses where the merge holds."""
        merge = self.merge
        if merge is None:
            return messages
        direct = [m for m in messages if m.topic not in merge.topics]
        merge.add(m for m in messages if m.topic in merge.topics)

        def caught_up(topic: str, partition: int) -> bool:
            """Nothing more to read, as of a fetch response after the partition was last paused: a paused
            partition is not fetched, so its highwater is as old as the pause (a restarted worker catching up
            applied a topic's events 4.6 s of feed ahead of another's, past a highwater read before its pause)."""
            tp = TP(topic, partition)
            if tp in self.paused:
                return False
            since = self.resumed_at.get(tp)
            if since is not None:
                if (consumer._thread.last_poll_ms(tp) or 0) < since:
                    return False
                del self.resumed_at[tp]
            position, highwater = positions.get(tp), consumer.highwater(tp)
            return position is not None and highwater is not None and position >= highwater

        direct += merge.release(caught_up)
        if consumer.flow_active:
            holding = {TP(t, p) for t, p in merge.holding()}
            if resume := self.paused - holding:
                consumer.resume_partitions(resume)
                now = int(time.time() * 1000)  # aiokafka stamps fetch responses with this clock
                self.resumed_at.update(dict.fromkeys(resume, now))
            if pause := holding - self.paused:
                consumer.pause_partitions(pause)
            self.paused = holding
        return direct

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
    seek_starts = consumer.seek_starts  # the same dict for good: each seek refills it
    positions: dict[TP, int] = {}  # each partition's position after its last fetch (for the merge)
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
                if tp in seek_starts:
                    consumer.note_first_after_seek(tp, seek_starts.pop(tp), offset)
                elif r_offset is not None and offset - r_offset > 1 and acks_enabled_for(message.topic):
                    consumer._gap[tp].addi(r_offset + 1, offset)  # not records: e.g. transaction markers
                if commit_every is not None and consumer._n_acked >= commit_every:
                    consumer._n_acked = 0
                    await consumer.commit()
                if (i := feed_of.get(message.topic)) is not None:
                    batches[i].append(message)
                    last[i][tp] = offset
                else:
                    await consumer.wait_first(callback(message), consumer.suspend_flow.wait())
                read_offset[tp] = offset
            complete = True
            positions.update(getattr(consumer._thread, "last_positions", None) or {})
            for feed, batch, read in zip(feeds, batches, last, strict=True):
                batch = feed.arrange(consumer, batch, positions)
                if feed.on_fetch is not None:
                    feed.on_fetch(
                        sum(max(0, (consumer.highwater(tp) or 0) - offset - 1) for tp, offset in read.items())
                    )
                for start in range(0, len(batch), feed.size):
                    if not consumer.flow_active:  # a rebalance or a stop: the rest is not handed over (nor
                        complete = False  # tracked); it is fetched again from the committed offsets, by
                        log.info("flow stopped: %d fetched messages not handed over", len(batch) - start)
                        break  # whoever owns it
                    await feed.put(consumer, batch[start : start + feed.size])
            fetched = getattr(consumer._thread, "last_positions", None)
            if complete and fetched and consumer.flow_active:  # every record of this fetch was handed over
                held = {TP(t, p) for feed in feeds if feed.merge is not None for t, p in feed.merge.holding()}
                consumer.fetched_position.update({tp: pos for tp, pos in fetched.items() if tp not in held})
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
    """Faust's aiokafka transport, with the worker consumer's fetch wait from the settings, the ``feeds``'
    topics delivered in batches, and the commit and transaction handling of ``Consumer`` and
    ``outbox.Transactions``."""
    thread = type("ConsumerThread", (_ConsumerThread,), {"fetch_max_wait_ms": fetch_max_wait_ms})
    feed_list = list(feeds or [])

    class BoundConsumer(Consumer):
        feeds = feed_list

        def _new_consumer_thread(self) -> Any:
            return thread(self, loop=self.loop, beacon=self.beacon)

        async def _drain_messages(self, fetcher: Any) -> None:
            if not feeds:
                return await super()._drain_messages(fetcher)
            return await drain_in_batches(self, fetcher, feeds)

    transport = type("Transport", (faust_aiokafka.Transport,),
                     {"Consumer": BoundConsumer, "TransactionManager": Transactions})  # fmt: skip
    return transport(app.conf.broker_consumer, app)


class Consumer(faust_aiokafka.Consumer):
    """Faust's consumer with three changes to committing.

    - The last commit before a rebalance or a stop always happens: Faust's ``commit`` returns without
      committing when another commit is under way (the periodic one), and a transaction left open over a
      rebalance was committed later with records whose messages the next owner processed again.
    - A partition whose transaction failed (``Transactions.failed``) is not recorded as committed, and the
      shell is told (``on_failed``): it drops the partition's state and has the group rebalance.
    - An offset is committed up to the position after the last fetch when every record read has been
      acked: the records in between are transaction markers (or aborted records), and committing short of
      them left every partition's lag at 1 for ever.

    ``known`` holds the last offset this worker knows to be committed per partition (its own commits, or
    what the group had when it took the partition): the shell compares it with the group's after a
    rebalance, to tell state it may keep from state someone else has moved on.
    """

    on_failed: Any = None
    feeds: list[BatchFeed] = []  # noqa: RUF012 (set per transport by transport_for)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.known: dict[TP, int] = {}
        self.fetched_position: dict[TP, int] = {}  # position after the last fetch the drain loop finished
        self.seek_starts: dict[TP, int | None] = {}  # where each partition's fetching starts after a seek

    async def perform_seek(self) -> None:
        """Faust's seek to the committed offsets, also for partitions without one (to the log's start), and
        noting where each partition's fetching starts (``note_first_after_seek``)."""
        committed = await self.seek_to_committed()
        found = {tp: o if o else None for tp, o in committed.items()}
        # aiokafka seeks only to a committed offset above 0 and leaves the others where they are: after records
        # Faust dropped (fetched while the flow was stopped, e.g. at a rebalance) that skipped them for good:
        # a partition's first payment was lost at a handover (3 of 7 rolling-restart and SIGSTOP runs)
        fresh = [TopicPartition(tp.topic, tp.partition) for tp, o in found.items() if o is None]
        if fresh and self.app.conf.consumer_auto_offset_reset == "earliest":
            await self._thread.seek_to_beginning(*fresh)
        self._read_offset.update(found)
        self._committed_offset.update({tp: o for tp, o in found.items() if o is not None})
        self.seek_starts.clear()  # in place: the drain loop holds this dict
        self.seek_starts.update(found)

    def note_first_after_seek(self, tp: TP, start: int | None, offset: int) -> None:
        """The first record fetched after a seek to ``start`` is at ``offset``: the offsets in between hold
        no records (transaction markers, aborted or deleted records). With no committed offset, fetching
        began at the log's first record, so that record is where committing starts."""
        if start is None:
            self._committed_offset[tp] = offset
        elif offset > start:
            self._gap[tp].addi(start, offset)

    def _new_offset(self, tp: TP) -> int | None:
        """Faust's next offset to commit, except that the record at the committed offset must have been
        processed (acked) or be known to hold no record. Faust lets exactly that one record go unacked (and
        checks nothing when the committed offset is 0): a record the worker dropped there (its transaction
        failed, say) was committed over and lost (measured: the first payment of a partition, in 3 of 7
        rolling restarts and SIGSTOP runs)."""
        acked = self._acked[tp]
        committed = self._committed_offset[tp]
        if acked and committed is not None and min(acked) > committed and not self._gap[tp].at(committed):
            return None
        return super()._new_offset(tp)

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        """Finish and commit what was handed over before Faust forgets the partitions' acks: Faust drops
        them first and commits after, so the last transaction's offsets were never committed at a
        rebalance (it then committed later, with records whose messages the next owner processed again)."""
        self.fetched_position.clear()
        self.seek_starts.clear()
        for feed in self.feeds:
            feed.reset()
        if self.assignment() and not self.should_stop:
            self.stop_flow()
            await self.wait_empty()  # the handlers finish what they hold; commits, then ends transactions
        await super().on_partitions_revoked(revoked)

    async def commit_and_end_transactions(self) -> None:
        await reopen_transactions(self.app)
        while self._commit_fut is not None:  # let the commit under way finish, then commit what is left
            await self.maybe_wait_for_commit_to_finish()
        await self.commit(start_new_transaction=False)

    def _position_offsets(self, offsets: Mapping[TP, int]) -> dict[TP, int]:
        read, positions = self._read_offset, self.fetched_position
        out = dict(offsets)
        for tp, offset in offsets.items():
            pos = positions.get(tp)
            if pos is not None and pos > offset and read.get(tp) is not None and read[tp] + 1 == offset:
                out[tp] = pos
        return out

    async def _commit_tps(self, tps: Any, start_new_transaction: bool) -> bool:
        """Faust's commit, except that under exactly_once each partition group's offsets are taken under its
        transaction lock: taken before it, a flush that held the lock meanwhile put records of later messages
        into the transaction without their offsets (state committed ahead of its offsets: after a crash those
        messages were consumed again, caught by the event dedup, but a dead letter among them was repeated)."""
        if not self.in_transaction:
            return await super()._commit_tps(tps, start_new_transaction)
        locks = self.app.producer._trn_locks
        groups: dict[str, list[TP]] = {}
        for tp in tps:
            groups.setdefault(transactional_id(self.app, tp), []).append(tp)
        did = False
        for tid, group in groups.items():
            lock = locks.get(tid)
            async with lock if lock is not None else contextlib.nullcontext():
                offsets = self._filter_committable_offsets(group)
                if offsets:
                    did = await self._commit_offsets(offsets, start_new_transaction, locked=lock is not None) or did
        return did

    async def _commit_offsets(self, offsets: Mapping[TP, int], start_new_transaction: bool = True,
                              locked: bool = False) -> bool:  # fmt: skip
        assignment = self.assignment()
        committable = {tp: o for tp, o in self._position_offsets(offsets).items() if tp in assignment}
        if not committable:
            return False
        if self.in_transaction:
            transactions = self.transactions
            transactions.failed = set()
            await transactions.commit(committable, start_new_transaction=start_new_transaction, locked=locked)
            failed = transactions.failed
        else:
            await self.app.producer.flush()
            failed = set() if await self._commit(committable) else set(committable)
        done = {tp: o for tp, o in committable.items() if tp not in failed}
        self._committed_offset.update(done)
        self.known.update(done)
        self.app.monitor.on_tp_commit(done)
        if failed and self.in_transaction:
            for tp in failed:  # nothing of theirs counts as read or acked: they are consumed again
                self._acked.pop(tp, None)
                self._acked_index.pop(tp, None)
                self._gap.pop(tp, None)
            if self.on_failed is not None:
                self.on_failed(failed)
        return bool(done)
