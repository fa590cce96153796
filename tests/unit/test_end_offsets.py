"""transport.EndOffsets' bookkeeping around the broker's answer (the answer itself is tested against a real
broker in tests/integration/test_lag.py): the gauge never moves back, and a partition revoked while the
request was in flight gets no gauge child back."""

from __future__ import annotations

import asyncio

from faust.types import TP
from prometheus_client import CollectorRegistry

from stream_app import faust_metrics
from stream_app.transport import EndOffsets


class Answer(EndOffsets):
    """The broker's answer replaced by a fixed one; ``during`` runs while the request is in flight."""

    def __init__(self, ends: dict[TP, int], during=lambda: None) -> None:
        super().__init__({}, "read_committed")
        self.ends, self.during = ends, during
        self.asked: list[list[TP]] = []

    async def read(self, tps: list[TP]) -> dict[TP, int]:
        self.asked.append(tps)
        self.during()
        return {tp: self.ends[tp] for tp in tps}


def _gauge(registry: CollectorRegistry, tp: TP) -> float | None:
    labels = {"topic": tp.topic, "partition": str(tp.partition)}
    return registry.get_sample_value("faust_topic_partition_end_offset", labels)


A, B = TP("clicks", 0), TP("clicks", 1)


def test_sets_the_gauge_of_every_assigned_partition_and_never_moves_it_back():
    registry = CollectorRegistry()
    monitor = faust_metrics.Monitor(metrics=faust_metrics.create(registry))
    monitor.track_tp_end_offset(B, 900)  # a fetch saw a larger end than the (older) answer below
    probe = Answer({A: 120, B: 800})
    ends = asyncio.run(probe.refresh(monitor, lambda: {A, B}))
    assert ends == {A: 120, B: 900}
    assert _gauge(registry, A) == 120 and _gauge(registry, B) == 900
    assert probe.asked == [[A, B]]


def test_a_partition_revoked_during_the_request_gets_no_gauge():
    registry = CollectorRegistry()
    monitor = faust_metrics.Monitor(metrics=faust_metrics.create(registry))
    assigned = {A, B}
    probe = Answer({A: 5, B: 7}, during=lambda: assigned.discard(B))
    assert asyncio.run(probe.refresh(monitor, lambda: set(assigned))) == {A: 5}
    assert _gauge(registry, A) == 5 and _gauge(registry, B) is None


def test_nothing_assigned_asks_nothing():
    probe = EndOffsets({}, "read_committed")  # the real read: with no partitions it never connects
    assert asyncio.run(probe.read([])) == {}
