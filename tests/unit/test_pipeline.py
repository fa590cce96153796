"""The pipeline's step functions, through the scenarios a marketer cares about (no Kafka)."""

from dataclasses import replace

import orjson

from stream_app.campaigns import load_campaigns
from stream_app.core.events import Event
from stream_app.core.features import TRAIT_NAMES
from stream_app.core.pipeline import Config, Models, UserState, process, set_consent, tick
from stream_app.core.profile import DAY_MS, HOUR_MS
from stream_app.core.propensity import PropensityScorer
from stream_app.core.segments import SegmentModel

CAMPAIGNS, GUARDRAILS = load_campaigns()
CONFIG = Config(
    campaigns=tuple(replace(c, holdout_share=0.0, exploration_share=0.0) for c in CAMPAIGNS), guardrails=GUARDRAILS
)
NOON = 10 * DAY_MS + 12 * HOUR_MS


def confident(campaign: str) -> PropensityScorer:
    return replace(PropensityScorer.cold(campaign), intercept=2.0, n_labels=10_000, min_labels=10, version=3)


MODELS = Models(SegmentModel(k=3), {c.name: confident(c.name) for c in CAMPAIGNS})


def feed(events, state=None, models=MODELS, config=CONFIG):
    outs = []
    for e in events:
        state, out = process(state, e, models, config)
        outs.append(out)
    return state, outs


def clicks(user="u", n=4, start=NOON, tz=0):
    return [
        Event(f"{user}-c{i}", "click", user, start + i * 60_000, tz_offset_min=tz, category="shoes") for i in range(n)
    ]


def decisions(outs, campaign=None):
    return [d for o in outs for d in o.decisions if campaign is None or d.campaign == campaign]


def test_an_abandoning_user_gets_one_cart_push_with_reasons():
    state, outs = feed(clicks(n=5))
    pushes = [d for d in decisions(outs, "cart_abandonment") if d.action == "push"]
    assert len(pushes) == 1  # later clicks are stopped by the campaign cooldown / min gap
    d = pushes[0]
    assert d.trigger_event_id == "u-c2"  # the third click makes "clicks >= 3" true
    assert "eligible:clicks>=3,hours_since_payment>=24" in d.reasons and d.model_version == 3
    assert len(d.contributions) == 3 and d.send_at_ms == NOON + 2 * 60_000
    suppressed = [d for d in decisions(outs, "cart_abandonment")[3:]]
    assert all(d.action == "suppress" for d in suppressed)
    assert state.pending and state.pending[0].decision_id == d.decision_id


def test_an_opted_out_user_never_gets_a_push():
    state, _ = feed(clicks(n=1))
    state = set_consent(state, opted_out=True)
    state, outs = feed(clicks(n=6, start=NOON + HOUR_MS)[1:], state)
    assert decisions(outs) and all(d.action == "suppress" for d in decisions(outs))
    assert all("suppress:opted_out" in d.reasons for d in decisions(outs))


def test_a_quiet_hours_user_gets_a_send_at_in_the_morning():
    night = 10 * DAY_MS + 23 * HOUR_MS  # 23:00 UTC = 07:00 next day in UTC+8, still quiet until 08:00
    _, outs = feed(clicks(n=3, start=night, tz=480))
    (push,) = [d for d in decisions(outs) if d.action == "push"]
    assert "hold:quiet_hours" in push.reasons
    assert push.send_at_ms == 11 * DAY_MS  # 00:00 UTC = 08:00 local
    assert push.expires_at_ms == push.send_at_ms + GUARDRAILS.decision_ttl_ms


def test_a_lapsing_buyer_gets_a_winback_without_sending_an_event():
    pay = Event("p1", "payment", "u", NOON, amount=30.0, category="shoes")
    state, _ = feed([pay])
    state, early = tick(state, "u", NOON + 6 * DAY_MS, MODELS, CONFIG)
    assert not decisions([early], "winback")
    state, out = tick(state, "u", NOON + 7 * DAY_MS, MODELS, CONFIG)
    (d,) = decisions([out], "winback")
    assert d.action == "push" and d.trigger_event_id == f"lapse:{NOON}"
    _, again = tick(state, "u", NOON + 8 * DAY_MS, MODELS, CONFIG)
    assert not decisions([again], "winback")  # one win-back per quiet period


def test_a_payment_after_a_push_is_a_positive_label_and_silence_a_negative_one():
    state, outs = feed(clicks(n=3))
    (push,) = [d for d in decisions(outs) if d.action == "push"]
    state, outs = feed([Event("pay", "payment", "u", NOON + HOUR_MS, amount=12.0, push_id=push.decision_id)], state)
    (label,) = [lb for o in outs for lb in o.labels]
    assert label.converted and label.decision_id == push.decision_id and label.campaign == "cart_abandonment"
    assert label.features == push.features and label.delay_ms == HOUR_MS - 2 * 60_000

    other, outs = feed(clicks(user="v", n=3))
    _, out = tick(other, "v", NOON + 3 * DAY_MS, MODELS, CONFIG)
    (neg,) = out.labels
    assert not neg.converted and neg.labelled_at_ms == neg.decided_at_ms + DAY_MS


def test_a_held_out_user_is_spaced_and_labelled_like_a_pushed_one():
    held = replace(CONFIG, campaigns=tuple(replace(c, holdout_share=1.0) for c in CONFIG.campaigns))
    night = 10 * DAY_MS + 23 * HOUR_MS  # quiet hours: the withheld push would have gone out in the morning
    state, outs = feed(clicks(n=5, start=night, tz=480), config=held)
    (h,) = [d for d in decisions(outs, "cart_abandonment") if d.action == "holdout"]
    assert h.send_at_ms is None and state.profile.pushes_in_window(night + HOUR_MS) == 1  # a virtual push
    (p,) = state.pending
    assert p.action == "holdout" and p.decided_at_ms == 11 * DAY_MS  # the label window starts when a push would land


def test_redelivered_events_change_nothing_and_replays_decide_identically():
    events = [*clicks(n=4), Event("pay", "payment", "u", NOON + HOUR_MS, amount=5.0)]
    s1, o1 = feed(events)
    s2, o2 = feed([*events, *events[:3]])
    assert orjson.dumps(s1.to_dict()) == orjson.dumps(s2.to_dict())
    assert all(o.duplicate for o in o2[len(events) :])
    assert [d.decision_id for d in decisions(o1)] == [d.decision_id for d in decisions(o2)]
    assert UserState.from_dict(orjson.loads(orjson.dumps(s1.to_dict()))).to_dict() == s1.to_dict()


def test_state_expires_after_the_ttl_of_event_time():
    state, _ = feed(clicks(n=1))
    assert tick(state, "u", NOON + CONFIG.profile_ttl_ms, MODELS, CONFIG)[0] is not None
    gone, out = tick(state, "u", NOON + CONFIG.profile_ttl_ms + 1, MODELS, CONFIG)
    assert gone is None and out.expired


def test_the_due_time_of_a_stored_state_equals_that_of_the_state():
    """The timer index is rebuilt from stored JSON without building states: both ways must agree."""
    from stream_app.core.pipeline import next_due_ms, stored_due_ms

    buyer = [Event("p1", "payment", "u", NOON - DAY_MS, amount=20.0, category="shoes"), *clicks()]
    for events in (clicks(n=1), clicks(), buyer):
        state, _ = feed(events)
        for s in (state, tick(state, "u", NOON + 8 * DAY_MS, MODELS, CONFIG)[0]):
            if s is not None:
                stored = orjson.loads(orjson.dumps(s.to_dict()))
                assert stored_due_ms(stored, CONFIG) == next_due_ms(s, CONFIG) is not None
    assert stored_due_ms(set_consent(None, opted_out=True).to_dict(), CONFIG) is None


def test_segments_learn_from_one_sample_per_chosen_user_day_however_busy_the_user():
    config = replace(CONFIG, segment_sample_rate=0.5)
    samples = {}
    for user, per_day in (("busy", 40), ("calm", 1)):
        events = [Event(f"{user}-{d}-{i}", "like", user, d * DAY_MS + HOUR_MS + i * 60_000, category="books")
                  for d in range(200) for i in range(per_day)]  # fmt: skip
        _, outs = feed(events, config=config)
        samples[user] = [(e.ts_ms // DAY_MS, o.segment_sample) for e, o in zip(events, outs, strict=True)
                         if o.segment_sample is not None]  # fmt: skip
        days = [d for d, _ in samples[user]]
        assert len(days) == len(set(days))  # at most one sample per user-day: the day's first event
        assert all(len(s) == len(TRAIT_NAMES) for _, s in samples[user])
    assert 70 <= len(samples["busy"]) <= 130 and 70 <= len(samples["calm"]) <= 130  # ~half of 200 days each
    _, again = feed([Event("calm-0-0", "like", "calm", HOUR_MS, category="books")], config=config)
    assert (again[0].segment_sample is not None) == (samples["calm"][0][0] == 0)  # the same draw on replay
