"""Settings for every slotforge process, read once from ``SLOTFORGE_*`` variables.

Nested groups use a double underscore, for example ``SLOTFORGE_KAFKA__BOOTSTRAP_SERVERS``.
"""

from __future__ import annotations

import json
import os
import re
import ssl
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from schemas.errors import ConfigurationError
from schemas.topics import TopicNames

LOCAL_DIR = Path(".local")
# The characters Kafka allows in a topic name.
_TOPIC_CHARS = re.compile(r"[A-Za-z0-9._-]*")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Schemes of a span store DSN: embedded chDB, or a ClickHouse server over HTTP(S).
CLICKHOUSE_SCHEMES = ("chdb", "http", "https")


class KafkaSettings(BaseModel):
    """Connection to the Kafka cluster, passed unchanged to every aiokafka and faust client."""

    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    topic_prefix: str = "slotforge."
    partitions: int = Field(default=6, ge=1, le=1_000)
    replication_factor: int = Field(default=1, ge=1, le=10)
    request_timeout_ms: int = Field(default=30_000, ge=1_000)
    # A consumer group member that has not polled for this long is removed from its group.
    # It also bounds how long a rebalance waits for members.
    max_poll_interval_ms: int = Field(default=300_000, ge=1_000)

    @field_validator("topic_prefix")
    @classmethod
    def _check_topic_prefix(cls, prefix: str) -> str:
        if not _TOPIC_CHARS.fullmatch(prefix) or len(prefix) > 200:
            raise ValueError(
                f"invalid topic prefix {prefix[:100]!r}: Kafka topic names take only ASCII "
                "letters, digits, '.', '_' and '-', and the prefix may have at most 200 "
                "characters"
            )
        return prefix

    @model_validator(mode="after")
    def _check_security(self) -> KafkaSettings:
        if self.sasl_mechanism and not self.security_protocol.startswith("SASL"):
            raise ValueError(
                f"SLOTFORGE_KAFKA__SASL_MECHANISM is {self.sasl_mechanism}, but "
                f"security_protocol is {self.security_protocol}; set "
                "SLOTFORGE_KAFKA__SECURITY_PROTOCOL to SASL_PLAINTEXT or SASL_SSL, or unset "
                "the mechanism"
            )
        if self.security_protocol.startswith("SASL"):
            if not self.sasl_mechanism:
                raise ValueError(
                    "SLOTFORGE_KAFKA__SASL_MECHANISM is required when security_protocol "
                    f"is {self.security_protocol}; set PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"
                )
            if not self.sasl_username or self.sasl_password is None:
                raise ValueError(
                    "SLOTFORGE_KAFKA__SASL_USERNAME and SLOTFORGE_KAFKA__SASL_PASSWORD are "
                    f"required for SASL mechanism {self.sasl_mechanism}"
                )
        return self

    @property
    def topics(self) -> TopicNames:
        return TopicNames(self.topic_prefix)

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.security_protocol not in ("SSL", "SASL_SSL"):
            return None
        context = ssl.create_default_context(
            cafile=str(self.ssl_cafile) if self.ssl_cafile else None
        )
        if self.ssl_certfile:
            context.load_cert_chain(
                str(self.ssl_certfile), str(self.ssl_keyfile) if self.ssl_keyfile else None
            )
        return context

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments shared by aiokafka producers, consumers and admin clients."""
        options: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
        }
        context = self.ssl_context()
        if context is not None:
            options["ssl_context"] = context
        if self.sasl_mechanism:
            options["sasl_mechanism"] = self.sasl_mechanism
            options["sasl_plain_username"] = self.sasl_username
            assert self.sasl_password is not None
            options["sasl_plain_password"] = self.sasl_password.get_secret_value()
        return options


class CoordinatorSettings(BaseModel):
    app_id: str = "coordinator"
    max_attempts_per_slot: int = Field(default=4, ge=1, le=100)
    racing_policy: Literal["sequential", "fixed_race", "adaptive"] = "adaptive"
    # Lease a worker holds on a claimed attempt; progress heartbeats renew it.
    lease_s: float = Field(default=15.0, gt=0)
    # Lease granted with a dispatch, until the attempt starts and its lease is renewed. Short,
    # so an attempt whose record reached another worker after a rebalance goes out again soon.
    dispatch_lease_s: float = Field(default=5.0, ge=3)
    cache_ttl_s: float = Field(default=3_600.0, ge=0)
    cache_max_entries: int = Field(default=16, ge=0, le=1_000)
    acceptance_prior: float = Field(default=0.5, gt=0, le=1)
    # A worker whose last status report is older than this counts as gone.
    worker_status_ttl_s: float = Field(default=5.0, gt=0)
    admission_enabled: bool = True
    # Per-tenant quota in slots per second, with a burst; 0 disables quotas.
    tenant_quota_slots_per_s: float = Field(default=0.0, ge=0)
    tenant_quota_burst_slots: float = Field(default=64.0, gt=0)
    # Unscored generations waiting for post-processing: past the first bound no speculative
    # attempts start, past the second admission tightens.
    postprocess_lag_speculation_bound: int = Field(default=200, ge=1)
    postprocess_lag_admission_bound: int = Field(default=1_000, ge=1)
    lag_check_interval_s: float = Field(default=2.0, gt=0)
    # Seconds between sweeps that look for jobs past their deadline.
    sweep_interval_s: float = Field(default=1.0, gt=0)
    # Seconds between two looks of the adaptive policy at a flight whose attempts report
    # progress, so the flight can race into slots other jobs free and replace stragglers.
    replan_interval_s: float = Field(default=0.1, gt=0)
    # Route first attempts to a partition of the worker that model affinity picks; off, the
    # default partitioner spreads them by key.
    affinity_routing: bool = True
    # Grant the lease with the dispatch of an attempt routed to a worker with a free slot,
    # so it starts without the claim round trip. Needs affinity routing.
    grant_at_dispatch: bool = True
    retention_s: float = Field(default=3_600.0, ge=0)
    # Milliseconds the broker may hold a fetch of the coordinator's consumer open while no
    # data arrives. Records for a partition left out of the open fetch wait up to this long.
    fetch_max_wait_ms: int = Field(default=50, ge=0, le=1_500)
    # Records processed between two offset commits, besides the commit every second. A
    # commit this count triggers runs in faust's read loop, which stops reading until every
    # pending send is acknowledged.
    commit_every_records: int = Field(default=10_000, ge=1)


class SimulationSettings(BaseModel):
    """The simulated GPU used by benchmarks and fault tests in place of diffusers."""

    enabled: bool = False
    p50_s: float = Field(default=1.0, gt=0)
    # Lognormal sigma; 0.99 makes p99 about ten times p50.
    sigma: float = Field(default=0.99, ge=0)
    acceptance: float = Field(default=0.5, ge=0, le=1)
    # Each extra attempt on the same device stretches every step by this fraction.
    slowdown_per_attempt: float = Field(default=0.0, ge=0)
    hang_fraction: float = Field(default=0.0, ge=0, le=1)
    hang_s: float = Field(default=3_600.0, gt=0)
    crash_fraction: float = Field(default=0.0, ge=0, le=1)


TierName = Literal["interactive", "standard", "batch"]


def _default_tier_weights() -> dict[TierName, float]:
    return {"interactive": 6.0, "standard": 3.0, "batch": 1.0}


class WorkerSettings(BaseModel):
    group_id: str = "slotforge-gpu"
    worker_id: str | None = None
    # Static membership (Kafka's group.instance.id): a stable name per worker slot, such as
    # a pod name, that a restarted worker reuses. It takes over its predecessor's partitions
    # without a rebalance if it rejoins within session_timeout_ms. Unset, every start joins
    # as a new member and every stop or crash rebalances the group.
    group_instance_id: str | None = Field(default=None, min_length=1, max_length=249)
    # Milliseconds without heartbeats before the broker drops a crashed worker from the
    # group and moves its partitions. A static member does not leave the group on a clean
    # stop either, so its partitions wait this long unless a worker with its name rejoins.
    session_timeout_ms: int = Field(default=10_000, ge=1_000, le=300_000)
    slots: int = Field(default=2, ge=1, le=256)
    model_path: str | None = None
    # Folder of LoRA adapters, one ``<adapter id>/adapter.safetensors`` each. Without it the
    # random-weight pipeline gets random adapters seeded from their ids, and a pipeline
    # loaded from ``model_path`` rejects requests that name adapters.
    adapter_dir: Path | None = None
    device: str = "auto"
    # Emit one progress heartbeat every N denoising steps.
    progress_every_steps: int = Field(default=1, ge=1)
    # Minimum seconds between two heartbeats of one attempt; the first due step and the
    # last step are always sent. Every heartbeat is an event for the coordinator, and
    # per-step heartbeats of fast steps made them most of its load. Keep it well under the
    # timeout policy's one-second minimum silence.
    progress_min_interval_s: float = Field(default=0.25, ge=0)
    status_interval_s: float = Field(default=1.0, gt=0)
    # Seconds to wait for the coordinator's answer to a claim before asking again.
    claim_timeout_s: float = Field(default=5.0, gt=0)
    # Claimed attempts that can share one pipeline call run together, up to this many.
    max_batch_size: int = Field(default=4, ge=1, le=256)
    # Milliseconds the first attempt of a batch waits for others before it runs anyway.
    max_batch_wait_ms: float = Field(default=20.0, ge=0)
    # Memory for loaded models and samples on the CPU; on CUDA the device's total memory
    # times cuda_memory_fraction is used instead.
    memory_budget_mb: int = Field(default=4096, ge=1)
    # float64 makes a batched image bit-identical to the same seed run alone on the CPU;
    # float32 is about twice as fast there and gains from batching, but about one pixel in
    # 3,000 may differ by one level between batch sizes (see bench gpu).
    cpu_dtype: Literal["float32", "float64"] = "float32"
    cuda_memory_fraction: float = Field(default=0.9, gt=0, le=1)
    simulation: SimulationSettings = SimulationSettings()
    # Order in which the worker takes attempts of the three tiers: strict priority with
    # aging, weighted shares, or fifo (no tier preference).
    tier_policy: Literal["strict", "weighted", "fifo"] = "strict"
    # Seconds a queued tier may go unserved under strict priority before it gets a fetch.
    tier_aging_s: float = Field(default=10.0, gt=0)
    # Shares of the weighted policy, by tier name.
    tier_weights: dict[TierName, float] = Field(default_factory=_default_tier_weights)
    # Attempts fetched and claimed beyond the slots while all of them are busy, so a freed
    # slot starts at once. The claim's lease runs while the attempt waits for a slot.
    claim_ahead: int = Field(default=1, ge=0, le=64)
    # Seconds between measurements of the queued attempts per tier (end offsets).
    tier_refresh_s: float = Field(default=0.2, gt=0)
    # Maximum time the broker holds a fetch of the attempts topics open while no records
    # arrive. aiokafka keeps one fetch per broker in flight, so a partition that the tier
    # policy resumes waits for that fetch. aiokafka's default of 500 ms left free slots idle.
    attempts_fetch_max_wait_ms: int = Field(default=50, ge=0)

    @model_validator(mode="after")
    def _check_tier_weights(self) -> WorkerSettings:
        bad = {tier: weight for tier, weight in self.tier_weights.items() if weight <= 0}
        if bad:
            raise ValueError(f"tier_weights must be positive, got {bad}")
        return self


class RetrySettings(BaseModel):
    """Retries of transient failures through the delay topics."""

    router_group_id: str = "slotforge-retry-router"
    # Records the router fetches at once; waiting records stay in Kafka.
    router_batch: int = Field(default=100, ge=1, le=10_000)
    # Exponential backoff: retry n waits min(max_s, base_s * 2^(n-1)) times a factor
    # drawn from [1 - jitter, 1].
    base_s: float = Field(default=1.0, gt=0)
    max_s: float = Field(default=60.0, gt=0)
    jitter: float = Field(default=0.5, ge=0, lt=1)
    # Retries of one attempt (or one post-processing record) after transient failures.
    max_retries_per_attempt: int = Field(default=3, ge=0, le=100)
    # Retries of all attempts of one job together; past it the job fails with the error.
    max_retries_per_job: int = Field(default=8, ge=0, le=1_000)

    @model_validator(mode="after")
    def _check_backoff(self) -> RetrySettings:
        if self.max_s < self.base_s:
            raise ValueError(f"max_s ({self.max_s}) must not be below base_s ({self.base_s})")
        return self


class PostprocessSettings(BaseModel):
    group_id: str = "slotforge-postprocess"
    concurrency: int = Field(default=4, ge=1, le=256)
    accept_threshold: float = Field(default=0.49, ge=0.0, le=1.0)
    # External moderation API for accepted images; unset skips moderation.
    moderation_url: str | None = None
    # Requests per second to the moderation API, shared by every post-processing process.
    moderation_rate_per_s: float = Field(default=5.0, gt=0)
    moderation_timeout_s: float = Field(default=10.0, gt=0)


CriticalConsumer = Literal["delivery", "webhook"]


def _default_critical_consumers() -> list[CriticalConsumer]:
    return ["delivery"]


class ConsumerSettings(BaseModel):
    critical_group_id: str = "slotforge-delivery"
    best_effort_group_id: str = "slotforge-thumbnails"
    webhook_group_id: str = "slotforge-webhook"
    thumbnail_px: int = Field(default=16, ge=4, le=1024)
    # Critical consumers whose acknowledgements gate a job's delivered state.
    critical: list[CriticalConsumer] = Field(default_factory=_default_critical_consumers)
    webhook_url: str | None = None
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    # Attempts per delivery, with exponential backoff and jitter between them.
    delivery_max_attempts: int = Field(default=5, ge=1, le=100)
    delivery_backoff_s: float = Field(default=0.5, gt=0)
    # A best-effort consumer drops completions older than this, counting each drop.
    best_effort_budget_s: float = Field(default=300.0, gt=0)


class ClickHouseSettings(BaseModel):
    dsn: str = f"chdb://{(LOCAL_DIR / 'clickhouse').resolve()}"
    table: str = "otel_traces"
    sink_group_id: str = "slotforge-span-sink"
    batch_rows: int = Field(default=5_000, ge=1)
    batch_wait_s: float = Field(default=1.0, gt=0)

    @field_validator("dsn")
    @classmethod
    def _check_dsn(cls, dsn: str) -> str:
        scheme = urlsplit(dsn).scheme
        if scheme not in CLICKHOUSE_SCHEMES:
            raise ValueError(
                f"unsupported DSN scheme {scheme!r}; use chdb:///DIRECTORY for the embedded "
                "store, or http(s)://USER:PASSWORD@HOST:PORT/DATABASE for a ClickHouse server"
            )
        return dsn


class TracingSettings(BaseModel):
    enabled: bool = True
    # Spans waiting for the Kafka producer; past this bound new spans are dropped and counted.
    max_queue_spans: int = Field(default=20_000, ge=100)
    redact_prompts: bool = False


class MetricsSettings(BaseModel):
    """Prometheus endpoint of one process."""

    # 0 turns the endpoint off. Each process on a host needs its own port, so ProcessGroup
    # hands out consecutive ports from a base when one is set.
    port: int = Field(default=0, ge=0, le=65_535)
    # Loopback by default because the endpoint has no authentication.
    address: str = "127.0.0.1"
    lag_interval_s: float = Field(default=5.0, gt=0)


class Settings(BaseSettings):
    """All settings of one slotforge process."""

    model_config = SettingsConfigDict(
        env_prefix="SLOTFORGE_", env_nested_delimiter="__", extra="ignore"
    )

    kafka: KafkaSettings = KafkaSettings()
    coordinator: CoordinatorSettings = CoordinatorSettings()
    worker: WorkerSettings = WorkerSettings()
    postprocess: PostprocessSettings = PostprocessSettings()
    retry: RetrySettings = RetrySettings()
    consumers: ConsumerSettings = ConsumerSettings()
    clickhouse: ClickHouseSettings = ClickHouseSettings()
    tracing: TracingSettings = TracingSettings()
    metrics: MetricsSettings = MetricsSettings()
    artifact_dir: Path = LOCAL_DIR / "artifacts"
    # Result manifests written by the critical delivery consumer, one JSON file per job.
    delivery_dir: Path = LOCAL_DIR / "deliveries"
    log_level: str = "INFO"
    # Seconds a service may take to stop after SIGTERM before it exits without finishing
    # its cleanup, for example when the broker is unreachable and every commit blocks.
    stop_timeout_s: float = Field(default=60.0, gt=0)

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, level: str) -> str:
        if level.upper() not in LOG_LEVELS:
            raise ValueError(f"unknown log level {level!r}; use one of {', '.join(LOG_LEVELS)}")
        return level.upper()

    @property
    def topics(self) -> TopicNames:
        return self.kafka.topics


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment, turning validation errors into one clear message."""
    from pydantic import ValidationError

    try:
        return Settings(**overrides)
    except ValidationError as err:
        lines = []
        for item in err.errors():
            field = "__".join(str(part) for part in item["loc"]).upper()
            lines.append(f"SLOTFORGE_{field}: {item['msg']}")
        raise ConfigurationError("invalid settings: " + "; ".join(lines)) from err
    except SettingsError as err:
        # pydantic-settings decodes list and dict settings as JSON before validating them.
        raise ConfigurationError(f"invalid settings: {_describe_json_error(err)}") from err


def _describe_json_error(error: SettingsError) -> str:
    """Name the variables whose value is not the JSON that a list or dict setting needs."""
    names = sorted(
        name.upper() for name, value in os.environ.items()
        if name.upper().startswith("SLOTFORGE_") and _is_invalid_json(value)
        and _is_json_setting(name.upper().removeprefix("SLOTFORGE_").lower().split("__"))
    )
    if not names:
        return f"{error}: {error.__cause__}"
    return "; ".join(
        f"{name}: invalid JSON; list and dict settings take a JSON value, such as "
        '["delivery"] or {"interactive": 6}' for name in names
    )


def _is_invalid_json(value: str) -> bool:
    try:
        json.loads(value)
    except ValueError:
        return True
    return False


def _is_json_setting(path: list[str]) -> bool:
    """Return whether the setting at ``path`` is a list or dict, which is read as JSON."""
    model: Any = Settings
    for index, part in enumerate(path):
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return False
        annotation = field.annotation
        if index == len(path) - 1:
            return getattr(annotation, "__origin__", annotation) in (list, dict)
        model = annotation
    return False


def settings_to_env(settings: Settings) -> dict[str, str]:
    """Render settings as ``SLOTFORGE_*`` variables, so a child process reads the same values."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump(mode="json").items():
        if isinstance(value, dict):
            for field_name, field_value in value.items():
                if field_value is None:
                    continue
                if isinstance(field_value, list | dict):
                    import json

                    field_value = json.dumps(field_value)
                key = f"SLOTFORGE_{name.upper()}__{field_name.upper()}"
                env[key] = str(field_value)
        elif value is not None:
            env[f"SLOTFORGE_{name.upper()}"] = str(value)
    kafka = settings.kafka
    if kafka.sasl_password is not None:
        env["SLOTFORGE_KAFKA__SASL_PASSWORD"] = kafka.sasl_password.get_secret_value()
    return env
