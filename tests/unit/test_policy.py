from dataclasses import replace
from itertools import pairwise

from hypothesis import given, settings
from hypothesis import strategies as st

from stream_app.core.events import Event
from stream_app.core.features import INDEX, extract_features
from stream_app.core.policy import (
    Campaign,
    Guardrails,
    Rule,
    choose,
    decide,
    decision_id,
    held_at,
    in_holdout,
    ineligibility,
    next_allowed_ms,
    record_push,
)  # fmt: skip
from stream_app.core.profile import DAY_MS, HOUR_MS, update_profile
from stream_app.core.propensity import PropensityScorer

CART = Campaign("cart", ("click",), priority=2, holdout_share=0.0, exploration_share=0.0, cooldown_ms=0,
                threshold=0.05, min_labels=0)  # fmt: skip
G = Guardrails(max_pushes_24h=2, min_gap_ms=HOUR_MS, quiet_start_hour=22, quiet_end_hour=8)


def warm_scorer(score_logit: float = 0.0, campaign: str = "cart") -> PropensityScorer:
    cold = PropensityScorer.cold(campaign, min_labels=0)
    return replace(cold, intercept=score_logit, n_labels=1000, min_labels=10, version=7)


def user(ts: int = 12 * HOUR_MS, tz: int = 0):
    p, _ = update_profile(None, Event("e0", "click", "u", ts, tz_offset_min=tz))
    return p


def run(profile, campaign=CART, scorer=None, now=12 * HOUR_MS, trigger="e1", opted_out=False, g=G, uid="u"):
    return decide(user_id=uid, profile=profile, features=extract_features(profile, now), segment=2,
                  campaign=campaign, scorer=scorer or warm_scorer(), guardrails=g, trigger_id=trigger,
                  now_ms=now, opted_out=opted_out)  # fmt: skip


def test_a_confident_score_pushes_with_reasons_and_explanations():
    d = run(user())
    assert d.action == "push" and d.probability == 1.0 and d.send_at_ms == 12 * HOUR_MS
    trust = 1000 / (1000 + 10)  # a warm model still carries a little of the prior
    assert d.score == round(trust * 0.5 + (1 - trust) * 0.02, 6)
    assert d.model_version == 7 and d.segment == 2
    assert any(r.startswith("score>=") for r in d.reasons)
    assert d.expires_at_ms == d.send_at_ms + G.decision_ttl_ms
    assert d.decision_id == decision_id("cart", "u", "e1") == run(user()).decision_id


def test_opt_out_wins_over_everything():
    d = run(user(), opted_out=True)
    assert d.action == "suppress" and d.reasons == ("suppress:opted_out",)


def test_quiet_hours_hold_until_the_local_morning_or_drop():
    p = user(ts=23 * HOUR_MS, tz=120)  # 23:00 UTC = 01:00 local
    d = run(p, now=23 * HOUR_MS)
    assert d.action == "push" and "hold:quiet_hours" in d.reasons
    assert d.send_at_ms == 30 * HOUR_MS  # 08:00 local (UTC+2) is 06:00 UTC the next day
    assert d.reasons[-1] == "send_at:quiet_end" and held_at(d) == "quiet_end"
    evening = update_profile(p, Event("e9", "click", "u", 17 * HOUR_MS, tz_offset_min=120))[0]  # 19:00 local
    later = run(evening, now=23 * HOUR_MS, g=replace(G, quiet_send_at="active_hour"))
    assert later.send_at_ms == 41 * HOUR_MS and later.reasons[-1] == "send_at:active_hour"  # 19:00 local next day
    assert held_at(later) == "active_hour" and held_at(run(evening)) is None  # not held: no send-time code
    dropped = run(p, now=23 * HOUR_MS, g=replace(G, quiet_mode="drop"))
    assert dropped.action == "suppress" and "suppress:quiet_hours" in dropped.reasons


def test_eligibility_segments_threshold_and_holdout():
    p = user()
    x = extract_features(p, 12 * HOUR_MS)
    assert ineligibility(replace(CART, eligibility=(Rule("log_payments", ">=", 1.0),)), x, 2) == "rule:log_payments>=1"
    assert ineligibility(replace(CART, segments=(0, 1)), x, 2) == "segment"
    assert ineligibility(replace(CART, segments=(2,)), x, 2) is None
    assert run(p, scorer=warm_scorer(-6.0)).reasons[-1] == "suppress:score<0.05"
    everyone_held_out = replace(CART, holdout_share=1.0)
    assert run(p, campaign=everyone_held_out).action == "holdout"


def test_a_holdout_is_a_push_withheld_after_every_check_a_push_passes():
    held = replace(CART, holdout_share=1.0)
    p = user()
    assert run(p, campaign=held, scorer=warm_scorer(-6.0)).action == "suppress"  # below threshold: no label
    pushed = record_push(p, run(p), 8)
    soon = run(pushed, campaign=held, now=12 * HOUR_MS + 60_000, trigger="e2")
    assert soon.action == "suppress" and "suppress:min_gap" in "".join(soon.reasons)  # spaced like pushes
    night = run(user(ts=23 * HOUR_MS, tz=120), campaign=held, now=23 * HOUR_MS)
    assert night.action == "holdout" and night.send_at_ms is None and "hold:quiet_hours" in night.reasons
    assert (
        choose([run(p, campaign=held), run(p, campaign=replace(held, name="other"))], {"cart": 2, "other": 1})[1].action
        == "suppress"
    )  # one push or holdout per trigger


def test_holdout_is_deterministic_and_close_to_its_share():
    c = replace(CART, holdout_share=0.1)
    members = [in_holdout(f"user-{i}", c) for i in range(20_000)]
    assert members == [in_holdout(f"user-{i}", c) for i in range(20_000)]
    assert 0.09 < sum(members) / len(members) < 0.11


def test_exploration_pushes_a_share_of_below_threshold_users_and_logs_its_probability():
    c = replace(CART, exploration_share=0.2)
    ds = [run(user(), campaign=c, scorer=warm_scorer(-6.0), trigger=f"t{i}") for i in range(5000)]
    pushed = [d for d in ds if d.action == "push"]
    assert 0.17 < len(pushed) / len(ds) < 0.23
    assert all(d.probability == 0.2 for d in pushed)
    assert all(d.probability == 0.8 for d in ds if d.action == "suppress")


def test_cold_start_explores_instead_of_trusting_the_prior():
    cold = PropensityScorer.cold("cart", prior=0.01, min_labels=100)
    ds = [run(user(), scorer=cold, trigger=f"t{i}") for i in range(2000)]
    share = sum(d.action == "push" for d in ds) / len(ds)
    assert abs(share - CART.cold_start_share) < 0.04
    assert all(any(r.startswith("cold_start:") for r in d.reasons) for d in ds)


def test_one_push_per_trigger_keeps_the_highest_priority():
    p = user()
    cross = replace(CART, name="cross_sell", priority=5)
    a, b = run(p), run(p, campaign=cross, scorer=warm_scorer(campaign="cross_sell"))
    kept = choose([a, b], {"cart": 2, "cross_sell": 5})
    assert [d.action for d in kept] == ["suppress", "push"]
    assert kept[0].reasons[-1] == "suppress:one_push_per_trigger:cross_sell"


@given(st.lists(st.integers(0, 3 * DAY_MS), min_size=1, max_size=60), st.integers(-600, 600))
@settings(max_examples=150)
def test_frequency_cap_and_min_gap_are_never_exceeded(offsets, tz):
    p = user(ts=0, tz=tz)
    sends = []
    for i, now in enumerate(sorted(offsets)):
        d = run(p, now=now, trigger=f"t{i}", campaign=replace(CART, cooldown_ms=0))
        if d.action == "push":
            p = record_push(p, d)
            sends.append(d.send_at_ms)
    sends.sort()
    for s in sends:
        assert sum(1 for t in sends if s - DAY_MS < t <= s) <= G.max_pushes_24h
    assert all(b - a >= G.min_gap_ms for a, b in pairwise(sends))


def test_next_allowed_time_is_in_the_users_morning():
    for tz in (-480, 0, 330, 600):
        for hour in range(24):
            now = 10 * DAY_MS + hour * HOUR_MS
            t = next_allowed_ms(now, tz, G)
            local_hour = ((t + tz * 60_000) // HOUR_MS) % 24
            assert t >= now and t - now < DAY_MS
            assert 8 <= local_hour < 22


def test_features_index_is_used_by_rules():
    assert Rule("pushes_24h", "<", 1).holds([0.0] * (INDEX["pushes_24h"] + 1) + [0.0] * 20)
