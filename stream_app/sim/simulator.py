"""The simulator: a seeded population's events in event-time order, reacting to push decisions.

``Simulator.step()`` returns the next input message as a replay envelope
``{"topic": "click"|"like"|"payment"|"consent", "value": {...} | "<raw malformed text>", "timestamp_ms": t}``
(what ``stream-app replay`` reads and what ``--kafka`` produces). Future events wait in a heap: each
simulated day's organic events are drawn when the day starts, reactions to pushes when a push is
delivered, so everything comes out in event-time order (duplicates arrive a little late, as on Kafka).

Closed loop: ``observe(decision)`` takes each decision the pipeline made (an audit record); the
simulator records the ground truth of it (true conversion probability with and without the push, the
user's latent type and response class) and, for a push, delivers it at ``send_at_ms``: the user may opt
out (a consent event), and converts with the push-dependent probability after a delay, with the
push's ``decision_id`` as ``push_id``. The ground truth stays here, never in an event.

Randomness: every draw comes from ``random.Random`` streams seeded from the seed, one per user and
purpose. Organic behaviour (and the uniform that decides whether an annoyed user's payment is lost)
is drawn from streams that reactions never touch, so runs of different policies on the same seed see
the same organic events (common random numbers), and differ only by what the pushes caused.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from stream_app.core.profile import DAY_MS, HOUR_MS
from stream_app.sim.population import (
    ANNOYANCE_MS,
    CATEGORIES,
    CLICK_DELAY_MEDIAN_MS,
    CLICK_DELAY_SIGMA,
    FATIGUE_WINDOW_MS,
    PAY_DELAY_MEDIAN_MS,
    PAY_DELAY_SIGMA,
    User,
    conversion_probabilities,
    make_population,
    push_effect,
)

T0_MS = 1_699_833_600_000  # Monday 2023-11-13 00:00 UTC
MINUTE_MS = 60_000


@dataclass(frozen=True)
class SimConfig:
    users: int = 2000
    days: int = 28
    seed: int = 0
    t0_ms: int = T0_MS
    malformed_share: float = 0.005  # extra malformed messages, per organic event
    duplicate_share: float = 0.01  # organic events sent twice
    tz_missing_share: float = 0.1  # events without tz_offset_min


@dataclass(frozen=True)
class DecisionTruth:
    """Ground truth of one push or holdout decision (the evaluator's, never the pipeline's)."""

    decision_id: str
    user_id: str
    campaign: str
    action: str
    decided_at_ms: int
    at_ms: int  # when the push was (or would have been) delivered: the attribution window's start
    p_push: float  # true P(convert in the window | push at at_ms)
    p_no: float  # true P(convert in the window | no push)
    type_index: int
    response: str
    score: float

    @property
    def uplift(self) -> float:
        return self.p_push - self.p_no


@dataclass
class UserDynamics:
    """What happened to a user so far (the simulator's mutable bookkeeping)."""

    pushes: list[int] = field(default_factory=list)  # delivery times
    annoyed_until: int = -1
    opted_out: bool = False
    payments: int = 0
    push_payments: int = 0


def poisson(rng: random.Random, lam: float) -> int:
    """A Poisson draw (Knuth; fine for the small rates used here).

    >>> r = random.Random(0); round(sum(poisson(r, 2.0) for _ in range(20000)) / 20000, 1)
    2.0
    """
    if lam <= 0:
        return 0
    limit, k, p = math.exp(-lam), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def lognormal_ms(rng: random.Random, median_ms: float, sigma: float) -> int:
    return int(median_ms * math.exp(rng.gauss(0.0, sigma)))


class Simulator:
    """A seeded population's event stream; ``deliver=False`` ignores decisions (open loop or no pushes)."""

    def __init__(self, config: SimConfig, deliver: bool = True, windows: dict[str, int] | None = None,
                 click_triggered: frozenset[str] = frozenset()) -> None:  # fmt: skip
        self.config = config
        self.deliver = deliver
        self.windows = windows or {}
        self.click_triggered = click_triggered  # campaigns whose decisions follow a click (it may announce a payment)
        self.users: list[User] = make_population(config.users, config.seed)
        self.by_id = {u.user_id: u for u in self.users}
        self.dynamics = [UserDynamics() for _ in self.users]
        s = config.seed
        self.organic = [random.Random(f"organic:{s}:{u.index}") for u in self.users]
        self.react = [random.Random(f"react:{s}:{u.index}") for u in self.users]
        self.noise = random.Random(f"noise:{s}")
        self.heap: list[tuple[int, int, str, Any]] = []
        self.seq = 0
        self.end_ms = config.t0_ms + config.days * DAY_MS
        self.counts: Counter[str] = Counter()
        self.truths: dict[str, DecisionTruth] = {}
        self.now_ms = config.t0_ms
        self._push(config.t0_ms, "day", 0)

    # -- the stream ------------------------------------------------------------------------------
    def step(self) -> dict[str, Any] | None:
        """The next message, in event-time order; None once the simulated period is over."""
        while self.heap and self.heap[0][0] < self.end_ms:
            ts, _, kind, payload = heapq.heappop(self.heap)
            self.now_ms = ts
            if kind == "day":
                self._generate_day(payload)
            elif kind == "deliver":
                self._deliver(ts, payload)
            elif kind == "pay":
                user, envelope, thin = payload
                d = self.dynamics[user.index]
                if user.annoyance and d.annoyed_until > ts and thin < user.annoyance:
                    self.counts["payments_lost_to_annoyance"] += 1
                    continue
                d.payments += 1
                self.counts["payments"] += 1
                return envelope
            else:
                if kind == "push_pay":  # a payment caused by a push
                    self.dynamics[self.by_id[payload["value"]["user_id"]].index].payments += 1
                    self.counts["payments"] += 1
                return payload
        return None

    def __iter__(self):
        while (envelope := self.step()) is not None:
            yield envelope

    # -- closed loop -------------------------------------------------------------------------------
    def observe(self, decision: dict[str, Any]) -> DecisionTruth | None:
        """Take one decision (audit record): record its ground truth, deliver a push at ``send_at_ms``."""
        action = decision["action"]
        if action not in ("push", "holdout"):
            return None
        user = self.by_id.get(decision["user_id"])
        if user is None:
            return None
        at = decision["send_at_ms"] or decision["decided_at_ms"]
        window = self.windows.get(decision["campaign"], DAY_MS)
        click = decision["decided_at_ms"] if decision["campaign"] in self.click_triggered else None
        p_push, p_no = self.probabilities(user, at, window, click)
        truth = DecisionTruth(decision["decision_id"], user.user_id, decision["campaign"], action,
                              decision["decided_at_ms"], at, p_push, p_no, user.type_index, user.response,
                              decision["score"])  # fmt: skip
        self.truths[truth.decision_id] = truth
        if action == "push" and self.deliver:
            self._push(max(at, self.now_ms), "deliver", (user, decision["decision_id"]))
        return truth

    def probabilities(
        self, user: User, at_ms: int, window_ms: int, click_at_ms: int | None = None
    ) -> tuple[float, float]:
        """True (P(convert | push at ``at_ms``), P(convert | no push)) for a user, as of now."""
        d = self.dynamics[user.index]
        recent = sum(1 for t in d.pushes if at_ms - FATIGUE_WINDOW_MS < t <= at_ms)
        return conversion_probabilities(user, at_ms, window_ms, d.annoyed_until, recent, click_at_ms)

    # -- internals ---------------------------------------------------------------------------------
    def _push(self, ts: int, kind: str, payload: Any) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (ts, self.seq, kind, payload))

    def _deliver(self, ts: int, payload: tuple[User, str]) -> None:
        user, push_id = payload
        d = self.dynamics[user.index]
        if d.opted_out:
            self.counts["pushes_to_opted_out"] += 1
            return
        recent = sum(1 for t in d.pushes if ts - FATIGUE_WINDOW_MS < t <= ts)
        lift, p_opt_out = push_effect(user, ts, recent)
        d.pushes.append(ts)
        self.counts["pushes_delivered"] += 1
        if user.annoyance:
            d.annoyed_until = max(d.annoyed_until, ts + ANNOYANCE_MS)
        rng = self.react[user.index]
        if rng.random() < p_opt_out:
            d.opted_out = True
            self.counts["opt_outs"] += 1
            at = ts + int(rng.uniform(1, 30) * MINUTE_MS)
            self._push(at, "event", {"topic": "consent", "value": {"user_id": user.user_id, "action": "opt_out"},
                                     "timestamp_ms": at})  # fmt: skip
        if rng.random() < lift:
            t_click = ts + lognormal_ms(rng, CLICK_DELAY_MEDIAN_MS, CLICK_DELAY_SIGMA)
            t_pay = t_click + lognormal_ms(rng, PAY_DELAY_MEDIAN_MS, PAY_DELAY_SIGMA)
            base = f"p-{push_id}"
            click = self._event(user, f"{base}-c", "click", t_click, user.favourite, tz=user.tz_offset_min)
            click["value"]["push_id"] = push_id
            pay = self._event(user, f"{base}-p", "payment", t_pay, user.favourite, tz=user.tz_offset_min,
                              amount=self._amount(rng, user))  # fmt: skip
            pay["value"]["push_id"] = push_id
            d.push_payments += 1
            self.counts["push_conversions"] += 1
            self._push(t_click, "event", click)
            self._push(t_pay, "push_pay", pay)

    def _generate_day(self, day: int) -> None:
        """Draw every user's organic events of one day and queue them (and the next day's marker)."""
        cfg = self.config
        start = cfg.t0_ms + day * DAY_MS
        weekend = ((cfg.t0_ms // DAY_MS + 3) + day) % 7 in (5, 6)  # 1970-01-01 was a Thursday (3)
        for user in self.users:
            rng, ut = self.organic[user.index], user.type
            n = poisson(rng, ut.browse_per_day * user.activity * (ut.weekend_boost if weekend else 1.0))
            for k in range(n):
                ts = self._when(rng, user, start)
                etype = "like" if rng.random() < ut.like_share else "click"
                self._organic(user, f"o{cfg.seed}-{user.index}-{day}-{k}", etype, ts, self._category(rng, user))
            for k in range(poisson(rng, user.pay_per_day)):
                ts = self._when(rng, user, start)
                cat = self._category(rng, user)
                for j in range(rng.randint(1, 2)):  # browsing right before buying
                    t_click = max(start, ts - int(rng.uniform(5, 60) * MINUTE_MS))
                    self._organic(user, f"o{cfg.seed}-{user.index}-{day}-b{k}-{j}", "click", t_click, cat)
                pay = self._event(user, f"o{cfg.seed}-{user.index}-{day}-p{k}", "payment", ts, cat,
                                  tz=self._tz(user), amount=self._amount(rng, user))  # fmt: skip
                self._push(ts, "pay", (user, pay, rng.random()))
                self._noise(pay)
        if day + 1 < cfg.days:
            self._push(start + DAY_MS, "day", day + 1)

    def _organic(self, user: User, event_id: str, etype: str, ts: int, category: str) -> None:
        envelope = self._event(user, event_id, etype, ts, category, tz=self._tz(user))
        self._push(ts, "event", envelope)
        self._noise(envelope)

    def _noise(self, envelope: dict[str, Any]) -> None:
        """Sometimes a duplicate (same event, a little later) or an extra malformed message."""
        cfg, rng, ts = self.config, self.noise, envelope["timestamp_ms"]
        self.counts[f"events_{envelope['topic']}"] += 1
        if rng.random() < cfg.duplicate_share:
            at = ts + int(rng.uniform(1, 600) * 1000)
            self._push(at, "event", {**envelope, "timestamp_ms": at})
            self.counts["duplicates"] += 1
        if rng.random() < cfg.malformed_share:
            self._push(ts, "event", self._malformed(rng, envelope))
            self.counts["malformed"] += 1

    @staticmethod
    def _malformed(rng: random.Random, envelope: dict[str, Any]) -> dict[str, Any]:
        v = envelope["value"]
        kind = rng.randrange(4)
        if kind == 0:
            bad: Any = '{"event_id": "' + v["event_id"] + '", "type": "cli'  # truncated JSON
        elif kind == 1:
            bad = {k: x for k, x in v.items() if k != "user_id"}  # missing field
        elif kind == 2:
            bad = {**v, "type": "payment", "amount": -5}  # bad amount
        else:
            bad = {**v, "type": "view"}  # unknown type
        return {"topic": envelope["topic"], "value": bad, "timestamp_ms": envelope["timestamp_ms"]}

    def _event(self, user: User, event_id: str, etype: str, ts: int, category: str, *, tz: int | None,
               amount: float | None = None) -> dict[str, Any]:  # fmt: skip
        value: dict[str, Any] = {"event_id": event_id, "type": etype, "user_id": user.user_id, "ts": ts,
                                 "category": category}  # fmt: skip
        if tz is not None:
            value["tz_offset_min"] = tz
        if amount is not None:
            value["amount"], value["currency"] = amount, "EUR"
        return {"topic": etype, "value": value, "timestamp_ms": ts}

    def _tz(self, user: User) -> int | None:
        return None if self.noise.random() < self.config.tz_missing_share else user.tz_offset_min

    @staticmethod
    def _when(rng: random.Random, user: User, day_start: int) -> int:
        """A time on this UTC day, at the user's local active hours."""
        ut = user.type
        hour = (rng.choice(ut.peak_hours) + rng.gauss(0.0, ut.hour_spread)) % 24
        return day_start + int((hour * HOUR_MS - user.tz_offset_min * MINUTE_MS) % DAY_MS)

    @staticmethod
    def _category(rng: random.Random, user: User) -> str:
        r = rng.random()
        if r < 0.6:
            return user.favourite
        if r < 0.9:
            cats, weights = zip(*user.type.categories, strict=True)
            return rng.choices(cats, weights=weights)[0]
        return rng.choice(CATEGORIES)

    @staticmethod
    def _amount(rng: random.Random, user: User) -> float:
        return round(user.spend_median * rng.lognormvariate(0.0, 0.5), 2)
