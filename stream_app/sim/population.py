"""The simulated population: latent user types, per-user traits, and the ground truth of push effects.

Everything here is a pure function of its arguments (a seeded ``random.Random`` is passed in). The
pipeline never sees any of it: it only sees the events the simulator emits.

Model (also in docs/simulator.md):

- Six latent **types** differ in activity (browsing events per day), like/click mix, preferred categories,
  order value, time zone, active hours (one or two local peaks) and organic payment rate. Users of a type
  vary around it (log-normal activity and payment-rate multipliers, their own favourite category), so
  types overlap in feature space: recoverable, not trivially.
- Each user has a **response** class to pushes, drawn from the type's mix:
  ``persuadable`` (a push converts them with probability ``lift``), ``sure_thing`` (high organic rate,
  almost no lift), ``lost_cause`` (low organic rate, no lift) and ``annoyed`` (no lift; a push lowers
  their organic payment rate by ``annoyance`` for 7 days and they opt out more often).
- Pushes **hurt at night** (local 22:00-08:00: lift x 0.3, opt-out x 3) and **when frequent** (lift x
  0.6 per push delivered in the previous 7 days; opt-out probability x (1 + that count)).
- A push-caused conversion is a click on the push after a log-normal delay (median 40 min) and a payment
  after another (median 15 min), both carrying the push's ``push_id``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

import numpy as np

from stream_app.core.profile import DAY_MS, local_hour

CATEGORIES = ("electronics", "games", "fashion", "beauty", "home", "grocery", "books", "sports", "toys", "travel")
RESPONSES = ("persuadable", "sure_thing", "lost_cause", "annoyed")

ANNOYANCE_MS = 7 * DAY_MS  # an annoyed user's organic rate stays lowered this long after a push
FATIGUE_WINDOW_MS = 7 * DAY_MS  # pushes in this window before a push weaken it and raise opt-outs
FATIGUE = 0.6  # lift multiplier per recent push
NIGHT_LIFT, NIGHT_OPT_OUT = 0.3, 3.0  # local 22:00-08:00
CLICK_DELAY_MEDIAN_MS, CLICK_DELAY_SIGMA = 40 * 60_000, 1.0  # push -> click on it (log-normal)
PAY_DELAY_MEDIAN_MS, PAY_DELAY_SIGMA = 15 * 60_000, 0.7  # click on the push -> payment


@dataclass(frozen=True)
class UserType:
    name: str
    share: float
    browse_per_day: float  # clicks + likes per day
    like_share: float
    categories: tuple[tuple[str, float], ...]
    spend_median: float  # order value, EUR
    tz_offsets: tuple[int, ...]  # minutes east of UTC
    peak_hours: tuple[float, ...]  # local hours of activity peaks
    hour_spread: float  # std of the local hour around a peak
    pay_per_day: float  # organic payments per day (before the user's multipliers)
    responses: tuple[float, float, float, float]  # shares of RESPONSES
    weekend_boost: float = 1.0  # browsing multiplier on Saturdays and Sundays


TYPES: tuple[UserType, ...] = (
    UserType("deal_hunter", 0.22, 6.0, 0.15, (("electronics", 0.4), ("home", 0.3), ("toys", 0.3)), 25.0,
             (0, 60, 120), (12.5, 20.0), 2.0, 0.012, (0.55, 0.05, 0.25, 0.15)),
    UserType("loyal_buyer", 0.14, 3.0, 0.2, (("grocery", 0.5), ("home", 0.3), ("beauty", 0.2)), 70.0,
             (0, 60), (9.0, 18.0), 1.5, 0.07, (0.15, 0.6, 0.05, 0.2)),
    UserType("night_gamer", 0.18, 8.0, 0.4, (("games", 0.7), ("electronics", 0.3)), 15.0,
             (-300, -360, -480), (23.0,), 1.5, 0.015, (0.15, 0.05, 0.3, 0.5)),
    UserType("fashionista", 0.16, 4.0, 0.5, (("fashion", 0.6), ("beauty", 0.4)), 55.0,
             (60, 120, 180), (13.0, 21.0), 2.0, 0.03, (0.35, 0.25, 0.2, 0.2)),
    UserType("casual_reader", 0.18, 1.2, 0.3, (("books", 0.6), ("travel", 0.2), ("sports", 0.2)), 20.0,
             (330, 480, 540), (7.5, 21.5), 1.5, 0.008, (0.2, 0.1, 0.6, 0.1)),
    UserType("weekend_athlete", 0.12, 2.5, 0.25, (("sports", 0.6), ("travel", 0.4)), 90.0,
             (-300, -180, 0), (10.0, 17.0), 3.0, 0.02, (0.3, 0.2, 0.3, 0.2), weekend_boost=2.0),
)  # fmt: skip

RESPONSE_PAY_MULT = {"persuadable": 0.8, "sure_thing": 2.5, "lost_cause": 0.3, "annoyed": 1.0}


@dataclass(frozen=True)
class User:
    """One simulated user's latent traits (ground truth; never in an event)."""

    user_id: str
    index: int
    type_index: int
    response: str
    activity: float  # browsing multiplier
    pay_per_day: float  # organic payment rate
    lift: float  # probability a (day-time, first-in-a-week) push converts
    annoyance: float  # organic rate reduction after a push (annoyed users)
    opt_out_base: float  # opt-out probability per push before fatigue and night
    tz_offset_min: int
    favourite: str  # favourite category
    spend_median: float

    @property
    def type(self) -> UserType:
        return TYPES[self.type_index]


def make_user(index: int, rng: random.Random, types: tuple[UserType, ...] = TYPES) -> User:
    """Draw one user's traits.

    >>> u = make_user(0, random.Random(1))
    >>> u.user_id, u.response in RESPONSES, 0 <= u.lift < 1
    ('u00000', True, True)
    """
    t = rng.choices(range(len(types)), weights=[x.share for x in types])[0]
    ut = types[t]
    response = rng.choices(RESPONSES, weights=ut.responses)[0]
    lift = {"persuadable": rng.uniform(0.08, 0.3), "sure_thing": rng.uniform(0.0, 0.02)}.get(response, 0.0)
    annoyance = rng.uniform(0.3, 0.7) if response == "annoyed" else 0.0
    opt_out = 0.02 if response == "annoyed" else 0.002
    cats, weights = zip(*ut.categories, strict=True)
    favourite = rng.choices(cats, weights=weights)[0]
    return User(
        user_id=f"u{index:05d}", index=index, type_index=t, response=response,
        activity=rng.lognormvariate(0.0, 0.5), pay_per_day=ut.pay_per_day * rng.lognormvariate(0.0, 0.5)
        * RESPONSE_PAY_MULT[response], lift=lift, annoyance=annoyance, opt_out_base=opt_out,
        tz_offset_min=rng.choice(ut.tz_offsets), favourite=favourite,
        spend_median=ut.spend_median * rng.lognormvariate(0.0, 0.3),
    )  # fmt: skip


def make_population(n_users: int, seed: int, types: tuple[UserType, ...] = TYPES) -> list[User]:
    rng = random.Random(f"population:{seed}")
    return [make_user(i, rng, types) for i in range(n_users)]


def is_night(ts_ms: int, tz_offset_min: int) -> bool:
    """Local 22:00-08:00.

    >>> hour = 3_600_000
    >>> is_night(23 * hour, 0), is_night(12 * hour, 0), is_night(12 * hour, 660)
    (True, False, True)
    """
    h = local_hour(ts_ms, tz_offset_min)
    return h >= 22 or h < 8


def push_effect(user: User, at_ms: int, recent_pushes: int) -> tuple[float, float]:
    """(lift, opt-out probability) of a push delivered at ``at_ms`` after ``recent_pushes`` in 7 days."""
    lift = user.lift * FATIGUE**recent_pushes
    opt_out = user.opt_out_base * (1 + recent_pushes)
    if is_night(at_ms, user.tz_offset_min):
        lift *= NIGHT_LIFT
        opt_out *= NIGHT_OPT_OUT
    return lift, min(opt_out, 1.0)


def lognormal_cdf(x_ms: float, median_ms: float, sigma: float) -> float:
    """P(delay <= x) for a log-normal delay.

    >>> round(lognormal_cdf(40 * 60_000, 40 * 60_000, 1.0), 3)
    0.5
    """
    if x_ms <= 0:
        return 0.0
    return 0.5 * (1 + math.erf(math.log(x_ms / median_ms) / (sigma * math.sqrt(2))))


def organic_exposure(user: User, start_ms: int, window_ms: int, annoyed_until_ms: int) -> float:
    """Expected organic payments in ``[start, start + window]``, given annoyance lasting until a time.

    Active hours shape when payments happen, not how many per day, so over whole days the rate is flat.
    """
    end = start_ms + window_ms
    dampened = max(0, min(end, annoyed_until_ms) - start_ms) if user.annoyance else 0
    days = (window_ms - dampened * user.annoyance) / DAY_MS
    return user.pay_per_day * days


PRE_PAYMENT_CLICKS = 1.5  # organic payments come after 1 or 2 clicks (5-60 min before) in the same category


def pre_payment_share(user: User, at_ms: int) -> float:
    """P(a click of this user at ``at_ms`` is one of the clicks right before an organic payment).

    A click trigger is informative: some clicks announce a payment within the hour. This is the posterior
    share of such clicks among the user's clicks that day (their rates, not which click it was), so it is
    what the latent traits tell about a click, the Bayes-optimal view.
    """
    weekend = (at_ms // DAY_MS + 3) % 7 in (5, 6)  # 1970-01-01 was a Thursday
    ut = user.type
    browse = ut.browse_per_day * user.activity * (ut.weekend_boost if weekend else 1.0) * (1 - ut.like_share)
    pre = PRE_PAYMENT_CLICKS * user.pay_per_day
    return pre / (pre + browse) if pre + browse > 0 else 0.0


def conversion_probabilities(
    user: User, at_ms: int, window_ms: int, annoyed_until_ms: int, recent_pushes: int,
    click_at_ms: int | None = None,
) -> tuple[float, float]:  # fmt: skip
    """True (P(convert | push at ``at_ms``), P(convert | no push)) within an attribution window.

    "Convert" is what a label counts: a payment, or a click on the push, inside the window. ``click_at_ms``:
    the decision was triggered by the user's click at that time, which may announce a payment (see
    ``pre_payment_share``); that payment is lost if the user is annoyed when it happens (a push delivered
    within 30 minutes of the click counts as before it).

    >>> u = make_user(0, random.Random(1))
    >>> p1, p0 = conversion_probabilities(u, 12 * 3_600_000, DAY_MS, -1, 0)
    >>> 0 <= p0 < 1 and 0 <= p1 < 1
    True
    """
    q, a_no, a_push = 0.0, 0.0, 0.0
    if click_at_ms is not None:  # the announced payment comes 5-60 min after the click: maybe before the window
        late = min(max((60 - (at_ms - click_at_ms) / 60_000) / 55, 0.0), 1.0)
        q = pre_payment_share(user, click_at_ms) * late
        a_no = user.annoyance if annoyed_until_ms > click_at_ms else 0.0
        a_push = user.annoyance if at_ms - click_at_ms <= 30 * 60_000 else a_no
    p_no = 1 - (1 - q * (1 - a_no)) * math.exp(-organic_exposure(user, at_ms, window_ms, annoyed_until_ms))
    until = max(annoyed_until_ms, at_ms + ANNOYANCE_MS) if user.annoyance else annoyed_until_ms
    organic = 1 - (1 - q * (1 - a_push)) * math.exp(-organic_exposure(user, at_ms, window_ms, until))
    lift, _ = push_effect(user, at_ms, recent_pushes)
    lift *= lognormal_cdf(window_ms, CLICK_DELAY_MEDIAN_MS, CLICK_DELAY_SIGMA)
    p_push = 1 - (1 - organic) * (1 - lift)
    return p_push, p_no


MEAN_LIFT = {"persuadable": 0.19, "sure_thing": 0.01}  # means of make_user's uniform draws
MEAN_ANNOYANCE = 0.5
MEAN_PAY_MULT = math.exp(0.5**2 / 2)  # mean of make_user's lognormvariate(0, 0.5) payment multiplier


def expected_uplift(user: User, at_ms: int, window_ms: int, pushes: list[int], click_at_ms: int | None = None,
                    know_class: bool = False, classes: list[tuple] | None = None) -> float:  # fmt: skip
    """The true uplift of a push as seen by someone who knows the user's **type** (and, ``know_class``, its
    response class) but none of the user's own latent draws (lift, annoyance, payment multiplier): the mean
    over the type's response mix of each class's uplift with the class's mean traits. What a policy that
    recovered the types (segments) perfectly, or that also learned every user's class, could know; the ceiling
    study (``sim.ceiling``) runs both as policies. ``pushes``: delivery times of the user's earlier pushes;
    ``classes``: another mix to average over (``posterior_mix``).

    >>> u = make_user(0, random.Random(1))
    >>> t = expected_uplift(u, 12 * 3_600_000, DAY_MS, [])
    >>> c = expected_uplift(u, 12 * 3_600_000, DAY_MS, [], know_class=True)
    >>> -1 < t < 1 and -1 < c < 1 and t != c
    True
    """
    ut = user.type
    if know_class:
        mix = [(user.response, 1.0)]
    else:
        mix = classes if classes is not None else list(zip(RESPONSES, ut.responses, strict=True))
    p1, p0 = mixture_probabilities(user, at_ms, window_ms, pushes, click_at_ms, mix)
    return p1 - p0


def mixture_probabilities(user: User, at_ms: int, window_ms: int, pushes: list[int], click_at_ms: int | None,
                          mix: list[tuple]) -> tuple[float, float]:  # fmt: skip
    """(P(convert | push), P(convert | no push)) averaged over response classes ``mix`` ((class, weight) or
    (class, weight, payment rate per day)), each with its class's mean traits instead of the user's own draws
    (see ``expected_uplift``), and the class's mean payment rate unless given."""
    ut = user.type
    recent = sum(1 for t in pushes if at_ms - FATIGUE_WINDOW_MS < t <= at_ms)
    t1 = t0 = 0.0
    for response, weight, *rate in mix:
        annoyed = response == "annoyed"
        pay = _class_pay(ut, response, rate)
        hyp = replace(user, response=response, lift=MEAN_LIFT.get(response, 0.0),
                      annoyance=MEAN_ANNOYANCE if annoyed else 0.0, pay_per_day=pay)  # fmt: skip
        until = max(pushes) + ANNOYANCE_MS if annoyed and pushes else -1
        p1, p0 = conversion_probabilities(hyp, at_ms, window_ms, until, recent, click_at_ms)
        t1, t0 = t1 + weight * p1, t0 + weight * p0
    total = sum(m[1] for m in mix)
    return t1 / total, t0 / total


def _class_pay(ut: UserType, response: str, rate: list[float]) -> float:
    """A mix entry's payment rate per day: its own (``posterior_mix``), else the class's mean."""
    return rate[0] if rate else ut.pay_per_day * MEAN_PAY_MULT * RESPONSE_PAY_MULT[response]


def annoyance_after_window(user: User, at_ms: int, window_ms: int, pushes: list[int], mix: list[tuple]) -> float:
    """Expected organic payments a push delivered at ``at_ms`` costs *after* its attribution window: an annoyed
    user's organic rate stays lowered for ``ANNOYANCE_MS`` (7 days), so most of the harm falls outside a 24 h
    window, where neither the labels nor ``expected_uplift`` see it, while incremental conversions count it.
    ``mix`` as in ``mixture_probabilities`` (class, weight[, payment rate per day]); class means, not the user's own
    draws.

    >>> u = make_user(0, random.Random(1))
    >>> round(annoyance_after_window(u, 0, DAY_MS, [], [("annoyed", 1.0, 0.1)]), 4)  # 0.5 x 0.1 / day x 6 days
    0.3
    >>> annoyance_after_window(u, 0, DAY_MS, [], [("persuadable", 1.0, 0.1)])
    0.0
    """
    until = max(pushes) + ANNOYANCE_MS if pushes else -1  # annoyed already (if annoyed at all) until then
    extra = max(0, at_ms + ANNOYANCE_MS - max(at_ms + window_ms, until)) / DAY_MS
    loss = 0.0
    for response, weight, *rate in mix:
        if response == "annoyed":
            pay = _class_pay(user.type, response, rate)
            loss += weight * MEAN_ANNOYANCE * pay * extra
    return loss / sum(m[1] for m in mix)


# P(a push is clicked through | class): a persuadable user's mean lift (0.19) under typical fatigue and the
# few night deliveries (about 0.8 of it); sure things' mean lift 0.01; the others never click through a push
PUSH_CLICK_P = {"persuadable": 0.15, "sure_thing": 0.008, "lost_cause": 1e-4, "annoyed": 1e-4}
_Z, _ZW = np.polynomial.hermite_e.hermegauss(9)
_ZW = _ZW / _ZW.sum()


def posterior_mix(ut: UserType, pushes: int, push_clicks: int, payments: int, days: float) -> list[tuple]:
    """``class_posterior`` with each class's posterior mean payment rate per day (the user's own multiplier,
    inferred from its payments), as ``mixture_probabilities`` takes it.

    >>> [c for c, w, rate in posterior_mix(TYPES[1], 0, 0, 6, 20) if w > 0.5]
    ['sure_thing']
    """
    post = class_posterior(ut, pushes, push_clicks, payments, days)
    out = []
    for c, weight in post.items():
        like, lam = _payment_likelihood(ut, c, payments, days)
        rate = float(np.sum(like * lam) / np.sum(like)) if np.sum(like) > 0 else float(np.sum(_ZW * lam))
        out.append((c, weight, rate))
    return out


def class_posterior(ut: UserType, pushes: int, push_clicks: int, payments: int, days: float) -> dict[str, float]:
    """P(response class | the user's type, how many of its pushes it clicked through, its payments in ``days``):
    Bayes' rule with the simulator's own parameters (a binomial per push, a Poisson payment count whose rate
    carries make_user's log-normal multiplier, integrated by Gauss-Hermite). The best any learner could infer
    from these observations; the ceiling study's ``posterior_oracle`` ranks by ``expected_uplift`` under it.

    >>> post = class_posterior(TYPES[0], pushes=3, push_clicks=1, payments=0, days=20)
    >>> max(post, key=post.get), round(sum(post.values()), 6)
    ('persuadable', 1.0)
    >>> class_posterior(TYPES[1], pushes=0, push_clicks=0, payments=6, days=20)["sure_thing"] > TYPES[1].responses[1]
    True
    """
    k, n = push_clicks, max(pushes, push_clicks)
    post = {}
    for c, prior in zip(RESPONSES, ut.responses, strict=True):
        p = PUSH_CLICK_P[c]
        post[c] = prior * p**k * (1 - p) ** (n - k) * float(np.sum(_payment_likelihood(ut, c, payments, days)[0]))
    total = sum(post.values())
    return {c: v / total for c, v in post.items()} if total > 0 else dict(zip(RESPONSES, ut.responses, strict=True))


def _payment_likelihood(ut: UserType, response: str, payments: int, days: float) -> tuple[np.ndarray, np.ndarray]:
    """Per Gauss-Hermite node of the log-normal payment multiplier: its weight times the Poisson likelihood of
    ``payments`` in ``days`` (up to the factorial), and the class's payment rate per day there."""
    lam = ut.pay_per_day * np.exp(0.5 * _Z) * RESPONSE_PAY_MULT[response]
    total = lam * max(days, 0.0)
    return _ZW * np.exp(payments * np.log(np.maximum(total, 1e-300)) - total), lam


__all__ = [
    "CATEGORIES", "RESPONSES", "TYPES", "User", "UserType", "class_posterior", "conversion_probabilities",
    "expected_uplift", "is_night", "make_population", "make_user", "mixture_probabilities", "posterior_mix",
    "push_effect",
]  # fmt: skip
