"""The trainer: the single owner of every model's learning state.

Workers never learn; they score with the latest published snapshot. Labels and segment samples from
every partition flow to one trainer (a single-partition topic), which learns from each, keeps its full
learning state as explicit parameters (so another process can take over after a crash), and publishes a
new version of a model at most every ``publish_every_ms`` of trainer time when it has changed.

Quality is measured progressively, as in River's progressive validation: each label is first scored
by the current model, then learned from. Per campaign: log loss, ROC AUC (exact, over a bounded
window of recent labels), mean label delay, and conversion rates of treated (pushed) versus holdout
users, whose difference is the measured uplift.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from stream_app.core.events import EventLimits, InvalidEvent, decode_object
from stream_app.core.features import (
    FEATURE_NAMES,
    PUSH_RESPONSE_FEATURES,
    RESPONSE_HISTORY,
    TRAIT_NAMES,
    TRAITS_SCHEMA,
    feature_dict,
)
from stream_app.core.pipeline import Campaign
from stream_app.core.propensity import PropensityLearner, PropensityScorer
from stream_app.core.segments import SegmentModel
from stream_app.core.uplift import UpliftLearner, UpliftScorer, uplift_params

SEGMENTS_KEY = "segments"
# The segment learner's ring of recent samples (~0.8 MB as JSON) is persisted in chunks of RING_CHUNK slots, each
# under its own changelog key: a batch writes the model's small core and the chunks its samples touched, so the
# changelog holds the exact learning state after every batch (a successor loses no sample) for ~40 KB a batch.
RING_PREFIX = "segments/ring/"
RING_CHUNK = 50


def uplift_key(campaign: str) -> str:
    """The uplift model of an uplift campaign."""
    return f"uplift:{campaign}"


UPLIFT_RESIDUAL_STRENGTH = 1000.0  # labels of shrinkage on the transformed-outcome part (see core/uplift.py)
# The residual (transformed outcome) reads the segment only: a holdout label weighs 1/holdout_share, and with
# ~700 holdout labels per 1,500 users x 4 weeks a residual on all features fitted noise (simulator, seed 1-2,
# random policy's labels after warm-up: true uplift of the top-scored 20% 64/62 per 1,000 with every feature,
# 73/75 with the segment only). PUSH_RESPONSE_FEATURES differ between the arms anyway and must never be in it.
UPLIFT_RESIDUAL_EXCLUDE = tuple(dict.fromkeys((*PUSH_RESPONSE_FEATURES, *RESPONSE_HISTORY, *FEATURE_NAMES)))


def propensity_key(campaign: str) -> str:
    return f"propensity:{campaign}"


@dataclass
class Quality:
    """Progressive quality of one campaign's model on its delayed labels."""

    window: int = 2000
    n: int = 0
    log_loss_sum: float = 0.0
    delay_ms_sum: float = 0.0
    recent: deque = field(default_factory=deque)  # (score, converted) for the windowed AUC
    treated: list[int] = field(default_factory=lambda: [0, 0])  # [labels, conversions] of pushed users
    holdout: list[int] = field(default_factory=lambda: [0, 0])

    def add(self, score: float, converted: bool, delay_ms: int, action: str) -> None:
        p = min(max(score, 1e-7), 1 - 1e-7)
        self.n += 1
        self.log_loss_sum += -math.log(p if converted else 1 - p)
        self.delay_ms_sum += delay_ms
        self.recent.append((score, converted))
        if len(self.recent) > self.window:
            self.recent.popleft()
        group = self.treated if action == "push" else self.holdout
        group[0] += 1
        group[1] += int(converted)

    @property
    def log_loss(self) -> float:
        return self.log_loss_sum / self.n if self.n else math.nan

    @property
    def mean_delay_s(self) -> float:
        return self.delay_ms_sum / self.n / 1000 if self.n else math.nan

    @property
    def auc(self) -> float:
        """Exact ROC AUC over the recent window (ties count half); NaN until both classes occur."""
        ranked = sorted(self.recent, key=lambda sc: sc[0])
        pos = sum(1 for _, y in ranked if y)
        neg = len(ranked) - pos
        if not pos or not neg:
            return math.nan
        rank_sum, i = 0.0, 0
        while i < len(ranked):
            j = i
            while j + 1 < len(ranked) and ranked[j + 1][0] == ranked[i][0]:
                j += 1
            avg_rank = (i + j) / 2 + 1
            rank_sum += avg_rank * sum(1 for k in range(i, j + 1) if ranked[k][1])
            i = j + 1
        return (rank_sum - pos * (pos + 1) / 2) / (pos * neg)

    @property
    def uplift(self) -> float:
        """Conversion rate of pushed users minus that of holdout users (NaN until both have labels)."""
        if not self.treated[0] or not self.holdout[0]:
            return math.nan
        return self.treated[1] / self.treated[0] - self.holdout[1] / self.holdout[0]


@dataclass
class Gate:
    """The quality gate of one model: a new version is published only if the learner's progressive log loss over
    the last ``window`` labels is not worse than that of the versions workers served for those labels by more
    than ``margin`` (relative). Progressive: each label is scored by the learner as it stood just before learning
    it and by the version being served, so neither had seen the label. The first version, and any while fewer
    than ``min_labels`` labels have been scored by a served version, pass."""

    margin: float = 0.02
    window: int = 500
    min_labels: int = 200
    losses: deque = field(default_factory=deque)  # (candidate loss, serving loss) per label since the last version
    rejected: int = 0  # evaluations that kept the serving version

    def add(self, candidate: float, serving: float, y: bool) -> None:
        self.losses.append((_loss(candidate, y), _loss(serving, y)))
        if len(self.losses) > self.window:
            self.losses.popleft()

    def passes(self) -> bool:
        if len(self.losses) < self.min_labels:
            return True
        candidate = sum(c for c, _ in self.losses) / len(self.losses)
        serving = sum(s for _, s in self.losses) / len(self.losses)
        if candidate <= serving * (1 + self.margin):
            return True
        self.rejected += 1
        return False


def _loss(p: float, y: bool) -> float:
    p = min(max(p, 1e-7), 1 - 1e-7)
    return -math.log(p if y else 1 - p)


class Trainer:
    def __init__(self, campaigns: tuple[Campaign, ...], segments_k: int = 6, publish_every_ms: int = 2000,
                 gate_margin: float = 0.02, gate_window: int = 500, gate_min_labels: int = 200,
                 decision_order: bool = False) -> None:  # fmt: skip
        self.campaigns = {c.name: c for c in campaigns}
        self.publish_every_ms = publish_every_ms
        self.learners = {propensity_key(c.name): PropensityLearner(c.name, c.prior, c.min_labels) for c in campaigns}
        self.uplifts = {uplift_key(c.name): UpliftLearner(UPLIFT_RESIDUAL_STRENGTH, UPLIFT_RESIDUAL_EXCLUDE, c.prior)
                        for c in campaigns if c.mode == "uplift"}  # fmt: skip
        self.segments = SegmentModel(k=segments_k)
        self.quality = {c.name: Quality() for c in campaigns}
        self.dirty: set[str] = set()
        self.last_publish_ms = -1
        # propensity models are gated against the version workers serve (None until the first publication)
        self.serving: dict[str, PropensityScorer | None] = dict.fromkeys(self.learners)
        self.gates = {k: Gate(gate_margin, gate_window, gate_min_labels) for k in self.learners}
        # uplift campaigns' P(convert | push) learns pushed labels only: gated on pushed labels
        self._treated_only = {propensity_key(c.name) for c in campaigns if c.mode == "uplift"}
        # positive labels waiting for their window to close: (closes at, sequence, record), per campaign's key
        self.delayed: dict[str, list[tuple[int, int, dict[str, Any]]]] = {k: [] for k in self.learners}
        self.watermark_ms = -(2**62)  # the newest label time seen
        self.decision_order = decision_order  # off: every label is learned on arrival
        self.seq = 0
        self.ring_touched: set[int] = set()  # chunks of the segment ring changed since the last ``states``
        self._ring: dict[int, list[list[float]]] = {}  # chunks read by ``restore``, assembled by ``restored``
        self._ring_len = 0

    def learn(self, record: dict[str, Any]) -> tuple[str, ...]:
        """Learn from one model-input record; return the keys of the models it changed (none if ignored)."""
        if record.get("kind") == "segment_sample":
            if record.get("schema") != self.segments.schema:
                return ()  # from a worker of another version (rolling upgrade): another vector
            seg = self.segments
            slot = len(seg.buffer) if len(seg.buffer) < seg.reservoir else seg.n % seg.reservoir  # as learn_one
            self.ring_touched.add(slot // RING_CHUNK)
            self.segments.learn_one(record["traits"])
            self.dirty.add(SEGMENTS_KEY)
            return (SEGMENTS_KEY,)
        campaign = self.campaigns.get(record.get("campaign", ""))
        if record.get("kind") != "label" or campaign is None:
            return ()  # a campaign removed from the config: its late labels are dropped
        # Delayed feedback: a conversion is labelled when it happens, a non-conversion only when the window closes,
        # so learning labels as they arrive sees the positives of the last window but not yet their negatives,
        # and drifts high (simulator, random policy: mean prediction 0.082 vs 0.071 observed). With
        # ``decision_order`` a positive is learned when its window closes, as its negatives are: every label in
        # decision order (calibrated; a conversion reaches the model one window later).
        key = propensity_key(campaign.name)
        self.watermark_ms = max(self.watermark_ms, int(record["labelled_at_ms"]))
        changed: list[str] = []
        for c in self.campaigns.values():
            delayed = self.delayed[propensity_key(c.name)]
            while delayed and delayed[0][0] <= self.watermark_ms:
                changed += self._learn_label(c, heapq.heappop(delayed)[2])
        closes = int(record["decided_at_ms"]) + campaign.attribution_window_ms
        if self.decision_order and record["converted"] and closes > self.watermark_ms:
            self.seq += 1
            heapq.heappush(self.delayed[key], (closes, self.seq, record))
            return tuple(dict.fromkeys([*changed, key]))  # its state (the buffer) changed; no new version yet
        return tuple(dict.fromkeys([*changed, *self._learn_label(campaign, record)]))

    def _learn_label(self, campaign: Campaign, record: dict[str, Any]) -> tuple[str, ...]:
        key = propensity_key(campaign.name)
        learner = self.learners[key]
        x, y = record["features"], bool(record["converted"])
        pushed = record["action"] == "push"
        score = learner.predict_proba_one(x)[True]  # what the published scorer of this state answers
        self.quality[learner.campaign].add(score, y, record["labelled_at_ms"] - record["decided_at_ms"],
                                           record["action"])  # fmt: skip
        serving = self.serving[key]
        if serving is not None and (pushed or key not in self._treated_only):
            self.gates[key].add(score, serving.predict_one(x), y)
        uplift = self.uplifts.get(uplift_key(campaign.name))
        if uplift is None:
            learner.learn_one(x, y)
            self.dirty.add(key)
            return (key,)
        # uplift campaigns: P(convert | push) from pushed labels (explanations, quality), and the uplift model
        # from both arms; the holdout is randomised per user with a known share: P(pushed) = 1 - holdout_share
        if pushed:
            learner.learn_one(x, y)
            self.dirty.add(key)
        attributed, segment = record.get("attributed"), int(record.get("segment", -1))
        uplift.learn_one(feature_dict(x, segment), pushed, y, propensity=1 - campaign.holdout_share,
                         attributed=None if attributed is None else bool(attributed) and pushed)  # fmt: skip
        self.dirty.add(uplift_key(campaign.name))
        return (key, uplift_key(campaign.name)) if pushed else (uplift_key(campaign.name),)

    def due(self, now_ms: int) -> dict[str, dict[str, Any]]:
        """New versions of changed models, if ``publish_every_ms`` has passed; marks them published."""
        if not self.dirty or now_ms - self.last_publish_ms < self.publish_every_ms:
            return {}
        self.last_publish_ms = now_ms
        out = {}
        for key in sorted(self.dirty):
            if key == SEGMENTS_KEY:
                self.segments.version += 1
                out[key] = self.segments.to_params(with_buffer=False)
            elif key in self.uplifts:
                self.uplifts[key].version += 1
                out[key] = self._uplift_params(key, with_covariance=False)
            else:
                if not self.gates[key].passes():
                    continue  # stays dirty: evaluated again at the next publication, on newer labels
                learner = self.learners[key]
                learner.version += 1
                out[key] = learner.to_params(with_covariance=False)
                self.serving[key] = PropensityScorer.from_params(out[key])
        self.dirty -= set(out)
        return out

    @property
    def rejected(self) -> dict[str, int]:
        """Per model key: publications the quality gate refused (``stream_app_model_versions_rejected_total``)."""
        return {k: g.rejected for k, g in self.gates.items()}

    def state(self, key: str) -> dict[str, Any]:
        """The full learning state of one model (what a successor trainer restores); for the segments, its
        core without the sample ring (``states`` adds the ring's changed chunks)."""
        if key == SEGMENTS_KEY:
            return {
                **self.segments.to_params(with_buffer=False),
                "ring_chunk": RING_CHUNK,
                "ring_len": len(self.segments.buffer),
            }
        if key in self.uplifts:
            return self._uplift_params(key, with_covariance=True)
        return {**self.learners[key].to_params(), "delayed": [r for _, _, r in sorted(self.delayed[key])]}

    def states(self, keys: Iterable[str]) -> list[tuple[str, dict[str, Any]]]:
        """The changelog records that persist these models' learning state: each key's ``state``, and with the
        segments the ring chunks changed since the last call.

        >>> t = Trainer(())
        >>> _ = t.learn({"kind": "segment_sample", "schema": t.segments.schema, "traits": [0.0] * 41})
        >>> [k for k, _ in t.states(["segments"])], t.states(["segments"])[1:]
        (['segments', 'segments/ring/0'], [])
        """
        out = []
        for key in keys:
            out.append((key, self.state(key)))
            if key == SEGMENTS_KEY:
                buffer = self.segments.buffer
                for i in sorted(self.ring_touched):
                    out.append(
                        (
                            f"{RING_PREFIX}{i}",
                            {"schema": self.segments.schema, "samples": buffer[i * RING_CHUNK : (i + 1) * RING_CHUNK]},
                        )
                    )
                self.ring_touched.clear()
        return out

    def _uplift_params(self, key: str, with_covariance: bool) -> dict[str, Any]:
        campaign = self.campaigns[key.split(":", 1)[1]]
        return uplift_params(campaign.name, campaign.min_labels, self.uplifts[key], with_covariance)

    def restore(self, key: str, params: dict[str, Any]) -> None:
        """Take one record of the trainer's changelog (``check_state`` passed); call ``restored`` after the last."""
        if key.startswith(RING_PREFIX):
            if params.get("schema") == self.segments.schema:
                self._ring[int(key.removeprefix(RING_PREFIX))] = [list(v) for v in params["samples"]]
        elif key == SEGMENTS_KEY:
            if params.get("schema") == self.segments.schema:  # else learned on another vector: start afresh
                self.segments = SegmentModel.from_params(params)
                self._ring_len = params.get("ring_len", 0)
                if "ring_chunk" not in params:  # an older trainer kept the ring in this record: chunk all of it
                    self.ring_touched = set(range(-(-len(self.segments.buffer) // RING_CHUNK)))
        elif key in self.uplifts:
            if params.get("kind") == "uplift_learner":  # else an older trainer's per-segment counts: start afresh
                self.uplifts[key] = UpliftLearner.from_params(params)
                # a state saved before RESPONSE_HISTORY existed: its residual must not start reading them either
                self.uplifts[key].exclude |= frozenset(UPLIFT_RESIDUAL_EXCLUDE)
        elif key in self.learners:
            self.learners[key] = PropensityLearner.from_params(params)
            campaign = self.campaigns[self.learners[key].campaign]
            for record in params.get("delayed", []):
                self.seq += 1
                closes = int(record["decided_at_ms"]) + campaign.attribution_window_ms
                heapq.heappush(self.delayed[key], (closes, self.seq, record))
            if params.get("version"):  # what workers serve: the successor gates against it
                self.serving[key] = PropensityScorer.from_params(params)

    def restored(self) -> str | None:
        """Assemble the segment ring from its chunks; why it could not be (then it starts empty), or None.

        A ring that does not hold exactly the samples its core counted (a chunk lost or refused) is not used:
        refits would learn from a wrong window, so the model keeps its centroids and refills the ring."""
        chunks, self._ring = self._ring, {}
        seg = self.segments
        if seg.buffer:  # restored from an older trainer's single record
            return None
        want = min(int(self._ring_len), seg.reservoir)
        parts = [chunks.get(i, []) for i in range(-(-want // RING_CHUNK))]
        if all(len(part) == min(RING_CHUNK, want - i * RING_CHUNK) for i, part in enumerate(parts)):
            seg.buffer = [v for part in parts for v in part]
            return None
        self.ring_touched = set()
        return "segment_ring_incomplete"  # the ring refills (learn_one appends while it is short)


# -- what the trainer and the workers read: checked before use, never trusted -----------------------------------

# what the trainer reads from a label (required), and what it may carry besides (type-checked when present)
LABEL_FIELDS = {"campaign": str, "action": str, "converted": bool, "features": list, "decided_at_ms": int,
                "labelled_at_ms": int}  # fmt: skip
LABEL_OPTIONAL = {"decision_id": str, "model_version": int, "action_probability": (int, float), "segment": int,
                  "attributed": (bool, type(None))}  # fmt: skip


MAX_TIME_MS = 2**53  # label times: a record whose times serialise as no 64-bit integer is no label
MAX_MODEL_FEATURES = 256  # core/uplift.py's max_features: a linear model never knows more names
INPUT_LIMITS = EventLimits(max_bytes=256 * 1024)


def parse_model_input(raw: bytes | None, limits: EventLimits = INPUT_LIMITS) -> dict[str, Any]:
    """A model-inputs record the trainer can learn from, or ``InvalidEvent`` with the reason it cannot.

    Workers write these records, but anything can write to a topic: a record that is not a JSON object, or a
    label whose fields have the wrong types, must be rejected here rather than fail inside the learner.

    >>> parse_model_input(b'{"kind": "flush"}')
    {'kind': 'flush'}
    >>> parse_model_input(b'[1, 2]')
    Traceback (most recent call last):
    ...
    stream_app.core.events.InvalidEvent: not_an_object: expected a JSON object, got an array
    >>> parse_model_input(b'{"kind": "segment_sample", "schema": "traits-v1", "traits": [1]}')
    Traceback (most recent call last):
    ...
    stream_app.core.events.InvalidEvent: wrong_type: traits must be 41 finite numbers
    """
    obj = decode_object(raw, limits)
    kind = obj.get("kind")
    if kind == "flush":
        return obj
    if kind == "segment_sample":
        if not isinstance(obj.get("schema"), str) or "traits" not in obj:
            raise InvalidEvent("missing_field", "a segment sample needs schema and traits")
        if obj["schema"] == TRAITS_SCHEMA and not _numbers(obj["traits"], len(TRAIT_NAMES)):
            raise InvalidEvent("wrong_type", f"traits must be {len(TRAIT_NAMES)} finite numbers")
        return obj
    if kind != "label":
        raise InvalidEvent("unknown_type", "kind must be label, segment_sample or flush")
    check_label(obj)
    return obj


def check_label(obj: dict[str, Any]) -> None:
    """Raise ``InvalidEvent`` unless ``obj`` is a label the trainer can learn from (or hold until its window
    closes: held labels are part of the trainer's state and restored from its changelog)."""
    for name in LABEL_FIELDS:
        if name not in obj:
            raise InvalidEvent("missing_field", f"a label needs {name}")
    for name, types in (LABEL_FIELDS | LABEL_OPTIONAL).items():
        v = obj.get(name)
        allowed = types if isinstance(types, tuple) else (types,)
        if name in obj and (not isinstance(v, allowed) or (isinstance(v, bool) and bool not in allowed)):
            raise InvalidEvent("wrong_type", f"label field {name} has the wrong type")
    if obj["action"] not in ("push", "holdout"):
        raise InvalidEvent("wrong_type", "label action must be push or holdout")
    if not _numbers(obj["features"], len(FEATURE_NAMES)):
        raise InvalidEvent("wrong_type", f"features must be {len(FEATURE_NAMES)} finite numbers")
    if not -1 <= obj.get("segment", -1) <= 63:
        raise InvalidEvent("wrong_type", "segment must be in -1..63")
    if not all(abs(obj[t]) <= MAX_TIME_MS for t in ("decided_at_ms", "labelled_at_ms")):
        raise InvalidEvent("wrong_type", "decided_at_ms and labelled_at_ms must be epoch ms within +-2^53")


def check_state(key: object, state: object) -> str | None:
    """Why a record of the trainer's own changelog cannot be restored (a bounded code), or None if it can:
    ``check_params`` for the state's model (version 0: never published; covariance, if present, checked too),
    the segment model's sample ring and the positives a propensity model holds until their windows close.

    >>> check_state("propensity:x", {"version": 0, "delayed": [{}]})
    'wrong_type'
    """
    if isinstance(key, str) and key.startswith(RING_PREFIX):
        index = key.removeprefix(RING_PREFIX)
        if not (
            index.isdigit() and len(index) <= 6 and isinstance(state, dict) and isinstance(state.get("schema"), str)
        ):
            return "wrong_type"
        samples = state.get("samples")
        if state["schema"] == TRAITS_SCHEMA and not (
            isinstance(samples, list) and len(samples) <= RING_CHUNK
            and all(_numbers(b, len(TRAIT_NAMES)) for b in samples)
        ):  # fmt: skip
            return "wrong_type"
        return None
    if (why := check_params(key, state, min_version=0)) is not None:
        return why
    assert isinstance(state, dict) and isinstance(key, str)  # checked above
    if key == SEGMENTS_KEY and state["schema"] == TRAITS_SCHEMA:
        if not _int(state.get("ring_len", 0)):
            return "wrong_type"
        buffer = state.get("buffer", [])
        if not isinstance(buffer, list) or not all(_numbers(b, len(TRAIT_NAMES)) for b in buffer):
            return "wrong_type"
    delayed = state.get("delayed", [])
    if not isinstance(delayed, list):
        return "wrong_type"
    for record in delayed:
        if not isinstance(record, dict):
            return "wrong_type"
        try:
            check_label(record)
        except InvalidEvent as bad:
            return bad.code
    return None


def _numbers(v: object, n: int | None = None) -> bool:
    if not isinstance(v, list) or (n is not None and len(v) != n):
        return False
    return all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in v)


def _int(v: object, lo: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _number(v: object, positive: bool = False) -> bool:
    return _numbers([v]) and (not positive or v > 0)  # type: ignore[operator]


def _strings(v: object, most: int = MAX_MODEL_FEATURES) -> bool:
    return isinstance(v, list) and len(v) <= most and all(isinstance(s, str) and len(s) <= 256 for s in v)


def _linear(p: object) -> bool:
    """A linear model's weights (core/uplift.py ``_Linear.state``): names and weights alike in number, finite,
    bounded; a covariance, where present (the trainer's state), square over the intercept and the weights."""
    if not isinstance(p, dict) or not _strings(p.get("names")) or len(set(p["names"])) != len(p["names"]):
        return False
    d = len(p["names"])
    if not (_numbers(p.get("weights"), d) and _number(p.get("intercept")) and _int(p.get("n"))
            and _int(p.get("dropped", 0))):  # fmt: skip
        return False
    cov = p.get("covariance")
    return cov is None or (isinstance(cov, list) and len(cov) == d + 1 and all(_numbers(r, d + 1) for r in cov))


def check_params(key: object, params: object, min_version: int = 1) -> str | None:
    """Why a model-params record cannot be installed (a bounded code), or None if it can.

    The topic is compacted and every worker reads it from the start at every start: one badly typed record
    there, if it raised, would stop every worker for ever. A candidate is checked field by field and then
    tried once (a score of a zero vector), so a version that installs is one that scores.

    >>> check_params("segments", {"version": "2"}), check_params("propensity:x", [])
    ('wrong_type', 'not_an_object')
    """
    if not isinstance(params, dict):
        return "not_an_object"
    if not isinstance(key, str) or not _int(params.get("version"), min_version):
        return "wrong_type"
    try:
        if key == SEGMENTS_KEY:
            if not isinstance(params.get("schema"), str) or not _int(params.get("k"), 2):
                return "wrong_type"
            if params["schema"] != TRAITS_SCHEMA:
                return None  # another trait vector: ModelStore ignores it, as it always did
            dims = params.get("dims")
            if not isinstance(dims, list) or not all(_int(d) and d < len(TRAIT_NAMES) for d in dims):
                return "wrong_type"
            width = len(dims) or len(TRAIT_NAMES)
            cents = params.get("centroids")
            if not isinstance(cents, list) or not all(_numbers(c, width) for c in cents):
                return "wrong_type"
            if cents and not (_numbers(params.get("mean"), width) and _numbers(params.get("scale"), width)
                              and all(s > 0 for s in params["scale"])):  # fmt: skip
                return "wrong_type"
            SegmentModel.from_params(params).predict_one([0.0] * len(TRAIT_NAMES))
        elif key.startswith("uplift:"):
            if params.get("campaign") != key.removeprefix("uplift:"):
                return "wrong_type"
            if "kind" not in params and "arms" in params:
                return None  # an older trainer's per-segment counts: ModelStore ignores it, as it did
            if (
                params.get("kind") != "uplift_learner"
                or not _number(params.get("residual_strength"), positive=True)
                or not _strings(params.get("exclude"))
                or not all(_int(params.get(f)) for f in ("min_labels", "n_treated", "n_control", "n_attributed"))
                or not (_linear(params.get("response")) and _linear(params.get("residual")))
            ):
                return "wrong_type"  # fmt: skip
            score = UpliftScorer.from_params(params).predict_uplift_one(dict.fromkeys(params["response"]["names"], 0.0))
            if not math.isfinite(score):
                return "wrong_type"
        elif key.startswith(("propensity:", "control:")):
            n = len(FEATURE_NAMES)
            if (
                params.get("campaign") != key.split(":", 1)[1]
                or params.get("features") != list(FEATURE_NAMES)
                or not all(_numbers(params.get(f), n) for f in ("weights", "mean", "scales", "m2"))
                or not all(s > 0 for s in params["scales"])
                or not _number(params.get("intercept"))
                or not _number(params.get("prior"))
                or not 0 < params["prior"] < 1
                or not _number(params.get("prior_var"), positive=True)
                or not all(_int(params.get(f)) for f in ("n_labels", "n_positive", "min_labels"))
                or not _linear(params.get("posterior"))
            ):
                return "wrong_type"  # fmt: skip
            score = PropensityScorer.from_params(params).predict_one([0.0] * n)
            if not math.isfinite(score):
                return "wrong_type"
        else:
            return "unknown_type"
    except (ArithmeticError, LookupError, TypeError, ValueError):
        return "wrong_type"
    return None
