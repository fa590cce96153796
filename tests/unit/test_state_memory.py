"""Held state costs what its bytes say: a regression guard for orjson's over-allocated output buffers."""

import tracemalloc

from stream_app.core.events import Event
from stream_app.core.pipeline import UserState
from stream_app.core.profile import update_profile
from stream_app.engine import encode_state


def test_a_held_state_occupies_about_its_encoded_size():
    profile, _ = update_profile(None, Event("e1", "payment", "u1", 1_700_000_000_000, amount=12.5, category="shoes"))
    state = UserState(profile)
    tracemalloc.start()
    try:
        held = [encode_state(state) for _ in range(500)]
        traced, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    size = len(held[0])
    assert 200 < size < 1024
    # the raw orjson output keeps a ~4 KB buffer per object; a compact copy is its length plus a header
    assert traced / len(held) < size + 200, (traced / len(held), size)
