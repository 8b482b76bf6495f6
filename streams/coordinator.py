"""The job coordinator: a faust-streaming app whose state lives in a changelogged table.

It reads ``jobs.requested`` and the co-partitioned ``coordinator.events`` topic, both keyed
by the job's cache key, so every event of a flight of identical jobs lands on one
partition and one entry of the ``flights`` table. It races attempts to fill each job's
slots and grants leases with fencing epochs, on a worker's claim or, for an attempt routed
to a worker with a free slot, with the dispatch itself. Surplus attempts are cancelled
through the control topic. At the attempt limit or deadline, open slots fall back to the
best rejected results. Regenerations are served from the cache, and every job ends with
a ``jobs.completed`` event. A restarted coordinator rebuilds its table from the
changelog topic and carries on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import faust
from aiokafka import AIOKafkaProducer, ConsumerRecord
from aiokafka.errors import KafkaConnectionError, KafkaError
from aiokafka.partitioner import DefaultPartitioner
from faust.types import EventT
from opentelemetry.trace import Span, SpanKind

from gpu_inference.affinity import WorkerView, route_partition, route_shortest_queue
from gpu_inference.artifacts import ArtifactError, ArtifactStore
from schemas.errors import ConfigurationError, EventDecodeError
from schemas.events import (
    AttemptCancel,
    AttemptClaim,
    AttemptDispatched,
    AttemptFinished,
    AttemptProgress,
    AttemptStarted,
    AttemptStatus,
    ClaimDecision,
    DeliveryAck,
    JobCompleted,
    JobRejected,
    JobRequested,
    JobSweep,
    ResultScored,
    SweepAction,
    Tier,
    WorkerStatus,
    decode_event,
    encode_event,
)
from schemas.topics import RETRY_LEVELS
from streams.admission import (
    AdmissionAction,
    AdmissionPolicy,
    PoolLoad,
    TenantQuotas,
    WorkerTierOrder,
)
from streams.admission import decide as decide_admission
from streams.config import Settings, load_settings
from streams.faust_app import FetchTunedApp
from streams.flight import AttemptRecord, Decision, FlightLimits, FlightState, PoolView
from streams.flight import parameter_class as class_of
from streams.kafka import (
    build_dead_letter,
    create_topics,
    group_lag,
    group_partition_lags,
    make_consumer,
    make_producer,
    topic_partitions,
    wait_for_leaders,
)
from streams.liveness import LivenessTracker
from streams.metrics import (
    ADMISSION_DECISIONS,
    CACHE_LOOKUPS,
    CONSUMER_LAG,
    DEAD_LETTERS,
)
from streams.pool import PoolMonitor, RunningAttempts
from streams.racing import (
    AcceptanceEstimator,
    RacingPolicy,
    ServiceTimes,
    straggler_threshold_s,
)
from streams.retry import BackoffPolicy, retry_headers, retry_level
from streams.service import (
    configure_logging,
    serve_metrics,
    start_exit_watchdog,
    start_failure,
)
from streams.step_times import StepClass
from streams.tracing import (
    Tracing,
    datetime_ns,
    extract_context,
    inject_headers,
    stage_span,
    traceparent_context,
)

logger = logging.getLogger(__name__)

SERVICE_NAME = "coordinator"
# Seconds before the same cancellation is published again.
CANCEL_REPEAT_S = 5.0
# Seconds between reads of the attempt topics' partition counts, prompted by a status report
# that names a partition beyond them.
PARTITION_COUNTS_REFRESH_S = 10.0
# Parsed flights kept beside the table. Older ones are parsed again at their next event.
PARSED_FLIGHTS_MAX = 20_000
# Completion sends remembered until their flight's next event. An evicted one is sent again.
MAX_OUTCOME_SENDS = 100_000
# JobRejected.reason's maximum length; longer validation summaries are cut to fit.
MAX_REJECTION_REASON_CHARS = 2_000
Headers = list[tuple[str, bytes]]


class _Routed(NamedTuple):
    """A dispatch ready to send: the attempt, with any lease granted, and its partition."""

    attempt: AttemptDispatched
    partition: int | None


# Seconds a stop waits for a span producer that is still connecting, so its spans go out.
SPAN_PRODUCER_START_S = 10.0


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _headers_of(event: EventT) -> Headers:
    headers = event.message.headers or []
    # faust types headers as a list of (name, value) pairs or as a mapping of name to value.
    pairs = list(headers.items()) if isinstance(headers, Mapping) else headers
    return [(key, value) for key, value in pairs if isinstance(value, bytes)]


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
    """Wires the faust app, its table, its agents, its sweep timer and the pool monitor."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        config = settings.coordinator
        topics = settings.topics
        partitions = settings.kafka.partitions
        # The table lives in memory and its changelog, so faust's data folder contains nothing
        # a restart needs; a temporary one keeps the working directory clean.
        self._data_dir = tempfile.TemporaryDirectory(prefix="slotforge-coordinator-")
        self.app = FetchTunedApp(
            f"{settings.kafka.topic_prefix}{config.app_id}",
            fetch_max_wait_ms=config.fetch_max_wait_ms,
            broker=[f"kafka://{server}" for server in settings.kafka.bootstrap_servers.split(",")],
            store="memory://",
            datadir=self._data_dir.name,
            web_enabled=False,
            topic_partitions=partitions,
            topic_replication_factor=settings.kafka.replication_factor,
            producer_acks=-1,
            # Without linger each send goes out in its own request, and a profile of a burst
            # showed a fifth of the coordinator's samples in socket writes.
            producer_linger=0.002,
            stream_recovery_delay=0.5,
            broker_commit_every=config.commit_every_records,
            broker_commit_interval=1.0,
            consumer_auto_offset_reset="earliest",
            # A killed coordinator's partitions move to a survivor after this long.
            broker_session_timeout=10.0,
            broker_heartbeat_interval=2.0,
            **_faust_credentials(settings),
        )
        self.limits = FlightLimits(
            max_attempts_per_slot=config.max_attempts_per_slot,
            lease_s=config.lease_s,
            dispatch_lease_s=config.dispatch_lease_s,
            cache_ttl_s=config.cache_ttl_s,
            cache_max_entries=config.cache_max_entries,
            policy=RacingPolicy(config.racing_policy),
            max_retries_per_attempt=settings.retry.max_retries_per_attempt,
            max_retries_per_job=settings.retry.max_retries_per_job,
        )
        self.backoff = BackoffPolicy(settings.retry.base_s, settings.retry.max_s,
                                     settings.retry.jitter)
        self.acceptance = AcceptanceEstimator(prior_rate=config.acceptance_prior)
        self.pool = PoolMonitor(config.worker_status_ttl_s)
        self.running = RunningAttempts()
        self.service_times = ServiceTimes()
        self.liveness = LivenessTracker()
        worker = settings.worker
        # The wait estimate models the order in which the workers take tiers.
        self.admission = AdmissionPolicy(
            tier_order=WorkerTierOrder(worker.tier_policy),
            shares={Tier(name): weight for name, weight in worker.tier_weights.items()})
        self.quotas = (TenantQuotas(config.tenant_quota_slots_per_s,
                                    config.tenant_quota_burst_slots)
                       if config.tenant_quota_slots_per_s > 0 else None)
        self._postprocess_lag = 0
        # NOTE: only file:// artifacts are deleted here; an object store would need its own
        # cleanup consumer.
        self.artifacts = ArtifactStore(settings.artifact_dir)
        self.tracing = Tracing(SERVICE_NAME, settings.tracing, topics.spans)
        self.tracer = self.tracing.tracer

        self.requests_topic = self._raw_topic(topics.jobs_requested, partitions)
        self.events_topic = self._raw_topic(topics.coordinator_events, partitions)
        self.completed_topic = self._raw_topic(topics.jobs_completed)
        self.delivered_topic = self._raw_topic(topics.jobs_delivered)
        self.rejected_topic = self._raw_topic(topics.jobs_rejected)
        self.control_topic = self._raw_topic(topics.control)
        self.deadletter_topic = self._raw_topic(topics.deadletter)
        self.attempt_topics = {tier: self._raw_topic(topics.attempts(tier)) for tier in Tier}
        self.followup_topics = {tier: self._raw_topic(topics.followups(tier)) for tier in Tier}
        self.retry_topics = {level: self._raw_topic(topics.retry(level))
                             for level in range(1, RETRY_LEVELS + 1)}
        self.flights = self.app.Table(
            "flights",
            partitions=partitions,
            schema=faust.Schema(key_type=str, key_serializer="raw", value_serializer="json"),
        )

        # Lease renewals from progress heartbeats stay in memory: writing the table per
        # denoising step would flood the changelog. After a restart every lease gets a
        # fresh full term from the start time instead.
        self._renewals: dict[str, tuple[int, str, datetime]] = {}
        # Each flight as last stored, beside the table value it was stored as: a flight gets
        # several events per attempt, and each would otherwise parse the whole flight again.
        self._parsed: dict[str, tuple[dict[str, Any], FlightState]] = {}
        self._started_at = _utc_now()
        self._sweeps_sent: set[tuple[str, str, str]] = set()
        self._cancels_sent: dict[tuple[str, int, str | None], float] = {}
        # Delivery of each completion event this process sent, until a later event of its
        # flight records the acknowledgement in the table.
        self._outcome_sends: dict[str, asyncio.Future[Any]] = {}
        # Monotonic time of each flight's latest replan from a heartbeat.
        self._replanned_at: dict[str, float] = {}
        # Partition count of each attempt topic, which status reports are checked against.
        self._partition_counts: dict[str, int] = {}
        self._partition_counts_at = float("-inf")

        self.app.agent(self.requests_topic, name="requests")(self._requests_agent)
        self.app.agent(self.events_topic, name="events")(self._events_agent)
        self.app.timer(config.sweep_interval_s)(self._sweep_timer)
        self.app.task(self._span_publisher)
        self.app.task(self._worker_status_routine)
        self.app.task(self._downstream_lag_routine)
        if settings.metrics.port:
            self.app.task(self._own_lag_routine)

    def close(self) -> None:
        """Remove faust's temporary data folder; call it once the faust worker has stopped."""
        self._data_dir.cleanup()

    async def create_changelog(self) -> None:
        """Create the table's changelog topic before the faust worker starts.

        When faust creates it itself, the first group join can run before the new topic is
        in the client's metadata. Faust then assigns no changelog partitions, so every
        table write fails with PartitionsMismatch until the next rebalance.
        """
        changelog = self.flights.changelog_topic
        name = changelog.get_topic_name()
        # The same settings faust uses: as many partitions as the table, compacted.
        await create_topics(self.settings.kafka, [name], partitions=self.settings.kafka.partitions,
                            configs={"cleanup.policy": "compact"})
        await wait_for_leaders(self.settings.kafka, [name])

    def _raw_topic(self, name: str, partitions: int | None = None) -> faust.TopicT:
        return self.app.topic(
            name, key_type=bytes, value_type=bytes, key_serializer="raw",
            value_serializer="raw", partitions=partitions,
        )

    # ---- background routines ------------------------------------------------------------

    async def _span_publisher(self) -> None:
        producer: AIOKafkaProducer = make_producer(self.settings.kafka)
        # faust starts this task as the worker becomes ready, so a stop can land while the
        # producer connects. The shielded start lets the spans ended before the stop go out.
        start = asyncio.ensure_future(producer.start())
        try:
            await asyncio.shield(start)
            await self.tracing.publish_routine(producer)
        finally:
            try:
                await asyncio.wait_for(asyncio.shield(start), SPAN_PRODUCER_START_S)
            except Exception as err:  # noqa: BLE001 - the stop goes on without the spans
                logger.warning("Dropping the coordinator's unpublished spans: the span producer "
                               "failed to start: %r", err)
            else:
                await self.tracing.flush(producer)
            finally:
                await producer.stop()

    async def _worker_status_routine(self) -> None:
        """Follow every worker's status reports, from all partitions, without a group."""
        topic = self.settings.topics.worker_status
        consumer = make_consumer(self.settings.kafka, group_id=None,
                                 auto_offset_reset="latest")
        # Started inside the try, so a stop that lands while it connects still closes it.
        try:
            await consumer.start()
            partitions = await topic_partitions(self.settings.kafka, topic)
            consumer.assign(partitions)
            await consumer.seek_to_end(*partitions)
            await self._load_partition_counts()
            while True:
                batches = await consumer.getmany(timeout_ms=500)
                for records in batches.values():
                    for record in records:
                        try:
                            status = decode_event(record.value, WorkerStatus)
                            await self._check_partitions(status)
                        except EventDecodeError as err:
                            await self._dead_letter_status(record, err)
                            continue
                        self.pool.observe(status)
        finally:
            await consumer.stop()

    async def _load_partition_counts(self) -> None:
        """Read how many partitions each tier's attempt topics have, to check status reports."""
        names = [self.settings.topics.attempts(tier) for tier in Tier]
        self._partition_counts_at = time.monotonic()
        try:
            described = await topic_partitions(self.settings.kafka, *names)
        except KafkaError as err:
            logger.warning("Failed to read the partition counts of the attempt topics; "
                           "keeping the last ones: %s", err)
            return
        counts = dict.fromkeys(names, 0)
        for partition in described:
            counts[partition.topic] = max(counts[partition.topic], partition.partition + 1)
        self._partition_counts = counts

    async def _check_partitions(self, status: WorkerStatus) -> None:
        """Raise EventDecodeError when a status names a partition its topic does not have.

        The coordinator sends attempts to the partitions a worker reports, and the producer
        fails on one that does not exist. Topics may have been created or grown since the
        counts were read, so they are read again first, at most every
        ``PARTITION_COUNTS_REFRESH_S``.
        """
        reason = self._unknown_partition(status)
        if reason is None:
            return
        if time.monotonic() - self._partition_counts_at >= PARTITION_COUNTS_REFRESH_S:
            await self._load_partition_counts()
            reason = self._unknown_partition(status)
        if reason is not None:
            raise EventDecodeError(reason, error_type="unknown_partition")

    def _unknown_partition(self, status: WorkerStatus) -> str | None:
        for tier, numbers in status.partitions.items():
            topic = self.settings.topics.attempts(tier)
            count = self._partition_counts.get(topic, 0)
            beyond = [number for number in numbers if number >= count]
            if beyond:
                return (f"worker {status.worker_id} reports partitions {beyond} of topic "
                        f"{topic}, which has {count} partitions")
        return None

    async def _dead_letter_status(self, record: ConsumerRecord[bytes, bytes],
                                  error: EventDecodeError) -> None:
        # Every coordinator process reads the status topic without a group, so each one
        # dead-letters the record under its own process id.
        reader = f"{self.app.conf.id}/status-{os.getpid()}"
        letter = build_dead_letter(
            topic=record.topic, partition=record.partition, offset=record.offset,
            group_id=reader, key=record.key, value=record.value,
            error_type=error.error_type, reason=error.reason,
        )
        await self.deadletter_topic.send(key=record.key, value=encode_event(letter))
        DEAD_LETTERS.labels(record.topic, reader, error.error_type).inc()
        logger.warning("Sent undecodable worker status %s[%d]@%d to the dead-letter topic: %s",
                       record.topic, record.partition, record.offset, error.reason[:300])

    async def _downstream_lag_routine(self) -> None:
        """Measure post-processing's lag, so speculation stops and admission tightens."""
        config = self.settings.coordinator
        while True:
            await asyncio.sleep(config.lag_check_interval_s)
            try:
                lag = await group_lag(self.settings.kafka, self.settings.postprocess.group_id,
                                      self.settings.topics.generated)
            except Exception:  # noqa: BLE001 - a failed measurement keeps the last value
                logger.warning("Failed to measure the post-processing lag", exc_info=True)
                continue
            if (lag > config.postprocess_lag_speculation_bound) != (
                    self._postprocess_lag > config.postprocess_lag_speculation_bound):
                logger.warning("Post-processing lag is %d records (speculation bound %d)",
                               lag, config.postprocess_lag_speculation_bound)
            self._postprocess_lag = lag

    async def _own_lag_routine(self) -> None:
        """Publish the coordinator group's committed lag per partition as a metric.

        faust owns the group's consumer, so the lag comes from committed offsets, which
        trail the position by up to one commit interval.
        """
        group_id = self.app.conf.id
        topics = [self.settings.topics.jobs_requested, self.settings.topics.coordinator_events]
        while True:
            try:
                lags = await group_partition_lags(self.settings.kafka, group_id, topics)
            except Exception:  # noqa: BLE001 - a failed measurement keeps the last values
                logger.warning("Failed to measure the lag of group %s", group_id, exc_info=True)
            else:
                for partition, lag in lags.items():
                    CONSUMER_LAG.labels(group_id, partition.topic,
                                        str(partition.partition)).set(lag)
            await asyncio.sleep(self.settings.metrics.lag_interval_s)

    def _pool_view(self, flight: FlightState) -> PoolView:
        bound = self.settings.coordinator.postprocess_lag_speculation_bound
        return PoolView(
            acceptance_rate=self.acceptance.rate(class_of(flight.params)),
            idle_slots=self.pool.idle_slots(),
            backpressure=self._postprocess_lag > bound,
            running=self.running.runs(flight.attempts),
            typical_service_s=self.service_times.median_s(class_of(flight.params)),
        )

    def _pool_load(self) -> PoolLoad:
        mean_s = self.pool.mean_attempt_s()
        capacity = self.pool.capacity()
        # A warming pool has few finished attempts, so its slots over the mean attempt time
        # bound the throughput from below.
        throughput = max(self.pool.throughput_attempts_per_s(),
                         capacity / mean_s if capacity else 0.0)
        return PoolLoad(
            backlog_attempts=self.pool.backlog(),
            throughput_attempts_per_s=throughput,
            mean_attempt_s=mean_s,
            slots=max(1, capacity),
            downstream_lagging=self._postprocess_lag
            > self.settings.coordinator.postprocess_lag_admission_bound,
        )

    def _admit_or_reject(self, request: JobRequested, flight: FlightState
                         ) -> tuple[JobRequested, JobRejected | None, str]:
        """Apply the tenant quota and admission control; returns the request to run."""
        if not self.settings.coordinator.admission_enabled:
            return request, None, "admitted"
        if self.quotas is not None:
            wait_s = self.quotas.take(request.tenant_id, request.slots, time.monotonic())
            if wait_s is not None:
                reason = f"tenant {request.tenant_id} is over its quota of " \
                         f"{self.quotas.rate_per_s:g} slots/s"
                retry = None if wait_s == float("inf") else round(wait_s, 3)
                return request, JobRejected(job_id=request.job_id, tenant_id=request.tenant_id,
                                            reason=reason, retry_after_s=retry,
                                            requested_at=request.requested_at), "quota"
        rate = self.acceptance.rate(class_of(flight.params))
        decision = decide_admission(request.tier, request.slots / max(rate, 0.1),
                                    request.deadline_s, request.allow_downgrade,
                                    self._pool_load(), self.admission)
        if decision.action is AdmissionAction.REJECT:
            return request, JobRejected(job_id=request.job_id, tenant_id=request.tenant_id,
                                        reason=decision.reason,
                                        retry_after_s=decision.retry_after_s,
                                        requested_at=request.requested_at), "overloaded"
        if decision.action is AdmissionAction.DOWNGRADE:
            logger.info("Downgrading job %s from %s to %s: %s", request.job_id,
                        request.tier.value, decision.tier.value, decision.reason)
            return request.model_copy(update={"tier": decision.tier}), None, "downgraded"
        logger.info("Admission of job %s tier=%s: estimated wait %.1f s, %s", request.job_id,
                    request.tier.value, decision.estimated_wait_s, decision.reason)
        return request, None, "admitted"

    # ---- table access -----------------------------------------------------------------------

    def _load(self, job_key: str) -> FlightState | None:
        """Return the flight of ``job_key``, parsed again only when its table value changed.

        The parsed flight leaves the cache here, so a handler that changes it and then fails
        or returns without storing it leaves no unstored change behind.
        """
        raw = self.flights.get(job_key)
        cached = self._parsed.pop(job_key, None)
        if raw is None:
            return None
        if cached is not None and cached[0] is raw:
            return cached[1]
        return FlightState.model_validate(raw)

    def _store(self, flight: FlightState) -> None:
        raw = flight.model_dump(mode="json")
        self.flights[flight.job_key] = raw
        self._parsed[flight.job_key] = (raw, flight)
        if len(self._parsed) > PARSED_FLIGHTS_MAX:
            del self._parsed[next(iter(self._parsed))]

    async def _dead_letter(self, event: EventT, error: EventDecodeError) -> None:
        message = event.message
        letter = build_dead_letter(
            topic=message.topic, partition=message.partition, offset=message.offset,
            group_id=self.app.conf.id, key=message.key, value=event.value,
            error_type=error.error_type, reason=error.reason,
        )
        await self.deadletter_topic.send(key=message.key, value=encode_event(letter))
        DEAD_LETTERS.labels(message.topic, self.app.conf.id, error.error_type).inc()
        logger.warning(
            "Sent record to dead-letter topic: topic=%s partition=%d offset=%d error_type=%s "
            "reason=%s",
            message.topic, message.partition, message.offset, error.error_type,
            error.reason[:300],
        )

    # ---- job requests -------------------------------------------------------------------------

    async def _requests_agent(self, stream: faust.StreamT) -> None:
        async for event in stream.events():
            try:
                await self._on_request(event)
            except Exception as err:
                # A bug for one job must not stop the partition; the record is kept in the DLQ.
                ids = _job_ids_from(event.value)
                logger.exception(
                    "Failed to handle the request of job %s tenant=%s at %s[%d]@%d: %s",
                    ids[0] if ids else "(unknown)", ids[1] if ids else "(unknown)",
                    event.message.topic, event.message.partition, event.message.offset, err,
                )
                await self._dead_letter(event, EventDecodeError(
                    f"coordinator failed while handling this request: {err!r}"[:2_000],
                    error_type="internal"))
                if ids is not None:
                    # The client waits for an outcome, so it learns of the failure at once.
                    rejection = JobRejected(
                        job_id=ids[0], tenant_id=ids[1],
                        reason="internal error in the coordinator; the request is kept in the "
                               "dead-letter topic, so retry with a new job id or replay it")
                    await self.rejected_topic.send(key=ids[0].encode(),
                                                   value=encode_event(rejection))

    async def _on_request(self, event: EventT) -> None:
        try:
            request = decode_event(event.value, JobRequested)
        except EventDecodeError as err:
            await self._reject_invalid(event, err)
            return
        if await self._reroute(event, request):
            return

        now = _utc_now()
        parent = extract_context(_headers_of(event))
        with stage_span(
            self.tracer, "admission", "admission", parent=parent, kind=SpanKind.CONSUMER,
            attributes=self._request_attributes(request, event),
        ) as span:
            flight = self._load(request.job_key) or FlightState.for_request(request)
            duplicate = request.job_id in flight.jobs
            ended = flight.completion_of(request.job_id)
            if ended is not None:
                span.set_attribute("slotforge.admission.decision", "ended")
                await self._send_outcome(ended, span)
                logger.info("Job %s already ended %s; republished its outcome",
                            ended.job_id, ended.status.value)
                return
            if not duplicate:
                request, rejection, verdict = self._admit_or_reject(request, flight)
                span.set_attribute("slotforge.admission.decision", verdict)
                _count_admission(request, verdict, rejected=rejection is not None)
                if rejection is not None:
                    await self.rejected_topic.send(key=request.job_id.encode(),
                                                   value=encode_event(rejection),
                                                   headers=inject_headers(span))
                    logger.warning("Rejected job %s tenant=%s tier=%s: %s (retry after %s s)",
                                   request.job_id, request.tenant_id, request.tier.value,
                                   rejection.reason, rejection.retry_after_s)
                    return
            traceparent = dict(inject_headers(span)).get("traceparent", b"").decode() or None
            decision = flight.admit(request, now, self.limits, self._pool_view(flight),
                                    traceparent=traceparent)
            if duplicate:
                span.set_attribute("slotforge.admission.decision", "duplicate")
            cached = sum(1 for job in decision.completed for slot in job.slots if slot.cached)
            job = flight.jobs[request.job_id]
            cached += sum(1 for slot in job.slots if slot.cached) if job.running else 0
            span.set_attribute("slotforge.cache.slots", cached)
            if not duplicate:
                CACHE_LOOKUPS.labels("hit" if cached else "miss").inc()
            self._check_outcomes(flight, decision)
            routed = self._route(flight, decision)
            self._store(flight)
        if duplicate:
            logger.info("Job %s was already admitted; republishing its pending attempts",
                        request.job_id)
        else:
            logger.info(
                "Admitted job %s tenant=%s user=%s model=%s slots=%d tier=%s cached=%d "
                "attempts=%d",
                request.job_id, request.tenant_id, request.user_id, request.params.model,
                request.slots, request.tier.value, cached, len(decision.dispatch),
            )
        await self._publish(flight, decision, routed)

    async def _reroute(self, event: EventT, request: JobRequested) -> bool:
        """Send a request that is not on its cache key's partition to that partition.

        A flight lives on the partition of the events keyed by its cache key. A request
        keyed otherwise, or placed by another client's partitioner, would write the flight
        to a second changelog partition, and a restart could then restore the older copy.
        """
        partitions = list(range(self.settings.kafka.partitions))
        owner = DefaultPartitioner()(request.job_key.encode(), partitions, partitions)
        if event.message.partition == owner:
            return False
        await self.requests_topic.send(key=request.job_key.encode(), value=event.value,
                                       partition=owner, headers=_headers_of(event))
        logger.warning(
            "Re-routed job %s from %s[%d]@%d to partition %d: the record was not keyed by the "
            "job's cache key %s", request.job_id, event.message.topic, event.message.partition,
            event.message.offset, owner, request.job_key)
        return True

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
            "slotforge.prompt": self.tracing.prompt_attribute(request.params.prompt),
            "slotforge.user.id": self.tracing.prompt_attribute(request.user_id),
        }

    async def _reject_invalid(self, event: EventT, error: EventDecodeError) -> None:
        """Reject an invalid request that names its job, else dead-letter it."""
        rejection = rejection_for(event.value, error)
        if rejection is None:
            await self._dead_letter(event, error)
            return
        await self.rejected_topic.send(
            key=rejection.job_id.encode(), value=encode_event(rejection),
            headers=_headers_of(event),
        )
        logger.warning("Rejected job %s tenant=%s: %s", rejection.job_id, rejection.tenant_id,
                       error.reason[:300])

    # ---- attempt, claim and scoring events ---------------------------------------------------

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
                event.value, AttemptClaim, AttemptStarted, AttemptProgress, AttemptFinished,
                ResultScored, JobSweep, DeliveryAck,
            )
        except EventDecodeError as err:
            await self._dead_letter(event, err)
            return
        straggler = replan = False
        if isinstance(message, AttemptProgress):
            self.liveness.progress(message.attempt_id, message.epoch, message.step)
            self.running.progress(message.attempt_id, message.step, message.total_steps,
                                  message.emitted_at.timestamp(), message.epoch)
            straggler = self._is_straggler(message)
            replan = straggler or self._replan_due(message.job_key)
            if self._renew(message) and not replan:
                return

        flight = self._load(message.job_key)
        if flight is None:
            logger.warning("Ignoring %s of attempt %s of job %s at %s[%d]@%d: no flight for key %s",
                           message.event_type, getattr(message, "attempt_id", "-"),
                           message.job_id, event.message.topic, event.message.partition,
                           event.message.offset, message.job_key)
            return

        now = _utc_now()
        pool = self._pool_view(flight)
        if isinstance(message, AttemptProgress):
            decision = flight.on_progress(message)
            self._adopt(flight, message)
            routed: list[_Routed] = []
            if replan:
                planned = flight.replan(now, self.limits, pool)
                decision.extend(planned)
                checked = self._check_outcomes(flight, decision)
                routed = self._route(flight, decision)
                if straggler or checked or planned.dispatch or planned.cancel or \
                        planned.completed:
                    self._store(flight)
            if straggler:
                # Later heartbeats of a straggler need no second look at its flight.
                self.running.ended(message.attempt_id, message.epoch)
            await self._publish(flight, decision, routed)
            return
        if isinstance(message, AttemptClaim):
            decision = flight.on_claim(message, now, self.limits)
        elif isinstance(message, AttemptStarted):
            decision = flight.on_started(message)
            self._renew_at_start(flight, message, now)
            # A stale epoch's run still occupies the worker's slot, so it counts as busy.
            self.pool.slot_taken(message.worker_id, message.attempt_id,
                                 message.emitted_at.timestamp())
            self._watch(flight, message)
            self.running.started(message.attempt_id, class_of(flight.params), message.epoch)
        elif isinstance(message, AttemptFinished):
            record = flight.attempts.get(message.attempt_id)
            if message.artifact_uri and (record is None or record.epoch != message.epoch):
                # A fenced run's image can fill no slot, and no record points to it.
                logger.info("Attempt %s of job %s finished under stale epoch %d on %s",
                            message.attempt_id, message.job_id, message.epoch,
                            message.worker_id)
                self._delete_artifact(message.artifact_uri, flight.job_key)
            decision = flight.on_finished(message, now, self.limits, pool)
            self.pool.dequeued(message.attempt_id)
            self.pool.slot_freed(message.worker_id, message.attempt_id,
                                 message.emitted_at.timestamp())
            self.pool.finished(message.gpu_s)
            self.liveness.finished(message.attempt_id)
            self.running.ended(message.attempt_id, message.epoch)
            if message.status is AttemptStatus.SUCCEEDED:
                self.service_times.observe(class_of(flight.params), message.gpu_s)
            if message.status.value == "failed":
                logger.warning("Attempt %s of job %s failed on worker %s: %s: %s",
                               message.attempt_id, message.job_id, message.worker_id,
                               message.error_type, message.error)
        elif isinstance(message, DeliveryAck):
            decision = flight.on_delivery_ack(message, list(self.settings.consumers.critical))
            # The acknowledgement proves the completion event arrived.
            self._outcome_sends.pop(message.job_id, None)
            if not message.delivered:
                logger.warning("Critical consumer %s failed to deliver job %s: %s",
                               message.consumer, message.job_id, message.reason)
        elif isinstance(message, ResultScored):
            self._observe_acceptance(flight, message)
            decision = flight.on_scored(message, now, self.limits, pool)
        else:
            # Checked before the sweep because it may forget the job, and a sweep may be the
            # only event the job's flight still gets. Jobs the sweep ends are sent with it.
            pending = Decision()
            checked = self._check_outcomes(flight, pending)
            swept = self._on_sweep(flight, message, now, pool)
            if swept is None and flight.empty:
                # The sweep deleted the empty flight, so there is nothing to store, only events.
                if pending.republish:
                    await self._publish(flight, pending, [])
                return
            if swept is None and not checked:
                return
            decision = (swept or Decision()).extend(pending)
        if not isinstance(message, JobSweep):
            # Checked after the transition, so an acknowledgement seen here counts.
            self._check_outcomes(flight, decision)
        routed = self._route(flight, decision)
        self._store(flight)
        await self._publish(flight, decision, routed)

    def _check_outcomes(self, flight: FlightState, decision: Decision) -> bool:
        """Record acknowledged completion events, and publish again those never sent here.

        A job that ended in a crashed process may have its end stored in the table while
        its completion event never left, so the event that ended it, read again, sends it.
        Returns whether the flight or the decision changed.
        """
        deciding = {completed.job_id for completed in decision.completed + decision.republish}
        changed = False
        for job_id in flight.unsent_outcomes():
            if job_id in deciding:
                continue
            send = self._outcome_sends.get(job_id)
            if send is not None and not send.done():
                continue
            reason = "this process has no record of sending it"
            if send is not None:
                del self._outcome_sends[job_id]
                if not send.cancelled() and send.exception() is None:
                    flight.mark_outcome_sent(job_id)
                    changed = True
                    continue
                error = "cancelled" if send.cancelled() else send.exception()
                reason = f"its send failed: {error}"
            completed = flight.completion_of(job_id)
            if completed is not None:
                logger.warning("Publishing the outcome of job %s again: %s", job_id, reason)
                decision.republish.append(completed)
                changed = True
        return changed

    def _is_straggler(self, progress: AttemptProgress) -> bool:
        """Check one heartbeat's attempt against its class's typical service time."""
        if self.limits.policy is not RacingPolicy.ADAPTIVE:
            return False
        return self.running.is_straggler(progress.attempt_id, self.service_times)

    def _replan_due(self, job_key: str) -> bool:
        """Decide whether a heartbeat should let its flight race into the pool's idle slots.

        Slots free up as other jobs' attempts end, and between its own results a flight
        receives only heartbeats. So the adaptive policy looks again at most once per
        ``replan_interval_s``, and only while the pool has idle slots.
        """
        if self.limits.policy is not RacingPolicy.ADAPTIVE:
            return False
        now_s = time.monotonic()
        last_s = self._replanned_at.get(job_key)
        if last_s is not None and now_s - last_s < self.settings.coordinator.replan_interval_s:
            return False
        # Checked after the interval, because heartbeats are the most frequent events.
        if self.pool.idle_slots() <= 0:
            return False
        self._replanned_at[job_key] = now_s
        return True

    def _observe_acceptance(self, flight: FlightState, scored: ResultScored) -> None:
        record = flight.attempts.get(scored.attempt_id)
        if record is not None and record.epoch == scored.epoch and record.score is None:
            self.acceptance.observe(class_of(flight.params), scored.accepted)

    def _watch(self, flight: FlightState, started: AttemptStarted) -> None:
        """Start judging a running attempt by its progress; queue time is not counted."""
        record = flight.attempts.get(started.attempt_id)
        if record is None or record.epoch != started.epoch or record.phase != "running":
            return
        if record.worker_id != started.worker_id:
            return
        job = flight.jobs[record.job_id]
        live_for_job = sum(1 for other in flight.live_attempts() if other.job_id == job.job_id)
        self.liveness.started(
            attempt_id=record.attempt_id, epoch=record.epoch, worker_id=started.worker_id,
            job_key=flight.job_key, job_id=record.job_id,
            step_class=StepClass(flight.params.model, flight.params.width,
                                 flight.params.height),
            total_steps=flight.params.steps, deadline_at_s=job.deadline_at.timestamp(),
            retries_left=job.budget_left,
            other_attempts=max(0, live_for_job - job.open_slots),
            report_every_steps=started.progress_every_steps,
        )

    def _adopt(self, flight: FlightState, progress: AttemptProgress) -> None:
        """Renew the lease of a healthy attempt that this process has not seen start.

        After a coordinator restart the in-memory renewals are gone; the first heartbeat of
        each running attempt brings it back under watch.
        """
        record = flight.attempts.get(progress.attempt_id)
        if record is None or record.epoch != progress.epoch or record.phase != "running":
            return
        if record.worker_id != progress.worker_id:
            return
        until = _utc_now() + timedelta(seconds=self.limits.lease_s)
        self._renewals[progress.attempt_id] = (progress.epoch, progress.worker_id, until)

    def _renew_at_start(self, flight: FlightState, started: AttemptStarted,
                        now: datetime) -> None:
        """Extend the lease of an attempt that started, which may have waited on a short one."""
        until = now + timedelta(seconds=self.limits.lease_s)
        if flight.renew_lease(started.attempt_id, started.epoch, started.worker_id, until):
            self._renewals[started.attempt_id] = (started.epoch, started.worker_id, until)

    def _renew(self, progress: AttemptProgress) -> bool:
        """Renew a lease in memory from a heartbeat; False when the flight must decide."""
        known = self._renewals.get(progress.attempt_id)
        if known is None or known[0] != progress.epoch or known[1] != progress.worker_id:
            return False
        until = _utc_now() + timedelta(seconds=self.limits.lease_s)
        self._renewals[progress.attempt_id] = (progress.epoch, progress.worker_id, until)
        return True

    def _on_sweep(self, flight: FlightState, sweep: JobSweep, now: datetime,
                  pool: PoolView) -> Decision | None:
        self._sweeps_sent.discard((sweep.job_key, sweep.action, sweep.attempt_id or
                                   sweep.job_id))
        if sweep.action == "deadline":
            decision = flight.on_deadline(sweep.job_id, now, self.limits, pool)
            if decision.completed:
                logger.warning("Job %s reached its deadline with open slots", sweep.job_id)
            return decision
        if sweep.action == "lease" and sweep.attempt_id:
            self._apply_renewal(flight, sweep.attempt_id)
            gone_workers = self.pool.gone_workers()
            record = flight.attempts.get(sweep.attempt_id)
            # This process saw a gone holder report and stop, so the restart floor, which
            # covers renewals lost in a restart, does not apply to it.
            holder_gone = record is not None and record.worker_id in gone_workers
            if not holder_gone and now < self._started_at + timedelta(seconds=self.limits.lease_s):
                return None
            decision = flight.on_lease_expired(sweep.attempt_id, now, self.limits, pool,
                                               gone_workers)
            if decision.dispatch or decision.cancel:
                logger.warning(
                    "Lease of attempt %s of job %s expired; re-dispatching it with epoch %s",
                    sweep.attempt_id, sweep.job_id,
                    decision.dispatch[0].epoch if decision.dispatch else "none (job ended)",
                )
                self._renewals.pop(sweep.attempt_id, None)
            return decision

        if sweep.action in ("hung", "too_slow") and sweep.attempt_id and sweep.epoch:
            if not self.liveness.confirm(sweep.attempt_id, sweep.epoch):
                logger.info("Dropped the %s timeout of attempt %s (epoch %d) of job %s: it "
                            "reported progress after the check", sweep.action,
                            sweep.attempt_id, sweep.epoch, sweep.job_id)
                return None
            self.liveness.finished(sweep.attempt_id)
            decision = flight.on_attempt_timeout(
                sweep.attempt_id, sweep.epoch, now, self.limits, pool,
                hung=sweep.action == "hung", reason=sweep.reason,
            )
            if decision.cancel:
                logger.warning("Timed out attempt %s (epoch %d) of job %s: %s",
                               sweep.attempt_id, sweep.epoch, sweep.job_id, sweep.reason)
            return decision

        removed, orphans = flight.expire(now, self.settings.coordinator.retention_s,
                                         self.limits)
        for job_id in removed:
            logger.info("Removed finished job %s of key %s from the flights table",
                        job_id, flight.job_key)
        for uri in orphans:
            self._delete_artifact(uri, flight.job_key)
        if flight.empty:
            # Deleting the key writes a tombstone, so compaction drops it from the changelog.
            self.flights.pop(flight.job_key, None)
            logger.info("Removed empty flight %s", flight.job_key)
            return None
        return Decision()

    def _delete_artifact(self, uri: str, job_key: str) -> None:
        """Delete a generation nothing refers to any more; a missing file is not an error."""
        try:
            deleted = self.artifacts.delete(uri)
        except ArtifactError as err:
            logger.warning("Failed to delete artifact %s of key %s: %s", uri, job_key, err)
            return
        if deleted:
            logger.info("Deleted unused artifact %s of key %s", uri, job_key)

    def _apply_renewal(self, flight: FlightState, attempt_id: str) -> None:
        renewal = self._renewals.get(attempt_id)
        if renewal is not None:
            epoch, worker_id, until = renewal
            flight.renew_lease(attempt_id, epoch, worker_id, until)

    # ---- publishing ---------------------------------------------------------------------------

    async def _publish(self, flight: FlightState, decision: Decision,
                       routed: Sequence[_Routed]) -> None:
        """Send a stored decision's events, with its dispatches as ``_route`` prepared them."""
        for claim in decision.claims:
            await self._send_claim_decision(claim)
        for cancel in decision.cancel:
            # Heartbeats of an attempt being cancelled ask again; one repeat per interval
            # is enough for a worker that missed the first message.
            # The worker is part of the marker, so stopping a worker without the lease does
            # not hold back a later cancel of the holder's run.
            marker = (cancel.attempt_id, cancel.epoch, cancel.worker_id)
            now_s = time.monotonic()
            if now_s - self._cancels_sent.get(marker, -CANCEL_REPEAT_S) < CANCEL_REPEAT_S:
                continue
            self._cancels_sent[marker] = now_s
            if len(self._cancels_sent) > 100_000:
                self._cancels_sent.pop(next(iter(self._cancels_sent)))
            if flight.stops_intruder(cancel):
                # The holder's run goes on, so its lease, watch and queue entry stay.
                await self._send_cancel(cancel)
                continue
            # A running attempt keeps its slot until its finish arrives.
            self.pool.dequeued(cancel.attempt_id)
            self.liveness.finished(cancel.attempt_id)
            renewal = self._renewals.get(cancel.attempt_id)
            # A re-dispatch in the same decision may hold a newer epoch's lease already.
            if renewal is not None and renewal[0] <= cancel.epoch:
                del self._renewals[cancel.attempt_id]
            await self._send_cancel(cancel)
        if any(dispatch.attempt.granted_to is not None for dispatch in routed):
            # A worker runs a granted attempt without a claim, so the grant must reach the
            # changelog first. A restarted coordinator that lost it would grant the same
            # epoch to another worker when it processes the input again.
            # NOTE: faust 0.15.3 stops draining its table buffer after 0.1 s without a send,
            # so a producer stalled that long may still send the dispatch first.
            await self.app.producer.flush()
        for dispatch in routed:
            await self._send_attempt(flight, dispatch)
        for attempt, retry_no in decision.retry:
            await self._send_retry(attempt, retry_no)
        for record, outcome in decision.outcomes:
            self._record_outcome(flight, record, outcome)
        for completed in decision.completed:
            await self._send_completion(flight, completed)
        for completed in decision.republish:
            await self._resend_completion(flight, completed)
        for delivered in decision.delivered:
            await self.delivered_topic.send(key=delivered.job_id.encode(),
                                            value=encode_event(delivered))
            logger.info("Job %s is %s%s", delivered.job_id, delivered.status,
                        f": {delivered.reason}" if delivered.reason else "")

    async def _send_cancel(self, cancel: AttemptCancel) -> None:
        await self.control_topic.send(
            key=(cancel.worker_id or cancel.attempt_id).encode(), value=encode_event(cancel))
        logger.info("Cancelling attempt %s (epoch %d) of job %s (%s): %s", cancel.attempt_id,
                    cancel.epoch, cancel.job_id,
                    f"on worker {cancel.worker_id}" if cancel.worker_id else "not claimed yet",
                    cancel.reason)

    async def _send_claim_decision(self, claim: ClaimDecision) -> None:
        # A granted attempt waits at its worker until it starts there.
        if claim.granted:
            assert claim.lease_expires_at is not None
            self._renewals[claim.attempt_id] = (claim.epoch, claim.worker_id,
                                                claim.lease_expires_at)
        else:
            self.pool.dequeued(claim.attempt_id)
            logger.info("Denied claim of attempt %s (epoch %d) by %s: %s", claim.attempt_id,
                        claim.epoch, claim.worker_id, claim.reason)
        await self.control_topic.send(key=claim.worker_id.encode(), value=encode_event(claim))

    def _job_context(self, flight: FlightState, job_id: str) -> Any:
        job = flight.jobs.get(job_id)
        if job is None or not job.traceparent:
            return None
        return traceparent_context(job.traceparent)

    def _affinity_partition(self, attempt: AttemptDispatched
                            ) -> tuple[str | None, int | None, bool]:
        """Pick the worker and partition of the attempt's tier topic, and report whether that
        worker is free. Affinity picks the worker or, with no worker free, the one with the
        shortest queue. A partition of None lets the default partitioner choose.

        Re-dispatches (epoch above 1) keep the default partitioner, so an attempt that hung on
        a worker with its model warm is not sent straight back to it.

        A follow-up is routed only to a free worker, through the first-attempt topic whose
        partitions workers report. With no worker free it goes to the follow-up topic, which
        workers fetch before first attempts.
        """
        if not self.settings.coordinator.affinity_routing or attempt.epoch > 1:
            return None, None, False
        if attempt.followup and self.pool.idle_slots() <= 0:
            # No slot is idle beyond the waiting attempts, and some may wait in a worker's
            # follow-up partitions, which that worker fetches before a routed record.
            return None, None, False
        views: list[WorkerView] = []
        owned: dict[str, list[int]] = {}
        # Attempts routed to a worker take its free slots until they start there.
        queued = self.pool.queued_by_worker()
        for status in self.pool.live_workers():
            free = status.slots - self.pool.busy_of(status.worker_id)
            views.append(WorkerView(status.worker_id, free - queued.get(status.worker_id, 0),
                                    frozenset(status.warm_models)))
            owned[status.worker_id] = status.partitions.get(attempt.tier, [])
        record_key = f"{attempt.attempt_id}:{attempt.epoch}"
        routed_to = route_partition(views, owned, attempt.params.model, attempt.params.loras,
                                    record_key)
        free = routed_to is not None
        if routed_to is None and attempt.followup:
            return None, None, False
        if routed_to is None:
            routed_to = route_shortest_queue(owned, queued, record_key)
        if routed_to is None:
            return None, None, False
        worker_id, partition = routed_to
        logger.debug("Routing attempt %s (model %s) to worker %s, partition %d",
                     attempt.attempt_id, attempt.params.model, worker_id, partition)
        return worker_id, partition, free

    def _attempt_topic(self, attempt: AttemptDispatched, partition: int | None = None) -> Any:
        """Return the topic of an attempt: a routed follow-up takes the first-attempt topic,
        whose ``partition`` the routing picked."""
        followup = attempt.followup and partition is None
        topics = self.followup_topics if followup else self.attempt_topics
        return topics[attempt.tier]

    def _route(self, flight: FlightState, decision: Decision) -> list[_Routed]:
        """Pick each dispatch's partition and grant its lease where the worker has a free slot.

        Runs before the flight is stored, so a lease granted here is in the table before
        its attempt reaches the worker.
        """
        routed: list[_Routed] = []
        threshold_s = straggler_threshold_s(
            self.service_times.median_s(class_of(flight.params)))
        now = _utc_now()
        for attempt in decision.dispatch:
            if self.limits.policy is RacingPolicy.ADAPTIVE and threshold_s is not None \
                    and flight.replaces_stragglers(attempt.job_id):
                attempt = attempt.model_copy(update={"straggler_remaining_s": threshold_s})
            worker_id, partition, free = self._affinity_partition(attempt)
            if free and worker_id is not None and self.settings.coordinator.grant_at_dispatch:
                until = flight.grant_at_dispatch(attempt.attempt_id, attempt.epoch, worker_id,
                                                 now, self.limits)
                if until is not None:
                    attempt = attempt.model_copy(
                        update={"granted_to": worker_id, "lease_expires_at": until})
                    self._renewals[attempt.attempt_id] = (attempt.epoch, worker_id, until)
            # Counted at once, so the next attempt's route counts this one as queued.
            self.pool.dispatched(attempt.attempt_id, attempt.tier, worker_id)
            routed.append(_Routed(attempt, partition))
        return routed

    async def _send_attempt(self, flight: FlightState, dispatch: _Routed) -> None:
        attempt, partition = dispatch
        topic = self._attempt_topic(attempt, partition)
        with stage_span(
            self.tracer, f"send {topic.get_topic_name()}", "dispatch",
            parent=self._job_context(flight, attempt.job_id), kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "kafka",
                "messaging.operation.type": "send",
                "messaging.destination.name": topic.get_topic_name(),
                "slotforge.job.id": attempt.job_id,
                "slotforge.attempt.id": attempt.attempt_id,
                "slotforge.attempt.epoch": attempt.epoch,
                "slotforge.tier": attempt.tier.value,
                "slotforge.attempt.routed": partition is not None,
                "slotforge.lease.at_dispatch": attempt.granted_to is not None,
            },
        ) as span:
            # The epoch is part of the key, so a re-dispatch lands on a random partition
            # instead of going back to the worker that just hung on it.
            await topic.send(
                key=f"{attempt.attempt_id}:{attempt.epoch}".encode(),
                value=encode_event(attempt), headers=inject_headers(span), partition=partition,
            )
        logger.debug("Dispatched attempt %s (epoch %d) of job %s%s",
                     attempt.attempt_id, attempt.epoch, attempt.job_id,
                     f" with its lease granted to {attempt.granted_to}"
                     if attempt.granted_to else "")

    async def _send_retry(self, attempt: AttemptDispatched, retry_no: int) -> None:
        """Dispatch an attempt again through a delay topic, after backoff with jitter."""
        delay_s = self.backoff.delay_s(retry_no)
        target = self._attempt_topic(attempt).get_topic_name()
        headers = retry_headers(None, target, retry_no, time.time() + delay_s, "attempt_failed")
        await self.retry_topics[retry_level(retry_no)].send(
            key=f"{attempt.attempt_id}:{attempt.epoch}".encode(), value=encode_event(attempt),
            headers=headers)
        self.pool.dispatched(attempt.attempt_id, attempt.tier)
        logger.warning("Retrying attempt %s of job %s as epoch %d in %.2f s (retry %d of %d)",
                       attempt.attempt_id, attempt.job_id, attempt.epoch, delay_s, retry_no,
                       self.limits.max_retries_per_attempt)

    def _record_outcome(self, flight: FlightState, record: AttemptRecord, outcome: str) -> None:
        """Record one span per ended attempt, so SQL can sum GPU-seconds by outcome."""
        span = self.tracer.start_span(
            "attempt", context=self._job_context(flight, record.job_id),
            start_time=datetime_ns(record.dispatched_at),
            # No stage attribute: outcome spans would skew the stage latency table.
            attributes={
                "slotforge.tier": flight.jobs[record.job_id].tier.value
                if record.job_id in flight.jobs else "",
                "slotforge.job.id": record.job_id,
                "slotforge.attempt.id": record.attempt_id,
                "slotforge.attempt.epoch": record.epoch,
                "slotforge.attempt.outcome": outcome,
                "slotforge.worker.id": record.worker_id or "",
                "slotforge.gpu_s": record.gpu_s,
                "gen_ai.request.model": flight.params.model,
            },
        )
        span.end()

    async def _send_completion(self, flight: FlightState, completed: JobCompleted) -> None:
        parent = self._job_context(flight, completed.job_id)
        fallback = sum(1 for slot in completed.slots if slot.fallback)
        for slot in completed.slots:
            record = flight.attempts.get(slot.attempt_id)
            if slot.fallback and record is not None:
                self._record_outcome(flight, record, "fallback")
        cached = sum(1 for slot in completed.slots if slot.cached)
        gpu_s = sum(record.gpu_s for record in flight.attempts.values()
                    if record.job_id == completed.job_id)
        attributes = {
            "slotforge.job.id": completed.job_id,
            "slotforge.tenant.id": completed.tenant_id,
            "slotforge.job.status": completed.status.value,
            "slotforge.tier": completed.tier.value,
            "slotforge.slots": completed.requested_slots,
            "slotforge.slots.filled": len(completed.slots),
            "slotforge.slots.fallback": fallback,
            "slotforge.slots.cached": cached,
            "slotforge.attempts": completed.attempts,
            "slotforge.gpu_s": round(gpu_s, 6),
            "gen_ai.request.model": flight.params.model,
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
            await self._send_outcome(completed, span)
        logger.info(
            "Job %s ended %s with %d/%d slots (%d fallback, %d cached) after %d attempts%s",
            completed.job_id, completed.status.value, len(completed.slots),
            completed.requested_slots, fallback, cached, completed.attempts,
            f" ({completed.reason})" if completed.reason else "",
        )

    async def _resend_completion(self, flight: FlightState, completed: JobCompleted) -> None:
        """Send the completion event of a job that ended earlier, without its job spans."""
        with stage_span(
            self.tracer, f"send {self.completed_topic.get_topic_name()}", "completion",
            parent=self._job_context(flight, completed.job_id), kind=SpanKind.PRODUCER,
            attributes={"slotforge.job.id": completed.job_id,
                        "slotforge.job.status": completed.status.value,
                        "slotforge.completion.again": True},
        ) as span:
            await self._send_outcome(completed, span)

    async def _send_outcome(self, completed: JobCompleted, span: Span) -> None:
        """Send a completion event and keep its delivery for ``_check_outcomes``."""
        sent = await self.completed_topic.send(
            key=completed.job_id.encode(), value=encode_event(completed),
            headers=inject_headers(span),
        )
        # faust returns a future already, so this wraps nothing.
        self._outcome_sends[completed.job_id] = asyncio.ensure_future(sent)
        if len(self._outcome_sends) > MAX_OUTCOME_SENDS:
            del self._outcome_sends[next(iter(self._outcome_sends))]

    # ---- sweeps ---------------------------------------------------------------------------------

    async def _sweep_timer(self) -> None:
        """Ask partition owners to end late jobs, reclaim expired leases and forget old state.

        Tables may only change inside an agent, so the timer sends sweep events through the
        co-partitioned events topic instead of changing the table itself.
        """
        now = _utc_now()
        # Flights that stopped reporting progress need no replan time kept.
        horizon_s = time.monotonic() - 10 * self.settings.coordinator.replan_interval_s
        self._replanned_at = {key: at for key, at in self._replanned_at.items()
                              if at >= horizon_s}
        for watched, verdict in self.liveness.due():
            action: SweepAction = "hung" if verdict.action == "kill_hung" else "too_slow"
            sweep = JobSweep(job_id=watched.job_id, job_key=watched.job_key, action=action,
                             attempt_id=watched.observation.attempt_id, epoch=watched.epoch,
                             reason=verdict.reason[:500])
            await self.events_topic.send(key=watched.job_key.encode(),
                                         value=encode_event(sweep))
        for job_key, raw in list(self.flights.items()):
            for sweep in self._sweeps_for(job_key, raw, now):
                marker = (job_key, sweep.action, sweep.attempt_id or sweep.job_id)
                if marker in self._sweeps_sent:
                    continue
                self._sweeps_sent.add(marker)
                await self.events_topic.send(key=job_key.encode(), value=encode_event(sweep))

    def _sweeps_for(self, job_key: str, raw: dict[str, Any], now: datetime) -> Iterable[JobSweep]:
        retention = timedelta(seconds=self.settings.coordinator.retention_s)
        lease_floor = self._started_at + timedelta(seconds=self.limits.lease_s)
        gone_workers = self.pool.gone_workers()
        any_job = next(iter(raw.get("jobs", {})), "-")
        expire = bool(raw.get("cache")) and not raw.get("jobs")
        for job_id, job in raw.get("jobs", {}).items():
            if job.get("status") is None:
                if now >= datetime.fromisoformat(job["deadline_at"]):
                    yield JobSweep(job_id=job_id, job_key=job_key, action="deadline")
            elif job.get("finished_at") and \
                    now - datetime.fromisoformat(job["finished_at"]) >= retention:
                expire = True
        for attempt_id, attempt in raw.get("attempts", {}).items():
            lease = attempt.get("lease_expires_at")
            if attempt.get("phase") not in ("dispatched", "running") or lease is None:
                continue
            renewal = self._renewals.get(attempt_id)
            expires = max(datetime.fromisoformat(lease), lease_floor,
                          renewal[2] if renewal is not None else lease_floor)
            if now >= expires or attempt.get("worker_id") in gone_workers:
                yield JobSweep(job_id=attempt["job_id"], job_key=job_key, action="lease",
                               attempt_id=attempt_id)
        if expire:
            yield JobSweep(job_id=any_job, job_key=job_key, action="expire")


def _count_admission(request: JobRequested, verdict: str, *, rejected: bool) -> None:
    """Count one admission decision; ``verdict`` is the reason label (quota, overloaded, ...)."""
    if rejected:
        ADMISSION_DECISIONS.labels(request.tier.value, "rejected", verdict).inc()
    else:
        ADMISSION_DECISIONS.labels(request.tier.value, verdict, "none").inc()


def rejection_for(value: bytes | None, error: EventDecodeError) -> JobRejected | None:
    """Build the rejection of an invalid request that names its job and tenant, else None.

    Records that are not a job request at all (bad bytes, unknown type) get None, so they
    go to the dead-letter topic instead.
    """
    if error.error_type not in ("validation", "unsupported_version"):
        return None
    ids = _job_ids_from(value)
    if ids is None:
        return None
    job_id, tenant_id = ids
    return JobRejected(job_id=job_id, tenant_id=tenant_id,
                       reason=error.reason[:MAX_REJECTION_REASON_CHARS])


def _job_ids_from(value: bytes | None) -> tuple[str, str] | None:
    """Extract job and tenant ids from an invalid request, so the rejection can reach the client."""
    try:
        raw = json.loads(value or b"")
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(raw, dict):
        return None
    job_id, tenant_id = raw.get("job_id"), raw.get("tenant_id")
    # A rejection takes ids up to 64 characters, so a request whose id is too long for a
    # job (see JobRequested) still gets its reason.
    if isinstance(job_id, str) and isinstance(tenant_id, str) and 0 < len(job_id) <= 64 \
            and 0 < len(tenant_id) <= 128:
        return job_id, tenant_id
    return None


class _CoordinatorWorker(faust.Worker):
    """A faust worker that exits within ``stop_timeout_s`` of SIGTERM or SIGINT.

    faust stops its consumer with aiokafka's consumer.stop(), which never returns while
    the broker is unreachable.
    """

    def __init__(self, *args: Any, stop_timeout_s: float, description: str,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stop_timeout_s = stop_timeout_s
        self._description = description

    async def on_start(self) -> None:
        # faust configures logging when the worker starts, so earlier lines would be lost.
        await super().on_start()
        logger.info("Starting coordinator: %s", self._description)

    def on_worker_shutdown(self) -> None:
        logger.info("Stopping coordinator: %s", self._description)
        super().on_worker_shutdown()

    # NOTE: this overrides mode.Worker's private signal hook (mode-streaming 0.7.1), the
    # only place that sees the stop signal before the consumer starts stopping.
    def _schedule_shutdown(self, signal: Any) -> None:
        if not self._signal_stop_time:
            start_exit_watchdog(SERVICE_NAME, self._stop_timeout_s)
        super()._schedule_shutdown(signal)


def main() -> int:
    """Run the coordinator as a faust worker until SIGTERM or SIGINT."""
    settings = load_settings()
    coordinator = Coordinator(settings)
    try:
        serve_metrics(settings)
        asyncio.run(coordinator.create_changelog())
    except (ConfigurationError, KafkaConnectionError) as err:
        configure_logging(settings.log_level)
        logger.error("Coordinator failed: %s", start_failure(settings, err))
        coordinator.close()
        return 2
    # faust spells the warning level "warn".
    loglevel = settings.log_level.lower().replace("warning", "warn")
    description = (f"app {settings.coordinator.app_id}, pid {os.getpid()}, requests "
                   f"{settings.topics.jobs_requested}, events {settings.topics.coordinator_events},"
                   f" racing policy {settings.coordinator.racing_policy}")
    worker = _CoordinatorWorker(coordinator.app, loglevel=loglevel, quiet=True,
                                stop_timeout_s=settings.stop_timeout_s, description=description)
    try:
        worker.execute_from_commandline()
    finally:
        # Removed here rather than at interpreter exit, which warns about it.
        coordinator.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
