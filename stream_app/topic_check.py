"""What the app needs from its topics, compared with what the cluster has: ``stream-app topics --check``.

A topic created by hand (or by an older version) with another partition count breaks co-partitioning
(a user's events, consent and state must share a partition number); a non-compacted state changelog grows
forever and makes recovery slow; replication below the setting loses data when a broker dies. ``topics``
only creates missing topics and never alters existing ones, so this check says what differs and how to fix it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from stream_app.settings import Settings


@dataclass(frozen=True)
class Mismatch:
    topic: str
    what: str
    want: str
    have: str

    def __str__(self) -> str:
        return f"{self.topic}: {self.what} is {self.have}, the app needs {self.want}"


async def broker_count(admin: AIOKafkaAdminClient) -> int:
    return len((await admin.describe_cluster())["brokers"])


def effective_replication(settings: Settings, brokers: int) -> tuple[int, int]:
    """(replication factor, min.insync.replicas): 0 in a setting means the production default,
    3 and 2, capped by the brokers there are (a single local broker: 1 and 1).

    >>> s = Settings()
    >>> effective_replication(s, 1), effective_replication(s, 3), effective_replication(s, 5)
    ((1, 1), (3, 2), (3, 2))
    >>> effective_replication(Settings(topic_replication=2, topic_min_insync_replicas=1), 5)
    (2, 1)
    """
    rf = settings.topic_replication or min(3, max(brokers, 1))
    isr = settings.topic_min_insync_replicas or max(1, rf - 1)
    return rf, min(isr, rf)


async def check(settings: Settings, admin: AIOKafkaAdminClient) -> list[Mismatch]:
    """Every difference between the cluster's topics and ``settings.topic_layout()`` (empty: all good)."""
    layout = settings.topic_layout()
    rf, isr = effective_replication(settings, await broker_count(admin))
    found: list[Mismatch] = []
    described = {t["topic"]: t for t in await admin.describe_topics(list(layout))}
    present = [name for name in layout if described.get(name, {}).get("partitions")]
    for name, (partitions, _configs) in layout.items():
        if name not in present:
            found.append(Mismatch(name, "topic", "to exist (run `stream-app topics`)", "missing"))
            continue
        parts = described[name]["partitions"]
        if len(parts) != partitions:
            found.append(Mismatch(name, "partition count", str(partitions), str(len(parts))))
        replicas = min(len(p["replicas"]) for p in parts)
        if replicas < rf:
            found.append(Mismatch(name, "replication factor", f">= {rf}", str(replicas)))
    if present:
        resources = [ConfigResource(ConfigResourceType.TOPIC, name) for name in present]
        for response in await admin.describe_configs(resources):
            for resource in response.resources:
                name, entries = resource[3], {e[0]: e[1] for e in resource[4]}
                want = dict(layout[name][1])
                want.setdefault("cleanup.policy", "delete")
                for key, value in want.items():
                    if key == "cleanup.policy" and entries.get(key) != value:
                        found.append(Mismatch(name, key, value, str(entries.get(key))))
                if int(entries.get("min.insync.replicas", "1")) < isr:
                    found.append(
                        Mismatch(name, "min.insync.replicas", f">= {isr}", str(entries.get("min.insync.replicas")))
                    )
    return found


async def check_topics(settings: Settings, **client_kw: Any) -> list[Mismatch]:
    admin = AIOKafkaAdminClient(**client_kw)
    await admin.start()
    try:
        return await check(settings, admin)
    finally:
        await admin.close()
