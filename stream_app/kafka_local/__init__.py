"""A real single-node Apache Kafka (KRaft) broker on 127.0.0.1, built from the official jars.

Why not Docker: the project's machines have Java 17 and Maven but no Docker engine, and Debian ships
no Kafka package. Maven resolves the pinned broker runtime (``pom.xml`` beside this file) from Maven
Central into a cache directory; ``up`` formats a KRaft data dir once, starts ``kafka.Kafka`` and waits
for a real metadata round trip. ``up`` on a running broker is a no-op; ``down`` sends SIGTERM (clean
shutdown) and escalates to SIGKILL only after a timeout.

Layout under ``home`` (default ``~/.cache/stream_app``, env ``STREAM_APP_HOME``)::

    kafka-libs-<version>/        jars (never committed; re-resolved only when missing)
    kafka-<port>/server.properties, log4j.properties, data/, logs/server.log, broker.pid
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

POM = Path(__file__).with_name("pom.xml")


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
    """One local broker, identified by its client port."""

    port: int = 9092
    controller_port: int | None = None
    home: Path | None = None
    heap: str = "768M"

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
        java = shutil.which("java")
        if java is None:
            raise BrokerError("java not found on PATH: install a Java 17 runtime to run a local broker")
        for p in (self.port, self._controller_port):
            if port_in_use(p):
                raise BrokerError(f"port 127.0.0.1:{p} is already taken by another process")
        libs = self.resolve_jars()
        self._write_configs()
        base = [
            java, "-server", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{self.dir / 'log4j.properties'}",
            f"-Dkafka.logs.dir={self.dir / 'logs'}", "-cp", f"{libs}/*",
        ]  # fmt: skip
        data = self.dir / "data"
        if not (data / "meta.properties").exists():
            cluster_id = _run([*base, "-Xmx256M", "kafka.tools.StorageTool", "random-uuid"]).strip()
            _run(
                [
                    *base,
                    "-Xmx256M",
                    "kafka.tools.StorageTool",
                    "format",
                    "-t",
                    cluster_id,
                    "-c",
                    str(self.dir / "server.properties"),
                    "--ignore-formatted",
                ]
            )
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
                return time.monotonic() - t0
            time.sleep(0.25)
        self.down()
        raise BrokerError(f"broker not ready after {timeout:.0f}s; log tail:\n{self.tail()}")

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
        (self.dir / "server.properties").write_text(
            SERVER_PROPERTIES.format(port=self.port, cport=self._controller_port, data=self.dir / "data")
        )
        (self.dir / "log4j.properties").write_text(LOG4J)


SERVER_PROPERTIES = """\
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{cport}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
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


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BrokerError(f"{' '.join(cmd[-4:])} failed:\n{(proc.stdout + proc.stderr)[-2000:]}")
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


def metadata_round_trip(bootstrap: str, timeout: float = 10.0) -> bool:
    """True if a Kafka client can fetch cluster metadata (the real readiness test, not a port check)."""

    async def probe() -> bool:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000))
        try:
            await asyncio.wait_for(admin.start(), timeout)
            await asyncio.wait_for(admin.list_topics(), timeout)
            return True
        except Exception:
            return False
        finally:
            await admin.close()

    # "cannot connect" is the expected answer while a broker starts: keep it out of the console
    quiet = logging.getLogger("aiokafka")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        return asyncio.run(probe())
    finally:
        quiet.setLevel(level)
