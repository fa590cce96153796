"""Wire records: what travels through Kafka, kept apart from the domain types.

Everything is JSON (orjson); nothing is pickled. Dead letters carry the original bytes base64-encoded
so that any payload, including non-UTF-8 garbage, survives the trip intact.
"""

from __future__ import annotations

import base64
import hashlib

import orjson

from stream_app.core.events import EventLimits, InvalidEvent
from stream_app.core.features import TRAITS_SCHEMA
from stream_app.core.pipeline import Label
from stream_app.core.policy import Decision

DEAD_LETTER_VALUE_BYTES = 64 * 1024  # of the original value kept in a dead letter (base64: 87 KB at most)


def dead_letter(raw: bytes | None, topic: str, partition: int, offset: int, code: str, reason: str) -> bytes:
    """Serialize a dead-letter record.

    The original value is kept whole up to ``DEAD_LETTER_VALUE_BYTES``; beyond that its first bytes, its size
    and its SHA-256 (the record itself is at the source offset): a dead letter of a near-1 MB input would
    exceed the broker's record size limit, and a refused record breaks its producer's partition.

    >>> import orjson
    >>> orjson.loads(dead_letter(b"\\xff", "clicks", 0, 7, "malformed_json", "bad"))["value_b64"]
    '/w=='
    >>> big = orjson.loads(dead_letter(b"x" * 900_000, "clicks", 0, 7, "too_large", "big"))
    >>> big["value_bytes"], big["value_truncated"], len(big["value_b64"]) < 90_000
    (900000, True, True)
    """
    raw = raw or b""
    record = {
        "value_b64": base64.b64encode(raw[:DEAD_LETTER_VALUE_BYTES]).decode("ascii"),
        "source_topic": topic,
        "source_partition": partition,
        "source_offset": offset,
        "error_code": code,
        "reason": reason,
    }
    if len(raw) > DEAD_LETTER_VALUE_BYTES:
        record |= {"value_bytes": len(raw), "value_truncated": True, "value_sha256": hashlib.sha256(raw).hexdigest()}
    return orjson.dumps(record)


def decision_record(d: Decision) -> bytes:
    """A decision as push services and auditors read it (schemas/decision.v1.json)."""
    return orjson.dumps(
        {
            "schema": "decision.v1",
            "decision_id": d.decision_id,
            "user_id": d.user_id,
            "campaign": d.campaign,
            "action": d.action,
            "score": d.score,
            "segment": d.segment,
            "model_version": d.model_version,
            "action_probability": d.probability,
            "decided_at_ms": d.decided_at_ms,
            "send_at_ms": d.send_at_ms,
            "expires_at_ms": d.expires_at_ms,
            "trigger_event_id": d.trigger_event_id,
            "reasons": list(d.reasons),
            "top_contributions": [{"feature": f, "log_odds": c} for f, c in d.contributions],
        }
    )


def label_record(label: Label) -> bytes:
    """A delayed label for the trainer: the features the model saw at decision time and the outcome."""
    return orjson.dumps(
        {
            "kind": "label",
            "campaign": label.campaign,
            "decision_id": label.decision_id,
            "action": label.action,
            "converted": label.converted,
            "features": label.features,
            "model_version": label.model_version,
            "action_probability": label.probability,
            "segment": label.segment,
            "decided_at_ms": label.decided_at_ms,
            "labelled_at_ms": label.labelled_at_ms,
        }
    )


def sample_record(traits: tuple[float, ...]) -> bytes:
    """A user's trait vector for the segment model to learn from."""
    return orjson.dumps({"kind": "segment_sample", "schema": TRAITS_SCHEMA, "traits": traits})


CONSENT_ACTIONS = ("opt_in", "opt_out", "erase")


DEFAULT_LIMITS = EventLimits()


def parse_consent(raw: bytes, limits: EventLimits = DEFAULT_LIMITS) -> tuple[str, str]:
    """``{"user_id": ..., "action": "opt_in" | "opt_out" | "erase"}`` -> (user_id, action).

    The same limits and error codes as input events (size, user id length, missing vs wrong type).

    >>> parse_consent(b'{"user_id": "u1", "action": "erase"}')
    ('u1', 'erase')
    """
    if len(raw) > limits.max_bytes:
        raise InvalidEvent("oversize", f"payload is {len(raw)} bytes, limit is {limits.max_bytes}")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidEvent("malformed_json", "value is not valid UTF-8 JSON") from None
    if not isinstance(obj, dict):
        raise InvalidEvent("not_an_object", "expected a JSON object")
    user, action = obj.get("user_id"), obj.get("action")
    if user is None or action is None:
        raise InvalidEvent("missing_field", "consent needs user_id and action")
    if not isinstance(user, str) or not user or len(user) > limits.max_id_chars:
        raise InvalidEvent("wrong_type", f"user_id must be a non-empty string of at most {limits.max_id_chars} chars")
    if action not in CONSENT_ACTIONS:
        raise InvalidEvent("unknown_type", f"consent action must be one of {', '.join(CONSENT_ACTIONS)}")
    return user, action
