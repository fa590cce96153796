"""A real Kafka broker for integration tests, and a way to run real workers against it.

Broker, in order: ``KAFKA_BOOTSTRAP_SERVERS`` if set; a testcontainers Kafka when a Docker engine
answers; otherwise the project's own local broker (stream_app.kafka_local). If none can be had the
tests fail with the reason: an integration test never skips silently.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from stream_app.demo import stop_process
from stream_app.kafka_local import BrokerError, LocalKafka, kafka_version, metadata_round_trip
from stream_app.settings import Settings


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    given = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if given:
        if not metadata_round_trip(given, timeout=20):
            pytest.fail(f"KAFKA_BOOTSTRAP_SERVERS={given} is set but no broker answers there")
        print(f"\n[kafka] using KAFKA_BOOTSTRAP_SERVERS={given}")
        yield given
        return
    if _docker_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer(f"apache/kafka:{kafka_version()}").with_kraft() as kc:
            print(f"\n[kafka] testcontainers apache/kafka:{kafka_version()}")
            yield kc.get_bootstrap_server()
        return
    port = int(os.environ.get("STREAM_APP_TEST_KAFKA_PORT", "19092"))
    local = LocalKafka(port=port)
    started = local.pid() is None
    try:
        took = local.up()
    except BrokerError as e:
        pytest.fail(f"no Kafka broker for integration tests (no KAFKA_BOOTSTRAP_SERVERS, no Docker engine, "
                    f"local broker failed): {e}")  # fmt: skip
    print(f"\n[kafka] local Apache Kafka {kafka_version()} at {local.bootstrap}, ready in {took:.1f}s")
    print(f"[kafka] broker log: {local.log_file}")
    yield local.bootstrap
    if started:
        local.down()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def unique() -> str:
    """A per-test suffix for topic names and app ids, so tests never see each other's data."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def app_settings(kafka_bootstrap: str, unique: str, tmp_path: Path) -> Settings:
    """Settings for one test: its own app id, topics, data dir and web port."""
    return Settings(
        app_id=f"it-{unique}",
        broker=";".join(f"kafka://{h}" for h in kafka_bootstrap.split(",")),
        datadir=str(tmp_path / "data"),
        web_port=free_port(),
    ).with_topic_suffix(unique)


@pytest.fixture
def worker_env(app_settings: Settings) -> dict[str, str]:
    return {**os.environ, **app_settings.to_env()}


@contextlib.contextmanager
def running_worker(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """A real `stream-app worker` process; stopped with SIGTERM (clean shutdown) on exit."""
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "stream_app", "worker"], env=env, stdout=out, stderr=out)
    try:
        yield proc
    finally:
        stop_process(proc)


def wait_until(cond, timeout: float, proc: subprocess.Popen, log: Path, what: str) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            pytest.fail(f"worker exited {proc.returncode} waiting for {what}:\n{log.read_text()[-3000:]}")
        if cond():
            return time.monotonic() - t0
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout}s waiting for {what}:\n{log.read_text()[-3000:]}")
