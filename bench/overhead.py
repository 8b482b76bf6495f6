"""Overhead: what the pipeline itself costs, with a simulated GPU that takes no time.

One broker, one coordinator process, post-processing, the critical delivery consumer and
GPU workers whose simulated service time is about a nanosecond and whose images are always
accepted. A burst of jobs measures the maximum rate at which the coordinator completes jobs
of K slots, while py-spy samples the coordinator. Then a stream of jobs at half that rate
measures the latency each hop adds: request produced to attempt claimed, attempt finished
to slot filled, and job completed to the critical consumer's acknowledgement.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from bench.pipeline_run import (
    AttemptLog,
    JobOutcome,
    PipelineRun,
    PoolSpec,
    fresh_prefix,
    kafka_broker_version,
    machine_description,
    percentile,
    read_attempt_log,
    run_settings,
    run_until_sigterm,
)
from bench.suite_support import (
    BenchArgumentError,
    format_number,
    git_state,
    local_broker,
    machine_paragraph,
    progress,
    run_commands,
    wrap,
)
from schemas.events import (
    MAX_SLOTS,
    MAX_STEPS,
    AttemptStarted,
    AttemptStatus,
    GenerationParams,
    JobCompleted,
    JobRequested,
    utc_now,
)
from streams.client import SlotforgeClient
from streams.config import LOCAL_DIR, KafkaSettings, SimulationSettings
from streams.kafka import make_consumer, topic_partitions
from streams.racing import RacingPolicy

HOPS = ("request_to_claim", "finish_to_fill", "complete_to_ack")
# The records between which the first two hops split, for the page's breakdown.
STAGES = ("request_to_dispatch", "dispatch_to_start", "finish_to_score", "score_to_fill")
TENANT_ID = "bench"
# Targets: every hop's p99 at half the maximum rate, and the coordinator's maximum rate.
HOP_P99_TARGET_MS = 50.0
THROUGHPUT_TARGET_JOBS_PER_S = 500.0
# The simulated service time must be positive; a nanosecond is nothing next to a hop.
ZERO_SERVICE_S = 1e-9
# Seconds py-spy gets to write its profile after SIGINT.
PROFILER_STOP_S = 30.0
REPRODUCE = (
    ".venv/bin/slotforge bench overhead --out bench/results/overhead.json\n"
    ".venv/bin/python -m bench.render"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--burst-jobs", type=int, default=600,
                        help="jobs submitted at once to measure the maximum rate")
    parser.add_argument("--latency-jobs", type=int, default=300,
                        help="jobs of the stream at half the maximum rate")
    parser.add_argument("--load", type=float, default=0.5,
                        help="rate of the latency stream as a fraction of the maximum rate")
    parser.add_argument("--slots-per-job", type=int, default=4, help="slots K of every job")
    parser.add_argument("--steps", type=int, default=10,
                        help="denoising steps per attempt; each sends a progress heartbeat")
    parser.add_argument("--workers", type=int, default=2, help="GPU worker processes")
    parser.add_argument("--worker-slots", type=int, default=16,
                        help="concurrent attempts per GPU worker process")
    parser.add_argument("--profile-s", type=float, default=20.0,
                        help="seconds py-spy samples the coordinator during the burst; 0 skips")
    parser.add_argument("--work-dir", type=Path, default=LOCAL_DIR / "bench" / "overhead",
                        help="folder for the broker's data, process logs and the profile")
    parser.add_argument("--bootstrap-servers", type=str, default=None,
                        help="use this running Kafka broker instead of starting one")


@dataclass(frozen=True)
class OverheadConfig:
    """The suite's parameters, from the command line."""

    burst_jobs: int
    latency_jobs: int
    load: float
    slots_per_job: int
    steps: int
    workers: int
    worker_slots: int
    profile_s: float
    work_dir: Path
    bootstrap_servers: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> OverheadConfig:
        config = cls(burst_jobs=args.burst_jobs, latency_jobs=args.latency_jobs,
                     load=args.load, slots_per_job=args.slots_per_job, steps=args.steps,
                     workers=args.workers, worker_slots=args.worker_slots,
                     profile_s=args.profile_s, work_dir=args.work_dir,
                     bootstrap_servers=args.bootstrap_servers)
        for flag, count in (("--burst-jobs", config.burst_jobs),
                            ("--latency-jobs", config.latency_jobs)):
            if count < 2:
                raise BenchArgumentError(f"{flag} must be at least 2, got {count}")
        if not 0 < config.load <= 1:
            raise BenchArgumentError(f"--load must be in (0, 1], got {config.load}")
        bounds = {"--slots-per-job": (config.slots_per_job, MAX_SLOTS),
                  "--steps": (config.steps, MAX_STEPS),
                  "--workers": (config.workers, None),
                  "--worker-slots": (config.worker_slots, None)}
        for flag, (value, upper) in bounds.items():
            if value < 1 or (upper is not None and value > upper):
                limit = f"between 1 and {upper}" if upper is not None else "at least 1"
                raise BenchArgumentError(f"{flag} must be {limit}, got {value}")
        return config

    @property
    def pool(self) -> PoolSpec:
        simulation = SimulationSettings(enabled=True, p50_s=ZERO_SERVICE_S, sigma=0.0,
                                        acceptance=1.0)
        return PoolSpec(workers=self.workers, slots_per_worker=self.worker_slots,
                        simulation=simulation, racing_policy=RacingPolicy.ADAPTIVE)


def run(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Measure the maximum rate, then the hop latencies at a fraction of it; write the JSON."""
    config = OverheadConfig.from_args(args)
    started = time.monotonic()
    shutil.rmtree(config.work_dir / "runs", ignore_errors=True)
    run_dir = config.work_dir / "runs" / "overhead"

    with local_broker(config.work_dir, config.bootstrap_servers) as bootstrap_servers:
        settings = run_settings(bootstrap_servers, fresh_prefix("overhead"), config.pool,
                                run_dir)
        with PipelineRun(settings, config.workers, run_dir / "logs") as pipeline:
            pipeline.processes.start("delivery")
            ready_s = run_until_sigterm(pipeline.wait_ready())
            throughput = _measure_throughput(pipeline, config, run_dir)
            rate = config.load * throughput["coordinator_jobs_per_s"]
            progress(f"latency stream: {config.latency_jobs} jobs at {rate:.1f} jobs/s")
            schedule = _stream(config, rate)
            outcomes = run_until_sigterm(pipeline.replay(schedule, 120.0))
            job_ids = {request.job_id for _, request in schedule}
            events = run_until_sigterm(_read_hop_events(pipeline, job_ids))
            pipeline.check_alive()

    hops = hop_latencies(outcomes, events, config.slots_per_job)
    stages = stage_latencies(outcomes, events, config.slots_per_job)
    results = {
        "hops": {name: _summary_ms(values) for name, values in hops.items()},
        "stages": {name: _summary_ms(values) for name, values in stages.items()},
        "coordinator_jobs_per_s": throughput["coordinator_jobs_per_s"],
        "throughput": throughput,
        "latency_stream": {
            "jobs": len(outcomes),
            "ended": sum(1 for outcome in outcomes if outcome.completed is not None),
            "offered_jobs_per_s": rate,
            "p50_job_ms": _ms(percentile([outcome.latency_s for outcome in outcomes
                                          if outcome.latency_s is not None], 50)),
            "p99_job_ms": _ms(percentile([outcome.latency_s for outcome in outcomes
                                          if outcome.latency_s is not None], 99)),
        },
    }
    report = {"results": results, "targets": targets(results),
              "setup": _setup(config, ready_s, time.monotonic() - started)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report


def _request(config: OverheadConfig, index: int) -> JobRequested:
    # A unique prompt per job keeps the cache and shared flights out of the measurement.
    return JobRequested(
        tenant_id=TENANT_ID, user_id=f"user-{index % 50}", slots=config.slots_per_job,
        deadline_s=300.0, seed=index,
        params=GenerationParams(model="bench-overhead", steps=config.steps,
                                prompt=f"overhead {uuid.uuid4().hex}"),
    )


def _stream(config: OverheadConfig, rate_jobs_per_s: float) -> list[tuple[float, JobRequested]]:
    gap_s = 1.0 / rate_jobs_per_s if rate_jobs_per_s > 0 else 0.0
    return [(index * gap_s, _request(config, index)) for index in range(config.latency_jobs)]


# ---- throughput ----------------------------------------------------------------------------

def _measure_throughput(pipeline: PipelineRun, config: OverheadConfig,
                        run_dir: Path) -> dict[str, Any]:
    """Submit every burst job at once and time the coordinator's completions."""
    processes = {child.name: psutil.Process(child.pid)
                 for child in pipeline.processes.processes if child.alive()}
    cpu_before = {name: _cpu_s(process) for name, process in processes.items()}
    coordinator = next(child for child in pipeline.processes.processes
                       if child.service == "coordinator")
    profile_path = run_dir / "coordinator-profile.txt"
    profiler = _start_profiler(coordinator.pid, config.profile_s, profile_path)
    profiler_started = time.monotonic()

    input_topics = [pipeline.settings.topics.jobs_requested,
                    pipeline.settings.topics.coordinator_events]
    records_before = run_until_sigterm(_record_count(pipeline.settings.kafka, input_topics))

    progress(f"burst: {config.burst_jobs} jobs at once")
    started = time.monotonic()
    completed = run_until_sigterm(_burst(pipeline, [_request(config, index)
                                                    for index in range(config.burst_jobs)]))
    wall_s = time.monotonic() - started
    cpu_s = {name: _cpu_s(process) - cpu_before[name]
             for name, process in processes.items() if process.is_running()}
    cpu_share = {name: used_s / wall_s for name, used_s in cpu_s.items()}
    # Every record on the coordinator's two input topics during the burst counts, late
    # events of the warm-up job included. Each record is one faust event for the coordinator.
    records_after = run_until_sigterm(_record_count(pipeline.settings.kafka, input_topics))
    consumed = records_after - records_before

    profile: dict[str, Any] = {}
    if profiler is not None:
        sampled_s = _stop_profiler(profiler, profiler_started)
        profile = summarize_profile(profile_path) if profile_path.exists() else {
            "error": f"py-spy wrote no profile; see {profile_path.with_suffix('.log')}"}
        profile["sampled_s"] = min(sampled_s, config.profile_s)

    # Completion times as the coordinator stamped them; the middle 80% leaves out the
    # ramp-up and the drain of the burst.
    stamps = sorted(item.completed_at.timestamp() for item in completed)
    low, high = int(len(stamps) * 0.1), max(int(len(stamps) * 0.9) - 1, 0)
    middle_s = stamps[high] - stamps[low] if high > low else 0.0
    jobs_per_s = (high - low) / middle_s if middle_s > 0 else 0.0
    progress(f"  burst: {len(completed)} of {config.burst_jobs} jobs in {wall_s:.1f} s, "
              f"{jobs_per_s:.1f} jobs/s; coordinator CPU {cpu_share.get('coordinator', 0):.0%}")
    return {
        "burst_jobs": config.burst_jobs,
        "completed": len(completed),
        "wall_s": wall_s,
        "coordinator_jobs_per_s": jobs_per_s,
        "cpu_share": cpu_share,
        "coordinator_records": consumed,
        "coordinator_records_per_job": consumed / len(completed) if completed else None,
        "coordinator_cpu_ms_per_job": (1000.0 * cpu_s.get("coordinator", 0.0) / len(completed)
                                       if completed else None),
        "coordinator_cpu_ms_per_record": (1000.0 * cpu_s.get("coordinator", 0.0) / consumed
                                          if consumed else None),
        "profile": profile,
        "profile_file": str(profile_path),
    }


async def _record_count(kafka: KafkaSettings, topics: Sequence[str]) -> int:
    """Sum the end offsets of every partition of ``topics``."""
    partitions = await topic_partitions(kafka, *topics)
    consumer = make_consumer(kafka, group_id=None)
    await consumer.start()
    try:
        ends = await consumer.end_offsets(partitions)
    finally:
        await consumer.stop()
    return sum(ends.values())


def _cpu_s(process: psutil.Process) -> float:
    try:
        times = process.cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return times.user + times.system


async def _burst(pipeline: PipelineRun, requests: Sequence[JobRequested]) -> list[JobCompleted]:
    async with SlotforgeClient(pipeline.settings.kafka) as client:
        now = utc_now()
        stamped = [request.model_copy(update={"requested_at": now, "emitted_at": now})
                   for request in requests]
        # Concurrent sends share producer batches, so the burst reaches the broker faster
        # than the coordinator can take it.
        await asyncio.gather(*(client.submit(request) for request in stamped))
        results = await asyncio.gather(*(client.wait(request.job_id, 300.0)
                                         for request in stamped), return_exceptions=True)
    return [item for item in results if isinstance(item, JobCompleted)]


# ---- profile -------------------------------------------------------------------------------

def _start_profiler(pid: int, duration_s: float, out: Path) -> subprocess.Popen[bytes] | None:
    if duration_s <= 0:
        return None
    py_spy = Path(sys.executable).parent / "py-spy"
    if not py_spy.exists():
        progress("py-spy not installed (pip install -e '.[bench]'); skipping the profile")
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".log"), "wb") as log:
        return subprocess.Popen(
            [str(py_spy), "record", "--pid", str(pid), "--duration", str(int(duration_s)),
             "--rate", "200", "--format", "raw", "--output", str(out), "--nonblocking"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)


def _stop_profiler(profiler: subprocess.Popen[bytes], started: float) -> float:
    """Stop py-spy once the burst is over, and return the seconds it sampled.

    On SIGINT py-spy stops sampling and writes what it has, so a burst shorter than
    ``--profile-s`` neither waits for it nor gets idle samples.
    """
    if profiler.poll() is None:
        profiler.send_signal(signal.SIGINT)
    try:
        profiler.wait(timeout=PROFILER_STOP_S)
    except subprocess.TimeoutExpired:
        progress(f"py-spy did not stop within {PROFILER_STOP_S:g} s of SIGINT; killing it")
        profiler.kill()
        profiler.wait()
    return time.monotonic() - started


def summarize_profile(path: Path, top: int = 12) -> dict[str, Any]:
    """Sum py-spy's collapsed stacks by leaf function and by the leaf's top-level package.

    Each line of the raw format is ``frame;frame;...;leaf count``, outermost frame first.
    A frame reads ``function (file:line)``, where py-spy gives ``file`` relative to its
    ``sys.path`` entry, e.g. ``faust/streams.py``.
    """
    self_samples: collections.Counter[str] = collections.Counter()
    package_samples: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_parse_frame(frame) for frame in stack.split(";")]
        function, file = frames[-1]
        self_samples[f"{function} ({file})"] += count
        package_samples[_package(file)] += count
        project = {f"{name} ({where})" for name, where in frames
                   if where.split("/")[0] in PROJECT_PACKAGES}
        for name in project:
            inclusive[name] += count
    if not total:
        return {"samples": 0}
    return {
        "samples": total,
        "self_by_package": {name: count / total
                            for name, count in package_samples.most_common(top)},
        "self_by_function": {name: count / total
                             for name, count in self_samples.most_common(top)},
        "inclusive_project_functions": {name: count / total
                                        for name, count in inclusive.most_common(top)},
    }


STDLIB_DIR = Path(sysconfig.get_paths()["stdlib"])
PROJECT_PACKAGES = frozenset({"streams", "gpu_inference", "schemas", "consumers", "infra",
                              "bench"})


def _parse_frame(frame: str) -> tuple[str, str]:
    function, _, location = frame.partition(" (")
    file = location.rstrip(")").rsplit(":", 1)[0]
    # Absolute paths appear for files outside sys.path; keep the part a reader recognizes.
    for marker in ("/site-packages/", "/lib/python3.11/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return function, file


def _package(file: str) -> str:
    top = file.split("/")[0].removesuffix(".py")
    if top in PROJECT_PACKAGES:
        return f"slotforge {top}"
    # A relative name like trace/__init__.py may be a third-party package whose name a
    # stdlib module also has, so only a file that exists in the stdlib folder counts.
    if top.startswith("<frozen") or (STDLIB_DIR / file).exists():
        return f"stdlib {top}"
    return top


# ---- hops ----------------------------------------------------------------------------------

async def _read_hop_events(pipeline: PipelineRun, job_ids: set[str],
                           settle_s: float = 30.0) -> AttemptLog:
    """Read the coordinator events until every measured job has its delivery ack."""
    deadline = time.monotonic() + settle_s
    while True:
        log = await read_attempt_log(pipeline.settings.kafka,
                                     pipeline.settings.topics.coordinator_events, job_ids,
                                     dispatch_topics=list(pipeline.settings.topics.attempt_topics))
        acked = {ack.job_id for ack in log.acks}
        if job_ids <= acked or time.monotonic() > deadline:
            return log
        await asyncio.sleep(1.0)


def hop_latencies(outcomes: Sequence[JobOutcome], events: AttemptLog,
                  slots_per_job: int) -> dict[str, list[float]]:
    """Time the three hops of every completed job, in milliseconds, from event timestamps.

    request_to_claim: the job's request time to the start of each of its first K attempts,
    which a worker starts once it holds the lease, granted with the dispatch or on its claim.
    finish_to_fill: the finish of the last delivered attempt to the job's completion, when
    the coordinator filled that last slot. complete_to_ack: the completion to the delivery
    consumer's ack.
    """
    starts = _first_starts(events, slots_per_job)
    finish_at = _finish_times(events)
    ack_at: dict[str, datetime] = {}
    for ack in events.acks:
        if ack.consumer == "delivery":
            ack_at.setdefault(ack.job_id, ack.emitted_at)

    hops: dict[str, list[float]] = {name: [] for name in HOPS}
    for outcome in outcomes:
        completed = outcome.completed
        if completed is None:
            continue
        for started in starts.get(completed.job_id, []):
            hops["request_to_claim"].append(
                _between_ms(started.started_at, completed.requested_at))
        delivered = [finish_at[slot.attempt_id] for slot in completed.slots
                     if slot.attempt_id in finish_at]
        if delivered:
            hops["finish_to_fill"].append(_between_ms(completed.completed_at, max(delivered)))
        if completed.job_id in ack_at:
            hops["complete_to_ack"].append(
                _between_ms(ack_at[completed.job_id], completed.completed_at))
    return hops


def stage_latencies(outcomes: Sequence[JobOutcome], events: AttemptLog,
                    slots_per_job: int) -> dict[str, list[float]]:
    """Split the first two hops at the records between them, in milliseconds.

    request_to_dispatch and dispatch_to_start split request_to_claim at the dispatch record of
    each of the first K attempts. finish_to_score and score_to_fill split finish_to_fill at
    the post-processing verdict of the job's last delivered attempt.
    """
    dispatched_at = {(event.attempt_id, event.epoch): event.emitted_at
                     for event in events.dispatched}
    scored_at = {event.attempt_id: event.emitted_at for event in events.scored}
    finish_at = _finish_times(events)
    starts = _first_starts(events, slots_per_job)

    stages: dict[str, list[float]] = {name: [] for name in STAGES}
    for outcome in outcomes:
        completed = outcome.completed
        if completed is None:
            continue
        for started in starts.get(completed.job_id, []):
            dispatched = dispatched_at.get((started.attempt_id, started.epoch))
            if dispatched is not None:
                stages["request_to_dispatch"].append(
                    _between_ms(dispatched, completed.requested_at))
                stages["dispatch_to_start"].append(_between_ms(started.started_at, dispatched))
        delivered = [slot.attempt_id for slot in completed.slots
                     if slot.attempt_id in finish_at and slot.attempt_id in scored_at]
        if delivered:
            last = max(delivered, key=lambda attempt_id: finish_at[attempt_id])
            stages["finish_to_score"].append(_between_ms(scored_at[last], finish_at[last]))
            stages["score_to_fill"].append(_between_ms(completed.completed_at, scored_at[last]))
    return stages


def _first_starts(events: AttemptLog, slots_per_job: int) -> dict[str, list[AttemptStarted]]:
    """Return the first ``slots_per_job`` attempt starts of each job, earliest first."""
    starts: dict[str, list[AttemptStarted]] = collections.defaultdict(list)
    for started in events.started:
        starts[started.job_id].append(started)
    return {job_id: sorted(job_starts, key=lambda event: event.started_at)[:slots_per_job]
            for job_id, job_starts in starts.items()}


def _finish_times(events: AttemptLog) -> dict[str, datetime]:
    """Return when each attempt that succeeded reported its finish."""
    return {event.attempt_id: event.emitted_at for event in events.finished
            if event.status is AttemptStatus.SUCCEEDED}


def _between_ms(later: datetime, earlier: datetime) -> float:
    return (later - earlier).total_seconds() * 1000.0


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def _summary_ms(values: Sequence[float]) -> dict[str, Any]:
    return {"samples": len(values), "p50_ms": percentile(values, 50),
            "p99_ms": percentile(values, 99)}


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Check the overhead targets, returning each measurement with a verdict."""
    checks = []
    for name in HOPS:
        measured = results["hops"][name]["p99_ms"]
        checks.append({"name": f"hops.{name}.p99_ms", "limit": f"<= {HOP_P99_TARGET_MS:g}",
                       "measured": measured,
                       "met": measured is not None and measured <= HOP_P99_TARGET_MS})
    rate = results["coordinator_jobs_per_s"]
    checks.append({"name": "coordinator_jobs_per_s",
                   "limit": f">= {THROUGHPUT_TARGET_JOBS_PER_S:g}", "measured": rate,
                   "met": rate >= THROUGHPUT_TARGET_JOBS_PER_S})
    return checks


def _setup(config: OverheadConfig, ready_s: float, wall_s: float) -> dict[str, Any]:
    machine = machine_description()
    return {
        "machine": machine,
        "cpu_count": machine["cpus"],
        "kafka": kafka_broker_version(),
        "source": git_state(),
        "load_average_1m": os.getloadavg()[0],
        "parameters": {
            "burst_jobs": config.burst_jobs,
            "latency_jobs": config.latency_jobs,
            "load": config.load,
            "slots_per_job": config.slots_per_job,
            "steps": config.steps,
            "workers": config.workers,
            "slots_per_worker": config.worker_slots,
            "service_s": ZERO_SERVICE_S,
            "acceptance": 1.0,
            "racing_policy": config.pool.racing_policy.value,
            "partitions": config.pool.partitions,
            "profile_s": config.profile_s,
        },
        "ready_s": ready_s,
        "commands": run_commands("bench/results/overhead.json", REPRODUCE),
        "work_dir": str(config.work_dir),
        "wall_s": wall_s,
    }


# ---- page -------------------------------------------------------------------------------------

def render_markdown(results: dict[str, Any]) -> str:
    """Render the overhead section of docs/benchmarks.md."""
    setup = results["setup"]
    parameters = setup["parameters"]
    measured = results["results"]
    throughput = measured["throughput"]
    stream = measured["latency_stream"]
    lines = ["## Overhead of the pipeline", ""]
    paragraphs = [
        "What slotforge itself costs, with a simulated GPU that takes no time (service time "
        f"{parameters['service_s']:g} s, every image accepted): one coordinator process, "
        f"post-processing, the delivery consumer and {parameters['workers']} GPU worker "
        f"processes with {parameters['slots_per_worker']} slots each, on a local broker "
        f"with {parameters['partitions']} partitions per topic. Every job asks for K = "
        f"{parameters['slots_per_job']} slots of {parameters['steps']} steps, with a "
        "progress heartbeat per step.",
        f"Maximum rate: {throughput['burst_jobs']} jobs submitted at once; "
        "coordinator_jobs_per_s is the rate of the coordinator's completion timestamps over "
        "the middle 80% of the burst. Hops: a stream of "
        f"{stream['jobs']} jobs at {parameters['load']:.0%} of that rate "
        f"({stream['offered_jobs_per_s']:.1f} jobs/s), timed from event timestamps of one "
        "machine's clock. request_to_claim runs from the job's request to the start of each "
        "of its first K attempts. A worker starts an attempt once it holds its lease, "
        "granted with the dispatch or on its claim. finish_to_fill runs from the finish of "
        "a job's last delivered attempt to the job's completion, when the coordinator "
        "filled that slot (post-processing included). complete_to_ack runs from the "
        "completion to the delivery consumer's acknowledgement.",
    ]
    for paragraph in paragraphs:
        lines += [wrap(paragraph), ""]
    lines += ["| hop | samples | p50 (ms) | p99 (ms) |", "| --- | --- | --- | --- |"]
    for name in [hop for hop in HOPS if hop in measured["hops"]]:
        item = measured["hops"][name]
        lines.append(f"| {name} | {item['samples']} | {format_number(item['p50_ms'], 1)} "
                     f"| {format_number(item['p99_ms'], 1)} |")
    lines += _stage_lines(measured.get("stages") or {})
    lines += _throughput_lines(measured, setup)
    lines += ["", "Targets:", ""]
    for target in results["targets"]:
        verdict = "met" if target["met"] else "NOT met"
        lines.append(f"- {target['name']} {target['limit']}: measured "
                     f"{format_number(target['measured'], 1)}, {verdict}.")
    lines += [""]
    profile = throughput.get("profile") or {}
    lines += _profile_lines(profile, profile.get("sampled_s", parameters["profile_s"]))
    machine = machine_paragraph(
        setup, compare=f"absolute times are noisy (1-minute load average at the end: "
                       f"{setup['load_average_1m']:.1f})")
    lines += [
        wrap(machine),
        "", "Reproduce:", "", "```", setup["commands"]["reproduce"], "```", "",
    ]
    return "\n".join(lines)


def _stage_lines(stages: dict[str, Any]) -> list[str]:
    if not stages:
        return []
    lines = ["", wrap("The first two hops split at the records between them: the attempt's "
                      "dispatch, and the post-processing verdict of the job's last delivered "
                      "attempt."), "",
             "| stage | samples | p50 (ms) | p99 (ms) |", "| --- | --- | --- | --- |"]
    for name in [stage for stage in STAGES if stage in stages]:
        item = stages[name]
        lines.append(f"| {name} | {item['samples']} | {format_number(item['p50_ms'], 1)} "
                     f"| {format_number(item['p99_ms'], 1)} |")
    return lines


def _throughput_lines(measured: dict[str, Any], setup: dict[str, Any]) -> list[str]:
    throughput = measured["throughput"]
    stream = measured["latency_stream"]
    lines: list[str] = []
    lines += [
        "",
        wrap(f"coordinator_jobs_per_s: {format_number(measured['coordinator_jobs_per_s'], 1)} "
             f"({throughput['completed']} of {throughput['burst_jobs']} burst jobs completed "
             f"in {throughput['wall_s']:.1f} s). Job latency in the stream: p50 "
             f"{format_number(stream['p50_job_ms'], 0)} ms, p99 "
             f"{format_number(stream['p99_job_ms'], 0)} ms."),
        "",
        "CPU share of each process during the burst (1.0 = one core busy):",
        "",
        "| process | CPU share |",
        "| --- | --- |",
    ]
    for name, share in sorted(throughput["cpu_share"].items(), key=lambda item: -item[1]):
        lines.append(f"| {name} | {share:.2f} |")
    total_share = sum(throughput["cpu_share"].values())
    cpus = setup["machine"]["cpus"] or 1
    load = setup["load_average_1m"]
    lines += ["", wrap(
        f"Together the pipeline's processes used {total_share:.2f} of a core during the burst. "
        f"With a 1-minute load average of {load:.1f} on {cpus} CPUs at the end of the suite, "
        f"a runnable process got roughly {min(1.0, cpus / max(load, 1.0)):.2f} of a core (an "
        "estimate from the load average), so low shares here mean the processes waited for "
        "a CPU or for the broker, not that they had no work.")]
    lines += _cost_lines(throughput)
    per_job_ms = throughput.get("coordinator_cpu_ms_per_job")
    if per_job_ms:
        needed = stream["offered_jobs_per_s"] * per_job_ms / 1000.0
        lines += ["", wrap(
            f"The latency stream's {stream['offered_jobs_per_s']:.1f} jobs/s needed about "
            f"{needed:.2f} of a core for the coordinator alone (offered rate times CPU per "
            f"job, an estimate). Where that nears the share a process got at the load above, "
            "the hops measure queueing for a CPU, not the pipeline's own latency.")]
    return lines


def _cost_lines(throughput: dict[str, Any]) -> list[str]:
    per_job_ms = throughput.get("coordinator_cpu_ms_per_job")
    per_record_ms = throughput.get("coordinator_cpu_ms_per_record")
    records_per_job = throughput.get("coordinator_records_per_job")
    if not per_job_ms or not per_record_ms or not records_per_job:
        return []
    budget_ms = 1000.0 / THROUGHPUT_TARGET_JOBS_PER_S
    return ["", wrap(
        f"Cost per job: the coordinator consumed {records_per_job:.1f} records per burst job "
        "(the request, the delivery acknowledgement, and per attempt its claim, start, "
        f"progress heartbeats, finish and verdict) and used {per_job_ms:.1f} ms of CPU per "
        f"job, {per_record_ms:.2f} ms per record. Even with a whole core to itself it would "
        f"complete at most about {1000.0 / per_job_ms:.0f} jobs/s (an estimate: 1000 ms over "
        f"the CPU per job). {THROUGHPUT_TARGET_JOBS_PER_S:g} jobs/s on one core allows "
        f"{budget_ms:g} ms of CPU per job, the cost of {budget_ms / per_record_ms:.1f} "
        "records here.")]


def _by_share(shares: dict[str, float]) -> list[tuple[str, float]]:
    # The results JSON is written with sorted keys, so restore the order by share.
    return sorted(shares.items(), key=lambda item: -item[1])


def _profile_lines(profile: dict[str, Any], profile_s: float) -> list[str]:
    if not profile.get("samples"):
        return [wrap(f"No coordinator profile: {profile.get('error', 'py-spy was skipped')}."),
                ""]
    lines = [wrap(f"Where the coordinator's time goes: py-spy sampled it for {profile_s:.1f} s "
                   f"of the burst ({profile['samples']} samples, idle samples excluded). "
                   "Share of samples by the package of the running function:"), ""]
    lines += ["| package | share |", "| --- | --- |"]
    lines += [f"| {name} | {share:.1%} |" for name, share in _by_share(profile["self_by_package"])]
    lines += ["", "Functions running when sampled:", "", "| function | share |", "| --- | --- |"]
    lines += [f"| `{name}` | {share:.1%} |"
              for name, share in _by_share(profile["self_by_function"])]
    lines += ["", "Project functions on the stack (inclusive):", "", "| function | share |",
              "| --- | --- |"]
    lines += [f"| `{name}` | {share:.1%} |"
              for name, share in _by_share(profile["inclusive_project_functions"])]
    return [*lines, ""]
