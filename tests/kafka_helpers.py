"""Small test drivers that read and write the pipeline's topics on the real broker."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord

from streams.config import KafkaSettings
from streams.kafka import make_consumer, make_producer, topic_partitions


class TopicReader:
    """Read one or more topics from their beginning without a consumer group."""

    def __init__(self, settings: KafkaSettings, topic: str, *more: str) -> None:
        self.settings = settings
        self.topic = topic
        self.topics = (topic, *more)
        self.consumer: AIOKafkaConsumer = make_consumer(settings, group_id=None)
        self.records: list[ConsumerRecord[bytes, bytes]] = []

    async def __aenter__(self) -> TopicReader:
        await self.consumer.start()
        partitions = await topic_partitions(self.settings, *self.topics)
        self.consumer.assign(partitions)
        await self.consumer.seek_to_beginning(*partitions)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.consumer.stop()

    async def poll(self) -> list[ConsumerRecord[bytes, bytes]]:
        batches = await self.consumer.getmany(timeout_ms=200)
        fresh = [record for records in batches.values() for record in records]
        self.records.extend(fresh)
        return fresh

    async def wait_for(
        self, predicate: Callable[[list[ConsumerRecord[bytes, bytes]]], bool],
        timeout_s: float = 60.0,
    ) -> list[ConsumerRecord[bytes, bytes]]:
        """Poll until ``predicate(all records so far)`` holds; fail with what was seen."""
        deadline = time.monotonic() + timeout_s
        while not predicate(self.records):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"condition not met on {', '.join(self.topics)} within {timeout_s:.0f} s; "
                    f"saw {len(self.records)} records"
                )
            await self.poll()
        return self.records


async def produce(settings: KafkaSettings, topic: str, value: bytes, key: bytes | None = None,
                  headers: list[tuple[str, bytes]] | None = None,
                  partition: int | None = None) -> None:
    producer = make_producer(settings)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=key, headers=headers or [],
                                     partition=partition)
    finally:
        await producer.stop()


async def wait_until(predicate: Callable[[], Any], timeout_s: float = 60.0,
                     message: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} not met within {timeout_s:.0f} s")
        await asyncio.sleep(0.1)


class ClaimGranter:
    """Plays the coordinator's claim role in worker tests: the first claimant of each
    attempt and epoch gets the lease, later claimants are denied."""

    def __init__(self, settings: KafkaSettings) -> None:
        self.settings = settings
        self.topics = settings.topics
        self.holders: dict[tuple[str, int], str] = {}
        # Cleared to leave claims unanswered, like a coordinator that is down.
        self.answering = True
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ClaimGranter:
        self._reader = TopicReader(self.settings, self.topics.coordinator_events)
        await self._reader.__aenter__()
        self._producer = make_producer(self.settings)
        await self._producer.start()
        self._task = asyncio.create_task(self._routine())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._producer.stop()
        await self._reader.__aexit__()

    async def _routine(self) -> None:
        from schemas.events import AttemptClaim, ClaimDecision, decode_event, encode_event

        while True:
            for record in await self._reader.poll():
                try:
                    claim = decode_event(record.value, AttemptClaim)
                except Exception:  # noqa: BLE001 - other event types share the topic
                    continue
                if not self.answering:
                    continue
                holder = self.holders.setdefault((claim.attempt_id, claim.epoch),
                                                 claim.worker_id)
                decision = ClaimDecision(
                    attempt_id=claim.attempt_id, job_id=claim.job_id, job_key=claim.job_key,
                    epoch=claim.epoch, worker_id=claim.worker_id,
                    granted=holder == claim.worker_id,
                    reason="" if holder == claim.worker_id else f"lease held by {holder}",
                )
                await self._producer.send_and_wait(
                    self.topics.control, encode_event(decision), key=claim.worker_id.encode())
