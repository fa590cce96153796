"""``stream-app demo``: the product's story on one machine, with the real worker on a real broker.

A seeded population's few days of clicks, likes and payments (the project's simulator, with its duplicates
and malformed messages) go to Kafka; a real ``stream-app worker`` process decides; then the demo reads the
topics back and prints pushes, holdouts and suppressions by campaign and reason, what went to the dead-letter
topic, checks that every message was handled exactly once, explains one pushed user with ``stream-app explain``
and says where the metrics and the dashboard are. It stops the worker, and the broker if it started it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import click
import orjson

from stream_app.core.policy import suppression_code_of
from stream_app.kafka_local import BrokerError, LocalKafka, kafka_version, metadata_round_trip
from stream_app.settings import Settings

ACTIONS = ("push", "holdout", "suppress")


def decision_reason(action: str, reasons: Sequence[str]) -> str:
    """One bounded code for why a decision ended as it did: for a suppression the rule that suppressed (the
    metric's code); for a push or a holdout (a push withheld from a random control group) what made it a
    push: the model's score above the threshold, or exploration (more of it while the model is cold).

    >>> decision_reason("suppress", ["eligible:clicks>=3", "cold_start:0_labels", "suppress:score<0.08"])
    'below_threshold'
    >>> decision_reason("push", ["eligible:clicks>=3", "score>=0.08", "hold:quiet_hours"])
    'score>=threshold'
    >>> decision_reason("holdout", ["eligible:clicks>=3", "cold_start:4_labels", "explore:0.3", "holdout:0.1"])
    'cold-start exploration'
    """
    if action == "suppress":
        return suppression_code_of(action, reasons) or "other"
    if any(r.startswith("score>=") for r in reasons):
        return "score>=threshold"
    if any(r.startswith("explore:") for r in reasons):
        return "cold-start exploration" if any(r.startswith("cold_start:") for r in reasons) else "exploration"
    return "other"


def summarise(decisions: Iterable[dict]) -> dict[tuple[str, str, str], list[int]]:
    """(campaign, action, reason) -> [decisions, of which held to the end of the user's quiet hours].

    >>> summarise([{"campaign": "c", "action": "push", "reasons": ["explore:0.3", "hold:quiet_hours"]}] * 2)
    {('c', 'push', 'exploration'): [2, 2]}
    """
    rows: dict[tuple[str, str, str], list[int]] = {}
    for d in decisions:
        row = rows.setdefault((d["campaign"], d["action"], decision_reason(d["action"], d["reasons"])), [0, 0])
        row[0] += 1
        row[1] += "hold:quiet_hours" in d["reasons"]
    return rows


def table(rows: dict[tuple[str, str, str], list[int]]) -> list[str]:
    """The summary as aligned lines: per campaign push, holdout, suppress; the most frequent reason first."""
    order = {a: i for i, a in enumerate(ACTIONS)}
    keyed = sorted(rows.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 9), -kv[1][0], kv[0][2]))
    width = max((len(c) for (c, _, _) in rows), default=8)
    lines = [f"{'campaign':<{width}}  {'action':<8}  {'count':>6}  reason (held: sent at the end of quiet hours)"]
    for (c, a, r), (n, held) in keyed:
        lines.append(f"{c:<{width}}  {a:<8}  {n:>6}  {r}" + (f" (held: {held})" if held else ""))
    return lines


def metric_values(body: str, name: str) -> dict[str, float]:
    """Samples of one metric in a /metrics body: label text -> value.

    >>> metric_values('x_total{a="1"} 2.0\\nx_total{a="2"} 3.0\\ny 1.0', "x_total")
    {'a="1"': 2.0, 'a="2"': 3.0}
    """
    out = {}
    for line in body.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels = line[len(name) :].split(" ")[0].strip("{}")
            out[labels] = float(line.rsplit(" ", 1)[1])
    return out


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""
    except OSError:
        return 0, ""


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM (a worker's clean shutdown), SIGKILL after 45 s (longer than the worker's shutdown timeout)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(45)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_for(cond: Callable[[], bool], timeout: float, proc: subprocess.Popen, log: Path, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            raise click.ClickException(f"worker exited ({proc.returncode}) while waiting for {what}:\n{tail}")
        if cond():
            return
        time.sleep(0.3)
    raise click.ClickException(f"timed out after {timeout}s waiting for {what} (log: {log})")


def _local_for(settings: Settings) -> LocalKafka:
    from urllib.parse import urlparse

    return LocalKafka(port=urlparse(settings.broker.split(";")[0]).port or 9092)


def run(users: int, days: int, seed: int, rate: float, keep_broker: bool) -> None:
    from stream_app.kafka_io import create_topics, read_to_end
    from stream_app.sim.kafka import produce_envelopes
    from stream_app.sim.simulator import SimConfig, Simulator

    echo = click.echo
    s = Settings()
    bs = s.bootstrap_servers
    local, started_broker = _local_for(s), False
    t_start = time.monotonic()
    if metadata_round_trip(bs, timeout=3):
        echo(f"1/6 using the Kafka broker already answering at {bs}")
    else:
        echo(f"1/6 starting a local Apache Kafka {kafka_version()} on {local.bootstrap} (stream-app kafka up) ...")
        try:
            took = local.up()
        except BrokerError as e:
            raise click.ClickException(str(e)) from None
        started_broker = True
        echo(f"    ready in {took:.1f}s (log: {local.log_file})")
    proc: subprocess.Popen | None = None
    try:
        run_id = f"{int(time.time())}"
        # fresh topics and app id per run, so a demo never counts an earlier one's records
        s = s.with_topic_suffix(f"demo-{run_id}").model_copy(update={"app_id": f"{s.app_id}-demo-{run_id}"})
        made = asyncio.run(create_topics(bs, s.topic_layout()))
        echo(f"2/6 topics created for this run: {len(made)} (suffix -demo-{run_id})")
        datadir = Path(s.datadir)
        datadir.mkdir(parents=True, exist_ok=True)
        env_file = datadir / f"demo-{run_id}.env"
        env = {k: v for k, v in s.to_env().items() if k != "STREAM_APP_BROKER_PASSWORD"}
        env_file.write_text("".join(f"{k}={v}\n" for k, v in sorted(env.items())))
        log_path = datadir / f"demo-{run_id}-worker.log"
        web = f"http://{s.web_bind}:{s.web_port}"
        echo(f"3/6 starting a worker: stream-app worker (log: {log_path}) ...")
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "stream_app", "worker", "--loglevel", "warning"],
                                    env={**os.environ, **s.to_env()}, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        _wait_for(lambda: _get(f"{web}/readyz")[0] == 200, 120, proc, log_path, "/readyz")
        echo(f"    ready: {web}/readyz answers 200")

        t0_ms = (int(time.time() * 1000) // 86_400_000 - days) * 86_400_000
        sim = Simulator(SimConfig(users=users, days=days, seed=seed, t0_ms=t0_ms), deliver=False)
        t = time.monotonic()
        sent = asyncio.run(produce_envelopes(sim, s, rate))
        c = sim.counts
        events = c["events_click"] + c["events_like"] + c["events_payment"]
        echo(f"4/6 simulated {users} users over {days} days (seed {seed}) -> {sent} messages in "
             f"{time.monotonic() - t:.1f}s: {c['events_click']} clicks, {c['events_like']} likes, "
             f"{c['events_payment']} payments, {c['duplicates']} duplicates, {c['malformed']} malformed")  # fmt: skip

        def handled() -> float:
            body = _get(f"{web}/metrics")[1]
            return sum(sum(metric_values(body, m).values()) for m in (
                "stream_app_events_consumed_total", "stream_app_events_rejected_total",
                "stream_app_duplicates_dropped_total"))  # fmt: skip

        t = time.monotonic()
        _wait_for(lambda: handled() >= sent, 300, proc, log_path, f"all {sent} messages handled")
        body = _get(f"{web}/metrics")[1]
        metrics_file = datadir / f"demo-{run_id}-metrics.prom"
        metrics_file.write_text(body)
        echo(f"5/6 the worker handled all {sent} messages {time.monotonic() - t:.1f}s after the last was sent")
        versions = metric_values(body, "stream_app_model_version")
        echo(
            "    models the worker scored with at the end: "
            + ", ".join(f"{k.split('=', 1)[1].strip(chr(34))} v{v:g}" for k, v in sorted(versions.items()))
        )
        stop_process(proc)  # a clean shutdown commits everything; what follows is read back from the topics

        audit = [orjson.loads(v) for _, v in asyncio.run(read_to_end(bs, s.audit_topic, 60))]
        pushes = [orjson.loads(v) for _, v in asyncio.run(read_to_end(bs, s.decisions_topic, 60))]
        dead = [orjson.loads(v) for _, v in asyncio.run(read_to_end(bs, s.dead_letter_topic, 60))]
        rows = summarise(audit)
        by_action = Counter(d["action"] for d in audit)
        echo(f"6/6 what happened ({time.monotonic() - t_start:.0f}s so far)")
        echo(f"    {len(audit)} decisions in {s.audit_topic}: {by_action['push']} pushes, "
             f"{by_action['holdout']} holdouts (pushes withheld to measure uplift), {by_action['suppress']} "
             f"suppressions; {len(pushes)} records for the push services in {s.decisions_topic}")  # fmt: skip
        for line in table(rows):
            echo(f"      {line}")
        codes = Counter(d.get("error_code", "?") for d in dead)
        echo(f"    {len(dead)} dead letters in {s.dead_letter_topic}, by reason: "
             f"{', '.join(f'{k} {v}' for k, v in codes.most_common()) or 'none'}")  # fmt: skip
        consumed = sum(metric_values(body, "stream_app_events_consumed_total").values())
        dups = sum(metric_values(body, "stream_app_duplicates_dropped_total").values())
        counted = {tuple(sorted(k.split(","))): v for k, v in metric_values(body, "stream_app_decisions_total").items()}
        in_topic = Counter(tuple(sorted([f'action="{d["action"]}"', f'campaign="{d["campaign"]}"'])) for d in audit)
        check = (consumed == events and dups == c["duplicates"] and len(dead) == c["malformed"]
                 and {k: v for k, v in counted.items() if v} == dict(in_topic))  # fmt: skip
        echo(f"    exactly once: {consumed:.0f} of {events} events applied, {dups:.0f} of {c['duplicates']} "
             f"duplicates dropped, {len(dead)} of {c['malformed']} malformed dead-lettered; decisions counted in "
             f"metrics = decisions in the audit topic: {'yes' if check else 'NO'}")  # fmt: skip
        if not check:
            raise click.ClickException(f"the numbers do not add up (metrics snapshot: {metrics_file})")

        if pushes:
            user = _example(audit)
            echo(f"    why did {user} get a push?  stream-app explain {user}  (with this run's settings):")
            command = [sys.executable, "-m", "stream_app", "explain", user, "--last", "4"]
            out = subprocess.run(command, env={**os.environ, **s.to_env()}, capture_output=True, text=True, timeout=120)
            if out.returncode != 0:
                raise click.ClickException(f"stream-app explain failed: {out.stderr[-2000:]}")
            for line in out.stdout.splitlines():
                echo(f"      {line}")
        echo("    metrics and dashboard:")
        echo(f"      the worker served Prometheus metrics at {web}/metrics (/healthz, /readyz); final snapshot: "
             f"{metrics_file}")  # fmt: skip
        for name in ("stream_app_decisions_total", "stream_app_suppressions_total"):
            for labels, v in metric_values(body, name).items():
                if v:
                    echo(f"        {name}{{{labels}}} {v:g}")
        echo("      dashboard: deploy/grafana/dashboards/stream_app.json; `docker compose up` provisions it in Grafana "
             "at http://127.0.0.1:3000 with Prometheus at http://127.0.0.1:9090 and the alert rules of "
             "deploy/prometheus/alerts.yml (docs/operations.md, docs/metrics.md)")  # fmt: skip
        echo(
            f"      this run's settings: {env_file}"
            + (" (the broker is still running: `env $(cat FILE) stream-app explain USER`)" if keep_broker else "")
        )
        echo(f"    done in {time.monotonic() - t_start:.0f}s")
    finally:
        if proc is not None:
            stop_process(proc)
        if started_broker and not keep_broker:
            local.down()
            click.echo("worker and broker stopped")
        else:
            click.echo("worker stopped; broker left running")


def _example(audit: list[dict]) -> str:
    """A pushed user worth explaining: one whose latest decision is a push (so `explain` shows it), preferably
    pushed on the model's score, with the most decisions."""
    per_user = Counter(d["user_id"] for d in audit)
    latest = {d["user_id"]: d for d in audit}
    pushed = [d for d in latest.values() if d["action"] == "push"] or [d for d in audit if d["action"] == "push"]
    scored = [d for d in pushed if any(r.startswith("score>=") for r in d["reasons"])]
    return max(scored or pushed, key=lambda d: (per_user[d["user_id"]], d["user_id"]))["user_id"]
