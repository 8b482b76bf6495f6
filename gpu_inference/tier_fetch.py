"""Feed a worker's tier policy with queue depths measured on its own partitions.

Each measurement requests the end offsets of the worker's assigned attempts partitions and
subtracts the consumer's positions, so paused partitions are measured without fetching their
records. Between measurements the depths are lowered by the records the worker takes.

Within a tier, follow-up attempts (retries, replacements, re-dispatches of started jobs)
come first: while a tier's follow-up topic has records queued, only it is fetched for that
tier, so a started job's later attempts do not wait behind newer jobs' first attempts.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time

from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError

from gpu_inference.offsets import FlowControlledConsumer
from gpu_inference.tier_policy import TierObservation, TierPolicyName, TierScheduler
from schemas.events import Tier

logger = logging.getLogger(__name__)


class TierFetchPlanner:
    """Choose the attempts topics of the next fetch with a ``TierScheduler``.

    Args:
        fetcher: the worker's flow-controlled consumer.
        topics: attempts topic name to its tier, follow-up topics included.
        refresh_s: seconds between end-offset measurements.
        followups: the topics of ``topics`` that carry follow-up attempts.
    """

    def __init__(self, fetcher: FlowControlledConsumer, topics: dict[str, Tier],
                 scheduler: TierScheduler, refresh_s: float,
                 followups: set[str] | frozenset[str] = frozenset()) -> None:
        self.fetcher = fetcher
        self.topics = topics
        self.scheduler = scheduler
        self.refresh_s = refresh_s
        self.followups = frozenset(followups)
        self._queued: dict[str, int] = {topic: 0 for topic in topics}
        self._measured_at = float("-inf")
        self._measured_partitions: frozenset[TopicPartition] = frozenset()
        self._refresh: asyncio.Task[None] | None = None
        self._last_reason = ""

    async def close(self) -> None:
        """Cancel a refresh still running; call before the consumer stops."""
        if self._refresh is not None and not self._refresh.done():
            self._refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh

    async def topics_for_fetch(self) -> set[str] | None:
        """Return the topics to fetch from next, or None for every topic (``fifo``)."""
        # NOTE: ``fifo`` takes follow-ups in arrival order too, as it measures no depths.
        if self.scheduler.policy is TierPolicyName.FIFO:
            return None
        partitions = frozenset(tp for tp in self.fetcher.consumer.assignment()
                               if tp.topic in self.topics)
        if not partitions:
            # Before the first assignment nothing is measured, so nothing may be fetched:
            # the poll only joins the group, and new partitions arrive paused.
            return set()
        now_s = time.monotonic()
        if partitions != self._measured_partitions:
            await self._measure(partitions)
            self._measured_at = now_s
            self._measured_partitions = partitions
        elif now_s - self._measured_at >= self.refresh_s and (
                self._refresh is None or self._refresh.done()):
            # A routine refresh runs beside the fetch, so a free slot does not wait for it.
            self._measured_at = now_s
            self._refresh = asyncio.create_task(self._measure(partitions))
        buffered = self.fetcher.buffered()
        queued = {topic: count + buffered.get(topic, 0) for topic, count in self._queued.items()}
        observations = {
            tier: TierObservation(queued=sum(
                count for topic, count in queued.items() if self.topics[topic] is tier))
            for tier in Tier
        }
        decision = self.scheduler.decide(observations, now_s)
        if decision.reason != self._last_reason:
            logger.debug("Tier decision: fetch %s (%s); queued %s",
                         ", ".join(sorted(tier.value for tier in decision.resume)),
                         decision.reason,
                         {tier.value: item.queued for tier, item in observations.items()})
            self._last_reason = decision.reason
        return self._lanes(decision.resume, queued)

    def _lanes(self, tiers: frozenset[Tier], queued: dict[str, int]) -> set[str]:
        """Return the topics of the chosen tiers: only the follow-up topic of a tier with some
        queued.

        A tier whose follow-ups measure empty keeps both topics, so a follow-up published
        since the last measurement is still fetched.
        """
        chosen: set[str] = set()
        for tier in tiers:
            topics = {topic for topic, owner in self.topics.items() if owner is tier}
            waiting = {topic for topic in topics & self.followups if queued.get(topic, 0) > 0}
            chosen |= waiting or topics
        return chosen

    def taken(self, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        """Count records the worker started against their tiers."""
        now_s = time.monotonic()
        counts = collections.Counter(record.topic for record in records
                                     if record.topic in self.topics)
        for topic, count in counts.items():
            self.scheduler.served(self.topics[topic], count, now_s)
            self._queued[topic] = max(0, self._queued[topic] - count)

    async def _measure(self, partitions: frozenset[TopicPartition]) -> None:
        consumer = self.fetcher.consumer
        try:
            ends: dict[TopicPartition, int] = await consumer.end_offsets(list(partitions))
        except (KafkaError, IllegalStateError) as err:
            # The last depths stay in use; the next fetch measures again.
            logger.warning("Failed to read end offsets of %d attempts partitions: %s",
                           len(partitions), err)
            return
        queued = {topic: 0 for topic in self.topics}
        for tp in partitions:
            try:
                position = await consumer.position(tp)
            except Exception as err:  # noqa: BLE001 - revoked mid-measurement; skip it
                logger.debug("No position for %s[%d]: %s", tp.topic, tp.partition, err)
                continue
            queued[tp.topic] += max(0, ends.get(tp, position) - position)
        self._queued = queued
