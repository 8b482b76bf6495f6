"""Affinity routing on the real broker: the coordinator process and two GPU workers."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiokafka import ConsumerRecord

from gpu_inference import worker
from gpu_inference.generation import GenerationRequest
from gpu_inference.worker import GpuWorker
from schemas.events import (
    AttemptStarted,
    GenerationParams,
    JobRequested,
    Tier,
    WorkerStatus,
    decode_event,
    utc_now,
)
from streams.client import SlotforgeClient
from streams.config import Settings
from streams.processes import ProcessGroup
from tests.kafka_helpers import TopicReader

pytestmark = [pytest.mark.integration, pytest.mark.slow]

Records = list[ConsumerRecord[bytes, bytes]]
WARM_ON_A = "M-warm-a"
WARM_ON_B = "M-warm-b"


def _request(model: str) -> JobRequested:
    # A unique prompt gives every job its own flight instead of a cached result.
    return JobRequested(
        tenant_id="acme", user_id="u1", slots=1,
        params=GenerationParams(model=model, prompt=f"floor plan {uuid.uuid4().hex}", steps=2),
    )


def _started_by(records: Records) -> dict[str, str]:
    """Map job id to the worker that started its attempt."""
    started: dict[str, str] = {}
    for record in records:
        if b'"attempt.started"' in (record.value or b""):
            event = decode_event(record.value, AttemptStarted)
            started[event.job_id] = event.worker_id
    return started


def _statuses(records: Records) -> dict[str, WorkerStatus]:
    return {status.worker_id: status
            for status in (decode_event(record.value, WorkerStatus) for record in records)}


def _worker(settings: Settings, worker_id: str, warm_model: str) -> GpuWorker:
    configured = settings.model_copy(update={"worker": settings.worker.model_copy(
        update={"worker_id": worker_id, "slots": 1, "max_batch_size": 1})})
    runner = worker.build_runner(configured)
    # Running one generation loads the model, so the worker reports it warm from the start.
    runner.generate(GenerationRequest(model=warm_model, prompt="", steps=1, width=32,
                                      height=32, seed=0))
    return GpuWorker(configured, runner=runner)


@asynccontextmanager
async def _serving(*services: GpuWorker) -> AsyncIterator[None]:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(service.run(stop)) for service in services]
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=90)


async def _run_job(client: SlotforgeClient, events: TopicReader, model: str) -> str:
    """Submit a job and return the worker that started its attempt."""
    request = _request(model)
    await client.submit(request)
    records = await events.wait_for(lambda seen: request.job_id in _started_by(seen),
                                    timeout_s=120)
    return _started_by(records)[request.job_id]


async def _wait_reported(statuses: TopicReader, busy: dict[str, int]) -> None:
    """Wait until each worker reports ``busy`` slots in a status sent from now on, then give
    the coordinator, which polls every 0.5 s, time to read it."""
    since = utc_now()

    def reported(seen: Records) -> bool:
        latest = _statuses(seen)
        return all(worker_id in latest and latest[worker_id].emitted_at > since
                   and latest[worker_id].busy == count for worker_id, count in busy.items())

    await statuses.wait_for(reported, timeout_s=60)
    await asyncio.sleep(1.0)


async def test_affinity_routes_to_warm_worker(settings: Settings, service_env: dict[str, str],
                                              tmp_path: Path) -> None:
    first = _worker(settings, "gpu-a", WARM_ON_A)
    second = _worker(settings, "gpu-b", WARM_ON_B)
    # Holds gpu-a inside a generation while set, so its only slot stays busy.
    hold = threading.Event()
    release = threading.Event()

    def hold_first(_batch_size: int, _step: int) -> None:
        if hold.is_set():
            release.wait(timeout=120)

    first.runner.before_step = hold_first
    processes = ProcessGroup(tmp_path / "logs", {
        **service_env, "SLOTFORGE_COORDINATOR__RACING_POLICY": "sequential"})
    processes.start("coordinator")
    try:
        async with SlotforgeClient(settings.kafka) as client, \
                TopicReader(settings.kafka, settings.topics.coordinator_events) as events, \
                TopicReader(settings.kafka, settings.topics.worker_status) as statuses, \
                _serving(first, second):
            # Both workers must own partitions of the tier topic before routing can use them.
            await statuses.wait_for(lambda seen: all(
                status.partitions.get(Tier.STANDARD)
                for status in _statuses(seen).values()) and len(_statuses(seen)) == 2,
                timeout_s=120)
            # The first job proves the coordinator is up; then it has seen fresh statuses.
            await _run_job(client, events, "M-probe")

            # While both are free, each model goes to the worker that has it warm.
            placements: list[tuple[str, Any]] = []
            for model in (WARM_ON_A, WARM_ON_B, WARM_ON_A, WARM_ON_B):
                await _wait_reported(statuses, {"gpu-a": 0, "gpu-b": 0})
                placements.append((model, await _run_job(client, events, model)))
            assert placements == [(WARM_ON_A, "gpu-a"), (WARM_ON_B, "gpu-b"),
                                  (WARM_ON_A, "gpu-a"), (WARM_ON_B, "gpu-b")]

            # With gpu-a busy, its model goes to the free worker instead of waiting.
            await _wait_reported(statuses, {"gpu-a": 0, "gpu-b": 0})
            hold.set()
            assert await _run_job(client, events, WARM_ON_A) == "gpu-a"
            await _wait_reported(statuses, {"gpu-a": 1})
            assert await _run_job(client, events, WARM_ON_A) == "gpu-b"
            release.set()
    finally:
        release.set()
        processes.stop_all()
