"""The trainer agent and the model store, through Faust's test_context() (no broker)."""

import math
import random
from unittest.mock import AsyncMock

import orjson
import pytest

from stream_app.app import ModelStore, create_app
from stream_app.core.features import FEATURE_NAMES, TRAIT_NAMES
from stream_app.core.pipeline import Models
from stream_app.core.segments import SegmentModel
from stream_app.settings import Settings

T0 = 1_700_000_000


@pytest.fixture
def sa(tmp_path):
    sa = create_app(Settings(app_id="train-test", datadir=str(tmp_path), model_publish_interval_ms=1000,
                             processing_guarantee="at_least_once"), recover=False)  # fmt: skip
    sa.outbox.flush = AsyncMock()
    return sa


def label(i: int, converted: bool) -> bytes:
    rnd = random.Random(i)
    return orjson.dumps({
        "kind": "label", "campaign": "cart_abandonment", "action": "push", "converted": converted,
        "features": [rnd.gauss(0, 1) for _ in FEATURE_NAMES], "decision_id": f"d{i}",
        "decided_at_ms": -2 * 86_400_000, "labelled_at_ms": 60_000,  # the window has closed: learned at once
    })  # fmt: skip


async def test_labels_train_persist_and_publish_new_versions(sa):
    async with sa.train.test_context() as agent:
        await agent.put(label(0, True), key=b"cart_abandonment", timestamp=T0)
        for i in range(1, 20):
            await agent.put(label(i, i % 3 == 0), key=b"cart_abandonment", timestamp=T0 + 0.1 * i)
        await agent.put(b"{garbage", key=b"x", timestamp=T0 + 5)
        assert list(agent.results.values())[-1] is None
        state = sa.trainer_state["propensity:cart_abandonment"]
    published = [
        (k, orjson.loads(v))
        for (batch,), _ in sa.outbox.flush.await_args_list
        for t, k, v, _ in batch
        if t == sa.settings.model_params_topic
    ]
    versions = [p["version"] for k, p in published if k == b"propensity:cart_abandonment"]
    assert versions == [1, 2]  # at T0 and once more after 1 s of record time; never per label
    assert [p["n_labels"] for _, p in published] == [1, 11]  # the label at T0 + 1.0 s triggers version 2
    assert sa.metrics.model_inputs_ignored._value.get() == 1
    assert state["n_labels"] == 20  # the learning state is persisted on every label
    assert not math.isnan(sa.trainer.quality["cart_abandonment"].log_loss)


def test_the_model_store_installs_only_newer_versions():
    store = ModelStore(Models(SegmentModel(k=2), {}))
    params = {"campaign": "c", "version": 3, "weights": [0.0] * len(FEATURE_NAMES), "intercept": 1.0,
              "mean": [0.0] * len(FEATURE_NAMES), "scales": [1.0] * len(FEATURE_NAMES), "prior": 0.02,
              "n_labels": 500, "min_labels": 100, "features": list(FEATURE_NAMES)}  # fmt: skip
    store.apply("propensity:c", params)
    assert store.current.scorers["c"].version == 3
    store.apply("propensity:c", params | {"version": 2, "intercept": -5.0})
    assert store.current.scorers["c"].intercept == 1.0
    seg = SegmentModel(k=2, warmup=2)
    for x in ([0.0] * len(TRAIT_NAMES), [5.0] * len(TRAIT_NAMES)):  # a model must score the real trait vector
        seg.learn_one(x)
    seg.version = 1
    assert store.apply("segments", seg.to_params()) is None
    assert store.current.segments.version == 1 and store.current.scorers["c"].version == 3
    # a segment model learned on another vector (the propensity features, before traits) is not installed
    stale = seg.to_params() | {"version": 2, "schema": "", "centroids": [[0.0] * len(FEATURE_NAMES)] * 2}
    store.apply("segments", stale)
    assert store.current.segments.version == 1 and store.current.segments.predict_one([5.0] * len(TRAIT_NAMES)) >= 0
