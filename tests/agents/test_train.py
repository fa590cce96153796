"""The trainer agent and the model store, through Faust's test_context() (no broker)."""

import math
import random
from unittest.mock import AsyncMock

import orjson
import pytest

from stream_app.app import ModelStore, create_app
from stream_app.core.features import FEATURE_NAMES, TRAIT_NAMES
from stream_app.core.pipeline import Models
from stream_app.core.propensity import PropensityLearner
from stream_app.core.segments import SegmentModel
from stream_app.core.trainer import Gate, check_state
from stream_app.engine import build_trainer
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
    rejected = {"model": "propensity:cart_abandonment"}  # exported at 0 before any refusal (dashboards show 0)
    assert sa.metrics.registry.get_sample_value("stream_app_model_versions_rejected_total", rejected) == 0
    assert state["n_labels"] == 20  # the learning state is persisted on every label
    assert not math.isnan(sa.trainer.quality["cart_abandonment"].log_loss)


def test_the_model_store_installs_only_newer_versions():
    store = ModelStore(Models(SegmentModel(k=2), {}))
    learner = PropensityLearner("c", 0.02, 100)
    learner.learn_one([1.0] * len(FEATURE_NAMES), True)
    params = learner.to_params(with_covariance=False) | {"version": 3, "intercept": 1.0}
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


def positive(i: int, decided_at_ms: int) -> bytes:
    """A conversion 1 h after its decision: with decision order, held until the 24 h window closes."""
    rec = orjson.loads(label(i, True)) | {"decided_at_ms": decided_at_ms, "labelled_at_ms": decided_at_ms + 3_600_000}
    return orjson.dumps(rec)


async def test_the_changelog_keeps_the_full_learning_state_when_a_version_is_published(tmp_path):
    """A publication in a batch that learned nothing (a flush) once wrote the published view to the changelog,
    dropping the posterior's covariance and the held positives: a successor trainer lost them."""
    settings = Settings(app_id="train-state", datadir=str(tmp_path), model_publish_interval_ms=1000,
                        processing_guarantee="at_least_once", trainer_decision_order=True)  # fmt: skip
    sa = create_app(settings, recover=False)
    sa.outbox.flush = AsyncMock()
    key = "propensity:cart_abandonment"
    async with sa.train.test_context() as agent:
        await agent.put(label(0, False), key=b"cart_abandonment", timestamp=T0)  # published at once (version 1)
        await agent.put(positive(1, 0), key=b"cart_abandonment", timestamp=T0 + 0.1)  # held, state changed
        await agent.put(label(2, False), key=b"cart_abandonment", timestamp=T0 + 0.2)
        await agent.put(b'{"kind": "flush"}', key=b"flush", timestamp=T0 + 5)  # publishes version 2, learns nothing
        state = sa.trainer_state[key]
    published = [orjson.loads(v) for (batch,), _ in sa.outbox.flush.await_args_list
                 for t, k, v, _ in batch if t == settings.model_params_topic and k == key.encode()]  # fmt: skip
    assert [p["version"] for p in published] == [1, 2]
    assert "covariance" not in published[-1]["posterior"] and "delayed" not in published[-1]
    assert state["version"] == 2 and len(state["delayed"]) == 1 and "covariance" in state["posterior"]
    assert check_state(key, state) is None
    successor = build_trainer(settings, tuple(sa.trainer.campaigns.values()))
    successor.restore(key, state)
    assert orjson.dumps(successor.state(key)) == orjson.dumps(sa.trainer.state(key))  # resumes exactly


class Refusing(Gate):
    def passes(self) -> bool:
        self.rejected += 1
        return False


async def test_a_version_the_quality_gate_refuses_is_counted_and_not_published(sa):
    key = "propensity:cart_abandonment"
    sa.trainer.gates[key] = Refusing()
    async with sa.train.test_context() as agent:
        for i in range(4):  # 1.5 s apart: every label is a due publication of the changed model
            await agent.put(label(i, i % 2 == 0), key=b"cart_abandonment", timestamp=T0 + 1.5 * i)
    published = [k for (batch,), _ in sa.outbox.flush.await_args_list
                 for t, k, _, _ in batch if t == sa.settings.model_params_topic]  # fmt: skip
    assert key.encode() not in published
    assert sa.metrics.models_rejected[(key,)]._value.get() == sa.trainer.rejected[key] == 4
    assert sa.trainer_state[key]["n_labels"] == 4  # learning goes on; the served version stays


async def test_the_segment_state_and_its_ring_are_persisted_with_every_batch(sa):
    """Persisted only at publications, a trainer crash lost every sample since the last one (a successor's
    segments then differed from a fold of the committed inputs). Each batch writes the core and its ring chunk."""
    sample = orjson.dumps({"kind": "segment_sample", "schema": "traits-v1", "traits": [0.5] * len(TRAIT_NAMES)})
    async with sa.train.test_context() as agent:
        await agent.put(sample, key=b"segments", timestamp=T0)  # published at once: version 1
        await agent.put(sample, key=b"segments", timestamp=T0 + 0.1)  # learned, not yet published: persisted
        assert sa.trainer_state["segments"]["n"] == 2 and sa.trainer_state["segments"]["version"] == 1
        assert len(sa.trainer_state["segments/ring/0"]["samples"]) == 2
        await agent.put(b'{"kind": "flush"}', key=b"flush", timestamp=T0 + 5)
        state = sa.trainer_state["segments"]
    assert state["version"] == 2 and state["n"] == 2 and state["ring_len"] == 2 and state["buffer"] == []
