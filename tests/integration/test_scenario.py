"""The marketer's scenario end to end on a real broker, one real worker (exactly-once, the default).

An abandoning user gets a cart push; an opted-out user never does; a user at night gets a send_at in
the morning; a lapsing buyer gets a win-back without sending anything; malformed input is dead-lettered
while the stream goes on; a mis-keyed message still reaches its user; a payment after a push becomes a
positive label and a new version of that campaign's model.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import orjson

from stream_app.core.timers import partition_for
from stream_app.kafka_io import create_topics, latest_by_key, produce, read_to_end
from tests.integration.conftest import running_worker, wait_until
from tests.integration.test_profiles_on_kafka import metric

HOUR_MS, DAY_MS = 3_600_000, 86_400_000

CAMPAIGNS = """
guardrails: {max_pushes_24h: 2, min_gap: 4h, quiet_hours: {start: 22, end: 8, mode: hold}, decision_ttl: 12h}
campaigns:
  - {name: cart_abandonment, triggers: [click], priority: 3, eligibility: ["clicks >= 3"],
     attribution_window: 24h, threshold: 0.5, cooldown: 48h, holdout_share: 0, exploration_share: 0,
     cold_start_share: 1, prior: 0.05, min_labels: 50}
  - {name: winback, triggers: [lapse], lapse_after: 7d, priority: 1, eligibility: ["payments >= 1"],
     attribution_window: 7d, threshold: 0.5, cooldown: 14d, holdout_share: 0, exploration_share: 0,
     cold_start_share: 1, prior: 0.01, min_labels: 50}
"""


def offset_for_local_hour(hour: int) -> int:
    """A UTC offset (minutes) that makes the local time now fall in ``hour``."""
    return ((hour - datetime.now(UTC).hour + 12) % 24 - 12) * 60


def local_hour(ms: int, offset_min: int) -> float:
    return ((ms + offset_min * 60_000) % DAY_MS) / HOUR_MS


def test_the_marketing_scenario_on_kafka(kafka_bootstrap, app_settings, tmp_path):
    campaigns = tmp_path / "campaigns.yaml"
    campaigns.write_text(CAMPAIGNS)
    s = app_settings.model_copy(update={"campaigns_file": str(campaigns), "model_publish_interval_ms": 500})
    assert s.processing_guarantee == "exactly_once"
    env = {**__import__("os").environ, **s.to_env()}
    asyncio.run(create_topics(kafka_bootstrap, s.topic_layout()))
    n = s.topic_partitions
    port = str(s.web_port)
    log = tmp_path / "worker.log"
    noon, night = offset_for_local_hour(12), offset_for_local_hour(2)
    lapser = "lapser"
    neighbour = next(f"n{i}" for i in range(1000) if partition_for(f"n{i}", n) == partition_for(lapser, n))
    now = int(time.time() * 1000)

    def event(eid: str, etype: str, user: str, ts: int, tz: int, **extra) -> bytes:
        body = {"event_id": eid, "type": etype, "user_id": user, "ts": ts, "tz_offset_min": tz, "category": "shoes"}
        return orjson.dumps(body | ({"amount": 30.0} if etype == "payment" else {}) | extra)

    def clicks(user: str, tz: int) -> list[tuple]:
        return [
            (s.clicks_topic, user.encode(), event(f"{user}-c{i}", "click", user, now + i * 1000, tz)) for i in range(3)
        ]

    def audit() -> list[dict]:
        return [orjson.loads(v) for _, v in asyncio.run(read_to_end(kafka_bootstrap, s.audit_topic, 20))]

    def pushes() -> list[dict]:
        return [orjson.loads(v) for _, v in asyncio.run(read_to_end(kafka_bootstrap, s.decisions_topic, 20))]

    def applied() -> float:
        return metric(port, "stream_app_events_consumed_total{")

    with running_worker(env, log) as proc:
        wait_until(lambda: applied() >= 0, 90, proc, log, "the web server")
        asyncio.run(produce(kafka_bootstrap, [
            (s.clicks_topic, b"x", b"{not json"),
            (s.likes_topic, b"x", b"\xff\xfe"),
            (s.consent_topic, b"opted-out", b'{"user_id": "opted-out", "action": "opt_out"}'),
        ]))  # fmt: skip
        wait_until(lambda: metric(port, 'stream_app_consent_commands_total{action="opt_out"}') >= 1, 60, proc, log,
                   "the opt-out")  # fmt: skip
        cart = clicks("cart", noon)
        wrong = (partition_for("cart", n) + 1) % n
        cart[1] = (*cart[1][:1], b"not-the-user-id", cart[1][2], wrong)  # keyed otherwise, on another partition
        paid = now - 7 * DAY_MS + 20_000  # quiet since then: the win-back timer is due 20 s from now
        asyncio.run(produce(kafka_bootstrap, [
            *cart, *clicks("opted-out", noon), *clicks("night", night),
            (s.payments_topic, lapser.encode(), event("lapser-p", "payment", lapser, paid, noon)),
        ]))  # fmt: skip
        wait_until(lambda: applied() >= 10, 60, proc, log, "the ten valid events")
        # the lapser sends nothing more: another user's event moves the partition's event time past the timer
        asyncio.run(
            produce(
                kafka_bootstrap,
                [(s.clicks_topic, neighbour.encode(), event(f"{neighbour}-c", "click", neighbour, now + 60_000, noon))],
            )
        )
        wait_until(lambda: any(d["campaign"] == "winback" for d in pushes()), 60, proc, log, "the win-back push")
        by_user = {d["user_id"]: d for d in pushes()}
        decided = audit()

        # abandoning user: one cart push, now, with its reasons
        push = by_user["cart"]
        assert push["campaign"] == "cart_abandonment" and push["send_at_ms"] == push["decided_at_ms"]
        assert "cold_start:0_labels" in push["reasons"] and push["action_probability"] == 1.0
        assert len([d for d in pushes() if d["user_id"] == "cart"]) == 1
        assert metric(port, "stream_app_events_repartitioned_total ") == 1  # the mis-keyed click, moved once
        # opted out: audited as suppressed, never pushed
        assert "opted-out" not in by_user
        opted = [d for d in decided if d["user_id"] == "opted-out"]
        assert opted and all(d["action"] == "suppress" and "suppress:opted_out" in d["reasons"] for d in opted)
        # night: held until 08:00 local
        held = by_user["night"]
        assert "hold:quiet_hours" in held["reasons"] and held["send_at_ms"] > held["decided_at_ms"]
        assert local_hour(held["send_at_ms"], night) == 8.0
        # lapsing buyer: win-back decided at its due time on event time, with no event of its own
        winback = by_user[lapser]
        assert winback["campaign"] == "winback" and winback["trigger_event_id"] == f"lapse:{paid}"
        assert winback["decided_at_ms"] == paid + 7 * DAY_MS
        # malformed input dead-lettered with reasons, and the stream went on (everything above)
        dead = {
            orjson.loads(v)["error_code"] for _, v in asyncio.run(read_to_end(kafka_bootstrap, s.dead_letter_topic))
        }
        assert dead == {"malformed_json", "bad_utf8"}  # "{not json" and b"\xff\xfe": each its true reason

        # a payment after the cart push: a positive label and a new cart model version everywhere
        conversion = event("cart-pay", "payment", "cart", push["decided_at_ms"] + 60_000, noon,
                           push_id=push["decision_id"])  # fmt: skip
        asyncio.run(produce(kafka_bootstrap, [(s.payments_topic, b"cart", conversion)]))
        label = 'stream_app_labels_total{campaign="cart_abandonment",converted="true"}'
        wait_until(lambda: metric(port, label) == 1, 60, proc, log, "the positive label")
        version = 'stream_app_model_version{model="propensity:cart_abandonment"}'
        wait_until(lambda: metric(port, version) >= 1, 60, proc, log, "the cart model's new version")
    params = latest_by_key(asyncio.run(read_to_end(kafka_bootstrap, s.model_params_topic, 20)))
    cart_model = orjson.loads(params[b"propensity:cart_abandonment"])
    assert cart_model["n_labels"] >= 1 and cart_model["n_positive"] == 1
    assert cart_model["intercept"] != 0.0 or any(cart_model["weights"])  # it learned from the label
