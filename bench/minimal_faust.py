"""(b) The framework's floor: a minimal Faust app with one agent forwarding each event to an output topic.

Configured from BENCH_* environment variables with the same broker settings as the full pipeline
(commit interval, producer linger, processing guarantee, raw bytes in and out). Run as
``python -m bench.minimal_faust`` (a ``faust.Worker`` at info level without the terminal spinner, exactly as
``stream-app worker`` runs the pipeline: at warn level Faust's spinner sets the root logger to DEBUG, and every
``logger.debug`` call in Faust then builds a log record, which cost this forwarder ~10% of its time).
"""

from __future__ import annotations

import os

import faust

app = faust.App(
    os.environ.get("BENCH_APP_ID", "bench-minimal"),
    broker=os.environ.get("BENCH_BROKER", "kafka://127.0.0.1:19392"),
    store="memory://",
    datadir=os.environ.get("BENCH_DATADIR", "/tmp/bench-minimal-data"),
    topic_partitions=int(os.environ.get("BENCH_PARTITIONS", "4")),
    processing_guarantee=os.environ.get("BENCH_GUARANTEE", "at_least_once"),
    broker_commit_interval=float(os.environ.get("BENCH_COMMIT_INTERVAL_S", "0.25")),
    producer_linger=int(os.environ.get("BENCH_LINGER_MS", "5")) / 1000,
    web_port=int(os.environ.get("BENCH_WEB_PORT", "6067")),
    web_bind="127.0.0.1",
    autodiscover=False,
)
raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
source = app.topic(*os.environ.get("BENCH_INPUTS", "clicks,likes,payments").split(","), **raw)
sink = app.topic(os.environ.get("BENCH_OUTPUT", "bench-minimal-out"), **raw)


@app.agent(source)
async def forward(stream):
    async for e in stream.events():
        await sink.send(key=e.key, value=e.value)
        yield None


if __name__ == "__main__":
    worker = faust.Worker(app, loglevel=os.environ.get("BENCH_LOGLEVEL", "info"))
    worker.spinner = None
    worker.execute_from_commandline()
