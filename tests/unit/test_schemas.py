"""The published JSON Schemas and the code agree: what one accepts, the other accepts."""

from __future__ import annotations

import json
import random
from pathlib import Path

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from stream_app.core.events import InvalidEvent, parse_event
from stream_app.metrics import REJECT_CODES
from stream_app.wire import dead_letter

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


def validator(name: str) -> Draft202012Validator:
    schema = json.loads((SCHEMAS / name).read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


EVENT = validator("event.v1.json")
DEAD_LETTER = validator("dead-letter.v1.json")

# Values the schema can judge alone (time-zone names and record-time bounds need code, not a schema).
VALUES = {
    "event_id": ["e1", "", 7, None, "x" * 300],
    "type": ["click", "like", "payment", "view", 1],
    "user_id": ["u1", "", 3.5, ["u"]],
    "ts": [1_700_000_000_000, 1.7e12, "2024-01-01T09:00:00+02:00", "2024-01-01T09:00:00Z", "2024-01-01T09:00:00",
           "yesterday", True, None],
    "amount": [0, 12.5, -1, "12", True],
    "category": ["shoes", "", 4],
    "tz_offset_min": [0, 480, -840, 900, 1.5, "60"],
    "tz": ["Europe/Berlin", "UTC"],
    "extra": [1, {"nested": True}],
}  # fmt: skip
BASE = {"event_id": "e1", "type": "payment", "user_id": "u1", "ts": 1_700_000_000_000, "amount": 3}


def mutated(rnd: random.Random) -> dict:
    """A valid event with up to two fields overridden (valid or not) and maybe one field deleted."""
    obj = dict(BASE)
    for field in rnd.sample(sorted(VALUES), rnd.randint(0, 2)):
        obj[field] = rnd.choice(VALUES[field])
    if rnd.random() < 0.25:
        obj.pop(rnd.choice(sorted(obj)))
    return obj


def test_the_generated_mix_has_both_verdicts():
    rnd = random.Random(0)
    valid = sum(EVENT.is_valid(mutated(rnd)) for _ in range(300))
    assert 60 < valid < 240


@given(st.randoms(use_true_random=False).map(mutated))
@settings(max_examples=500)
def test_schema_and_parser_agree(obj):
    schema_ok = EVENT.is_valid(obj)
    try:
        parse_event(orjson.dumps(obj))
        code_ok = True
    except InvalidEvent:
        code_ok = False
    assert schema_ok == code_ok, (obj, list(EVENT.iter_errors(obj))[:1])


def test_dead_letter_codes_are_the_metric_label_set():
    assert set(DEAD_LETTER.schema["properties"]["error_code"]["enum"]) == set(REJECT_CODES)


def test_emitted_dead_letters_validate():
    for raw in (b"\xff\xfe", b"{}", b'{"event_id":"a","type":"payment","user_id":"u","ts":1}'):
        try:
            parse_event(raw)
        except InvalidEvent as bad:
            DEAD_LETTER.validate(orjson.loads(dead_letter(raw, "clicks", 3, 42, bad.code, bad.reason)))
        else:
            raise AssertionError(f"{raw!r} should be rejected")
