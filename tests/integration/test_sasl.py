"""SASL (SCRAM-SHA-512) over TLS end to end, on a secured local broker of this module's own.

The broker (stream_app.kafka_local in secured mode) has its own ports and home under a temp dir, so it
never touches the shared broker of conftest.py. Everything the app does goes through the SASL_SSL
listener with the project's own connection settings: ``client_kwargs`` for plain aiokafka clients and
the STREAM_APP_BROKER_* variables for a real worker process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import urllib.request
import uuid
from collections.abc import Iterator

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError
from pydantic import SecretStr

from stream_app.app import client_kwargs
from stream_app.kafka_local import BrokerError, LocalKafka
from stream_app.settings import Settings
from tests.integration.conftest import free_port, running_worker, wait_until

pytestmark = pytest.mark.integration

# Distinctive, so that finding it anywhere in a log is unambiguous.
PASSWORD = f"pw-{uuid.uuid4().hex}"
USER = "stream-app"


@pytest.fixture(scope="module")
def secured_broker(tmp_path_factory) -> Iterator[LocalKafka]:
    """A SASL_SSL broker for this module; stopped at the end whatever happened (also if ``up`` failed)."""
    home = tmp_path_factory.mktemp("sasl-kafka-home")
    broker = LocalKafka(
        port=free_port(), controller_port=free_port(), sasl_port=free_port(), home=home, heap="512M",
        scram_user=USER, scram_password=PASSWORD,
    )  # fmt: skip
    try:
        try:
            took = broker.up(timeout=90)
        except BrokerError as e:
            pytest.fail(f"secured local broker did not start: {e}")
        print(f"\n[sasl] secured broker ready in {took:.1f}s at {broker.sasl_bootstrap} (log: {broker.log_file})")
        yield broker
    finally:
        broker.down()


def settings_for(broker: LocalKafka, tmp_path, unique: str) -> Settings:
    return Settings(
        app_id=f"sasl-{unique}",
        broker=f"kafka://{broker.sasl_bootstrap}",
        datadir=str(tmp_path / "data"),
        web_port=free_port(),
        topic_partitions=1,
        broker_credentials_mechanism="SCRAM-SHA-512",
        broker_username=USER,
        broker_password=SecretStr(PASSWORD),
        broker_cafile=str(broker.cafile),
    ).with_topic_suffix(unique)


def metric(port: int, *prefixes: str) -> float:
    """Sum of the worker's metric samples whose line starts with one of ``prefixes`` (-1: not serving)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            body = r.read().decode()
    except OSError:
        return -1.0
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(prefixes))


async def create_topics(s: Settings) -> list[str]:
    admin = AIOKafkaAdminClient(**client_kwargs(s))
    await admin.start()
    try:
        layout = s.topic_layout()
        await admin.create_topics([NewTopic(n, p, 1, topic_configs=c) for n, (p, c) in layout.items()])
        return sorted(set(await admin.list_topics()) & set(layout))
    finally:
        await admin.close()


async def produce(s: Settings, records: list[tuple[str, bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(**client_kwargs(s), acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for topic, key, value in records:
            await producer.send_and_wait(topic, value=value, key=key)
    finally:
        await producer.stop()


async def read_all(s: Settings, topic: str, want: int, timeout: float) -> list[bytes]:
    """Up to ``want`` committed values of ``topic`` (one of the app's topics) from its beginning."""
    consumer = AIOKafkaConsumer(
        **client_kwargs(s), group_id=None, enable_auto_commit=False, isolation_level="read_committed",
        auto_offset_reset="earliest",
    )  # fmt: skip
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(s.topic_layout()[topic][0])])
        out: list[bytes] = []
        deadline = time.monotonic() + timeout
        while len(out) < want and time.monotonic() < deadline:
            for msgs in (await consumer.getmany(timeout_ms=300)).values():
                out.extend(m.value for m in msgs)
        return out
    finally:
        await consumer.stop()


def test_settings_never_print_the_password(tmp_path):
    broker = LocalKafka(port=1, sasl_port=2, home=tmp_path, scram_user=USER, scram_password=PASSWORD)  # not started
    s = settings_for(broker, tmp_path, "print")
    for shown in (repr(s), str(s), s.model_dump_json(), repr(s.model_dump()), repr(broker)):
        assert PASSWORD not in shown
    assert "**********" in repr(s)
    assert s.to_env()["STREAM_APP_BROKER_PASSWORD"] == PASSWORD  # only to hand it to a worker process


def test_worker_over_sasl_ssl(secured_broker, tmp_path):
    t0 = time.monotonic()
    unique = uuid.uuid4().hex[:10]
    s = settings_for(secured_broker, tmp_path, unique)

    # (a) topics created through the SASL_SSL listener with the project's client settings
    assert client_kwargs(s)["security_protocol"] == "SASL_SSL"
    assert asyncio.run(create_topics(s)) == sorted(s.topic_layout())

    # (b) a real worker, configured only through STREAM_APP_* variables, one valid and one malformed event
    env = {**os.environ, **s.to_env()}
    log = tmp_path / "worker.log"
    port = s.web_port
    now_ms = int(time.time() * 1000)
    valid = orjson.dumps({"event_id": "e1", "type": "click", "user_id": "u1", "ts": now_ms})
    with running_worker(env, log) as proc:
        to_web = wait_until(lambda: metric(port, "stream_app_events_consumed_total") >= 0, 60, proc, log, "web")
        asyncio.run(produce(s, [(s.clicks_topic, b"u1", valid), (s.clicks_topic, b"u2", b"{broken")]))
        consumed = lambda: metric(port, "stream_app_events_consumed_total{")  # noqa: E731
        rejected = lambda: metric(port, "stream_app_events_rejected_total{")  # noqa: E731
        to_done = wait_until(lambda: consumed() >= 1 and rejected() >= 1, 60, proc, log, "both events")
        assert (consumed(), rejected()) == (1, 1)
        dead = asyncio.run(read_all(s, s.dead_letter_topic, want=1, timeout=30))
    print(f"\n[sasl] worker web up in {to_web:.1f}s; both events handled {to_done:.1f}s after producing")
    (record,) = (orjson.loads(v) for v in dead)
    assert record["error_code"] == "malformed_json"
    assert record["source_topic"] == s.clicks_topic

    # (c) the password is in no log: the worker's (info level) nor the broker's
    text = log.read_text(errors="replace")
    assert f"Authenticated as {USER} via SCRAM-SHA-512" in text  # aiokafka's line: the worker logged in
    assert PASSWORD not in text
    for f in (secured_broker.log_file, secured_broker.dir / "logs" / "stdout.log"):
        assert PASSWORD not in f.read_text(errors="replace")
    print(f"[sasl] worker test took {time.monotonic() - t0:.1f}s")


def test_wrong_password_fails_fast_with_an_authentication_error(secured_broker, tmp_path, caplog):
    s = settings_for(secured_broker, tmp_path, "wrong").model_copy(update={"broker_password": SecretStr("not-it")})

    async def connect() -> None:
        admin = AIOKafkaAdminClient(**client_kwargs(s))
        try:
            await admin.start()
        finally:
            await admin.close()

    t0 = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="aiokafka"), pytest.raises(KafkaConnectionError, match="bootstrap"):
        asyncio.run(asyncio.wait_for(connect(), 30))
    took = time.monotonic() - t0
    assert took < 10, f"a wrong password took {took:.1f}s to fail"
    # aiokafka gives up on bootstrap and logs the broker's answer: the SASL authentication failure
    reasons = " ".join(r.getMessage() for r in caplog.records)
    assert "SaslAuthenticationFailed" in reasons and "invalid credentials" in reasons, reasons
    assert "not-it" not in reasons and PASSWORD not in reasons
