"""Racing policies on the real pipeline: job latency and GPU cost at four offered loads.

One local broker serves the whole suite. For each (load, policy) pair a fresh set of
pipeline processes runs on its own topic prefix: the coordinator with that racing policy,
post-processing and GPU workers with the simulated GPU. Every policy at one load replays
the same job stream: the same Alibaba trace arrivals and the same seeds, so the n-th
attempt of a job draws the same service time and verdict under every policy. A last run
replays a stretch of the trace with its own prompts through the adaptive pipeline, to
measure how many regenerated slots the cache serves.

Beside the real runs, ``bench.racing_sim`` replays the same job stream many times through
the coordinator's flight code on a simulated pool, under the key ``simulated``, so the
policies' p99 rests on thousands of jobs instead of 80.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.pipeline_run import (
    AttemptLog,
    JobOutcome,
    PipelineRun,
    PoolSpec,
    duplicate_executions,
    fresh_prefix,
    kafka_broker_version,
    machine_description,
    outcome_counts,
    percentile,
    run_settings,
    run_until_sigterm,
)
from bench.racing_sim import SimConfig, simulate_suite
from bench.suite_support import (
    BenchArgumentError,
    format_number,
    git_state,
    job_seed,  # noqa: F401 (part of this module's interface)
    local_broker,
    machine_paragraph,
    progress,
    run_commands,
    unique_job_schedule,
    wrap,
)
from schemas.events import AttemptDispatched, AttemptFinished, AttemptStatus, JobRequested
from streams.config import LOCAL_DIR, CoordinatorSettings, SimulationSettings
from streams.racing import RacingPolicy
from streams.trace_replay import (
    DEFAULT_TRACE,
    TraceRequest,
    compress,
    densest_window,
    load_trace,
    to_job_request,
)

POLICIES = ("sequential", "fixed_race", "adaptive")
DEFAULT_LOADS = (0.5, 0.8, 1.0, 1.5)
TENANT_ID = "bench"

# Targets for the adaptive policy, checked in the rendered page.
LOW_LOAD = 0.5
LOW_LOAD_P99_RATIO = 0.45
BEST_FIXED_P99_SLACK = 1.1

CAPACITY_FORMULA = (
    "capacity_jobs_per_s = pool_slots * acceptance / (K * mean_service_s), "
    "mean_service_s = p50_s * exp(sigma^2 / 2)"
)
REPRODUCE = (
    ".venv/bin/slotforge bench racing --out bench/results/racing.json\n"
    ".venv/bin/python -m bench.render"
)
REPRODUCE_SIMULATED = (
    ".venv/bin/slotforge bench racing --simulated-only --out bench/results/racing.json\n"
    ".venv/bin/python -m bench.render"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", type=int, default=80,
                        help="jobs per (load, policy) run, from the densest trace window")
    parser.add_argument("--loads", type=str, default=",".join(str(x) for x in DEFAULT_LOADS),
                        help="offered loads as fractions of capacity, comma-separated")
    parser.add_argument("--slots-per-job", type=int, default=4,
                        help="slots K of every racing job")
    parser.add_argument("--workers", type=int, default=2, help="GPU worker processes")
    parser.add_argument("--worker-slots", type=int, default=4,
                        help="concurrent attempts per GPU worker process")
    parser.add_argument("--p50-s", type=float, default=0.2,
                        help="median simulated service time of one attempt, in seconds")
    parser.add_argument("--sigma", type=float, default=0.99,
                        help="lognormal sigma of the service time; 0.99 gives p99 = 10 x p50")
    parser.add_argument("--acceptance", type=float, default=0.5,
                        help="probability that post-processing accepts one simulated image")
    parser.add_argument("--deadline-s", type=float, default=300.0,
                        help="deadline of every job, in seconds after admission")
    parser.add_argument("--seed", type=int, default=7,
                        help="base seed from which each job's seed is derived")
    parser.add_argument("--cache-requests", type=int, default=150,
                        help="trace requests replayed for the cache measurement")
    parser.add_argument("--cache-load", type=float, default=0.5,
                        help="offered load of the cache run, as a fraction of capacity")
    parser.add_argument("--work-dir", type=Path, default=LOCAL_DIR / "bench" / "racing",
                        help="folder for the broker's data and each run's process logs")
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE,
                        help="Alibaba lora_request_trace.csv to take arrivals from")
    parser.add_argument("--bootstrap-servers", type=str, default=None,
                        help="use this running broker instead of starting one")
    parser.add_argument("--sim-replicates", type=int, default=25,
                        help="replicates of the job stream in the simulation; 0 skips it")
    parser.add_argument("--simulated-only", action="store_true",
                        help="run only the simulation and keep the real-pipeline results "
                             "already in --out")


@dataclass(frozen=True)
class RacingConfig:
    """The suite's parameters, from the command line."""

    jobs: int
    loads: tuple[float, ...]
    slots_per_job: int
    workers: int
    worker_slots: int
    p50_s: float
    sigma: float
    acceptance: float
    deadline_s: float
    seed: int
    cache_requests: int
    cache_load: float
    work_dir: Path
    trace: Path
    bootstrap_servers: str | None = None
    sim_replicates: int = 25

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RacingConfig:
        loads = tuple(float(item) for item in str(args.loads).split(",") if item.strip())
        config = cls(
            jobs=args.jobs, loads=loads, slots_per_job=args.slots_per_job,
            workers=args.workers, worker_slots=args.worker_slots, p50_s=args.p50_s,
            sigma=args.sigma, acceptance=args.acceptance, deadline_s=args.deadline_s,
            seed=args.seed, cache_requests=args.cache_requests, cache_load=args.cache_load,
            work_dir=args.work_dir, trace=args.trace, bootstrap_servers=args.bootstrap_servers,
            sim_replicates=args.sim_replicates,
        )
        config.validate()
        return config

    def validate(self) -> None:
        if self.jobs < 2:
            raise BenchArgumentError(f"--jobs must be at least 2, got {self.jobs}")
        if not self.loads or any(load <= 0 for load in self.loads):
            raise BenchArgumentError(f"--loads must be positive fractions, got {self.loads}")
        if not 0 < self.acceptance <= 1:
            raise BenchArgumentError(f"--acceptance must be in (0, 1], got {self.acceptance}")
        if self.sim_replicates < 0:
            raise BenchArgumentError(f"--sim-replicates must be 0 (skip) or more, "
                                     f"got {self.sim_replicates}")
        if self.cache_requests == 1 or self.cache_requests < 0:
            raise BenchArgumentError(f"--cache-requests must be 0 (skip) or at least 2, "
                                     f"got {self.cache_requests}")

    def pool(self, policy: str) -> PoolSpec:
        simulation = SimulationSettings(enabled=True, p50_s=self.p50_s, sigma=self.sigma,
                                        acceptance=self.acceptance)
        return PoolSpec(workers=self.workers, slots_per_worker=self.worker_slots,
                        simulation=simulation, racing_policy=RacingPolicy(policy))

    def capacity_jobs_per_s(self, mean_slots: float) -> float:
        """Return the jobs per second the pool completes when no attempt is cancelled."""
        pool = self.pool("adaptive")
        return pool.pool_slots * self.acceptance / (mean_slots * pool.mean_service_s)


    def sim_config(self) -> SimConfig:
        return SimConfig(
            replicates=self.sim_replicates, pool_slots=self.workers * self.worker_slots,
            slots_per_job=self.slots_per_job, p50_s=self.p50_s, sigma=self.sigma,
            acceptance=self.acceptance, deadline_s=self.deadline_s,
            max_attempts_per_slot=CoordinatorSettings().max_attempts_per_slot,
            acceptance_prior=CoordinatorSettings().acceptance_prior, seed=self.seed,
        )


def run(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run every (load, policy) pair and the cache run, then write the results JSON.

    With ``--simulated-only`` only the simulation runs, and the real-pipeline results
    already in ``out`` are kept.
    """
    config = RacingConfig.from_args(args)
    trace = load_trace(config.trace)
    if args.simulated_only:
        if not out.exists():
            raise FileNotFoundError(f"--simulated-only keeps the real results in {out}, "
                                    "which does not exist; run without the flag first")
        report = json.loads(out.read_text())
        report["simulated"] = run_simulated(config, trace)
        out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        return report

    started = time.monotonic()
    shutil.rmtree(config.work_dir / "runs", ignore_errors=True)

    results: dict[str, dict[str, Any]] = {}
    loads: dict[str, Any] = {}
    window = densest_window(trace, config.jobs)
    capacity = config.capacity_jobs_per_s(config.slots_per_job)
    with local_broker(config.work_dir, config.bootstrap_servers) as bootstrap_servers:
        for index, load in enumerate(config.loads):
            key = f"load_{float(load)}"
            # Compress the window so its (jobs - 1) gaps average 1 / (load * capacity) s.
            window_s = (config.jobs - 1) / (load * capacity)
            rows = compress(window, window_s)
            # Rotating the order spreads slow drift of a shared machine over the policies.
            order = POLICIES[index % len(POLICIES):] + POLICIES[:index % len(POLICIES)]
            loads[key] = {"offered_jobs_per_s": load * capacity, "arrival_window_s": window_s,
                          "policy_order": list(order)}
            results[key] = {}
            for policy in order:
                schedule = _racing_schedule(rows, config)
                progress(f"{key} {policy}: {len(schedule)} jobs over {window_s:.1f} s")
                results[key][policy] = _run_racing(bootstrap_servers, config, key, policy,
                                                   schedule)
                _progress_summary(key, policy, results[key][policy])
            results[key] = {policy: results[key][policy] for policy in POLICIES
                            if policy in results[key]}
        cache = _run_cache(bootstrap_servers, config, trace) if config.cache_requests else {}

    report = {
        "results": results,
        "cache": cache,
        "targets": targets(results, cache),
        "setup": _setup(config, capacity, window, loads, time.monotonic() - started),
    }
    if config.sim_replicates:
        report["simulated"] = run_simulated(config, trace)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report


def run_simulated(config: RacingConfig, trace: Sequence[TraceRequest]) -> dict[str, Any]:
    """Simulate every (load, policy) pair over replicates of the real runs' job stream."""
    started = time.monotonic()
    window = densest_window(trace, config.jobs)
    capacity = config.capacity_jobs_per_s(config.slots_per_job)
    progress(f"simulation: {config.sim_replicates} replicates of {len(window)} jobs per "
              "(load, policy)")
    simulated = simulate_suite(config.sim_config(), window, config.loads, POLICIES, capacity,
                               job_seed)
    simulated["targets"] = targets(simulated["results"], {})
    simulated["capacity_jobs_per_s"] = capacity
    simulated["wall_s"] = time.monotonic() - started
    simulated["reproduce"] = REPRODUCE_SIMULATED
    simulated["source"] = git_state()
    for key, by_policy in simulated["results"].items():
        for policy, item in by_policy.items():
            progress(f"  simulated {key} {policy}: p50 {format_number(item['p50_job_s'])} s, p99 "
                      f"{format_number(item['p99_job_s'])} s, GPU s/slot "
                      f"{format_number(item['gpu_s_per_delivered_slot'], 3)}")
    return simulated


def _progress_summary(key: str, policy: str, result: dict[str, Any]) -> None:
    progress(f"  {key} {policy}: p50 {format_number(result['p50_job_s'])} s, p99 "
             f"{format_number(result['p99_job_s'])} s, GPU s/slot "
             f"{format_number(result['gpu_s_per_delivered_slot'], 3)}, ended "
             f"{result['jobs'] - result['timed_out']}/{result['jobs']}, wall "
             f"{result['run_wall_s']:.0f} s")


def _racing_schedule(rows: Sequence[TraceRequest],
                     config: RacingConfig) -> list[tuple[float, JobRequested]]:
    return unique_job_schedule(rows, tenant_id=TENANT_ID, deadline_s=config.deadline_s,
                               slots=config.slots_per_job, seed=config.seed)


@dataclass
class _RunRecord:
    outcomes: list[JobOutcome]
    log: AttemptLog
    ready_s: float
    wall_s: float
    log_dir: str
    # The machine's 1-minute load average when the replay ended: other work on a shared
    # machine shows up here, and in job latency.
    load_average_1m: float


def _run_pipeline(bootstrap_servers: str, config: RacingConfig, tag: str, policy: str,
                  schedule: Sequence[tuple[float, JobRequested]]) -> _RunRecord:
    run_dir = config.work_dir / "runs" / tag
    settings = run_settings(bootstrap_servers, fresh_prefix(tag),
                            config.pool(policy), run_dir)
    started = time.monotonic()
    with PipelineRun(settings, config.workers, run_dir / "logs") as pipeline:
        ready_s = run_until_sigterm(pipeline.wait_ready())
        outcomes = run_until_sigterm(pipeline.replay(schedule, config.deadline_s + 60.0))
        load_average_1m = os.getloadavg()[0]
        log = run_until_sigterm(pipeline.attempt_log({request.job_id for _, request in schedule}))
        pipeline.check_alive()
    return _RunRecord(outcomes, log, ready_s, time.monotonic() - started,
                      str(run_dir / "logs"), load_average_1m)


def _run_racing(bootstrap_servers: str, config: RacingConfig, key: str, policy: str,
                schedule: Sequence[tuple[float, JobRequested]]) -> dict[str, Any]:
    record = _run_pipeline(bootstrap_servers, config, f"{key}-{policy}", policy, schedule)
    metrics = run_metrics(record.outcomes, record.log)
    metrics.update(ready_s=record.ready_s, run_wall_s=record.wall_s, logs=record.log_dir,
                   load_average_1m=record.load_average_1m)
    return metrics


# ---- metrics -----------------------------------------------------------------------------

def _useful_finishes(outcomes: Sequence[JobOutcome],
                     finished: Sequence[AttemptFinished]) -> set[tuple[str, int, str]]:
    """Return the finishes whose image a job delivered: each delivered attempt's newest run."""
    delivered = {slot.attempt_id for outcome in outcomes if outcome.completed is not None
                 for slot in outcome.completed.slots if not slot.cached}
    newest: dict[str, AttemptFinished] = {}
    for event in finished:
        if event.attempt_id not in delivered or event.status is not AttemptStatus.SUCCEEDED:
            continue
        known = newest.get(event.attempt_id)
        if known is None or event.epoch > known.epoch:
            newest[event.attempt_id] = event
    return {(event.attempt_id, event.epoch, event.worker_id) for event in newest.values()}


def run_metrics(outcomes: Sequence[JobOutcome], log: AttemptLog) -> dict[str, Any]:
    """Compute latency, GPU cost and duplicates of one run from outcomes and attempt events."""
    ended = [outcome for outcome in outcomes if outcome.completed is not None]
    latencies_s = [outcome.latency_s for outcome in ended if outcome.latency_s is not None]
    slots = [slot for outcome in ended if outcome.completed is not None
             for slot in outcome.completed.slots]
    useful = _useful_finishes(outcomes, log.finished)
    gpu_s = sum(event.gpu_s for event in log.finished)
    useful_gpu_s = sum(event.gpu_s for event in log.finished
                       if (event.attempt_id, event.epoch, event.worker_id) in useful)
    duplicates = duplicate_executions(log)
    counts = outcome_counts(outcomes)
    return {
        "jobs": len(outcomes),
        **counts,
        "p50_job_s": percentile(latencies_s, 50),
        "p99_job_s": percentile(latencies_s, 99),
        "mean_job_s": sum(latencies_s) / len(latencies_s) if latencies_s else None,
        "delivered_slots": len(slots),
        "requested_slots": sum(outcome.slots for outcome in outcomes),
        "fallback_slots": sum(1 for slot in slots if slot.fallback),
        "cached_slots": sum(1 for slot in slots if slot.cached),
        "gpu_s": gpu_s,
        "gpu_s_per_delivered_slot": gpu_s / len(slots) if slots else None,
        "wasted_gpu_fraction": (gpu_s - useful_gpu_s) / gpu_s if gpu_s else None,
        "duplicate_executions": len(duplicates),
        "duplicate_examples": [asdict(item) for item in duplicates[:5]],
        **_attempt_metrics(ended, log),
    }


def _attempt_metrics(ended: Sequence[JobOutcome], log: AttemptLog) -> dict[str, Any]:
    """Count attempts and measure what the simulated GPU and post-processing produced."""
    statuses = collections.Counter(event.status.value for event in log.finished)
    reasons = collections.Counter(
        (event.error or "unknown").split(":")[0][:60] for event in log.finished
        if event.status is AttemptStatus.CANCELLED
    )
    verdicts = {(event.attempt_id, event.epoch): event.accepted for event in log.scored}
    service_s = [event.gpu_s for event in log.finished
                 if event.status is AttemptStatus.SUCCEEDED]
    p50_service_s = percentile(service_s, 50)
    p99_service_s = percentile(service_s, 99)
    charged = [outcome.completed.attempts for outcome in ended if outcome.completed is not None]
    return {
        "attempts_started": len(log.started),
        "attempts_finished": dict(sorted(statuses.items())),
        "cancel_reasons": dict(reasons.most_common(8)),
        "mean_attempts_per_job": sum(charged) / len(charged) if charged else None,
        "measured_acceptance": (sum(verdicts.values()) / len(verdicts)) if verdicts else None,
        "succeeded_service_p50_s": p50_service_s,
        "succeeded_service_p99_s": p99_service_s,
        "queue_wait_ms": queue_waits(log),
        "slowest_jobs": slowest_jobs(ended, log),
    }


def _first_starts(log: AttemptLog) -> dict[tuple[str, int], datetime]:
    """Return when each (attempt, epoch) first started on any worker."""
    starts: dict[tuple[str, int], datetime] = {}
    for event in log.started:
        key = (event.attempt_id, event.epoch)
        if key not in starts or event.started_at < starts[key]:
            starts[key] = event.started_at
    return starts


def _wait_ms(log: AttemptLog) -> list[tuple[AttemptDispatched, float]]:
    """Pair each started dispatch with its wait from dispatch to first start, in ms."""
    starts = _first_starts(log)
    return [(event, (starts[key] - event.dispatched_at).total_seconds() * 1000)
            for event in log.dispatched
            if (key := (event.attempt_id, event.epoch)) in starts]


def queue_waits(log: AttemptLog) -> dict[str, dict[str, Any]]:
    """Measure dispatch-to-start waits of first attempts and of follow-ups separately.

    Dispatch and start times come from the coordinator's and the workers' clocks, which
    are one clock when every process runs on one machine, as here.
    """
    waits: dict[str, list[float]] = {"first": [], "followup": []}
    for event, wait_ms in _wait_ms(log):
        waits["followup" if event.followup else "first"].append(wait_ms)
    return {kind: {"count": len(values), "p50_ms": percentile(values, 50),
                   "p99_ms": percentile(values, 99), "max_ms": max(values, default=None)}
            for kind, values in waits.items()}


def slowest_jobs(ended: Sequence[JobOutcome], log: AttemptLog,
                 count: int = 3) -> list[dict[str, Any]]:
    """Describe the ``count`` slowest jobs: their attempts, fallbacks and longest queue wait."""
    by_job: dict[str, list[tuple[AttemptDispatched, float]]] = collections.defaultdict(list)
    for event, wait_ms in _wait_ms(log):
        by_job[event.job_id].append((event, wait_ms))
    dispatches = collections.Counter(event.job_id for event in log.dispatched)
    followups = collections.Counter(event.job_id for event in log.dispatched if event.followup)
    timed = [outcome for outcome in ended if outcome.latency_s is not None]
    timed.sort(key=lambda outcome: outcome.latency_s or 0.0, reverse=True)
    described = []
    for outcome in timed[:count]:
        completed = outcome.completed
        waits = [wait_ms for _, wait_ms in by_job.get(outcome.job_id, [])]
        described.append({
            "job_id": outcome.job_id,
            "latency_s": outcome.latency_s,
            "attempts_dispatched": dispatches[outcome.job_id],
            "followups_dispatched": followups[outcome.job_id],
            "attempts_charged": completed.attempts if completed is not None else None,
            "fallback_slots": (sum(1 for slot in completed.slots if slot.fallback)
                               if completed is not None else None),
            "max_queue_wait_ms": max(waits, default=None),
        })
    return described


# ---- cache run -----------------------------------------------------------------------------

def regeneration_flags(rows: Sequence[TraceRequest]) -> list[bool]:
    """Flag each request that repeats an earlier request's prompt key (a regeneration)."""
    seen: set[tuple[str, int, int, str, int]] = set()
    flags = []
    for row in rows:
        flags.append(row.prompt_key in seen)
        seen.add(row.prompt_key)
    return flags


def representative_stretch(trace: Sequence[TraceRequest], count: int) -> tuple[int, float]:
    """Pick the stretch of ``count`` consecutive requests whose regeneration share is closest
    to the whole trace's.

    Stretches start at multiples of ``count``, and the earliest wins a tie. Returns the
    stretch's first index and the whole trace's share.
    """
    whole_share = sum(regeneration_flags(trace)) / len(trace)
    best_start, best_gap = 0, math.inf
    for start in range(0, max(1, len(trace) - count + 1), count):
        share = sum(regeneration_flags(trace[start:start + count])) / count
        if abs(share - whole_share) < best_gap:
            best_start, best_gap = start, abs(share - whole_share)
    return best_start, whole_share


def _run_cache(bootstrap_servers: str, config: RacingConfig,
               trace: Sequence[TraceRequest]) -> dict[str, Any]:
    start, whole_share = representative_stretch(trace, config.cache_requests)
    stretch = list(trace[start:start + config.cache_requests])
    origin_s = stretch[0].arrival_s
    stretch = [replace(row, arrival_s=row.arrival_s - origin_s) for row in stretch]
    mean_slots = sum(row.slots for row in stretch) / len(stretch)
    window_s = (len(stretch) - 1) / (config.cache_load * config.capacity_jobs_per_s(mean_slots))
    rows = compress(stretch, window_s)
    flags = regeneration_flags(rows)
    schedule = [(row.arrival_s, to_job_request(row, tenant_id=TENANT_ID,
                                               deadline_s=config.deadline_s)) for row in rows]
    progress(f"cache: {len(rows)} trace requests from row {start} over {window_s:.1f} s, "
             f"{sum(flags)} regenerations")

    record = _run_pipeline(bootstrap_servers, config, "cache-adaptive", "adaptive", schedule)
    metrics = cache_metrics(rows, record.outcomes, flags)
    run = run_metrics(record.outcomes, record.log)
    metrics.update({
        "jobs": run["jobs"], "completed": run["completed"], "partial": run["partial"],
        "failed": run["failed"], "timed_out": run["timed_out"],
        "gpu_s_per_delivered_slot": run["gpu_s_per_delivered_slot"],
        "duplicate_executions": run["duplicate_executions"],
        "trace_first_row": start, "trace_span_s": stretch[-1].arrival_s,
        "whole_trace_regeneration_share": whole_share, "mean_slots": mean_slots,
        "offered_load": config.cache_load, "arrival_window_s": window_s,
        "run_wall_s": record.wall_s, "logs": record.log_dir,
        "load_average_1m": record.load_average_1m,
    })
    progress(f"  cache: {metrics['slots_from_cache']} of {metrics['regenerated_slots']} "
             f"regenerated slots from cache, p50 cached slot "
             f"{format_number(metrics['p50_cached_slot_ms'], 0)} ms")
    return metrics


def cache_metrics(rows: Sequence[TraceRequest], outcomes: Sequence[JobOutcome],
                  regeneration: Sequence[bool]) -> dict[str, Any]:
    """Count the slots served from the cache and measure their latency in one replay."""
    cached_slot_ms: list[float] = []
    fully_cached_ms: list[float] = []
    uncached_ms: list[float] = []
    for outcome in outcomes:
        if outcome.completed is None or outcome.latency_s is None:
            continue
        cached = sum(1 for slot in outcome.completed.slots if slot.cached)
        latency_ms = outcome.latency_s * 1000.0
        # Each cached slot counts once, with the latency of the job it was delivered in.
        cached_slot_ms += [latency_ms] * cached
        if cached and cached == outcome.slots:
            fully_cached_ms.append(latency_ms)
        elif not cached:
            uncached_ms.append(latency_ms)

    # A regeneration that arrives while the earlier job of its key still runs shares that
    # job's attempts. Only a later one can find surplus results in the cache.
    while_running = 0
    latest: dict[tuple[str, int, int, str, int], JobOutcome] = {}
    for row, outcome, repeat in zip(rows, outcomes, regeneration, strict=True):
        earlier = latest.get(row.prompt_key)
        if repeat and earlier is not None and (earlier.ended_s is None
                                               or earlier.ended_s > outcome.submitted_s):
            while_running += 1
        latest[row.prompt_key] = outcome
    return {
        "requests": len(rows),
        "regeneration_requests": sum(regeneration),
        "requested_slots": sum(outcome.slots for outcome in outcomes),
        "regenerated_slots": sum(outcome.slots for outcome, repeat
                                 in zip(outcomes, regeneration, strict=True) if repeat),
        "regenerations_while_earlier_job_ran": while_running,
        "slots_from_cache": len(cached_slot_ms),
        "p50_cached_slot_ms": percentile(cached_slot_ms, 50),
        "p50_fully_cached_job_ms": percentile(fully_cached_ms, 50),
        "p50_uncached_job_ms": percentile(uncached_ms, 50),
    }


# ---- targets and setup ----------------------------------------------------------------------

def targets(results: dict[str, dict[str, Any]], cache: dict[str, Any]) -> list[dict[str, Any]]:
    """Check the adaptive policy's targets, returning each measured ratio with a verdict."""
    checks: list[dict[str, Any]] = []
    low = results.get(f"load_{LOW_LOAD}", {})
    if {"adaptive", "sequential"} <= set(low):
        ratio = _ratio(low["adaptive"]["p99_job_s"], low["sequential"]["p99_job_s"])
        checks.append(_check(f"load_{LOW_LOAD}: adaptive p99_job_s / sequential p99_job_s",
                             ratio, LOW_LOAD_P99_RATIO))
    for key, by_policy in results.items():
        if not set(POLICIES) <= set(by_policy):
            continue
        fixed = [by_policy[name]["p99_job_s"] for name in ("sequential", "fixed_race")
                 if by_policy[name]["p99_job_s"] is not None]
        ratio = _ratio(by_policy["adaptive"]["p99_job_s"], min(fixed) if fixed else None)
        checks.append(_check(f"{key}: adaptive p99_job_s / best fixed p99_job_s", ratio,
                             BEST_FIXED_P99_SLACK))
        ratio = _ratio(by_policy["adaptive"]["gpu_s_per_delivered_slot"],
                       by_policy["sequential"]["gpu_s_per_delivered_slot"])
        checks.append(_check(f"{key}: adaptive gpu_s_per_delivered_slot / sequential's",
                             ratio, 1.0))
    duplicates = sum(item["duplicate_executions"] for by_policy in results.values()
                     for item in by_policy.values())
    duplicates += cache.get("duplicate_executions", 0)
    checks.append({"name": "duplicate_executions in every run", "limit": "= 0",
                   "measured": duplicates, "met": duplicates == 0})
    return checks


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _check(name: str, measured: float | None, limit: float) -> dict[str, Any]:
    return {"name": name, "limit": f"<= {limit:g}", "measured": measured,
            "met": measured is not None and measured <= limit}


def _setup(config: RacingConfig, capacity: float, window: Sequence[TraceRequest],
           loads: dict[str, Any], wall_s: float) -> dict[str, Any]:
    pool = config.pool("adaptive")
    machine = machine_description()
    return {
        "machine": machine,
        "cpu_count": machine["cpus"],
        "python": machine["python"],
        "kafka": kafka_broker_version(),
        "source": git_state(),
        "parameters": {
            "jobs_per_run": config.jobs,
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
            "deadline_s": config.deadline_s,
            "seed": config.seed,
            "progress_every_steps": pool.progress_every_steps,
            "admission_enabled": pool.admission_enabled,
            "partitions": pool.partitions,
            "policies": list(POLICIES),
            "loads": list(config.loads),
            "cache_requests": config.cache_requests,
            "cache_load": config.cache_load,
        },
        "capacity": {"formula": CAPACITY_FORMULA, "jobs_per_s": capacity, "loads": loads},
        "trace": {"file": config.trace.name, "window": "densest", "rows": len(window),
                  "span_s": window[-1].arrival_s if window else 0.0,
                  "distinct_arrival_seconds": len({row.arrival_s for row in window})},
        "commands": run_commands("bench/results/racing.json", REPRODUCE),
        "work_dir": str(config.work_dir),
        "wall_s": wall_s,
    }


# ---- page -------------------------------------------------------------------------------------

def render_markdown(results: dict[str, Any]) -> str:
    """Render the racing section of docs/benchmarks.md."""
    setup = results["setup"]
    lines = ["## Racing", ""]
    for paragraph in _setup_paragraphs(setup):
        lines += [wrap(paragraph), ""]
    lines += _results_table(results["results"])
    lines += ["", "Targets for the adaptive policy:", ""]
    for target in results.get("targets") or targets(results["results"], results["cache"]):
        verdict = "met" if target["met"] else "NOT met"
        lines.append(f"- {target['name']} {target['limit']}: measured "
                     f"{format_number(target['measured'], 3)}, {verdict}.")
    lines.append("")
    if results["cache"]:
        lines += _cache_section(results["cache"], setup)
    machine = machine_paragraph(
        setup, compare="compare policies within one load, not absolute times across runs")
    lines += [wrap(machine), "", "Reproduce:", "", "```",
              setup["commands"]["reproduce"], "```", ""]
    if results.get("simulated"):
        lines += _simulated_section(results["simulated"])
    return "\n".join(lines)


def _simulated_section(simulated: dict[str, Any]) -> list[str]:
    config = simulated["config"]
    jobs = simulated["jobs_per_replicate"]
    paragraphs = [
        f"Simulated: `bench.racing_sim` replays the job stream above {config['replicates']} "
        f"times per (load, policy), each replicate with its own job seeds ({jobs} jobs each, "
        f"{config['replicates'] * jobs} per row), through `FlightState`, the coordinator's "
        "own decision code. Every attempt's service time and verdict come from the simulated "
        f"GPU's draw for its seed. The pool is {config['pool_slots']} slots behind two FIFO "
        "queues, follow-up attempts before first attempts, as workers take them. Kafka hops "
        f"are fixed delays: {config['dispatch_delay_s']:g} s from dispatch to the queue, "
        f"{config['score_delay_s']:g} s from a finished attempt to its verdict, "
        f"{config['cancel_delay_s']:g} s from a cancel to the freed slot. The coordinator "
        f"looks at running attempts every {config['check_interval_s']:g} s and sees the "
        "step of each attempt's latest progress report. As the workers do, an attempt "
        "reports step 1, then at most once every "
        f"{config.get('progress_min_interval_s', 0):g} s, and once more as soon as it "
        "projects past its straggler threshold, when its worker also stops it. "
        "These delays are estimates, so compare policies within one load. The p99 range "
        "lists the p99 of each of five groups of replicates; GPU time counts every "
        "attempt's seconds on a slot, cancelled ones included.",
    ]
    lines = ["### Racing, simulated", ""]
    for paragraph in paragraphs:
        lines += [wrap(paragraph), ""]
    lines += [
        "| load | policy | jobs | completed / partial / failed | p50 job (s) | p99 job (s) "
        "| p99 range (s) | p99 / best fixed | GPU s per delivered slot | wasted GPU "
        "| duplicates | fallback slots | attempts per job |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, by_policy in simulated["results"].items():
        fixed = [by_policy[name]["p99_job_s"] for name in ("sequential", "fixed_race")
                 if name in by_policy and by_policy[name]["p99_job_s"] is not None]
        best_fixed = min(fixed) if fixed else None
        for policy in [name for name in POLICIES if name in by_policy]:
            item = by_policy[policy]
            spread = [value for value in item["p99_job_s_spread"] if value is not None]
            p99_range = (f"{min(spread):.2f} - {max(spread):.2f}" if spread else "n/a")
            lines.append(
                f"| {key.removeprefix('load_')} | {policy} | {item['jobs']} "
                f"| {item['completed']} / {item['partial']} / {item['failed']} "
                f"| {format_number(item['p50_job_s'])} | {format_number(item['p99_job_s'])} "
                f"| {p99_range} | {format_number(_ratio(item['p99_job_s'], best_fixed))} "
                f"| {format_number(item['gpu_s_per_delivered_slot'], 3)} "
                f"| {format_number(item['wasted_gpu_fraction'], 3)} "
                f"| {item['duplicate_executions']} | {item['fallback_slots']} "
                f"| {format_number(item['mean_attempts_per_job'], 1)} |"
            )
    lines += ["", "Targets for the adaptive policy in the simulation:", ""]
    for target in simulated["targets"]:
        verdict = "met" if target["met"] else "NOT met"
        lines.append(f"- {target['name']} {target['limit']}: measured "
                     f"{format_number(target['measured'], 3)}, {verdict}.")
    source = simulated.get("source", {})
    commit = str(source.get("commit", "unknown"))[:12]
    changed = source.get("uncommitted_pipeline_files") or []
    state = f"commit {commit}" + (f" with uncommitted changes to {', '.join(changed)}"
                                  if changed else "")
    lines += ["", wrap(f"The simulation ran on {state} and took {simulated['wall_s']:.0f} s. "
                        "Reproduce it alone, keeping the real-pipeline results:"),
              "", "```", simulated["reproduce"], "```", ""]
    return lines


def _setup_paragraphs(setup: dict[str, Any]) -> list[str]:
    parameters = setup["parameters"]
    capacity = setup["capacity"]
    trace = setup["trace"]
    windows = ", ".join(
        f"{key.removeprefix('load_')}: {item['arrival_window_s']:.1f} s "
        f"({item['offered_jobs_per_s']:.2f} jobs/s)"
        for key, item in capacity["loads"].items()
    )
    return [
        "Racing policies on the real pipeline: a local Kafka broker, the coordinator, the "
        "post-processing stage and "
        f"{parameters['workers']} GPU worker processes with {parameters['slots_per_worker']} "
        f"slots each ({parameters['pool_slots']} slots), all as separate processes. The GPU "
        "is simulated: lognormal service time with median "
        f"{parameters['p50_service_s']:g} s and sigma {parameters['sigma']:g} "
        f"(p99 = {parameters['p99_over_p50']:.1f} x p50, mean "
        f"{parameters['mean_service_s']:.3f} s); post-processing scores the simulated "
        f"images and accepts about {parameters['acceptance']:.0%}. Every job asks for "
        f"K = {parameters['slots_per_job']} slots with at most "
        f"{parameters['max_attempts_per_slot']} attempts per slot.",
        f"Capacity: {capacity['formula']} = {capacity['jobs_per_s']:.2f} jobs/s. Arrivals are "
        f"the densest window of {trace['rows']} consecutive requests of {trace['file']} "
        f"({trace['span_s']:.0f} s in the trace, {trace['distinct_arrival_seconds']} "
        "distinct arrival seconds), compressed so that the offered load, (jobs - 1) over "
        f"the span from first to last arrival, is the given fraction of capacity: {windows}.",
        "Policies: sequential runs K attempts, then one retry per rejection; fixed_race "
        "keeps 2K attempts in flight; adaptive (the default) launches enough attempts for "
        "the observed acceptance rate to cover the open slots, plus speculative attempts "
        "while GPU slots are idle. Each (load, policy) run starts fresh processes on a "
        "fresh topic prefix, coordinator app id and consumer groups, after a warm-up job; "
        "every policy at one load replays the same jobs with the same seeds, and the policy "
        "order rotates from load to load. Each job has its own prompt, so the cache plays "
        "no part here, and admission control is off, so every policy runs every job.",
        "Columns: job latency runs from submit to outcome at the client. GPU s per "
        "delivered slot is the gpu_s of every attempt.finished event of the run (cancelled "
        "and failed attempts included) over the slots delivered. Wasted GPU is the share of "
        "those seconds spent on attempts whose image no job delivered. Duplicates counts "
        "attempts started by two workers under one epoch or running on two workers at "
        "overlapping times, read from the coordinator events topic. Wait is the time from "
        "an attempt's dispatch to its first start on a worker, for first attempts and for "
        "follow-ups (retries, replacements and re-dispatches). Load avg is the "
        "machine's 1-minute load average when the replay ended. With "
        f"{setup['cpu_count']} CPUs, values well above {setup['cpu_count']} mean that other "
        "work competed with the pipeline during that run.",
    ]


def _results_table(results: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "| load | policy | jobs | completed / partial / failed | p50 job (s) | p99 job (s) "
        "| p99 / best fixed | GPU s per delivered slot | wasted GPU | duplicates "
        "| fallback slots | attempts per job | wait p99 first / follow-up (ms) | load avg |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, by_policy in results.items():
        fixed = [by_policy[name]["p99_job_s"] for name in ("sequential", "fixed_race")
                 if name in by_policy and by_policy[name]["p99_job_s"] is not None]
        best_fixed = min(fixed) if fixed else None
        for policy in [name for name in POLICIES if name in by_policy]:
            item = by_policy[policy]
            lines.append(
                f"| {key.removeprefix('load_')} | {policy} | {item['jobs']} "
                f"| {item['completed']} / {item['partial']} / {item['failed']} "
                f"| {format_number(item['p50_job_s'])} | {format_number(item['p99_job_s'])} "
                f"| {format_number(_ratio(item['p99_job_s'], best_fixed))} "
                f"| {format_number(item['gpu_s_per_delivered_slot'], 3)} "
                f"| {format_number(item['wasted_gpu_fraction'], 3)} "
                f"| {item['duplicate_executions']} | {item['fallback_slots']} "
                f"| {format_number(item['mean_attempts_per_job'], 1)} "
                f"| {_wait_cell(item.get('queue_wait_ms'))} "
                f"| {format_number(item.get('load_average_1m'), 1)} |"
            )
    return lines


def _wait_cell(waits: dict[str, dict[str, Any]] | None) -> str:
    if not waits:
        return "n/a"
    return " / ".join(format_number(waits[kind]["p99_ms"], 0) for kind in ("first", "followup"))


def _cache_section(cache: dict[str, Any], setup: dict[str, Any]) -> list[str]:
    paragraph = (
        f"Cache: {cache['requests']} consecutive requests of {setup['trace']['file']} from "
        f"row {cache['trace_first_row']} (the stretch whose share of regenerations is "
        f"closest to the whole trace's {cache['whole_trace_regeneration_share']:.0%}), with "
        "the trace's own slot counts and derived prompts, replayed through the adaptive "
        f"pipeline at {cache['offered_load']:.0%} of capacity ({cache['mean_slots']:.2f} "
        f"mean slots per request, {cache['arrival_window_s']:.1f} s of arrivals). A request "
        "that repeats an earlier request's user, prompt lengths, model and steps is a "
        "regeneration of the same prompt. Cached slot latency is the job latency of the "
        "job each cached slot was delivered in, counted once per cached slot."
    )
    return [
        wrap(paragraph), "",
        "| requests | regenerations | regenerated slots | slots from cache "
        "| regenerations while the earlier job ran | p50 cached slot (ms) "
        "| p50 fully cached job (ms) | p50 uncached job (ms) | duplicates |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {cache['requests']} | {cache['regeneration_requests']} "
        f"| {cache['regenerated_slots']} | {cache['slots_from_cache']} "
        f"| {cache['regenerations_while_earlier_job_ran']} "
        f"| {format_number(cache['p50_cached_slot_ms'], 0)} "
        f"| {format_number(cache['p50_fully_cached_job_ms'], 0)} "
        f"| {format_number(cache['p50_uncached_job_ms'], 0)} | {cache['duplicate_executions']} |",
        "",
    ]
