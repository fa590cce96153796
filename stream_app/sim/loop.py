"""The closed loop: the simulator's events through the replay engine and trainer, the decisions back.

Policies compared at equal push volume. Every policy runs through the same engine, campaign, guardrails,
holdout and exploration; only the score differs, and the score is a **rank**: the percentile of the
policy's raw score among its own last ``RANK_WINDOW`` candidates (eligible triggers). The campaign's
threshold is ``1 - push_rate`` (and its cold-start exploration share ``push_rate``), so every policy
pushes the top ``push_rate`` of its candidates by its own criterion:

- ``none``: the simulator delivers no push (the organic baseline; the engine is not even needed);
- ``random``: a seeded uniform draw;
- ``propensity``: P(convert | push) from the campaign's model learned on all its labels (the product's
  ``propensity`` mode);
- ``uplift``: the product's ``uplift`` mode: the measured uplift of the user's segment (pushed minus holdout
  conversion rate, shrunk to the campaign's) plus 0.001 x (P(convert | push) - P(convert | no push)) from the
  treated and control models, which orders users within a segment;
- ``oracle``: the true uplift of the user at the push's delivery time, from the simulator.

Guardrails (cooldown, frequency cap, minimum gap, quiet hours) and opted-out users then suppress some of
the chosen pushes, more for a policy that keeps choosing the same users. So each policy's rank also carries
a bias, steered by a feedback loop (once its model is warm) until the share of its decisions that are
pushes or holdouts (pushes withheld) equals ``push_rate``: delivered volumes come out nearly equal, and the
report normalises per push anyway.
"""

from __future__ import annotations

import bisect
import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import orjson

from stream_app.campaigns import parse_rule
from stream_app.core.features import INDEX, extract_traits, feature_dict
from stream_app.core.pipeline import Models
from stream_app.core.policy import Campaign, Guardrails, next_allowed_ms
from stream_app.core.profile import DAY_MS, HOUR_MS, Profile
from stream_app.core.propensity import PropensityScorer
from stream_app.core.segments import SegmentModel
from stream_app.core.trainer import SEGMENTS_KEY, propensity_key, uplift_key
from stream_app.core.uplift import UpliftScorer
from stream_app.engine import ModelStore
from stream_app.replay import Replayer
from stream_app.settings import Settings
from stream_app.sim.population import RESPONSES, User, annoyance_after_window, expected_uplift, posterior_mix
from stream_app.sim.simulator import SimConfig, Simulator
from stream_app.sim.stats import adjusted_rand_index

POLICIES = ("none", "random", "propensity", "uplift", "oracle")
# the ceiling study's oracles (``sim.ceiling``): the true uplift as known from the user's type only, or from its
# type and response class, not the user's own latent draws (``population.expected_uplift``)
# (``thompson_oracle``: the posterior oracle scoring one class drawn from its posterior: it explores users
# whose class is uncertain, so their clicks reveal it, instead of always pushing the likeliest responders)
# (``payments_oracle``, ``type_payments_oracle``: the posterior or type oracle scoring incremental payments, the
# annoyance after the attribution window too)
CEILING_POLICIES = ("type_oracle", "posterior_oracle", "thompson_oracle", "payments_oracle", "type_payments_oracle",
                    "class_oracle")  # fmt: skip
RANK_WINDOW = 2000
CAMPAIGN = "cart_abandonment"


def eval_campaign(push_rate: float, mode: str = "propensity") -> Campaign:
    """The evaluated campaign: the shipped cart-abandonment campaign, its threshold a rank (see module doc).

    Exploration is 1% of below-threshold decisions (the shipped 5% would add as many random pushes as a 5%
    push rate targets, and make every policy half random).
    """
    return Campaign(
        name=CAMPAIGN, triggers=("click",), priority=3,
        eligibility=(parse_rule("clicks >= 3"), parse_rule("hours_since_payment >= 24")),
        attribution_window_ms=24 * HOUR_MS, threshold=1 - push_rate, cooldown_ms=48 * HOUR_MS, holdout_share=0.1,
        exploration_share=0.01, cold_start_share=push_rate, prior=0.03, min_labels=200, mode=mode,
    )  # fmt: skip


class RankScorer:
    """Duck-types ``PropensityScorer`` for ``policy.decide``: the score is the percentile of a raw score.

    Stateful on purpose (the window of recent raw scores); the evaluation runs it in one process, in
    event-time order, so a run stays deterministic.
    """

    def __init__(self, raw: Callable[[Sequence[float]], float], warm: Callable[[], bool],
                 info: Callable[[], PropensityScorer], target: float, window: int = RANK_WINDOW,
                 gain: float = 0.01) -> None:  # fmt: skip
        self.raw, self.warm, self.info, self.window = raw, warm, info, window
        self.target, self.gain = target, gain
        self.bias = 0.0  # added to the rank so that the realised push share meets the target
        self.sorted: list[float] = []
        self.fifo: deque[float] = deque()
        self.last_raw = float("nan")

    def observe(self, pushed: bool) -> None:
        """Feedback from one decision (a holdout counts as a push): raise the bias while pushes fall short."""
        if self.warm():
            self.bias = min(max(self.bias + self.gain * (self.target - pushed), -1.0), 1.0)

    @property
    def is_warm(self) -> bool:
        return self.warm()

    @property
    def version(self) -> int:
        return self.info().version

    @property
    def n_labels(self) -> int:
        return self.info().n_labels

    def predict_one(self, x: Sequence[float]) -> float:
        s = self.raw(x)
        self.last_raw = s
        rank = bisect.bisect_left(self.sorted, s) / len(self.sorted) if self.sorted else 0.0
        bisect.insort(self.sorted, s)
        self.fifo.append(s)
        if len(self.fifo) > self.window:
            old = self.fifo.popleft()
            del self.sorted[bisect.bisect_left(self.sorted, old)]
        return min(max(rank + self.bias, 0.0), 1.0)

    def contributions(self, x: Sequence[float], top: int = 3) -> list[tuple[str, float]]:
        return []


@dataclass
class RunResult:
    """What one closed-loop run measured (plain arrays: cheap to send between processes)."""

    policy: str
    seed: int
    counts: dict[str, int]
    payments: np.ndarray  # per user
    pushes: np.ndarray  # per user, delivered
    opted_out: np.ndarray  # per user, bool
    types: np.ndarray  # per user, latent type index
    decisions: dict[str, np.ndarray] = field(default_factory=dict)  # push and holdout decisions
    labels: dict[str, np.ndarray] = field(default_factory=dict)  # labels with the served model's score
    segments: dict[str, list[float]] = field(default_factory=dict)  # per day: ARI vs types, vs the day before
    final_params: dict[str, dict] = field(default_factory=dict)  # the last published version of each model
    events: int = 0
    seconds: float = 0.0


def run(policy: str, config: SimConfig, push_rate: float = 0.05, settings: Settings | None = None,
        segments_every_day: bool = False) -> RunResult:  # fmt: skip
    """One closed-loop simulation of ``policy``."""
    import time

    t_start = time.perf_counter()
    campaign = eval_campaign(push_rate)
    sim = Simulator(config, deliver=policy != "none", windows={CAMPAIGN: campaign.attribution_window_ms},
                    click_triggered=frozenset({CAMPAIGN}))  # fmt: skip
    if policy == "none":
        n = sum(1 for _ in sim)
        return _result(policy, config, sim, n, t_start)
    if policy not in POLICIES + CEILING_POLICIES:
        raise ValueError(f"unknown policy {policy!r}; use one of {POLICIES + CEILING_POLICIES}")
    guardrails = Guardrails()
    treated = {"s": PropensityScorer.cold(CAMPAIGN, campaign.prior, campaign.min_labels)}
    context: dict[str, Any] = {"user": None, "ts": 0, "segment": -1}
    uplift = {"s": UpliftScorer.cold(CAMPAIGN, campaign.min_labels)}
    rng = random.Random(f"policy:{config.seed}")

    def oracle(_x: Sequence[float]) -> float:
        user = sim.by_id[context["user"]]
        at = next_allowed_ms(context["ts"], user.tz_offset_min, guardrails)
        p1, p0 = sim.probabilities(user, at, campaign.attribution_window_ms, context["ts"])
        return p1 - p0

    draw = random.Random(f"thompson:{config.seed}")

    def known(know_class: bool, posterior: bool = False, sample: bool = False,
              horizon: bool = False) -> Callable[[Sequence[float]], float]:  # fmt: skip
        def score(x: Sequence[float]) -> float:
            user = sim.by_id[context["user"]]
            at = next_allowed_ms(context["ts"], user.tz_offset_min, guardrails)
            pushes = sim.dynamics[user.index].pushes
            mix = history_mix(user, x) if posterior else None
            if mix is not None and sample:
                mix = draw.choices(mix, weights=[m[1] for m in mix])
            window = campaign.attribution_window_ms
            uplift = expected_uplift(user, at, window, pushes, context["ts"], know_class, mix)
            if horizon:
                prior = [(user.response, 1.0)] if know_class else list(zip(RESPONSES, user.type.responses, strict=True))
                uplift -= annoyance_after_window(user, at, window, pushes, mix or prior)
            return uplift

        return score

    raws: dict[str, Callable[[Sequence[float]], float]] = {
        "type_oracle": known(False),
        "class_oracle": known(True),
        "posterior_oracle": known(False, posterior=True),
        "thompson_oracle": known(False, posterior=True, sample=True),
        "payments_oracle": known(False, posterior=True, horizon=True),
        "type_payments_oracle": known(False, horizon=True),
        "random": lambda _x: rng.random(),
        "propensity": lambda x: treated["s"].predict_one(x),
        "uplift": lambda x: uplift["s"].predict_uplift_one(feature_dict(x, context["segment"])),
        "oracle": oracle,
    }
    warm = {
        "propensity": lambda: treated["s"].is_warm,
        "uplift": lambda: uplift["s"].is_warm,  # as policy.decide
    }.get(policy, lambda: True)
    scorer = RankScorer(raws[policy], warm, lambda: treated["s"], target=push_rate)
    store = ModelStore(Models(SegmentModel(k=(settings or Settings()).segments_k), {CAMPAIGN: scorer}))  # type: ignore[dict-item]

    final: dict[str, dict] = {}

    def install(key: str, params: dict) -> None:
        final[key] = params
        if key == SEGMENTS_KEY:
            store.apply(key, params)
            if store.current.segments.version == params["version"]:  # installed: let it report each segment
                store.current = replace(store.current, segments=_SegmentSpy.from_params(params).watch(context))
        elif key == uplift_key(CAMPAIGN):
            uplift["s"] = UpliftScorer.from_params(params)
        elif key == propensity_key(CAMPAIGN):
            treated["s"] = PropensityScorer.from_params(params)

    trainer_mode = "uplift" if policy == "uplift" else "propensity"
    replayer = Replayer(settings, campaigns=(campaign,), guardrails=guardrails,
                        trainer_campaigns=(eval_campaign(push_rate, trainer_mode),), models=store, install=install,
                        keep=False)  # fmt: skip
    decisions: list[tuple] = []
    labels: list[tuple] = []
    seg_days: dict[str, list[float]] = {"day": [], "ari_types": [], "ari_previous": []}
    previous: dict[str, int] | None = None
    next_day = config.t0_ms + DAY_MS
    n = 0
    for envelope in sim:
        ts = envelope["timestamp_ms"]
        if segments_every_day and ts >= next_day:
            current = _assign_segments(replayer, store, next_day)
            day = (next_day - config.t0_ms) // DAY_MS
            seg_days["day"].append(day)
            seg_days["ari_types"].append(_ari_vs_types(current, sim))
            seg_days["ari_previous"].append(_ari_between(previous, current))
            previous, next_day = current, next_day + DAY_MS
        value = envelope["value"]
        context["user"] = value.get("user_id") if isinstance(value, dict) else None
        context["ts"] = ts
        served = treated["s"]  # the version that scores this message's labels (progressive)
        for name, record in replayer.feed(orjson.dumps(envelope)):
            if name == "audit":
                d = orjson.loads(record)
                scorer.observe(d["action"] in ("push", "holdout"))  # a holdout is a push withheld
                truth = sim.observe(d)
                if truth is not None:
                    user = int(truth.user_id[1:])
                    decisions.append((truth.decided_at_ms, truth.action == "push", truth.p_push, truth.p_no,
                                      scorer.last_raw, d["score"], truth.type_index, user))  # fmt: skip
            elif name == "model_inputs" and record.startswith(b'{"kind":"label"'):
                lab = orjson.loads(record)
                truth = sim.truths.get(lab["decision_id"])
                if truth is None:
                    continue
                pushed = lab["action"] == "push"
                model = served
                labels.append((lab["decided_at_ms"], lab["labelled_at_ms"], pushed, lab["converted"],
                               model.predict_one(lab["features"]), truth.p_push if pushed else truth.p_no,
                               truth.uplift, truth.score, int(truth.user_id[1:]), model.is_warm, truth.p_push,
                               truth.p_no, lab["segment"], lab["features"], bool(lab.get("attributed"))))  # fmt: skip
        n += 1
    result = _result(policy, config, sim, n, t_start)
    cols = ("decided_at_ms", "pushed", "p_push", "p_no", "raw", "rank", "type", "user")
    result.decisions = {c: np.asarray([d[i] for d in decisions]) for i, c in enumerate(cols)}
    cols = ("decided_at_ms", "labelled_at_ms", "pushed", "converted", "model", "true_p", "true_uplift", "rank",
            "user", "warm", "p_push", "p_no", "segment", "features", "attributed")  # fmt: skip
    result.labels = {c: np.asarray([x[i] for x in labels]) for i, c in enumerate(cols)}
    result.segments = seg_days
    result.final_params = final
    result.seconds = time.perf_counter() - t_start
    return result


def history_mix(user: User, x: Sequence[float]) -> list[tuple]:
    """``population.posterior_mix`` from what a decision's features show of the user: its pushes, clicks through
    them, payments and days known (the ceiling study's posterior oracle)."""
    n, k, m = (round(math.expm1(x[INDEX[f]])) for f in ("log_pushes", "log_push_clicks", "log_payments"))
    return posterior_mix(user.type, n, k, m, math.expm1(x[INDEX["log_days_known"]]))


class _SegmentSpy(SegmentModel):
    """The installed segment model, also noting the last segment it gave: the engine finds the user's segment
    just before it scores, and the uplift policy's raw score (a function of the features) needs it."""

    def watch(self, context: dict[str, Any]) -> _SegmentSpy:
        self.context = context
        return self

    def predict_one(self, x: Sequence[float]) -> int:
        segment = super().predict_one(x)
        self.context["segment"] = segment
        return segment


def _result(policy: str, config: SimConfig, sim: Simulator, n: int, t_start: float) -> RunResult:
    import time

    return RunResult(
        policy=policy, seed=config.seed, counts=dict(sim.counts),
        payments=np.asarray([d.payments for d in sim.dynamics]),
        pushes=np.asarray([len(d.pushes) for d in sim.dynamics]),
        opted_out=np.asarray([d.opted_out for d in sim.dynamics]),
        types=np.asarray([u.type_index for u in sim.users]), events=n, seconds=time.perf_counter() - t_start,
    )  # fmt: skip


def _assign_segments(replayer: Replayer, store: ModelStore, now_ms: int) -> dict[str, int]:
    """Every known user's segment under the current segment model, from their profile as of ``now_ms``."""
    model = store.current.segments
    out = {}
    for user_id, raw in replayer.store.data.items():
        d = orjson.loads(raw)
        if not isinstance(d, dict) or not d.get("p"):
            continue
        profile = Profile.from_dict(d["p"])
        out[user_id] = model.predict_one(extract_traits(profile, max(now_ms, profile.last_ms)))
    return out


def _ari_vs_types(assigned: dict[str, int], sim: Simulator) -> float:
    pairs = [(seg, sim.by_id[u].type_index) for u, seg in assigned.items() if seg >= 0]
    if len(pairs) < 2:
        return float("nan")
    return adjusted_rand_index([p[0] for p in pairs], [p[1] for p in pairs])


def _ari_between(old: dict[str, int] | None, new: dict[str, int]) -> float:
    if not old:
        return float("nan")
    common = [u for u in new if u in old and old[u] >= 0 and new[u] >= 0]
    if len(common) < 2:
        return float("nan")
    return adjusted_rand_index([old[u] for u in common], [new[u] for u in common])
