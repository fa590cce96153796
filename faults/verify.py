"""The independent verifier: what an outside service reads from Kafka, against ``stream-app replay`` of the input.

Nothing here imports the Faust shell. Every output topic is read with a plain aiokafka consumer at
``isolation_level="read_committed"`` (what push services must use), from the beginning to the last stable
offset, with each record's partition and offset kept as evidence. The reference is ``stream_app.replay``
over the same envelopes, in file order.

An invariant is a name -> bool plus the numbers and example records behind it, so a failure says which
records broke it.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from stream_app.campaigns import load_campaigns
from stream_app.core.events import InvalidEvent
from stream_app.core.pipeline import Models
from stream_app.core.profile import event_key
from stream_app.core.segments import SegmentModel
from stream_app.core.trainer import parse_model_input
from stream_app.engine import ModelStore, build_trainer
from stream_app.kafka_io import latest_by_key, partitions_of
from stream_app.replay import Replayer, to_message
from stream_app.settings import Settings

EXAMPLES = 5  # example records kept per violation
# the invariants that are about duplicate outputs: the only ones at_least_once may break
DUPLICATE_INVARIANTS = ("no_duplicate_pushes", "no_duplicate_audit", "no_duplicate_dead_letters", "no_duplicate_labels")
# what at_least_once may break: duplicate outputs, and the trainer learning a redelivered input again
AT_MOST_ONCE_INVARIANTS = (*DUPLICATE_INVARIANTS, "trainer_equals_fold")


@dataclass(frozen=True)
class Rec:
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None


async def read_topic(bootstrap: str, topic: str, timeout: float = 120.0) -> list[Rec]:
    """Every committed record of ``topic`` from the beginning to its last stable offset at call time."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        group_id=None,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=8 << 20,
        fetch_max_bytes=64 << 20,
    )
    await consumer.start()
    try:
        parts = await partitions_of(bootstrap, topic)
        if not parts:
            return []
        tps = [TopicPartition(topic, p) for p in parts]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        out: list[Rec] = []
        deadline = time.monotonic() + timeout
        while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic} to its end took over {timeout}s")
            for tp, msgs in (await consumer.getmany(timeout_ms=300, max_records=50_000)).items():
                out.extend(Rec(tp.partition, m.offset, m.timestamp, m.key, m.value) for m in msgs if m.offset < end[tp])
        return out
    finally:
        await consumer.stop()


# -- consumer group lag ---------------------------------------------------------------------------


async def group_offsets(bootstrap: str, group: str, topics: list[str]) -> dict[TopicPartition, int]:
    """Committed offsets of ``group`` on every partition of ``topics`` (0 where it committed none) and on any
    other partition it committed (Faust's own topics)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
        out = {tp: max(meta.offset, 0) for tp, meta in committed.items()}
        for t in topics:
            for p in await partitions_of(bootstrap, t):
                out.setdefault(TopicPartition(t, p), 0)
        return out
    finally:
        await admin.close()


async def lag_report(bootstrap: str, group: str, topics: list[str]) -> dict[str, Any]:
    """Two lags of the group. ``reported``: high watermark minus committed offset, what
    ``kafka-consumer-groups`` and any lag alert show. ``true``: the committed records a ``read_committed``
    reader finds at or after the committed offset (transaction markers and aborted records are not work
    left): this is the lag that must be 0 once everything is processed."""
    committed = await group_offsets(bootstrap, group, topics)
    tps = list(committed)
    hw_consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    rc = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        group_id=None,
        isolation_level="read_committed",
        max_partition_fetch_bytes=8 << 20,
    )
    await hw_consumer.start()
    await rc.start()
    try:
        hw = await hw_consumer.end_offsets(tps)
        lso = await rc.end_offsets(tps)
        per: dict[str, dict[str, int]] = {}
        left = [tp for tp in tps if lso[tp] > committed[tp]]
        true_left = collections.Counter()
        if left:
            rc.assign(left)
            for tp in left:
                rc.seek(tp, committed[tp])
            deadline = time.monotonic() + 30
            while [tp for tp in left if await rc.position(tp) < lso[tp]] and time.monotonic() < deadline:
                for tp, msgs in (await rc.getmany(timeout_ms=300)).items():
                    true_left[tp] += sum(1 for m in msgs if m.offset < lso[tp])
        for tp in tps:
            per[f"{tp.topic}[{tp.partition}]"] = {
                "committed": committed[tp],
                "high_watermark": hw[tp],
                "last_stable": lso[tp],
                "reported_lag": hw[tp] - committed[tp],
                "true_lag": true_left[tp],
            }
        return {
            "reported": sum(v["reported_lag"] for v in per.values()),
            "true": sum(v["true_lag"] for v in per.values()),
            "partitions": {k: v for k, v in per.items() if v["reported_lag"] or v["true_lag"]},
        }
    finally:
        await rc.stop()
        await hw_consumer.stop()


# -- the reference ------------------------------------------------------------------------------------


@dataclass
class Reference:
    """Replay of the input: what the outputs must be."""

    audit: dict[str, dict] = field(default_factory=dict)
    pushes: set[str] = field(default_factory=set)
    dead_letters: collections.Counter = field(default_factory=collections.Counter)  # (topic kind, code, value)
    labels: set[str] = field(default_factory=set)
    segment_samples: int = 0
    unavailable: int = 0  # guided: model versions the decisions name that the model-params topic does not hold
    users: dict[str, Any] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def topic_kinds(s: Settings) -> dict[str, str]:
    """A run's topic names -> the kind of input they carry (runs differ only by suffixes)."""
    return {s.clicks_topic: "click", s.likes_topic: "like", s.payments_topic: "payment", s.consent_topic: "consent"}


def dead_letter_key(value: bytes, kinds: dict[str, str]) -> tuple[str, str, str]:
    d = orjson.loads(value)
    return (kinds.get(d["source_topic"], d["source_topic"]), d["error_code"], d["value_b64"])


def compute_reference(envelopes: list[dict], settings: Settings) -> Reference:
    """Replay the envelopes in file order with the workers' settings (campaigns, limits)."""
    t0 = time.monotonic()
    replayer = Replayer(settings)
    for i, env in enumerate(envelopes):
        replayer.feed(to_message(orjson.dumps(env), i, replayer.settings))
    result = replayer.finish()
    kinds = topic_kinds(replayer.settings)
    ref = Reference(users=result.users, outcomes=dict(result.counts))
    for v in result.records["audit"]:
        d = orjson.loads(v)
        ref.audit[d["decision_id"]] = d
    ref.pushes = {orjson.loads(v)["decision_id"] for v in result.records["decisions"]}
    ref.dead_letters = collections.Counter(dead_letter_key(v, kinds) for v in result.records["dead_letters"])
    for v in result.records["model_inputs"]:
        d = orjson.loads(v)
        if d.get("kind") == "label":
            ref.labels.add(d["decision_id"])
        else:
            ref.segment_samples += 1
    ref.seconds = round(time.monotonic() - t0, 1)
    return ref


@dataclass(frozen=True)
class GuidedModels(Models):
    """Models that decide each (user, trigger) with the versions the worker recorded for it.

    A worker scores with the versions that reached it over Kafka, and its trainer learns in the order model
    inputs reached it: a version number names another model in replay. Replaying each decision with the very
    models the worker says it used (their parameters read back from the model-params topic) leaves nothing to
    explain by model timing: the same input, state and models must give the same decision."""

    pick: Callable[[str, str], Models] | None = None

    def for_decision(self, user_id: str, trigger: str) -> Models:
        return self.pick(user_id, trigger) if self.pick is not None else self


def applied_order(changelog: list[Rec]) -> dict[str, list[int]]:
    """Per user, the event keys in the order the workers applied them, from every committed state record: each
    holds the user's last ``dedup_ids`` event keys in application order (``p.s``), so each record adds its new
    keys at the end. (A record that skipped more than ``dedup_ids`` events leaves the order incomplete.)"""
    order: dict[str, list[int]] = collections.defaultdict(list)
    known: dict[str, set[int]] = collections.defaultdict(set)
    for r in sorted(changelog, key=lambda r: (r.partition, r.offset)):
        if r.key is None or r.value is None:
            continue
        with contextlib.suppress(Exception):
            user, state = orjson.loads(r.key), orjson.loads(r.value)
            for key in (state.get("p") or {}).get("s", []):
                if key not in known[user]:
                    known[user].add(key)
                    order[user].append(key)
    return order


def in_applied_order(envelopes: list[dict], order: dict[str, list[int]]) -> tuple[list[dict], dict[str, int]]:
    """The envelopes with each user's applied events moved into the order the workers applied them, keeping the
    positions the user's events hold in the file (so every other user's events keep theirs).

    The workers hand a partition's three input topics over in event-time order where they can tell, but live they
    can only tell what was fetched: a like whose batch reached the broker before an earlier click's can be applied
    first. Replaying the file order would then compare decisions made on different inputs."""
    first: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)  # user -> [(position, event key)]
    repeats: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)  # later copies of an event id
    seen: set[str] = set()
    for i, env in enumerate(envelopes):
        v = env.get("value")
        ok = isinstance(v, dict) and isinstance(v.get("user_id"), str) and isinstance(v.get("event_id"), str)
        if ok:
            (repeats if v["event_id"] in seen else first)[v["user_id"]].append((i, event_key(v["event_id"])))
            seen.add(v["event_id"])
    out = list(envelopes)
    ts_of = {k: envelopes[i]["value"].get("ts") for evs in first.values() for i, k in evs}
    stats = {"users_reordered": 0, "events_moved": 0, "users_order_unknown": 0, "events_applied_late": 0,
             "max_applied_late_s": 0.0}  # fmt: skip
    for user, events in first.items():
        applied = order.get(user, [])
        rank = {k: j for j, k in enumerate(applied)}
        mine = [(i, k) for i, k in events if k in rank]
        if len(mine) < len(applied):
            stats["users_order_unknown"] += 1  # keys the file does not hold for this user: leave the file order
            continue
        wanted = sorted(mine, key=lambda ik: rank[ik[1]])
        # how much later in event time than the file had it was an event applied after a newer one of the user
        late_file, late_applied = _lateness(mine, ts_of), _lateness(wanted, ts_of)
        for k, late in late_applied.items():
            if late > late_file.get(k, 0):
                stats["events_applied_late"] += 1
                stats["max_applied_late_s"] = max(stats["max_applied_late_s"], round(late / 1000, 1))
        if wanted != mine:
            # a repeated copy follows its event's applied copy: left where it was, a copy the file holds before
            # the new place of its event would be the one applied, too early (the worker drops the later copy)
            copies = collections.defaultdict(list)
            for i, k in repeats.get(user, ()):
                if k in rank:
                    copies[k].append((i, k))
            mine_all = sorted(mine + [c for cs in copies.values() for c in cs])
            wanted_all = [c for ik in wanted for c in (ik, *copies.get(ik[1], ()))]
            stats["users_reordered"] += 1
            stats["events_moved"] += sum(a != b for a, b in zip(mine_all, wanted_all, strict=True))
            for (pos, _), (i, _) in zip(mine_all, wanted_all, strict=True):
                out[pos] = envelopes[i]
    return out, stats


def _lateness(events: list[tuple[int, int]], ts_of: dict[int, Any]) -> dict[int, int]:
    """Per event key, by how much (ms of event time) a newer event of the user came before it in this order."""
    out, newest = {}, None
    for _, k in events:
        ts = ts_of.get(k)
        if not isinstance(ts, int):
            continue
        if newest is not None and newest > ts:
            out[k] = newest - ts
        newest = ts if newest is None else max(newest, ts)
    return out


def guided_reference(envelopes: list[dict], settings: Settings, audit: list[Rec], params: list[Rec]) -> Reference:
    """Replay the envelopes with, for every trigger the worker decided on, the model versions it recorded
    (``segment_version`` and each campaign's ``model_version``); triggers the worker did not decide on use
    cold models. ``unavailable``: decisions whose versions the model-params topic no longer holds."""
    campaigns = {c.name: c for c in load_campaigns(settings.campaigns_file or None)[0]}
    published: dict[tuple[str, int], dict] = {}
    for r in params:
        with contextlib.suppress(Exception):
            p = orjson.loads(r.value)
            published[(r.key.decode(), int(p["version"]))] = p
    used: dict[tuple[str, str], dict[str, int]] = collections.defaultdict(dict)
    for r in audit:
        d = orjson.loads(r.value)
        v = used[(d["user_id"], d["trigger_event_id"])]
        v["segments"] = d.get("segment_version", 0)
        c = campaigns.get(d["campaign"])
        v[f"{'uplift' if c is not None and c.mode == 'uplift' else 'propensity'}:{d['campaign']}"] = d["model_version"]
    cold = Models(SegmentModel(k=settings.segments_k), {})
    built: dict[tuple, Models] = {}
    unavailable: set[tuple[str, int]] = set()

    def pick(user_id: str, trigger: str) -> Models:
        versions = used.get((user_id, trigger))
        if not versions:
            return cold
        ident = tuple(sorted(versions.items()))
        if ident not in built:
            store = ModelStore(cold)
            for key, version in ident:
                if version == 0:
                    continue  # never published: the cold model
                if (key, version) not in published:
                    unavailable.add((key, version))
                    continue
                store.apply(key, published[(key, version)])
            built[ident] = store.current
        return built[ident]

    replayer = Replayer(settings, models=ModelStore(GuidedModels(cold.segments, {}, pick=pick)),
                        install=lambda key, params: None)  # fmt: skip
    for i, env in enumerate(envelopes):
        replayer.feed(to_message(orjson.dumps(env), i, replayer.settings))
    result = replayer.finish()
    ref, records = Reference(users=result.users, outcomes=dict(result.counts)), result.records
    for v in records["audit"]:
        d = orjson.loads(v)
        ref.audit[d["decision_id"]] = d
    ref.pushes = {orjson.loads(v)["decision_id"] for v in records["decisions"]}
    ref.unavailable = len(unavailable)
    return ref


# -- comparing ----------------------------------------------------------------------------------------


def _dups(records: list[Rec], ident) -> tuple[int, list[dict]]:
    """Extra copies by identity, with the copies (partition, offset, timestamp) of the first few."""
    where: dict[Any, list[Rec]] = collections.defaultdict(list)
    for r in records:
        where[ident(r)].append(r)
    extra = sum(len(v) - 1 for v in where.values() if len(v) > 1)
    examples = []
    for k, v in where.items():
        if len(v) > 1 and len(examples) < EXAMPLES:
            examples.append(
                {
                    "id": k if isinstance(k, str) else repr(k)[:120],
                    "copies": [[r.partition, r.offset, r.timestamp] for r in v],
                    "identical_bytes": len({r.value for r in v}) == 1,
                }
            )
    return extra, examples


STATE_FIELDS = ("exists", "erased", "opted_out", "counts", "spend_total")


def _state_view(v: Any) -> dict[str, Any]:
    """The deterministic part of a user's state: whether it exists or is erased, consent, event counts and
    total spend. Decayed rates, hours and categories depend on the order of a user's events across the three
    input topics, which a worker fetches in another interleaving than replay's file order (README, Replay)."""
    if v is None:
        return {"exists": False}
    if v.get("erased"):
        return {"exists": True, "erased": True}
    p = v.get("p") or {}
    return {"exists": True, "erased": False, "opted_out": v.get("o"), "counts": p.get("c"), "spend_total": p.get("st")}


def _decided(d: dict | None) -> tuple | None:
    """What a decision decided, and with which models."""
    if d is None:
        return None
    return (d["action"], d["segment"], d["score"], d.get("model_version"), d.get("segment_version"))


def _full_state(v: Any) -> dict[str, Any]:
    """A stored state as flat fields (profile fields as ``p.<name>``), without the watermark ``w``."""
    if not isinstance(v, dict):
        return {"exists": v is not None}
    flat = {f"p.{k}": x for k, x in (v.get("p") or {}).items()}
    return flat | {k: x for k, x in v.items() if k not in ("p", "w")}


def compare(ref: Reference, out: dict[str, list[Rec]], s: Settings, guided: Reference) -> dict[str, Any]:
    """Check every invariant of the outputs against replay of the file (``ref``, ``compute_reference``) and
    against the guided replay (``guided_reference``); returns invariants, their numbers and evidence."""
    kinds = topic_kinds(s)
    inv: dict[str, bool] = {}
    num: dict[str, Any] = {}
    ev: dict[str, Any] = {}

    # duplicates on push-decisions, decision-audit, dead letters, labels
    def did(r: Rec) -> str:
        return orjson.loads(r.value)["decision_id"]

    num["dup_pushes"], ev["dup_pushes"] = _dups(out["decisions"], did)
    num["dup_audit"], ev["dup_audit"] = _dups(out["audit"], did)
    dls = [r for r in out["dead_letters"] if r.value is not None]

    def dl_source(r: Rec) -> tuple:
        d = orjson.loads(r.value)
        return (kinds.get(d["source_topic"], d["source_topic"]), d["source_partition"], d["source_offset"])

    num["dup_dead_letters"], ev["dup_dead_letters"] = _dups(dls, dl_source)
    labels = [r for r in out["model_inputs"] if r.value and orjson.loads(r.value).get("kind") == "label"]
    num["dup_labels"], ev["dup_labels"] = _dups(labels, did)
    inv["no_duplicate_pushes"] = num["dup_pushes"] == 0
    inv["no_duplicate_audit"] = num["dup_audit"] == 0
    inv["no_duplicate_dead_letters"] = num["dup_dead_letters"] == 0
    inv["no_duplicate_labels"] = num["dup_labels"] == 0

    # per-user state (deterministic fields) vs the fold of the input
    state = {
        orjson.loads(k): orjson.loads(v) for k, v in latest_by_key((r.key, r.value) for r in out["changelog"]).items()
    }
    field_diffs: collections.Counter = collections.Counter()
    twice = lost = differing = 0
    state_examples = []
    for user in sorted(set(state) | set(ref.users)):
        k, r = _state_view(state.get(user)), _state_view(ref.users.get(user))
        if k == r:
            continue
        differing += 1
        for f in STATE_FIELDS:
            if k.get(f) != r.get(f):
                field_diffs[f] += 1
        kc, rc = sum(k.get("counts") or []), sum(r.get("counts") or [])
        twice += max(0, kc - rc)
        lost += max(0, rc - kc)
        if len(state_examples) < EXAMPLES:
            state_examples.append({"user": user, "kafka": k, "replay": r})
    num["users_kafka"], num["users_replay"] = len(state), len(ref.users)
    num["users_state_differs"] = differing
    num["state_field_differences"] = dict(field_diffs)
    num["events_applied_twice"], num["events_lost"] = twice, lost
    ev["state"] = state_examples
    # every stored field (decayed rates, hours, categories, push history, open label windows), against the guided
    # replay, which applied each user's events in the worker's order; not the partition watermark stored with it
    # (``w``: it follows how the partition's users interleave, and replay has one partition)
    full_diffs: collections.Counter = collections.Counter()
    for user in set(state) | set(guided.users):
        a, b = _full_state(state.get(user)), _full_state(guided.users.get(user))
        for f in set(a) | set(b):
            if a.get(f) != b.get(f):
                full_diffs[f] += 1
                if len(ev["state"]) < 2 * EXAMPLES:
                    ev["state"].append({"user": user, "field": f, "kafka": a.get(f), "guided_replay": b.get(f)})
    num["state_fields_differing_from_guided_replay"] = dict(full_diffs)
    inv["state_equals_replay"] = not field_diffs and not full_diffs

    # every input record accounted for once: applied (state counts), dead-lettered (dead letters), pushes
    unique_dls = {dl_source(r): r for r in dls}.values()  # copies are counted above, as duplicates
    kafka_dl = collections.Counter(dead_letter_key(r.value, kinds) for r in unique_dls)
    dl_missing = ref.dead_letters - kafka_dl
    dl_extra = kafka_dl - ref.dead_letters
    num["dead_letters_kafka"], num["dead_letters_replay"] = sum(kafka_dl.values()), sum(ref.dead_letters.values())
    num["dead_letters_missing"] = sum(dl_missing.values())
    num["dead_letters_extra"] = sum(dl_extra.values())
    ev["dead_letters_missing"] = [
        {"topic": t, "code": c, "bytes": len(base64.b64decode(v))} for (t, c, v) in list(dl_missing)[:EXAMPLES]
    ]
    inv["every_input_accounted_once"] = twice == 0 and lost == 0 and not dl_missing and not dl_extra

    # decisions vs replay: ids, actions, segments
    copies: dict[str, list[dict]] = collections.defaultdict(list)
    for r in out["audit"]:
        d = orjson.loads(r.value)
        copies[d["decision_id"]].append(d)
    # A repeated decision (counted above; it fails exactly_once) can differ: under at_least_once a zombie that
    # wakes up decides with the models it had and its output is not fenced. The guided replay decides with the
    # versions of the last copy; the copy compared is the one that matches it, else the first.
    audit = {
        i: next((d for d in ds if _decided(d) == _decided(guided.audit.get(i))), ds[0]) for i, ds in copies.items()
    }
    stale = sum(1 for ds in copies.values() if len({_decided(d) for d in ds}) > 1)
    missing = set(guided.audit) - set(audit)
    extra = set(audit) - set(guided.audit)
    common = set(audit) & set(guided.audit)
    action = [i for i in common if audit[i]["action"] != guided.audit[i]["action"]]
    segment = [i for i in common if audit[i]["segment"] != guided.audit[i]["segment"]]
    score = [i for i in common if audit[i]["score"] != guided.audit[i]["score"]]
    differ = set(action) | set(segment) | set(score)
    pushes = {orjson.loads(r.value)["decision_id"] for r in out["decisions"]}
    num["decisions"] = {
        "audit_kafka": len(audit),
        "audit_replay": len(guided.audit),
        "pushes_kafka": len(pushes),
        "pushes_replay": len(guided.pushes),
        "missing": len(missing),
        "extra": len(extra),
        "action_differs": len(action),
        "segment_differs": len(segment),
        "score_differs": len(score),
        "versions_unavailable": guided.unavailable,
        "repeated_with_other_content": stale,
        "checked_exactly": len(common - differ),
        "pushes_missing": len(guided.pushes - pushes),
        "pushes_extra": len(pushes - guided.pushes),
        "missing_by_campaign_action": dict(
            collections.Counter(f"{guided.audit[i]['campaign']}/{guided.audit[i]['action']}" for i in missing)
        ),
        "extra_by_campaign_action": dict(
            collections.Counter(f"{audit[i]['campaign']}/{audit[i]['action']}" for i in extra)
        ),
        "action_changes": dict(
            collections.Counter(f"{guided.audit[i]['action']}->{audit[i]['action']}" for i in action)
        ),
    }
    # The guided replay decides each trigger with the worker's recorded model versions on the user's events in
    # the worker's order, so every difference, score included, is a failure: none is explained by model timing.
    num["decision_differences"] = len(missing) + len(extra) + len(differ)
    ev["decisions_differing"] = [
        {"kafka": audit[i] | {"top_contributions": None}, "replay": guided.audit[i] | {"top_contributions": None}}
        for i in sorted(differ)[:EXAMPLES]
    ]
    ev["decisions_missing"] = [guided.audit[i] | {"top_contributions": None} for i in sorted(missing)[:EXAMPLES]]
    ev["decisions_extra"] = [audit[i] | {"top_contributions": None} for i in sorted(extra)[:EXAMPLES]]
    inv["decisions_equal_replay"] = num["decision_differences"] == 0 and not guided.unavailable

    # labels and segment samples vs replay
    label_ids = {orjson.loads(r.value)["decision_id"] for r in labels}
    samples = sum(1 for r in out["model_inputs"] if r.value and orjson.loads(r.value).get("kind") != "label")
    num["labels"] = {
        "kafka": len(label_ids),
        "replay": len(ref.labels),
        "missing": len(ref.labels - label_ids),
        "extra": len(label_ids - ref.labels),
        "segment_samples_kafka": samples,
        "segment_samples_replay": ref.segment_samples,
    }
    # the trainer's persisted learning state vs a fold of every committed model input, in topic order
    num["trainer"], ev["trainer"] = compare_trainer(out["model_inputs"], out["trainer"], s)
    inv["trainer_equals_fold"] = num["trainer"]["differing_keys"] == 0
    return {"invariants": inv, "numbers": num, "evidence": ev}


def _learning(state: dict) -> dict:
    """A trainer state record without its published version count (which follows record time, not input)."""
    return {k: v for k, v in state.items() if k != "version"}


def compare_trainer(model_inputs: list[Rec], changelog: list[Rec], s: Settings) -> tuple[dict, list]:
    """Fold the committed model inputs through a fresh trainer, as the worker's trainer learns them, and compare
    every model's learning state (weights, counts, buffered positives, the segment ring) with the latest record
    of the trainer's changelog. A trainer that lost an input after a fault, or learned one twice, differs."""
    trainer = build_trainer(s, load_campaigns(s.campaigns_file or None)[0])
    keys: set[str] = set()
    for r in sorted(model_inputs, key=lambda r: (r.partition, r.offset)):
        try:
            record = parse_model_input(r.value)
        except InvalidEvent:
            continue  # dead-lettered by the trainer, as counted above
        keys.update(trainer.learn(record))
    want = {k: _learning(v) for k, v in trainer.states(sorted(keys))}
    got = {
        orjson.loads(k): _learning(orjson.loads(v))
        for k, v in latest_by_key((r.key, r.value) for r in changelog).items()
        if v is not None
    }
    differ = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    evidence = [
        {
            "key": k,
            "fields": sorted(
                f for f in set(want.get(k, {})) | set(got.get(k, {})) if want.get(k, {}).get(f) != got.get(k, {}).get(f)
            ),
        }
        for k in differ[:EXAMPLES]
    ]
    return {"keys": len(want), "differing_keys": len(differ), "inputs": len(model_inputs)}, evidence


async def read_outputs(bootstrap: str, s: Settings) -> dict[str, list[Rec]]:
    topics = {
        "decisions": s.decisions_topic,
        "audit": s.audit_topic,
        "dead_letters": s.dead_letter_topic,
        "model_inputs": s.model_inputs_topic,
        "changelog": s.users_changelog_topic,
        "trainer": s.trainer_changelog_topic,
        "params": s.model_params_topic,
    }
    got = await asyncio.gather(*(read_topic(bootstrap, t) for t in topics.values()))
    return dict(zip(topics, got, strict=True))
