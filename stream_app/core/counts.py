"""Per-user event counts: the first, smallest piece of user state, updated effectively once.

Kafka redelivers: after a crash, a rebalance, or an aborted transaction, a worker consumes events
whose effects may already be in the table. The step is therefore idempotent by ``event_id``: each user
state remembers its last ``DEDUP_IDS`` event ids (about 40 bytes each in JSON, so ~1.3 KB per active
user at the default), and an event seen among them is a no-op. Redelivery happens within seconds of the
original, so a short per-user window is enough; ids older than it are no longer deduplicated.

A step function in the Bytewax style: old state and one event in, new state out, never mutating the
input (a Faust table only writes its changelog on assignment).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from stream_app.core.events import Event

DEDUP_IDS = 32


def count_event(state: Mapping[str, Any] | None, event: Event, dedup_ids: int = DEDUP_IDS) -> tuple[dict, bool]:
    """Return ``(new_state, applied)``; ``applied`` is False for a duplicate ``event_id``.

    >>> s, applied = count_event(None, Event("e1", "click", "u1", 0))
    >>> s, applied
    ({'counts': {'click': 1}, 'seen': ['e1']}, True)
    >>> count_event(s, Event("e1", "click", "u1", 0))[1]   # redelivered: applied once only
    False
    >>> count_event(s, Event("e2", "payment", "u1", 5))[0]["counts"]
    {'click': 1, 'payment': 1}
    """
    state = state or {}
    seen = state.get("seen", [])
    if event.event_id in seen:
        return dict(state), False
    counts = dict(state.get("counts", {}))
    counts[event.type] = counts.get(event.type, 0) + 1
    return {"counts": counts, "seen": [*seen, event.event_id][-dedup_ids:]}, True
