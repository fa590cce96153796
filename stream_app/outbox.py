"""Sending the effects of input messages: in their source partition's transaction, or delivered before an ack.

The promise (docs/delivery.md): every record a message causes (state changelog records, decisions, audit,
dead letters, model inputs) is committed together with that message's offset, or not at all. Three pieces:

- ``send_records`` builds record batches directly and returns their delivery futures (a record that
  cannot be delivered must never be acked over);
- ``Outbox`` sends one source partition's records and acks its messages under that partition's
  transaction lock, so no commit can take the records without the offsets;
- ``Transactions`` replaces Faust 0.15's transaction manager: a commit first checks every delivery of
  the transaction, a failed commit is aborted and reported (never a crash, never a silent loss), every
  transaction is ended before a rebalance goes on, and every rebalance starts fresh producers (a worker
  that gets back a partition it had before never writes through a producer another worker has fenced).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import faust
from aiokafka import AIOKafkaProducer
from aiokafka.producer.message_accumulator import BatchBuilder
from faust.transport.consumer import TransactionManager
from faust.types import TP

from stream_app.engine import Record

log = logging.getLogger(__name__)

BATCH_BYTES = 256 * 1024  # per record batch built by send_records: below brokers' default 1 MB message limit
MAX_RECORD_BYTES = 900 * 1024  # one record (key + value) larger than this is refused before it reaches a producer


class RecordTooLarge(ValueError):
    """A record the broker would refuse; sent, it would poison its partition's idempotent producer."""


async def send_records(producer: AIOKafkaProducer, records: list[Record]) -> list[asyncio.Future]:
    """Send ``records`` in order per partition, as one record batch per topic-partition (more if full);
    return the batches' delivery futures.

    aiokafka's ``send`` costs about 9 µs per record in Python (a future per record, metadata and transaction
    checks, the accumulator): 9% of the worker's event loop at two records per event. Here the records go
    into batches built directly (aiokafka's C batch builder) and each batch is handed over closed, so it is
    sent at the sender's next turn instead of lingering. Partitions are chosen by the producer's partitioner,
    as ``send`` would. A record above ``MAX_RECORD_BYTES`` raises ``RecordTooLarge`` before anything is
    sent: the broker would refuse it, and a refused batch leaves the idempotent producer's sequence numbers
    broken for every later batch of that partition (measured: OutOfOrderSequenceNumber on each of them).
    """
    for _topic, key, value, _partition in records:
        if len(key or b"") + len(value or b"") > MAX_RECORD_BYTES:
            raise RecordTooLarge(f"a record of {len(key or b'') + len(value or b'')} bytes for {_topic}")
    builders: dict[tuple[str, int], BatchBuilder] = {}
    known: set[str] = set()
    futures: list[asyncio.Future] = []
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
            futures.append(await producer.send_batch(builder, topic, partition=partition))
            builder = builders[(topic, partition)] = new_builder()
            builder.append(timestamp=None, key=key, value=value)  # a batch's first record always fits
    for (topic, partition), builder in builders.items():
        builder.close()
        futures.append(await producer.send_batch(builder, topic, partition=partition))
    return futures


def transactional_id(app: faust.App, tp: TP) -> str:
    """The transactional id whose producer carries the effects of ``tp``'s messages. Faust keys it by
    co-partitioned topic group and partition, so a user's clicks, likes, payments and consent commands share
    one producer: their records keep processing order, and one transaction commits their offsets together."""
    return f"{app.conf.id}-{app.assignor.group_for_topic(tp.topic)}-{tp.partition}"


@dataclass
class Outbox:
    """Writes all effects of input messages (state changelog records and outputs) and acks the messages.

    Faust 0.15's exactly_once is not enough on its own: (1) it picks a transactional producer by the
    *destination* topic and partition, so for topics the app does not consume (push-decisions, audit, dead
    letters, model-params) it sends outside any transaction, and for another partition (model-inputs, a
    repartitioned event) it fails unless this worker owns that partition; (2) a commit can run between a
    message's records being sent and the message being acked, and commit the records without the offset.
    Here the records of a source partition's messages are sent by that partition's transactional producer
    and the messages are acked while holding that producer's lock, so a commit takes both or neither.

    Under at_least_once the records go through the plain producer and a message is acked only once its
    records are delivered (a failed delivery leaves it unacked: it is consumed again, never skipped).

    ``on_failure(tps, exc)`` is told about source partitions whose effects could not be sent: their
    messages stay unacked and their in-memory state is no longer what Kafka holds (the shell drops it and
    has the group rebalance). A worker never crashes for it.

    ``flush(..., done=f)`` calls ``f`` once the records are durable: when their transaction commits
    (exactly_once) or when they are delivered (at_least_once); never for records that were not (what is
    counted as written, e.g. dead letters, is then what Kafka holds).
    """

    app: faust.App
    on_failure: Callable[[set[TP], BaseException], None] = lambda tps, exc: None
    pending: dict[str, list[asyncio.Future]] = field(default_factory=lambda: defaultdict(list))
    done: dict[str, list[Callable[[], Any]]] = field(default_factory=lambda: defaultdict(list))  # at commit
    _tasks: set[asyncio.Task] = field(default_factory=set)

    def route(self, tp: TP) -> str | None:
        """The transactional id for ``tp``'s effects (None: the plain producer)."""
        return transactional_id(self.app, tp) if self.app.in_transaction else None

    async def flush(self, records: list[Record], tp: TP | None = None, ack: Iterable[Any] = (),
                    done: Callable[[], Any] | None = None) -> bool:  # fmt: skip
        """Send ``records``, the effects of messages ``ack`` of source partition ``tp`` (default: the
        current event's), and ack those messages; False (nothing acked) if they could not be sent."""
        ack = list(ack)
        producer = self.app.producer
        failing = {m.tp for m in ack}  # a failure drops the effects of every source partition acked here
        if tp is None and self.app.in_transaction and (event := faust.current_event()) is not None:
            tp = event.message.tp
        if tp is None or not self.app.in_transaction:
            return await self._send_then_ack(records, ack, tp, done)
        tid = transactional_id(self.app, tp)
        transactional = producer._transaction_producers.get(tid)  # Faust's per-partition producer
        lock = producer._trn_locks.get(tid)
        failing.add(tp)
        if transactional is None or lock is None:
            return self._failed(failing, ack, RuntimeError(f"no transactional producer {tid} for {tp}"))
        async with lock:
            if producer._transaction_producers.get(tid) is not transactional:  # replaced while we waited
                return self._failed(failing, ack, RuntimeError(f"transactional producer {tid} replaced"))
            try:
                if records:
                    self.pending[tid] += await send_records(transactional, records)
            except Exception as exc:  # e.g. fenced, or a refused record: this partition's transaction is lost
                log.warning("sending %d records for %s failed: %r", len(records), tp, exc)
                return self._failed(failing, ack, exc)
            for message in ack:  # under the lock: the next commit takes these offsets with these records
                self.app.consumer.ack(message)
            if done is not None:
                self.done[tid].append(done)
        return True

    def _failed(self, tps: set[TP], ack: list[Any], exc: BaseException) -> bool:
        """The effects of ``ack`` could not be sent: the shell drops ``tps``' state, and the messages stop
        counting as in flight (a rebalance or a stop waits for those; they are consumed again after it)."""
        self.on_failure(tps, exc)
        unacked = self.app.consumer._unacked_messages
        for message in ack:
            unacked.discard(message)
        return False

    async def _send_then_ack(self, records: list[Record], ack: list[Any], tp: TP | None,
                             done: Callable[[], Any] | None = None) -> bool:  # fmt: skip
        try:
            futures = await send_records(self.app.producer._ensure_producer(), records) if records else []
        except Exception as exc:
            log.warning("sending %d records for %s failed: %r", len(records), tp, exc)
            return self._failed({m.tp for m in ack} | ({tp} if tp is not None else set()), ack, exc)
        if not ack and done is None:
            return True
        if not futures:
            for message in ack:
                self.app.consumer.ack(message)
            if done is not None:
                done()
            return True
        # ack once delivered, without holding up the next batch (Faust commits only acked offsets, in order)
        task = asyncio.ensure_future(self._ack_when_delivered(futures, ack, tp, done))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _ack_when_delivered(self, futures: list[asyncio.Future], ack: list[Any], tp: TP | None,
                                  done: Callable[[], Any] | None = None) -> None:  # fmt: skip
        try:
            await asyncio.gather(*futures)
        except Exception as exc:
            log.warning("delivery of %s's records failed, %d messages stay unacked: %r", tp, len(ack), exc)
            self._failed({m.tp for m in ack}, ack, exc)
            return
        for message in ack:
            self.app.consumer.ack(message)
        if done is not None:
            done()


class Transactions(TransactionManager):
    """Faust's per-partition transaction manager, made safe at its edges (see the module docstring).

    ``outbox`` is set by the shell; ``failed`` holds the source partitions of transactions that were
    aborted since the shell last looked (their in-memory state and acks must be dropped).
    """

    outbox: Outbox | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.failed: set[TP] = set()

    def _pending(self, tid: str) -> list[asyncio.Future]:
        """Take ``tid``'s undelivered futures; its ``done`` callbacks are dropped (the caller commits and runs
        what it took with ``_done`` first, or aborts)."""
        if self.outbox is None:
            return []
        self.outbox.done.pop(tid, None)
        futures = self.outbox.pending.pop(tid, [])
        for future in futures:  # a dropped one's error (fenced, aborted) is expected: never "never retrieved"
            future.add_done_callback(_retrieve)
        return futures

    def _done(self, tid: str) -> list[Callable[[], Any]]:
        return self.outbox.done.pop(tid, []) if self.outbox is not None else []

    async def commit(self, offsets: Mapping[TP, int], start_new_transaction: bool = True,
                     locked: bool = False) -> bool:  # fmt: skip
        """Commit each partition group's transaction with its offsets; a group whose records were not all
        delivered, or whose commit fails, is aborted and its partitions reported in ``failed``. ``locked``:
        the caller holds the groups' locks (and computed the offsets under them)."""
        producer = self.producer
        by_tid: dict[str, dict[TP, int]] = defaultdict(dict)
        for tp, offset in offsets.items():
            by_tid[transactional_id(self.app, tp)][tp] = offset
        ok = True
        for tid, tid_offsets in by_tid.items():
            lock = producer._trn_locks.get(tid)
            transactional = producer._transaction_producers.get(tid)
            if lock is None or transactional is None:
                self._fail(tid_offsets, RuntimeError(f"no transactional producer {tid}"))
                ok = False
                continue
            async with contextlib.nullcontext() if locked else lock:
                ok = await self._commit_one(tid, transactional, tid_offsets, start_new_transaction) and ok
        return ok

    async def _commit_one(self, tid: str, transactional: AIOKafkaProducer, offsets: Mapping[TP, int],
                          start_new_transaction: bool) -> bool:  # fmt: skip
        done, committed = self._done(tid), False  # run once committed; dropped if it is aborted
        try:
            if pending := self._pending(tid):
                await asyncio.gather(*pending)  # a record that was not delivered fails the commit
            await transactional.send_offsets_to_transaction(offsets, self.app.conf.id)
            await transactional.commit_transaction()
            committed = True
            if start_new_transaction:
                await transactional.begin_transaction()
        except Exception as exc:
            await self._abandon(tid, transactional)
            self._fail(offsets, exc)
        if committed:
            for callback in done:
                callback()
        return committed

    def _fail(self, tps: Iterable[TP], exc: BaseException) -> None:
        tps = set(tps)
        log.warning("transaction for %s not committed, its effects are dropped: %r", sorted(tps), exc)
        self.failed |= tps
        if self.outbox is not None:
            self.outbox.on_failure(tps, exc)

    async def _abandon(self, tid: str, transactional: AIOKafkaProducer) -> None:
        """Abort ``tid``'s open transaction; a producer that cannot (fenced, broken) is stopped and dropped,
        and the partition gets a fresh one at the next rebalance."""
        self._pending(tid)
        try:
            if transactional._txn_manager.is_in_transaction():
                await transactional.abort_transaction()
            await transactional.begin_transaction()
        except Exception as exc:
            log.info("transactional producer %s dropped: %r", tid, exc)
            self.producer._transaction_producers.pop(tid, None)
            with contextlib.suppress(Exception):
                await transactional.stop()

    async def end_all(self) -> None:
        """End every open transaction before the group moves partitions. The consumer has just committed
        every acked offset, so a transaction that still holds records holds effects whose offsets are not
        in it: it is aborted (committing it would apply those messages twice) and its partitions reported."""
        producer = self.producer
        for tid, transactional in list(producer._transaction_producers.items()):
            async with producer._trn_locks[tid]:
                pending = self._pending(tid)
                try:
                    if transactional._txn_manager.is_in_transaction():
                        await transactional.abort_transaction()
                except Exception as exc:
                    log.info("transactional producer %s could not abort: %r", tid, exc)
                if pending:
                    partitions = {tp for tp in self.consumer.assignment() if transactional_id(self.app, tp) == tid}
                    self._fail(partitions, RuntimeError(f"{len(pending)} batches sent after the last commit"))

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        await self.producer.flush()
        await self.end_all()

    async def on_rebalance(self, assigned: set[TP], revoked: set[TP], newly_assigned: set[TP]) -> None:
        """Fresh producers for every assigned partition group: initialising one fences any other instance
        of it (a zombie worker), and a producer this worker kept could have been fenced meanwhile (it paused
        beyond the session timeout, another worker took its partitions, then it got them back)."""
        producer = self.producer
        for tid in list(producer._transaction_producers):
            transactional = producer._transaction_producers.pop(tid)
            with contextlib.suppress(Exception):
                await transactional.stop()
        tids = sorted(self._tps_to_transactional_ids(assigned))
        if tids:
            log.info("starting %d transactional producers", len(tids))
            await asyncio.gather(*(producer.begin_transaction(tid) for tid in tids))


FENCED = ("ProducerFenced", "InvalidProducerEpoch", "TransactionalIdAuthorizationFailed")


def quiet_fenced_futures(loop: asyncio.AbstractEventLoop) -> None:
    """A fenced transactional producer (a zombie worker's, after another worker took its partitions) fails
    futures inside aiokafka that nobody awaits (its transaction waiter, replaced or dropped with the
    producer): asyncio reports each as an ERROR with a traceback when it is collected. The failure is
    expected and already handled (the transaction is aborted and reported, the producer replaced), so those
    reports are logged as one INFO line; every other unhandled loop error keeps asyncio's handling."""
    previous = loop.get_exception_handler()

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if context.get("message") == "Future exception was never retrieved" and type(exc).__name__ in FENCED:
            log.info("a fenced producer's future failed unobserved: %r", exc)
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handle)


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()
