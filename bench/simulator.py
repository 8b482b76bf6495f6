"""Discrete-event simulator of a GPU pool that drives the timeout policies of ``streams.timeouts``.

Jobs of 1 to 4 slots arrive in alternating busy and quiet phases. Each attempt waits in one
FIFO queue until a device has a free slot, then runs its denoising steps at a speed that
falls as more attempts share the device. A small fraction of attempts hang at a random step
and hold their slot until a policy kills them or their job's deadline cancels them.

The simulator computes step boundaries analytically between concurrency changes instead of
scheduling an event per step. It calls the policy at each ``next_check_at_s`` the policy
returns and after every concurrency change on the attempt's device. Progress reaches the
observations as one report of the latest completed step at each such call, where the live
coordinator would see one report per step.

Every attempt's random draws (service time, hang, step jitter) are fixed by its job, slot
and try number, so policies compared under one seed see the same work.
"""

from __future__ import annotations

import heapq
import logging
import math
from bisect import bisect_right
from collections import deque
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

import numpy as np

from streams.step_times import StepClass, StepTimeEstimator, normal_quantile
from streams.timeouts import (
    AttemptObservation,
    TimeoutDecision,
    TimeoutPolicy,
    record_concurrency,
    record_progress,
    start_observation,
)

logger = logging.getLogger(__name__)

_ARRIVAL, _FINISH, _CHECK, _DEADLINE = range(4)
# Checks are never scheduled closer together than this, so a policy that keeps returning
# a next check at ``now`` cannot stall the simulation.
_MIN_CHECK_GAP_S = 1e-6
_JITTER_POOL_SIZE = 1 << 20


@dataclass(frozen=True)
class SimClass:
    """A step class of the workload with its denoising step count.

    Service-time offsets of the classes ascend in list order, so later classes cost more.
    """

    model: str
    width: int
    height: int
    steps: int


DEFAULT_CLASSES = (
    SimClass("sd15", 512, 512, 25),
    SimClass("sd15", 768, 768, 25),
    SimClass("sd21", 768, 768, 30),
    SimClass("sdxl", 768, 768, 30),
    SimClass("sdxl", 1024, 1024, 40),
    SimClass("sdxl-refiner", 1024, 1024, 50),
)


@dataclass(frozen=True)
class WorkloadConfig:
    """The simulated pool and workload; durations are in seconds."""

    attempts: int = 100_000
    seed: int = 1
    devices: int = 16
    slots_per_device: int = 4
    # Step time at full concurrency over step time alone on the device; levels in between
    # interpolate linearly.
    max_slowdown: float = 3.0
    # Service time alone on the device is lognormal with this median and p99/p50 ratio.
    # Of its log-sigma, ``class_sigma`` comes from the step class and the rest from the attempt.
    service_p50_s: float = 10.0
    service_p99_over_p50: float = 10.0
    class_sigma: float = 0.6
    # Per-step variation of work within one attempt (lognormal sigma).
    step_jitter_sigma: float = 0.15
    hang_fraction: float = 0.01
    deadline_s: float = 900.0
    max_attempts_per_slot: int = 3
    # Offered load as a fraction of the pool's capacity at full concurrency, alternating
    # every ``phase_s`` seconds.
    busy_load: float = 0.85
    quiet_load: float = 0.25
    phase_s: float = 1_800.0
    slot_choices: tuple[int, ...] = (1, 2, 4)
    slot_weights: tuple[float, ...] = (0.5, 0.3, 0.2)
    classes: tuple[SimClass, ...] = DEFAULT_CLASSES

    @property
    def service_sigma(self) -> float:
        """Log-sigma of the service time; p99/p50 = 10 gives about 0.99."""
        return math.log(self.service_p99_over_p50) / normal_quantile(0.99)

    @property
    def attempt_sigma(self) -> float:
        return math.sqrt(max(self.service_sigma**2 - self.class_sigma**2, 0.0))

    def slowdown(self, concurrency: int) -> float:
        """Return the true step-time multiplier at a concurrency level."""
        if self.slots_per_device <= 1:
            return 1.0
        fraction = (concurrency - 1) / (self.slots_per_device - 1)
        return 1.0 + (self.max_slowdown - 1.0) * fraction

    def validate(self) -> None:
        if self.attempts < 1 or self.devices < 1 or self.slots_per_device < 1:
            raise ValueError(
                "attempts, devices and slots_per_device must be at least 1, got "
                f"{self.attempts}, {self.devices} and {self.slots_per_device}"
            )
        if self.service_p99_over_p50 <= 1.0:
            raise ValueError(
                f"service_p99_over_p50 must be above 1, got {self.service_p99_over_p50}"
            )
        if self.class_sigma > self.service_sigma:
            raise ValueError(
                f"class_sigma {self.class_sigma} exceeds the service log-sigma "
                f"{self.service_sigma:.3f}"
            )
        if not 0.0 <= self.hang_fraction < 1.0:
            raise ValueError(f"hang_fraction must be in [0, 1), got {self.hang_fraction}")
        if len(self.slot_choices) != len(self.slot_weights) or not self.slot_choices:
            raise ValueError("slot_choices and slot_weights must be non-empty and equally long")
        if min(self.slot_choices) < 1:
            raise ValueError(f"slot_choices must be at least 1, got {self.slot_choices}")
        if not self.classes or min(item.steps for item in self.classes) < 1:
            raise ValueError("classes must be non-empty and each must have at least 1 step")


class NeverKill:
    """A policy that never kills; the benchmark calibrates the fixed baselines with it."""

    name = "none"

    def decide(self, observation: AttemptObservation, now_s: float) -> TimeoutDecision:
        return TimeoutDecision("keep", "this policy never kills", None, math.inf)


class _Job:
    __slots__ = ("index", "arrival_s", "deadline_at_s", "class_index", "slots",
                 "tries", "filled", "exhausted", "done", "finished_s", "attempts")

    def __init__(
        self, index: int, arrival_s: float, deadline_s: float, class_index: int, slots: int
    ) -> None:
        self.index = index
        self.arrival_s = arrival_s
        self.deadline_at_s = arrival_s + deadline_s
        self.class_index = class_index
        self.slots = slots
        self.tries = [0] * slots
        self.filled = 0
        self.exhausted = 0
        self.done = False
        self.finished_s = math.nan
        self.attempts: list[_Attempt] = []


class _Attempt:
    __slots__ = (
        "attempt_id", "job", "slot", "try_no", "step_class", "steps", "cum_work", "total_work",
        "hang_work", "solo_rate", "dispatched_s", "started_s", "device", "seg_s", "seg_work",
        "rate", "steps_at_seg", "last_step_s", "hang_onset_s", "obs", "finish_version",
        "check_version", "state",
    )

    def __init__(self, attempt_id: int, job: _Job, slot: int, try_no: int) -> None:
        self.attempt_id = attempt_id
        self.job = job
        self.slot = slot
        self.try_no = try_no
        self.step_class: StepClass
        self.steps = 0
        self.cum_work: list[float] = []
        self.total_work = 0.0
        self.hang_work: float | None = None
        # Work is counted in units of summed jitter draws, and this many units run per
        # second when the attempt is alone on its device.
        self.solo_rate = 1.0
        self.dispatched_s = 0.0
        self.started_s = math.nan
        self.device: _Device | None = None
        self.seg_s = 0.0
        self.seg_work = 0.0
        self.rate = 1.0
        self.steps_at_seg = 0
        self.last_step_s = 0.0
        self.hang_onset_s = math.nan
        self.obs: AttemptObservation
        self.finish_version = 0
        self.check_version = 0
        # queued, running, finished, killed or cancelled
        self.state = "queued"


class _Device:
    __slots__ = ("index", "running", "changed_s")

    def __init__(self, index: int) -> None:
        self.index = index
        self.running: list[_Attempt] = []
        self.changed_s = 0.0


@dataclass
class SimulationResult:
    """Outcome counts and samples of one simulation run; durations in seconds."""

    policy: str
    attempts: int = 0
    healthy_attempts: int = 0
    hung_attempts: int = 0
    false_kills: int = 0
    healthy_kills: int = 0
    kills: dict[str, int] = field(default_factory=dict)
    hang_detection_s: list[float] = field(default_factory=list)
    hangs_killed: int = 0
    slot_s_total: float = 0.0
    slot_s_wasted: float = 0.0
    job_s: list[float] = field(default_factory=list)
    jobs: int = 0
    jobs_completed: int = 0
    queue_wait_s: list[float] = field(default_factory=list)
    healthy_duration_s: list[float] = field(default_factory=list)
    healthy_mean_step_s: list[float] = field(default_factory=list)
    service_s: list[float] = field(default_factory=list)
    decisions: int = 0
    concurrency_s: dict[int, float] = field(default_factory=dict)
    simulated_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        """Reduce the run to the benchmark's metrics."""
        detection = np.asarray(self.hang_detection_s) if self.hang_detection_s else None
        job_s = np.asarray(self.job_s) if self.job_s else np.zeros(1)
        busy_total_s = sum(self.concurrency_s.values()) or 1.0
        return {
            "attempts": self.attempts,
            "healthy_attempts": self.healthy_attempts,
            "hung_attempts": self.hung_attempts,
            "false_kills": self.false_kills,
            "false_kill_fraction": self.false_kills / max(self.healthy_attempts, 1),
            "healthy_killed_fraction": self.healthy_kills / max(self.healthy_attempts, 1),
            "kills": dict(sorted(self.kills.items())),
            "hangs_killed_fraction": self.hangs_killed / max(self.hung_attempts, 1),
            "mean_hang_detection_s": float(detection.mean()) if detection is not None else None,
            "p99_hang_detection_s": (
                float(np.quantile(detection, 0.99)) if detection is not None else None
            ),
            "wasted_gpu_fraction": self.slot_s_wasted / max(self.slot_s_total, 1e-9),
            "p50_job_s": float(np.quantile(job_s, 0.5)),
            "p99_job_s": float(np.quantile(job_s, 0.99)),
            "jobs": self.jobs,
            "jobs_completed_fraction": self.jobs_completed / max(self.jobs, 1),
            "mean_queue_wait_s": float(np.mean(self.queue_wait_s)) if self.queue_wait_s else 0.0,
            "decisions": self.decisions,
            "slot_time_by_concurrency": {
                str(level): seconds / busy_total_s
                for level, seconds in sorted(self.concurrency_s.items())
            },
            "simulated_s": self.simulated_s,
        }


class Simulation:
    """One run of the workload under one policy.

    ``estimator``, when given, learns from every progress report that has a sample, the way
    the coordinator feeds its estimator. Pass the adaptive policy's own estimator.
    """

    def __init__(
        self,
        config: WorkloadConfig,
        policy: TimeoutPolicy,
        estimator: StepTimeEstimator | None = None,
    ) -> None:
        config.validate()
        self.config = config
        self.policy = policy
        self.estimator = estimator
        self.result = SimulationResult(policy=policy.name)
        self._events: list[tuple[float, int, int, Any, int]] = []
        self._sequence = 0
        self._queue: deque[_Attempt] = deque()
        self._devices = [_Device(index) for index in range(config.devices)]
        self._step_classes = [
            StepClass(item.model, item.width, item.height) for item in config.classes
        ]
        self._slowdowns = [config.slowdown(level) for level in range(config.slots_per_device + 1)]
        self._next_attempt_id = 0
        self._job_index = 0
        self._draw_workload()

    # ---- workload ---------------------------------------------------------------------------

    def _draw_workload(self) -> None:
        """Draw every job and every possible attempt up front, from the seed alone."""
        config = self.config
        rng = np.random.default_rng(config.seed)
        weights = np.asarray(config.slot_weights, dtype=float)
        weights /= weights.sum()
        mean_slots = float(np.dot(weights, config.slot_choices))
        jobs = max(1, round(config.attempts / mean_slots))

        # Offered load is a fraction of full-concurrency capacity, in attempts per second.
        mean_service_s = config.service_p50_s * math.exp(config.service_sigma**2 / 2)
        capacity = config.devices * config.slots_per_device / self._slowdowns[-1]
        busy_jobs_per_s = config.busy_load * capacity / mean_service_s / mean_slots
        quiet_jobs_per_s = config.quiet_load * capacity / mean_service_s / mean_slots
        gaps = rng.exponential(1.0, size=jobs)
        arrivals = np.empty(jobs)
        now_s = 0.0
        for index in range(jobs):
            busy = int(now_s // config.phase_s) % 2 == 0
            now_s += gaps[index] / (busy_jobs_per_s if busy else quiet_jobs_per_s)
            arrivals[index] = now_s

        classes = len(config.classes)
        self._job_classes = rng.integers(0, classes, size=jobs)
        self._job_slots = rng.choice(np.asarray(config.slot_choices), size=jobs, p=weights)
        self._arrivals = arrivals
        # Class offsets are evenly spaced normal quantiles, scaled to ``class_sigma``.
        spread = np.asarray([normal_quantile((i + 0.5) / classes) for i in range(classes)])
        spread = spread / (spread.std() or 1.0) * config.class_sigma
        self._class_offsets = spread.tolist()

        per_job = max(config.slot_choices) * config.max_attempts_per_slot
        size = jobs * per_job
        self._per_job = per_job
        self._service_z = rng.standard_normal(size).tolist()
        self._hang_draw = rng.random(size).tolist()
        self._hang_step_draw = rng.random(size).tolist()
        max_steps = max(item.steps for item in config.classes)
        self._jitter_offset = rng.integers(0, _JITTER_POOL_SIZE - max_steps, size=size).tolist()
        self._jitter_pool = rng.lognormal(
            0.0, config.step_jitter_sigma, size=_JITTER_POOL_SIZE
        ).tolist()
        self.result.jobs = jobs

    def _new_attempt(self, job: _Job, slot: int, now_s: float) -> _Attempt:
        config = self.config
        job.tries[slot] += 1
        try_no = job.tries[slot]
        attempt = _Attempt(self._next_attempt_id, job, slot, try_no)
        self._next_attempt_id += 1
        draw = job.index * self._per_job + slot * config.max_attempts_per_slot + try_no - 1

        sim_class = config.classes[job.class_index]
        log_service = (
            math.log(config.service_p50_s)
            + self._class_offsets[job.class_index]
            + config.attempt_sigma * self._service_z[draw]
        )
        service_s = math.exp(log_service)
        steps = sim_class.steps
        offset = self._jitter_offset[draw]
        works = self._jitter_pool[offset:offset + steps]
        attempt.step_class = self._step_classes[job.class_index]
        attempt.steps = steps
        attempt.cum_work = list(accumulate(works, initial=0.0))
        attempt.total_work = attempt.cum_work[-1]
        attempt.solo_rate = attempt.total_work / service_s
        if self._hang_draw[draw] < config.hang_fraction:
            hang_step = min(int(self._hang_step_draw[draw] * steps), steps - 1)
            attempt.hang_work = attempt.cum_work[hang_step]
        attempt.dispatched_s = now_s
        job.attempts.append(attempt)
        self.result.attempts += 1
        if attempt.hang_work is None:
            self.result.healthy_attempts += 1
        else:
            self.result.hung_attempts += 1
        self.result.service_s.append(service_s)
        return attempt

    # ---- event loop -------------------------------------------------------------------------

    def _push(self, time_s: float, kind: int, item: Any, version: int = 0) -> None:
        self._sequence += 1
        heapq.heappush(self._events, (time_s, self._sequence, kind, item, version))

    def run(self) -> SimulationResult:
        """Simulate every job to its end and return the collected result."""
        self._schedule_next_arrival()
        now_s = 0.0
        events = self._events
        while events:
            now_s, _, kind, item, version = heapq.heappop(events)
            if kind == _CHECK:
                if item.state == "running" and version == item.check_version:
                    self._check(item, now_s)
            elif kind == _FINISH:
                if item.state == "running" and version == item.finish_version:
                    self._finish(item, now_s)
            elif kind == _ARRIVAL:
                self._arrive(item, now_s)
            else:
                self._job_deadline(item, now_s)
        self.result.simulated_s = now_s
        return self.result

    def _schedule_next_arrival(self) -> None:
        index = self._job_index
        if index >= len(self._arrivals):
            return
        self._job_index += 1
        job = _Job(
            index, float(self._arrivals[index]), self.config.deadline_s,
            int(self._job_classes[index]), int(self._job_slots[index]),
        )
        self._push(job.arrival_s, _ARRIVAL, job)

    def _arrive(self, job: _Job, now_s: float) -> None:
        self._schedule_next_arrival()
        self._push(job.deadline_at_s, _DEADLINE, job)
        for slot in range(job.slots):
            self._enqueue(self._new_attempt(job, slot, now_s), now_s)

    def _enqueue(self, attempt: _Attempt, now_s: float) -> None:
        device = self._free_device()
        if device is None:
            self._queue.append(attempt)
        else:
            self._start(attempt, device, now_s)

    def _free_device(self) -> _Device | None:
        """Pick the least-loaded device with a free slot, lowest index first."""
        best = None
        best_load = self.config.slots_per_device
        for device in self._devices:
            load = len(device.running)
            if load < best_load:
                best, best_load = device, load
                if load == 0:
                    break
        return best

    def _start_queued(self, now_s: float) -> None:
        while self._queue:
            device = self._free_device()
            if device is None:
                return
            attempt = self._queue.popleft()
            if attempt.state == "queued":
                self._start(attempt, device, now_s)

    # ---- attempts on devices ----------------------------------------------------------------

    def _start(self, attempt: _Attempt, device: _Device, now_s: float) -> None:
        job = attempt.job
        self.result.queue_wait_s.append(now_s - attempt.dispatched_s)
        others = list(device.running)
        self._account_concurrency(device, now_s)
        device.running.append(attempt)
        level = len(device.running)

        attempt.state = "running"
        attempt.device = device
        attempt.started_s = now_s
        attempt.seg_s = now_s
        attempt.last_step_s = now_s
        attempt.rate = attempt.solo_rate / self._slowdowns[level]
        retries_left = self.config.max_attempts_per_slot - job.tries[attempt.slot]
        attempt.obs = start_observation(
            str(attempt.attempt_id), attempt.step_class, attempt.steps,
            started_at_s=now_s, deadline_at_s=job.deadline_at_s, concurrency=level,
            retries_left=retries_left,
        )
        if attempt.hang_work is None:
            self._push(now_s + attempt.total_work / attempt.rate, _FINISH, attempt, 0)
        elif attempt.hang_work == 0.0:
            attempt.hang_onset_s = now_s
        self._decide(attempt, now_s)
        self._concurrency_changed(others, level, now_s)

    def _account_concurrency(self, device: _Device, now_s: float) -> None:
        """Add the slot time on a device since its last change to the time at its level."""
        level = len(device.running)
        if level:
            shares = self.result.concurrency_s
            shares[level] = shares.get(level, 0.0) + (now_s - device.changed_s) * level
        device.changed_s = now_s

    def _concurrency_changed(self, attempts: list[_Attempt], level: int, now_s: float) -> None:
        """Move every other attempt on a device to a new concurrency level at ``now_s``."""
        slowdown = self._slowdowns[level]
        for attempt in attempts:
            self._advance(attempt, now_s)
            self._report_progress(attempt)
            attempt.obs = record_concurrency(attempt.obs, level, now_s)
            attempt.rate = attempt.solo_rate / slowdown
            if attempt.hang_work is None:
                attempt.finish_version += 1
                remaining = attempt.total_work - attempt.seg_work
                self._push(
                    now_s + remaining / attempt.rate, _FINISH, attempt, attempt.finish_version
                )
            self._decide(attempt, now_s)

    def _advance(self, attempt: _Attempt, now_s: float) -> None:
        """Bring an attempt's work and completed steps up to ``now_s`` at its current rate."""
        cap = attempt.total_work if attempt.hang_work is None else attempt.hang_work
        work = attempt.seg_work + (now_s - attempt.seg_s) * attempt.rate
        if work >= cap:
            work = cap
            if attempt.hang_work is not None and math.isnan(attempt.hang_onset_s):
                attempt.hang_onset_s = attempt.seg_s + (cap - attempt.seg_work) / attempt.rate
        steps = bisect_right(attempt.cum_work, work) - 1
        if steps > attempt.steps_at_seg:
            boundary = attempt.cum_work[steps]
            attempt.last_step_s = attempt.seg_s + (boundary - attempt.seg_work) / attempt.rate
            attempt.steps_at_seg = steps
        attempt.seg_s = now_s
        attempt.seg_work = work

    def _report_progress(self, attempt: _Attempt) -> None:
        if attempt.steps_at_seg <= attempt.obs.steps_done:
            return
        # The simulated worker reports every step; this catches up on several at once.
        attempt.obs, sample = record_progress(
            attempt.obs, attempt.steps_at_seg, attempt.last_step_s, report_steps=1
        )
        if sample is not None and self.estimator is not None:
            self.estimator.observe_sample(attempt.step_class, sample)

    def _decide(self, attempt: _Attempt, now_s: float) -> None:
        """Ask the policy about an attempt and schedule its next check."""
        decision = self.policy.decide(attempt.obs, now_s)
        self.result.decisions += 1
        attempt.check_version += 1
        if decision.action != "keep":
            check_at_s = now_s
        elif math.isinf(decision.next_check_at_s):
            return
        else:
            check_at_s = max(decision.next_check_at_s, now_s + _MIN_CHECK_GAP_S)
        self._push(check_at_s, _CHECK, attempt, attempt.check_version)

    def _check(self, attempt: _Attempt, now_s: float) -> None:
        self._advance(attempt, now_s)
        self._report_progress(attempt)
        decision = self.policy.decide(attempt.obs, now_s)
        self.result.decisions += 1
        if decision.action == "keep":
            if not math.isinf(decision.next_check_at_s):
                attempt.check_version += 1
                check_at_s = max(decision.next_check_at_s, now_s + _MIN_CHECK_GAP_S)
                self._push(check_at_s, _CHECK, attempt, attempt.check_version)
            return
        self._kill(attempt, decision.action, now_s)

    def _release(self, attempt: _Attempt, state: str, now_s: float) -> None:
        """Take a running attempt off its device and account its slot time."""
        device = attempt.device
        assert device is not None
        self._account_concurrency(device, now_s)
        device.running.remove(attempt)
        attempt.state = state
        slot_s = now_s - attempt.started_s
        self.result.slot_s_total += slot_s
        if state != "finished":
            self.result.slot_s_wasted += slot_s
        if attempt.hang_work is not None:
            onset_s = attempt.hang_onset_s
            if math.isnan(onset_s):
                # Released before it reached its hang point: nothing was held while hung.
                onset_s = now_s
            self.result.hang_detection_s.append(now_s - onset_s)
        if device.running:
            self._concurrency_changed(list(device.running), len(device.running), now_s)
        self._start_queued(now_s)

    def _finish(self, attempt: _Attempt, now_s: float) -> None:
        attempt.seg_work = attempt.total_work
        attempt.seg_s = now_s
        attempt.steps_at_seg = attempt.steps
        attempt.last_step_s = now_s
        self._report_progress(attempt)
        result = self.result
        duration_s = now_s - attempt.started_s
        result.healthy_duration_s.append(duration_s)
        result.healthy_mean_step_s.append(duration_s / attempt.steps)
        job = attempt.job
        self._release(attempt, "finished", now_s)
        if not job.done:
            job.filled += 1
            self._end_job_if_settled(job, now_s)

    def _kill(self, attempt: _Attempt, action: str, now_s: float) -> None:
        self._advance(attempt, now_s)
        result = self.result
        result.kills[action] = result.kills.get(action, 0) + 1
        job = attempt.job
        if attempt.hang_work is None:
            result.healthy_kills += 1
            # False when the rest of the work, even alone on a device, fit before the deadline.
            solo_remaining_s = (attempt.total_work - attempt.seg_work) / attempt.solo_rate
            if now_s + solo_remaining_s <= job.deadline_at_s:
                result.false_kills += 1
        else:
            result.hangs_killed += 1
        self._release(attempt, "killed", now_s)
        if job.done:
            return
        retry_allowed = job.tries[attempt.slot] < self.config.max_attempts_per_slot
        if retry_allowed and now_s < job.deadline_at_s:
            self._enqueue(self._new_attempt(job, attempt.slot, now_s), now_s)
            return
        job.exhausted += 1
        self._end_job_if_settled(job, now_s)

    def _end_job_if_settled(self, job: _Job, now_s: float) -> None:
        """End a job once every slot is filled or has used up its attempts."""
        if job.filled + job.exhausted < job.slots:
            return
        completed = job.filled == job.slots
        if completed:
            self.result.jobs_completed += 1
        self._end_job(job, now_s, completed)

    def _job_deadline(self, job: _Job, now_s: float) -> None:
        if not job.done:
            self._end_job(job, now_s, completed=False)

    def _end_job(self, job: _Job, now_s: float, completed: bool) -> None:
        """End a job, cancelling the attempts it still has queued or running.

        A job that did not fill every slot counts as taking its whole deadline, because
        failing early is no better for its client than failing late.
        """
        job.done = True
        job.finished_s = now_s
        job_s = now_s - job.arrival_s if completed else self.config.deadline_s
        self.result.job_s.append(job_s)
        for attempt in job.attempts:
            if attempt.state == "queued":
                attempt.state = "cancelled"
            elif attempt.state == "running":
                self._advance(attempt, now_s)
                self._release(attempt, "cancelled", now_s)


def simulate(
    config: WorkloadConfig,
    policy: TimeoutPolicy,
    estimator: StepTimeEstimator | None = None,
) -> SimulationResult:
    """Run the workload of ``config`` under ``policy`` and return the result."""
    result = Simulation(config, policy, estimator).run()
    logger.info(
        "Simulated %d attempts under %s: %d decisions", result.attempts, policy.name,
        result.decisions,
    )
    return result
