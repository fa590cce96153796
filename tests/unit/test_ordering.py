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


def test_a_partition_paused_by_the_merge_is_not_caught_up_until_fetched_again():
    """The shell pauses a topic-partition while the merge holds its messages, so its highwater is not refreshed:
    once the merge drained it, position == highwater says nothing about what arrived meanwhile. A restarted
    worker catching up applied clicks 4.6 s of feed ahead of likes that way (fault matrix, kill_50)."""
    import time

    from faust.types import TP

    from stream_app.transport import BatchFeed

    clicks, likes = TP("clicks", 0), TP("likes", 0)

    polled: dict = {}  # when each partition's highwater was last updated (aiokafka's partition state)

    class Consumer:  # Faust's consumer, as arrange uses it
        flow_active = True
        _thread = SimpleNamespace(last_poll_ms=polled.get)
        hw: dict = {}  # noqa: RUF012

        def highwater(self, tp):
            return self.hw.get(tp)

        def pause_partitions(self, tps):
            pass

        def resume_partitions(self, tps):
            pass

    consumer, positions = Consumer(), {}
    feed = BatchFeed(frozenset({"clicks", "likes"}), merge=EventTimeMerge({"clicks", "likes"}))

    def fetch(*messages, **state):
        for tp, (position, highwater) in state.items():
            positions[TP(tp, 0)], consumer.hw[TP(tp, 0)] = position, highwater
        return [ts_of(m) for m in feed.arrange(consumer, list(messages), positions)]

    long_ago = int(time.time() * 1000) - 60_000
    polled.update({clicks: long_ago, likes: long_ago})
    # clicks have more to read; likes read to their end: everything up to the clicks' frontier goes
    assert fetch(msg("clicks", 10), msg("clicks", 20), msg("likes", 15), msg("likes", 100),
                 clicks=(2, 5), likes=(2, 2)) == [10, 15, 20]  # fmt: skip
    assert feed.paused == {likes}  # likes at 100 held: likes is paused (not fetched)
    # clicks catch up; likes (paused, so not fetched) drains: a like at 50 arrived meanwhile, unread
    assert fetch(msg("clicks", 30), msg("clicks", 200), clicks=(4, 4)) == [30, 100]
    assert feed.paused == {clicks} and likes in feed.resumed_at
    # likes' position equals its highwater, but that highwater predates its pause: not caught up, clicks wait
    assert fetch() == []
    # a fetch of likes after the resume brings the like at 50, and likes is caught up: both go, in order
    polled[likes] = int(time.time() * 1000) + 1
    assert fetch(msg("likes", 50), likes=(3, 3)) == [50, 200]
