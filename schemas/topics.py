"""Topic names, derived once from the configured prefix."""

from __future__ import annotations

from dataclasses import dataclass

from schemas.events import Tier

# Delay topics ``retry.1`` to ``retry.N``: retry n waits in level min(n, N).
RETRY_LEVELS = 4


@dataclass(frozen=True)
class TopicNames:
    """Every topic the pipeline uses, under one prefix so several pipelines share a cluster."""

    prefix: str = "slotforge."

    def _name(self, suffix: str) -> str:
        return f"{self.prefix}{suffix}"

    @property
    def jobs_requested(self) -> str:
        return self._name("jobs.requested")

    @property
    def coordinator_events(self) -> str:
        """Attempt and scoring events, co-partitioned with ``jobs_requested`` by job key."""
        return self._name("coordinator.events")

    def attempts(self, tier: Tier) -> str:
        """First attempts of the tier's jobs."""
        return self._name(f"attempts.{tier.value}")

    def followups(self, tier: Tier) -> str:
        """Later attempts of the tier's jobs (retries, replacements, re-dispatches), which
        workers take before first attempts so a started job finishes before new ones."""
        return self._name(f"attempts.{tier.value}.followup")

    @property
    def attempt_topics(self) -> dict[str, Tier]:
        """Every attempts topic, first attempts and follow-ups, to its tier."""
        return {name: tier for tier in Tier
                for name in (self.attempts(tier), self.followups(tier))}

    @property
    def generated(self) -> str:
        """Finished generations waiting for post-processing."""
        return self._name("results.generated")

    @property
    def jobs_completed(self) -> str:
        return self._name("jobs.completed")

    @property
    def jobs_delivered(self) -> str:
        """Delivered or delivery-failed states, once every critical consumer answered."""
        return self._name("jobs.delivered")

    @property
    def jobs_rejected(self) -> str:
        return self._name("jobs.rejected")

    @property
    def control(self) -> str:
        """Cancellation and other commands from the coordinator to workers."""
        return self._name("attempts.control")

    @property
    def worker_status(self) -> str:
        """Periodic slot reports of GPU workers, read by every coordinator process."""
        return self._name("workers.status")

    @property
    def spans(self) -> str:
        return self._name("spans")

    @property
    def deadletter(self) -> str:
        return self._name("deadletter")

    def retry(self, level: int) -> str:
        """Delay topic of one retry level, from 1 to ``RETRY_LEVELS``."""
        if not 1 <= level <= RETRY_LEVELS:
            raise ValueError(f"retry level must be 1 to {RETRY_LEVELS}, got {level}")
        return self._name(f"retry.{level}")

    @property
    def co_partitioned(self) -> list[str]:
        """Topics that must share the partition count of ``jobs_requested``."""
        return [self.jobs_requested, self.coordinator_events]

    @property
    def all(self) -> list[str]:
        return [
            self.jobs_requested,
            self.coordinator_events,
            *self.attempt_topics,
            self.generated,
            self.jobs_completed,
            self.jobs_delivered,
            self.jobs_rejected,
            self.control,
            self.worker_status,
            self.spans,
            self.deadletter,
            *(self.retry(level) for level in range(1, RETRY_LEVELS + 1)),
        ]
