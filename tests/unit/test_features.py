import math

from hypothesis import given
from hypothesis import strategies as st

from stream_app.core.events import EVENT_TYPES, Event
from stream_app.core.features import FEATURE_NAMES, INDEX, extract_features
from stream_app.core.profile import DAY_MS, HOUR_MS, update_profile

evs = st.lists(
    st.tuples(st.sampled_from(EVENT_TYPES), st.integers(0, 30 * DAY_MS), st.floats(0, 1e6)), min_size=1, max_size=30
)


@given(evs, st.integers(0, 400 * DAY_MS))
def test_features_are_finite_and_fixed_length(events, later):
    p = None
    for i, (t, ts, amount) in enumerate(events):
        p, _ = update_profile(p, Event(f"e{i}", t, "u", ts, amount=amount if t == "payment" else None, category="c"))
    x = extract_features(p, p.last_ms + later)
    assert len(x) == len(FEATURE_NAMES)
    assert all(math.isfinite(v) for v in x)


def test_recency_and_activity_decay_with_event_time_only():
    p, _ = update_profile(None, Event("e", "click", "u", 0))
    soon, late = extract_features(p, HOUR_MS), extract_features(p, 10 * DAY_MS)
    assert late[INDEX["log_hours_since_click"]] > soon[INDEX["log_hours_since_click"]]
    assert late[INDEX["log_rate_6h"]] < soon[INDEX["log_rate_6h"]]
    assert extract_features(p, HOUR_MS) == soon  # pure: same profile and time, same vector
    assert soon[INDEX["log_hours_since_payment"]] == math.log1p(24 * 365)  # never paid


def test_the_uplift_learner_reads_the_push_history_and_ope_reads_it_as_never_clicked():
    from stream_app.core.features import INDEX, feature_dict, without_push_responses

    x = [0.0] * len(FEATURE_NAMES)
    x[INDEX["log_pushes"]], x[INDEX["log_push_clicks"]] = math.log1p(5), math.log1p(2)
    d = feature_dict(x, 1)
    assert (d["clicked_push"], d["unanswered_pushes"]) == (1.0, 3.0)
    never = without_push_responses(d)
    assert (never["clicked_push"], never["unanswered_pushes"]) == (0.0, 5.0)
