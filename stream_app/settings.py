"""The one typed settings object, read from ``STREAM_APP_*`` environment variables at the edge.

pydantic-settings gives typed parsing, validation errors that name the variable, and ``SecretStr``
masking for free; hand-written ``os.environ`` parsing would re-implement all three, worse.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

TOPIC_FIELDS = (
    "clicks_topic", "likes_topic", "payments_topic", "dead_letter_topic", "consent_topic", "decisions_topic",
    "audit_topic", "model_inputs_topic", "model_params_topic",
)  # fmt: skip


class Settings(BaseSettings):
    """Everything a worker needs to know about its environment. Nothing else reads os.environ."""

    model_config = SettingsConfigDict(env_prefix="STREAM_APP_", frozen=True, extra="ignore")

    app_id: str = "stream-app"
    broker: str = Field("kafka://127.0.0.1:9092", description="Faust broker URL(s), kafka://host:port;...")
    datadir: str = "/tmp/stream-app-data"
    topic_partitions: int = Field(4, ge=1, description="partitions of the topics the app creates")
    topic_replication: int = Field(
        0,
        ge=0,
        description="replication factor of the topics the app creates; 0 = the production default, "
        "3, capped by the brokers in the cluster (1 on a single local broker)",
    )
    topic_min_insync_replicas: int = Field(
        0,
        ge=0,
        description="min.insync.replicas of the topics the app creates; 0 = replication - 1 (2 for 3), "
        "at least 1: with acks=all a write then survives one broker down and is refused rather than kept once",
    )
    processing_guarantee: Literal["at_least_once", "exactly_once"] = "exactly_once"
    commit_interval_s: float = Field(
        0.15,
        gt=0,
        description="offset commit (exactly_once: transaction) interval; outputs of exactly_once "
        "become visible to read_committed consumers at commit, so this bounds decision latency "
        "(bench, exactly_once at 4,400 events/s, 3 runs each: p99 682 ms at 0.25 s, 355 ms at 0.15 s; "
        "no measurable throughput cost under a backlog)",
    )
    producer_linger_ms: int = Field(5, ge=0, le=1000, description="batch outputs this long before a produce request")
    fetch_max_wait_ms: int = Field(
        20,
        ge=1,
        le=10_000,
        description="the broker holds a fetch this long when no data: with one fetch in flight per broker, "
        "a fetch of idle partitions delays the busy ones by up to this (Faust's own choice is 1500)",
    )
    fetch_max_wait_backlog_ms: int = Field(
        300,
        ge=1,
        le=10_000,
        description="the fetch wait while the worker has a backlog: fewer fetches of idle partitions, less CPU. "
        "Not longer: at a rebalance the new assignment's first requests queue on the connection behind a fetch "
        "the broker holds this long (1,500 ms: the worker that kept partitions restarted 1.2-1.35 s after "
        "the rebalance; 300 ms: 0.25-0.38 s; no throughput difference under a backlog)",
    )
    fetch_backlog_events: int = Field(
        2000, ge=1, description="consumer lag (events) from which the worker counts as having a backlog"
    )
    batch_max_events: int = Field(
        500, ge=1, le=100_000, description="events handled per batch, at most (a fetch's are split into batches)"
    )
    merge_max_held: int = Field(
        50_000, ge=0, description="events held per partition to hand its topics over in event-time order "
        "under a backlog (0: as fetched)",
    )  # fmt: skip
    session_timeout_s: float = Field(
        10.0, ge=6, description="a crashed worker's partitions move after this (and a restarted one waits this long)"
    )
    shutdown_timeout_s: float = Field(
        30.0,
        gt=0,
        description="a stopping worker that has not exited this long after SIGTERM/SIGINT exits with code 1 "
        "(with an unreachable broker Faust 0.15 never finishes its stop); its uncommitted work is redelivered",
    )

    clicks_topic: str = "clicks"
    likes_topic: str = "likes"
    payments_topic: str = "payments"
    dead_letter_topic: str = "dead-letters"
    consent_topic: str = "user-consent"
    decisions_topic: str = Field("push-decisions", description="pushes only, keyed by user, for push services")
    audit_topic: str = Field("decision-audit", description="every decision, including suppressed and holdout")
    model_inputs_topic: str = Field("model-inputs", description="labels and segment samples for the trainer")
    model_params_topic: str = Field("model-params", description="compacted; every worker reads model versions")
    campaigns_file: str = Field("", description="YAML/JSON campaign config; empty = the shipped default")
    segments_k: int = Field(6, ge=2, le=64)
    model_publish_interval_ms: int = Field(2000, ge=100, description="trainer publishes changed models this often")
    trainer_decision_order: bool = Field(
        False,
        description="learn a positive label when its attribution window closes, as negatives are: labels in "
        "decision order, calibrated (docs/models.md), but a conversion reaches the model a window later",
    )
    model_gate_margin: float = Field(
        0.02,
        ge=0,
        le=10,
        description="quality gate: a propensity version whose progressive log loss is worse than "
        "the served version's by more than this share (relative) is not published (docs/models.md)",
    )
    model_gate_window: int = Field(500, ge=1, le=100_000, description="quality gate: recent labels compared")
    model_gate_min_labels: int = Field(
        200, ge=0, description="quality gate: labels scored by a served version before the gate can refuse"
    )
    segment_sample_rate: float = Field(
        0.25, ge=0, le=1, description="share of users' active days (UTC) whose traits train the segments"
    )
    max_event_bytes: int = Field(64 * 1024, ge=256, description="larger payloads are dead-lettered")
    max_future_skew_s: int = Field(86_400, ge=0, description="event ts may lead the Kafka record time by this")
    max_past_skew_s: int = Field(365 * 86_400, ge=0, description="event ts may trail the Kafka record time by this")
    watermark_max_lead_s: int = Field(
        300,
        ge=0,
        description="a partition's event-time watermark (what fires label expiry, win-back and profile TTL) never "
        "runs ahead of the newest Kafka record timestamp, nor of the worker's clock, by more than this: one event "
        "stamped in the future moves its own user's profile, not everyone's timers (docs/privacy.md)",
    )
    record_max_lead_s: int = Field(
        3600,
        ge=0,
        description="input and consent topics the app creates refuse records stamped more than this ahead of the "
        "broker's clock (message.timestamp.after.max.ms): the record time the watermark follows cannot be forged "
        "forward, while replays of history (old CreateTime stamps) still work",
    )
    consent_retention_s: int = Field(
        0,
        ge=0,
        description="how long an opt-out is kept after the user's last event or consent command; 0 = for ever "
        "(the default). The profile itself expires after 90 days of inactivity; the opt-out outlives it",
    )
    erase_deadline_s: int = Field(
        86_400,
        ge=3600,
        description="max.compaction.lag.ms of the users changelog: an overwritten (erased, expired) state record "
        "is compacted away within this plus one segment roll (1 h)",
    )
    input_retention_s: int = Field(7 * 86_400, ge=3600, description="retention of the input topics the app creates")
    decisions_retention_s: int = Field(7 * 86_400, ge=3600, description="retention of push-decisions")
    audit_retention_s: int = Field(30 * 86_400, ge=3600, description="retention of decision-audit (holds user ids)")
    dead_letter_retention_s: int = Field(14 * 86_400, ge=3600, description="retention of dead letters (hold values)")

    web_bind: str = Field("127.0.0.1", description="metrics web server address; 0.0.0.0 exposes it")
    web_port: int = Field(6066, ge=1, le=65535)
    log_format: Literal["text", "json"] = Field("text", description="json: one JSON object per log line")
    lag_refresh_s: float = Field(
        10.0,
        gt=0,
        description="the worker asks the broker for its partitions' end offsets this often, so the "
        "consumer-lag metric stays true while it does not fetch (a stuck handler, paused partitions)",
    )

    broker_credentials_mechanism: Literal["", "SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"] = ""
    broker_username: str = ""
    broker_password: SecretStr = SecretStr("")
    broker_cafile: str = Field("", description="CA bundle for TLS to the brokers (SASL_SSL)")

    @field_validator("broker")
    @classmethod
    def _kafka_url(cls, v: str) -> str:
        if not v.startswith("kafka://"):
            raise ValueError("broker must be a kafka:// URL, e.g. kafka://127.0.0.1:9092")
        return v

    @property
    def input_topics(self) -> tuple[str, str, str]:
        return (self.clicks_topic, self.likes_topic, self.payments_topic)

    def with_topic_suffix(self, suffix: str) -> Settings:
        """The same settings with every topic name suffixed (isolated demo runs and tests)."""
        return self.model_copy(update={f: f"{getattr(self, f)}-{suffix}" for f in TOPIC_FIELDS})

    def to_env(self) -> dict[str, str]:
        """These settings as STREAM_APP_* variables, to start a worker process with exactly them."""
        env = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            value = value.get_secret_value() if isinstance(value, SecretStr) else value
            env[f"STREAM_APP_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
        return env

    def topic_layout(self) -> dict[str, tuple[int, dict[str, str]]]:
        """Every topic the app reads or writes: name -> (partitions, topic configs).

        User-keyed topics share one partition count (co-partitioning, so a user's events, consent,
        state and decisions live on one partition); the trainer's input has one partition (one owner);
        model parameters are compacted (the latest version per model is what matters). Retention and
        compaction deadlines bound how long personal data stays (docs/privacy.md)."""
        ms = lambda seconds: str(seconds * 1000)  # noqa: E731
        inputs = {"retention.ms": ms(self.input_retention_s), "message.timestamp.type": "CreateTime",
                  "message.timestamp.after.max.ms": ms(self.record_max_lead_s)}  # fmt: skip
        layout: dict[str, tuple[int, dict[str, str]]] = {t: (self.topic_partitions, dict(inputs))
                                                         for t in self.input_topics}  # fmt: skip
        # consent: compacted (the latest command per user is the user's consent, kept as long as the topic)
        layout[self.consent_topic] = (self.topic_partitions, {"cleanup.policy": "compact",
                                      "message.timestamp.after.max.ms": ms(self.record_max_lead_s)})  # fmt: skip
        layout[self.dead_letter_topic] = (self.topic_partitions, {"retention.ms": ms(self.dead_letter_retention_s)})
        layout[self.decisions_topic] = (self.topic_partitions, {"retention.ms": ms(self.decisions_retention_s)})
        layout[self.audit_topic] = (self.topic_partitions, {"retention.ms": ms(self.audit_retention_s)})
        layout[self.model_inputs_topic] = (1, {})
        layout[self.model_params_topic] = (1, {"cleanup.policy": "compact"})
        # recovery reads the changelog: roll segments early so the cleaner keeps it near one record per user;
        # max.compaction.lag.ms is the erase deadline: an overwritten state is compacted away within it
        changelog = {"cleanup.policy": "compact", "segment.bytes": str(64 << 20), "segment.ms": "3600000",
                     "min.cleanable.dirty.ratio": "0.3",
                     "max.compaction.lag.ms": ms(self.erase_deadline_s)}  # fmt: skip
        layout[self.users_changelog_topic] = (self.topic_partitions, changelog)
        layout[self.trainer_changelog_topic] = (1, {"cleanup.policy": "compact"})
        return layout

    @property
    def users_changelog_topic(self) -> str:
        """Per-user state (compacted, co-partitioned with the inputs); the name Faust tables would use."""
        return f"{self.app_id}-users-changelog"

    @property
    def trainer_changelog_topic(self) -> str:
        return f"{self.app_id}-trainer_state-changelog"

    @property
    def bootstrap_servers(self) -> str:
        """The broker list in the form plain Kafka clients (aiokafka) take."""
        return ",".join(u.removeprefix("kafka://") for u in self.broker.split(";"))
