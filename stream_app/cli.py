"""``stream-app``: the command line. click is already a Faust dependency, so it costs nothing extra."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import click
import orjson

from stream_app.core.events import EVENT_TYPES
from stream_app.kafka_local import BrokerError, LocalKafka, kafka_version


def _settings():
    from stream_app.settings import Settings

    return Settings()


def _local_for(settings) -> LocalKafka:
    first = settings.broker.split(";")[0]
    port = urlparse(first).port or 9092
    return LocalKafka(port=port)


@click.group()
@click.version_option(package_name="stream-app", message="stream-app %(version)s")
def main() -> None:
    """stream_app: real-time push targeting on Kafka. Settings come from STREAM_APP_* variables."""


@main.group()
def kafka() -> None:
    """A local single-node KRaft broker from the official Apache Kafka jars (needs Java 17 + Maven)."""


@kafka.command("up")
@click.option("--port", type=int, default=None, help="client port (default: from STREAM_APP_BROKER)")
def kafka_up(port: int | None) -> None:
    k = LocalKafka(port=port) if port else _local_for(_settings())
    try:
        took = k.up()
    except BrokerError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"Kafka {kafka_version()} ready at {k.bootstrap} in {took:.1f}s (log: {k.log_file})")


@kafka.command("down")
@click.option("--port", type=int, default=None)
def kafka_down(port: int | None) -> None:
    k = LocalKafka(port=port) if port else _local_for(_settings())
    click.echo("stopped" if k.down() else f"no broker running on port {k.port}")


@kafka.command("status")
@click.option("--port", type=int, default=None)
def kafka_status(port: int | None) -> None:
    k = LocalKafka(port=port) if port else _local_for(_settings())
    click.echo(k.status())


@main.command("topics")
@click.option("--check", "check_only", is_flag=True,
              help="create nothing: report every topic whose partitions, compaction or replication differ from "
                   "what the app needs (exit 1 if any)")  # fmt: skip
def topics(check_only: bool) -> None:
    """Create every topic the app uses (inputs, consent, outputs, model topics, state changelogs).

    Existing topics are never altered: `--check` lists how they differ."""
    from stream_app.app import client_kwargs
    from stream_app.topic_check import check_topics

    s = _settings()
    kw = client_kwargs(s)  # SASL over TLS too, when configured
    if check_only:
        found = asyncio.run(check_topics(s, **kw))
        for mismatch in found:
            click.echo(f"MISMATCH {mismatch}")
        if found:
            raise click.ClickException(f"{len(found)} topic mismatches (topics are never altered automatically)")
        click.echo(f"all {len(s.topic_layout())} topics match: partitions, cleanup policy, replication, min ISR")
        return
    s, made = asyncio.run(_create_topics(s, s.topic_layout()))
    click.echo(f"created: {', '.join(made) or 'nothing (all exist)'} "
               f"(replication {s.topic_replication}, min.insync.replicas {s.topic_min_insync_replicas})")  # fmt: skip


async def _create_topics(s, layout: dict) -> tuple:
    """Create the missing topics of ``layout`` with the effective replication and min ISR; returns the settings
    with those resolved (0 = production default, capped by the brokers there are) and the topics made."""
    from aiokafka.admin import AIOKafkaAdminClient

    from stream_app.app import client_kwargs
    from stream_app.kafka_io import create_topics
    from stream_app.topic_check import broker_count, effective_replication

    admin = AIOKafkaAdminClient(**client_kwargs(s))
    await admin.start()
    try:
        rf, isr = effective_replication(s, await broker_count(admin))
    finally:
        await admin.close()
    s = s.model_copy(update={"topic_replication": rf, "topic_min_insync_replicas": isr})
    layout = {t: (n, {**configs, "min.insync.replicas": str(isr)}) for t, (n, configs) in layout.items()}
    kw = client_kwargs(s)
    return s, await create_topics(kw.pop("bootstrap_servers"), layout, rf, **kw)


@main.command("worker")
@click.option("--loglevel", default="info")
def worker(loglevel: str) -> None:
    """Run one Faust worker (blocks; SIGTERM/SIGINT stop it cleanly)."""
    import faust

    from stream_app.app import create_app
    from stream_app.logs import logging_config

    s = _settings()
    # the app's own state topics (compacted, co-partitioned) must exist before the first write
    internal = {t: s.topic_layout()[t] for t in (s.users_changelog_topic, s.trainer_changelog_topic)}
    s, _ = asyncio.run(_create_topics(s, internal))  # also resolves the replication Faust's own topics get
    try:
        sa = create_app(s)
    except ValueError as e:  # a bad campaign file: the located message, no traceback
        raise click.ClickException(str(e)) from None
    w = _worker_class(faust.Worker)(sa.app, loglevel=loglevel, shutdown_timeout_s=s.shutdown_timeout_s,
                                    logging_config=logging_config(s.log_format, loglevel))  # fmt: skip
    w.spinner = None  # at warn level its handler sets the root logger to DEBUG: every debug call then costs
    code: int | str | None = 0
    try:
        w.execute_from_commandline()
    except SystemExit as done:
        code = done.code
    # Under exactly_once, Faust 0.15 can fail its last commit at shutdown ("Not in the middle of a
    # transaction"; that batch is then redelivered and deduplicated) and leave its consumer thread alive after
    # closing the event loop, so the process never exits. Everything is stopped by now: exit regardless.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 1)


def _worker_class(base: type) -> type:
    """Faust's worker with a bounded stop: with the broker unreachable, Faust 0.15's stop waits forever (its
    consumer thread does not stop, then the loop hangs gathering futures), so a SIGTERM alone never ends the
    process. After the first stop signal a timer thread ends it with code 1 once ``shutdown_timeout_s`` passes;
    nothing is lost (uncommitted offsets are redelivered, an open transaction is aborted by the broker)."""

    class Worker(base):  # the name Faust logs ("[^Worker]: Ready")
        def __init__(self, *args, shutdown_timeout_s: float, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.shutdown_timeout_s = shutdown_timeout_s
            self.watchdog: threading.Timer | None = None

        def _schedule_shutdown(self, signum: signal.Signals) -> None:
            if self.watchdog is None:
                self.watchdog = threading.Timer(self.shutdown_timeout_s, self._exit_now, args=(signum,))
                self.watchdog.daemon = True
                self.watchdog.start()
            super()._schedule_shutdown(signum)

        def _exit_now(self, signum: signal.Signals) -> None:
            logging.getLogger("stream_app.worker").error(
                "worker did not stop within %.0f s of %s (is the broker reachable?): exiting with code 1; "
                "uncommitted work is redelivered to the next worker", self.shutdown_timeout_s, signum.name)  # fmt: skip
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)

    return Worker


@main.command("demo")
@click.option("--users", default=1000, show_default=True, help="simulated users")
@click.option("--days", default=4, show_default=True, help="simulated days of their events")
@click.option("--seed", default=7, show_default=True)
@click.option("--rate", default=400.0, show_default=True,
              help="messages per second (0: at once); paced, the models learn while the days pass")  # fmt: skip
@click.option("--keep-broker", is_flag=True, help="leave the local broker running afterwards")
def demo(users: int, days: int, seed: int, rate: float, keep_broker: bool) -> None:
    """A simulated population's few days through a real worker on a real broker (started here when none
    answers), then pushes, holdouts and suppressions by campaign and reason, one decision explained, and
    where the metrics and dashboard are. Stops what it started."""
    from stream_app import demo as story

    story.run(users, days, seed, rate, keep_broker)


def _duration(ms: int) -> str:
    """``90000`` -> ``"90s"``: the largest unit that divides it, as the campaign file writes durations.

    >>> _duration(48 * 3600_000), _duration(90_000), _duration(1500)
    ('2d', '90s', '1.5s')
    """
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms / 1000:g}s"


@main.group()
def campaigns() -> None:
    """The campaign config file (YAML or JSON)."""


@campaigns.command("check")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def campaigns_check(path: Path) -> None:
    """Validate PATH, then print the effective config (every default filled in) and what each event type,
    and the lapse timer, triggers, in the order a worker decides. Exit 1 with located errors if invalid."""
    from stream_app.campaigns import load_campaigns
    from stream_app.core.policy import LAPSE

    try:
        found, g = load_campaigns(path)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{path}: valid, {len(found)} campaigns")
    click.echo(f"guardrails: at most {g.max_pushes_24h} pushes per user per 24 h, min gap {_duration(g.min_gap_ms)}, "
               f"quiet hours {g.quiet_start_hour:02d}:00-{g.quiet_end_hour:02d}:00 local ({g.quiet_mode}), "
               f"decision ttl {_duration(g.decision_ttl_ms)}")  # fmt: skip
    for c in found:
        click.echo(f"campaign {c.name} (priority {c.priority}, mode {c.mode}):")
        lapse = f" (quiet for {_duration(c.lapse_after_ms)})" if LAPSE in c.triggers else ""
        click.echo(f"  triggers: {', '.join(c.triggers)}{lapse}")
        click.echo(f"  eligibility: {', '.join(map(str, c.eligibility)) or 'everyone'}; "
                   f"segments: {', '.join(map(str, c.segments)) or 'all'}")  # fmt: skip
        click.echo(f"  push if score >= {c.threshold} (prior {c.prior} until {c.min_labels} labels; "
                   f"cold-start push share {c.cold_start_share}); holdout {c.holdout_share}, "
                   f"exploration {c.exploration_share}")  # fmt: skip
        click.echo(f"  cooldown {_duration(c.cooldown_ms)}, attribution window {_duration(c.attribution_window_ms)}")
    click.echo("what triggers what (highest priority first):")
    for trigger in (*EVENT_TYPES, LAPSE):
        names = [c.name for c in sorted(found, key=lambda c: -c.priority) if trigger in c.triggers]
        click.echo(f"  {trigger:<8} -> {', '.join(names) or 'nothing'}")


@main.command("explain")
@click.argument("user_id")
@click.option("--last", default=10, show_default=True, help="decisions to show")
@click.option("--scan", default=200_000, show_default=True,
              help="audit records to read back from the end of the user's partition")  # fmt: skip
def explain_cmd(user_id: str, last: int, scan: int) -> None:
    """Why USER_ID got (or did not get) pushes: profile, consent, segment, open label windows and the last
    decisions with their reasons, read from the topics (the worker's settings say which)."""
    from stream_app.app import client_kwargs
    from stream_app.explain import explain, render

    s = _settings()
    kw = client_kwargs(s)
    kw.pop("bootstrap_servers")
    found = asyncio.run(explain(s, user_id, scan=scan, last=last, **kw))
    for line in render(found):
        click.echo(line)


@main.command("replay")
@click.argument("events", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="directory for decisions.jsonl, audit.jsonl, dead-letters.jsonl, model-inputs.jsonl, ...",
)
def replay_cmd(events: Path, out_dir: Path) -> None:
    """Run the agents' engine over a JSON-lines file of events (.jsonl or .jsonl.gz), without Kafka.

    Campaigns and every other setting come from the same STREAM_APP_* variables as the worker; the same
    input and settings give byte-identical output files.
    """
    from stream_app.replay import read_lines, replay

    try:
        result = replay(read_lines(events), _settings())
    except ValueError as e:  # a bad campaign file: the located message, no traceback
        raise click.ClickException(str(e)) from None
    paths = result.write(out_dir)
    for name, path in paths.items():
        click.echo(f"{len(result.records[name]):>9} {name:<13} -> {path}")
    click.echo(f"outcomes: {dict(sorted(result.counts.items()))}; users held: {len(result.users)}")


@main.command("ope")
@click.option("--audit", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="decision-audit records, JSON lines (a replay's audit.jsonl)")  # fmt: skip
@click.option("--labels", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="model-inputs records, JSON lines (a replay's model-inputs.jsonl): the labels")  # fmt: skip
@click.option("--campaign", required=True)
@click.option("--policy", "kind", type=click.Choice(["model", "all", "none"]), default="model", show_default=True,
              help="target policy: push where the uplift model scores >= --threshold, push all, push none")  # fmt: skip
@click.option("--model", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="model-params.jsonl (its last uplift:<campaign> version) or one version as JSON")  # fmt: skip
@click.option("--threshold", default=0.0, show_default=True, help="minimum estimated uplift to push")
@click.option("--holdout-share", type=float, default=None,
              help="the campaign's holdout share (default: from the campaign config)")  # fmt: skip
def ope_cmd(audit: Path, labels: Path, campaign: str, kind: str, model: Path | None, threshold: float,
            holdout_share: float | None) -> None:  # fmt: skip
    """Off-policy evaluation from the log: IPS and doubly robust estimates (95% intervals, bootstrap over users)
    of a target policy's conversion rate per labelled decision and of its uplift per push, using the holdout's
    known randomisation. Prints JSON."""
    from stream_app.campaigns import load_campaigns
    from stream_app.offpolicy import run

    if holdout_share is None:
        campaigns, _ = load_campaigns(_settings().campaigns_file or None)
        found = next((c for c in campaigns if c.name == campaign), None)
        if found is None:
            raise click.ClickException(f"campaign {campaign!r} is not in the campaign config; pass --holdout-share")
        holdout_share = found.holdout_share
    try:
        result = run(audit, labels, campaign, holdout_share, kind, model, threshold)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(result, indent=1))


@main.command("simulate")
@click.option("--users", default=2000, show_default=True, help="simulated users")
@click.option("--days", default=28, show_default=True, help="simulated days of event time")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="write replay envelopes to this .jsonl or .jsonl.gz file")  # fmt: skip
@click.option("--kafka", "to_kafka", is_flag=True, help="produce to the configured input and consent topics")
@click.option("--rate", default=0.0, show_default=True, help="--kafka: messages per second (0: as fast as possible)")
@click.option("--t0-ms", type=int, default=None,
              help="start of simulated time, epoch ms (default: a fixed date for files; for --kafka, --days "
                   "before today 00:00 UTC, so event times stay within the worker's skew bounds)")  # fmt: skip
def simulate_cmd(users: int, days: int, seed: int, out: Path | None, to_kafka: bool, rate: float,
                 t0_ms: int | None) -> None:  # fmt: skip
    """Generate a seeded synthetic population's events (open loop: nobody reacts to pushes).

    For the closed loop (the simulator reacting to decisions) see `stream-app evaluate`.
    """
    import gzip

    from stream_app.sim.simulator import T0_MS, SimConfig, Simulator

    if (out is None) == (not to_kafka):
        raise click.UsageError("give exactly one of --out FILE or --kafka")
    if t0_ms is None:
        t0_ms = T0_MS if out is not None else (int(time.time() * 1000) // 86_400_000 - days) * 86_400_000
    sim = Simulator(SimConfig(users=users, days=days, seed=seed, t0_ms=t0_ms), deliver=False)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        opener = gzip.open if out.suffix == ".gz" else open
        with opener(out, "wb") as f:
            n = 0
            for envelope in sim:
                f.write(orjson.dumps(envelope) + b"\n")
                n += 1
        click.echo(f"wrote {n} messages to {out}")
    else:
        from stream_app.sim.kafka import produce_envelopes

        s = _settings()
        t = time.monotonic()
        n = asyncio.run(produce_envelopes(sim, s, rate))
        took = time.monotonic() - t
        click.echo(f"produced {n} messages to {s.bootstrap_servers} in {took:.1f}s ({n / max(took, 1e-9):.0f}/s)")
    counts = ", ".join(f"{k}={v}" for k, v in sorted(sim.counts.items()))
    click.echo(f"{users} users, {days} days, seed {seed}: {counts}")


@main.command("evaluate")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("docs/evaluation"),
              show_default=True, help="directory for report.md, summary.json and the PNG plots")  # fmt: skip
@click.option("--seeds", default="1,2,3", show_default=True, help="comma-separated simulation seeds")
@click.option("--users", default=1500, show_default=True)
@click.option("--days", default=28, show_default=True)
@click.option("--push-rate", default=0.05, show_default=True, help="share of eligible triggers every policy pushes")
@click.option("--workers", default=2, show_default=True, help="processes running simulations in parallel")
@click.option("--quick", is_flag=True, help="a tiny population, one seed, one process (a smoke test, seconds)")
def evaluate_cmd(out_dir: Path, seeds: str, users: int, days: int, push_rate: float, workers: int,
                 quick: bool) -> None:  # fmt: skip
    """Closed-loop simulations of no pushes, random, propensity, uplift and oracle targeting at equal push
    volume over several seeds, a public-dataset check of the propensity learner, and a Markdown report."""
    from stream_app.sim.evaluate import QUICK, EvalConfig, evaluate

    if quick:
        cfg = QUICK
    else:
        cfg = EvalConfig(users=users, days=days, seeds=tuple(int(x) for x in seeds.split(",") if x.strip()),
                         push_rate=push_rate, workers=workers)  # fmt: skip
    t = time.monotonic()
    summary = evaluate(cfg, out_dir)
    for target in summary["targets"]:
        click.echo(f"{'met   ' if target['met'] else 'MISSED'} {target['target']}: {target['measured']}")
    click.echo(f"report: {out_dir / 'report.md'} ({time.monotonic() - t:.0f}s)")


if __name__ == "__main__":
    main()
