"""Every Prometheus metric of stream_app, declared in one place with bounded labels only.

Base units (seconds, bytes), counters end in ``_total``, names start with ``stream_app_``. A fresh
``CollectorRegistry`` per app keeps tests independent. Label children that the hot path uses are
pre-bound once (each ``.labels()`` lookup costs about a microsecond).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from stream_app.core.events import EVENT_TYPES

REJECT_CODES = (
    "tombstone", "empty_value", "oversize", "bad_utf8", "non_finite_number", "too_deep", "malformed_json",
    "not_an_object", "missing_field", "wrong_type", "unknown_type", "bad_timestamp", "ts_out_of_range", "bad_amount",
    "bad_timezone", "corrupt_state", "internal_error",
)  # fmt: skip


@dataclass(frozen=True)
class Metrics:
    registry: CollectorRegistry
    events_consumed: dict[str, Counter]
    events_rejected: dict[str, Counter]
    consent_rejected: dict[str, Counter]
    model_inputs_rejected: dict[str, Counter]
    model_params_rejected: dict[str, Counter]
    pushes_cancelled: Counter
    processing_seconds: Histogram
    batch_events: Histogram
    duplicates_dropped: Counter
    decisions: dict[tuple[str, str], Counter]
    labels: dict[tuple[str, bool], Counter]
    consent: dict[str, Counter]
    ineligible: dict[tuple[str], Counter]
    model_inputs_ignored: Counter
    models_published: dict[tuple[str], Counter]
    model_version: dict[tuple[str], Gauge]
    models_rejected: dict[tuple[str], Counter]
    model_log_loss: dict[tuple[str], Gauge]
    model_auc: dict[tuple[str], Gauge]
    label_delay: dict[tuple[str], Gauge]
    uplift: dict[tuple[str], Gauge]
    segment_size: dict[tuple[str], Gauge]
    segment_drift: dict[tuple[str], Gauge]
    suppressed_erased: Counter
    suppressions: dict[tuple[str, str], Counter]
    pushes_held: dict[tuple[str, str], Counter]
    repartitioned: Counter
    timers_fired: Counter
    timers_pending: Gauge
    event_to_decision_seconds: Histogram
    state_users: Gauge
    state_bytes: Gauge
    state_recovery_seconds: Histogram
    transactions_failed: Counter
    internal_errors: Counter
    model_params_ignored: Counter
    worker_ready: Gauge
    event_loop_lag_seconds: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> Metrics:
        """Label values are bounded: event types, reason codes, configured campaign names, actions."""
        registry = registry or CollectorRegistry()
        consumed = Counter(
            "stream_app_events_consumed_total", "Valid input events processed, by event type.",
            ["type"], registry=registry,
        )  # fmt: skip
        rejected = Counter(
            "stream_app_events_rejected_total",
            "Input event messages dead-lettered (counted once the dead letter is written), by reason code.",
            ["reason"], registry=registry,
        )  # fmt: skip
        consent_rejected = Counter(
            "stream_app_consent_rejected_total",
            "Consent commands dead-lettered (counted once the dead letter is written), by reason code.",
            ["reason"], registry=registry,
        )  # fmt: skip
        inputs_rejected = Counter(
            "stream_app_model_inputs_rejected_total",
            "Trainer inputs dead-lettered (counted once the dead letter is written), by reason code.",
            ["reason"], registry=registry,
        )  # fmt: skip
        params_rejected = Counter(
            "stream_app_model_params_rejected_total",
            "Model-params records a worker could not install (ignored, not dead-lettered: every worker reads them), "
            "by reason code.", ["reason"], registry=registry,
        )  # fmt: skip
        cancelled = Counter(
            "stream_app_pushes_cancelled_total",
            "Cancellations written to push-decisions for open pushes of users who opted out or were erased.",
            registry=registry,
        )  # fmt: skip
        seconds = Histogram(
            "stream_app_event_processing_seconds", "Time to process one input event in the agent.",
            buckets=(1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2, 5e-2, 0.25, 1.0),
            registry=registry,
        )  # fmt: skip
        batch = Histogram(
            "stream_app_batch_events", "Event messages per batch handed from a fetch to the event handler "
            "(at most STREAM_APP_BATCH_MAX_EVENTS: full batches mean a backlog).",
            buckets=(1, 5, 25, 100, 250, 499, 500, 1000, 5000), registry=registry,
        )  # fmt: skip
        duplicates = Counter(
            "stream_app_duplicates_dropped_total",
            "Redelivered or duplicated events (same event_id) applied no second time.",
            registry=registry,
        )
        decisions = Counter(
            "stream_app_decisions_total", "Decisions by campaign and action (push, holdout, suppress).",
            ["campaign", "action"], registry=registry,
        )  # fmt: skip
        labels = Counter(
            "stream_app_labels_total", "Delayed labels joined, by campaign and outcome.",
            ["campaign", "converted"], registry=registry,
        )  # fmt: skip
        consent = Counter(
            "stream_app_consent_commands_total", "Consent commands applied.", ["action"], registry=registry
        )
        ineligible = Counter(
            "stream_app_ineligible_total", "Triggers where a campaign's eligibility rules excluded the user.",
            ["campaign"], registry=registry,
        )  # fmt: skip

        def gauge(name: str, doc: str, label: str) -> _Children:
            return _Children(Gauge(name, doc, [label], registry=registry), (label,))

        ignored = Counter("stream_app_model_inputs_ignored_total", "Unreadable trainer inputs.", registry=registry)
        published = _Children(
            Counter("stream_app_models_published_total", "Model versions published.", ["model"], registry=registry),
            ("model",),
        )
        rejected_versions = _Children(
            Counter("stream_app_model_versions_rejected_total",
                    "Model versions the trainer's quality gate refused to publish.", ["model"], registry=registry),
            ("model",),
        )  # fmt: skip
        erased = Counter(
            "stream_app_events_of_erased_users_total", "Events of erased users, dropped unprocessed.", registry=registry
        )
        held = Counter(
            "stream_app_pushes_held_total", "Pushes held through quiet hours, by campaign and send time: quiet_end "
            "(the end of quiet hours) or active_hour (later, at the user's learned most responsive hour).",
            ["campaign", "send_at"], registry=registry,
        )  # fmt: skip
        suppressions = Counter(
            "stream_app_suppressions_total", "Suppressed decisions by campaign and the rule that suppressed.",
            ["campaign", "reason"], registry=registry,
        )  # fmt: skip
        repartitioned = Counter(
            "stream_app_events_repartitioned_total",
            "Messages not on their user's partition, forwarded once to it before processing.", registry=registry,
        )  # fmt: skip
        fired = Counter(
            "stream_app_timers_fired_total", "Event-time timers fired (label expiry, win-back, TTL).", registry=registry
        )
        pending = Gauge("stream_app_timers_pending", "Users with a scheduled event-time timer.", registry=registry)
        e2d = Histogram(
            "stream_app_event_to_decision_seconds",
            "Wall-clock time of a decision minus the event time of the event that triggered it.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
            registry=registry,
        )  # fmt: skip
        users = Gauge("stream_app_state_users", "Users in this worker's table (incl. standbys).", registry=registry)
        size = Gauge(
            "stream_app_state_bytes", "Estimated bytes of user state: users x sampled mean JSON size.",
            registry=registry,
        )  # fmt: skip
        recovery = Histogram(
            "stream_app_state_recovery_seconds", "Time to load owned state partitions from their changelog.",
            buckets=(0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300), registry=registry,
        )  # fmt: skip
        failed = Counter(
            "stream_app_transactions_failed_total",
            "Source partitions whose effects could not be committed (aborted, fenced, undeliverable): their "
            "state is reloaded and their messages consumed again after a rebalance.", registry=registry,
        )  # fmt: skip
        internal = Counter(
            "stream_app_internal_errors_total",
            "Records dead-lettered because applying them raised an unexpected error (a bug: look at the logs).",
            registry=registry,
        )  # fmt: skip
        params_ignored = Counter(
            "stream_app_model_params_ignored_total", "Model-params records that are not a valid model version.",
            registry=registry,
        )  # fmt: skip
        ready = Gauge(
            "stream_app_worker_ready", "1 while /readyz passes: joined, owned state recovered, models read.",
            registry=registry,
        )  # fmt: skip
        loop_lag = Gauge(
            "stream_app_event_loop_lag_seconds", "How late the event loop woke a 0.5 s heartbeat (last beat).",
            registry=registry,
        )  # fmt: skip
        return cls(
            registry=registry,
            transactions_failed=failed,
            internal_errors=internal,
            model_params_ignored=params_ignored,
            worker_ready=ready,
            event_loop_lag_seconds=loop_lag,
            state_recovery_seconds=recovery,
            suppressions=_Children(suppressions, ("campaign", "reason")),
            pushes_held=_Children(held, ("campaign", "send_at")),
            repartitioned=repartitioned,
            timers_fired=fired,
            timers_pending=pending,
            event_to_decision_seconds=e2d,
            state_users=users,
            state_bytes=size,
            events_consumed={t: consumed.labels(type=t) for t in EVENT_TYPES},
            events_rejected={c: rejected.labels(reason=c) for c in REJECT_CODES},
            consent_rejected={c: consent_rejected.labels(reason=c) for c in REJECT_CODES},
            model_inputs_rejected={c: inputs_rejected.labels(reason=c) for c in REJECT_CODES},
            model_params_rejected={c: params_rejected.labels(reason=c) for c in REJECT_CODES},
            pushes_cancelled=cancelled,
            processing_seconds=seconds,
            batch_events=batch,
            duplicates_dropped=duplicates,
            decisions=_Children(decisions, ("campaign", "action")),
            labels=_Children(labels, ("campaign", "converted")),
            consent={a: consent.labels(action=a) for a in ("opt_in", "opt_out", "erase")},
            suppressed_erased=erased,
            ineligible=_Children(ineligible, ("campaign",)),
            model_inputs_ignored=ignored,
            models_published=published,
            model_version=gauge("stream_app_model_version", "Model version this worker scores with.", "model"),
            models_rejected=rejected_versions,
            model_log_loss=gauge(
                "stream_app_model_log_loss", "Progressive log loss on delayed labels (trainer).", "campaign"
            ),
            model_auc=gauge(
                "stream_app_model_roc_auc", "Progressive ROC AUC, recent 2000 labels (trainer).", "campaign"
            ),
            label_delay=gauge("stream_app_label_delay_seconds", "Mean decision-to-label delay (trainer).", "campaign"),
            uplift=gauge("stream_app_uplift", "Conversion rate of pushed minus holdout users (trainer).", "campaign"),
            segment_size=gauge("stream_app_segment_size", "Points learned per segment (model counts).", "segment"),
            segment_drift=gauge(
                "stream_app_segment_drift", "Centroid movement between the last two versions.", "segment"
            ),
        )


class _Children(dict):
    """Label children bound on first use and cached (label values come from config, so they are bounded)."""

    def __init__(self, metric: Counter | Gauge, names: tuple[str, ...]) -> None:
        super().__init__()
        self.metric, self.names = metric, names

    def __missing__(self, values: tuple) -> Any:
        child = self.metric.labels(**{n: str(v).lower() for n, v in zip(self.names, values, strict=True)})
        self[values] = child
        return child
