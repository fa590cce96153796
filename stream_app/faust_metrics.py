"""Faust's own Prometheus sensors, under names that follow Prometheus' conventions.

Faust 0.15.3's ``FaustMetrics`` names latencies in milliseconds without a unit (``faust_events_runtime_ms``,
``faust_producer_send_latency``), counts rebalances with a gauge that goes up at a rebalance's start and
down at its return (so ``faust_total_rebalances`` is really "rebalances in progress"), counts metrics by
name with a gauge, and misspells ``offset_commited``. Faust's ``PrometheusMonitor`` feeds whatever object
sits in each ``FaustMetrics`` field, so every field here is either a correctly named prometheus_client
metric or a small adapter: histograms take Faust's milliseconds and record seconds, the rebalance gauge
also increments a ``faust_rebalances_total`` counter. Nothing is hidden: every Faust sensor still reports,
under the name in ``RENAMED`` (docs/metrics.md lists the table).

Pinned to faust-streaming 0.15.3's ``FaustMetrics`` fields (``test_faust_metrics`` fails if they change).
"""

from __future__ import annotations

from typing import Any

from faust.sensors.prometheus import FaustMetrics
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from stream_app import transport

PREFIX = "faust"

# Faust's metric name (without the prefix) -> ours. Counters get ``_total`` from prometheus_client.
RENAMED = {
    "messages_received": "messages_received_total",
    "active_messages": "active_messages",
    "messages_received_per_topic": "messages_received_per_topic_total",
    "messages_received_per_topics_partition": "topic_partition_received_offset",
    "events_runtime_ms": "event_runtime_seconds",
    "total_events": "events_total",
    "total_active_events": "active_events",
    "total_events_per_stream": "stream_events_total",
    "table_operations": "table_operations_total",
    "topic_messages_sent": "topic_messages_sent_total",
    "total_sent_messages": "messages_sent_total",
    "producer_send_latency": "producer_send_latency_seconds",
    "total_error_messages_sent": "messages_send_errors_total",
    "producer_error_send_latency": "producer_send_error_latency_seconds",
    "assignment_operations": "assignment_operations_total",
    "assign_latency": "assignment_latency_seconds",
    "total_rebalances": "rebalances_in_progress (gauge) and rebalances_total (counter)",
    "total_rebalances_recovering": "rebalances_recovering",
    "rebalance_done_consumer_latency": "rebalance_done_consumer_latency_seconds",
    "rebalance_done_latency": "rebalance_done_latency_seconds",
    "metrics_by_name": "metric_counts_total",
    "http_status_codes": "http_responses_total",
    "http_latency": "http_latency_seconds",
    "topic_partition_end_offset": "topic_partition_end_offset",
    "topic_partition_offset_commited": "topic_partition_offset_committed",
    "consumer_commit_latency": "consumer_commit_latency_seconds",
}

# Faust's millisecond buckets (1 ms .. 10 s), in seconds.
SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)


class SecondsHistogram:
    """Takes Faust's milliseconds (``ms_since``, ``secs_to_ms``), records seconds.

    >>> h = SecondsHistogram(Histogram("x_seconds", "x", registry=CollectorRegistry()))
    >>> h.observe(250.0); h.histogram._sum.get()
    0.25
    """

    def __init__(self, histogram: Histogram) -> None:
        self.histogram = histogram

    def observe(self, ms: float) -> None:
        self.histogram.observe(ms / 1000.0)


class RebalanceGauge:
    """Faust's ``total_rebalances``: +1 when a rebalance starts, -1 when it returns. Kept as a gauge of
    rebalances in progress, and every start also counts in a counter (what a rate() needs)."""

    def __init__(self, in_progress: Gauge, total: Counter) -> None:
        self.in_progress, self.total = in_progress, total

    def inc(self, amount: float = 1) -> None:
        self.in_progress.inc(amount)
        self.total.inc(amount)

    def dec(self, amount: float = 1) -> None:
        self.in_progress.dec(amount)


def create(registry: CollectorRegistry, prefix: str = PREFIX) -> FaustMetrics:
    """A ``FaustMetrics`` whose fields report under conventional names (see ``RENAMED``)."""

    def name(n: str) -> str:
        return f"{prefix}_{n}"

    def seconds(n: str, doc: str) -> SecondsHistogram:
        return SecondsHistogram(Histogram(name(n), doc, buckets=SECONDS_BUCKETS, registry=registry))

    tp = ["topic", "partition"]
    return FaustMetrics(
        messages_received=Counter(name("messages_received"), "Messages received.", registry=registry),
        active_messages=Gauge(name("active_messages"), "Messages being processed.", registry=registry),
        messages_received_per_topics=Counter(
            name("messages_received_per_topic"), "Messages received per topic.", ["topic"], registry=registry
        ),
        messages_received_per_topics_partition=Gauge(
            name("topic_partition_received_offset"),
            "Offset of the last message received per topic/partition.",
            tp,
            registry=registry,
        ),
        events_runtime_latency=seconds("event_runtime_seconds", "Time an event spent in a Faust stream."),
        total_events=Counter(name("events"), "Events received by Faust streams.", registry=registry),
        total_active_events=Gauge(name("active_events"), "Events being processed in streams.", registry=registry),
        total_events_per_stream=Counter(
            name("stream_events"), "Events received per stream.", ["stream"], registry=registry
        ),
        table_operations=Counter(
            name("table_operations"), "Faust table operations.", ["table", "operation"], registry=registry
        ),
        topic_messages_sent=Counter(
            name("topic_messages_sent"), "Messages sent per topic.", ["topic"], registry=registry
        ),
        total_sent_messages=Counter(name("messages_sent"), "Messages sent.", registry=registry),
        producer_send_latency=seconds("producer_send_latency_seconds", "Producer send latency."),
        total_error_messages_sent=Counter(name("messages_send_errors"), "Sends that failed.", registry=registry),
        producer_error_send_latency=seconds("producer_send_error_latency_seconds", "Latency of failed sends."),
        assignment_operations=Counter(
            name("assignment_operations"),
            "Partition assignments (completed/error).",
            ["operation"],
            registry=registry,
        ),
        assign_latency=seconds("assignment_latency_seconds", "Partition assignment latency."),
        total_rebalances=RebalanceGauge(
            Gauge(name("rebalances_in_progress"), "Rebalances started and not yet returned.", registry=registry),
            Counter(name("rebalances"), "Rebalances started.", registry=registry),
        ),
        total_rebalances_recovering=Gauge(
            name("rebalances_recovering"), "Rebalances returned and still recovering.", registry=registry
        ),
        rebalance_done_consumer_latency=seconds(
            "rebalance_done_consumer_latency_seconds", "Rebalance start to the consumer replying it is done."
        ),
        rebalance_done_latency=seconds("rebalance_done_latency_seconds", "Rebalance start to finished."),
        count_metrics_by_name=Counter(name("metric_counts"), "Faust's named counts.", ["metric"], registry=registry),
        http_status_codes=Counter(
            name("http_responses"), "Web responses by status code.", ["status_code"], registry=registry
        ),
        http_latency=seconds("http_latency_seconds", "Web response latency."),
        topic_partition_end_offset=Gauge(
            name("topic_partition_end_offset"),
            "End offset (highwater) per topic/partition at the last fetch.",
            tp,
            registry=registry,
        ),
        topic_partition_offset_commited=Gauge(
            name("topic_partition_offset_committed"), "Committed offset per topic/partition.", tp, registry=registry
        ),
        consumer_commit_latency=seconds("consumer_commit_latency_seconds", "Offset commit latency."),
    )


class Monitor(transport.Monitor):
    """The shell's monitor (end-offset gauge bound once per partition). After a rebalance Faust removes the
    partitions' labelled children; the bound ones are dropped with them (a stale child is no longer exported,
    so setting it would lose the partition's end offset)."""

    def _clear_partition_related_metrics(self) -> None:
        self._end_offsets.clear()
        super()._clear_partition_related_metrics()


def install(app: Any, registry: CollectorRegistry) -> Monitor:
    """Faust's sensors under these names, and ``registry`` (ours and Faust's metrics) served at ``/metrics``:
    what ``faust.sensors.prometheus.setup_prometheus_sensors`` does, with ``create`` instead of Faust's names."""
    from aiohttp.web import Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    monitor = Monitor(metrics=create(registry))

    @app.page("/metrics")
    async def metrics_page(self: Any, request: Any) -> Response:
        return Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    return monitor
