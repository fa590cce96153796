"""The event agent through Faust's test_context(): no broker, the real agent, table and core.

Topic sends are captured (AsyncMock); that they reach Kafka is proven in tests/integration.
"""

from unittest.mock import AsyncMock

import orjson
import pytest

from stream_app.app import create_app
from stream_app.settings import Settings

T0 = 1_700_000_000  # the Kafka record time (seconds) every test message carries


@pytest.fixture
def sa(tmp_path):
    # at_least_once: test_context() has no transactional producers (exactly_once is proven on the real broker)
    sa = create_app(Settings(app_id="agent-test", datadir=str(tmp_path),
                             processing_guarantee="at_least_once"), recover=False)  # fmt: skip
    sa.outbox.flush = AsyncMock()  # captures each message's atomic batch of effects
    return sa


def ev(i: int, user: str, etype: str = "click", **extra) -> bytes:
    body = {"event_id": f"e{i}", "type": etype, "user_id": user, "ts": T0 * 1000 + i * 1000}
    return orjson.dumps(body | ({"amount": 10} if etype == "payment" else {}) | extra)


def records(sa, topic: str) -> list[tuple]:
    """(key, value, partition) of every record the agent flushed to ``topic`` (a key of sa.topics)."""
    name = sa.topics[topic].get_topic_name()
    return [(k, v, p) for (batch,), _ in sa.outbox.flush.await_args_list for t, k, v, p in batch if t == name]


def sent(sa, topic: str) -> list[dict]:
    return [orjson.loads(v) for _, v, _ in records(sa, topic)]


async def put_all(agent, *values: bytes, key: bytes = b"a", topic: str | None = None):
    for v in values:
        await agent.put(v, key=key, timestamp=T0)


async def test_profiles_count_per_user_and_type_once_per_event_id(sa):
    async with sa.process_events.test_context() as agent:
        for i, (user, etype) in enumerate([("a", "click"), ("a", "payment"), ("b", "like"), ("a", "click")]):
            await agent.put(ev(i, user, etype), key=user.encode(), timestamp=T0)
        await agent.put(ev(0, "a", "click"), key=b"a", timestamp=T0)  # a redelivery of e0
        assert sa.users["a"]["p"]["c"] == [2, 0, 1]  # click, like, payment
        assert sa.users["a"]["p"]["st"] == 10.0
        assert sa.users["b"]["p"]["c"] == [0, 1, 0]
        assert list(agent.results.values())[-1] == ("duplicate", "click")
    assert sa.metrics.duplicates_dropped._value.get() == 1


async def test_bad_input_is_dead_lettered_and_the_stream_continues(sa):
    async with sa.process_events.test_context() as agent:
        await put_all(agent, b"\xffnot json", ev(1, "a"))
        assert list(agent.results.values()) == [("dead_letter", "bad_utf8"), ("applied", "click")]
    (record,) = sent(sa, "dead_letters")
    assert record["error_code"] == "bad_utf8" and record["reason"]
    assert record["value_b64"] == "/25vdCBqc29u"
    assert sa.users["a"]["p"]["c"] == [1, 0, 0]
    assert sa.metrics.events_rejected["bad_utf8"]._value.get() == 0  # counted once its batch is durable:
    for call in sa.outbox.flush.await_args_list:  # what the outbox does at commit (or at delivery)
        if (done := call.kwargs.get("done")) is not None:
            done()
    assert sa.metrics.events_rejected["bad_utf8"]._value.get() == 1


async def test_triggers_produce_audited_decisions_and_pushes_only_for_push_services(sa):
    async with sa.process_events.test_context() as agent:
        await put_all(agent, *(ev(i, "a") for i in range(12)))
    audit = sent(sa, "audit")
    cart = [d for d in audit if d["campaign"] == "cart_abandonment"]
    assert len(cart) == 10  # clicks 3..12 satisfy "clicks >= 3"; one decision per trigger
    assert len({d["decision_id"] for d in cart}) == 10
    pushes = sent(sa, "decisions")
    assert all(d["action"] == "push" for d in pushes)
    assert {d["decision_id"] for d in pushes} <= {d["decision_id"] for d in audit}
    assert all(d["model_version"] == 0 and any(r.startswith("cold_start:") for r in d["reasons"]) for d in cart)


async def test_pushes_held_through_quiet_hours_are_counted_by_their_send_time(sa):
    async with sa.process_events.test_context() as agent:  # T0 is 22:13 UTC: quiet hours for a UTC user
        await put_all(agent, *(ev(i, "a") for i in range(12)))
    for call in sa.outbox.flush.await_args_list:  # effects apply once their batch is durable
        if (done := call.kwargs.get("done")) is not None:
            done()
    held = [d for d in sent(sa, "decisions") if "hold:quiet_hours" in d["reasons"]]
    assert held and all(d["reasons"][-1] == "send_at:quiet_end" and d["send_at_ms"] > d["decided_at_ms"] for d in held)
    value = sa.metrics.registry.get_sample_value
    assert sum(value("stream_app_pushes_held_total", {"campaign": c, "send_at": "quiet_end"}) or 0
               for c in {d["campaign"] for d in held}) == len(held)  # fmt: skip
    assert value("stream_app_pushes_held_total", {"campaign": held[0]["campaign"], "send_at": "active_hour"}) is None


async def test_opt_out_suppresses_and_erase_forgets_the_user(sa):
    async with sa.apply_consent.test_context() as consent, sa.process_events.test_context() as events:
        await consent.put(b'{"user_id":"a","action":"opt_out"}', key=b"a", timestamp=T0)  # before any event
        await put_all(events, *(ev(i, "a") for i in range(12)))
        audit = sent(sa, "audit")
        assert audit and all(d["action"] == "suppress" and "suppress:opted_out" in d["reasons"] for d in audit)
        assert not sent(sa, "decisions")
        await consent.put(b'{"user_id":"a","action":"erase"}', key=b"a", timestamp=T0)
        await put_all(events, ev(50, "a"))
        assert sa.users["a"] == {"erased": True}  # no profile, no personal data, still suppressed
        assert list(events.results.values())[-1] == ("erased", "click")
        await consent.put(b'{"user_id":"a","action":"opt_in"}', key=b"a", timestamp=T0)
        assert sa.users["a"] == {"erased": True}  # erasure is final for this id


async def test_bad_consent_commands_are_dead_lettered(sa):
    async with sa.apply_consent.test_context() as consent:
        await consent.put(b'{"user_id":"a","action":"maybe"}', key=b"a", timestamp=T0)
        await consent.put(b'{"user_id":"a","action":"opt_in"}', key=b"a", timestamp=T0)
        assert list(consent.results.values()) == [("dead_letter", "unknown_type"), ("consent", "opt_in")]
    assert sent(sa, "dead_letters")[0]["error_code"] == "unknown_type"


async def test_a_message_on_the_wrong_partition_is_forwarded_to_its_users_partition(sa):
    # partition_for("u", 4) == 3: a producer that keyed by something else put it on partition 0
    async with sa.process_events.test_context() as agent:
        await agent.put(ev(1, "u"), key=b"not-the-user", partition=0, timestamp=T0)
        assert list(agent.results.values()) == [("repartitioned", "click")]
        assert sa.users.get("u") is None  # not applied on the wrong partition
    (batch,) = [b for (b,), _ in sa.outbox.flush.await_args_list]
    assert batch == [("clicks", b"u", ev(1, "u"), 3)]  # nothing else: no state written, no decision
    assert sa.metrics.repartitioned._value.get() == 1


async def test_event_time_timers_win_back_a_quiet_buyer_and_close_label_windows_without_their_events(sa):
    day = 86_400_000
    async with sa.process_events.test_context() as agent:
        # "a" bought two days ago, then clicks: cart decisions open label windows (push or holdout)
        await agent.put(ev(0, "a", "payment", ts=T0 * 1000 - 2 * day), key=b"a", partition=0, timestamp=T0)
        for i in range(1, 13):
            await agent.put(ev(i, "a"), key=b"a", partition=0, timestamp=T0)
        opened = [d for d in sent(sa, "audit") if d["action"] in ("push", "holdout")]
        assert opened
        assert not [r for r in sent(sa, "model_inputs") if r.get("kind") == "label"]
        # only "b" (same partition) sends events: its event time alone moves partition 0's watermark
        await agent.put(ev(100, "b", ts=T0 * 1000 + 2 * day), key=b"b", partition=0, timestamp=T0 + 2 * 86_400)
        labels = [r for r in sent(sa, "model_inputs") if r.get("kind") == "label"]
        assert {r["decision_id"] for r in labels} == {d["decision_id"] for d in opened}
        assert not any(r["converted"] for r in labels)  # windows closed without a conversion
        assert not [d for d in sent(sa, "audit") if d["campaign"] == "winback"]  # 2 days quiet: too early
        await agent.put(ev(101, "b", ts=T0 * 1000 + 8 * day), key=b"b", partition=0, timestamp=T0 + 8 * 86_400)
        (winback,) = [d for d in sent(sa, "audit") if d["campaign"] == "winback"]
        assert winback["user_id"] == "a" and winback["trigger_event_id"].startswith("lapse:")
        assert winback["decided_at_ms"] == int(winback["trigger_event_id"][6:]) + 7 * day  # fired at its due time
        await agent.put(ev(102, "b", ts=T0 * 1000 + 9 * day), key=b"b", partition=0, timestamp=T0 + 9 * 86_400)
        assert len([d for d in sent(sa, "audit") if d["campaign"] == "winback"]) == 1  # once per quiet period
    assert sa.metrics.timers_fired._value.get() >= 2
