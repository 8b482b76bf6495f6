"""Span sink: consume span rows from the spans topic and insert them into ClickHouse in batches.

Offsets are committed only after the batch they cover is in ClickHouse, so a crash or a
ClickHouse outage loses no span: the rows wait in Kafka and are read again. Delivery is
at least once, so a crash or rebalance between an insert and its commit stores those spans
twice. Records that are not valid span rows go to the dead-letter topic with the reason.

Run it with ``python -m consumers.span_sink``. With the default embedded chDB store this
process owns the data directory while it runs.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiokafka import ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import Error as ClickHouseClientError
from pydantic import ValidationError

from infra.clickhouse import (
    SPAN_ROW_ADAPTER,
    ClickHouseStoreError,
    SpanRowFields,
    ensure_schema,
    insert_spans,
    open_client,
    preload_insert_modules,
    redact_dsn,
    span_column_values,
)
from schemas.errors import ConfigurationError, EventDecodeError
from schemas.events import MAX_RECORD_BYTES
from streams.config import ClickHouseSettings, Settings, load_settings
from streams.kafka import make_consumer, make_producer, send_to_deadletter, stop_consumer
from streams.metrics import lag_routine
from streams.service import serve

logger = logging.getLogger(__name__)

INITIAL_RETRY_DELAY_S = 0.5
MAX_RETRY_DELAY_S = 30.0
# Maximum wait of one fetch, which bounds how long the sink takes to notice ``stop``.
POLL_TIMEOUT_S = 0.5
# On stop, how long to keep retrying the last batch before leaving it in Kafka.
SHUTDOWN_FLUSH_TIMEOUT_S = 15.0
# Allocations between first-generation collections while the sink runs (Python's default: 700).
GC_FIRST_THRESHOLD = 50_000

_T = TypeVar("_T")


def _summarize(error: ValidationError) -> str:
    parts = []
    for item in error.errors()[:5]:
        location = ".".join(str(part) for part in item["loc"]) or "<root>"
        parts.append(f"{location}: {item['msg']}")
    more = error.error_count() - len(parts)
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


def decode_span_row(data: bytes | None) -> SpanRowFields:
    """Decode and validate one record value written by ``streams.tracing.span_to_row``.

    The rules are those of ``infra.clickhouse.SpanRow``, but the row comes back as a dict.

    Raises:
        EventDecodeError: with ``error_type`` one of ``empty``, ``too_large``, ``encoding``,
            ``json``, ``not_object`` or ``validation``.
    """
    if not data:
        raise EventDecodeError("span record value is empty", error_type="empty")
    if len(data) > MAX_RECORD_BYTES:
        raise EventDecodeError(
            f"span record value is {len(data)} bytes, over the {MAX_RECORD_BYTES}-byte limit",
            error_type="too_large",
        )

    try:
        return SPAN_ROW_ADAPTER.validate_json(data)
    except ValidationError as err:
        error_types = {item["type"] for item in err.errors()}
        if "json_invalid" in error_types:
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as decode_error:
                raise EventDecodeError(
                    f"span record value is not UTF-8: {decode_error}", error_type="encoding"
                ) from err
            raise EventDecodeError(
                f"span record value is not JSON: {_summarize(err)}", error_type="json"
            ) from err
        # A dict_type error without a location is about the row itself, not one of its fields.
        if any(item["type"] == "dict_type" and not item["loc"] for item in err.errors()):
            raise EventDecodeError(
                "span record value is not a JSON object", error_type="not_object"
            ) from err
        raise EventDecodeError(
            f"invalid span row: {_summarize(err)}", error_type="validation"
        ) from err


@dataclass
class SpanBatch:
    """Rows waiting for one insert, with the offsets that commit once they are stored.

    Offsets cover every record read, dead-lettered ones included.
    """

    rows: list[list[Any]] = field(default_factory=list)
    first_offsets: dict[TopicPartition, int] = field(default_factory=dict)
    next_offsets: dict[TopicPartition, int] = field(default_factory=dict)
    dead_letters: int = 0
    # time.monotonic() when the first record of the batch was read.
    started_at: float | None = None
    inserted: bool = False

    def add(self, record: ConsumerRecord[bytes, bytes], values: list[Any] | None) -> None:
        """Add a record's row, or only its offset when ``values`` is None (dead-lettered)."""
        self.add_at(TopicPartition(record.topic, record.partition), record.offset, values)

    def add_at(self, partition: TopicPartition, offset: int, values: list[Any] | None) -> None:
        """Add the row read at ``offset`` of ``partition``, or only the offset when it is None."""
        if self.inserted:
            raise RuntimeError("cannot add records to a batch that is already inserted")
        if self.started_at is None:
            self.started_at = time.monotonic()
        self.first_offsets.setdefault(partition, offset)
        self.next_offsets[partition] = offset + 1
        if values is None:
            self.dead_letters += 1
        else:
            self.rows.append(values)

    def is_empty(self) -> bool:
        return not self.next_offsets

    def is_due(self, max_rows: int, max_wait_s: float) -> bool:
        if self.is_empty():
            return False
        if len(self.rows) >= max_rows:
            return True
        assert self.started_at is not None
        return time.monotonic() - self.started_at >= max_wait_s

    def describe_offsets(self) -> str:
        """Return the offset ranges as ``topic[partition] first-last``, for logs."""
        ranges = [
            f"{partition.topic}[{partition.partition}] "
            f"{self.first_offsets[partition]}-{next_offset - 1}"
            for partition, next_offset in sorted(self.next_offsets.items())
        ]
        return ", ".join(ranges) or "no offsets"


class ClickHouseWriter:
    """ClickHouse client confined to one worker thread, because chDB is not for concurrent use.

    The client opens on first use and reopens after a failed insert, so one writer
    survives a ClickHouse restart. Every error it raises is a ClickHouseStoreError.
    """

    def __init__(self, settings: ClickHouseSettings) -> None:
        self._settings = settings
        self._client: Client | None = None
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="span-sink-clickhouse"
        )

    async def open(self) -> None:
        """Open the client and create the span table when it is missing."""
        await self._call(self._connect)

    async def insert(self, rows: Sequence[Sequence[Any]]) -> None:
        await self._call(self._insert, rows)

    async def close(self) -> None:
        """Close the client, which releases a chDB data directory for other processes."""
        await self._call(self._disconnect)
        self._executor.shutdown(wait=True)

    async def _call(self, function: Callable[..., _T], *args: Any) -> _T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, function, *args)

    def _connect(self) -> Client:
        if self._client is not None:
            return self._client
        client = open_client(self._settings)
        try:
            ensure_schema(client, self._settings.table)
        except ClickHouseClientError as err:
            client.close()
            raise ClickHouseStoreError(
                f"failed to create table {self._settings.table} at "
                f"{redact_dsn(self._settings.dsn)}: {err}"
            ) from err
        except BaseException:
            client.close()
            raise
        # Here, not on the first insert, so the import does not hold up the first batch.
        preload_insert_modules()
        self._client = client
        logger.info(
            "Opened ClickHouse at %s, table %s",
            redact_dsn(self._settings.dsn),
            self._settings.table,
        )
        return client

    def _insert(self, rows: Sequence[Sequence[Any]]) -> None:
        client = self._connect()
        try:
            insert_spans(client, self._settings.table, rows)
        except (ClickHouseClientError, OSError) as err:
            # A fresh client on the next attempt recovers from a dropped connection.
            self._disconnect()
            raise ClickHouseStoreError(
                f"failed to insert {len(rows)} spans into {self._settings.table}: {err}"
            ) from err

    def _disconnect(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()


class _BatchRebalanceListener(ConsumerRebalanceListener):
    def __init__(self, sink: SpanSink) -> None:
        self._sink = sink

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._sink.on_partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        logger.info(
            "Span sink assigned partitions %s",
            ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(assigned)) or "none",
        )


class SpanSink:
    """One span sink process: a consumer group member, a dead-letter producer and a writer.

    Two batches at most are held: one being stored (inserted, then committed) by a task
    while the next one is read from Kafka. Stores run one at a time, so offsets commit in
    order, each only after the insert of its batch succeeded.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topic = settings.topics.spans
        self.deadletter_topic = settings.topics.deadletter
        self.group_id = settings.clickhouse.sink_group_id
        # The batch that takes new records.
        self.batch = SpanBatch()
        # The batch that the store task inserts and commits, kept after a failure for a retry.
        self.storing: SpanBatch | None = None
        self._store_task: asyncio.Task[Exception | None] | None = None
        self.writer = ClickHouseWriter(settings.clickhouse)
        self.consumer = make_consumer(settings.kafka, group_id=self.group_id)
        self.producer = make_producer(settings.kafka)
        # Serializes the main loop and the rebalance callback, which both touch the batches.
        self._batch_lock = asyncio.Lock()
        self._retry_delay_s = INITIAL_RETRY_DELAY_S
        self._failed_attempts = 0

    @property
    def unstored_rows(self) -> int:
        """Rows read but not yet committed: the batch being stored plus the one being read."""
        storing = 0 if self.storing is None else len(self.storing.rows)
        return storing + len(self.batch.rows)

    async def run(self, stop: asyncio.Event) -> None:
        """Consume and store spans until ``stop`` is set, then store the held batches and close."""
        logger.info(
            "Span sink starting: topic=%s group=%s clickhouse=%s table=%s batch_rows=%d "
            "batch_wait_s=%.2f",
            self.topic,
            self.group_id,
            redact_dsn(self.settings.clickhouse.dsn),
            self.settings.clickhouse.table,
            self.settings.clickhouse.batch_rows,
            self.settings.clickhouse.batch_wait_s,
        )
        try:
            await self._open_store()
            await self.producer.start()
            self.consumer.subscribe([self.topic], listener=_BatchRebalanceListener(self))
            await self.consumer.start()
            lag_task = None
            if self.settings.metrics.port:
                lag_task = asyncio.create_task(lag_routine(
                    self.consumer, self.group_id, self.settings.metrics.lag_interval_s))
            try:
                await self._consume(stop)
            finally:
                if lag_task is not None:
                    lag_task.cancel()
        finally:
            try:
                await self._store_remaining()
            finally:
                await stop_consumer(self.consumer, self.group_id)
                await self.producer.stop()
                await self.writer.close()
            logger.info("Span sink stopped: topic=%s group=%s", self.topic, self.group_id)

    async def _open_store(self) -> None:
        # A store that cannot be opened yet is not fatal: the first insert retries it.
        try:
            await self.writer.open()
        except ClickHouseStoreError as err:
            if not err.retriable:
                raise
            logger.warning("Failed to open ClickHouse, retrying on the first insert: %s", err)

    async def _consume(self, stop: asyncio.Event) -> None:
        max_rows = self.settings.clickhouse.batch_rows
        max_wait_s = self.settings.clickhouse.batch_wait_s
        while not stop.is_set():
            task = self._store_task
            if task is not None and task.done():
                if not await self._finish_store(task):
                    await self._wait_before_retry(stop)
                    await self._restart_store(stop)
                    continue
            task = self._store_task
            if task is not None and self.batch.is_due(max_rows, max_wait_s):
                # Both batches are ready, so the sink reads nothing until the store ends.
                await asyncio.wait([task])
            elif len(self.batch.rows) < max_rows:
                await self._fetch(max_rows, max_wait_s)
            if self._store_task is None and self.batch.is_due(max_rows, max_wait_s):
                await self._start_store()

    async def _fetch(self, max_rows: int, max_wait_s: float) -> None:
        timeout_s = POLL_TIMEOUT_S
        if self.batch.started_at is not None:
            remaining_s = self.batch.started_at + max_wait_s - time.monotonic()
            timeout_s = max(0.0, min(timeout_s, remaining_s))
        records = await self.consumer.getmany(
            timeout_ms=int(timeout_s * 1000), max_records=max_rows - len(self.batch.rows)
        )
        async with self._batch_lock:
            for partition, partition_records in records.items():
                for record in partition_records:
                    await self._accept(partition, record)

    async def _accept(
        self, partition: TopicPartition, record: ConsumerRecord[bytes, bytes]
    ) -> None:
        try:
            row = decode_span_row(record.value)
        except EventDecodeError as err:
            await send_to_deadletter(
                self.producer, self.deadletter_topic, record, self.group_id, err
            )
            self.batch.add_at(partition, record.offset, None)
            return
        self.batch.add_at(partition, record.offset, span_column_values(row))

    async def _start_store(self) -> None:
        """Hand the batch being read to a store task and start a new batch for reading."""
        async with self._batch_lock:
            if self.storing is not None or self.batch.is_empty():
                return
            self.storing, self.batch = self.batch, SpanBatch()
            self._store_task = asyncio.create_task(self._store_batch(self.storing))

    async def _restart_store(self, stop: asyncio.Event) -> None:
        """Start another attempt at the failed batch, unless stopping or a rebalance dropped it."""
        async with self._batch_lock:
            if stop.is_set() or self.storing is None:
                return
            self._store_task = asyncio.create_task(self._store_batch(self.storing))

    async def _finish_store(self, task: asyncio.Task[Exception | None]) -> bool:
        """Take the result of a finished store task, and return False after logging a failure.

        Raises the errors that no retry can fix.
        """
        async with self._batch_lock:
            # A rebalance may have settled this store already.
            if task is not self._store_task:
                return True
            self._store_task = None
            error = task.result()
            if error is None:
                self.storing = None
                self._reset_retry()
                return True
            assert self.storing is not None
            self._log_store_failure(self.storing, error)
            return False

    async def _settle_store(self) -> tuple[SpanBatch, Exception] | None:
        """Wait for the store task, and make one more attempt at its batch if it failed.

        Call it with the batch lock held. Returns the batch and error of a failed attempt.
        """
        task, self._store_task = self._store_task, None
        batch = self.storing
        if batch is None:
            return None
        error = await task if task is not None else None
        if task is None or error is not None:
            error = await self._store_batch(batch)
        if error is not None:
            return batch, error
        self.storing = None
        return None

    async def _flush(self) -> bool:
        """Store and commit both held batches, and return False after logging a failure."""
        async with self._batch_lock:
            failure = await self._settle_store()
            if failure is None and not self.batch.is_empty():
                error = await self._store_batch(self.batch)
                if error is None:
                    self.batch = SpanBatch()
                else:
                    failure = (self.batch, error)
        if failure is None:
            self._reset_retry()
            return True
        self._log_store_failure(*failure)
        return False

    def _reset_retry(self) -> None:
        self._failed_attempts = 0
        self._retry_delay_s = INITIAL_RETRY_DELAY_S

    def _log_store_failure(self, batch: SpanBatch, error: Exception) -> None:
        self._failed_attempts += 1
        logger.warning(
            "Failed to store %d spans (attempt %d) from %s for group %s, retrying in %.1f s "
            "without committing: %s",
            len(batch.rows),
            self._failed_attempts,
            batch.describe_offsets(),
            self.group_id,
            self._retry_delay_s,
            error,
        )

    async def _wait_before_retry(self, stop: asyncio.Event) -> None:
        # While waiting the sink polls nothing. An outage longer than the consumer's
        # max_poll_interval_ms makes it leave the group, and the rejoin re-reads the batch.
        try:
            await asyncio.wait_for(stop.wait(), self._retry_delay_s)
        except TimeoutError:
            pass
        self._retry_delay_s = min(self._retry_delay_s * 2, MAX_RETRY_DELAY_S)

    async def _store_batch(self, batch: SpanBatch) -> Exception | None:
        """Insert a batch unless done before, then commit its offsets.

        Returns the retriable error that stopped it, and raises errors that no retry can fix.
        """
        if batch.is_empty():
            return None

        if not batch.inserted:
            # NOTE: a batch that ClickHouse rejects for its data, not for an outage, is retried
            # forever. The strict row validation is what keeps such rows out of a batch.
            try:
                await self.writer.insert(batch.rows)
            except ClickHouseStoreError as err:
                if not err.retriable:
                    raise
                return err
            batch.inserted = True
            logger.debug(
                "Inserted %d spans into %s from %s (%d dead-lettered)",
                len(batch.rows),
                self.settings.clickhouse.table,
                batch.describe_offsets(),
                batch.dead_letters,
            )

        try:
            await self.consumer.commit(batch.next_offsets)
        except (CommitFailedError, IllegalStateError) as err:
            # The partitions moved to another member, which reads from the last commit.
            logger.warning(
                "Stored %d spans from %s but could not commit them because the group "
                "rebalanced; they may be stored twice: %s",
                len(batch.rows),
                batch.describe_offsets(),
                err,
            )
        except KafkaError as err:
            return err
        return None

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        """Store both held batches before a rebalance, or drop them when ClickHouse fails.

        Nothing of a dropped batch was committed, so the member that is assigned the
        partitions next reads those records again.
        """
        async with self._batch_lock:
            failure = await self._settle_store()
            if failure is None and not self.batch.is_empty():
                error = await self._store_batch(self.batch)
                if error is not None:
                    failure = (self.batch, error)
            if failure is None:
                self.batch = SpanBatch()
                return
            dropped = self.unstored_rows
            logger.warning(
                "Dropped %d unstored spans from %s before a rebalance. They are read again "
                "from the last commit: %s",
                dropped,
                failure[0].describe_offsets(),
                failure[1],
            )
            self.storing = None
            self.batch = SpanBatch()

    async def _store_remaining(self) -> None:
        deadline = time.monotonic() + SHUTDOWN_FLUSH_TIMEOUT_S
        while not await self._flush():
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                logger.warning(
                    "Stopping with %d spans not stored from %s. They stay in Kafka and are "
                    "read again when the span sink restarts",
                    self.unstored_rows,
                    self._describe_unstored(),
                )
                return
            await asyncio.sleep(min(self._retry_delay_s, remaining_s))
            self._retry_delay_s = min(self._retry_delay_s * 2, MAX_RETRY_DELAY_S)

    def _describe_unstored(self) -> str:
        batches = [batch for batch in (self.storing, self.batch) if batch and not batch.is_empty()]
        return ", ".join(batch.describe_offsets() for batch in batches) or "no offsets"


async def run(settings: Settings, stop: asyncio.Event) -> None:
    """Run the span sink until ``stop`` is set.

    Raises the process's first garbage-collection threshold while it runs. A batch keeps
    thousands of decoded rows alive, and with the default threshold (700 allocations) the
    collector rescans them so often that it halved the insert rate. Decoding, pivoting and
    inserting 40,000 synthetic spans into chDB ran at 10,900 rows/s with the default and
    24,000 rows/s with this one, on a loaded 2-CPU machine. The rows hold no reference
    cycles, so reference counting frees them.
    """
    previous = gc.get_threshold()
    gc.set_threshold(GC_FIRST_THRESHOLD, *previous[1:])
    try:
        await SpanSink(settings).run(stop)
    finally:
        gc.set_threshold(*previous)


def main() -> int:
    try:
        settings = load_settings()
    except ConfigurationError as err:
        sys.stderr.write(f"span-sink: {err}\n")
        return 2
    return serve("span-sink", run, settings)


if __name__ == "__main__":
    # Run the imported module, so its loggers are named consumers.span_sink, not __main__.
    from consumers.span_sink import main as module_main

    sys.exit(module_main())
