"""One run of one scenario: fresh topics, the seeded input, real `stream-app worker` processes, a fault, the verdict.

A run owns everything it starts (workers, the input producer, a monitor thread) and stops it in ``finally``.
The monitor polls the group's committed offsets (for progress and time to recover) and each live worker's
/metrics (the last scrape of a worker is kept, so counters of killed workers still count up to their kill).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from bench.harness import free_port, metric_sum
from faults import verify
from stream_app.kafka_io import create_topics, partitions_of
from stream_app.kafka_local import LocalKafka
from stream_app.settings import Settings
from stream_app.sim.kafka import to_record

ROOT = Path(__file__).resolve().parent.parent
LOG_PATTERNS = (
    "Crashed",
    "Traceback",
    "ProducerFenced",
    "MessageSizeTooLarge",
    "OutOfOrderSequence",
    "IN_TRANSACTION",
    "IllegalOperation",
    "KafkaTimeoutError",
    "wait_empty",
)
METRICS = {
    "applied": "stream_app_events_consumed_total",
    "dead_lettered": "stream_app_events_rejected_total",
    "duplicate": "stream_app_duplicates_dropped_total",
    "repartitioned": "stream_app_events_repartitioned_total",
    "erased": "stream_app_events_of_erased_users_total",
    "consent": "stream_app_consent_commands_total",
}


def say(msg: str) -> None:
    print(f"[faults {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def scrape(port: int, timeout: float = 1.0) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
            return r.read().decode()
    except OSError:
        return None


@dataclass
class Worker:
    idx: int
    proc: subprocess.Popen
    log: Path
    port: int
    started: float
    how_ended: str = ""  # "SIGKILL by the scenario", "SIGTERM rc=0", ...
    killed: bool = False  # ended by the scenario on purpose (SIGKILL): its exit code is not a crash
    stopped: bool = False  # SIGSTOPped right now
    ready: bool = False  # its web server answered
    metrics: str | None = None  # last scrape

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def applied(self) -> float:
        return metric_sum(self.metrics, METRICS["applied"])


@dataclass
class RunConfig:
    bootstrap: str
    broker: LocalKafka | None
    guarantee: str
    session_timeout_s: float
    workdir: Path
    done_timeout_s: float = 240.0
    settings_overrides: dict[str, Any] = field(default_factory=dict)


def paced_rate(messages: int, paced_s: float) -> float:
    """Messages per second of a paced feed: the input over ``paced_s``, at most 2,000/s."""
    return min(2000.0, max(10.0, messages / paced_s))


class Run:
    """The context a scenario script drives: start/kill/stop workers, wait for progress, record faults."""

    def __init__(self, cfg: RunConfig, name: str, envelopes: list[dict], feed: str, paced_s: float = 40.0) -> None:
        self.cfg, self.name, self.envelopes, self.feed, self.paced_s = cfg, name, envelopes, feed, paced_s
        tag = self.tag = uuid.uuid4().hex[:8]
        self.broker_restart_s: float | None = None
        app_id = f"faults-{name.replace('_', '-')}-{tag}"
        s = Settings(
            app_id=app_id,
            broker=f"kafka://{cfg.bootstrap}",
            datadir=str(cfg.workdir / app_id),
            processing_guarantee=cfg.guarantee,
            session_timeout_s=cfg.session_timeout_s,
            **cfg.settings_overrides,
        )
        self.settings = s.with_topic_suffix(tag)
        self.dir = cfg.workdir / app_id
        self.dir.mkdir(parents=True, exist_ok=True)
        self.workers: list[Worker] = []
        self.faults: list[dict[str, Any]] = []
        self.history: list[tuple[float, dict[TopicPartition, int], dict[TopicPartition, int]]] = []
        self.total = len(envelopes)
        self.produced = 0
        self.producer_done = threading.Event()
        self.producer_gate = threading.Event()  # cleared: the paced producer pauses (broker restarts)
        self.producer_gate.set()
        self.producer_idle = threading.Event()  # set while paused with everything acked
        self.producer_error: str | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._paced_started = False
        self.t0 = time.monotonic()

    # -- topics and input ------------------------------------------------------------------------------
    @property
    def input_topics(self) -> list[str]:
        s = self.settings
        return [*s.input_topics, s.consent_topic]

    @property
    def work_topics(self) -> list[str]:
        """The topics the group consumes (events, consent, the trainer's model inputs)."""
        return [*self.input_topics, self.settings.model_inputs_topic]

    def prepare(self) -> None:
        asyncio.run(create_topics(self.cfg.bootstrap, self.settings.topic_layout()))
        if self.feed == "backlog":
            asyncio.run(self._produce(rate=0.0))
            self.producer_done.set()
        m = threading.Thread(target=self._monitor, name="monitor", daemon=True)
        m.start()
        self._threads.append(m)

    def start_paced(self) -> None:
        """A paced feed starts once the first worker answers, so the stream flows while workers run."""
        if self.feed == "paced" and not self._paced_started:
            self._paced_started = True
            t = threading.Thread(target=self._paced, name="producer", daemon=True)
            t.start()
            self._threads.append(t)

    def _paced(self) -> None:
        try:
            asyncio.run(self._produce(rate=paced_rate(self.total, self.paced_s)))
        except Exception as e:  # reported: the run's input is then incomplete, the verdict says so
            self.producer_error = f"{type(e).__name__}: {e}"
        finally:
            self.producer_done.set()

    async def _produce(self, rate: float) -> None:
        """The envelopes in file order (record time = send time, as `stream-app simulate --kafka`), acks=all,
        idempotent; a paced feed pauses (everything acked) while ``producer_gate`` is cleared."""
        producer = AIOKafkaProducer(
            bootstrap_servers=self.cfg.bootstrap,
            acks="all",
            enable_idempotence=True,
            linger_ms=5,
            max_request_size=4 << 20,
            request_timeout_ms=60_000,
        )
        await producer.start()
        try:
            pending: list[asyncio.Future] = []
            start = time.monotonic()
            paused = 0.0
            for i, env in enumerate(self.envelopes):
                if not self.producer_gate.is_set():
                    await asyncio.gather(*pending)
                    pending.clear()
                    t = time.monotonic()
                    self.producer_idle.set()
                    while not self.producer_gate.is_set():
                        await asyncio.sleep(0.1)
                    self.producer_idle.clear()
                    paused += time.monotonic() - t
                topic, key, value, _ts = to_record(env, self.settings)
                pending.append(await producer.send(topic, value=value, key=key or None))
                if rate > 0:
                    self.produced = i + 1
                    if (ahead := (i + 1) / rate - (time.monotonic() - start - paused)) > 0:
                        await asyncio.gather(*pending)
                        pending.clear()
                        await asyncio.sleep(ahead)
                if len(pending) >= 5000:
                    await asyncio.gather(*pending)
                    pending.clear()
            await asyncio.gather(*pending)
            self.produced = len(self.envelopes)
        finally:
            await producer.stop()

    # -- monitor ----------------------------------------------------------------------------------------
    def _monitor(self) -> None:
        asyncio.run(self._monitor_loop())

    async def _monitor_loop(self) -> None:
        tps: list[TopicPartition] = []
        clients: tuple[AIOKafkaAdminClient, AIOKafkaConsumer] | None = None
        try:
            while not self._stop.is_set():
                for w in self.workers:
                    if w.alive and not w.stopped and (text := await asyncio.to_thread(scrape, w.port, 1.0)):
                        w.metrics = text
                try:
                    if clients is None:
                        clients = await self._clients()
                    if not tps:
                        tps = [
                            TopicPartition(t, p)
                            for t in self.input_topics
                            for p in await partitions_of(self.cfg.bootstrap, t)
                        ]
                    admin, consumer = clients
                    got = await asyncio.wait_for(
                        admin.list_consumer_group_offsets(self.settings.app_id, partitions=tps), 5
                    )
                    committed = {tp: max(got[tp].offset, 0) if tp in got else 0 for tp in tps}
                    end = await asyncio.wait_for(consumer.end_offsets(tps), 5)
                    self.history.append((time.monotonic(), committed, end))
                except Exception:  # the broker is down, or slow: no sample this time, new clients next time
                    if clients is not None:
                        await self._close_clients(clients)
                        clients = None
                    await asyncio.sleep(0.5)
                await asyncio.sleep(0.2)
        finally:
            if clients is not None:
                await self._close_clients(clients)

    async def _clients(self) -> tuple[AIOKafkaAdminClient, AIOKafkaConsumer]:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.cfg.bootstrap, request_timeout_ms=4000)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.cfg.bootstrap, enable_auto_commit=False, request_timeout_ms=4000
        )
        try:
            await asyncio.wait_for(admin.start(), 5)
            await asyncio.wait_for(consumer.start(), 5)
        except BaseException:
            await self._close_clients((admin, consumer))
            raise
        return admin, consumer

    @staticmethod
    async def _close_clients(clients: tuple[AIOKafkaAdminClient, AIOKafkaConsumer]) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(clients[1].stop(), 5)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(clients[0].close(), 5)

    def progress(self) -> float:
        """Share of the input the group has committed."""
        if not self.history:
            return 0.0
        return sum(self.history[-1][1].values()) / max(1, self.total)

    # -- what scenarios call ----------------------------------------------------------------------------
    def start_workers(self, n: int) -> list[Worker]:
        """``n`` workers started together (a paced feed starts once all answer)."""
        ws = [self.start_worker(wait=False) for _ in range(n)]
        for w in ws:
            self.wait_ready(w)
        self.start_paced()
        return ws

    def start_worker(self, wait: bool = True) -> Worker:
        port = free_port()
        idx = len(self.workers)
        log = self.dir / f"worker-{idx}.log"
        env = {**os.environ, **self.settings.to_env(), "STREAM_APP_WEB_PORT": str(port)}
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "stream_app", "worker", "--loglevel", "info"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        w = Worker(idx, proc, log, port, time.monotonic())
        self.workers.append(w)
        if wait:
            self.wait_ready(w)
            self.start_paced()
        return w

    def wait_ready(self, w: Worker, timeout: float = 120.0) -> None:
        """Until the worker's web server answers (its app started; a SIGTERM before that is not handled)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not w.alive:
                raise RuntimeError(f"worker {w.idx} exited {w.proc.returncode} while starting")
            if (text := scrape(w.port, 1.0)) is not None:
                w.metrics, w.ready = text, True
                return
            time.sleep(0.2)
        raise TimeoutError(f"worker {w.idx} not answering after {timeout:.0f}s")

    def wait_progress(self, share: float, timeout: float = 300.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.progress() >= share:
                return self.progress()
            if all(not w.alive for w in self.workers):
                raise RuntimeError(f"every worker exited before {share:.0%} of the input was processed")
            time.sleep(0.05)
        raise TimeoutError(f"{share:.0%} of the input not processed after {timeout:.0f}s")

    def wait_processing(self, w: Worker, timeout: float = 120.0) -> float:
        """Until worker ``w`` has applied an event (its /metrics), or the input is all processed."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if not w.alive:
                raise RuntimeError(f"worker {w.idx} exited {w.proc.returncode}")
            if w.applied() > 0 or (self.producer_done.is_set() and self.progress() >= 1.0):
                return time.monotonic() - t0
            time.sleep(0.1)
        raise TimeoutError(f"worker {w.idx} processed nothing in {timeout:.0f}s")

    def fault(self, what: str, act: Callable[[], Any], base: str = "after_start") -> None:
        """Apply a fault and keep what the time to recover is measured from: ``after_start`` (default), the
        committed offsets 0.5 s after the fault began (in-flight commits land first), timed from its start;
        ``after_end``: the same from the end of ``act`` (a joining worker: from when it is up); ``before``:
        the offsets before it, timed from its start (the broker is unreachable right after)."""
        before = self.history[-1][1] if self.history else {}
        t, at = time.monotonic(), self.progress()
        say(f"  fault: {what} at {at:.0%} processed")
        act()
        self.faults.append(
            {
                "what": what,
                "t": t,
                "t_end": time.monotonic(),
                "at_progress": round(at, 3),
                "base": base,
                "before": before,
            }
        )

    def kill(self, w: Worker) -> None:
        w.proc.send_signal(signal.SIGKILL)
        w.proc.wait()
        w.killed, w.how_ended = True, "SIGKILL by the scenario"

    def term(self, w: Worker, timeout: float = 60.0) -> None:
        t0 = time.monotonic()
        w.proc.send_signal(signal.SIGTERM)
        try:
            w.proc.wait(timeout)
            w.how_ended = f"SIGTERM rc={w.proc.returncode} in {time.monotonic() - t0:.1f}s"
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait()
            w.how_ended = f"no exit {timeout:.0f}s after SIGTERM: SIGKILL"

    def sigstop(self, w: Worker) -> None:
        w.stopped = True
        w.proc.send_signal(signal.SIGSTOP)

    def sigcont(self, w: Worker) -> None:
        w.proc.send_signal(signal.SIGCONT)
        w.stopped = False

    def pause_input(self) -> None:
        """A paced feed stops with everything sent acked (so a broker kill loses no input)."""
        self.producer_gate.clear()
        while not self.producer_done.is_set() and not self.producer_idle.wait(0.1):
            pass

    def resume_input(self) -> None:
        self.producer_gate.set()

    def broker_kill(self) -> None:
        assert self.cfg.broker is not None, "broker faults need the local broker this tool starts"
        pid = self.cfg.broker.pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            if self.cfg.broker.pid() is None:
                break
            time.sleep(0.1)

    def broker_up(self) -> float:
        """Start the killed broker again; returns the seconds it took to answer (its own restart: log and
        metadata recovery grow with the partitions it holds, which is why each run deletes its topics)."""
        assert self.cfg.broker is not None
        took = self.cfg.broker.up(timeout=180)
        self.broker_restart_s = round(took, 1)
        say(f"  broker answering again after {took:.1f}s of restart")
        return took

    def delete_topics(self) -> None:
        """Every topic of this run (its suffix, and the app's internal ones), so a later broker restart does not
        recover them all."""

        async def go() -> None:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.cfg.bootstrap)
            await admin.start()
            try:
                mine = [t for t in await admin.list_topics() if self.tag in t]
                if mine:
                    await admin.delete_topics(mine)
            finally:
                await admin.close()

        with contextlib.suppress(Exception):
            asyncio.run(go())

    # -- end ---------------------------------------------------------------------------------------------
    def wait_done(self) -> dict[str, Any]:
        """Until the input is all produced and the group's true lag is 0 on every topic it consumes, twice
        1 s apart; returns the final lag report (both lags) and how long that took."""
        t0 = time.monotonic()
        deadline = t0 + self.cfg.done_timeout_s
        zero = 0
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if self.producer_done.is_set():
                try:
                    last = asyncio.run(verify.lag_report(self.cfg.bootstrap, self.settings.app_id, self.work_topics))
                    zero = zero + 1 if last["true"] == 0 else 0
                except Exception as e:
                    last = {"error": f"{type(e).__name__}: {e}"}
                    zero = 0
                if zero >= 2:
                    return {**last, "done": True, "waited_s": round(time.monotonic() - t0, 1)}
                if not any(w.alive for w in self.workers):
                    break
            time.sleep(1.0)
        return {**last, "done": False, "waited_s": round(time.monotonic() - t0, 1)}

    def stop_workers(self) -> None:
        """SIGCONT anything stopped, then SIGTERM every live worker at once and wait for each exit."""
        for w in self.workers:
            if w.stopped:
                self.sigcont(w)
        live = [w for w in self.workers if w.alive]
        for w in live:
            if not w.ready:
                with contextlib.suppress(Exception):
                    self.wait_ready(w, 60)
        for w in live:
            w.metrics = scrape(w.port, 3.0) or w.metrics
        threads = [threading.Thread(target=self.term, args=(w,)) for w in live]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for w in self.workers:
            if not w.how_ended:
                w.how_ended = f"exited by itself rc={w.proc.returncode}"

    def close(self) -> None:
        self._stop.set()
        self.producer_gate.set()
        for w in self.workers:
            if w.alive:
                with contextlib.suppress(OSError):
                    w.proc.send_signal(signal.SIGCONT)
                    w.proc.kill()
                w.proc.wait()
        for t in self._threads:
            t.join(10)

    def recovery(self) -> list[dict[str, Any]]:
        """Per fault: seconds from the fault until every input partition that had work left (records after the
        base committed offset) committed beyond that offset: the group is processing everywhere again."""
        out = []
        for f in self.faults:
            t_from = f["t_end"] if f["base"] == "after_end" else f["t"]
            base = (
                f["before"]
                if f["base"] == "before"
                else next((c for t, c, _e in self.history if t >= t_from + 0.5), None)
            )
            took = pending_parts = None
            if base:
                for t, committed, end in self.history:
                    if t < t_from + 0.5:
                        continue
                    pending = [tp for tp in base if end.get(tp, 0) > base[tp]]
                    pending_parts = len(pending)
                    if all(committed.get(tp, 0) > base[tp] for tp in pending):
                        took = round(t - t_from, 1)
                        break
            out.append(
                {
                    "fault": f["what"],
                    "at_progress": f["at_progress"],
                    "recover_s": took,
                    "partitions_with_work": pending_parts,
                    "fault_took_s": round(f["t_end"] - f["t"], 1),
                }
            )
        return out

    def worker_report(self) -> list[dict[str, Any]]:
        out = []
        for w in self.workers:
            text = w.log.read_text(errors="replace") if w.log.exists() else ""
            hits = {p: text.count(p) for p in LOG_PATTERNS if p in text}
            lines = [ln[:400] for ln in text.splitlines() if any(p in ln for p in LOG_PATTERNS[:6])][:8]
            crashed = (not w.killed and w.proc.returncode not in (0, None)) or "Crashed" in text
            out.append(
                {
                    "worker": w.idx,
                    "how_ended": w.how_ended,
                    "rc": w.proc.returncode,
                    "crashed": crashed,
                    "traceback": "Traceback" in text,
                    "log_hits": hits,
                    "log_lines": lines,
                    "log": str(w.log),
                    "metrics": {k: metric_sum(w.metrics, v) for k, v in METRICS.items()},
                }
            )
        return out


def cleanup_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
