"""Hostile records for every topic the product reads, and an independent oracle of what each one must become.

Shared by the in-process fuzz suite (tests/unit/test_fuzz.py: many cases against the engine) and the real-broker
one (tests/integration/test_fuzz_broker.py: a smaller corpus against a real worker). The oracle does not call the
parser: it classifies raw bytes with Python's own json module and judges objects with the published JSON Schema,
so a wrong reason in the parser is a disagreement, not a tautology.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import random
from collections.abc import Iterator
from pathlib import Path

import orjson
from jsonschema import Draft202012Validator

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"
EVENT_SCHEMA = Draft202012Validator(json.loads((SCHEMAS / "event.v1.json").read_text()))
CONSENT_SCHEMA = Draft202012Validator(json.loads((SCHEMAS / "consent.v1.json").read_text()))
DEAD_LETTER_SCHEMA = Draft202012Validator(json.loads((SCHEMAS / "dead-letter.v1.json").read_text()))

DAY_MS = 86_400_000
T0 = 1_764_547_200_000  # 2025-12-01T00:00Z
LAYER1 = {"tombstone", "oversize", "empty_value", "bad_utf8", "non_finite_number", "too_deep", "malformed_json",
          "not_an_object"}  # fmt: skip
SEMANTIC = {"missing_field", "wrong_type", "unknown_type", "bad_timestamp", "ts_out_of_range", "bad_amount",
            "bad_timezone"}  # fmt: skip


def _bracket_depth(text: str) -> int:
    """The deepest nesting of [ and { outside strings (a too-deep value is too deep wherever it breaks)."""
    depth = deepest = 0
    in_string = escaped = False
    for c in text:
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    return deepest


def _has_non_finite(v: object) -> bool:
    if isinstance(v, float):
        return not math.isfinite(v)
    if isinstance(v, dict):
        return any(_has_non_finite(x) for x in v.values())
    if isinstance(v, list):
        return any(_has_non_finite(x) for x in v)
    return False


def _has_lone_surrogate(v: object) -> bool:
    if isinstance(v, str):
        return any(0xD800 <= ord(c) <= 0xDFFF for c in v)
    if isinstance(v, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(x) for k, x in v.items())
    if isinstance(v, list):
        return any(_has_lone_surrogate(x) for x in v)
    return False


def layer1(raw: bytes | None, max_bytes: int) -> tuple[str | None, object]:
    """(code, None) if ``raw`` is no JSON object, with the reason it is not; else (None, the object)."""
    import sys

    if raw is None:
        return "tombstone", None
    if len(raw) > max_bytes:
        return "oversize", None
    if not raw.strip(b" \t\n\r"):
        return "empty_value", None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bad_utf8", None
    if _bracket_depth(text) > 1024:
        return "too_deep", None
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 5000))  # depth <= 1024 here: Python's default limit is below that
    try:
        return _judge(text)
    finally:
        sys.setrecursionlimit(limit)


def _judge(text: str) -> tuple[str | None, object]:
    try:
        obj = json.loads(text)  # Python's parser accepts NaN, Infinity and lone surrogates: judged below
    except ValueError:
        return "malformed_json", None
    if _has_non_finite(obj):
        return "non_finite_number", None
    if _has_lone_surrogate(obj):
        return "malformed_json", None  # not valid JSON text (RFC 8259 section 8.2): refused
    if not isinstance(obj, dict):
        return "not_an_object", None
    return None, obj


# -- the corpus: the reproductions and more, as raw values ---------------------------------------------------


def event(eid: str, user: str, ts: object, etype: str = "click", **extra: object) -> dict:
    return {"event_id": eid, "type": etype, "user_id": user, "ts": ts} | extra


def corpus(max_bytes: int = 64 * 1024, seed: int = 17, t0: int = T0) -> list[tuple[str, bytes | None]]:
    """(name, raw value) of hostile values for any topic; events among them use user ids ``z-*`` and times
    near ``t0``."""
    rnd = random.Random(seed)
    d = orjson.dumps
    out: list[tuple[str, bytes | None]] = [
        ("tombstone", None),
        ("empty", b""),
        ("spaces", b"  \r\n\t"),
        ("form feed", b"\x0c"),
        ("nul", b"\x00"),
        ("bom object", b"\xef\xbb\xbf{}"),
        ("bad utf8", b"\xff\xfe"),
        ("truncated utf8", b'{"a":"\xc3"}'),
        ("encoded surrogate", b'"\xed\xa0\x80"'),
        ("lone surrogate escape", b'{"event_id":"\\ud800","type":"click","user_id":"z-1","ts":1}'),
        ("null", b"null"),
        ("true", b"true"),
        ("number", b"1"),
        ("string", b'"click"'),
        ("array", b"[]"),
        ("empty object", b"{}"),
        ("deep arrays", b"[" * 5000 + b"]" * 5000),
        ("deep objects", b'{"a":' * 3000 + b"1" + b"}" * 3000),
        (
            "deep 1024 fine",
            b'{"event_id":"deep","type":"click","user_id":"z-2","ts":'
            + str(t0).encode()
            + b',"x":'
            + b"[" * 1023
            + b"]" * 1023
            + b"}",
        ),
        ("unclosed", b"[" * 10_000),
        ("oversize", b'{"pad":"' + b"x" * (max_bytes + 10) + b'"}'),
        ("just under size", d(event("big", "z-3", t0, pad="x" * (max_bytes - 200)))),
        ("NaN ts", b'{"event_id":"n1","type":"click","user_id":"z-4","ts":NaN}'),
        (
            "Infinity amount",
            b'{"event_id":"n2","type":"payment","user_id":"z-4","ts":' + str(t0).encode() + b',"amount":Infinity}',
        ),
        ("-Infinity", b"-Infinity"),
        (
            "1e400 amount",
            b'{"event_id":"n3","type":"payment","user_id":"z-4","ts":' + str(t0).encode() + b',"amount":1e400}',
        ),
        ("1e308 amount", d(event("n4", "z-4", t0, "payment", amount=1e308))),
        ("negative zero amount", d(event("n5", "z-4", t0, "payment", amount=-0.0))),
        ("bool amount", d(event("n6", "z-4", t0, "payment", amount=True))),
        ("huge int ts", b'{"event_id":"n7","type":"click","user_id":"z-4","ts":123456789012345678901234567890}'),
        ("year 10000 ms + tz", d(event("y1", "z-5", 253_402_300_800_000, tz="Europe/Berlin"))),
        ("year 10000 iso + tz", d(event("y2", "z-5", "10000-01-01t00:00:00+01:00", tz="Europe/Berlin"))),
        ("year 9999 iso + tz", d(event("y3", "z-5", "9999-12-31T23:59:59-23:59", tz="Asia/Tokyo"))),
        ("year 1 iso", d(event("y4", "z-5", "0001-01-01t00:00:00+01:00"))),
        ("negative ts", d(event("y5", "z-5", -1))),
        ("ts 400 days ahead", d(event("y6", "z-5", t0 + 400 * DAY_MS))),
        ("ts string NaN", d(event("y7", "z-5", "NaN"))),
        ("iso without offset", d(event("y8", "z-5", "2025-12-01t00:00:00"))),
        ("iso space", d(event("y9", "z-5", "2025-12-01 00:00:00+00:00"))),
        ("iso week", d(event("y10", "z-5", "2025-W49-1t00:00:00Z"))),
        ("feb 30", d(event("y11", "z-5", "2025-02-30t00:00:00Z"))),
        ("tz unknown", d(event("tz1", "z-6", t0, tz="Mars/Olympus"))),
        ("tz traversal", d(event("tz2", "z-6", t0, tz="../../etc/passwd"))),
        ("tz huge", d(event("tz3", "z-6", t0, tz="Europe/" + "x" * 5000))),
        ("tz offset float", d(event("tz4", "z-6", t0, tz_offset_min=60.0))),
        ("tz offset 841", d(event("tz5", "z-6", t0, tz_offset_min=841))),
        ("id 256", d(event("i" * 256, "z-7", t0))),
        ("id 257", d(event("i" * 257, "z-7", t0))),
        ("user 256 astral", d(event("u256", "😀" * 256, t0))),
        ("user empty", d(event("u0", "", t0))),
        ("user nul", d(event("unul", "z-\x00", t0))),
        ("user number", d(event("unum", 7, t0))),
        ("type list", d(event("tl", "z-8", t0, etype=["click"]))),
        ("type dict", b'{"event_id":"td","type":{"a":1},"user_id":"z-8","ts":' + str(t0).encode() + b"}"),
        (
            "duplicate keys",
            b'{"event_id":"dk","type":"view","type":"click","user_id":"z-8","ts":' + str(t0).encode() + b"}",
        ),
        ("missing ts", d({"event_id": "m1", "type": "click", "user_id": "z-8"})),
        ("item null", d(event("nul1", "z-8", t0, item_id=None, category=None))),
        ("control chars", d(event("cc\x01", "z-8\x7f", t0))),
        ("consent tombstone-ish", d({"user_id": None, "action": None})),
        ("consent opt_out", d({"user_id": "z-9", "action": "opt_out"})),
        ("consent erase", d({"user_id": "z-9", "action": "erase"})),
        ("consent unknown action", d({"user_id": "z-9", "action": "forget"})),
        ("consent action list", d({"user_id": "z-9", "action": ["erase"]})),
        ("consent user 257", d({"user_id": "u" * 257, "action": "opt_out"})),
        ("label not object", b'["label"]'),
        ("label typed wrong", d({"kind": "label", "campaign": "cart_abandonment", "features": "x"})),
        ("sample short", d({"kind": "segment_sample", "schema": "traits-v1", "traits": [1.0]})),
        ("flush", d({"kind": "flush"})),
        ("params version string", d({"campaign": "c", "version": "2"})),
    ]
    for i in range(12):
        out.append((f"random bytes {i}", rnd.randbytes(rnd.choice([1, 7, 64, 900]))))
    for i in range(6):
        junk = "".join(rnd.choice('{}[]":,0123456789.eE+-tfnul \\') for _ in range(rnd.randint(1, 60)))
        out.append((f"json-ish {i}", junk.encode()))
    return out


def expected(raw: bytes | None, max_bytes: int, schema: Draft202012Validator) -> str:
    """What the parser must say about ``raw``, independently: a layer-1 code, "valid", or "semantic"."""
    code, obj = layer1(raw, max_bytes)
    if code is not None:
        return code
    return "valid" if schema.is_valid(obj) else "semantic"


def dead_letter_matches(record: dict, raw: bytes | None, topic: str, offset: int, code: str) -> bool:
    """A dead letter carries the original value byte for byte (over 64 KB: its start, size and SHA-256), where
    it came from, and its code."""
    value, whole = base64.b64decode(record["value_b64"]), raw or b""
    if record.get("value_truncated"):
        kept = value == whole[: len(value)] and record["value_bytes"] == len(whole)
        kept = kept and record["value_sha256"] == hashlib.sha256(whole).hexdigest() and len(value) == 64 * 1024
    else:
        kept = value == whole
    return (
        DEAD_LETTER_SCHEMA.is_valid(record)
        and record["source_topic"] == topic
        and record["source_offset"] == offset
        and record["error_code"] == code
        and (record.get("value_is_null", False) == (raw is None))
        and kept
    )


def valid_events(n: int, users: list[str], rnd: random.Random, t0: int = T0) -> Iterator[dict]:
    """Valid events of ``users`` over a few hours, some in ISO form, with zones and amounts."""
    for i in range(n):
        etype = rnd.choice(["click", "click", "like", "payment"])
        ts = t0 + i * 60_000 + rnd.randint(0, 50_000)
        ev = event(f"g{i}-{rnd.randrange(1 << 30)}", rnd.choice(users), ts, etype)
        if etype == "payment":
            ev["amount"] = rnd.choice([0, 0.01, 19.99, 1e12])
        if rnd.random() < 0.3:
            ev["tz"] = rnd.choice(["Europe/Berlin", "Asia/Kolkata", "Mars/Olympus"])
        yield ev
