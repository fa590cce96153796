import math

import pytest

from stream_app.campaigns import CampaignConfigError, load_campaigns, parse_rule
from stream_app.core.features import INDEX
from stream_app.core.policy import LAPSE
from stream_app.core.profile import DAY_MS, HOUR_MS


def test_the_shipped_default_loads_with_the_three_required_campaigns():
    campaigns, guardrails = load_campaigns()
    by_name = {c.name: c for c in campaigns}
    assert {"cart_abandonment", "cross_sell", "winback"} <= by_name.keys()
    assert by_name["winback"].triggers == (LAPSE,) and by_name["winback"].lapse_after_ms == 7 * DAY_MS
    assert by_name["cart_abandonment"].cooldown_ms == 48 * HOUR_MS
    assert guardrails.min_gap_ms == 4 * HOUR_MS and guardrails.quiet_mode == "hold"


def test_rules_in_natural_units_map_exactly_to_log_features():
    rule = parse_rule("clicks >= 3")
    x = [0.0] * 30
    for clicks, expected in ((2, False), (3, True), (4, True)):
        x[INDEX["log_clicks"]] = math.log1p(clicks)
        assert rule.holds(x) is expected


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("campaigns: []", "campaigns: List should have at least 1 item"),
        ("campaigns: [{name: a, triggers: [view]}]", "campaigns.0.triggers: Value error, unknown trigger"),
        ("campaigns: [{name: a, triggers: [click], cooldown: soon}]", "campaigns.0.cooldown"),
        ("campaigns: [{name: a, triggers: [click], eligibility: ['mood > 3']}]", "unknown feature 'mood'"),
        ("campaigns: [{name: a, triggers: [click], threshold: 2}]", "campaigns.0.threshold"),
        ("campaigns: [{name: a, triggers: [click]}, {name: a, triggers: [like]}]", "repeated: ['a']"),
        ("campaigns: [{name: a, triggers: [click], colour: red}]", "campaigns.0.colour: Extra inputs"),
        ("campaigns: [{name: a, triggers: [click]", "not valid YAML/JSON"),
    ],
)
def test_invalid_files_fail_with_the_file_and_place(tmp_path, body, message):
    f = tmp_path / "c.yaml"
    f.write_text(body)
    with pytest.raises(CampaignConfigError) as err:
        load_campaigns(f)
    assert str(f) in str(err.value) and message in str(err.value)


def test_json_files_and_missing_files(tmp_path):
    f = tmp_path / "c.json"
    f.write_text('{"campaigns": [{"name": "a", "triggers": ["click"], "cooldown": "30m"}]}')
    (c,), _ = load_campaigns(f)
    assert c.cooldown_ms == 30 * 60_000
    with pytest.raises(CampaignConfigError, match="cannot read"):
        load_campaigns(tmp_path / "missing.yaml")
