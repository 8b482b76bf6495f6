"""The GPU worker on the real broker, with the random-weight diffusers pipeline on the CPU."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiokafka import ConsumerRecord
from PIL import Image

from gpu_inference import worker
from gpu_inference.worker import GpuWorker
from schemas.events import (
    AttemptDispatched,
    AttemptFinished,
    AttemptProgress,
    AttemptStarted,
    AttemptStatus,
    DeadLetter,
    GenerationParams,
    Tier,
    decode_event,
    encode_event,
    utc_now,
)
from streams.config import Settings
from streams.kafka import group_lag, header_value
from streams.racing import STRAGGLER_ERROR_TYPE
from tests.kafka_helpers import ClaimGranter, TopicReader, produce

pytestmark = pytest.mark.integration

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"

Records = list[ConsumerRecord[bytes, bytes]]


def _dispatch(
    job_key: str = "acme:key",
    steps: int = 3,
    deadline_s: float = 300.0,
    tier: Tier = Tier.STANDARD,
    slot: int = 0,
) -> AttemptDispatched:
    return AttemptDispatched(
        attempt_id=uuid.uuid4().hex,
        job_id=uuid.uuid4().hex,
        job_key=job_key,
        tenant_id="acme",
        slot=slot,
        attempt_no=1,
        params=GenerationParams(model="M0012", prompt="two bedroom floor plan", steps=steps),
        seed=42,
        tier=tier,
        deadline_at=utc_now() + timedelta(seconds=deadline_s),
    )


async def _send(settings: Settings, attempt: AttemptDispatched) -> None:
    await produce(
        settings.kafka,
        settings.topics.attempts(attempt.tier),
        encode_event(attempt),
        key=attempt.attempt_id.encode(),
        headers=[("traceparent", TRACEPARENT.encode())],
    )


@pytest.fixture(autouse=True)
async def claims(settings: Settings) -> AsyncIterator[ClaimGranter]:
    """Grant the worker's claims as the coordinator would."""
    async with ClaimGranter(settings.kafka) as granter:
        yield granter


def _events(records: Records) -> list[Any]:
    return [
        decode_event(record.value, AttemptStarted, AttemptProgress, AttemptFinished)
        for record in records
        if b'"attempt.claim"' not in (record.value or b"")
    ]


def _finished(records: Records) -> list[AttemptFinished]:
    return [event for event in _events(records) if isinstance(event, AttemptFinished)]


def _count_finished(count: int) -> Any:
    return lambda seen: len(_finished(seen)) >= count


def _with_worker(settings: Settings, **changes: Any) -> Settings:
    return settings.model_copy(update={"worker": settings.worker.model_copy(update=changes)})


@asynccontextmanager
async def _running(service: Any, settings: Settings) -> AsyncIterator[asyncio.Event]:
    """Run a service coroutine as a task; on exit set its stop event and wait for it."""
    stop = asyncio.Event()
    task = asyncio.create_task(service(settings, stop))
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=90)


async def test_worker_runs_attempts_end_to_end(settings: Settings) -> None:
    # Every step's heartbeat, so the test checks the whole sequence.
    settings = _with_worker(settings, progress_min_interval_s=0.0)
    attempts = [_dispatch(job_key=f"acme:key{index}", slot=index) for index in range(3)]
    attempts[2] = attempts[2].model_copy(update={"tier": Tier.INTERACTIVE})

    async with (
        TopicReader(settings.kafka, settings.topics.coordinator_events) as events,
        TopicReader(settings.kafka, settings.topics.generated) as generated,
        TopicReader(settings.kafka, settings.topics.spans) as spans,
    ):
        async with _running(worker.run, settings):
            for attempt in attempts:
                await _send(settings, attempt)
            await events.wait_for(_count_finished(3), timeout_s=120)
            await generated.wait_for(lambda seen: len(seen) >= 3, timeout_s=30)
        # The worker flushes its spans before it returns; model loads add spans of their own.
        wanted = {(attempt.attempt_id, name) for attempt in attempts
                  for name in ("queue_wait", "claim", "generation", "upload")}

        def all_spans_seen(seen: Records) -> bool:
            found = set()
            for record in seen:
                row = json.loads(record.value)
                found.add((row["SpanAttributes"].get("slotforge.attempt.id"), row["SpanName"]))
            return wanted <= found

        await spans.wait_for(all_spans_seen, timeout_s=60)

    by_attempt: dict[str, list[tuple[ConsumerRecord[bytes, bytes], Any]]] = {}
    lifecycle = [record for record in events.records if b'"attempt.claim"' not in record.value]
    for record, event in zip(lifecycle, _events(lifecycle), strict=True):
        by_attempt.setdefault(event.attempt_id, []).append((record, event))

    for attempt in attempts:
        sequence = by_attempt[attempt.attempt_id]
        kinds = [type(event).__name__ for _, event in sequence]
        assert kinds == ["AttemptStarted", *["AttemptProgress"] * 3, "AttemptFinished"]
        assert [event.step for _, event in sequence[1:4]] == [1, 2, 3]
        assert all(event.total_steps == 3 for _, event in sequence[1:4])
        for record, event in sequence:
            assert record.key == attempt.job_key.encode()
            assert event.job_id == attempt.job_id
            traceparent = header_value(record.headers, "traceparent")
            assert traceparent is not None
            assert traceparent.split("-")[1] == TRACE_ID

        finished = sequence[-1][1]
        assert finished.status == AttemptStatus.SUCCEEDED
        assert finished.slot == attempt.slot
        assert finished.gpu_s > 0
        assert finished.error_type is None
        path = (settings.artifact_dir.resolve() / attempt.job_id
                / f"{attempt.attempt_id}.e{attempt.epoch}.png")
        assert finished.artifact_uri == path.as_uri()
        with Image.open(path) as image:
            assert image.size == (32, 32)

    generated_events = {
        record.key: decode_event(record.value, AttemptFinished) for record in generated.records
    }
    assert set(generated_events) == {attempt.attempt_id.encode() for attempt in attempts}
    assert all(event.status == AttemptStatus.SUCCEEDED for event in generated_events.values())

    for tier in Tier:
        topic = settings.topics.attempts(tier)
        assert await group_lag(settings.kafka, settings.worker.group_id, topic) == 0, topic

    rows = [json.loads(record.value) for record in spans.records]
    for attempt in attempts:
        mine = {
            row["SpanName"]: row
            for row in rows
            if row["SpanAttributes"].get("slotforge.attempt.id") == attempt.attempt_id
        }
        assert set(mine) == {"queue_wait", "claim", "generation", "upload"}
        for row in mine.values():
            assert row["TraceId"] == TRACE_ID
            assert row["ServiceName"] == "gpu-worker"
        for name in ("queue_wait", "generation"):
            assert mine[name]["ParentSpanId"] == PARENT_SPAN_ID
        # Claim and upload happen inside the attempt's generation span.
        for name in ("claim", "upload"):
            assert mine[name]["ParentSpanId"] == mine["generation"]["SpanId"]
            assert mine[name]["SpanAttributes"]["slotforge.stage"] == name
        assert mine["claim"]["SpanAttributes"]["slotforge.claim.granted"] == "True"
        wait = mine["queue_wait"]["SpanAttributes"]
        assert wait["slotforge.stage"] == "queue_wait"
        assert wait["slotforge.tier"] == attempt.tier.value
        assert wait["slotforge.worker.id"] == mine["generation"]["SpanAttributes"][
            "slotforge.worker.id"]
        assert 1 <= int(wait["slotforge.pool.concurrency"]) <= settings.worker.slots
        generation = mine["generation"]["SpanAttributes"]
        assert generation["slotforge.stage"] == "generation"
        assert generation["gen_ai.request.model"] == "M0012"
        assert generation["slotforge.job.id"] == attempt.job_id
        assert generation["slotforge.steps"] == "3"
        assert float(generation["slotforge.gpu_s"]) > 0
        assert generation["slotforge.worker.id"]


async def test_dispatch_lease_skips_claim(settings: Settings) -> None:
    settings = _with_worker(settings, worker_id="w-granted")
    now = utc_now()
    lease_s = settings.coordinator.lease_s
    granted = _dispatch(job_key="acme:granted").model_copy(update={
        "granted_to": "w-granted", "lease_expires_at": now + timedelta(seconds=lease_s)})
    elsewhere = _dispatch(job_key="acme:elsewhere").model_copy(update={
        "granted_to": "w-other", "lease_expires_at": now + timedelta(seconds=lease_s)})
    # Less lease left than the margin, so the worker claims it before it runs.
    running_out = _dispatch(job_key="acme:running-out").model_copy(update={
        "granted_to": "w-granted",
        "lease_expires_at": now + timedelta(seconds=worker.LEASE_MARGIN_S / 2)})
    # Longer than any lease the coordinator grants, so the worker does not trust it.
    far_future = _dispatch(job_key="acme:far-future").model_copy(update={
        "granted_to": "w-granted", "lease_expires_at": now + timedelta(days=365)})

    async with TopicReader(settings.kafka, settings.topics.coordinator_events) as events:
        async with _running(worker.run, settings):
            for attempt in (granted, elsewhere, running_out, far_future):
                await _send(settings, attempt)
            await events.wait_for(_count_finished(4), timeout_s=120)

    claimed = {record.key for record in events.records
               if b'"attempt.claim"' in (record.value or b"")}
    assert claimed == {b"acme:elsewhere", b"acme:running-out", b"acme:far-future"}
    finished = {event.attempt_id: event for event in _finished(events.records)}
    assert all(finished[attempt.attempt_id].status == AttemptStatus.SUCCEEDED
               for attempt in (granted, elsewhere, running_out, far_future))


async def test_heartbeats_throttled_by_interval(settings: Settings) -> None:
    settings = _with_worker(settings, progress_min_interval_s=3600.0)
    attempt = _dispatch(steps=6)

    async with TopicReader(settings.kafka, settings.topics.coordinator_events) as events:
        async with _running(worker.run, settings):
            await _send(settings, attempt)
            await events.wait_for(_count_finished(1), timeout_s=120)

    progress = [event for event in _events(events.records) if isinstance(event, AttemptProgress)]
    # Only the first and the last step beat inside one interval.
    assert [event.step for event in progress] == [1, 6]
    assert _finished(events.records)[0].status == AttemptStatus.SUCCEEDED


async def test_straggler_reports_and_stops(settings: Settings) -> None:
    settings = _with_worker(settings, progress_min_interval_s=3600.0)
    # Every run projects past this threshold once two steps after its first report are done.
    attempt = _dispatch(steps=6).model_copy(update={"straggler_remaining_s": 1e-6})

    async with TopicReader(settings.kafka, settings.topics.coordinator_events) as events:
        async with _running(worker.run, settings):
            await _send(settings, attempt)
            await events.wait_for(_count_finished(1), timeout_s=120)

    seen = _events(events.records)
    progress = [event for event in seen if isinstance(event, AttemptProgress)]
    # The straggler report comes once, at the first step the rule may judge, and the
    # worker stops the attempt there instead of waiting for the coordinator's cancel.
    assert [event.step for event in progress] == [1, 3]
    stamps = [event.emitted_at for event in progress]
    assert stamps == sorted(stamps)
    [finished] = _finished(events.records)
    assert finished.status == AttemptStatus.CANCELLED
    assert finished.error_type == STRAGGLER_ERROR_TYPE
    assert finished.retriable
    assert seen.index(finished) > seen.index(progress[-1])


async def test_stop_hands_back_unclaimed_attempts(settings: Settings,
                                                 claims: ClaimGranter) -> None:
    claims.answering = False
    attempt = _dispatch()
    topic = settings.topics.attempts(attempt.tier)

    async with TopicReader(settings.kafka, settings.topics.coordinator_events) as events:
        async with _running(worker.run, settings):
            await _send(settings, attempt)
            await events.wait_for(
                lambda seen: any(b'"attempt.claim"' in record.value for record in seen),
                timeout_s=120)
            stopping_s = time.monotonic()
        stopped_s = time.monotonic() - stopping_s
        await events.wait_for(_count_finished(1), timeout_s=30)

    # The grace period for running attempts is 30 s, and an unclaimed attempt has no slot.
    assert stopped_s < 15.0
    # Reported cancelled, so the flight replaces it without waiting for a lease to expire.
    [finished] = _finished(events.records)
    assert finished.status == AttemptStatus.CANCELLED
    assert finished.retriable
    assert finished.gpu_s == 0.0
    assert await group_lag(settings.kafka, settings.worker.group_id, topic) == 0


async def test_higher_epoch_supersedes_running(settings: Settings) -> None:
    first = _dispatch(steps=40)
    second = first.model_copy(update={"epoch": 2})

    async with TopicReader(settings.kafka, settings.topics.coordinator_events) as events:
        async with _running(worker.run, settings):
            await _send(settings, first)
            await _send(settings, second)
            await events.wait_for(
                lambda seen: any(event.epoch == 2 for event in _finished(seen)), timeout_s=120)

    finished = {event.epoch: event for event in _finished(events.records)}
    assert finished[2].status == AttemptStatus.SUCCEEDED
    # The epoch 1 run was stopped for the newer epoch, unless it ended before that arrived.
    if 1 in finished:
        assert finished[1].status in (AttemptStatus.CANCELLED, AttemptStatus.SUCCEEDED)


async def test_garbage_goes_to_deadletter_and_next_runs(settings: Settings) -> None:
    topic = settings.topics.attempts(Tier.STANDARD)
    attempt = _dispatch()

    async with (
        TopicReader(settings.kafka, settings.topics.coordinator_events) as events,
        TopicReader(settings.kafka, settings.topics.deadletter) as letters,
        _running(worker.run, settings),
    ):
        # Both records share a key, so they land on one partition in this order.
        key = attempt.attempt_id.encode()
        await produce(settings.kafka, topic, b"\x00not json", key=key)
        await produce(settings.kafka, topic, encode_event(attempt), key=key)
        await letters.wait_for(lambda seen: len(seen) >= 1, timeout_s=120)
        await events.wait_for(_count_finished(1), timeout_s=120)

    letter = decode_event(letters.records[0].value, DeadLetter)
    assert letter.source_topic == topic
    assert letter.consumer_group == settings.worker.group_id
    assert letter.error_type == "json"
    assert letters.records[0].key == key

    (finished,) = _finished(events.records)
    assert finished.attempt_id == attempt.attempt_id
    assert finished.status == AttemptStatus.SUCCEEDED
    assert await group_lag(settings.kafka, settings.worker.group_id, topic) == 0


async def test_single_slot_runs_attempts_one_at_a_time(settings: Settings) -> None:
    single = _with_worker(settings, slots=1, progress_every_steps=2)
    # One job key puts every event on one partition, so their offsets give the true order.
    attempts = [_dispatch(job_key="acme:one", steps=4) for _ in range(3)]

    async with (
        TopicReader(single.kafka, single.topics.coordinator_events) as events,
        _running(worker.run, single),
    ):
        for attempt in attempts:
            await _send(single, attempt)
        await events.wait_for(_count_finished(3), timeout_s=120)

    running: set[str] = set()
    most_running = 0
    for event in _events(events.records):
        if isinstance(event, AttemptStarted):
            running.add(event.attempt_id)
            most_running = max(most_running, len(running))
        elif isinstance(event, AttemptFinished):
            running.discard(event.attempt_id)
    assert most_running == 1

    steps = [event.step for event in _events(events.records) if isinstance(event, AttemptProgress)]
    assert steps == [2, 4] * 3


async def test_stop_cancels_attempts_after_grace(settings: Settings, tmp_path: Path) -> None:
    attempt = _dispatch(steps=400)
    service = GpuWorker(settings, stop_grace_s=0.5)

    async with TopicReader(settings.kafka, settings.topics.coordinator_events) as events:
        stop = asyncio.Event()
        task = asyncio.create_task(service.run(stop))
        await _send(settings, attempt)
        await events.wait_for(
            lambda seen: any(isinstance(e, AttemptProgress) for e in _events(seen)), timeout_s=120
        )
        stop.set()
        await asyncio.wait_for(task, timeout=60)
        await events.wait_for(_count_finished(1), timeout_s=30)

    (finished,) = _finished(events.records)
    assert finished.status == AttemptStatus.CANCELLED
    assert finished.error_type == "cancelled"
    assert finished.retriable is True
    assert "shutting down" in (finished.error or "")
    assert finished.artifact_uri is None
    assert finished.gpu_s > 0
    topic = settings.topics.attempts(Tier.STANDARD)
    assert await group_lag(settings.kafka, settings.worker.group_id, topic) == 0


async def test_expired_attempt_not_started(settings: Settings) -> None:
    attempt = _dispatch(deadline_s=-1.0)

    async with (
        TopicReader(settings.kafka, settings.topics.coordinator_events) as events,
        _running(worker.run, settings),
    ):
        await _send(settings, attempt)
        await events.wait_for(_count_finished(1), timeout_s=120)

    assert [type(event).__name__ for event in _events(events.records)] == ["AttemptFinished"]
    (finished,) = _finished(events.records)
    assert finished.status == AttemptStatus.CANCELLED
    assert finished.error_type == "deadline_exceeded"
    assert finished.retriable is False


async def test_rebalance_mid_attempt_runs_once(settings: Settings) -> None:
    single = _with_worker(settings, slots=1)
    attempts = [_dispatch(job_key=f"acme:r{index}", steps=20) for index in range(6)]
    first = GpuWorker(single.model_copy(update={"worker": single.worker.model_copy(
        update={"worker_id": "worker-a"})}))
    second = GpuWorker(single.model_copy(update={"worker": single.worker.model_copy(
        update={"worker_id": "worker-b"})}))
    stop_first, stop_second = asyncio.Event(), asyncio.Event()

    async with TopicReader(single.kafka, single.topics.coordinator_events) as events:
        first_task = asyncio.create_task(first.run(stop_first))
        for attempt in attempts:
            await _send(single, attempt)
        await events.wait_for(
            lambda seen: any(isinstance(e, AttemptProgress) for e in _events(seen)), timeout_s=120
        )
        # The second member joins while the first is inside an attempt.
        second_task = asyncio.create_task(second.run(stop_second))
        done = {attempt.attempt_id for attempt in attempts}
        await events.wait_for(
            lambda seen: {
                e.attempt_id for e in _finished(seen) if e.status == AttemptStatus.SUCCEEDED
            } >= done,
            timeout_s=180,
        )
        stop_first.set()
        stop_second.set()
        await asyncio.wait_for(asyncio.gather(first_task, second_task), timeout=90)

    assert first.fetcher.tracker.in_flight() == 0
    assert second.fetcher.tracker.in_flight() == 0
    # The revoked attempt finished within the rebalance grace, so nobody ran it again.
    finished_ids = [event.attempt_id for event in _finished(events.records)]
    assert sorted(finished_ids) == sorted(attempt.attempt_id for attempt in attempts)
    for tier in Tier:
        topic = single.topics.attempts(tier)
        assert await group_lag(single.kafka, single.worker.group_id, topic) == 0, topic


async def test_cancel_stops_running_attempt(settings: Settings) -> None:
    from schemas.events import AttemptCancel

    attempt = _dispatch(steps=400)
    configured = _with_worker(settings, worker_id="gpu-cancel", slots=1)
    async with TopicReader(settings.kafka, settings.topics.coordinator_events) as events:
        async with _running(worker.run, configured):
            await _send(settings, attempt)
            await events.wait_for(
                lambda seen: any(isinstance(event, AttemptProgress) and event.step >= 2
                                 for event in _events(seen)), timeout_s=120)
            cancel = AttemptCancel(attempt_id=attempt.attempt_id, job_id=attempt.job_id,
                                   job_key=attempt.job_key, epoch=attempt.epoch,
                                   worker_id="gpu-cancel", reason="slots filled")
            await produce(settings.kafka, settings.topics.control, encode_event(cancel),
                          key=b"gpu-cancel")
            await events.wait_for(_count_finished(1), timeout_s=60)

    finished = _finished(events.records)[0]
    assert finished.status == AttemptStatus.CANCELLED
    assert "slots filled" in (finished.error or "")
    assert not finished.retriable
    assert finished.gpu_s > 0
    steps = [event.step for event in _events(events.records)
             if isinstance(event, AttemptProgress)]
    assert max(steps) < 400


async def test_cancel_inside_batch_frees_slot(settings: Settings) -> None:
    from schemas.events import AttemptCancel

    configured = _with_worker(settings, worker_id="gpu-batch", slots=3, max_batch_size=3,
                              max_batch_wait_ms=3000)
    # One job key puts every event on one partition, so their offsets give the true order.
    batch = [_dispatch(job_key="acme:batch", steps=400) for _ in range(3)]
    batch = [attempt.model_copy(update={"seed": 42 + index})
             for index, attempt in enumerate(batch)]
    later = _dispatch(job_key="acme:batch", steps=2)
    cancelled = batch[1]
    runner = worker.build_runner(configured)
    # Slow each step so the batch is still running when the freed slot takes the next one.
    runner.before_step = lambda _batch_size, _step: time.sleep(0.05)
    service = GpuWorker(configured, runner=runner)

    async with TopicReader(settings.kafka, settings.topics.coordinator_events) as events:
        stop = asyncio.Event()
        task = asyncio.create_task(service.run(stop))
        try:
            for attempt in batch:
                await _send(settings, attempt)
            await events.wait_for(
                lambda seen: any(isinstance(event, AttemptProgress) and event.step >= 2
                                 and event.attempt_id == cancelled.attempt_id
                                 for event in _events(seen)), timeout_s=120)
            cancel = AttemptCancel(attempt_id=cancelled.attempt_id, job_id=cancelled.job_id,
                                   job_key=cancelled.job_key, epoch=cancelled.epoch,
                                   worker_id="gpu-batch", reason="slots filled")
            await produce(settings.kafka, settings.topics.control, encode_event(cancel),
                          key=b"gpu-batch")
            await events.wait_for(_count_finished(1), timeout_s=60)
            # The freed slot takes the next attempt while the batch is still running.
            await _send(settings, later)
            await events.wait_for(_count_finished(4), timeout_s=180)
        finally:
            stop.set()
            await asyncio.wait_for(task, timeout=90)

    assert service.batcher.batch_sizes[0] == 3
    finished = {event.attempt_id: event for event in _finished(events.records)}
    assert finished[cancelled.attempt_id].status == AttemptStatus.CANCELLED
    assert "slots filled" in (finished[cancelled.attempt_id].error or "")
    for attempt in (batch[0], batch[2], later):
        assert finished[attempt.attempt_id].status == AttemptStatus.SUCCEEDED
    order = [(type(event).__name__, event.attempt_id) for event in _events(events.records)
             if isinstance(event, AttemptFinished | AttemptStarted)]
    later_started = order.index(("AttemptStarted", later.attempt_id))
    assert later_started < order.index(("AttemptFinished", batch[0].attempt_id))
    assert later_started < order.index(("AttemptFinished", batch[2].attempt_id))
    cancelled_steps = [event.step for event in _events(events.records)
                       if isinstance(event, AttemptProgress)
                       and event.attempt_id == cancelled.attempt_id]
    assert max(cancelled_steps) < 400
