"""Tests of the timeout policies: baselines, hang detection, deadlines and concurrency changes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from streams.step_times import StepClass, StepTimeEstimator
from streams.timeouts import (
    AdaptiveConfig,
    AttemptObservation,
    TimeoutDecision,
    TimeoutPolicy,
    adaptive,
    fixed_3x_p50,
    fixed_p99,
    heartbeat_fixed,
    record_concurrency,
    record_progress,
    start_observation,
)

SDXL = StepClass("sdxl", 1024, 1024)
STEPS = 30
MEDIAN_STEP_S = 0.3
STEP_SIGMA = 0.5
Z_999 = 3.0902


@pytest.fixture
def estimator() -> StepTimeEstimator:
    """An estimator trained on steps of median 0.3 s alone and 3x slower at concurrency 4."""
    estimator = StepTimeEstimator()
    rng = np.random.default_rng(11)
    for level, slowdown in ((1, 1.0), (2, 5 / 3), (4, 3.0)):
        draws = MEDIAN_STEP_S * slowdown * np.exp(STEP_SIGMA * rng.standard_normal(2_000))
        for step_s in draws.tolist():
            estimator.observe(SDXL, level, step_s)
    return estimator


def _observation(
    *, started_at_s: float = 100.0, concurrency: int = 1, deadline_in_s: float = 10_000.0,
    retries_left: int = 2, other_attempts_in_flight: int = 0,
) -> AttemptObservation:
    return start_observation(
        "attempt-1", SDXL, STEPS, started_at_s=started_at_s,
        deadline_at_s=started_at_s + deadline_in_s, concurrency=concurrency,
        retries_left=retries_left, other_attempts_in_flight=other_attempts_in_flight,
    )


def _drive(
    policy: TimeoutPolicy, obs: AttemptObservation, progress_at_s: list[float], until_s: float,
    steps_per_report: int = 1,
) -> tuple[TimeoutDecision | None, float, AttemptObservation]:
    """Feed progress reports in order and check whenever the policy requests a check.

    Each report advances ``steps_per_report`` steps. Returns the first decision other than
    keep with its time, or None once ``until_s`` passes, and the last observation.
    """
    now_s = obs.started_at_s
    decision = policy.decide(obs, now_s)
    pending = list(progress_at_s)
    while decision.action == "keep":
        next_progress_s = pending[0] if pending else math.inf
        if min(decision.next_check_at_s, next_progress_s) > until_s:
            return None, until_s, obs
        if decision.next_check_at_s < next_progress_s:
            now_s = decision.next_check_at_s
        else:
            now_s = pending.pop(0)
            obs, _ = record_progress(obs, obs.steps_done + steps_per_report, now_s)
        decision = policy.decide(obs, now_s)
    return decision, now_s, obs


def _steady_progress(started_at_s: float, step_s: float, steps: int) -> list[float]:
    return [started_at_s + step_s * (index + 1) for index in range(steps)]


# ---- baselines ------------------------------------------------------------------------------


def test_fixed_p99_kills_at_timeout_after_start() -> None:
    policy = fixed_p99(200.0)
    obs = _observation(started_at_s=100.0)

    early = policy.decide(obs, 299.0)
    late = policy.decide(obs, 300.0)

    assert policy.name == "fixed_p99"
    assert early.action == "keep"
    assert early.next_check_at_s == pytest.approx(300.0)
    assert late.action == "kill_hung"


def test_fixed_3x_p50_uses_three_medians() -> None:
    policy = fixed_3x_p50(20.0)

    assert policy.name == "fixed_3x_p50"
    assert policy.timeout_s == pytest.approx(60.0)
    assert policy.decide(_observation(started_at_s=0.0), 60.0).action == "kill_hung"


def test_heartbeat_fixed_kills_after_silence() -> None:
    policy = heartbeat_fixed(10.0)
    obs, _ = record_progress(_observation(started_at_s=0.0), 5, 50.0)

    assert policy.decide(obs, 59.0).action == "keep"
    assert policy.decide(obs, 59.0).next_check_at_s == pytest.approx(60.0)
    assert policy.decide(obs, 60.0).action == "kill_hung"


# ---- separate budgets -----------------------------------------------------------------------


def test_queue_wait_not_counted(estimator: StepTimeEstimator) -> None:
    # Dispatched at 0 s, queued 500 s, started at 500 s: the budget runs from 500 s.
    obs = _observation(started_at_s=500.0)
    fixed = fixed_p99(200.0)
    heartbeat = heartbeat_fixed(60.0)

    assert fixed.decide(obs, 650.0).action == "keep"
    assert fixed.decide(obs, 650.0).next_check_at_s == pytest.approx(700.0)
    assert heartbeat.decide(obs, 550.0).action == "keep"

    progress = _steady_progress(500.0, MEDIAN_STEP_S, STEPS)
    decision, _, _ = _drive(adaptive(estimator), obs, progress, until_s=progress[-1])
    assert decision is None


# ---- adaptive: slow but healthy -------------------------------------------------------------


def test_adaptive_keeps_p999_attempt_at_triple_slowdown(estimator: StepTimeEstimator) -> None:
    # Every step at the class's p99.9, three times slower because four attempts share the GPU.
    step_s = MEDIAN_STEP_S * math.exp(Z_999 * STEP_SIGMA) * 3.0
    obs = _observation(started_at_s=0.0, concurrency=4)
    progress = _steady_progress(0.0, step_s, STEPS)

    decision, _, final = _drive(adaptive(estimator), obs, progress, until_s=progress[-1])

    assert decision is None
    assert final.steps_done == STEPS


def test_fixed_p99_kills_the_same_slow_attempt() -> None:
    # Contrast: a p99 timeout computed from runs alone on the device kills it.
    step_s = MEDIAN_STEP_S * math.exp(Z_999 * STEP_SIGMA) * 3.0
    alone_p99_s = STEPS * MEDIAN_STEP_S * math.exp(2.3263 * STEP_SIGMA)
    obs = _observation(started_at_s=0.0, concurrency=4)

    decision, _, _ = _drive(
        fixed_p99(alone_p99_s), obs, _steady_progress(0.0, step_s, STEPS), until_s=1_000.0
    )

    assert decision is not None
    assert decision.action == "kill_hung"


def test_adaptive_keeps_attempt_when_pool_gets_busy(estimator: StepTimeEstimator) -> None:
    # Ten steps alone, then three more attempts join and every later step takes 3x longer.
    policy = adaptive(estimator)
    obs = _observation(started_at_s=0.0, concurrency=1)
    decision, now_s, obs = _drive(
        policy, obs, _steady_progress(0.0, MEDIAN_STEP_S, 10), until_s=3.0
    )
    assert decision is None

    obs = record_concurrency(obs, 4, now_s)
    slow = _steady_progress(now_s, 3.0 * MEDIAN_STEP_S, STEPS - 10)
    decision, _, obs = _drive(policy, obs, slow, until_s=slow[-1])

    assert decision is None
    assert obs.steps_done == STEPS


# ---- adaptive: hangs ------------------------------------------------------------------------


def test_adaptive_detects_hang_after_progress(estimator: StepTimeEstimator) -> None:
    obs = _observation(started_at_s=0.0)
    progress = _steady_progress(0.0, MEDIAN_STEP_S, 10)

    decision, killed_at_s, final = _drive(adaptive(estimator), obs, progress, until_s=600.0)

    assert decision is not None
    assert decision.action == "kill_hung"
    assert final.steps_done == 10
    silence_s = killed_at_s - progress[-1]
    # Four of its own 0.3 s steps, but never under the 1 s floor for delivery delay.
    assert silence_s == pytest.approx(4 * MEDIAN_STEP_S, rel=0.1)
    assert silence_s >= AdaptiveConfig().min_silence_s


def test_adaptive_detects_hang_before_first_step(estimator: StepTimeEstimator) -> None:
    obs = _observation(started_at_s=0.0)

    decision, killed_at_s, _ = _drive(adaptive(estimator), obs, [], until_s=600.0)

    assert decision is not None
    assert decision.action == "kill_hung"
    first_step_limit_s = 2.0 * MEDIAN_STEP_S * math.exp(Z_999 * STEP_SIGMA)
    assert killed_at_s == pytest.approx(first_step_limit_s, rel=0.2)


def test_sparse_reports_keep_slow_attempt(estimator: StepTimeEstimator) -> None:
    # Reports every 5 steps at three times the median pace: 4.5 s between reports, more
    # than four of its own steps, so the allowance must count the steps per report.
    obs = start_observation("attempt-1", SDXL, STEPS, started_at_s=0.0,
                            deadline_at_s=10_000.0, concurrency=1, retries_left=2,
                            report_every_steps=5)
    step_s = 3 * MEDIAN_STEP_S
    progress = [5 * step_s * (index + 1) for index in range(STEPS // 5)]

    decision, _, final = _drive(adaptive(estimator), obs, progress, until_s=progress[-1],
                                steps_per_report=5)

    assert decision is None
    assert final.steps_done == STEPS


def test_sparse_reports_still_detect_hang(estimator: StepTimeEstimator) -> None:
    obs = start_observation("attempt-1", SDXL, STEPS, started_at_s=0.0,
                            deadline_at_s=10_000.0, concurrency=1, retries_left=2,
                            report_every_steps=5)
    progress = [5 * MEDIAN_STEP_S, 10 * MEDIAN_STEP_S]

    decision, killed_at_s, final = _drive(adaptive(estimator), obs, progress, until_s=600.0,
                                          steps_per_report=5)

    assert decision is not None
    assert decision.action == "kill_hung"
    assert final.steps_done == 10
    # Four of its own steps per step of the 5-step reporting interval.
    assert killed_at_s - progress[-1] == pytest.approx(5 * 4 * MEDIAN_STEP_S, rel=0.1)


def test_quiet_pool_detects_hang_sooner(estimator: StepTimeEstimator) -> None:
    policy = adaptive(estimator)
    obs = _observation(started_at_s=0.0, concurrency=4)
    progress = _steady_progress(0.0, 3.0 * MEDIAN_STEP_S, 10)
    _, _, busy_obs = _drive(policy, obs, progress, until_s=progress[-1])
    last_progress_s = progress[-1]

    busy = policy.decide(busy_obs, last_progress_s + 1.0)
    quiet_obs = record_concurrency(busy_obs, 1, last_progress_s + 1.0)
    quiet = policy.decide(quiet_obs, last_progress_s + 1.0)

    assert busy.action == "keep"
    assert quiet.action == "keep"
    assert quiet.next_check_at_s < busy.next_check_at_s
    assert policy.decide(quiet_obs, quiet.next_check_at_s).action == "kill_hung"
    assert policy.decide(busy_obs, quiet.next_check_at_s).action == "keep"


def test_concurrency_change_reestimates_remaining_time(estimator: StepTimeEstimator) -> None:
    policy = adaptive(estimator)
    obs = _observation(started_at_s=0.0, concurrency=1)
    _, now_s, obs = _drive(policy, obs, _steady_progress(0.0, MEDIAN_STEP_S, 10), until_s=3.0)

    alone = policy.decide(obs, now_s)
    shared = policy.decide(record_concurrency(obs, 4, now_s), now_s)

    assert alone.expected_remaining_s is not None
    assert shared.expected_remaining_s is not None
    assert alone.expected_remaining_s == pytest.approx(20 * MEDIAN_STEP_S, rel=0.1)
    assert shared.expected_remaining_s == pytest.approx(3.0 * alone.expected_remaining_s, rel=0.1)
    assert shared.next_check_at_s > alone.next_check_at_s


# ---- adaptive: deadlines --------------------------------------------------------------------


def _slow_attempt(estimator: StepTimeEstimator, **slot: int) -> TimeoutDecision:
    """Decide on an attempt 5 steps in at 10 s a step whose job deadline is 60 s away."""
    obs = _observation(started_at_s=0.0, deadline_in_s=110.0, **slot)
    for step in range(1, 6):
        obs, _ = record_progress(obs, step, 10.0 * step)
    return adaptive(estimator).decide(obs, 50.0)


def test_last_viable_attempt_not_killed(estimator: StepTimeEstimator) -> None:
    decision = _slow_attempt(estimator, retries_left=0)

    assert decision.action == "keep"
    assert "last attempt" in decision.reason


def test_late_attempt_killed_when_slot_can_retry(estimator: StepTimeEstimator) -> None:
    decision = _slow_attempt(estimator, retries_left=2)

    assert decision.action == "kill_deadline"


def test_late_attempt_killed_when_hedge_runs(estimator: StepTimeEstimator) -> None:
    decision = _slow_attempt(estimator, retries_left=0, other_attempts_in_flight=1)

    assert decision.action == "kill_deadline"


def test_slow_attempt_kept_while_finish_fits_deadline(estimator: StepTimeEstimator) -> None:
    # Over 8x slower than the median step, but all 30 steps at 2.5 s fit in the 80 s deadline.
    obs = _observation(started_at_s=0.0, deadline_in_s=80.0)
    decision, _, final = _drive(
        adaptive(estimator), obs, _steady_progress(0.0, 2.5, STEPS), until_s=75.0
    )

    assert decision is None
    assert final.steps_done == STEPS


def test_last_viable_attempt_gets_more_silence(estimator: StepTimeEstimator) -> None:
    policy = adaptive(estimator)
    progress = _steady_progress(0.0, MEDIAN_STEP_S, 10)
    _, killed_with_retries_s, _ = _drive(
        policy, _observation(started_at_s=0.0, retries_left=2), progress, until_s=600.0
    )
    _, killed_last_s, _ = _drive(
        policy, _observation(started_at_s=0.0, retries_left=0), progress, until_s=600.0
    )

    factor = AdaptiveConfig().last_viable_slack_factor
    assert killed_last_s - progress[-1] == pytest.approx(
        factor * (killed_with_retries_s - progress[-1]), rel=0.01
    )


# ---- observations ---------------------------------------------------------------------------


def test_record_progress_ignores_stale_reports() -> None:
    obs, first = record_progress(_observation(started_at_s=0.0), 3, 3.0)
    repeated, second = record_progress(obs, 3, 4.0)
    older, third = record_progress(obs, 2, 5.0)

    assert first is not None
    assert first.steps == 3
    assert first.exposure == ((1, 3.0),)
    assert repeated is obs
    assert second is None
    assert older is obs
    assert third is None


def test_record_progress_samples_level_of_interval() -> None:
    # The level changed exactly at the report, so the whole interval ran at level 1.
    obs = record_concurrency(_observation(started_at_s=0.0, concurrency=1), 3, 2.0)
    obs, sample = record_progress(obs, 2, 2.0)

    assert sample is not None
    assert sample.exposure == ((1, 2.0),)
    assert sample.steps == 2
    assert obs.concurrency == 3


def test_record_progress_splits_mixed_interval() -> None:
    obs = _observation(started_at_s=0.0, concurrency=1)
    obs = record_concurrency(obs, 2, 1.0)
    obs, sample = record_progress(obs, 2, 3.0)

    assert sample is not None
    assert sample.exposure == ((1, 1.0), (2, 2.0))
    assert obs.progress_exposure == ((1, 1.0), (2, 2.0))
    assert obs.silence_exposure == ()


def test_decide_is_deterministic(estimator: StepTimeEstimator) -> None:
    policy = adaptive(estimator)
    obs, _ = record_progress(_observation(started_at_s=0.0), 4, 1.2)

    assert policy.decide(obs, 2.0) == policy.decide(obs, 2.0)


def test_invalid_inputs_rejected() -> None:
    with pytest.raises(ValueError, match="total_steps"):
        start_observation("a", SDXL, 0, started_at_s=0.0, deadline_at_s=1.0, concurrency=1)
    with pytest.raises(ValueError, match="concurrency"):
        record_concurrency(_observation(), 0, 1.0)
    with pytest.raises(ValueError, match="progress_slack"):
        AdaptiveConfig(progress_slack=0.5)
