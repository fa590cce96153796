"""``python -m bench``: preload events, then run and measure (a) raw loop, (b) minimal Faust, (c) the pipeline
at_least_once, (d) exactly_once; latency, memory, recovery and scale. Results under bench/results/.

Every process this starts (broker, workers) is stopped in ``finally`` blocks, also on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from bench import gen
from bench.procmon import CpuSampler, cpu_seconds, machine_busy_seconds, machine_steal_seconds, rss_bytes
from stream_app.core.timers import partition_for
from stream_app.kafka_io import create_topics, group_lag, latest_by_key, partitions_of
from stream_app.settings import Settings

ROOT = Path(__file__).resolve().parent
PROCS: list[subprocess.Popen] = []


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- processes ----------------------------------------------------------------------------------


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT.parent)
    PROCS.append(proc)
    return proc


STOP_TIMEOUT = [45.0]
PROBE_TICK_S = 0.005  # the latency probe sends in ticks of 5 ms


def stop(proc: subprocess.Popen, timeout: float | None = None, log: Path | None = None) -> str:
    """SIGTERM, then SIGKILL after ``timeout`` s; returns how it ended (with ``log``'s last errors when the
    process did not exit 0, so a rare failed stop in a long run can be diagnosed from the results)."""
    how = f"already exited rc={proc.returncode}"
    if proc.poll() is None:
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT[0] if timeout is None else timeout)
            how = f"SIGTERM rc={proc.returncode} in {time.monotonic() - t0:.1f}s"
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            how = f"no exit {time.monotonic() - t0:.0f}s after SIGTERM: SIGKILL"
    with contextlib.suppress(ValueError):
        PROCS.remove(proc)
    if log is not None and proc.returncode != 0:
        errors = [line for line in tail(log, 400).splitlines() if "ERROR" in line or "Error" in line]
        how += "; last errors in its log: " + (" | ".join(e[:300] for e in errors[-3:]) or "none")
    return how


def stop_all() -> None:
    for p in list(PROCS):
        stop(p, 20)


def metrics_text(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            return r.read().decode()
    except OSError:
        return None


def metric_sum(text: str | None, name: str) -> float:
    if not text:
        return 0.0
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M))


# -- kafka helpers -------------------------------------------------------------------------------


def run_async(coro: Any) -> Any:
    return asyncio.run(coro)


async def preload(
    bootstrap: str, topics: dict[str, str], n: int, users: int, seed: int, partitions: int, cover: bool = False
) -> dict:
    """Produce the events with per-partition batches (acks=1, no compression); returns counts and the rate."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks=1, linger_ms=20, max_batch_size=512 << 10, max_request_size=4 << 20
    )
    await producer.start()
    counts = dict.fromkeys(topics.values(), 0)
    t0 = time.perf_counter()
    try:
        builders: dict[tuple[str, int], Any] = {}
        futures: list[asyncio.Future] = []
        pcache: dict[bytes, int] = {}
        for etype, key, value in gen.events(n, users, seed, int(time.time() * 1000), cover=cover):
            topic = topics[etype]
            p = pcache.get(key)
            if p is None:
                p = pcache[key] = partition_for(key.decode(), partitions)
            b = builders.get((topic, p))
            if b is None:
                b = builders[(topic, p)] = producer.create_batch()
            if b.append(key=key, value=value, timestamp=None) is None:
                futures.append(await producer.send_batch(b, topic, partition=p))
                b = builders[(topic, p)] = producer.create_batch()
                b.append(key=key, value=value, timestamp=None)
            counts[topic] += 1
            if len(futures) > 64:
                await asyncio.gather(*futures)
                futures.clear()
        for (topic, p), b in builders.items():
            if b.record_count():
                futures.append(await producer.send_batch(b, topic, partition=p))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    took = time.perf_counter() - t0
    return {
        "events": n,
        "users": users,
        "per_topic": counts,
        "seconds": round(took, 2),
        "events_per_s": round(n / took),
    }


async def first_record_ts(bootstrap: str, topic: str) -> float | None:
    """Earliest record timestamp (CreateTime: set by the writer when it sent it) over the partitions of a topic."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None, isolation_level="read_committed"
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in await partitions_of(bootstrap, topic)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        todo = {tp for tp in tps if end[tp] > 0}
        first: list[int] = []
        deadline = time.monotonic() + 30
        while todo and time.monotonic() < deadline:
            for tp, msgs in (await consumer.getmany(*todo, timeout_ms=500, max_records=1)).items():
                if msgs and tp in todo:
                    first.append(msgs[0].timestamp)
                    todo.discard(tp)
                    consumer.pause(tp)
        return min(first) / 1000 if first else None
    finally:
        await consumer.stop()


async def read_values(bootstrap: str, topic: str, timeout: float = 300) -> dict[bytes, bytes]:
    """Latest value per key of a (changelog) topic, read to its end with large fetches."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        group_id=None,
        isolation_level="read_committed",
        max_partition_fetch_bytes=8 << 20,
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in await partitions_of(bootstrap, topic)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        state: dict[bytes, bytes] = {}
        deadline = time.monotonic() + timeout
        while [tp for tp in tps if await consumer.position(tp) < end[tp]] and time.monotonic() < deadline:
            for msgs in (await consumer.getmany(timeout_ms=500, max_records=20_000)).values():
                state.update(latest_by_key((m.key, m.value) for m in msgs))
        return state
    finally:
        await consumer.stop()


def wait_lag_zero(
    bootstrap: str,
    group: str,
    topics: list[str],
    procs: list[subprocess.Popen],
    log: Path,
    timeout: float,
    poll: float = 0.5,
) -> float:
    """Poll kafka_io.group_lag until 0; returns the wall time (time.time()) at which lag 0 was seen."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"process exited {p.returncode}; log tail:\n{tail(log)}")
        if lag_of(bootstrap, group, topics) == 0:
            return time.time()
        time.sleep(poll)
    raise TimeoutError(f"lag of {group} not 0 after {timeout}s; log tail:\n{tail(log)}")


def lag_of(bootstrap: str, group: str, topics: list[str]) -> int | None:
    """The group's lag, or None while Kafka cannot tell (e.g. the group coordinator is not there yet on a fresh
    broker: the first group creates the offsets topic)."""
    try:
        return run_async(group_lag(bootstrap, group, topics))
    except KafkaError:
        return None


def tail(log: Path, n: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# -- the runs --------------------------------------------------------------------------------------


class Bench:
    def __init__(self, a: argparse.Namespace, bootstrap: str, workdir: Path) -> None:
        self.a, self.bootstrap, self.workdir = a, bootstrap, workdir
        self.tag = uuid.uuid4().hex[:8]
        self.inputs = {t: f"bench-{self.tag}-{t}s" for t in ("click", "like", "payment")}
        self.input_topics = list(self.inputs.values())
        self.counter = 0

    def name(self, kind: str) -> str:
        self.counter += 1
        return f"bench-{self.tag}-{kind}-{self.counter}"

    def settings(self, app_id: str, guarantee: str, web_port: int) -> Settings:
        s = Settings(
            app_id=app_id,
            broker=";".join(f"kafka://{h}" for h in self.bootstrap.split(",")),
            datadir=str(self.workdir / app_id),
            web_port=web_port,
            processing_guarantee=guarantee,
            topic_partitions=self.a.partitions,
        )
        s = s.with_topic_suffix(app_id)
        return s.model_copy(
            update={
                "clicks_topic": self.inputs["click"],
                "likes_topic": self.inputs["like"],
                "payments_topic": self.inputs["payment"],
            }
        )

    def measure(
        self, kind: str, procs: list[subprocess.Popen], group: str, out_topic: str, log: Path, sampler: CpuSampler
    ) -> dict:
        t_end = wait_lag_zero(self.bootstrap, group, self.input_topics, procs, log, self.a.run_timeout)
        cpu_end, busy_end = cpu_seconds([p.pid for p in procs]), machine_busy_seconds()
        t_first = run_async(first_record_ts(self.bootstrap, out_topic))
        if t_first is None:
            raise RuntimeError(f"{kind}: no output in {out_topic}")
        wall = t_end - t_first
        cpu = cpu_end - sampler.at(t_first)
        n = self.a.events
        return {
            "events": n,
            "wall_s": round(wall, 3),
            "cpu_s": round(cpu, 3),
            "events_per_s": round(n / wall, 1),
            "events_per_cpu_s": round(n / cpu, 1),
            "rss_mb": round(rss_bytes([p.pid for p in procs]) / 2**20, 1),
            # cores in use while measuring: the worker(s), and the whole machine (broker, bench, rest included)
            "worker_cores": round(cpu / wall, 2),
            "machine_cores": round((busy_end - sampler.machine_at(t_first)) / wall, 2),
            "steal_cores": round((machine_steal_seconds() - sampler.steal_at(t_first)) / wall, 3),
        }

    def raw_loop(self) -> dict:
        group = self.name("raw")
        out = f"{group}-out"
        run_async(create_topics(self.bootstrap, {out: (self.a.partitions, {})}))
        log = self.workdir / f"{group}.log"
        cmd = [
            sys.executable,
            "-m",
            "bench.raw_loop",
            "--bootstrap",
            self.bootstrap,
            "--group",
            group,
            "--inputs",
            ",".join(self.input_topics),
            "--output",
            out,
            "--commit-interval",
            str(self.a.commit_interval),
            "--linger-ms",
            str(self.a.linger_ms),
        ]
        proc = start(cmd, os.environ.copy(), log)
        try:
            with CpuSampler([proc.pid]) as sampler:
                return self.measure("raw", [proc], group, out, log, sampler)
        finally:
            stop(proc)

    def minimal_faust(self) -> dict:
        app_id = self.name("faust")
        out = f"{app_id}-out"
        run_async(create_topics(self.bootstrap, {out: (self.a.partitions, {})}))
        log = self.workdir / f"{app_id}.log"
        env = {
            **os.environ,
            "BENCH_APP_ID": app_id,
            "BENCH_BROKER": f"kafka://{self.bootstrap}",
            "BENCH_DATADIR": str(self.workdir / app_id),
            "BENCH_PARTITIONS": str(self.a.partitions),
            "BENCH_INPUTS": ",".join(self.input_topics),
            "BENCH_OUTPUT": out,
            "BENCH_GUARANTEE": "at_least_once",
            "BENCH_COMMIT_INTERVAL_S": str(self.a.commit_interval),
            "BENCH_LINGER_MS": str(self.a.linger_ms),
            "BENCH_WEB_PORT": str(free_port()),
        }
        proc = start([sys.executable, "-m", "bench.minimal_faust"], env, log)
        try:
            with CpuSampler([proc.pid]) as sampler:
                return self.measure("faust", [proc], app_id, out, log, sampler)
        finally:
            stop(proc)

    def pipeline_env(self, s: Settings, commit_interval: float | None = None) -> dict[str, str]:
        env = {
            **os.environ,
            **s.to_env(),
            "STREAM_APP_SESSION_TIMEOUT_S": str(self.a.session_timeout),
            "STREAM_APP_COMMIT_INTERVAL_S": str(commit_interval or self.a.commit_interval),
            "STREAM_APP_PRODUCER_LINGER_MS": str(self.a.linger_ms),
            "STREAM_APP_FETCH_MAX_WAIT_MS": str(self.a.fetch_max_wait_ms),
        }
        return env

    def start_pipeline(self, s: Settings, log: Path, commit_interval: float | None = None) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "stream_app", "worker", "--loglevel", "info"]
        return start(cmd, self.pipeline_env(s, commit_interval), log)

    def pipeline(self, guarantee: str, keep: bool = False) -> tuple[dict, Settings, subprocess.Popen | None, Path]:
        """One full-pipeline run; with ``keep`` the worker is left running (caller stops it)."""
        app_id = self.name("alo" if guarantee == "at_least_once" else "eos")
        s = self.settings(app_id, guarantee, free_port())
        run_async(create_topics(self.bootstrap, s.topic_layout()))
        log = self.workdir / f"{app_id}.log"
        proc = self.start_pipeline(s, log)
        try:
            with CpuSampler([proc.pid]) as sampler:
                res = self.measure(guarantee, [proc], app_id, s.users_changelog_topic, log, sampler)
            text = metrics_text(s.web_port)
            res["consumed"] = metric_sum(text, "stream_app_events_consumed_total")
            res["rejected"] = metric_sum(text, "stream_app_events_rejected_total")
            res["decisions"] = metric_sum(text, "stream_app_decisions_total")
        except BaseException:
            stop(proc)
            raise
        if not keep:
            res["stop"] = stop(proc, log=log)
            return res, s, None, log
        return res, s, proc, log

    def scale(self, workers: int) -> dict:
        """``workers`` pipeline workers (at_least_once) on the preloaded events, measured from the moment every
        worker has applied an event to consumer-group lag 0: the events left in that window over its wall
        time and the workers' CPU in it. Workers started together still go through a second rebalance when
        the later one joins (measured: the first worker ran alone 2.5 s, then both paused about a second, in
        a 17 s run); counted from the first output, as (c) is, that start-up is a fifth of the run and hides
        how partitions scale."""
        app_id = self.name(f"scale{workers}")
        s = self.settings(app_id, "at_least_once", free_port())
        run_async(create_topics(self.bootstrap, s.topic_layout()))
        log = self.workdir / f"{app_id}.log"
        ports = [free_port() for _ in range(workers)]
        procs = [self.start_pipeline(s.model_copy(update={"web_port": port}), log) for port in ports]
        try:
            with CpuSampler([p.pid for p in procs]) as sampler:
                t0, polls = time.monotonic(), 0
                while not all(metric_sum(metrics_text(w), "stream_app_events_consumed_total") >= 1 for w in ports):
                    if time.monotonic() - t0 > self.a.run_timeout or any(p.poll() is not None for p in procs):
                        raise RuntimeError(f"scale: not every worker started processing; log tail:\n{tail(log)}")
                    polls += 1
                    if polls % 10 == 0 and lag_of(self.bootstrap, app_id, self.input_topics) == 0:
                        # done before every worker had events (toy sizes): measured from the first output
                        return self.measure("scale", procs, app_id, s.users_changelog_topic, log, sampler)
                    time.sleep(0.05)
                started = time.monotonic() - t0
                t_all, busy_all = time.time(), machine_busy_seconds()
                left = run_async(group_lag(self.bootstrap, app_id, self.input_topics))
                cpu_all = cpu_seconds([p.pid for p in procs])
                t_end = wait_lag_zero(self.bootstrap, app_id, self.input_topics, procs, log, self.a.run_timeout)
                wall = t_end - t_all
                cpu = sampler.at(t_end) - cpu_all
                return {
                    "events": left,
                    "wall_s": round(wall, 3),
                    "cpu_s": round(cpu, 3),
                    "events_per_s": round(left / wall, 1),
                    "events_per_cpu_s": round(left / cpu, 1),
                    "rss_mb": round(rss_bytes([p.pid for p in procs]) / 2**20, 1),
                    "worker_cores": round(cpu / wall, 2),
                    "machine_cores": round((sampler.machine_at(t_end) - busy_all) / wall, 2),
                    "steal_cores": round((sampler.steal_at(t_end) - sampler.steal_at(t_all)) / wall, 3),
                    "all_processing_after_s": round(started, 2),  # after the workers started
                }
        finally:
            for p in procs:
                stop(p)

    # -- latency ---------------------------------------------------------------------------------

    def latency(self, s: Settings, rate: float, seconds: float, worker: int | None = None) -> dict:
        """The probe, and the CPU the worker and the probe (this process) used while measuring, in cores: a
        worker near 1.0 is saturated (the offered rate is its maximum at streaming batch sizes)."""
        pids = {"worker": [worker] if worker else [], "probe": [os.getpid()]}

        def cpu() -> dict[str, float]:  # the probe is this process alone: its descendants are the workers
            own = {k: cpu_seconds(v, descendants=k != "probe") for k, v in pids.items() if v}
            return own | {"machine": machine_busy_seconds(), "steal": machine_steal_seconds()}

        return run_async(self._latency(s, rate, seconds, cpu))

    async def _catch_up(self, s: Settings, producer: AIOKafkaProducer, timeout: float = 300.0) -> tuple[float, int]:
        """The preloaded events end an hour before now: the probe's first event in a partition moves its
        event-time watermark by that hour and fires the timers of all its users at once, a backlog that says
        nothing about the steady state. So one click per partition, stamped now, goes first, and the probe
        waits until the worker's group has committed past it. Returns the seconds that took and the group's
        lag before it: the exactly_once worker's group starts behind the at_least_once probe's events, which
        went into the same input topics (about 90k per probe run), so its first catch-up takes about a
        minute of processing them."""
        backlog = await group_lag(self.bootstrap, s.app_id, s.input_topics)
        t0, nparts, covered = time.monotonic(), self.a.partitions, set()
        for u in range(10 * nparts * nparts + 1000):
            p = partition_for(f"u{u}", nparts)
            if p not in covered:
                covered.add(p)
                await producer.send(s.clicks_topic, gen.click(f"catch-up-{uuid.uuid4().hex[:8]}", u,
                                    int(time.time() * 1000)), key=f"u{u}".encode())  # fmt: skip
        await producer.flush()
        while await group_lag(self.bootstrap, s.app_id, s.input_topics) > 0:
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"latency: the worker did not catch up within {timeout:.0f}s")
            await asyncio.sleep(0.25)
        return round(time.monotonic() - t0, 2), backlog

    async def _latency(self, s: Settings, rate: float, seconds: float, cpu: Any) -> dict:
        """Open loop: the bench's event mix at a fixed rate, ts = produce time; a read_committed consumer on
        decision-audit times each event that led to a decision (clicks and payments of eligible users).

        First the event-time jump is taken (see ``_catch_up``); then the probe sends for ``--latency-warmup``
        seconds without measuring, then for ``seconds`` measured."""
        bs = self.bootstrap
        warmup = self.a.latency_warmup
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bs,
            enable_auto_commit=False,
            group_id=None,
            isolation_level="read_committed",
            fetch_max_wait_ms=10,
        )
        producer = AIOKafkaProducer(bootstrap_servers=bs, acks=1, linger_ms=0)
        await consumer.start()
        await producer.start()
        sent: dict[str, float] = {}  # measured events only (sent after the warm-up)
        seen: dict[str, float] = {}  # event sent -> its decision read by the read_committed consumer
        stamped: dict[str, float] = {}  # event sent -> the decision record's timestamp (the worker sent it)
        done = asyncio.Event()
        try:
            tps = [TopicPartition(s.audit_topic, p) for p in await partitions_of(bs, s.audit_topic)]
            consumer.assign(tps)
            await consumer.seek_to_end(*tps)
            for tp in tps:
                await consumer.position(tp)

            async def read() -> None:
                while not done.is_set():
                    batch = await consumer.getmany(timeout_ms=50)
                    now = time.time()
                    for msgs in batch.values():
                        for m in msgs:
                            tid = orjson.loads(m.value).get("trigger_event_id")
                            if tid in sent and tid not in seen:
                                seen[tid] = now - sent[tid]
                                stamped[tid] = m.timestamp / 1000 - sent[tid]

            reader = asyncio.create_task(read())
            caught_up_s, backlog = await self._catch_up(s, producer)
            users = min(self.a.users, 1_000_000)
            # the throughput runs' event mix and users, re-stamped: ids new, ts = the time of sending
            total = warmup + seconds
            mix = gen.events(int(rate * total) + 1, users, self.a.seed + 1, int(time.time() * 1000))
            topic_of = {"click": s.clicks_topic, "like": s.likes_topic, "payment": s.payments_topic}
            t0 = time.monotonic()
            start, cpu0 = 0.0, {}
            n = 0
            prefix = f"lat-{uuid.uuid4().hex[:6]}"
            # a tick of PROBE_TICK_S sends what fell due in it: one produce request per tick and partition,
            # not one per event (per-event requests cost the probe more CPU than the worker had left)
            while (elapsed := time.monotonic() - t0) < total:
                measuring = elapsed >= warmup
                if measuring and not start:
                    start, cpu0 = time.time(), cpu()
                due = int(elapsed * rate) + 1
                while n < due:
                    etype, key, value = next(mix)
                    eid = f"{prefix}-{n}"
                    now = time.time()
                    event = orjson.loads(value) | {"event_id": eid, "ts": int(now * 1000)}
                    if measuring:
                        sent[eid] = now
                    await producer.send(topic_of[etype], orjson.dumps(event), key=key)
                    n += 1
                await asyncio.sleep(PROBE_TICK_S)
            cores = {k: round((v - cpu0[k]) / (time.time() - start), 2) for k, v in cpu().items()}
            await producer.flush()
            drain_until = time.monotonic() + max(5.0, 3 * (self.a.latency_commit_interval or self.a.commit_interval))
            while time.monotonic() < drain_until and len(seen) < len(sent):
                await asyncio.sleep(0.2)
            done.set()
            await reader
        finally:
            await producer.stop()
            await consumer.stop()
        if not seen:
            raise RuntimeError("latency: no decision for any probe event")
        by_second: dict[int, list[float]] = {}  # by the second the event was sent in: spikes, drift
        for eid, took in seen.items():
            by_second.setdefault(int(sent[eid] - start), []).append(took)

        def q(p: float, values: list[float]) -> float:
            return round(1000 * values[min(len(values) - 1, int(p * len(values)))], 1) if values else 0.0

        lat, at_send = sorted(seen.values()), sorted(stamped.values())
        return {
            "rate_per_s": round(rate, 1),
            "catch_up_s": caught_up_s,
            "backlog_at_start": backlog,  # events the worker's group had not committed when the probe began
            "warmup_s": warmup,
            "seconds": seconds,
            "events_sent": len(sent),
            "decisions_seen": len(lat),
            "p50_ms": q(0.50, lat),
            "p95_ms": q(0.95, lat),
            "p99_ms": q(0.99, lat),
            "max_ms": round(1000 * lat[-1], 1),
            # event sent -> the worker sent its decision (the record's timestamp): the worker's share; the
            # rest is the transaction commit (exactly_once) and the probe's fetch
            "worker_sent_p50_ms": q(0.50, at_send),
            "worker_sent_p99_ms": q(0.99, at_send),
            "p99_ms_by_second": [q(0.99, sorted(by_second.get(i, []))) for i in range(int(seconds))],
            **{f"{k}_cpu_cores": v for k, v in cores.items()},
        }

    # -- memory and recovery ---------------------------------------------------------------------

    def memory(self, s: Settings, proc: subprocess.Popen) -> dict:
        rss = rss_bytes([proc.pid])
        t0 = time.monotonic()
        state = run_async(read_values(self.bootstrap, s.users_changelog_topic))
        sizes = sorted(len(v) for v in state.values())
        return {
            "users_in_state": len(sizes),
            "state_bytes_mean": round(statistics.fmean(sizes), 1),
            "state_bytes_median": sizes[len(sizes) // 2],
            "state_bytes_p99": sizes[int(0.99 * len(sizes))],
            "worker_rss_mb": round(rss / 2**20, 1),
            "changelog_read_s": round(time.monotonic() - t0, 2),
        }

    def restart(self, s: Settings, log: Path, commit_interval: float | None = None) -> tuple[dict, subprocess.Popen]:
        """A fresh worker with the same app id (left running): time to load the users state from the
        changelog and to process one new event (a probe click sent right after the process started)."""
        s = s.model_copy(update={"web_port": free_port()})
        mark = log.stat().st_size if log.exists() else 0
        t0 = time.time()
        proc = self.start_pipeline(s, log, commit_interval)
        try:
            run_async(self._send_one(s.clicks_topic, 1, f"recovery-{uuid.uuid4().hex[:6]}"))
            recovered = None
            while time.time() - t0 < self.a.run_timeout:
                if proc.poll() is not None:
                    raise RuntimeError(f"restarted worker exited {proc.returncode}:\n{tail(log)}")
                with open(log, "rb") as f:
                    f.seek(mark)
                    text = f.read().decode(errors="replace")
                pat = rf"state {re.escape(s.users_changelog_topic)} partitions .* recovered: (\d+) keys in ([0-9.]+)s"
                if recovered is None and (m := re.search(pat, text)):
                    recovered = (time.time() - t0, int(m.group(1)), float(m.group(2)))
                if metric_sum(metrics_text(s.web_port), "stream_app_events_consumed_total") >= 1:
                    t_event = time.time() - t0
                    break
                time.sleep(0.1)
            else:
                raise TimeoutError(f"restart: no event processed in {self.a.run_timeout}s")
        except BaseException:
            stop(proc)
            raise
        return {
            "restart_to_first_event_s": round(t_event, 2),
            "restart_to_recovered_s": round(recovered[0], 2) if recovered else None,
            "keys_recovered": recovered[1] if recovered else None,
            "state_load_s_reported": recovered[2] if recovered else None,
            "worker_rss_mb_after": round(rss_bytes([proc.pid]) / 2**20, 1),
        }, proc

    async def _send_one(self, topic: str, u: int, eid: str) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks=1)
        await producer.start()
        try:
            await producer.send_and_wait(topic, gen.click(eid, u, int(time.time() * 1000)), key=f"u{u}".encode())
        finally:
            await producer.stop()


# -- summary -----------------------------------------------------------------------------------------


def summarize(runs: list[dict]) -> dict:
    out: dict[str, Any] = {"runs": runs}
    for k in ("events_per_s", "events_per_cpu_s", "wall_s", "cpu_s", "worker_cores", "machine_cores", "steal_cores"):
        vals = [r[k] for r in runs if k in r]  # the cores: results from before they were measured lack them
        if vals:
            out[k] = {"median": round(statistics.median(vals), 2), "min": min(vals), "max": max(vals)}
    return out


def summarize_latency(runs: list[dict]) -> dict:
    """Median and min-max over the probe runs of each percentile (the targets read the median p99)."""
    out: dict[str, Any] = {"runs": runs, "rate_per_s": runs[0]["rate_per_s"]}
    for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms", "worker_sent_p50_ms", "worker_sent_p99_ms", "catch_up_s",
              "backlog_at_start", "worker_cpu_cores", "probe_cpu_cores", "machine_cpu_cores",
              "steal_cpu_cores"):  # fmt: skip
        vals = [r[k] for r in runs if k in r]
        if vals:
            out[k] = {"median": round(statistics.median(vals), 2), "min": min(vals), "max": max(vals)}
    return out


def machine() -> dict:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    mem = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = int(next(ln.split()[1] for ln in f if ln.startswith("MemTotal"))) * 1024
    import aiokafka
    import faust

    from stream_app.kafka_local import kafka_version

    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "ram_gb": round(mem / 2**30, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "kafka": kafka_version(),
        "faust": faust.__version__,
        "aiokafka": aiokafka.__version__,
    }


@contextlib.contextmanager
def broker(a: argparse.Namespace) -> Iterator[str]:
    if a.bootstrap:
        yield a.bootstrap
        return
    from stream_app.kafka_local import LocalKafka

    home = Path(os.environ.get("STREAM_APP_HOME") or Path.home() / ".cache" / "stream_app_bench")
    local = LocalKafka(port=a.port, home=home)
    started = local.pid() is None
    took = local.up()
    say(f"broker {local.bootstrap} ready in {took:.1f}s (home {home}, log {local.log_file})")
    try:
        yield local.bootstrap
    finally:
        if started:
            local.down()
            if not a.keep_broker_data:
                shutil.rmtree(local.dir, ignore_errors=True)
            say("broker stopped")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--cover", action="store_true", help="the first USERS events touch every user once")
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--bootstrap", default="", help="use this broker instead of starting a local one")
    p.add_argument("--port", type=int, default=19392, help="port of the local broker the bench starts")
    p.add_argument("--keep-broker-data", action="store_true")
    p.add_argument("--keep-logs", action="store_true", help="keep the workers' logs (their directory is printed)")
    p.add_argument("--commit-interval", type=float, default=Settings.model_fields["commit_interval_s"].default,
                   help="STREAM_APP_COMMIT_INTERVAL_S (also the raw loop's and minimal Faust's)")  # fmt: skip
    p.add_argument("--linger-ms", type=int, default=5, help="producer linger of the workers")
    p.add_argument("--fetch-max-wait-ms", type=int, default=Settings.model_fields["fetch_max_wait_ms"].default,
                   help="STREAM_APP_FETCH_MAX_WAIT_MS of the pipeline workers")  # fmt: skip
    p.add_argument("--session-timeout", type=float, default=30.0, help="STREAM_APP_SESSION_TIMEOUT_S of the workers")
    p.add_argument("--stop-timeout", type=float, default=45.0, help="SIGKILL a worker this long after SIGTERM")
    p.add_argument("--latency-seconds", type=float, default=30.0, help="measured seconds of the latency probe")
    p.add_argument("--latency-warmup", type=float, default=5.0, help="seconds the probe sends before measuring")
    p.add_argument(
        "--latency-commit-interval",
        type=float,
        default=0.0,
        help="commit interval of the restarted workers the latency probe measures (0: --commit-interval)",
    )
    p.add_argument("--latency-rate", type=float, default=0.0, help="events/s of the probe (0: 50%% of the max)")
    p.add_argument("--run-timeout", type=float, default=3600.0)
    p.add_argument("--only", default="a,b,c,d,latency,memory,recovery,scale", help="phases to run")
    p.add_argument("--out", default=str(ROOT / "results"), help="directory for bench.json / .md / .png")
    p.add_argument("--name", default="bench", help="file name stem of the results")
    a = p.parse_args(argv)
    only = set(a.only.split(","))
    STOP_TIMEOUT[0] = a.stop_timeout

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {
        "command": "python -m bench " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "settings": {
            "partitions": a.partitions,
            "commit_interval_s": a.commit_interval,
            "producer_linger_ms": a.linger_ms,
            "session_timeout_s": a.session_timeout,
            "worker_fetch_max_wait_ms": a.fetch_max_wait_ms,
            "minimal_faust_fetch_max_wait_ms": 1500,
            "latency_consumer_fetch_max_wait_ms": 10,
            "latency_producer_linger_ms": 0,
            "latency_probe_tick_ms": int(PROBE_TICK_S * 1000),
            "latency_commit_interval_s": a.latency_commit_interval or a.commit_interval,
            "latency_warmup_s": a.latency_warmup,
            "latency_seconds": a.latency_seconds,
            "raw_loop": "aiokafka getmany(max_records=5000), acks=1, commit after acks every commit interval",
            "minimal_faust": "at_least_once, same commit interval and linger",
        },
    }

    def save() -> None:
        from bench.report import write

        write(res, out_dir, a.name)

    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    t_start = time.monotonic()
    try:
        with broker(a) as bootstrap:
            b = Bench(a, bootstrap, workdir)
            layout = {t: (a.partitions, {}) for t in b.input_topics}
            run_async(create_topics(bootstrap, layout))
            say(f"preloading {a.events} events over {a.users} users into {b.input_topics}")
            res["preload"] = run_async(preload(bootstrap, b.inputs, a.events, a.users, a.seed, a.partitions, a.cover))
            say(f"preload: {res['preload']}")
            save()
            apps: dict[str, tuple[Settings, Path]] = {}
            phases = [("a_raw_aiokafka", "a", b.raw_loop), ("b_minimal_faust", "b", b.minimal_faust)]
            for key, flag, fn in phases:
                if flag not in only:
                    continue
                runs = []
                for i in range(a.runs):
                    runs.append(fn())
                    say(f"{key} run {i + 1}: {runs[-1]}")
                res[key] = summarize(runs)
                save()
            for key, flag, guarantee in (
                ("c_pipeline_alo", "c", "at_least_once"),
                ("d_pipeline_eos", "d", "exactly_once"),
            ):
                if flag not in only:
                    continue
                runs = []
                for i in range(a.runs):
                    keep = i == a.runs - 1 and flag == "c" and "memory" in only
                    r, s, proc, log = b.pipeline(guarantee, keep=keep)
                    runs.append(r)
                    say(f"{key} run {i + 1}: {r}")
                    if proc is not None:
                        try:
                            res["memory"] = b.memory(s, proc)
                            say(f"memory: {res['memory']}")
                        finally:
                            r["stop"] = stop(proc, log=log)
                apps[guarantee] = (s, log)
                res[key] = summarize(runs)
                save()
            if "scale" in only:
                one, two = [], []
                for _ in range(a.runs):  # alternating, so drift on the shared machine hits both alike
                    one.append(b.scale(1))
                    two.append(b.scale(2))
                one, two = summarize(one), summarize(two)
                say(f"scale, 2 workers: {two}")
                res["scale"] = {
                    "one_worker": one,
                    "two_workers": two,
                    "note": "at_least_once, fresh app id per run; each from every worker processing to lag 0",
                }
                res["scale"]["speedup"] = round(
                    res["scale"]["two_workers"]["events_per_s"]["median"]
                    / res["scale"]["one_worker"]["events_per_s"]["median"],
                    2,
                )
                # The ceiling two workers could reach on this machine: every core busy at the one-worker run's CPU per
                # event of everything on it (workers, broker, bench), i.e. cores / cores busy with one worker.
                busy = one.get("machine_cores", {}).get("median")
                if busy:
                    res["scale"]["machine_ceiling"] = round((os.cpu_count() or 1) / busy, 2)
                say(f"scale: {res['scale']['speedup']}x (machine ceiling {res['scale'].get('machine_ceiling')}x)")
            # recovery and latency last: their probe events go into the shared input topics
            for guarantee, key in (("at_least_once", "c_pipeline_alo"), ("exactly_once", "d_pipeline_eos")):
                if guarantee not in apps or not {"recovery", "latency"} & only:
                    continue
                s, log = apps[guarantee]
                rec, proc = b.restart(s, log, a.latency_commit_interval)
                rec["previous_worker_stop"] = res[key]["runs"][-1].get("stop")
                try:
                    res.setdefault("recovery", {})[guarantee] = rec
                    say(f"restart {guarantee}: {rec}")
                    save()
                    if "latency" in only:
                        rate = a.latency_rate or 0.5 * res[key]["events_per_s"]["median"]
                        lat = []
                        for i in range(a.runs):  # one worker, probes one after another (each catches up first)
                            lat.append(b.latency(s, rate, a.latency_seconds, proc.pid))
                            say(f"latency {guarantee} run {i + 1}: {lat[-1]}")
                        res.setdefault("latency", {})[guarantee] = summarize_latency(lat)
                        save()
                finally:
                    say(f"stopped: {stop(proc, log=log)}")
            res["ratios"] = ratios(res)
            res["total_s"] = round(time.monotonic() - t_start, 1)
            save()
            say(f"done in {res['total_s']}s: {out_dir / a.name}.json")
    finally:
        stop_all()
        if a.keep_logs:
            say(f"worker logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def ratios(res: dict) -> dict:
    def med(key: str, metric: str) -> float | None:
        return res[key][metric]["median"] if key in res else None

    out = {}
    for name, num, den in (
        ("c/a", "c_pipeline_alo", "a_raw_aiokafka"),
        ("d/a", "d_pipeline_eos", "a_raw_aiokafka"),
        ("d/b", "d_pipeline_eos", "b_minimal_faust"),
        ("c/b", "c_pipeline_alo", "b_minimal_faust"),
    ):
        for metric in ("events_per_s", "events_per_cpu_s"):
            n, d = med(num, metric), med(den, metric)
            if n and d:
                out[f"{name} {metric}"] = round(n / d, 3)
    return out


if __name__ == "__main__":
    main()
