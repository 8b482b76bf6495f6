"""Online estimates of denoising-step time, learned with DDSketch quantile sketches.

Step time depends on the model, the image size and how many attempts share the device, so
each step class (model, width, height) keeps one sketch per concurrency level. When a level
has too few samples, the estimate backs off to the class's sketch of steps normalised to
concurrency 1, scaled by the learned slowdown of the requested level, and from there to a
configured lognormal prior.

The estimator is deterministic (it never reads a clock) and is not thread-safe: the
coordinator owns one instance per process and checkpoints it with ``to_dict``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from statistics import NormalDist
from typing import Any, NamedTuple

from ddsketch import DDSketch
from ddsketch.ddsketch import BaseDDSketch
from ddsketch.pb.ddsketch_pb2 import DDSketch as DDSketchMessage
from ddsketch.pb.proto import DDSketchProto
from google.protobuf.json_format import MessageToDict, ParseDict

logger = logging.getLogger(__name__)

SERIALIZATION_VERSION = 1


@lru_cache(maxsize=64)
def normal_quantile(q: float) -> float:
    """Return the standard normal quantile ``z`` with P(Z <= z) = q."""
    return NormalDist().inv_cdf(q)


_Z_90 = normal_quantile(0.9)


class StepClass(NamedTuple):
    """The attributes that set how long one denoising step takes, apart from concurrency."""

    model: str
    width: int
    height: int


# Seconds spent at each concurrency level, as (level, seconds) pairs with distinct levels.
Exposure = tuple[tuple[int, float], ...]


class StepSample(NamedTuple):
    """Steps an attempt completed between two progress reports, and the time they took."""

    exposure: Exposure
    steps: int


@dataclass(frozen=True)
class EstimatorConfig:
    """Parameters of the estimator; all times are seconds per denoising step."""

    # DDSketch guarantees each quantile within this relative error of a true sample value.
    relative_accuracy: float = 0.01
    # Progress intervals a sketch needs before its quantiles are trusted over a coarser level.
    min_samples: int = 50
    # The prior for a class with no data: a lognormal step time with this median and sigma.
    # Wide on purpose, so a new model is not declared hung before anything is known about it.
    prior_median_step_s: float = 1.0
    prior_sigma: float = 1.0
    # Assumed extra step time per additional attempt on the device, as a fraction of the
    # time at concurrency 1, until enough data exists to learn the slowdown.
    prior_slowdown_per_attempt: float = 0.5
    # Cached quantiles of a sketch are recomputed once its sample count grew by this
    # fraction, because reading a quantile walks every bin of the sketch.
    refresh_fraction: float = 0.05

    def __post_init__(self) -> None:
        if not 0.0 < self.relative_accuracy < 1.0:
            raise ValueError(
                f"relative_accuracy must be between 0 and 1, got {self.relative_accuracy}"
            )
        if self.min_samples < 1:
            raise ValueError(f"min_samples must be at least 1, got {self.min_samples}")
        if self.prior_median_step_s <= 0.0 or self.prior_sigma < 0.0:
            raise ValueError(
                "prior_median_step_s must be positive and prior_sigma non-negative, got "
                f"{self.prior_median_step_s} and {self.prior_sigma}"
            )
        if self.prior_slowdown_per_attempt < 0.0:
            raise ValueError(
                "prior_slowdown_per_attempt must be non-negative, got "
                f"{self.prior_slowdown_per_attempt}"
            )
        if self.refresh_fraction < 0.0:
            raise ValueError(f"refresh_fraction must be non-negative, got {self.refresh_fraction}")


class _Series:
    """One sketch of step times with its quantiles cached between refreshes."""

    __slots__ = ("sketch", "samples", "_cached_samples", "_quantiles")

    def __init__(self, sketch: BaseDDSketch, samples: int = 0) -> None:
        self.sketch = sketch
        self.samples = samples
        self._cached_samples = -1
        self._quantiles: dict[float, float] = {}

    def add(self, step_s: float, steps: float) -> None:
        self.sketch.add(step_s, steps)
        self.samples += 1

    def quantile(self, q: float, refresh_fraction: float) -> float:
        """Return the q-quantile, extrapolating the tail beyond p90 as a lognormal.

        A sketch of a few hundred samples cannot see its own p99.9, so above p90 the value is
        the larger of the sketch's quantile and the lognormal fitted through p50 and p90.
        """
        stale_after = max(8.0, refresh_fraction * self._cached_samples)
        if self.samples - self._cached_samples >= stale_after:
            self._quantiles.clear()
            self._cached_samples = self.samples
        value = self._quantiles.get(q)
        if value is not None:
            return value

        raw = self.sketch.get_quantile_value(q)
        # The estimator reads only series with at least min_samples (>= 1) samples.
        assert raw is not None, "quantile of an empty sketch"
        value = float(raw)
        if q > 0.9:
            median_s = self.quantile(0.5, refresh_fraction)
            p90_s = self.quantile(0.9, refresh_fraction)
            sigma = max(math.log(p90_s / median_s), 0.0) / _Z_90
            value = max(value, median_s * math.exp(normal_quantile(q) * sigma))
        self._quantiles[q] = value
        return value


class StepTimeEstimator:
    """Learns per-step time for each step class and concurrency level.

    Feed it with ``observe`` (the coordinator does this through ``streams.timeouts``) and ask
    it for ``median_step_s``, ``step_quantile_s`` and ``slowdown``.
    """

    def __init__(self, config: EstimatorConfig | None = None) -> None:
        self.config = config or EstimatorConfig()
        # Key (step class, concurrency); concurrency 0 is the class's normalised series.
        self._series: dict[tuple[StepClass, int], _Series] = {}
        self._classes: set[StepClass] = set()
        self._samples_total = 0
        self._slowdowns: dict[int, float] = {}
        self._slowdowns_at_samples = -1
        # Medians by (step class, concurrency), dropped together once the estimator has
        # learned ``refresh_fraction`` more samples; decisions read them several times each.
        self._medians: dict[tuple[StepClass, int], float] = {}
        self._medians_valid_until = 0

    # ---- learning ---------------------------------------------------------------------------

    def observe_sample(self, step_class: StepClass, sample: StepSample) -> None:
        """Learn from the steps between two progress reports.

        An interval at one concurrency level feeds that level and the class. An interval
        during which the level changed feeds only the class, normalised with the current
        slowdown estimates. Dropping it entirely would bias the data towards fast steps,
        because a slow step is more likely to span a change of level.
        """
        if sample.steps <= 0 or not sample.exposure:
            raise ValueError(
                f"a sample needs at least one step and some time, got {sample.steps} steps "
                f"over {sample.exposure!r}"
            )
        if len(sample.exposure) == 1:
            level, seconds = sample.exposure[0]
            self.observe(step_class, level, seconds / sample.steps, sample.steps)
            return

        alone_s = 0.0
        for level, seconds in sample.exposure:
            if level < 1 or not 0.0 < seconds < math.inf:
                raise ValueError(f"invalid exposure entry ({level}, {seconds}) in a sample")
            alone_s += seconds / self.slowdown(level)
        normalised = self._series.get((step_class, 0)) or self._new_series(step_class, 0)
        normalised.add(alone_s / sample.steps, sample.steps)
        self._samples_total += 1

    def observe(
        self, step_class: StepClass, concurrency: int, step_s: float, steps: float = 1.0
    ) -> None:
        """Add ``steps`` steps that took ``step_s`` seconds each at one concurrency level.

        The interval must have run at a single concurrency level; the caller drops intervals
        during which the level changed.
        """
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        if not 0.0 < step_s < math.inf:
            raise ValueError(f"step_s must be a positive finite number, got {step_s}")
        if not steps > 0.0:
            raise ValueError(f"steps must be positive, got {steps}")

        series = self._series
        exact = series.get((step_class, concurrency)) or self._new_series(step_class, concurrency)
        normalised = series.get((step_class, 0)) or self._new_series(step_class, 0)
        exact.add(step_s, steps)
        normalised.add(step_s / self.slowdown(concurrency), steps)
        self._samples_total += 1

    def _new_series(self, step_class: StepClass, concurrency: int) -> _Series:
        series = _Series(DDSketch(self.config.relative_accuracy))
        self._series[(step_class, concurrency)] = series
        self._classes.add(step_class)
        return series

    # ---- estimates --------------------------------------------------------------------------

    def samples(self, step_class: StepClass, concurrency: int | None = None) -> int:
        """Return the progress intervals learned for a class at one level, or at all levels."""
        series = self._series.get((step_class, 0 if concurrency is None else concurrency))
        return 0 if series is None else series.samples

    def source(self, step_class: StepClass, concurrency: int) -> str:
        """Name the level estimates come from: ``exact``, ``class`` or ``prior``."""
        if self._trusted(step_class, concurrency) is not None:
            return "exact"
        if self._trusted(step_class, 0) is not None:
            return "class"
        return "prior"

    def median_step_s(self, step_class: StepClass, concurrency: int) -> float:
        """Return the expected (median) step time at a concurrency level, in seconds."""
        if self._samples_total >= self._medians_valid_until:
            self._medians.clear()
            refresh_after = self.config.refresh_fraction * self._samples_total
            self._medians_valid_until = self._samples_total + max(8, int(refresh_after))
        key = (step_class, concurrency)
        value = self._medians.get(key)
        if value is None:
            value = self.step_quantile_s(step_class, concurrency, 0.5)
            self._medians[key] = value
        return value

    def step_quantile_s(self, step_class: StepClass, concurrency: int, q: float) -> float:
        """Return the q-quantile of step time at a concurrency level, in seconds."""
        if not 0.0 < q < 1.0:
            raise ValueError(f"quantile must be between 0 and 1, got {q}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")

        refresh = self.config.refresh_fraction
        exact = self._trusted(step_class, concurrency)
        normalised = self._trusted(step_class, 0)
        if exact is not None:
            value = exact.quantile(q, refresh)
            if q > 0.5 and normalised is not None:
                # Samples at one level under-represent slow steps, which more often span a
                # change of level. The class series learns from every interval, so its tail
                # ratio bounds this level's tail.
                class_ratio = normalised.quantile(q, refresh) / normalised.quantile(0.5, refresh)
                value = max(value, exact.quantile(0.5, refresh) * class_ratio)
            return value
        if normalised is not None:
            return normalised.quantile(q, refresh) * self.slowdown(concurrency)
        z = normal_quantile(q)
        prior_s = self.config.prior_median_step_s * math.exp(z * self.config.prior_sigma)
        return prior_s * self.slowdown(concurrency)

    def _trusted(self, step_class: StepClass, concurrency: int) -> _Series | None:
        series = self._series.get((step_class, concurrency))
        if series is None or series.samples < self.config.min_samples:
            return None
        return series

    def slowdown(self, concurrency: int) -> float:
        """Return how much slower a step runs at this concurrency than alone on the device.

        Learned as the sample-weighted geometric mean, over classes with enough samples at
        both levels, of the median at ``concurrency`` over the median at concurrency 1. Falls
        back to the configured linear prior where no class has both.
        """
        if concurrency <= 1:
            return 1.0
        stale_after = max(8.0, self.config.refresh_fraction * self._slowdowns_at_samples)
        if self._samples_total - self._slowdowns_at_samples >= stale_after:
            self._slowdowns.clear()
            self._slowdowns_at_samples = self._samples_total
        value = self._slowdowns.get(concurrency)
        if value is None:
            value = self._learn_slowdown(concurrency)
            self._slowdowns[concurrency] = value
        return value

    def _learn_slowdown(self, concurrency: int) -> float:
        refresh = self.config.refresh_fraction
        weighted_log_sum = 0.0
        weight_total = 0
        for step_class in sorted(self._classes):
            alone = self._trusted(step_class, 1)
            shared = self._trusted(step_class, concurrency)
            if alone is None or shared is None:
                continue
            weight = min(alone.samples, shared.samples)
            ratio = shared.quantile(0.5, refresh) / alone.quantile(0.5, refresh)
            weighted_log_sum += weight * math.log(ratio)
            weight_total += weight
        if weight_total == 0:
            return 1.0 + self.config.prior_slowdown_per_attempt * (concurrency - 1)
        return math.exp(weighted_log_sum / weight_total)

    # ---- checkpoints ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Serialise the estimator to JSON-compatible data.

        Each sketch is stored as the JSON form of DDSketch's protobuf message, the format
        the Java and Go DDSketch libraries read too.
        """
        series = []
        for (step_class, concurrency), item in sorted(self._series.items()):
            series.append({
                "model": step_class.model,
                "width": step_class.width,
                "height": step_class.height,
                "concurrency": concurrency,
                "samples": item.samples,
                "sketch": MessageToDict(DDSketchProto.to_proto(item.sketch)),
            })
        return {
            "version": SERIALIZATION_VERSION,
            "config": asdict(self.config),
            "samples_total": self._samples_total,
            "series": series,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepTimeEstimator:
        """Rebuild an estimator from ``to_dict`` output.

        Raises:
            ValueError: the data has another serialisation version or is malformed.
        """
        version = data.get("version")
        if version != SERIALIZATION_VERSION:
            raise ValueError(
                f"unsupported step-time checkpoint version {version!r}; "
                f"this code reads version {SERIALIZATION_VERSION}"
            )
        try:
            estimator = cls(EstimatorConfig(**data["config"]))
            for entry in data["series"]:
                step_class = StepClass(entry["model"], int(entry["width"]), int(entry["height"]))
                message = ParseDict(entry["sketch"], DDSketchMessage())
                sketch = DDSketchProto.from_proto(message)
                estimator._series[(step_class, int(entry["concurrency"]))] = _Series(
                    sketch, int(entry["samples"])
                )
                estimator._classes.add(step_class)
            estimator._samples_total = int(data["samples_total"])
        except (KeyError, TypeError) as err:
            raise ValueError(f"malformed step-time checkpoint: {err!r}") from err
        logger.info(
            "Restored step-time estimates: %d series over %d step classes",
            len(estimator._series), len(estimator._classes),
        )
        return estimator
