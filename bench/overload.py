"""Overload: admission control and tier policy against admit-everything FIFO at 3x peak demand.

One local broker serves both runs. Each run starts fresh pipeline processes (coordinator,
post-processing, GPU workers with the simulated lognormal GPU) on its own topic prefix.
Both replay the same jobs: the densest window of the Alibaba trace, time-scaled so the
busiest quarter of the window requests three times the pool's GPU time, with tiers mixed
20/50/30 (interactive/standard/batch). ``none`` admits every job and lets workers take attempts in
fetch order; ``admission`` runs the coordinator's admission control and the workers'
strict-priority tier policy with aging. The RSS of every process is sampled each second.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from aiokafka import ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.pipeline_run import (
    AttemptLog,
    JobOutcome,
    PipelineRun,
    PoolSpec,
    fresh_prefix,
    kafka_broker_version,
    machine_description,
    percentile,
    run_settings,
    run_until_sigterm,
)
from bench.suite_support import BenchArgumentError
from infra.kafka_broker import KafkaBroker
from schemas.events import (
    MAX_PROMPT_CHARS,
    AttemptClaim,
    AttemptDispatched,
    JobRequested,
    JobStatus,
    Tier,
    decode_event,
)
from streams.config import LOCAL_DIR, KafkaSettings, Settings, SimulationSettings
from streams.kafka import make_consumer, topic_partitions
from streams.trace_replay import (
    DEFAULT_TRACE,
    TraceRequest,
    densest_window,
    load_trace,
    to_job_request,
)
from streams.trace_replay import compress as compress_trace

POLICIES = ("none", "admission")
TIER_MIX = {Tier.INTERACTIVE: 0.2, Tier.STANDARD: 0.5, Tier.BATCH: 0.3}
TENANT_ID = "bench"
# Share of the replay window over which peak demand is measured: a quarter, so the peak
# is a sustained stretch rather than a single burst.
PEAK_WINDOW_FRACTION = 0.25
# Memory counts as growing when the last quarter of the run averages this much more than
# the first quarter: both a relative and an absolute margin, since RSS moves by a few MB.
RSS_GROWTH_FRACTION = 0.10
RSS_GROWTH_MB = 20.0

TARGETS = {
    "gpu_busy_fraction_while_backlogged": 0.95,
    "interactive_deadline_met_fraction": 0.99,
}
REPRODUCE = (
    ".venv/bin/slotforge bench overload --out bench/results/overload.json "
    "--trace ../shared/data/alibaba_genai2026_lora_request_trace.csv\n"
    ".venv/bin/python -m bench.render"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", type=int, default=150,
                        help="trace requests to replay, from the densest window")
    parser.add_argument("--peak-demand", type=float, default=3.0,
                        help="GPU time requested in the busiest quarter of the window, as a "
                             "multiple of the pool's")
    parser.add_argument("--workers", type=int, default=2, help="GPU worker processes")
    parser.add_argument("--worker-slots", type=int, default=4,
                        help="concurrent attempts per GPU worker process")
    parser.add_argument("--p50-s", type=float, default=1.0,
                        help="median simulated service time of one attempt, in seconds")
    parser.add_argument("--sigma", type=float, default=0.99,
                        help="lognormal sigma of the service time; 0.99 gives p99 = 10 x p50")
    parser.add_argument("--acceptance", type=float, default=0.8,
                        help="probability that post-processing accepts one simulated image")
    parser.add_argument("--max-slots", type=int, default=4,
                        help="cap on the trace's images per request (the job's K)")
    parser.add_argument("--deadlines", type=str, default="interactive=20,standard=30,batch=60",
                        help="deadline of each tier, in seconds")
    parser.add_argument("--steps", type=int, default=10,
                        help="denoising steps of every job; the simulated time does not "
                             "depend on them, only the heartbeats do")
    parser.add_argument("--seed", type=int, default=11, help="seed of the tier assignment")
    parser.add_argument("--work-dir", type=Path, default=LOCAL_DIR / "bench" / "overload",
                        help="folder for the broker's data and each run's process logs")
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE,
                        help="Alibaba lora_request_trace.csv to take arrivals from")
    parser.add_argument("--bootstrap-servers", type=str, default=None,
                        help="use this running broker instead of starting one")


@dataclass(frozen=True)
class OverloadConfig:
    jobs: int
    peak_demand: float
    workers: int
    worker_slots: int
    p50_s: float
    sigma: float
    acceptance: float
    max_slots: int
    deadlines_s: dict[Tier, float]
    steps: int
    seed: int
    work_dir: Path
    trace: Path
    bootstrap_servers: str | None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> OverloadConfig:
        deadlines: dict[Tier, float] = {}
        for item in str(args.deadlines).split(","):
            name, _, value = item.partition("=")
            try:
                deadlines[Tier(name.strip())] = float(value)
            except ValueError as err:
                raise BenchArgumentError(f"--deadlines must look like interactive=30,standard=90,"
                                         f"batch=300; got {args.deadlines!r}") from err
        if set(deadlines) != set(Tier):
            raise BenchArgumentError(f"--deadlines must name every tier, got {args.deadlines!r}")
        if args.jobs < 10:
            raise BenchArgumentError(f"--jobs must be at least 10, got {args.jobs}")
        if not 0 < args.acceptance <= 1:
            raise BenchArgumentError(f"--acceptance must be in (0, 1], got {args.acceptance}")
        if args.peak_demand <= 0:
            raise BenchArgumentError(f"--peak-demand must be positive, got {args.peak_demand}")
        return cls(jobs=args.jobs, peak_demand=args.peak_demand, workers=args.workers,
                   worker_slots=args.worker_slots, p50_s=args.p50_s, sigma=args.sigma,
                   acceptance=args.acceptance, max_slots=args.max_slots,
                   deadlines_s=deadlines, steps=args.steps, seed=args.seed,
                   work_dir=args.work_dir, trace=args.trace,
                   bootstrap_servers=args.bootstrap_servers)

    def pool(self, policy: str) -> PoolSpec:
        simulation = SimulationSettings(enabled=True, p50_s=self.p50_s, sigma=self.sigma,
                                        acceptance=self.acceptance)
        # Heartbeats every 5 steps keep the coordinator's load from heartbeats moderate.
        return PoolSpec(workers=self.workers, slots_per_worker=self.worker_slots,
                        simulation=simulation, admission_enabled=policy == "admission",
                        progress_every_steps=5)

    def attempt_s(self, slots: int) -> float:
        """Expected GPU seconds of a job of ``slots`` slots: slots over acceptance attempts."""
        return slots / self.acceptance * self.pool("none").mean_service_s


# ---- schedule ---------------------------------------------------------------------------------

def peak_demand_window_s(rows: Sequence[TraceRequest], config: OverloadConfig) -> float:
    """Return the replay window whose busiest stretch requests ``peak_demand`` x the pool.

    The stretch is ``PEAK_WINDOW_FRACTION`` of the window. Demand in a stretch is the
    expected GPU seconds of the jobs arriving in it over the stretch's length, compared with
    the pool's slots.
    """
    span = rows[-1].arrival_s
    width = span * PEAK_WINDOW_FRACTION
    arrivals = [row.arrival_s for row in rows]
    work = [config.attempt_s(min(row.slots, config.max_slots)) for row in rows]
    peak_work = 0.0
    for index, start in enumerate(arrivals):
        inside = sum(work[other] for other in range(index, len(rows))
                     if arrivals[other] < start + width)
        peak_work = max(peak_work, inside)
    slots = config.workers * config.worker_slots
    # peak_work / (width * scale) = peak_demand * slots, so the window is span * scale.
    return peak_work / (config.peak_demand * slots * PEAK_WINDOW_FRACTION)


def build_schedule(rows: Sequence[TraceRequest], config: OverloadConfig
                   ) -> list[tuple[float, JobRequested]]:
    """Map trace rows to jobs with tiers mixed 20/50/30 in a seeded random order."""
    counts = {tier: round(share * len(rows)) for tier, share in TIER_MIX.items()}
    counts[Tier.STANDARD] += len(rows) - sum(counts.values())
    tiers = [tier for tier, count in counts.items() for _ in range(count)]
    random.Random(config.seed).shuffle(tiers)

    schedule = []
    for index, (row, tier) in enumerate(zip(rows, tiers, strict=True)):
        request = to_job_request(row, tenant_id=TENANT_ID, tier=tier,
                                 deadline_s=config.deadlines_s[tier])
        # A prompt per job keeps the cache and shared flights out of the comparison.
        params = request.params.model_copy(update={
            "prompt": f"job {index}: {request.params.prompt}"[:MAX_PROMPT_CHARS],
            "steps": config.steps})
        schedule.append((row.arrival_s, request.model_copy(update={
            "params": params, "slots": min(request.slots, config.max_slots),
            # Standard jobs accept running as batch rather than being turned away.
            "allow_downgrade": tier is Tier.STANDARD,
            "seed": index,
        })))
    return schedule


# ---- memory sampling ------------------------------------------------------------------------

class RssSampler:
    """Sample the RSS of each pipeline process, and this one, once a second on a thread."""

    def __init__(self, pipeline: PipelineRun, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.processes = [(child.service, psutil.Process(child.pid))
                          for child in pipeline.processes.processes]
        self.processes.append(("bench-client", psutil.Process(os.getpid())))
        self.samples: dict[str, list[tuple[float, float]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set():
            by_kind: dict[str, float] = {}
            for kind, process in self.processes:
                with contextlib.suppress(psutil.Error):
                    rss_mb = process.memory_info().rss / 2**20
                    by_kind[kind] = max(by_kind.get(kind, 0.0), rss_mb)
            for kind, rss_mb in by_kind.items():
                self.samples.setdefault(kind, []).append((time.monotonic() - started, rss_mb))
            self._stop.wait(self.interval_s)

    def summary(self) -> dict[str, dict[str, Any]]:
        """Max RSS per process kind, and whether the last quarter grew past the first."""
        result = {}
        for kind, samples in self.samples.items():
            values = [rss for _, rss in samples]
            quarter = max(1, len(values) // 4)
            first = sum(values[:quarter]) / quarter
            last = sum(values[-quarter:]) / quarter
            result[kind] = {
                "max_rss_mb": round(max(values), 1),
                "first_quarter_mean_mb": round(first, 1),
                "last_quarter_mean_mb": round(last, 1),
                "grows": last > first * (1 + RSS_GROWTH_FRACTION) + RSS_GROWTH_MB,
                "samples": len(values),
            }
        return result


# ---- runs -------------------------------------------------------------------------------------

def run(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run both policies on the same schedule and write the results JSON."""
    config = OverloadConfig.from_args(args)
    started = time.monotonic()
    rows = densest_window(load_trace(config.trace), config.jobs)
    window_s = peak_demand_window_s(rows, config)
    rows = compress_trace(rows, window_s)
    schedule = build_schedule(rows, config)
    slots = config.workers * config.worker_slots
    total_work_s = sum(config.attempt_s(request.slots) for _, request in schedule)

    results: dict[str, Any] = {}
    with _broker(config) as bootstrap_servers:
        for policy in POLICIES:
            _progress(f"{policy}: {len(schedule)} jobs over {window_s:.1f} s")
            results[policy] = _run_policy(bootstrap_servers, config, policy, schedule)
            _progress(f"  {policy}: busy while backlogged "
                      f"{results[policy]['gpu_busy_fraction_while_backlogged']:.3f}, "
                      f"interactive deadline met "
                      f"{results[policy]['tiers']['interactive']['deadline_met_fraction']}")

    report = {
        "results": results,
        "targets": targets(results),
        "setup": {
            "machine": machine_description(),
            "kafka": kafka_broker_version(),
            "trace": {"file": config.trace.name, "rows": len(rows),
                      "window": "densest", "replay_window_s": window_s},
            "parameters": {
                "jobs": config.jobs, "peak_demand": config.peak_demand,
                "peak_window_fraction": PEAK_WINDOW_FRACTION,
                "average_demand": total_work_s / window_s / slots,
                "workers": config.workers, "slots_per_worker": config.worker_slots,
                "pool_slots": slots, "p50_service_s": config.p50_s, "sigma": config.sigma,
                "mean_service_s": config.pool("none").mean_service_s,
                "acceptance": config.acceptance, "max_slots": config.max_slots,
                "deadlines_s": {tier.value: value for tier, value in config.deadlines_s.items()},
                "tier_mix": {tier.value: share for tier, share in TIER_MIX.items()},
                "steps": config.steps, "seed": config.seed,
            },
            "load_average_1m_end": os.getloadavg()[0],
            "shared_machine": True,
            "wall_s": time.monotonic() - started,
            "reproduce": REPRODUCE,
            "argv": ["slotforge", *sys.argv[1:]],
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report


@contextlib.contextmanager
def _broker(config: OverloadConfig) -> Iterator[str]:
    if config.bootstrap_servers:
        yield config.bootstrap_servers
        return
    broker = KafkaBroker(config.work_dir / "kafka")
    broker.start()
    try:
        yield broker.bootstrap_servers
    finally:
        broker.stop()


def _progress(message: str) -> None:
    # Progress goes to stderr because stdout is the rendered page.
    print(message, file=sys.stderr, flush=True)  # noqa: T201


def policy_settings(bootstrap_servers: str, config: OverloadConfig, policy: str,
                    run_dir: Path) -> Settings:
    settings = run_settings(bootstrap_servers, fresh_prefix(f"overload-{policy}"),
                            config.pool(policy), run_dir)
    tier_policy = "strict" if policy == "admission" else "fifo"
    return settings.model_copy(update={
        "worker": settings.worker.model_copy(update={"tier_policy": tier_policy})})


def _run_policy(bootstrap_servers: str, config: OverloadConfig, policy: str,
                schedule: Sequence[tuple[float, JobRequested]]) -> dict[str, Any]:
    run_dir = config.work_dir / "runs" / policy
    settings = policy_settings(bootstrap_servers, config, policy, run_dir)
    started = time.monotonic()
    run_until_sigterm(create_changelog(settings))
    with PipelineRun(settings, config.workers, run_dir / "logs") as pipeline:
        ready_s = _wait_ready(pipeline)
        with RssSampler(pipeline) as sampler:
            replay_timeout_s = max(config.deadlines_s.values()) + 60.0
            outcomes = run_until_sigterm(pipeline.replay(schedule, replay_timeout_s))
            job_ids = {request.job_id for _, request in schedule}
            log = run_until_sigterm(pipeline.attempt_log(job_ids))
        dispatched = run_until_sigterm(read_dispatches(settings.kafka, job_ids))
        claims = run_until_sigterm(read_claims(settings.kafka, job_ids))
        pipeline.check_alive()
    metrics = policy_metrics(schedule, outcomes, log, dispatched,
                             config.workers * config.worker_slots)
    metrics.update(claim_metrics(log, claims))
    metrics["max_rss_mb"] = {kind: item["max_rss_mb"] for kind, item in
                             sampler.summary().items()}
    metrics["rss"] = sampler.summary()
    metrics["memory_flat"] = not any(item["grows"] for item in metrics["rss"].values())
    metrics.update(ready_s=ready_s, run_wall_s=time.monotonic() - started,
                   logs=str(run_dir / "logs"), load_average_1m=os.getloadavg()[0])
    return metrics


async def create_changelog(settings: Settings) -> None:
    """Create the coordinator's table changelog topic before the coordinator starts.

    faust creates it itself, but on a loaded broker its consumer's metadata may miss the new
    topic until the next refresh (minutes), and every job request in between fails with
    PartitionsMismatch. Created first, the topic is in the first metadata.
    """
    prefix = settings.kafka.topic_prefix
    name = f"{prefix}{settings.coordinator.app_id}-flights-changelog"
    admin = AIOKafkaAdminClient(**settings.kafka.client_options())
    await admin.start()
    try:
        if name in set(await admin.list_topics()):
            return
        await admin.create_topics([NewTopic(
            name, num_partitions=settings.kafka.partitions,
            replication_factor=settings.kafka.replication_factor,
            topic_configs={"cleanup.policy": "compact"})])
    finally:
        await admin.close()


def _wait_ready(pipeline: PipelineRun, tries: int = 3) -> float:
    """Wait for the warm-up job, sending a new one when the last timed out.

    On a loaded broker faust may check the flights changelog before its metadata arrives
    and dead-letter the first request with PartitionsMismatch; a later request succeeds.
    """
    waited_s = 0.0
    for attempt in range(1, tries + 1):
        try:
            return waited_s + run_until_sigterm(pipeline.wait_ready(timeout_s=60.0))
        except TimeoutError:
            waited_s += 60.0
            if attempt == tries:
                raise
            _progress(f"  warm-up job timed out (try {attempt} of {tries}); sending another")
    return waited_s


async def _read_topics(kafka: KafkaSettings, names: Sequence[str]
                       ) -> list[ConsumerRecord[bytes, bytes]]:
    """Read topics from their start to their current end, without a consumer group."""
    consumer = make_consumer(kafka, group_id=None, max_poll_records=5_000)
    await consumer.start()
    found: list[ConsumerRecord[bytes, bytes]] = []
    try:
        partitions = await topic_partitions(kafka, *names)
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        remaining = {partition for partition in partitions if ends[partition] > 0}
        while remaining:
            for partition, records in (await consumer.getmany(timeout_ms=500)).items():
                found += records
                if await consumer.position(partition) >= ends[partition]:
                    remaining.discard(partition)
    finally:
        await consumer.stop()
    return found


async def read_dispatches(kafka: KafkaSettings, job_ids: set[str]
                          ) -> dict[tuple[str, int], AttemptDispatched]:
    """Read every attempts topic: the first dispatch of each attempt and epoch."""
    names = list(kafka.topics.attempt_topics)
    found: dict[tuple[str, int], AttemptDispatched] = {}
    for record in await _read_topics(kafka, names):
        event = decode_event(record.value, AttemptDispatched)
        if event.job_id in job_ids:
            found.setdefault((event.attempt_id, event.epoch), event)
    return found


async def read_claims(kafka: KafkaSettings, job_ids: set[str]
                      ) -> dict[tuple[str, int, str], float]:
    """Read the first claim of each attempt, epoch and worker, as its record timestamp (s)."""
    found: dict[tuple[str, int, str], float] = {}
    for record in await _read_topics(kafka, [kafka.topics.coordinator_events]):
        if b'"attempt.claim"' not in (record.value or b""):
            continue
        claim = decode_event(record.value, AttemptClaim)
        if claim.job_id in job_ids:
            found.setdefault((claim.attempt_id, claim.epoch, claim.worker_id),
                             record.timestamp / 1000)
    return found


def claim_metrics(log: AttemptLog, claims: dict[tuple[str, int, str], float]
                  ) -> dict[str, float | None]:
    """Time from a worker's claim to the attempt's start.

    It covers the coordinator's grant and, for an attempt claimed ahead, the wait for a
    free slot.
    """
    waits = [started.started_at.timestamp() - claims[key] for started in log.started
             if (key := (started.attempt_id, started.epoch, started.worker_id)) in claims]
    return {"claim_to_start_p50_s": percentile(waits, 50),
            "claim_to_start_p99_s": percentile(waits, 99)}


# ---- metrics ----------------------------------------------------------------------------------

def busy_while_backlogged(log: AttemptLog, dispatched: dict[tuple[str, int], AttemptDispatched],
                          slots: int) -> dict[str, float]:
    """Integrate busy slots over the time some started attempt was still waiting.

    An attempt waits from its dispatch to its start. A slot is busy from a start to the
    matching finish, so claim round trips and skipped attempts count as idle.
    """
    finish_at = {(event.attempt_id, event.epoch, event.worker_id): event.emitted_at.timestamp()
                 for event in log.finished}
    last = max(finish_at.values(), default=0.0)
    changes: list[tuple[float, int, int]] = []
    for started in log.started:
        dispatch = dispatched.get((started.attempt_id, started.epoch))
        start_s = started.started_at.timestamp()
        end_s = finish_at.get((started.attempt_id, started.epoch, started.worker_id), last)
        if dispatch is not None and dispatch.dispatched_at.timestamp() < start_s:
            changes += [(dispatch.dispatched_at.timestamp(), 1, 0), (start_s, -1, 0)]
        changes += [(start_s, 0, 1), (max(start_s, end_s), 0, -1)]
    changes.sort()

    waiting = busy = 0
    max_waiting = 0
    backlogged_s = busy_slot_s = 0.0
    previous = changes[0][0] if changes else 0.0
    for at, waiting_change, busy_change in changes:
        span = at - previous
        if waiting > 0 and span > 0:
            backlogged_s += span
            busy_slot_s += min(busy, slots) * span
        waiting += waiting_change
        busy += busy_change
        max_waiting = max(max_waiting, waiting)
        previous = at
    return {
        "gpu_busy_fraction_while_backlogged": (busy_slot_s / (slots * backlogged_s)
                                               if backlogged_s else 1.0),
        "backlogged_s": backlogged_s,
        "max_waiting_attempts": float(max_waiting),
    }


def tier_metrics(schedule: Sequence[tuple[float, JobRequested]], outcomes: Sequence[JobOutcome],
                 log: AttemptLog, dispatched: dict[tuple[str, int], AttemptDispatched]
                 ) -> dict[str, dict[str, Any]]:
    """Admission, waits and deadlines per requested tier."""
    requests = {request.job_id: request for _, request in schedule}
    waits: dict[Tier, list[float]] = {tier: [] for tier in Tier}
    for started in log.started:
        dispatch = dispatched.get((started.attempt_id, started.epoch))
        if dispatch is not None:
            waits[dispatch.tier].append(
                (started.started_at - dispatch.dispatched_at).total_seconds())

    tiers: dict[str, dict[str, Any]] = {}
    for tier in Tier:
        mine = [outcome for outcome in outcomes if requests[outcome.job_id].tier is tier]
        admitted = [outcome for outcome in mine if outcome.status != "rejected"]
        met = [outcome for outcome in admitted if outcome.completed is not None
               and outcome.completed.status is JobStatus.COMPLETED
               and (outcome.completed.completed_at - outcome.completed.requested_at
                    ).total_seconds() <= requests[outcome.job_id].deadline_s]
        tiers[tier.value] = {
            "jobs": len(mine),
            "admitted": len(admitted),
            "rejected": len(mine) - len(admitted),
            "downgraded": sum(1 for outcome in admitted if outcome.completed is not None
                              and outcome.completed.tier is not tier),
            "completed": sum(1 for outcome in admitted if outcome.status == "completed"),
            "partial": sum(1 for outcome in admitted if outcome.status == "partial"),
            "failed": sum(1 for outcome in admitted if outcome.status == "failed"),
            "timed_out": sum(1 for outcome in admitted if outcome.status == "timed_out"),
            "p50_wait_s": percentile(waits[tier], 50),
            "p99_wait_s": percentile(waits[tier], 99),
            "deadline_met_fraction": len(met) / len(admitted) if admitted else None,
        }
    return tiers


def policy_metrics(schedule: Sequence[tuple[float, JobRequested]],
                   outcomes: Sequence[JobOutcome], log: AttemptLog,
                   dispatched: dict[tuple[str, int], AttemptDispatched],
                   slots: int) -> dict[str, Any]:
    busy = busy_while_backlogged(log, dispatched, slots)
    gpu_s = sum(event.gpu_s for event in log.finished)
    return {
        **busy,
        "tiers": tier_metrics(schedule, outcomes, log, dispatched),
        "attempts_started": len(log.started),
        "gpu_s": gpu_s,
    }


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []
    admission = results.get("admission")
    if admission is None:
        return checks
    busy = admission["gpu_busy_fraction_while_backlogged"]
    checks.append({"name": "admission: gpu_busy_fraction_while_backlogged", "limit": ">= 0.95",
                   "measured": busy, "met": busy >= TARGETS["gpu_busy_fraction_while_backlogged"]})
    met = admission["tiers"]["interactive"]["deadline_met_fraction"]
    checks.append({"name": "admission: interactive deadline_met_fraction", "limit": ">= 0.99",
                   "measured": met,
                   "met": met is not None and met >= TARGETS["interactive_deadline_met_fraction"]})
    batch = admission["tiers"]["batch"]
    checks.append({"name": "admission: batch admitted and completed", "limit": "> 0",
                   "measured": min(batch["admitted"], batch["completed"]),
                   "met": batch["admitted"] > 0 and batch["completed"] > 0})
    grows = [f"{policy}/{kind}" for policy, item in results.items()
             for kind, rss in item["rss"].items() if rss["grows"]]
    checks.append({"name": "RSS of every process flat (no kind grows)", "limit": "none grows",
                   "measured": ", ".join(grows) or "none", "met": not grows})
    return checks


# ---- page -------------------------------------------------------------------------------------

def _number(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _wrap(paragraph: str) -> str:
    return textwrap.fill(paragraph, width=92, break_on_hyphens=False, break_long_words=False)


def render_markdown(results: dict[str, Any]) -> str:
    """Render the overload section of docs/benchmarks.md."""
    setup = results["setup"]
    parameters = setup["parameters"]
    deadlines = ", ".join(f"{tier} {value:g} s" for tier, value in
                          parameters["deadlines_s"].items())
    lines = ["## Overload", ""]
    paragraphs = [
        "Admission control and tier policy at peak demand, on the real pipeline: a local Kafka "
        "broker, the coordinator, post-processing and "
        f"{parameters['workers']} GPU worker processes with {parameters['slots_per_worker']} "
        f"slots each ({parameters['pool_slots']} slots, fixed). The GPU is simulated: "
        f"lognormal service time with median {parameters['p50_service_s']:g} s and sigma "
        f"{parameters['sigma']:g} (p99 = {math.exp(2.326 * parameters['sigma']):.1f} x p50, "
        f"mean {parameters['mean_service_s']:.2f} s); post-processing accepts about "
        f"{parameters['acceptance']:.0%} of the images.",
        f"Arrivals: the densest window of {setup['trace']['rows']} consecutive requests of "
        f"{setup['trace']['file']}, with the trace's images per request (capped at "
        f"{parameters['max_slots']}), time-scaled to {setup['trace']['replay_window_s']:.1f} s "
        f"so that the jobs arriving in the busiest {parameters['peak_window_fraction']:.0%} of "
        "the window request "
        f"{parameters['peak_demand']:g} x the pool's GPU time (expected attempts = slots / "
        f"acceptance, times the mean service time); over the whole window demand is "
        f"{parameters['average_demand']:.2f} x the pool. Tiers are mixed "
        "20/50/30 (interactive/standard/batch) in a seeded random order, with deadlines "
        f"{deadlines}; standard jobs allow a downgrade to batch.",
        "Policies, in the same run on the same jobs: none admits every job and the workers "
        "take attempts of all tiers in fetch order (tier policy fifo); admission runs the "
        "coordinator's admission control (admit, downgrade, or reject with retry_after) and "
        "the workers' strict-priority tier policy with 10 s aging. Admission estimates a "
        "job's wait as the attempts queued in its tier and every more important tier over "
        "the pool's measured throughput, and admits the job when that wait plus its own "
        "service time fits in 80% of its deadline.",
        "Columns: GPU busy while backlogged integrates busy slots over the time at least one "
        "attempt that later ran was waiting (from dispatch to start), from the attempt events "
        "and the attempts topics; claim round trips and attempts skipped after their job "
        "ended count as idle. Wait is an attempt's time from dispatch to start. Deadline met "
        "is the share of admitted jobs that completed every slot within their deadline. Max "
        "RSS is the largest resident set of each process kind, sampled every second with "
        "psutil; memory counts as growing when the last quarter of a run averages more than "
        f"{RSS_GROWTH_FRACTION:.0%} + {RSS_GROWTH_MB:g} MB above the first quarter. Claim "
        "to start runs from a worker's claim record to the attempt's start: the "
        "coordinator's grant, plus the wait for a free slot of an attempt claimed ahead "
        "(workers claim one attempt beyond their slots).",
    ]
    for paragraph in paragraphs:
        lines += [_wrap(paragraph), ""]

    lines += ["| policy | GPU busy while backlogged | backlogged (s) | max waiting attempts "
              "| claim to start p50 / p99 (s) | memory flat | load avg |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for policy in POLICIES:
        item = results["results"].get(policy)
        if item is None:
            continue
        lines.append(f"| {policy} | {_number(item['gpu_busy_fraction_while_backlogged'], 3)} "
                     f"| {_number(item['backlogged_s'], 1)} "
                     f"| {_number(item['max_waiting_attempts'], 0)} "
                     f"| {_number(item.get('claim_to_start_p50_s'), 3)} / "
                     f"{_number(item.get('claim_to_start_p99_s'), 3)} "
                     f"| {'yes' if item['memory_flat'] else 'no'} "
                     f"| {_number(item.get('load_average_1m'), 1)} |")
    lines += ["", "| policy | tier | jobs | admitted | rejected | downgraded | completed "
              "| p50 wait (s) | p99 wait (s) | deadline met |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for policy in POLICIES:
        item = results["results"].get(policy)
        if item is None:
            continue
        for tier in Tier:
            row = item["tiers"][tier.value]
            lines.append(f"| {policy} | {tier.value} | {row['jobs']} | {row['admitted']} "
                         f"| {row['rejected']} | {row['downgraded']} | {row['completed']} "
                         f"| {_number(row['p50_wait_s'])} | {_number(row['p99_wait_s'])} "
                         f"| {_number(row['deadline_met_fraction'], 3)} |")
    kinds = sorted({kind for item in results["results"].values() for kind in item["rss"]})
    lines += ["", "| policy | " + " | ".join(f"{kind} max RSS (MB)" for kind in kinds) + " |",
              "| --- | " + " | ".join("---" for _ in kinds) + " |"]
    for policy in POLICIES:
        item = results["results"].get(policy)
        if item is None:
            continue
        cells = []
        for kind in kinds:
            rss = item["rss"].get(kind)
            cells.append("n/a" if rss is None else
                         f"{rss['max_rss_mb']:.0f} ({rss['first_quarter_mean_mb']:.0f} -> "
                         f"{rss['last_quarter_mean_mb']:.0f})")
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    lines += ["", "RSS cells: max (first-quarter mean -> last-quarter mean).", "",
              "Targets:", ""]
    for target in results["targets"]:
        verdict = "met" if target["met"] else "NOT met"
        lines.append(f"- {target['name']} {target['limit']}: measured "
                     f"{_number(target['measured'], 3)}, {verdict}.")
    machine = setup["machine"]
    lines += ["", _wrap(
        f"Machine: {machine['platform']}, {machine['cpus']} CPUs, Python {machine['python']}, "
        f"Kafka {setup['kafka']}. Other work shared the machine (1-minute load average "
        f"{setup['load_average_1m_end']:.1f} at the end), so compare the policies with "
        f"each other rather than with absolute times. The suite took "
        f"{setup['wall_s'] / 60:.1f} minutes."), "", "Reproduce:", "", "```",
        setup["reproduce"], "```", ""]
    return "\n".join(lines)
