"""Admission decisions at the edges, and tenant quotas."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest

from schemas.events import AttemptDispatched, GenerationParams, JobRequested, Tier, decode_event
from streams.admission import (
    AdmissionAction,
    AdmissionPolicy,
    PoolLoad,
    TenantQuotas,
    TokenBucket,
    WorkerTierOrder,
    decide,
    estimated_wait_s,
)
from streams.client import JobRejectedError, SlotforgeClient
from streams.config import Settings
from streams.processes import ProcessGroup
from tests.kafka_helpers import TopicReader

# The share model is the weighted tier order; strict and fifo have their own tests.
POLICY = AdmissionPolicy(tier_order=WorkerTierOrder.WEIGHTED)
STRICT = AdmissionPolicy(tier_order=WorkerTierOrder.STRICT)


def _load(backlog: dict[Tier, int], lagging: bool = False) -> PoolLoad:
    return PoolLoad(backlog_attempts=backlog, throughput_attempts_per_s=10.0,
                    mean_attempt_s=1.0, slots=8, downstream_lagging=lagging)


def test_empty_pool_admits() -> None:
    decision = decide(Tier.STANDARD, 8, 60, False, _load({}), POLICY)
    assert decision.action == AdmissionAction.ADMIT
    assert decision.tier == Tier.STANDARD


def test_wait_just_inside_deadline_admits() -> None:
    # With batch work queued too, standard gets 0.35/0.5 of 10 attempts/s = 7 attempts/s,
    # so 329 queued attempts wait 47 s; with its own 1 s that fits 80% of 60 s.
    backlog = {Tier.STANDARD: 329, Tier.BATCH: 50}
    decision = decide(Tier.STANDARD, 4, 60, False, _load(backlog), POLICY)
    assert decision.action == AdmissionAction.ADMIT
    assert math.isclose(decision.estimated_wait_s, 329 / 7.0)


def test_wait_just_past_deadline_rejects() -> None:
    backlog = {Tier.STANDARD: 340, Tier.BATCH: 50}
    decision = decide(Tier.STANDARD, 4, 60, False, _load(backlog), POLICY)
    assert decision.action == AdmissionAction.REJECT
    assert decision.retry_after_s is not None and decision.retry_after_s >= 1.0
    assert "deadline" in decision.reason


def test_idle_tiers_lend_their_share() -> None:
    decision = decide(Tier.STANDARD, 4, 60, False, _load({Tier.STANDARD: 400}), POLICY)
    assert math.isclose(decision.estimated_wait_s, 40.0)
    assert decision.action == AdmissionAction.ADMIT


def test_downgrade_when_request_allows() -> None:
    backlog = {Tier.INTERACTIVE: 500, Tier.STANDARD: 0}
    decision = decide(Tier.INTERACTIVE, 4, 30, True, _load(backlog), POLICY)
    assert decision.action == AdmissionAction.DOWNGRADE
    assert decision.tier == Tier.STANDARD


def test_no_downgrade_without_permission() -> None:
    backlog = {Tier.INTERACTIVE: 500, Tier.STANDARD: 0}
    decision = decide(Tier.INTERACTIVE, 4, 30, False, _load(backlog), POLICY)
    assert decision.action == AdmissionAction.REJECT


def test_lagging_downstream_tightens_lower_tiers() -> None:
    backlog = {Tier.STANDARD: 10}
    assert decide(Tier.STANDARD, 4, 600, False, _load(backlog), POLICY).action \
        == AdmissionAction.ADMIT
    lagging = decide(Tier.STANDARD, 4, 600, False, _load(backlog, lagging=True), POLICY)
    assert lagging.action == AdmissionAction.REJECT
    assert "lagging" in lagging.reason


def test_unmeasured_pool_admits() -> None:
    load = PoolLoad(backlog_attempts={Tier.BATCH: 10_000}, throughput_attempts_per_s=0.0,
                    mean_attempt_s=1.0, slots=8)
    assert decide(Tier.BATCH, 4, 10, False, load, POLICY).action == AdmissionAction.ADMIT


def test_strict_wait_counts_more_important_tiers() -> None:
    # Workers drain interactive, then standard, then batch, each at the full 10 attempts/s.
    load = _load({Tier.INTERACTIVE: 20, Tier.STANDARD: 30, Tier.BATCH: 100})
    assert math.isclose(estimated_wait_s(Tier.INTERACTIVE, load, STRICT), 2.0)
    assert math.isclose(estimated_wait_s(Tier.STANDARD, load, STRICT), 5.0)
    assert math.isclose(estimated_wait_s(Tier.BATCH, load, STRICT), 15.0)


def test_strict_interactive_ignores_lower_backlog() -> None:
    decision = decide(Tier.INTERACTIVE, 4, 20, False, _load({Tier.BATCH: 1_000}), STRICT)
    assert decision.action == AdmissionAction.ADMIT
    assert decision.estimated_wait_s == 0.0


def test_strict_rejects_standard_behind_backlog() -> None:
    # 200 attempts ahead wait 20 s, over 80% of a 20 s deadline; batch waits longer still,
    # so a downgrade does not help either.
    backlog = {Tier.INTERACTIVE: 50, Tier.STANDARD: 150}
    decision = decide(Tier.STANDARD, 4, 20, True, _load(backlog), STRICT)
    assert decision.action == AdmissionAction.REJECT
    assert math.isclose(decision.estimated_wait_s, 20.0)


def test_fifo_wait_counts_every_tier() -> None:
    fifo = AdmissionPolicy(tier_order=WorkerTierOrder.FIFO)
    load = _load({Tier.INTERACTIVE: 20, Tier.STANDARD: 30, Tier.BATCH: 100})
    assert math.isclose(estimated_wait_s(Tier.INTERACTIVE, load, fifo), 15.0)


def test_token_bucket_refills_at_rate() -> None:
    bucket = TokenBucket(rate_per_s=2.0, burst=4.0)
    assert bucket.take(4, now_s=0.0) is None
    wait = bucket.take(2, now_s=0.0)
    assert wait is not None and math.isclose(wait, 1.0)
    assert bucket.take(2, now_s=1.0) is None


def test_request_larger_than_burst_never_fits() -> None:
    assert TokenBucket(rate_per_s=1.0, burst=4.0).take(5, now_s=0.0) == math.inf


def test_quota_isolated_between_tenants() -> None:
    quotas = TenantQuotas(rate_per_s=1.0, burst=8.0)
    assert quotas.take("greedy", 8, now_s=0.0) is None
    assert quotas.take("greedy", 4, now_s=0.0) is not None
    assert quotas.take("quiet", 8, now_s=0.0) is None


@pytest.mark.integration
async def test_quota_rejects_reach_client(settings: Settings, service_env: dict[str, str],
                                          tmp_path: Path) -> None:
    group = ProcessGroup(tmp_path / "logs", {
        **service_env,
        "SLOTFORGE_COORDINATOR__RACING_POLICY": "sequential",
        "SLOTFORGE_COORDINATOR__TENANT_QUOTA_SLOTS_PER_S": "0.5",
        "SLOTFORGE_COORDINATOR__TENANT_QUOTA_BURST_SLOTS": "4",
    })
    group.start("coordinator")

    def request(tenant: str, index: int) -> JobRequested:
        return JobRequested(tenant_id=tenant, user_id="u",
                            params=GenerationParams(model="M1", prompt=f"plan {index}",
                                                    steps=5), slots=4)

    greedy = [request("greedy", index) for index in range(2)]
    quiet = request("quiet", 9)
    try:
        async with SlotforgeClient(settings.kafka) as client, \
                TopicReader(settings.kafka, settings.topics.attempts(Tier.STANDARD)) as attempts:
            for job in [*greedy, quiet]:
                await client.submit(job)
            with pytest.raises(JobRejectedError) as caught:
                await client.wait(greedy[1].job_id, timeout_s=120)
            records = await attempts.wait_for(lambda seen: len(seen) >= 8, timeout_s=60)
    finally:
        await asyncio.to_thread(group.stop_all, 15)

    assert "quota" in caught.value.reason
    assert caught.value.retry_after_s is not None
    assert 0 < caught.value.retry_after_s <= 8.0
    dispatched_jobs = {decode_event(r.value, AttemptDispatched).job_id for r in records}
    assert dispatched_jobs == {greedy[0].job_id, quiet.job_id}
