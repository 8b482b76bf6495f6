"""The coordinator's view of the GPU pool, built from workers' periodic status reports."""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable
from dataclasses import dataclass

from schemas.events import Tier, WorkerStatus
from streams.racing import AttemptRun, ServiceTimes, stragglers

# Seconds of finished attempts that the throughput measurement averages over.
THROUGHPUT_WINDOW_S = 30.0
MAX_TRACKED_ATTEMPTS = 100_000
# A handful of finished attempts says little about a pool's rate, so admission waits for more.
MIN_THROUGHPUT_SAMPLES = 20


@dataclass
class _Seen:
    status: WorkerStatus
    at_s: float


class PoolMonitor:
    """Idle slots of the pool: free worker slots minus attempts dispatched but not yet claimed.

    Args:
        status_ttl_s: a worker whose last report is older than this counts as gone.
    """

    def __init__(self, status_ttl_s: float) -> None:
        self.status_ttl_s = status_ttl_s
        self._workers: dict[str, _Seen] = {}
        # Attempts dispatched and not yet claimed, with their tier, oldest first.
        self._unclaimed: dict[str, Tier] = {}
        # The worker each unclaimed attempt was routed to, when the coordinator chose one.
        self._routed_to: dict[str, str] = {}
        self._finished_at_s: collections.deque[tuple[float, float]] = collections.deque()
        self._latest_at_s = float("-inf")

    def observe(self, status: WorkerStatus, now_s: float | None = None) -> None:
        now = time.monotonic() if now_s is None else now_s
        self._workers[status.worker_id] = _Seen(status, now)
        self._latest_at_s = max(self._latest_at_s, now)

    def gone_workers(self, now_s: float | None = None) -> frozenset[str]:
        """Return the workers that stopped reporting while others kept reporting.

        A worker counts as gone when its last report is more than the status TTL older than
        both now and the latest report of any worker. A coordinator that fell behind on the
        status topic therefore does not take every worker for gone. A worker that reports
        ``stopping`` still runs its attempts until it exits, so it is not gone.
        """
        now = time.monotonic() if now_s is None else now_s
        return frozenset(
            worker_id for worker_id, seen in self._workers.items()
            if now - seen.at_s > self.status_ttl_s
            and self._latest_at_s - seen.at_s > self.status_ttl_s)

    def dispatched(self, attempt_id: str, tier: Tier = Tier.STANDARD,
                   worker_id: str | None = None) -> None:
        self._unclaimed[attempt_id] = tier
        if worker_id is not None:
            self._routed_to[attempt_id] = worker_id
        # Bounded: attempts whose claim never arrived (a lost worker) age out first.
        while len(self._unclaimed) > MAX_TRACKED_ATTEMPTS:
            oldest = next(iter(self._unclaimed))
            del self._unclaimed[oldest]
            self._routed_to.pop(oldest, None)

    def claimed(self, attempt_id: str) -> None:
        self._unclaimed.pop(attempt_id, None)
        self._routed_to.pop(attempt_id, None)

    def queued_by_worker(self) -> dict[str, int]:
        """Unclaimed attempts routed to each worker's partitions."""
        return dict(collections.Counter(self._routed_to.values()))

    def finished(self, gpu_s: float, now_s: float | None = None) -> None:
        """Count one finished attempt toward the measured throughput."""
        now = time.monotonic() if now_s is None else now_s
        self._finished_at_s.append((now, gpu_s))
        self._trim(now)

    def _trim(self, now_s: float) -> None:
        while self._finished_at_s and now_s - self._finished_at_s[0][0] > THROUGHPUT_WINDOW_S:
            self._finished_at_s.popleft()

    def throughput_attempts_per_s(self, now_s: float | None = None) -> float:
        """Finished attempts per second over the window; 0 until enough were seen to trust."""
        now = time.monotonic() if now_s is None else now_s
        self._trim(now)
        if len(self._finished_at_s) < MIN_THROUGHPUT_SAMPLES:
            return 0.0
        elapsed_s = max(1.0, now - self._finished_at_s[0][0])
        return len(self._finished_at_s) / min(elapsed_s, THROUGHPUT_WINDOW_S)

    def mean_attempt_s(self, default_s: float = 1.0) -> float:
        if not self._finished_at_s:
            return default_s
        return sum(gpu_s for _, gpu_s in self._finished_at_s) / len(self._finished_at_s)

    def backlog(self) -> dict[Tier, int]:
        counts = collections.Counter(self._unclaimed.values())
        return {tier: counts.get(tier, 0) for tier in Tier}

    def live_workers(self, now_s: float | None = None) -> list[WorkerStatus]:
        now = time.monotonic() if now_s is None else now_s
        return [seen.status for seen in self._workers.values()
                if now - seen.at_s <= self.status_ttl_s and not seen.status.stopping]

    def capacity(self, now_s: float | None = None) -> int:
        return sum(status.slots for status in self.live_workers(now_s))

    def busy(self, now_s: float | None = None) -> int:
        return sum(min(status.busy, status.slots) for status in self.live_workers(now_s))

    def idle_slots(self, now_s: float | None = None) -> int:
        """Free slots after the attempts already waiting for one; negative when saturated."""
        return self.capacity(now_s) - self.busy(now_s) - len(self._unclaimed)

    def warm_workers(self, model: str, now_s: float | None = None) -> list[str]:
        return [status.worker_id for status in self.live_workers(now_s)
                if model in status.warm_models]


class RunningAttempts:
    """Step rate of running attempts, from the worker's timestamps on step heartbeats.

    The rate is measured from an attempt's first heartbeat to its latest one, both stamped
    by the worker's clock, so neither the queue wait nor Kafka delays distort it.
    """

    def __init__(self, max_tracked: int = MAX_TRACKED_ATTEMPTS) -> None:
        self.max_tracked = max_tracked
        self._classes: dict[str, str] = {}
        # Attempt id to (first step, its time, latest step, its time, total steps).
        self._steps: dict[str, tuple[int, float, int, float, int]] = {}

    def started(self, attempt_id: str, parameter_class: str) -> None:
        self._classes[attempt_id] = parameter_class
        self._steps.pop(attempt_id, None)
        while len(self._classes) > self.max_tracked:
            oldest = next(iter(self._classes))
            self.ended(oldest)

    def progress(self, attempt_id: str, step: int, total_steps: int, at_s: float) -> None:
        """Record one heartbeat; ``at_s`` is the worker's timestamp in seconds."""
        if attempt_id not in self._classes:
            return
        known = self._steps.get(attempt_id)
        if known is None:
            self._steps[attempt_id] = (step, at_s, step, at_s, total_steps)
        elif step > known[2]:
            self._steps[attempt_id] = (known[0], known[1], step, at_s, total_steps)

    def ended(self, attempt_id: str) -> None:
        self._classes.pop(attempt_id, None)
        self._steps.pop(attempt_id, None)

    def runs(self, attempt_ids: Iterable[str]) -> dict[str, AttemptRun]:
        """Return the progress since the first heartbeat of those of ``attempt_ids`` running."""
        found = {}
        for attempt_id in attempt_ids:
            known = self._steps.get(attempt_id)
            if known is not None:
                first_step, first_s, step, at_s, total_steps = known
                found[attempt_id] = AttemptRun(at_s - first_s, step - first_step,
                                               total_steps - first_step)
        return found

    def is_straggler(self, attempt_id: str, service_times: ServiceTimes) -> bool:
        """Check one attempt against the typical service time of its parameter class."""
        parameter_class = self._classes.get(attempt_id)
        if parameter_class is None:
            return False
        typical_s = service_times.median_s(parameter_class)
        return bool(stragglers(self.runs([attempt_id]), typical_s))
