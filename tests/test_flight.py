"""Flight state: racing, claims with fencing, cancellation, fallback, cache and single-flight."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.events import (
    AttemptClaim,
    AttemptDispatched,
    AttemptFinished,
    AttemptProgress,
    AttemptStarted,
    AttemptStatus,
    DeliveryAck,
    GenerationParams,
    JobRequested,
    JobStatus,
    ResultScored,
)
from streams.flight import Decision, FlightLimits, FlightState, JobRecord, PoolView
from streams.racing import STRAGGLER_ERROR_TYPE, AttemptRun, RacingPolicy

NOW = datetime(2026, 1, 1, tzinfo=UTC)
SEQUENTIAL = FlightLimits(max_attempts_per_slot=3, policy=RacingPolicy.SEQUENTIAL)
ADAPTIVE = FlightLimits(max_attempts_per_slot=3, policy=RacingPolicy.ADAPTIVE)
BUSY = PoolView(acceptance_rate=0.5, idle_slots=0)


def _request(slots: int = 2, tenant: str = "t", user: str = "u", prompt: str = "plan",
             deadline_s: float = 60) -> JobRequested:
    return JobRequested(tenant_id=tenant, user_id=user,
                        params=GenerationParams(model="M1", prompt=prompt, steps=10),
                        slots=slots, deadline_s=deadline_s)


def _admit(request: JobRequested, limits: FlightLimits = SEQUENTIAL,
           pool: PoolView = BUSY, flight: FlightState | None = None
           ) -> tuple[FlightState, Decision]:
    flight = flight or FlightState.for_request(request)
    return flight, flight.admit(request, NOW, limits, pool)


def _finish(flight: FlightState, attempt: AttemptDispatched, limits: FlightLimits = SEQUENTIAL,
            status: AttemptStatus = AttemptStatus.SUCCEEDED, epoch: int | None = None,
            pool: PoolView = BUSY) -> Decision:
    event = AttemptFinished(
        attempt_id=attempt.attempt_id, job_id=attempt.job_id, job_key=attempt.job_key,
        epoch=epoch or attempt.epoch, worker_id="w", status=status, slot=attempt.slot,
        artifact_uri=f"file:///{attempt.attempt_id}.png", gpu_s=1.0,
    )
    return flight.on_finished(event, NOW, limits, pool)


def _score(flight: FlightState, attempt: AttemptDispatched, accepted: bool,
           score: float = 0.5, limits: FlightLimits = SEQUENTIAL,
           epoch: int | None = None, pool: PoolView = BUSY) -> Decision:
    _finish(flight, attempt, limits, epoch=epoch, pool=pool)
    event = ResultScored(
        attempt_id=attempt.attempt_id, job_id=attempt.job_id, job_key=attempt.job_key,
        epoch=epoch or attempt.epoch, slot=attempt.slot,
        artifact_uri=f"file:///{attempt.attempt_id}.png", score=score, accepted=accepted,
        reason="test",
    )
    return flight.on_scored(event, NOW, limits, pool)


def _claim(flight: FlightState, attempt: AttemptDispatched, worker: str,
           now: datetime = NOW, epoch: int | None = None) -> bool:
    claim = AttemptClaim(attempt_id=attempt.attempt_id, job_id=attempt.job_id,
                         job_key=attempt.job_key, epoch=epoch or attempt.epoch,
                         worker_id=worker)
    return flight.on_claim(claim, now, SEQUENTIAL).claims[0].granted


def test_sequential_dispatches_one_per_slot() -> None:
    _, decision = _admit(_request(slots=3))
    assert len(decision.dispatch) == 3
    assert len({attempt.attempt_id for attempt in decision.dispatch}) == 3
    assert len({attempt.seed for attempt in decision.dispatch}) == 3


def test_shared_job_id_keeps_attempts_apart() -> None:
    # Clients choose job ids, so two tenants, or two prompts, may use the same one.
    first = _request(slots=1, tenant="t1")
    others = [first.model_copy(update={"tenant_id": "t2"}),
              first.model_copy(update={"params": first.params.model_copy(
                  update={"prompt": "another plan"})})]

    ids = [_admit(request)[1].dispatch[0].attempt_id for request in (first, *others)]

    assert len({request.job_key for request in (first, *others)}) == 3
    assert len(set(ids)) == 3
    assert all(attempt_id.startswith(f"{first.job_id}-") for attempt_id in ids)


def test_adaptive_races_by_acceptance_rate() -> None:
    _, decision = _admit(_request(slots=4), ADAPTIVE, PoolView(acceptance_rate=0.5,
                                                                idle_slots=0))
    assert len(decision.dispatch) == 8


def test_adaptive_hedges_only_into_idle_pool() -> None:
    pool = PoolView(acceptance_rate=0.5, idle_slots=20)
    _, decision = _admit(_request(slots=4), ADAPTIVE, pool)
    assert len(decision.dispatch) == 12


def test_adaptive_skips_speculation_under_backpressure() -> None:
    pool = PoolView(acceptance_rate=0.5, idle_slots=20, backpressure=True)
    _, decision = _admit(_request(slots=4), ADAPTIVE, pool)
    assert len(decision.dispatch) == 8


def test_filled_slots_cancel_surplus_attempts() -> None:
    flight, decision = _admit(_request(slots=1), ADAPTIVE)
    first, second = decision.dispatch
    assert _claim(flight, second, "w2")
    result = _score(flight, first, True, limits=ADAPTIVE)
    assert result.completed[0].status == JobStatus.COMPLETED
    assert [cancel.attempt_id for cancel in result.cancel] == [second.attempt_id]
    assert result.cancel[0].worker_id == "w2"


def test_rejection_retries_then_completes() -> None:
    flight, decision = _admit(_request(slots=1))
    retry = _score(flight, decision.dispatch[0], False).dispatch
    assert len(retry) == 1
    done = _score(flight, retry[0], True)
    assert done.completed[0].status == JobStatus.COMPLETED
    assert done.completed[0].attempts == 2


def test_ended_job_outcome_unsent_until_acked() -> None:
    flight, decision = _admit(_request(slots=1))
    assert flight.unsent_outcomes() == []

    done = _score(flight, decision.dispatch[0], True)
    job_id = done.completed[0].job_id
    assert flight.unsent_outcomes() == [job_id]

    restored = FlightState.model_validate(flight.model_dump(mode="json"))
    assert restored.unsent_outcomes() == [job_id]

    flight.mark_outcome_sent(job_id)
    assert flight.unsent_outcomes() == []


def test_delivery_ack_marks_outcome_sent() -> None:
    flight, decision = _admit(_request(slots=1))
    done = _score(flight, decision.dispatch[0], True)
    job_id = done.completed[0].job_id

    flight.on_delivery_ack(DeliveryAck(job_id=job_id, job_key=flight.job_key,
                                       consumer="delivery", delivered=True), ["delivery"])

    assert flight.unsent_outcomes() == []


def test_later_attempts_are_followups() -> None:
    flight, decision = _admit(_request(slots=2))
    assert [attempt.followup for attempt in decision.dispatch] == [False, False]

    retry = _score(flight, decision.dispatch[0], False).dispatch
    assert [attempt.followup for attempt in retry] == [True]

    # A second identical job's first round is not a follow-up, though its flight started.
    second = flight.admit(_request(slots=1), NOW, SEQUENTIAL, BUSY)
    assert second.dispatch
    assert not any(attempt.followup for attempt in second.dispatch)

    # The flag survives the table's JSON round trip, so a republish keeps its topic.
    restored = FlightState.model_validate_json(flight.model_dump_json())
    assert [attempt.followup for attempt in restored.pending_dispatches(NOW)] == [
        attempt.followup for attempt in flight.pending_dispatches(NOW)]


def test_attempt_limit_falls_back_to_best_rejected() -> None:
    flight, decision = _admit(_request(slots=1))
    attempt = decision.dispatch[0]
    scores = [0.3, 0.45, 0.2]
    result = Decision()
    for score in scores:
        result = _score(flight, attempt, False, score=score)
        if result.dispatch:
            attempt = result.dispatch[0]
    completed = result.completed[0]
    assert completed.status == JobStatus.COMPLETED
    assert completed.slots[0].fallback
    assert completed.slots[0].score == 0.45


def test_failed_attempts_without_fallback_fail_job() -> None:
    flight, decision = _admit(_request(slots=1))
    attempt = decision.dispatch[0]
    for _ in range(3):
        result = _finish(flight, attempt, status=AttemptStatus.FAILED)
        if result.dispatch:
            attempt = result.dispatch[0]
    assert result.completed[0].status == JobStatus.FAILED


def test_deadline_ends_job_partial() -> None:
    flight, decision = _admit(_request(slots=2))
    _score(flight, decision.dispatch[0], True)
    job_id = decision.dispatch[0].job_id
    assert flight.on_deadline(job_id, NOW, SEQUENTIAL, BUSY).completed == []
    later = NOW + timedelta(seconds=61)
    result = flight.on_deadline(job_id, later, SEQUENTIAL, BUSY)
    assert result.completed[0].status == JobStatus.PARTIAL
    assert result.completed[0].reason == "deadline reached"


def test_claim_granted_to_one_worker_per_lease() -> None:
    flight, decision = _admit(_request(slots=1))
    attempt = decision.dispatch[0]
    assert _claim(flight, attempt, "w1")
    assert not _claim(flight, attempt, "w2")
    assert _claim(flight, attempt, "w1")


def test_expired_lease_redispatches_with_higher_epoch() -> None:
    flight, decision = _admit(_request(slots=1))
    attempt = decision.dispatch[0]
    assert _claim(flight, attempt, "w1")
    later = NOW + timedelta(seconds=SEQUENTIAL.lease_s + 1)
    # Past its expiry the lease is still w1's until the expiry fences it.
    assert not _claim(flight, attempt, "w2", later)

    result = flight.on_lease_expired(attempt.attempt_id, later, SEQUENTIAL, BUSY)
    assert result.dispatch[0].attempt_id == attempt.attempt_id
    assert result.dispatch[0].epoch == attempt.epoch + 1
    assert result.dispatch[0].followup
    assert result.cancel[0].worker_id == "w1"
    assert not _claim(flight, attempt, "w2", later)
    assert _claim(flight, result.dispatch[0], "w2", later)


def test_gone_holder_fenced_before_takeover() -> None:
    flight, decision = _admit(_request(slots=1))
    attempt = decision.dispatch[0]
    assert _claim(flight, attempt, "w1")

    # The silent holder may still run, so its epoch is never granted to another worker.
    assert not _claim(flight, attempt, "w2")

    result = flight.on_lease_expired(attempt.attempt_id, NOW, SEQUENTIAL, BUSY,
                                     frozenset({"w1"}))
    again = result.dispatch[0]
    assert _claim(flight, again, "w2")
    assert not _claim(flight, attempt, "w1")


def test_lease_of_gone_worker_expires_early() -> None:
    flight, decision = _admit(_request(slots=1))
    attempt = decision.dispatch[0]
    assert _claim(flight, attempt, "w1")

    unchanged = flight.on_lease_expired(attempt.attempt_id, NOW, SEQUENTIAL, BUSY,
                                        frozenset({"w2"}))
    assert unchanged.dispatch == []

    result = flight.on_lease_expired(attempt.attempt_id, NOW, SEQUENTIAL, BUSY,
                                     frozenset({"w1"}))
    assert result.dispatch[0].epoch == attempt.epoch + 1
    assert result.cancel[0].worker_id == "w1"


def test_dispatch_lease_denies_other_claims() -> None:
    flight, decision = _admit(_request(slots=1))
    attempt = decision.dispatch[0]

    until = flight.grant_at_dispatch(attempt.attempt_id, attempt.epoch, "w1", NOW, SEQUENTIAL)

    assert until == NOW + timedelta(seconds=SEQUENTIAL.dispatch_lease_s)
    assert not _claim(flight, attempt, "w2")
    # The holder may still claim, when its lease was about to run out on arrival.
    assert _claim(flight, attempt, "w1")


def test_dispatch_lease_granted_once() -> None:
    flight, decision = _admit(_request(slots=1))
    attempt = decision.dispatch[0]
    assert flight.grant_at_dispatch(attempt.attempt_id, attempt.epoch, "w1", NOW, SEQUENTIAL)

    # A repeated request publishes the pending attempt again; its lease stays with w1.
    assert flight.grant_at_dispatch(attempt.attempt_id, attempt.epoch, "w2", NOW,
                                    SEQUENTIAL) is None
    assert flight.grant_at_dispatch(attempt.attempt_id, attempt.epoch + 1, "w2", NOW,
                                    SEQUENTIAL) is None
    assert flight.attempts[attempt.attempt_id].worker_id == "w1"


def test_unstarted_dispatch_lease_expires() -> None:
    flight, decision = _admit(_request(slots=1))
    attempt = decision.dispatch[0]
    flight.grant_at_dispatch(attempt.attempt_id, attempt.epoch, "w1", NOW, SEQUENTIAL)

    # The worker died before it fetched the attempt, so nothing renews the lease.
    later = NOW + timedelta(seconds=SEQUENTIAL.lease_s + 1)
    result = flight.on_lease_expired(attempt.attempt_id, later, SEQUENTIAL, BUSY)

    again = result.dispatch[0]
    assert again.epoch == attempt.epoch + 1
    assert again.granted_to is None
    assert result.cancel[0].worker_id == "w1"
    assert flight.grant_at_dispatch(again.attempt_id, again.epoch, "w2", later, SEQUENTIAL)
    assert not _claim(flight, attempt, "w1", later)


def test_started_attempt_outlives_dispatch_lease() -> None:
    flight, decision = _admit(_request(slots=1))
    attempt = decision.dispatch[0]
    flight.grant_at_dispatch(attempt.attempt_id, attempt.epoch, "w1", NOW, SEQUENTIAL)
    flight.on_started(AttemptStarted(attempt_id=attempt.attempt_id, job_id=attempt.job_id,
                                     job_key=attempt.job_key, epoch=attempt.epoch,
                                     worker_id="w1"))

    # The coordinator renews the lease at the start, to the full lease.
    assert flight.renew_lease(attempt.attempt_id, attempt.epoch, "w1",
                              NOW + timedelta(seconds=SEQUENTIAL.lease_s))

    later = NOW + timedelta(seconds=SEQUENTIAL.dispatch_lease_s + 1)
    assert flight.on_lease_expired(attempt.attempt_id, later, SEQUENTIAL, BUSY).dispatch == []


def test_crash_redispatches_count_as_retries() -> None:
    limits = FlightLimits(max_attempts_per_slot=3, policy=RacingPolicy.SEQUENTIAL,
                          max_retries_per_attempt=2, max_retries_per_job=8)
    flight, decision = _admit(_request(slots=1), limits)
    attempt = decision.dispatch[0]

    # Two crashes re-dispatch the same attempt under higher epochs.
    for epoch in (2, 3):
        assert _claim(flight, attempt, f"w{epoch}", epoch=epoch - 1)
        result = flight.on_lease_expired(attempt.attempt_id, NOW, limits, BUSY,
                                         frozenset({f"w{epoch}"}))
        assert [item.epoch for item in result.dispatch] == [epoch]

    # The third crash fails the attempt, and the job launches a fresh one instead.
    assert _claim(flight, attempt, "w4", epoch=3)
    result = flight.on_lease_expired(attempt.attempt_id, NOW, limits, BUSY, frozenset({"w4"}))
    assert [outcome for _, outcome in result.outcomes] == ["failed"]
    assert len(result.dispatch) == 1
    assert result.dispatch[0].attempt_id != attempt.attempt_id


def test_stale_epoch_result_never_fills_slot() -> None:
    flight, decision = _admit(_request(slots=1))
    attempt = decision.dispatch[0]
    _claim(flight, attempt, "w1")
    later = NOW + timedelta(seconds=SEQUENTIAL.lease_s + 1)
    newer = flight.on_lease_expired(attempt.attempt_id, later, SEQUENTIAL, BUSY).dispatch[0]

    stale = _score(flight, attempt, True, epoch=attempt.epoch)
    assert stale.completed == []
    assert [entry.attempt_id for entry in flight.cache] == [attempt.attempt_id]

    fresh = _score(flight, newer, True)
    assert fresh.completed[0].status == JobStatus.COMPLETED


def test_redelivered_score_changes_nothing() -> None:
    flight, decision = _admit(_request(slots=2))
    _score(flight, decision.dispatch[0], True)
    before = flight.model_dump()
    assert _score(flight, decision.dispatch[0], True).completed == []
    assert flight.model_dump() == before


def test_surplus_goes_to_cache_and_serves_regeneration() -> None:
    request = _request(slots=1)
    flight, decision = _admit(request, FlightLimits(policy=RacingPolicy.FIXED_RACE))
    first, second = decision.dispatch
    _score(flight, first, True, limits=FlightLimits(policy=RacingPolicy.FIXED_RACE))
    _score(flight, second, True, limits=FlightLimits(policy=RacingPolicy.FIXED_RACE))
    assert [entry.attempt_id for entry in flight.cache] == [second.attempt_id]

    again = _request(slots=1)
    result = flight.admit(again, NOW, SEQUENTIAL, BUSY)
    assert result.dispatch == []
    slot = result.completed[0].slots[0]
    assert slot.cached and slot.attempt_id == second.attempt_id
    assert flight.cache == []


def test_cache_entries_expire_by_ttl() -> None:
    limits = FlightLimits(policy=RacingPolicy.FIXED_RACE, cache_ttl_s=10)
    flight, decision = _admit(_request(slots=1), limits)
    for attempt in decision.dispatch:
        _score(flight, attempt, True, limits=limits)
    assert len(flight.cache) == 1
    later = NOW + timedelta(seconds=11)
    result = flight.admit(_request(slots=1), later, limits, BUSY)
    assert result.completed == []
    assert flight.cache == []


def test_identical_jobs_share_attempts() -> None:
    first_request = _request(slots=1)
    flight, first = _admit(first_request)
    second = flight.admit(_request(slots=1), NOW, SEQUENTIAL, BUSY)
    assert len(first.dispatch) == 1
    assert len(second.dispatch) == 1

    done = _score(flight, first.dispatch[0], True)
    assert [job.job_id for job in done.completed] == [first_request.job_id]
    done = _score(flight, second.dispatch[0], True)
    assert len(done.completed) == 1


def test_state_survives_json_round_trip() -> None:
    flight, decision = _admit(_request(slots=2), ADAPTIVE)
    _score(flight, decision.dispatch[0], False, limits=ADAPTIVE)
    restored = FlightState.model_validate(flight.model_dump(mode="json"))
    assert restored == flight


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["t1", "t2", "t3"]), st.sampled_from(["u1", "u2"]),
                  st.sampled_from(["plan a", "Plan  A", "plan b"]), st.booleans()),
        min_size=1, max_size=25,
    )
)
def test_cache_never_crosses_tenants(jobs: list[tuple[str, str, str, bool]]) -> None:
    """Whatever jobs run, a slot only ever holds a generation of its own tenant and user."""
    limits = FlightLimits(policy=RacingPolicy.FIXED_RACE, max_attempts_per_slot=2)
    flights: dict[str, FlightState] = {}
    producer_of: dict[str, tuple[str, str]] = {}
    for tenant, user, prompt, accept in jobs:
        request = _request(slots=1, tenant=tenant, user=user, prompt=prompt)
        flight = flights.setdefault(request.job_key, FlightState.for_request(request))
        decision = flight.admit(request, NOW, limits, BUSY)
        for attempt in decision.dispatch:
            producer_of[attempt.attempt_id] = (tenant, user)
        completed = list(decision.completed)
        for attempt in decision.dispatch:
            completed += _score(flight, attempt, accept, limits=limits).completed
        for job in completed:
            assert job.tenant_id == tenant
            for slot in job.slots:
                assert producer_of[slot.attempt_id] == (tenant, user)
    for key, flight in flights.items():
        for entry in flight.cache:
            assert producer_of[entry.attempt_id][0] == key.split(":")[0]


@pytest.mark.parametrize("policy", list(RacingPolicy))
def test_every_policy_completes_job(policy: RacingPolicy) -> None:
    limits = FlightLimits(policy=policy, max_attempts_per_slot=4)
    pool = PoolView(acceptance_rate=0.5, idle_slots=4)
    flight, decision = _admit(_request(slots=3), limits, pool)
    pending = list(decision.dispatch)
    completed = []
    accept = True
    while pending and not completed:
        attempt = pending.pop(0)
        result = _score(flight, attempt, accept, limits=limits, pool=pool)
        accept = not accept
        pending += result.dispatch
        completed += result.completed
    assert completed and completed[0].status == JobStatus.COMPLETED


def test_expire_forgets_jobs_and_orphans() -> None:
    flight, decision = _admit(_request(slots=1))
    attempt = decision.dispatch[0]
    retry = _score(flight, attempt, False, score=0.2).dispatch[0]
    _score(flight, retry, True)
    assert flight.expire(NOW, 60, SEQUENTIAL) == ([], [f"file:///{attempt.attempt_id}.png"])

    later = NOW + timedelta(seconds=61)
    removed, orphans = flight.expire(later, 60, SEQUENTIAL)
    assert removed == [attempt.job_id]
    assert orphans == []
    assert flight.empty


def test_expire_drops_cache_past_ttl() -> None:
    limits = FlightLimits(policy=RacingPolicy.FIXED_RACE, cache_ttl_s=10)
    flight, decision = _admit(_request(slots=1), limits)
    for attempt in decision.dispatch:
        _score(flight, attempt, True, limits=limits)
    cached_uri = flight.cache[0].artifact_uri
    removed, orphans = flight.expire(NOW + timedelta(seconds=11), 3_600, limits)
    assert removed == []
    assert orphans == [cached_uri]
    assert flight.cache == []


def test_hung_attempt_redispatched_with_new_epoch() -> None:
    flight, decision = _admit(_request(slots=1))
    attempt = decision.dispatch[0]
    _claim(flight, attempt, "w1")
    result = flight.on_attempt_timeout(attempt.attempt_id, 1, NOW, SEQUENTIAL, BUSY,
                                       hung=True, reason="no progress")
    assert result.dispatch[0].epoch == 2
    assert result.cancel[0].worker_id == "w1"
    assert [outcome for _, outcome in result.outcomes] == ["timed_out"]
    assert flight.on_attempt_timeout(attempt.attempt_id, 1, NOW, SEQUENTIAL, BUSY,
                                      hung=True, reason="again").cancel == []


def _straggling(flight: FlightState, attempt: AttemptDispatched, steps_done: int = 3,
                running_s: float = 3.0) -> PoolView:
    flight.attempts[attempt.attempt_id].phase = "running"
    return PoolView(acceptance_rate=0.5, idle_slots=0, typical_service_s=0.2,
                    running={attempt.attempt_id: AttemptRun(running_s, steps_done, 10)})


def test_straggler_replaced_with_refund() -> None:
    flight, decision = _admit(_request(slots=1), ADAPTIVE)
    first, second = decision.dispatch
    job = flight.jobs[first.job_id]
    charged = job.attempts_charged

    result = flight.replan(NOW, ADAPTIVE, _straggling(flight, first))

    assert [cancel.attempt_id for cancel in result.cancel] == [first.attempt_id]
    assert result.cancel[0].reason.startswith("straggler")
    assert len(result.dispatch) == 1
    assert flight.attempts[first.attempt_id].phase == "cancelled"
    assert job.attempts_charged == charged
    assert job.stragglers_replaced == 1


def test_straggler_kept_when_fast_enough() -> None:
    flight, decision = _admit(_request(slots=1), ADAPTIVE)
    first = decision.dispatch[0]

    # Seven steps left at 0.01 s each is below twice the typical 0.2 s.
    result = flight.replan(NOW, ADAPTIVE, _straggling(flight, first, running_s=0.03))

    assert result.cancel == []
    assert result.dispatch == []


def test_straggler_rule_only_for_adaptive() -> None:
    flight, decision = _admit(_request(slots=1), SEQUENTIAL)
    first = decision.dispatch[0]

    result = flight.replan(NOW, SEQUENTIAL, _straggling(flight, first))

    assert result.cancel == []
    assert flight.attempts[first.attempt_id].phase == "running"


def test_straggler_replacements_bounded() -> None:
    flight, decision = _admit(_request(slots=1), ADAPTIVE)
    job = flight.jobs[decision.dispatch[0].job_id]
    job.stragglers_replaced = job.attempt_limit

    result = flight.replan(NOW, ADAPTIVE, _straggling(flight, decision.dispatch[0]))

    assert result.cancel == []


def test_straggler_cancel_accounts_gpu() -> None:
    flight, decision = _admit(_request(slots=1), ADAPTIVE)
    first = decision.dispatch[0]
    flight.replan(NOW, ADAPTIVE, _straggling(flight, first))

    confirmed = _finish(flight, first, ADAPTIVE, status=AttemptStatus.CANCELLED)

    assert flight.attempts[first.attempt_id].gpu_s == 1.0
    assert [outcome for _, outcome in confirmed.outcomes] == ["cancelled"]


def _running_straggler() -> tuple[FlightState, AttemptDispatched, JobRecord, PoolView]:
    """Admit a one-slot job whose first attempt runs as a straggler."""
    flight, decision = _admit(_request(slots=1), ADAPTIVE)
    first = decision.dispatch[0]
    return flight, first, flight.jobs[first.job_id], _straggling(flight, first)


def _stopped_as_straggler(flight: FlightState, attempt: AttemptDispatched,
                          pool: PoolView) -> Decision:
    event = AttemptFinished(
        attempt_id=attempt.attempt_id, job_id=attempt.job_id, job_key=attempt.job_key,
        epoch=attempt.epoch, worker_id="w", status=AttemptStatus.CANCELLED, slot=attempt.slot,
        gpu_s=0.1, error="straggler: 2.70 s left", error_type=STRAGGLER_ERROR_TYPE,
        retriable=True,
    )
    return flight.on_finished(event, NOW, ADAPTIVE, pool)


def test_worker_stopped_straggler_refunded() -> None:
    flight, first, job, pool = _running_straggler()
    charged = job.attempts_charged

    result = _stopped_as_straggler(flight, first, pool)

    assert [outcome for _, outcome in result.outcomes] == ["cancelled"]
    assert len(result.dispatch) == 1
    assert job.attempts_charged == charged
    assert job.stragglers_replaced == 1


def test_straggler_refunded_once() -> None:
    flight, first, job, pool = _running_straggler()
    flight.replan(NOW, ADAPTIVE, pool)
    charged = job.attempts_charged

    result = _stopped_as_straggler(flight, first, pool)

    assert result.dispatch == []
    assert job.attempts_charged == charged
    assert job.stragglers_replaced == 1


def test_worker_stopped_straggler_refunds_bounded() -> None:
    flight, first, job, pool = _running_straggler()
    job.stragglers_replaced = job.attempt_limit
    charged = job.attempts_charged

    result = _stopped_as_straggler(flight, first, pool)

    # The stop is charged like any cancelled attempt, and the replacement once more.
    assert len(result.dispatch) == 1
    assert job.stragglers_replaced == job.attempt_limit
    assert job.attempts_charged == charged + 1


def test_refund_limit_ends_straggler_thresholds() -> None:
    flight, first, job, _ = _running_straggler()
    assert flight.replaces_stragglers(first.job_id)

    job.stragglers_replaced = job.attempt_limit

    assert not flight.replaces_stragglers(first.job_id)
    assert not flight.replaces_stragglers("unknown job")


def test_nearly_done_surplus_fills_cache() -> None:
    flight, decision = _admit(_request(slots=1), ADAPTIVE)
    first, second = decision.dispatch
    flight.attempts[second.attempt_id].phase = "running"
    pool = PoolView(acceptance_rate=0.5, idle_slots=2, typical_service_s=0.2,
                    running={second.attempt_id: AttemptRun(0.9, 9, 10)})

    result = _score(flight, first, True, limits=ADAPTIVE, pool=pool)

    assert result.completed[0].status == JobStatus.COMPLETED
    assert result.cancel == []
    assert flight.attempts[second.attempt_id].phase == "running"

    _score(flight, second, True, score=0.8, limits=ADAPTIVE, pool=pool)
    assert [entry.attempt_id for entry in flight.cache] == [second.attempt_id]


def test_surplus_cancelled_when_pool_busy() -> None:
    flight, decision = _admit(_request(slots=1), ADAPTIVE)
    first, second = decision.dispatch
    flight.attempts[second.attempt_id].phase = "running"
    pool = PoolView(acceptance_rate=0.5, idle_slots=0, typical_service_s=0.2,
                    running={second.attempt_id: AttemptRun(0.9, 9, 10)})

    result = _score(flight, first, True, limits=ADAPTIVE, pool=pool)

    assert [cancel.attempt_id for cancel in result.cancel] == [second.attempt_id]


def _started(attempt: AttemptDispatched, worker: str) -> AttemptStarted:
    return AttemptStarted(attempt_id=attempt.attempt_id, job_id=attempt.job_id,
                          job_key=attempt.job_key, epoch=attempt.epoch, worker_id=worker)


def test_start_without_lease_is_cancelled() -> None:
    flight, decision = _admit(_request(slots=1))
    attempt = decision.dispatch[0]
    flight.grant_at_dispatch(attempt.attempt_id, attempt.epoch, "w1", NOW, SEQUENTIAL)

    # w2 runs the same epoch on a lease the table no longer records, as after a crash.
    intruder = flight.on_started(_started(attempt, "w2"))

    assert [cancel.worker_id for cancel in intruder.cancel] == ["w2"]
    assert intruder.cancel[0].epoch == attempt.epoch
    assert flight.stops_intruder(intruder.cancel[0])
    record = flight.attempts[attempt.attempt_id]
    assert record.worker_id == "w1"
    assert record.phase == "dispatched"
    assert flight.on_started(_started(attempt, "w1")).cancel == []
    assert flight.attempts[attempt.attempt_id].phase == "running"


def _running_on_w1() -> tuple[FlightState, AttemptDispatched]:
    """Admit a one-slot job whose attempt w1 claimed and started."""
    flight, decision = _admit(_request(slots=1))
    attempt = decision.dispatch[0]
    assert _claim(flight, attempt, "w1")
    flight.on_started(_started(attempt, "w1"))
    return flight, attempt


def test_start_after_holder_started_is_cancelled() -> None:
    flight, attempt = _running_on_w1()

    late = flight.on_started(_started(attempt, "w2"))

    assert [cancel.worker_id for cancel in late.cancel] == ["w2"]
    assert flight.attempts[attempt.attempt_id].worker_id == "w1"


def test_progress_without_lease_is_cancelled() -> None:
    flight, attempt = _running_on_w1()

    def progress(worker: str) -> AttemptProgress:
        return AttemptProgress(attempt_id=attempt.attempt_id, job_id=attempt.job_id,
                               job_key=attempt.job_key, epoch=attempt.epoch, worker_id=worker,
                               step=1, total_steps=10)

    assert [cancel.worker_id for cancel in flight.on_progress(progress("w2")).cancel] == ["w2"]
    assert flight.on_progress(progress("w1")).cancel == []


def test_start_of_unheld_attempt_accepted() -> None:
    flight, decision = _admit(_request(slots=1))
    attempt = decision.dispatch[0]

    # A table that lost the grant has no holder, so the worker that started becomes it.
    assert flight.on_started(_started(attempt, "w2")).cancel == []
    assert flight.attempts[attempt.attempt_id].worker_id == "w2"
    assert not _claim(flight, attempt, "w1")
