"""SlotforgeClient resolves a job only with an outcome of the job it submitted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from aiokafka import AIOKafkaProducer

from schemas.events import (
    GenerationParams,
    JobCompleted,
    JobRejected,
    JobRequested,
    JobStatus,
    encode_event,
)
from streams.client import JobRejectedError, SlotforgeClient
from streams.config import Settings
from streams.kafka import make_producer

WAIT_S = 30.0


def _request(tenant_id: str) -> JobRequested:
    return JobRequested(job_id="shared-id", tenant_id=tenant_id, user_id="u1",
                        params=GenerationParams(model="M0001", prompt="a plan", steps=4),
                        slots=1)


def _completed(request: JobRequested, tenant_id: str, job_key: str) -> JobCompleted:
    return JobCompleted(job_id=request.job_id, job_key=job_key, tenant_id=tenant_id,
                        user_id=request.user_id, status=JobStatus.COMPLETED,
                        requested_slots=1, slots=[], attempts=1, tier=request.tier,
                        requested_at=request.requested_at)


@asynccontextmanager
async def _client_and_producer(
        settings: Settings) -> AsyncIterator[tuple[SlotforgeClient, AIOKafkaProducer]]:
    """Open a client and a producer that plays the coordinator's outcome topics."""
    producer = make_producer(settings.kafka)
    await producer.start()
    try:
        async with SlotforgeClient(settings.kafka) as client:
            yield client, producer
    finally:
        await producer.stop()


@pytest.mark.integration
async def test_client_ignores_other_tenants_outcome(settings: Settings) -> None:
    mine = _request("acme")
    other = _request("globex")
    async with _client_and_producer(settings) as (client, producer):
        await client.submit(mine)

        # Another tenant's job with the same id ends first, then this client's job.
        for outcome in (
            JobRejected(job_id=other.job_id, tenant_id=other.tenant_id, reason="quota"),
            _completed(other, other.tenant_id, other.job_key),
            _completed(mine, mine.tenant_id, "acme:another-key"),
            _completed(mine, mine.tenant_id, mine.job_key),
        ):
            topic = (settings.topics.jobs_rejected if isinstance(outcome, JobRejected)
                     else settings.topics.jobs_completed)
            await producer.send_and_wait(topic, encode_event(outcome), key=b"shared-id")
            await asyncio.sleep(0.2)

        completed = await client.wait(mine.job_id, timeout_s=WAIT_S)

    assert completed.tenant_id == "acme"
    assert completed.job_key == mine.job_key


@pytest.mark.integration
async def test_client_raises_own_rejection(settings: Settings) -> None:
    mine = _request("acme")
    async with _client_and_producer(settings) as (client, producer):
        await client.submit(mine)
        rejection = JobRejected(job_id=mine.job_id, tenant_id="acme", reason="overloaded",
                                retry_after_s=2.0)
        await producer.send_and_wait(settings.topics.jobs_rejected, encode_event(rejection),
                                     key=b"shared-id")

        with pytest.raises(JobRejectedError) as caught:
            await client.wait(mine.job_id, timeout_s=WAIT_S)

    assert caught.value.reason == "overloaded"
    assert caught.value.retry_after_s == 2.0
