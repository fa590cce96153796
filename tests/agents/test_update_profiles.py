"""The profile agent through Faust's test_context(): no broker, the real agent code and table."""

from unittest.mock import AsyncMock

import orjson
import pytest

from stream_app.app import create_app
from stream_app.settings import Settings


@pytest.fixture
def sa(tmp_path):
    return create_app(Settings(app_id="agent-test", datadir=str(tmp_path), store="memory://"))


T0 = 1_700_000_000  # the Kafka record time (seconds) every test message carries


def ev(i: int, user: str, etype: str = "click") -> bytes:
    body = {"event_id": f"e{i}", "type": etype, "user_id": user, "ts": T0 * 1000 + i}
    return orjson.dumps(body | ({"amount": 10} if etype == "payment" else {}))


async def test_profiles_count_per_user_and_type_once_per_event_id(sa):
    async with sa.update_profiles.test_context() as agent:
        for i, (user, etype) in enumerate([("a", "click"), ("a", "payment"), ("b", "like"), ("a", "click")]):
            await agent.put(ev(i, user, etype), key=user.encode(), timestamp=T0)
        await agent.put(ev(0, "a", "click"), key=b"a", timestamp=T0)  # a redelivery of e0
        assert sa.profiles["a"]["c"] == [2, 0, 1]  # click, like, payment
        assert sa.profiles["a"]["st"] == 10.0
        assert sa.profiles["b"]["c"] == [0, 1, 0]
        assert list(agent.results.values())[-1] == ("duplicate", "click")
    assert sa.metrics.duplicates_dropped._value.get() == 1
    assert sa.metrics.events_consumed["click"]._value.get() == 2


async def test_bad_input_is_dead_lettered_and_the_stream_continues(sa):
    sa.dead_letters.send = AsyncMock()  # the real send is proven against Kafka in tests/integration
    async with sa.update_profiles.test_context() as agent:
        await agent.put(b"\xffnot json", key=b"a", timestamp=T0)
        await agent.put(ev(1, "a"), key=b"a", timestamp=T0)
        assert list(agent.results.values()) == [("dead_letter", "malformed_json"), ("applied", "click")]
    (call,) = sa.dead_letters.send.await_args_list
    record = orjson.loads(call.kwargs["value"])
    assert record["error_code"] == "malformed_json" and record["reason"]
    assert record["value_b64"] == "/25vdCBqc29u"
    assert sa.profiles["a"]["c"] == [1, 0, 0]
    assert sa.metrics.events_rejected["malformed_json"]._value.get() == 1
