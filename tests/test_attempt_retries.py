"""GPU attempt failures end to end: the coordinator retries transient ones through delay
topics with backoff and fails a job at once on a permanent one. Real broker, coordinator
process, and in-process worker, post-processing and retry router."""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from gpu_inference.generation import GenerationRequest, GenerationResult, StepCallback
from gpu_inference.postprocess import Postprocessor
from gpu_inference.simulated import SimulatedRunner
from gpu_inference.worker import GpuWorker
from schemas.errors import PermanentError, TransientError
from schemas.events import (
    AttemptFinished,
    AttemptStarted,
    AttemptStatus,
    GenerationParams,
    JobRequested,
    JobStatus,
    decode_event,
)
from streams.client import SlotforgeClient
from streams.config import Settings, SimulationSettings
from streams.processes import ProcessGroup
from streams.retry import RetryRouter
from tests.kafka_helpers import TopicReader

pytestmark = pytest.mark.integration

BASE_S = 0.4
JITTER = 0.5


class ScriptedRunner(SimulatedRunner):
    """The simulated GPU, failing by prompt: ``flaky`` twice with out-of-memory, ``invalid``
    always with a permanent error, ``broken`` always with out-of-memory."""

    def __init__(self, settings: SimulationSettings) -> None:
        super().__init__(settings)
        self.calls: dict[str, int] = defaultdict(int)
        self._calls_lock = threading.Lock()

    def generate(self, request: GenerationRequest, *, on_step: StepCallback | None = None,
                 cancel: threading.Event | None = None) -> GenerationResult:
        with self._calls_lock:
            self.calls[request.prompt] += 1
            call = self.calls[request.prompt]
        if request.prompt == "invalid":
            raise PermanentError("LoRA adapter 'missing' is not installed")
        if request.prompt == "broken" or (request.prompt == "flaky" and call <= 2):
            raise TransientError("CUDA out of memory")
        return super().generate(request, on_step=on_step, cancel=cancel)


def _job(prompt: str) -> JobRequested:
    return JobRequested(tenant_id="acme", user_id="u", slots=1, deadline_s=120,
                        params=GenerationParams(model="M1", prompt=prompt, steps=2))


@asynccontextmanager
async def _pipeline(settings: Settings, service_env: dict[str, str], tmp_path: Path
                    ) -> AsyncIterator[ScriptedRunner]:
    configured = settings.model_copy(update={
        "worker": settings.worker.model_copy(update={"simulation": SimulationSettings(
            enabled=True, p50_s=0.05, sigma=0.0, acceptance=1.0)}),
        "retry": settings.retry.model_copy(update={
            "base_s": BASE_S, "jitter": JITTER, "max_retries_per_attempt": 3,
            "max_retries_per_job": 5}),
    })
    group = ProcessGroup(tmp_path / "logs", {
        **service_env,
        "SLOTFORGE_COORDINATOR__RACING_POLICY": "sequential",
        "SLOTFORGE_RETRY__BASE_S": str(BASE_S),
        "SLOTFORGE_RETRY__JITTER": str(JITTER),
        "SLOTFORGE_RETRY__MAX_RETRIES_PER_ATTEMPT": "3",
        "SLOTFORGE_RETRY__MAX_RETRIES_PER_JOB": "5",
    })
    group.start("coordinator")
    runner = ScriptedRunner(configured.worker.simulation)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(service.run(stop)) for service in (
        GpuWorker(configured, runner=runner), Postprocessor(configured),
        RetryRouter(configured))]
    try:
        yield runner
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=90)
        await asyncio.to_thread(group.stop_all, 15)


def _attempt_events(reader: TopicReader, job_id: str
                    ) -> tuple[list[AttemptStarted], list[AttemptFinished]]:
    started, finished = [], []
    for record in reader.records:
        value = record.value or b""
        if b'"attempt.started"' in value:
            event = decode_event(value, AttemptStarted)
            if event.job_id == job_id:
                started.append(event)
        elif b'"attempt.finished"' in value:
            finished_event = decode_event(value, AttemptFinished)
            if finished_event.job_id == job_id:
                finished.append(finished_event)
    return started, finished


async def test_transient_and_permanent_failures(settings: Settings, service_env: dict[str, str],
                                                tmp_path: Path) -> None:
    flaky, invalid, broken = _job("flaky"), _job("invalid"), _job("broken")
    async with TopicReader(settings.kafka, settings.topics.coordinator_events) as events, \
            _pipeline(settings, service_env, tmp_path) as runner, \
            SlotforgeClient(settings.kafka) as client:
        for job in (flaky, invalid, broken):
            await client.submit(job)
        outcomes = await asyncio.gather(*(client.wait(job.job_id, timeout_s=180)
                                          for job in (flaky, invalid, broken)))
        await events.wait_for(lambda seen: len(_attempt_events(events, flaky.job_id)[1]) >= 3,
                              timeout_s=30)
    recovered, failed_fast, exhausted = outcomes

    # Two out-of-memory failures, then success: one attempt, retried under new epochs.
    assert recovered.status is JobStatus.COMPLETED
    assert recovered.attempts == 1
    started, finished = _attempt_events(events, flaky.job_id)
    finished.sort(key=lambda event: event.epoch)
    assert [(event.epoch, event.status) for event in finished] == [
        (1, AttemptStatus.FAILED), (2, AttemptStatus.FAILED), (3, AttemptStatus.SUCCEEDED)]
    assert all(event.retriable for event in finished[:2])
    start_of = {event.epoch: event.started_at for event in started}
    # The n-th retry starts no sooner than base * 2^(n-1) * (1 - jitter) after the failure.
    for retry_no, failure in enumerate(finished[:2], start=1):
        waited_s = (start_of[failure.epoch + 1] - failure.emitted_at).total_seconds()
        assert waited_s >= BASE_S * 2 ** (retry_no - 1) * (1 - JITTER)

    # A permanent error fails the job at once: one run, no retry, the reason kept.
    assert failed_fast.status is JobStatus.FAILED
    assert failed_fast.reason is not None
    assert "permanent failure" in failed_fast.reason
    assert "LoRA adapter" in failed_fast.reason
    assert runner.calls["invalid"] == 1

    # Endless transient failures stop at the per-job retry limit with the last error.
    assert exhausted.status is JobStatus.FAILED
    assert exhausted.reason is not None
    assert "retry limit of 5 per job" in exhausted.reason
    assert "CUDA out of memory" in exhausted.reason
    # Per attempt: 1 run + 3 retries; the second attempt gets the 2 retries left to the job.
    assert runner.calls["broken"] == 4 + 3
