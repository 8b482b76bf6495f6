"""Run the real pipeline with simulated GPU workers on a fresh topic prefix of a running broker.

A benchmark starts one broker, then one ``PipelineRun`` per configuration: the coordinator,
the post-processing stage and N GPU worker processes whose GPU is the simulated runner. Each
run gets its own topic prefix, coordinator app id and consumer groups, so no state leaks from
one run into the next. The run replays a schedule of job requests through the producer
client, times each job from submit to outcome, then reads the attempt events the workers
published, for GPU accounting and for checking that no attempt ran twice.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import re
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from infra.kafka_broker import DEFAULT_LIBS_DIR
from schemas.events import (
    AttemptDispatched,
    AttemptFinished,
    AttemptStarted,
    DeliveryAck,
    GenerationParams,
    JobCompleted,
    JobRequested,
    ResultScored,
    decode_event,
    utc_now,
)
from streams.client import JobRejectedError, SlotforgeClient
from streams.config import (
    ClickHouseSettings,
    ConsumerSettings,
    CoordinatorSettings,
    KafkaSettings,
    PostprocessSettings,
    Settings,
    SimulationSettings,
    TracingSettings,
    WorkerSettings,
    settings_to_env,
)
from streams.kafka import create_topics, group_lag, make_consumer, topic_partitions
from streams.processes import ProcessGroup
from streams.racing import RacingPolicy
from streams.trace_replay import replay

logger = logging.getLogger(__name__)
T = TypeVar("T")
# Seconds between two cancellations of a benchmark coroutine after SIGTERM.
CANCEL_REPEAT_S = 0.5

# The warm-up job uses its own model name, so its verdicts never feed the acceptance
# estimate of a measured job's parameter class.
WARMUP_MODEL = "bench-warmup"


@dataclass(frozen=True)
class PoolSpec:
    """The simulated GPU pool and the coordinator settings of one run."""

    workers: int = 2
    slots_per_worker: int = 4
    simulation: SimulationSettings = field(
        default_factory=lambda: SimulationSettings(enabled=True))
    racing_policy: RacingPolicy = RacingPolicy.ADAPTIVE
    # Off by default, so every job of the schedule runs and policies are compared on the
    # same jobs. Admission control is measured by its own benchmark.
    admission_enabled: bool = False
    partitions: int = 6
    # Per-step heartbeats, the worker's default, because the coordinator's liveness check
    # judges the silence between steps.
    progress_every_steps: int = 1

    @property
    def pool_slots(self) -> int:
        return self.workers * self.slots_per_worker

    @property
    def mean_service_s(self) -> float:
        """Mean of the lognormal service time: p50 * exp(sigma^2 / 2)."""
        return self.simulation.p50_s * math.exp(self.simulation.sigma ** 2 / 2)


def run_settings(bootstrap_servers: str, prefix: str, pool: PoolSpec, run_dir: Path) -> Settings:
    """Build settings whose topics, app id, groups and files belong to this run alone."""
    return Settings(
        kafka=KafkaSettings(bootstrap_servers=bootstrap_servers, topic_prefix=prefix,
                            partitions=pool.partitions),
        coordinator=CoordinatorSettings(racing_policy=pool.racing_policy.value,
                                        admission_enabled=pool.admission_enabled),
        worker=WorkerSettings(group_id=f"{prefix}gpu", slots=pool.slots_per_worker,
                              progress_every_steps=pool.progress_every_steps,
                              simulation=pool.simulation),
        postprocess=PostprocessSettings(group_id=f"{prefix}postprocess"),
        consumers=ConsumerSettings(critical_group_id=f"{prefix}delivery",
                                   best_effort_group_id=f"{prefix}thumbnails"),
        clickhouse=ClickHouseSettings(dsn=f"chdb://{(run_dir / 'clickhouse').resolve()}",
                                      sink_group_id=f"{prefix}span-sink"),
        # Spans would add a producer per process and CPU load that no benchmark reads.
        tracing=TracingSettings(enabled=False),
        artifact_dir=run_dir / "artifacts",
        delivery_dir=run_dir / "deliveries",
    )


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so a suite stops every process it started on the way out.

    Later SIGTERMs are ignored: one arriving during that cleanup would cut it short and leave
    the broker and the pipeline's processes running.
    """
    def leave(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, leave)


def run_until_sigterm(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` with ``asyncio.run``, cancelling it on SIGTERM, then exit with 143.

    The handler of ``exit_on_sigterm`` raises SystemExit wherever the signal lands. When that
    is inside an aiokafka task, the SystemExit stops the event loop before the ``async with``
    blocks have stopped their producers and consumers, and asyncio logs "Task was destroyed
    but it is pending".
    Here the signal cancels the coroutine instead, and SystemExit follows once the loop has
    closed, so the callers' ``with`` blocks still stop the processes and the broker. Later
    SIGTERMs are ignored, as there.

    NOTE: a SIGTERM that arrives while the coroutine already stops its clients on its normal
    way out cancels that stop, and a client it had not reached stays unclosed.
    """
    terminated = False
    loop: asyncio.AbstractEventLoop | None = None
    main_task: asyncio.Task[T] | None = None

    def cancel_on_sigterm(signum: int, frame: object) -> None:
        nonlocal terminated
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        terminated = True
        # The handler runs between two bytecodes of the loop's own thread, maybe inside a
        # task, so it only schedules the cancellation.
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(cancel_until_done)

    def cancel_until_done() -> None:
        # Asked again until the task ends, because a wait_for or a retry loop in the
        # coroutine may swallow one cancellation and carry on.
        if loop is None or main_task is None or main_task.done():
            return
        main_task.cancel()
        loop.call_later(CANCEL_REPEAT_S, cancel_until_done)

    async def cancellable() -> T:
        nonlocal loop, main_task
        loop = asyncio.get_running_loop()
        main_task = asyncio.current_task()
        if terminated:
            coroutine.close()
            raise asyncio.CancelledError
        return await coroutine

    previous = signal.signal(signal.SIGTERM, cancel_on_sigterm)
    try:
        result = asyncio.run(cancellable())
    except BaseException:
        # After a SIGTERM the run ends with 143, whichever error its cancellation raised.
        if not terminated:
            raise
    else:
        if not terminated:
            return result
    finally:
        if not terminated:
            signal.signal(signal.SIGTERM, previous)
    sys.exit(128 + signal.SIGTERM)


def fresh_prefix(tag: str) -> str:
    """Return a topic prefix that no earlier run used, readable in broker listings.

    Characters of ``tag`` other than letters, digits and hyphens are dropped, so the only
    dot is the one that ends the prefix.
    """
    return f"bench-{re.sub(r'[^A-Za-z0-9-]', '', tag)}-{uuid.uuid4().hex[:8]}."


@dataclass
class JobOutcome:
    """The end of one submitted job, timed at the client with a monotonic clock."""

    job_id: str
    slots: int
    submitted_s: float
    ended_s: float | None = None
    # One of completed, partial, failed or cancelled from JobCompleted, else rejected or
    # timed_out.
    status: str = "timed_out"
    completed: JobCompleted | None = None

    @property
    def latency_s(self) -> float | None:
        return None if self.ended_s is None else self.ended_s - self.submitted_s


@dataclass
class AttemptLog:
    """Attempt events and delivery acks of the measured jobs, from the coordinator events topic."""

    started: list[AttemptStarted] = field(default_factory=list)
    finished: list[AttemptFinished] = field(default_factory=list)
    # From the attempts topics, read only when the caller names them.
    dispatched: list[AttemptDispatched] = field(default_factory=list)
    scored: list[ResultScored] = field(default_factory=list)
    acks: list[DeliveryAck] = field(default_factory=list)

    def unfinished(self) -> list[AttemptStarted]:
        """Return the starts with no finish from the same worker under the same epoch."""
        done = {(event.attempt_id, event.epoch, event.worker_id) for event in self.finished}
        return [event for event in self.started
                if (event.attempt_id, event.epoch, event.worker_id) not in done]


class PipelineRun:
    """The pipeline's processes for one run, started on entry and stopped on exit.

    Args:
        settings: settings from ``run_settings``, passed to every process as variables.
        workers: GPU worker processes to start.
        log_dir: one log file per process, kept after the run for inspection.
    """

    def __init__(self, settings: Settings, workers: int, log_dir: Path, *,
                 static_membership: bool = False) -> None:
        self.settings = settings
        self.workers = workers
        self.static_membership = static_membership
        env = {key: value for key, value in os.environ.items()
               if not key.startswith("SLOTFORGE_")}
        env.update(settings_to_env(settings))
        self.processes = ProcessGroup(log_dir, env)
        self.worker_ids = [f"{settings.kafka.topic_prefix}gpu-{index}"
                           for index in range(1, workers + 1)]

    def __enter__(self) -> PipelineRun:
        shutil.rmtree(self.settings.artifact_dir, ignore_errors=True)
        # NOTE: on a fresh broker the coordinator has rejected its first requests with
        # faust's PartitionsMismatch because the changelog of its table was not in its
        # metadata yet, so the run creates that topic up front.
        changelog = (f"{self.settings.kafka.topic_prefix}{self.settings.coordinator.app_id}"
                     "-flights-changelog")
        run_until_sigterm(_create_topics_with_leaders(self.settings.kafka,
                                                      [*self.settings.topics.all, changelog]))
        self.processes.start("coordinator")
        self.processes.start("postprocess")
        for worker_id in self.worker_ids:
            self.start_worker(worker_id.rsplit(".", 1)[-1], instance=worker_id)
        return self

    def start_worker(self, name: str, *, instance: str) -> None:
        """Start a GPU worker process named ``name`` in the worker slot ``instance``.

        With static membership the slot name is the worker's group instance id, so a worker
        started in a killed worker's slot takes over its partitions without a rebalance.
        """
        env = {"SLOTFORGE_WORKER__WORKER_ID": f"{self.settings.kafka.topic_prefix}{name}"}
        if self.static_membership:
            env["SLOTFORGE_WORKER__GROUP_INSTANCE_ID"] = instance
        self.processes.start("gpu-worker", name=name, env=env)

    def __exit__(self, *exc: object) -> None:
        # One SIGTERM per process, newest first, because ProcessGroup.stop_all signals every
        # process twice and the service runner cancels outright on a second signal.
        for child in reversed(self.processes.processes):
            self.processes.stop(child, grace_s=15.0)
        # The PNGs of thousands of attempts are of no use after the run.
        shutil.rmtree(self.settings.artifact_dir, ignore_errors=True)

    def check_alive(self) -> None:
        """Raise when a pipeline process exited on its own, naming its log."""
        for child in self.processes.failed():
            raise RuntimeError(f"{child.name} exited with status {child.process.returncode}; "
                               f"see {child.log_path}")

    async def wait_ready(self, timeout_s: float = 120.0) -> float:
        """Wait until every worker is in its group and a warm-up job has completed.

        A worker that joins the group during the measurement would trigger a rebalance that
        pauses fetching, and the first jobs would also pay for the coordinator's start.
        Returns the seconds waited.
        """
        started = time.monotonic()
        deadline = started + timeout_s
        await self._wait_for_group(deadline)
        async with SlotforgeClient(self.settings.kafka) as client:
            warmup = JobRequested(
                tenant_id="bench", user_id="warmup", slots=1, deadline_s=timeout_s,
                params=GenerationParams(model=WARMUP_MODEL, prompt=f"warm-up {uuid.uuid4().hex}",
                                        steps=10),
            )
            await client.run(warmup, timeout_s=max(1.0, deadline - time.monotonic()))
        # The coordinator may have become ready just before the warm-up job, so give it a
        # few status intervals to see every worker's free slots.
        await asyncio.sleep(3 * self.settings.worker.status_interval_s)
        return time.monotonic() - started

    async def _wait_for_group(self, deadline: float) -> None:
        group_id = self.settings.worker.group_id
        admin = AIOKafkaAdminClient(**self.settings.kafka.client_options())
        await admin.start()
        try:
            while True:
                self.check_alive()
                members, state = await _group_members(admin, group_id)
                if members == self.workers and state == "Stable":
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"GPU workers not ready: group {group_id} has {members} of "
                        f"{self.workers} members in state {state}; see the logs in "
                        f"{self.processes.log_dir}")
                await asyncio.sleep(0.5)
        finally:
            await admin.close()

    async def replay(self, schedule: Sequence[tuple[float, JobRequested]],
                     wait_timeout_s: float) -> list[JobOutcome]:
        """Submit each request at its arrival offset and wait until every job has ended.

        ``wait_timeout_s`` bounds the wait of each job after its submission. A job without
        an outcome by then counts as ``timed_out``.
        """
        outcomes: dict[str, JobOutcome] = {}
        waiters: list[asyncio.Task[None]] = []
        origin = time.monotonic()

        async def wait_one(client: SlotforgeClient, outcome: JobOutcome) -> None:
            try:
                completed = await client.wait(outcome.job_id, wait_timeout_s)
            except JobRejectedError:
                outcome.status = "rejected"
                outcome.ended_s = time.monotonic() - origin
                return
            except TimeoutError:
                return
            outcome.ended_s = time.monotonic() - origin
            outcome.status = completed.status.value
            outcome.completed = completed

        async with SlotforgeClient(self.settings.kafka) as client:
            async def submit(request: JobRequested) -> None:
                # The schedule was built before the run, so stamp the real request time.
                now = utc_now()
                request = request.model_copy(update={"requested_at": now, "emitted_at": now})
                outcome = JobOutcome(request.job_id, request.slots, time.monotonic() - origin)
                outcomes[request.job_id] = outcome
                await client.submit(request)
                waiters.append(asyncio.create_task(wait_one(client, outcome)))

            await replay(schedule, submit)
            await asyncio.gather(*waiters)
        return [outcomes[request.job_id] for _, request in schedule]

    async def attempt_log(self, job_ids: set[str], settle_timeout_s: float = 30.0) -> AttemptLog:
        """Read the attempt events of ``job_ids`` once every started attempt has finished.

        Surplus attempts cancelled at a job's end report their finish a moment after the job's
        outcome, so this waits until each start has its finish and the workers have consumed
        every dispatched attempt, or until ``settle_timeout_s`` passes.
        """
        deadline = time.monotonic() + settle_timeout_s
        while True:
            log = await read_attempt_log(self.settings.kafka,
                                         self.settings.topics.coordinator_events, job_ids,
                                         dispatch_topics=list(self.settings.topics.attempt_topics))
            lag = 0
            for topic in self.settings.topics.attempt_topics:
                lag += await group_lag(self.settings.kafka, self.settings.worker.group_id,
                                       topic)
            if (not log.unfinished() and lag == 0) or time.monotonic() > deadline:
                if log.unfinished() or lag:
                    logger.warning(
                        "Attempt events did not settle within %.0f s: %d attempts started "
                        "without a finish, %d dispatched attempts not consumed",
                        settle_timeout_s, len(log.unfinished()), lag)
                return log
            await asyncio.sleep(1.0)


async def _create_topics_with_leaders(kafka: KafkaSettings, topics: Sequence[str],
                                      timeout_s: float = 30.0) -> None:
    """Create the topics and wait until each partition has a leader.

    Clients that fetch from a partition before its leader is elected log an error per retry.
    """
    await create_topics(kafka, topics)
    admin = AIOKafkaAdminClient(**kafka.client_options())
    await admin.start()
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            described = await admin.describe_topics(list(topics))
            leaderless = [
                f"{topic['topic']}[{partition['partition']}]"
                for topic in described for partition in topic.get("partitions", [])
                if partition.get("error_code", 0) != 0 or partition.get("leader", -1) < 0
            ]
            missing = len(topics) - sum(1 for topic in described
                                        if topic.get("error_code", 0) == 0)
            if not leaderless and missing == 0:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{missing} topics missing and partitions without a leader "
                                   f"after {timeout_s:.0f} s: {', '.join(leaderless[:5])}")
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


async def _group_members(admin: AIOKafkaAdminClient, group_id: str) -> tuple[int, str]:
    """Return the member count and state of a consumer group (0 and "Dead" when unknown)."""
    try:
        responses = await admin.describe_consumer_groups([group_id])
    except KafkaError as err:
        # A fresh broker has no group coordinator until its offsets topic exists.
        if not err.retriable:
            raise
        return 0, f"unknown ({type(err).__name__})"
    for response in responses:
        for group in response.groups:
            # aiokafka returns raw DescribeGroups rows: (error_code, group_id, state,
            # protocol_type, protocol, members, ...).
            if group[1] == group_id:
                return len(group[5]), str(group[2])
    return 0, "Dead"


async def read_attempt_log(kafka: KafkaSettings, topic: str, job_ids: set[str], *,
                           dispatch_topics: Sequence[str] = ()) -> AttemptLog:
    """Read the coordinator events topic, and any ``dispatch_topics``, from start to end."""
    log = AttemptLog()
    consumer = make_consumer(kafka, group_id=None, max_poll_records=5_000)
    await consumer.start()
    try:
        partitions = await topic_partitions(kafka, topic, *dispatch_topics)
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        remaining = {partition for partition in partitions if ends[partition] > 0}
        while remaining:
            for partition, records in (await consumer.getmany(timeout_ms=500)).items():
                for record in records:
                    _collect(log, record.value, job_ids)
                if await consumer.position(partition) >= ends[partition]:
                    remaining.discard(partition)
    finally:
        await consumer.stop()
    return log


def _collect(log: AttemptLog, value: bytes | None, job_ids: set[str]) -> None:
    # Progress heartbeats dominate the topic, so skip them before decoding.
    if value is None:
        return
    if b'"attempt.started"' in value:
        started = decode_event(value, AttemptStarted)
        if started.job_id in job_ids:
            log.started.append(started)
    elif b'"attempt.finished"' in value:
        finished = decode_event(value, AttemptFinished)
        if finished.job_id in job_ids:
            log.finished.append(finished)
    elif b'"result.scored"' in value:
        scored = decode_event(value, ResultScored)
        if scored.job_id in job_ids:
            log.scored.append(scored)
    elif b'"attempt.dispatched"' in value:
        dispatched = decode_event(value, AttemptDispatched)
        if dispatched.job_id in job_ids:
            log.dispatched.append(dispatched)
    elif b'"delivery.ack"' in value:
        ack = decode_event(value, DeliveryAck)
        if ack.job_id in job_ids:
            log.acks.append(ack)


@dataclass(frozen=True)
class DuplicateExecution:
    """One attempt that two workers ran: under one epoch, or at overlapping times."""

    attempt_id: str
    workers: tuple[str, ...]
    same_epoch: bool
    overlapping: bool


def duplicate_executions(log: AttemptLog) -> list[DuplicateExecution]:
    """Find attempts started by two workers under one epoch or run on two workers at once.

    A run lasts from the worker's ``started_at`` to its finish event; a start without a
    finish counts as running until the end of the log.
    """
    finish_at: dict[tuple[str, int, str], datetime] = {}
    for finished in log.finished:
        finish_at[(finished.attempt_id, finished.epoch, finished.worker_id)] = finished.emitted_at
    last = max((event.emitted_at for event in [*log.started, *log.finished]), default=None)

    runs: dict[str, list[tuple[datetime, datetime, str, int]]] = collections.defaultdict(list)
    for started in log.started:
        end = finish_at.get((started.attempt_id, started.epoch, started.worker_id), last)
        assert end is not None
        runs[started.attempt_id].append((started.started_at, end, started.worker_id,
                                         started.epoch))

    duplicates = []
    for attempt_id, intervals in runs.items():
        workers = {worker for _, _, worker, _ in intervals}
        if len(workers) < 2:
            continue
        by_epoch: dict[int, set[str]] = collections.defaultdict(set)
        for _, _, worker, epoch in intervals:
            by_epoch[epoch].add(worker)
        same_epoch = any(len(epoch_workers) > 1 for epoch_workers in by_epoch.values())
        overlapping = any(
            first[2] != second[2] and first[0] < second[1] and second[0] < first[1]
            for index, first in enumerate(intervals) for second in intervals[index + 1:]
        )
        if same_epoch or overlapping:
            duplicates.append(DuplicateExecution(attempt_id, tuple(sorted(workers)),
                                                 same_epoch, overlapping))
    return duplicates


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile ``q`` (0-100), or None for no values."""
    if not values:
        return None
    return float(np.percentile(np.asarray(values, dtype=float), q))


def outcome_counts(outcomes: Sequence[JobOutcome]) -> dict[str, int]:
    counts = collections.Counter(outcome.status for outcome in outcomes)
    return {status: counts.get(status, 0) for status in
            ("completed", "partial", "failed", "cancelled", "rejected", "timed_out")}


def kafka_broker_version(libs_dir: Path = DEFAULT_LIBS_DIR) -> str:
    """Return the broker version from the name of its jar, e.g. ``4.4.0``."""
    for jar in sorted(libs_dir.glob("kafka_2.13-*.jar")):
        return jar.stem.removeprefix("kafka_2.13-")
    return "unknown"


def machine_description() -> dict[str, Any]:
    """Describe the machine and software a benchmark ran on, for its results JSON."""
    import platform
    from importlib import metadata

    versions = {}
    for package in ("aiokafka", "faust-streaming", "pydantic", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "packages": versions,
    }
