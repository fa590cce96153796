"""``stream-app explain USER``: why did (or didn't) this user get a push, read from the real topics.

Reads the user's partition only (``murmur2(user_id)``, as the worker places users): the latest state in the
users changelog (profile, consent, open label windows), the latest model versions in ``model-params`` (to
compute the user's current segment as a worker would), and the user's most recent decisions in the audit
topic (the last ``scan`` records of that partition). Nothing is written; no consumer group is joined.
The changelog's short keys are documented in docs/contracts.md ("User state").
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from stream_app.core.events import EVENT_TYPES
from stream_app.core.features import extract_traits
from stream_app.core.pipeline import Models, UserState
from stream_app.core.segments import SegmentModel
from stream_app.core.timers import partition_for
from stream_app.engine import ModelStore
from stream_app.kafka_io import partitions_of
from stream_app.settings import Settings


@dataclass
class Explanation:
    user_id: str
    partition: int
    state: dict | None  # the changelog value as stored (None: no state)
    erased: bool = False
    segment: int = -1
    segments_version: int = 0
    decisions: list[dict] = field(default_factory=list)  # newest last
    scanned: int = 0  # audit records read


def _when(ms: int | None) -> str:
    if ms is None or ms < 0:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


async def _read(consumer: AIOKafkaConsumer, tp: TopicPartition, start: int, end: int, timeout: float) -> list[Any]:
    out: list[Any] = []
    if end <= start:
        return out
    consumer.assign([tp])
    consumer.seek(tp, start)
    deadline = time.monotonic() + timeout
    while await consumer.position(tp) < end:
        if time.monotonic() > deadline:
            raise TimeoutError(f"reading {tp.topic}[{tp.partition}] took over {timeout}s")
        for msgs in (await consumer.getmany(tp, timeout_ms=200, max_records=10_000)).values():
            out.extend(m for m in msgs if m.offset < end)
    return out


async def explain(settings: Settings, user_id: str, scan: int = 200_000, last: int = 10,
                  timeout: float = 60.0, **client_kw: Any) -> Explanation:  # fmt: skip
    """Everything the topics know about ``user_id``; ``client_kw``: connection settings (SASL) for aiokafka."""
    bootstrap = settings.bootstrap_servers
    parts = await partitions_of(bootstrap, settings.users_changelog_topic, **client_kw)
    n = len(parts) or settings.topic_partitions
    partition = partition_for(user_id, n)
    key = orjson.dumps(user_id)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                                isolation_level="read_committed", **client_kw)  # fmt: skip
    await consumer.start()
    try:
        found = Explanation(user_id, partition, None)
        tp = TopicPartition(settings.users_changelog_topic, partition)
        if parts:
            begin, end = (await consumer.beginning_offsets([tp]))[tp], (await consumer.end_offsets([tp]))[tp]
            for m in await _read(consumer, tp, begin, end, timeout):
                if m.key == key:
                    found.state = None if m.value is None else orjson.loads(m.value)
        found.erased = found.state == {"erased": True}
        models = ModelStore(Models(SegmentModel(k=settings.segments_k), {}))
        ptp = TopicPartition(settings.model_params_topic, 0)
        if await partitions_of(bootstrap, settings.model_params_topic, **client_kw):
            begin, end = (await consumer.beginning_offsets([ptp]))[ptp], (await consumer.end_offsets([ptp]))[ptp]
            for m in await _read(consumer, ptp, begin, end, timeout):
                if m.key and m.value:
                    models.apply(m.key.decode(), orjson.loads(m.value))
        seg = models.current.segments
        found.segments_version = seg.version
        if found.state and not found.erased and found.state.get("p"):
            state = UserState.from_dict(found.state)
            if seg.centroids:
                found.segment = seg.predict_one(extract_traits(state.profile, state.profile.last_ms))
        atp = TopicPartition(settings.audit_topic, partition)
        if await partitions_of(bootstrap, settings.audit_topic, **client_kw):
            begin, end = (await consumer.beginning_offsets([atp]))[atp], (await consumer.end_offsets([atp]))[atp]
            msgs = await _read(consumer, atp, max(begin, end - scan), end, timeout)
            found.scanned = len(msgs)
            found.decisions = [orjson.loads(m.value) for m in msgs if m.key == user_id.encode()][-last:]
        return found
    finally:
        await consumer.stop()


def render(x: Explanation) -> list[str]:
    """The explanation as lines for a terminal."""
    out = [f"user {x.user_id!r}: partition {x.partition}"]
    if x.state is None:
        out.append("  state: none (never seen, or its state expired after 90 days without events)")
    elif x.erased:
        out.append("  state: ERASED (personal data deleted; every push to this user is suppressed)")
    else:
        st = x.state
        out.append(f"  consent: {'OPTED OUT (every push suppressed)' if st['o'] else 'pushes allowed'}")
        p = st.get("p")
        if p is None:
            out.append("  profile: none yet (consent known, no event)")
        else:
            counts = ", ".join(f"{t}s {c}" for t, c in zip(EVENT_TYPES, p["c"], strict=True))
            last = ", ".join(f"{t} {_when(ms)}" for t, ms in zip(EVENT_TYPES, p["lt"], strict=True) if ms >= 0)
            cats = sorted(p["cat"].items(), key=lambda kv: -kv[1])[:3]
            out += [
                f"  profile: first seen {_when(p['f'])}, last event {_when(p['l'])}",
                f"    events: {counts}; spend {p['st']:.2f} (decayed {p['sd']:.2f})",
                f"    last of each type: {last or '-'}",
                f"    activity: {p['rs']:.3f}/6h-decayed, {p['rl']:.3f}/14d-decayed; "
                f"utc offset {p['tz'] if p['tz'] is not None else 'unknown'} min",
                f"    top categories: {', '.join(f'{k} {v:.2f}' for k, v in cats) or '-'}",
                f"    pushes in state: {len(p['pt'])} recent; last per campaign: "
                + (", ".join(f"{c} {_when(ms)}" for c, ms in p["lp"].items()) or "-"),
            ]
            seg = f"{x.segment}" if x.segment >= 0 else "- (the segments model is still warming up)"
            out.append(f"  segment: {seg} (segments model v{x.segments_version})")
        out.append(f"  open label windows: {len(st['q'])}")
        for q in st["q"]:
            out.append(f"    {q[1]} {q[2]} decided {_when(q[3])}, window closes {_when(q[4])} (decision {q[0]})")
    out.append(f"  last decisions ({len(x.decisions)} in the last {x.scanned} audit records of the partition):")
    for d in x.decisions:
        out.append(
            f"    {_when(d['decided_at_ms'])} {d['campaign']}: {d['action'].upper()} score {d['score']} "
            f"segment {d['segment']} model v{d['model_version']}"
        )
        out.append(f"      reasons: {', '.join(d['reasons'])}")
    if not x.decisions:
        out.append("    none")
    return out


def explain_sync(settings: Settings, user_id: str, **kw: Any) -> Explanation:
    return asyncio.run(explain(settings, user_id, **kw))
