"""Event-time timers: the partitioner matches Kafka's, the index fires each user once, and firing timers
gives the same outputs however the watermark advanced (so Kafka partitions and a replay agree)."""

from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as kafka_murmur2
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_app.core.pipeline import advance, next_due_ms, tick
from stream_app.core.profile import DAY_MS, HOUR_MS
from stream_app.core.timers import Timers, murmur2, partition_for
from tests.unit.test_pipeline import CONFIG, MODELS, NOON, clicks, feed


@given(st.binary(max_size=64))
def test_murmur2_is_kafkas(data):
    assert murmur2(data) == kafka_murmur2(data)


@given(st.text(min_size=1, max_size=40), st.integers(1, 64))
def test_partition_for_is_the_default_partitioners_choice(user, n):
    assert partition_for(user, n) == DefaultPartitioner()(user.encode(), list(range(n)), list(range(n)))


def test_each_user_pops_once_at_its_earliest_due_time_and_stale_entries_are_skipped():
    t = Timers()
    t.schedule(0, "u", 500)
    t.schedule(0, "u", 200)  # earlier wins
    t.schedule(0, "u", 900)  # later is ignored while an earlier entry is pending
    t.schedule(1, "v", 100)  # another partition's watermark is separate
    t.advance(0, 199)
    assert t.pop_due(0) == []
    t.advance(0, 600)
    assert t.pop_due(0) == ["u"]  # the stale 500 entry does not pop it a second time
    assert t.pop_due(0) == [] and len(t) == 1  # only v (partition 1) remains
    assert t.advance(0, 10) == 600  # late events never move the watermark back
    t.clear()
    assert len(t) == 0 and t.pop_due(1) == []


def test_next_due_is_the_earliest_label_window_lapse_or_ttl():
    state, _ = feed(clicks(n=4))
    (pending,) = state.pending
    assert next_due_ms(state, CONFIG) == pending.closes_at_ms + 1
    closed, out = tick(state, "u", pending.closes_at_ms + 1, MODELS, CONFIG)
    assert [lbl.converted for lbl in out.labels] == [False] and not closed.pending
    # no buyer: no win-back campaign applies, yet the lapse timer is due (eligibility is checked when it fires)
    assert next_due_ms(closed, CONFIG) == closed.profile.last_ms + 7 * DAY_MS


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 40 * 24), min_size=1, max_size=12))
def test_firing_timers_does_not_depend_on_how_the_watermark_advanced(steps_h):
    start, _ = feed(clicks(n=4))
    end = NOON + 40 * DAY_MS
    one_step, all_at_once = advance(start, "u", end, MODELS, CONFIG)
    state, outs = start, []
    for h in [*sorted(steps_h), 40 * 24]:
        if state is None:
            break
        state, out = advance(state, "u", NOON + h * HOUR_MS, MODELS, CONFIG)
        outs.append(out)
    assert (state.to_dict() if state else None) == (one_step.to_dict() if one_step else None)
    assert [d.decision_id for o in outs for d in o.decisions] == [d.decision_id for d in all_at_once.decisions]
    assert [lbl.decision_id for o in outs for lbl in o.labels] == [lbl.decision_id for lbl in all_at_once.labels]


def test_a_user_expires_after_the_ttl_and_open_windows_are_labelled_negative():
    state, _ = feed(clicks(n=4))
    gone, out = advance(state, "u", state.profile.last_ms + CONFIG.profile_ttl_ms + 1, MODELS, CONFIG)
    assert gone is None and out.expired and len(out.labels) == 1 and not out.labels[0].converted
