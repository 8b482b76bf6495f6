"""Which tier's attempts a GPU worker takes next: a pure policy over queue observations.

The worker owns partitions of ``attempts.interactive``, ``attempts.standard`` and
``attempts.batch``. Before each fetch it reports how many records wait in each tier and
how long each tier has waited unserved; the policy returns the tiers whose partitions to
resume, and the worker pauses the rest. Time is passed in, so tests replay decisions.

Policies:

- ``strict``: the most important tier with queued work, so interactive never waits behind
  a batch backlog. A lower tier that has waited unserved for ``aging_s`` gets the next
  fetch, so batch is never starved.
- ``weighted``: stride scheduling over the tiers with queued work. Each tier receives
  slots in proportion to its weight while it has work, and idle tiers lend their share.
- ``fifo``: every tier's partitions stay resumed, so attempts run in arrival order
  within what the consumer fetches. It is the baseline without tiers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import StrEnum

from schemas.events import Tier

logger = logging.getLogger(__name__)

# Most important first.
TIER_PRIORITY = (Tier.INTERACTIVE, Tier.STANDARD, Tier.BATCH)


class TierPolicyName(StrEnum):
    FIFO = "fifo"
    STRICT = "strict"
    WEIGHTED = "weighted"


@dataclass(frozen=True)
class TierObservation:
    """One tier as the worker measures it before a fetch.

    Args:
        queued: records waiting in this worker's partitions of the tier (end offset minus
            position), plus records fetched but not started.
    """

    queued: int


@dataclass(frozen=True)
class TierDecision:
    """Tiers whose partitions to resume for the next fetch; every other tier is paused."""

    resume: frozenset[Tier]
    reason: str


@dataclass
class TierScheduler:
    """Stateful wrapper of a policy: it remembers what each tier was served and since when
    each tier has waited, which aging and stride scheduling need.

    Args:
        policy: one of ``TierPolicyName``.
        aging_s: seconds a queued, unserved tier waits before ``strict`` serves it next.
        weights: relative shares for ``weighted``; a missing tier gets weight 1.
    """

    policy: TierPolicyName = TierPolicyName.STRICT
    aging_s: float = 10.0
    weights: dict[Tier, float] = field(default_factory=lambda: {
        Tier.INTERACTIVE: 6.0, Tier.STANDARD: 3.0, Tier.BATCH: 1.0})
    # Monotonic seconds since which a tier has had queued work and received none.
    _waiting_since: dict[Tier, float] = field(default_factory=dict)
    # Stride scheduling pass values: records served over weight.
    _pass: dict[Tier, float] = field(default_factory=lambda: {tier: 0.0 for tier in Tier})

    def __post_init__(self) -> None:
        if self.aging_s <= 0:
            raise ValueError(f"aging_s must be positive, got {self.aging_s}")
        bad = {tier.value: weight for tier, weight in self.weights.items() if weight <= 0}
        if bad:
            raise ValueError(f"tier weights must be positive, got {bad}")

    def decide(self, observations: dict[Tier, TierObservation], now_s: float) -> TierDecision:
        """Choose the tiers to fetch from next.

        With no queued work anywhere every tier is resumed, since whatever arrives first
        has nothing ahead of it.
        """
        queued = [tier for tier in TIER_PRIORITY
                  if observations.get(tier, TierObservation(0)).queued > 0]
        for tier in Tier:
            if tier in queued:
                self._waiting_since.setdefault(tier, now_s)
            else:
                self._waiting_since.pop(tier, None)

        if self.policy is TierPolicyName.FIFO or not queued:
            return TierDecision(frozenset(Tier), "fifo" if queued else "no queued work")
        if self.policy is TierPolicyName.STRICT:
            return self._strict(queued, now_s)
        return self._weighted(queued)

    def served(self, tier: Tier, records: int, now_s: float) -> None:
        """Count records taken from ``tier``; its wait clock restarts."""
        if records <= 0:
            return
        self._pass[tier] += records / self.weights.get(tier, 1.0)
        self._waiting_since.pop(tier, None)

    def waiting_s(self, tier: Tier, now_s: float) -> float:
        since = self._waiting_since.get(tier)
        return 0.0 if since is None else now_s - since

    def _strict(self, queued: list[Tier], now_s: float) -> TierDecision:
        top = queued[0]
        aged = [tier for tier in queued[1:] if self.waiting_s(tier, now_s) >= self.aging_s]
        if aged:
            oldest = max(aged, key=lambda tier: self.waiting_s(tier, now_s))
            return TierDecision(frozenset({oldest}), f"{oldest.value} waited "
                                f"{self.waiting_s(oldest, now_s):.1f} s, past aging")
        return TierDecision(frozenset({top}), f"{top.value} is the most important queued tier")

    def _weighted(self, queued: list[Tier]) -> TierDecision:
        # A tier that was idle must not bank credit, so it starts at the lowest active pass.
        floor = min(self._pass[tier] for tier in queued)
        for tier in Tier:
            if tier not in queued:
                self._pass[tier] = max(self._pass[tier], floor)
        chosen = min(queued, key=lambda tier: (self._pass[tier], TIER_PRIORITY.index(tier)))
        return TierDecision(frozenset({chosen}), f"{chosen.value} is furthest behind its share")
