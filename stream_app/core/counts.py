"""Per-user event counts: the first, smallest piece of user state.

A step function in the Bytewax style: it takes the old state and one event and returns new state,
never mutating its input (a Faust table only writes its changelog on assignment).
"""

from __future__ import annotations

from collections.abc import Mapping

from stream_app.core.events import Event


def count_event(counts: Mapping[str, int] | None, event: Event) -> dict[str, int]:
    """Return ``counts`` with the event's type incremented.

    >>> e = Event("e1", "click", "u1", 0)
    >>> count_event(None, e)
    {'click': 1}
    >>> old = {'click': 1, 'payment': 2}
    >>> count_event(old, e), old
    ({'click': 2, 'payment': 2}, {'click': 1, 'payment': 2})
    """
    new = dict(counts or {})
    new[event.type] = new.get(event.type, 0) + 1
    return new
