import random
from collections import Counter
from math import comb

import orjson

from stream_app.core.segments import SegmentModel, drift


def adjusted_rand_index(a: list[int], b: list[int]) -> float:
    pairs = Counter(zip(a, b, strict=True))
    sum_ij = sum(comb(n, 2) for n in pairs.values())
    sum_a = sum(comb(n, 2) for n in Counter(a).values())
    sum_b = sum(comb(n, 2) for n in Counter(b).values())
    expected = sum_a * sum_b / comb(len(a), 2)
    return (sum_ij - expected) / ((sum_a + sum_b) / 2 - expected)


CENTERS = [(0, 0, 0), (6, 0, 1), (0, 6, -1), (5, 5, 4)]


def blobs(n: int, seed: int) -> tuple[list[list[float]], list[int]]:
    rnd = random.Random(seed)
    xs, ys = [], []
    for _ in range(n):
        t = rnd.randrange(len(CENTERS))
        xs.append([c + rnd.gauss(0, 1) for c in CENTERS[t]])
        ys.append(t)
    return xs, ys


def test_recovers_planted_clusters_online():
    m = SegmentModel(k=4, warmup=300, seed=1)
    xs, _ = blobs(5000, seed=2)
    for x in xs:
        m.learn_one(x)
    test_x, test_y = blobs(2000, seed=3)
    ari = adjusted_rand_index([m.predict_one(x) for x in test_x], test_y)
    assert ari > 0.9, ari


def test_ids_stay_stable_while_learning_and_predict_does_not_mutate():
    m = SegmentModel(k=4, warmup=300, seed=1)
    xs, _ = blobs(3000, seed=4)
    for x in xs[:1000]:
        m.learn_one(x)
    probe, _ = blobs(500, seed=5)
    before_ids = [m.predict_one(x) for x in probe]
    snapshot = orjson.dumps(m.to_params())
    assert [m.predict_one(x) for x in probe] == before_ids
    assert orjson.dumps(m.to_params()) == snapshot
    old = SegmentModel.from_params(m.to_params())
    for x in xs[1000:]:
        m.learn_one(x)
    after_ids = [m.predict_one(x) for x in probe]
    agreement = sum(a == b for a, b in zip(before_ids, after_ids, strict=True)) / len(probe)
    assert agreement > 0.95  # same data, more learning: "segment j" still means the same region
    assert max(drift(old, m)) < 0.5


def test_params_round_trip_through_json_and_seeded_runs_are_identical():
    xs, _ = blobs(800, seed=6)
    a, b = SegmentModel(k=4, warmup=300, seed=9), SegmentModel(k=4, warmup=300, seed=9)
    for x in xs:
        a.learn_one(x)
        b.learn_one(x)
    assert a.to_params() == b.to_params()
    c = SegmentModel.from_params(orjson.loads(orjson.dumps(a.to_params())))
    assert c.to_params() == a.to_params()
    assert [c.predict_one(x) for x in xs] == [a.predict_one(x) for x in xs]


def test_warming_up_predicts_minus_one():
    m = SegmentModel(k=3, warmup=10)
    m.learn_one([1.0, 2.0])
    assert m.predict_one([1.0, 2.0]) == -1


def test_refits_leave_the_optimum_that_immature_early_samples_put_it_in():
    """Early samples (new users: few events) sit near the middle; the first fit on them is poor. Refits on
    the recent samples recover the clusters; online updates alone do not."""
    rnd = random.Random(8)
    early = [[c * 0.1 + rnd.gauss(0, 0.05) for c in CENTERS[rnd.randrange(2)]] for _ in range(500)]
    later, _ = blobs(4000, seed=9)
    refitting, online_only = SegmentModel(k=4, warmup=500, seed=1), SegmentModel(k=4, warmup=500, refit_every=10**9)
    for x in [*early, *later]:
        refitting.learn_one(x)
        online_only.learn_one(x)
    test_x, test_y = blobs(2000, seed=10)
    assert adjusted_rand_index([refitting.predict_one(x) for x in test_x], test_y) > 0.9
    assert adjusted_rand_index([online_only.predict_one(x) for x in test_x], test_y) < 0.8


def test_a_refit_keeps_segment_ids_when_the_clusters_stay():
    m = SegmentModel(k=4, warmup=300, refit_every=400, seed=2)
    xs, _ = blobs(1199, seed=11)
    for x in xs:
        m.learn_one(x)
    probe, _ = blobs(500, seed=12)
    before = [m.predict_one(x) for x in probe]
    m.learn_one(xs[0])  # the 1,200th sample: a refit (new scaler, new centroids, matched to the old ids)
    assert m.n % m.refit_every == 0
    assert sum(a == b for a, b in zip(before, [m.predict_one(x) for x in probe], strict=True)) / len(probe) > 0.97
