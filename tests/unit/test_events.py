import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stream_app.core.events import EVENT_TYPES, InvalidEvent, parse_event

ids = st.text(min_size=1, max_size=20)


@given(event_id=ids, etype=st.sampled_from(EVENT_TYPES), user=ids, ts=st.integers(0, 4_000_000_000_000))
def test_valid_events_round_trip(event_id, etype, user, ts):
    raw = orjson.dumps({"event_id": event_id, "type": etype, "user_id": user, "ts": ts, "extra": [1]})
    e = parse_event(raw)
    assert (e.event_id, e.type, e.user_id, e.ts_ms) == (event_id, etype, user, ts)


def test_iso_timestamp_needs_an_offset():
    ok = parse_event(b'{"event_id":"a","type":"click","user_id":"u","ts":"2024-01-01T09:00:00+02:00"}')
    assert ok.ts_ms == 1704092400000
    with pytest.raises(InvalidEvent) as bad:
        parse_event(b'{"event_id":"a","type":"click","user_id":"u","ts":"2024-01-01T09:00:00"}')
    assert bad.value.code == "bad_timestamp"


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"\xff\xfe", "malformed_json"),
        (b"{oops", "malformed_json"),
        (b"[1,2]", "not_an_object"),
        (b'{"type":"click","user_id":"u","ts":1}', "missing_field"),
        (b'{"event_id":"a","type":"view","user_id":"u","ts":1}', "unknown_type"),
        (b'{"event_id":"a","type":"click","user_id":7,"ts":1}', "wrong_type"),
        (b'{"event_id":"a","type":"click","user_id":"u","ts":true}', "wrong_type"),
        (b'{"event_id":"a","type":"click","user_id":"u","ts":"yesterday"}', "bad_timestamp"),
    ],
)
def test_bad_input_has_a_code_and_reason(raw, code):
    with pytest.raises(InvalidEvent) as bad:
        parse_event(raw)
    assert bad.value.code == code
    assert bad.value.reason


def test_oversize_payloads_are_rejected_before_parsing():
    raw = orjson.dumps({"event_id": "a", "type": "click", "user_id": "u", "ts": 1, "pad": "x" * 500})
    with pytest.raises(InvalidEvent) as bad:
        parse_event(raw, max_bytes=256)
    assert bad.value.code == "oversize"


@given(st.binary(max_size=200))
def test_arbitrary_bytes_either_parse_or_raise_invalid_event(raw):
    try:
        parse_event(raw)
    except InvalidEvent as e:
        from stream_app.metrics import REJECT_CODES

        assert e.code in REJECT_CODES  # every code is a pre-bound, bounded metric label
