"""Admission control: admit a job, admit it at a lower tier, or reject it with a retry time.

Pure and deterministic: every observation is an argument and time is passed in, so the
live coordinator and offline tools run the same decisions. The wait of a new attempt is
estimated with the order in which workers take tiers (``strict``, ``weighted`` or
``fifo``, as in ``gpu_inference.tier_policy``); a job is admitted where its estimated
wait plus its own service time fits inside its deadline. Per-tenant token buckets keep
one tenant from taking the whole pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from schemas.events import Tier

# Lower index is more important; a downgrade moves to the next tier in this order.
TIER_ORDER = (Tier.INTERACTIVE, Tier.STANDARD, Tier.BATCH)


class AdmissionAction(StrEnum):
    ADMIT = "admit"
    DOWNGRADE = "downgrade"
    REJECT = "reject"


@dataclass(frozen=True)
class AdmissionDecision:
    action: AdmissionAction
    tier: Tier
    reason: str
    retry_after_s: float | None = None
    estimated_wait_s: float = 0.0


@dataclass(frozen=True)
class PoolLoad:
    """What the coordinator measures about the pool when a job arrives.

    Args:
        backlog_attempts: attempts waiting for a GPU slot, per tier.
        throughput_attempts_per_s: attempts the pool finishes per second, measured.
        mean_attempt_s: mean GPU time of one attempt.
        slots: GPU slots in the pool.
        downstream_lagging: a downstream stage is past its lag bound, so admission tightens.
    """

    backlog_attempts: dict[Tier, int]
    throughput_attempts_per_s: float
    mean_attempt_s: float
    slots: int
    downstream_lagging: bool = False


class WorkerTierOrder(StrEnum):
    """Order in which the workers take attempts of the tiers (their tier policy)."""

    STRICT = "strict"
    WEIGHTED = "weighted"
    FIFO = "fifo"


@dataclass(frozen=True)
class AdmissionPolicy:
    """How the workers order tiers, and the safety margin on deadlines.

    Args:
        tier_order: the workers' tier policy; the wait estimate models it.
        shares: each tier's share of the pool's throughput under ``weighted``.
    """

    tier_order: WorkerTierOrder = WorkerTierOrder.STRICT
    shares: dict[Tier, float] = field(default_factory=lambda: {
        Tier.INTERACTIVE: 0.5, Tier.STANDARD: 0.35, Tier.BATCH: 0.15})
    # The estimate must fit within this fraction of the deadline.
    deadline_fraction: float = 0.8
    # Below this measured throughput the estimate is not trusted and jobs are admitted.
    min_throughput_attempts_per_s: float = 1e-3


def estimated_wait_s(tier: Tier, load: PoolLoad, policy: AdmissionPolicy) -> float:
    """Seconds until a new attempt of ``tier`` would start, from the backlog ahead of it."""
    throughput = max(load.throughput_attempts_per_s, policy.min_throughput_attempts_per_s)
    backlog = load.backlog_attempts
    if policy.tier_order is WorkerTierOrder.FIFO:
        return sum(backlog.values()) / throughput
    if policy.tier_order is WorkerTierOrder.STRICT:
        # Workers drain every more important tier first, so all of that backlog is ahead
        # and the attempt gets the whole pool once it is at the front.
        # NOTE: attempts of more important tiers that arrive during the wait also go
        # ahead, and aging serves a starved tier early; neither is modelled.
        rank = TIER_ORDER.index(tier)
        return sum(backlog.get(other, 0) for other in TIER_ORDER[:rank + 1]) / throughput

    share = policy.shares.get(tier, 0.0)
    if share <= 0:
        return float("inf")
    # Workers serve tiers by weighted shares but never idle, so the shares of tiers with
    # nothing queued go to the tiers that have work.
    busy_shares = sum(weight for other, weight in policy.shares.items()
                      if other is tier or backlog.get(other, 0) > 0)
    return backlog.get(tier, 0) / (throughput * share / busy_shares)


def decide(
    tier: Tier,
    expected_attempts: float,
    deadline_s: float,
    allow_downgrade: bool,
    load: PoolLoad,
    policy: AdmissionPolicy,
) -> AdmissionDecision:
    """Choose where a job runs, or why it cannot.

    Args:
        tier: the tier the job asked for.
        expected_attempts: attempts the job will need (slots over the acceptance rate).
        deadline_s: the job's deadline, from now.
        allow_downgrade: whether the request accepts a lower tier.
    """
    if load.throughput_attempts_per_s < policy.min_throughput_attempts_per_s:
        return AdmissionDecision(AdmissionAction.ADMIT, tier, "no throughput measured yet")

    budget_s = deadline_s * policy.deadline_fraction
    candidates = [tier]
    if allow_downgrade:
        candidates += list(TIER_ORDER[TIER_ORDER.index(tier) + 1:])

    best_wait = float("inf")
    for candidate in candidates:
        wait_s = estimated_wait_s(candidate, load, policy)
        # The job's own attempts run in parallel on at most ``slots`` slots.
        own_s = load.mean_attempt_s * max(1.0, expected_attempts / max(1, load.slots))
        best_wait = min(best_wait, wait_s)
        if load.downstream_lagging and candidate is not Tier.INTERACTIVE and wait_s > 0:
            continue
        if wait_s + own_s <= budget_s:
            action = AdmissionAction.ADMIT if candidate is tier else AdmissionAction.DOWNGRADE
            reason = "fits its deadline" if candidate is tier else (
                f"tier {tier.value} cannot meet the deadline; {candidate.value} can")
            return AdmissionDecision(action, candidate, reason, estimated_wait_s=wait_s)

    # Retry when enough of the backlog ahead has drained for the job to fit.
    overshoot_s = best_wait + load.mean_attempt_s - budget_s
    retry_after_s = max(1.0, overshoot_s) if best_wait != float("inf") else 60.0
    reason = (f"estimated wait {best_wait:.1f} s exceeds {policy.deadline_fraction:.0%} of the "
              f"{deadline_s:.0f} s deadline in tier {tier.value}")
    if load.downstream_lagging:
        reason = "downstream stages are lagging; " + reason
    return AdmissionDecision(AdmissionAction.REJECT, tier, reason, retry_after_s=retry_after_s,
                             estimated_wait_s=best_wait)


@dataclass
class TokenBucket:
    """A tenant's quota in slots: ``rate_per_s`` refill, ``burst`` capacity."""

    rate_per_s: float
    burst: float
    tokens: float = -1.0
    updated_s: float = 0.0

    def take(self, amount: float, now_s: float) -> float | None:
        """Take ``amount`` tokens; returns None on success, else seconds until it would fit."""
        if self.tokens < 0:
            self.tokens, self.updated_s = self.burst, now_s
        self.tokens = min(self.burst, self.tokens + (now_s - self.updated_s) * self.rate_per_s)
        self.updated_s = now_s
        if amount > self.burst:
            return float("inf")
        if self.tokens >= amount:
            self.tokens -= amount
            return None
        return (amount - self.tokens) / self.rate_per_s if self.rate_per_s > 0 else float("inf")


class TenantQuotas:
    """One token bucket per tenant, all with the same rate and burst."""

    def __init__(self, rate_per_s: float, burst: float) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._buckets: dict[str, TokenBucket] = {}

    def take(self, tenant_id: str, slots: int, now_s: float) -> float | None:
        bucket = self._buckets.setdefault(tenant_id, TokenBucket(self.rate_per_s, self.burst))
        return bucket.take(slots, now_s)
