"""The coordinator's pool view: which workers count as gone."""

from __future__ import annotations

from schemas.events import WorkerStatus
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

