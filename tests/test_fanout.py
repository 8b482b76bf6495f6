"""Completion fan-out: critical consumers gate the delivered state, on the real broker."""

from __future__ import annotations

import asyncio
import collections
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from infra.kafka_broker import free_port
from schemas.events import GenerationParams, JobDelivered, JobRequested, decode_event
from streams.client import SlotforgeClient
from streams.config import Settings
from streams.kafka import group_lag
from streams.processes import ProcessGroup
from streams.replay import ReplayOptions, replay
from tests.kafka_helpers import TopicReader

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class WebhookReceiver:
    """A local upstream service that applies each job once, by its Idempotency-Key."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.posts: collections.Counter[str] = collections.Counter()
        self.applied: list[str] = []
        self.port = free_port()

    async def handle(self, request: web.Request) -> web.Response:
        key = request.headers["Idempotency-Key"]
        await request.read()
        self.posts[key] += 1
        if self.status == 200 and key not in self.applied:
            self.applied.append(key)
        return web.Response(status=self.status, text="ok" if self.status == 200 else "down")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/slotforge"


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    server = WebhookReceiver()
    app = web.Application()
    app.router.add_post("/hooks/slotforge", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", server.port).start()
    yield server
    await runner.cleanup()


def _env(service_env: dict[str, str], url: str) -> dict[str, str]:
    return {
        **service_env,
        "SLOTFORGE_WORKER__SIMULATION__ENABLED": "true",
        "SLOTFORGE_WORKER__SIMULATION__P50_S": "0.1",
        "SLOTFORGE_WORKER__SIMULATION__ACCEPTANCE": "0.7",
        "SLOTFORGE_WORKER__SLOTS": "4",
        "SLOTFORGE_CONSUMERS__CRITICAL": '["delivery", "webhook"]',
        "SLOTFORGE_CONSUMERS__WEBHOOK_URL": url,
        "SLOTFORGE_CONSUMERS__DELIVERY_MAX_ATTEMPTS": "3",
        "SLOTFORGE_CONSUMERS__DELIVERY_BACKOFF_S": "0.1",
        "SLOTFORGE_TRACING__ENABLED": "false",
    }


def _requests(count: int, first: int = 0) -> list[JobRequested]:
    return [JobRequested(tenant_id="acme", user_id=f"u{index}",
                         params=GenerationParams(model="M1", prompt=f"plan {index}", steps=5),
                         slots=1) for index in range(first, first + count)]


def _start_pipeline(group: ProcessGroup) -> None:
    group.start("coordinator")
    group.start("postprocess")
    group.start("gpu-worker", name="gpu-1", env={"SLOTFORGE_WORKER__WORKER_ID": "gpu-1"})
    group.start("delivery")


async def test_killed_webhook_consumer_delivers_once(
    settings: Settings, service_env: dict[str, str], tmp_path: Path, receiver: WebhookReceiver
) -> None:
    group = ProcessGroup(tmp_path / "logs", _env(service_env, receiver.url))
    _start_pipeline(group)
    webhook = group.start("webhook")
    requests = _requests(30)
    try:
        async with SlotforgeClient(settings.kafka) as client, \
                TopicReader(settings.kafka, settings.topics.jobs_delivered) as delivered:
            for request in requests:
                await client.submit(request)
            while len(receiver.applied) < 5:
                await asyncio.sleep(0.1)
            group.kill(webhook)
            await asyncio.sleep(2)
            group.start("webhook", name="webhook-2")
            await delivered.wait_for(lambda seen: len(seen) >= len(requests), timeout_s=300)
    finally:
        await asyncio.to_thread(group.stop_all, 15)

    states = [decode_event(record.value, JobDelivered) for record in delivered.records]
    assert sorted(state.job_id for state in states) == sorted(r.job_id for r in requests)
    assert {state.status for state in states} == {"delivered"}
    assert sorted(receiver.applied) == sorted(r.job_id for r in requests)
    assert len(receiver.applied) == len(set(receiver.applied))


async def test_failing_webhook_marks_delivery_failed(
    settings: Settings, service_env: dict[str, str], tmp_path: Path, receiver: WebhookReceiver
) -> None:
    receiver.status = 503
    group = ProcessGroup(tmp_path / "logs", _env(service_env, receiver.url))
    _start_pipeline(group)
    group.start("webhook")
    request = _requests(1)[0]
    try:
        async with SlotforgeClient(settings.kafka) as client, \
                TopicReader(settings.kafka, settings.topics.jobs_delivered) as delivered:
            await client.submit(request)
            await delivered.wait_for(lambda seen: len(seen) >= 1, timeout_s=180)
    finally:
        await asyncio.to_thread(group.stop_all, 15)

    state = decode_event(delivered.records[0].value, JobDelivered)
    assert state.status == "delivery_failed"
    assert "HTTP 503" in state.reason
    assert receiver.posts[request.job_id] == 3


async def _delivery_latencies(client: SlotforgeClient, delivered: TopicReader,
                              requests: list[JobRequested]) -> list[float]:
    """Submit ``requests`` 0.2 s apart and return each job's submit-to-delivered seconds."""
    wanted = {request.job_id for request in requests}
    before = len(delivered.records)
    submitted_at: dict[str, float] = {}
    for request in requests:
        submitted_at[request.job_id] = time.time()
        await client.submit(request)
        await asyncio.sleep(0.2)
    await delivered.wait_for(
        lambda seen: wanted <= {decode_event(record.value, JobDelivered).job_id
                                for record in seen[before:]},
        timeout_s=180,
    )
    latencies = []
    for record in delivered.records[before:]:
        state = decode_event(record.value, JobDelivered)
        if state.job_id in wanted:
            latencies.append(record.timestamp / 1000 - submitted_at[state.job_id])
    return latencies


async def test_stopped_best_effort_consumer_keeps_latency(
    settings: Settings, service_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**_env(service_env, "http://127.0.0.1:9/unused"),
           "SLOTFORGE_CONSUMERS__CRITICAL": '["delivery"]',
           "SLOTFORGE_WORKER__SIMULATION__P50_S": "0.05",
           "SLOTFORGE_WORKER__SIMULATION__ACCEPTANCE": "0.95"}
    group = ProcessGroup(tmp_path / "logs", env)
    _start_pipeline(group)
    thumbnails = group.start("thumbnails")
    try:
        async with SlotforgeClient(settings.kafka) as client, \
                TopicReader(settings.kafka, settings.topics.jobs_delivered) as delivered:
            await _delivery_latencies(client, delivered, _requests(20))
            running = await _delivery_latencies(client, delivered, _requests(20, first=20))
            assert await asyncio.to_thread(group.stop, thumbnails, 15) == 0
            without_thumbnails = _requests(20, first=40)
            stopped = await _delivery_latencies(client, delivered, without_thumbnails)
        backlog = await group_lag(settings.kafka, settings.consumers.best_effort_group_id,
                                  settings.topics.jobs_completed)
    finally:
        await asyncio.to_thread(group.stop_all, 15)

    # The stopped consumer's work waits in Kafka while critical delivery goes on.
    assert backlog >= len(without_thumbnails)
    assert len(stopped) == len(without_thumbnails)
    # Noise allowance for a shared 2-core machine: half again plus half a second.
    assert statistics.median(stopped) <= 1.5 * statistics.median(running) + 0.5


async def test_replayed_completions_apply_once(
    settings: Settings, service_env: dict[str, str], tmp_path: Path, receiver: WebhookReceiver
) -> None:
    group = ProcessGroup(tmp_path / "logs", _env(service_env, receiver.url))
    _start_pipeline(group)
    group.start("webhook")
    requests = _requests(10)
    job_ids = sorted(request.job_id for request in requests)
    try:
        async with SlotforgeClient(settings.kafka) as client, \
                TopicReader(settings.kafka, settings.topics.jobs_delivered) as delivered:
            for request in requests:
                await client.submit(request)
            await delivered.wait_for(lambda seen: len(seen) >= len(requests), timeout_s=180)
            written = {path.stem: path.stat().st_mtime_ns
                       for path in settings.delivery_dir.glob("*.json")}

            summary = await replay(settings, ReplayOptions(
                source=settings.topics.jobs_completed, target=settings.topics.jobs_completed))
            assert summary.sent == len(requests)
            consumer_groups = (settings.consumers.critical_group_id,
                               settings.consumers.webhook_group_id)
            deadline = time.monotonic() + 120
            for group_id in consumer_groups:
                while await group_lag(settings.kafka, group_id, settings.topics.jobs_completed):
                    assert time.monotonic() < deadline, f"group {group_id} kept a lag"
                    await asyncio.sleep(0.5)
            # Give the coordinator time to republish a delivered state, which it must not.
            await asyncio.sleep(3)
            await delivered.poll()
    finally:
        await asyncio.to_thread(group.stop_all, 15)

    states = [decode_event(record.value, JobDelivered) for record in delivered.records]
    assert sorted(state.job_id for state in states) == job_ids
    assert sorted(receiver.applied) == job_ids
    # The webhook consumer sent each replayed job again, and the Idempotency-Key kept the
    # receiver from applying it twice.
    assert all(receiver.posts[job_id] == 2 for job_id in job_ids)
    # The delivery consumer skipped the replayed jobs instead of writing their manifests again.
    assert sorted(written) == job_ids
    assert {path.stem: path.stat().st_mtime_ns
            for path in settings.delivery_dir.glob("*.json")} == written
