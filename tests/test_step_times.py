"""Tests of the online step-time estimator: learning, backoff, slowdown and checkpoints."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from streams.step_times import EstimatorConfig, StepClass, StepSample, StepTimeEstimator

SDXL = StepClass("sdxl", 1024, 1024)
SD15 = StepClass("sd15", 512, 512)


def _lognormal_steps(median_s: float, sigma: float, count: int, seed: int = 7) -> list[float]:
    rng = np.random.default_rng(seed)
    return (median_s * np.exp(sigma * rng.standard_normal(count))).tolist()


def test_unseen_class_uses_prior() -> None:
    config = EstimatorConfig(prior_median_step_s=2.0, prior_sigma=1.0,
                             prior_slowdown_per_attempt=0.5)
    estimator = StepTimeEstimator(config)

    assert estimator.source(SDXL, 1) == "prior"
    assert estimator.median_step_s(SDXL, 1) == pytest.approx(2.0)
    assert estimator.median_step_s(SDXL, 3) == pytest.approx(2.0 * 2.0)
    assert estimator.step_quantile_s(SDXL, 1, 0.999) == pytest.approx(
        2.0 * math.exp(3.0902 * 1.0), rel=1e-3
    )


def test_learns_median_per_concurrency_level() -> None:
    estimator = StepTimeEstimator()
    for step_s in _lognormal_steps(0.5, 0.3, 400):
        estimator.observe(SDXL, 2, step_s)

    assert estimator.source(SDXL, 2) == "exact"
    assert estimator.samples(SDXL, 2) == 400
    assert estimator.median_step_s(SDXL, 2) == pytest.approx(0.5, rel=0.05)


def test_sparse_level_backs_off_to_class() -> None:
    estimator = StepTimeEstimator(EstimatorConfig(min_samples=50, prior_slowdown_per_attempt=0.5))
    for _ in range(100):
        estimator.observe(SDXL, 1, 0.4)
    for _ in range(10):
        estimator.observe(SDXL, 3, 5.0)

    assert estimator.source(SDXL, 3) == "class"
    # Slowdown at 3 is still the prior 1 + 0.5 * 2 = 2. The class series contains 110
    # samples, most at 0.4 s, so its median is 0.4 s.
    assert estimator.median_step_s(SDXL, 3) == pytest.approx(0.4 * 2.0, rel=0.03)


def test_slowdown_is_learned_from_classes_with_both_levels() -> None:
    estimator = StepTimeEstimator(EstimatorConfig(min_samples=50))
    for step_s in _lognormal_steps(0.4, 0.2, 200, seed=1):
        estimator.observe(SDXL, 1, step_s)
    for step_s in _lognormal_steps(1.2, 0.2, 200, seed=2):
        estimator.observe(SDXL, 3, step_s)
    for step_s in _lognormal_steps(0.1, 0.2, 200, seed=3):
        estimator.observe(SD15, 1, step_s)

    assert estimator.slowdown(1) == 1.0
    assert estimator.slowdown(3) == pytest.approx(3.0, rel=0.08)
    assert estimator.source(SD15, 3) == "class"
    assert estimator.median_step_s(SD15, 3) == pytest.approx(0.3, rel=0.1)


def test_mixed_interval_feeds_only_class_series() -> None:
    estimator = StepTimeEstimator(EstimatorConfig(prior_slowdown_per_attempt=0.5))

    # 2 s alone plus 3 s at level 3 (slowdown 2) is 2 + 1.5 = 3.5 s alone, over 5 steps.
    estimator.observe_sample(SDXL, StepSample(((1, 2.0), (3, 3.0)), 5))
    estimator.observe_sample(SDXL, StepSample(((2, 1.5),), 3))

    assert estimator.samples(SDXL) == 2
    assert estimator.samples(SDXL, 1) == 0
    assert estimator.samples(SDXL, 3) == 0
    assert estimator.samples(SDXL, 2) == 1
    with pytest.raises(ValueError, match="at least one step"):
        estimator.observe_sample(SDXL, StepSample((), 1))


def test_class_series_widens_biased_level_tail() -> None:
    # Level 4 saw only fast steps, as when slow steps spanned changes of level and were
    # dropped there; the class series saw them all.
    estimator = StepTimeEstimator(EstimatorConfig(min_samples=50))
    for step_s in _lognormal_steps(1.0, 0.5, 2_000, seed=4):
        estimator.observe_sample(SDXL, StepSample(((1, step_s / 2), (2, step_s / 2)), 1))
    for _ in range(200):
        estimator.observe(SDXL, 4, 2.5)

    median_s = estimator.median_step_s(SDXL, 4)
    p999_s = estimator.step_quantile_s(SDXL, 4, 0.999)

    assert median_s == pytest.approx(2.5, rel=0.02)
    assert p999_s / median_s == pytest.approx(math.exp(3.0902 * 0.5), rel=0.2)


def test_tail_quantile_extrapolates_lognormal() -> None:
    estimator = StepTimeEstimator()
    for step_s in _lognormal_steps(1.0, 0.5, 2_000):
        estimator.observe(SDXL, 1, step_s)

    p999_s = estimator.step_quantile_s(SDXL, 1, 0.999)

    assert p999_s == pytest.approx(math.exp(3.0902 * 0.5), rel=0.15)
    assert p999_s >= estimator.step_quantile_s(SDXL, 1, 0.99)


def test_checkpoint_round_trip_keeps_estimates() -> None:
    estimator = StepTimeEstimator()
    for step_s in _lognormal_steps(0.4, 0.3, 200, seed=1):
        estimator.observe(SDXL, 1, step_s, steps=2)
    for step_s in _lognormal_steps(1.0, 0.3, 200, seed=2):
        estimator.observe(SDXL, 4, step_s)

    data = json.loads(json.dumps(estimator.to_dict()))
    restored = StepTimeEstimator.from_dict(data)

    assert restored.samples(SDXL, 4) == 200
    assert restored.samples(SDXL) == 400
    for level in (1, 2, 4):
        for q in (0.5, 0.9, 0.999):
            assert restored.step_quantile_s(SDXL, level, q) == pytest.approx(
                estimator.step_quantile_s(SDXL, level, q), rel=1e-9
            )
    restored.observe(SDXL, 1, 0.4)
    assert restored.samples(SDXL, 1) == 201


def test_checkpoint_rejects_other_version_and_malformed_data() -> None:
    data = StepTimeEstimator().to_dict()

    with pytest.raises(ValueError, match="version"):
        StepTimeEstimator.from_dict({**data, "version": 99})
    with pytest.raises(ValueError, match="malformed"):
        StepTimeEstimator.from_dict({"version": data["version"], "config": data["config"]})


@pytest.mark.parametrize(
    ("concurrency", "step_s", "steps"),
    [(0, 1.0, 1), (1, 0.0, 1), (1, -1.0, 1), (1, math.inf, 1), (1, math.nan, 1), (1, 1.0, 0)],
)
def test_observe_rejects_invalid_samples(concurrency: int, step_s: float, steps: int) -> None:
    with pytest.raises(ValueError):
        StepTimeEstimator().observe(SDXL, concurrency, step_s, steps)


def test_config_rejects_invalid_values() -> None:
    with pytest.raises(ValueError, match="relative_accuracy"):
        EstimatorConfig(relative_accuracy=0.0)
    with pytest.raises(ValueError, match="min_samples"):
        EstimatorConfig(min_samples=0)
    with pytest.raises(ValueError, match="prior_median_step_s"):
        EstimatorConfig(prior_median_step_s=0.0)
