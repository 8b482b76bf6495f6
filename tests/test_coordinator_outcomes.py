"""Completion events after a coordinator crash: an ended job whose event may never have left
is published again, and an acknowledged one is recorded as sent."""

from __future__ import annotations

import asyncio

from schemas.events import GenerationParams, JobRequested, ResultScored, utc_now
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

    assert [completed.job_id for completed in decision.completed] == [job_id]
    assert flight.unsent_outcomes() == [job_id]


async def test_acknowledged_outcome_recorded() -> None:
    coordinator = _coordinator()
    flight, job_id = _ended_job(coordinator)
    sent: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    coordinator._outcome_sends[job_id] = sent

    pending = Decision()
    coordinator._check_outcomes(flight, pending)
    assert pending.completed == []
    assert flight.unsent_outcomes() == [job_id]

    sent.set_result(None)
    acknowledged = Decision()
    coordinator._check_outcomes(flight, acknowledged)
    assert acknowledged.completed == []
    assert flight.unsent_outcomes() == []


async def test_failed_send_published_again() -> None:
    coordinator = _coordinator()
    flight, job_id = _ended_job(coordinator)
    sent: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    sent.set_exception(RuntimeError("broker gone"))
    coordinator._outcome_sends[job_id] = sent

    again = Decision()
    coordinator._check_outcomes(flight, again)

    assert [completed.job_id for completed in again.completed] == [job_id]
