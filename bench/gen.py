"""A small seeded generator of realistic input events (event.v1), keyed by user id.

Events are in global event-time order, spread over ``days`` simulated days ending an hour before
``end_ms``; users are drawn with a mild skew (some users are much more active), types ~ 80/15/5
clicks/likes/payments, each user has a fixed ``tz_offset_min`` and a favourite category.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import orjson

CATEGORIES = ("shoes", "books", "electronics", "garden", "toys", "beauty", "sports", "grocery", "music", "home")
TZ_OFFSETS = (-480, -300, -240, 0, 60, 120, 180, 330, 480, 540)
TYPES = (("click", 0.80), ("like", 0.15), ("payment", 0.05))


def user_tz(u: int) -> int:
    return TZ_OFFSETS[(u * 2654435761) % len(TZ_OFFSETS)]


def events(
    n: int, users: int, seed: int, end_ms: int, days: float = 7.0, cover: bool = False
) -> Iterator[tuple[str, bytes, bytes]]:
    """Yield (type, key, value) for ``n`` events over ``users`` users; with ``cover`` the first ``users``
    events go to every user once (so state for exactly that many users exists: the memory and recovery runs)."""
    rng = random.Random(seed)
    span = int(days * 86_400_000)
    t0 = end_ms - 3_600_000 - span
    step = span / max(n, 1)
    cum = []
    acc = 0.0
    for name, share in TYPES:
        acc += share
        cum.append((acc, name))
    rnd = rng.random
    for i in range(n):
        # mild skew: a quarter of the draws go to the first 5% of users
        u = int(rnd() * users * 0.05) if rnd() < 0.25 else int(rnd() * users)
        if cover and i < users:
            u = i
        r = rnd()
        etype = next(name for edge, name in cum if r < edge) if r < 1 else "payment"
        fav = u % len(CATEGORIES)
        cat = CATEGORIES[fav] if rnd() < 0.6 else CATEGORIES[int(rnd() * len(CATEGORIES))]
        uid = f"u{u}"
        ev = {
            "event_id": f"e{seed}-{i}",
            "type": etype,
            "user_id": uid,
            "ts": int(t0 + i * step),
            "item_id": f"i{int(rnd() * 5000)}",
            "category": cat,
            "tz_offset_min": user_tz(u),
            "channel": "app" if rnd() < 0.7 else "web",
        }
        if etype == "payment":
            ev["amount"] = round(5 + rnd() * 120, 2)
            ev["currency"] = "EUR"
        yield etype, uid.encode(), orjson.dumps(ev)


def click(event_id: str, u: int, ts_ms: int) -> bytes:
    """One click of user ``u`` at ``ts_ms`` (latency probes)."""
    return orjson.dumps(
        {
            "event_id": event_id,
            "type": "click",
            "user_id": f"u{u}",
            "ts": ts_ms,
            "item_id": "i1",
            "category": CATEGORIES[u % len(CATEGORIES)],
            "tz_offset_min": user_tz(u),
            "channel": "app",
        }
    )
