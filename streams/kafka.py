"""Factories for aiokafka clients and the dead-letter path every consumer shares."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from schemas.errors import EventDecodeError
from schemas.events import DeadLetter, encode_event
from streams.config import KafkaSettings
from streams.metrics import DEAD_LETTERS

logger = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]


def make_producer(settings: KafkaSettings, **overrides: Any) -> AIOKafkaProducer:
    """Build an idempotent producer: acks from all in-sync replicas, no duplicates on retry."""
    options: dict[str, Any] = {
        **settings.client_options(),
        "enable_idempotence": True,
        "acks": "all",
        "linger_ms": 2,
        "max_request_size": 2_000_000,
    }
    options.update(overrides)
    return AIOKafkaProducer(**options)


def make_consumer(
    settings: KafkaSettings, *topics: str, group_id: str | None, **overrides: Any
) -> AIOKafkaConsumer:
    """Build a consumer that commits offsets by hand, after the work a record asked for is done."""
    options: dict[str, Any] = {
        **settings.client_options(),
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_poll_records": 100,
        "isolation_level": "read_committed",
        "max_poll_interval_ms": settings.max_poll_interval_ms,
    }
    options.update(overrides)
    return AIOKafkaConsumer(*topics, **options)


async def create_topics(
    settings: KafkaSettings, names: Sequence[str], *, partitions: int | None = None,
    configs: dict[str, str] | None = None,
) -> None:
    """Create the topics that do not exist yet; existing ones are left as they are."""
    admin = AIOKafkaAdminClient(**settings.client_options())
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [name for name in names if name not in existing]
        if not missing:
            return
        new_topics = [
            NewTopic(
                name,
                num_partitions=partitions or settings.partitions,
                replication_factor=settings.replication_factor,
                topic_configs=configs or {},
            )
            for name in missing
        ]
        try:
            await admin.create_topics(new_topics)
        except TopicAlreadyExistsError:
            logger.debug("Topics %s were created concurrently", missing)
        logger.info("Created topics %s", ", ".join(missing))
    finally:
        await admin.close()


async def wait_for_leaders(settings: KafkaSettings, names: Sequence[str],
                           timeout_s: float = 60.0) -> None:
    """Wait until every partition of the topics has a leader.

    Raises:
        TimeoutError: a topic is still missing or a partition has no leader after ``timeout_s``.
    """
    admin = AIOKafkaAdminClient(**settings.client_options())
    await admin.start()
    try:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            described = await admin.describe_topics(list(names))
            ready = [topic["topic"] for topic in described
                     if topic.get("error_code", 0) == 0 and topic.get("partitions")
                     and all(partition.get("leader", -1) >= 0
                             for partition in topic["partitions"])]
            if len(ready) == len(names):
                return
            if asyncio.get_running_loop().time() > deadline:
                waiting = sorted(set(names) - set(ready))
                raise TimeoutError(f"topics {', '.join(waiting)} have partitions without a "
                                   f"leader after {timeout_s:.0f} s")
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


async def topic_partitions(settings: KafkaSettings, *topics: str) -> list[TopicPartition]:
    """List the partitions of existing topics; a missing topic contributes none.

    Only topics in the cluster's topic list are described. aiokafka 0.14 sends its
    metadata request with auto-creation allowed, so describing a missing topic on a broker
    with ``auto.create.topics.enable`` (Kafka's default) would create it.
    """
    admin = AIOKafkaAdminClient(**settings.client_options())
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        present = [topic for topic in topics if topic in existing]
        described = await admin.describe_topics(present) if present else []
    finally:
        await admin.close()
    return [
        TopicPartition(topic["topic"], partition["partition"])
        for topic in described
        if topic.get("error_code", 0) == 0
        for partition in topic["partitions"]
    ]


def header_value(headers: Sequence[tuple[str, bytes]] | None, name: str) -> str | None:
    """Return a header as text, or None when it is missing or not UTF-8."""
    for key, value in headers or ():
        if key == name and value is not None:
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError:
                return None
    return None


# A dead letter keeps at most this much of the rejected value. Base64 grows it by a third,
# so a letter for a value near the broker's 1 MB record limit still fits under that limit.
MAX_DEADLETTER_PAYLOAD_BYTES = 256_000


def build_dead_letter(
    *,
    topic: str,
    partition: int,
    offset: int,
    group_id: str,
    key: bytes | None,
    value: bytes | None,
    error_type: str,
    reason: str,
) -> DeadLetter:
    """Build the dead letter of an unprocessable record: its origin, the reason and its value.

    A value longer than ``MAX_DEADLETTER_PAYLOAD_BYTES`` is truncated, and the reason states that.
    """
    payload = value or b""
    if len(payload) > MAX_DEADLETTER_PAYLOAD_BYTES:
        reason = (f"payload truncated to its first {MAX_DEADLETTER_PAYLOAD_BYTES} of "
                  f"{len(payload)} bytes; {reason}")
        payload = payload[:MAX_DEADLETTER_PAYLOAD_BYTES]
    return DeadLetter(
        source_topic=topic,
        partition=partition,
        offset=offset,
        consumer_group=group_id,
        key_b64=base64.b64encode(key[:MAX_DEADLETTER_PAYLOAD_BYTES]).decode() if key else None,
        payload_b64=base64.b64encode(payload).decode(),
        error_type=error_type,
        reason=reason[:4_000],
    )


async def send_to_deadletter(
    producer: AIOKafkaProducer,
    topic: str,
    record: ConsumerRecord[bytes, bytes],
    group_id: str,
    error: EventDecodeError | Exception,
) -> None:
    """Publish an unprocessable record to the dead-letter topic with where it came from and why."""
    error_type = getattr(error, "error_type", type(error).__name__)
    reason = getattr(error, "reason", str(error))
    letter = build_dead_letter(
        topic=record.topic, partition=record.partition, offset=record.offset,
        group_id=group_id, key=record.key, value=record.value, error_type=error_type,
        reason=reason,
    )
    headers = [(key, value) for key, value in (record.headers or ()) if isinstance(value, bytes)]
    await producer.send_and_wait(topic, encode_event(letter), key=record.key, headers=headers)
    DEAD_LETTERS.labels(record.topic, group_id, error_type).inc()
    logger.warning(
        "Sent record to dead-letter topic %s: topic=%s partition=%d offset=%d group=%s "
        "error_type=%s reason=%s",
        topic,
        record.topic,
        record.partition,
        record.offset,
        group_id,
        error_type,
        reason[:300],
    )


async def stop_consumer(consumer: AIOKafkaConsumer, name: str) -> None:
    """Stop a consumer, also while the broker is unreachable.

    In that case aiokafka 0.14's stop() raises CancelledError although nothing cancelled
    the caller. That error is logged and dropped, so the caller's cleanup continues.
    """
    task = asyncio.current_task()
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        if task is not None and task.cancelling():
            raise
        logger.warning("Consumer of %s stopped without leaving its group cleanly; the broker "
                       "is unreachable", name)


async def group_lag(settings: KafkaSettings, group_id: str, topic: str) -> int:
    """Return how many records of ``topic`` the group has not committed yet."""
    lags = await group_partition_lags(settings, group_id, [topic])
    return sum(lags.values())


async def group_partition_lags(settings: KafkaSettings, group_id: str,
                               topics: Sequence[str]) -> dict[TopicPartition, int]:
    """Return, per partition of ``topics``, the records the group has not committed yet.

    A partition the group never committed counts from offset 0, so a new group's backlog
    shows as lag instead of hiding.
    """
    admin = AIOKafkaAdminClient(**settings.client_options())
    consumer = AIOKafkaConsumer(**settings.client_options(), group_id=None)
    await admin.start()
    await consumer.start()
    try:
        partitions = [partition for topic in topics
                      for partition in await topic_partitions(settings, topic)]
        if not partitions:
            return {}
        ends = await consumer.end_offsets(partitions)
        committed = await admin.list_consumer_group_offsets(group_id, partitions=partitions)
        lags: dict[TopicPartition, int] = {}
        for partition in partitions:
            done = committed.get(partition)
            position = done.offset if done is not None and done.offset >= 0 else 0
            lags[partition] = max(0, ends[partition] - position)
        return lags
    finally:
        await consumer.stop()
        await admin.close()
