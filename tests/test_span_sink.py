"""The span sink: row decoding, batching, and runs against the real broker and chDB."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from consumers import span_sink
from consumers.span_sink import SpanBatch, SpanSink, decode_span_row
from infra.clickhouse import chdb_directory, lock_holder, open_client
from schemas.errors import EventDecodeError
from schemas.events import MAX_RECORD_BYTES, DeadLetter, decode_event
from streams.config import Settings
from streams.kafka import make_producer
from streams.report import span_count, stage_latency
from streams.tracing import STAGE_ATTRIBUTE
from tests.test_clickhouse import make_span_rows, store_held_by_other_process
from tests.test_report import run_report

SINK_LOGGER = "consumers.span_sink"
WAIT_TIMEOUT_S = 60.0


def record(offset: int, value: bytes, partition: int = 0) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        topic="spans",
        partition=partition,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=b"k",
        value=value,
        checksum=None,
        serialized_key_size=1,
        serialized_value_size=len(value),
        headers=(),
    )


def span_json() -> bytes:
    return json.dumps(make_span_rows({"gpu": [1.0]})[0]).encode()


@pytest.mark.parametrize(
    ("value", "error_type"),
    [
        (None, "empty"),
        (b"", "empty"),
        (b"x" * (MAX_RECORD_BYTES + 1), "too_large"),
        (b'{"SpanName": "\xff"}', "encoding"),
        (b"not json", "json"),
        (b"[1, 2]", "not_object"),
        (b'"a string"', "not_object"),
        (
            b'{"Timestamp": 1, "TraceId": "a", "SpanId": "b", "SpanName": "s", "Duration": 1, '
            b'"SpanAttributes": []}',
            "validation",
        ),
        (b'{"SpanName": "only a name"}', "validation"),
        (
            b'{"Timestamp": 1.5, "TraceId": "a", "SpanId": "b", "SpanName": "s", "Duration": 1}',
            "validation",
        ),
    ],
)
def test_decode_span_row_rejects(value: bytes | None, error_type: str) -> None:
    with pytest.raises(EventDecodeError) as caught:
        decode_span_row(value)

    assert caught.value.error_type == error_type


def test_decode_span_row_names_field() -> None:
    row = json.loads(span_json())
    row["Duration"] = -1

    with pytest.raises(EventDecodeError, match="Duration"):
        decode_span_row(json.dumps(row).encode())


def test_decode_span_row_accepts_tracing_row() -> None:
    row = make_span_rows({"gpu": [1.0]})[0]

    decoded = decode_span_row(json.dumps(row).encode())

    assert decoded["TraceId"] == row["TraceId"]
    assert decoded["Duration"] == row["Duration"]
    assert decoded["SpanAttributes"] == {STAGE_ATTRIBUTE: "gpu"}


def test_batch_tracks_offsets_per_partition() -> None:
    batch = SpanBatch()

    batch.add(record(10, b"a"), ["row"])
    batch.add(record(11, b"b"), None)
    batch.add(record(3, b"c", partition=2), ["row"])

    assert batch.rows == [["row"], ["row"]]
    assert batch.dead_letters == 1
    assert batch.next_offsets == {TopicPartition("spans", 0): 12, TopicPartition("spans", 2): 4}
    assert batch.describe_offsets() == "spans[0] 10-11, spans[2] 3-3"


def test_batch_due_by_rows_or_age() -> None:
    batch = SpanBatch()
    assert not batch.is_due(max_rows=2, max_wait_s=60.0)

    batch.add(record(0, b"a"), ["row"])
    assert not batch.is_due(max_rows=2, max_wait_s=60.0)
    assert batch.is_due(max_rows=2, max_wait_s=0.0)

    batch.add(record(1, b"b"), ["row"])
    assert batch.is_due(max_rows=2, max_wait_s=60.0)


def test_batch_dead_letters_alone_are_due() -> None:
    batch = SpanBatch()

    batch.add(record(0, b"bad"), None)

    assert not batch.is_empty()
    assert batch.is_due(max_rows=10, max_wait_s=0.0)


def test_batch_rejects_records_after_insert() -> None:
    batch = SpanBatch()
    batch.add(record(0, b"a"), ["row"])
    batch.inserted = True

    with pytest.raises(RuntimeError, match="already inserted"):
        batch.add(record(1, b"b"), ["row"])


# --- integration: real broker, real chDB -------------------------------------------------


async def wait_until(condition: Callable[[], Awaitable[bool]], description: str) -> None:
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {WAIT_TIMEOUT_S:.0f} s waiting for {description}"
            )
        await asyncio.sleep(0.1)


async def committed_records(settings: Settings) -> int:
    """Return the sum of the sink group's committed offsets, 0 before its first commit.

    Retries while the broker is still electing the group coordinator, which it does on a
    fresh broker's first group.
    """
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    admin = AIOKafkaAdminClient(**settings.kafka.client_options())
    await admin.start()
    try:
        while True:
            try:
                offsets = await admin.list_consumer_group_offsets(settings.clickhouse.sink_group_id)
                break
            except KafkaError as err:
                if not err.retriable or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
    finally:
        await admin.close()
    return sum(metadata.offset for metadata in offsets.values() if metadata.offset >= 0)


async def produce(settings: Settings, values: list[tuple[bytes, bytes]]) -> None:
    producer = make_producer(settings.kafka)
    await producer.start()
    try:
        for key, value in values:
            await producer.send_and_wait(settings.topics.spans, value, key=key)
    finally:
        await producer.stop()


async def read_dead_letters(settings: Settings, expected: int) -> list[DeadLetter]:
    consumer = AIOKafkaConsumer(
        settings.topics.deadletter,
        **settings.kafka.client_options(),
        group_id=None,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    letters: list[DeadLetter] = []
    try:
        deadline = time.monotonic() + WAIT_TIMEOUT_S
        while len(letters) < expected and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                letters.extend(decode_event(item.value, DeadLetter) for item in records)
    finally:
        await consumer.stop()
    return letters


def span_records(rows: list[dict[str, Any]]) -> list[tuple[bytes, bytes]]:
    return [(row["TraceId"].encode(), json.dumps(row).encode()) for row in rows]


async def run_until_committed(settings: Settings, total_records: int) -> None:
    """Run the span sink until its group has committed ``total_records``, then stop it."""
    stop = asyncio.Event()
    task = asyncio.create_task(span_sink.run(settings, stop))

    async def all_committed() -> bool:
        assert not task.done(), "the span sink exited early"
        return await committed_records(settings) == total_records

    await wait_until(all_committed, "the sink to commit every record")
    stop.set()
    await asyncio.wait_for(task, WAIT_TIMEOUT_S)


@pytest.mark.integration
async def test_sink_stores_spans_and_dead_letters(settings: Settings) -> None:
    rows = make_span_rows({"gpu": [5.0, 10.0, 20.0], "dispatch": [1.0, 2.0]})
    garbage = (b"garbage-key", b"{not a span")
    await produce(settings, [*span_records(rows[:3]), garbage, *span_records(rows[3:])])
    total_records = len(rows) + 1

    await run_until_committed(settings, total_records)

    directory = chdb_directory(settings.clickhouse.dsn)
    assert directory is not None
    assert lock_holder(directory) is None

    client = open_client(settings.clickhouse)
    try:
        table = settings.clickhouse.table
        assert span_count(client, table) == len(rows)
        stages = stage_latency(client, table)
        assert stages["gpu"]["count"] == 3
        assert stages["dispatch"]["count"] == 2
        assert stages["gpu"]["p50_ms"] == pytest.approx(10.0)
        stored = client.query(
            "SELECT TraceId, SpanId, ParentSpanId, SpanName, SpanKind, ServiceName, "
            "toUnixTimestamp64Nano(Timestamp), Duration, SpanAttributes, StatusCode, "
            "StatusMessage, Events.Name, Events.Attributes, Links.SpanId "
            "FROM otel_traces WHERE SpanId = {span_id:String}",
            parameters={"span_id": rows[-1]["SpanId"]},
        ).result_rows
    finally:
        client.close()

    assert len(stored) == 1
    unstaged = rows[-1]
    (
        trace_id,
        span_id,
        parent_id,
        name,
        kind,
        service,
        timestamp,
        duration,
        attributes,
        status,
        status_message,
        event_names,
        event_attributes,
        link_span_ids,
    ) = stored[0]
    assert trace_id == unstaged["TraceId"]
    assert span_id == unstaged["SpanId"]
    assert parent_id == unstaged["ParentSpanId"]
    assert name == "unstaged"
    assert kind == "Consumer"
    assert service == "test-service"
    assert timestamp == unstaged["Timestamp"]
    assert duration == unstaged["Duration"]
    assert attributes == {"job.id": "job-1", "attempt": "3"}
    assert status == "Error"
    assert status_message == "worker lost"
    assert event_names == ["claimed"]
    assert event_attributes == [{"worker": "w1"}]
    assert link_span_ids == [unstaged["Links"][0]["SpanId"]]

    letters = await read_dead_letters(settings, expected=1)
    assert len(letters) == 1
    letter = letters[0]
    assert letter.source_topic == settings.topics.spans
    assert letter.consumer_group == settings.clickhouse.sink_group_id
    assert letter.error_type == "json"
    assert "not JSON" in letter.reason
    assert base64.b64decode(letter.payload_b64) == garbage[1]
    assert letter.key_b64 is not None
    assert base64.b64decode(letter.key_b64) == garbage[0]


@pytest.mark.integration
async def test_sink_stores_many_small_batches(settings: Settings) -> None:
    # Batches of 2 rows make the sink insert one batch while it reads the next.
    settings.clickhouse.batch_rows = 2
    settings.clickhouse.batch_wait_s = 0.2
    rows = make_span_rows({"gpu": [float(number) for number in range(1, 12)]})
    garbage = (b"garbage-key", b"[]")
    await produce(settings, [*span_records(rows[:5]), garbage, *span_records(rows[5:])])
    total_records = len(rows) + 1

    await run_until_committed(settings, total_records)

    client = open_client(settings.clickhouse)
    try:
        stored_ids = client.query("SELECT SpanId FROM otel_traces").result_rows
    finally:
        client.close()
    assert sorted(span_id for (span_id,) in stored_ids) == sorted(row["SpanId"] for row in rows)
    letters = await read_dead_letters(settings, expected=1)
    assert [letter.error_type for letter in letters] == ["not_object"]


@pytest.mark.integration
async def test_sink_stores_held_rows_on_stop(settings: Settings) -> None:
    # Neither limit is reached, so only the stop path can store these rows.
    settings.clickhouse.batch_rows = 10_000
    settings.clickhouse.batch_wait_s = 3_600.0
    rows = make_span_rows({"gpu": [1.0, 2.0, 3.0]})
    await produce(settings, span_records(rows))

    stop = asyncio.Event()
    sink = SpanSink(settings)
    task = asyncio.create_task(sink.run(stop))

    async def all_read() -> bool:
        assert not task.done(), "the span sink exited early"
        return sink.unstored_rows == len(rows)

    await wait_until(all_read, "the sink to read every record")
    assert await committed_records(settings) == 0
    stop.set()
    await asyncio.wait_for(task, WAIT_TIMEOUT_S)

    assert await committed_records(settings) == len(rows)
    client = open_client(settings.clickhouse)
    try:
        assert span_count(client, settings.clickhouse.table) == len(rows)
    finally:
        client.close()


@pytest.mark.integration
async def test_sink_keeps_spans_in_kafka_while_store_locked(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(span_sink, "INITIAL_RETRY_DELAY_S", 0.1)
    monkeypatch.setattr(span_sink, "MAX_RETRY_DELAY_S", 0.4)
    monkeypatch.setattr(span_sink, "SHUTDOWN_FLUSH_TIMEOUT_S", 0.5)
    caplog.set_level(logging.WARNING, logger=SINK_LOGGER)
    rows = make_span_rows({"gpu": [1.0, 2.0], "dispatch": [3.0]})
    await produce(settings, span_records(rows))

    def failed_attempts() -> list[logging.LogRecord]:
        return [item for item in caplog.records if item.getMessage().startswith("Failed to store")]

    with store_held_by_other_process(settings.clickhouse.dsn) as holder_pid:
        stop = asyncio.Event()
        sink = SpanSink(settings)
        task = asyncio.create_task(sink.run(stop))

        async def retried_twice() -> bool:
            assert not task.done(), "the span sink exited early"
            return len(failed_attempts()) >= 2

        await wait_until(retried_twice, "two failed insert attempts")
        assert sink.unstored_rows == len(rows)
        assert await committed_records(settings) == 0
        stop.set()
        await asyncio.wait_for(task, WAIT_TIMEOUT_S)

    assert await committed_records(settings) == 0
    warning = failed_attempts()[0].getMessage()
    assert f"locked by process {holder_pid}" in warning
    assert f"{settings.topics.spans}[" in warning
    assert settings.clickhouse.sink_group_id in warning
    assert any("Stopping with" in item.getMessage() for item in caplog.records)

    # With the store free again, a new sink finds every span still in Kafka.
    stop = asyncio.Event()
    task = asyncio.create_task(span_sink.run(settings, stop))

    async def all_committed() -> bool:
        assert not task.done(), "the span sink exited early"
        return await committed_records(settings) == len(rows)

    await wait_until(all_committed, "the restarted sink to commit every record")
    stop.set()
    await asyncio.wait_for(task, WAIT_TIMEOUT_S)

    client = open_client(settings.clickhouse)
    try:
        assert span_count(client, settings.clickhouse.table) == len(rows)
    finally:
        client.close()


@pytest.mark.integration
async def test_sink_process_owns_store_until_sigterm(
    settings: Settings, service_env: dict[str, str], tmp_path: Path
) -> None:
    rows = make_span_rows({"gpu": [2.0, 4.0]})
    await produce(settings, span_records(rows))
    log_path = tmp_path / "span-sink.log"

    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "consumers.span_sink"],
            env=service_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:

            async def all_committed() -> bool:
                assert process.poll() is None, log_path.read_text()
                return await committed_records(settings) == len(rows)

            await wait_until(all_committed, "the sink process to commit every record")
            status, out, err = run_report(settings, "json")
            assert status == 1
            assert out == ""
            assert f"locked by process {process.pid}" in err

            process.send_signal(signal.SIGTERM)
            exit_code = await asyncio.to_thread(process.wait, WAIT_TIMEOUT_S)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()

    assert exit_code == 0, log_path.read_text()
    status, out, err = run_report(settings, "json")
    assert status == 0, err
    report = json.loads(out)
    assert report["clickhouse_spans"] == len(rows)
    assert report["stages"]["gpu"]["count"] == 2
    assert report["stages"]["gpu"]["p50_ms"] == pytest.approx(3.0)
