"""What happens to one input message, shared by the Faust agents and ``stream-app replay``.

The engine validates, repartitions, fires due event-time timers, runs the core step and turns the
results into records (topic, key, value, partition): the user's new state for the state changelog and
the outputs. It never touches Kafka: the Faust shell sends the records in one transaction, replay writes
them to files. State lives behind a ``UserStore`` (the changelog-backed store, or a dict in replay) that
holds each user's state as the JSON bytes its changelog record carries: about a quarter of the memory of
decoded dicts, nothing to parse when a partition is recovered, and serialized once per update.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, Protocol

import orjson

from stream_app.core.events import EventLimits, InvalidEvent, parse_event
from stream_app.core.pipeline import (
    Config,
    Models,
    Outputs,
    UserState,
    advance,
    next_due_ms,
    process,
    set_consent,
    stored_due_ms,
)
from stream_app.core.policy import Campaign, held_at, suppression_code
from stream_app.core.propensity import PropensityScorer
from stream_app.core.segments import SegmentModel
from stream_app.core.timers import Timers, partition_for
from stream_app.core.trainer import SEGMENTS_KEY, Trainer, check_params, parse_model_input
from stream_app.core.uplift import UpliftScorer
from stream_app.metrics import Metrics
from stream_app.settings import Settings
from stream_app.wire import (
    cancellation_record,
    dead_letter,
    dead_letter_key,
    decision_record,
    label_record,
    parse_consent,
    sample_record,
)

log = logging.getLogger(__name__)

Record = tuple[str, bytes | None, bytes | None, int | None]  # topic, key, value, partition


ERASED = b'{"erased":true}'  # an erased user's state: no personal data, pushes stay suppressed


def encode_state(state: UserState, watermark: int | None = None) -> bytes:
    """A user's state as the JSON bytes the store holds and its changelog record carries, with its
    partition's event-time watermark when it was written (``w``): a worker that takes the partition over
    resumes the watermark from the newest of them, so its timers fire at the events replay fires them at
    (restarting from the first event it read, a late one left a timer unfired: measured 1 of ~1,640
    decisions missing after a handover, 8 of ~27,000 at full size).

    Copied to its own size: the bytes orjson returns keep their initial ~4 KB buffer (measured with
    tracemalloc: 8 KB per held 325-byte state, 777 MB for 100k users), which a long-lived store must not.

    >>> encode_state(UserState(None, True, [], 0), 1700000000000)  # an opt-out that outlived its profile
    b'{"p":null,"o":true,"l":0,"q":[]}'
    """
    d = state.to_dict()
    if watermark is not None and state.profile is not None:  # a kept opt-out alone says nothing of when
        d["w"] = watermark
    return memoryview(orjson.dumps(d)).tobytes()


class UserStore(Protocol):
    """Users' states as JSON bytes (``UserState.to_dict``, or ``ERASED``); ``put`` queues the changelog record."""

    def get(self, key: str) -> bytes | None: ...
    def put(self, batch: list[Record], key: str, value: bytes | None, partition: int) -> None: ...
    def items(self) -> Any: ...


class Message(NamedTuple):
    """An input message as the engine needs it (a Kafka record, or a line of a replay file); immutable."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None  # None: a tombstone
    timestamp_ms: int  # the Kafka record time: the reference for event-time bounds


def build_trainer(settings: Settings, campaigns: tuple[Campaign, ...]) -> Trainer:
    """The trainer as the settings configure it (the worker and replay alike, so replay decides as workers do)."""
    return Trainer(campaigns, settings.segments_k, settings.model_publish_interval_ms,
                   gate_margin=settings.model_gate_margin, gate_window=settings.model_gate_window,
                   gate_min_labels=settings.model_gate_min_labels,
                   decision_order=settings.trainer_decision_order)  # fmt: skip


@dataclass
class ModelStore:
    """The models this worker scores with; replaced whole (copy on write) when a new version arrives."""

    current: Models

    def apply(self, key: str, params: dict) -> str | None:
        """Install one published model version (older or equal versions are ignored). Returns why a record
        cannot be installed (a bounded code; it is then ignored), None if it was installed or is not newer."""
        if (why := check_params(key, params)) is not None:
            return why
        cur = self.current
        if key == SEGMENTS_KEY:
            if params["version"] > cur.segments.version and params.get("schema") == cur.segments.schema:
                self.current = Models(SegmentModel.from_params(params), cur.scorers, cur.controls, cur.uplifts)
        elif key.startswith("uplift:"):
            old_uplift = cur.uplifts.get(params["campaign"])
            if params.get("kind") != "uplift_learner":
                return  # an older trainer's per-segment counts: this worker scores with the uplift learner only
            if old_uplift is None or params["version"] > old_uplift.version:
                uplifts = {**cur.uplifts, params["campaign"]: UpliftScorer.from_params(params)}
                self.current = Models(cur.segments, cur.scorers, cur.controls, uplifts)
        elif key.startswith(("propensity:", "control:")):
            control = key.startswith("control:")
            table = cur.controls if control else cur.scorers
            old = table.get(params["campaign"])
            if old is None or params["version"] > old.version:
                new = {**table, params["campaign"]: PropensityScorer.from_params(params)}
                self.current = Models(cur.segments, cur.scorers if control else new, new if control else cur.controls,
                                      cur.uplifts)  # fmt: skip
        return None

    def apply_record(self, key: bytes | None, value: bytes | None) -> str | None:
        """One record of the model-params topic as it comes (any bytes): installed, or the reason it is not."""
        try:
            name = key.decode() if key is not None else None
        except UnicodeDecodeError:
            return "bad_utf8"
        if value is None:
            return "tombstone"
        try:
            params = orjson.loads(value)
        except orjson.JSONDecodeError:
            return "malformed_json"
        try:
            return self.apply(name, params)  # type: ignore[arg-type]
        except Exception as exc:
            log.warning("model version %s not installed: %s", name, type(exc).__name__)
            return "internal_error"


class CorruptState(ValueError):
    """A stored state that does not decode (a foreign or damaged changelog record)."""


def decode_state(stored: bytes | None) -> UserState | None:
    """A stored state (``UserState.to_dict`` as JSON bytes) as a value; ``CorruptState`` if it is not one."""
    if stored is None:
        return None
    try:
        return UserState.from_dict(orjson.loads(stored))
    except (orjson.JSONDecodeError, LookupError, TypeError, ValueError, AttributeError) as exc:
        raise CorruptState(type(exc).__name__) from None


class Work:
    """The effects of one record, held back until the record has been applied without an exception.

    State writes, output records and metric increments are queued here and reach the store, the batch and
    the metrics only at ``commit``: a record that raises halfway leaves no half-applied state behind, and
    it is dead-lettered instead (``Engine.internal_error``). Reads see the record's own writes.
    """

    __slots__ = ("effects", "out", "rejected", "users", "writes")

    def __init__(self, users: UserStore) -> None:
        self.users = users
        self.writes: dict[str, tuple[bytes | None, int]] = {}
        self.out: list[Record] = []
        self.effects: list[Callable[[], Any]] = []
        self.rejected: list[tuple[str, str]] = []  # (kind, code) of the dead letters written to ``out``

    def get(self, key: str) -> bytes | None:
        w = self.writes.get(key)
        return w[0] if w is not None else self.users.get(key)

    def put(self, key: str, value: bytes | None, partition: int) -> None:
        self.writes[key] = (value, partition)  # one record per key and record: its latest value

    def commit(self, batch: list[Record]) -> None:
        for key, (value, partition) in self.writes.items():
            self.users.put(batch, key, value, partition)
        batch.extend(self.out)
        for effect in self.effects:
            effect()


@dataclass
class Engine:
    settings: Settings
    config: Config
    users: UserStore
    models: ModelStore
    metrics: Metrics
    timers: Timers = field(default_factory=Timers)
    index_fresh: bool = False  # the timer index matches the store only until the next rebalance
    # the worker's clock (epoch ms), passed in by the shell: event time may not lead it by more than the skew,
    # nor the watermark by more than its lead. None (replay): the record times are the only reference.
    clock: Callable[[], int] | None = None
    # True (the worker): the shell counts a dead letter (``counted``) only once the batch holding it was sent
    count_on_write: bool = False

    def __post_init__(self) -> None:
        s = self.settings
        self.limits = EventLimits(max_bytes=s.max_event_bytes, max_future_ms=s.max_future_skew_s * 1000,
                                  max_past_ms=s.max_past_skew_s * 1000)  # fmt: skip
        self.nparts = s.topic_partitions
        self.by_type = dict(zip(("click", "like", "payment"), s.input_topics, strict=True))
        self.lead_ms = s.watermark_max_lead_s * 1000
        if s.consent_retention_s and self.config.consent_retention_ms is None:
            self.config = replace(self.config, consent_retention_ms=s.consent_retention_s * 1000)
        m = self.metrics
        self.rejected_counters = {"event": m.events_rejected, "consent": m.consent_rejected,
                                  "model_input": m.model_inputs_rejected}  # fmt: skip
        self.kind_of = {s.consent_topic: "consent", s.model_inputs_topic: "model_input"}

    # -- entry points: one record each; never raise -----------------------------------------------------------------
    def apply(self, batch: list[Record], msg: Message) -> tuple[str, str]:
        """One record of an input or the consent topic, whichever it is (one path, one order per partition);
        dead-lettered, never raised, if applying it fails."""
        if msg.topic == self.settings.consent_topic:
            return self.on_consent(batch, msg)
        return self.on_event(batch, msg)

    def on_event(self, batch: list[Record], msg: Message) -> tuple[str, str]:
        """One input event message: validate, repartition, fire due timers, apply the event."""
        return self._run(self._event, batch, msg, "event")

    def on_consent(self, batch: list[Record], msg: Message) -> tuple[str, str]:
        """Opt-out wins at once (also before the user's first event); erase keeps only a suppression marker.
        Pushes of the user still waiting for their send time (quiet hours) are cancelled on push-decisions."""
        return self._run(self._consent, batch, msg, "consent")

    def on_model_input(self, batch: list[Record], msg: Message, trainer: Trainer) -> tuple[str, ...] | None:
        """One trainer input: learned from (the keys of the models it changed), or dead-lettered (None)."""
        work = Work(self.users)
        try:
            record = parse_model_input(msg.value)
        except InvalidEvent as bad:
            self.reject(work, msg, bad, "model_input")
            self._commit(work, batch)
            return None
        try:
            keys = trainer.learn(record)
        except Exception as exc:
            self.internal_error(batch, msg, exc, "model_input")
            return None
        return keys

    def _run(self, step: Callable[[Work, Message], tuple[str, str]], batch: list[Record], msg: Message,
             kind: str) -> tuple[str, str]:  # fmt: skip
        work = Work(self.users)
        try:
            result = step(work, msg)
        except Exception as exc:
            self.index_fresh = False  # the failed step may have popped timers: rebuild them from the store
            return self.internal_error(batch, msg, exc, kind)
        self._commit(work, batch)
        return result

    def _commit(self, work: Work, batch: list[Record]) -> None:
        work.commit(batch)
        if not self.count_on_write:
            for kind, code in work.rejected:
                self.rejected_counters[kind][code].inc()

    def internal_error(self, batch: list[Record], msg: Message, exc: BaseException,
                       kind: str = "event") -> tuple[str, str]:  # fmt: skip
        """Dead-letter a record whose handling raised: code ``internal_error`` with the exception's type (never
        its message or stack, which may quote the record), and count it; the stream goes on. The shell calls
        this too, for an exception raised around the engine while handling one record."""
        name = type(exc).__name__
        log.error("internal error on %s[%s]@%s: %s", msg.topic, msg.partition, msg.offset, name, exc_info=exc)
        self.metrics.internal_errors.inc()
        work = Work(self.users)
        reason = f"{name} while applying the record: a defect, kept here to be replayed once fixed"
        self.reject(work, msg, InvalidEvent("internal_error", reason), kind, exception=name)
        self._commit(work, batch)
        return ("dead_letter", "internal_error")

    def counted(self, topic: str, code: str) -> None:
        """Count one dead letter of a record of ``topic`` (``count_on_write``: the shell calls this once the
        records holding the dead letter were sent; a batch that failed is redelivered and counted then)."""
        self.rejected_counters[self.kind_of.get(topic, "event")][code].inc()

    # -- the steps ----------------------------------------------------------------------------------------------------
    def _event(self, work: Work, msg: Message) -> tuple[str, str]:
        m, s = self.metrics, self.settings
        try:
            event = parse_event(msg.value, self.limits, ref_ms=msg.timestamp_ms)
            now = self.clock() if self.clock is not None else None
            if now is not None and event.ts_ms > now + self.limits.max_future_ms:
                ahead = (event.ts_ms - now) / 86_400_000
                limit = self.limits.max_future_ms / 86_400_000
                raise InvalidEvent(
                    "ts_out_of_range", f"ts is {ahead:+.1f} days from the worker's clock; at most +{limit:g}"
                )
        except InvalidEvent as bad:
            return self.reject(work, msg, bad, "event")
        home = partition_for(event.user_id, self.nparts)
        if msg.partition != home:  # keyed otherwise: move it to its user's partition, process it there
            topic = msg.topic if msg.topic in s.input_topics else self.by_type[event.type]
            work.out.append((topic, event.user_id.encode(), msg.value, home))
            work.effects.append(m.repartitioned.inc)
            return ("repartitioned", event.type)
        if not self.index_fresh:
            self.rebuild_timers()
        self.fire_timers(work, home, self.watermark_bound(event.ts_ms, msg.timestamp_ms, now))
        stored = work.get(event.user_id)
        if stored == ERASED:
            work.effects.append(m.suppressed_erased.inc)
            return ("erased", event.type)
        try:
            state = decode_state(stored)
        except CorruptState as bad:
            return self.reject(work, msg, InvalidEvent("corrupt_state", f"the user's stored state does not decode "
                                                       f"({bad}); the event is kept here"), "event")  # fmt: skip
        new, out = process(state, event, self.models.current, self.config)
        if out.duplicate:
            work.effects.append(m.duplicates_dropped.inc)
            return ("duplicate", event.type)
        self.store(work, event.user_id, new, home)
        self.collect(work, out, event.event_id, event.ts_ms)
        work.effects.append(m.events_consumed[event.type].inc)
        return ("applied", event.type)

    def watermark_bound(self, event_ms: int, record_ms: int, now_ms: int | None) -> int:
        """How far this event may move its partition's watermark: its own time, but no further than the record
        time (the broker's, or a producer's bounded by the topic's message.timestamp.after.max.ms) and the
        worker's clock allow, plus ``watermark_max_lead_s``. One record stamped a year ahead therefore cannot
        expire other users, close their label windows or fire their win-back decisions."""
        bound = min(event_ms, record_ms + self.lead_ms)
        return bound if now_ms is None else min(bound, now_ms + self.lead_ms)

    def _consent(self, work: Work, msg: Message) -> tuple[str, str]:
        try:
            user_id, action = parse_consent(msg.value, self.limits)
        except InvalidEvent as bad:
            return self.reject(work, msg, bad, "consent")
        home = partition_for(user_id, self.nparts)
        if msg.partition != home:  # consent must land where the user's state lives
            work.out.append((self.settings.consent_topic, user_id.encode(), msg.value, home))
            work.effects.append(self.metrics.repartitioned.inc)
            return ("repartitioned", action)
        stored = work.get(user_id)
        try:
            state = decode_state(stored) if stored != ERASED else None
        except CorruptState:
            state = None  # unreadable: the command still wins (an opt-out or erase must never be lost)
        if action in ("opt_out", "erase") and state is not None and any(p.action == "push" for p in state.pending):
            self.cancel_held(work, user_id, state, action, msg.timestamp_ms)
            # a cancelled push may never be sent: no label (neither outcome) is learned from it
            state = replace(state, pending=[p for p in state.pending if p.action != "push"])
        if action == "erase":
            work.put(user_id, ERASED, home)  # no personal data; stays suppressed
        elif stored != ERASED:
            new = set_consent(state, opted_out=action == "opt_out", at_ms=msg.timestamp_ms)
            if new is not None:
                work.put(user_id, encode_state(new), home)
            elif stored is not None:
                work.put(user_id, None, home)  # an opt-in of a user with nothing else stored: nothing to keep
        work.effects.append(self.metrics.consent[action].inc)
        return ("consent", action)

    def cancel_held(self, work: Work, user_id: str, state: UserState, action: str, at_ms: int) -> None:
        """A cancellation on push-decisions (and the audit) for every push of the user whose outcome is still open:
        held pushes wait for the end of quiet hours and push services must not send them after an opt-out.
        A cancellation of a push already sent is harmless (push services drop unknown or sent ids)."""
        s = self.settings
        for p in state.pending:
            if p.action == "push":
                record = cancellation_record(p.decision_id, user_id, p.campaign, action, at_ms)
                work.out.append((s.decisions_topic, user_id.encode(), record, None))
                work.out.append((s.audit_topic, user_id.encode(), record, None))
                work.effects.append(self.metrics.pushes_cancelled.inc)

    # -- pieces --------------------------------------------------------------------------------------------------------
    def reject(self, work: Work, msg: Message, bad: InvalidEvent, kind: str,
               exception: str | None = None) -> tuple[str, str]:  # fmt: skip
        value = dead_letter(msg.value, msg.topic, msg.partition, msg.offset, bad.code, bad.reason, exception, msg.key)
        work.out.append((self.settings.dead_letter_topic, dead_letter_key(msg.key), value, None))
        work.rejected.append((kind, bad.code))
        return ("dead_letter", bad.code)

    def collect(self, work: Work, out: Outputs, event_id: str, event_ms: int | None = None) -> None:
        """Queue a step's outputs: every decision to the audit, pushes to push services, model inputs."""
        m, s = self.metrics, self.settings
        batch, effects = work.out, work.effects
        for d in out.decisions:
            record = decision_record(d)
            key = d.user_id.encode()
            batch.append((s.audit_topic, key, record, None))
            if d.action == "push":
                batch.append((s.decisions_topic, key, record, None))
            effects.append(m.decisions[(d.campaign, d.action)].inc)
            if (code := suppression_code(d)) is not None:
                effects.append(m.suppressions[(d.campaign, code)].inc)
            elif (when := held_at(d)) is not None:
                effects.append(m.pushes_held[(d.campaign, when)].inc)
        if event_ms is not None and out.decisions:
            effects.append(lambda: m.event_to_decision_seconds.observe(max(0.0, time.time() - event_ms / 1000)))
        for name in out.ineligible:
            effects.append(m.ineligible[(name,)].inc)
        for label in out.labels:
            batch.append((s.model_inputs_topic, label.campaign.encode(), label_record(label), None))
            effects.append(m.labels[(label.campaign, label.converted)].inc)
        if out.segment_sample is not None:
            batch.append((s.model_inputs_topic, b"segments", sample_record(out.segment_sample), None))

    def rebuild_timers(self, partitions: set[int] | None = None) -> None:
        """Schedule every user this worker holds (default), or only those of ``partitions`` (just recovered:
        a rebalance that keeps a partition keeps its timers and its watermark). A state that does not decode
        is skipped here (its user's next event is dead-lettered as corrupt_state)."""
        if partitions is None:
            self.timers.clear()
        else:
            self.timers.drop(partitions)
        watermarks: dict[int, int] = {}
        for user_id, stored in self.users.items():
            if stored is not None and stored != ERASED:
                p = partition_for(user_id, self.nparts)
                if partitions is None or p in partitions:
                    try:
                        d = orjson.loads(stored)
                        due = stored_due_ms(d, self.config)
                    except (orjson.JSONDecodeError, LookupError, TypeError, ValueError, AttributeError):
                        continue
                    self.timers.schedule(p, user_id, due)
                    if isinstance(w := d.get("w"), int) and w > watermarks.get(p, w - 1):
                        watermarks[p] = w
        limit = self.clock() + self.lead_ms if self.clock is not None else None  # as an event's bound
        for p, w in watermarks.items():  # where the partition's event time was when its state was written
            self.timers.advance(p, w if limit is None else min(w, limit))
        self.index_fresh = True

    def store(self, work: Work, user_id: str, state: UserState | None, partition: int) -> None:
        if state is None:
            work.put(user_id, None, partition)  # expired: a tombstone in the changelog
            return
        work.put(user_id, encode_state(state, self.timers.watermarks.get(partition)), partition)
        self.timers.schedule(partition, user_id, next_due_ms(state, self.config))

    def fire_timers(self, work: Work, partition: int, event_ms: int) -> None:
        """Tick every user of this partition whose timer the partition's event-time watermark passed."""
        watermark = self.timers.advance(partition, event_ms)
        for user_id in self.timers.pop_due(partition):
            stored = work.get(user_id)
            if stored is None or stored == ERASED:
                continue
            try:
                state = decode_state(stored)
            except CorruptState:
                continue  # nothing to tick; its user's next event says so
            new, out = advance(state, user_id, watermark, self.models.current, self.config)
            self.store(work, user_id, new, partition)
            self.collect(work, out, user_id)
            work.effects.append(self.metrics.timers_fired.inc)


__all__ = ["ERASED", "Engine", "Message", "ModelStore", "Models", "Record", "UserStore", "Work", "decode_state"]
