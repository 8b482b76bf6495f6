"""Acknowledgements that critical consumers send to the coordinator."""

from __future__ import annotations

from aiokafka import AIOKafkaProducer

from schemas.events import DeliveryAck, JobCompleted, encode_event
from streams.config import Settings


async def send_ack(producer: AIOKafkaProducer, settings: Settings, completed: JobCompleted,
                   consumer: str, *, delivered: bool, reason: str = "") -> None:
    """Tell the coordinator this consumer applied the job, or gave up on it."""
    ack = DeliveryAck(job_id=completed.job_id, job_key=completed.job_key, consumer=consumer,
                      delivered=delivered, reason=reason[:2_000])
    await producer.send_and_wait(settings.topics.coordinator_events, encode_event(ack),
                                 key=completed.job_key.encode())
