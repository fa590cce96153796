from hypothesis import given
from hypothesis import strategies as st

from stream_app.core.counts import count_event
from stream_app.core.events import EVENT_TYPES, Event

events = st.lists(st.tuples(st.integers(0, 30), st.sampled_from(EVENT_TYPES)), max_size=60)


@given(events)
def test_each_event_id_counts_once_and_inputs_are_not_mutated(evs):
    state = None
    for i, t in evs:
        before = {"counts": dict(state["counts"]), "seen": list(state["seen"])} if state else None
        new, _ = count_event(state, Event(f"e{i}", t, "u", i), dedup_ids=64)
        assert state == before  # a Faust table only persists what is assigned, so never mutate in place
        state = new
    first_type = {}
    for i, t in evs:
        first_type.setdefault(i, t)  # a redelivery carries the same event; only the first one counts
    counts = state["counts"] if state else {}
    for t in EVENT_TYPES:
        assert counts.get(t, 0) == list(first_type.values()).count(t)


@given(st.integers(1, 50), st.integers(1, 200))
def test_dedup_memory_is_bounded(window, n):
    state = None
    for i in range(n):
        state, applied = count_event(state, Event(f"e{i}", "click", "u", i), dedup_ids=window)
        assert applied
    assert len(state["seen"]) == min(window, n)
    assert state["counts"]["click"] == n
