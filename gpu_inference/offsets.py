"""Offset tracking and flow control for consumers that process records concurrently.

A record fetched at offset N may finish after one fetched at N+1. The consumer may commit a
partition only up to its oldest unfinished record, or a crash would skip that record.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
    ConsumerRecord,
    TopicPartition,
)
from aiokafka.errors import KafkaError

from streams.tracing import Tracing

logger = logging.getLogger(__name__)


@dataclass
class _PartitionOffsets:
    # Offsets in fetch order, mapped to whether their record is finished.
    pending: dict[int, bool] = field(default_factory=dict)
    last_tracked: int = -1
    # Next offset to commit: one past the newest record finished with all older ones.
    commit_offset: int | None = None
    committed: int | None = None


class OffsetTracker:
    """Track fetched and finished offsets per partition and compute what may be committed.

    Offsets need not be consecutive, because compaction and transaction markers leave gaps.
    Only tracked offsets count, so a gap does not block the commit point.
    """

    def __init__(self) -> None:
        self._partitions: dict[TopicPartition, _PartitionOffsets] = {}

    def track(self, partition: TopicPartition, offset: int) -> None:
        """Record that the consumer took the record at ``offset``.

        Raises:
            ValueError: ``offset`` is not above the last offset tracked for the partition;
                call ``forget`` first when the consumer seeks back.
        """
        state = self._partitions.setdefault(partition, _PartitionOffsets())
        if offset <= state.last_tracked:
            raise ValueError(
                f"offset {offset} of {partition.topic}[{partition.partition}] is not above the "
                f"last tracked offset {state.last_tracked}; call forget() after a seek"
            )
        state.pending[offset] = False
        state.last_tracked = offset

    def finish(self, partition: TopicPartition, offset: int) -> None:
        """Mark a tracked record as finished; unknown partitions and offsets are ignored.

        A record of a revoked partition may finish after ``forget``; it has nothing to commit.
        """
        state = self._partitions.get(partition)
        if state is None or offset not in state.pending:
            return
        state.pending[offset] = True
        # Pop the finished prefix; dicts keep insertion order, which is fetch order.
        while state.pending:
            oldest = next(iter(state.pending))
            if not state.pending[oldest]:
                break
            del state.pending[oldest]
            state.commit_offset = oldest + 1

    def in_flight(self, partition: TopicPartition | None = None) -> int:
        """Return how many tracked records are unfinished, in one partition or in all."""
        if partition is not None:
            state = self._partitions.get(partition)
            return 0 if state is None else sum(1 for done in state.pending.values() if not done)
        return sum(self.in_flight(tp) for tp in self._partitions)

    def committable(
        self, partitions: set[TopicPartition] | None = None
    ) -> dict[TopicPartition, int]:
        """Return the next offset to commit for each partition advanced since its last commit."""
        offsets: dict[TopicPartition, int] = {}
        for partition, state in self._partitions.items():
            if partitions is not None and partition not in partitions:
                continue
            if state.commit_offset is not None and state.commit_offset != state.committed:
                offsets[partition] = state.commit_offset
        return offsets

    def mark_committed(self, offsets: dict[TopicPartition, int]) -> None:
        for partition, offset in offsets.items():
            state = self._partitions.get(partition)
            if state is not None:
                state.committed = offset

    def forget(self, partitions: set[TopicPartition] | list[TopicPartition]) -> None:
        """Drop the state of partitions that this consumer no longer owns."""
        for partition in partitions:
            self._partitions.pop(partition, None)


class FlowControlledConsumer:
    """Fetch records only while the caller has free capacity, and commit finished offsets.

    While the caller is full, every assigned partition is paused and ``getmany`` is still
    called about once a second, so the member stays within ``max_poll_interval_ms``. The
    rebalance listener pauses newly assigned partitions while full, because aiokafka resets
    the paused state of partitions on every assignment.

    Before giving up partitions in a rebalance, the listener waits up to ``REVOKE_GRACE_S`` for
    their in-flight records and commits them, so the new owner does not process them again.
    Records still in flight after that are processed twice.
    """

    # Seconds between polls while every partition is paused.
    IDLE_POLL_S = 1.0
    # Seconds a rebalance waits for in-flight records of revoked partitions; the whole group
    # waits with it, so this stays well below the rebalance timeout (max_poll_interval_ms).
    REVOKE_GRACE_S = 10.0

    def __init__(self, consumer: AIOKafkaConsumer, group_id: str) -> None:
        self.consumer = consumer
        self.group_id = group_id
        # The whole group waits out the grace, so it must end well within the rebalance
        # timeout, which aiokafka sets to max_poll_interval_ms. Past it, members get evicted
        # and rejoin in a loop.
        poll_interval_s = getattr(consumer, "_max_poll_interval_ms", 300_000) / 1000
        self.revoke_grace_s = min(self.REVOKE_GRACE_S, poll_interval_s / 3)
        self.tracker = OffsetTracker()
        self._backlog: deque[ConsumerRecord[bytes, bytes]] = deque()
        self._full = False
        # Topics a tier policy allows fetching from; None allows every assigned topic.
        self._allowed: set[str] | None = None
        # Called with the partitions this member gains, and with those it gave up after
        # their in-flight records finished or the grace period ran out.
        self.assigned_hooks: list[Callable[[set[TopicPartition]], None]] = []
        self.revoked_hooks: list[Callable[[set[TopicPartition]], None]] = []
        self._wake = asyncio.Event()
        self._finished = asyncio.Event()

    def subscribe(self, topics: Iterable[str]) -> None:
        self.consumer.subscribe(list(topics), listener=_FlowControlListener(self))

    def wake(self) -> None:
        """Wake a ``fetch`` that waits for capacity; call it when a record finishes."""
        self._wake.set()

    def start(self, record: ConsumerRecord[bytes, bytes]) -> None:
        """Track a record that the caller started processing."""
        self.tracker.track(TopicPartition(record.topic, record.partition), record.offset)

    def finish(self, record: ConsumerRecord[bytes, bytes]) -> None:
        """Mark a started record as finished, so its offset may be committed."""
        self.tracker.finish(TopicPartition(record.topic, record.partition), record.offset)
        self._wake.set()
        self._finished.set()

    def _set_full(self, full: bool) -> None:
        assigned = self.consumer.assignment()
        if full:
            to_pause = assigned - self.consumer.paused()
            if to_pause:
                self.consumer.pause(*to_pause)
        else:
            self._apply_allowed(assigned)
        self._full = full

    def _apply_allowed(self, assigned: set[TopicPartition]) -> None:
        """Resume the partitions of allowed topics and pause the others."""
        paused = self.consumer.paused() & assigned
        wanted = {tp for tp in assigned if self._allowed is None or tp.topic in self._allowed}
        to_resume = paused & wanted
        to_pause = (assigned - wanted) - paused
        if to_resume:
            self.consumer.resume(*to_resume)
        if to_pause:
            self.consumer.pause(*to_pause)

    def buffered(self) -> collections.Counter[str]:
        """Count records fetched but not yet started, by topic."""
        return collections.Counter(record.topic for record in self._backlog)

    async def fetch(
        self, free: int, stop: asyncio.Event, timeout_ms: int = 500,
        topics: set[str] | None = None,
    ) -> list[ConsumerRecord[bytes, bytes]]:
        """Return at most ``free`` records to start; an empty list when none arrived in time.

        With ``free`` at 0 it pauses every assigned partition and waits until ``wake`` or
        ``stop`` is set, or ``IDLE_POLL_S`` passes. ``topics`` limits the fetch to those
        topics' partitions and pauses the rest; None fetches from every assigned topic.
        """
        self._wake.clear()
        self._allowed = topics
        if free <= 0:
            self._set_full(True)
            waiters = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
            try:
                await asyncio.wait(
                    waiters, timeout=self.IDLE_POLL_S, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for waiter in waiters:
                    waiter.cancel()
            # Paused partitions return nothing; the call only records that this member polls.
            self._keep(await self.consumer.getmany(timeout_ms=0, max_records=1))
            return []

        self._set_full(False)
        if not any(self._allows(record) for record in self._backlog):
            self._keep(await self.consumer.getmany(timeout_ms=timeout_ms, max_records=free))
        records: list[ConsumerRecord[bytes, bytes]] = []
        kept: deque[ConsumerRecord[bytes, bytes]] = deque()
        while self._backlog:
            record = self._backlog.popleft()
            if len(records) < free and self._allows(record):
                records.append(record)
            else:
                kept.append(record)
        self._backlog = kept
        return records

    def _allows(self, record: ConsumerRecord[bytes, bytes]) -> bool:
        return self._allowed is None or record.topic in self._allowed

    def _keep(self, batch: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]) -> None:
        # Records beyond the free capacity wait here; fetching stops until they are taken.
        for records in batch.values():
            self._backlog.extend(records)

    async def commit(self, partitions: set[TopicPartition] | None = None) -> None:
        """Commit the finished offsets that advanced since the last commit."""
        offsets = self.tracker.committable(partitions)
        if not offsets:
            return
        await self.consumer.commit(offsets)
        self.tracker.mark_committed(offsets)
        logger.debug("Committed offsets %s for group %s", offsets, self.group_id)

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        # Untracked records of revoked partitions belong to the new owner, so none may start.
        owned_records = [record for record in self._backlog
                if TopicPartition(record.topic, record.partition) not in revoked]
        self._backlog = deque(owned_records)
        await self._wait_for_in_flight(revoked, self.revoke_grace_s)
        try:
            await self.commit(revoked)
        except Exception:  # noqa: BLE001 - the new owner re-reads uncommitted records
            logger.exception("Failed to commit offsets of revoked partitions %s", sorted(revoked))
        running = sum(self.tracker.in_flight(partition) for partition in revoked)
        if running:
            logger.warning(
                "%d records are still in flight on revoked partitions after %.0f s; their new "
                "owner will process them again",
                running,
                self.revoke_grace_s,
            )
        self.tracker.forget(revoked)
        for hook in self.revoked_hooks:
            hook(revoked)

    async def _wait_for_in_flight(self, partitions: set[TopicPartition], timeout_s: float) -> None:
        running = sum(self.tracker.in_flight(partition) for partition in partitions)
        if running:
            logger.info(
                "Group %s: waiting up to %.0f s for %d in-flight records of revoked partitions",
                self.group_id,
                timeout_s,
                running,
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while any(self.tracker.in_flight(partition) for partition in partitions):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._finished.clear()
            try:
                await asyncio.wait_for(self._finished.wait(), remaining)
            except TimeoutError:
                return

    def on_assigned(self, assigned: set[TopicPartition]) -> None:
        logger.info(
            "Group %s assigned partitions: %s",
            self.group_id,
            ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(assigned)) or "none",
        )
        for hook in self.assigned_hooks:
            hook(assigned)
        if self._full and assigned:
            self.consumer.pause(*assigned)
        elif self._allowed is not None:
            excluded = {tp for tp in assigned if tp.topic not in self._allowed}
            if excluded:
                self.consumer.pause(*excluded)


class _FlowControlListener(ConsumerRebalanceListener):
    def __init__(self, owner: FlowControlledConsumer) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self.owner.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self.owner.on_assigned(set(assigned))


async def commit_and_flush(fetcher: FlowControlledConsumer, tracing: Tracing,
                           producer: AIOKafkaProducer) -> None:
    """Commit finished offsets and publish pending spans on stop, logging what fails."""
    try:
        await fetcher.commit()
    except KafkaError:
        logger.exception("Failed to commit offsets of group %s on stop", fetcher.group_id)
    try:
        await tracing.flush(producer)
    except KafkaError:
        logger.exception("Failed to flush spans on stop")
