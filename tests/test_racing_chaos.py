"""Racing under faults: workers killed with SIGKILL and forced rebalances, on the real broker."""

from __future__ import annotations

import asyncio
import collections
import random
from pathlib import Path

import pytest

from schemas.events import (
    AttemptClaim,
    AttemptStarted,
    GenerationParams,
    JobCompleted,
    JobRequested,
    decode_event,
)
from streams.client import SlotforgeClient
from streams.config import Settings
from streams.processes import ProcessGroup
from tests.kafka_helpers import TopicReader

pytestmark = [pytest.mark.integration, pytest.mark.chaos, pytest.mark.slow]

JOBS = 200
SLOTS = 4


def _simulated_env(service_env: dict[str, str]) -> dict[str, str]:
    return {
        **service_env,
        "SLOTFORGE_WORKER__SLOTS": "4",
        "SLOTFORGE_WORKER__SIMULATION__ENABLED": "true",
        "SLOTFORGE_WORKER__SIMULATION__P50_S": "0.15",
        "SLOTFORGE_WORKER__SIMULATION__ACCEPTANCE": "0.5",
        "SLOTFORGE_COORDINATOR__LEASE_S": "4",
        "SLOTFORGE_COORDINATOR__RACING_POLICY": "adaptive",
        "SLOTFORGE_TRACING__ENABLED": "false",
    }


def _request(index: int) -> JobRequested:
    return JobRequested(
        tenant_id=f"tenant-{index % 3}", user_id=f"user-{index % 17}",
        params=GenerationParams(model="M0001", prompt=f"floor plan {index}", steps=8),
        slots=SLOTS, deadline_s=600,
    )


async def _kill_workers(group: ProcessGroup, stop: asyncio.Event) -> int:
    """SIGKILL a random GPU worker every few seconds and start a fresh one in its place."""
    rng = random.Random(7)
    kills = 0
    while not stop.is_set():
        await asyncio.sleep(4)
        workers = [child for child in group.processes
                   if child.service == "gpu-worker" and child.alive()]
        if len(workers) < 2:
            continue
        victim = rng.choice(workers)
        group.kill(victim)
        kills += 1
        group.start("gpu-worker", name=f"gpu-worker-r{kills}",
                    env={"SLOTFORGE_WORKER__WORKER_ID": f"gpu-worker-r{kills}"})
        # A short-lived extra member forces one more rebalance of the group.
        extra = group.start("gpu-worker", name=f"gpu-worker-x{kills}",
                            env={"SLOTFORGE_WORKER__WORKER_ID": f"gpu-worker-x{kills}"})
        await asyncio.sleep(2)
        group.stop(extra, grace_s=10)
    return kills


async def test_racing_survives_worker_kills(settings: Settings, service_env: dict[str, str],
                                            tmp_path: Path) -> None:
    group = ProcessGroup(tmp_path / "logs", _simulated_env(service_env))
    group.start("coordinator")
    group.start("postprocess")
    for index in range(3):
        group.start("gpu-worker", name=f"gpu-worker-{index}",
                    env={"SLOTFORGE_WORKER__WORKER_ID": f"gpu-worker-{index}"})
    stop = asyncio.Event()
    try:
        async with SlotforgeClient(settings.kafka) as client, \
                TopicReader(settings.kafka, settings.topics.coordinator_events) as events:
            killer = asyncio.create_task(_kill_workers(group, stop))
            requests = [_request(index) for index in range(JOBS)]
            for index, request in enumerate(requests):
                await client.submit(request)
                # Five jobs a second leave the pool idle slots at times, so first attempts
                # may get their lease with the dispatch while others queue and claim.
                if index % 10 == 9:
                    await asyncio.sleep(2.0)
            outcomes = await asyncio.gather(
                *(client.wait(request.job_id, timeout_s=900) for request in requests),
                return_exceptions=True)
            stop.set()
            kills = await killer
            # Read the events topic up to its end as it is now.
            from streams.kafka import topic_partitions

            partitions = await topic_partitions(settings.kafka,
                                                settings.topics.coordinator_events)
            ends = await events.consumer.end_offsets(partitions)
            for partition, end in ends.items():
                while await events.consumer.position(partition) < end:
                    await events.poll()
    finally:
        group.stop_all(grace_s=15)

    assert kills >= 3
    completed = [outcome for outcome in outcomes if isinstance(outcome, JobCompleted)]
    assert len(completed) == JOBS, [o for o in outcomes if not isinstance(o, JobCompleted)][:3]
    assert len({job.job_id for job in completed}) == JOBS

    # No slot was filled twice: every delivered generation appears in exactly one slot.
    delivered = [slot.attempt_id for job in completed for slot in job.slots]
    assert len(delivered) == len(set(delivered))
    for job in completed:
        assert len(job.slots) <= job.requested_slots

    # No attempt ran on two workers under the same lease epoch.
    runners: dict[tuple[str, int], set[str]] = collections.defaultdict(set)
    claimed: set[tuple[str, int]] = set()
    for record in events.records:
        if b'"attempt.started"' in record.value:
            started = decode_event(record.value, AttemptStarted)
            runners[(started.attempt_id, started.epoch)].add(started.worker_id)
        elif b'"attempt.claim"' in record.value:
            claim = decode_event(record.value, AttemptClaim)
            claimed.add((claim.attempt_id, claim.epoch))
    doubled = {key: workers for key, workers in runners.items() if len(workers) > 1}
    assert doubled == {}
    assert runners, "no attempt was started"
    assert set(runners) & claimed
