"""Critical completion consumer: POSTs each completed job to the upstream service's webhook.

Each request carries an ``Idempotency-Key`` header with the job id, so a receiver applies a
job at most once even when a crash between the POST and the offset commit sends it again.
Transient failures (connection errors, timeouts, HTTP 429 and 5xx) are retried with
exponential backoff and jitter; other 4xx answers and exhausted retries end the delivery
as failed, which the coordinator records as ``delivery_failed`` with the reason.
"""

from __future__ import annotations

import asyncio
import logging
import random

import aiohttp
from aiokafka import AIOKafkaProducer, ConsumerRecord
from opentelemetry.trace import Span

from consumers.acks import send_ack
from consumers.record_loop import run_record_loop
from schemas.errors import ConfigurationError, PermanentError, TransientError
from schemas.events import JobCompleted, encode_event
from streams.config import Settings, load_settings
from streams.service import serve
from streams.tracing import inject_headers

logger = logging.getLogger(__name__)

SERVICE_NAME = "webhook"


async def post_completion(session: aiohttp.ClientSession, url: str,
                          completed: JobCompleted) -> None:
    """POST one completion; raises TransientError or PermanentError by the failure's kind."""
    headers = {"Content-Type": "application/json", "Idempotency-Key": completed.job_id}
    headers.update({key: value.decode() for key, value in inject_headers()})
    try:
        async with session.post(url, data=encode_event(completed), headers=headers) as response:
            if response.status < 300:
                return
            body = (await response.text())[:300]
            if response.status == 429 or response.status >= 500:
                raise TransientError(f"webhook answered HTTP {response.status}: {body}",
                                     job_id=completed.job_id)
            raise PermanentError(f"webhook rejected the job with HTTP {response.status}: "
                                 f"{body}", job_id=completed.job_id)
    except (aiohttp.ClientError, TimeoutError) as err:
        raise TransientError(f"webhook request failed: {err!r}",
                             job_id=completed.job_id) from err


async def deliver_with_retries(session: aiohttp.ClientSession, settings: Settings,
                               completed: JobCompleted) -> str | None:
    """Deliver one job; returns None on success, else the reason delivery failed."""
    consumers = settings.consumers
    assert consumers.webhook_url is not None
    for attempt in range(1, consumers.delivery_max_attempts + 1):
        try:
            await post_completion(session, consumers.webhook_url, completed)
            return None
        except PermanentError as err:
            return str(err)
        except TransientError as err:
            if attempt == consumers.delivery_max_attempts:
                logger.warning("Giving up on job %s after %d attempts: %s",
                               completed.job_id, attempt, err)
                return f"{err} (after {attempt} attempts)"
            delay_s = consumers.delivery_backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
            logger.info("Retrying delivery of job %s in %.2f s (attempt %d of %d): %s",
                        completed.job_id, delay_s, attempt + 1,
                        consumers.delivery_max_attempts, err)
            await asyncio.sleep(delay_s)
    return "no delivery attempt was made"


async def run(settings: Settings, stop: asyncio.Event) -> None:
    if not settings.consumers.webhook_url:
        raise ConfigurationError("SLOTFORGE_CONSUMERS__WEBHOOK_URL is not set; set it to the "
                                 "upstream service's webhook address")
    timeout = aiohttp.ClientTimeout(total=settings.consumers.webhook_timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def handle(completed: JobCompleted, record: ConsumerRecord[bytes, bytes],
                         span: Span, producer: AIOKafkaProducer) -> None:
            failure = await deliver_with_retries(session, settings, completed)
            span.set_attribute("slotforge.delivery.ok", failure is None)
            if failure is None:
                logger.info("Delivered job %s to the webhook", completed.job_id)
            else:
                span.set_attribute("error.type", "delivery_failed")
            await send_ack(producer, settings, completed, SERVICE_NAME,
                           delivered=failure is None, reason=failure or "")

        await run_record_loop(
            settings, stop,
            service_name=SERVICE_NAME, stage="webhook",
            topic=settings.topics.jobs_completed, group_id=settings.consumers.webhook_group_id,
            expected=(JobCompleted,), handle=handle,
        )


def main() -> int:
    return serve(SERVICE_NAME, run, load_settings())


if __name__ == "__main__":
    raise SystemExit(main())
