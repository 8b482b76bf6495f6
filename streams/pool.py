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
# Slot changes kept per worker between two of its status reports.
MAX_SLOT_CHANGES = 10_000


@dataclass
class _Seen:
    status: WorkerStatus
    at_s: float


class PoolMonitor:
    """Idle slots of the pool: free worker slots minus attempts waiting for a slot.

    A worker's busy slots are those of its latest status report, moved by the attempts that
    started and finished on it since. Reports come about once a second while an attempt may
    take a fifth of that, so the report alone would describe a pool that no longer exists.

    Args:
        status_ttl_s: a worker whose last report is older than this counts as gone.
    """

    def __init__(self, status_ttl_s: float) -> None:
        self.status_ttl_s = status_ttl_s
        self._workers: dict[str, _Seen] = {}
        # Slots taken (+1) and freed (-1) on each worker, stamped by the worker's clock like
        # its status reports, so a report settles exactly the changes it already counts.
        self._slot_changes: dict[str, list[tuple[float, int]]] = {}
        # Sum of the deltas in each worker's list above, kept up to date because every event
        # reads the pool's busy slots.
        self._moved: dict[str, int] = {}
        # The worker whose slot each started and not yet finished attempt occupies.
        self._holders: dict[str, str] = {}
        # Attempts dispatched that hold no slot yet, with their tier, oldest first: unclaimed,
        # or claimed and waiting at the worker for a slot to free.
        self._unclaimed: dict[str, Tier] = {}
        # The worker each waiting attempt was routed to, when the coordinator chose one.
        self._routed_to: dict[str, str] = {}
        # Counts of the two maps above, kept up to date because admission and routing read
        # them for every job and attempt while a burst leaves thousands unclaimed.
        self._unclaimed_by_tier: collections.Counter[Tier] = collections.Counter()
        self._queued_by_worker: collections.Counter[str] = collections.Counter()
        self._finished_at_s: collections.deque[tuple[float, float]] = collections.deque()
        self._finished_gpu_s = 0.0
        self._latest_at_s = float("-inf")

    def observe(self, status: WorkerStatus, now_s: float | None = None) -> None:
        now = time.monotonic() if now_s is None else now_s
        self._workers[status.worker_id] = _Seen(status, now)
        self._latest_at_s = max(self._latest_at_s, now)
        reported_at = status.emitted_at.timestamp()
        changes = self._slot_changes.get(status.worker_id)
        if changes:
            unsettled = [change for change in changes if change[0] > reported_at]
            self._slot_changes[status.worker_id] = unsettled
            self._moved[status.worker_id] = sum(delta for _, delta in unsettled)

    def slot_taken(self, worker_id: str, attempt_id: str, at_s: float) -> None:
        """Count a slot that ``attempt_id`` took on ``worker_id`` when it started at ``at_s``."""
        self.dequeued(attempt_id)
        if self._holders.get(attempt_id) == worker_id:
            return
        self._holders[attempt_id] = worker_id
        self._change_slots(worker_id, at_s, 1)
        while len(self._holders) > MAX_TRACKED_ATTEMPTS:
            del self._holders[next(iter(self._holders))]

    def slot_freed(self, worker_id: str, attempt_id: str, at_s: float) -> None:
        """Free the slot of an attempt that finished at ``at_s``.

        Only a start seen here counts: an attempt that started before this process began is
        still in the worker's reports until it finishes, and its next report drops it.
        """
        if self._holders.get(attempt_id) != worker_id:
            return
        del self._holders[attempt_id]
        self._change_slots(worker_id, at_s, -1)

    def _change_slots(self, worker_id: str, at_s: float, delta: int) -> None:
        seen = self._workers.get(worker_id)
        if seen is not None and at_s <= seen.status.emitted_at.timestamp():
            # The latest report already counts a change from before it.
            return
        changes = self._slot_changes.setdefault(worker_id, [])
        changes.append((at_s, delta))
        self._moved[worker_id] = self._moved.get(worker_id, 0) + delta
        # A worker that stopped reporting keeps no report to settle its changes.
        if len(changes) > MAX_SLOT_CHANGES:
            del changes[:len(changes) - MAX_SLOT_CHANGES]
            self._moved[worker_id] = sum(change_delta for _, change_delta in changes)

    def busy_of(self, worker_id: str) -> int:
        """Slots of ``worker_id`` generating now: its report, moved by later starts and ends."""
        seen = self._workers.get(worker_id)
        if seen is None:
            return 0
        status = seen.status
        moved = self._moved.get(worker_id, 0)
        return max(0, min(status.slots, min(status.busy, status.slots) + moved))

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
        # A re-dispatch replaces the attempt's earlier entry.
        self.dequeued(attempt_id)
        self._unclaimed[attempt_id] = tier
        self._unclaimed_by_tier[tier] += 1
        if worker_id is not None:
            self._routed_to[attempt_id] = worker_id
            self._queued_by_worker[worker_id] += 1
        # Bounded: attempts whose claim never arrived (a lost worker) age out first.
        while len(self._unclaimed) > MAX_TRACKED_ATTEMPTS:
            self.dequeued(next(iter(self._unclaimed)))

    def dequeued(self, attempt_id: str) -> None:
        """Stop counting an attempt as waiting: it started, ended, was cancelled or denied."""
        tier = self._unclaimed.pop(attempt_id, None)
        if tier is not None:
            self._unclaimed_by_tier[tier] -= 1
        worker_id = self._routed_to.pop(attempt_id, None)
        if worker_id is not None:
            self._queued_by_worker[worker_id] -= 1
            if not self._queued_by_worker[worker_id]:
                del self._queued_by_worker[worker_id]

    def queued_by_worker(self) -> dict[str, int]:
        """Unclaimed attempts routed to each worker's partitions."""
        return dict(self._queued_by_worker)

    def finished(self, gpu_s: float, now_s: float | None = None) -> None:
        """Count one finished attempt toward the measured throughput."""
        now = time.monotonic() if now_s is None else now_s
        self._finished_at_s.append((now, gpu_s))
        self._finished_gpu_s += gpu_s
        self._trim(now)

    def _trim(self, now_s: float) -> None:
        while self._finished_at_s and now_s - self._finished_at_s[0][0] > THROUGHPUT_WINDOW_S:
            self._finished_gpu_s -= self._finished_at_s.popleft()[1]
        if not self._finished_at_s:
            # An empty window resets the sum, so rounding errors do not pile up.
            self._finished_gpu_s = 0.0

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
        return max(0.0, self._finished_gpu_s) / len(self._finished_at_s)

    def backlog(self) -> dict[Tier, int]:
        return {tier: self._unclaimed_by_tier[tier] for tier in Tier}

    def live_workers(self, now_s: float | None = None) -> list[WorkerStatus]:
        now = time.monotonic() if now_s is None else now_s
        return [seen.status for seen in self._workers.values()
                if now - seen.at_s <= self.status_ttl_s and not seen.status.stopping]

    def capacity(self, now_s: float | None = None) -> int:
        return sum(status.slots for status in self.live_workers(now_s))

    def busy(self, now_s: float | None = None) -> int:
        return sum(self.busy_of(status.worker_id) for status in self.live_workers(now_s))

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
        # The epoch whose run each attempt's steps come from. A fenced run of an older epoch
        # may still send heartbeats, and they must not change the current run's rate.
        self._epochs: dict[str, int] = {}
        # Attempt id to (first step, its time, latest step, its time, total steps).
        self._steps: dict[str, tuple[int, float, int, float, int]] = {}

    def started(self, attempt_id: str, parameter_class: str, epoch: int = 1) -> None:
        if epoch < self._epochs.get(attempt_id, 0):
            return
        self._classes[attempt_id] = parameter_class
        self._epochs[attempt_id] = epoch
        self._steps.pop(attempt_id, None)
        while len(self._classes) > self.max_tracked:
            oldest = next(iter(self._classes))
            self.ended(oldest)

    def progress(self, attempt_id: str, step: int, total_steps: int, at_s: float,
                 epoch: int = 1) -> None:
        """Record one heartbeat; ``at_s`` is the worker's timestamp in seconds."""
        if attempt_id not in self._classes or epoch != self._epochs.get(attempt_id):
            return
        known = self._steps.get(attempt_id)
        if known is None:
            self._steps[attempt_id] = (step, at_s, step, at_s, total_steps)
        elif step > known[2]:
            self._steps[attempt_id] = (known[0], known[1], step, at_s, total_steps)

    def ended(self, attempt_id: str, epoch: int | None = None) -> None:
        """Forget an attempt. Given ``epoch``, forget it only if its tracked run has that epoch."""
        if epoch is not None and epoch != self._epochs.get(attempt_id, epoch):
            return
        self._classes.pop(attempt_id, None)
        self._epochs.pop(attempt_id, None)
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
