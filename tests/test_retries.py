"""Retries through delay topics, the shared moderation rate, and dead letters, on the real
broker with a moderation API served on 127.0.0.1 by the test."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import numpy as np
import pytest
from aiohttp import web
from PIL import Image

from gpu_inference.artifacts import ArtifactStore
from gpu_inference.postprocess import Postprocessor
from schemas.errors import PermanentError, TransientError
from schemas.events import (
    AttemptFinished,
    AttemptStatus,
    DeadLetter,
    ResultScored,
    decode_event,
    encode_event,
)
from schemas.topics import RETRY_LEVELS
from streams.config import RetrySettings, Settings
from streams.kafka import make_producer
from streams.retry import (
    DUE_HEADER,
    TARGET_HEADER,
    BackoffPolicy,
    RetryRouter,
    is_transient,
    retry_level,
)
from tests.kafka_helpers import TopicReader, produce

# ---- pure parts ------------------------------------------------------------------------------


def test_backoff_doubles_up_to_max() -> None:
    policy = BackoffPolicy(base_s=1.0, max_s=5.0, jitter=0.0)
    assert [policy.delay_s(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_backoff_jitter_stays_in_band() -> None:
    policy = BackoffPolicy(base_s=2.0, max_s=60.0, jitter=0.5)
    rng = random.Random(3)
    delays = [policy.delay_s(2, rng) for _ in range(500)]
    assert min(delays) >= 2.0
    assert max(delays) <= 4.0
    # Jitter spreads the delays instead of repeating one value.
    assert len({round(delay, 3) for delay in delays}) > 100


def test_backoff_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="base_s"):
        BackoffPolicy(base_s=2.0, max_s=1.0)
    with pytest.raises(ValueError, match="jitter"):
        BackoffPolicy(jitter=1.0)
    with pytest.raises(ValueError, match="retry_no"):
        BackoffPolicy().delay_s(0)


@pytest.mark.parametrize(("error", "transient"), [
    (TransientError("HTTP 503"), True),
    (PermanentError("HTTP 503"), False),
    (ConnectionResetError("reset"), True),
    (TimeoutError(), True),
    (ValueError("HTTP 503, retry later"), False),
])
def test_transient_decided_by_type(error: BaseException, transient: bool) -> None:
    assert is_transient(error) is transient


def test_retry_levels_cap_at_last() -> None:
    assert [retry_level(n) for n in (1, 2, RETRY_LEVELS, RETRY_LEVELS + 5)] == [
        1, 2, RETRY_LEVELS, RETRY_LEVELS]


# ---- a moderation API on 127.0.0.1 -------------------------------------------------------------


@dataclass
class ModerationServer:
    """Record each request's arrival and respond by a per-attempt script of statuses."""

    # Statuses to respond with, in order, per attempt id; 200 once the script runs out.
    scripts: dict[str, list[int]] = field(default_factory=dict)
    default: Callable[[str], int] = lambda _attempt_id: 200
    requests: list[tuple[float, str]] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        attempt_id = request.headers["Idempotency-Key"].split(":", 1)[0]
        await request.read()
        self.requests.append((time.monotonic(), attempt_id))
        script = self.scripts.get(attempt_id)
        status = script.pop(0) if script else self.default(attempt_id)
        if status != 200:
            return web.Response(status=status, text=f"scripted HTTP {status}")
        return web.json_response({"flagged": False, "reason": "clean"})

    def times_of(self, attempt_id: str) -> list[float]:
        return [at for at, seen in self.requests if seen == attempt_id]


@asynccontextmanager
async def _moderation_server() -> AsyncIterator[ModerationServer]:
    server = ModerationServer()
    app = web.Application()
    app.router.add_post("/moderate", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    server.url = f"http://127.0.0.1:{port}/moderate"
    try:
        yield server
    finally:
        await runner.cleanup()


def _moderated(settings: Settings, url: str, rate_per_s: float = 50.0,
               **retry: float) -> Settings:
    return settings.model_copy(update={
        "postprocess": settings.postprocess.model_copy(update={
            "moderation_url": url, "moderation_rate_per_s": rate_per_s}),
        "retry": RetrySettings(**{"base_s": 0.3, "max_s": 5.0, "jitter": 0.5,
                                  "max_retries_per_attempt": 3, **retry}),
    })


def _gradient(seed: int) -> Image.Image:
    y, x = np.mgrid[0:32, 0:32].astype(np.float32)
    rgb = np.stack([127 + 100 * np.sin(x / 10 + seed), 127 + 100 * np.cos(y / 12 + seed),
                    127 + 60 * np.sin((x + y) / 16)], axis=-1)
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB")


def _generated(settings: Settings, index: int) -> AttemptFinished:
    attempt_id = f"a{index}-{uuid.uuid4().hex[:12]}"
    job_id = uuid.uuid4().hex
    uri = ArtifactStore(settings.artifact_dir).write_png(job_id, attempt_id, _gradient(index),
                                                           epoch=1)
    return AttemptFinished(attempt_id=attempt_id, job_id=job_id, job_key=f"acme:{job_id}",
                           worker_id="w", status=AttemptStatus.SUCCEEDED, slot=0,
                           artifact_uri=uri, gpu_s=0.1)


async def _publish(settings: Settings, events: list[AttemptFinished]) -> None:
    producer = make_producer(settings.kafka)
    await producer.start()
    try:
        for event in events:
            await producer.send_and_wait(settings.topics.generated, encode_event(event),
                                         key=event.attempt_id.encode())
    finally:
        await producer.stop()


@asynccontextmanager
async def _services(*services: Callable[[asyncio.Event], object]) -> AsyncIterator[None]:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(service(stop)) for service in services]  # type: ignore[arg-type]
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=90)


def _verdicts(reader: TopicReader) -> dict[str, ResultScored]:
    return {event.attempt_id: event for event in
            (decode_event(record.value, ResultScored) for record in reader.records)}


def _max_in_window(times: list[float], window_s: float) -> int:
    times = sorted(times)
    most = 0
    for index, start in enumerate(times):
        most = max(most, sum(1 for at in times[index:] if at < start + window_s))
    return most


@pytest.mark.integration
async def test_moderation_rate_shared_by_processes(settings: Settings) -> None:
    rate_per_s = 6.0
    async with _moderation_server() as server:
        configured = _moderated(settings, server.url, rate_per_s=rate_per_s)
        events = [_generated(configured, index) for index in range(36)]
        first, second = Postprocessor(configured), Postprocessor(configured)
        owned: dict[int, set[object]] = {1: set(), 2: set()}
        first.fetcher.assigned_hooks.append(owned[1].update)
        second.fetcher.assigned_hooks.append(owned[2].update)
        async with TopicReader(configured.kafka, configured.topics.coordinator_events) as out, \
                _services(first.run, second.run):
            await _publish(configured, events)
            await out.wait_for(lambda seen: len(seen) >= len(events), timeout_s=120)

    verdicts = _verdicts(out)
    assert set(verdicts) == {event.attempt_id for event in events}
    assert all(verdict.accepted for verdict in verdicts.values())
    times = [at for at, _ in server.requests]
    assert len(times) == len(events)
    # Two processes share one rate: no second contains more requests than the limit. The
    # window is 1 % short of a second for the jitter of local request delivery.
    assert _max_in_window(times, 0.99) <= rate_per_s
    # Both processes owned partitions, so both called the API under the shared rate.
    assert owned[1]
    assert owned[2]


@pytest.mark.integration
async def test_transient_failures_retried_with_backoff(settings: Settings) -> None:
    async with _moderation_server() as server:
        configured = _moderated(settings, server.url)
        events = [_generated(configured, index) for index in range(4)]
        for event in events:
            server.scripts[event.attempt_id] = [503, 429]
        async with TopicReader(configured.kafka, configured.topics.coordinator_events) as out, \
                _services(Postprocessor(configured).run, RetryRouter(configured).run):
            await _publish(configured, events)
            await out.wait_for(lambda seen: len(seen) >= len(events), timeout_s=120)

    verdicts = _verdicts(out)
    assert all(verdicts[event.attempt_id].accepted for event in events)
    policy = BackoffPolicy(0.3, 5.0, 0.5)
    for event in events:
        times = server.times_of(event.attempt_id)
        assert len(times) == 3
        # Retry n waits at least base * 2^(n-1) * (1 - jitter) after the failure.
        assert times[1] - times[0] >= policy.base_s * (1 - policy.jitter)
        assert times[2] - times[1] >= 2 * policy.base_s * (1 - policy.jitter)


@pytest.mark.integration
async def test_permanent_failure_rejects_at_once(settings: Settings) -> None:
    async with _moderation_server() as server:
        configured = _moderated(settings, server.url)
        (event,) = [_generated(configured, 0)]
        server.scripts[event.attempt_id] = [400]
        async with TopicReader(configured.kafka, configured.topics.coordinator_events) as out, \
                TopicReader(configured.kafka, configured.topics.retry(1)) as delayed, \
                _services(Postprocessor(configured).run, RetryRouter(configured).run):
            await _publish(configured, [event])
            await out.wait_for(lambda seen: len(seen) >= 1, timeout_s=120)
            await delayed.poll()

    verdict = _verdicts(out)[event.attempt_id]
    assert not verdict.accepted
    assert "HTTP 400" in verdict.reason
    assert len(server.times_of(event.attempt_id)) == 1
    assert delayed.records == []


@pytest.mark.integration
async def test_exhausted_retries_dead_letter_and_continue(settings: Settings) -> None:
    async with _moderation_server() as server:
        configured = _moderated(settings, server.url, base_s=0.1, max_retries_per_attempt=2)
        broken, healthy = _generated(configured, 0), _generated(configured, 1)
        server.scripts[broken.attempt_id] = [503] * 10
        async with TopicReader(configured.kafka, configured.topics.coordinator_events) as out, \
                TopicReader(configured.kafka, configured.topics.deadletter) as letters, \
                _services(Postprocessor(configured).run, RetryRouter(configured).run):
            await _publish(configured, [broken])
            await letters.wait_for(lambda seen: len(seen) >= 1, timeout_s=120)
            await _publish(configured, [healthy])
            await out.wait_for(lambda seen: len(seen) >= 2, timeout_s=120)

    (letter,) = [decode_event(record.value, DeadLetter) for record in letters.records]
    assert letter.source_topic == configured.topics.generated
    assert letter.consumer_group == configured.postprocess.group_id
    assert letter.offset >= 0
    assert letter.partition >= 0
    assert letter.error_type == "TransientError"
    assert "HTTP 503" in letter.reason
    assert len(server.times_of(broken.attempt_id)) == 3

    verdicts = _verdicts(out)
    assert not verdicts[broken.attempt_id].accepted
    assert "after 2 retries" in verdicts[broken.attempt_id].reason
    assert verdicts[healthy.attempt_id].accepted


@pytest.mark.integration
async def test_router_dead_letters_poison_and_continues(settings: Settings) -> None:
    target = settings.topics.generated
    due_ms = str(int(time.time() * 1000)).encode()
    async with TopicReader(settings.kafka, target) as forwarded, \
            TopicReader(settings.kafka, settings.topics.deadletter) as letters, \
            _services(RetryRouter(settings).run):
        # Same key, so both records share a partition and the poison one comes first.
        await produce(settings.kafka, settings.topics.retry(1), b"poison", key=b"k",
                      headers=[(DUE_HEADER, due_ms)])
        await produce(settings.kafka, settings.topics.retry(1), b"good", key=b"k",
                      headers=[(DUE_HEADER, due_ms), (TARGET_HEADER, target.encode())])
        await forwarded.wait_for(lambda seen: len(seen) >= 1, timeout_s=60)
        await letters.wait_for(lambda seen: len(seen) >= 1, timeout_s=60)

    assert [record.value for record in forwarded.records] == [b"good"]
    (letter,) = [decode_event(record.value, DeadLetter) for record in letters.records]
    assert letter.source_topic == settings.topics.retry(1)
    assert letter.error_type == "retry_headers"
    assert TARGET_HEADER in letter.reason


@pytest.mark.integration
async def test_router_holds_records_until_due(settings: Settings) -> None:
    target = settings.topics.generated
    due_s = time.time() + 1.5
    async with TopicReader(settings.kafka, target) as forwarded, \
            _services(RetryRouter(settings).run):
        await produce(settings.kafka, settings.topics.retry(2), b"later", key=b"k",
                      headers=[(DUE_HEADER, str(int(due_s * 1000)).encode()),
                               (TARGET_HEADER, target.encode())])
        await forwarded.wait_for(lambda seen: len(seen) >= 1, timeout_s=60)

    (record,) = forwarded.records
    assert record.timestamp / 1000 >= due_s - 0.01
