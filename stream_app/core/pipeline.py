"""The step functions of the targeting pipeline: one user's state, one event (or one tick of event time).

``process(state, event, models, config) -> (state, Outputs)`` is what a Faust agent, the replay
command and the tests all call. ``tick(state, now_ms, models, config)`` advances event time for users
who send nothing: it closes label windows (negative labels), fires win-back decisions for lapsed users,
and expires profiles past their TTL. ``now_ms`` for ticks is a watermark of event time (the newest event
time seen), never the wall clock, so a replay of the same events gives the same decisions and labels.

Labels are joined here, per user, with no shared state: a decision stores the features the model saw;
a later payment (any campaign's conversion) or a click carrying the decision's ``push_id`` inside the
attribution window makes it positive; the window closing on event time makes it negative.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from stream_app.core.events import Event
from stream_app.core.features import extract_features, extract_traits
from stream_app.core.policy import (
    LAPSE,
    Campaign,
    Decision,
    Guardrails,
    choose,
    decide,
    ineligibility,
    record_push,
    rules_hold,
    send_time,
    uniform,
)  # fmt: skip
from stream_app.core.profile import DAY_MS, Profile, ProfileParams, is_expired, update_profile
from stream_app.core.propensity import PropensityScorer
from stream_app.core.segments import SegmentModel
from stream_app.core.uplift import UpliftScorer


@dataclass(frozen=True)
class Config:
    campaigns: tuple[Campaign, ...]
    guardrails: Guardrails = field(default_factory=Guardrails)
    profile: ProfileParams = field(default_factory=ProfileParams)
    profile_ttl_ms: int = 90 * DAY_MS
    consent_retention_ms: int | None = None  # an opt-out outlives the profile: for ever (None) or this long
    max_pending: int = 8  # open label windows kept per user; the oldest is closed early if exceeded
    segment_sample_rate: float = 0.25  # share of users' active days whose traits train the segments

    # cached: read on every decision or update, and the config never changes
    @cached_property
    def priorities(self) -> dict[str, int]:
        return {c.name: c.priority for c in self.campaigns}

    @cached_property
    def triggered_by(self) -> dict[str, tuple[Campaign, ...]]:
        """The campaigns each trigger (an event type, or ``LAPSE``) triggers, in configuration order."""
        triggers = {t for c in self.campaigns for t in c.triggers}
        return {t: tuple(c for c in self.campaigns if t in c.triggers) for t in triggers}

    @cached_property
    def lapse_after_ms(self) -> tuple[int, ...]:
        """The quiet periods after which the win-back (``LAPSE``) campaigns decide."""
        return tuple(c.lapse_after_ms for c in self.campaigns if LAPSE in c.triggers)


@dataclass(frozen=True)
class Models:
    """The model versions every worker scores with (replaced as a whole when a new version arrives)."""

    segments: SegmentModel
    scorers: dict[str, PropensityScorer]  # by campaign: P(convert | pushed) (all labels in propensity mode)
    controls: dict[str, PropensityScorer] = field(default_factory=dict)  # unused since the uplift learner (kept
    # for workers that still receive an old trainer's control:<campaign> versions)
    uplifts: dict[str, UpliftScorer] = field(default_factory=dict)  # uplift campaigns: the uplift model

    def scorer(self, campaign: Campaign) -> PropensityScorer:
        s = self.scorers.get(campaign.name)
        return s if s is not None else PropensityScorer.cold(campaign.name, campaign.prior, campaign.min_labels)

    def uplift(self, campaign: Campaign) -> UpliftScorer | None:
        """The uplift model of an uplift campaign (cold until published); None in propensity mode."""
        if campaign.mode != "uplift":
            return None
        s = self.uplifts.get(campaign.name)
        return s if s is not None else UpliftScorer.cold(campaign.name, campaign.min_labels)

    def for_decision(self, user_id: str, trigger: str) -> Models:
        """The models that decide for this user and trigger: these. (A verifier's subclass picks, per decision,
        the versions a worker recorded, to replay each decision with the models that made it.)"""
        return self


@dataclass(frozen=True)
class Pending:
    """A decision waiting for its outcome (push or holdout)."""

    decision_id: str
    campaign: str
    action: str
    decided_at_ms: int
    closes_at_ms: int
    features: tuple[float, ...]
    model_version: int
    probability: float
    segment: int


@dataclass(frozen=True)
class Label:
    decision_id: str
    campaign: str
    action: str  # push | holdout: uplift compares the two
    converted: bool
    features: tuple[float, ...]
    model_version: int
    probability: float
    segment: int
    decided_at_ms: int
    labelled_at_ms: int  # event time of the outcome, or of the window's close
    attributed: bool = False  # converted through the push: a click carrying its push_id came first

    @property
    def delay_ms(self) -> int:
        return self.labelled_at_ms - self.decided_at_ms


@dataclass
class UserState:
    profile: Profile | None  # None: consent is known but no event yet
    opted_out: bool = False
    pending: list[Pending] = field(default_factory=list)
    lapse_done_ms: int = -1  # last_ms of the quiet period that already got its win-back decision
    consent_ms: int = -1  # time of the last consent command, or of the last event when the profile expired

    def to_dict(self) -> dict[str, Any]:
        d = {
            "p": self.profile.to_dict() if self.profile else None, "o": self.opted_out, "l": self.lapse_done_ms,
            "q": [[x.decision_id, x.campaign, x.action, x.decided_at_ms, x.closes_at_ms, list(x.features),
                   x.model_version, x.probability, x.segment] for x in self.pending],
        }  # fmt: skip
        if self.consent_ms != -1:
            d["c"] = self.consent_ms
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UserState:
        pending = [Pending(q[0], q[1], q[2], q[3], q[4], tuple(q[5]), q[6], q[7], q[8]) for q in d["q"]]
        return cls(Profile.from_dict(d["p"]) if d["p"] else None, d["o"], pending, d["l"], d.get("c", -1))


@dataclass
class Outputs:
    duplicate: bool = False
    decisions: list[Decision] = field(default_factory=list)
    labels: list[Label] = field(default_factory=list)
    segment_sample: tuple[float, ...] | None = None  # traits to learn segments from (a sampled event)
    ineligible: list[str] = field(default_factory=list)  # campaigns triggered but not targeting the user
    expired: bool = False  # the state should be deleted


def process(state: UserState | None, event: Event, models: Models, config: Config) -> tuple[UserState | None, Outputs]:
    """Apply one event for its user: profile, labels, segment, decisions."""
    out = Outputs()
    profile, applied = update_profile(state.profile if state else None, event, config.profile)
    if not applied:
        out.duplicate = True
        return state, out
    new = UserState(profile, state.opted_out if state else False, list(state.pending) if state else [],
                    state.lapse_done_ms if state else -1, state.consent_ms if state else -1)  # fmt: skip
    now = event.ts_ms
    _close_windows(new, now, out, event)
    traits = None
    if _samples_day(state, event, config.segment_sample_rate):
        traits = extract_traits(profile, now, config.profile)
        out.segment_sample = tuple([round(v, 4) if v else v for v in traits])  # most category buckets are 0.0
    triggered = config.triggered_by.get(event.type)
    if triggered:
        features = extract_features(profile, now, config.profile)
        _decide(new, triggered, features, now, event.event_id, event.user_id, models, config, out, traits)
    return new, out


def _samples_day(state: UserState | None, event: Event, rate: float) -> bool:
    """Whether this event's traits train the segments: the first event of a chosen share of each user's active
    days (UTC, event time). Per user-day, not per event, so a heavy user does not weigh more than a light one
    in what segments learn; chosen by a hash of user and day, so a replay samples the same."""
    day = event.ts_ms // DAY_MS
    first = state is None or state.profile is None or state.profile.last_ms // DAY_MS < day
    return first and uniform("segment_sample", event.user_id, str(day)) < rate


def tick(
    state: UserState, user_id: str, now_ms: int, models: Models, config: Config
) -> tuple[UserState | None, Outputs]:
    """Advance event time to ``now_ms`` for a user who may have sent nothing.

    At the profile's TTL the profile goes (and with it every trace of what the user did), but an opt-out
    stays: the user's next event, 90 days or years later, must still get no push. It is kept for ever, or
    ``config.consent_retention_ms`` after the later of the user's last event and last consent command.
    """
    out = Outputs()
    if state.profile is None:
        retention = config.consent_retention_ms
        if state.opted_out and retention is not None and now_ms > state.consent_ms + retention:
            out.expired = True
            return None, out
        return state, out
    if is_expired(state.profile, now_ms, config.profile_ttl_ms):
        out.expired = True
        for p in state.pending:
            out.labels.append(_label(p, False, p.closes_at_ms))
        if state.opted_out:
            return tick(UserState(None, True, [], -1, max(state.consent_ms, state.profile.last_ms)), user_id,
                        now_ms, models, config)  # fmt: skip
        return None, out
    new = UserState(state.profile, state.opted_out, list(state.pending), state.lapse_done_ms, state.consent_ms)
    _close_windows(new, now_ms, out, None)
    quiet_since = new.profile.last_ms
    lapsed = [c for c in config.campaigns if LAPSE in c.triggers and now_ms - quiet_since >= c.lapse_after_ms]
    if lapsed and new.lapse_done_ms != quiet_since:
        new.lapse_done_ms = quiet_since  # one win-back decision per quiet period
        features = extract_features(new.profile, now_ms, config.profile)
        trigger = f"lapse:{quiet_since}"
        _decide(new, lapsed, features, now_ms, trigger, user_id, models, config, out)
    return new, out


def next_due_ms(state: UserState, config: Config) -> int | None:
    """The earliest event time at which ``tick`` would do something for this user (None: never).

    A label window closing, the quiet period reaching a win-back campaign's lapse, or the profile's TTL.
    """
    if state.profile is None:
        return _consent_due(state.opted_out, state.consent_ms, config)
    return _due(state.profile.last_ms, state.lapse_done_ms, [p.closes_at_ms for p in state.pending], config)


def _consent_due(opted_out: bool, consent_ms: int, config: Config) -> int | None:
    """When a profile-less opt-out record expires (None: it is kept for ever)."""
    if not opted_out or config.consent_retention_ms is None:
        return None
    return consent_ms + config.consent_retention_ms + 1


def stored_due_ms(d: dict[str, Any], config: Config) -> int | None:
    """``next_due_ms`` of a stored state (``UserState.to_dict``) without building it: rebuilding the timer
    index after a rebalance reads every user this worker holds."""
    p = d.get("p")
    if not p:
        return _consent_due(d.get("o", False), d.get("c", -1), config)
    return _due(p["l"], d["l"], [q[4] for q in d["q"]], config)


def _due(last_ms: int, lapse_done_ms: int, closes: list[int], config: Config) -> int:
    due = last_ms + config.profile_ttl_ms + 1  # the profile expires
    if closes:
        due = min(due, min(closes) + 1)  # a label window closes
    if lapse_done_ms != last_ms and config.lapse_after_ms:
        due = min(due, last_ms + min(config.lapse_after_ms))  # a quiet period reaches a win-back campaign's lapse
    return due


def advance(
    state: UserState, user_id: str, watermark_ms: int, models: Models, config: Config
) -> tuple[UserState | None, Outputs]:
    """Fire every timer of this user due at or before the watermark, each at its own due time.

    Running a timer at its due time (not at the watermark) makes the outputs independent of when the
    watermark happened to pass it: Kafka partitions and a replay of one file give the same decisions.
    """
    total = Outputs()
    current: UserState | None = state
    while current is not None and (due := next_due_ms(current, config)) is not None and due <= watermark_ms:
        current, out = tick(current, user_id, due, models, config)
        total.decisions += out.decisions
        total.labels += out.labels
        total.ineligible += out.ineligible
        total.expired = total.expired or out.expired
    return current, total


def set_consent(state: UserState | None, opted_out: bool, at_ms: int = -1) -> UserState | None:
    """Opt-out takes effect at once, also for a user not seen yet; an opt-in re-enables pushes.

    ``at_ms``: when the command was given (its record time), from which a finite consent retention counts.
    An opt-in of a user with no profile leaves nothing to keep (None: delete).

    >>> set_consent(None, opted_out=True).opted_out, set_consent(None, opted_out=False)
    (True, None)
    >>> set_consent(UserState(None, True), opted_out=False) is None
    True
    """
    if state is None or state.profile is None:
        return UserState(None, True, [], -1, at_ms) if opted_out else None
    return UserState(state.profile, opted_out, list(state.pending), state.lapse_done_ms, at_ms)


def _decide(state: UserState, campaigns: Sequence[Campaign], features: list[float], now: int, trigger: str,
            user_id: str, models: Models, config: Config, out: Outputs,
            traits: list[float] | None = None) -> None:  # fmt: skip
    """Decide for the triggered campaigns; ``traits``: the profile's, if the caller already extracted them.

    The segment (traits, then a distance to each centroid) only matters to a campaign whose rules hold, and
    for most triggers none does: it is computed only then (else ``-1``, which nothing reads)."""
    segment = -1
    if any(rules_hold(c, features) for c in campaigns):  # else no campaign is eligible: nothing scores
        models = models.for_decision(user_id, trigger)
        if traits is None:
            traits = extract_traits(state.profile, now, config.profile)
        segment = models.segments.predict_one(traits)
    eligible = []
    for c in campaigns:
        why = ineligibility(c, features, segment)
        if why is None:
            eligible.append(c)
        else:
            out.ineligible.append(c.name)
    decisions = [
        decide(
            user_id=user_id,
            profile=state.profile,
            features=features,
            segment=segment,
            campaign=c,
            scorer=models.scorer(c),
            uplift=models.uplift(c),
            guardrails=config.guardrails,
            trigger_id=trigger,
            now_ms=now,
            opted_out=state.opted_out,
            segment_version=models.segments.version,
        )
        for c in eligible
    ]
    windows = {c.name: c.attribution_window_ms for c in eligible}
    for d in choose(decisions, config.priorities):
        out.decisions.append(d)
        if d.action in ("push", "holdout"):  # a holdout is a virtual push: spaced and capped as pushes are
            state.profile = record_push(state.profile, d, config.profile.max_pushes_kept)
            start = d.send_at_ms or send_time(now, state.profile, config.guardrails)  # a holdout: when it would go
            state.pending.append(Pending(d.decision_id, d.campaign, d.action, start, start + windows[d.campaign],
                                         d.features, d.model_version, d.probability, d.segment))  # fmt: skip
    while len(state.pending) > config.max_pending:
        oldest = state.pending.pop(0)  # closed early as negative; a held push may not have been sent yet
        out.labels.append(_label(oldest, False, max(now, oldest.decided_at_ms)))


def _close_windows(state: UserState, now: int, out: Outputs, event: Event | None) -> None:
    """Resolve pending decisions: positive on a conversion inside the window, negative once it closed."""
    keep = []
    for p in state.pending:
        converts = (
            event is not None
            and p.decided_at_ms <= event.ts_ms <= p.closes_at_ms
            and (event.type == "payment" or event.push_id == p.decision_id)
        )
        if converts:
            out.labels.append(_label(p, True, event.ts_ms, event.push_id == p.decision_id))
        elif now > p.closes_at_ms:
            out.labels.append(_label(p, False, p.closes_at_ms))
        else:
            keep.append(p)
    state.pending = keep


def _label(p: Pending, converted: bool, at: int, attributed: bool = False) -> Label:
    return Label(p.decision_id, p.campaign, p.action, converted, p.features, p.model_version, p.probability,
                 p.segment, p.decided_at_ms, at, attributed)  # fmt: skip
