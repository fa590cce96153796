import shutil
import socket
import ssl

import pytest

from stream_app.kafka_local import (
    BrokerError,
    LocalKafka,
    _run,
    kafka_version,
    make_tls_material,
    server_properties,
)


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


def test_default_mode_is_unchanged_plaintext(tmp_path):
    props = server_properties(29092, 29093, tmp_path / "data")
    assert "SASL" not in props and "ssl." not in props
    assert "advertised.listeners=PLAINTEXT://127.0.0.1:29092\n" in props
    assert "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT\n" in props
    assert LocalKafka(port=29092, home=tmp_path).secured is False


def test_secured_mode_adds_a_sasl_ssl_listener_only_for_clients(tmp_path):
    k = LocalKafka(port=29092, sasl_port=29094, home=tmp_path, scram_password="s3cret")
    k._write_configs()
    props = (k.dir / "server.properties").read_text()
    assert "listeners=PLAINTEXT://127.0.0.1:29092,SASL_SSL://127.0.0.1:29094,CONTROLLER://127.0.0.1:29093\n" in props
    assert "advertised.listeners=PLAINTEXT://127.0.0.1:29092,SASL_SSL://127.0.0.1:29094\n" in props
    assert "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL\n" in props
    assert "inter.broker.listener.name=PLAINTEXT\n" in props  # broker-internal traffic stays plaintext
    assert "listener.name.sasl_ssl.sasl.enabled.mechanisms=SCRAM-SHA-512\n" in props
    assert "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram." in props
    assert f"listener.name.sasl_ssl.ssl.keystore.location={k.tls_dir / 'broker.p12'}\n" in props
    assert "s3cret" not in props  # the SCRAM password only goes to kafka-storage format
    assert k.sasl_bootstrap == "127.0.0.1:29094"
    assert k.cafile == k.dir / "tls" / "ca.pem"


def test_scram_password_is_not_in_the_repr_nor_in_errors(tmp_path):
    k = LocalKafka(port=29092, sasl_port=29094, home=tmp_path, scram_password="s3cret-pw")
    assert "s3cret-pw" not in repr(k) and "s3cret-pw" not in str(k)
    assert k._scram_spec() == "SCRAM-SHA-512=[name=stream-app,password=s3cret-pw]"
    with pytest.raises(BrokerError) as e:
        _run(["sh", "-c", "echo bad password s3cret-pw; exit 3"], secrets=("s3cret-pw",))
    assert "s3cret-pw" not in str(e.value) and "bad password **********" in str(e.value)


def test_sasl_client_kwargs_trust_the_local_ca(tmp_path):
    k = LocalKafka(port=29092, sasl_port=29094, home=tmp_path, scram_user="app", scram_password="pw-1")
    k.tls_dir.mkdir(parents=True)
    k.cafile.write_text(SELF_SIGNED_PEM)
    kw = k.sasl_client_kwargs()
    assert {key: kw[key] for key in ("bootstrap_servers", "security_protocol", "sasl_mechanism")} == {
        "bootstrap_servers": "127.0.0.1:29094", "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
    }  # fmt: skip
    assert (kw["sasl_plain_username"], kw["sasl_plain_password"]) == ("app", "pw-1")
    assert kw["ssl_context"].verify_mode == ssl.CERT_REQUIRED and kw["ssl_context"].check_hostname
    assert k.sasl_client_kwargs(password="other")["sasl_plain_password"] == "other"
    with pytest.raises(BrokerError, match="no SASL_SSL listener"):
        _ = LocalKafka(port=29092, home=tmp_path).sasl_bootstrap


@pytest.mark.parametrize(
    ("user", "password", "message"),
    [
        ("app", "", "needs a non-empty scram_password"),
        ("", "pw", "needs a non-empty scram_user"),
        ("app", "a,b]", "scram_password may only use"),
        ("a=b", "pw", "scram_user may only use"),
    ],
)
def test_unusable_scram_credentials_are_refused_before_anything_starts(tmp_path, user, password, message):
    k = LocalKafka(port=29092, sasl_port=29094, home=tmp_path, scram_user=user, scram_password=password)
    with pytest.raises(BrokerError, match=message):
        k.up(timeout=5)
    assert not k.dir.exists()


def test_a_data_dir_formatted_for_another_scram_user_is_a_clear_error(tmp_path):
    k = LocalKafka(port=29092, sasl_port=29094, home=tmp_path, scram_user="new", scram_password="pw")
    (k.dir / "data").mkdir(parents=True)
    (k.dir / "data" / "meta.properties").write_text("version=1\n")
    (k.dir / "scram-user").write_text("old")
    with pytest.raises(BrokerError, match="formatted with SCRAM user 'old', not 'new'"):
        k.up(timeout=5)
    (k.dir / "scram-user").unlink()  # formatted in plaintext mode: no SCRAM user at all
    with pytest.raises(BrokerError, match="formatted with SCRAM user None"):
        k.up(timeout=5)


@pytest.mark.skipif(shutil.which("keytool") is None, reason="keytool comes with the Java runtime")
def test_tls_material_is_a_ca_and_a_broker_certificate_for_loopback(tmp_path):
    took = make_tls_material(tmp_path / "tls")
    ca = tmp_path / "tls" / "ca.pem"
    assert {p.name for p in (tmp_path / "tls").iterdir()} >= {"ca.pem", "ca.p12", "broker.p12", "broker.pem"}
    assert not (tmp_path / "tls.partial").exists()
    ssl.create_default_context(cafile=str(ca))  # a CA Python's ssl accepts
    decoded = ssl._ssl._test_decode_cert(str(tmp_path / "tls" / "broker.pem"))  # type: ignore[attr-defined]
    assert ("IP Address", "127.0.0.1") in decoded["subjectAltName"]
    assert dict(x[0] for x in decoded["issuer"])["commonName"] == "stream-app local CA"
    print(f"\n[tls] keytool made the CA and broker keystore in {took:.1f}s")


# Any self-signed certificate will do where only loading a CA file is tested.
SELF_SIGNED_PEM = """\
-----BEGIN CERTIFICATE-----
MIIBhTCCASugAwIBAgIUIj6qcFzgHR8P1h2qg9zjAksSZNAwCgYIKoZIzj0EAwIw
FzEVMBMGA1UEAwwMdW5pdC10ZXN0IENBMCAXDTI2MTEyMzAxNTY0NloYDzIxMjYx
MDMwMDE1NjQ2WjAXMRUwEwYDVQQDDAx1bml0LXRlc3QgQ0EwWTATBgcqhkjOPQIB
BggqhkjOPQMBBwNCAAQj7+PX/KIE56Id+ELfocMs7WyXAhBAMZsnMOWaC6KFHtDE
Wxc/QuNAK2cMrVGpw4BsPzWJneY52mitx5e03n2Ho1MwUTAdBgNVHQ4EFgQUO9ZD
LcWsWcyV1pe9mu8LLreyUHkwHwYDVR0jBBgwFoAUO9ZDLcWsWcyV1pe9mu8LLrey
UHkwDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNIADBFAiAg8Fyqr5C4opBT
KcjBM/HDYDZ+jKshgOrm2t8nOKJPJgIhAOfX7eLsSqg0JUw9AgrAl/0UFIltzVpZ
Yj+KyDwX6AY5
-----END CERTIFICATE-----
"""
