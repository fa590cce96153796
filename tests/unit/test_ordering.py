"""The event-time merge of a partition's input topics (stream_app.ordering)."""

from __future__ import annotations

from types import SimpleNamespace

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_app.ordering import NO_TIME, EventTimeMerge

TOPICS = ("clicks", "likes", "payments")


def msg(topic: str, ts: int, partition: int = 0, offset: int = 0) -> SimpleNamespace:
    return SimpleNamespace(topic=topic, partition=partition, offset=offset, value=orjson.dumps({"ts": ts}))


def ts_of(m: SimpleNamespace) -> int:
    return orjson.loads(m.value)["ts"]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(TOPICS), st.integers(0, 50)), max_size=120),  # (topic, ts step)
    st.lists(st.integers(1, 30), min_size=1, max_size=10),  # fetch sizes per topic
)
def test_a_backlog_is_released_in_event_time_order_without_loss_or_reordering_within_a_topic(steps, fetch_sizes):
    """Three topics with non-decreasing event times each, fetched in chunks of different sizes (as a backlog
    is: one topic's chunk spans far more event time than another's): the merge hands every message over
    once, in event-time order across topics, and in Kafka order within each topic."""
    clock = dict.fromkeys(TOPICS, 0)
    per_topic: dict[str, list] = {t: [] for t in TOPICS}
    for topic, step in steps:
        clock[topic] += step
        per_topic[topic].append(msg(topic, clock[topic], offset=len(per_topic[topic])))
    merge, out, pos = EventTimeMerge(TOPICS), [], dict.fromkeys(TOPICS, 0)
    i = 0
    while any(pos[t] < len(per_topic[t]) for t in TOPICS):
        for t in TOPICS:  # a fetch: a chunk of each topic not held back (held ones are paused)
            if (t, 0) in merge.holding():
                continue
            n = fetch_sizes[i % len(fetch_sizes)]
            merge.add(per_topic[t][pos[t] : pos[t] + n])
            pos[t] += n
            i += 1
        out += merge.release(lambda t, p: pos[t] >= len(per_topic[t]))
    out += merge.release(lambda t, p: True)
    assert sorted(map(id, out)) == sorted(id(m) for ms in per_topic.values() for m in ms)  # each once
    assert [ts_of(m) for m in out] == sorted(ts_of(m) for m in out)  # event-time order across topics
    for t in TOPICS:
        assert [m.offset for m in out if m.topic == t] == list(range(len(per_topic[t])))
    assert merge.forced == 0 and len(merge) == 0


def test_partitions_do_not_wait_for_each_other():
    merge = EventTimeMerge(TOPICS)
    merge.add([msg("clicks", 100, partition=0), msg("clicks", 5, partition=1), msg("likes", 7, partition=1)])
    released = merge.release(lambda t, p: p == 0 or t == "payments")  # partition 1 behind on clicks and likes
    assert [(m.partition, ts_of(m)) for m in released] == [(0, 100), (1, 5)]
    assert merge.holding() == {("likes", 1)}


def test_what_is_held_is_bounded():
    """A topic that never catches up cannot make the merge hold more than max_held of a partition."""
    merge = EventTimeMerge(TOPICS, max_held=10)
    merge.add([msg("clicks", 1)])  # clicks read up to ts 1, more to come, never arrives
    merge.add([msg("payments", 100 + i) for i in range(25)])
    released = merge.release(lambda t, p: t == "likes")
    assert len(merge) == 10 and merge.forced == 15 and ts_of(released[0]) == 1


def test_a_topic_never_read_holds_the_others_back():
    """Until a topic-partition has been read or is known to be caught up, nothing can be released past it."""
    merge = EventTimeMerge(TOPICS)
    merge.add([msg("clicks", 10), msg("likes", 20)])
    assert merge.release(lambda t, p: False) == []
    assert [ts_of(m) for m in merge.release(lambda t, p: t == "payments")] == [10]


def test_unreadable_event_times_are_released_at_once():
    merge = EventTimeMerge(TOPICS)
    merge.add([SimpleNamespace(topic="clicks", partition=0, offset=0, value=b"not json")])
    merge.add([msg("likes", 50)])
    released = merge.release(lambda t, p: False)
    assert [m.value for m in released] == [b"not json"]
    assert merge.frontier.get(("clicks", 0), NO_TIME) == NO_TIME


def test_clear_drops_everything_held():
    merge = EventTimeMerge(TOPICS)
    merge.add([msg("clicks", 10), msg("likes", 20)])
    assert len(merge.clear()) == 2 and len(merge) == 0 and not merge.holding()
