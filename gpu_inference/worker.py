"""GPU worker service: runs dispatched attempts in a fixed number of slots.

The worker consumes ``attempts.<tier>`` for every tier in one consumer group and fetches only
while a slot is free, or while fewer than ``claim_ahead`` claimed attempts wait for one. It
fetches from the tiers its tier policy (``gpu_inference.tier_policy``) chooses, and the other
tiers' partitions stay paused. For each attempt it publishes ``attempt.started``,
``attempt.progress`` heartbeats and ``attempt.finished`` to the coordinator events topic,
keyed by the job key. Before it runs an attempt it needs the attempt's lease: either the
coordinator granted it with the dispatch, or the worker claims the attempt and waits for the
grant on the control topic, which it follows from every partition. A cancellation there
stops the attempt at its next denoising step. Claimed attempts that can
share one pipeline call (see ``gpu_inference.batching``) run as a batch of up to
``max_batch_size``, waiting at most ``max_batch_wait_ms`` for others. Progress,
cancellation and failures stay per attempt.
Every second it reports on the status topic its busy slots, its warm models and adapters,
and the partitions of the attempts topics assigned to it, so the coordinator can route
attempts to it.
A succeeded attempt also goes to the generated topic for post-processing. Offsets are
committed only up to the oldest attempt that has not finished.

Run it with ``python -m gpu_inference.worker``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka.errors import KafkaError
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, StatusCode

from gpu_inference.artifacts import ArtifactStore
from gpu_inference.batching import Batcher, batch_key
from gpu_inference.generation import GenerationCancelled, GenerationRequest, GenerationResult
from gpu_inference.offsets import FlowControlledConsumer, commit_and_flush
from gpu_inference.tier_fetch import TierFetchPlanner
from gpu_inference.tier_policy import TierPolicyName, TierScheduler
from schemas.errors import EventDecodeError
from schemas.events import (
    AttemptCancel,
    AttemptClaim,
    AttemptDispatched,
    AttemptFinished,
    AttemptProgress,
    AttemptStarted,
    AttemptStatus,
    ClaimDecision,
    GenerationParams,
    Tier,
    WorkerStatus,
    decode_event,
    encode_event,
    utc_now,
)
from streams.config import Settings, load_settings
from streams.kafka import (
    Headers,
    make_consumer,
    make_producer,
    send_to_deadletter,
    stop_consumer,
    topic_partitions,
)
from streams.metrics import ATTEMPTS_IN_FLIGHT, SLOT_UTILIZATION, lag_routine
from streams.racing import STRAGGLER_ERROR_TYPE, AttemptRun, is_straggling, straggler_reason
from streams.service import serve
from streams.tracing import Tracing, extract_context, inject_headers, record_wait, stage_span

logger = logging.getLogger(__name__)

# Seconds that running attempts get to finish after a stop request before they are cancelled.
STOP_GRACE_S = 30.0

_MAX_ERROR_CHARS = 2_000
# WorkerStatus accepts at most this many warm ids; a worker with more reports the most
# recently used ones.
MAX_WARM_REPORTED = 256
MAX_REMEMBERED_CANCELS = 50_000
# Seconds a lease granted with the dispatch must still have for the worker to run on it
# without a claim, so clock skew and a slow start stay inside the lease.
LEASE_MARGIN_S = 2.0


@dataclass
class _Attempt:
    """One dispatched attempt running in a slot, with the records that asked for it."""

    event: AttemptDispatched
    records: list[ConsumerRecord[bytes, bytes]]
    context: otel_context.Context
    cancel: threading.Event = field(default_factory=threading.Event)
    cancel_lock: threading.Lock = field(default_factory=threading.Lock)
    cancel_reason: str = ""
    cancel_error_type: str = "cancelled"
    # Whether another worker should run the attempt again after this one cancels it.
    cancel_retriable: bool = False
    # Attempts in the pipeline call that ran this one, itself included.
    batch_size: int = 1
    # Context of the attempt's generation span, for child spans opened on slot threads.
    generation_context: otel_context.Context | None = None
    # The task that runs the attempt, which a run under a higher epoch waits for.
    task: asyncio.Task[None] | None = None
    # Given up unclaimed by a stopping worker, which reports it cancelled so the flight
    # replaces it at once.
    released: bool = False

    def request_cancel(self, reason: str, *, error_type: str, retriable: bool) -> None:
        """Set the cancel flag; the first request wins, later ones are ignored."""
        # The slot thread (deadline, straggler) and the event loop (cancels) both call this.
        with self.cancel_lock:
            if not self.cancel.is_set():
                self.cancel_reason = reason
                self.cancel_error_type = error_type
                self.cancel_retriable = retriable
                self.cancel.set()


@dataclass
class _Outcome:
    status: AttemptStatus
    gpu_s: float = 0.0
    artifact_uri: str | None = None
    error_type: str | None = None
    error: str | None = None
    retriable: bool = False


def build_runner(settings: Settings) -> Any:
    """The simulated GPU when configured, else diffusers (imported here, since it loads torch)."""
    if settings.worker.simulation.enabled:
        from gpu_inference.simulated import SimulatedRunner

        return SimulatedRunner(settings.worker.simulation)
    from gpu_inference.pipeline import DiffusersRunner, dtype_named

    return DiffusersRunner(
        settings.worker.model_path,
        settings.worker.device,
        memory_budget_mb=settings.worker.memory_budget_mb,
        cuda_memory_fraction=settings.worker.cuda_memory_fraction,
        cpu_dtype=dtype_named(settings.worker.cpu_dtype),
        adapter_dir=settings.worker.adapter_dir,
    )


@dataclass
class _BatchEntry:
    """One claimed attempt waiting for, or running in, a batch."""

    attempt: _Attempt
    request: GenerationRequest
    on_step: Callable[[int, int], None]


# A generation's result, or the exception that ended that attempt alone.
_GenerationOutcome = GenerationResult | BaseException


def _fit_slots(runner: Any, slots: int) -> int:
    """Cap the slot count by the runner's memory budget at the default image size."""
    budget_bytes = getattr(runner, "memory_budget_bytes", None)
    if budget_bytes is None:
        return slots
    from gpu_inference.memory import estimate_sample_bytes, fit_slots

    default_width = GenerationParams.model_fields["width"].default
    default_height = GenerationParams.model_fields["height"].default
    return fit_slots(slots, budget_bytes, estimate_sample_bytes(default_width, default_height))


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class GpuWorker:
    """State of one worker process: its clients, slots and running attempts."""

    def __init__(
        self,
        settings: Settings,
        *,
        runner: Any | None = None,
        stop_grace_s: float = STOP_GRACE_S,
    ) -> None:
        self.settings = settings
        self.worker_id = settings.worker.worker_id or default_worker_id()
        self.group_id = settings.worker.group_id
        self.topics = settings.topics
        self.stop_grace_s = stop_grace_s
        self.runner = runner or build_runner(settings)
        self.slots = _fit_slots(self.runner, settings.worker.slots)

        self.store = ArtifactStore(settings.artifact_dir)
        self.tracing = Tracing("gpu-worker", settings.tracing, settings.topics.spans)
        set_tracer = getattr(self.runner, "set_tracer", None)
        if callable(set_tracer):
            set_tracer(self.tracing.tracer)

        # A batch never has more attempts than there are slots. Runners without
        # generate_batch (the simulated GPU) run one attempt per call.
        can_batch = callable(getattr(self.runner, "generate_batch", None))
        self.batcher: Batcher[_BatchEntry, _GenerationOutcome] = Batcher(
            self._run_batch,
            max_batch_size=min(settings.worker.max_batch_size, self.slots) if can_batch else 1,
            max_wait_s=settings.worker.max_batch_wait_ms / 1000,
            limit_for=self._batch_limit,
        )

        self.producer: AIOKafkaProducer = make_producer(settings.kafka)
        worker_settings = settings.worker
        self.fetcher = FlowControlledConsumer(
            make_consumer(settings.kafka, group_id=self.group_id,
                          max_poll_records=self.slots + worker_settings.claim_ahead,
                          fetch_max_wait_ms=worker_settings.attempts_fetch_max_wait_ms,
                          group_instance_id=worker_settings.group_instance_id,
                          session_timeout_ms=worker_settings.session_timeout_ms,
                          # Kafka documents heartbeats at most a third of the session timeout.
                          heartbeat_interval_ms=worker_settings.session_timeout_ms // 3),
            self.group_id,
        )
        self.tier_planner = TierFetchPlanner(
            self.fetcher,
            self.topics.attempt_topics,
            TierScheduler(
                TierPolicyName(worker_settings.tier_policy),
                aging_s=worker_settings.tier_aging_s,
                weights={Tier(name): weight
                         for name, weight in worker_settings.tier_weights.items()},
            ),
            refresh_s=worker_settings.tier_refresh_s,
            followups={self.topics.followups(tier) for tier in Tier},
        )
        # Full batches leave fewer calls running than slots, so each thread gets more cores.
        concurrent_calls = -(-self.slots // self.batcher.max_batch_size)
        self.executor = ThreadPoolExecutor(
            max_workers=self.slots,
            thread_name_prefix="gpu-slot",
            initializer=self.runner.configure_thread,
            initargs=(concurrent_calls,),
        )
        # Running attempts by attempt id; a redelivered record joins the attempt already running.
        self._running: dict[str, _Attempt] = {}
        # Attempts generating at once. Up to claim_ahead more are fetched and claimed while
        # every slot is busy, so a freed slot starts the next attempt without waiting for
        # the fetch and the claim round trip.
        self._gpu_slots = asyncio.Semaphore(self.slots)
        # Slots taken now. Status reports count these, as the coordinator counts the
        # attempts that started and finished after a report.
        self._generating = 0
        self.claim_ahead = settings.worker.claim_ahead
        self._tasks: set[asyncio.Task[None]] = set()
        # Attempts cancelled before this worker took them, oldest first, bounded.
        self._cancelled_queued: dict[tuple[str, int], None] = {}
        # Claims waiting for the coordinator's decision, by attempt id and epoch.
        self._claims: dict[tuple[str, int], asyncio.Future[ClaimDecision]] = {}
        # Set once the worker stops, so no new claim goes out.
        self._stopping = False
        self.control: AIOKafkaConsumer = make_consumer(settings.kafka, group_id=None,
                                                       auto_offset_reset="latest")

    async def run(self, stop: asyncio.Event) -> None:
        topics = list(self.topics.attempt_topics)
        logger.info(
            "Starting GPU worker %s: group %s (instance %s), %d slots, batches of up to %d, "
            "tier policy %s, device %s, model path %s, topics %s",
            self.worker_id,
            self.group_id,
            self.settings.worker.group_instance_id or "dynamic",
            self.slots,
            self.batcher.max_batch_size,
            self.settings.worker.tier_policy,
            self.runner.device,
            self.settings.worker.model_path or "none (random weights)",
            ", ".join(topics),
        )
        self.fetcher.subscribe(topics)
        await self.producer.start()
        try:
            await self._start_control()
            await self.fetcher.consumer.start()
            try:
                async with asyncio.TaskGroup() as services:
                    background = [
                        services.create_task(self.tracing.publish_routine(self.producer)),
                        services.create_task(self._control_routine()),
                        services.create_task(self._status_routine()),
                    ]
                    if self.settings.metrics.port:
                        background.append(services.create_task(lag_routine(
                            self.fetcher.consumer, self.group_id,
                            self.settings.metrics.lag_interval_s)))
                    try:
                        await self._consume(stop)
                    finally:
                        await self.tier_planner.close()
                        await self._send_status(stopping=True)
                        await self._commit_and_flush()
                        for task in background:
                            task.cancel()
            finally:
                # Stopping a dynamic member leaves the group, so its partitions move at once.
                # NOTE: aiokafka 0.14 sends no LeaveGroup for a static member, so its
                # partitions wait for session_timeout_ms or for a successor of that name.
                await stop_consumer(self.fetcher.consumer, self.group_id)
                await stop_consumer(self.control, self.topics.control)
        finally:
            await self.producer.stop()
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.tracing.shutdown()
            logger.info("Stopped GPU worker %s", self.worker_id)

    async def _start_control(self) -> None:
        """Position on the end of every control partition before the first claim goes out."""
        await self.control.start()
        partitions = await topic_partitions(self.settings.kafka, self.topics.control)
        self.control.assign(partitions)
        await self.control.seek_to_end(*partitions)
        for partition in partitions:
            await self.control.position(partition)

    async def _control_routine(self) -> None:
        while True:
            batches = await self.control.getmany(timeout_ms=200)
            for records in batches.values():
                for record in records:
                    try:
                        message = decode_event(record.value, ClaimDecision, AttemptCancel)
                    except EventDecodeError as err:
                        # Every worker reads every control partition without a group, so
                        # each one dead-letters the record under its own worker id.
                        await send_to_deadletter(self.producer, self.topics.deadletter,
                                                 record, self.worker_id, err)
                        continue
                    self._on_control(message)

    def _on_control(self, message: ClaimDecision | AttemptCancel) -> None:
        if isinstance(message, ClaimDecision):
            if message.worker_id != self.worker_id:
                return
            waiter = self._claims.get((message.attempt_id, message.epoch))
            if waiter is not None and not waiter.done():
                waiter.set_result(message)
            return

        attempt = self._running.get(message.attempt_id)
        if attempt is None:
            # Cancelled while still queued: remember it, so its record is dropped unclaimed.
            self._cancelled_queued[(message.attempt_id, message.epoch)] = None
            if len(self._cancelled_queued) > MAX_REMEMBERED_CANCELS:
                self._cancelled_queued.pop(next(iter(self._cancelled_queued)))
            return
        if message.epoch < attempt.event.epoch:
            return
        if message.worker_id not in (None, self.worker_id):
            return
        logger.info("Cancelling attempt %s (epoch %d) of job %s: %s", message.attempt_id,
                    message.epoch, message.job_id, message.reason)
        attempt.request_cancel(message.reason, error_type="cancelled", retriable=False)
        waiter = self._claims.get((message.attempt_id, attempt.event.epoch))
        if waiter is not None and not waiter.done():
            waiter.set_result(ClaimDecision(
                attempt_id=message.attempt_id, job_id=message.job_id, job_key=message.job_key,
                epoch=attempt.event.epoch, worker_id=self.worker_id, granted=False,
                reason=f"cancelled: {message.reason}",
            ))

    async def _status_routine(self) -> None:
        while True:
            await self._send_status(stopping=False)
            await asyncio.sleep(self.settings.worker.status_interval_s)

    async def _send_status(self, *, stopping: bool) -> None:
        ATTEMPTS_IN_FLIGHT.labels(self.group_id).set(len(self._running))
        SLOT_UTILIZATION.labels(self.group_id).set(min(1.0, self._generating / self.slots))
        warm = getattr(self.runner, "warm_models", None)
        status = WorkerStatus(
            worker_id=self.worker_id, slots=self.slots,
            busy=min(self.slots, self._generating),
            warm_models=list(warm())[-MAX_WARM_REPORTED:] if callable(warm) else [],
            stopping=stopping,
            partitions={} if stopping else self._assigned_partitions(),
        )
        try:
            await self.producer.send(self.topics.worker_status, encode_event(status),
                                     key=self.worker_id.encode())
        except KafkaError:
            logger.warning("Failed to publish the status of worker %s", self.worker_id)

    def _assigned_partitions(self) -> dict[Tier, list[int]]:
        """Partitions of each tier's attempts topic that the consumer group assigned here."""
        tiers = {self.topics.attempts(tier): tier for tier in Tier}
        partitions: dict[Tier, list[int]] = {}
        for assigned in self.fetcher.consumer.assignment():
            tier = tiers.get(assigned.topic)
            if tier is not None:
                partitions.setdefault(tier, []).append(assigned.partition)
        return {tier: sorted(numbers) for tier, numbers in partitions.items()}

    def _granted_at_dispatch(self, event: AttemptDispatched) -> ClaimDecision | None:
        """Return the lease granted to this worker with the dispatch, while enough of it is left.

        None sends the attempt through a claim: its lease belongs to another worker, is about
        to run out, was never granted, or lasts longer than any lease the coordinator grants.
        """
        if event.granted_to != self.worker_id or event.lease_expires_at is None:
            return None
        left_s = (event.lease_expires_at - utc_now()).total_seconds()
        if left_s < LEASE_MARGIN_S:
            logger.info("Claiming attempt %s (epoch %d) of job %s: the lease granted with its "
                        "dispatch has %.1f s left", event.attempt_id, event.epoch, event.job_id,
                        left_s)
            return None
        max_left_s = self.settings.coordinator.lease_s + LEASE_MARGIN_S
        if left_s > max_left_s:
            # Leases last at most SLOTFORGE_COORDINATOR__LEASE_S, so this record did not come
            # from a coordinator with the same settings. A claim lets the coordinator decide.
            logger.warning("Claiming attempt %s (epoch %d) of job %s: the lease granted with "
                           "its dispatch has %.1f s left, over the maximum of %.1f s",
                           event.attempt_id, event.epoch, event.job_id, left_s, max_left_s)
            return None
        return ClaimDecision(attempt_id=event.attempt_id, job_id=event.job_id,
                             job_key=event.job_key, epoch=event.epoch,
                             worker_id=self.worker_id, granted=True,
                             lease_expires_at=event.lease_expires_at)

    async def _claim(self, attempt: _Attempt, stop_at: float) -> ClaimDecision | None:
        """Claim the attempt and wait for the decision, asking again if none arrives in time.

        Returns None when the attempt's deadline passes or it is cancelled while waiting.
        """
        event = attempt.event
        key = (event.attempt_id, event.epoch)
        claim = AttemptClaim(attempt_id=event.attempt_id, job_id=event.job_id,
                             job_key=event.job_key, epoch=event.epoch, worker_id=self.worker_id)
        try:
            while time.time() < stop_at and not attempt.cancel.is_set():
                if self._stopping:
                    attempt.released = True
                    return None
                waiter = self._claims.setdefault(
                    key, asyncio.get_running_loop().create_future())
                await self.producer.send_and_wait(
                    self.topics.coordinator_events, encode_event(claim),
                    key=event.job_key.encode("utf-8"))
                try:
                    return await asyncio.wait_for(asyncio.shield(waiter),
                                                  self.settings.worker.claim_timeout_s)
                except TimeoutError:
                    logger.warning("No claim decision for attempt %s (epoch %d) after %.1f s; "
                                   "claiming again", event.attempt_id, event.epoch,
                                   self.settings.worker.claim_timeout_s)
            return None
        finally:
            self._claims.pop(key, None)

    async def _commit_and_flush(self) -> None:
        await commit_and_flush(self.fetcher, self.tracing, self.producer)

    async def _consume(self, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as attempts:
            while not stop.is_set():
                free = self.slots + self.claim_ahead - self._busy_slots()
                topics = await self.tier_planner.topics_for_fetch() if free > 0 else None
                records = await self.fetcher.fetch(free, stop, topics=topics)
                self.tier_planner.taken(records)
                for record in records:
                    await self._take(record, attempts)
                await self.fetcher.commit()
            await self._drain()

    def _busy_slots(self) -> int:
        return len(self._running)

    async def _drain(self) -> None:
        """Give running attempts the grace period, then cancel the rest through their flags."""
        self._release_unclaimed()
        tasks = set(self._tasks)
        if not tasks:
            return
        logger.info(
            "Stopping: waiting up to %.1f s for %d running attempts", self.stop_grace_s, len(tasks)
        )
        _, pending = await asyncio.wait(tasks, timeout=self.stop_grace_s)
        if not pending:
            return
        logger.warning(
            "Cancelling %d attempts still running after %.1f s: %s",
            len(self._running),
            self.stop_grace_s,
            ", ".join(sorted(self._running)),
        )
        for attempt in self._running.values():
            attempt.request_cancel(
                "worker is shutting down", error_type="cancelled", retriable=True
            )
        await asyncio.wait(pending)

    def _release_unclaimed(self) -> None:
        """Give up the attempts still waiting for a claim decision, which have no lease.

        Without this a stop waited the whole grace period for claim decisions that a
        stopped coordinator never sends.
        """
        self._stopping = True
        for (attempt_id, epoch), waiter in list(self._claims.items()):
            attempt = self._running.get(attempt_id)
            if attempt is None or attempt.event.epoch != epoch or waiter.done():
                continue
            attempt.released = True
            waiter.set_result(ClaimDecision(
                attempt_id=attempt_id, job_id=attempt.event.job_id,
                job_key=attempt.event.job_key, epoch=epoch, worker_id=self.worker_id,
                granted=False, reason="worker is stopping"))

    async def _take(
        self, record: ConsumerRecord[bytes, bytes], attempts: asyncio.TaskGroup
    ) -> None:
        self.fetcher.start(record)
        try:
            event: AttemptDispatched = decode_event(record.value, AttemptDispatched)
        except EventDecodeError as err:
            await send_to_deadletter(
                self.producer, self.topics.deadletter, record, self.group_id, err
            )
            self.fetcher.finish(record)
            return

        context = extract_context(record.headers)
        record_wait(
            self.tracing.tracer,
            "queue_wait",
            event.dispatched_at,
            parent=context,
            attributes={
                "slotforge.tier": event.tier.value,
                "slotforge.job.id": event.job_id,
                "slotforge.attempt.id": event.attempt_id,
                "slotforge.worker.id": self.worker_id,
                # The attempts sharing this worker's slots once this one starts, this one
                # included. A claimed-ahead attempt waits for a slot, so the slots cap it.
                "slotforge.pool.concurrency": min(self.slots, len(self._running) + 1),
            },
        )

        if (event.attempt_id, event.epoch) in self._cancelled_queued:
            logger.info("Dropping attempt %s (epoch %d) of job %s: cancelled while queued",
                        event.attempt_id, event.epoch, event.job_id)
            self.fetcher.finish(record)
            return

        running = self._running.get(event.attempt_id)
        if running is not None and event.epoch > running.event.epoch:
            # A re-dispatch under a higher epoch fences the run here, so it stops and the
            # new epoch runs after it, instead of joining it and never running.
            logger.info("Attempt %s of job %s is re-dispatched under epoch %d; stopping its "
                        "epoch %d run first", event.attempt_id, event.job_id, event.epoch,
                        running.event.epoch)
            running.request_cancel(f"superseded by epoch {event.epoch}",
                                   error_type="cancelled", retriable=False)
            task = attempts.create_task(
                self._start_after(running, record, event, context, attempts))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        if running is not None:
            # A rebalance handed back a partition whose record is still running here.
            logger.info(
                "Attempt %s of job %s is already running; record %s[%d]@%d joins it",
                event.attempt_id,
                event.job_id,
                record.topic,
                record.partition,
                record.offset,
            )
            running.records.append(record)
            return

        self._start_attempt(record, event, context, attempts)

    def _start_attempt(self, record: ConsumerRecord[bytes, bytes], event: AttemptDispatched,
                       context: otel_context.Context, attempts: asyncio.TaskGroup) -> None:
        attempt = _Attempt(event=event, records=[record], context=context)
        self._running[event.attempt_id] = attempt
        task = attempts.create_task(self._run_attempt(attempt))
        attempt.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start_after(self, previous: _Attempt, record: ConsumerRecord[bytes, bytes],
                           event: AttemptDispatched, context: otel_context.Context,
                           attempts: asyncio.TaskGroup) -> None:
        """Start ``event`` once the run of an older epoch of the same attempt has ended."""
        if previous.task is not None:
            await asyncio.wait([previous.task])
        newer = self._running.get(event.attempt_id)
        if newer is not None and newer.event.epoch >= event.epoch:
            newer.records.append(record)
            return
        self._start_attempt(record, event, context, attempts)

    async def _run_attempt(self, attempt: _Attempt) -> None:
        event = attempt.event
        try:
            with stage_span(
                self.tracing.tracer,
                "generation",
                "generation",
                parent=attempt.context,
                kind=SpanKind.CONSUMER,
                attributes={
                    "gen_ai.request.model": event.params.model,
                    "gen_ai.request.seed": event.seed,
                    "slotforge.job.id": event.job_id,
                    "slotforge.attempt.id": event.attempt_id,
                    "slotforge.attempt_no": event.attempt_no,
                    "slotforge.steps": event.params.steps,
                    "slotforge.worker.id": self.worker_id,
                    "slotforge.tier": event.tier.value,
                },
            ) as span:
                attempt.generation_context = trace.set_span_in_context(span)
                headers = inject_headers(span)
                await self._claim_and_run(attempt, span, headers)
        except KafkaError:
            # The records stay uncommitted, so the next owner of the partition runs them again.
            logger.exception(
                "Failed to publish events of attempt %s of job %s",
                event.attempt_id,
                event.job_id,
            )
            raise
        finally:
            self._running.pop(event.attempt_id, None)
            self.fetcher.wake()
        for record in attempt.records:
            self.fetcher.finish(record)

    async def _claim_and_run(self, attempt: _Attempt, span: Span, headers: Headers) -> None:
        event = attempt.event
        if event.deadline_at > utc_now():
            with stage_span(self.tracing.tracer, "claim", "claim",
                            parent=attempt.generation_context, attributes={
                "slotforge.job.id": event.job_id,
                "slotforge.attempt.id": event.attempt_id,
                "slotforge.worker.id": self.worker_id,
                "slotforge.attempt.epoch": event.epoch,
            }) as claim_span:
                decision = self._granted_at_dispatch(event)
                claim_span.set_attribute("slotforge.claim.at_dispatch", decision is not None)
                if decision is None:
                    decision = await self._claim(attempt, event.deadline_at.timestamp())
                claim_span.set_attribute("slotforge.claim.granted",
                                         decision is not None and decision.granted)
            if attempt.released:
                await self._hand_back(attempt, span, headers)
                return
            if decision is None or not decision.granted:
                reason = decision.reason if decision is not None else "no claim decision"
                logger.info("Not running attempt %s (epoch %d) of job %s: %s",
                            event.attempt_id, event.epoch, event.job_id, reason)
                span.set_attribute("slotforge.status", "not_claimed")
                span.set_attribute("slotforge.claim.reason", reason)
                return
        # Past its deadline the attempt never runs, so reporting that needs no lease.
        await self._run_claimed(attempt, span, headers)

    async def _hand_back(self, attempt: _Attempt, span: Span, headers: Headers) -> None:
        """Report a released attempt cancelled, so the flight replaces it without waiting.

        The coordinator may still grant the claim this worker sent, and that lease would hold
        the attempt until it expires. The cancel after it ends the attempt instead.
        """
        event = attempt.event
        logger.info("Handing back attempt %s (epoch %d) of job %s unclaimed: the worker is "
                    "stopping", event.attempt_id, event.epoch, event.job_id)
        span.set_attribute("slotforge.status", "released")
        await self._publish_finished(attempt, _Outcome(
            status=AttemptStatus.CANCELLED, error_type="cancelled",
            error="the worker stopped before the claim was decided", retriable=True), headers)

    async def _run_claimed(self, attempt: _Attempt, span: Span, headers: Headers) -> None:
        # Claimed-ahead attempts wait here for a GPU slot. attempt.started goes out only
        # once they hold one, so the coordinator judges their progress from then on. The
        # slot is released once attempt.finished is queued in the producer, so the next
        # attempt's events follow it on the partition.
        await self._gpu_slots.acquire()
        self._generating += 1
        released = False

        def release_slot() -> None:
            nonlocal released
            if not released:
                released = True
                self._generating -= 1
                self._gpu_slots.release()

        try:
            outcome = await self._generate(attempt, headers)
            span.set_attribute("slotforge.gpu_s", outcome.gpu_s)
            span.set_attribute("slotforge.batch_size", attempt.batch_size)
            span.set_attribute("slotforge.status", outcome.status.value)
            if outcome.status is not AttemptStatus.SUCCEEDED:
                # error.type is the OpenTelemetry attribute the failure queries group by.
                span.set_attribute("error.type", outcome.error_type or outcome.status.value)
                span.set_status(StatusCode.ERROR, outcome.error or outcome.status.value)
            await self._publish_finished(attempt, outcome, headers, on_queued=release_slot)
        finally:
            release_slot()

    async def _generate(self, attempt: _Attempt, headers: Headers) -> _Outcome:
        event = attempt.event
        if event.deadline_at <= utc_now():
            logger.info(
                "Skipping attempt %s of job %s: its deadline %s has passed",
                event.attempt_id,
                event.job_id,
                event.deadline_at.isoformat(),
            )
            return _Outcome(
                status=AttemptStatus.CANCELLED,
                error_type="deadline_exceeded",
                error=f"deadline {event.deadline_at.isoformat()} passed before the attempt started",
            )

        started = AttemptStarted(
            attempt_id=event.attempt_id,
            job_id=event.job_id,
            job_key=event.job_key,
            epoch=event.epoch,
            worker_id=self.worker_id,
            progress_every_steps=self.settings.worker.progress_every_steps,
        )
        await self._send_coordinator(started, event.job_key, headers, wait=True)

        loop = asyncio.get_running_loop()
        progress: asyncio.Queue[tuple[int, int, datetime] | None] = asyncio.Queue()
        pump = asyncio.create_task(self._publish_progress(event, progress, headers))
        on_step = self._step_callback(attempt, loop, progress)
        request = GenerationRequest.from_params(event.params, event.seed)
        # A cancelled or failed run still held the device, so its gpu_s is the wall time.
        started_s = time.perf_counter()
        try:
            generated = await self.batcher.submit(
                batch_key(event.params), _BatchEntry(attempt, request, on_step)
            )
            return await loop.run_in_executor(
                self.executor, self._store_outcome, attempt, generated, started_s
            )
        except asyncio.CancelledError:
            # A slot thread cannot be interrupted, so the cancel flag stops it at its next step.
            attempt.request_cancel("worker task cancelled", error_type="cancelled", retriable=True)
            raise
        finally:
            progress.put_nowait(None)
            await pump

    def _step_callback(
        self,
        attempt: _Attempt,
        loop: asyncio.AbstractEventLoop,
        progress: asyncio.Queue[tuple[int, int, datetime] | None],
    ) -> Callable[[int, int], None]:
        every = self.settings.worker.progress_every_steps
        min_interval_s = self.settings.worker.progress_min_interval_s
        deadline = attempt.event.deadline_at.timestamp()
        straggler_s = attempt.event.straggler_remaining_s
        last_sent_s = -math.inf
        # The first report's step and time: the coordinator measures the step rate from it.
        first: tuple[int, float] | None = None

        def on_step(step: int, total: int) -> None:
            nonlocal last_sent_s, first, straggler_s
            # Runs on the slot's thread; the queue belongs to the event loop.
            now_s = time.monotonic()
            due = step % every == 0 and now_s - last_sent_s >= min_interval_s
            run = None if first is None else AttemptRun(now_s - first[1], step - first[0],
                                                          total - first[0])
            if run is not None and straggler_s is not None and is_straggling(run, straggler_s):
                # Reported at once so the coordinator dispatches a replacement, and stopped
                # at the next step instead of when the coordinator's cancel arrives.
                due = True
                attempt.request_cancel(
                    f"{straggler_reason(run)}, threshold {straggler_s:.2f} s",
                    error_type=STRAGGLER_ERROR_TYPE, retriable=True)
                straggler_s = None
            if due or step == total:
                last_sent_s = now_s
                first = first or (step, now_s)
                loop.call_soon_threadsafe(progress.put_nowait, (step, total, utc_now()))
            if step < total and time.time() >= deadline:
                attempt.request_cancel(
                    "deadline passed during generation",
                    error_type="deadline_exceeded",
                    retriable=False,
                )

        return on_step

    def _batch_limit(self, entry: _BatchEntry, requested: int) -> int:
        max_batch_size = getattr(self.runner, "max_batch_size", None)
        if max_batch_size is None:
            return requested
        limit: int = max_batch_size(entry.request, requested)
        return limit

    async def _run_batch(
        self, entries: list[_BatchEntry], done: Callable[[int, _GenerationOutcome], None]
    ) -> list[_GenerationOutcome]:
        for entry in entries:
            entry.attempt.batch_size = len(entries)
        if len(entries) > 1:
            logger.info("Running a batch of %d attempts: %s", len(entries),
                        ", ".join(entry.attempt.event.attempt_id for entry in entries))
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._generate_in_slot, entries, done)

    def _generate_in_slot(
        self, entries: list[_BatchEntry], done: Callable[[int, _GenerationOutcome], None]
    ) -> list[_GenerationOutcome]:
        """Run a batch on a slot thread; errors come back as outcomes, one per attempt.

        A cancelled attempt is reported through ``done`` when it leaves the batch, so its
        slot frees before the batch ends.
        """
        generate_batch = getattr(self.runner, "generate_batch", None)
        if callable(generate_batch):
            from gpu_inference.pipeline import BatchItem

            items = [
                BatchItem(entry.request, entry.on_step, entry.attempt.cancel,
                          functools.partial(done, index))
                for index, entry in enumerate(entries)
            ]
            outcomes: list[_GenerationOutcome] = generate_batch(
                items, parent=entries[0].attempt.context)
            return outcomes
        results: list[_GenerationOutcome] = []
        for entry in entries:
            try:
                results.append(self.runner.generate(entry.request, on_step=entry.on_step,
                                                    cancel=entry.attempt.cancel))
            except Exception as err:  # noqa: BLE001 - returned as this attempt's outcome
                results.append(err)
        return results

    def _store_outcome(
        self, attempt: _Attempt, generated: _GenerationOutcome, started: float
    ) -> _Outcome:
        """Store the image on a slot thread, turning generation failures into outcomes."""
        event = attempt.event
        try:
            if isinstance(generated, BaseException):
                raise generated
            result = generated
        except GenerationCancelled as err:
            reason = attempt.cancel_reason or str(err)
            logger.info(
                "Cancelled attempt %s of job %s: %s", event.attempt_id, event.job_id, reason
            )
            return _Outcome(
                status=AttemptStatus.CANCELLED,
                gpu_s=time.perf_counter() - started,
                error_type=attempt.cancel_error_type,
                error=f"{reason}: {err}"[:_MAX_ERROR_CHARS],
                retriable=attempt.cancel_retriable,
            )
        except Exception as err:  # noqa: BLE001 - any generation failure ends the attempt
            logger.error(
                "Generation failed for attempt %s of job %s: %s: %s",
                event.attempt_id, event.job_id, type(err).__name__, err,
            )
            return _Outcome(
                status=AttemptStatus.FAILED,
                gpu_s=time.perf_counter() - started,
                error_type=type(err).__name__,
                error=str(err)[:_MAX_ERROR_CHARS],
                retriable=self.runner.is_retriable(err),
            )

        try:
            with stage_span(self.tracing.tracer, "upload", "upload",
                            parent=attempt.generation_context, attributes={
                "slotforge.job.id": event.job_id,
                "slotforge.attempt.id": event.attempt_id,
                "slotforge.worker.id": self.worker_id,
            }):
                uri = self.store.write_png(event.job_id, event.attempt_id, result.image,
                                           epoch=event.epoch)
        except Exception as err:  # noqa: BLE001 - a storage failure ends the attempt
            logger.exception(
                "Failed to store the image of attempt %s of job %s", event.attempt_id, event.job_id
            )
            return _Outcome(
                status=AttemptStatus.FAILED,
                gpu_s=result.gpu_s,
                error_type=type(err).__name__,
                error=str(err)[:_MAX_ERROR_CHARS],
                retriable=True,
            )
        return _Outcome(status=AttemptStatus.SUCCEEDED, gpu_s=result.gpu_s, artifact_uri=uri)

    async def _publish_progress(
        self,
        event: AttemptDispatched,
        progress: asyncio.Queue[tuple[int, int, datetime] | None],
        headers: Headers,
    ) -> None:
        """Publish queued progress steps in order until the ``None`` sentinel arrives."""
        while (item := await progress.get()) is not None:
            # Stamped at the step, so a busy event loop does not skew the measured rate.
            step, total, at = item
            heartbeat = AttemptProgress(
                attempt_id=event.attempt_id,
                job_id=event.job_id,
                job_key=event.job_key,
                epoch=event.epoch,
                worker_id=self.worker_id,
                step=step,
                total_steps=total,
                emitted_at=at,
            )
            await self._send_coordinator(heartbeat, event.job_key, headers, wait=False)

    async def _publish_finished(
        self, attempt: _Attempt, outcome: _Outcome, headers: Headers,
        on_queued: Callable[[], None] | None = None,
    ) -> None:
        """Publish the attempt's outcome, calling ``on_queued`` once the records are queued
        in the producer and before their acknowledgements arrive."""
        event = attempt.event
        finished = AttemptFinished(
            attempt_id=event.attempt_id,
            job_id=event.job_id,
            job_key=event.job_key,
            epoch=event.epoch,
            worker_id=self.worker_id,
            status=outcome.status,
            slot=event.slot,
            artifact_uri=outcome.artifact_uri,
            gpu_s=outcome.gpu_s,
            error_type=outcome.error_type,
            error=outcome.error,
            retriable=outcome.retriable,
        )
        value = encode_event(finished)
        deliveries = [await self.producer.send(self.topics.coordinator_events, value,
                                               key=event.job_key.encode("utf-8"),
                                               headers=headers)]
        if outcome.status is AttemptStatus.SUCCEEDED:
            deliveries.append(await self.producer.send(
                self.topics.generated, value, key=event.attempt_id.encode("utf-8"),
                headers=headers))
        if on_queued is not None:
            on_queued()
        await asyncio.gather(*deliveries)
        logger.info(
            "Finished attempt %s of job %s: %s in %.2f s%s",
            event.attempt_id,
            event.job_id,
            outcome.status.value,
            outcome.gpu_s,
            f" ({outcome.error_type}: {outcome.error})" if outcome.error_type else "",
        )

    async def _send_coordinator(
        self,
        event: AttemptStarted | AttemptProgress | AttemptFinished,
        job_key: str,
        headers: Headers,
        *,
        wait: bool,
    ) -> None:
        value = encode_event(event)
        key = job_key.encode("utf-8")
        topic = self.topics.coordinator_events
        if wait:
            await self.producer.send_and_wait(topic, value, key=key, headers=headers)
        else:
            # Heartbeats need no acknowledgement; later events on the key still keep their order.
            delivery = await self.producer.send(topic, value, key=key, headers=headers)
            delivery.add_done_callback(_log_failed_delivery)


def _log_failed_delivery(delivery: asyncio.Future[object]) -> None:
    if not delivery.cancelled() and delivery.exception() is not None:
        logger.warning("Failed to deliver a progress event: %s", delivery.exception())


async def run(settings: Settings, stop: asyncio.Event) -> None:
    """Run the GPU worker until ``stop`` is set; see the module docstring."""
    await GpuWorker(settings).run(stop)


def main() -> int:
    return serve("gpu-worker", run, load_settings())


if __name__ == "__main__":
    raise SystemExit(main())
