import socket

import pytest

from stream_app.kafka_local import BrokerError, LocalKafka, kafka_version


def test_version_is_pinned_in_the_pom():
    v = kafka_version()
    assert v.count(".") == 2 and all(p.isdigit() for p in v.split("."))


def test_configs_bind_loopback_only(tmp_path):
    k = LocalKafka(port=29092, home=tmp_path)
    k._write_configs()
    props = (k.dir / "server.properties").read_text()
    assert "listeners=PLAINTEXT://127.0.0.1:29092,CONTROLLER://127.0.0.1:29093" in props
    assert "group.initial.rebalance.delay.ms=0" in props
    assert k.status() == "down (port 29092)"


def test_port_taken_is_a_clear_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(BrokerError, match=f"port 127.0.0.1:{port} is already taken"):
            LocalKafka(port=port, controller_port=port + 1, home=tmp_path).up(timeout=5)


def test_missing_java_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BrokerError, match="java not found"):
        LocalKafka(port=29192, home=tmp_path).up(timeout=5)
