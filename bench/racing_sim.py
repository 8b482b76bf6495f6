"""Discrete-event simulation of the racing benchmark, driving the coordinator's flight code.

The real-pipeline benchmark runs 80 jobs per (load, policy), so its p99 rests on one or two
jobs. This simulation replays the same job stream many times over: each replicate is the
real run's compressed trace window with its own job seeds. Every decision comes from
``FlightState``, the same code the coordinator runs: admission, the racing policy, the
cancellation of surplus attempts and fallback. Every attempt's service time and verdict
come from ``SimulatedRunner``'s draw for its seed, as on the real simulated GPU.

The pool is ``pool_slots`` slots fed by two FIFO queues of dispatched attempts, follow-ups
first, as workers fetch a tier's follow-up topic before its first attempts. Kafka hops
are fixed delays: from a dispatch decision to the queue, from a finished attempt to its
verdict at the coordinator, and from a cancel decision to the freed slot. A cancelled
attempt that no slot took yet is dropped from the queue without running. As on the real
workers, an attempt that projects past its dispatch's straggler threshold stops itself.

NOTE: claims, leases, worker batching and Kafka partitions are not modelled, and the pool
view is exact, where the coordinator's comes from worker status reports up to one
interval old. Compare policies within one load rather than trusting absolute times.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from bench.pipeline_run import percentile
from gpu_inference.simulated import SimulatedRunner
from schemas.events import (
    AttemptFinished,
    AttemptStarted,
    AttemptStatus,
    JobRequested,
    ResultScored,
)
from streams.config import SimulationSettings
from streams.flight import Decision, FlightLimits, FlightState, PoolView
from streams.racing import (
    STRAGGLER_ERROR_TYPE,
    STRAGGLER_MIN_STEPS,
    AcceptanceEstimator,
    AttemptRun,
    RacingPolicy,
    ServiceTimes,
    straggler_threshold_s,
)
from streams.trace_replay import TraceRequest, compress, to_job_request

SIM_WORKER = "sim-worker"
_EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
_ENQUEUE, _FINISH, _SCORE, _CANCELLED, _DEADLINE, _ARRIVE, _CHECK, _STOP = range(8)


@dataclass(frozen=True)
class SimConfig:
    """The simulated pool, workload and Kafka delays; durations are in seconds."""

    replicates: int = 25
    pool_slots: int = 8
    slots_per_job: int = 4
    p50_s: float = 0.2
    sigma: float = 0.99
    acceptance: float = 0.5
    deadline_s: float = 300.0
    max_attempts_per_slot: int = 4
    acceptance_prior: float = 0.5
    # NOTE: estimates of one Kafka round trip each on an idle machine, not measured values.
    dispatch_delay_s: float = 0.03
    score_delay_s: float = 0.03
    cancel_delay_s: float = 0.03
    # How often the coordinator looks at running attempts' progress.
    check_interval_s: float = 0.05
    # The worker's shortest time between two progress reports. A straggling attempt
    # reports once more as soon as it projects past its threshold.
    progress_min_interval_s: float = 0.25
    seed: int = 7

    @property
    def mean_service_s(self) -> float:
        return self.p50_s * math.exp(self.sigma ** 2 / 2)


def last_report_step(steps_done: int, step_s: float, total_steps: int, min_interval_s: float,
                     straggler_remaining_s: float | None) -> int:
    """Return the step of a worker's latest progress report, 0 before the first.

    The worker reports step 1, then the first step at least ``min_interval_s`` after its
    previous report; the steps of a simulated attempt take equal time. At that constant
    rate a projection only shrinks, so the worker's straggler check can only fire at the
    first step the rule judges.
    """
    if steps_done < 1:
        return 0
    every = max(1, math.ceil(min_interval_s / step_s - 1e-9))
    reported = 1 + every * ((steps_done - 1) // every)
    judged = 1 + STRAGGLER_MIN_STEPS
    if (straggler_remaining_s is not None and steps_done >= judged
            and step_s * (total_steps - judged) > straggler_remaining_s):
        reported = max(reported, judged)
    return reported


@dataclass
class _Attempt:
    attempt_id: str
    epoch: int
    job_key: str
    job_id: str
    seed: int
    service_s: float
    accepted: bool
    score: float
    steps: int
    followup: bool = False
    # The dispatch's straggler threshold, which the worker checks at every step.
    straggler_remaining_s: float | None = None
    started_s: float | None = None
    cancelled: bool = False
    token: int = 0


@dataclass
class _Job:
    job_id: str
    job_key: str
    arrival_s: float
    slots: int
    ended_s: float | None = None
    status: str | None = None
    delivered: list[str] = field(default_factory=list)
    fallback: int = 0
    attempts: int = 0


@dataclass
class ReplicateResult:
    """Outcome of one replicate of the job stream, pooled with the others afterwards."""

    latencies_s: list[float]
    statuses: list[str]
    delivered_slots: int
    fallback_slots: int
    gpu_s: float
    useful_gpu_s: float
    attempts_started: int
    attempts_per_job: list[int]
    duplicate_executions: int
    cancel_reasons: dict[str, int]


class RacingSimulation:
    """One replicate: the jobs of ``schedule`` raced on the pool under one policy."""

    def __init__(self, config: SimConfig, policy: RacingPolicy,
                 schedule: Sequence[tuple[float, JobRequested]]) -> None:
        self.config = config
        self.limits = FlightLimits(max_attempts_per_slot=config.max_attempts_per_slot,
                                   policy=policy)
        self.schedule = schedule
        self.runner = SimulatedRunner(SimulationSettings(
            enabled=True, p50_s=config.p50_s, sigma=config.sigma,
            acceptance=config.acceptance))
        self.acceptance = AcceptanceEstimator(prior_rate=config.acceptance_prior)
        self.service_times = ServiceTimes()
        self.flights: dict[str, FlightState] = {}
        self.jobs: dict[str, _Job] = {}
        self.attempts: dict[tuple[str, int], _Attempt] = {}
        self.queue: deque[_Attempt] = deque()
        self.followups: deque[_Attempt] = deque()
        self.running: dict[str, _Attempt] = {}
        self.in_transit = 0
        self.free_slots = config.pool_slots
        self.events: list[tuple[float, int, int, Any]] = []
        self.order = itertools.count()
        self.now_s = 0.0
        self.gpu_s = 0.0
        self.gpu_by_attempt: dict[str, float] = {}
        self.started: dict[tuple[str, int], int] = {}
        self.cancel_reasons: dict[str, int] = {}
        self.checking = False

    # ---- event loop ----------------------------------------------------------------------

    def _push(self, at_s: float, kind: int, item: Any) -> None:
        heapq.heappush(self.events, (at_s, kind, next(self.order), item))

    def run(self) -> ReplicateResult:
        for arrival_s, request in self.schedule:
            self._push(arrival_s, _ARRIVE, request)
        while self.events:
            self.now_s, kind, _, item = heapq.heappop(self.events)
            if kind == _ARRIVE:
                self._arrive(item)
            elif kind == _ENQUEUE:
                self.in_transit -= 1
                if not item.cancelled:
                    (self.followups if item.followup else self.queue).append(item)
            elif kind == _FINISH:
                self._finish(item)
            elif kind == _SCORE:
                self._score(item)
            elif kind == _CANCELLED:
                self._cancelled(item)
            elif kind == _DEADLINE:
                self._deadline(item)
            elif kind == _STOP:
                self._stop(item)
            else:
                self._check()
            self._start_queued()
        return self._result()

    def _at(self) -> datetime:
        return _EPOCH + timedelta(seconds=self.now_s)

    def _pool(self, flight: FlightState) -> PoolView:
        # Like the coordinator, measure the step rate from the first report to the latest.
        running = {}
        for attempt in self.running.values():
            reported = self._reported_step(attempt)
            if attempt.job_key == flight.job_key and reported >= 1:
                running[attempt.attempt_id] = AttemptRun(
                    running_s=(reported - 1) * attempt.service_s / attempt.steps,
                    steps_done=reported - 1, total_steps=attempt.steps - 1)
        idle = self.free_slots - len(self.queue) - len(self.followups) - self.in_transit
        return PoolView(acceptance_rate=self.acceptance.rate("sim"), idle_slots=idle,
                        running=running,
                        typical_service_s=self.service_times.median_s("sim"))

    def _reported_step(self, attempt: _Attempt) -> int:
        return last_report_step(self._steps_done(attempt), attempt.service_s / attempt.steps,
                                attempt.steps, self.config.progress_min_interval_s,
                                attempt.straggler_remaining_s)

    def _steps_done(self, attempt: _Attempt) -> int:
        assert attempt.started_s is not None
        fraction = (self.now_s - attempt.started_s) / attempt.service_s
        return min(attempt.steps, int(fraction * attempt.steps))

    # ---- transitions -----------------------------------------------------------------------

    def _arrive(self, request: JobRequested) -> None:
        flight = FlightState.for_request(request)
        self.flights[flight.job_key] = flight
        self.jobs[request.job_id] = _Job(request.job_id, flight.job_key, self.now_s,
                                         request.slots)
        self._push(self.now_s + request.deadline_s, _DEADLINE, request.job_id)
        self._apply(flight, flight.admit(request, self._at(), self.limits, self._pool(flight)))
        if not self.checking:
            self.checking = True
            self._push(self.now_s + self.config.check_interval_s, _CHECK, None)

    def _apply(self, flight: FlightState, decision: Decision) -> None:
        for cancel in decision.cancel:
            self._cancel(cancel.attempt_id, cancel.epoch, cancel.reason)
        for dispatch in decision.dispatch:
            service_s, accepted, _, _ = self.runner._draw(dispatch.seed)  # noqa: SLF001
            score = random.Random(dispatch.seed).random() / 2 + (0.5 if accepted else 0.0)
            threshold_s = None
            if self.limits.policy is RacingPolicy.ADAPTIVE and flight.replaces_stragglers(
                    dispatch.job_id):
                threshold_s = straggler_threshold_s(self.service_times.median_s("sim"))
            attempt = _Attempt(dispatch.attempt_id, dispatch.epoch, flight.job_key,
                               dispatch.job_id, dispatch.seed, service_s, accepted, score,
                               dispatch.params.steps, dispatch.followup, threshold_s)
            self.attempts[(attempt.attempt_id, attempt.epoch)] = attempt
            self.jobs[dispatch.job_id].attempts += 1
            self.in_transit += 1
            self._push(self.now_s + self.config.dispatch_delay_s, _ENQUEUE, attempt)
        for completed in decision.completed:
            job = self.jobs[completed.job_id]
            job.ended_s = self.now_s
            job.status = completed.status.value
            job.delivered = [slot.attempt_id for slot in completed.slots if not slot.cached]
            job.fallback = sum(1 for slot in completed.slots if slot.fallback)

    def _start_queued(self) -> None:
        while self.free_slots > 0 and (self.followups or self.queue):
            attempt = (self.followups or self.queue).popleft()
            if attempt.cancelled:
                continue
            self.free_slots -= 1
            attempt.started_s = self.now_s
            self.running[attempt.attempt_id] = attempt
            marker = (attempt.attempt_id, attempt.epoch)
            self.started[marker] = self.started.get(marker, 0) + 1
            flight = self.flights[attempt.job_key]
            self._apply(flight, flight.on_started(AttemptStarted(
                attempt_id=attempt.attempt_id, job_id=attempt.job_id, job_key=attempt.job_key,
                epoch=attempt.epoch, worker_id=SIM_WORKER, started_at=self._at())))
            self._push(self.now_s + attempt.service_s, _FINISH, (attempt, attempt.token))
            stop_s = self._straggler_stop_s(attempt)
            if stop_s is not None:
                self._push(self.now_s + stop_s, _STOP, (attempt, attempt.token))

    @staticmethod
    def _straggler_stop_s(attempt: _Attempt) -> float | None:
        """Return the seconds after its start at which the worker stops a straggler, or None.

        The worker judges at the first step the rule allows, as in ``last_report_step``.
        Simulated steps take equal time, so no later step can change the verdict.
        """
        judged = 1 + STRAGGLER_MIN_STEPS
        if attempt.straggler_remaining_s is None or attempt.steps <= judged:
            return None
        step_s = attempt.service_s / attempt.steps
        if step_s * (attempt.steps - judged) <= attempt.straggler_remaining_s:
            return None
        return judged * step_s

    def _release(self, attempt: _Attempt) -> float:
        assert attempt.started_s is not None
        gpu_s = self.now_s - attempt.started_s
        self.running.pop(attempt.attempt_id, None)
        self.free_slots += 1
        self.gpu_s += gpu_s
        self.gpu_by_attempt[attempt.attempt_id] = gpu_s
        return gpu_s

    def _finish(self, item: tuple[_Attempt, int]) -> None:
        attempt, token = item
        if token != attempt.token or attempt.attempt_id not in self.running:
            return
        # A cancelled attempt still running here finished before the cancel reached its
        # worker, which reports it as succeeded, as the real worker does.
        gpu_s = self._release(attempt)
        self.service_times.observe("sim", gpu_s)
        flight = self.flights[attempt.job_key]
        uri = f"file:///sim/{attempt.attempt_id}.png"
        self._apply(flight, flight.on_finished(AttemptFinished(
            attempt_id=attempt.attempt_id, job_id=attempt.job_id, job_key=attempt.job_key,
            epoch=attempt.epoch, worker_id=SIM_WORKER, status=AttemptStatus.SUCCEEDED,
            slot=0, artifact_uri=uri, gpu_s=gpu_s), self._at(), self.limits,
            self._pool(flight)))
        self._push(self.now_s + self.config.score_delay_s, _SCORE, attempt)

    def _stop(self, item: tuple[_Attempt, int]) -> None:
        attempt, token = item
        if token != attempt.token or attempt.attempt_id not in self.running:
            return
        gpu_s = self._release(attempt)
        if not attempt.cancelled:
            label = "straggler stopped by its worker"
            self.cancel_reasons[label] = self.cancel_reasons.get(label, 0) + 1
        flight = self.flights[attempt.job_key]
        self._apply(flight, flight.on_finished(AttemptFinished(
            attempt_id=attempt.attempt_id, job_id=attempt.job_id, job_key=attempt.job_key,
            epoch=attempt.epoch, worker_id=SIM_WORKER, status=AttemptStatus.CANCELLED,
            slot=0, gpu_s=gpu_s, error="straggler", error_type=STRAGGLER_ERROR_TYPE),
            self._at(), self.limits, self._pool(flight)))

    def _score(self, attempt: _Attempt) -> None:
        flight = self.flights[attempt.job_key]
        record = flight.attempts.get(attempt.attempt_id)
        if record is not None and record.epoch == attempt.epoch and record.score is None:
            self.acceptance.observe("sim", attempt.accepted)
        self._apply(flight, flight.on_scored(ResultScored(
            attempt_id=attempt.attempt_id, job_id=attempt.job_id, job_key=attempt.job_key,
            epoch=attempt.epoch, slot=0, artifact_uri=f"file:///sim/{attempt.attempt_id}.png",
            score=attempt.score, accepted=attempt.accepted, reason="simulated verdict"),
            self._at(), self.limits, self._pool(flight)))

    def _cancel(self, attempt_id: str, epoch: int, reason: str) -> None:
        attempt = self.attempts.get((attempt_id, epoch))
        if attempt is None or attempt.cancelled:
            return
        attempt.cancelled = True
        label = reason.split(":")[0][:60]
        self.cancel_reasons[label] = self.cancel_reasons.get(label, 0) + 1
        if attempt.attempt_id in self.running:
            # The worker stops at its next step once the cancel reaches it.
            self._push(self.now_s + self.config.cancel_delay_s, _CANCELLED, attempt)

    def _cancelled(self, attempt: _Attempt) -> None:
        if attempt.attempt_id not in self.running or attempt.started_s is None:
            return
        gpu_s = self._release(attempt)
        flight = self.flights[attempt.job_key]
        self._apply(flight, flight.on_finished(AttemptFinished(
            attempt_id=attempt.attempt_id, job_id=attempt.job_id, job_key=attempt.job_key,
            epoch=attempt.epoch, worker_id=SIM_WORKER, status=AttemptStatus.CANCELLED,
            slot=0, gpu_s=gpu_s, error="cancelled"), self._at(), self.limits,
            self._pool(flight)))

    def _deadline(self, job_id: str) -> None:
        job = self.jobs[job_id]
        if job.ended_s is not None:
            return
        flight = self.flights[job.job_key]
        self._apply(flight, flight.on_deadline(job_id, self._at(), self.limits,
                                               self._pool(flight)))

    def _check(self) -> None:
        """Let every flight with running attempts act on their progress, as heartbeats would."""
        keys = {attempt.job_key for attempt in self.running.values()}
        for key in sorted(keys):
            flight = self.flights[key]
            self._apply(flight, flight.replan(self._at(), self.limits, self._pool(flight)))
        if any(job.ended_s is None for job in self.jobs.values()) or self.running:
            self._push(self.now_s + self.config.check_interval_s, _CHECK, None)
        else:
            self.checking = False

    # ---- results -----------------------------------------------------------------------------

    def _result(self) -> ReplicateResult:
        ended = [job for job in self.jobs.values() if job.ended_s is not None]
        useful = [attempt_id for job in ended for attempt_id in job.delivered]
        return ReplicateResult(
            latencies_s=[job.ended_s - job.arrival_s for job in ended
                         if job.ended_s is not None],
            statuses=[job.status or "timed_out" for job in self.jobs.values()],
            delivered_slots=sum(len(job.delivered) for job in ended),
            fallback_slots=sum(job.fallback for job in ended),
            gpu_s=self.gpu_s,
            useful_gpu_s=sum(self.gpu_by_attempt.get(attempt_id, 0.0)
                             for attempt_id in useful),
            attempts_started=sum(self.started.values()),
            attempts_per_job=[job.attempts for job in self.jobs.values()],
            duplicate_executions=sum(count - 1 for count in self.started.values()
                                     if count > 1),
            cancel_reasons=dict(self.cancel_reasons),
        )


# ---- suite --------------------------------------------------------------------------------

def replicate_schedule(rows: Sequence[TraceRequest], window_s: float, replicate: int,
                       config: SimConfig, job_seed: Any) -> list[tuple[float, JobRequested]]:
    """Build one replicate's jobs: the compressed window, with seeds of its own."""
    schedule = []
    for index, row in enumerate(compress(rows, window_s)):
        request = to_job_request(row, tenant_id="bench-sim", deadline_s=config.deadline_s)
        params = request.params.model_copy(update={"prompt": f"replicate {replicate} job {index}"})
        schedule.append((row.arrival_s, request.model_copy(update={
            "params": params, "slots": config.slots_per_job,
            "seed": job_seed(config.seed + 1_000 * replicate, index),
        })))
    return schedule


def pooled_metrics(results: Sequence[ReplicateResult], groups: int = 5) -> dict[str, Any]:
    """Pool replicates into the real benchmark's metrics, with the spread across groups.

    The replicates are split into ``groups`` equal groups. ``*_spread`` lists each group's
    value, which shows how much a metric moves between independent job streams.
    """
    latencies = [value for result in results for value in result.latencies_s]
    gpu_s = sum(result.gpu_s for result in results)
    useful = sum(result.useful_gpu_s for result in results)
    delivered = sum(result.delivered_slots for result in results)
    statuses = [status for result in results for status in result.statuses]
    attempts = [value for result in results for value in result.attempts_per_job]
    reasons: dict[str, int] = {}
    for result in results:
        for reason, count in result.cancel_reasons.items():
            reasons[reason] = reasons.get(reason, 0) + count
    size = max(1, len(results) // groups)
    chunks = [results[start:start + size] for start in range(0, len(results), size)]
    chunks = [chunk for chunk in chunks if len(chunk) == size]
    return {
        "jobs": len(statuses),
        "completed": statuses.count("completed"),
        "partial": statuses.count("partial"),
        "failed": statuses.count("failed"),
        "timed_out": statuses.count("timed_out"),
        "p50_job_s": percentile(latencies, 50),
        "p99_job_s": percentile(latencies, 99),
        "mean_job_s": statistics.fmean(latencies) if latencies else None,
        "delivered_slots": delivered,
        "fallback_slots": sum(result.fallback_slots for result in results),
        "gpu_s": gpu_s,
        "gpu_s_per_delivered_slot": gpu_s / delivered if delivered else None,
        "wasted_gpu_fraction": (gpu_s - useful) / gpu_s if gpu_s else None,
        "duplicate_executions": sum(result.duplicate_executions for result in results),
        "attempts_started": sum(result.attempts_started for result in results),
        "mean_attempts_per_job": statistics.fmean(attempts) if attempts else None,
        "cancel_reasons": dict(sorted(reasons.items())),
        "p99_job_s_spread": [percentile([value for result in chunk
                                         for value in result.latencies_s], 99)
                             for chunk in chunks],
        "gpu_s_per_delivered_slot_spread": [
            sum(result.gpu_s for result in chunk)
            / max(1, sum(result.delivered_slots for result in chunk)) for chunk in chunks],
    }


def simulate_suite(config: SimConfig, rows: Sequence[TraceRequest], loads: Sequence[float],
                   policies: Sequence[str], capacity_jobs_per_s: float,
                   job_seed: Any) -> dict[str, Any]:
    """Run every (load, policy) pair over ``config.replicates`` replicates of ``rows``."""
    results: dict[str, dict[str, Any]] = {}
    for load in loads:
        window_s = (len(rows) - 1) / (load * capacity_jobs_per_s)
        schedules = [replicate_schedule(rows, window_s, replicate, config, job_seed)
                     for replicate in range(config.replicates)]
        key = f"load_{float(load)}"
        results[key] = {}
        for policy in policies:
            runs = [RacingSimulation(config, RacingPolicy(policy), schedule).run()
                    for schedule in schedules]
            results[key][policy] = pooled_metrics(runs)
    return {"results": results, "config": asdict(config),
            "jobs_per_replicate": len(rows)}
