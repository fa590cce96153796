"""Liveness and readiness of a worker, served next to /metrics: ``/healthz`` and ``/readyz``.

``/healthz`` (liveness: restart me if it fails) answers from the worker's event loop, so an answer at all
means the loop runs; it fails (503) when the loop was blocked longer than ``STALL_S`` at the last heartbeat
or when the app crashed or is stopping. A probe that times out means the loop is stuck.

``/readyz`` (readiness: I do my job) is 200 only when the worker has joined its group (no rebalance in
progress), every user partition it owns has its state recovered from the changelog, and it has read the
model versions published before it started (so its first decisions are not scored with cold models while a
trained one exists). Each check is reported by name, with what it waits for, so an operator sees why.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import faust

STALL_S = 10.0  # a heartbeat this late means the loop was blocked: not healthy
BEAT_S = 0.5

Check = Callable[[], tuple[bool, str]]


@dataclass
class Health:
    """What the two endpoints report; the shell registers the readiness checks it knows about."""

    stall_s: float = STALL_S
    checks: dict[str, Check] = field(default_factory=dict)
    last_beat: float = field(default_factory=time.monotonic)
    loop_lag_s: float = 0.0
    stopping: Callable[[], bool] = lambda: False
    on_ready: Callable[[bool], None] | None = None  # e.g. a gauge's set

    def add_check(self, name: str, check: Check) -> None:
        self.checks[name] = check

    def live(self, now: float | None = None) -> tuple[bool, dict[str, Any]]:
        """Alive: the loop beat recently and the app is not crashed or stopping.

        >>> h = Health(last_beat=100.0)
        >>> h.live(now=101.0)[0], h.live(now=111.0)[0]
        (True, False)
        """
        now = time.monotonic() if now is None else now
        since = now - self.last_beat
        stopping = self.stopping()
        ok = since <= self.stall_s and self.loop_lag_s <= self.stall_s and not stopping
        return ok, {"status": "ok" if ok else "failing", "seconds_since_heartbeat": round(since, 3),
                    "loop_lag_seconds": round(self.loop_lag_s, 3), "stopping": stopping}  # fmt: skip

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """Ready: every registered check passes.

        >>> h = Health(); h.add_check("models", lambda: (False, "2 of 3 model versions read"))
        >>> h.ready()
        (False, {'status': 'not ready', 'checks': {'models': {'ok': False, 'detail': '2 of 3 model versions read'}}})
        """
        results = {}
        for name, check in self.checks.items():
            try:
                ok, detail = check()
            except Exception as e:  # a check that cannot tell says so; it never crashes the endpoint
                ok, detail = False, f"check failed: {type(e).__name__}: {e}"
            results[name] = {"ok": ok, "detail": detail}
        ok = bool(results) and all(r["ok"] for r in results.values())
        if self.on_ready is not None:
            self.on_ready(ok)
        return ok, {"status": "ready" if ok else "not ready", "checks": results}

    async def beat(self) -> None:
        """Forever: sleep ``BEAT_S`` and record how late the loop woke us (its lag)."""
        while True:
            t = time.monotonic()
            await asyncio.sleep(BEAT_S)
            now = time.monotonic()
            self.loop_lag_s = max(0.0, now - t - BEAT_S)
            self.last_beat = now


def recovered(app: faust.App, users: Any, user_topics: set[str]) -> tuple[bool, str]:
    """Every user partition this worker owns has its state loaded from the changelog."""
    owned = {tp.partition for tp in app.assignor.assigned_actives() if tp.topic in user_topics}
    missing = owned - users.loaded
    return not missing, f"{len(owned) - len(missing)} of {len(owned)} owned user partitions recovered"


def install(app: faust.App, health: Health) -> Health:
    """Serve ``/healthz`` and ``/readyz`` on the app's web server and run the heartbeat task."""
    health.stopping = lambda: bool(app.should_stop)

    @app.page("/healthz")
    async def healthz(self: Any, request: Any) -> Any:
        ok, body = health.live()
        return self.json(body, status=200 if ok else 503)

    @app.page("/readyz")
    async def readyz(self: Any, request: Any) -> Any:
        ok, body = health.ready()
        return self.json(body, status=200 if ok else 503)

    @app.task
    async def heartbeat() -> None:
        await health.beat()

    return health
