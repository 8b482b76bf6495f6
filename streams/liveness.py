"""The coordinator's live view of running attempts, judged by the timeout policy.

It turns started, progress and finished events into ``AttemptObservation`` updates, keeps
each worker's concurrency current on all of that worker's attempts, and lists attempts
whose policy decision is no longer ``keep``. All state is in memory: after a coordinator
restart an attempt is observed again from its next progress report.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from streams.step_times import StepClass, StepTimeEstimator
from streams.timeouts import (
    AttemptObservation,
    TimeoutDecision,
    TimeoutPolicy,
    adaptive,
    record_concurrency,
    record_progress,
    start_observation,
)

logger = logging.getLogger(__name__)


@dataclass
class _Watched:
    observation: AttemptObservation
    epoch: int
    worker_id: str
    job_key: str
    job_id: str
    next_check_s: float = 0.0


class LivenessTracker:
    """Observations of running attempts, keyed by attempt id.

    Args:
        policy: the timeout policy; the adaptive one with a fresh estimator by default.
    """

    def __init__(self, policy: TimeoutPolicy | None = None,
                 estimator: StepTimeEstimator | None = None) -> None:
        self.estimator = estimator or StepTimeEstimator()
        self.policy = policy or adaptive(self.estimator)
        self._watched: dict[str, _Watched] = {}
        self._by_worker: dict[str, set[str]] = {}

    def __len__(self) -> int:
        return len(self._watched)

    def started(self, *, attempt_id: str, epoch: int, worker_id: str, job_key: str,
                job_id: str, step_class: StepClass, total_steps: int, deadline_at_s: float,
                retries_left: int, other_attempts: int, report_every_steps: int = 1,
                now_s: float | None = None) -> None:
        """Start observing an attempt; the queue wait before this moment is never counted."""
        now = time.time() if now_s is None else now_s
        self.finished(attempt_id)
        running = self._by_worker.setdefault(worker_id, set())
        running.add(attempt_id)
        observation = start_observation(
            attempt_id, step_class, total_steps, started_at_s=now,
            deadline_at_s=deadline_at_s, concurrency=len(running),
            retries_left=retries_left, other_attempts_in_flight=other_attempts,
            report_every_steps=report_every_steps,
        )
        self._watched[attempt_id] = _Watched(observation, epoch, worker_id, job_key, job_id)
        self._concurrency_changed(worker_id, now)

    def progress(self, attempt_id: str, epoch: int, step: int,
                 now_s: float | None = None) -> None:
        watched = self._watched.get(attempt_id)
        if watched is None or watched.epoch != epoch:
            return
        now = time.time() if now_s is None else now_s
        watched.observation, sample = record_progress(watched.observation, step, now)
        if sample is not None:
            self.estimator.observe_sample(watched.observation.step_class, sample)
        watched.next_check_s = 0.0

    def finished(self, attempt_id: str, now_s: float | None = None) -> None:
        watched = self._watched.pop(attempt_id, None)
        if watched is None:
            return
        running = self._by_worker.get(watched.worker_id, set())
        running.discard(attempt_id)
        self._concurrency_changed(watched.worker_id, time.time() if now_s is None else now_s)

    def _concurrency_changed(self, worker_id: str, now_s: float) -> None:
        running = self._by_worker.get(worker_id, set())
        for attempt_id in running:
            watched = self._watched[attempt_id]
            if watched.observation.concurrency != len(running):
                watched.observation = record_concurrency(watched.observation, len(running),
                                                         now_s)
                watched.next_check_s = 0.0

    def confirm(self, attempt_id: str, epoch: int, now_s: float | None = None) -> bool:
        """Decide again on a kill that waited in the events topic; False when it no longer holds.

        Heartbeats queued ahead of the kill, after a pause of this process for example, may
        show the attempt healthy by now. An attempt that is not watched here under ``epoch``
        returns True, so the flight judges the kill itself.
        """
        watched = self._watched.get(attempt_id)
        if watched is None or watched.epoch != epoch:
            return True
        now = time.time() if now_s is None else now_s
        decision = self.policy.decide(watched.observation, now)
        if decision.action != "keep":
            return True
        next_check = decision.next_check_at_s
        watched.next_check_s = next_check if math.isfinite(next_check) else math.inf
        return False

    def due(self, now_s: float | None = None) -> list[tuple[_Watched, TimeoutDecision]]:
        """Return attempts whose decision is to kill them, checking only those that are due."""
        now = time.time() if now_s is None else now_s
        kills = []
        for watched in list(self._watched.values()):
            if watched.next_check_s > now:
                continue
            decision = self.policy.decide(watched.observation, now)
            if decision.action == "keep":
                next_check = decision.next_check_at_s
                watched.next_check_s = next_check if math.isfinite(next_check) else math.inf
                continue
            kills.append((watched, decision))
            # Checked again only after the coordinator acted and a new report arrived.
            watched.next_check_s = math.inf
        return kills
