"""Pydantic models for every event on the slotforge topics, with a schema version each.

Every record value is one JSON object carrying ``event_type`` and ``schema_version``.
Producers in other languages use the JSON Schema that ``slotforge schemas export`` writes.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from schemas.errors import EventDecodeError

# Final keeps the literal type, so the Literal[1] field below accepts it as its default.
SCHEMA_VERSION: Final = 1

# Bounds that reject absurd requests before they reach a GPU.
MAX_PROMPT_CHARS = 4_000
MAX_SLOTS = 64
MAX_STEPS = 500
MIN_SIDE_PX = 8
MAX_SIDE_PX = 2_048
MAX_RECORD_BYTES = 1_000_000
# Highest partition number a worker may report: KafkaSettings.partitions creates at most
# 1000 partitions per topic.
MAX_PARTITION = 999
# A job id names the job's artifact folder and manifest file, and starts each attempt id
# ``<job id>-<key tag>-<n>`` (see attempt_id_for), which events cap at MAX_ATTEMPT_ID_CHARS.
MAX_JOB_ID_CHARS = 56
MAX_ATTEMPT_ID_CHARS = 80
# Hex digits of the cache key's hash in an attempt id.
ATTEMPT_KEY_TAG_CHARS = 8
_JOB_ID_CHARS = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def attempt_id_for(job_id: str, job_key: str, seq: int) -> str:
    """Name the seq-th attempt of a cache key's flight for job ``job_id``.

    Clients choose job ids, so two cache keys may both have a job with the same id. The
    key's tag keeps their attempts apart, because workers and the coordinator tell attempts
    apart by id alone.
    """
    tag = hashlib.sha256(job_key.encode("utf-8")).hexdigest()[:ATTEMPT_KEY_TAG_CHARS]
    return f"{job_id}-{tag}-{seq}"


def utc_now() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class Tier(StrEnum):
    """Queue tier of a job; each tier has its own attempts topic."""

    INTERACTIVE = "interactive"
    STANDARD = "standard"
    BATCH = "batch"


class AttemptStatus(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobStatus(StrEnum):
    """Terminal state of a job that was admitted."""

    COMPLETED = "completed"
    PARTIAL = "partial"
    FAILED = "failed"
    CANCELLED = "cancelled"


class _Model(BaseModel):
    # Python's JSON parser accepts NaN and Infinity, which no deadline, score or time means.
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False,
                              allow_inf_nan=False)


def normalize_prompt(prompt: str) -> str:
    """Fold case, Unicode form and whitespace so trivially different prompts share a cache key."""
    folded = unicodedata.normalize("NFKC", prompt).casefold()
    return " ".join(folded.split())


class GenerationParams(_Model):
    """What to generate: the model, the prompt and the sampler settings."""

    model: str = Field(min_length=1, max_length=200)
    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    steps: int = Field(ge=1, le=MAX_STEPS)
    width: int = Field(default=32, ge=MIN_SIDE_PX, le=MAX_SIDE_PX)
    height: int = Field(default=32, ge=MIN_SIDE_PX, le=MAX_SIDE_PX)
    guidance_scale: float = Field(default=7.5, ge=0.0, le=50.0)
    scheduler: str = Field(default="ddim", min_length=1, max_length=64)
    loras: tuple[str, ...] = Field(default=(), max_length=16)

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8 != 0:
            raise ValueError(f"must be a multiple of 8, got {value}")
        return value


def cache_key(tenant_id: str, user_id: str, params: GenerationParams) -> str:
    """Hash tenant, user, normalized prompt and generation parameters into the job's key.

    The key partitions ``jobs.requested``, so identical requests meet on one coordinator
    partition; it starts with the tenant so no two tenants can ever share a key.
    """
    material = {
        "tenant": tenant_id,
        "user": user_id,
        "prompt": normalize_prompt(params.prompt),
        "negative_prompt": normalize_prompt(params.negative_prompt),
        "model": params.model,
        "steps": params.steps,
        "width": params.width,
        "height": params.height,
        "guidance_scale": params.guidance_scale,
        "scheduler": params.scheduler,
        "loras": list(params.loras),
    }
    digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
    return f"{tenant_id}:{digest[:32]}"


class _Event(_Model):
    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: str = Field(default_factory=new_id, min_length=1, max_length=64)
    emitted_at: AwareDatetime = Field(default_factory=utc_now)


class JobRequested(_Event):
    """A client asks for ``slots`` accepted generations for one prompt."""

    event_type: Literal["job.requested"] = "job.requested"
    job_id: str = Field(default_factory=new_id, min_length=1, max_length=MAX_JOB_ID_CHARS)
    tenant_id: str = Field(min_length=1, max_length=128)
    user_id: str = Field(min_length=1, max_length=128)
    params: GenerationParams
    slots: int = Field(ge=1, le=MAX_SLOTS)
    tier: Tier = Tier.STANDARD
    # Whether admission control may run the job at a lower tier instead of rejecting it.
    allow_downgrade: bool = False
    deadline_s: float = Field(default=600.0, gt=0, le=86_400)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    requested_at: AwareDatetime = Field(default_factory=utc_now)

    @field_validator("job_id")
    @classmethod
    def _check_job_id(cls, job_id: str) -> str:
        if not _JOB_ID_CHARS.fullmatch(job_id) or ".." in job_id:
            raise ValueError(
                f"invalid job id {job_id!r}: use letters, digits, '.', '_' and '-', starting "
                "with a letter or digit and without '..'"
            )
        return job_id

    @property
    def job_key(self) -> str:
        return cache_key(self.tenant_id, self.user_id, self.params)


class AttemptDispatched(_Event):
    """The coordinator asks a GPU worker to run one generation for a job."""

    event_type: Literal["attempt.dispatched"] = "attempt.dispatched"
    attempt_id: str = Field(min_length=1, max_length=MAX_ATTEMPT_ID_CHARS)
    job_id: str = Field(min_length=1, max_length=64)
    job_key: str = Field(min_length=1, max_length=200)
    tenant_id: str = Field(min_length=1, max_length=128)
    slot: int = Field(ge=0, lt=MAX_SLOTS)
    attempt_no: int = Field(ge=1)
    epoch: int = Field(default=1, ge=1)
    params: GenerationParams
    seed: int = Field(ge=0, lt=2**63)
    tier: Tier
    dispatched_at: AwareDatetime = Field(default_factory=utc_now)
    deadline_at: AwareDatetime
    # Dispatched after the job's first attempts: a retry, a replacement or a re-dispatch.
    followup: bool = False
    # Projected remaining seconds past which the coordinator replaces this attempt. A
    # worker whose projection passes it reports progress at once and stops the attempt.
    straggler_remaining_s: float | None = Field(default=None, gt=0)
    # Set when the coordinator granted the lease with the dispatch, to a worker it saw with
    # a free slot. That worker runs the attempt without claiming it while the lease lasts.
    granted_to: str | None = Field(default=None, min_length=1, max_length=128)
    lease_expires_at: AwareDatetime | None = None

    @model_validator(mode="after")
    def _lease_has_holder(self) -> AttemptDispatched:
        if (self.granted_to is None) != (self.lease_expires_at is None):
            raise ValueError("granted_to and lease_expires_at must be set together")
        return self


class _AttemptEvent(_Event):
    attempt_id: str = Field(min_length=1, max_length=MAX_ATTEMPT_ID_CHARS)
    job_id: str = Field(min_length=1, max_length=64)
    job_key: str = Field(min_length=1, max_length=200)
    epoch: int = Field(default=1, ge=1)


class AttemptStarted(_AttemptEvent):
    event_type: Literal["attempt.started"] = "attempt.started"
    worker_id: str = Field(min_length=1, max_length=128)
    started_at: AwareDatetime = Field(default_factory=utc_now)
    # Denoising steps between two progress reports of this attempt, so the coordinator
    # expects each report after that many steps rather than after every step.
    progress_every_steps: int = Field(default=1, ge=1)


class AttemptClaim(_AttemptEvent):
    """A worker asks for the lease on an attempt before it starts running it."""

    event_type: Literal["attempt.claim"] = "attempt.claim"
    worker_id: str = Field(min_length=1, max_length=128)


class ClaimDecision(_AttemptEvent):
    """The coordinator's answer to a claim, on the control topic keyed by worker id.

    ``epoch`` is the fencing token: every later event of the attempt carries it, and the
    coordinator ignores events whose epoch is older than the attempt's current one.
    """

    event_type: Literal["claim.decision"] = "claim.decision"
    worker_id: str = Field(min_length=1, max_length=128)
    granted: bool
    lease_expires_at: AwareDatetime | None = None
    reason: str = Field(default="", max_length=500)


class AttemptCancel(_AttemptEvent):
    """The coordinator tells the worker holding an attempt to stop it at the next step."""

    event_type: Literal["attempt.cancel"] = "attempt.cancel"
    worker_id: str | None = Field(default=None, max_length=128)
    reason: str = Field(max_length=500)


class AttemptProgress(_AttemptEvent):
    """A denoising-step heartbeat from the worker running the attempt."""

    event_type: Literal["attempt.progress"] = "attempt.progress"
    worker_id: str = Field(min_length=1, max_length=128)
    step: int = Field(ge=0)
    total_steps: int = Field(ge=1)


class AttemptFinished(_AttemptEvent):
    event_type: Literal["attempt.finished"] = "attempt.finished"
    worker_id: str = Field(min_length=1, max_length=128)
    status: AttemptStatus
    slot: int = Field(ge=0, lt=MAX_SLOTS)
    artifact_uri: str | None = None
    gpu_s: float = Field(ge=0)
    error_type: str | None = None
    error: str | None = Field(default=None, max_length=2_000)
    retriable: bool = False


class ResultScored(_AttemptEvent):
    """Post-processing verdict on one generated image."""

    event_type: Literal["result.scored"] = "result.scored"
    slot: int = Field(ge=0, lt=MAX_SLOTS)
    artifact_uri: str
    score: float
    accepted: bool
    reason: str = Field(max_length=500)


class SlotResult(_Model):
    slot: int = Field(ge=0, lt=MAX_SLOTS)
    attempt_id: str
    artifact_uri: str
    score: float
    fallback: bool = False
    cached: bool = False


class JobCompleted(_Event):
    """A job reached a terminal state other than rejection."""

    event_type: Literal["job.completed"] = "job.completed"
    job_id: str = Field(min_length=1, max_length=64)
    job_key: str = Field(min_length=1, max_length=200)
    tenant_id: str = Field(min_length=1, max_length=128)
    user_id: str = Field(min_length=1, max_length=128)
    status: JobStatus
    requested_slots: int = Field(ge=1, le=MAX_SLOTS)
    slots: list[SlotResult]
    attempts: int = Field(ge=0)
    tier: Tier
    requested_at: AwareDatetime
    completed_at: AwareDatetime = Field(default_factory=utc_now)
    reason: str | None = None


class DeliveryAck(_Event):
    """A critical consumer applied a completed job, or gave up on it after its retries."""

    event_type: Literal["delivery.ack"] = "delivery.ack"
    job_id: str = Field(min_length=1, max_length=64)
    job_key: str = Field(min_length=1, max_length=200)
    consumer: str = Field(min_length=1, max_length=64)
    delivered: bool
    reason: str = Field(default="", max_length=2_000)


class JobDelivered(_Event):
    """Every critical consumer acknowledged the job, or one of them failed for good."""

    event_type: Literal["job.delivered"] = "job.delivered"
    job_id: str = Field(min_length=1, max_length=64)
    tenant_id: str = Field(min_length=1, max_length=128)
    status: Literal["delivered", "delivery_failed"]
    reason: str = Field(default="", max_length=2_000)


class JobRejected(_Event):
    """The coordinator will not run the job; ``retry_after_s`` says when to ask again."""

    event_type: Literal["job.rejected"] = "job.rejected"
    job_id: str = Field(min_length=1, max_length=64)
    tenant_id: str = Field(min_length=1, max_length=128)
    reason: str = Field(max_length=2_000)
    retry_after_s: float | None = Field(default=None, ge=0)
    requested_at: AwareDatetime | None = None


# The action a sweep requests of the job's partition owner. It ends a job past its deadline,
# removes expired jobs from the flights table, reclaims an attempt's lease, or times out a
# hung or too slow attempt.
SweepAction = Literal["deadline", "expire", "lease", "hung", "too_slow"]


class JobSweep(_Event):
    """A coordinator timer asks the job's partition owner to end or forget the job."""

    event_type: Literal["job.sweep"] = "job.sweep"
    job_id: str = Field(min_length=1, max_length=64)
    job_key: str = Field(min_length=1, max_length=200)
    action: SweepAction
    attempt_id: str | None = Field(default=None, max_length=MAX_ATTEMPT_ID_CHARS)
    epoch: int | None = Field(default=None, ge=1)
    reason: str = Field(default="", max_length=500)


# A partition number in a worker's status report. The coordinator sends records to these
# partitions, so it also checks them against the topic's partition count.
PartitionNumber = Annotated[int, Field(ge=0, le=MAX_PARTITION)]


class WorkerStatus(_Event):
    """A GPU worker's periodic report of its slots, so the coordinator sees idle capacity."""

    event_type: Literal["worker.status"] = "worker.status"
    worker_id: str = Field(min_length=1, max_length=128)
    slots: int = Field(ge=0)
    busy: int = Field(ge=0)
    # Loaded base model and adapter ids; free slots are ``slots - busy``.
    warm_models: list[str] = Field(default_factory=list, max_length=256)
    stopping: bool = False
    # Partitions of ``attempts.<tier>`` assigned to this worker, by tier. The coordinator
    # routes an attempt to the worker through them. Empty before the first assignment.
    partitions: dict[Tier, list[PartitionNumber]] = Field(default_factory=dict)

    @field_validator("partitions")
    @classmethod
    def _distinct_partitions(cls, value: dict[Tier, list[int]]) -> dict[Tier, list[int]]:
        for tier, numbers in value.items():
            if len(set(numbers)) != len(numbers):
                raise ValueError(f"partitions of tier {tier.value} repeat: {numbers}")
        return value


class DeadLetter(_Event):
    """A record that no consumer could process, with where it came from and why."""

    event_type: Literal["dead.letter"] = "dead.letter"
    source_topic: str
    partition: int
    offset: int
    consumer_group: str
    key_b64: str | None = None
    payload_b64: str
    error_type: str
    reason: str = Field(max_length=4_000)


Event = Annotated[
    JobRequested
    | AttemptDispatched
    | AttemptStarted
    | AttemptClaim
    | ClaimDecision
    | AttemptCancel
    | AttemptProgress
    | AttemptFinished
    | ResultScored
    | JobCompleted
    | JobRejected
    | DeliveryAck
    | JobDelivered
    | JobSweep
    | WorkerStatus
    | DeadLetter,
    Field(discriminator="event_type"),
]

EVENT_TYPES: dict[str, type[BaseModel]] = {
    model.model_fields["event_type"].default: model
    for model in (
        JobRequested,
        AttemptDispatched,
        AttemptStarted,
        AttemptClaim,
        ClaimDecision,
        AttemptCancel,
        AttemptProgress,
        AttemptFinished,
        ResultScored,
        JobCompleted,
        JobRejected,
        DeliveryAck,
        JobDelivered,
        JobSweep,
        WorkerStatus,
        DeadLetter,
    )
}

_EVENT_ADAPTER: TypeAdapter[Any] = TypeAdapter(Event)


def encode_event(event: BaseModel) -> bytes:
    return event.model_dump_json().encode()


def _summarize(error: ValidationError) -> str:
    parts = []
    for item in error.errors()[:5]:
        location = ".".join(str(part) for part in item["loc"]) or "<root>"
        parts.append(f"{location}: {item['msg']}")
    more = error.error_count() - len(parts)
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


def decode_event(data: bytes | None, *expected: type[BaseModel]) -> Any:
    """Decode one record value into its event model.

    Args:
        data: the raw record value.
        expected: event classes the caller accepts; any other type is an error.

    Raises:
        EventDecodeError: with ``error_type`` one of ``empty``, ``too_large``, ``encoding``,
            ``json``, ``not_object``, ``unknown_type``, ``unsupported_version``,
            ``unexpected_type`` or ``validation``.
    """
    if not data:
        raise EventDecodeError("record value is empty", error_type="empty")
    if len(data) > MAX_RECORD_BYTES:
        raise EventDecodeError(
            f"record value is {len(data)} bytes, over the {MAX_RECORD_BYTES}-byte limit",
            error_type="too_large",
        )

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise EventDecodeError(f"record value is not UTF-8: {err}", error_type="encoding") from err
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise EventDecodeError(f"record value is not JSON: {err}", error_type="json") from err
    except RecursionError as err:
        # The json module recurses per nesting level, so deep nesting raises this instead.
        raise EventDecodeError(f"record value is JSON nested too deeply: {err}",
                               error_type="json") from err
    if not isinstance(raw, dict):
        raise EventDecodeError(
            f"record value is a JSON {type(raw).__name__}, expected an object",
            error_type="not_object",
        )

    event_type = raw.get("event_type")
    model = EVENT_TYPES.get(event_type) if isinstance(event_type, str) else None
    if model is None:
        raise EventDecodeError(
            f"unknown event_type {event_type!r}; known types: {', '.join(sorted(EVENT_TYPES))}",
            error_type="unknown_type",
        )
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        raise EventDecodeError(
            f"unsupported schema_version {version!r} for {event_type}; "
            f"this consumer reads version {SCHEMA_VERSION}",
            error_type="unsupported_version",
        )
    if expected and model not in expected:
        names = ", ".join(cls.model_fields["event_type"].default for cls in expected)
        raise EventDecodeError(
            f"event_type {event_type} is not expected on this topic (expected {names})",
            error_type="unexpected_type",
        )

    try:
        return _EVENT_ADAPTER.validate_python(raw)
    except ValidationError as err:
        raise EventDecodeError(
            f"invalid {event_type} event: {_summarize(err)}", error_type="validation"
        ) from err
