"""Wire records: what travels through Kafka, kept apart from the domain types.

Everything is JSON (orjson); nothing is pickled. Dead letters carry the original bytes base64-encoded
so that any payload, including non-UTF-8 garbage, survives the trip intact.
"""

from __future__ import annotations

import base64

import orjson


def dead_letter(raw: bytes | None, topic: str, partition: int, offset: int, code: str, reason: str) -> bytes:
    """Serialize a dead-letter record.

    >>> import orjson
    >>> orjson.loads(dead_letter(b"\\xff", "clicks", 0, 7, "malformed_json", "bad"))["value_b64"]
    '/w=='
    """
    return orjson.dumps(
        {
            "value_b64": base64.b64encode(raw or b"").decode("ascii"),
            "source_topic": topic,
            "source_partition": partition,
            "source_offset": offset,
            "error_code": code,
            "reason": reason,
        }
    )
