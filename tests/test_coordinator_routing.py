"""Where the coordinator routes attempts, and when it grants their leases with the dispatch,
from the workers' status reports alone."""

from __future__ import annotations

import json
import time
from datetime import timedelta

import pytest

from schemas.errors import EventDecodeError
from schemas.events import (
    MAX_PARTITION,
    AttemptDispatched,
    GenerationParams,
    JobRequested,
    Tier,
    WorkerStatus,
    decode_event,
    utc_now,
)
from streams.config import CoordinatorSettings, KafkaSettings, Settings
from streams.coordinator import Coordinator
from streams.flight import Decision, FlightState, PoolView


def _coordinator(*, free_slots: int = 2, grant_at_dispatch: bool = True) -> Coordinator:
    # Nothing connects before the app starts, so this address needs no broker.
    coordinator = Coordinator(Settings(
        kafka=KafkaSettings(bootstrap_servers="127.0.0.1:9"),
        coordinator=CoordinatorSettings(grant_at_dispatch=grant_at_dispatch)))
    coordinator.pool.observe(WorkerStatus(worker_id="busy", slots=2, busy=2,
                                          partitions={Tier.STANDARD: [0, 1, 2]}))
    coordinator.pool.observe(WorkerStatus(worker_id="free", slots=2, busy=2 - free_slots,
                                          partitions={Tier.STANDARD: [3, 4, 5]}))
    return coordinator


def _attempt(*, followup: bool, epoch: int = 1) -> AttemptDispatched:
    return AttemptDispatched(
        attempt_id="job-2", job_id="job", job_key="acme:key", tenant_id="acme", slot=0,
        attempt_no=2, epoch=epoch, params=GenerationParams(model="M1", prompt="p", steps=4),
        seed=1, tier=Tier.STANDARD, deadline_at=utc_now() + timedelta(seconds=60),
        followup=followup)


def _admitted(coordinator: Coordinator, slots: int) -> tuple[FlightState, Decision]:
    request = JobRequested(tenant_id="acme", user_id="u", slots=slots, deadline_s=60,
                           params=GenerationParams(model="M1", prompt="plan", steps=4))
    flight = FlightState.for_request(request)
    decision = flight.admit(request, utc_now(), coordinator.limits,
                            PoolView(acceptance_rate=1.0, idle_slots=0))
    return flight, decision


def test_first_attempt_goes_to_free_worker() -> None:
    worker_id, partition, free = _coordinator()._affinity_partition(_attempt(followup=False))

    assert worker_id == "free"
    assert partition in (3, 4, 5)
    assert free


def test_followup_goes_to_free_worker() -> None:
    coordinator = _coordinator()
    attempt = _attempt(followup=True)

    worker_id, partition, free = coordinator._affinity_partition(attempt)

    assert worker_id == "free"
    assert partition in (3, 4, 5)
    assert free
    # The routed partition belongs to the first-attempt topic, so the record goes there.
    routed_topic = coordinator._attempt_topic(attempt, partition).get_topic_name()
    assert routed_topic == coordinator.settings.topics.attempts(Tier.STANDARD)


def test_followup_without_free_worker_queues() -> None:
    # With every slot busy, a follow-up waits in the follow-up topic that workers fetch first.
    coordinator = _coordinator(free_slots=0)
    attempt = _attempt(followup=True)

    routed = coordinator._affinity_partition(attempt)

    assert routed == (None, None, False)
    topic = coordinator._attempt_topic(attempt).get_topic_name()
    assert topic == coordinator.settings.topics.followups(Tier.STANDARD)


def test_followup_queues_behind_waiting_attempts() -> None:
    # Two unrouted attempts wait for the free worker's two slots, maybe in its follow-up
    # partitions, which it fetches before a routed record. A first attempt is still routed.
    coordinator = _coordinator()
    coordinator.pool.dispatched("waiting-1", Tier.STANDARD, None)
    coordinator.pool.dispatched("waiting-2", Tier.STANDARD, None)

    followup = coordinator._affinity_partition(_attempt(followup=True))
    first = coordinator._affinity_partition(_attempt(followup=False))

    assert followup == (None, None, False)
    assert first[0] == "free"


def test_redispatch_left_to_partitioner() -> None:
    routed = _coordinator()._affinity_partition(_attempt(followup=True, epoch=2))

    assert routed == (None, None, False)


def test_lease_granted_with_dispatch_to_free_worker() -> None:
    coordinator = _coordinator(free_slots=1)
    flight, decision = _admitted(coordinator, slots=2)

    routed = coordinator._route(flight, decision)

    # One free slot takes one lease; the second attempt queues and claims as before.
    granted = [item.attempt for item in routed if item.attempt.granted_to is not None]
    assert len(granted) == 1
    assert granted[0].granted_to == "free"
    assert granted[0].lease_expires_at is not None
    record = flight.attempts[granted[0].attempt_id]
    assert record.worker_id == "free"
    assert record.lease_expires_at == granted[0].lease_expires_at
    assert all(item.partition is not None for item in routed)


def test_no_lease_without_free_slot() -> None:
    for coordinator in (_coordinator(free_slots=0), _coordinator(grant_at_dispatch=False)):
        flight, decision = _admitted(coordinator, slots=2)

        routed = coordinator._route(flight, decision)

        assert [item.attempt.granted_to for item in routed] == [None, None]
        assert all(record.worker_id is None for record in flight.attempts.values())


async def test_status_beyond_topic_partitions_rejected() -> None:
    coordinator = _coordinator()
    topics = coordinator.settings.topics
    coordinator._partition_counts = {topics.attempts(Tier.STANDARD): 6}
    # Counts just read are not read again, so no broker is needed.
    coordinator._partition_counts_at = time.monotonic()

    await coordinator._check_partitions(WorkerStatus(
        worker_id="w", slots=1, busy=0, partitions={Tier.STANDARD: [5]}))
    odd = [
        WorkerStatus(worker_id="w", slots=1, busy=0, partitions={Tier.STANDARD: [6]}),
        WorkerStatus(worker_id="w", slots=1, busy=0, partitions={Tier.STANDARD: [0, 40]}),
        # No partition of the batch tier's topic is known.
        WorkerStatus(worker_id="w", slots=1, busy=0, partitions={Tier.BATCH: [0]}),
    ]
    for status in odd:
        with pytest.raises(EventDecodeError, match="reports partitions") as raised:
            await coordinator._check_partitions(status)
        assert raised.value.error_type == "unknown_partition"


@pytest.mark.parametrize("numbers", [[-1], [1, 1], [MAX_PARTITION + 1]])
def test_status_with_invalid_partitions_rejected(numbers: list[int]) -> None:
    status = WorkerStatus(worker_id="w", slots=1, busy=0).model_dump(mode="json")
    value = json.dumps({**status, "partitions": {"standard": numbers}}).encode()

    with pytest.raises(EventDecodeError):
        decode_event(value, WorkerStatus)
