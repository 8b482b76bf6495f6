"""Hang detection: the liveness tracker alone, then a hung attempt on the real broker."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from schemas.events import (
    AttemptDispatched,
    GenerationParams,
    JobRequested,
    JobStatus,
    Tier,
    decode_event,
)
from streams.client import SlotforgeClient
from streams.config import Settings, WorkerSettings
from streams.liveness import LivenessTracker
from streams.processes import ProcessGroup
from streams.step_times import StepClass
from tests.kafka_helpers import TopicReader

STEP_CLASS = StepClass("M1", 32, 32)
STATUS_INTERVAL_S = WorkerSettings().status_interval_s


def _start(tracker: LivenessTracker, attempt_id: str, now_s: float,
           worker: str = "w1", report_every_steps: int = 1) -> None:
    tracker.started(attempt_id=attempt_id, epoch=1, worker_id=worker, job_key="t:k",
                    job_id="job", step_class=STEP_CLASS, total_steps=20,
                    deadline_at_s=now_s + 3_600, retries_left=3, other_attempts=0,
                    report_every_steps=report_every_steps, now_s=now_s)


def test_progressing_attempt_kept() -> None:
    tracker = LivenessTracker()
    _start(tracker, "a1", 0.0)
    for step in range(1, 20):
        tracker.progress("a1", 1, step, now_s=step * 0.5)
        assert tracker.due(now_s=step * 0.5 + 0.1) == []


def test_silent_attempt_reported_hung() -> None:
    tracker = LivenessTracker()
    _start(tracker, "a1", 0.0)
    for step in range(1, 6):
        tracker.progress("a1", 1, step, now_s=step * 0.5)
    assert tracker.due(now_s=3.0) == []
    due = tracker.due(now_s=60.0)
    assert [watched.observation.attempt_id for watched, _ in due] == ["a1"]
    assert due[0][1].action == "kill_hung"


def test_queued_progress_overrides_kill() -> None:
    # The kill was decided while heartbeats waited behind it, as after a paused process.
    tracker = LivenessTracker()
    _start(tracker, "a1", 0.0)
    for step in range(1, 6):
        tracker.progress("a1", 1, step, now_s=step * 0.5)
    assert len(tracker.due(now_s=60.0)) == 1

    tracker.progress("a1", 1, 6, now_s=60.1)
    assert not tracker.confirm("a1", 1, now_s=60.2)
    assert tracker.due(now_s=60.3) == []


def test_silent_attempt_kill_confirmed() -> None:
    tracker = LivenessTracker()
    _start(tracker, "a1", 0.0)
    tracker.progress("a1", 1, 1, now_s=0.5)
    assert len(tracker.due(now_s=60.0)) == 1

    assert tracker.confirm("a1", 1, now_s=60.2)
    assert tracker.confirm("other", 1, now_s=60.2)
    assert tracker.confirm("a1", 2, now_s=60.2)


def test_sparse_reports_keep_slow_attempt() -> None:
    # Learn steps of median 0.1 s from attempts that report every 5 steps, one at a time.
    tracker = LivenessTracker()
    now_s = 0.0
    for index in range(40):
        step_s = (0.05, 0.1, 0.2)[index % 3]
        _start(tracker, f"warm-{index}", now_s, report_every_steps=5)
        for step in range(5, 21, 5):
            tracker.progress(f"warm-{index}", 1, step, now_s=now_s + step * step_s)
        now_s += 5.0
        tracker.finished(f"warm-{index}", now_s=now_s)

    # Three times the median: 1.5 s between reports is more than four of its own steps.
    _start(tracker, "slow", now_s, report_every_steps=5)
    for step in range(5, 21, 5):
        report_s = now_s + step * 0.3
        assert tracker.due(now_s=report_s - 0.01) == []
        tracker.progress("slow", 1, step, now_s=report_s)
    assert tracker._watched["slow"].observation.steps_done == 20


def test_finished_attempt_forgotten() -> None:
    tracker = LivenessTracker()
    _start(tracker, "a1", 0.0)
    tracker.finished("a1")
    assert len(tracker) == 0
    assert tracker.due(now_s=10_000.0) == []


def test_stale_epoch_progress_ignored() -> None:
    tracker = LivenessTracker()
    _start(tracker, "a1", 0.0)
    tracker.progress("a1", 2, 5, now_s=1.0)
    watched = tracker._watched["a1"]
    assert watched.observation.steps_done == 0


def test_concurrency_follows_worker() -> None:
    tracker = LivenessTracker()
    _start(tracker, "a1", 0.0)
    _start(tracker, "a2", 1.0)
    assert tracker._watched["a1"].observation.concurrency == 2
    tracker.finished("a2", now_s=2.0)
    assert tracker._watched["a1"].observation.concurrency == 1


def _one_slot_env(service_env: dict[str, str], *, p50_s: float) -> dict[str, str]:
    """Environment of one-slot simulated workers with fixed step times, one attempt at a time."""
    return {
        **service_env,
        "SLOTFORGE_COORDINATOR__RACING_POLICY": "sequential",
        "SLOTFORGE_WORKER__SLOTS": "1",
        "SLOTFORGE_WORKER__SIMULATION__ENABLED": "true",
        "SLOTFORGE_WORKER__SIMULATION__P50_S": str(p50_s),
        "SLOTFORGE_WORKER__SIMULATION__SIGMA": "0",
        "SLOTFORGE_WORKER__SIMULATION__ACCEPTANCE": "1.0",
    }


def _one_slot_request(prompt: str, steps: int) -> JobRequested:
    return JobRequested(tenant_id="acme", user_id="u1",
                        params=GenerationParams(model="M0001", prompt=prompt, steps=steps),
                        slots=1, deadline_s=600)


@pytest.mark.integration
@pytest.mark.slow
async def test_hung_attempt_redispatched(settings: Settings, service_env: dict[str, str],
                                         tmp_path: Path) -> None:
    group = ProcessGroup(tmp_path / "logs", _one_slot_env(service_env, p50_s=0.5))
    group.start("coordinator")
    group.start("postprocess")
    stuck = group.start("gpu-worker", name="gpu-stuck", env={
        "SLOTFORGE_WORKER__WORKER_ID": "gpu-stuck",
        "SLOTFORGE_WORKER__SIMULATION__HANG_FRACTION": "1.0",
    })
    request = _one_slot_request("hall plan", steps=20)
    try:
        async with SlotforgeClient(settings.kafka) as client, \
                TopicReader(settings.kafka, settings.topics.attempts(Tier.STANDARD),
                            settings.topics.followups(Tier.STANDARD)) as attempts:
            await client.submit(request)
            records = await attempts.wait_for(
                lambda seen: any(decode_event(r.value, AttemptDispatched).epoch >= 2
                                 for r in seen), timeout_s=180)
            group.kill(stuck)
            group.start("gpu-worker", name="gpu-healthy",
                        env={"SLOTFORGE_WORKER__WORKER_ID": "gpu-healthy"})
            completed = await client.wait(request.job_id, timeout_s=180)
    finally:
        await asyncio.to_thread(group.stop_all, 15)

    dispatched = [decode_event(record.value, AttemptDispatched) for record in records]
    first, again = dispatched[0], next(d for d in dispatched if d.epoch >= 2)
    assert again.followup
    assert again.attempt_id == first.attempt_id
    assert again.seed == first.seed
    assert completed.status == JobStatus.COMPLETED
    assert completed.slots[0].attempt_id == first.attempt_id


@pytest.mark.integration
@pytest.mark.slow
async def test_killed_worker_attempt_reclaimed(settings: Settings, service_env: dict[str, str],
                                               tmp_path: Path) -> None:
    from schemas.events import AttemptStarted

    env = {
        **service_env,
        "SLOTFORGE_COORDINATOR__RACING_POLICY": "sequential",
        "SLOTFORGE_COORDINATOR__LEASE_S": "5",
        "SLOTFORGE_WORKER__SLOTS": "1",
        "SLOTFORGE_WORKER__SIMULATION__ENABLED": "true",
        "SLOTFORGE_WORKER__SIMULATION__P50_S": "1",
        "SLOTFORGE_WORKER__SIMULATION__SIGMA": "0",
        "SLOTFORGE_WORKER__SIMULATION__ACCEPTANCE": "1.0",
    }
    group = ProcessGroup(tmp_path / "logs", env)
    group.start("coordinator")
    group.start("postprocess")
    # Slow enough that it is still running when it is killed, however loaded the machine.
    doomed = group.start("gpu-worker", name="gpu-doomed",
                         env={"SLOTFORGE_WORKER__WORKER_ID": "gpu-doomed",
                              "SLOTFORGE_WORKER__SIMULATION__P50_S": "120"})
    request = _one_slot_request("loft plan", steps=12)
    try:
        async with SlotforgeClient(settings.kafka) as client, \
                TopicReader(settings.kafka, settings.topics.coordinator_events) as events:
            await client.submit(request)
            await events.wait_for(lambda seen: any(b'"attempt.started"' in r.value
                                                   for r in seen), timeout_s=180)
            group.kill(doomed)
            group.start("gpu-worker", name="gpu-survivor",
                        env={"SLOTFORGE_WORKER__WORKER_ID": "gpu-survivor"})
            completed = await client.wait(request.job_id, timeout_s=240)
            await events.wait_for(lambda seen: any(b'"gpu-survivor"' in r.value
                                                   and b'"attempt.started"' in r.value
                                                   for r in seen), timeout_s=60)
    finally:
        await asyncio.to_thread(group.stop_all, 15)

    starts = [decode_event(r.value, AttemptStarted) for r in events.records
              if b'"attempt.started"' in r.value]
    assert starts[0].worker_id == "gpu-doomed"
    survivor = [start for start in starts if start.worker_id == "gpu-survivor"]
    assert survivor and survivor[0].epoch >= 2
    assert survivor[0].attempt_id == starts[0].attempt_id
    assert completed.status == JobStatus.COMPLETED


@pytest.mark.integration
@pytest.mark.slow
async def test_expired_flights_delete_unused_artifacts(
    settings: Settings, service_env: dict[str, str], tmp_path: Path
) -> None:
    env = {
        **service_env,
        "SLOTFORGE_COORDINATOR__RACING_POLICY": "sequential",
        "SLOTFORGE_COORDINATOR__RETENTION_S": "1",
        "SLOTFORGE_WORKER__SLOTS": "4",
        "SLOTFORGE_WORKER__SIMULATION__ENABLED": "true",
        "SLOTFORGE_WORKER__SIMULATION__P50_S": "0.05",
        "SLOTFORGE_WORKER__SIMULATION__ACCEPTANCE": "0.4",
    }
    group = ProcessGroup(tmp_path / "logs", env)
    group.start("coordinator")
    group.start("postprocess")
    group.start("gpu-worker")
    requests = [JobRequested(tenant_id="acme", user_id="u1",
                             params=GenerationParams(model="M1", prompt=f"plan {index}",
                                                     steps=4), slots=1)
                for index in range(8)]
    artifacts = settings.artifact_dir
    try:
        async with SlotforgeClient(settings.kafka) as client:
            for request in requests:
                await client.submit(request)
            outcomes = [await client.wait(request.job_id, timeout_s=180)
                        for request in requests]
            delivered = {Path(slot.artifact_uri.removeprefix("file://"))
                         for outcome in outcomes for slot in outcome.slots}

            def only_delivered_left() -> bool:
                return set(artifacts.rglob("*.png")) == delivered

            deadline = asyncio.get_running_loop().time() + 60
            while not only_delivered_left():
                assert asyncio.get_running_loop().time() < deadline, (
                    f"unused artifacts remain: {set(artifacts.rglob('*.png')) - delivered}")
                await asyncio.sleep(0.5)
    finally:
        await asyncio.to_thread(group.stop_all, 15)

    attempts = sum(outcome.attempts for outcome in outcomes)
    assert attempts > len(requests), "no attempt was rejected, so nothing was cleaned up"
    log = (tmp_path / "logs" / "coordinator.log").read_text()
    assert "Deleted unused artifact" in log
    assert "Removed empty flight" in log


@pytest.mark.integration
@pytest.mark.slow
async def test_sparse_heartbeats_not_killed(settings: Settings, service_env: dict[str, str],
                                            tmp_path: Path) -> None:
    # 0.3 s steps reported every 10 steps: 3 s between reports, far more than four steps,
    # and longer than the coordinator's 1 s between timeout checks.
    env = _one_slot_env(service_env, p50_s=6.0)
    env["SLOTFORGE_WORKER__PROGRESS_EVERY_STEPS"] = "10"
    group = ProcessGroup(tmp_path / "logs", env)
    group.start("coordinator")
    group.start("postprocess")
    group.start("gpu-worker")
    request = _one_slot_request("sparse heartbeats", steps=20)
    try:
        async with SlotforgeClient(settings.kafka) as client:
            await client.submit(request)
            completed = await client.wait(request.job_id, timeout_s=180)
    finally:
        await asyncio.to_thread(group.stop_all, 15)

    assert completed.status == JobStatus.COMPLETED
    assert completed.attempts == 1
    coordinator_log = (tmp_path / "logs" / "coordinator.log").read_text()
    assert "Timed out attempt" not in coordinator_log


@pytest.mark.integration
@pytest.mark.slow
async def test_paused_coordinator_keeps_attempt(
        settings: Settings, service_env: dict[str, str], tmp_path: Path) -> None:
    # Heartbeats pile up while the coordinator is stopped, so its first check after the
    # pause finds a long silence that the queued heartbeats already disprove.
    group = ProcessGroup(tmp_path / "logs", _one_slot_env(service_env, p50_s=8.0))
    coordinator = group.start("coordinator")
    group.start("postprocess")
    group.start("gpu-worker")
    request = _one_slot_request("paused coordinator", steps=20)
    try:
        async with SlotforgeClient(settings.kafka) as client, \
                TopicReader(settings.kafka, settings.topics.coordinator_events) as events:
            await client.submit(request)
            await events.wait_for(lambda seen: any(
                b'"attempt.started"' in record.value for record in seen), timeout_s=120)
            await asyncio.sleep(1.0)
            coordinator.signal(signal.SIGSTOP)
            await asyncio.sleep(5.0)
            coordinator.signal(signal.SIGCONT)
            completed = await client.wait(request.job_id, timeout_s=180)
    finally:
        coordinator.signal(signal.SIGCONT)
        await asyncio.to_thread(group.stop_all, 15)

    assert completed.status == JobStatus.COMPLETED
    assert completed.attempts == 1
    coordinator_log = (tmp_path / "logs" / "coordinator.log").read_text()
    assert "Timed out attempt" not in coordinator_log


@pytest.mark.integration
@pytest.mark.slow
async def test_restarted_worker_slot_resumes_claims(settings: Settings,
                                                    service_env: dict[str, str],
                                                    tmp_path: Path) -> None:
    """A worker started in a killed worker's slot runs its claimed attempts before the lease
    would expire, because the coordinator counts the silent holder as gone."""
    from schemas.events import AttemptStarted

    lease_s = 120
    env = {
        **service_env,
        "SLOTFORGE_COORDINATOR__RACING_POLICY": "sequential",
        "SLOTFORGE_COORDINATOR__LEASE_S": str(lease_s),
        "SLOTFORGE_COORDINATOR__WORKER_STATUS_TTL_S": "2",
        "SLOTFORGE_WORKER__SIMULATION__ENABLED": "true",
        "SLOTFORGE_WORKER__SIMULATION__SIGMA": "0",
        "SLOTFORGE_WORKER__SIMULATION__ACCEPTANCE": "1.0",
        "SLOTFORGE_WORKER__GROUP_INSTANCE_ID": "gpu-slot-1",
    }
    group = ProcessGroup(tmp_path / "logs", env)
    group.start("coordinator")
    group.start("postprocess")
    # One slot and one claim ahead: the first attempt runs, the second waits for the slot
    # with its claim granted, and both are still there when the worker is killed.
    doomed = group.start("gpu-worker", name="gpu-doomed",
                         env={"SLOTFORGE_WORKER__WORKER_ID": "gpu-doomed",
                              "SLOTFORGE_WORKER__SLOTS": "1",
                              "SLOTFORGE_WORKER__CLAIM_AHEAD": "1",
                              "SLOTFORGE_WORKER__SIMULATION__P50_S": "300"})
    request = JobRequested(
        tenant_id="acme", user_id="u1",
        params=GenerationParams(model="M0001", prompt="attic plan", steps=12),
        slots=2, deadline_s=600,
    )
    try:
        async with SlotforgeClient(settings.kafka) as client, \
                TopicReader(settings.kafka, settings.topics.coordinator_events) as events:
            await client.submit(request)
            await events.wait_for(lambda seen: sum(b'"attempt.claim"' in r.value
                                                   for r in seen) >= 2, timeout_s=180)
            await events.wait_for(lambda seen: any(b'"attempt.started"' in r.value
                                                   for r in seen), timeout_s=60)
            # The coordinator follows status reports from its start on, so it must see the
            # doomed worker report before the kill to notice it went silent.
            await asyncio.sleep(5 * STATUS_INTERVAL_S)
            group.kill(doomed)
            group.start("gpu-worker", name="gpu-successor",
                        env={"SLOTFORGE_WORKER__WORKER_ID": "gpu-successor",
                             "SLOTFORGE_WORKER__SLOTS": "2",
                             "SLOTFORGE_WORKER__SIMULATION__P50_S": "0.2"})
            completed = await client.wait(request.job_id, timeout_s=lease_s / 2)
            await events.wait_for(lambda seen: sum(b'"gpu-successor"' in r.value
                                                   and b'"attempt.started"' in r.value
                                                   for r in seen) >= 2, timeout_s=60)
    finally:
        await asyncio.to_thread(group.stop_all, 15)

    assert completed.status == JobStatus.COMPLETED
    starts = [decode_event(r.value, AttemptStarted) for r in events.records
              if b'"attempt.started"' in r.value]
    successor = {start.attempt_id for start in starts if start.worker_id == "gpu-successor"}
    assert {slot.attempt_id for slot in completed.slots} <= successor
