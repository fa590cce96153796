"""Input events: validation of the wire format into a small immutable domain value.

Bad input is not an exception to crash on but a value to route: ``parse_event`` raises
``InvalidEvent`` with a bounded ``code`` (safe as a metric label) and a human ``reason``.
Unknown fields are ignored, never fatal, so producers can add fields before consumers know them.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import date, datetime
from functools import lru_cache
from typing import NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson

EVENT_TYPES = ("click", "like", "payment")
DAY_MS = 86_400_000
MIN_TS_MS = 0  # 1970-01-01T00:00:00Z
MAX_TS_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z: Python's datetimes end there
MAX_AMOUNT = 1e12  # one payment, any currency: larger is an error, and sums of bounded amounts stay finite


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


def parse_event(raw: bytes | None, limits: EventLimits = EventLimits(), ref_ms: int | None = None) -> Event:
    """Decode and validate one message value (``None``: a tombstone, which is no event).

    What is accepted is exactly what ``schemas/event.v1.json`` accepts (the schema is the contract; a
    property test holds the two together), plus what a schema cannot say: the payload size, the JSON nesting
    depth, and event time within the skew of the record time.

    >>> e = parse_event(b'{"event_id":"e1","type":"click","user_id":"u1","ts":1700000000000,"tz":"Asia/Shanghai"}')
    >>> e.event_id, e.type, e.user_id, e.ts_ms, e.tz_offset_min
    ('e1', 'click', 'u1', 1700000000000, 480)
    >>> parse_event(b'{"event_id":"e2","type":"like","user_id":"u1","ts":"2023-11-14T22:13:20+00:00"}').ts_ms
    1700000000000
    >>> parse_event(b'{"event_id":"e3","type":"payment","user_id":"u1","ts":0,"amount":-1}')
    Traceback (most recent call last):
    ...
    stream_app.core.events.InvalidEvent: bad_amount: payment amount must be a number in 0..1e+12
    >>> parse_event(b'not json')
    Traceback (most recent call last):
    ...
    stream_app.core.events.InvalidEvent: malformed_json: value is not valid JSON
    """
    obj = decode_object(raw, limits)
    for field in ("event_id", "type", "user_id", "ts"):
        if field not in obj:
            raise InvalidEvent("missing_field", f"required field {field!r} is missing")
    etype = obj["type"]
    if not isinstance(etype, str) or etype not in EVENT_TYPES:
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
        raise InvalidEvent("bad_amount", f"payment amount must be a number in 0..{MAX_AMOUNT:g}")
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


class _NonFinite(ValueError):
    pass


def _refuse_non_finite(text: str) -> float:
    raise _NonFinite(text)


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise _NonFinite(text)
    return v


def decode_object(raw: bytes | None, limits: EventLimits) -> dict:
    """The JSON object a message value holds, or ``InvalidEvent`` with the true reason it holds none.

    orjson decides (fast); only a value it refuses is looked at again, to say why: a tombstone, an empty
    value, bytes that are not UTF-8, NaN/Infinity or a number beyond a double, nesting deeper than 1024,
    or JSON that is malformed otherwise.

    >>> [_code(v) for v in (None, b"", b"\\xff", b'{"a": NaN}', b"[" * 2000, b"{", b"[]", b"{}")]
    ['tombstone', 'empty_value', 'bad_utf8', 'non_finite_number', 'too_deep', 'malformed_json', 'not_an_object', None]
    """
    if raw is None:
        raise InvalidEvent("tombstone", "the value is null (a tombstone); a command or event needs a JSON object")
    if len(raw) > limits.max_bytes:
        raise InvalidEvent("oversize", f"payload is {len(raw)} bytes, limit is {limits.max_bytes}")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise _why_not_json(raw, err.msg) from None
    if not isinstance(obj, dict):
        raise InvalidEvent("not_an_object", f"expected a JSON object, got {_json_type(obj)}")
    return obj


def _why_not_json(raw: bytes, msg: str) -> InvalidEvent:
    if not raw.strip(b" \t\n\r"):  # JSON's whitespace
        return InvalidEvent("empty_value", "the value is empty")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return InvalidEvent("bad_utf8", f"the value is not UTF-8 (byte {err.start})")
    if "depth" in msg:  # orjson's own verdict, before Python's parser (whose limit is lower) is asked
        return InvalidEvent("too_deep", "JSON nested deeper than 1024 levels")
    try:
        json.loads(text, parse_constant=_refuse_non_finite, parse_float=_finite_float)
    except _NonFinite:
        return InvalidEvent("non_finite_number", "NaN, Infinity or a number beyond a double is not a JSON number")
    except (ValueError, RecursionError):
        pass
    return InvalidEvent("malformed_json", "value is not valid JSON")


def _json_type(v: object) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(v), "a number")


def _code(raw: bytes | None) -> str | None:
    try:
        decode_object(raw, EventLimits())
    except InvalidEvent as bad:
        return bad.code
    return None


def _is_amount(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= MAX_AMOUNT


def _text(obj: dict, field: str, limits: EventLimits, required: bool = False) -> str | None:
    v = obj.get(field)
    if v is None and not required:
        return None
    if not isinstance(v, str) or not v or len(v) > limits.max_id_chars:
        raise InvalidEvent("wrong_type", f"{field} must be a non-empty string of at most {limits.max_id_chars} chars")
    return v


def _tz_offset(obj: dict, ts_ms: int) -> int | None:
    """The user's UTC offset in minutes at the event's time, from ``tz_offset_min`` or an IANA ``tz``.

    A ``tz`` the time-zone database does not know is ignored (the offset stays unknown): it is a hint about
    the user, and the event it rides on is still true. An offset out of range is an error, as the schema says.
    """
    off, name = obj.get("tz_offset_min"), obj.get("tz")
    if name is not None and not isinstance(name, str):
        raise InvalidEvent("bad_timezone", "tz must be an IANA time zone name such as 'Europe/Berlin'")
    if off is not None:
        if isinstance(off, float) and off.is_integer():
            off = int(off)  # JSON Schema's "integer" includes 60.0
        if isinstance(off, bool) or not isinstance(off, int) or not -14 * 60 <= off <= 14 * 60:
            raise InvalidEvent("bad_timezone", "tz_offset_min must be an integer in -840..840")
        return off
    if name is None:
        return None
    zone = _zone(name) if len(name) <= 64 else None
    if zone is None:
        return None
    # local time must stay within years 1..9999 too: near the bounds, the offset of two days inside them
    at = min(max(ts_ms, MIN_TS_MS + 2 * DAY_MS), MAX_TS_MS - 2 * DAY_MS)
    delta = datetime.fromtimestamp(at / 1000, zone).utcoffset()
    return int(delta.total_seconds() // 60) if delta is not None else 0


@lru_cache(maxsize=1024)
def _zone(name: str) -> ZoneInfo | None:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return None


# ISO-8601 as the event schema accepts it (schemas/event.v1.json, ts; a test checks they are the same
# pattern): extended format, years 1970-9999, real calendar dates, hours 00-23, an optional fraction of up to 9
# digits, and a UTC offset (Z, +hh:mm or +hhmm). No week dates, no basic format, no space, no hour-only offset.
_LEAP = r"([0-9]{2}(0[48]|[2468][048]|[13579][26])|(0[48]|[2468][048]|[13579][26])00)-02-29"
_DATE = (r"[0-9]{4}-(((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01]))|((0[469]|11)-(0[1-9]|[12][0-9]|30))"
         r"|(02-(0[1-9]|1[0-9]|2[0-8])))")  # fmt: skip
# [0-9], not \d (Python's matches every Unicode digit, ECMA-262's only ASCII); "$(?![\s\S])", not "$" (Python's
# also matches before a final newline): the pattern means the same to the parser and to any schema validator
ISO_TS_PATTERN = (
    r"^(?=(19[7-9][0-9]|[2-9][0-9]{3})-)(" + _DATE + "|" + _LEAP + r")"
    r"T([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9](\.[0-9]{1,9})?)?(Z|[+-]([01][0-9]|2[0-3]):?[0-5][0-9])$(?![\s\S])"
)
_ISO = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2})(?::([0-9]{2})(?:\.([0-9]+))?)?"
                  r"(?:Z|([+-])([0-9]{2}):?([0-9]{2}))")  # fmt: skip
_ISO_VALID = re.compile(ISO_TS_PATTERN)
_EPOCH_DAYS = date(1970, 1, 1).toordinal()


def parse_ts(ts: object) -> int:
    """Epoch milliseconds from epoch-ms numbers (0 up to the end of year 9999) or ISO-8601 strings with an offset.

    >>> parse_ts("2024-02-29T12:00:00.1234+01:00"), parse_ts(1.7e12)
    (1709204400123, 1700000000000)
    >>> parse_ts("2023-02-29T12:00Z")
    Traceback (most recent call last):
    ...
    stream_app.core.events.InvalidEvent: bad_timestamp: ts '2023-02-29T12:00Z' is not ISO-8601 as the schema says
    """
    if isinstance(ts, bool):
        raise InvalidEvent("wrong_type", "ts must be epoch milliseconds or an ISO-8601 string")
    if isinstance(ts, int | float):
        if not MIN_TS_MS <= ts <= MAX_TS_MS:
            raise InvalidEvent("bad_timestamp", f"epoch ms must be in {MIN_TS_MS}..{MAX_TS_MS} (1970 to 9999)")
        return int(ts)
    if isinstance(ts, str):
        if len(ts) > 64 or not _ISO_VALID.match(ts):
            raise InvalidEvent("bad_timestamp", f"ts {ts[:40]!r} is not ISO-8601 as the schema says")
        y, mo, d, h, mi, sec, frac, sign, oh, om = _ISO.match(ts).groups()  # type: ignore[union-attr]
        days = date(int(y), int(mo), int(d)).toordinal() - _EPOCH_DAYS
        ms = ((days * 24 + int(h)) * 60 + int(mi)) * 60_000 + int(sec or 0) * 1000
        ms += int((frac or "0")[:3].ljust(3, "0"))  # milliseconds: further digits are cut, not rounded
        if sign:
            ms -= (1 if sign == "+" else -1) * (int(oh) * 60 + int(om)) * 60_000
        return ms
    raise InvalidEvent("wrong_type", "ts must be epoch milliseconds or an ISO-8601 string")
