"""The worker's agents: thin adapters that decode, load state, step the engine, send and observe.

Events and consent commands of one user partition go through one batch handler in fetch order, so an
opt-out or an erase and that user's events are applied in one order on one path (a separate consent task
once wrote the old profile after ``ERASED``). Model inputs go through the trainer's handler. State is
held per partition and kept across rebalances for the partitions a worker keeps, unless the group's
committed offsets show that someone else moved them on, or one of their transactions failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import faust
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from faust.types import TP

from stream_app.core.segments import SegmentModel, drift
from stream_app.core.trainer import SEGMENTS_KEY, Trainer, check_state
from stream_app.engine import Engine, Message, ModelStore, Record
from stream_app.kafka_io import client_kwargs, partitions_of
from stream_app.metrics import Metrics
from stream_app.outbox import Outbox
from stream_app.settings import Settings
from stream_app.store import ChangelogStore

log = logging.getLogger(__name__)


def message_of(msg: Any) -> Message:
    """Faust's consumed message as the engine's ``Message``."""
    return Message(msg.topic, msg.partition, msg.offset, msg.key, msg.value, int(msg.timestamp * 1000))


@dataclass
class Worker:
    """What one worker holds and does; the Faust agents and tasks in ``app.create_app`` call into it."""

    app: faust.App
    settings: Settings
    engine: Engine
    users: ChangelogStore
    trainer: Trainer
    trainer_state: ChangelogStore
    models: ModelStore
    metrics: Metrics
    outbox: Outbox
    lost: set[TP] = field(default_factory=set)  # revoked and not assigned again: their buffered messages wait
    dirty: set[TP] = field(default_factory=set)  # a transaction of theirs failed: skipped until the rebalance
    trainer_fresh: bool = False  # the trainer's in-memory state matches its changelog only while it owns it
    to_check: set[TP] = field(default_factory=set)  # the last assignment, until check_assignment has run
    _tasks: set[asyncio.Task] = field(default_factory=set)
    models_caught_up: bool = False  # the model versions published before this worker started are read (/readyz)
    models_detail: str = "reading model-params"
    loading: asyncio.Lock = field(default_factory=asyncio.Lock)  # the readiness timer and batches both load

    def __post_init__(self) -> None:
        self.consent_topic = self.settings.consent_topic
        self.user_topics = {*self.settings.input_topics, self.consent_topic}
        self.outbox.on_failure = self.on_failure

    # -- ownership ------------------------------------------------------------------------------------
    def on_failure(self, tps: set[TP], exc: BaseException) -> None:
        """Effects of ``tps``' messages could not be committed: their in-memory state is not what Kafka
        holds. Their messages are skipped until the group has rebalanced (asked for here); then their state
        is loaded again and they are consumed again from the committed offsets. The worker keeps running."""
        if not tps:
            return
        new = set(tps) - self.dirty
        if not new:
            return
        self.dirty |= new
        self.metrics.transactions_failed.inc(len(new))
        log.warning("partitions %s: effects not committed (%s); reloading them after a rebalance",
                    sorted(new), type(exc).__name__)  # fmt: skip
        task = asyncio.ensure_future(self.request_rebalance())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def request_rebalance(self) -> None:
        thread = self.app.consumer._thread

        async def rejoin() -> None:
            thread._ensure_consumer()._coordinator.request_rejoin()

        try:
            await thread.call_thread(rejoin)
        except Exception as exc:  # the group rebalances anyway when the coordinator is back
            log.warning("could not ask the group to rebalance: %r", exc)

    def on_revoked(self, _sender: Any, revoked: set[TP], **__: Any) -> None:
        self.lost.update(revoked)

    def on_assigned(self, _sender: Any, assigned: set[TP], **__: Any) -> None:
        self.lost.difference_update(assigned)
        self.to_check = set(assigned)

    async def group_committed(self, tps: set[TP]) -> dict[TP, int]:
        """The group's committed offsets of ``tps`` (absent: none committed), asked of the coordinator."""
        thread = self.app.consumer._thread
        consumer = thread._ensure_consumer()
        wanted = [TopicPartition(tp.topic, tp.partition) for tp in tps]
        found = await thread.call_thread(consumer._coordinator.fetch_committed_offsets, wanted)
        return {TP(tp.topic, tp.partition): meta.offset for tp, meta in found.items() if meta.offset >= 0}

    async def check_assignment(self) -> None:
        """After a rebalance, keep the state of the partitions this worker keeps, unless it may be stale: a
        failed transaction, or a committed offset that is not the one this worker last knew (another worker
        processed them meanwhile: this one paused beyond the session timeout, say)."""
        assigned, self.to_check = self.to_check, set()
        consumer = self.app.consumer
        known: dict[TP, int] = consumer.known
        committed = await self.group_committed(assigned)
        stale = {tp.partition for tp in self.dirty}
        stale |= {tp.partition for tp in assigned if tp in known and committed.get(tp) != known[tp]}
        user_parts = {tp.partition for tp in assigned if tp.topic in self.user_topics}
        drop_users = (self.users.loaded - user_parts) | (stale & self.users.loaded)
        if drop_users:
            self.users.forget(drop_users)
            self.engine.timers.drop(drop_users)
        trainer_tp = TP(self.settings.model_inputs_topic, 0)
        if (
            trainer_tp not in assigned
            or trainer_tp in self.dirty
            or (trainer_tp in known and committed.get(trainer_tp) != known[trainer_tp])
        ):
            self.trainer_fresh = False
            self.trainer_state.forget()
        self.dirty.clear()
        known.clear()
        known.update(committed)  # what the group has committed now is what this worker knows
        kept = len(user_parts & self.users.loaded)
        log.info("assignment checked: %d user partitions kept loaded, %d to load", kept, len(user_parts) - kept)

    async def ensure_users(self) -> None:
        """Before a message: the assignment is checked, every user-keyed partition this worker owns is loaded
        (all at once, so the timer index sees every user), and newly loaded partitions' timers are indexed."""
        async with self.loading:
            await self._ensure_users()

    async def _ensure_users(self) -> None:
        if self.to_check:
            await self.check_assignment()
        owned = {tp.partition for tp in self.app.assignor.assigned_actives() if tp.topic in self.user_topics}
        new = owned - self.users.loaded
        if new:
            self.metrics.state_recovery_seconds.observe(await self.users.ensure(owned))
            self.engine.rebuild_timers(new)

    def owned(self, messages: list[Any], ack: bool, what: str) -> list[Any]:
        """The messages of partitions this worker still owns with fresh state. The others (revoked, or their
        state is being reloaded after a failed send) are consumed again after the rebalance: dropped from
        Faust's unacked set (``ack``), so a stop does not wait for them, and logged."""
        skip = self.lost | self.dirty
        if not skip or not (skipped := [msg for msg in messages if msg.tp in skip]):
            return messages
        if ack:
            unacked = self.app.consumer._unacked_messages
            for msg in skipped:
                unacked.discard(msg)
        spans: dict[TP, list[int]] = {}
        for msg in skipped:
            spans.setdefault(msg.tp, []).append(msg.offset)
        log.info(
            "skipped until the rebalance (%s): %d %s %s",
            "revoked" if skip & self.lost else "failed",
            len(skipped),
            what,
            {f"{tp.topic}[{tp.partition}]": f"{min(o)}..{max(o)}" for tp, o in spans.items()},
        )
        return [msg for msg in messages if msg.tp not in skip]

    # -- events and consent ---------------------------------------------------------------------------
    def apply(self, records: list[Record], msg: Message) -> tuple[str, str]:
        """One message through the engine (which dead-letters a record whose handling raises: code
        ``internal_error``, the exception's type only); the same here for anything raised around it."""
        try:
            return self.engine.apply(records, msg)
        except Exception as exc:
            kind = "consent" if msg.topic == self.consent_topic else "event"
            return self.engine.internal_error(records, msg, exc, kind)

    async def process_batch(self, messages: list[Any], ack: bool = True) -> list[tuple[str, str]]:
        """Events and consent commands -> user state -> decisions, labels, for a batch of input messages;
        sends each source partition's records and acks its messages in one step (``ack=False``: a Faust
        stream acks them) and returns the outcomes. One ownership check and one locked send per partition."""
        t0 = time.perf_counter()
        await self.ensure_users()
        # records in processing order per producer: a user's state records must reach the changelog in
        # the order they were computed, and all of one user's input partitions share one producer
        groups: dict[str | None, tuple[TP, list[Record], list[Any], list[tuple[str, str]]]] = {}
        group_of: dict[TP, tuple[TP, list[Record], list[Any], list[tuple[str, str]]]] = {}
        results = []
        for msg in self.owned(messages, ack, "events"):
            tp = msg.tp
            if (group := group_of.get(tp)) is None:
                key = self.outbox.route(tp)
                if key not in groups:
                    groups[key] = (tp, [], [], [])
                group = group_of[tp] = groups[key]
            result = self.apply(group[1], message_of(msg))
            group[2].append(msg)
            results.append(result)
            if result[0] == "dead_letter":
                group[3].append((tp.topic, result[1]))
                log.warning("dead-lettered %s[%s]@%s: %s", tp.topic, tp.partition, msg.offset, result[1])
        for tp, records, handled, dead in groups.values():
            # dead letters are counted once durable (committed, or delivered under at_least_once)
            done = (lambda dead=dead: [self.engine.counted(t, c) for t, c in dead]) if dead else None
            await self.outbox.flush(records, tp=tp, ack=handled if ack else (), done=done)
        if results:
            per_event = (time.perf_counter() - t0) / len(results)
            observe = self.metrics.processing_seconds.observe
            for result in results:
                if result[0] == "applied":
                    observe(per_event)
        return results

    # -- the trainer ----------------------------------------------------------------------------------
    async def train_batch(self, messages: list[Any], ack: bool = True) -> list[str | None]:
        """The single trainer: learn from each label or sample, persist learning state, publish versions;
        one locked send per batch. Acks as ``process_batch`` does. Returns each message's first model key."""
        m, settings, trainer, trainer_state = self.metrics, self.settings, self.trainer, self.trainer_state
        async with self.loading:  # a check under way (a batch of events started it) must finish first: until
            if self.to_check:  # it has, ``dirty`` still names the last generation's failures
                await self.check_assignment()
        messages = self.owned(messages, ack, "model inputs")
        if not messages:
            return []
        if not self.trainer_fresh:  # (re)gained the partition: continue from the persisted state
            await trainer_state.ensure({0})
            for key, params in list(trainer_state.items()):
                with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                    state = orjson.loads(params)
                    if (why := check_state(key, state)) is not None:  # a foreign record: start that model afresh
                        log.warning("trainer state %s not restored: %s", key, why)
                        continue
                    trainer.restore(key, state)
            if (why := trainer.restored()) is not None:
                log.warning("trainer state segments: %s", why)
            self.trainer_fresh = True
            for name in trainer.rejected:  # exported from 0: a dashboard shows "no refusals", not "no data"
                m.models_rejected[(name,)].inc(0)
        batch: list[Record] = []
        results: list[str | None] = []
        # models are persisted once per batch, not per input: a batch is acked only after its
        # records are sent (under exactly_once, in one transaction), so a crash mid-batch learns it again
        learned: set[str] = set()
        dead: list[str] = []
        for msg in messages:
            # checked, then learned from; a record of any other shape is dead-lettered with its reason
            keys = self.engine.on_model_input(batch, message_of(msg), trainer)
            if keys is None:
                log.warning("model input %s@%s dead-lettered", msg.partition, msg.offset)
                m.model_inputs_ignored.inc()
                dead.append(orjson.loads(batch[-1][2])["error_code"])
                results.append(None)
                continue
            learned.update(keys)
            refused = trainer.rejected
            for name, params in trainer.due(int(msg.timestamp * 1000)).items():
                # the changelog keeps the full learning state (posterior, buffered positives, the segment
                # ring), not the published view: a successor trainer resumes learning exactly
                learned.add(name)
                batch.append((settings.model_params_topic, name.encode(), orjson.dumps(params), None))
                m.models_published[(name,)].inc()
            for name, n in trainer.rejected.items():
                if n > refused[name]:  # the quality gate kept the served version (bounded: one per model key)
                    m.models_rejected[(name,)].inc(n - refused[name])
            results.append(keys[0] if keys else None)
        # after the batch's publications: the newest state of each key wins (segments: its core and changed chunks)
        for key, state in trainer.states(sorted(learned)):
            trainer_state.put(batch, key, orjson.dumps(state), 0)
        done = (lambda: [self.engine.counted(settings.model_inputs_topic, c) for c in dead]) if dead else None
        await self.outbox.flush(batch, tp=messages[-1].tp, ack=messages if ack else (), done=done)
        return results

    async def nudge_trainer(self, topic: str) -> None:
        """Publication rides on trainer input; when inputs pause, nudge the trainer so no learned label waits.

        A flush record is harmless if repeated or lost (the trainer ignores it beyond publishing what is due).
        """
        if self.trainer_fresh and self.trainer.dirty:
            # a plain send: inside the trainer's own open transaction it would wait for the trainer to commit
            await self.app.producer.send(topic, b"flush", b'{"kind": "flush"}', None, None, None)

    # -- models ---------------------------------------------------------------------------------------
    async def follow_models(self) -> None:
        """Every worker: read the compacted model-params topic from the start, then follow it. A record that
        is not a valid model version is ignored with a count: it must not stop any worker from starting."""
        settings = self.settings
        consumer = AIOKafkaConsumer(**client_kwargs(settings), enable_auto_commit=False, group_id=None,
                                    isolation_level="read_committed")  # fmt: skip
        await consumer.start()
        try:
            kw = client_kwargs(settings)
            while not (parts := await partitions_of(kw.pop("bootstrap_servers"), settings.model_params_topic, **kw)):
                kw = client_kwargs(settings)
                self.models_caught_up, self.models_detail = True, "no model-params topic yet: nothing to wait for"
                await asyncio.sleep(1.0)  # not created yet: the first publication will create it
            tps = [TopicPartition(settings.model_params_topic, p) for p in parts]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            started_at = await consumer.end_offsets(tps)  # read_committed: the last stable offsets
            while True:
                if not self.models_caught_up:
                    behind = sum([max(0, started_at[tp] - await consumer.position(tp)) for tp in tps])
                    self.models_caught_up = behind == 0
                    self.models_detail = f"{behind} model records behind the versions published before start"
                batch = await consumer.getmany(timeout_ms=500)
                for msgs in batch.values():
                    for msg in msgs:
                        self.apply_model(msg)
        finally:
            await consumer.stop()

    def apply_model(self, msg: Any) -> bool:
        """Install one model-params record if it is a valid, newer version; else count why not (every worker
        reads the topic, so a bad record is counted, not dead-lettered: one dead letter per worker otherwise)."""
        before = self.models.current.segments
        why = self.models.apply_record(msg.key, msg.value)  # never raises
        if why is not None:
            log.warning("model params @%s ignored: %s", msg.offset, why)
            self.metrics.model_params_ignored.inc()
            self.metrics.model_params_rejected[why].inc()
            return False
        self.observe_models(before)
        return True

    def observe_models(self, before: SegmentModel) -> None:
        m, cur = self.metrics, self.models.current
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

    def observe_state(self) -> None:
        m = self.metrics
        m.state_users.set(len(self.users))
        m.state_bytes.set(self.users.nbytes)
        m.timers_pending.set(len(self.engine.timers))
        for name, q in self.trainer.quality.items():  # exact AUC sorts a window: every few seconds
            for gauge, value in ((m.model_log_loss, q.log_loss), (m.model_auc, q.auc),
                                 (m.label_delay, q.mean_delay_s), (m.uplift, q.uplift)):  # fmt: skip
                if not math.isnan(value):
                    gauge[(name,)].set(value)
