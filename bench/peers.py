"""Peers: slotforge and a Celery pipeline on the same job stream, steady and under worker kills.

One Kafka broker and one redis-server serve the whole suite. Both systems get the same
jobs: arrivals from the densest window of the Alibaba trace, K slots each, the same seeds.
They share the simulated GPU (lognormal service time, acceptance probability) and the
post-processing code. Both have the same number of GPU slots: slotforge as N worker
processes with S slots each, Celery as N worker processes with S pool processes each. In the kills
scenario one GPU worker process of the system under test is killed with SIGKILL every few
seconds while jobs run, and a fresh one starts in its place.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import math
import os
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.celery_app import CelerySettings
from bench.celery_peer import CeleryRun, Execution
from bench.pipeline_run import (
    AttemptLog,
    JobOutcome,
    PipelineRun,
    PoolSpec,
    fresh_prefix,
    kafka_broker_version,
    machine_description,
    outcome_counts,
    percentile,
    run_settings,
    run_until_sigterm,
)
from bench.redis_server import RedisServer, redis_server_version
from bench.suite_support import (
    BenchArgumentError,
    format_number,
    git_state,
    local_broker,
    machine_paragraph,
    progress,
    run_commands,
    unique_job_schedule,
    wrap,
)
from schemas.events import JobRequested
from streams.config import (
    LOCAL_DIR,
    CoordinatorSettings,
    PostprocessSettings,
    SimulationSettings,
)
from streams.racing import RacingPolicy
from streams.trace_replay import (
    DEFAULT_TRACE,
    TraceRequest,
    compress,
    densest_window,
    load_trace,
)

SYSTEMS = ("slotforge", "celery")
SCENARIOS = ("steady", "kills")
TENANT_ID = "bench"
# slotforge's p99 job latency must be at most this fraction of Celery's in each scenario.
P99_RATIO_TARGET = 0.5

CAPACITY_FORMULA = (
    "capacity_jobs_per_s = pool_slots * acceptance / (K * mean_service_s), "
    "mean_service_s = p50_s * exp(sigma^2 / 2)"
)
REPRODUCE = (
    ".venv/bin/slotforge bench peers --out bench/results/peers.json\n"
    ".venv/bin/python -m bench.render"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", type=int, default=60,
                        help="jobs per run, from the densest trace window")
    parser.add_argument("--load", type=float, default=0.7,
                        help="offered load as a fraction of the pool's capacity")
    parser.add_argument("--slots-per-job", type=int, default=4, help="slots K of every job")
    parser.add_argument("--workers", type=int, default=2, help="GPU worker processes")
    parser.add_argument("--worker-slots", type=int, default=4,
                        help="concurrent attempts per GPU worker process")
    parser.add_argument("--p50-s", type=float, default=0.2,
                        help="median simulated service time of one attempt, in seconds")
    parser.add_argument("--sigma", type=float, default=0.99,
                        help="lognormal sigma of the service time; 0.99 gives p99 = 10 x p50")
    parser.add_argument("--acceptance", type=float, default=0.5,
                        help="probability that post-processing accepts one simulated image")
    parser.add_argument("--progress-every-steps", type=int, default=1,
                        help="slotforge workers send a progress heartbeat every N steps")
    parser.add_argument("--deadline-s", type=float, default=300.0,
                        help="deadline of every slotforge job, in seconds after admission")
    parser.add_argument("--wait-s", type=float, default=240.0,
                        help="seconds after its submission before a job without an outcome "
                             "counts as lost")
    parser.add_argument("--kill-interval-s", type=float, default=5.0,
                        help="seconds between SIGKILLs of a GPU worker in the kills scenario")
    parser.add_argument("--scenarios", type=str, default=",".join(SCENARIOS),
                        help="scenarios to run, comma-separated: steady, kills")
    parser.add_argument("--systems", type=str, default=",".join(SYSTEMS),
                        help="systems to run, comma-separated: slotforge, celery. The "
                             "targets compare both")
    parser.add_argument("--seed", type=int, default=7,
                        help="base seed from which each job's seed is derived")
    parser.add_argument("--work-dir", type=Path, default=LOCAL_DIR / "bench" / "peers",
                        help="folder for the broker's and redis-server's data and process logs")
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE,
                        help="Alibaba lora_request_trace.csv to take arrivals from")
    parser.add_argument("--bootstrap-servers", type=str, default=None,
                        help="use this running Kafka broker instead of starting one")


@dataclass(frozen=True)
class PeersConfig:
    """The suite's parameters, from the command line."""

    jobs: int
    load: float
    slots_per_job: int
    workers: int
    worker_slots: int
    p50_s: float
    sigma: float
    acceptance: float
    progress_every_steps: int
    deadline_s: float
    wait_s: float
    kill_interval_s: float
    scenarios: tuple[str, ...]
    seed: int
    work_dir: Path
    trace: Path
    bootstrap_servers: str | None = None
    systems: tuple[str, ...] = SYSTEMS

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PeersConfig:
        scenarios = tuple(item.strip() for item in str(args.scenarios).split(",")
                          if item.strip())
        systems = tuple(item.strip() for item in str(args.systems).split(",") if item.strip())
        config = cls(
            jobs=args.jobs, load=args.load, slots_per_job=args.slots_per_job,
            workers=args.workers, worker_slots=args.worker_slots, p50_s=args.p50_s,
            sigma=args.sigma, acceptance=args.acceptance,
            progress_every_steps=args.progress_every_steps, deadline_s=args.deadline_s,
            wait_s=args.wait_s, kill_interval_s=args.kill_interval_s, scenarios=scenarios,
            seed=args.seed, work_dir=args.work_dir, trace=args.trace,
            bootstrap_servers=args.bootstrap_servers, systems=systems,
        )
        config.validate()
        return config

    def validate(self) -> None:
        if self.jobs < 2:
            raise BenchArgumentError(f"--jobs must be at least 2, got {self.jobs}")
        if self.load <= 0:
            raise BenchArgumentError(f"--load must be positive, got {self.load}")
        if not 0 < self.acceptance <= 1:
            raise BenchArgumentError(f"--acceptance must be in (0, 1], got {self.acceptance}")
        unknown = set(self.scenarios) - set(SCENARIOS)
        if not self.scenarios or unknown:
            raise BenchArgumentError(f"--scenarios must name some of {', '.join(SCENARIOS)}, "
                                     f"got {','.join(self.scenarios)}")
        unknown = set(self.systems) - set(SYSTEMS)
        if not self.systems or unknown:
            raise BenchArgumentError(f"--systems must name some of {', '.join(SYSTEMS)}, "
                                     f"got {','.join(self.systems)}")
        if self.kill_interval_s <= 0:
            raise BenchArgumentError(
                f"--kill-interval-s must be positive, got {self.kill_interval_s}")

    @property
    def simulation(self) -> SimulationSettings:
        return SimulationSettings(enabled=True, p50_s=self.p50_s, sigma=self.sigma,
                                  acceptance=self.acceptance)

    @property
    def pool(self) -> PoolSpec:
        return PoolSpec(workers=self.workers, slots_per_worker=self.worker_slots,
                        simulation=self.simulation, racing_policy=RacingPolicy.ADAPTIVE,
                        progress_every_steps=self.progress_every_steps)

    @property
    def capacity_jobs_per_s(self) -> float:
        pool = self.pool
        return pool.pool_slots * self.acceptance / (self.slots_per_job * pool.mean_service_s)

    def celery_settings(self, redis_url: str, artifact_dir: Path) -> CelerySettings:
        return CelerySettings(
            redis_url=redis_url, artifact_dir=str(artifact_dir.resolve()), p50_s=self.p50_s,
            sigma=self.sigma, acceptance=self.acceptance,
            accept_threshold=PostprocessSettings().accept_threshold,
            max_attempts_per_slot=CoordinatorSettings().max_attempts_per_slot,
            retry_backoff_base_s=RETRY_BACKOFF_BASE_S, retry_backoff_max_s=RETRY_BACKOFF_MAX_S,
            # The same time as slotforge's claim lease, after which both systems hand the
            # work of a silent worker to another one.
            visibility_timeout_s=CoordinatorSettings().lease_s,
        )


# Backoff of Celery retries: about half the median service time for the first retry, so
# a rejection costs little wait, doubling up to eight times that.
RETRY_BACKOFF_BASE_S = 0.1
RETRY_BACKOFF_MAX_S = 1.6


def run(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run each scenario through slotforge and Celery, then write the results JSON."""
    config = PeersConfig.from_args(args)
    started = time.monotonic()
    window = densest_window(load_trace(config.trace), config.jobs)
    window_s = (config.jobs - 1) / (config.load * config.capacity_jobs_per_s)
    # A unique prompt per job keeps slotforge's cache and shared flights out of the
    # comparison, as Celery has neither.
    schedule = unique_job_schedule(compress(window, window_s), tenant_id=TENANT_ID,
                                   deadline_s=config.deadline_s, slots=config.slots_per_job,
                                   seed=config.seed)
    shutil.rmtree(config.work_dir / "runs", ignore_errors=True)

    results: dict[str, dict[str, Any]] = {}
    with (local_broker(config.work_dir, config.bootstrap_servers) as bootstrap_servers,
          RedisServer(config.work_dir / "redis") as redis):
        for index, scenario in enumerate(config.scenarios):
            # Alternating the order spreads slow drift of a shared machine over both systems.
            chosen = tuple(system for system in SYSTEMS if system in config.systems)
            order = chosen if index % 2 == 0 else tuple(reversed(chosen))
            results[scenario] = {}
            for system in order:
                progress(f"{scenario} {system}: {len(schedule)} jobs over {window_s:.1f} s")
                if system == "slotforge":
                    item = _run_slotforge(bootstrap_servers, config, scenario, schedule)
                else:
                    item = _run_celery(redis.url, config, scenario, schedule)
                item["order"] = order.index(system)
                results[scenario][system] = item
                progress(f"  {scenario} {system}: p50 {format_number(item['p50_job_s'])} s, p99 "
                          f"{format_number(item['p99_job_s'])} s, lost {item['jobs_lost']}, "
                          f"duplicates {item['duplicate_executions']}, kills {item['kills']}")
            results[scenario] = {system: results[scenario][system] for system in chosen}
        redis_version = redis_server_version()

    report = {
        "results": results,
        "targets": targets(results),
        "setup": _setup(config, window, window_s, redis_version, time.monotonic() - started),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report


# ---- slotforge -----------------------------------------------------------------------------

def _run_slotforge(bootstrap_servers: str, config: PeersConfig, scenario: str,
                   schedule: Sequence[tuple[float, JobRequested]]) -> dict[str, Any]:
    run_dir = config.work_dir / "runs" / f"{scenario}-slotforge"
    settings = run_settings(bootstrap_servers, fresh_prefix(f"peers-{scenario}"), config.pool,
                            run_dir)
    kills: dict[str, float] = {}
    started = time.monotonic()
    with PipelineRun(settings, config.workers, run_dir / "logs",
                     static_membership=True) as pipeline:
        ready_s = run_until_sigterm(pipeline.wait_ready())
        outcomes = run_until_sigterm(
            _replay_slotforge(pipeline, config, scenario, schedule, kills))
        load_average_1m = os.getloadavg()[0]
        job_ids = {request.job_id for _, request in schedule}
        log = run_until_sigterm(pipeline.attempt_log(
            job_ids, settle_timeout_s=10.0 if kills else 30.0))
        pipeline.check_alive()

    ended = [outcome for outcome in outcomes if outcome.completed is not None]
    slots = [slot for outcome in ended if outcome.completed is not None
             for slot in outcome.completed.slots]
    metrics = system_metrics(outcomes, slotforge_executions(log, kills), config.pool.pool_slots,
                             delivered_slots=len(slots),
                             fallback_slots=sum(1 for slot in slots if slot.fallback))
    metrics.update(kills=len(kills), ready_s=ready_s, run_wall_s=time.monotonic() - started,
                   load_average_1m=load_average_1m, logs=str(run_dir / "logs"))
    return metrics


async def _replay_slotforge(pipeline: PipelineRun, config: PeersConfig, scenario: str,
                            schedule: Sequence[tuple[float, JobRequested]],
                            kills: dict[str, float]) -> list[JobOutcome]:
    if scenario != "kills":
        return await pipeline.replay(schedule, config.wait_s)
    stop = asyncio.Event()
    killer = asyncio.create_task(_kill_slotforge_workers(pipeline, config.kill_interval_s,
                                                         stop, kills))
    try:
        return await pipeline.replay(schedule, config.wait_s)
    finally:
        stop.set()
        await killer


async def _kill_slotforge_workers(pipeline: PipelineRun, interval_s: float,
                                  stop: asyncio.Event, kills: dict[str, float]) -> None:
    """SIGKILL one GPU worker every ``interval_s``, in turn, and start a fresh one in its slot.

    The fresh worker gets a new worker id but the killed one's group instance id, as a
    supervisor that restarts a crashed worker in its slot would give it.
    """
    group = pipeline.processes
    prefix = pipeline.settings.kafka.topic_prefix
    instances = {worker_id.rsplit(".", 1)[-1]: worker_id for worker_id in pipeline.worker_ids}
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
        if stop.is_set():
            return
        workers = [child for child in group.processes
                   if child.service == "gpu-worker" and child.alive()]
        victim = workers[len(kills) % len(workers)]
        group.kill(victim)
        kills[f"{prefix}{victim.name}"] = time.time()
        # A killed child stays out of the group, so check_alive reports only real failures.
        group.processes.remove(victim)
        name = f"gpu-r{len(kills)}"
        instances[name] = instances[victim.name]
        pipeline.start_worker(name, instance=instances[name])


def slotforge_executions(log: AttemptLog, kills: dict[str, float]) -> list[Execution]:
    """Turn attempt events into runs; a run on a killed worker without a finish ends at the kill."""
    finishes = {(event.attempt_id, event.epoch, event.worker_id): event
                for event in log.finished}
    last = max((event.emitted_at.timestamp() for event in [*log.started, *log.finished]),
               default=time.time())
    runs = []
    for started in log.started:
        start = started.started_at.timestamp()
        finish = finishes.get((started.attempt_id, started.epoch, started.worker_id))
        if finish is not None:
            runs.append(Execution(started.attempt_id, started.worker_id, start,
                                  finish.emitted_at.timestamp(), finish.gpu_s, True))
            continue
        killed_at = kills.get(started.worker_id)
        end = killed_at if killed_at is not None and killed_at >= start else last
        runs.append(Execution(started.attempt_id, started.worker_id, start, end, end - start,
                              False))
    return runs


# ---- Celery --------------------------------------------------------------------------------

def _run_celery(redis_url: str, config: PeersConfig, scenario: str,
                schedule: Sequence[tuple[float, JobRequested]]) -> dict[str, Any]:
    run_dir = config.work_dir / "runs" / f"{scenario}-celery"
    shutil.rmtree(run_dir / "artifacts", ignore_errors=True)
    settings = config.celery_settings(redis_url, run_dir / "artifacts")
    started = time.monotonic()
    with CeleryRun(settings, config.workers, config.worker_slots, run_dir / "logs") as celery:
        ready_s = celery.wait_ready()
        stop = threading.Event()
        killer = threading.Thread(target=_kill_celery_workers, name="celery-killer",
                                  args=(celery, config.kill_interval_s, stop))
        if scenario == "kills":
            killer.start()
        try:
            record = celery.replay(schedule, config.wait_s)
        finally:
            stop.set()
            if killer.is_alive():
                killer.join()
        load_average_1m = os.getloadavg()[0]
        celery.check_alive()
        executions = celery.executions()
        kills = len(celery.kills)
    shutil.rmtree(run_dir / "artifacts", ignore_errors=True)

    metrics = system_metrics(record.outcomes, executions, config.pool.pool_slots,
                             delivered_slots=record.delivered_slots,
                             fallback_slots=record.fallback_slots)
    metrics.update(kills=kills, ready_s=ready_s, run_wall_s=time.monotonic() - started,
                   load_average_1m=load_average_1m, logs=str(run_dir / "logs"))
    return metrics


def _kill_celery_workers(celery: CeleryRun, interval_s: float, stop: threading.Event) -> None:
    kills = 0
    while not stop.wait(interval_s):
        celery.kill_and_replace(kills)
        kills += 1


# ---- metrics -------------------------------------------------------------------------------

def duplicate_attempts(runs: Sequence[Execution]) -> list[str]:
    """Return the attempts that ran on two workers at overlapping times."""
    by_attempt: dict[str, list[Execution]] = collections.defaultdict(list)
    for item in runs:
        by_attempt[item.attempt].append(item)
    duplicates = []
    for attempt, items in by_attempt.items():
        if any(first.worker != second.worker and first.start < second.end
               and second.start < first.end
               for index, first in enumerate(items) for second in items[index + 1:]):
            duplicates.append(attempt)
    return duplicates


def system_metrics(outcomes: Sequence[JobOutcome], runs: Sequence[Execution], pool_slots: int,
                   *, delivered_slots: int, fallback_slots: int) -> dict[str, Any]:
    """Compute the peers metrics of one run of one system.

    Latency percentiles cover the jobs that reached a terminal state; a job without one
    within the wait counts in ``jobs_lost`` instead. GPU busy time is the device time of every
    run, a killed run's up to its kill, over the pool's slot-seconds from the first
    submission to the last outcome.
    """
    terminal = [outcome for outcome in outcomes
                if outcome.ended_s is not None and outcome.status != "timed_out"]
    latencies_s = [outcome.ended_s - outcome.submitted_s for outcome in terminal
                   if outcome.ended_s is not None]
    first = min((outcome.submitted_s for outcome in outcomes), default=0.0)
    last = max((outcome.ended_s for outcome in terminal if outcome.ended_s is not None),
               default=first)
    busy_s = sum(item.gpu_s for item in runs)
    span_s = last - first
    duplicates = duplicate_attempts(runs)
    counts = outcome_counts(outcomes)
    return {
        "jobs": len(outcomes),
        **counts,
        "jobs_lost": len(outcomes) - len(terminal),
        "p50_job_s": percentile(latencies_s, 50),
        "p99_job_s": percentile(latencies_s, 99),
        "delivered_slots": delivered_slots,
        "fallback_slots": fallback_slots,
        "executions": len(runs),
        "killed_executions": sum(1 for item in runs if not item.finished),
        "gpu_s": busy_s,
        "gpu_busy_fraction": busy_s / (pool_slots * span_s) if span_s > 0 else None,
        "gpu_s_per_delivered_slot": busy_s / delivered_slots if delivered_slots else None,
        "duplicate_executions": len(duplicates),
        "duplicate_examples": duplicates[:5],
    }


def targets(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Check slotforge's targets against Celery, returning each measurement with a verdict."""
    checks: list[dict[str, Any]] = []
    for scenario, by_system in results.items():
        if set(SYSTEMS) <= set(by_system):
            mine = by_system["slotforge"]["p99_job_s"]
            theirs = by_system["celery"]["p99_job_s"]
            ratio = mine / theirs if mine is not None and theirs else None
            checks.append({"name": f"{scenario}: slotforge p99_job_s / Celery p99_job_s",
                           "limit": f"<= {P99_RATIO_TARGET:g}", "measured": ratio,
                           "met": ratio is not None and ratio <= P99_RATIO_TARGET})
    kills = results.get("kills", {}).get("slotforge")
    if kills is not None:
        for metric in ("jobs_lost", "duplicate_executions"):
            checks.append({"name": f"kills: slotforge {metric}", "limit": "= 0",
                           "measured": kills[metric], "met": kills[metric] == 0})
    return checks


def _setup(config: PeersConfig, window: Sequence[TraceRequest], window_s: float,
           redis_version: str, wall_s: float) -> dict[str, Any]:
    machine = machine_description()
    for package in ("celery", "kombu", "redis"):
        try:
            machine["packages"][package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            machine["packages"][package] = "not installed"
    pool = config.pool
    return {
        "machine": machine,
        "cpu_count": machine["cpus"],
        "kafka": kafka_broker_version(),
        "redis_server": redis_version,
        "source": git_state(),
        "parameters": {
            "jobs_per_run": config.jobs,
            "load": config.load,
            "slots_per_job": config.slots_per_job,
            "workers": config.workers,
            "slots_per_worker": config.worker_slots,
            "pool_slots": pool.pool_slots,
            "p50_service_s": config.p50_s,
            "sigma": config.sigma,
            "p99_over_p50": math.exp(2.326 * config.sigma),
            "mean_service_s": pool.mean_service_s,
            "acceptance": config.acceptance,
            "max_attempts_per_slot": CoordinatorSettings().max_attempts_per_slot,
            "lease_s": CoordinatorSettings().lease_s,
            "worker_status_ttl_s": CoordinatorSettings().worker_status_ttl_s,
            "static_membership": True,
            "progress_every_steps": config.progress_every_steps,
            "deadline_s": config.deadline_s,
            "wait_s": config.wait_s,
            "kill_interval_s": config.kill_interval_s,
            "seed": config.seed,
            "racing_policy": pool.racing_policy.value,
        },
        "celery": celery_tuning(config),
        "capacity": {"formula": CAPACITY_FORMULA, "jobs_per_s": config.capacity_jobs_per_s,
                     "offered_jobs_per_s": config.load * config.capacity_jobs_per_s,
                     "arrival_window_s": window_s},
        "trace": {"file": config.trace.name, "window": "densest", "rows": len(window),
                  "span_s": window[-1].arrival_s if window else 0.0},
        "commands": run_commands("bench/results/peers.json", REPRODUCE),
        "work_dir": str(config.work_dir),
        "wall_s": wall_s,
    }


def celery_tuning(config: PeersConfig) -> list[str]:
    """List what the baseline changed from Celery's defaults, and why, for the page."""
    settings = config.celery_settings("redis://127.0.0.1", config.work_dir)
    return [
        "task_acks_late=True and task_reject_on_worker_lost=True: a task is acknowledged "
        "after it ran, so the task of a killed worker is delivered again",
        "worker_prefetch_multiplier=1 and -O fair: a worker reserves one task per free pool "
        "process, so no task waits behind a long one (Celery's advice for long tasks)",
        f"visibility_timeout={settings.visibility_timeout_s:g} s (default 3600 s): Redis "
        "redelivers the unacknowledged task of a dead worker after this long, the same time "
        "as slotforge's claim lease; it stays above the longest task plus retry countdown",
        f"prefork pool, concurrency {config.worker_slots} per worker process and "
        f"{config.workers} worker processes: the same {config.pool.pool_slots} GPU slots "
        "as slotforge",
        "chord of K generate_slot tasks with a finish_job callback on its own queue and "
        "worker, so callbacks never wait for a GPU slot; Redis result backend (native chord "
        "counter)",
        f"rejected or failed images retry the task with exponential backoff and full jitter, "
        f"{settings.retry_backoff_base_s:g} s doubling to {settings.retry_backoff_max_s:g} s, "
        f"at most {settings.max_attempts_per_slot} attempts per slot, then the best rejected "
        "image (slotforge's fallback)",
        "worker_disable_rate_limits=True, JSON serializer, --without-gossip --without-mingle "
        "--without-heartbeat: less broker traffic per task",
    ]


# ---- page -------------------------------------------------------------------------------------

# The recovery path of each system after a worker is killed, from the worker logs of these
# runs and from the client libraries' code (aiokafka 0.14, kombu 5.5.4).
def recovery_paragraphs(parameters: dict[str, Any]) -> tuple[str, ...]:
    """Describe how each system recovers from a killed worker, with this run's settings."""
    # A results file from before the TTL was recorded gets the coordinator's default.
    status_ttl_s = parameters.get("worker_status_ttl_s",
                                  CoordinatorSettings().worker_status_ttl_s)
    return (
        "How slotforge recovers from a SIGKILL: each GPU worker joins its consumer group as a "
        "static member (Kafka's group.instance.id, aiokafka's group_instance_id) named after "
        "its worker slot, and the replacement started in that slot reuses the name. The broker "
        "hands it the killed worker's partitions without a rebalance, so the other worker "
        "never stops fetching, and the replacement fetches the attempts the killed worker had "
        "not committed. The coordinator re-dispatches a running attempt whose heartbeats "
        "stopped (the adaptive timeout policy), and it counts the lease of a worker that "
        f"stopped sending status reports while others kept reporting ({status_ttl_s:g} s) as "
        "expired, so the killed worker's claimed attempts go out again without waiting for "
        f"the {parameters['lease_s']:g} s lease.",
        "How Celery recovers: with the Redis transport, a killed worker's unacknowledged tasks "
        "return to the queue only when a worker calls restore_visible, which requeues messages "
        "older than the visibility timeout. Workers call it when they start and on every tenth "
        "run of a 10 s timer (kombu/transport/redis.py), so a task can wait from the visibility "
        "timeout up to about 100 s longer.",
    )

def _steps(count: int) -> str:
    return "step" if count == 1 else f"{count} steps"


def render_markdown(results: dict[str, Any]) -> str:
    """Render the peers section of docs/benchmarks.md."""
    setup = results["setup"]
    parameters = setup["parameters"]
    capacity = setup["capacity"]
    lines = ["## Peers: slotforge and Celery", ""]
    paragraphs = [
        "The same job stream through slotforge and through a Celery pipeline with Redis, in "
        f"the same run on the same machine. Both have {parameters['workers']} GPU worker "
        f"processes with {parameters['slots_per_worker']} slots each "
        f"({parameters['pool_slots']} slots). The GPU is simulated by the same code in both: "
        f"lognormal service time with median {parameters['p50_service_s']:g} s and sigma "
        f"{parameters['sigma']:g} (p99 = {parameters['p99_over_p50']:.1f} x p50); the same "
        "post-processing code scores each image and accepts about "
        f"{parameters['acceptance']:.0%}. Every job asks for K = "
        f"{parameters['slots_per_job']} slots with at most "
        f"{parameters['max_attempts_per_slot']} attempts per slot. slotforge runs its "
        f"default {parameters['racing_policy']} racing policy and lease of "
        f"{parameters['lease_s']:g} s, and its workers send a progress heartbeat every "
        f"{_steps(parameters['progress_every_steps'])}.",
        f"Load: {setup['trace']['rows']} jobs at the arrivals of the densest window of "
        f"{setup['trace']['file']}, compressed to {capacity['arrival_window_s']:.1f} s, "
        f"{parameters['load']:.0%} of capacity ({capacity['formula']} = "
        f"{capacity['jobs_per_s']:.2f} jobs/s). In the kills scenario one GPU worker process "
        f"is killed with SIGKILL every {parameters['kill_interval_s']:g} s, in turn, while "
        "jobs run, and a fresh process starts in its place; a Celery worker is killed with "
        "its pool processes.",
        "Columns: job latency runs from submit to outcome at the client, over jobs that "
        f"reached a terminal state. Lost jobs had none within {parameters['wait_s']:g} s of "
        "submission. GPU busy is the device seconds of every execution (a killed one up to "
        "its kill) over the pool's slot-seconds from first submission to last outcome. "
        "Duplicates counts attempts (for Celery, one task id and retry number) that ran on "
        "two workers at overlapping times.",
    ]
    for paragraph in paragraphs:
        lines += [wrap(paragraph), ""]

    lines += [
        "| scenario | system | jobs | lost | p50 job (s) | p99 job (s) | GPU busy "
        "| GPU s per delivered slot | duplicates | fallback slots | kills | load avg |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for scenario in [name for name in SCENARIOS if name in results["results"]]:
        by_system = results["results"][scenario]
        for system in [name for name in SYSTEMS if name in by_system]:
            item = by_system[system]
            lines.append(
                f"| {scenario} | {system} | {item['jobs']} | {item['jobs_lost']} "
                f"| {format_number(item['p50_job_s'])} | {format_number(item['p99_job_s'])} "
                f"| {format_number(item['gpu_busy_fraction'], 3)} "
                f"| {format_number(item['gpu_s_per_delivered_slot'], 3)} "
                f"| {item['duplicate_executions']} | {item['fallback_slots']} "
                f"| {item['kills']} | {format_number(item.get('load_average_1m'), 1)} |")
    lines += ["", "Targets for slotforge:", ""]
    for target in results["targets"]:
        verdict = "met" if target["met"] else "NOT met"
        lines.append(f"- {target['name']} {target['limit']}: measured "
                     f"{format_number(target['measured'], 3)}, {verdict}.")
    lines += [""]
    for paragraph in recovery_paragraphs(parameters):
        lines += [wrap(paragraph), ""]
    lines += ["What the Celery baseline tuned, following Celery's documentation:", ""]
    lines += [f"- {item}" for item in setup["celery"]]
    machine = machine_paragraph(
        setup, software=f"redis-server {setup['redis_server']}",
        compare="compare the systems within one scenario, not absolute times across runs")
    lines += ["", wrap(machine), "", "Reproduce:", "", "```",
              setup["commands"]["reproduce"], "```", ""]
    return "\n".join(lines)
