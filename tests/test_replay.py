"""``slotforge replay`` against the real broker: ranges, filters, rate, dry run, dead letters."""

from __future__ import annotations

import argparse
import asyncio
import io
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from aiokafka import ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient

from schemas.errors import EventDecodeError
from schemas.events import GenerationParams, JobRejected, JobRequested, JobSweep, encode_event
from streams.config import Settings
from streams.kafka import (
    create_topics,
    make_consumer,
    make_producer,
    send_to_deadletter,
    topic_partitions,
)
from streams.replay import (
    RateLimiter,
    ReplayError,
    ReplayOptions,
    add_arguments,
    replay,
    replay_command,
)

# Record timestamps of the time-range test, well in the past so no other record is near.
T0 = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
TRACE_HEADER = ("traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")


@dataclass(frozen=True)
class Sent:
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()
    partition: int | None = None
    timestamp_ms: int | None = None


def job_requested(tenant: str, job_id: str) -> bytes:
    params = GenerationParams(model="tiny", prompt=f"floor plan {job_id}", steps=2)
    return encode_event(JobRequested(job_id=job_id, tenant_id=tenant, user_id="u1",
                                     params=params, slots=1))


def job_rejected(tenant: str, job_id: str) -> bytes:
    return encode_event(JobRejected(job_id=job_id, tenant_id=tenant, reason="over quota"))


def job_sweep(job_id: str) -> bytes:
    return encode_event(JobSweep(job_id=job_id, job_key=f"k-{job_id}", action="expire"))


async def publish(settings: Settings, topic: str, records: list[Sent]) -> None:
    producer = make_producer(settings.kafka)
    await producer.start()
    try:
        for item in records:
            await producer.send_and_wait(
                topic, item.value, key=item.key, headers=list(item.headers),
                partition=item.partition, timestamp_ms=item.timestamp_ms,
            )
    finally:
        await producer.stop()


async def read_all(settings: Settings, topic: str) -> list[ConsumerRecord[bytes, bytes]]:
    """Read every record of a topic up to its current end, in partition and offset order."""
    partitions = await topic_partitions(settings.kafka, topic)
    consumer = make_consumer(settings.kafka, group_id=None)
    await consumer.start()
    try:
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        records: list[ConsumerRecord[bytes, bytes]] = []
        deadline = time.monotonic() + 30
        while True:
            positions = [await consumer.position(tp) for tp in partitions]
            pairs = zip(positions, partitions, strict=True)
            if all(position >= ends[tp] for position, tp in pairs):
                break
            assert time.monotonic() < deadline, f"timed out reading {topic}"
            batches = await consumer.getmany(timeout_ms=200)
            for batch in batches.values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return sorted(records, key=lambda record: (record.partition, record.offset))


async def create_target(settings: Settings) -> str:
    name = f"{settings.kafka.topic_prefix}replayed"
    await create_topics(settings.kafka, [name])
    # A new topic is listed without partitions until its leaders are elected.
    deadline = time.monotonic() + 30
    while not await topic_partitions(settings.kafka, name):
        assert time.monotonic() < deadline, f"topic {name} has no partitions after 30 s"
        await asyncio.sleep(0.1)
    return name


@pytest.fixture
def target(settings: Settings) -> str:
    return asyncio.run(create_target(settings))


def options(settings: Settings, target: str, **overrides: object) -> ReplayOptions:
    values: dict[str, object] = {"source": settings.topics.jobs_requested, "target": target}
    values.update(overrides)
    return ReplayOptions(**values)  # type: ignore[arg-type]


def mixed_records() -> list[Sent]:
    """Six records of three event types and two tenants, plus one that is not JSON."""
    return [
        Sent(b"k1", job_requested("t1", "j1"), (TRACE_HEADER,)),
        Sent(b"k2", job_requested("t2", "j2")),
        Sent(b"k3", job_requested("t1", "j3")),
        Sent(b"k4", job_rejected("t2", "j4")),
        Sent(b"k5", job_sweep("j5")),
        Sent(b"k6", b"not json at all"),
    ]


@pytest.mark.integration
async def test_replay_offset_range(settings: Settings, target: str) -> None:
    source = settings.topics.jobs_requested
    sent = [Sent(b"same-key", f"value-{i}".encode(), (("index", str(i).encode()), TRACE_HEADER),
                 partition=0) for i in range(10)]
    await publish(settings, source, sent)

    summary = await replay(settings, options(settings, target, partitions=(0,), start_offset=3,
                                             end_offset=7))

    assert summary.scanned == 4
    assert summary.sent == 4
    copied = await read_all(settings, target)
    assert [record.value for record in copied] == [b"value-3", b"value-4", b"value-5", b"value-6"]
    assert all(record.key == b"same-key" for record in copied)
    assert [list(record.headers) for record in copied] == [
        [("index", str(i).encode()), TRACE_HEADER] for i in range(3, 7)
    ]
    assert summary.by_partition == {0: 4}


@pytest.mark.integration
async def test_replay_deeply_nested_json(settings: Settings, target: str) -> None:
    # Services dead-letter such a record as "JSON nested too deeply". Reading its event type
    # for the filters and the summary must not crash the replay.
    nested = b"[" * 100_000
    await publish(settings, settings.topics.jobs_requested, [Sent(b"deep", nested)])

    summary = await replay(settings, options(settings, target))

    assert summary.sent == 1
    assert summary.by_event_type == {"(none)": 1}
    copied = await read_all(settings, target)
    assert [record.value for record in copied] == [nested]


@pytest.mark.integration
async def test_replay_time_range(settings: Settings, target: str) -> None:
    source = settings.topics.jobs_requested
    base_ms = int(T0.timestamp() * 1_000)
    sent = [Sent(b"k", f"at-{i}".encode(), partition=1, timestamp_ms=base_ms + i * 1_000)
            for i in range(10)]
    await publish(settings, source, sent)

    summary = await replay(settings, options(settings, target, since=T0 + timedelta(seconds=3),
                                             until=T0 + timedelta(seconds=6)))

    assert summary.sent == 3
    assert [record.value for record in await read_all(settings, target)] == [
        b"at-3", b"at-4", b"at-5"
    ]


@pytest.mark.integration
async def test_replay_since_after_last_record(settings: Settings, target: str) -> None:
    await publish(settings, settings.topics.jobs_requested, mixed_records())

    summary = await replay(settings, options(settings, target,
                                             since=datetime.now(UTC) + timedelta(hours=1)))

    assert summary.scanned == 0
    assert await read_all(settings, target) == []


@pytest.mark.integration
async def test_replay_key_filter(settings: Settings, target: str) -> None:
    await publish(settings, settings.topics.jobs_requested, mixed_records())

    summary = await replay(settings, options(settings, target, keys=("k2", "k5")))

    assert summary.scanned == 6
    assert summary.sent == 2
    copied = await read_all(settings, target)
    assert sorted(record.key for record in copied) == [b"k2", b"k5"]


@pytest.mark.integration
async def test_replay_event_type_filter(settings: Settings, target: str) -> None:
    await publish(settings, settings.topics.jobs_requested, mixed_records())

    summary = await replay(settings, options(settings, target,
                                             event_types=("job.rejected", "job.sweep")))

    assert summary.sent == 2
    assert summary.by_event_type == {"job.rejected": 1, "job.sweep": 1}
    assert sorted(record.key for record in await read_all(settings, target)) == [b"k4", b"k5"]


@pytest.mark.integration
async def test_replay_tenant_filter(settings: Settings, target: str) -> None:
    await publish(settings, settings.topics.jobs_requested, mixed_records())

    summary = await replay(settings, options(settings, target, tenants=("t1",)))

    assert summary.sent == 2
    copied = await read_all(settings, target)
    assert sorted(record.key for record in copied) == [b"k1", b"k3"]
    header_by_key = {record.key: list(record.headers) for record in copied}
    assert header_by_key[b"k1"] == [TRACE_HEADER]


@pytest.mark.integration
async def test_replay_rate_limit(settings: Settings, target: str) -> None:
    await publish(settings, settings.topics.jobs_requested,
                  [Sent(f"k{i}".encode(), job_sweep(f"j{i}")) for i in range(20)])

    started = time.monotonic()
    summary = await replay(settings, options(settings, target, rate=10.0))
    elapsed = time.monotonic() - started

    assert summary.sent == 20
    # The 20th record may leave 19 / 10 s after the first.
    assert elapsed >= 1.5
    assert len(await read_all(settings, target)) == 20


@pytest.mark.integration
async def test_replay_dry_run_sends_nothing(settings: Settings, target: str) -> None:
    await publish(settings, settings.topics.jobs_requested, mixed_records())

    summary = await replay(settings, options(settings, target, dry_run=True, tenants=("t2",)))

    assert summary.matched == 2
    assert summary.sent == 0
    assert summary.by_event_type == {"job.requested": 1, "job.rejected": 1}
    assert "Would send 2 of 6 records" in summary.format()
    assert await read_all(settings, target) == []


async def dead_letter_original(settings: Settings, original: Sent) -> None:
    """Publish ``original`` to jobs.requested, then dead-letter it as a consumer would."""
    source = settings.topics.jobs_requested
    await publish(settings, source, [original])
    record = (await read_all(settings, source))[0]
    producer = make_producer(settings.kafka)
    await producer.start()
    try:
        error = EventDecodeError("prompt failed a filter", error_type="validation")
        await send_to_deadletter(producer, settings.topics.deadletter, record, "test-group", error)
    finally:
        await producer.stop()


@pytest.mark.integration
async def test_replay_deadletter_restores_original(settings: Settings) -> None:
    original = Sent(b"job-key", job_requested("t1", "j-dead"), (TRACE_HEADER,), partition=2)
    await dead_letter_original(settings, original)

    summary = await replay(settings, ReplayOptions(from_deadletter=True))

    assert summary.source == settings.topics.deadletter
    assert summary.sent == 1
    assert summary.by_target == {settings.topics.jobs_requested: 1}
    records = await read_all(settings, settings.topics.jobs_requested)
    assert len(records) == 2
    replayed = [record for record in records if (record.partition, record.offset) != (2, 0)]
    assert len(replayed) == 1
    assert replayed[0].value == original.value
    assert replayed[0].key == original.key
    assert list(replayed[0].headers) == [TRACE_HEADER]


@pytest.mark.integration
async def test_replay_deadletter_to_other_topic(settings: Settings, target: str) -> None:
    original = Sent(b"job-key", job_requested("t2", "j-dead"))
    await dead_letter_original(settings, original)
    await publish(settings, settings.topics.deadletter, [Sent(b"x", b"not a dead letter")])

    summary = await replay(settings, ReplayOptions(from_deadletter=True, target=target,
                                                   event_types=("job.requested",)))

    assert summary.sent == 1
    assert summary.undecodable == 1
    copied = await read_all(settings, target)
    assert [(record.key, record.value) for record in copied] == [(original.key, original.value)]


@pytest.mark.integration
async def test_replay_missing_topic(settings: Settings, target: str) -> None:
    with pytest.raises(ReplayError, match="topic 'no.such.topic' or '.*no.such.topic' not found"):
        await replay(settings, options(settings, target, source="no.such.topic"))


@pytest.mark.integration
async def test_replay_missing_topic_not_created(settings: Settings, target: str) -> None:
    # The short name is looked up before the prefixed one. Neither lookup may create a
    # topic, because a second replay would then read the empty topic it created.
    name = f"missing.{uuid.uuid4().hex[:8]}"
    for _ in range(2):
        with pytest.raises(ReplayError, match="not found"):
            await replay(settings, options(settings, target, source=name))

    admin = AIOKafkaAdminClient(**settings.kafka.client_options())
    await admin.start()
    try:
        topics = set(await admin.list_topics())
    finally:
        await admin.close()
    assert name not in topics
    assert f"{settings.kafka.topic_prefix}{name}" not in topics
    assert await topic_partitions(settings.kafka, name) == []


@pytest.mark.integration
async def test_replay_missing_partition(settings: Settings, target: str) -> None:
    with pytest.raises(ReplayError, match="has no partition 7"):
        await replay(settings, options(settings, target, partitions=(7,)))


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="slotforge replay")
    add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.integration
async def test_replay_command_summary(settings: Settings, target: str) -> None:
    await publish(settings, settings.topics.jobs_requested, mixed_records())
    out, err = io.StringIO(), io.StringIO()
    # A name under the configured prefix is enough, as a person would type it.
    args = parse(["--topic", "jobs.requested", "--to", target, "--event-type", "job.requested"])

    status = await asyncio.to_thread(replay_command, settings, args, out=out, err=err)

    assert status == 0, err.getvalue()
    text = out.getvalue()
    assert f"Sent 3 of 6 records read from {settings.topics.jobs_requested}" in text
    assert "By event type:\n  job.requested  3" in text
    assert f"By target topic:\n  {target}  3" in text
    # The progress bar went to stderr and ended at the number of offsets read.
    assert "6/6" in err.getvalue()


def test_replay_command_requires_target() -> None:
    err = io.StringIO()

    status = replay_command(Settings(), parse(["--topic", "jobs.requested"]), err=err)

    assert status == 2
    assert "a target topic is required" in err.getvalue()


def test_options_reject_empty_offset_range() -> None:
    with pytest.raises(ReplayError, match="must be below --end-offset"):
        ReplayOptions(source="a", target="b", start_offset=5, end_offset=5)


def test_options_reject_zero_rate() -> None:
    with pytest.raises(ReplayError, match="--rate must be above 0"):
        ReplayOptions(source="a", target="b", rate=0)


def test_options_reject_reversed_times() -> None:
    with pytest.raises(ReplayError, match="must be before --until"):
        ReplayOptions(source="a", target="b", since=T0, until=T0)


def test_parse_rejects_bad_time() -> None:
    with pytest.raises(SystemExit):
        parse(["--topic", "a", "--to", "b", "--since", "yesterday"])


async def test_rate_limiter_spacing() -> None:
    limiter = RateLimiter(50.0)
    started = time.monotonic()

    for _ in range(11):
        await limiter.wait()

    assert time.monotonic() - started >= 0.2 * 0.95
