"""Features: a fixed-order numeric vector read from a profile as of a decision's event time.

Fixed indices (not dicts) keep scoring cheap and let a model's parameters be a plain list. The vector
is computed from the profile *as of* ``now_ms`` only, and the decision stores it, so the label that
arrives later is joined with exactly what the model saw: no post-decision information leaks in.
Heavy-tailed quantities are log-compressed so one linear model and one distance metric can use them.
"""

from __future__ import annotations

import math

from stream_app.core.profile import DAY_MS, HOUR_MS, TYPE_INDEX, Profile, ProfileParams, local_hour

FEATURE_NAMES: tuple[str, ...] = (
    "log_clicks", "log_likes", "log_payments",
    "log_rate_6h", "log_rate_14d",
    "log_hours_since_click", "log_hours_since_like", "log_hours_since_payment",
    "log_spend_total", "log_aov", "log_spend_30d",
    "pushes_24h", "log_hours_since_push",
    "hour_sin", "hour_cos", "active_hour_share",
    "top_category_share", "log_days_known",
)  # fmt: skip
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
    params = params or ProfileParams()
    c = profile.counts
    last_push = max(profile.last_push_ms.values(), default=-1)
    hour = local_hour(now_ms, profile.tz_offset_min)
    angle = 2 * math.pi * hour / 24
    total_hours = sum(profile.hours)
    total_cat = sum(profile.categories.values())
    return [
        math.log1p(c[TYPE_INDEX["click"]]),
        math.log1p(c[TYPE_INDEX["like"]]),
        math.log1p(c[TYPE_INDEX["payment"]]),
        math.log1p(profile.decayed(profile.rate_short, params.short_half_life_ms, now_ms)),
        math.log1p(profile.decayed(profile.rate_long, params.long_half_life_ms, now_ms)),
        _log_hours(now_ms, profile.last_type_ms[TYPE_INDEX["click"]]),
        _log_hours(now_ms, profile.last_type_ms[TYPE_INDEX["like"]]),
        _log_hours(now_ms, profile.last_type_ms[TYPE_INDEX["payment"]]),
        math.log1p(profile.spend_total),
        math.log1p(profile.average_order_value),
        math.log1p(profile.decayed(profile.spend_decayed, params.spend_half_life_ms, now_ms)),
        float(profile.pushes_in_window(now_ms, params.push_window_ms)),
        _log_hours(now_ms, last_push),
        math.sin(angle),
        math.cos(angle),
        profile.hours[hour] / total_hours if total_hours else 0.0,
        max(profile.categories.values()) / total_cat if total_cat else 0.0,
        math.log1p(max(now_ms - profile.first_ms, 0) / DAY_MS),
    ]
