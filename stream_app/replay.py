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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from stream_app.campaigns import load_campaigns
from stream_app.core.pipeline import Config, Models
from stream_app.core.policy import Campaign, Guardrails
from stream_app.core.segments import SegmentModel
from stream_app.engine import Engine, Message, ModelStore, Record, build_trainer
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


class Replayer:
    """The engine and an in-process trainer, stepped one input at a time (``replay`` and the simulator).

    ``feed`` takes a file line (bytes) or an engine ``Message`` and returns the output records it caused,
    as ``(name, value)`` pairs in emission order (``name`` in ``OUTPUTS``): the decisions, audit records,
    dead letters and model inputs of the message, then the model versions the trainer published after it
    (installed at once, so they score from the next message on). ``campaigns``/``guardrails`` override the
    settings' campaign file; ``trainer_campaigns`` lets the trainer learn with another mode than the engine
    decides with, and ``install`` replaces how a published version reaches the scoring models (the
    evaluator wraps them); both default to what the worker does.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        campaigns: tuple[Campaign, ...] | None = None,
        guardrails: Guardrails | None = None,
        trainer_campaigns: tuple[Campaign, ...] | None = None,
        models: ModelStore | None = None,
        install: Callable[[str, dict], None] | None = None,
        keep: bool = True,
    ) -> None:
        settings = (settings or Settings()).model_copy(update={"topic_partitions": 1})  # one partition, in order
        if campaigns is None:
            campaigns, loaded = load_campaigns(settings.campaigns_file or None)
            guardrails = guardrails or loaded
        self.settings = settings
        self.config = Config(
            campaigns=campaigns, guardrails=guardrails or Guardrails(), segment_sample_rate=settings.segment_sample_rate
        )
        self.models = models or ModelStore(Models(SegmentModel(k=settings.segments_k), {}))
        self.trainer = build_trainer(settings, trainer_campaigns or campaigns)
        self.store = DictStore()
        self.engine = Engine(settings, self.config, self.store, self.models, Metrics.create())
        self.install = install or self.models.apply
        self.result = ReplayResult() if keep else None
        self.outcomes: dict[str, int] = {}
        self.offset = 0
        s = settings
        self.name_of = {s.decisions_topic: "decisions", s.audit_topic: "audit", s.dead_letter_topic: "dead_letters",
                        s.model_inputs_topic: "model_inputs"}  # fmt: skip

    def feed(self, item: bytes | Message) -> list[tuple[str, bytes]]:
        """One input: run it through the engine, teach the trainer, install what it publishes."""
        msg = item if isinstance(item, Message) else to_message(item, self.offset, self.settings)
        self.offset += 1
        batch: list[Record] = []
        outcome, _ = self.engine.apply(batch, msg)
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        out: list[tuple[str, bytes]] = []
        for topic, _key, value, _partition in batch:
            name = self.name_of.get(topic)
            if name is None or value is None:
                continue  # state changelog records: the store already holds the state
            out.append((name, value))
            if name == "model_inputs":
                self.trainer.learn(orjson.loads(value))
        for key, params in self.trainer.due(msg.timestamp_ms).items():
            self.install(key, params)
            out.append(("model_params", orjson.dumps({"key": key, "params": params})))
        if self.result is not None:
            for name, value in out:
                self.result.records[name].append(value)
        return out

    def finish(self) -> ReplayResult:
        result = self.result or ReplayResult()
        result.users = {key: orjson.loads(value) for key, value in self.store.data.items()}
        result.counts = self.outcomes
        return result


def replay(lines: Iterable[bytes], settings: Settings | None = None) -> ReplayResult:
    """Run every line through the engine and an in-process trainer; collect what Kafka would carry."""
    replayer = Replayer(settings)
    for line in lines:
        replayer.feed(line)
    return replayer.finish()
