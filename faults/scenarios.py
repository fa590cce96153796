"""The scenarios: a feed (the input preloaded as a backlog, or paced while workers run) and a script of faults.

A script gets the ``Run`` and drives it; the runner then waits until every worker is done, stops them
cleanly and verifies. Progress points are shares of the input the group has committed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from faults.run import Run


@dataclass(frozen=True)
class Scenario:
    name: str
    feed: str  # "backlog" (preloaded) or "paced"
    script: Callable[[Run], None]
    about: str
    oversize: bool = False  # adds near-limit inputs whose dead letters exceed the producer's request size
    fast: bool = True  # in the --fast subset (exactly_once)
    # a paced feed lasts this long: longer than the workers it starts mid-stream take to start on a busy
    # 2-core machine (10-18 s each seen), so they still find a stream flowing (at most 2,000 messages/s)
    paced_s: float = 40.0


def no_fault(run: Run) -> None:
    run.start_worker()


def kill_at(share: float) -> Callable[[Run], None]:
    def script(run: Run) -> None:
        w = run.start_worker()
        run.wait_progress(share)
        run.fault(f"SIGKILL worker at {share:.0%}", lambda: run.kill(w))
        run.start_worker()

    return script


def clean_restart(run: Run) -> None:
    w = run.start_worker()
    run.wait_progress(0.5)
    run.fault("SIGTERM worker at 50%, wait for its exit, start a new one", lambda: run.term(w))
    run.start_worker()


def joins(run: Run) -> None:
    run.start_worker()
    run.wait_progress(0.3)
    run.fault("second worker joins at 30%", run.start_worker, base="after_end")
    run.wait_processing(run.workers[-1])


def joins_two(run: Run) -> None:
    run.start_worker()
    run.wait_progress(0.25)
    run.fault("second worker joins at 25%", run.start_worker, base="after_end")
    run.wait_processing(run.workers[-1])
    run.wait_progress(0.5)
    run.fault("third worker joins at 50%", run.start_worker, base="after_end")
    run.wait_processing(run.workers[-1])


def kill_one_of_two(run: Run) -> None:
    a, b = run.start_workers(2)
    run.wait_processing(a)
    run.wait_processing(b)
    run.wait_progress(0.5)
    run.fault("SIGKILL one of two workers at 50% (not restarted)", lambda: run.kill(a))


def rolling_restart(run: Run) -> None:
    ws = run.start_workers(3)
    for w in ws:
        run.wait_processing(w)
    for i, (w, share) in enumerate(zip(ws, (0.2, 0.45, 0.7), strict=True)):
        run.wait_progress(share)

        def restart(w=w) -> None:
            run.term(w)
            run.start_worker()

        run.fault(f"rolling restart: worker {i} SIGTERM + replacement at {share:.0%}", restart)
        run.wait_processing(run.workers[-1])


def broker_kill(run: Run) -> None:
    run.start_worker()
    run.wait_progress(0.5)

    def act() -> None:
        run.pause_input()  # a paced feed stops with everything acked: the broker kill loses no input
        run.broker_kill()
        time.sleep(10)
        run.broker_up()
        run.resume_input()

    run.fault("broker SIGKILL at 50%, restarted after 10 s", act, base="before")


def sigstop(run: Run) -> None:
    a, b = run.start_workers(2)
    run.wait_processing(a)
    run.wait_processing(b)
    run.wait_progress(0.3)

    def act() -> None:
        run.sigstop(a)
        time.sleep(run.cfg.session_timeout_s + 8)  # beyond the session timeout: the group moves a's partitions
        run.sigcont(a)  # a zombie now: its producers must be fenced

    run.fault("SIGSTOP one of two workers at 30% for session timeout + 8 s, then SIGCONT", act)


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("no_fault", "backlog", no_fault, "one worker, input preloaded (a backlog), no fault"),
        Scenario("no_fault_paced", "paced", no_fault, "one worker, input paced, no fault", fast=False),
        Scenario(
            "kill_20", "backlog", kill_at(0.2), "backlog; SIGKILL the worker at 20% processed, restart", fast=False
        ),
        Scenario("kill_50", "paced", kill_at(0.5), "paced; SIGKILL the worker at 50% processed, restart"),
        Scenario(
            "kill_80", "backlog", kill_at(0.8), "backlog; SIGKILL the worker at 80% processed, restart", fast=False
        ),
        Scenario("clean_restart", "paced", clean_restart, "paced; SIGTERM at 50%, then a new worker"),
        Scenario("join_second", "paced", joins, "paced; a second worker joins at 30%, no fault"),
        Scenario("join_second_third", "paced", joins_two, "paced; 2nd worker joins at 25%, 3rd at 50%", paced_s=80),
        Scenario("kill_one_of_two", "paced", kill_one_of_two, "paced; two workers, one SIGKILLed at 50%"),
        Scenario(
            "rolling_restart", "paced", rolling_restart, "paced; 3 workers restarted one by one (SIGTERM)", paced_s=90
        ),
        Scenario("broker_kill", "paced", broker_kill, "paced; broker SIGKILL at 50%, restarted after 10 s"),
        Scenario("sigstop_zombie", "paced", sigstop, "paced; SIGSTOP one of two beyond the session timeout"),
        Scenario(
            "oversize",
            "backlog",
            no_fault,
            "backlog with 3 near-limit inputs (max_event_bytes 1 MB) whose dead letters exceed 1 MB",
            oversize=True,
        ),
    )
}
# --fast: small input, every scenario once, exactly_once; at_least_once for these too
FAST_ALO = ("no_fault_paced", "kill_50")
