"""Post-processing service: scores generated images and publishes the verdicts.

It consumes the generated topic in its own consumer group, scores at most
``postprocess.concurrency`` images at once on a thread pool, and publishes one
``result.scored`` per image to the coordinator events topic, keyed by the job key. An image
that is missing or unreadable gets a rejection with the reason, not a crash.

With ``postprocess.moderation_url`` set, each accepted image also goes to an external
moderation API, at most ``moderation_rate_per_s`` requests per second across all
post-processing processes (``streams.rate_limit``). A transient failure of that call sends
the record through a delay topic (``streams.retry``) to be scored again; after
``retry.max_retries_per_attempt`` retries it goes to the dead-letter topic and the image is
rejected with the error. A permanent failure rejects the image at once with the reason.

Run it with ``python -m gpu_inference.postprocess``.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import aiohttp
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from opentelemetry.trace import SpanKind, StatusCode

from gpu_inference.artifacts import ArtifactError, ArtifactStore
from gpu_inference.moderation import moderate
from gpu_inference.offsets import FlowControlledConsumer, commit_and_flush
from gpu_inference.scoring import InvalidImageError, judge, score_png
from schemas.errors import EventDecodeError, PermanentError, TransientError
from schemas.events import AttemptFinished, AttemptStatus, ResultScored, decode_event, encode_event
from streams.config import Settings, load_settings
from streams.kafka import (
    make_consumer,
    make_producer,
    send_to_deadletter,
    stop_consumer,
    topic_partitions,
)
from streams.metrics import lag_routine
from streams.rate_limit import PartitionRateLimiter
from streams.retry import BackoffPolicy, retry_level, retry_number, send_retry
from streams.service import serve
from streams.tracing import Tracing, extract_context, inject_headers, stage_span

logger = logging.getLogger(__name__)

_MAX_REASON_CHARS = 500


def _decode_generated(data: bytes | None) -> AttemptFinished:
    """Decode a record of the generated topic, which must be a succeeded attempt with an image.

    Raises:
        EventDecodeError: the record is invalid for this topic.
    """
    finished: AttemptFinished = decode_event(data, AttemptFinished)
    if finished.status is not AttemptStatus.SUCCEEDED or not finished.artifact_uri:
        raise EventDecodeError(
            f"attempt.finished with status {finished.status.value} and artifact_uri "
            f"{finished.artifact_uri!r} is not a generated image; only succeeded attempts with "
            "an artifact belong on this topic",
            error_type="validation",
            attempt_id=finished.attempt_id,
            job_id=finished.job_id,
        )
    return finished


@dataclass(frozen=True)
class _Verdict:
    score: float
    accepted: bool
    reason: str
    # The artifact was missing or not an image, so no score was computed.
    unusable: bool = False


class Postprocessor:
    """State of one post-processing process: clients, thread pool and in-flight scorings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.group_id = settings.postprocess.group_id
        self.concurrency = settings.postprocess.concurrency
        self.threshold = settings.postprocess.accept_threshold
        self.topics = settings.topics
        self.store = ArtifactStore(settings.artifact_dir)
        self.tracing = Tracing("postprocess", settings.tracing, settings.topics.spans)
        self.producer = make_producer(settings.kafka)
        self.fetcher = FlowControlledConsumer(
            make_consumer(
                settings.kafka, group_id=self.group_id, max_poll_records=self.concurrency
            ),
            self.group_id,
        )
        self.executor = ThreadPoolExecutor(
            max_workers=self.concurrency, thread_name_prefix="postprocess"
        )
        self._in_flight = 0
        retry = settings.retry
        self.backoff = BackoffPolicy(retry.base_s, retry.max_s, retry.jitter)
        self.moderation_url = settings.postprocess.moderation_url
        self.limiter: PartitionRateLimiter | None = None
        self.session: aiohttp.ClientSession | None = None

    async def _start_moderation(self) -> None:
        """Split the moderation rate over the generated topic's partitions."""
        partitions = await topic_partitions(self.settings.kafka, self.topics.generated)
        rate = self.settings.postprocess.moderation_rate_per_s
        self.limiter = PartitionRateLimiter(rate, max(1, len(partitions)))
        self.fetcher.assigned_hooks.append(self.limiter.assigned)
        self.fetcher.revoked_hooks.append(self.limiter.revoked)
        timeout = aiohttp.ClientTimeout(total=self.settings.postprocess.moderation_timeout_s)
        self.session = aiohttp.ClientSession(timeout=timeout)
        logger.info("Moderating accepted images at %s, at most %.2f requests/s over %d "
                    "partitions", self.moderation_url, rate, len(partitions))

    async def run(self, stop: asyncio.Event) -> None:
        logger.info(
            "Starting post-processing: group %s, concurrency %d, accept threshold %.3f, topic %s",
            self.group_id,
            self.concurrency,
            self.threshold,
            self.topics.generated,
        )
        self.fetcher.subscribe([self.topics.generated])
        if self.moderation_url:
            await self._start_moderation()
        await self.producer.start()
        try:
            await self.fetcher.consumer.start()
            try:
                async with asyncio.TaskGroup() as services:
                    background = [
                        services.create_task(self.tracing.publish_routine(self.producer))]
                    if self.settings.metrics.port:
                        background.append(services.create_task(lag_routine(
                            self.fetcher.consumer, self.group_id,
                            self.settings.metrics.lag_interval_s)))
                    try:
                        await self._consume(stop)
                    finally:
                        await self._commit_and_flush()
                        for task in background:
                            task.cancel()
            finally:
                await stop_consumer(self.fetcher.consumer, self.group_id)
        finally:
            await self.producer.stop()
            if self.session is not None:
                await self.session.close()
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.tracing.shutdown()
            logger.info("Stopped post-processing group %s", self.group_id)

    async def _commit_and_flush(self) -> None:
        await commit_and_flush(self.fetcher, self.tracing, self.producer)

    async def _consume(self, stop: asyncio.Event) -> None:
        # Leaving the task group waits for the scorings in flight; each takes milliseconds.
        async with asyncio.TaskGroup() as scorings:
            while not stop.is_set():
                free = self.concurrency - self._in_flight
                for record in await self.fetcher.fetch(free, stop):
                    self.fetcher.start(record)
                    self._in_flight += 1
                    scorings.create_task(self._process(record))
                await self.fetcher.commit()

    async def _process(self, record: ConsumerRecord[bytes, bytes]) -> None:
        try:
            try:
                finished = _decode_generated(record.value)
            except EventDecodeError as err:
                await send_to_deadletter(
                    self.producer, self.topics.deadletter, record, self.group_id, err
                )
            else:
                await self._score(finished, record)
            self.fetcher.finish(record)
        except KafkaError:
            # The record stays uncommitted, so it is scored again after a restart.
            logger.exception(
                "Failed to publish the result of record %s[%d]@%d",
                record.topic,
                record.partition,
                record.offset,
            )
            raise
        finally:
            self._in_flight -= 1
            self.fetcher.wake()

    async def _score(self, finished: AttemptFinished, record: ConsumerRecord[bytes, bytes]) -> None:
        assert finished.artifact_uri is not None
        with stage_span(
            self.tracing.tracer,
            "postprocess",
            "postprocess",
            parent=extract_context(record.headers),
            kind=SpanKind.CONSUMER,
            attributes={
                "slotforge.job.id": finished.job_id,
                "slotforge.attempt.id": finished.attempt_id,
                "slotforge.worker.id": finished.worker_id,
            },
        ) as span:
            loop = asyncio.get_running_loop()
            verdict = await loop.run_in_executor(self.executor, self._judge_artifact, finished)
            if verdict.accepted and self.moderation_url:
                moderated = await self._moderate(finished, record, verdict)
                if moderated is None:
                    span.set_attribute("slotforge.attempt.outcome", "retrying")
                    return
                verdict = moderated
            span.set_attribute("slotforge.score", verdict.score)
            span.set_attribute("slotforge.accepted", verdict.accepted)
            span.set_attribute("slotforge.attempt.outcome",
                               "accepted" if verdict.accepted else "rejected")
            if verdict.unusable:
                span.set_attribute("error.type", "unusable_artifact")
                span.set_status(StatusCode.ERROR, verdict.reason)
            scored = ResultScored(
                attempt_id=finished.attempt_id,
                job_id=finished.job_id,
                job_key=finished.job_key,
                epoch=finished.epoch,
                slot=finished.slot,
                artifact_uri=finished.artifact_uri,
                score=verdict.score,
                accepted=verdict.accepted,
                reason=verdict.reason[:_MAX_REASON_CHARS],
            )
            await self.producer.send_and_wait(
                self.topics.coordinator_events,
                encode_event(scored),
                key=finished.job_key.encode("utf-8"),
                headers=inject_headers(span),
            )
        logger.debug(
            "Scored attempt %s of job %s: %s", finished.attempt_id, finished.job_id, verdict.reason
        )

    async def _moderate(self, finished: AttemptFinished, record: ConsumerRecord[bytes, bytes],
                        verdict: _Verdict) -> _Verdict | None:
        """Ask the moderation API about an accepted image; None when it goes to a retry."""
        assert self.limiter is not None and self.session is not None
        assert self.moderation_url is not None and finished.artifact_uri is not None
        loop = asyncio.get_running_loop()
        try:
            png = await loop.run_in_executor(self.executor, self.store.read,
                                             finished.artifact_uri)
            await self.limiter.acquire(TopicPartition(record.topic, record.partition))
            result = await moderate(self.session, self.moderation_url, finished, png)
        except ArtifactError as err:
            return _Verdict(0.0, False, f"artifact unusable: {err}", unusable=True)
        except PermanentError as err:
            logger.warning("Rejecting attempt %s of job %s: %s", finished.attempt_id,
                           finished.job_id, err)
            return _Verdict(verdict.score, False, f"moderation failed: {err}")
        except TransientError as err:
            if await self._retry_later(record, err):
                return None
            return _Verdict(verdict.score, False, f"moderation failed after "
                            f"{self.settings.retry.max_retries_per_attempt} retries: {err}")
        if result.flagged:
            return _Verdict(verdict.score, False, f"flagged by moderation: {result.reason}")
        return verdict

    async def _retry_later(self, record: ConsumerRecord[bytes, bytes],
                           error: TransientError) -> bool:
        """Send the record through a delay topic; False when its retries are used up.

        A record out of retries goes to the dead-letter topic with the error.
        """
        retry_no = retry_number(record.headers) + 1
        if retry_no > self.settings.retry.max_retries_per_attempt:
            await send_to_deadletter(self.producer, self.topics.deadletter, record,
                                     self.group_id, error)
            return False
        delay_s = self.backoff.delay_s(retry_no)
        await send_retry(self.producer, self.topics.retry(retry_level(retry_no)),
                         key=record.key, value=record.value or b"", headers=record.headers,
                         target_topic=record.topic, retry_no=retry_no, delay_s=delay_s,
                         error_type=type(error).__name__)
        logger.warning("Retrying record %s[%d]@%d in %.2f s (retry %d of %d): %s",
                       record.topic, record.partition, record.offset, delay_s, retry_no,
                       self.settings.retry.max_retries_per_attempt, error)
        return True

    def _judge_artifact(self, finished: AttemptFinished) -> _Verdict:
        """Read and score the artifact; runs on the thread pool."""
        assert finished.artifact_uri is not None
        try:
            score = score_png(self.store.read(finished.artifact_uri))
        except (ArtifactError, InvalidImageError) as err:
            logger.warning(
                "Rejecting attempt %s of job %s: %s", finished.attempt_id, finished.job_id, err
            )
            return _Verdict(0.0, False, f"artifact unusable: {err}", unusable=True)
        accepted, reason = judge(score, self.threshold)
        return _Verdict(score.score, accepted, reason)


async def run(settings: Settings, stop: asyncio.Event) -> None:
    """Run post-processing until ``stop`` is set; see the module docstring."""
    await Postprocessor(settings).run(stop)


def main() -> int:
    return serve("postprocess", run, load_settings())


if __name__ == "__main__":
    raise SystemExit(main())
