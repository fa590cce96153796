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
