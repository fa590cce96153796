"""Event-time timers per partition, and where a user's state lives.

A worker keeps, for each partition it owns, a heap of (due time, user) and that partition's watermark:
the newest event time seen on it. When the watermark passes a due time the user is ticked (see
``pipeline.advance``), so win-back decisions and negative labels happen for users who send nothing.
The index is derived data: it is rebuilt from the users table after every rebalance, never persisted.

Only the earliest due time per user is kept; when a user's due time moves later (a new event), the old
entry pops early, the tick finds nothing due and the caller reschedules. So the heap holds at most about
one entry per user, never one per event.
"""

from __future__ import annotations

import heapq
from functools import lru_cache


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 hash as an unsigned 32-bit int (as aiokafka; the Java client's is the signed view).

    >>> murmur2(b"21")
    3321034988
    """
    length = len(data)
    seed, m, r = 0x9747B28C, 0x5BD1E995, 24
    h = (seed ^ length) & 0xFFFFFFFF
    for i in range(0, length - length % 4, 4):
        k = data[i] | data[i + 1] << 8 | data[i + 2] << 16 | data[i + 3] << 24
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    rest = length % 4
    tail = length - rest
    if rest == 3:
        h ^= data[tail + 2] << 16
    if rest >= 2:
        h ^= data[tail + 1] << 8
    if rest >= 1:
        h ^= data[tail]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h


@lru_cache(maxsize=65536)
def partition_for(user_id: str, partitions: int) -> int:
    """The partition a message keyed by ``user_id`` lands on with Kafka's default partitioner.

    Looked up once per event and users repeat, so the answers of the pure-Python hash are kept for the most
    recent users (bounded: about 10 MB when full).

    >>> partition_for("user-1", 4) == partition_for("user-1", 4)
    True
    """
    return (murmur2(user_id.encode()) & 0x7FFFFFFF) % partitions


class Timers:
    """Due times per partition, fired by that partition's event-time watermark.

    >>> t = Timers()
    >>> t.schedule(0, "u", 100); t.schedule(0, "v", 300)
    >>> t.advance(0, 250)
    250
    >>> t.pop_due(0)
    ['u']
    >>> t.pop_due(0), t.advance(0, 200)
    ([], 250)
    """

    def __init__(self) -> None:
        self._heaps: dict[int, list[tuple[int, str]]] = {}
        self._due: dict[int, dict[str, int]] = {}
        self.watermarks: dict[int, int] = {}

    def __len__(self) -> int:
        return sum(len(d) for d in self._due.values())

    def schedule(self, partition: int, user_id: str, due_ms: int | None) -> None:
        """Make sure the user is looked at by ``due_ms`` (an earlier pending entry stays)."""
        if due_ms is None:
            return
        due = self._due.setdefault(partition, {})
        current = due.get(user_id)
        if current is None or due_ms < current:
            due[user_id] = due_ms
            heapq.heappush(self._heaps.setdefault(partition, []), (due_ms, user_id))

    def advance(self, partition: int, event_ms: int) -> int:
        """Move the partition's watermark forward (never back: late events do not rewind time)."""
        w = max(self.watermarks.get(partition, event_ms), event_ms)
        self.watermarks[partition] = w
        return w

    def pop_due(self, partition: int) -> list[str]:
        """Users whose entry is due at or before the watermark; each is removed and must be rescheduled."""
        heap, due = self._heaps.get(partition), self._due.get(partition)
        w = self.watermarks.get(partition)
        if not heap or w is None or due is None:
            return []
        users = []
        while heap and heap[0][0] <= w:
            at, user = heapq.heappop(heap)
            if due.get(user) == at:  # otherwise a stale entry superseded by an earlier one
                del due[user]
                users.append(user)
        return users

    def drop(self, partitions: set[int]) -> None:
        """Forget ``partitions`` (lost, or about to be indexed again from recovered state)."""
        for p in partitions:
            self._heaps.pop(p, None)
            self._due.pop(p, None)
            self.watermarks.pop(p, None)

    def clear(self) -> None:
        """Forget everything (after a rebalance the index is rebuilt from the table)."""
        self._heaps.clear()
        self._due.clear()
        self.watermarks.clear()
