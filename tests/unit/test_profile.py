import math

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_app.core.events import EVENT_TYPES, Event
from stream_app.core.profile import DAY_MS, Profile, ProfileParams, is_expired, update_profile

event_lists = st.lists(
    st.builds(
        lambda i, t, ts, cat, amt, tz: Event(
            f"e{i}", t, "u", ts, category=cat, amount=amt if t == "payment" else None, tz_offset_min=tz
        ),
        st.integers(0, 10_000),
        st.sampled_from(EVENT_TYPES),
        st.integers(0, 60 * DAY_MS),
        st.sampled_from([None, "shoes", "books", "games"]),  # <= top_k: order-consistency is exact
        st.floats(0, 500),
        st.just(60),
    ),
    min_size=1,
    max_size=40,
    unique_by=lambda e: e.event_id,
)


def fold(events, params=None):
    p = None
    for e in events:
        p, _ = update_profile(p, e, params)
    return p


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


@given(event_lists, st.randoms())
@settings(max_examples=200)
def test_decay_is_order_consistent(events, rnd):
    shuffled = list(events)
    rnd.shuffle(shuffled)
    a, b = fold(events), fold(shuffled)
    assert a.counts == b.counts and a.last_type_ms == b.last_type_ms and a.last_ms == b.last_ms
    assert a.first_ms == b.first_ms
    for x, y in [(a.rate_short, b.rate_short), (a.rate_long, b.rate_long), (a.spend_decayed, b.spend_decayed),
                 (a.spend_total, b.spend_total), *zip(a.hours, b.hours, strict=True)]:  # fmt: skip
        assert close(x, y)
    assert a.categories.keys() == b.categories.keys()
    assert all(close(a.categories[k], b.categories[k]) for k in a.categories)


@given(event_lists)
def test_redelivery_changes_nothing_and_inputs_are_not_mutated(events):
    p = fold(events)
    snapshot = orjson.dumps(p.to_dict())
    for e in events[-5:]:  # recent ids are remembered
        q, applied = update_profile(p, e)
        assert not applied and q is p
    q, _ = update_profile(p, Event("new", "click", "u", p.last_ms + 1))
    assert orjson.dumps(p.to_dict()) == snapshot


@given(st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=200))
def test_size_is_bounded(categories):
    params = ProfileParams()
    p = None
    for i, c in enumerate(categories):
        p, _ = update_profile(p, Event(f"evt-{i:012d}", "payment", "u", i * 60_000, amount=9.99, category=c), params)
    assert len(p.categories) <= params.top_k_categories
    assert len(p.seen) <= params.dedup_ids
    assert len(orjson.dumps(p.to_dict())) <= 1100
    assert Profile.from_dict(orjson.loads(orjson.dumps(p.to_dict()))).to_dict() == p.to_dict()


def test_active_hours_use_the_users_local_time():
    # 23:30 UTC is 07:30 the next morning in UTC+8
    p, _ = update_profile(None, Event("e", "click", "u", 23 * 3_600_000 + 1_800_000, tz_offset_min=480))
    assert p.hours[7] == 1.0 and sum(p.hours) == 1.0


def test_expiry_runs_on_event_time():
    p, _ = update_profile(None, Event("e", "click", "u", 0))
    assert not is_expired(p, now_ms=30 * DAY_MS, ttl_ms=30 * DAY_MS)
    assert is_expired(p, now_ms=30 * DAY_MS + 1, ttl_ms=30 * DAY_MS)
