import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stream_app.core.events import DAY_MS, EVENT_TYPES, EventLimits, InvalidEvent, parse_event

ids = st.text(min_size=1, max_size=20)


@given(event_id=ids, etype=st.sampled_from(EVENT_TYPES), user=ids, ts=st.integers(0, 4_000_000_000_000))
def test_valid_events_round_trip(event_id, etype, user, ts):
    raw = orjson.dumps({"event_id": event_id, "type": etype, "user_id": user, "ts": ts, "amount": 3, "extra": [1]})
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
        (b"\xff\xfe", "bad_utf8"),
        (None, "tombstone"),
        (b"", "empty_value"),
        (b" \n", "empty_value"),
        (b'{"event_id":"a","type":"click","user_id":"u","ts":NaN}', "non_finite_number"),
        (b'{"event_id":"a","type":"payment","user_id":"u","ts":1,"amount":1e999}', "non_finite_number"),
        (b'{"a":' * 10_000 + b"1" + b"}" * 10_000, "too_deep"),
        (b"[" * 10_000 + b"]" * 10_000, "too_deep"),
        (b'{"event_id":"a","type":"payment","user_id":"u","ts":1,"amount":1e308}', "bad_amount"),
        (b'{"event_id":"a","type":"click","user_id":"u","ts":253402300800000,"tz":"Europe/Berlin"}', "bad_timestamp"),
        (b'{"event_id":"a","type":"click","user_id":"u","ts":"10000-01-01T00:00:00Z","tz":"UTC"}', "bad_timestamp"),
        (b'{"event_id":"a","type":"click","user_id":"u","ts":-1}', "bad_timestamp"),
        (b'{"event_id":"a","type":"click","user_id":"u","ts":"2026-11-30 21:00:00+00:00"}', "bad_timestamp"),
        (b'{"event_id":"a","type":"click","user_id":"u","ts":"2026-W48-1T21:00:00+00:00"}', "bad_timestamp"),
        (b'{"event_id":"a","type":"click","user_id":"u","ts":"20261130T210000Z"}', "bad_timestamp"),
        (b'{"event_id":"a","type":"click","user_id":"u","ts":"2026-11-30T21:00:00+01"}', "bad_timestamp"),
        (b"{oops", "malformed_json"),
        (b"[1,2]", "not_an_object"),
        (b'{"type":"click","user_id":"u","ts":1}', "missing_field"),
        (b'{"event_id":"a","type":"view","user_id":"u","ts":1}', "unknown_type"),
        (b'{"event_id":"a","type":"click","user_id":7,"ts":1}', "wrong_type"),
        (b'{"event_id":"a","type":"click","user_id":"u","ts":true}', "wrong_type"),
        (b'{"event_id":"a","type":"click","user_id":"u","ts":"yesterday"}', "bad_timestamp"),
        (b'{"event_id":"a","type":"payment","user_id":"u","ts":1}', "bad_amount"),
        (b'{"event_id":"a","type":"payment","user_id":"u","ts":1,"amount":-0.01}', "bad_amount"),
        (b'{"event_id":"a","type":"payment","user_id":"u","ts":1,"amount":"12"}', "bad_amount"),
        (b'{"event_id":"a","type":"click","user_id":"u","ts":1,"tz_offset_min":900}', "bad_timezone"),
        (b'{"event_id":"a","type":"click","user_id":"u","ts":1,"category":5}', "wrong_type"),
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
        parse_event(raw, EventLimits(max_bytes=256))
    assert bad.value.code == "oversize"


@given(st.binary(max_size=200))
def test_arbitrary_bytes_either_parse_or_raise_invalid_event(raw):
    try:
        parse_event(raw)
    except InvalidEvent as e:
        from stream_app.metrics import REJECT_CODES

        assert e.code in REJECT_CODES  # every code is a pre-bound, bounded metric label


def test_event_time_is_bounded_by_the_record_time_not_the_wall_clock():
    raw = b'{"event_id":"a","type":"click","user_id":"u","ts":1700000000000}'
    limits = EventLimits(max_future_ms=DAY_MS, max_past_ms=7 * DAY_MS)
    assert parse_event(raw, limits, ref_ms=1_700_000_000_000 + 6 * DAY_MS).ts_ms == 1_700_000_000_000
    for ref in (1_700_000_000_000 + 8 * DAY_MS, 1_700_000_000_000 - 2 * DAY_MS):
        with pytest.raises(InvalidEvent) as bad:
            parse_event(raw, limits, ref_ms=ref)
        assert bad.value.code == "ts_out_of_range"


def test_optional_fields_and_time_zones():
    raw = orjson.dumps(
        {"event_id": "p1", "type": "payment", "user_id": "u", "ts": "2024-07-01T12:00:00Z", "amount": 19,
         "currency": "EUR", "category": "shoes", "item_id": "i9", "push_id": "d1", "tz": "Europe/Berlin",
         "channel": "app"}
    )  # fmt: skip
    e = parse_event(raw)
    assert (e.amount, e.currency, e.category, e.item_id, e.push_id, e.channel) == (
        19.0,
        "EUR",
        "shoes",
        "i9",
        "d1",
        "app",
    )
    assert e.tz_offset_min == 120  # summer time in Berlin at the event's own time
    winter = parse_event(raw.replace(b"2024-07-01", b"2024-01-01"))
    assert winter.tz_offset_min == 60
