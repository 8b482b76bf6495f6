"""Where the coordinator routes attempts, from the workers' status reports alone."""

from __future__ import annotations

from datetime import timedelta

from schemas.events import AttemptDispatched, GenerationParams, Tier, WorkerStatus, utc_now
from streams.config import KafkaSettings, Settings
from streams.coordinator import Coordinator


def _coordinator() -> Coordinator:
    # Nothing connects before the app starts, so this address needs no broker.
    coordinator = Coordinator(Settings(kafka=KafkaSettings(bootstrap_servers="127.0.0.1:9")))
    coordinator.pool.observe(WorkerStatus(worker_id="busy", slots=2, busy=2,
                                          partitions={Tier.STANDARD: [0, 1, 2]}))
    coordinator.pool.observe(WorkerStatus(worker_id="free", slots=2, busy=0,
                                          partitions={Tier.STANDARD: [3, 4, 5]}))
    return coordinator


def _attempt(*, followup: bool) -> AttemptDispatched:
    return AttemptDispatched(
        attempt_id="job-2", job_id="job", job_key="acme:key", tenant_id="acme", slot=0,
        attempt_no=2, params=GenerationParams(model="M1", prompt="p", steps=4), seed=1,
        tier=Tier.STANDARD, deadline_at=utc_now() + timedelta(seconds=60), followup=followup)


def test_first_attempt_goes_to_free_worker() -> None:
    routed = _coordinator()._affinity_partition(_attempt(followup=False))

    assert routed is not None
    assert routed[0] == "free"
    assert routed[1] in (3, 4, 5)


def test_followup_left_to_partitioner() -> None:
    routed = _coordinator()._affinity_partition(_attempt(followup=True))

    assert routed is None
