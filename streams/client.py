"""Producer client for upstream services: submit jobs and await their outcome."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from types import TracebackType
from typing import Self

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from opentelemetry.trace import SpanKind, Tracer

from schemas.errors import EventDecodeError, SlotforgeError
from schemas.events import JobCompleted, JobRejected, JobRequested, decode_event, encode_event
from streams.config import KafkaSettings
from streams.kafka import make_consumer, make_producer, topic_partitions
from streams.tracing import inject_headers, stage_span

logger = logging.getLogger(__name__)


class JobRejectedError(SlotforgeError):
    """The coordinator rejected a job; ``retry_after_s`` says when asking again may succeed."""

    def __init__(self, rejection: JobRejected) -> None:
        retry = (
            f"; retry after {rejection.retry_after_s:.1f} s"
            if rejection.retry_after_s is not None else ""
        )
        super().__init__(
            f"job {rejection.job_id} was rejected: {rejection.reason}{retry}",
            retriable=rejection.retry_after_s is not None,
            job_id=rejection.job_id,
            tenant_id=rejection.tenant_id,
        )
        self.rejection = rejection
        self.reason = rejection.reason
        self.retry_after_s = rejection.retry_after_s


class SlotforgeClient:
    """Submit jobs to ``jobs.requested`` and await each one's completion or rejection.

    Outcomes are read from ``jobs.completed`` and ``jobs.rejected`` without a consumer
    group, from the end of each partition as it was when the client started, so only
    jobs submitted through this client are awaited.

    Args:
        settings: the Kafka connection and topic prefix.
        tracer: optional tracer; each submission then starts a trace whose context
            travels in the record headers.
    """

    def __init__(self, settings: KafkaSettings, *, tracer: Tracer | None = None) -> None:
        self.settings = settings
        self.topics = settings.topics
        self.tracer = tracer
        self._producer: AIOKafkaProducer = make_producer(settings)
        self._consumer: AIOKafkaConsumer = make_consumer(settings, group_id=None)
        self._waiters: dict[str, asyncio.Future[JobCompleted]] = {}
        # Tenant and cache key of each awaited job. Clients choose job ids, so another
        # tenant's job may carry the same id, and its outcome must not resolve this one.
        self._owners: dict[str, tuple[str, str]] = {}
        self._listener: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        await self._producer.start()
        await self._consumer.start()
        partitions = await topic_partitions(
            self.settings, self.topics.jobs_completed, self.topics.jobs_rejected
        )
        if not partitions:
            await self.stop()
            raise SlotforgeError(
                f"topics {self.topics.jobs_completed} and {self.topics.jobs_rejected} do not "
                "exist; create them with `slotforge topics create`"
            )
        self._consumer.assign(partitions)
        await self._consumer.seek_to_end(*partitions)
        # Resolve the end offsets now, so outcomes of jobs submitted later are never skipped.
        for partition in partitions:
            await self._consumer.position(partition)
        self._listener = asyncio.create_task(self._listen_routine(), name="client-listener")

    async def stop(self) -> None:
        """Stop listening and close the Kafka clients; safe to call twice."""
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.cancel()
        try:
            await self._consumer.stop()
        finally:
            # Stopped even when the consumer fails or is cancelled while stopping.
            await self._producer.stop()

    async def submit(self, request: JobRequested) -> str:
        """Publish a job request and return its job id; await the outcome with ``wait``."""
        if self._listener is not None and self._listener.done():
            raise SlotforgeError("the client's outcome listener stopped; restart the client")
        self._waiters.setdefault(request.job_id, asyncio.get_running_loop().create_future())
        self._owners.setdefault(request.job_id, (request.tenant_id, request.job_key))
        headers: list[tuple[str, bytes]] = []
        if self.tracer is not None:
            with stage_span(
                self.tracer, f"send {self.topics.jobs_requested}", "submit",
                kind=SpanKind.PRODUCER,
                attributes={
                    "messaging.system": "kafka",
                    "messaging.operation.type": "send",
                    "messaging.destination.name": self.topics.jobs_requested,
                    "slotforge.job.id": request.job_id,
                    "slotforge.tenant.id": request.tenant_id,
                },
            ) as span:
                headers = inject_headers(span)
                await self._send(request, headers)
        else:
            await self._send(request, headers)
        logger.debug("Submitted job %s", request.job_id)
        return request.job_id

    async def _send(self, request: JobRequested, headers: list[tuple[str, bytes]]) -> None:
        await self._producer.send_and_wait(
            self.topics.jobs_requested, encode_event(request),
            key=request.job_key.encode(), headers=headers,
        )

    async def wait(self, job_id: str, timeout_s: float | None = None) -> JobCompleted:
        """Wait for a submitted job to end.

        Raises:
            JobRejectedError: the coordinator rejected the job.
            TimeoutError: no outcome arrived within ``timeout_s``.
        """
        waiter = self._waiters.get(job_id)
        if waiter is None:
            raise SlotforgeError(f"job {job_id} was not submitted through this client")
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), timeout_s)
        finally:
            if waiter.done():
                self._waiters.pop(job_id, None)
                self._owners.pop(job_id, None)

    async def run(self, request: JobRequested, timeout_s: float | None = None) -> JobCompleted:
        """Submit a job and wait for its outcome."""
        await self.submit(request)
        return await self.wait(request.job_id, timeout_s)

    def pending(self) -> Iterable[str]:
        return [job_id for job_id, waiter in self._waiters.items() if not waiter.done()]

    async def _listen_routine(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for record in records:
                    self._resolve(record.value, record.topic, record.offset)

    def _resolve(self, value: bytes | None, topic: str, offset: int) -> None:
        try:
            outcome = decode_event(value, JobCompleted, JobRejected)
        except EventDecodeError as err:
            logger.warning("Ignoring undecodable outcome at %s offset %d: %s", topic, offset, err)
            return
        waiter = self._waiters.get(outcome.job_id)
        if waiter is None or waiter.done():
            return
        owner = self._owners.get(outcome.job_id)
        if owner is not None and not _belongs_to(outcome, *owner):
            tenant_id, job_key = owner
            logger.warning(
                "Ignoring %s of job %s at %s offset %d: it belongs to tenant %s, key %s, not "
                "to the job this client submitted (tenant %s, key %s)", outcome.event_type,
                outcome.job_id, topic, offset, outcome.tenant_id,
                getattr(outcome, "job_key", "(none)"), tenant_id, job_key)
            return
        if isinstance(outcome, JobRejected):
            waiter.set_exception(JobRejectedError(outcome))
        else:
            waiter.set_result(outcome)


def _belongs_to(outcome: JobCompleted | JobRejected, tenant_id: str, job_key: str) -> bool:
    """Check an outcome against the tenant and cache key of the job a client submitted."""
    if outcome.tenant_id != tenant_id:
        return False
    return not isinstance(outcome, JobCompleted) or outcome.job_key == job_key
