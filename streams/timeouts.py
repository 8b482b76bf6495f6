"""Execution timeouts for running attempts: baseline policies and the adaptive one.

Every policy is pure and deterministic. The caller keeps one ``AttemptObservation`` per
running attempt, updates it with ``record_progress`` and ``record_concurrency``, and calls
``policy.decide(observation, now_s)`` for a ``TimeoutDecision``. Time is always passed in, as
seconds on any monotonic clock the caller uses consistently.

The observation starts when a worker starts the attempt, so time spent queued before that
never counts against the attempt's execution budget. Only the job deadline covers both.

Use by the coordinator::

    obs = start_observation(attempt_id, StepClass(model, width, height), total_steps,
                            started_at_s=now_s, deadline_at_s=job_deadline_s,
                            concurrency=running_on_worker, retries_left=retries)
    obs, sample = record_progress(obs, event.step, now_s)       # on AttemptProgress
    if sample is not None:
        estimator.observe_sample(obs.step_class, sample)
    obs = record_concurrency(obs, running_on_worker, now_s)      # when the level changes
    decision = policy.decide(obs, now_s)   # after each update and at decision.next_check_at_s
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal, Protocol

from streams.step_times import Exposure, StepClass, StepSample, StepTimeEstimator

logger = logging.getLogger(__name__)

TimeoutAction = Literal["keep", "kill_hung", "kill_deadline"]
POLICY_NAMES = ("fixed_p99", "fixed_3x_p50", "heartbeat_fixed", "adaptive")

# Tolerance for comparing a check time with the time it was scheduled for, so that float
# rounding never turns a due kill into an endless series of checks a few ulps early.
_TIME_EPSILON_S = 1e-6


@dataclass(frozen=True, slots=True)
class AttemptObservation:
    """The coordinator's record of one running attempt's progress and concurrency.

    ``progress_exposure`` covers the time from the start to the last progress report, and
    ``silence_exposure`` the time from the last report to ``segment_start_s``. The time since
    ``segment_start_s`` ran at ``concurrency``. Keeping seconds per level lets a policy
    re-estimate both spans with its latest step-time estimates at every decision.
    """

    attempt_id: str
    step_class: StepClass
    total_steps: int
    started_at_s: float
    deadline_at_s: float
    concurrency: int
    steps_done: int
    last_progress_at_s: float
    segment_start_s: float
    progress_exposure: Exposure = ()
    silence_exposure: Exposure = ()
    # Attempts the slot may still dispatch after this one, and other attempts (hedges) for
    # the same slot that are queued or running. Together they decide whether this attempt
    # is the last one able to fill its slot.
    retries_left: int = 0
    other_attempts_in_flight: int = 0
    # Steps the next progress report is expected to cover: the worker's reporting interval
    # until the first report, then the steps of the latest report, which is longer when
    # the worker throttles heartbeats of fast steps.
    report_steps: int = 1


@dataclass(frozen=True, slots=True)
class TimeoutDecision:
    """A policy's verdict on one attempt at one moment.

    ``next_check_at_s`` is when the verdict may change if nothing else happens, or ``inf``
    when it never will. A progress report or concurrency change calls for an earlier check.
    """

    action: TimeoutAction
    reason: str
    expected_remaining_s: float | None
    next_check_at_s: float


class TimeoutPolicy(Protocol):
    @property
    def name(self) -> str: ...

    def decide(self, observation: AttemptObservation, now_s: float) -> TimeoutDecision: ...


# ---- observations ---------------------------------------------------------------------------


def start_observation(
    attempt_id: str,
    step_class: StepClass,
    total_steps: int,
    *,
    started_at_s: float,
    deadline_at_s: float,
    concurrency: int,
    retries_left: int = 0,
    other_attempts_in_flight: int = 0,
    report_every_steps: int = 1,
) -> AttemptObservation:
    """Create the observation of an attempt that a worker started at ``started_at_s``.

    ``concurrency`` counts the attempts running on the worker's device, this one included.
    ``report_every_steps`` is how many steps the worker runs between progress reports.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be at least 1, got {total_steps}")
    if report_every_steps < 1:
        raise ValueError(f"report_every_steps must be at least 1, got {report_every_steps}")
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    return AttemptObservation(
        attempt_id=attempt_id,
        step_class=step_class,
        total_steps=total_steps,
        started_at_s=started_at_s,
        deadline_at_s=deadline_at_s,
        concurrency=concurrency,
        steps_done=0,
        last_progress_at_s=started_at_s,
        segment_start_s=started_at_s,
        retries_left=retries_left,
        other_attempts_in_flight=other_attempts_in_flight,
        report_steps=min(report_every_steps, total_steps),
    )


def record_progress(
    observation: AttemptObservation, step: int, at_s: float,
    report_steps: int | None = None,
) -> tuple[AttemptObservation, StepSample | None]:
    """Record that the attempt completed ``step`` steps at ``at_s``.

    Returns the new observation and the sample to learn from, or None when no time passed
    since the previous report. A report that does not advance the step count (a redelivered
    or reordered event) returns the observation unchanged. ``report_steps`` is how many
    steps the worker's next report will cover; by default, as many as this one covered.
    """
    step = min(step, observation.total_steps)
    if step <= observation.steps_done:
        return observation, None

    at_s = max(at_s, observation.segment_start_s)
    steps = step - observation.steps_done
    current_s = at_s - observation.segment_start_s
    silence = _add_exposure(observation.silence_exposure, observation.concurrency, current_s)
    sample = StepSample(silence, steps) if silence else None

    progress = observation.progress_exposure
    for level, seconds in silence:
        progress = _add_exposure(progress, level, seconds)
    # Built field by field because dataclasses.replace costs several times more, and the
    # simulator calls this for every progress report of 100,000 attempts.
    updated = AttemptObservation(
        observation.attempt_id,
        observation.step_class,
        observation.total_steps,
        observation.started_at_s,
        observation.deadline_at_s,
        observation.concurrency,
        step,
        at_s,
        at_s,
        progress,
        (),
        observation.retries_left,
        observation.other_attempts_in_flight,
        steps if report_steps is None else report_steps,
    )
    return updated, sample


def record_concurrency(
    observation: AttemptObservation, concurrency: int, at_s: float
) -> AttemptObservation:
    """Record that the attempt's device runs ``concurrency`` attempts from ``at_s`` on."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    if concurrency == observation.concurrency:
        return observation
    at_s = max(at_s, observation.segment_start_s)
    current_s = at_s - observation.segment_start_s
    return AttemptObservation(
        observation.attempt_id,
        observation.step_class,
        observation.total_steps,
        observation.started_at_s,
        observation.deadline_at_s,
        concurrency,
        observation.steps_done,
        observation.last_progress_at_s,
        at_s,
        observation.progress_exposure,
        _add_exposure(observation.silence_exposure, observation.concurrency, current_s),
        observation.retries_left,
        observation.other_attempts_in_flight,
        observation.report_steps,
    )


def _add_exposure(exposure: Exposure, concurrency: int, seconds: float) -> Exposure:
    if seconds <= 0.0:
        return exposure
    if not exposure:
        return ((concurrency, seconds),)
    for index, (level, total_s) in enumerate(exposure):
        if level == concurrency:
            return exposure[:index] + ((level, total_s + seconds),) + exposure[index + 1:]
    return exposure + ((concurrency, seconds),)


# ---- baseline policies ----------------------------------------------------------------------


@dataclass(frozen=True)
class FixedTimeout:
    """Kill an attempt once it has run for ``timeout_s`` since it started, whatever it does."""

    timeout_s: float
    name: str = "fixed"

    def decide(self, observation: AttemptObservation, now_s: float) -> TimeoutDecision:
        deadline_s = observation.started_at_s + self.timeout_s
        if now_s >= deadline_s - _TIME_EPSILON_S:
            elapsed_s = now_s - observation.started_at_s
            return TimeoutDecision(
                "kill_hung",
                f"running for {elapsed_s:.1f} s, over the fixed {self.timeout_s:.1f} s timeout",
                None,
                math.inf,
            )
        return TimeoutDecision("keep", "within the fixed timeout", None, deadline_s)


@dataclass(frozen=True)
class HeartbeatTimeout:
    """Kill an attempt that has reported no progress for ``silence_s`` seconds."""

    silence_s: float
    name: str = "heartbeat_fixed"

    def decide(self, observation: AttemptObservation, now_s: float) -> TimeoutDecision:
        hung_at_s = observation.last_progress_at_s + self.silence_s
        if now_s >= hung_at_s - _TIME_EPSILON_S:
            silent_s = now_s - observation.last_progress_at_s
            return TimeoutDecision(
                "kill_hung",
                f"no progress for {silent_s:.1f} s after step {observation.steps_done}/"
                f"{observation.total_steps}, over the fixed {self.silence_s:.1f} s limit",
                None,
                math.inf,
            )
        return TimeoutDecision("keep", "progress reported within the fixed limit", None, hung_at_s)


def fixed_p99(p99_s: float) -> FixedTimeout:
    """Build the baseline that times out at the unconditional p99 of attempt duration."""
    return FixedTimeout(p99_s, "fixed_p99")


def fixed_3x_p50(p50_s: float) -> FixedTimeout:
    """Build the baseline that times out at three times the median attempt duration."""
    return FixedTimeout(3.0 * p50_s, "fixed_3x_p50")


def heartbeat_fixed(silence_s: float) -> HeartbeatTimeout:
    """Build the baseline that kills after a fixed time without a progress report."""
    return HeartbeatTimeout(silence_s, "heartbeat_fixed")


# ---- adaptive policy ------------------------------------------------------------------------


@dataclass(frozen=True)
class AdaptiveConfig:
    """Parameters of the adaptive policy; the defaults are starting points, not tuned limits."""

    # Before the first step, the allowed silence is this multiple of the class's step time at
    # ``first_step_quantile`` for the current concurrency.
    first_step_quantile: float = 0.999
    first_step_slack: float = 2.0
    # Wall-clock seconds added before the first step for model loading and prompt encoding,
    # which the step-time estimates do not include.
    startup_allowance_s: float = 0.0
    # After the first step, the allowed silence is this multiple of the attempt's own step
    # time, re-scaled to the current concurrency.
    progress_slack: float = 4.0
    # Progress reports travel through Kafka, so no attempt is called hung after less silence.
    min_silence_s: float = 1.0
    # Silence allowed after the last step, while the worker decodes and stores the image.
    # NOTE: a guess; measure decode and upload time on the real runner and set it from that.
    final_step_silence_s: float = 30.0
    # The last attempt able to fill its slot gets this many times the usual silence, because
    # a false kill there loses the slot for certain.
    last_viable_slack_factor: float = 3.0
    # A deadline kill needs even the best case (concurrency 1, the attempt's own step time
    # divided by this margin) to finish after the job deadline.
    deadline_margin: float = 1.5
    # Steps an attempt must report before its own step time is used to project its finish.
    min_steps_for_projection: int = 2

    def __post_init__(self) -> None:
        if not 0.5 <= self.first_step_quantile < 1.0:
            raise ValueError(
                f"first_step_quantile must be in [0.5, 1), got {self.first_step_quantile}"
            )
        for name in ("first_step_slack", "progress_slack", "last_viable_slack_factor",
                     "deadline_margin"):
            if getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("startup_allowance_s", "min_silence_s", "final_step_silence_s"):
            if getattr(self, name) < 0.0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")
        if self.min_steps_for_projection < 1:
            raise ValueError(
                f"min_steps_for_projection must be at least 1, got {self.min_steps_for_projection}"
            )


class AdaptiveTimeout:
    """Presume an attempt hung from its silence, measured against learned step times.

    Silence is counted in units of the class's median step time at each concurrency level
    the attempt ran at, so a busy device stretches the allowed wall-clock silence and a
    quiet one shrinks it. A progressing attempt is killed only when even its best-case finish
    is after the job deadline and another attempt could still fill its slot.
    """

    name = "adaptive"

    def __init__(self, estimator: StepTimeEstimator, config: AdaptiveConfig | None = None) -> None:
        self.estimator = estimator
        self.config = config or AdaptiveConfig()

    def decide(self, observation: AttemptObservation, now_s: float) -> TimeoutDecision:
        obs = observation
        median_now_s = self.estimator.median_step_s(obs.step_class, obs.concurrency)
        # The attempt's own pace in median steps per step; 1 until it reports a step.
        if obs.steps_done > 0:
            speed = self._units(obs.step_class, obs.progress_exposure) / obs.steps_done
        else:
            speed = 1.0
        last_viable = self._is_last_viable(obs, now_s, median_now_s)
        hung_at_s = self._hung_at_s(obs, now_s, median_now_s, speed, last_viable)
        remaining_steps = max(obs.total_steps - obs.steps_done, 0)
        expected_remaining_s = remaining_steps * speed * median_now_s

        if now_s >= hung_at_s - _TIME_EPSILON_S:
            silent_s = now_s - obs.last_progress_at_s
            limit_s = hung_at_s - obs.last_progress_at_s
            return TimeoutDecision(
                "kill_hung",
                f"no progress for {silent_s:.1f} s after step {obs.steps_done}/"
                f"{obs.total_steps} at concurrency {obs.concurrency}; expected at most "
                f"{limit_s:.1f} s",
                expected_remaining_s,
                math.inf,
            )
        if now_s >= obs.deadline_at_s - _TIME_EPSILON_S:
            return TimeoutDecision(
                "kill_deadline", "the job deadline passed", expected_remaining_s, math.inf
            )
        next_check_at_s = min(hung_at_s, obs.deadline_at_s)
        if obs.steps_done < self.config.min_steps_for_projection:
            return TimeoutDecision(
                "keep", "waiting for progress", expected_remaining_s, next_check_at_s
            )
        return self._decide_on_deadline(
            obs, now_s, speed, last_viable, expected_remaining_s, next_check_at_s
        )

    def _hung_at_s(
        self,
        obs: AttemptObservation,
        now_s: float,
        median_now_s: float,
        speed: float,
        last_viable: bool,
    ) -> float:
        """Return when the attempt counts as hung if it reports no progress before then.

        The estimate is valid while the concurrency stays as it is now, so the caller
        decides again after every ``record_concurrency``.
        """
        config = self.config
        # Silence so far, in median steps: finished segments plus the current one.
        current_s = max(0.0, now_s - obs.segment_start_s)
        silence_units = self._units(obs.step_class, obs.silence_exposure)
        silence_units += current_s / median_now_s
        if obs.steps_done > 0:
            allowed_units = config.progress_slack * speed
        else:
            tail_s = self.estimator.step_quantile_s(
                obs.step_class, obs.concurrency, config.first_step_quantile
            )
            allowed_units = config.first_step_slack * tail_s / median_now_s
        # The allowance is per step, and the next report comes only after several steps
        # when the worker reports every few steps.
        allowed_units *= obs.report_steps
        if last_viable:
            allowed_units *= config.last_viable_slack_factor

        hung_at_s = now_s + (allowed_units - silence_units) * median_now_s
        if obs.steps_done == 0:
            hung_at_s += config.startup_allowance_s
        if obs.steps_done >= obs.total_steps:
            floor_s = config.final_step_silence_s
        else:
            floor_s = config.min_silence_s
        return max(hung_at_s, obs.last_progress_at_s + floor_s)

    def _decide_on_deadline(
        self,
        obs: AttemptObservation,
        now_s: float,
        speed: float,
        last_viable: bool,
        expected_remaining_s: float,
        next_check_at_s: float,
    ) -> TimeoutDecision:
        """Kill a progressing attempt that cannot finish in time, unless it is the last one."""
        # Best case: the rest runs alone on the device at the attempt's own pace.
        alone_s = self.estimator.median_step_s(obs.step_class, 1)
        remaining_steps = max(obs.total_steps - obs.steps_done, 0)
        best_case_s = remaining_steps * speed * alone_s / self.config.deadline_margin
        late = now_s + best_case_s > obs.deadline_at_s
        if late and not last_viable:
            return TimeoutDecision(
                "kill_deadline",
                f"best-case finish in {best_case_s:.1f} s is after the job deadline in "
                f"{obs.deadline_at_s - now_s:.1f} s, and another attempt can fill the slot",
                expected_remaining_s,
                math.inf,
            )
        if late:
            return TimeoutDecision(
                "keep",
                "last attempt able to fill its slot, kept although it may finish late",
                expected_remaining_s,
                next_check_at_s,
            )
        return TimeoutDecision(
            "keep",
            "progressing within its expected step time",
            expected_remaining_s,
            min(next_check_at_s, obs.deadline_at_s - best_case_s),
        )

    def _units(self, step_class: StepClass, exposure: Exposure) -> float:
        """Convert seconds per concurrency level into median steps of the class."""
        median_step_s = self.estimator.median_step_s
        total = 0.0
        for level, seconds in exposure:
            total += seconds / median_step_s(step_class, level)
        return total

    def _is_last_viable(
        self, obs: AttemptObservation, now_s: float, median_now_s: float
    ) -> bool:
        """Tell whether killing this attempt would leave its slot with no chance to fill."""
        if obs.other_attempts_in_flight > 0:
            return False
        if obs.retries_left <= 0:
            return True
        fresh_attempt_s = obs.total_steps * median_now_s
        return now_s + fresh_attempt_s > obs.deadline_at_s


def adaptive(
    estimator: StepTimeEstimator, config: AdaptiveConfig | None = None
) -> AdaptiveTimeout:
    """Build the adaptive policy over a shared, online-learning step-time estimator."""
    return AdaptiveTimeout(estimator, config)
