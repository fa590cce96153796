"""The worker's Kafka consumer as Faust builds it, with the settings' fetch wait (no broker needed)."""

import asyncio

import pytest

from stream_app.app import create_app
from stream_app.settings import Settings


@pytest.mark.parametrize("wait_ms", [20, 250])
def test_the_worker_consumer_waits_for_data_as_long_as_the_settings_say(tmp_path, wait_ms):
    sa = create_app(Settings(app_id="transport-test", datadir=str(tmp_path), fetch_max_wait_ms=wait_ms), recover=False)
    thread = sa.app.consumer._thread  # Faust's consumer thread: it creates the aiokafka consumer on start

    async def create() -> tuple[int, str]:  # aiokafka wants a running loop
        consumer = thread._create_worker_consumer(sa.app.transport)
        await consumer.stop()
        return consumer._fetch_max_wait_ms, consumer._group_id

    fetch_wait, group = asyncio.run(create())
    assert fetch_wait == wait_ms  # Faust alone would use 1500
    assert group == "transport-test"  # everything else as Faust configures it


def test_faust_end_offset_gauge_is_set_per_partition_through_the_bound_child(tmp_path):
    from faust.types import TP

    sa = create_app(Settings(app_id="monitor-test", datadir=str(tmp_path)), recover=False)
    for tp, offset in ((TP("clicks", 0), 10), (TP("clicks", 1), 7), (TP("clicks", 0), 42)):
        sa.app.monitor.track_tp_end_offset(tp, offset)
    value = sa.metrics.registry.get_sample_value
    assert value("faust_topic_partition_end_offset", {"topic": "clicks", "partition": "0"}) == 42
    assert value("faust_topic_partition_end_offset", {"topic": "clicks", "partition": "1"}) == 7
    assert sa.app.monitor.tp_end_offsets[TP("clicks", 0)] == 42  # Faust's own lag bookkeeping still sees it


def test_no_offset_is_committed_over_a_record_that_was_not_processed(tmp_path):
    """Faust 0.15 commits past the record at the committed offset when that one record is not acked (and
    checks nothing at all when the committed offset is 0): a record the worker dropped there was lost. The
    worker's consumer commits past it only once it is acked, or known to hold no record."""
    from faust.transport.drivers.aiokafka import Consumer as FaustConsumer
    from faust.types import TP

    sa = create_app(Settings(app_id="offsets-test", datadir=str(tmp_path)), recover=False)
    consumer = sa.app.consumer
    tp = TP("payments", 0)

    def new_offset(committed, acked, cls=None):
        consumer._committed_offset[tp] = committed
        consumer._acked[tp] = list(acked)
        consumer._acked_index[tp] = set(acked)
        return (cls or type(consumer))._new_offset(consumer, tp)

    for committed in (0, 10):
        assert new_offset(committed, [committed + 1, committed + 2], FaustConsumer) == committed + 3  # the hole
        assert new_offset(committed, [committed + 1, committed + 2]) is None  # record `committed` unacked
        assert new_offset(committed, [committed, committed + 1, committed + 2]) == committed + 3
        assert new_offset(committed, [committed + 3]) is None

    # fetching after a seek to 10 began at 12: 10 and 11 hold no records (e.g. transaction markers)
    consumer._gap.pop(tp, None)
    consumer.note_first_after_seek(tp, 10, 12)
    assert new_offset(10, [12, 13]) == 14
    # nothing committed yet: fetching began at the log's first record, which is where committing starts
    consumer._gap.pop(tp, None)
    consumer._committed_offset.pop(tp, None)
    consumer.note_first_after_seek(tp, None, 5)
    assert consumer._committed_offset[tp] == 5
    assert new_offset(5, [6, 7]) is None
    assert new_offset(5, [5, 6, 7]) == 8
