"""A worker whose broker is gone still stops: SIGTERM ends it within ``shutdown_timeout_s``.

Faust 0.15's stop waits forever for a broker that does not answer (its consumer thread never stops, then the
event loop hangs gathering futures), so without a bound a SIGTERM alone never ends the process: the bench's
timed-out runs left workers behind that only SIGKILL ended. The broker here is this module's own (its own
ports and home), so stopping it never touches the shared broker of conftest.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time

import pytest

from stream_app.kafka_io import create_topics
from stream_app.kafka_local import BrokerError, LocalKafka
from stream_app.settings import Settings
from tests.integration.conftest import free_port, running_worker, wait_until
from tests.integration.test_profiles_on_kafka import metric

pytestmark = pytest.mark.integration


def test_a_worker_whose_broker_is_gone_exits_within_the_shutdown_timeout(tmp_path, unique):
    broker = LocalKafka(port=free_port(), controller_port=free_port(), home=tmp_path / "kafka-home", heap="512M")
    try:
        try:
            broker.up(timeout=90)
        except BrokerError as e:
            pytest.fail(f"this test's local broker did not start: {e}")
        s = Settings(
            app_id=f"stop-{unique}", broker=f"kafka://{broker.bootstrap}", datadir=str(tmp_path / "data"),
            web_port=free_port(), topic_partitions=1, shutdown_timeout_s=5.0,
        ).with_topic_suffix(unique)  # fmt: skip
        asyncio.run(create_topics(broker.bootstrap, s.topic_layout()))
        log = tmp_path / "worker.log"
        with running_worker({**os.environ, **s.to_env()}, log) as proc:
            port = str(s.web_port)
            wait_until(lambda: metric(port, "stream_app_events_consumed_total") >= 0, 90, proc, log, "the web server")
            wait_until(lambda: "[^Worker]: Ready" in log.read_text(errors="replace"), 90, proc, log, "the worker ready")
            broker.down()
            time.sleep(2)  # the worker's clients notice the broker is gone
            proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            try:
                rc = proc.wait(5.0 + 25)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the worker did not exit within 30 s of SIGTERM:\n{log.read_text()[-3000:]}")
            took = time.monotonic() - t0
        text = log.read_text(errors="replace")
        print(f"\n[stop] broker gone, SIGTERM: rc={rc} after {took:.1f}s")
        assert rc == 1, text[-3000:]  # not a clean stop: nothing committed, so the next worker redoes the work
        assert "did not stop within 5 s of SIGTERM" in text, text[-3000:]
    finally:
        broker.down()
