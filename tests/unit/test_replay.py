"""Replay: the agents' engine over a file, deterministic to the byte, with the agents' semantics."""

import gzip
import random

import orjson
from click.testing import CliRunner

from stream_app.cli import main
from stream_app.replay import read_lines, replay, to_message
from stream_app.settings import Settings

DAY = 86_400_000
T0 = 1_700_000_000_000


def events(n_users=40, n=2000, seed=3) -> list[bytes]:
    """Seeded mixed traffic over 20 days, with buyers who go quiet, duplicates and malformed lines."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        user = f"u{rng.randrange(n_users)}"
        etype = rng.choices(["click", "like", "payment"], weights=[70, 20, 10])[0]
        ev = {"event_id": f"e{i}", "type": etype, "user_id": user, "ts": T0 + i * 864_000, "category": "shoes",
              "tz_offset_min": 60} | ({"amount": 25.0} if etype == "payment" else {})  # fmt: skip
        lines.append(orjson.dumps(ev))
        if i % 97 == 0:
            lines.append(orjson.dumps(ev))  # a duplicate
        if i % 211 == 0:
            lines.append(b"{broken")
    lines.insert(5, b'{"user_id": "u1", "action": "opt_out"}')
    return lines


def test_same_input_gives_byte_identical_output(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(events()) + b"\n")
    runner = CliRunner()
    outs = []
    for run in ("a", "b"):
        result = runner.invoke(main, ["replay", str(path), "--out", str(tmp_path / run)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        outs.append({p.name: p.read_bytes() for p in sorted((tmp_path / run).iterdir())})
    assert outs[0] == outs[1]
    assert set(outs[0]) == {"decisions.jsonl", "audit.jsonl", "dead-letters.jsonl", "model-inputs.jsonl",
                            "model-params.jsonl"}  # fmt: skip
    assert outs[0]["audit.jsonl"] and outs[0]["decisions.jsonl"]


def test_replay_has_the_agents_semantics():
    result = replay(events())
    audit = [orjson.loads(v) for v in result.records["audit"]]
    dead = [orjson.loads(v) for v in result.records["dead_letters"]]
    assert {d["error_code"] for d in dead} == {"malformed_json"} and len(dead) == 10
    assert result.counts["duplicate"] == 21  # every re-sent event_id applied once
    assert all(d["action"] == "suppress" for d in audit if d["user_id"] == "u1")  # opted out before
    pushes = {orjson.loads(v)["decision_id"] for v in result.records["decisions"]}
    assert pushes == {d["decision_id"] for d in audit if d["action"] == "push"}
    assert len({d["decision_id"] for d in audit}) == len(audit)


def test_a_quiet_buyer_gets_a_win_back_from_other_users_event_time():
    lines = [
        orjson.dumps({"event_id": "p", "type": "payment", "user_id": "buyer", "ts": T0, "amount": 10}),
        orjson.dumps({"event_id": "x", "type": "click", "user_id": "other", "ts": T0 + 8 * DAY}),
    ]
    settings = Settings()
    (winback,) = [orjson.loads(v) for v in replay(lines, settings).records["audit"]]
    assert winback["campaign"] == "winback" and winback["user_id"] == "buyer"
    assert winback["decided_at_ms"] == T0 + 7 * DAY and winback["trigger_event_id"] == f"lapse:{T0}"


def test_envelopes_name_the_topic_and_the_record_time(tmp_path):
    s = Settings()
    env = orjson.dumps({"topic": "consent", "value": {"user_id": "u", "action": "erase"}, "timestamp_ms": 5})
    msg = to_message(env, 3, s)
    assert (msg.topic, msg.offset, msg.timestamp_ms) == (s.consent_topic, 3, 5)
    assert orjson.loads(msg.value) == {"user_id": "u", "action": "erase"}
    gz = tmp_path / "e.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"a": 1}\n\n{"b": 2}\n'))
    assert list(read_lines(gz)) == [b'{"a": 1}', b'{"b": 2}']
