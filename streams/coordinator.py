"""The job coordinator: a faust-streaming app whose per-job state lives in a changelogged table.

It reads ``jobs.requested`` and the co-partitioned ``coordinator.events`` topic, so every
event of one job lands on the same partition and the same table shard. It dispatches
attempts to the tier's attempts topic, fills slots from post-processing verdicts, retries
rejected or failed slots up to a limit and publishes ``jobs.completed``. A restarted
coordinator rebuilds its table from the changelog topic and carries on.
"""

from __future__ import annotations

import base64
import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import faust
from aiokafka import AIOKafkaProducer
from faust.types import EventT
from opentelemetry.trace import SpanKind

from schemas.errors import EventDecodeError
from schemas.events import (
    AttemptDispatched,
    AttemptFinished,
    AttemptProgress,
    AttemptStarted,
    DeadLetter,
    JobCompleted,
    JobRejected,
    JobRequested,
    JobSweep,
    ResultScored,
    Tier,
    decode_event,
    encode_event,
)
from streams.config import Settings, load_settings
from streams.job_state import Decision, JobState
from streams.kafka import make_producer
from streams.tracing import (
    Tracing,
    datetime_ns,
    extract_context,
    inject_headers,
    stage_span,
)

logger = logging.getLogger(__name__)

SERVICE_NAME = "coordinator"


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _headers_of(event: EventT) -> list[tuple[str, bytes]]:
    headers = event.message.headers or []
    if isinstance(headers, dict):
        headers = list(headers.items())
    return [(key, value) for key, value in headers if isinstance(value, bytes)]


def _faust_credentials(settings: Settings) -> dict[str, Any]:
    kafka = settings.kafka
    options: dict[str, Any] = {}
    if kafka.security_protocol.startswith("SASL"):
        assert kafka.sasl_password is not None and kafka.sasl_mechanism is not None
        options["broker_credentials"] = faust.SASLCredentials(
            username=kafka.sasl_username,
            password=kafka.sasl_password.get_secret_value(),
            mechanism=kafka.sasl_mechanism,
            ssl_context=kafka.ssl_context(),
        )
    elif kafka.security_protocol == "SSL":
        options["broker_credentials"] = faust.SSLCredentials(kafka.ssl_context())
    return options


class Coordinator:
    """Wires the faust app, its table, its agents and its sweep timer."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        topics = settings.topics
        partitions = settings.kafka.partitions
        self.app = faust.App(
            f"{settings.kafka.topic_prefix}{settings.coordinator.app_id}",
            broker=[f"kafka://{server}" for server in settings.kafka.bootstrap_servers.split(",")],
            store="memory://",
            web_enabled=False,
            topic_partitions=partitions,
            topic_replication_factor=settings.kafka.replication_factor,
            producer_acks=-1,
            stream_recovery_delay=0.5,
            broker_commit_every=100,
            broker_commit_interval=1.0,
            consumer_auto_offset_reset="earliest",
            # A killed coordinator's partitions move to a survivor after this long.
            broker_session_timeout=10.0,
            broker_heartbeat_interval=2.0,
            **_faust_credentials(settings),
        )
        self.tracing = Tracing(SERVICE_NAME, settings.tracing, topics.spans)
        self.tracer = self.tracing.tracer

        self.requests_topic = self._raw_topic(topics.jobs_requested, partitions)
        self.events_topic = self._raw_topic(topics.coordinator_events, partitions)
        self.completed_topic = self._raw_topic(topics.jobs_completed)
        self.rejected_topic = self._raw_topic(topics.jobs_rejected)
        self.deadletter_topic = self._raw_topic(topics.deadletter)
        self.attempt_topics = {tier: self._raw_topic(topics.attempts(tier)) for tier in Tier}
        self.jobs = self.app.Table(
            "jobs",
            partitions=partitions,
            schema=faust.Schema(key_type=str, key_serializer="raw", value_serializer="json"),
        )
        # Jobs for which a sweep event is already on its way, so each is sent once.
        self._sweeps_sent: set[tuple[str, str]] = set()

        self.app.agent(self.requests_topic, name="requests")(self._requests_agent)
        self.app.agent(self.events_topic, name="events")(self._events_agent)
        self.app.timer(settings.coordinator.sweep_interval_s)(self._sweep_timer)
        self.app.task(self._span_publisher)

    def _raw_topic(self, name: str, partitions: int | None = None) -> faust.TopicT:
        return self.app.topic(
            name, key_type=bytes, value_type=bytes, key_serializer="raw",
            value_serializer="raw", partitions=partitions,
        )

    async def _span_publisher(self) -> None:
        producer: AIOKafkaProducer = make_producer(self.settings.kafka)
        await producer.start()
        try:
            await self.tracing.publish_routine(producer)
        finally:
            await self.tracing.flush(producer)
            await producer.stop()

    def _load(self, job_id: str) -> JobState | None:
        raw = self.jobs.get(job_id)
        if raw is None:
            return None
        return JobState.model_validate(raw)

    def _store(self, state: JobState) -> None:
        self.jobs[state.job_id] = state.model_dump(mode="json")

    async def _dead_letter(self, event: EventT, error: EventDecodeError) -> None:
        message = event.message
        letter = DeadLetter(
            source_topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            consumer_group=self.app.conf.id,
            key_b64=base64.b64encode(message.key).decode() if message.key else None,
            payload_b64=base64.b64encode(event.value or b"").decode(),
            error_type=error.error_type,
            reason=error.reason[:4_000],
        )
        await self.deadletter_topic.send(key=message.key, value=encode_event(letter))
        logger.warning(
            "Sent record to dead-letter topic: topic=%s partition=%d offset=%d error_type=%s "
            "reason=%s",
            message.topic, message.partition, message.offset, error.error_type,
            error.reason[:300],
        )

    # ---- job requests -------------------------------------------------------------------

    async def _requests_agent(self, stream: faust.StreamT) -> None:
        async for event in stream.events():
            try:
                await self._on_request(event)
            except Exception:
                # A bug for one job must not stop the partition; the record is kept in the DLQ.
                logger.exception(
                    "Failed to handle job request at partition=%d offset=%d",
                    event.message.partition, event.message.offset,
                )
                await self._dead_letter(event, EventDecodeError(
                    "coordinator failed while handling this request", error_type="internal"))

    async def _on_request(self, event: EventT) -> None:
        try:
            request = decode_event(event.value, JobRequested)
        except EventDecodeError as err:
            await self._reject_invalid(event, err)
            return

        now = _utc_now()
        parent = extract_context(_headers_of(event))
        with stage_span(
            self.tracer, "admission", "admission", parent=parent, kind=SpanKind.CONSUMER,
            attributes=self._request_attributes(request, event),
        ) as span:
            existing = self._load(request.job_id)
            if existing is not None:
                # A redelivered request: publish again what may not have gone out before.
                logger.info("Job %s was already admitted; republishing pending attempts",
                            request.job_id)
                if not existing.is_terminal:
                    await self._publish(existing, Decision(dispatch=existing.pending_dispatches(now)))
                return

            state, decision = JobState.admit(
                request,
                max_attempts_per_slot=self.settings.coordinator.max_attempts_per_slot,
                now=now,
            )
            state.traceparent = dict(inject_headers(span)).get("traceparent", b"").decode() or None
            self._store(state)
            span.set_attribute("slotforge.admission.decision", "admitted")
            logger.info(
                "Admitted job %s tenant=%s user=%s model=%s slots=%d tier=%s",
                request.job_id, request.tenant_id, request.user_id, request.params.model,
                request.slots, request.tier.value,
            )
            await self._publish(state, decision)

    def _request_attributes(self, request: JobRequested, event: EventT) -> dict[str, Any]:
        return {
            "messaging.system": "kafka",
            "messaging.operation.type": "process",
            "messaging.destination.name": event.message.topic,
            "messaging.destination.partition.id": str(event.message.partition),
            "messaging.kafka.offset": event.message.offset,
            "messaging.consumer.group.name": self.app.conf.id,
            "slotforge.job.id": request.job_id,
            "slotforge.tenant.id": request.tenant_id,
            "slotforge.tier": request.tier.value,
            "slotforge.slots": request.slots,
            "gen_ai.request.model": request.params.model,
        }

    async def _reject_invalid(self, event: EventT, error: EventDecodeError) -> None:
        """Answer an invalid request with a rejection when it names a job, else dead-letter it."""
        ids = _job_ids_from(event.value)
        if ids is None or error.error_type not in ("validation", "unsupported_version"):
            await self._dead_letter(event, error)
            return
        job_id, tenant_id = ids
        rejection = JobRejected(job_id=job_id, tenant_id=tenant_id, reason=error.reason)
        await self.rejected_topic.send(
            key=job_id.encode(), value=encode_event(rejection), headers=_headers_of(event)
        )
        logger.warning("Rejected job %s tenant=%s: %s", job_id, tenant_id, error.reason[:300])

    # ---- attempt and scoring events -------------------------------------------------------

    async def _events_agent(self, stream: faust.StreamT) -> None:
        async for event in stream.events():
            try:
                await self._on_event(event)
            except Exception:
                logger.exception(
                    "Failed to handle coordinator event at partition=%d offset=%d",
                    event.message.partition, event.message.offset,
                )
                await self._dead_letter(event, EventDecodeError(
                    "coordinator failed while handling this event", error_type="internal"))

    async def _on_event(self, event: EventT) -> None:
        try:
            message = decode_event(
                event.value, AttemptStarted, AttemptProgress, AttemptFinished, ResultScored,
                JobSweep,
            )
        except EventDecodeError as err:
            await self._dead_letter(event, err)
            return
        if isinstance(message, AttemptProgress):
            return

        state = self._load(message.job_id)
        if state is None:
            logger.warning("Ignoring %s for unknown job %s", message.event_type, message.job_id)
            return

        now = _utc_now()
        if isinstance(message, JobSweep):
            await self._on_sweep(state, message, now)
            return
        if isinstance(message, AttemptStarted):
            decision = state.on_started(message)
        elif isinstance(message, AttemptFinished):
            decision = state.on_finished(message, now)
            if message.status.value != "succeeded":
                logger.info(
                    "Attempt %s of job %s ended %s on worker %s: %s",
                    message.attempt_id, message.job_id, message.status.value, message.worker_id,
                    message.error,
                )
        else:
            decision = state.on_scored(message, now)
            logger.debug(
                "Attempt %s of job %s scored %.3f accepted=%s",
                message.attempt_id, message.job_id, message.score, message.accepted,
            )
        self._store(state)
        await self._publish(state, decision)

    async def _on_sweep(self, state: JobState, sweep: JobSweep, now: datetime) -> None:
        self._sweeps_sent.discard((sweep.job_id, sweep.action))
        if sweep.action == "expire":
            if state.is_terminal:
                self.jobs.pop(state.job_id, None)
                logger.info("Removed finished job %s from the jobs table", state.job_id)
            return
        decision = state.on_deadline(now)
        if decision.completed is not None:
            logger.warning("Job %s reached its deadline with open slots", state.job_id)
        self._store(state)
        await self._publish(state, decision)

    # ---- publishing -------------------------------------------------------------------------

    async def _publish(self, state: JobState, decision: Decision) -> None:
        parent_headers = self._job_headers(state)
        for attempt in decision.dispatch:
            await self._send_attempt(attempt, parent_headers)
        if decision.completed is not None:
            await self._send_completion(state, decision.completed, parent_headers)

    def _job_headers(self, state: JobState) -> list[tuple[str, bytes]]:
        if not state.traceparent:
            return []
        return [("traceparent", state.traceparent.encode())]

    async def _send_attempt(
        self, attempt: AttemptDispatched, parent_headers: list[tuple[str, bytes]]
    ) -> None:
        topic = self.attempt_topics[attempt.tier]
        with stage_span(
            self.tracer, f"send {topic.get_topic_name()}", "dispatch",
            parent=extract_context(parent_headers), kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "kafka",
                "messaging.operation.type": "send",
                "messaging.destination.name": topic.get_topic_name(),
                "slotforge.job.id": attempt.job_id,
                "slotforge.attempt.id": attempt.attempt_id,
                "slotforge.slot": attempt.slot,
                "slotforge.attempt.number": attempt.attempt_no,
            },
        ) as span:
            await topic.send(
                key=attempt.attempt_id.encode(), value=encode_event(attempt),
                headers=inject_headers(span),
            )
        logger.debug("Dispatched attempt %s of job %s slot %d (attempt %d)",
                     attempt.attempt_id, attempt.job_id, attempt.slot, attempt.attempt_no)

    async def _send_completion(
        self, state: JobState, completed: JobCompleted, parent_headers: list[tuple[str, bytes]]
    ) -> None:
        parent = extract_context(parent_headers)
        attributes = {
            "slotforge.job.id": completed.job_id,
            "slotforge.tenant.id": completed.tenant_id,
            "slotforge.job.status": completed.status.value,
            "slotforge.tier": completed.tier.value,
            "slotforge.slots": completed.requested_slots,
            "slotforge.slots.filled": len(completed.slots),
            "slotforge.slots.fallback": sum(1 for slot in completed.slots if slot.fallback),
            "slotforge.attempts": completed.attempts,
            "slotforge.gpu_s": round(state.gpu_s_total, 6),
            "gen_ai.request.model": state.params.model,
        }
        # The job span covers the whole job, from request to completion.
        job_span = self.tracer.start_span(
            "job", context=parent, start_time=datetime_ns(completed.requested_at),
            attributes={"slotforge.stage": "job", **attributes},
        )
        job_span.end(end_time=datetime_ns(completed.completed_at))
        with stage_span(
            self.tracer, f"send {self.completed_topic.get_topic_name()}", "completion",
            parent=parent, kind=SpanKind.PRODUCER, attributes=attributes,
        ) as span:
            await self.completed_topic.send(
                key=completed.job_id.encode(), value=encode_event(completed),
                headers=inject_headers(span),
            )
        logger.info(
            "Job %s ended %s with %d/%d slots after %d attempts%s",
            completed.job_id, completed.status.value, len(completed.slots),
            completed.requested_slots, completed.attempts,
            f" ({completed.reason})" if completed.reason else "",
        )

    # ---- sweeps -------------------------------------------------------------------------------

    async def _sweep_timer(self) -> None:
        """Ask partition owners to end jobs past their deadline and forget old finished jobs.

        Tables may only change inside an agent, so the timer sends a sweep event through the
        co-partitioned events topic instead of changing the table itself.
        """
        now = _utc_now()
        retention = timedelta(seconds=self.settings.coordinator.retention_s)
        for job_id, raw in list(self.jobs.items()):
            phase = raw.get("phase")
            if phase == "running":
                deadline = datetime.fromisoformat(raw["deadline_at"])
                action = "deadline" if now >= deadline else None
            else:
                finished = raw.get("finished_at")
                expired = finished and now - datetime.fromisoformat(finished) >= retention
                action = "expire" if expired else None
            if action is None or (job_id, action) in self._sweeps_sent:
                continue
            self._sweeps_sent.add((job_id, action))
            sweep = JobSweep(job_id=job_id, job_key=raw["job_key"], action=action)
            await self.events_topic.send(key=sweep.job_key.encode(), value=encode_event(sweep))


def _job_ids_from(value: bytes | None) -> tuple[str, str] | None:
    """Pull job and tenant ids out of an invalid request so the client can be told."""
    try:
        raw = json.loads(value or b"")
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(raw, dict):
        return None
    job_id, tenant_id = raw.get("job_id"), raw.get("tenant_id")
    if isinstance(job_id, str) and isinstance(tenant_id, str) and 0 < len(job_id) <= 64 \
            and 0 < len(tenant_id) <= 128:
        return job_id, tenant_id
    return None


def main() -> int:
    """Run the coordinator as a faust worker until SIGTERM or SIGINT."""
    settings = load_settings()
    coordinator = Coordinator(settings)
    # faust spells the warning level "warn".
    loglevel = settings.log_level.lower().replace("warning", "warn")
    worker = faust.Worker(coordinator.app, loglevel=loglevel, quiet=True)
    worker.execute_from_commandline()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
