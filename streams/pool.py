"""The coordinator's view of the GPU pool, built from workers' periodic status reports."""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass

from schemas.events import Tier, WorkerStatus

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
        self._finished_at_s: collections.deque[tuple[float, float]] = collections.deque()

    def observe(self, status: WorkerStatus, now_s: float | None = None) -> None:
        self._workers[status.worker_id] = _Seen(status, time.monotonic() if now_s is None
                                                else now_s)

    def dispatched(self, attempt_id: str, tier: Tier = Tier.STANDARD) -> None:
        self._unclaimed[attempt_id] = tier
        # Bounded: attempts whose claim never arrived (a lost worker) age out first.
        while len(self._unclaimed) > MAX_TRACKED_ATTEMPTS:
            self._unclaimed.pop(next(iter(self._unclaimed)))

    def claimed(self, attempt_id: str) -> None:
        self._unclaimed.pop(attempt_id, None)

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
