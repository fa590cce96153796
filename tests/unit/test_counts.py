from hypothesis import given
from hypothesis import strategies as st

from stream_app.core.counts import count_event
from stream_app.core.events import EVENT_TYPES, Event


@given(st.lists(st.sampled_from(EVENT_TYPES), max_size=50))
def test_counts_sum_to_events_and_inputs_are_not_mutated(types):
    state = None
    for i, t in enumerate(types):
        before = dict(state) if state else None
        new = count_event(state, Event(f"e{i}", t, "u", i))
        assert state == before  # a Faust table only persists what is assigned, so never mutate in place
        state = new
    assert sum((state or {}).values()) == len(types)
    for t in EVENT_TYPES:
        assert (state or {}).get(t, 0) == types.count(t)
