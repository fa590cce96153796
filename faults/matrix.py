"""``python -m faults``: the fault matrix. Every scenario, every run: fresh topics, the same seeded simulated
input, real `stream-app worker` processes on a real local broker, a fault, then an independent verdict.

    python -m faults --fast                      # CI subset: 300 users x 2 days, every scenario once
    python -m faults                             # full matrix: 2,000 users x 5 days, 3 runs, exactly_once
    python -m faults --guarantee both --runs 3   # and at_least_once
    python -m faults --scenario kill_50 --scenario join_second --runs 1

Results: bench/results/faults-<name>.json and .md (``--out``, ``--name``). The exit code is 0 only when every
run of every scenario passed every invariant that applies to its guarantee.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from faults import verify
from faults.report import write
from faults.run import ROOT, Run, RunConfig, paced_rate, say
from faults.scenarios import FAST_ALO, SCENARIOS, Scenario
from stream_app.kafka_local import LocalKafka
from stream_app.settings import Settings
from stream_app.sim.simulator import SimConfig, Simulator

DAY_MS = 86_400_000
OVERSIZE_MAX_EVENT_BYTES = 1_000_000  # a valid setting; dead letters (base64 of the input) then exceed 1 MB


def simulated(users: int, days: int, seed: int) -> tuple[list[dict], dict[str, int]]:
    """The seeded simulator's envelopes, event time ending today (within the worker's skew bounds)."""
    t0 = (int(time.time() * 1000) // DAY_MS - days) * DAY_MS
    sim = Simulator(SimConfig(users=users, days=days, seed=seed, t0_ms=t0), deliver=False)
    return list(sim), dict(sim.counts)


ORDER_SLACK_S = 2.0  # live: wall seconds by which an event may be applied after a newer one of its user


def event_span_s(envelopes: list[dict]) -> float:
    ts = [v["ts"] for e in envelopes if isinstance(v := e.get("value"), dict) and isinstance(v.get("ts"), int)]
    return (max(ts) - min(ts)) / 1000 if ts else 0.0


def with_oversize(envelopes: list[dict]) -> list[dict]:
    """Three inputs near or over a 1 MB max_event_bytes, at 30/50/70% of the input: malformed JSON and a
    JSON object missing its fields (valid size, ~900 KB: their base64 dead letters are ~1.2 MB), and one
    over the limit (an ``oversize`` dead letter of ~1.33 MB). Keyed by nobody, as malformed input is."""
    big = [
        "{" + "x" * 899_999,
        '{"type": "click", "pad": "' + "y" * 899_970 + '"}',
        "z" * (OVERSIZE_MAX_EVENT_BYTES + 200),
    ]
    out = list(envelopes)
    for share, raw in zip((0.7, 0.5, 0.3), reversed(big), strict=True):  # back to front keeps positions
        i = int(len(out) * share)
        out.insert(i, {"topic": "click", "value": raw, "timestamp_ms": out[i - 1]["timestamp_ms"]})
    return out


def head_commit() -> str:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.check_output(["git", "-C", str(ROOT), "log", "-1", "--format=%h %s"], text=True).strip()
    return "?"


def one_run(cfg: RunConfig, sc: Scenario, envelopes: list[dict], ref: verify.Reference, run_no: int,
            keep_failed: bool = False) -> dict:  # fmt: skip
    t0 = time.monotonic()
    run = Run(cfg, sc.name, envelopes, sc.feed, sc.paced_s)
    res: dict[str, Any] = {
        "scenario": sc.name,
        "guarantee": cfg.guarantee,
        "run": run_no,
        "app_id": run.settings.app_id,
    }
    required = [
        k
        for k in (
            "no_duplicate_pushes",
            "no_duplicate_audit",
            "no_duplicate_dead_letters",
            "no_duplicate_labels",
            "state_equals_replay",
            "every_input_accounted_once",
            "decisions_equal_replay",
            "trainer_equals_fold",
            "event_order_bounded",
            "lag_zero",
            "reported_lag_zero",
            "no_worker_crash",
        )
        if cfg.guarantee == "exactly_once" or k not in verify.AT_MOST_ONCE_INVARIANTS
    ]
    res["required"] = required
    try:
        run.prepare()
        sc.script(run)
        res["done"] = run.wait_done()
        res["producer_error"] = run.producer_error
        run.stop_workers()
        outputs = asyncio.run(verify.read_outputs(cfg.bootstrap, run.settings))
        # replay each user's events in the order the workers applied them, each decision with the models it names
        ordered, order = verify.in_applied_order(envelopes, verify.applied_order(outputs["changelog"]))
        guided = verify.guided_reference(ordered, run.settings, outputs["audit"], outputs["params"])
        checked = verify.compare(ref, outputs, run.settings, guided)
        res.update(checked)
        res["numbers"]["applied_order"] = order
        # Event order: from a backlog, each partition's topics are merged in event-time order exactly; live, only
        # what was fetched can be ordered, so an event may be applied after a newer one of its user by the time
        # their batches took to arrive. Paced runs compress days of event time into seconds: lateness is
        # converted to wall seconds at the feed's rate.
        late = order["max_applied_late_s"]
        if sc.feed == "paced":
            span_s, feed_s = event_span_s(envelopes), len(envelopes) / paced_rate(len(envelopes), sc.paced_s)
            order["max_applied_late_wall_s"] = round(late * feed_s / span_s, 3) if span_s else 0.0
            res["invariants"]["event_order_bounded"] = order["max_applied_late_wall_s"] <= ORDER_SLACK_S
        else:
            res["invariants"]["event_order_bounded"] = order["events_applied_late"] == 0
        res["recovery"] = run.recovery()
        res["broker_restart_s"] = run.broker_restart_s
        res["workers"] = run.worker_report()
        inv = res["invariants"]
        inv["lag_zero"] = bool(res["done"].get("done")) and res["done"].get("true") == 0
        inv["reported_lag_zero"] = res["done"].get("reported") == 0
        inv["no_worker_crash"] = not any(w["crashed"] or w["traceback"] for w in res["workers"])
        if run.producer_error:
            inv["every_input_accounted_once"] = False
        num = res["numbers"]
        num["lag_true"], num["lag_reported"] = res["done"].get("true"), res["done"].get("reported")
        num["metrics_sum"] = {k: sum(w["metrics"][k] for w in res["workers"]) for k in res["workers"][0]["metrics"]}
        # events the workers' dedup dropped beyond the input's own duplicates: redeliveries of events whose state
        # was already committed (a lower bound: a killed worker's counts are its last scrape, <= 0.2 s old)
        num["redeliveries_caught_by_dedup"] = num["metrics_sum"]["duplicate"] - ref.outcomes.get("duplicate", 0)
        res["passed"] = all(inv[k] for k in required)
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}"
        res["traceback"] = traceback.format_exc()[-3000:]
        res["passed"] = False
        with contextlib.suppress(Exception):
            res["workers"] = run.worker_report()
    finally:
        run.close()
        if keep_failed and not res.get("passed"):
            res["topics_kept"] = True  # for a post-mortem: the input, outputs, changelogs, __consumer_offsets
        else:
            run.delete_topics()
    res["wall_s"] = round(time.monotonic() - t0, 1)
    return res


def verdicts(runs: list[dict]) -> list[dict]:
    groups: dict[tuple[str, str], list[dict]] = collections.defaultdict(list)
    for r in runs:
        groups[(r["scenario"], r["guarantee"])].append(r)
    out = []
    for (name, guarantee), rs in groups.items():
        failing = collections.Counter()
        for r in rs:
            if "invariants" not in r:
                failing["error"] += 1
                continue
            for k in r["required"]:
                if not r["invariants"][k]:
                    failing[k] += 1
        out.append(
            {
                "scenario": name,
                "guarantee": guarantee,
                "runs": len(rs),
                "passed": sum(r["passed"] for r in rs),
                "failing": dict(failing),
                "recover_s_max": max((x["recover_s"] or 0 for r in rs for x in r.get("recovery", [])), default=None),
                "dup_pushes": sum(r.get("numbers", {}).get("dup_pushes", 0) for r in rs),
                "dup_audit": sum(r.get("numbers", {}).get("dup_audit", 0) for r in rs),
            }
        )
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m faults", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--fast",
        action="store_true",
        help=f"CI subset: small input, every scenario once, exactly_once, plus at_least_once for {', '.join(FAST_ALO)}",
    )
    p.add_argument("--runs", type=int, default=None, help="runs per scenario and guarantee (default 3; --fast 1)")
    p.add_argument("--scenario", action="append", choices=sorted(SCENARIOS), help="repeatable; default: all")
    p.add_argument(
        "--guarantee",
        choices=("exactly_once", "at_least_once", "both"),
        default=None,
        help="default exactly_once (--fast: exactly_once plus the at_least_once subset)",
    )
    p.add_argument("--users", type=int, default=None, help="simulated users (default 2000; --fast 300)")
    p.add_argument("--days", type=int, default=None, help="simulated days (default 5; --fast 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--session-timeout",
        type=float,
        default=None,
        help="STREAM_APP_SESSION_TIMEOUT_S of the workers (default: the product's; --fast 10)",
    )
    p.add_argument("--bootstrap", default="", help="an existing broker (broker faults need the local one)")
    p.add_argument("--port", type=int, default=19592, help="port of the local broker this tool starts")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--name", default=None, help="results file stem: faults-<name> (default fast or full)")
    p.add_argument("--keep-logs", action="store_true", help="keep workers' logs (their directory is printed)")
    p.add_argument(
        "--keep-failed",
        action="store_true",
        help="keep a failed run's topics and leave the local broker running (for a post-mortem)",
    )
    return p.parse_args(argv)


def plan(a: argparse.Namespace) -> list[tuple[Scenario, str]]:
    names = a.scenario or [n for n, sc in SCENARIOS.items() if sc.fast or not a.fast]
    if a.guarantee == "both":
        guarantees = ["exactly_once", "at_least_once"]
    elif a.guarantee:
        guarantees = [a.guarantee]
    else:
        guarantees = ["exactly_once"]
    out = [(SCENARIOS[n], g) for g in guarantees for n in names]
    if a.fast and a.guarantee is None:
        out += [(SCENARIOS[n], "at_least_once") for n in FAST_ALO if n in names or not a.scenario]
    return out


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # the tool's own clients: retries while leaders move, connection errors while the broker is killed
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    users = a.users or (300 if a.fast else 2000)
    days = a.days or (2 if a.fast else 5)
    runs = a.runs or (1 if a.fast else 3)
    session_timeout = a.session_timeout or (10.0 if a.fast else Settings.model_fields["session_timeout_s"].default)
    name = a.name or ("fast" if a.fast else "full")

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    envelopes, counts = simulated(users, days, a.seed)
    todo = plan(a)
    res: dict[str, Any] = {
        "command": "python -m faults " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "commit": head_commit(),
        "input": {"users": users, "days": days, "seed": a.seed, "messages": len(envelopes), "counts": counts},
        "settings": {
            "session_timeout_s": session_timeout,
            "paced_feed": "the input over each scenario's paced_s (40-90 s), at most 2,000 messages/s",
            "runs": runs,
            "oversize_max_event_bytes": OVERSIZE_MAX_EVENT_BYTES,
        },
        "scenarios": {sc.name: {"feed": sc.feed, "about": sc.about, "paced_s": sc.paced_s} for sc, _ in todo},
        "runs": [],
    }
    workdir = Path(tempfile.mkdtemp(prefix="faults-"))
    out_dir = Path(a.out)
    t_start = time.monotonic()
    local = None if a.bootstrap else LocalKafka(port=a.port)
    started_broker = False
    try:
        if local is not None:
            started_broker = local.pid() is None
            took = local.up()
            say(f"broker {local.bootstrap} ready in {took:.1f}s (log {local.log_file})")
        bootstrap = a.bootstrap or local.bootstrap
        refs: dict[bool, tuple[list[dict], verify.Reference]] = {}
        for sc, guarantee in todo:
            if sc.oversize not in refs:
                envs = with_oversize(envelopes) if sc.oversize else envelopes
                overrides = {"max_event_bytes": OVERSIZE_MAX_EVENT_BYTES} if sc.oversize else {}
                ref = verify.compute_reference(envs, Settings(**overrides))
                refs[sc.oversize] = (envs, ref)
                res.setdefault("reference", {})["oversize" if sc.oversize else "input"] = {
                    "messages": len(envs),
                    "outcomes": ref.outcomes,
                    "audit_decisions": len(ref.audit),
                    "pushes": len(ref.pushes),
                    "dead_letters": sum(ref.dead_letters.values()),
                    "labels": len(ref.labels),
                    "users": len(ref.users),
                    "replay_s": ref.seconds,
                }
            envs, ref = refs[sc.oversize]
            overrides = {"max_event_bytes": OVERSIZE_MAX_EVENT_BYTES} if sc.oversize else {}
            for i in range(runs):
                if (sc.name == "broker_kill") and local is None:
                    res["runs"].append(
                        {
                            "scenario": sc.name,
                            "guarantee": guarantee,
                            "run": i + 1,
                            "passed": False,
                            "error": "broker faults need the local broker (no --bootstrap)",
                        }
                    )
                    continue
                cfg = RunConfig(
                    bootstrap=bootstrap,
                    broker=local,
                    guarantee=guarantee,
                    session_timeout_s=session_timeout,
                    workdir=workdir,
                    settings_overrides=overrides,
                )
                say(f"{sc.name} {guarantee} run {i + 1}/{runs} ({sc.feed}, {len(envs)} messages)")
                r = one_run(cfg, sc, envs, ref, i + 1, keep_failed=a.keep_failed)
                res["runs"].append(r)
                failed = [k for k in r.get("required", []) if not r.get("invariants", {}).get(k, False)]
                say(
                    f"  {'PASS' if r['passed'] else 'FAIL'} in {r['wall_s']}s"
                    + (f": {', '.join(failed)}" if failed else "")
                    + (f" ({r['error']})" if "error" in r else "")
                )
                res["verdicts"] = verdicts(res["runs"])
                res["wall_s"] = round(time.monotonic() - t_start, 1)
                write(res, out_dir, name)
    finally:
        if a.keep_failed and any(r.get("topics_kept") for r in res["runs"]):
            say(f"failed runs' topics kept; broker left running at {local.bootstrap if local else a.bootstrap}")
        elif local is not None and started_broker:
            local.down()
            shutil.rmtree(local.dir, ignore_errors=True)
        if a.keep_logs:
            say(f"worker logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    res["verdicts"] = verdicts(res["runs"])
    res["wall_s"] = round(time.monotonic() - t_start, 1)
    _js, md = write(res, out_dir, name)
    say(f"done in {res['wall_s']}s: {md}")
    for v in res["verdicts"]:
        say(f"  {v['scenario']:<18} {v['guarantee']:<13} {v['passed']}/{v['runs']} passed {v['failing'] or ''}")
    return 0 if all(r["passed"] for r in res["runs"]) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
