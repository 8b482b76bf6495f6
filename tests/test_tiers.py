"""Tier consumption policies: the pure scheduler, then a GPU worker on the real broker."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import pytest

from gpu_inference.tier_policy import TierObservation, TierPolicyName, TierScheduler
from gpu_inference.worker import GpuWorker
from schemas.events import (
    AttemptDispatched,
    AttemptStarted,
    GenerationParams,
    Tier,
    decode_event,
    encode_event,
    utc_now,
)
from streams.config import Settings, SimulationSettings
from streams.kafka import make_producer
from tests.kafka_helpers import ClaimGranter, TopicReader


def _observe(interactive: int = 0, standard: int = 0, batch: int = 0
             ) -> dict[Tier, TierObservation]:
    return {Tier.INTERACTIVE: TierObservation(interactive),
            Tier.STANDARD: TierObservation(standard), Tier.BATCH: TierObservation(batch)}


def test_strict_prefers_interactive() -> None:
    scheduler = TierScheduler(TierPolicyName.STRICT, aging_s=10.0)
    decision = scheduler.decide(_observe(interactive=1, batch=50), now_s=0.0)
    assert decision.resume == {Tier.INTERACTIVE}


def test_strict_serves_next_tier_when_top_empty() -> None:
    scheduler = TierScheduler(TierPolicyName.STRICT, aging_s=10.0)
    decision = scheduler.decide(_observe(standard=3, batch=50), now_s=0.0)
    assert decision.resume == {Tier.STANDARD}


def test_strict_ages_starved_tier() -> None:
    scheduler = TierScheduler(TierPolicyName.STRICT, aging_s=5.0)
    assert scheduler.decide(_observe(interactive=9, batch=9), now_s=0.0).resume == {
        Tier.INTERACTIVE}
    scheduler.served(Tier.INTERACTIVE, 1, now_s=4.9)
    assert scheduler.decide(_observe(interactive=9, batch=9), now_s=4.9).resume == {
        Tier.INTERACTIVE}
    assert scheduler.decide(_observe(interactive=9, batch=9), now_s=5.0).resume == {Tier.BATCH}

    # Once served, batch waits a full aging period again.
    scheduler.served(Tier.BATCH, 1, now_s=5.0)
    assert scheduler.decide(_observe(interactive=9, batch=9), now_s=5.1).resume == {
        Tier.INTERACTIVE}


def test_idle_everywhere_resumes_all_tiers() -> None:
    scheduler = TierScheduler(TierPolicyName.STRICT)
    assert scheduler.decide(_observe(), now_s=0.0).resume == set(Tier)


def test_fifo_resumes_all_tiers() -> None:
    scheduler = TierScheduler(TierPolicyName.FIFO)
    assert scheduler.decide(_observe(interactive=1, batch=5), now_s=0.0).resume == set(Tier)


def test_weighted_shares_follow_weights() -> None:
    scheduler = TierScheduler(TierPolicyName.WEIGHTED, weights={
        Tier.INTERACTIVE: 6.0, Tier.STANDARD: 3.0, Tier.BATCH: 1.0})
    served = {tier: 0 for tier in Tier}
    for step in range(1_000):
        (tier,) = scheduler.decide(_observe(9, 9, 9), now_s=float(step)).resume
        scheduler.served(tier, 1, now_s=float(step))
        served[tier] += 1
    assert served[Tier.INTERACTIVE] == pytest.approx(600, abs=2)
    assert served[Tier.STANDARD] == pytest.approx(300, abs=2)
    assert served[Tier.BATCH] == pytest.approx(100, abs=2)


def test_weighted_idle_tier_banks_no_credit() -> None:
    scheduler = TierScheduler(TierPolicyName.WEIGHTED, weights={
        Tier.INTERACTIVE: 1.0, Tier.STANDARD: 1.0, Tier.BATCH: 1.0})
    for step in range(100):
        (tier,) = scheduler.decide(_observe(batch=9), now_s=float(step)).resume
        scheduler.served(tier, 1, now_s=float(step))
    taken = []
    for step in range(100, 110):
        (tier,) = scheduler.decide(_observe(interactive=9, batch=9), now_s=float(step)).resume
        scheduler.served(tier, 1, now_s=float(step))
        taken.append(tier)
    # After 100 batch records the newly busy tier alternates instead of taking 100 in a row.
    assert taken.count(Tier.BATCH) >= 4


def test_scheduler_rejects_bad_weights() -> None:
    with pytest.raises(ValueError, match="positive"):
        TierScheduler(TierPolicyName.WEIGHTED, weights={Tier.BATCH: 0.0})


# ---- a GPU worker on the real broker ----------------------------------------------------------

def _attempt(tier: Tier, index: int, *, followup: bool = False) -> AttemptDispatched:
    return AttemptDispatched(
        attempt_id=f"{tier.value}-{index}-{uuid.uuid4().hex[:8]}", job_id=uuid.uuid4().hex,
        job_key=f"acme:{tier.value}-{index}", tenant_id="acme", slot=0, attempt_no=1,
        params=GenerationParams(model="M1", prompt="plan", steps=2), seed=index,
        tier=tier, deadline_at=utc_now() + timedelta(seconds=300), followup=followup,
    )


async def _enqueue(settings: Settings, attempts: list[AttemptDispatched]) -> None:
    producer = make_producer(settings.kafka)
    await producer.start()
    try:
        for attempt in attempts:
            topic = (settings.topics.followups(attempt.tier) if attempt.followup
                     else settings.topics.attempts(attempt.tier))
            await producer.send_and_wait(topic,
                                         encode_event(attempt),
                                         key=attempt.attempt_id.encode())
    finally:
        await producer.stop()


def _tier_settings(settings: Settings, policy: str, **changes: Any) -> Settings:
    worker = settings.worker.model_copy(update={
        "tier_policy": policy, "slots": 1,
        "simulation": SimulationSettings(enabled=True, p50_s=0.05, sigma=0.0),
        **changes,
    })
    return settings.model_copy(update={"worker": worker})


async def _start_order(settings: Settings, expected: int) -> list[Tier]:
    """Run one worker until ``expected`` attempts started; return their tiers in order."""
    return [Tier(attempt_id.split("-", 1)[0])
            for attempt_id in await _started(settings, expected)]


async def _started(settings: Settings, expected: int) -> list[str]:
    """Run one worker until ``expected`` attempts started; return their ids in order."""
    stop = asyncio.Event()
    async with ClaimGranter(settings.kafka), \
            TopicReader(settings.kafka, settings.topics.coordinator_events) as events:
        task = asyncio.create_task(GpuWorker(settings).run(stop))
        try:
            await events.wait_for(
                lambda seen: sum(b'"attempt.started"' in (r.value or b"") for r in seen)
                >= expected, timeout_s=120)
        finally:
            stop.set()
            await asyncio.wait_for(task, timeout=90)
    started = [decode_event(record.value, AttemptStarted) for record in events.records
               if b'"attempt.started"' in (record.value or b"")]
    started.sort(key=lambda event: event.started_at)
    return [event.attempt_id for event in started]


@pytest.mark.integration
async def test_interactive_runs_before_batch_backlog(settings: Settings) -> None:
    configured = _tier_settings(settings, "strict", tier_aging_s=600.0)
    # The batch backlog is older than every interactive attempt.
    await _enqueue(configured, [_attempt(Tier.BATCH, index) for index in range(12)])
    await _enqueue(configured, [_attempt(Tier.INTERACTIVE, index) for index in range(4)])

    order = await _start_order(configured, expected=8)

    assert order[:4] == [Tier.INTERACTIVE] * 4
    assert order[4:8] == [Tier.BATCH] * 4


@pytest.mark.integration
async def test_batch_not_starved_by_interactive(settings: Settings) -> None:
    configured = _tier_settings(settings, "strict", tier_aging_s=0.5)
    await _enqueue(configured, [_attempt(Tier.BATCH, index) for index in range(3)])
    await _enqueue(configured, [_attempt(Tier.INTERACTIVE, index) for index in range(40)])

    order = await _start_order(configured, expected=30)

    # Interactive work never ran out during these 30 starts, yet batch got slots.
    assert order[0] is Tier.INTERACTIVE
    assert Tier.BATCH in order
    assert order.count(Tier.BATCH) <= 3


@pytest.mark.integration
async def test_followups_run_before_older_first_attempts(settings: Settings) -> None:
    configured = _tier_settings(settings, "strict")
    # First attempts of new jobs were queued before the follow-ups of started jobs.
    firsts = [_attempt(Tier.STANDARD, index) for index in range(40)]
    followups = [_attempt(Tier.STANDARD, 100 + index, followup=True) for index in range(12)]
    await _enqueue(configured, firsts)
    await _enqueue(configured, followups)

    order = await _started(configured, expected=14)

    # The first fetch may take first attempts, because no depths are measured yet. After it
    # the follow-ups go first, where taking partitions in turn would alternate the two.
    followup_ids = {attempt.attempt_id for attempt in followups}
    assert sum(attempt_id in followup_ids for attempt_id in order[:14]) >= 11
