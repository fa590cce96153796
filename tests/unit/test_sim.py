"""The simulator: seeded, contract-conforming events, ground truth kept apart, a closed loop that reacts."""

import json
from pathlib import Path

import numpy as np
import orjson
import pytest
from click.testing import CliRunner
from jsonschema import Draft202012Validator

from stream_app.cli import main
from stream_app.core.profile import DAY_MS
from stream_app.replay import replay
from stream_app.sim.loop import run
from stream_app.sim.population import RESPONSES, TYPES, conversion_probabilities, make_population, push_effect
from stream_app.sim.simulator import SimConfig, Simulator
from stream_app.sim.stats import adjusted_rand_index, roc_auc

SCHEMAS = Path(__file__).parents[2] / "schemas"
EVENT_FIELDS = {"event_id", "type", "user_id", "ts", "category", "amount", "currency", "push_id", "tz_offset_min"}


def envelopes(**kw):
    return list(Simulator(SimConfig(**{"users": 150, "days": 6, "seed": 3} | kw), deliver=False))


def test_same_seed_same_events_other_seed_other_events():
    a, b, c = envelopes(), envelopes(), envelopes(seed=4)
    assert a == b
    assert a != c
    assert [e["timestamp_ms"] for e in a] == sorted(e["timestamp_ms"] for e in a)  # event-time order


def test_events_follow_the_contracts_and_carry_no_ground_truth():
    event = Draft202012Validator(json.loads((SCHEMAS / "event.v1.json").read_text()))
    good = [e for e in envelopes() if isinstance(e["value"], dict) and e["value"].get("type") in ("click", "like",
            "payment") and "user_id" in e["value"] and e["value"].get("amount", 0) >= 0]  # fmt: skip
    assert len(good) > 1000
    for e in good:
        event.validate(e["value"])
        assert set(e["value"]) <= EVENT_FIELDS  # no latent type, response or probability leaks into an event
        assert e["topic"] == e["value"]["type"] and e["timestamp_ms"] >= e["value"]["ts"]
        assert "push_id" not in e["value"]  # open loop: nobody was pushed


def test_rates_and_noise_shares_are_near_what_is_configured():
    config = SimConfig(users=400, days=7, seed=5, malformed_share=0.02, duplicate_share=0.03)
    sim = Simulator(config, deliver=False)
    lines = [orjson.dumps(e) for e in sim]
    organic = sim.counts["events_click"] + sim.counts["events_like"] + sim.counts["events_payment"]
    assert sim.counts["malformed"] / organic == pytest.approx(0.02, abs=0.005)
    assert sim.counts["duplicates"] / organic == pytest.approx(0.03, abs=0.006)
    assert 0.01 <= sim.counts["payments"] / (400 * 7) <= 0.05  # low single-digit payments per user-day
    result = replay(lines)  # the pipeline rejects exactly the malformed ones and drops exactly the duplicates
    assert len(result.records["dead_letters"]) == sim.counts["malformed"]
    assert result.counts["duplicate"] == sim.counts["duplicates"]


def test_population_has_every_type_and_response_and_heterogeneous_push_effects():
    users = make_population(3000, seed=1)
    assert {u.type_index for u in users} == set(range(len(TYPES)))
    assert {u.response for u in users} == set(RESPONSES)
    noon = 12 * 3_600_000
    for u in users[:300]:
        p1, p0 = conversion_probabilities(u, noon - u.tz_offset_min * 60_000, DAY_MS, -1, 0)
        assert 0 <= p0 < 1 and 0 <= p1 < 1
        if u.response == "persuadable":
            assert p1 > p0
        elif u.response == "annoyed":
            assert p1 < p0
        elif u.response == "lost_cause":
            assert p1 == p0
    u = next(x for x in users if x.response == "persuadable")
    day = 12 * 3_600_000 - u.tz_offset_min * 60_000
    fresh, _ = conversion_probabilities(u, day, DAY_MS, -1, 0)
    tired, _ = conversion_probabilities(u, day, DAY_MS, -1, 3)
    night, _ = conversion_probabilities(u, day + 12 * 3_600_000, DAY_MS, -1, 0)
    assert fresh > tired and fresh > night  # frequent and night-time pushes work less
    annoyed = next(x for x in users if x.response == "annoyed")
    assert push_effect(annoyed, day, 0)[1] < push_effect(annoyed, day, 3)[1]  # opt-outs rise with frequency


def test_closed_loop_reacts_to_decisions_and_keeps_the_truth():
    config = SimConfig(users=250, days=8, seed=2)
    none, pushed = run("none", config), run("oracle", config, push_rate=0.3)
    assert none.counts.get("pushes_delivered", 0) == 0 and pushed.counts["pushes_delivered"] > 50
    assert pushed.counts["push_conversions"] > 0
    assert pushed.payments.sum() > none.payments.sum()  # the oracle's pushes add conversions
    d = pushed.decisions
    assert len(d["pushed"]) and set(np.unique(d["type"])) <= set(range(len(TYPES)))
    assert np.all(pushed.types[d["user"]] == d["type"])  # per-decision latent type is the user's
    assert np.all((d["p_push"] >= 0) & (d["p_push"] <= 1) & (d["p_no"] >= 0) & (d["p_no"] <= 1))
    lab = pushed.labels
    assert len(lab["converted"]) and np.all(lab["labelled_at_ms"] >= lab["decided_at_ms"])


def test_conversions_carry_push_id_only_after_a_push():
    sim = Simulator(SimConfig(users=120, days=4, seed=9), windows={"c": DAY_MS})
    pushes: dict[str, int] = {}
    chosen = {u.user_id for u in sim.users if u.response == "persuadable"}
    seen = 0
    for e in sim:
        v = e["value"]
        if isinstance(v, dict) and "push_id" in v:
            assert v["push_id"] in pushes and v["ts"] >= pushes[v["push_id"]]
            seen += 1
        if isinstance(v, dict) and v.get("type") == "click" and v.get("user_id") in chosen:
            did = f"d{v['event_id']}"  # push persuadable users on each click
            send = e["timestamp_ms"] + 60_000
            truth = sim.observe({"decision_id": did, "user_id": v["user_id"], "campaign": "c", "action": "push",
                                 "decided_at_ms": e["timestamp_ms"], "send_at_ms": send, "score": 0.5})  # fmt: skip
            pushes[did] = send
            assert truth is not None and truth.type_index == sim.by_id[v["user_id"]].type_index
    assert sim.truths.keys() == pushes.keys()
    assert sim.counts["push_conversions"] > 0
    assert seen == 2 * sim.counts["push_conversions"]  # a click on the push and a payment, both attributed


def test_adjusted_rand_index():
    assert adjusted_rand_index([0, 0, 1, 1], [5, 5, 7, 7]) == 1.0
    assert adjusted_rand_index([0, 0, 1, 2], [0, 0, 1, 1]) == pytest.approx(0.5714, abs=1e-4)
    assert adjusted_rand_index([0, 0, 0, 0], [0, 1, 2, 3]) == 0.0
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 5000), rng.integers(0, 5, 5000)
    assert abs(adjusted_rand_index(a, b)) < 0.01  # chance level
    assert adjusted_rand_index(a, b) == pytest.approx(adjusted_rand_index(b, a))
    assert roc_auc([0.2, 0.1, 0.9], [0, 0, 1]) == 1.0


def test_simulate_cli_writes_a_replayable_file(tmp_path):
    out = tmp_path / "sim.jsonl.gz"
    res = CliRunner().invoke(main, ["simulate", "--users", "30", "--days", "2", "--seed", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    lines = replay([line for line in __import__("gzip").open(out).read().splitlines() if line])
    assert lines.counts["applied"] > 100
    assert CliRunner().invoke(main, ["simulate", "--users", "3"]).exit_code != 0  # --out or --kafka


def test_evaluate_quick_writes_the_report(tmp_path):
    res = CliRunner().invoke(main, ["evaluate", "--quick", "--out", str(tmp_path)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "report:" in res.output
    names = {p.name for p in tmp_path.iterdir()}
    assert {"report.md", "summary.json", "policies.png", "propensity.png", "uplift.png"} <= names
    report = (tmp_path / "report.md").read_text()
    for section in ("## Targets", "## Policies at equal push volume", "## Propensity model against the ground truth",
                    "## Segments against the latent types", "## Holdout-based uplift estimate",
                    "## The propensity learner on a public dataset", "Bayes-optimal", "adjusted Rand",
                    "## Share of the oracle's headroom", "## Off-policy evaluation against the truth"):  # fmt: skip
        assert section.lower() in report.lower(), section
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["volume"]) == {"none", "random", "propensity", "uplift", "oracle"}
    assert len(summary["targets"]) == 9
    assert set(summary["headroom"]) == {"propensity", "uplift"}
    ope = summary["ope"]
    assert {r["policy"] for r in ope} >= {"push every logged decision", "uplift model, top half"}
    for r in ope:  # estimates and truth are probabilities; every interval brackets its estimate
        assert 0 <= r["true_value"] <= 1 and r["ips_ci"][0] <= r["ips"] <= r["ips_ci"][1]
        assert r["dr_ci"][0] <= r["dr"] <= r["dr_ci"][1]
    assert summary["phishing"]["documented_setup"]["accuracy"] == pytest.approx(0.8896, abs=1e-4)  # River's number


def test_ceiling_oracles_bracket_what_information_can_buy(tmp_path):
    """Knowing each user's response class buys nearly all of the oracle's headroom, the type alone little; the
    posterior from the user's own events lies between (the ceiling study, stream_app/sim/ceiling.py)."""
    from stream_app.sim.ceiling import main as ceiling
    from stream_app.sim.population import class_posterior

    ceiling(["--users", "150", "--days", "6", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "ceiling.json").read_text())["policies"]
    share = {p: v["share_truth"] for p, v in rows.items()}
    assert share["random"] == 0.0 and share["oracle"] == 1.0
    assert share["type_oracle"] < share["posterior_oracle"] < share["class_oracle"]
    assert share["class_oracle"] > 0.8 and share["type_oracle"] < 0.5
    assert share["random"] < share["thompson_oracle"] < share["class_oracle"]  # a class drawn, not the best guess
    assert "| class_oracle | type and response class |" in (tmp_path / "ceiling.md").read_text()
    # one click through a push all but proves a persuadable user; unanswered pushes lower the odds
    ut = TYPES[2]
    prior = ut.responses[0]
    assert class_posterior(ut, 1, 1, 0, 10)["persuadable"] > 0.95
    assert (
        class_posterior(ut, 6, 0, 0, 10)["persuadable"] < prior < class_posterior(ut, 0, 0, 0, 10)["persuadable"] + 0.05
    )
