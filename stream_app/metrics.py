"""Every Prometheus metric of stream_app, declared in one place with bounded labels only.

Base units (seconds, bytes), counters end in ``_total``, names start with ``stream_app_``. A fresh
``CollectorRegistry`` per app keeps tests independent. Label children that the hot path uses are
pre-bound once (each ``.labels()`` lookup costs about a microsecond).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram

from stream_app.core.events import EVENT_TYPES

REJECT_CODES = (
    "oversize", "malformed_json", "not_an_object", "missing_field", "wrong_type",
    "unknown_type", "bad_timestamp", "ts_out_of_range", "bad_amount", "bad_timezone",
)  # fmt: skip


@dataclass(frozen=True)
class Metrics:
    registry: CollectorRegistry
    events_consumed: dict[str, Counter]
    events_rejected: dict[str, Counter]
    processing_seconds: Histogram
    duplicates_dropped: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> Metrics:
        registry = registry or CollectorRegistry()
        consumed = Counter(
            "stream_app_events_consumed_total", "Valid input events processed, by event type.",
            ["type"], registry=registry,
        )  # fmt: skip
        rejected = Counter(
            "stream_app_events_rejected_total",
            "Input messages sent to the dead-letter topic, by reason code.", ["reason"], registry=registry,
        )  # fmt: skip
        seconds = Histogram(
            "stream_app_event_processing_seconds", "Time to process one input event in the agent.",
            buckets=(1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2, 5e-2, 0.25, 1.0),
            registry=registry,
        )  # fmt: skip
        duplicates = Counter(
            "stream_app_duplicates_dropped_total",
            "Redelivered or duplicated events (same event_id) applied no second time.",
            registry=registry,
        )
        return cls(
            registry=registry,
            events_consumed={t: consumed.labels(type=t) for t in EVENT_TYPES},
            events_rejected={c: rejected.labels(reason=c) for c in REJECT_CODES},
            processing_seconds=seconds,
            duplicates_dropped=duplicates,
        )
