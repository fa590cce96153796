"""A real single-node Apache Kafka (KRaft) broker on 127.0.0.1, built from the official jars.

Why not Docker: the project's machines have Java 17 and Maven but no Docker engine, and Debian ships
no Kafka package. Maven resolves the pinned broker runtime (``pom.xml`` beside this file) from Maven
Central into a cache directory; ``up`` formats a KRaft data dir once, starts ``kafka.Kafka`` and waits
for a real metadata round trip. ``up`` on a running broker is a no-op; ``down`` sends SIGTERM (clean
shutdown) and escalates to SIGKILL only after a timeout.

Secured mode (``sasl_port`` set) adds a SASL_SSL listener on 127.0.0.1 for clients: TLS with a local
CA and server certificate made once by the JDK's ``keytool``, and SCRAM-SHA-512 with one user created
when the data dir is formatted. Inter-broker and controller traffic, and the PLAINTEXT client port,
stay as they are (the PLAINTEXT port is also how ``up`` sees the broker start). Clients trust
``cafile`` (``STREAM_APP_BROKER_CAFILE``). There are no ACLs: any authenticated user may do anything.

Layout under ``home`` (default ``~/.cache/stream_app``, env ``STREAM_APP_HOME``)::

    kafka-libs-<version>/        jars (never committed; re-resolved only when missing)
    kafka-<port>/server.properties, log4j.properties, data/, logs/server.log, broker.pid
    kafka-<port>/tls/ca.pem, broker.p12     secured mode only (the CA's key stays in tls/ca.p12)
    kafka-<port>/scram-user                 secured mode: the SCRAM user the data dir was formatted with
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

POM = Path(__file__).with_name("pom.xml")
SCRAM_MECHANISM = "SCRAM-SHA-512"
# Protects only the local broker's keystore, which sits next to server.properties anyway.
KEYSTORE_PASSWORD = "stream-app-local-keystore"
# Characters --add-scram takes unquoted (it splits on ',' ']' '='); anything else is refused up front.
_SCRAM_SAFE = re.compile(r"[A-Za-z0-9._~+/@:-]+")


class BrokerError(RuntimeError):
    """The local broker could not be resolved, started or reached; the message says why."""


def kafka_version() -> str:
    """The pinned Kafka version, read from the pom so it lives in exactly one place."""
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    node = ET.parse(POM).getroot().find("m:properties/m:kafka.version", ns)
    assert node is not None and node.text
    return node.text.strip()


def default_home() -> Path:
    return Path(os.environ.get("STREAM_APP_HOME", Path.home() / ".cache" / "stream_app"))


@dataclass(frozen=True)
class LocalKafka:
    """One local broker, identified by its client port.

    ``sasl_port`` turns on secured mode: an extra SASL_SSL listener with SCRAM-SHA-512 user
    ``scram_user``/``scram_password`` (the password never appears in this object's repr).
    """

    port: int = 9092
    controller_port: int | None = None
    home: Path | None = None
    heap: str = "768M"
    sasl_port: int | None = None
    scram_user: str = "stream-app"
    scram_password: str = field(default="", repr=False)

    # -- paths ---------------------------------------------------------------------------------
    @property
    def root(self) -> Path:
        return (self.home or default_home()).expanduser().resolve()

    @property
    def libs(self) -> Path:
        return self.root / f"kafka-libs-{kafka_version()}"

    @property
    def dir(self) -> Path:
        return self.root / f"kafka-{self.port}"

    @property
    def log_file(self) -> Path:
        return self.dir / "logs" / "server.log"

    @property
    def pid_file(self) -> Path:
        return self.dir / "broker.pid"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def _controller_port(self) -> int:
        return self.controller_port or self.port + 1

    @property
    def secured(self) -> bool:
        return self.sasl_port is not None

    @property
    def sasl_bootstrap(self) -> str:
        """The SASL_SSL listener (secured mode only)."""
        if self.sasl_port is None:
            raise BrokerError("this broker has no SASL_SSL listener (no sasl_port)")
        return f"127.0.0.1:{self.sasl_port}"

    @property
    def tls_dir(self) -> Path:
        return self.dir / "tls"

    @property
    def cafile(self) -> Path:
        """PEM of the local CA that signed the broker's certificate: the clients' ``broker_cafile``."""
        return self.tls_dir / "ca.pem"

    def sasl_client_kwargs(self, password: str | None = None) -> dict[str, Any]:
        """aiokafka client arguments for the SASL_SSL listener (``password`` overrides, for tests)."""
        import ssl

        return {
            "bootstrap_servers": self.sasl_bootstrap,
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": SCRAM_MECHANISM,
            "sasl_plain_username": self.scram_user,
            "sasl_plain_password": self.scram_password if password is None else password,
            "ssl_context": ssl.create_default_context(cafile=str(self.cafile)),
        }

    # -- jars ----------------------------------------------------------------------------------
    def resolve_jars(self) -> Path:
        """Copy the broker's runtime classpath from Maven (cached in ~/.m2 and in ``libs``)."""
        marker = self.libs / ".complete"
        if marker.exists():
            return self.libs
        if shutil.which("mvn") is None:
            raise BrokerError("mvn not found on PATH: install Maven (and Java 17) to run a local broker")
        tmp = self.libs.with_suffix(".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [
            "mvn", "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
            f"-DoutputDirectory={tmp}", "-DincludeScope=runtime",
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr)[-2000:]
            raise BrokerError(f"Maven could not resolve Kafka {kafka_version()} jars:\n{tail}")
        shutil.rmtree(self.libs, ignore_errors=True)
        tmp.rename(self.libs)
        marker.touch()
        return self.libs

    # -- lifecycle -----------------------------------------------------------------------------
    def pid(self) -> int | None:
        """The broker's pid if its pid file names a live Kafka process."""
        try:
            pid = int(self.pid_file.read_text())
            os.kill(pid, 0)
        except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return pid
        return pid if b"kafka.Kafka" in cmdline else None

    def status(self) -> str:
        pid = self.pid()
        if pid is None:
            return f"down (port {self.port})"
        ready = "ready" if metadata_round_trip(self.bootstrap, timeout=5) else "starting/unresponsive"
        return f"up pid={pid} {ready} bootstrap={self.bootstrap} version={kafka_version()} log={self.log_file}"

    def up(self, timeout: float = 90.0) -> float:
        """Start the broker if needed and return seconds until a metadata round trip succeeded."""
        t0 = time.monotonic()
        if self.pid() is not None:
            if not metadata_round_trip(self.bootstrap, timeout=timeout):
                raise BrokerError(f"broker pid {self.pid()} is running but not answering; log tail:\n{self.tail()}")
            return 0.0
        if self.secured:
            self._check_scram_credentials()
        java = shutil.which("java")
        if java is None:
            raise BrokerError("java not found on PATH: install a Java 17 runtime to run a local broker")
        for p in (self.port, self._controller_port, *([self.sasl_port] if self.sasl_port else [])):
            if port_in_use(p):
                raise BrokerError(f"port 127.0.0.1:{p} is already taken by another process")
        libs = self.resolve_jars()
        if self.secured and not (self.tls_dir / "broker.p12").exists():
            make_tls_material(self.tls_dir, java)
        self._write_configs()
        base = [
            java, "-server", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{self.dir / 'log4j.properties'}",
            f"-Dkafka.logs.dir={self.dir / 'logs'}", "-cp", f"{libs}/*",
        ]  # fmt: skip
        data = self.dir / "data"
        if not (data / "meta.properties").exists():
            cluster_id = _run([*base, "-Xmx256M", "kafka.tools.StorageTool", "random-uuid"]).strip()
            scram = ["--add-scram", self._scram_spec()] if self.secured else []
            _run(
                [
                    *base,
                    "-Xmx256M",
                    "kafka.tools.StorageTool",
                    "format",
                    *scram,  # before the last 4 arguments, which _run quotes in its errors
                    "-t",
                    cluster_id,
                    "-c",
                    str(self.dir / "server.properties"),
                    "--ignore-formatted",
                ],
                secrets=(self.scram_password,),
            )
            if self.secured:
                (self.dir / "scram-user").write_text(self.scram_user)
        out = open(self.dir / "logs" / "stdout.log", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(
            [*base, f"-Xmx{self.heap}", f"-Xms{self.heap}", "kafka.Kafka", str(self.dir / "server.properties")],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # survives the CLI that started it; `down` stops it
        )
        self.pid_file.write_text(str(proc.pid))
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BrokerError(f"broker exited with code {proc.returncode}; log tail:\n{self.tail()}")
            if port_in_use(self.port) and metadata_round_trip(self.bootstrap, timeout=5):
                if self.secured:
                    self._wait_secured(deadline)
                return time.monotonic() - t0
            time.sleep(0.25)
        self.down()
        raise BrokerError(f"broker not ready after {timeout:.0f}s; log tail:\n{self.tail()}")

    def _scram_spec(self) -> str:
        return f"{SCRAM_MECHANISM}=[name={self.scram_user},password={self.scram_password}]"

    def _check_scram_credentials(self) -> None:
        for what, value in (("scram_user", self.scram_user), ("scram_password", self.scram_password)):
            if not value:
                raise BrokerError(f"secured mode (sasl_port={self.sasl_port}) needs a non-empty {what}")
            if not _SCRAM_SAFE.fullmatch(value):
                raise BrokerError(
                    f"{what} may only use letters, digits and . _ ~ + / @ : - (kafka-storage --add-scram)"
                )
        data = self.dir / "data"
        if (data / "meta.properties").exists():
            marker = self.dir / "scram-user"
            formatted_with = marker.read_text().strip() if marker.exists() else None
            if formatted_with != self.scram_user:
                raise BrokerError(
                    f"{data} was formatted with SCRAM user {formatted_with!r}, not {self.scram_user!r}: SCRAM users "
                    "are created at format time, so use another port or home, or delete that directory"
                )

    def _wait_secured(self, deadline: float) -> None:
        """Until a SCRAM login over TLS works; an authentication failure is final, not retried."""
        from aiokafka.errors import SaslAuthenticationFailed

        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with _quiet_aiokafka():
                    asyncio.run(_sasl_login(self.sasl_client_kwargs(), timeout=5))
            except SaslAuthenticationFailed as e:
                raise BrokerError(
                    f"SCRAM login as {self.scram_user!r} on {self.sasl_bootstrap} failed ({e}); the data dir "
                    f"keeps the password it was formatted with: delete {self.dir / 'data'} to change it"
                ) from None
            except Exception as e:
                last = e
                time.sleep(0.25)
                continue
            if metadata_round_trip(self.sasl_bootstrap, timeout=5, **_without_bootstrap(self.sasl_client_kwargs())):
                return
            time.sleep(0.25)
        raise BrokerError(f"SASL_SSL listener {self.sasl_bootstrap} not ready ({last!r}); log tail:\n{self.tail()}")

    def down(self, timeout: float = 30.0) -> bool:
        """Stop the broker cleanly (SIGTERM), SIGKILL after ``timeout``. True if one was running."""
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.2)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        return True

    def tail(self, lines: int = 30) -> str:
        for f in (self.log_file, self.dir / "logs" / "stdout.log"):
            if f.exists() and f.stat().st_size:
                return "\n".join(f.read_text(errors="replace").splitlines()[-lines:])
        return "(no broker log yet)"

    def _write_configs(self) -> None:
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        keystore = self.tls_dir / "broker.p12" if self.secured else None
        (self.dir / "server.properties").write_text(
            server_properties(self.port, self._controller_port, self.dir / "data", self.sasl_port, keystore)
        )
        (self.dir / "log4j.properties").write_text(LOG4J)


def server_properties(
    port: int, cport: int, data: Path, sasl_port: int | None = None, keystore: Path | None = None
) -> str:
    """The broker's server.properties; with ``sasl_port`` (and its PKCS12 ``keystore``) a SASL_SSL listener too."""
    if sasl_port is None:
        return SERVER_PROPERTIES.format(
            port=port, cport=cport, data=data, listeners=f"PLAINTEXT://127.0.0.1:{port}", extra_protocols=""
        )
    if keystore is None:
        raise ValueError("a SASL_SSL listener needs a keystore")
    plain = SERVER_PROPERTIES.format(
        port=port,
        cport=cport,
        data=data,
        listeners=f"PLAINTEXT://127.0.0.1:{port},SASL_SSL://127.0.0.1:{sasl_port}",
        extra_protocols=",SASL_SSL:SASL_SSL",
    )
    return plain + SASL_SSL_PROPERTIES.format(
        keystore=keystore,
        password=KEYSTORE_PASSWORD,
        mechanism=SCRAM_MECHANISM,
        mechanism_lower=SCRAM_MECHANISM.lower(),
        jaas="org.apache.kafka.common.security.scram.ScramLoginModule required;",  # server side: no user
    )


SERVER_PROPERTIES = """\
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{cport}
listeners={listeners},CONTROLLER://127.0.0.1:{cport}
advertised.listeners={listeners}
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT{extra_protocols}
log.dirs={data}
num.partitions=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=true
log.retention.hours=24
"""

# Client listener only; Kafka logs password-type values (jaas config, keystore password) as [hidden].
SASL_SSL_PROPERTIES = """\
listener.name.sasl_ssl.sasl.enabled.mechanisms={mechanism}
listener.name.sasl_ssl.{mechanism_lower}.sasl.jaas.config={jaas}
listener.name.sasl_ssl.ssl.keystore.type=PKCS12
listener.name.sasl_ssl.ssl.keystore.location={keystore}
listener.name.sasl_ssl.ssl.keystore.password={password}
listener.name.sasl_ssl.ssl.key.password={password}
listener.name.sasl_ssl.ssl.client.auth=none
"""

LOG4J = """\
log4j.rootLogger=INFO, kafkaAppender
log4j.appender.kafkaAppender=org.apache.log4j.RollingFileAppender
log4j.appender.kafkaAppender.File=${kafka.logs.dir}/server.log
log4j.appender.kafkaAppender.MaxFileSize=20MB
log4j.appender.kafkaAppender.MaxBackupIndex=2
log4j.appender.kafkaAppender.layout=org.apache.log4j.PatternLayout
log4j.appender.kafkaAppender.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka=INFO
log4j.logger.org.apache.kafka=INFO
log4j.logger.state.change.logger=WARN
"""


def make_tls_material(tls_dir: Path, java: str | None = None) -> float:
    """A local CA (``ca.pem``, key in ``ca.p12``) and a broker keystore (``broker.p12``: key + chain for
    127.0.0.1/localhost), made with the JDK's keytool; written to a temp dir and renamed into place.
    Returns the seconds it took (about 1.5 s: five short JVMs)."""
    t0 = time.monotonic()
    keytool = str(Path(java).with_name("keytool")) if java else None
    if not keytool or not Path(keytool).exists():
        keytool = shutil.which("keytool")
    if keytool is None:
        raise BrokerError("keytool not found (it comes with the Java runtime): needed for the broker's TLS keystore")
    tmp = tls_dir.with_name(tls_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    kt = [keytool, "-J-XX:TieredStopAtLevel=1", "-J-XX:+UseSerialGC"]  # short-lived JVMs: ~3x faster
    ca, broker, pw = tmp / "ca.p12", tmp / "broker.p12", ["-storepass", KEYSTORE_PASSWORD]
    gen = ["-genkeypair", "-keyalg", "EC", "-groupname", "secp256r1", "-validity", "3650", "-storetype", "PKCS12"]
    procs = [
        subprocess.Popen(
            [*kt, *gen, "-alias", "ca", "-dname", "CN=stream-app local CA", "-ext", "bc:c",
             "-ext", "KU:c=keyCertSign,cRLSign", "-keystore", str(ca), *pw],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        ),
        subprocess.Popen(
            [*kt, *gen, "-alias", "broker", "-dname", "CN=127.0.0.1", "-keystore", str(broker), *pw],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        ),
    ]  # fmt: skip
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise BrokerError(f"keytool -genkeypair failed:\n{out.decode(errors='replace')[-2000:]}")
    _run([*kt, "-exportcert", "-rfc", "-alias", "ca", "-keystore", str(ca), *pw, "-file", str(tmp / "ca.pem")])
    _run([*kt, "-certreq", "-alias", "broker", "-keystore", str(broker), *pw, "-file", str(tmp / "broker.csr")])
    _run(
        [*kt, "-gencert", "-rfc", "-alias", "ca", "-keystore", str(ca), *pw, "-validity", "3650",
         "-ext", "SAN=ip:127.0.0.1,dns:localhost", "-ext", "KU:c=digitalSignature,keyAgreement",
         "-ext", "EKU=serverAuth", "-infile", str(tmp / "broker.csr"), "-outfile", str(tmp / "broker.pem")]
    )  # fmt: skip
    # the signed certificate plus the CA is a complete chain: keytool installs it as the key's reply
    (tmp / "chain.pem").write_text((tmp / "broker.pem").read_text() + (tmp / "ca.pem").read_text())
    _run([*kt, "-importcert", "-noprompt", "-alias", "broker", "-keystore", str(broker), *pw,
          "-file", str(tmp / "chain.pem")])  # fmt: skip
    shutil.rmtree(tls_dir, ignore_errors=True)
    tmp.rename(tls_dir)
    return time.monotonic() - t0


def _run(cmd: list[str], secrets: tuple[str, ...] = ()) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        msg = f"{' '.join(cmd[-4:])} failed:\n{(proc.stdout + proc.stderr)[-2000:]}"
        for secret in secrets:
            if secret:
                msg = msg.replace(secret, "**********")
        raise BrokerError(msg)
    return proc.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    # a zombie has exited and only waits for its parent to reap it
    return not (stat.exists() and re.search(r"\) Z ", stat.read_text()))


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _without_bootstrap(kw: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if k != "bootstrap_servers"}


async def _sasl_login(kw: dict[str, Any], timeout: float) -> None:
    """One connection with TLS handshake and SASL login; raises what the broker answered."""
    from aiokafka.conn import create_conn

    host, port = kw["bootstrap_servers"].rsplit(":", 1)
    conn = await asyncio.wait_for(
        create_conn(host, int(port), request_timeout_ms=int(timeout * 1000), **_without_bootstrap(kw)), timeout
    )
    conn.close()


def metadata_round_trip(bootstrap: str, timeout: float = 10.0, **client_kw: Any) -> bool:
    """True if a Kafka client can fetch cluster metadata (the real readiness test, not a port check).

    ``client_kw``: further aiokafka client arguments (security_protocol, sasl_*, ssl_context)."""

    async def probe() -> bool:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000), **client_kw)
        try:
            await asyncio.wait_for(admin.start(), timeout)
            await asyncio.wait_for(admin.list_topics(), timeout)
            return True
        except Exception:
            return False
        finally:
            await admin.close()

    with _quiet_aiokafka():
        return asyncio.run(probe())


@contextlib.contextmanager
def _quiet_aiokafka() -> Iterator[None]:
    """Keep "cannot connect", the expected answer while a broker starts, out of the console."""
    quiet = logging.getLogger("aiokafka")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        quiet.setLevel(level)
