"""Retries through delay topics: exponential backoff with jitter, decided by error type.

A stage that hits a transient failure publishes the record, unchanged, to a delay topic
``retry.<level>`` with headers naming the topic to return to and the time it is due. The
retry router (``slotforge run retry-router``) consumes the delay topics, pauses a
partition until its oldest record is due, then forwards that record to its target topic.
Waiting records stay in Kafka, so a backlog of retries costs the router no memory.

Each level takes the retries of one retry number, and the last level takes every later one.
The delays within one topic are therefore close, so a record is held back behind an
earlier one by at most the jitter of their delays. Records are forwarded, never sooner than due.

Retry decisions follow the error's type: ``SlotforgeError.retriable`` (``TransientError``
for a crash, out-of-memory, upload error, HTTP 429 or 5xx; ``PermanentError`` for invalid
parameters), and connection errors and timeouts count as transient. Message text is never
read.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from schemas.errors import EventDecodeError, SlotforgeError
from schemas.topics import RETRY_LEVELS
from streams.config import Settings, load_settings
from streams.kafka import Headers, header_value, make_consumer, make_producer, send_to_deadletter
from streams.service import serve

logger = logging.getLogger(__name__)

TARGET_HEADER = "slotforge-retry-target"
DUE_HEADER = "slotforge-retry-due-ms"
RETRY_NO_HEADER = "slotforge-retry-no"
ERROR_HEADER = "slotforge-retry-error-type"
_RETRY_HEADERS = (TARGET_HEADER, DUE_HEADER, RETRY_NO_HEADER, ERROR_HEADER)


@dataclass(frozen=True)
class BackoffPolicy:
    """Exponential backoff with jitter.

    The n-th retry waits ``min(max_s, base_s * 2 ** (n - 1))`` scaled by a uniform factor
    in ``[1 - jitter, 1]``, so retries of records that failed together spread out.
    """

    base_s: float = 1.0
    max_s: float = 60.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.base_s <= 0 or self.max_s < self.base_s:
            raise ValueError(f"backoff needs 0 < base_s <= max_s, got base_s={self.base_s} "
                             f"max_s={self.max_s}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")

    def delay_s(self, retry_no: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``retry_no`` (1 for the first retry)."""
        if retry_no < 1:
            raise ValueError(f"retry_no starts at 1, got {retry_no}")
        ceiling = min(self.max_s, self.base_s * 2 ** min(retry_no - 1, 62))
        factor = 1.0 - self.jitter * (rng or random).random()
        return ceiling * factor


def is_transient(error: BaseException) -> bool:
    """Return whether a retry may succeed where ``error`` failed, judged by its type alone."""
    if isinstance(error, SlotforgeError):
        return error.retriable
    return isinstance(error, ConnectionError | TimeoutError)


def retry_level(retry_no: int) -> int:
    """Return the delay topic level of retry number ``retry_no``."""
    return max(1, min(retry_no, RETRY_LEVELS))


def retry_headers(headers: Sequence[tuple[str, bytes]] | None, target_topic: str,
                  retry_no: int, due_s: float, error_type: str) -> Headers:
    """Return the record's own headers (trace context included) plus the retry headers."""
    kept = [(key, value) for key, value in headers or ()
            if key not in _RETRY_HEADERS and isinstance(value, bytes)]
    return kept + [
        (TARGET_HEADER, target_topic.encode()),
        (DUE_HEADER, str(int(due_s * 1000)).encode()),
        (RETRY_NO_HEADER, str(retry_no).encode()),
        (ERROR_HEADER, error_type[:200].encode()),
    ]


def retry_number(headers: Sequence[tuple[str, bytes]] | None) -> int:
    """Return how many times the record was retried already; 0 for a first delivery."""
    value = header_value(headers, RETRY_NO_HEADER)
    return int(value) if value is not None and value.isdigit() else 0


async def send_retry(producer: AIOKafkaProducer, delay_topic: str, *, key: bytes | None,
                     value: bytes, headers: Sequence[tuple[str, bytes]] | None,
                     target_topic: str, retry_no: int, delay_s: float,
                     error_type: str) -> None:
    """Publish a record to a delay topic, due ``delay_s`` from now, for ``target_topic``."""
    due_s = time.time() + delay_s
    await producer.send_and_wait(
        delay_topic, value, key=key,
        headers=retry_headers(headers, target_topic, retry_no, due_s, error_type))


class RetryRouter:
    """Forward due records from the delay topics to their targets.

    Args:
        settings: the retry group id and topic names come from here.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = settings.topics
        self.group_id = settings.retry.router_group_id
        self.delay_topics = [self.topics.retry(level) for level in range(1, RETRY_LEVELS + 1)]
        self.producer: AIOKafkaProducer = make_producer(settings.kafka)
        self.consumer = make_consumer(settings.kafka, *self.delay_topics,
                                      group_id=self.group_id,
                                      max_poll_records=settings.retry.router_batch)
        # Partitions held back until their head record is due, by monotonic due time.
        self._held: dict[TopicPartition, float] = {}
        self.forwarded = 0

    async def run(self, stop: asyncio.Event) -> None:
        logger.info("Starting retry router: group %s, topics %s", self.group_id,
                    ", ".join(self.delay_topics))
        await self.producer.start()
        try:
            await self.consumer.start()
            try:
                while not stop.is_set():
                    self._release_due()
                    batches = await self.consumer.getmany(timeout_ms=self._poll_ms())
                    for partition, records in batches.items():
                        await self._route(partition, records)
            finally:
                await self.consumer.stop()
        finally:
            await self.producer.stop()
            logger.info("Stopped retry router: %d records forwarded", self.forwarded)

    def _poll_ms(self) -> int:
        """Poll no longer than until the next held partition is due, at most 500 ms."""
        if not self._held:
            return 500
        return max(1, min(500, int((min(self._held.values()) - time.monotonic()) * 1000)))

    def _release_due(self) -> None:
        now = time.monotonic()
        due = [partition for partition, at in self._held.items() if at <= now]
        assigned = self.consumer.assignment()
        for partition in due:
            del self._held[partition]
            if partition in assigned:
                self.consumer.resume(partition)

    async def _route(self, partition: TopicPartition,
                     records: list[ConsumerRecord[bytes, bytes]]) -> None:
        for record in records:
            try:
                target, due_ms = self._destination(record)
            except EventDecodeError as err:
                await send_to_deadletter(self.producer, self.topics.deadletter, record,
                                         self.group_id, err)
                await self._commit(partition, record.offset + 1)
                continue
            wait_s = due_ms / 1000 - time.time()
            if wait_s > 0:
                # The rest of this batch is fetched again from here once the head is due.
                self.consumer.seek(partition, record.offset)
                self.consumer.pause(partition)
                self._held[partition] = time.monotonic() + wait_s
                return
            headers = [(key, value) for key, value in record.headers or ()
                       if key not in (TARGET_HEADER, DUE_HEADER) and isinstance(value, bytes)]
            await self.producer.send_and_wait(target, record.value, key=record.key,
                                              headers=headers)
            await self._commit(partition, record.offset + 1)
            self.forwarded += 1
            logger.info("Forwarded retry %d of record %s[%d]@%d to %s, %.2f s after due",
                        retry_number(record.headers), record.topic, record.partition,
                        record.offset, target, -wait_s)

    def _destination(self, record: ConsumerRecord[bytes, bytes]) -> tuple[str, int]:
        target = header_value(record.headers, TARGET_HEADER)
        due = header_value(record.headers, DUE_HEADER)
        ids = {"topic": record.topic, "partition": record.partition, "offset": record.offset}
        if not target or not target.startswith(self.topics.prefix) \
                or target in self.delay_topics:
            raise EventDecodeError(
                f"retry record has no valid {TARGET_HEADER} header (got {target!r}); it must "
                f"name a topic under prefix {self.topics.prefix!r} other than a delay topic",
                error_type="retry_headers", **ids)
        if due is None or not due.isdigit():
            raise EventDecodeError(f"retry record has no valid {DUE_HEADER} header "
                                   f"(got {due!r})", error_type="retry_headers", **ids)
        return target, int(due)

    async def _commit(self, partition: TopicPartition, offset: int) -> None:
        try:
            await self.consumer.commit({partition: offset})
        except KafkaError as err:
            # The record is forwarded again after a restart; targets tolerate duplicates.
            logger.warning("Failed to commit %s[%d] at %d: %s", partition.topic,
                           partition.partition, offset, err)


async def run(settings: Settings, stop: asyncio.Event) -> None:
    """Run the retry router until ``stop`` is set; see the module docstring."""
    await RetryRouter(settings).run(stop)


def main() -> int:
    return serve("retry-router", run, load_settings())


if __name__ == "__main__":
    raise SystemExit(main())
