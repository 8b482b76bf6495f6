"""Completion events after a coordinator crash: an ended job whose event may never have left
is published again, and an acknowledged one is recorded as sent."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from schemas.events import (
    DeliveryAck,
    GenerationParams,
    JobRequested,
    JobSweep,
    ResultScored,
    encode_event,
    utc_now,
)
from streams.config import KafkaSettings, Settings
from streams.coordinator import Coordinator
from streams.flight import Decision, FlightState, PoolView


def _coordinator() -> Coordinator:
    # Nothing connects before the app starts, so this address needs no broker.
    return Coordinator(Settings(kafka=KafkaSettings(bootstrap_servers="127.0.0.1:9")))


def _ended_job(coordinator: Coordinator) -> tuple[FlightState, str]:
    request = JobRequested(tenant_id="acme", user_id="u", slots=1, deadline_s=60,
                           params=GenerationParams(model="M1", prompt="plan", steps=4))
    flight = FlightState.for_request(request)
    pool = PoolView(acceptance_rate=1.0, idle_slots=0)
    attempt = flight.admit(request, utc_now(), coordinator.limits, pool).dispatch[0]
    flight.on_scored(ResultScored(
        attempt_id=attempt.attempt_id, job_id=attempt.job_id, job_key=attempt.job_key,
        slot=attempt.slot, artifact_uri="file:///a.png", score=0.9, accepted=True,
        reason="test"), utc_now(), coordinator.limits, pool)
    [job_id] = flight.unsent_outcomes()
    return flight, job_id


def test_outcome_never_sent_here_published_again() -> None:
    # A job that ended in a crashed process: its end is in the table, its event maybe not.
    coordinator = _coordinator()
    flight, job_id = _ended_job(coordinator)
    decision = Decision()

    coordinator._check_outcomes(flight, decision)

    assert [completed.job_id for completed in decision.republish] == [job_id]
    assert decision.completed == []
    assert flight.unsent_outcomes() == [job_id]


async def test_acknowledged_outcome_recorded() -> None:
    coordinator = _coordinator()
    flight, job_id = _ended_job(coordinator)
    sent: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    coordinator._outcome_sends[job_id] = sent

    pending = Decision()
    coordinator._check_outcomes(flight, pending)
    assert pending.republish == []
    assert flight.unsent_outcomes() == [job_id]

    sent.set_result(None)
    acknowledged = Decision()
    coordinator._check_outcomes(flight, acknowledged)
    assert acknowledged.republish == []
    assert flight.unsent_outcomes() == []


async def test_failed_send_published_again() -> None:
    coordinator = _coordinator()
    flight, job_id = _ended_job(coordinator)
    sent: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    sent.set_exception(RuntimeError("broker gone"))
    coordinator._outcome_sends[job_id] = sent

    again = Decision()
    coordinator._check_outcomes(flight, again)

    assert [completed.job_id for completed in again.republish] == [job_id]


class _Replay:
    """Feed one event through ``Coordinator._on_event`` with the flight kept in memory."""

    def __init__(self, coordinator: Coordinator, flight: FlightState) -> None:
        self.flight = flight
        self.stored: list[FlightState] = []
        self.published: list[Decision] = []
        coordinator._load = lambda job_key: self.flight  # type: ignore[method-assign]
        coordinator._store = self.stored.append  # type: ignore[method-assign]

        async def publish(flight: FlightState, decision: Decision, routed: Any) -> None:
            self.published.append(decision)

        coordinator._publish = publish  # type: ignore[method-assign]
        self.coordinator = coordinator

    async def send(self, message: Any) -> None:
        event = SimpleNamespace(value=encode_event(message), message=SimpleNamespace(
            topic="events", partition=0, offset=0))
        await self.coordinator._on_event(event)  # type: ignore[arg-type]


async def test_sweep_after_restart_publishes_outcome() -> None:
    # Right after a restart a lease sweep changes nothing, but it may be the last event the
    # flight of a job that ended in the crashed process gets.
    coordinator = _coordinator()
    flight, job_id = _ended_job(coordinator)
    replay = _Replay(coordinator, flight)

    await replay.send(JobSweep(job_id=job_id, job_key=flight.job_key, action="lease",
                               attempt_id="gone"))

    assert [completed.job_id for completed in replay.published[0].republish] == [job_id]
    assert replay.stored == [flight]


async def test_delivery_ack_forgets_send() -> None:
    coordinator = _coordinator()
    flight, job_id = _ended_job(coordinator)
    coordinator._outcome_sends[job_id] = asyncio.get_running_loop().create_future()
    replay = _Replay(coordinator, flight)

    await replay.send(DeliveryAck(job_id=job_id, job_key=flight.job_key,
                                  consumer="delivery", delivered=True))

    assert job_id not in coordinator._outcome_sends
    assert flight.unsent_outcomes() == []
    assert replay.published[0].republish == []
