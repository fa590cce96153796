"""Campaigns, guardrails and the push decision: who gets which push, when, and why.

Everything here is a pure function of (profile, features, models, campaign, trigger, event time). The
only randomness, holdout assignment and exploration, comes from hashes of stable ids, so the same
input always gives the same decision and the same ``decision_id`` (a push service can drop replays),
and every decision records the probability with which its action was chosen (for off-policy evaluation).

Order of checks, each recorded as a reason code (eligibility comes first, in ``ineligibility``):
consent -> score vs threshold (or exploration) -> per-campaign cooldown -> global frequency cap and minimum
gap -> quiet hours (hold with ``send_at`` or drop) -> holdout. A holdout is a push that would have been sent,
withheld: holdout users pass exactly the checks pushed users pass, and the pipeline records a *virtual push*
for them (cooldowns and caps then space their decisions as pushes are spaced), so the two arms compare like
with like. (Deciding holdout first, as a first version did, labelled every eligible trigger of a holdout
user: heavy browsers weighed more in the control arm and the measured uplift came out biased.)
``choose`` keeps at most one push per trigger: the highest-priority campaign that would push (or hold out).
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from stream_app.core.features import INDEX, feature_dict
from stream_app.core.profile import HOUR_MS, Profile, copy_profile, local_hour
from stream_app.core.propensity import PropensityScorer
from stream_app.core.uplift import UpliftScorer

OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq, "!=": operator.ne,
}  # fmt: skip
LAPSE = "lapse"  # the trigger of win-back decisions: a timer on event time, not an event


@dataclass(frozen=True)
class Rule:
    feature: str
    op: str
    value: float
    label: str = ""  # how the campaign author wrote it, for reason codes

    def holds(self, x: Sequence[float]) -> bool:
        return OPS[self.op](x[INDEX[self.feature]], self.value)

    def __str__(self) -> str:
        return self.label or f"{self.feature}{self.op}{self.value:g}"


@dataclass(frozen=True)
class Campaign:
    name: str
    triggers: tuple[str, ...]  # event types, or LAPSE
    priority: int = 0
    eligibility: tuple[Rule, ...] = ()
    segments: tuple[int, ...] = ()  # empty: every segment
    attribution_window_ms: int = 24 * HOUR_MS
    threshold: float = 0.05
    cooldown_ms: int = 72 * HOUR_MS
    holdout_share: float = 0.1
    exploration_share: float = 0.05
    cold_start_share: float = 0.3  # push share before the model has min_labels labels (to earn them)
    lapse_after_ms: int = 7 * 24 * HOUR_MS  # LAPSE campaigns: quiet this long triggers a decision
    prior: float = 0.02
    min_labels: int = 200
    mode: str = "propensity"  # or "uplift": target by P(convert | push) - P(convert | no push)

    @cached_property
    def eligible_reason(self) -> str:
        """The first reason of every decision the campaign makes past consent: its rules, as written."""
        return "eligible:" + (",".join(map(str, self.eligibility)) or "all")


@dataclass(frozen=True)
class Guardrails:
    max_pushes_24h: int = 2
    min_gap_ms: int = 4 * HOUR_MS
    quiet_start_hour: int = 22  # local time, inclusive
    quiet_end_hour: int = 8  # local time, exclusive
    quiet_mode: str = "hold"  # "hold": send at the next allowed time; "drop": suppress
    quiet_send_at: str = "end"  # hold: "end" of quiet hours, or the user's most "active_hour" after it (send_time)
    decision_ttl_ms: int = 12 * HOUR_MS  # a push not sent by send_at + ttl is stale


@dataclass(frozen=True)
class Decision:
    decision_id: str
    user_id: str
    campaign: str
    action: str  # push | holdout | suppress
    score: float
    segment: int
    model_version: int
    probability: float  # probability with which this action was chosen
    decided_at_ms: int
    send_at_ms: int | None
    expires_at_ms: int | None
    trigger_event_id: str
    reasons: tuple[str, ...]
    contributions: tuple[tuple[str, float], ...] = ()
    features: tuple[float, ...] = field(default=(), repr=False)  # what the model saw, for the label join
    segment_version: int = 0  # version of the segment model that assigned ``segment`` (0: none published yet)


def decision_id(campaign: str, user_id: str, trigger_id: str) -> str:
    """Deterministic: the same campaign, user and trigger always give the same id.

    >>> decision_id("cart", "u1", "e9") == decision_id("cart", "u1", "e9") != decision_id("cart", "u1", "e10")
    True
    """
    return hashlib.blake2b(f"{campaign}\x1f{user_id}\x1f{trigger_id}".encode(), digest_size=12).hexdigest()


def uniform(*parts: str) -> float:
    """A reproducible U[0, 1) draw from stable ids (replaces an RNG so replays decide the same)."""
    h = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def in_holdout(user_id: str, campaign: Campaign) -> bool:
    return uniform("holdout", campaign.name, user_id) < campaign.holdout_share


def next_allowed_ms(now_ms: int, tz_offset_min: int | None, g: Guardrails) -> int:
    """``now_ms`` if outside quiet hours, else the end of the quiet period in the user's local time.

    >>> g = Guardrails(quiet_start_hour=22, quiet_end_hour=8)
    >>> next_allowed_ms(23 * HOUR_MS, 0, g) == 32 * HOUR_MS, next_allowed_ms(12 * HOUR_MS, 0, g) == 12 * HOUR_MS
    (True, True)
    """
    hour = local_hour(now_ms, tz_offset_min)
    start, end = g.quiet_start_hour, g.quiet_end_hour
    quiet = (start <= hour or hour < end) if start > end else (start <= hour < end)
    if not quiet:
        return now_ms
    offset = (tz_offset_min or 0) * 60_000
    local = now_ms + offset
    day_start = local - local % (24 * HOUR_MS)
    end_today = day_start + end * HOUR_MS
    target = end_today if local < end_today else end_today + 24 * HOUR_MS
    return target - offset


def send_time(now_ms: int, profile: Profile, g: Guardrails) -> int:
    """When a push decided at ``now_ms`` goes out: now outside quiet hours; held, at the end of the quiet period
    (``quiet_send_at="end"``) or at the user's most active local hour among the next hours that are allowed and
    within ``decision_ttl`` of that end (``"active_hour"``: the profile's decayed histogram of active hours, the
    local hour of the user's last click on a push counting as much as their busiest hour; ties: the earliest).

    >>> from stream_app.core.events import Event
    >>> from stream_app.core.profile import update_profile
    >>> p, _ = update_profile(None, Event("e1", "click", "u", 19 * HOUR_MS, tz_offset_min=0))
    >>> g = Guardrails(quiet_send_at="active_hour")
    >>> (send_time(23 * HOUR_MS, p, g) - 24 * HOUR_MS) // HOUR_MS  # active at 19:00: held until 19:00 next day
    19
    >>> (send_time(23 * HOUR_MS, p, Guardrails()) - 24 * HOUR_MS) // HOUR_MS  # default: the end of quiet hours
    8
    """
    start = next_allowed_ms(now_ms, profile.tz_offset_min, g)
    if start == now_ms or g.quiet_send_at != "active_hour":
        return start
    allowed = (g.quiet_start_hour - g.quiet_end_hour) % 24 or 24
    span = min(allowed, max(g.decision_ttl_ms // HOUR_MS, 1))
    hours = profile.hours
    weight = list(hours)
    if profile.last_push_click_ms >= 0:
        weight[local_hour(profile.last_push_click_ms, profile.tz_offset_min)] += max(hours, default=0.0) or 1.0
    first = local_hour(start, profile.tz_offset_min)
    best = max(range(span), key=lambda k: (weight[(first + k) % 24], -k))
    return start + best * HOUR_MS if weight[(first + best) % 24] > 0 else start


def rules_hold(campaign: Campaign, features: Sequence[float]) -> bool:
    """Whether every eligibility rule of the campaign holds (its segments aside): ``ineligibility`` then depends on
    the segment only, which is worth computing only for such a campaign."""
    return all(rule.holds(features) for rule in campaign.eligibility)


def ineligibility(campaign: Campaign, features: Sequence[float], segment: int) -> str | None:
    """Why the campaign does not target this user now (None: it does). Ineligible users get no decision,
    only a counter: eligibility defines the campaign's audience, and auditing every non-member would
    write a record for nearly every event."""
    for rule in campaign.eligibility:
        if not rule.holds(features):
            return f"rule:{rule}"
    if campaign.segments and segment not in campaign.segments:
        return "segment"
    return None


def decide(
    *,
    user_id: str,
    profile: Profile,
    features: Sequence[float],
    segment: int,
    campaign: Campaign,
    scorer: PropensityScorer,
    guardrails: Guardrails,
    trigger_id: str,
    now_ms: int,
    opted_out: bool = False,
    uplift: UpliftScorer | None = None,
    segment_version: int = 0,
) -> Decision:
    """One campaign's decision for one user and trigger; the caller has checked ``ineligibility``.

    In uplift mode (``uplift`` given) the score is the estimated uplift of pushing now (``core/uplift.py``: the
    attributed response learned from pushed labels plus the transformed-outcome residual learned from pushed and
    holdout labels) on the features and the user's segment; it targets once the model has ``min_labels`` pushed
    labels, and the decision records the uplift model's version.
    """
    did = decision_id(campaign.name, user_id, trigger_id)
    if uplift is not None:
        score = min(max(uplift.predict_uplift_one(feature_dict(features, segment)), -1.0), 1.0)
        warm, version, n_labels = uplift.is_warm, uplift.version, uplift.n_treated
    else:
        score = scorer.predict_one(features)
        warm, version, n_labels = scorer.is_warm, scorer.version, scorer.n_labels
    reasons: list[str] = []

    def out(action: str, probability: float, send_at: int | None = None) -> Decision:
        expires = None if send_at is None else send_at + guardrails.decision_ttl_ms
        return Decision(did, user_id, campaign.name, action, round(score, 6), segment, version,
                        round(probability, 6), now_ms, send_at, expires, trigger_id, tuple(reasons),
                        tuple(scorer.contributions(features)), tuple(features), segment_version)  # fmt: skip

    if opted_out:
        reasons.append("suppress:opted_out")
        return out("suppress", 1.0)
    reasons.append(campaign.eligible_reason)

    explore = campaign.exploration_share
    if not warm:
        reasons.append(f"cold_start:{n_labels}_labels")
        explore = max(explore, campaign.cold_start_share)  # labels come only from pushes and holdouts
    if score >= campaign.threshold and warm:
        reasons.append(f"score>={campaign.threshold:g}")
        probability = 1.0
    elif uniform("explore", did) < explore:
        reasons.append(f"explore:{explore:g}")
        probability = explore
    else:
        reasons.append(f"suppress:score<{campaign.threshold:g}")
        return out("suppress", 1.0 - explore)

    last = profile.last_push_ms.get(campaign.name)
    if last is not None and now_ms - last < campaign.cooldown_ms:
        reasons.append("suppress:campaign_cooldown")
        return out("suppress", probability)
    if profile.pushes_in_window(now_ms) >= guardrails.max_pushes_24h:
        reasons.append(f"suppress:frequency_cap_{guardrails.max_pushes_24h}_per_24h")
        return out("suppress", probability)
    last_any = max(profile.push_times, default=None)
    if last_any is not None and now_ms - last_any < guardrails.min_gap_ms:
        reasons.append("suppress:min_gap")
        return out("suppress", probability)
    send_at = send_time(now_ms, profile, guardrails)
    if send_at != now_ms:
        if guardrails.quiet_mode == "drop":
            reasons.append("suppress:quiet_hours")
            return out("suppress", probability)
        reasons.append("hold:quiet_hours")
        moved = send_at != next_allowed_ms(now_ms, profile.tz_offset_min, guardrails)
        reasons.append(HELD_AT[1] if moved else HELD_AT[0])
    if in_holdout(user_id, campaign):
        reasons.append(f"holdout:{campaign.holdout_share:g}")
        return out("holdout", probability)
    return out("push", probability, send_at)


SUPPRESSION_CODES = (
    "opted_out", "below_threshold", "campaign_cooldown", "frequency_cap", "min_gap", "quiet_hours",
    "one_push_per_trigger",
)  # fmt: skip


def suppression_code(decision: Decision) -> str | None:
    """The bounded code of what suppressed a decision (for metrics); None if it was not suppressed.

    The last ``suppress:`` reason wins: a push demoted by ``choose`` has passed every earlier rule.

    >>> d = Decision("id", "u", "c", "suppress", 0.1, 0, 0, 1.0, 0, None, None, "e", ("suppress:score<0.2",), (), ())
    >>> suppression_code(d)
    'below_threshold'
    """
    return suppression_code_of(decision.action, decision.reasons)


def suppression_code_of(action: str, reasons: Sequence[str]) -> str | None:
    """``suppression_code`` of a decision read back from the audit topic (its action and reasons).

    >>> suppression_code_of("suppress", ["eligible:clicks>=3", "explore:0.3", "suppress:min_gap"])
    'min_gap'
    >>> suppression_code_of("push", ["eligible:clicks>=3", "score>=0.08"]) is None
    True
    """
    if action != "suppress":
        return None
    reason = next((r for r in reversed(reasons) if r.startswith("suppress:")), "suppress:")[9:]
    if reason.startswith("score<"):
        return "below_threshold"
    return next((c for c in SUPPRESSION_CODES if reason.startswith(c)), "other")


HELD_AT = ("send_at:quiet_end", "send_at:active_hour")  # a held push's send time: the end of quiet hours, or later


def held_at(decision: Decision) -> str | None:
    """The bounded send-time code of a held push (for metrics): ``quiet_end``, or ``active_hour`` when the
    user's learned hour (``send_time``) moved it past the end of quiet hours; None for any other decision.

    >>> d = Decision("id", "u", "c", "push", 0.3, 0, 0, 1.0, 0, 9, 99, "e", ("hold:quiet_hours", HELD_AT[1]), (), ())
    >>> held_at(d)
    'active_hour'
    """
    if decision.action != "push":
        return None
    return next((r[8:] for r in decision.reasons if r in HELD_AT), None)


def choose(decisions: Sequence[Decision], priorities: dict[str, int]) -> list[Decision]:
    """At most one push per trigger: keep the highest-priority push (or holdout: a push withheld), turn the
    other pushes and holdouts into suppressions."""
    pushes = sorted((d for d in decisions if d.action in ("push", "holdout")),
                    key=lambda d: (-priorities[d.campaign], d.campaign))  # fmt: skip
    if len(pushes) <= 1:
        return list(decisions)
    winner = pushes[0]
    result = []
    for d in decisions:
        if d.action in ("push", "holdout") and d is not winner:
            d = Decision(**{**d.__dict__, "action": "suppress",
                            "reasons": (*d.reasons, f"suppress:one_push_per_trigger:{winner.campaign}"),
                            "send_at_ms": None, "expires_at_ms": None})  # fmt: skip
        result.append(d)
    return result


def record_push(profile: Profile, decision: Decision, max_kept: int = 16) -> Profile:
    """The profile after a push was decided (pure: returns a new profile)."""
    p = copy_profile(profile)
    at = decision.send_at_ms or decision.decided_at_ms
    p.last_push_ms = {**p.last_push_ms, decision.campaign: at}
    p.push_times = [*p.push_times, at][-max_kept:]
    p.n_pushes += 1
    return p
