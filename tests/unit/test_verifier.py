"""The fault matrix's verifier (faults/verify.py) on replay's own outputs: no broker needed.

A verifier that cannot fail proves nothing: each check here is also shown failing on a planted fault."""

import collections

import orjson
import pytest

from faults import verify
from faults.matrix import simulated
from stream_app.replay import Replayer, to_message
from stream_app.settings import Settings

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _trainer_state(trainer) -> list:
    """The trainer changelog records of every learned key (``states`` writes only the ring chunks touched since
    its last call: called once)."""
    learned = {k for k, lr in trainer.learners.items() if lr.n_labels or trainer.delayed[k]} | {"segments"}
    return [
        verify.Rec(0, i, 0, orjson.dumps(k), orjson.dumps(v))
        for i, (k, v) in enumerate(trainer.states(sorted(learned)))
    ]


@pytest.fixture(scope="module")
def run():
    """Replay of a small simulated input as the outputs a worker would have written (records as read back)."""
    envelopes, _ = simulated(150, 2, seed=3)
    settings = Settings(model_publish_interval_ms=60_000)
    replayer = Replayer(settings)
    params, inputs = [], []
    for i, env in enumerate(envelopes):
        for name, value in replayer.feed(to_message(orjson.dumps(env), i, replayer.settings)):
            if name == "model_params":
                p = orjson.loads(value)
                params.append(verify.Rec(0, len(params), 0, p["key"].encode(), orjson.dumps(p["params"])))
            elif name == "model_inputs":
                inputs.append(verify.Rec(0, len(inputs), 0, None, value))
    result = replayer.finish()
    audit = [verify.Rec(0, i, 0, None, v) for i, v in enumerate(result.records["audit"])]
    return envelopes, settings, _trainer_state(replayer.trainer), audit, params, inputs, result


def test_a_guided_replay_reproduces_every_decision_from_the_versions_it_records(run):
    envelopes, settings, _, audit, params, _, _ = run
    decided = [orjson.loads(r.value) for r in audit]
    versions = collections.Counter((d["model_version"] > 0, d["segment_version"] > 0) for d in decided)
    assert versions[(True, True)] > 50  # warm models decided: the guided replay must install them
    guided = verify.guided_reference(envelopes, settings, audit, params)
    assert guided.unavailable == 0
    assert {d: orjson.loads(r.value) for r in audit for d in [orjson.loads(r.value)["decision_id"]]} == guided.audit
    # a version the params topic no longer holds is reported, not guessed
    used = {(f"propensity:{d['campaign']}", d["model_version"]) for r in audit for d in [orjson.loads(r.value)]}
    gone = next(i for i, r in enumerate(params) if (r.key.decode(), orjson.loads(r.value)["version"]) in used)
    assert verify.guided_reference(envelopes, settings, audit, params[:gone] + params[gone + 1 :]).unavailable == 1


def test_a_guided_replay_sees_a_decision_the_recorded_models_would_not_make(run):
    envelopes, settings, _, audit, params, _, _ = run
    warm = next(i for i, r in enumerate(audit) if orjson.loads(r.value)["model_version"] > 1)
    d = orjson.loads(audit[warm].value)
    planted = list(audit)
    planted[warm] = verify.Rec(0, warm, 0, None, orjson.dumps(d | {"model_version": d["model_version"] - 1}))
    guided = verify.guided_reference(envelopes, settings, planted, params)
    assert guided.audit[d["decision_id"]]["score"] != d["score"]  # scored with the version it names


def test_replays_own_outputs_pass_and_a_planted_state_or_score_fails(run):
    envelopes, settings, trainer_state, audit, params, inputs, result = run
    recs = lambda values: [verify.Rec(0, i, 0, None, v) for i, v in enumerate(values)]  # noqa: E731
    changelog = [verify.Rec(0, i, 0, orjson.dumps(u), orjson.dumps(v)) for i, (u, v) in enumerate(result.users.items())]
    out = {"audit": audit, "decisions": recs(result.records["decisions"]), "model_inputs": inputs,
           "dead_letters": recs(result.records["dead_letters"]), "changelog": changelog,
           "trainer": trainer_state, "params": params}  # fmt: skip
    ref = verify.compute_reference(envelopes, settings)
    guided = verify.guided_reference(envelopes, settings, audit, params)
    checked = verify.compare(ref, out, settings, guided)
    assert all(checked["invariants"][k] for k in ("state_equals_replay", "decisions_equal_replay",
                                                 "every_input_accounted_once", "trainer_equals_fold"))  # fmt: skip
    assert checked["numbers"]["decisions"]["checked_exactly"] == len(audit) > 100
    # a decayed rate off by 1e-4 (not one of the deterministic fields): only the guided comparison sees it
    i, (user, state) = next((i, (u, v)) for i, (u, v) in enumerate(result.users.items()) if v.get("p"))
    bent = state | {"p": state["p"] | {"rs": state["p"]["rs"] + 1e-4}}
    planted = [*changelog[:i], verify.Rec(0, i, 0, orjson.dumps(user), orjson.dumps(bent)), *changelog[i + 1 :]]
    failed = verify.compare(ref, out | {"changelog": planted}, settings, guided)
    assert not failed["invariants"]["state_equals_replay"]
    assert failed["numbers"]["state_fields_differing_from_guided_replay"] == {"p.rs": 1}
    assert failed["numbers"]["users_state_differs"] == 0
    # a repeated decision decided again with older models (a zombie under at_least_once): counted as a duplicate
    # and as repeated with other content, compared by the copy the guided replay's versions made
    d = orjson.loads(audit[7].value)
    zombie = verify.Rec(0, len(audit), 0, None, orjson.dumps(d | {"score": 0.5, "model_version": 0}))
    repeated = verify.compare(ref, out | {"audit": [zombie, *audit]}, settings, guided)
    assert repeated["invariants"]["decisions_equal_replay"] and not repeated["invariants"]["no_duplicate_audit"]
    assert repeated["numbers"]["decisions"]["repeated_with_other_content"] == 1
    # a score off in the 6th decimal
    d = orjson.loads(audit[7].value)
    scored = [*audit[:7], verify.Rec(0, 7, 0, None, orjson.dumps(d | {"score": d["score"] + 1e-06})), *audit[8:]]
    failed = verify.compare(ref, out | {"audit": scored}, settings, guided)
    assert not failed["invariants"]["decisions_equal_replay"]
    assert failed["numbers"]["decisions"]["score_differs"] == 1


def test_the_trainer_fold_equals_the_trainer_and_catches_a_lost_or_repeated_input(run):
    _, settings, state, _, _, inputs, _ = run
    keys = {k for r in inputs for k in [orjson.loads(r.value).get("kind")]}
    assert keys >= {"label", "segment_sample"}
    assert verify.compare_trainer(inputs, state, settings)[0]["differing_keys"] == 0
    sample = next(i for i, r in enumerate(inputs) if orjson.loads(r.value)["kind"] == "segment_sample")
    lost = verify.compare_trainer(inputs[:sample] + inputs[sample + 1 :], state, settings)
    assert lost[0]["differing_keys"] >= 1 and lost[1][0]["key"].startswith("segments")
    label = next(i for i, r in enumerate(inputs) if orjson.loads(r.value)["kind"] == "label")
    twice = verify.compare_trainer([*inputs, inputs[label]], state, settings)
    assert twice[0]["differing_keys"] >= 1


def test_the_applied_order_is_read_back_from_the_changelog_and_the_file_reordered_to_it():
    from stream_app.core.profile import event_key

    def ev(user, eid, topic="click"):
        return {"topic": topic, "value": {"event_id": eid, "type": topic, "user_id": user, "ts": 1}}

    envelopes = [ev("a", "a1"), ev("b", "b1"), ev("a", "a2", "like"), ev("a", "a1"), ev("b", "b2"), ev("a", "a3")]

    def state(*ids):
        return orjson.dumps({"p": {"s": [event_key(i) for i in ids]}})

    # the worker applied a's like before its first click (two snapshots), b in file order
    changelog = [verify.Rec(0, 0, 0, b'"a"', state("a2")), verify.Rec(0, 1, 0, b'"b"', state("b1", "b2")),
                 verify.Rec(0, 2, 0, b'"a"', state("a2", "a1", "a3"))]  # fmt: skip
    order = verify.applied_order(changelog)
    assert order["a"] == [event_key("a2"), event_key("a1"), event_key("a3")]
    out, stats = verify.in_applied_order(envelopes, order)
    assert [e["value"]["event_id"] for e in out] == ["a2", "b1", "a1", "a1", "b2", "a3"]  # the repeat stays put
    assert {k: stats[k] for k in ("users_reordered", "events_moved", "users_order_unknown")} == {
        "users_reordered": 1,
        "events_moved": 2,
        "users_order_unknown": 0,
    }
    # applied a2, a3, a1, with a1 repeated before a2: left in place, the repeat would be the copy applied,
    # before a3 (seen in a full-size run: a score differing in the 6th decimal); every copy moves with its event
    envelopes = [ev("a", "a1"), ev("b", "b1"), ev("a", "a1"), ev("a", "a2", "like"), ev("b", "b2"), ev("a", "a3")]
    changelog[2] = verify.Rec(0, 2, 0, b'"a"', state("a2", "a3", "a1"))
    out, _ = verify.in_applied_order(envelopes, verify.applied_order(changelog))
    assert [e["value"]["event_id"] for e in out] == ["a2", "b1", "a3", "a1", "b2", "a1"]
    replayer = Replayer(Settings())
    for i, env in enumerate(out):
        replayer.feed(to_message(orjson.dumps(env), i, replayer.settings))
    assert replayer.finish().users["a"]["p"]["s"] == [event_key(i) for i in ("a2", "a3", "a1")]
