"""Input events: validation of the wire format into a small immutable domain value.

Bad input is not an exception to crash on but a value to route: ``parse_event`` raises
``InvalidEvent`` with a bounded ``code`` (safe as a metric label) and a human ``reason``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import orjson

EVENT_TYPES = ("click", "like", "payment")


class InvalidEvent(ValueError):
    """An event that cannot be processed; ``code`` is one of a fixed set, ``reason`` is for humans."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Event:
    event_id: str
    type: str
    user_id: str
    ts_ms: int


def parse_event(raw: bytes, max_bytes: int = 64 * 1024) -> Event:
    """Decode and validate one message value.

    >>> parse_event(b'{"event_id":"e1","type":"click","user_id":"u1","ts":1700000000000}')
    Event(event_id='e1', type='click', user_id='u1', ts_ms=1700000000000)
    >>> parse_event(b'{"event_id":"e2","type":"like","user_id":"u1","ts":"2023-11-14T22:13:20+00:00"}').ts_ms
    1700000000000
    >>> parse_event(b'not json')
    Traceback (most recent call last):
    ...
    stream_app.core.events.InvalidEvent: malformed_json: value is not valid UTF-8 JSON
    """
    if len(raw) > max_bytes:
        raise InvalidEvent("oversize", f"payload is {len(raw)} bytes, limit is {max_bytes}")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidEvent("malformed_json", "value is not valid UTF-8 JSON") from None
    if not isinstance(obj, dict):
        raise InvalidEvent("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
    for field in ("event_id", "type", "user_id", "ts"):
        if field not in obj:
            raise InvalidEvent("missing_field", f"required field {field!r} is missing")
    event_id, etype, user_id = obj["event_id"], obj["type"], obj["user_id"]
    if not isinstance(event_id, str) or not event_id:
        raise InvalidEvent("wrong_type", "event_id must be a non-empty string")
    if etype not in EVENT_TYPES:
        raise InvalidEvent("unknown_type", f"type must be one of {', '.join(EVENT_TYPES)}")
    if not isinstance(user_id, str) or not user_id:
        raise InvalidEvent("wrong_type", "user_id must be a non-empty string")
    return Event(event_id=event_id, type=etype, user_id=user_id, ts_ms=parse_ts(obj["ts"]))


def parse_ts(ts: object) -> int:
    """Epoch milliseconds from epoch-ms numbers or ISO-8601 strings that carry an offset."""
    if isinstance(ts, bool):
        raise InvalidEvent("wrong_type", "ts must be epoch milliseconds or an ISO-8601 string")
    if isinstance(ts, int | float):
        return int(ts)
    if isinstance(ts, str):
        try:
            dt = datetime.fromisoformat(ts)
        except ValueError:
            raise InvalidEvent("bad_timestamp", f"ts {ts[:40]!r} is not ISO-8601") from None
        if dt.tzinfo is None:
            raise InvalidEvent("bad_timestamp", "ISO-8601 ts must carry a UTC offset")
        return int(dt.timestamp() * 1000)
    raise InvalidEvent("wrong_type", "ts must be epoch milliseconds or an ISO-8601 string")
