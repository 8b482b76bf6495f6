"""The racing policy's pure rules: how many attempts to launch and which are stragglers."""

from __future__ import annotations

import pytest

from streams.pool import RunningAttempts
from streams.racing import (
    STRAGGLER_MIN_REMAINING_S,
    AttemptRun,
    RaceInputs,
    RacingPolicy,
    ServiceTimes,
    attempts_to_launch,
    is_straggling,
    straggler_threshold_s,
    stragglers,
    worth_finishing,
)


def _inputs(open_slots: int, rate: float, idle: int, in_flight: int = 0,
            budget: int = 100) -> RaceInputs:
    return RaceInputs(open_slots=open_slots, in_flight=in_flight, acceptance_rate=rate,
                      budget_left=budget, pool_idle_slots=idle)


def test_saturated_pool_rounds_need() -> None:
    # 4 / 0.48 = 8.33: rounding up would launch a ninth attempt into a full pool.
    decision = attempts_to_launch(RacingPolicy.ADAPTIVE, _inputs(4, 0.48, idle=0))

    assert decision.needed == 8
    assert decision.speculative == 0


def test_idle_pool_rounds_need_up() -> None:
    decision = attempts_to_launch(RacingPolicy.ADAPTIVE, _inputs(4, 0.48, idle=9))

    assert decision.needed == 9


def test_saturated_need_covers_open_slots() -> None:
    # Rounding 1 / 0.9 gives 1; rounding never launches fewer attempts than open slots.
    decision = attempts_to_launch(RacingPolicy.ADAPTIVE, _inputs(3, 0.95, idle=0))

    assert decision.needed == 3


def test_fixed_policies_ignore_rounding() -> None:
    assert attempts_to_launch(RacingPolicy.FIXED_RACE, _inputs(4, 0.48, idle=0)).total == 8
    assert attempts_to_launch(RacingPolicy.SEQUENTIAL, _inputs(4, 0.48, idle=0)).total == 4


def test_remaining_time_from_step_rate() -> None:
    assert AttemptRun(running_s=2.0, steps_done=4, total_steps=10).remaining_s() == \
        pytest.approx(3.0)
    assert AttemptRun(running_s=2.0, steps_done=10, total_steps=10).remaining_s() == 0.0
    assert AttemptRun(running_s=2.0, steps_done=0, total_steps=10).remaining_s() is None


def test_stragglers_exceed_typical_time() -> None:
    runs = {
        "slow": AttemptRun(running_s=0.6, steps_done=3, total_steps=30),  # 5.4 s left
        "fast": AttemptRun(running_s=0.03, steps_done=3, total_steps=30),  # 0.27 s left
        "unstarted": AttemptRun(running_s=0.5, steps_done=0, total_steps=30),
        "almost_done": AttemptRun(running_s=3.0, steps_done=29, total_steps=30),
    }

    assert stragglers(runs, typical_service_s=0.3) == ["slow"]


def test_stragglers_need_typical_time() -> None:
    runs = {"slow": AttemptRun(running_s=5.0, steps_done=1, total_steps=30)}

    assert stragglers(runs, typical_service_s=None) == []
    assert stragglers(runs, typical_service_s=0.0) == []


def test_straggler_threshold_needs_typical_time() -> None:
    assert straggler_threshold_s(0.3) == 0.6
    assert straggler_threshold_s(0.3, factor=3.0) == 0.3 * 3.0
    assert straggler_threshold_s(None) is None
    assert straggler_threshold_s(0.0) is None


def test_fast_class_gets_the_straggler_floor() -> None:
    # Scheduling jitter makes a 2 ms attempt look slow, but a replacement would start later.
    assert straggler_threshold_s(0.002) == STRAGGLER_MIN_REMAINING_S
    runs = {
        "jittered": AttemptRun(running_s=0.01, steps_done=2, total_steps=10),  # 0.04 s left
        "slow": AttemptRun(running_s=0.1, steps_done=2, total_steps=10),  # 0.4 s left
    }

    assert stragglers(runs, typical_service_s=0.002) == ["slow"]


def test_straggler_floor_boundary() -> None:
    assert straggler_threshold_s(0.05) == STRAGGLER_MIN_REMAINING_S
    assert straggler_threshold_s(0.06) == pytest.approx(0.12)
    assert straggler_threshold_s(0.002, factor=100.0) == pytest.approx(0.2)
    # An attempt with exactly the floor left is no straggler.
    at_floor = AttemptRun(running_s=0.05, steps_done=2, total_steps=6)
    assert at_floor.remaining_s() == pytest.approx(STRAGGLER_MIN_REMAINING_S)
    assert not is_straggling(at_floor, STRAGGLER_MIN_REMAINING_S)


def test_heartbeat_checks_use_straggler_floor() -> None:
    # Attempts of this class take 2 ms, so factor times typical would be only 4 ms.
    times = ServiceTimes(min_samples=1)
    times.observe("M1|8x8|30", 0.002)
    running = RunningAttempts()
    for attempt_id, step_s in (("jittered", 0.003), ("slow", 0.01)):
        running.started(attempt_id, "M1|8x8|30")
        for step in range(1, 4):
            running.progress(attempt_id, step=step, total_steps=30, at_s=step * step_s)

    runs = running.runs(["jittered", "slow"])
    assert runs["jittered"].remaining_s() == pytest.approx(0.081)
    assert runs["slow"].remaining_s() == pytest.approx(0.27)

    # The coordinator's check at each heartbeat.
    assert not running.is_straggler("jittered", times)
    assert running.is_straggler("slow", times)

    # The worker's own check, with the threshold that the dispatch carries.
    dispatched_threshold_s = straggler_threshold_s(times.median_s("M1|8x8|30"))
    assert dispatched_threshold_s is not None
    assert not is_straggling(runs["jittered"], dispatched_threshold_s)
    assert is_straggling(runs["slow"], dispatched_threshold_s)


def test_service_times_median_after_samples() -> None:
    times = ServiceTimes(window=5, min_samples=3)
    times.observe("a", 1.0)
    times.observe("a", 9.0)
    assert times.median_s("a") is None

    times.observe("a", 2.0)
    assert times.median_s("a") == 2.0
    assert times.median_s("b") is None

    for _ in range(5):
        times.observe("a", 4.0)
    assert times.median_s("a") == 4.0


def test_running_attempts_measure_from_first_step() -> None:
    running = RunningAttempts()
    running.started("a-1", "M1|32x32|30")
    running.progress("a-1", step=1, total_steps=30, at_s=10.0)
    running.progress("a-1", step=5, total_steps=30, at_s=10.4)
    running.progress("a-1", step=3, total_steps=30, at_s=10.9)
    running.progress("unknown", step=1, total_steps=30, at_s=10.5)

    runs = running.runs(["a-1", "unknown"])

    assert list(runs) == ["a-1"]
    assert runs["a-1"].running_s == pytest.approx(0.4)
    assert runs["a-1"].steps_done == 4
    assert runs["a-1"].total_steps == 29
    assert runs["a-1"].remaining_s() == pytest.approx(2.5)


def test_stale_epoch_keeps_current_rate() -> None:
    running = RunningAttempts()
    running.started("a-1", "M1|32x32|30", epoch=2)
    running.progress("a-1", step=1, total_steps=30, at_s=10.0, epoch=2)
    running.progress("a-1", step=5, total_steps=30, at_s=10.4, epoch=2)

    # A fenced epoch 1 run starts late and reports slow steps.
    running.started("a-1", "M1|32x32|30", epoch=1)
    running.progress("a-1", step=6, total_steps=30, at_s=30.0, epoch=1)
    running.ended("a-1", epoch=1)

    runs = running.runs(["a-1"])
    assert runs["a-1"].running_s == pytest.approx(0.4)
    assert runs["a-1"].steps_done == 4


def test_newer_epoch_restarts_rate() -> None:
    running = RunningAttempts()
    running.started("a-1", "M1|32x32|30", epoch=1)
    running.progress("a-1", step=1, total_steps=30, at_s=10.0, epoch=1)
    running.progress("a-1", step=9, total_steps=30, at_s=10.8, epoch=1)

    running.started("a-1", "M1|32x32|30", epoch=2)
    running.progress("a-1", step=1, total_steps=30, at_s=20.0, epoch=2)
    running.progress("a-1", step=3, total_steps=30, at_s=20.4, epoch=2)

    runs = running.runs(["a-1"])
    assert runs["a-1"].running_s == pytest.approx(0.4)
    assert runs["a-1"].steps_done == 2


def test_running_attempts_flag_straggler() -> None:
    times = ServiceTimes(min_samples=1)
    times.observe("M1|32x32|30", 0.2)
    running = RunningAttempts()
    for attempt_id, step_s in (("slow", 0.1), ("fast", 0.005)):
        running.started(attempt_id, "M1|32x32|30")
        for step in range(1, 6):
            running.progress(attempt_id, step=step, total_steps=30, at_s=step * step_s)

    assert running.is_straggler("slow", times)
    assert not running.is_straggler("fast", times)

    running.ended("slow")
    assert not running.is_straggler("slow", times)
    assert running.runs(["slow"]) == {}


def test_one_step_not_judged() -> None:
    times = ServiceTimes(min_samples=1)
    times.observe("M1|32x32|30", 0.2)
    running = RunningAttempts()
    running.started("slow", "M1|32x32|30")
    running.progress("slow", step=1, total_steps=30, at_s=0.0)
    running.progress("slow", step=2, total_steps=30, at_s=0.5)

    assert not running.is_straggler("slow", times)


def test_nearly_done_attempt_finishes() -> None:
    nearly_done = AttemptRun(running_s=0.9, steps_done=9, total_steps=10)  # 0.1 s left

    assert worth_finishing(nearly_done, typical_service_s=0.3, pool_idle_slots=1)
    assert not worth_finishing(nearly_done, typical_service_s=0.3, pool_idle_slots=0)
    assert not worth_finishing(nearly_done, typical_service_s=None, pool_idle_slots=1)
    assert not worth_finishing(None, typical_service_s=0.3, pool_idle_slots=1)


def test_far_from_done_attempt_stops() -> None:
    halfway = AttemptRun(running_s=0.5, steps_done=5, total_steps=10)  # 0.5 s left

    assert not worth_finishing(halfway, typical_service_s=0.3, pool_idle_slots=4)
