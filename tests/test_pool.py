"""The coordinator's pool view: which workers count as gone, and what waits for a slot."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.events import Tier, WorkerStatus
from streams import pool as pool_module
from streams.pool import PoolMonitor


def _status(worker_id: str, *, stopping: bool = False) -> WorkerStatus:
    return WorkerStatus(worker_id=worker_id, slots=4, busy=0, stopping=stopping)


def test_silent_worker_is_gone_while_others_report() -> None:
    pool = PoolMonitor(status_ttl_s=5.0)
    pool.observe(_status("w1"), now_s=0.0)
    pool.observe(_status("w2"), now_s=0.0)
    pool.observe(_status("w2"), now_s=6.0)

    assert pool.gone_workers(now_s=6.0) == frozenset({"w1"})


def test_no_worker_gone_within_ttl() -> None:
    pool = PoolMonitor(status_ttl_s=5.0)
    pool.observe(_status("w1"), now_s=0.0)
    pool.observe(_status("w2"), now_s=4.0)

    assert pool.gone_workers(now_s=4.5) == frozenset()


def test_stalled_status_stream_marks_nobody_gone() -> None:
    # Every report is old: the coordinator fell behind, not the workers.
    pool = PoolMonitor(status_ttl_s=5.0)
    pool.observe(_status("w1"), now_s=0.0)
    pool.observe(_status("w2"), now_s=1.0)

    assert pool.gone_workers(now_s=30.0) == frozenset()


def test_stopping_worker_is_not_gone() -> None:
    pool = PoolMonitor(status_ttl_s=5.0)
    pool.observe(_status("w1", stopping=True), now_s=0.0)
    pool.observe(_status("w2"), now_s=0.0)

    assert pool.gone_workers(now_s=1.0) == frozenset()
    assert [status.worker_id for status in pool.live_workers(now_s=1.0)] == ["w2"]



def test_redispatch_moves_queued_attempt() -> None:
    pool = PoolMonitor(status_ttl_s=5.0)
    pool.dispatched("a1", Tier.STANDARD, "w1")
    pool.dispatched("a1", Tier.BATCH, "w2")
    pool.dispatched("a2", Tier.BATCH)

    assert pool.queued_by_worker() == {"w2": 1}
    assert pool.backlog() == {Tier.INTERACTIVE: 0, Tier.STANDARD: 0, Tier.BATCH: 2}

    pool.dequeued("a1")
    pool.dequeued("a1")
    pool.dequeued("a2")
    assert pool.queued_by_worker() == {}
    assert pool.backlog() == {Tier.INTERACTIVE: 0, Tier.STANDARD: 0, Tier.BATCH: 0}


def test_oldest_unclaimed_age_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool_module, "MAX_TRACKED_ATTEMPTS", 2)
    pool = PoolMonitor(status_ttl_s=5.0)
    for index in range(4):
        pool.dispatched(f"a{index}", Tier.STANDARD, "w1" if index % 2 else "w2")

    assert pool.backlog()[Tier.STANDARD] == 2
    assert pool.queued_by_worker() == {"w1": 1, "w2": 1}


def test_mean_attempt_time_in_window() -> None:
    pool = PoolMonitor(status_ttl_s=5.0)
    pool.finished(1.0, now_s=0.0)
    pool.finished(3.0, now_s=10.0)
    assert pool.mean_attempt_s() == 2.0

    pool.finished(5.0, now_s=35.0)
    assert pool.mean_attempt_s() == 4.0

    pool.finished(0.5, now_s=100.0)
    assert pool.mean_attempt_s() == 0.5


T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _report(busy: int, at_s: float, slots: int = 4, worker_id: str = "w1") -> WorkerStatus:
    return WorkerStatus(worker_id=worker_id, slots=slots, busy=busy,
                        emitted_at=T0 + timedelta(seconds=at_s))


def _at(seconds: float) -> float:
    return (T0 + timedelta(seconds=seconds)).timestamp()


def test_busy_follows_starts_between_reports() -> None:
    pool = PoolMonitor(status_ttl_s=60.0)
    pool.observe(_report(busy=1, at_s=0.0))

    pool.slot_taken("w1", "a", _at(1.0))
    assert pool.busy_of("w1") == 2

    pool.slot_freed("w1", "a", _at(2.0))
    assert pool.busy_of("w1") == 1

    pool.slot_taken("w1", "b", _at(3.0))
    pool.observe(_report(busy=2, at_s=4.0))
    assert pool.busy_of("w1") == 2

    pool.slot_freed("w1", "b", _at(5.0))
    assert pool.busy_of("w1") == 1


def test_late_report_keeps_newer_starts() -> None:
    # The report was sent before the start, so it does not count it yet.
    pool = PoolMonitor(status_ttl_s=60.0)
    pool.slot_taken("w1", "a", _at(2.0))
    pool.observe(_report(busy=1, at_s=1.0))

    assert pool.busy_of("w1") == 2


def test_unseen_events_move_nothing() -> None:
    pool = PoolMonitor(status_ttl_s=60.0)
    pool.observe(_report(busy=2, at_s=0.0))

    pool.slot_freed("w1", "started-before-this-process", _at(1.0))
    pool.slot_taken("w1", "a", _at(2.0))
    pool.slot_taken("w1", "a", _at(2.5))
    assert pool.busy_of("w1") == 3

    pool.slot_freed("w2", "a", _at(3.0))
    assert pool.busy_of("w1") == 3


def test_report_settles_the_changes_it_counts() -> None:
    pool = PoolMonitor(status_ttl_s=60.0)
    pool.observe(_report(busy=0, at_s=0.0))
    pool.slot_taken("w1", "a", _at(1.0))
    pool.slot_taken("w1", "b", _at(2.0))
    pool.slot_freed("w1", "a", _at(3.0))
    assert pool.busy_of("w1") == 1

    # The report counts the two starts, so only the later finish still moves it.
    pool.observe(_report(busy=2, at_s=2.5))
    assert pool.busy_of("w1") == 1

    # A start stamped before the report arrives late: the report already counts it.
    pool.slot_taken("w1", "c", _at(2.2))
    assert pool.busy_of("w1") == 1

    pool.slot_taken("w1", "d", _at(4.0))
    assert pool.busy_of("w1") == 2


def test_busy_stays_within_slots() -> None:
    pool = PoolMonitor(status_ttl_s=60.0)
    pool.observe(_report(busy=2, at_s=0.0, slots=2))
    pool.slot_taken("w1", "a", _at(1.0))
    assert pool.busy_of("w1") == 2

    pool.observe(_report(busy=0, at_s=2.0, slots=2))
    pool.slot_taken("w1", "b", _at(1.5))
    pool.slot_freed("w1", "b", _at(3.0))
    assert pool.busy_of("w1") == 0


class _BusyReference:
    """Brute-force model of PoolMonitor's busy slots, which sums every slot change at each call."""

    def __init__(self) -> None:
        self.reports: dict[str, WorkerStatus] = {}
        self.holders: dict[str, str] = {}
        self.changes: list[tuple[str, float, int]] = []

    def observe(self, status: WorkerStatus) -> None:
        self.reports[status.worker_id] = status

    def slot_taken(self, worker_id: str, attempt_id: str, at_s: float) -> None:
        # A repeated start on the same worker counts once. A start elsewhere moves the holder.
        if self.holders.get(attempt_id) == worker_id:
            return
        self.holders[attempt_id] = worker_id
        self.changes.append((worker_id, at_s, 1))

    def slot_freed(self, worker_id: str, attempt_id: str, at_s: float) -> None:
        # Only the worker whose slot the attempt occupies frees it.
        if self.holders.get(attempt_id) != worker_id:
            return
        del self.holders[attempt_id]
        self.changes.append((worker_id, at_s, -1))

    def busy_of(self, worker_id: str) -> int:
        status = self.reports.get(worker_id)
        if status is None:
            return 0
        reported_at = status.emitted_at.timestamp()
        moved = sum(delta for changed_on, at_s, delta in self.changes
                    if changed_on == worker_id and at_s > reported_at)
        return max(0, min(status.slots, min(status.busy, status.slots) + moved))


_WORKERS = ("w1", "w2")
# Half seconds, so a change often carries the same timestamp as a report.
_SECONDS = st.integers(min_value=0, max_value=16).map(lambda halves: halves / 2)
_POOL_EVENTS = st.lists(
    st.one_of(
        # A report: worker, emitted_at, busy (more than slots at times), slots.
        st.tuples(st.just("report"), st.sampled_from(_WORKERS), _SECONDS,
                  st.integers(min_value=0, max_value=5), st.integers(min_value=1, max_value=3)),
        # A start or finish: worker, attempt id, the worker's timestamp.
        st.tuples(st.sampled_from(["taken", "freed"]), st.sampled_from(_WORKERS),
                  st.sampled_from(["a", "b", "c"]), _SECONDS),
    ),
    max_size=40,
)


@settings(max_examples=300)
@given(_POOL_EVENTS)
def test_busy_matches_recount_of_changes(events: list[tuple[Any, ...]]) -> None:
    pool = PoolMonitor(status_ttl_s=60.0)
    reference = _BusyReference()
    reported_s: dict[str, float] = {}
    for event in events:
        if event[0] == "report":
            _, worker_id, at_s, busy, slots = event
            # Reports of one worker share a Kafka key, so they arrive in the order sent.
            # PoolMonitor drops the changes a report counts and cannot restore them for an
            # older report, so emitted_at never goes back here.
            at_s = max(at_s, reported_s.get(worker_id, at_s))
            reported_s[worker_id] = at_s
            status = _report(busy, at_s, slots, worker_id=worker_id)
            pool.observe(status)
            reference.observe(status)
        elif event[0] == "taken":
            _, worker_id, attempt_id, at_s = event
            pool.slot_taken(worker_id, attempt_id, _at(at_s))
            reference.slot_taken(worker_id, attempt_id, _at(at_s))
        else:
            _, worker_id, attempt_id, at_s = event
            pool.slot_freed(worker_id, attempt_id, _at(at_s))
            reference.slot_freed(worker_id, attempt_id, _at(at_s))

        for worker_id in _WORKERS:
            assert pool.busy_of(worker_id) == reference.busy_of(worker_id), worker_id


def test_started_attempt_leaves_queue() -> None:
    pool = PoolMonitor(status_ttl_s=60.0)
    pool.observe(_report(busy=0, at_s=0.0), now_s=0.0)
    pool.dispatched("a", Tier.STANDARD, "w1")
    assert pool.idle_slots(now_s=1.0) == 3
    assert pool.queued_by_worker() == {"w1": 1}

    pool.slot_taken("w1", "a", _at(1.0))
    assert pool.idle_slots(now_s=1.0) == 3
    assert pool.queued_by_worker() == {}

    pool.slot_freed("w1", "a", _at(2.0))
    assert pool.idle_slots(now_s=2.0) == 4
