"""ChangelogStore: a load that a ``forget`` overtakes (a rebalance while a partition recovers) neither refills
nor marks loaded the partitions forgotten meanwhile. The interleaving is made deterministic with asyncio
events: the changelog read below hands over its batches only when the test lets it."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from stream_app.settings import Settings
from stream_app.store import ChangelogStore


def _rec(partition: int, user: str, offset: int) -> tuple[int, bytes, bytes, int]:
    return partition, orjson.dumps(user), orjson.dumps({"p": partition, "o": offset}), offset


class GatedStore(ChangelogStore):
    """The changelog read of a real store, replaced by batches handed over one per ``step`` event."""

    def __init__(self, batches: list[list[tuple[int, bytes, bytes, int]]]) -> None:
        super().__init__(Settings(), "users-changelog")
        self.batches = batches
        self.step = asyncio.Event()
        self.waiting = asyncio.Event()  # set while the read waits for the next step

    async def _read(self, partitions):
        for batch in self.batches:
            self.waiting.set()
            await self.step.wait()
            self.step.clear()
            self.waiting.clear()
            yield [r for r in batch if r[0] in partitions]


async def _next_batch(store: GatedStore) -> None:
    """Let the read hand over one batch, and wait until it is applied and the read waits again."""
    await asyncio.wait_for(store.waiting.wait(), 2)
    store.step.set()
    await asyncio.sleep(0)
    for _ in range(20):  # the batch is applied within a few loop turns; then the read waits again
        if store.waiting.is_set():
            return
        await asyncio.sleep(0)


BATCHES = [
    [_rec(0, "a", 0), _rec(1, "b", 0), _rec(2, "c", 0)],
    [_rec(0, "d", 1), _rec(1, "e", 1), _rec(2, "f", 1)],
]


async def _load_with(forget_between: set[int] | None, forget_all: bool = False) -> GatedStore:
    store = GatedStore([*BATCHES, []])
    load = asyncio.create_task(store.ensure({0, 1, 2}))
    await _next_batch(store)  # the first batch is in memory
    if forget_all:
        store.forget()
    else:
        store.forget(forget_between)  # a rebalance takes these partitions away mid-load
    await _next_batch(store)
    await _next_batch(store)
    store.waiting.set()
    await asyncio.wait_for(load, 2)
    return store


def test_partitions_forgotten_mid_load_are_not_marked_loaded_nor_refilled():
    store = asyncio.run(_load_with({1}))
    assert store.loaded == {0, 2}
    assert set(store.data) == {"a", "c", "d", "f"}
    assert set(store.partition_of.values()) == {0, 2}
    assert store.nbytes == sum(len(v) for v in store.data.values())


def test_forgetting_everything_mid_load_leaves_nothing_loaded():
    store = asyncio.run(_load_with(None, forget_all=True))
    assert store.loaded == set()
    assert store.data == {} and store.nbytes == 0


def test_a_later_load_of_a_forgotten_partition_loads_it_whole():
    async def run() -> GatedStore:
        store = await _load_with({1})
        store.batches, store.step, store.waiting = [*BATCHES, []], asyncio.Event(), asyncio.Event()
        load = asyncio.create_task(store.ensure({0, 1, 2}))
        for _ in range(3):
            await _next_batch(store)
        store.waiting.set()
        await asyncio.wait_for(load, 2)
        return store

    store = asyncio.run(run())
    assert store.loaded == {0, 1, 2}
    assert set(store.data) == {"a", "b", "c", "d", "e", "f"}


def test_a_load_without_interference_loads_everything():
    async def run() -> GatedStore:
        store = GatedStore([*BATCHES, []])
        load = asyncio.create_task(store.ensure({0, 1, 2}))
        for _ in range(3):
            await _next_batch(store)
        store.waiting.set()
        await asyncio.wait_for(load, 2)
        return store

    store = asyncio.run(run())
    assert store.loaded == {0, 1, 2}
    assert store["e"] == {"p": 1, "o": 1}


@pytest.mark.parametrize("partitions", [{1}, None])
def test_forget_of_a_loaded_partition_still_drops_its_keys(partitions):
    async def run() -> GatedStore:
        store = GatedStore([*BATCHES, []])
        load = asyncio.create_task(store.ensure({0, 1, 2}))
        for _ in range(3):
            await _next_batch(store)
        store.waiting.set()
        await asyncio.wait_for(load, 2)
        store.forget(partitions)
        return store

    store = asyncio.run(run())
    assert 1 not in store.loaded and "b" not in store.data and "e" not in store.data
