"""The consume-handle-commit loop shared by the completion consumers.

Records are handled one at a time per process, in offset order, and an offset is committed
only after its record was handled, so a crash redelivers instead of losing work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.structs import OffsetAndMetadata
from opentelemetry.trace import Span, SpanKind
from pydantic import BaseModel

from schemas.errors import EventDecodeError
from schemas.events import decode_event
from streams.config import Settings
from streams.kafka import make_consumer, make_producer, send_to_deadletter, stop_consumer
from streams.metrics import lag_routine
from streams.tracing import Tracing, extract_context, stage_span

logger = logging.getLogger(__name__)

Handler = Callable[[Any, ConsumerRecord[bytes, bytes], Span, AIOKafkaProducer],
                  Awaitable[None]]


async def run_record_loop(
    settings: Settings,
    stop: asyncio.Event,
    *,
    service_name: str,
    stage: str,
    topic: str,
    group_id: str,
    expected: tuple[type[BaseModel], ...],
    handle: Handler,
) -> None:
    """Consume ``topic`` in ``group_id`` until ``stop`` is set, calling ``handle`` per event.

    Undecodable records go to the dead-letter topic. A handler error is logged with the
    record's ids and also dead-lettered, so one bad record never stalls the partition.
    """
    tracing = Tracing(service_name, settings.tracing, settings.topics.spans)
    consumer: AIOKafkaConsumer = make_consumer(settings.kafka, topic, group_id=group_id)
    producer: AIOKafkaProducer = make_producer(settings.kafka)
    await producer.start()
    await consumer.start()
    logger.info("%s consuming %s in group %s", service_name, topic, group_id)

    async def consume_routine() -> None:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=200, max_records=50)
            for partition, records in batches.items():
                for record in records:
                    await _handle_one(record)
                    await _commit(partition, record.offset + 1)

    async def _handle_one(record: ConsumerRecord[bytes, bytes]) -> None:
        try:
            event = decode_event(record.value, *expected)
        except EventDecodeError as err:
            await send_to_deadletter(producer, settings.topics.deadletter, record, group_id, err)
            return
        attributes = {
            "messaging.system": "kafka",
            "messaging.operation.type": "process",
            "messaging.destination.name": record.topic,
            "messaging.destination.partition.id": str(record.partition),
            "messaging.kafka.offset": record.offset,
            "messaging.consumer.group.name": group_id,
        }
        job_id = getattr(event, "job_id", None)
        if job_id:
            attributes["slotforge.job.id"] = job_id
        with stage_span(
            tracing.tracer, f"process {record.topic}", stage,
            parent=extract_context(record.headers), kind=SpanKind.CONSUMER,
            attributes=attributes,
        ) as span:
            try:
                await handle(event, record, span, producer)
            except Exception as err:  # noqa: BLE001 - dead-letter the record, keep consuming
                logger.exception(
                    "%s failed to handle job %s at topic=%s partition=%d offset=%d",
                    service_name, job_id, record.topic, record.partition, record.offset,
                )
                await send_to_deadletter(
                    producer, settings.topics.deadletter, record, group_id,
                    EventDecodeError(f"handler failed: {err!r}", error_type=type(err).__name__),
                )

    async def _commit(partition: TopicPartition, offset: int) -> None:
        # Shielded so a stop signal arriving mid-commit cannot leave the offset half-written.
        await asyncio.shield(consumer.commit({partition: OffsetAndMetadata(offset, "")}))

    try:
        async with asyncio.TaskGroup() as group:
            background = [group.create_task(tracing.publish_routine(producer))]
            if settings.metrics.port:
                background.append(group.create_task(
                    lag_routine(consumer, group_id, settings.metrics.lag_interval_s)))
            await consume_routine()
            for task in background:
                task.cancel()
    finally:
        with contextlib.suppress(Exception):
            await tracing.flush(producer)
        await stop_consumer(consumer, group_id)
        await producer.stop()
        tracing.shutdown()
        logger.info("%s stopped consuming %s", service_name, topic)
