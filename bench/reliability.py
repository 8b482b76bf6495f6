"""Reliability suite: faults, bad input and overload on the real pipeline, and what they cost.

Each fault runs the pipeline's own processes (coordinator, post-processing, the critical
delivery consumer and GPU workers on the simulated GPU) on a fresh topic prefix of a real
broker. It submits at least 200 jobs at once and injects the fault while they are in
flight. Then it checks three invariants from the topics, the delivery folder and the logs:

- every admitted job reached exactly one terminal state (none lost, none ended twice);
- no slot was filled twice (no generation appears in two slots, no job has extra slots);
- the critical delivery consumer applied each completed job exactly once.

The chaos tests under ``tests/`` drive the same functions, one fault per test, and
``slotforge bench reliability`` runs them all and writes the counts as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypedDict

from bench.pipeline_run import (
    PipelineRun,
    PoolSpec,
    _create_topics_with_leaders,
    fresh_prefix,
    kafka_broker_version,
    machine_description,
    read_attempt_log,
    run_settings,
    run_until_sigterm,
)
from infra.kafka_broker import KafkaBroker
from schemas.events import (
    GenerationParams,
    JobCompleted,
    JobDelivered,
    JobRejected,
    JobRequested,
    decode_event,
)
from streams.client import JobRejectedError, SlotforgeClient
from streams.config import LOCAL_DIR, Settings, SimulationSettings
from streams.kafka import group_lag, make_consumer, topic_partitions
from streams.processes import ServiceProcess

logger = logging.getLogger(__name__)

DELIVERED_LINE = re.compile(r"Delivered job (\w+) \(")
ASSIGNED_LINE = re.compile(r"Group \S+ assigned partitions")
# aiokafka's warning when the group coordinator has removed a member, which happens after
# the member missed its session timeout or its poll interval.
EVICTED_LINE = "local member_id was not recognized"
REPRODUCE = (
    ".venv/bin/slotforge bench reliability --out bench/results/reliability.json\n"
    ".venv/bin/python -m bench.render"
)
PAGE = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"


# ---- configuration ------------------------------------------------------------------------

@dataclass(frozen=True)
class ChaosConfig:
    """Pool, job shape and coordinator settings of one fault run."""

    jobs: int = 200
    slots_per_job: int = 2
    steps: int = 4
    workers: int = 3
    slots_per_worker: int = 8
    p50_s: float = 0.15
    sigma: float = 0.5
    acceptance: float = 0.6
    lease_s: float = 4.0
    partitions: int = 3
    admission_enabled: bool = False
    deadline_s: float = 600.0
    # Consumer groups leave out a member that has not polled for this long.
    max_poll_interval_ms: int = 300_000
    tracing: bool = False
    # Seconds a job may take from submission before it counts as lost.
    wait_timeout_s: float = 300.0

    def pool(self) -> PoolSpec:
        return PoolSpec(
            workers=self.workers, slots_per_worker=self.slots_per_worker,
            simulation=SimulationSettings(enabled=True, p50_s=self.p50_s, sigma=self.sigma,
                                          acceptance=self.acceptance),
            admission_enabled=self.admission_enabled, partitions=self.partitions,
        )


def chaos_settings(bootstrap_servers: str, run_dir: Path, config: ChaosConfig,
                   tag: str) -> Settings:
    """Build settings for one fault run: its own topics, groups, folders and lease."""
    base = run_settings(bootstrap_servers, fresh_prefix(tag), config.pool(), run_dir)
    return base.model_copy(update={
        "kafka": base.kafka.model_copy(
            update={"max_poll_interval_ms": config.max_poll_interval_ms}),
        "coordinator": base.coordinator.model_copy(
            update={"lease_s": config.lease_s, "sweep_interval_s": 0.5}),
        "tracing": base.tracing.model_copy(update={"enabled": config.tracing}),
    })


def job_requests(config: ChaosConfig, tag: str, count: int | None = None) -> list[JobRequested]:
    """Distinct jobs (no two share a cache key), spread over three tenants."""
    return [
        JobRequested(
            tenant_id=f"tenant-{index % 3}", user_id=f"user-{index % 17}",
            params=GenerationParams(model="M0001", prompt=f"{tag} floor plan {index}",
                                    steps=config.steps),
            slots=config.slots_per_job, deadline_s=config.deadline_s,
        )
        for index in range(config.jobs if count is None else count)
    ]


# ---- the pipeline under test --------------------------------------------------------------

class ChaosPipeline(PipelineRun):
    """The pipeline's processes for one fault run, with the critical delivery consumer."""

    def __init__(self, settings: Settings, config: ChaosConfig, log_dir: Path,
                 extra_services: Sequence[str] = ()) -> None:
        super().__init__(settings, config.workers, log_dir)
        self.config = config
        self.extra_services = list(extra_services)

    async def start(self) -> None:
        """Create the topics, start every process and wait until a warm-up job completes."""
        shutil.rmtree(self.settings.artifact_dir, ignore_errors=True)
        await _create_topics_with_leaders(self.settings.kafka, self.settings.topics.all)
        self.processes.start("coordinator")
        self.processes.start("postprocess")
        self.processes.start("delivery")
        for service in self.extra_services:
            self.processes.start(service)
        for worker_id in self.worker_ids:
            self.start_worker_process(worker_id)
        await self.wait_ready(timeout_s=180.0)

    def start_worker_process(self, worker_id: str) -> ServiceProcess:
        """Start a GPU worker with the full ``worker_id`` and return its process."""
        return self.processes.start("gpu-worker", name=worker_id.rsplit(".", 1)[-1],
                                    env={"SLOTFORGE_WORKER__WORKER_ID": worker_id})

    def service(self, name: str) -> ServiceProcess:
        """Return the newest process started under ``name``."""
        for child in reversed(self.processes.processes):
            if child.name == name:
                return child
        raise KeyError(f"no process named {name}")

    def stop(self) -> None:
        # One SIGTERM per process, newest first; see PipelineRun.__exit__.
        for child in reversed(self.processes.processes):
            if child.alive():
                self.processes.stop(child, grace_s=30.0)

    def log_text(self, service: str) -> str:
        """Concatenate the logs of every process of ``service`` ever started."""
        return "".join(child.log_path.read_text(errors="replace")
                       for child in self.processes.processes if child.service == service)


# ---- results -------------------------------------------------------------------------------

@dataclass
class FaultResult:
    """Violation counts of the invariants after one fault, and other observations."""

    fault: str
    jobs: int
    admitted: int = 0
    rejected: int = 0
    lost: int = 0
    double_filled: int = 0
    duplicate_deliveries: int = 0
    # Jobs with more than one terminal event that disagree (status or slots).
    conflicting_outcomes: int = 0
    # Completed jobs whose manifest the delivery consumer never wrote.
    undelivered: int = 0
    seconds: float = 0.0
    observed: dict[str, Any] = field(default_factory=dict)

    def violations(self) -> list[str]:
        """Describe each broken invariant; empty when the run kept every one."""
        problems = []
        for name in ("lost", "double_filled", "duplicate_deliveries", "conflicting_outcomes",
                     "undelivered"):
            value = getattr(self, name)
            if value:
                problems.append(f"{self.fault}: {name} = {value}")
        return problems


@dataclass
class RunOutcome:
    """Outcomes the client saw while the fault ran."""

    requests: list[JobRequested]
    completed: dict[str, JobCompleted] = field(default_factory=dict)
    rejected: dict[str, JobRejected] = field(default_factory=dict)
    timed_out: set[str] = field(default_factory=set)

    @property
    def ended(self) -> int:
        return len(self.completed) + len(self.rejected)


# A coroutine function, because the run wraps its call in a task.
FaultAction = Callable[["FaultContext"], Coroutine[Any, Any, dict[str, Any]]]


@dataclass
class FaultContext:
    """The pipeline, outcomes and broker that a fault action may act on while jobs run."""

    pipeline: ChaosPipeline
    outcome: RunOutcome
    broker: KafkaBroker | None = None
    # Holds the span store away from the span sink until closed.
    store_outage: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    async def wait_ended(self, count: int, timeout_s: float = 300.0) -> None:
        """Wait until ``count`` jobs have an outcome at the client."""
        deadline = time.monotonic() + timeout_s
        while self.outcome.ended < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.outcome.ended} of {count} jobs ended within "
                                   f"{timeout_s:.0f} s")
            await asyncio.sleep(0.2)


async def submit_and_wait(client: SlotforgeClient, outcome: RunOutcome,
                          timeout_s: float) -> None:
    """Submit every request at once, then record each one's outcome as it arrives."""
    for request in outcome.requests:
        await client.submit(request)

    async with asyncio.TaskGroup() as waiters:
        for request in outcome.requests:
            waiters.create_task(_wait_outcome(client, outcome, request, timeout_s))


Inspection = Callable[["FaultContext"], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Fault:
    """One fault of the suite: how to inject it and what to inspect after the run."""

    name: str
    config: ChaosConfig
    action: FaultAction
    # Runs after the pipeline stopped, and adds what it finds to the observations.
    inspect: Inspection | None = None
    extra_services: tuple[str, ...] = ()
    # The span store is unavailable from before the pipeline starts until the action
    # closes FaultContext.store_outage.
    store_outage: bool = False
    # The fault kills the broker, so the run needs one of its own.
    own_broker: bool = False


async def run_fault(fault: Fault, bootstrap_servers: str, run_dir: Path, *,
                    broker: KafkaBroker | None = None) -> FaultResult:
    """Run the fault's jobs through a fresh pipeline while its action injects the fault."""
    config = fault.config
    settings = chaos_settings(bootstrap_servers, run_dir, config, fault.name)
    pipeline = ChaosPipeline(settings, config, run_dir / "logs", fault.extra_services)
    outcome = RunOutcome(job_requests(config, fault.name))
    context = FaultContext(pipeline, outcome, broker)
    started = time.monotonic()
    if fault.store_outage:
        context.store_outage.enter_context(clickhouse_unavailable(settings.clickhouse.dsn))
    action: asyncio.Task[dict[str, Any]] | None = None
    try:
        await pipeline.start()
        async with SlotforgeClient(settings.kafka) as client:
            action = asyncio.create_task(fault.action(context))
            await submit_and_wait(client, outcome, config.wait_timeout_s)
            observed = await action
        # Give the critical consumer time to apply the last completions before stopping.
        await wait_delivered(settings, set(outcome.completed), timeout_s=60.0)
    finally:
        # A run cut short stops the fault first, since the fault may start a process that a
        # stop already under way would miss.
        if action is not None and not action.done():
            action.cancel()
            await asyncio.gather(action, return_exceptions=True)
        await asyncio.to_thread(pipeline.stop)
        context.store_outage.close()
    result = await check_invariants(fault.name, settings, outcome, pipeline)
    result.observed.update(observed)
    if fault.inspect is not None:
        result.observed.update(await fault.inspect(context))
    result.seconds = round(time.monotonic() - started, 1)
    logger.info("Fault %s: %s", fault.name, json.dumps(asdict(result), sort_keys=True))
    return result


# ---- invariant checks ----------------------------------------------------------------------

async def read_topic(settings: Settings, topic: str) -> list[bytes]:
    """Read every record value of ``topic`` from its start to its current end."""
    consumer = make_consumer(settings.kafka, group_id=None, max_poll_records=5_000)
    values: list[bytes] = []
    await consumer.start()
    try:
        partitions = await topic_partitions(settings.kafka, topic)
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        remaining = {partition for partition in partitions if ends[partition] > 0}
        while remaining:
            for partition, records in (await consumer.getmany(timeout_ms=500)).items():
                values.extend(record.value for record in records if record.value)
                if await consumer.position(partition) >= ends[partition]:
                    remaining.discard(partition)
    finally:
        await consumer.stop()
    return values


async def wait_delivered(settings: Settings, job_ids: set[str], timeout_s: float) -> None:
    """Wait until ``jobs.delivered`` contains each job, or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        delivered = {decode_event(value, JobDelivered).job_id
                     for value in await read_topic(settings, settings.topics.jobs_delivered)}
        if job_ids <= delivered or time.monotonic() > deadline:
            return
        await asyncio.sleep(1.0)


async def check_invariants(name: str, settings: Settings, outcome: RunOutcome,
                           pipeline: ChaosPipeline) -> FaultResult:
    """Count lost jobs, double-filled slots and duplicate deliveries of one run.

    Reads the terminal events from the topics (not only what the client saw), the manifests
    in the delivery folder, and the delivery consumer's log of each manifest it wrote.
    """
    job_ids = {request.job_id for request in outcome.requests}
    completions: dict[str, list[JobCompleted]] = collections.defaultdict(list)
    for value in await read_topic(settings, settings.topics.jobs_completed):
        completed = decode_event(value, JobCompleted)
        if completed.job_id in job_ids:
            completions[completed.job_id].append(completed)
    rejections = {decode_event(value, JobRejected).job_id
                  for value in await read_topic(settings, settings.topics.jobs_rejected)}
    rejections &= job_ids

    result = FaultResult(fault=name, jobs=len(job_ids), rejected=len(rejections))
    result.admitted = len(job_ids - rejections)
    result.lost = len(job_ids - rejections - set(completions))
    result.conflicting_outcomes = len(rejections & set(completions))
    result.observed["duplicate_completion_events"] = sum(
        len(events) - 1 for events in completions.values())

    # A generation fills at most one slot: across every distinct completion of every job.
    fillers: collections.Counter[tuple[str, str]] = collections.Counter()
    for events in completions.values():
        distinct = {(event.status, tuple((slot.slot, slot.attempt_id, slot.artifact_uri)
                                         for slot in event.slots)) for event in events}
        if len(distinct) > 1:
            result.conflicting_outcomes += 1
        first = events[0]
        if len(first.slots) > first.requested_slots or \
                len({slot.slot for slot in first.slots}) != len(first.slots):
            result.double_filled += 1
        for slot in first.slots:
            if not slot.cached:
                fillers[(slot.attempt_id, slot.artifact_uri)] += 1
    result.double_filled += sum(count - 1 for count in fillers.values() if count > 1)

    applied = collections.Counter(DELIVERED_LINE.findall(pipeline.log_text("delivery")))
    result.duplicate_deliveries = sum(count - 1 for job_id, count in applied.items()
                                      if job_id in job_ids and count > 1)
    result.undelivered = sum(
        1 for job_id in completions
        if not (settings.delivery_dir / f"{job_id}.json").exists())
    result.observed["client_timed_out"] = len(outcome.timed_out)
    return result


# ---- faults --------------------------------------------------------------------------------

async def kill_broker(context: FaultContext) -> dict[str, Any]:
    """SIGKILL the broker mid-run and start it again on the same port and log folder."""
    broker = context.broker
    assert broker is not None, "the broker fault needs a broker of its own"
    await context.wait_ended(len(context.outcome.requests) // 4)
    ended_before = context.outcome.ended
    assert broker.process is not None
    pid_before, cluster_before = broker.process.pid, _cluster_id(broker)
    await asyncio.to_thread(broker.kill)
    down_since = time.monotonic()
    await asyncio.sleep(5.0)
    await asyncio.to_thread(broker.start, format_first=False)
    assert broker.process is not None
    return {"ended_before_kill": ended_before,
            "down_s": round(time.monotonic() - down_since, 1),
            "same_pid": broker.process.pid == pid_before,
            "same_cluster_id": _cluster_id(broker) == cluster_before}


def _cluster_id(broker: KafkaBroker) -> str:
    """Read the cluster id that formatting wrote into the broker's log folder."""
    meta = broker.data_dir / "data" / "meta.properties"
    for line in meta.read_text().splitlines():
        if line.startswith("cluster.id="):
            return line.removeprefix("cluster.id=")
    raise RuntimeError(f"no cluster.id in {meta}")


async def kill_coordinator(context: FaultContext) -> dict[str, Any]:
    """SIGKILL the coordinator mid-run and start a fresh one, which recovers its table."""
    pipeline = context.pipeline
    await context.wait_ended(len(context.outcome.requests) // 4)
    ended_before = context.outcome.ended
    pipeline.processes.kill(pipeline.service("coordinator"))
    await asyncio.sleep(2.0)
    pipeline.processes.start("coordinator")
    return {"ended_before_kill": ended_before}


async def freeze_worker(context: FaultContext) -> dict[str, Any]:
    """SIGSTOP one GPU worker for longer than its lease, then SIGCONT it."""
    pipeline = context.pipeline
    await context.wait_ended(len(context.outcome.requests) // 5)
    victim_id = pipeline.worker_ids[0]
    victim = pipeline.service(victim_id.rsplit(".", 1)[-1])
    frozen_s = pipeline.config.lease_s * 2.5
    victim.signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(frozen_s)
    finally:
        victim.signal(signal.SIGCONT)
    return {"frozen_worker": victim_id, "frozen_s": frozen_s}


async def inspect_late_results(context: FaultContext) -> dict[str, Any]:
    """Count the frozen worker's attempts that were dispatched again under a higher epoch,
    the results it finished under a replaced epoch, and how many of those filled a slot."""
    settings = context.pipeline.settings
    worker_id = context.pipeline.worker_ids[0]
    job_ids = {request.job_id for request in context.outcome.requests}
    log = await read_attempt_log(settings.kafka, settings.topics.coordinator_events, job_ids,
                                 dispatch_topics=list(settings.topics.attempt_topics))
    # A dispatch under a higher epoch fences the frozen run even when the job fills its slots
    # before any worker starts that dispatch.
    newest: dict[str, int] = {}
    epochs = [(started.attempt_id, started.epoch) for started in log.started]
    epochs += [(dispatched.attempt_id, dispatched.epoch) for dispatched in log.dispatched]
    for attempt_id, epoch in epochs:
        newest[attempt_id] = max(newest.get(attempt_id, 0), epoch)
    late = [finished for finished in log.finished
            if finished.worker_id == worker_id
            and finished.epoch < newest.get(finished.attempt_id, 0)]
    filled = {(slot.attempt_id, slot.artifact_uri)
              for completed in context.outcome.completed.values() for slot in completed.slots}
    stale_fills = [finished for finished in late
                   if (finished.attempt_id, finished.artifact_uri) in filled]
    replaced = {started.attempt_id for started in log.started
                if started.worker_id == worker_id
                and started.epoch < newest.get(started.attempt_id, 0)}
    return {"replaced_attempts": len(replaced), "late_results": len(late),
            "late_results_in_slots": len(stale_fills)}


async def restore_clickhouse(context: FaultContext) -> dict[str, Any]:
    """End the span store outage once half the jobs have ended without it."""
    await context.wait_ended(len(context.outcome.requests) // 2)
    ended = context.outcome.ended
    sink_alive = context.pipeline.service("span-sink").alive()
    await asyncio.to_thread(context.store_outage.close)
    return {"ended_during_outage": ended, "sink_alive_during_outage": sink_alive}


async def inspect_spans(context: FaultContext, timeout_s: float = 120.0) -> dict[str, Any]:
    """Run a span sink until it stored every span in Kafka; count spans and stored rows.

    Runs after the pipeline stopped, so every process has flushed its spans.
    """
    from consumers import span_sink
    from infra.clickhouse import open_client
    from streams.report import span_count

    settings = context.pipeline.settings
    spans = len(await read_topic(settings, settings.topics.spans))
    stop = asyncio.Event()
    sink = asyncio.create_task(span_sink.run(settings, stop))
    deadline = time.monotonic() + timeout_s
    try:
        while await committed_offsets(settings, settings.clickhouse.sink_group_id,
                                      settings.topics.spans) < spans:
            if sink.done() or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
    finally:
        stop.set()
        await sink
    client = open_client(settings.clickhouse)
    try:
        rows = span_count(client, settings.clickhouse.table)
    finally:
        client.close()
    return {"spans": spans, "spans_stored": rows}


async def committed_offsets(settings: Settings, group_id: str, topic: str) -> int:
    """Return how many records of ``topic`` the group has committed, summed over partitions."""
    partitions = await topic_partitions(settings.kafka, topic)
    consumer = make_consumer(settings.kafka, group_id=None)
    await consumer.start()
    try:
        total = sum((await consumer.end_offsets(partitions)).values())
    finally:
        await consumer.stop()
    return total - await group_lag(settings.kafka, group_id, topic)


def rebalance_during_long_attempts(extra_after_s: float, extra_for_s: float) -> FaultAction:
    """Add a GPU worker to the group while long attempts run, and remove it later."""

    async def action(context: FaultContext) -> dict[str, Any]:
        pipeline = context.pipeline
        await asyncio.sleep(extra_after_s)
        extra_id = f"{pipeline.settings.kafka.topic_prefix}gpu-extra"
        extra = pipeline.start_worker_process(extra_id)
        await asyncio.sleep(extra_for_s)
        await asyncio.to_thread(pipeline.processes.stop, extra, 30.0)
        return {"extra_worker": extra_id}

    return action


async def inspect_rebalances(context: FaultContext) -> dict[str, Any]:
    """Count each worker's partition assignments and evictions, and the attempts' length."""
    pipeline = context.pipeline
    assignments = {}
    evictions = {}
    for child in pipeline.processes.processes:
        if child.service != "gpu-worker":
            continue
        text = child.log_path.read_text(errors="replace")
        assignments[child.name] = len(ASSIGNED_LINE.findall(text))
        evictions[child.name] = text.count(EVICTED_LINE)
    job_ids = {request.job_id for request in context.outcome.requests}
    log = await read_attempt_log(pipeline.settings.kafka,
                                 pipeline.settings.topics.coordinator_events, job_ids)
    run_s = [finished.gpu_s for finished in log.finished if finished.status == "succeeded"]
    return {"assignments": assignments, "evictions": evictions,
            "median_attempt_s": round(statistics.median(run_s), 2) if run_s else 0.0}


FAULT_DESCRIPTIONS = {
    "broker-kill": "the broker SIGKILLed once a quarter of the jobs ended, restarted 5 s "
                   "later on the same port and log folder",
    "coordinator-kill": "the coordinator SIGKILLed once a quarter of the jobs ended, and a "
                        "fresh one started, which rebuilds its table from the changelog",
    "worker-freeze": "one of three GPU workers SIGSTOPped for 2.5 leases (10 s), then "
                     "SIGCONTed; its late results must be fenced",
    "clickhouse-outage": "the span store held by another process from before the start until "
                         "half the jobs ended; spans wait in Kafka",
    "rebalance": "a fourth GPU worker joins and leaves the group while 12 s attempts run, "
                 "with a 6 s poll interval",
}


def suite_faults(jobs: int = 200) -> list[Fault]:
    """Build the faults of the suite, each with at least ``jobs`` jobs in flight."""
    base = ChaosConfig(jobs=jobs)
    # Attempts of about 12 s against a 6 s poll interval: a worker that stopped polling
    # while its slots are busy would be evicted and rejoin over and over.
    long_attempts = ChaosConfig(jobs=jobs, slots_per_job=1, steps=6, slots_per_worker=40,
                                p50_s=12.0, sigma=0.2, acceptance=1.0, lease_s=6.0,
                                max_poll_interval_ms=6_000)
    return [
        Fault("broker-kill", base, kill_broker, own_broker=True),
        Fault("coordinator-kill", base, kill_coordinator),
        Fault("worker-freeze", base, freeze_worker, inspect=inspect_late_results),
        Fault("clickhouse-outage", ChaosConfig(jobs=jobs, tracing=True), restore_clickhouse,
              inspect=inspect_spans, extra_services=("span-sink",), store_outage=True),
        Fault("rebalance", long_attempts,
              rebalance_during_long_attempts(extra_after_s=6.0, extra_for_s=10.0),
              inspect=inspect_rebalances),
    ]


def fault_named(name: str, jobs: int = 200) -> Fault:
    for fault in suite_faults(jobs):
        if fault.name == name:
            return fault
    raise KeyError(f"unknown fault {name!r}")


async def stop_without_broker(run_dir: Path, stop_timeout_s: float = 10.0,
                              grace_s: float = 30.0) -> dict[str, Any]:
    """Start every service on a broker of its own, kill the broker, then SIGTERM each service.

    Returns each service's exit status and the seconds it took to exit; a service still
    running after ``grace_s`` is killed and gets status None.
    """
    broker = KafkaBroker(run_dir / "kafka")
    await asyncio.to_thread(broker.start)
    config = ChaosConfig(jobs=0, workers=1, tracing=True)
    settings = chaos_settings(broker.bootstrap_servers, run_dir, config, "no-broker")
    settings = settings.model_copy(update={"stop_timeout_s": stop_timeout_s})
    pipeline = ChaosPipeline(settings, config, run_dir / "logs", ("thumbnails", "span-sink"))
    exits: dict[str, dict[str, Any]] = {}
    try:
        await pipeline.start()
        await asyncio.to_thread(broker.kill)
        # Let every client notice the lost connection before the stop signal arrives.
        await asyncio.sleep(3.0)
        for child in pipeline.processes.processes:
            child.signal(signal.SIGTERM)
        started = time.monotonic()
        running = list(pipeline.processes.processes)
        while running and time.monotonic() < started + grace_s:
            for child in [child for child in running if not child.alive()]:
                exits[child.name] = {"status": child.process.returncode,
                                     "seconds": round(time.monotonic() - started, 1)}
                running.remove(child)
            await asyncio.sleep(0.2)
        for child in running:
            exits[child.name] = {"status": None, "seconds": grace_s}
    finally:
        for child in pipeline.processes.processes:
            pipeline.processes.kill(child)
        await asyncio.to_thread(broker.stop)
    return exits


# ---- bad input ----------------------------------------------------------------------------

class _AttemptIds(TypedDict):
    attempt_id: str
    job_id: str
    job_key: str


def valid_event_payloads() -> dict[str, dict[str, Any]]:
    """Build one valid event of each type a consumer reads, as JSON-ready dicts by type."""
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
        Event,
        JobStatus,
        JobSweep,
        ResultScored,
        SlotResult,
        Tier,
        WorkerStatus,
        utc_now,
    )

    request = JobRequested(tenant_id="tenant", user_id="user", slots=2,
                           params=GenerationParams(model="M0001", prompt="a floor plan",
                                                   steps=4))
    ids = _AttemptIds(attempt_id="a1", job_id=request.job_id, job_key=request.job_key)
    uri = "file:///tmp/slotforge-artifacts/job/a1.png"
    events: list[Event] = [
        request,
        AttemptDispatched(**ids, tenant_id="tenant", slot=0, attempt_no=1,
                          params=request.params, seed=7, tier=Tier.STANDARD,
                          deadline_at=utc_now()),
        AttemptClaim(**ids, worker_id="w1"),
        AttemptStarted(**ids, worker_id="w1"),
        AttemptProgress(**ids, worker_id="w1", step=1, total_steps=4),
        AttemptFinished(**ids, worker_id="w1", status=AttemptStatus.SUCCEEDED, slot=0,
                        artifact_uri=uri, gpu_s=0.5),
        ResultScored(**ids, slot=0, artifact_uri=uri, score=0.9, accepted=True, reason="ok"),
        ClaimDecision(**ids, worker_id="w1", granted=True, lease_expires_at=utc_now()),
        AttemptCancel(**ids, worker_id="w1", reason="surplus"),
        JobSweep(job_id=request.job_id, job_key=request.job_key, action="deadline"),
        DeliveryAck(job_id=request.job_id, job_key=request.job_key, consumer="delivery",
                    delivered=True),
        WorkerStatus(worker_id="w1", slots=2, busy=1),
        JobCompleted(job_id=request.job_id, job_key=request.job_key, tenant_id="tenant",
                     user_id="user", status=JobStatus.COMPLETED, requested_slots=1,
                     slots=[SlotResult(slot=0, attempt_id="a1", artifact_uri=uri, score=0.9)],
                     attempts=1, tier=Tier.STANDARD, requested_at=utc_now()),
    ]
    return {event.event_type: event.model_dump(mode="json") for event in events}


def write_test_png(path: Path) -> None:
    """Write a small PNG, for checks that a consumer leaves files outside its store alone."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path, format="PNG")


@dataclass(frozen=True)
class BadRecord:
    """One malformed record for the live batch: its kind, value and headers."""

    kind: str
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


def bad_records(seed: int = 11) -> list[BadRecord]:
    """Malformed records of every kind the property tests generate, drawn with a fixed seed.

    Each record is invalid for every consumer: no mutation here can yield a valid event.
    """
    import random

    rng = random.Random(seed)
    valid = valid_event_payloads()
    records = [
        BadRecord("random bytes", rng.randbytes(200)),
        BadRecord("not UTF-8 header", b"\xff\xfe not json", (("traceparent", b"\xff\xfe\xfd"),)),
        BadRecord("nested JSON", b"[" * 100_000),
        BadRecord("JSON array", b"[1, 2, 3]"),
    ]
    for event_type in ("job.requested", "attempt.dispatched", "attempt.finished",
                       "job.completed", "claim.decision", "worker.status"):
        payload = valid[event_type]
        text = json.dumps(payload).encode()
        records += [
            BadRecord(f"truncated {event_type}", text[:rng.randrange(1, len(text) - 1)]),
            BadRecord(f"future version {event_type}",
                      json.dumps({**payload, "schema_version": 2}).encode()),
            BadRecord(f"unknown field {event_type}",
                      json.dumps({**payload, "colour": "blue"}).encode()),
            BadRecord(f"missing event_type {event_type}",
                      json.dumps({k: v for k, v in payload.items()
                                  if k != "event_type"}).encode()),
        ]
    request = valid["job.requested"]
    for name, change in (("K=0", {"slots": 0}), ("K=10000", {"slots": 10_000}),
                         ("negative steps", {"params": {**request["params"], "steps": -5}}),
                         ("huge resolution", {"params": {**request["params"],
                                                         "width": 1_000_000}}),
                         ("megabyte prompt", {"params": {**request["params"],
                                                         "prompt": "x" * 900_000}})):
        records.append(BadRecord(f"{name} job.requested", json.dumps(
            {**request, "job_id": f"bad-{rng.randrange(10**9)}", **change}).encode()))
        dispatched = valid["attempt.dispatched"]
        params = change.get("params", dispatched["params"])
        records.append(BadRecord(f"{name} attempt.dispatched", json.dumps(
            {**dispatched, **change, "params": params,
             "slot": -1 if "slots" in change else dispatched["slot"]}).encode()))
    return records


def consuming_groups(settings: Settings) -> dict[str, list[str]]:
    """Map each consumed topic to the consumer groups that read it, as dead letters name them.

    Every GPU worker and every coordinator reads the control and status topics from all
    partitions without a group, so their dead letters name the reading process instead.
    """
    topics = settings.topics
    coordinator = f"{topics.prefix}{settings.coordinator.app_id}"
    groups = {
        topics.jobs_requested: [coordinator],
        topics.coordinator_events: [coordinator],
        topics.generated: [settings.postprocess.group_id],
        topics.jobs_completed: [settings.consumers.critical_group_id,
                                settings.consumers.best_effort_group_id,
                                settings.consumers.webhook_group_id],
        topics.spans: [settings.clickhouse.sink_group_id],
        topics.control: [],
        topics.worker_status: [],
    }
    for topic in topics.attempt_topics:
        groups[topic] = [settings.worker.group_id]
    return groups


async def run_bad_input_batch(bootstrap_servers: str, run_dir: Path) -> dict[str, Any]:
    """Send every bad record to every consumed topic of a live pipeline, then one valid job.

    Every consumer runs as its own process: the coordinator, a GPU worker, post-processing,
    the delivery and webhook critical consumers, thumbnails and the span sink. Returns how
    many records were tried, which processes crashed, whether the valid job completed and
    was delivered, and which bad records got neither a dead letter nor a rejection.
    """
    from aiohttp import web

    from infra.kafka_broker import free_port
    from schemas.events import DeadLetter
    from streams.kafka import make_producer

    received: list[str] = []

    async def webhook(request: web.Request) -> web.Response:
        received.append(request.headers.get("Idempotency-Key", ""))
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/hook", webhook)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()

    config = ChaosConfig(jobs=1, workers=1, tracing=True)
    settings = chaos_settings(bootstrap_servers, run_dir, config, "bad-input")
    settings = settings.model_copy(update={"consumers": settings.consumers.model_copy(update={
        "critical": ["delivery", "webhook"], "webhook_url": f"http://127.0.0.1:{port}/hook"})})
    pipeline = ChaosPipeline(settings, config, run_dir / "logs",
                             ("thumbnails", "webhook", "span-sink"))
    groups = consuming_groups(settings)
    records = bad_records()
    sent: list[tuple[str, int, str]] = []
    try:
        await pipeline.start()
        producer = make_producer(settings.kafka)
        await producer.start()
        try:
            for topic in groups:
                for record in records:
                    metadata = await producer.send_and_wait(
                        topic, record.value, key=b"bad-input", headers=list(record.headers))
                    sent.append((topic, metadata.offset, record.kind))
        finally:
            await producer.stop()

        valid = job_requests(config, "after-bad-input", count=1)[0]
        async with SlotforgeClient(settings.kafka) as client:
            completed = await client.run(valid, timeout_s=180.0)
        await wait_delivered(settings, {valid.job_id}, timeout_s=60.0)
        delivered = [decode_event(value, JobDelivered)
                     for value in await read_topic(settings, settings.topics.jobs_delivered)]
        # Dead letters of the last records may still be on their way.
        await asyncio.sleep(5.0)
        crashed = [child.name for child in pipeline.processes.processes if not child.alive()]
    finally:
        await asyncio.to_thread(pipeline.stop)
        await runner.cleanup()

    letters = [decode_event(value, DeadLetter)
               for value in await read_topic(settings, settings.topics.deadletter)]
    answered = {(letter.source_topic, letter.offset, letter.consumer_group)
                for letter in letters}
    answered_by_anyone = {(letter.source_topic, letter.offset) for letter in letters}
    rejected = {decode_event(value, JobRejected).job_id
                for value in await read_topic(settings, settings.topics.jobs_rejected)}
    unanswered = []
    for topic, offset, kind in sent:
        expected = groups[topic]
        missing = [group for group in expected if (topic, offset, group) not in answered]
        if topic == settings.topics.jobs_requested and missing:
            job_id = _job_id_of(records, kind)
            if job_id is not None and job_id in rejected:
                missing = []
        if not expected and (topic, offset) not in answered_by_anyone:
            missing = ["any reader"]
        if missing:
            unanswered.append(f"{kind} on {topic}@{offset}: no answer from {missing}")
    logger.info("Bad input: %d records tried, %d dead letters, %d rejections, crashed: %s, "
                "unanswered: %d", len(sent), len(letters), len(rejected), crashed or "none",
                len(unanswered))
    return {
        "tried": len(sent),
        "kinds": sorted({record.kind for record in records}),
        "topics": sorted(groups),
        "crashed_consumers": len(crashed),
        "crashed": crashed,
        "dead_letters": len(letters),
        "rejections": len(rejected),
        "next_valid_completed": completed.job_id == valid.job_id,
        "next_valid_delivered": any(item.job_id == valid.job_id and item.status == "delivered"
                                    for item in delivered),
        "webhook_calls": len(received),
        "unanswered": unanswered,
    }


def _job_id_of(records: Sequence[BadRecord], kind: str) -> str | None:
    for record in records:
        if record.kind == kind:
            try:
                job_id = json.loads(record.value).get("job_id")
            except (ValueError, AttributeError, RecursionError):
                return None
            return job_id if isinstance(job_id, str) else None
    return None


# ---- overload -------------------------------------------------------------------------------

def rss_mb(pid: int) -> float | None:
    """Resident memory of a process in MB from /proc, or None once it has exited."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def sample_rss(pipeline: ChaosPipeline, samples: dict[str, list[tuple[float, float]]],
                     stop: asyncio.Event, interval_s: float = 2.0) -> None:
    """Record each running process's resident memory every ``interval_s`` until ``stop``."""
    origin = time.monotonic()
    while not stop.is_set():
        for child in pipeline.processes.processes:
            value = rss_mb(child.pid) if child.alive() else None
            if value is not None:
                samples.setdefault(child.name, []).append((time.monotonic() - origin, value))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)


def overload_config() -> ChaosConfig:
    """Return a small pool's settings, so ten times its capacity stays within what one
    coordinator handles on a small machine."""
    return ChaosConfig(jobs=0, slots_per_job=1, steps=4, workers=1, slots_per_worker=2,
                       p50_s=1.0, sigma=0.3, acceptance=0.5, admission_enabled=True,
                       deadline_s=20.0)


async def run_overload(bootstrap_servers: str, run_dir: Path, burst_s: float = 120.0,
                       load_factor: float = 10.0) -> dict[str, Any]:
    """Offer ``load_factor`` times the pool's capacity for ``burst_s``, then let it drain.

    Returns the offered, admitted and rejected jobs, overall and per quarter of the burst,
    and the admitted jobs that never ended. It also returns each process's peak resident
    memory in the first and second half of the burst, and whether a job sent after the
    drain was admitted and completed.
    """
    config = overload_config()
    pool = config.pool()
    capacity = pool.pool_slots * config.acceptance / (config.slots_per_job
                                                      * pool.mean_service_s)
    rate = capacity * load_factor
    settings = chaos_settings(bootstrap_servers, run_dir, config, "overload")
    pipeline = ChaosPipeline(settings, config, run_dir / "logs")
    samples: dict[str, list[tuple[float, float]]] = {}
    requests = job_requests(replace(config, jobs=int(rate * burst_s) + 1), "overload")
    outcome = RunOutcome(requests)
    submitted_at: dict[str, float] = {}
    stop_sampling = asyncio.Event()
    try:
        await pipeline.start()
        sampler = asyncio.create_task(sample_rss(pipeline, samples, stop_sampling))
        async with SlotforgeClient(settings.kafka) as client:
            waiters = []
            origin = time.monotonic()
            for index, request in enumerate(requests):
                await asyncio.sleep(max(0.0, origin + index / rate - time.monotonic()))
                await client.submit(request)
                submitted_at[request.job_id] = time.monotonic() - origin
                waiters.append(asyncio.create_task(_wait_outcome(client, outcome, request,
                                                                 config.wait_timeout_s)))
            burst_end = time.monotonic() - origin
            await asyncio.gather(*waiters)
            drained_s = time.monotonic() - origin - burst_end
            stop_sampling.set()
            await sampler
            probe = job_requests(config, "after-overload", count=1)[0]
            try:
                probe_completed = (await client.run(probe, 120.0)).job_id == probe.job_id
            except (JobRejectedError, TimeoutError):
                probe_completed = False
        crashed = [child.name for child in pipeline.processes.processes if not child.alive()]
    finally:
        stop_sampling.set()
        await asyncio.to_thread(pipeline.stop)

    logger.info("Overload: %d offered at %.2f jobs/s, %d rejected, %d never ended",
                len(requests), rate, len(outcome.rejected), len(outcome.timed_out))
    quarters = [0, 0, 0, 0]
    for job_id in outcome.completed:
        quarters[min(3, int(submitted_at[job_id] / burst_end * 4))] += 1
    half = burst_end / 2
    first_half = {name: max((mb for at, mb in points if at <= half), default=0.0)
                  for name, points in samples.items()}
    second_half = {name: max((mb for at, mb in points if at > half), default=0.0)
                   for name, points in samples.items()}
    return {
        "burst_s": round(burst_end, 1),
        "load_factor": load_factor,
        "capacity_jobs_per_s": round(capacity, 3),
        "offered_jobs": len(requests),
        "admitted": len(requests) - len(outcome.rejected),
        "admitted_per_quarter": quarters,
        "rejected": len(outcome.rejected),
        "rejected_without_retry_time": sum(1 for rejection in outcome.rejected.values()
                                           if rejection.retry_after_s is None),
        "lost": len(outcome.timed_out),
        "drained_s": round(drained_s, 1),
        "probe_completed": probe_completed,
        "crashed": crashed,
        "rss_first_half_mb": {name: round(mb, 1) for name, mb in first_half.items()},
        "peak_rss_mb": {name: round(mb, 1) for name, mb in second_half.items()},
    }


async def _wait_outcome(client: SlotforgeClient, outcome: RunOutcome, request: JobRequested,
                        timeout_s: float) -> None:
    try:
        outcome.completed[request.job_id] = await client.wait(request.job_id, timeout_s)
    except JobRejectedError as err:
        outcome.rejected[request.job_id] = err.rejection
    except TimeoutError:
        outcome.timed_out.add(request.job_id)


# ---- ClickHouse held by another process ----------------------------------------------------

# Opens the chDB store, prints "ready", and keeps it open until its stdin closes. chDB lets
# one process at a time open a data folder, so the span sink cannot write meanwhile.
_HOLDER_SCRIPT = """
import sys
import clickhouse_connect
client = clickhouse_connect.get_client(dsn=sys.argv[1])
client.command("SELECT 1")
print("ready", flush=True)
sys.stdin.read()
client.close()
"""


@contextlib.contextmanager
def clickhouse_unavailable(dsn: str) -> Iterator[int]:
    """Hold the span store in a child process, as an outage would; yields its pid."""
    process = subprocess.Popen([sys.executable, "-c", _HOLDER_SCRIPT, dsn],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"the ClickHouse holder failed to start: {line!r}")
        yield process.pid
    finally:
        assert process.stdin is not None
        process.stdin.close()
        process.wait(timeout=30)


# ---- the bench ----------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", type=int, default=200, help="jobs in flight per fault")
    parser.add_argument("--work-dir", type=Path, default=LOCAL_DIR / "bench-reliability",
                        help="folder for the broker, logs and artifacts of the runs")
    parser.add_argument("--overload-s", type=float, default=120.0,
                        help="seconds the 10x overload burst lasts")


async def run_suite(work_dir: Path, jobs: int, overload_s: float) -> dict[str, Any]:
    """Run every fault, the bad-input batch and the overload burst; return the results JSON."""
    import os

    shutil.rmtree(work_dir, ignore_errors=True)
    load_before = os.getloadavg()[0]
    broker = KafkaBroker(work_dir / "kafka")
    await asyncio.to_thread(broker.start)
    results: list[FaultResult] = []
    try:
        for fault in suite_faults(jobs):
            run_dir = work_dir / fault.name
            if not fault.own_broker:
                results.append(await run_fault(fault, broker.bootstrap_servers, run_dir))
                continue
            own = KafkaBroker(run_dir / "kafka")
            await asyncio.to_thread(own.start)
            try:
                results.append(await run_fault(fault, own.bootstrap_servers, run_dir,
                                               broker=own))
            finally:
                await asyncio.to_thread(own.stop)
        bad_inputs = await run_bad_input_batch(broker.bootstrap_servers, work_dir / "bad-input")
        overload = await run_overload(broker.bootstrap_servers, work_dir / "overload",
                                      burst_s=overload_s)
    finally:
        await asyncio.to_thread(broker.stop)
    # Another process kept more than one core busy: timings are not comparable.
    shared = max(load_before, os.getloadavg()[0]) > 1.5
    return suite_summary(results, bad_inputs, overload, shared)


def run(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    results = run_until_sigterm(run_suite(args.work_dir, args.jobs, args.overload_s))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_page(results)
    return results


def render_markdown(results: dict[str, Any]) -> str:
    lines = [
        "## Reliability",
        "",
        f"Faults injected into the real pipeline on Kafka {results.get('kafka', '?')}, with "
        "the simulated GPU; machine: "
        f"{results.get('machine', {}).get('cpus', '?')} CPUs"
        f"{', shared with other jobs' if results.get('shared_machine') else ''}. "
        "Every fault ran with the jobs submitted at once, so all were in flight when it hit.",
        "",
        "| fault | what happened | jobs | admitted | lost | double-filled slots | "
        "duplicate deliveries | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for fault in results.get("faults", []):
        lines.append(
            f"| {fault['fault']} | {FAULT_DESCRIPTIONS.get(fault['fault'], '')} | "
            f"{fault['jobs']} | {fault['admitted']} | {fault['lost']} | "
            f"{fault['double_filled']} | {fault['duplicate_deliveries']} | "
            f"{fault['seconds']} |")
    bad = results.get("bad_inputs", {})
    lines += [
        "",
        f"Bad input: {bad.get('tried', 0)} malformed records sent to "
        f"{len(bad.get('topics', []))} topics read by every consumer; "
        f"{bad.get('crashed_consumers', 0)} consumers crashed, "
        f"{bad.get('dead_letters', 0)} dead-letter records and "
        f"{bad.get('rejections', 0)} rejection events were written, and the valid job "
        f"sent after them {'completed' if bad.get('next_valid_completed') else 'failed'}.",
    ]
    overload = results.get("overload")
    if overload:
        lines += [
            "",
            f"Overload: {overload['offered_jobs']} jobs offered in {overload['burst_s']:.0f} s "
            f"({overload['load_factor']:.0f}x the pool's capacity of "
            f"{overload['capacity_jobs_per_s']:.2f} jobs/s); {overload['admitted']} admitted, "
            f"{overload['rejected']} rejected with a retry time, {overload['lost']} lost; "
            f"the backlog drained {overload['drained_s']:.0f} s after the burst. "
            "Peak resident memory per process in the first and second half of the burst "
            "(MB): "
            + ", ".join(f"{name} {overload['rss_first_half_mb'].get(name, 0):.0f} to {mb:.0f}"
                        for name, mb in sorted(overload['peak_rss_mb'].items()))
            + ".",
        ]
    lines += ["", "Reproduce:", "", "```", REPRODUCE, "```", ""]
    return "\n".join(lines)


def write_page(results: dict[str, Any], page: Path = PAGE) -> Path:
    """Write the reliability page from the results JSON."""
    header = ("# Reliability\n\nGenerated from `bench/results/reliability.json` by "
              "`python -m bench.render`; do not edit by hand.\n\n")
    page.write_text(header + render_markdown(results).split("\n", 1)[1].lstrip("\n"))
    return page


def suite_summary(faults: Sequence[FaultResult], bad_inputs: dict[str, Any],
                  overload: dict[str, Any] | None, shared: bool) -> dict[str, Any]:
    return {
        "kafka": kafka_broker_version(),
        "machine": machine_description(),
        "shared_machine": shared,
        "faults": [asdict(fault) for fault in faults],
        "bad_inputs": bad_inputs,
        "overload": overload,
    }
