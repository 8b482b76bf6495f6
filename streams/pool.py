"""The coordinator's view of the GPU pool, built from workers' periodic status reports."""

from __future__ import annotations

import time
from dataclasses import dataclass

from schemas.events import WorkerStatus


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
        self._unclaimed: set[str] = set()

    def observe(self, status: WorkerStatus, now_s: float | None = None) -> None:
        self._workers[status.worker_id] = _Seen(status, time.monotonic() if now_s is None
                                                else now_s)

    def dispatched(self, attempt_id: str) -> None:
        self._unclaimed.add(attempt_id)

    def claimed(self, attempt_id: str) -> None:
        self._unclaimed.discard(attempt_id)

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
