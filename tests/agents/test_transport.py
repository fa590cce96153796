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
