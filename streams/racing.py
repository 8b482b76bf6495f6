"""How many attempts a flight of identical jobs should have in flight: the racing policy.

Pure functions of the observations passed in, so the live coordinator, the benchmark and
the tests run the same code. Three policies:

- ``sequential``: one attempt per open slot; a rejection triggers one retry.
- ``fixed_race``: always twice as many attempts in flight as open slots.
- ``adaptive``: enough attempts that the expected acceptances cover the open slots, given
  the acceptance rate observed for the model and parameter class, plus speculative
  attempts only while the GPU pool has idle slots. A running attempt whose step rate
  projects a remaining time far above its class's typical service time is a straggler,
  and the flight replaces it with a fresh attempt.
"""

from __future__ import annotations

import collections
import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum


class RacingPolicy(StrEnum):
    SEQUENTIAL = "sequential"
    FIXED_RACE = "fixed_race"
    ADAPTIVE = "adaptive"


# Acceptance estimates below this are clamped, so one unlucky class cannot launch hundreds.
MIN_ACCEPTANCE = 0.1
# An attempt whose projected remaining time exceeds this many typical service times of its
# class, and the floor below, is a straggler: a fresh attempt is expected to finish sooner.
STRAGGLER_FACTOR = 2.0
# Attempts with fewer steps measured than this are not judged, because a few milliseconds
# of scheduling jitter on one short step could mark a normal attempt as slow. The simulation,
# whose steps take equal time, favours judging after one step and so cannot show this cost.
STRAGGLER_MIN_STEPS = 2
# A replacement first waits for its dispatch, claim and start, tens of milliseconds on a
# local broker, so an attempt with less than this left is never worth replacing.
STRAGGLER_MIN_REMAINING_S = 0.1
# The error type of an attempt that its worker stopped as a straggler. The flight refunds it
# as its own straggler replacement, within the same limit of refunds per job.
STRAGGLER_ERROR_TYPE = "straggler"
# A surplus attempt this close to done, in typical service times, may finish into the cache.
FINISH_INTO_CACHE_FACTOR = 0.5
# Service times remembered per class for the typical service time.
SERVICE_WINDOW = 500


@dataclass(frozen=True)
class RaceInputs:
    """Observations for one decision.

    Args:
        open_slots: slots of the flight's running jobs that no accepted result fills yet.
        in_flight: attempts dispatched or running and not cancelled.
        acceptance_rate: estimated probability that one attempt is accepted.
        budget_left: attempts the jobs may still launch under their attempt limits.
        pool_idle_slots: GPU slots free now, after subtracting attempts already queued;
            zero or less means the pool is saturated.
        backpressure: a downstream stage is lagging, so no speculative work at all.
    """

    open_slots: int
    in_flight: int
    acceptance_rate: float
    budget_left: int
    pool_idle_slots: int
    backpressure: bool = False


@dataclass(frozen=True)
class RaceDecision:
    needed: int
    speculative: int

    @property
    def total(self) -> int:
        return self.needed + self.speculative


def attempts_to_launch(policy: RacingPolicy, inputs: RaceInputs) -> RaceDecision:
    """Return how many new attempts to dispatch now."""
    if inputs.open_slots <= 0 or inputs.budget_left <= 0:
        return RaceDecision(0, 0)

    if policy is RacingPolicy.SEQUENTIAL:
        needed = inputs.open_slots - inputs.in_flight
        return RaceDecision(_clamp(needed, inputs.budget_left), 0)

    if policy is RacingPolicy.FIXED_RACE:
        needed = 2 * inputs.open_slots - inputs.in_flight
        return RaceDecision(_clamp(needed, inputs.budget_left), 0)

    rate = min(1.0, max(MIN_ACCEPTANCE, inputs.acceptance_rate))
    # A saturated pool rounds the need to the nearest attempt instead of up. Rounding up
    # launches 2n + 1 attempts for n slots at an estimate just under 0.5, and each surplus
    # attempt delays the work of other jobs queued behind it.
    if inputs.pool_idle_slots > 0:
        expected_need = math.ceil(inputs.open_slots / rate - 1e-9)
    else:
        expected_need = max(inputs.open_slots, round(inputs.open_slots / rate))
    needed = _clamp(expected_need - inputs.in_flight, inputs.budget_left)
    if inputs.backpressure:
        return RaceDecision(needed, 0)

    # Speculate only into idle capacity, and never beyond one extra attempt per open slot.
    ceiling = expected_need + inputs.open_slots - (inputs.in_flight + needed)
    idle_after = inputs.pool_idle_slots - needed
    speculative = min(idle_after, ceiling, inputs.budget_left - needed)
    return RaceDecision(needed, max(0, speculative))


@dataclass(frozen=True)
class AttemptRun:
    """Progress of one running attempt, from its worker's step heartbeats."""

    running_s: float
    steps_done: int
    total_steps: int

    def remaining_s(self) -> float | None:
        """Project the time left at the attempt's own step rate; None before the first step."""
        if self.steps_done <= 0:
            return None
        step_s = self.running_s / self.steps_done
        return step_s * max(0, self.total_steps - self.steps_done)


def stragglers(runs: Mapping[str, AttemptRun], typical_service_s: float | None,
               factor: float = STRAGGLER_FACTOR,
               min_steps: int = STRAGGLER_MIN_STEPS) -> list[str]:
    """Return the running attempts that a fresh attempt is expected to beat.

    Service times are heavy-tailed and fixed per attempt, so an attempt's step rate after
    its first steps predicts its total time. One whose remaining time exceeds ``factor``
    typical service times, and at least ``STRAGGLER_MIN_REMAINING_S``, costs more GPU time
    and latency than starting over.
    """
    threshold_s = straggler_threshold_s(typical_service_s, factor)
    if threshold_s is None:
        return []
    return [attempt_id for attempt_id, run in runs.items()
            if is_straggling(run, threshold_s, min_steps)]


def straggler_reason(run: AttemptRun) -> str:
    """Return the cancel reason of a straggler, with its projection and its steps."""
    return (f"straggler: {run.remaining_s() or 0.0:.2f} s left after {run.steps_done} of "
            f"{run.total_steps} steps")


def straggler_threshold_s(typical_service_s: float | None,
                          factor: float = STRAGGLER_FACTOR) -> float | None:
    """Return the projected remaining time past which an attempt is a straggler.

    None while the class has no typical service time yet, so no attempt is judged. Classes
    that take milliseconds get the floor ``STRAGGLER_MIN_REMAINING_S`` instead.
    """
    if typical_service_s is None or typical_service_s <= 0:
        return None
    return max(factor * typical_service_s, STRAGGLER_MIN_REMAINING_S)


def is_straggling(run: AttemptRun, threshold_s: float,
                  min_steps: int = STRAGGLER_MIN_STEPS) -> bool:
    """Check whether one attempt's projected remaining time exceeds ``threshold_s``.

    The worker applies the same rule to its own steps, so it reports a straggler at once
    instead of at its next regular progress report.
    """
    remaining_s = run.remaining_s()
    return run.steps_done >= min_steps and remaining_s is not None and remaining_s > threshold_s


def worth_finishing(run: AttemptRun | None, typical_service_s: float | None,
                    pool_idle_slots: int, factor: float = FINISH_INTO_CACHE_FACTOR) -> bool:
    """Decide whether a surplus attempt should finish into the cache instead of stopping.

    Only while the pool has idle slots, so finishing delays no other job, and only when the
    projected remaining time is under ``factor`` typical service times.
    """
    if run is None or typical_service_s is None or pool_idle_slots <= 0:
        return False
    remaining_s = run.remaining_s()
    return remaining_s is not None and remaining_s <= factor * typical_service_s


def _clamp(value: int, budget: int) -> int:
    return max(0, min(value, budget))


class AcceptanceEstimator:
    """Online acceptance rate per model and parameter class: a Beta posterior.

    The prior (``prior_accepts`` of ``prior_trials``) is what a class with no history gets;
    observations move the estimate away from it.
    """

    def __init__(self, prior_rate: float = 0.5, prior_trials: float = 4.0) -> None:
        self.prior_accepts = prior_rate * prior_trials
        self.prior_trials = prior_trials
        self._counts: dict[str, tuple[int, int]] = {}

    def observe(self, parameter_class: str, accepted: bool) -> None:
        accepts, trials = self._counts.get(parameter_class, (0, 0))
        self._counts[parameter_class] = (accepts + int(accepted), trials + 1)

    def rate(self, parameter_class: str) -> float:
        accepts, trials = self._counts.get(parameter_class, (0, 0))
        return (accepts + self.prior_accepts) / (trials + self.prior_trials)

    def snapshot(self) -> dict[str, tuple[int, int]]:
        return dict(self._counts)


class ServiceTimes:
    """Recent service times of succeeded attempts per parameter class, for the typical one."""

    def __init__(self, window: int = SERVICE_WINDOW, min_samples: int = 20) -> None:
        self.window = window
        self.min_samples = min_samples
        self._seen: dict[str, collections.deque[float]] = {}
        # Medians since each class's latest observation: the coordinator reads them for
        # every event and dispatch, far more often than attempts finish.
        self._medians: dict[str, float] = {}

    def observe(self, parameter_class: str, service_s: float) -> None:
        seen = self._seen.setdefault(parameter_class, collections.deque(maxlen=self.window))
        seen.append(service_s)
        self._medians.pop(parameter_class, None)

    def median_s(self, parameter_class: str) -> float | None:
        """Return the median service time, or None until enough attempts finished."""
        # NOTE: replaced stragglers never finish, so this median reads somewhat below the
        # median of all attempts; the simulation measured the policy with this bias.
        seen = self._seen.get(parameter_class)
        if seen is None or len(seen) < self.min_samples:
            return None
        median = self._medians.get(parameter_class)
        if median is None:
            median = self._medians[parameter_class] = statistics.median(seen)
        return median
