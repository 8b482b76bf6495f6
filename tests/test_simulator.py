"""Tests of the GPU-pool simulator and the timeouts benchmark suite, on small workloads."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from bench import timeouts as timeouts_suite
from bench.simulator import NeverKill, WorkloadConfig, simulate
from streams.step_times import StepClass, StepTimeEstimator
from streams.timeouts import (
    AttemptObservation,
    TimeoutDecision,
    TimeoutPolicy,
    adaptive,
    fixed_3x_p50,
    fixed_p99,
)

SMALL = WorkloadConfig(attempts=2_000, seed=5, devices=6)


class _Recorder:
    """Wrap a policy and keep every decision other than keep, with its observation."""

    def __init__(self, policy: TimeoutPolicy) -> None:
        self.inner = policy
        self.name = policy.name
        self.kills: list[tuple[AttemptObservation, float, TimeoutDecision]] = []

    def decide(self, observation: AttemptObservation, now_s: float) -> TimeoutDecision:
        decision = self.inner.decide(observation, now_s)
        if decision.action != "keep":
            self.kills.append((observation, now_s, decision))
        return decision


def test_service_sigma_matches_p99_over_p50() -> None:
    config = WorkloadConfig()

    assert config.service_sigma == pytest.approx(0.99, abs=0.005)
    assert config.slowdown(1) == 1.0
    assert config.slowdown(config.slots_per_device) == pytest.approx(config.max_slowdown)


def test_simulated_service_time_is_lognormal_with_ratio_ten() -> None:
    result = simulate(dataclasses.replace(SMALL, attempts=10_000, hang_fraction=0.0), NeverKill())
    service_s = np.asarray(result.service_s)

    ratio = np.quantile(service_s, 0.99) / np.quantile(service_s, 0.5)
    assert 8.5 <= ratio <= 11.5
    assert np.quantile(service_s, 0.5) == pytest.approx(SMALL.service_p50_s, rel=0.1)


def test_simulation_is_deterministic() -> None:
    first = simulate(SMALL, fixed_p99(150.0)).summary()
    second = simulate(SMALL, fixed_p99(150.0)).summary()

    assert first == second


def test_without_kills_hangs_hold_slots_until_deadline() -> None:
    summary = simulate(SMALL, NeverKill()).summary()

    assert summary["hung_attempts"] > 0
    assert summary["kills"] == {}
    assert summary["mean_hang_detection_s"] > 0.5 * SMALL.deadline_s


def test_adaptive_detects_hangs_faster_than_fixed_p99() -> None:
    estimator = StepTimeEstimator()
    learned = simulate(SMALL, adaptive(estimator), estimator).summary()
    fixed = simulate(SMALL, fixed_p99(150.0)).summary()

    assert learned["hung_attempts"] > 0
    assert learned["hangs_killed_fraction"] == 1.0
    assert learned["mean_hang_detection_s"] < 0.1 * fixed["mean_hang_detection_s"]
    first_class = SMALL.classes[0]
    step_class = StepClass(first_class.model, first_class.width, first_class.height)
    assert estimator.samples(step_class) > 0


def test_adaptive_false_kills_below_fixed_3x_p50() -> None:
    estimator = StepTimeEstimator()
    learned = simulate(SMALL, adaptive(estimator), estimator).summary()
    fixed = simulate(SMALL, fixed_3x_p50(20.0)).summary()

    assert fixed["false_kills"] > 0
    assert learned["false_kills"] < fixed["false_kills"]
    assert learned["false_kill_fraction"] <= 0.001


def test_fixed_timeout_counts_from_attempt_start_not_dispatch() -> None:
    # Two devices under the default load build a queue, so attempts wait before they start.
    busy = dataclasses.replace(SMALL, attempts=1_500, devices=2)
    recorder = _Recorder(fixed_p99(150.0))
    summary = simulate(busy, recorder).summary()

    assert summary["mean_queue_wait_s"] > 1.0
    assert recorder.kills
    for obs, killed_at_s, _ in recorder.kills:
        assert killed_at_s - obs.started_at_s == pytest.approx(150.0)


def test_workload_config_rejects_invalid_values() -> None:
    with pytest.raises(ValueError, match="hang_fraction"):
        WorkloadConfig(hang_fraction=1.5).validate()
    with pytest.raises(ValueError, match="class_sigma"):
        WorkloadConfig(class_sigma=2.0).validate()
    with pytest.raises(ValueError, match="service_p99_over_p50"):
        WorkloadConfig(service_p99_over_p50=1.0).validate()


def test_timeouts_suite_writes_results(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    timeouts_suite.add_arguments(parser)
    args = parser.parse_args(["--attempts", "1500", "--seed", "3"])
    out = tmp_path / "timeouts.json"

    report = timeouts_suite.run(out, args)

    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert set(report["results"]) == {"fixed_p99", "fixed_3x_p50", "heartbeat_fixed", "adaptive"}
    for metrics in report["results"].values():
        for key in ("false_kill_fraction", "mean_hang_detection_s", "p99_hang_detection_s",
                    "wasted_gpu_fraction", "p99_job_s"):
            assert key in metrics
            assert metrics[key] is None or math.isfinite(metrics[key])
    assert report["setup"]["seed"] == 3
    assert [target["met"] for target in report["targets"]] == [True, True]
    page = timeouts_suite.render_markdown(report)
    assert "## Timeouts" in page
    assert "slotforge bench timeouts" in page
