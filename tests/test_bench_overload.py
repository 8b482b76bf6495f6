"""The overload benchmark's schedule and metrics on hand-made trace rows and events."""

from __future__ import annotations

import argparse
import collections
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bench import overload
from bench.pipeline_run import AttemptLog, JobOutcome
from schemas.events import (
    AttemptDispatched,
    AttemptFinished,
    AttemptStarted,
    AttemptStatus,
    GenerationParams,
    JobCompleted,
    JobStatus,
    Tier,
)
from streams.trace_replay import TraceRequest

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _config(**changes: object) -> overload.OverloadConfig:
    parser = argparse.ArgumentParser()
    overload.add_arguments(parser)
    args = parser.parse_args(["--trace", "unused.csv"])
    for name, value in changes.items():
        setattr(args, name, value)
    return overload.OverloadConfig.from_args(args)


def _rows(count: int, gap_s: float = 1.0, slots: int = 1) -> list[TraceRequest]:
    return [TraceRequest(arrival_s=index * gap_s, user="u", model="M1", prompt_length=20,
                         negative_prompt_length=0, steps=30, slots=slots,
                         predict_type="txt2img", exec_time_s=1.0)
            for index in range(count)]


def _dispatch(attempt_id: str, at_s: float, tier: Tier = Tier.STANDARD) -> AttemptDispatched:
    return AttemptDispatched(
        attempt_id=attempt_id, job_id="job", job_key="k", tenant_id="t", slot=0,
        attempt_no=1, params=GenerationParams(model="M1", prompt="p", steps=2), seed=1,
        tier=tier, dispatched_at=T0 + timedelta(seconds=at_s),
        deadline_at=T0 + timedelta(seconds=600))


def _run(attempt_id: str, worker_id: str, start_s: float, end_s: float
         ) -> tuple[AttemptStarted, AttemptFinished]:
    started = AttemptStarted(attempt_id=attempt_id, job_id="job", job_key="k",
                             worker_id=worker_id, started_at=T0 + timedelta(seconds=start_s))
    finished = AttemptFinished(attempt_id=attempt_id, job_id="job", job_key="k",
                               worker_id=worker_id, status=AttemptStatus.SUCCEEDED, slot=0,
                               gpu_s=end_s - start_s, emitted_at=T0 + timedelta(seconds=end_s))
    return started, finished


def test_window_puts_peak_at_requested_demand() -> None:
    config = _config(peak_demand=3.0, workers=1, worker_slots=2, acceptance=1.0, sigma=0.0,
                     p50_s=1.0)
    rows = _rows(100)
    window_s = overload.peak_demand_window_s(rows, config)
    scaled = overload.compress_trace(rows, window_s)

    # Uniform arrivals of jobs of 1 GPU second each: the busiest stretch requests 3 x 2 slots.
    width = scaled[-1].arrival_s * overload.PEAK_WINDOW_FRACTION
    inside = sum(1 for row in scaled if row.arrival_s < width)
    assert inside / width == pytest.approx(3.0 * 2, rel=0.12)


def test_schedule_mixes_tiers_20_50_30() -> None:
    config = _config()
    schedule = overload.build_schedule(_rows(100, slots=8), config)
    tiers = collections.Counter(request.tier for _, request in schedule)
    assert tiers == {Tier.INTERACTIVE: 20, Tier.STANDARD: 50, Tier.BATCH: 30}
    assert all(request.slots == config.max_slots for _, request in schedule)
    assert {request.deadline_s for _, request in schedule
            if request.tier is Tier.INTERACTIVE} == {config.deadlines_s[Tier.INTERACTIVE]}
    assert all(request.allow_downgrade == (request.tier is Tier.STANDARD)
               for _, request in schedule)


def test_bad_deadlines_rejected() -> None:
    with pytest.raises(ValueError, match="every tier"):
        _config(deadlines="interactive=30")


def test_busy_fraction_counts_only_backlogged_time() -> None:
    # Two slots. From 0 to 10 s both run while "c" waits; "c" then runs alone until 20 s
    # with nothing waiting, which must not count.
    a = _run("a", "w", 0.0, 10.0)
    b = _run("b", "w", 0.0, 5.0)
    c = _run("c", "w", 5.5, 20.0)
    log = AttemptLog(started=[a[0], b[0], c[0]], finished=[a[1], b[1], c[1]])
    dispatched = {("a", 1): _dispatch("a", 0.0), ("b", 1): _dispatch("b", 0.0),
                  ("c", 1): _dispatch("c", 1.0)}

    result = overload.busy_while_backlogged(log, dispatched, slots=2)

    # Waiting from 1.0 to 5.5 s: both slots busy until 5.0, one slot for the last 0.5 s.
    assert result["backlogged_s"] == pytest.approx(4.5)
    assert result["gpu_busy_fraction_while_backlogged"] == pytest.approx((4.0 * 2 + 0.5) / 9.0)
    assert result["max_waiting_attempts"] == 1


def test_tier_metrics_count_deadlines_of_admitted_jobs() -> None:
    config = _config()
    schedule = overload.build_schedule(_rows(10), config)
    outcomes = []
    for index, (_, request) in enumerate(schedule):
        outcome = JobOutcome(request.job_id, request.slots, submitted_s=0.0, ended_s=1.0)
        if index == 0:
            outcome.status = "rejected"
        else:
            late = index == 1
            finished_at = T0 + timedelta(seconds=request.deadline_s + (5 if late else -5))
            outcome.status = "completed"
            outcome.completed = JobCompleted(
                job_id=request.job_id, job_key="k", tenant_id="t", user_id="u",
                status=JobStatus.COMPLETED, requested_slots=request.slots, slots=[],
                attempts=1, tier=request.tier, requested_at=T0, completed_at=finished_at)
        outcomes.append(outcome)

    tiers = overload.tier_metrics(schedule, outcomes, AttemptLog(), {})

    first, second = schedule[0][1].tier, schedule[1][1].tier
    total = {name: sum(row[name] for row in tiers.values())
             for name in ("jobs", "admitted", "rejected")}
    assert total == {"jobs": 10, "admitted": 9, "rejected": 1}
    assert tiers[first.value]["rejected"] == 1
    met = tiers[second.value]["deadline_met_fraction"]
    admitted = tiers[second.value]["admitted"]
    assert met == pytest.approx((admitted - 1) / admitted)


def test_render_lists_both_policies(tmp_path: Path) -> None:
    tier_row = {"jobs": 1, "admitted": 1, "rejected": 0, "downgraded": 0, "completed": 1,
                "p50_wait_s": 0.1, "p99_wait_s": 0.2, "deadline_met_fraction": 1.0}
    item = {"gpu_busy_fraction_while_backlogged": 0.97, "backlogged_s": 10.0,
            "max_waiting_attempts": 5.0, "memory_flat": True, "load_average_1m": 1.0,
            "tiers": {tier.value: dict(tier_row) for tier in Tier},
            "rss": {"coordinator": {"max_rss_mb": 100.0, "first_quarter_mean_mb": 90.0,
                                    "last_quarter_mean_mb": 95.0, "grows": False}}}
    results = {"none": item, "admission": item}
    page = overload.render_markdown({
        "results": results, "targets": overload.targets(results),
        "setup": {"machine": {"platform": "p", "cpus": 2, "python": "3.11"}, "kafka": "4.4",
                  "trace": {"file": "t.csv", "rows": 1, "replay_window_s": 1.0},
                  "parameters": {"workers": 1, "slots_per_worker": 1, "pool_slots": 1,
                                 "p50_service_s": 1.0, "sigma": 0.5, "mean_service_s": 1.1,
                                 "acceptance": 0.8, "max_slots": 4, "peak_demand": 3.0,
                                 "average_demand": 1.5, "peak_window_fraction": 0.25,
                                 "deadlines_s": {"interactive": 30.0}},
                  "load_average_1m_end": 1.0, "wall_s": 60.0, "reproduce": "x"}})
    assert "| none | 0.970 |" in page
    assert "| admission | interactive |" in page
    assert "NOT met" not in page
