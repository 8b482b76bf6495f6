"""A request rate shared by every process of one consumer group, through partition ownership.

A stage calling an external API at most ``rate_per_s`` times per second splits that rate
evenly over the partitions of the topic it consumes. Kafka gives each partition to exactly
one member of the group, and a process may call the API for a record only with a permit of
that record's partition. Each partition's permits are spaced ``partitions / rate_per_s``
seconds apart, so the group's calls in any second add up to at most ``rate_per_s`` (rounded
up per partition) however many processes run, with no coordination beyond the group.

At a rebalance the old owner finishes its revoke callback before the new owner is assigned
the partition (the eager protocol aiokafka uses). A newly assigned partition issues its
first permit one interval after assignment, so the spacing also holds across a handover.
The cost is that an idle partition's share goes unused; the generated topic is keyed by
attempt id, so partitions receive similar loads.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from aiokafka import TopicPartition

from schemas.errors import TransientError

logger = logging.getLogger(__name__)


class PartitionRevokedError(TransientError):
    """The partition moved to another process while a record waited for a permit."""


class PartitionRateLimiter:
    """Permits for calls on behalf of records, spaced per owned partition.

    Args:
        rate_per_s: the group's whole rate.
        partitions: partitions of the consumed topic, the number the rate is split over.
    """

    def __init__(self, rate_per_s: float, partitions: int) -> None:
        if rate_per_s <= 0:
            raise ValueError(f"rate_per_s must be positive, got {rate_per_s}")
        if partitions < 1:
            raise ValueError(f"partitions must be at least 1, got {partitions}")
        self.rate_per_s = rate_per_s
        self.partitions = partitions
        self.interval_s = partitions / rate_per_s
        # Loop time at which each owned partition's next permit is issued.
        self._next_at: dict[TopicPartition, float] = {}

    def assigned(self, partitions: Iterable[TopicPartition]) -> None:
        now = asyncio.get_running_loop().time()
        for partition in partitions:
            self._next_at.setdefault(partition, now + self.interval_s)

    def revoked(self, partitions: Iterable[TopicPartition]) -> None:
        for partition in partitions:
            self._next_at.pop(partition, None)

    async def acquire(self, partition: TopicPartition) -> None:
        """Wait for the partition's next permit.

        Raises:
            PartitionRevokedError: the partition is not owned by this process (any more).
        """
        loop = asyncio.get_running_loop()
        while True:
            next_at = self._next_at.get(partition)
            if next_at is None:
                raise PartitionRevokedError(
                    f"partition {partition.topic}[{partition.partition}] is not owned by this "
                    "process; its new owner handles the record")
            now = loop.time()
            if next_at <= now:
                # Spacing counts from the permit actually taken, so permits not taken while
                # idle are not saved up and no burst follows a pause.
                self._next_at[partition] = now + self.interval_s
                return
            await asyncio.sleep(next_at - now)
