"""Keyed state in memory, written to a compacted changelog topic by the Outbox, recovered from it here."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from stream_app.engine import Record
from stream_app.kafka_io import client_kwargs
from stream_app.settings import Settings

log = logging.getLogger(__name__)


class ChangelogStore:
    """Keyed state in memory, written to a compacted changelog topic by the Outbox, recovered by this class.

    Why not a Faust table: under exactly_once, Faust 0.15's table recovery cannot see the commit marker
    that ends a transactional changelog partition; it waits two 5 s read timeouts per rebalance, and in CI
    a restarted worker never finished recovering (> 120 s). Here a partition is loaded before the first
    message of that partition is processed: a plain read_committed consumer reads it from the beginning to
    its last stable offset (which, unlike the highwater, the reader can always reach once Faust's new
    transactional producers have fenced a crashed worker's open transactions). Keys and values are JSON,
    as Faust would write them, so the topic stays readable by any tool. Values are held as those bytes
    (``get``/``put``/``items``; ``store[key]`` decodes one for inspection), so recovery parses only keys.

    A rebalance forgets only the partitions this worker lost (``forget(partitions)``) or whose in-memory
    state may no longer match what was committed (a failed transaction): the others stay loaded, so a
    worker joining the group does not make every worker reload all of its state.

    A load awaits the broker, so a ``forget`` can run in the middle of one (a rebalance while a partition
    loads). Each partition has a generation that ``forget`` advances; a load applies records and marks a
    partition loaded only while the generation it started with is current, so a forgotten partition is
    neither refilled nor reported loaded by a load that began before it was forgotten.
    """

    def __init__(self, settings: Settings, topic: str, recover: bool = True) -> None:
        self.settings, self.topic, self.recover = settings, topic, recover
        self.data: dict[str, bytes] = {}
        self.partition_of: dict[str, int] = {}
        self.loaded: set[int] = set()
        self.nbytes = 0  # sum of the held values' sizes: the state-bytes gauge
        self.skipped = 0  # changelog records at recovery that were not ours (a key that is not a JSON string)
        self._epoch = 0  # advanced by forget() of everything
        self._generation: dict[int, int] = {}  # per partition, advanced by forget(partitions)
        self._loading: Counter[int] = Counter()  # partitions being loaded (by how many loads)

    def _token(self, partition: int) -> tuple[int, int]:
        return self._epoch, self._generation.get(partition, 0)

    def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    def items(self) -> Any:
        return self.data.items()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: str) -> Any:
        return orjson.loads(self.data[key])

    def _set(self, key: str, value: bytes | None, partition: int) -> None:
        old = self.data.pop(key, None) if value is None else self.data.get(key)
        self.nbytes -= len(old) if old is not None else 0
        if value is None:
            self.partition_of.pop(key, None)
        else:
            self.data[key] = value
            self.partition_of[key] = partition
            self.nbytes += len(value)

    def put(self, batch: list[Record], key: str, value: bytes | None, partition: int) -> None:
        self._set(key, value, partition)
        batch.append((self.topic, orjson.dumps(key), value, partition))

    def forget(self, partitions: set[int] | None = None) -> None:
        """Drop ``partitions`` (default: all): whatever of them this worker owns next is loaded again."""
        if partitions is None:
            self._epoch += 1
            self.data.clear()
            self.partition_of.clear()
            self.loaded.clear()
            self.nbytes = 0
            return
        for p in partitions:
            self._generation[p] = self._generation.get(p, 0) + 1
        partitions = set(partitions) & (self.loaded | set(self._loading))
        if not partitions:
            return
        for key in [k for k, p in self.partition_of.items() if p in partitions]:
            self._set(key, None, 0)
        self.loaded -= partitions

    async def ensure(self, partitions: set[int]) -> float:
        """Load the partitions not loaded yet; returns the seconds it took (0 if nothing to load)."""
        todo = sorted(set(partitions) - self.loaded)
        if not todo or not self.recover:
            self.loaded |= set(todo)
            return 0.0
        t0 = time.monotonic()
        started = {p: self._token(p) for p in todo}
        self._loading.update(todo)
        try:
            async with aclosing(self._read(todo)) as batches:
                async for batch in batches:
                    for partition, raw_key, value, offset in batch:
                        if self._token(partition) != started[partition]:
                            continue  # forgotten while loading: its records are no longer this worker's
                        key = _state_key(raw_key)
                        if key is None:  # not a record of ours: skipped, never a crash loop at recovery
                            self.skipped += 1
                            log.warning("state %s[%d]@%d: key is not a JSON string, skipped", self.topic,
                                        partition, offset)  # fmt: skip
                            continue
                        self._set(key, value, partition)
        finally:
            self._loading.subtract(todo)
            self._loading = +self._loading  # drop the zeros
        done = {p for p in todo if self._token(p) == started[p]}
        self.loaded |= done
        took = time.monotonic() - t0
        gone = f" ({sorted(set(todo) - done)} forgotten while loading)" if done != set(todo) else ""
        log.info("state %s partitions %s recovered: %d keys in %.2fs%s", self.topic, sorted(done), len(self.data),
                 took, gone)  # fmt: skip
        return took

    async def _read(self, partitions: list[int]) -> AsyncIterator[list[tuple[int, bytes | None, bytes | None, int]]]:
        """The changelog partitions from the beginning to their last stable offset, in fetched batches of
        (partition, key, value, offset)."""
        consumer = AIOKafkaConsumer(**client_kwargs(self.settings), enable_auto_commit=False, group_id=None,
                                    isolation_level="read_committed", max_partition_fetch_bytes=4 << 20)  # fmt: skip
        await consumer.start()
        try:
            tps = [TopicPartition(self.topic, p) for p in partitions]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            end = await consumer.end_offsets(tps)  # read_committed: the last stable offset
            while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
                for tp, msgs in (await consumer.getmany(timeout_ms=200, max_records=10_000)).items():
                    yield [(tp.partition, msg.key, msg.value, msg.offset) for msg in msgs]
        finally:
            await consumer.stop()


def _state_key(raw: bytes | None) -> str | None:
    """A changelog key as this store writes it (a JSON string), or None for anything else.

    >>> _state_key(b'"u1"'), _state_key(b"u1"), _state_key(None), _state_key(b"1")
    ('u1', None, None, None)
    """
    if raw is None:
        return None
    try:
        key = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return key if isinstance(key, str) else None
