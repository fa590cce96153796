"""Input events: validation of the wire format into a small immutable domain value.

Bad input is not an exception to crash on but a value to route: ``parse_event`` raises
``InvalidEvent`` with a bounded ``code`` (safe as a metric label) and a human ``reason``.
Unknown fields are ignored, never fatal, so producers can add fields before consumers know them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson

EVENT_TYPES = ("click", "like", "payment")
DAY_MS = 86_400_000


class InvalidEvent(ValueError):
    """An event that cannot be processed; ``code`` is one of a fixed set, ``reason`` is for humans."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


class Event(NamedTuple):
    """A valid input event (immutable; a named tuple: built for every event, a quarter of the cost of a
    frozen dataclass)."""

    event_id: str
    type: str
    user_id: str
    ts_ms: int
    item_id: str | None = None
    category: str | None = None
    amount: float | None = None
    currency: str | None = None
    push_id: str | None = None
    tz_offset_min: int | None = None
    channel: str | None = None


@dataclass(frozen=True, slots=True)
class EventLimits:
    """What counts as absurd. Event time is checked against a reference time the caller passes in
    (the Kafka record timestamp in the shell), never the wall clock, so a replay decides the same."""

    max_bytes: int = 64 * 1024
    max_future_ms: int = DAY_MS
    max_past_ms: int = 365 * DAY_MS
    max_id_chars: int = 256


def parse_event(raw: bytes, limits: EventLimits = EventLimits(), ref_ms: int | None = None) -> Event:
    """Decode and validate one message value.

    >>> e = parse_event(b'{"event_id":"e1","type":"click","user_id":"u1","ts":1700000000000,"tz":"Asia/Shanghai"}')
    >>> e.event_id, e.type, e.user_id, e.ts_ms, e.tz_offset_min
    ('e1', 'click', 'u1', 1700000000000, 480)
    >>> parse_event(b'{"event_id":"e2","type":"like","user_id":"u1","ts":"2023-11-14T22:13:20+00:00"}').ts_ms
    1700000000000
    >>> parse_event(b'{"event_id":"e3","type":"payment","user_id":"u1","ts":0,"amount":-1}')
    Traceback (most recent call last):
    ...
    stream_app.core.events.InvalidEvent: bad_amount: payment amount must be a finite number >= 0
    >>> parse_event(b'not json')
    Traceback (most recent call last):
    ...
    stream_app.core.events.InvalidEvent: malformed_json: value is not valid UTF-8 JSON
    """
    if len(raw) > limits.max_bytes:
        raise InvalidEvent("oversize", f"payload is {len(raw)} bytes, limit is {limits.max_bytes}")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidEvent("malformed_json", "value is not valid UTF-8 JSON") from None
    if not isinstance(obj, dict):
        raise InvalidEvent("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
    for field in ("event_id", "type", "user_id", "ts"):
        if field not in obj:
            raise InvalidEvent("missing_field", f"required field {field!r} is missing")
    etype = obj["type"]
    if etype not in EVENT_TYPES:
        raise InvalidEvent("unknown_type", f"type must be one of {', '.join(EVENT_TYPES)}")
    ts_ms = parse_ts(obj["ts"])
    if ref_ms is not None and not (ref_ms - limits.max_past_ms <= ts_ms <= ref_ms + limits.max_future_ms):
        raise InvalidEvent(
            "ts_out_of_range",
            f"ts is {(ts_ms - ref_ms) / DAY_MS:+.1f} days from the record time; allowed "
            f"-{limits.max_past_ms / DAY_MS:g}..+{limits.max_future_ms / DAY_MS:g} days",
        )
    amount = obj.get("amount")
    if (etype == "payment" or amount is not None) and not _is_amount(amount):
        raise InvalidEvent("bad_amount", "payment amount must be a finite number >= 0")
    return Event(  # positional, in field order: half the cost of keywords for the named tuple
        _text(obj, "event_id", limits, required=True),
        etype,
        _text(obj, "user_id", limits, required=True),
        ts_ms,
        _text(obj, "item_id", limits),
        _text(obj, "category", limits),
        float(amount) if amount is not None else None,
        _text(obj, "currency", limits),
        _text(obj, "push_id", limits),
        _tz_offset(obj, ts_ms),
        _text(obj, "channel", limits),
    )


def _is_amount(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def _text(obj: dict, field: str, limits: EventLimits, required: bool = False) -> str | None:
    v = obj.get(field)
    if v is None and not required:
        return None
    if not isinstance(v, str) or not v or len(v) > limits.max_id_chars:
        raise InvalidEvent("wrong_type", f"{field} must be a non-empty string of at most {limits.max_id_chars} chars")
    return v


def _tz_offset(obj: dict, ts_ms: int) -> int | None:
    """The user's UTC offset in minutes at the event's time, from ``tz_offset_min`` or an IANA ``tz``."""
    off = obj.get("tz_offset_min")
    if off is not None:
        if isinstance(off, bool) or not isinstance(off, int) or not -14 * 60 <= off <= 14 * 60:
            raise InvalidEvent("bad_timezone", "tz_offset_min must be an integer in -840..840")
        return off
    name = obj.get("tz")
    if name is None:
        return None
    if not isinstance(name, str):
        raise InvalidEvent("bad_timezone", "tz must be an IANA time zone name such as 'Europe/Berlin'")
    zone = _zone(name)
    delta = datetime.fromtimestamp(ts_ms / 1000, zone).utcoffset()
    return int(delta.total_seconds() // 60) if delta is not None else 0


@lru_cache(maxsize=1024)
def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidEvent("bad_timezone", f"unknown time zone {name[:64]!r}") from None


def parse_ts(ts: object) -> int:
    """Epoch milliseconds from epoch-ms numbers or ISO-8601 strings that carry an offset."""
    if isinstance(ts, bool):
        raise InvalidEvent("wrong_type", "ts must be epoch milliseconds or an ISO-8601 string")
    if isinstance(ts, int | float):
        if not math.isfinite(ts):
            raise InvalidEvent("bad_timestamp", "ts must be finite")
        return int(ts)
    if isinstance(ts, str):
        try:
            dt = datetime.fromisoformat(ts)
        except ValueError:
            raise InvalidEvent("bad_timestamp", f"ts {ts[:40]!r} is not ISO-8601") from None
        if dt.tzinfo is None:
            raise InvalidEvent("bad_timestamp", "ISO-8601 ts must carry a UTC offset")
        return int(dt.astimezone(UTC).timestamp() * 1000)
    raise InvalidEvent("wrong_type", "ts must be epoch milliseconds or an ISO-8601 string")
