"""The delivery consumer writes each job's manifest once and acknowledges every job."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from consumers.delivery import JobIdConflictError, write_manifest
from schemas.events import (
    DeliveryAck,
    JobCompleted,
    JobStatus,
    SlotResult,
    Tier,
    decode_event,
    encode_event,
)
from streams.config import Settings
from streams.kafka import make_producer
from streams.processes import ProcessGroup
from tests.kafka_helpers import TopicReader


def _completed(tenant_id: str, job_key: str, job_id: str = "shared-id") -> JobCompleted:
    return JobCompleted(
        job_id=job_id, job_key=job_key, tenant_id=tenant_id, user_id="u1",
        status=JobStatus.COMPLETED, requested_slots=1,
        slots=[SlotResult(slot=0, attempt_id=f"{job_id}-1", artifact_uri="file:///a.png",
                          score=0.9)],
        attempts=1, tier=Tier.STANDARD, requested_at=datetime.now(UTC),
    )


def test_manifest_redelivery_is_skipped(tmp_path: Path) -> None:
    completed = _completed("acme", "acme:k1")

    assert write_manifest(tmp_path, completed) is True
    assert write_manifest(tmp_path, completed) is False

    manifest = json.loads((tmp_path / "shared-id.json").read_text())
    assert manifest["tenant_id"] == "acme"
    assert manifest["job_key"] == "acme:k1"


@pytest.mark.parametrize(("tenant_id", "job_key"), [("globex", "globex:k1"),
                                                    ("acme", "acme:k2")])
def test_manifest_of_other_job_conflicts(tmp_path: Path, tenant_id: str, job_key: str) -> None:
    write_manifest(tmp_path, _completed("acme", "acme:k1"))

    with pytest.raises(JobIdConflictError) as caught:
        write_manifest(tmp_path, _completed(tenant_id, job_key))

    assert "already delivered for tenant acme, key acme:k1" in str(caught.value)
    assert json.loads((tmp_path / "shared-id.json").read_text())["job_key"] == "acme:k1"


@pytest.mark.integration
async def test_delivery_acks_undeliverable_job_as_failed(
        settings: Settings, service_env: dict[str, str], tmp_path: Path) -> None:
    outcomes = [_completed("acme", "acme:k1"), _completed("globex", "globex:k1"),
                _completed("acme", "acme:k3", job_id="../escape")]
    processes = ProcessGroup(tmp_path / "logs", service_env)
    processes.start("delivery")
    producer = make_producer(settings.kafka)
    await producer.start()
    try:
        for completed in outcomes:
            await producer.send_and_wait(settings.topics.jobs_completed,
                                         encode_event(completed),
                                         key=completed.job_key.encode())
        async with TopicReader(settings.kafka, settings.topics.coordinator_events) as reader:
            records = await reader.wait_for(lambda seen: len(seen) >= len(outcomes), 90.0)
    finally:
        await producer.stop()
        processes.stop_all()

    acks = {ack.job_key: ack for ack in
            (decode_event(record.value, DeliveryAck) for record in records)}
    assert acks["acme:k1"].delivered
    assert not acks["globex:k1"].delivered
    assert "already delivered for tenant acme" in acks["globex:k1"].reason
    assert not acks["acme:k3"].delivered
    assert "invalid job id" in acks["acme:k3"].reason
