"""Deterministic replay: the Faust agents' engine over a file of events, no Kafka.

The same ``Engine`` (validation, timers, the core step, the records it emits) and the same ``Trainer``
run in one process, in file order. Event time drives everything, the trainer publishes on event time
(the Kafka worker uses record time) and a published version is used from the next message on, so the
same input and config give byte-identical output files.

Input: JSON lines (``.jsonl``, or gzip-compressed ``.jsonl.gz``). A line is either an input event object
(as produced to Kafka; consent commands are recognised by their ``action`` field), or an envelope
``{"topic": ..., "value": <event object or raw string>, "timestamp_ms": ...}`` naming the input or consent
topic (as ``stream-app simulate`` writes). ``timestamp_ms`` plays the Kafka record time (the reference for
event-time bounds); without it the event's own ``ts`` is used.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from stream_app.campaigns import load_campaigns
from stream_app.core.pipeline import Config, Models
from stream_app.core.segments import SegmentModel
from stream_app.core.trainer import Trainer
from stream_app.engine import Engine, Message, ModelStore, Record
from stream_app.metrics import Metrics
from stream_app.settings import Settings

OUTPUTS = ("decisions", "audit", "dead_letters", "model_inputs", "model_params")


class DictStore:
    """Users' state in a dict: what the changelog-backed store holds, without a changelog."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    def items(self) -> Any:
        return self.data.items()

    def put(self, batch: list[Record], key: str, value: bytes | None, partition: int) -> None:
        if value is None:
            self.data.pop(key, None)
        else:
            self.data[key] = value


@dataclass
class ReplayResult:
    records: dict[str, list[bytes]] = field(default_factory=lambda: {k: [] for k in OUTPUTS})
    users: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def write(self, out_dir: Path) -> dict[str, Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name, values in self.records.items():
            path = out_dir / f"{name.replace('_', '-')}.jsonl"
            path.write_bytes(b"".join(v + b"\n" for v in values))
            paths[name] = path
        return paths


def read_lines(path: Path) -> Iterator[bytes]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for line in f:
            line = line.strip()
            if line:
                yield line


def to_message(line: bytes, offset: int, settings: Settings) -> Message:
    """A file line as the engine's input message (bad JSON stays bad: it is the engine's to reject)."""
    topic, value, ts = settings.clicks_topic, line, None
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        obj = None
    if isinstance(obj, dict) and "topic" in obj and "value" in obj:
        topic = {"click": settings.clicks_topic, "like": settings.likes_topic, "payment": settings.payments_topic,
                 "consent": settings.consent_topic}.get(obj["topic"], obj["topic"])  # fmt: skip
        raw = obj["value"]
        value = raw.encode() if isinstance(raw, str) else orjson.dumps(raw)
        ts = obj.get("timestamp_ms")
        obj = raw if isinstance(raw, dict) else None
    elif isinstance(obj, dict) and "action" in obj and "type" not in obj:
        topic = settings.consent_topic
    if isinstance(obj, dict) and ts is None:
        ts = obj.get("ts") if isinstance(obj.get("ts"), int) else None
    return Message(topic, 0, offset, None, value, ts if isinstance(ts, int) else 0)


def replay(lines: Iterable[bytes], settings: Settings | None = None) -> ReplayResult:
    """Run every line through the engine and an in-process trainer; collect what Kafka would carry."""
    settings = (settings or Settings()).model_copy(update={"topic_partitions": 1})  # one partition, in order
    campaigns, guardrails = load_campaigns(settings.campaigns_file or None)
    config = Config(campaigns=campaigns, guardrails=guardrails)
    models = ModelStore(Models(SegmentModel(k=settings.segments_k), {}))
    trainer = Trainer(campaigns, settings.segments_k, settings.model_publish_interval_ms)
    store = DictStore()
    engine = Engine(settings, config, store, models, Metrics.create())
    result = ReplayResult()
    name_of = {settings.decisions_topic: "decisions", settings.audit_topic: "audit",
               settings.dead_letter_topic: "dead_letters", settings.model_inputs_topic: "model_inputs"}  # fmt: skip
    outcomes: dict[str, int] = {}
    for offset, line in enumerate(lines):
        msg = to_message(line, offset, settings)
        batch: list[Record] = []
        handle = engine.on_consent if msg.topic == settings.consent_topic else engine.on_event
        outcome, _ = handle(batch, msg)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        now = msg.timestamp_ms
        for topic, _key, value, _partition in batch:
            name = name_of.get(topic)
            if name is None or value is None:
                continue  # state changelog records: the store already holds the state
            result.records[name].append(value)
            if name == "model_inputs":
                trainer.learn(orjson.loads(value))
        for key, params in trainer.due(now).items():
            models.apply(key, params)
            result.records["model_params"].append(orjson.dumps({"key": key, "params": params}))
    result.users = {key: orjson.loads(value) for key, value in store.data.items()}
    result.counts = outcomes
    return result
