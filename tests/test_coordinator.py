"""The coordinator process on the real broker, driven through its topics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from schemas.events import (
    AttemptDispatched,
    AttemptFinished,
    AttemptStatus,
    GenerationParams,
    JobRequested,
    JobStatus,
    ResultScored,
    decode_event,
    encode_event,
)
from streams.client import JobRejectedError, SlotforgeClient
from streams.config import Settings
from streams.processes import ProcessGroup
from tests.kafka_helpers import TopicReader, produce

pytestmark = pytest.mark.integration


def _request(slots: int = 2) -> JobRequested:
    return JobRequested(
        tenant_id="acme", user_id="u1",
        params=GenerationParams(model="M0001", prompt="two bedroom floor plan", steps=10),
        slots=slots,
    )


async def _report(settings: Settings, attempt: AttemptDispatched, accepted: bool,
                  score: float) -> None:
    """Play the worker and post-processing for one attempt."""
    uri = f"file:///tmp/{attempt.attempt_id}.png"
    finished = AttemptFinished(
        attempt_id=attempt.attempt_id, job_id=attempt.job_id, job_key=attempt.job_key,
        worker_id="test-worker", status=AttemptStatus.SUCCEEDED, slot=attempt.slot,
        artifact_uri=uri, gpu_s=0.01,
    )
    scored = ResultScored(
        attempt_id=attempt.attempt_id, job_id=attempt.job_id, job_key=attempt.job_key,
        slot=attempt.slot, artifact_uri=uri, score=score, accepted=accepted, reason="test",
    )
    for event in (finished, scored):
        await produce(settings.kafka, settings.topics.coordinator_events, encode_event(event),
                      key=attempt.job_key.encode())


def _attempts(records) -> list[AttemptDispatched]:
    return [decode_event(record.value, AttemptDispatched) for record in records]


@pytest.fixture
def coordinator(settings: Settings, service_env: dict[str, str], tmp_path: Path):
    # These tests play the worker themselves, so one attempt per slot keeps them exact.
    group = ProcessGroup(tmp_path / "logs", {
        **service_env, "SLOTFORGE_COORDINATOR__RACING_POLICY": "sequential"})
    group.start("coordinator")
    yield group
    group.stop_all()


async def test_job_fills_slots_and_retries_rejection(settings: Settings, coordinator) -> None:
    from schemas.events import Tier

    request = _request(slots=2)
    async with SlotforgeClient(settings.kafka) as client, \
            TopicReader(settings.kafka, settings.topics.attempts(Tier.STANDARD),
                        settings.topics.followups(Tier.STANDARD)) as attempts:
        await client.submit(request)
        records = await attempts.wait_for(lambda seen: len(seen) >= 2, timeout_s=90)
        first, second = _attempts(records)
        assert first.job_id == second.job_id == request.job_id
        assert first.attempt_id != second.attempt_id
        assert not first.followup
        assert {record.topic for record in records} == {settings.topics.attempts(Tier.STANDARD)}

        await _report(settings, first, accepted=True, score=0.9)
        await _report(settings, second, accepted=False, score=0.2)
        records = await attempts.wait_for(lambda seen: len(seen) >= 3)
        retry = _attempts(records)[2]
        # A retry of a started job waits in the follow-up topic, which workers take first.
        assert retry.followup
        assert records[2].topic == settings.topics.followups(Tier.STANDARD)
        assert retry.attempt_id not in (first.attempt_id, second.attempt_id)
        assert retry.seed not in (first.seed, second.seed)

        await _report(settings, retry, accepted=True, score=0.8)
        completed = await client.wait(request.job_id, timeout_s=60)

    assert completed.status == JobStatus.COMPLETED
    assert sorted(slot.attempt_id for slot in completed.slots) == sorted(
        [first.attempt_id, retry.attempt_id])
    assert completed.attempts == 3


async def test_invalid_request_rejected_to_client(settings: Settings, coordinator) -> None:
    request = _request()
    raw = json.loads(encode_event(request))
    raw["slots"] = 10_000
    async with SlotforgeClient(settings.kafka) as client:
        client._waiters[request.job_id] = __import__("asyncio").get_running_loop().create_future()
        await produce(settings.kafka, settings.topics.jobs_requested,
                      json.dumps(raw).encode(), key=b"k")
        with pytest.raises(JobRejectedError) as caught:
            await client.wait(request.job_id, timeout_s=90)
    assert "slots" in caught.value.reason


async def test_garbage_goes_to_deadletter_and_next_job_runs(
    settings: Settings, coordinator
) -> None:
    from schemas.events import DeadLetter, Tier

    await produce(settings.kafka, settings.topics.jobs_requested, b"\x00not json", key=b"k")
    request = _request(slots=1)
    async with SlotforgeClient(settings.kafka) as client, \
            TopicReader(settings.kafka, settings.topics.deadletter) as letters, \
            TopicReader(settings.kafka, settings.topics.attempts(Tier.STANDARD)) as attempts:
        await client.submit(request)
        records = await letters.wait_for(lambda seen: len(seen) >= 1, timeout_s=90)
        letter = decode_event(records[0].value, DeadLetter)
        assert letter.error_type == "json"
        assert letter.source_topic == settings.topics.jobs_requested
        await attempts.wait_for(lambda seen: len(seen) >= 1)


async def test_restarted_coordinator_resumes_job(
    settings: Settings, coordinator: ProcessGroup
) -> None:
    from schemas.events import Tier

    request = _request(slots=2)
    async with SlotforgeClient(settings.kafka) as client, \
            TopicReader(settings.kafka, settings.topics.attempts(Tier.STANDARD)) as attempts:
        await client.submit(request)
        records = await attempts.wait_for(lambda seen: len(seen) >= 2, timeout_s=90)
        first, second = _attempts(records)
        await _report(settings, first, accepted=True, score=0.9)

        # Kill the coordinator mid-job; its table must come back from the changelog.
        coordinator.kill(coordinator.processes[0])
        coordinator.start("coordinator", name="coordinator-2")
        await _report(settings, second, accepted=True, score=0.7)
        # The new coordinator joins once the killed one's session times out, then reads the
        # changelog. NOTE: one full CI run waited here past 120 s, for a reason not yet found.
        completed = await client.wait(request.job_id, timeout_s=240)

    assert completed.status == JobStatus.COMPLETED
    assert len(completed.slots) == 2


async def test_misrouted_request_rerouted(settings: Settings, coordinator) -> None:
    from aiokafka.partitioner import DefaultPartitioner

    from schemas.events import Tier

    request = _request(slots=1)
    partitions = list(range(settings.kafka.partitions))
    owner = DefaultPartitioner()(request.job_key.encode(), partitions, partitions)
    wrong = (owner + 1) % len(partitions)
    changelog = f"{settings.kafka.topic_prefix}{settings.coordinator.app_id}-flights-changelog"
    async with SlotforgeClient(settings.kafka) as client, \
            TopicReader(settings.kafka, settings.topics.attempts(Tier.STANDARD)) as attempts:
        client._waiters[request.job_id] = __import__("asyncio").get_running_loop().create_future()
        await produce(settings.kafka, settings.topics.jobs_requested, encode_event(request),
                      key=b"not-the-cache-key", partition=wrong)
        records = await attempts.wait_for(lambda seen: len(seen) >= 1, timeout_s=90)
        await _report(settings, _attempts(records)[0], accepted=True, score=0.9)
        completed = await client.wait(request.job_id, timeout_s=60)

    assert completed.status == JobStatus.COMPLETED
    async with TopicReader(settings.kafka, changelog) as table, \
            TopicReader(settings.kafka, settings.topics.jobs_requested) as requests:
        writes = await table.wait_for(lambda seen: len(seen) >= 1, timeout_s=30)
        sent = await requests.wait_for(lambda seen: len(seen) >= 2, timeout_s=30)
    # Every table write of the flight went to the partition its events use. Faust writes
    # the changelog's keys as JSON.
    assert {record.partition for record in writes
            if record.key == json.dumps(request.job_key).encode()} == {owner}
    assert {(record.partition, record.key) for record in sent} == {
        (wrong, b"not-the-cache-key"), (owner, request.job_key.encode())}


async def test_repeated_request_gets_outcome(settings: Settings, coordinator) -> None:
    from schemas.events import Tier

    request = _request(slots=1)
    async with SlotforgeClient(settings.kafka) as client, \
            TopicReader(settings.kafka, settings.topics.attempts(Tier.STANDARD)) as attempts:
        await client.submit(request)
        records = await attempts.wait_for(lambda seen: len(seen) >= 1, timeout_s=90)
        await _report(settings, _attempts(records)[0], accepted=True, score=0.9)
        first = await client.wait(request.job_id, timeout_s=60)

        again = await client.run(request, timeout_s=60)
        dispatched = await attempts.poll()

    envelope = {"event_id", "emitted_at"}
    assert again.model_dump(exclude=envelope) == first.model_dump(exclude=envelope)
    assert len(records) + len(dispatched) == 1


async def test_span_publisher_stopped_while_starting(settings: Settings) -> None:
    # A stop can reach the coordinator while its span producer is still connecting. The
    # spans ended before the stop must reach the topic all the same.
    import asyncio

    from streams.coordinator import Coordinator

    coordinator = Coordinator(settings)
    with coordinator.tracing.tracer.start_as_current_span("before-stop"):
        pass
    publisher = asyncio.create_task(coordinator._span_publisher())
    await asyncio.sleep(0)
    publisher.cancel()
    with pytest.raises(asyncio.CancelledError):
        await publisher

    async with TopicReader(settings.kafka, settings.topics.spans) as spans:
        seen = await spans.wait_for(lambda records: len(records) >= 1, timeout_s=30)
    assert [json.loads(record.value)["SpanName"] for record in seen] == ["before-stop"]


async def test_stopped_coordinator_removes_data_folder(settings: Settings,
                                                       service_env: dict[str, str],
                                                       tmp_path: Path) -> None:
    from schemas.events import Tier

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    # Python warns when it removes a temporary folder at exit that nothing removed before.
    group = ProcessGroup(tmp_path / "logs", {**service_env, "TMPDIR": str(scratch),
                                             "PYTHONWARNINGS": "default::ResourceWarning"})
    group.start("coordinator")
    try:
        async with SlotforgeClient(settings.kafka) as client, \
                TopicReader(settings.kafka, settings.topics.attempts(Tier.STANDARD)) as attempts:
            await client.submit(_request(slots=1))
            await attempts.wait_for(lambda seen: len(seen) >= 1, timeout_s=120)
        assert list(scratch.glob("slotforge-coordinator-*")) != []
        assert group.stop(group.processes[0]) == 0
    finally:
        group.stop_all()

    assert list(scratch.glob("slotforge-coordinator-*")) == []
    log = (tmp_path / "logs" / "coordinator.log").read_text()
    assert "Implicitly cleaning up" not in log
