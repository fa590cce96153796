"""Features: a fixed-order numeric vector read from a profile as of a decision's event time.

Fixed indices (not dicts) keep scoring cheap and let a model's parameters be a plain list. The vector
is computed from the profile *as of* ``now_ms`` only, and the decision stores it, so the label that
arrives later is joined with exactly what the model saw: no post-decision information leaks in.
Heavy-tailed quantities are log-compressed so one linear model and one distance metric can use them.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from functools import lru_cache

from stream_app.core.profile import DAY_MS, DEFAULT_PARAMS, HOUR_MS, Profile, ProfileParams, local_hour

FEATURE_NAMES: tuple[str, ...] = (
    "log_clicks", "log_likes", "log_payments",
    "log_rate_6h", "log_rate_14d",
    "log_hours_since_click", "log_hours_since_like", "log_hours_since_payment",
    "log_spend_total", "log_aov", "log_spend_30d",
    "pushes_24h", "log_hours_since_push",
    "hour_sin", "hour_cos", "active_hour_share",
    "top_category_share", "log_days_known",
    # fatigue and the user's own response to pushes (holdout decisions count as virtual pushes: both arms alike)
    "pushes_7d", "log_pushes", "log_push_clicks", "push_click_rate", "log_hours_since_push_click",
    # when, and what kind of buyer
    "weekend", "log_payments_30d", "like_share",
)  # fmt: skip
WEEK_MS = 7 * DAY_MS
# features that differ between pushed and holdout users by construction (a holdout user never clicks a push):
# the uplift model's transformed-outcome part must not use them (see core/uplift.py)
PUSH_RESPONSE_FEATURES = ("log_push_clicks", "push_click_rate", "log_hours_since_push_click")
RESPONSE_HISTORY = ("clicked_push", "unanswered_pushes")  # derived in feature_dict for the uplift learner
INDEX = {n: i for i, n in enumerate(FEATURE_NAMES)}
NEVER_HOURS = 24 * 365.0  # recency of something that never happened: a year, not infinity


def _log_hours(now_ms: int, then_ms: int) -> float:
    if then_ms < 0:
        return math.log1p(NEVER_HOURS)
    return math.log1p(min(max(now_ms - then_ms, 0) / HOUR_MS, NEVER_HOURS))


def extract_features(profile: Profile, now_ms: int, params: ProfileParams | None = None) -> list[float]:
    """The feature vector of ``profile`` at event time ``now_ms``.

    >>> from stream_app.core.events import Event
    >>> from stream_app.core.profile import update_profile
    >>> p, _ = update_profile(None, Event("e1", "payment", "u", 0, amount=99.0, category="shoes"))
    >>> x = extract_features(p, 2 * HOUR_MS)
    >>> len(x) == len(FEATURE_NAMES), round(x[INDEX["log_hours_since_payment"]], 3), x[INDEX["top_category_share"]]
    (True, 1.099, 1.0)
    """
    params = params or DEFAULT_PARAMS
    clicks, likes, payments = profile.counts  # both lists are in EVENT_TYPES order
    last_click, last_like, last_payment = profile.last_type_ms
    hour = local_hour(now_ms, profile.tz_offset_min)
    hours, categories = profile.hours, profile.categories
    total_hours = sum(hours)
    total_cat = sum(categories.values())
    return [
        math.log1p(clicks),
        math.log1p(likes),
        math.log1p(payments),
        math.log1p(profile.decayed(profile.rate_short, params.short_half_life_ms, now_ms)),
        math.log1p(profile.decayed(profile.rate_long, params.long_half_life_ms, now_ms)),
        _log_hours(now_ms, last_click),
        _log_hours(now_ms, last_like),
        _log_hours(now_ms, last_payment),
        math.log1p(profile.spend_total),
        math.log1p(profile.average_order_value),
        math.log1p(profile.decayed(profile.spend_decayed, params.spend_half_life_ms, now_ms)),
        float(profile.pushes_in_window(now_ms, params.push_window_ms)),
        _log_hours(now_ms, max(profile.last_push_ms.values(), default=-1)),
        _SIN[hour],  # math.sin(2 * math.pi * hour / 24), precomputed
        _COS[hour],
        hours[hour] / total_hours if total_hours else 0.0,
        max(categories.values()) / total_cat if total_cat else 0.0,
        math.log1p(max(now_ms - profile.first_ms, 0) / DAY_MS),
        float(profile.pushes_in_window(now_ms, WEEK_MS)),
        math.log1p(profile.n_pushes),
        math.log1p(profile.push_clicks),
        profile.push_clicks / (profile.n_pushes + 1),
        _log_hours(now_ms, profile.last_push_click_ms),
        1.0 if _local_weekday(now_ms, profile.tz_offset_min) >= 5 else 0.0,
        math.log1p(payments * 30 / max((now_ms - profile.first_ms) / DAY_MS, 1.0)),
        likes / (clicks + likes) if clicks + likes else 0.0,
    ]


def feature_dict(features: Sequence[float], segment: int) -> dict[str, float]:
    """The named features and the user's segment (one-hot), as the uplift learner reads them.

    >>> d = feature_dict([0.0] * len(FEATURE_NAMES), 3)
    >>> d["segment_3"], len(d) == len(FEATURE_NAMES) + 1 + len(RESPONSE_HISTORY)
    (1.0, True)
    """
    out = dict(zip(FEATURE_NAMES, features, strict=True))
    out[f"segment_{segment}"] = 1.0
    out.update(_response_history(out))
    return out


def _response_history(x: dict[str, float]) -> dict[str, float]:
    """The user's push history as the uplift learner reads it: whether any push was clicked, and how many were not
    (linear: each unanswered push lowers the odds that a push moves this user by about the same factor)."""
    pushes = round(math.expm1(x["log_pushes"]))
    clicks = round(math.expm1(x["log_push_clicks"]))
    return {"clicked_push": float(clicks > 0), "unanswered_pushes": float(min(max(pushes - clicks, 0), 50))}


def without_push_responses(x: dict[str, float]) -> dict[str, float]:
    """The feature dict as for a user who never clicked a push. Off-policy evaluation uses it: the holdout is the
    log's randomisation, and holdout users never receive a push, so no logged outcome shows what a policy that
    keys on earlier push clicks would do without the push (positivity fails there).

    >>> without_push_responses({"log_push_clicks": 1.2, "log_clicks": 2.0})["log_push_clicks"]
    0.0
    """
    y = {**x, "log_push_clicks": 0.0, "push_click_rate": 0.0, "log_hours_since_push_click": math.log1p(NEVER_HOURS)}
    return y | _response_history(y) if "clicked_push" in x else y


def _local_weekday(ts_ms: int, tz_offset_min: int | None) -> int:
    """Monday 0 .. Sunday 6 in the user's local time (1970-01-01 was a Thursday).

    >>> _local_weekday(0, None), _local_weekday(2 * DAY_MS, 0), _local_weekday(2 * DAY_MS - HOUR_MS, 60)
    (3, 5, 5)
    """
    return ((ts_ms + (tz_offset_min or 0) * 60_000) // DAY_MS + 3) % 7


CATEGORY_BUCKETS = 32
TRAIT_NAMES: tuple[str, ...] = (
    *(f"category_{i}" for i in range(CATEGORY_BUCKETS)),
    "hour_cos", "hour_sin", "hour_cos2", "hour_sin2", "tz_hours",
    "like_share", "log_rate_14d", "log_aov", "log_payments_30d",
)  # fmt: skip
TRAITS_SCHEMA = "traits-v1"  # segment models carry it: a model learned on another vector is not applied


@lru_cache(maxsize=4096)
def category_bucket(category: str) -> int:
    """A stable bucket for a category name (crc32: the same in every process, unlike ``hash``).

    >>> category_bucket("games") == category_bucket("games"), 0 <= category_bucket("books") < CATEGORY_BUCKETS
    (True, True)
    """
    return zlib.crc32(category.encode()) % CATEGORY_BUCKETS


def extract_traits(profile: Profile, now_ms: int, params: ProfileParams | None = None) -> list[float]:
    """The vector segments are learned from: what a user *is*, not what they are doing now.

    Segments should name kinds of users (what they browse, when, where, how they buy) and keep naming the
    same user the same way from day to day, so this leaves out the moment (recency, time of the event,
    pushes): category shares (hashed into fixed buckets, so no catalogue needs configuring), the shape of
    the active-hours histogram (its first two circular harmonics: peak hour and one-vs-two peaks), the
    time zone, the like share, activity, order value and purchase frequency.

    >>> from stream_app.core.events import Event
    >>> from stream_app.core.profile import update_profile
    >>> p, _ = update_profile(None, Event("e1", "like", "u", 0, category="games", tz_offset_min=-300))
    >>> t = extract_traits(p, HOUR_MS)
    >>> len(t) == len(TRAIT_NAMES), t[category_bucket("games")], t[TRAIT_INDEX["tz_hours"]]
    (True, 1.0, -5.0)
    >>> round(t[TRAIT_INDEX["hour_cos"]], 3), round(t[TRAIT_INDEX["hour_sin"]], 3)  # 19:00 local
    (0.259, -0.966)
    """
    params = params or DEFAULT_PARAMS
    out = [0.0] * len(TRAIT_NAMES)
    total_cat = sum(profile.categories.values())
    if total_cat:
        for name, weight in profile.categories.items():
            out[category_bucket(name)] += weight / total_cat
    total_hours = sum(profile.hours)
    if total_hours:
        c1 = s1 = c2 = s2 = 0.0
        for h, w in enumerate(profile.hours):
            if w:
                c1 += w * _COS[h]
                s1 += w * _SIN[h]
                c2 += w * _COS2[h]
                s2 += w * _SIN2[h]
        i = CATEGORY_BUCKETS
        out[i : i + 4] = c1 / total_hours, s1 / total_hours, c2 / total_hours, s2 / total_hours
    clicks, likes, payments = profile.counts
    days = max((now_ms - profile.first_ms) / DAY_MS, 1.0)
    out[TRAIT_INDEX["tz_hours"]] = (profile.tz_offset_min or 0) / 60
    out[TRAIT_INDEX["like_share"]] = likes / (clicks + likes) if clicks + likes else 0.0
    out[TRAIT_INDEX["log_rate_14d"]] = math.log1p(profile.decayed(profile.rate_long, params.long_half_life_ms, now_ms))
    out[TRAIT_INDEX["log_aov"]] = math.log1p(profile.average_order_value)
    out[TRAIT_INDEX["log_payments_30d"]] = math.log1p(payments * 30 / days)
    return out


TRAIT_INDEX = {n: i for i, n in enumerate(TRAIT_NAMES)}
_COS = [math.cos(2 * math.pi * h / 24) for h in range(24)]
_SIN = [math.sin(2 * math.pi * h / 24) for h in range(24)]
_COS2 = [math.cos(4 * math.pi * h / 24) for h in range(24)]
_SIN2 = [math.sin(4 * math.pi * h / 24) for h in range(24)]
