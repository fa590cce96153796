"""What happens to one input message, shared by the Faust agents and ``stream-app replay``.

The engine validates, repartitions, fires due event-time timers, runs the core step and turns the
results into records (topic, key, value, partition): the user's new state for the state changelog and
the outputs. It never touches Kafka: the Faust shell sends the records in one transaction, replay writes
them to files. State lives behind a ``UserStore`` (the changelog-backed store, or a dict in replay) that
holds each user's state as the JSON bytes its changelog record carries: about a quarter of the memory of
decoded dicts, nothing to parse when a partition is recovered, and serialized once per update.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
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
from stream_app.core.policy import suppression_code
from stream_app.core.propensity import PropensityScorer
from stream_app.core.segments import SegmentModel
from stream_app.core.timers import Timers, partition_for
from stream_app.core.trainer import SEGMENTS_KEY
from stream_app.core.uplift import SegmentUplift
from stream_app.metrics import Metrics
from stream_app.settings import Settings
from stream_app.wire import dead_letter, decision_record, label_record, parse_consent, sample_record

Record = tuple[str, bytes | None, bytes | None, int | None]  # topic, key, value, partition


ERASED = b'{"erased":true}'  # an erased user's state: no personal data, pushes stay suppressed


def encode_state(state: UserState) -> bytes:
    """A user's state as the JSON bytes the store holds and its changelog record carries.

    Copied to its own size: the bytes orjson returns keep their initial ~4 KB buffer (measured with
    tracemalloc: 8 KB per held 325-byte state, 777 MB for 100k users), which a long-lived store must not.
    """
    return memoryview(orjson.dumps(state.to_dict())).tobytes()


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
    value: bytes
    timestamp_ms: int  # the Kafka record time: the reference for event-time bounds


@dataclass
class ModelStore:
    """The models this worker scores with; replaced whole (copy on write) when a new version arrives."""

    current: Models

    def apply(self, key: str, params: dict) -> None:
        """Install one published model version (older or equal versions are ignored)."""
        cur = self.current
        if key == SEGMENTS_KEY:
            if params["version"] > cur.segments.version and params.get("schema") == cur.segments.schema:
                self.current = Models(SegmentModel.from_params(params), cur.scorers, cur.controls, cur.uplifts)
        elif key.startswith("uplift:"):
            old_uplift = cur.uplifts.get(params["campaign"])
            if old_uplift is None or params["version"] > old_uplift.version:
                uplifts = {**cur.uplifts, params["campaign"]: SegmentUplift.from_params(params)}
                self.current = Models(cur.segments, cur.scorers, cur.controls, uplifts)
        elif key.startswith(("propensity:", "control:")):
            control = key.startswith("control:")
            table = cur.controls if control else cur.scorers
            old = table.get(params["campaign"])
            if old is None or params["version"] > old.version:
                new = {**table, params["campaign"]: PropensityScorer.from_params(params)}
                self.current = Models(cur.segments, cur.scorers if control else new, new if control else cur.controls,
                                      cur.uplifts)  # fmt: skip


@dataclass
class Engine:
    settings: Settings
    config: Config
    users: UserStore
    models: ModelStore
    metrics: Metrics
    timers: Timers = field(default_factory=Timers)
    index_fresh: bool = False  # the timer index matches the store only until the next rebalance

    def __post_init__(self) -> None:
        s = self.settings
        self.limits = EventLimits(max_bytes=s.max_event_bytes, max_future_ms=s.max_future_skew_s * 1000,
                                  max_past_ms=s.max_past_skew_s * 1000)  # fmt: skip
        self.nparts = s.topic_partitions
        self.by_type = dict(zip(("click", "like", "payment"), s.input_topics, strict=True))

    # -- input messages ------------------------------------------------------------------------------
    def on_event(self, batch: list[Record], msg: Message) -> tuple[str, str]:
        """One input event message: validate, repartition, fire due timers, apply the event."""
        m, s = self.metrics, self.settings
        try:
            event = parse_event(msg.value, self.limits, ref_ms=msg.timestamp_ms)
        except InvalidEvent as bad:
            return self.reject(batch, msg, bad)
        home = partition_for(event.user_id, self.nparts)
        if msg.partition != home:  # keyed otherwise: move it to its user's partition, process it there
            topic = msg.topic if msg.topic in s.input_topics else self.by_type[event.type]
            batch.append((topic, event.user_id.encode(), msg.value, home))
            m.repartitioned.inc()
            return ("repartitioned", event.type)
        if not self.index_fresh:
            self.rebuild_timers()
        self.fire_timers(batch, home, event.ts_ms)
        stored = self.users.get(event.user_id)
        if stored == ERASED:
            m.suppressed_erased.inc()
            return ("erased", event.type)
        state = UserState.from_dict(orjson.loads(stored)) if stored else None
        new, out = process(state, event, self.models.current, self.config)
        if out.duplicate:
            m.duplicates_dropped.inc()
            return ("duplicate", event.type)
        self.store(batch, event.user_id, new, home)
        self.collect(batch, out, event.event_id, event.ts_ms)
        m.events_consumed[event.type].inc()
        return ("applied", event.type)

    def on_consent(self, batch: list[Record], msg: Message) -> tuple[str, str]:
        """Opt-out wins at once (also before the user's first event); erase keeps only a suppression marker."""
        try:
            user_id, action = parse_consent(msg.value, self.limits)
        except InvalidEvent as bad:
            return self.reject(batch, msg, bad)
        home = partition_for(user_id, self.nparts)
        if msg.partition != home:  # consent must land where the user's state lives
            batch.append((self.settings.consent_topic, user_id.encode(), msg.value, home))
            self.metrics.repartitioned.inc()
            return ("repartitioned", action)
        stored = self.users.get(user_id)
        if action == "erase":
            self.users.put(batch, user_id, ERASED, home)  # no personal data; stays suppressed
        elif stored != ERASED:
            state = UserState.from_dict(orjson.loads(stored)) if stored else None
            state = set_consent(state, opted_out=action == "opt_out")
            if state is not None:
                self.users.put(batch, user_id, encode_state(state), home)
        self.metrics.consent[action].inc()
        return ("consent", action)

    # -- pieces --------------------------------------------------------------------------------------
    def reject(self, batch: list[Record], msg: Message, bad: InvalidEvent) -> tuple[str, str]:
        value = dead_letter(msg.value, msg.topic, msg.partition, msg.offset, bad.code, bad.reason)
        batch.append((self.settings.dead_letter_topic, msg.key, value, None))
        self.metrics.events_rejected[bad.code].inc()
        return ("dead_letter", bad.code)

    def collect(self, batch: list[Record], out: Outputs, event_id: str, event_ms: int | None = None) -> None:
        """Queue a step's outputs: every decision to the audit, pushes to push services, model inputs."""
        m, s = self.metrics, self.settings
        for d in out.decisions:
            record = decision_record(d)
            key = d.user_id.encode()
            batch.append((s.audit_topic, key, record, None))
            if d.action == "push":
                batch.append((s.decisions_topic, key, record, None))
            m.decisions[(d.campaign, d.action)].inc()
            if (code := suppression_code(d)) is not None:
                m.suppressions[(d.campaign, code)].inc()
        if event_ms is not None and out.decisions:
            m.event_to_decision_seconds.observe(max(0.0, time.time() - event_ms / 1000))
        for name in out.ineligible:
            m.ineligible[(name,)].inc()
        for label in out.labels:
            batch.append((s.model_inputs_topic, label.campaign.encode(), label_record(label), None))
            m.labels[(label.campaign, label.converted)].inc()
        if out.segment_sample is not None:
            batch.append((s.model_inputs_topic, b"segments", sample_record(out.segment_sample), None))

    def rebuild_timers(self, partitions: set[int] | None = None) -> None:
        """Schedule every user this worker holds (default), or only those of ``partitions`` (just recovered:
        a rebalance that keeps a partition keeps its timers and its watermark)."""
        if partitions is None:
            self.timers.clear()
        else:
            self.timers.drop(partitions)
        for user_id, stored in self.users.items():
            if stored is not None and stored != ERASED:
                p = partition_for(user_id, self.nparts)
                if partitions is None or p in partitions:
                    self.timers.schedule(p, user_id, stored_due_ms(orjson.loads(stored), self.config))
        self.index_fresh = True

    def store(self, batch: list[Record], user_id: str, state: UserState | None, partition: int) -> None:
        if state is None:
            self.users.put(batch, user_id, None, partition)  # expired: a tombstone in the changelog
            return
        self.users.put(batch, user_id, encode_state(state), partition)
        self.timers.schedule(partition, user_id, next_due_ms(state, self.config))

    def fire_timers(self, batch: list[Record], partition: int, event_ms: int) -> None:
        """Tick every user of this partition whose timer the partition's event-time watermark passed."""
        watermark = self.timers.advance(partition, event_ms)
        for user_id in self.timers.pop_due(partition):
            stored = self.users.get(user_id)
            if stored is None or stored == ERASED:
                continue
            state = UserState.from_dict(orjson.loads(stored))
            new, out = advance(state, user_id, watermark, self.models.current, self.config)
            self.store(batch, user_id, new, partition)
            self.collect(batch, out, user_id)
            self.metrics.timers_fired.inc()


__all__ = ["ERASED", "Engine", "Message", "ModelStore", "Models", "Record", "UserStore"]
