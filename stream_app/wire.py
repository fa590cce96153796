"""Wire records: what travels through Kafka, kept apart from the domain types.

Everything is JSON (orjson); nothing is pickled. Dead letters carry the original bytes base64-encoded
so that any payload, including non-UTF-8 garbage, survives the trip intact.
"""

from __future__ import annotations

import base64
import hashlib

import orjson

from stream_app.core.events import EventLimits, InvalidEvent, decode_object
from stream_app.core.features import TRAITS_SCHEMA
from stream_app.core.pipeline import Label
from stream_app.core.policy import Decision

DEAD_LETTER_VALUE_BYTES = 64 * 1024  # of the original value kept in a dead letter (base64: 87 KB at most)
DEAD_LETTER_KEY_BYTES = 1024  # of the original key a dead letter is keyed by


def dead_letter_key(key: bytes | None) -> bytes | None:
    """The key of a dead letter: the original's, cut to ``DEAD_LETTER_KEY_BYTES`` (a ~1 MB key on a rejected
    record must not make its dead letter too large to send: that would stop the partition for ever).

    >>> dead_letter_key(b"u1"), len(dead_letter_key(b"k" * 900_000))
    (b'u1', 1024)
    """
    return key if key is None or len(key) <= DEAD_LETTER_KEY_BYTES else key[:DEAD_LETTER_KEY_BYTES]


def dead_letter(raw: bytes | None, topic: str, partition: int, offset: int, code: str, reason: str,
                exception: str | None = None, key: bytes | None = None) -> bytes:  # fmt: skip
    """Serialize a dead-letter record (schemas/dead-letter.v1.json).

    The original value is kept whole up to ``DEAD_LETTER_VALUE_BYTES``; beyond that its first bytes, its size
    and its SHA-256 (the record itself is at the source offset): a dead letter of a near-1 MB input would
    exceed the broker's record size limit, and a refused record breaks its producer's partition.

    >>> import orjson
    >>> orjson.loads(dead_letter(b"\\xff", "clicks", 0, 7, "bad_utf8", "bad"))["value_b64"]
    '/w=='
    >>> big = orjson.loads(dead_letter(b"x" * 900_000, "clicks", 0, 7, "oversize", "big"))
    >>> big["value_bytes"], big["value_truncated"], len(big["value_b64"]) < 90_000
    (900000, True, True)
    >>> sorted(orjson.loads(dead_letter(None, "clicks", 0, 7, "tombstone", "null")))[-1]
    'value_is_null'
    """
    value = raw or b""
    record = {
        "value_b64": base64.b64encode(value[:DEAD_LETTER_VALUE_BYTES]).decode("ascii"),
        "source_topic": topic,
        "source_partition": partition,
        "source_offset": offset,
        "error_code": code,
        "reason": reason,
    }
    if len(value) > DEAD_LETTER_VALUE_BYTES:
        record |= {
            "value_bytes": len(value),
            "value_truncated": True,
            "value_sha256": hashlib.sha256(value).hexdigest(),
        }
    if key is not None and len(key) > DEAD_LETTER_KEY_BYTES:  # the record's key is its first bytes
        record |= {"key_bytes": len(key), "key_sha256": hashlib.sha256(key).hexdigest()}
    if raw is None:
        record["value_is_null"] = True
    if exception is not None:
        record["exception"] = exception
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
            "segment_version": d.segment_version,
            "action_probability": d.probability,
            "decided_at_ms": d.decided_at_ms,
            "send_at_ms": d.send_at_ms,
            "expires_at_ms": d.expires_at_ms,
            "trigger_event_id": d.trigger_event_id,
            "reasons": list(d.reasons),
            "top_contributions": [{"feature": f, "log_odds": c} for f, c in d.contributions],
        }
    )


def cancellation_record(decision_id: str, user_id: str, campaign: str, cause: str, at_ms: int) -> bytes:
    """A push that must not be sent any more (schemas/cancellation.v1.json), on push-decisions after the push.

    >>> orjson.loads(cancellation_record("ab" * 12, "u1", "win_back", "opt_out", 5))["schema"]
    'cancellation.v1'
    """
    return orjson.dumps(
        {
            "schema": "cancellation.v1",
            "decision_id": decision_id,
            "user_id": user_id,
            "campaign": campaign,
            "action": "cancel",
            "cause": cause,
            "cancelled_at_ms": at_ms,
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
            "attributed": label.attributed,
        }
    )


def sample_record(traits: tuple[float, ...]) -> bytes:
    """A user's trait vector for the segment model to learn from."""
    return orjson.dumps({"kind": "segment_sample", "schema": TRAITS_SCHEMA, "traits": traits})


CONSENT_ACTIONS = ("opt_in", "opt_out", "erase")


DEFAULT_LIMITS = EventLimits()


def parse_consent(raw: bytes | None, limits: EventLimits = DEFAULT_LIMITS) -> tuple[str, str]:
    """``{"user_id": ..., "action": "opt_in" | "opt_out" | "erase"}`` -> (user_id, action).

    The same limits and error codes as input events (size, user id length, missing vs wrong type).

    >>> parse_consent(b'{"user_id": "u1", "action": "erase"}')
    ('u1', 'erase')
    """
    obj = decode_object(raw, limits)
    user, action = obj.get("user_id"), obj.get("action")
    if user is None or action is None:
        raise InvalidEvent("missing_field", "consent needs user_id and action")
    if not isinstance(user, str) or not user or len(user) > limits.max_id_chars:
        raise InvalidEvent("wrong_type", f"user_id must be a non-empty string of at most {limits.max_id_chars} chars")
    if not isinstance(action, str) or action not in CONSENT_ACTIONS:
        raise InvalidEvent("unknown_type", f"consent action must be one of {', '.join(CONSENT_ACTIONS)}")
    return user, action
