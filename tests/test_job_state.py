"""Job state transitions: dispatch, slot filling, retries, fallback and idempotence."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from schemas.events import (
    AttemptFinished,
    AttemptStatus,
    GenerationParams,
    JobRequested,
    JobStatus,
    ResultScored,
)
from streams.job_state import JobState

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _admit(slots: int = 2, max_attempts: int = 3) -> tuple[JobState, list[str]]:
    request = JobRequested(
        tenant_id="t", user_id="u",
        params=GenerationParams(model="M1", prompt="plan", steps=10),
        slots=slots, deadline_s=60,
    )
    state, decision = JobState.admit(request, max_attempts_per_slot=max_attempts, now=NOW)
    return state, [attempt.attempt_id for attempt in decision.dispatch]


def _score(state: JobState, attempt_id: str, accepted: bool, score: float = 0.5):
    record = state.attempts[attempt_id]
    finished = AttemptFinished(
        attempt_id=attempt_id, job_id=state.job_id, job_key=state.job_key, worker_id="w",
        status=AttemptStatus.SUCCEEDED, slot=record.slot, artifact_uri=f"file:///{attempt_id}",
        gpu_s=0.1,
    )
    state.on_finished(finished, NOW)
    scored = ResultScored(
        attempt_id=attempt_id, job_id=state.job_id, job_key=state.job_key, slot=record.slot,
        artifact_uri=f"file:///{attempt_id}", score=score, accepted=accepted, reason="test",
    )
    return state.on_scored(scored, NOW)


def test_admit_dispatches_one_attempt_per_slot() -> None:
    state, attempt_ids = _admit(slots=3)
    assert len(attempt_ids) == 3
    assert [state.attempts[a].slot for a in attempt_ids] == [0, 1, 2]
    assert len({state.attempts[a].attempt_id for a in attempt_ids}) == 3


def test_accepting_every_slot_completes_job() -> None:
    state, attempt_ids = _admit(slots=2)
    assert _score(state, attempt_ids[0], True).completed is None
    decision = _score(state, attempt_ids[1], True)
    assert decision.completed is not None
    assert decision.completed.status == JobStatus.COMPLETED
    assert [slot.slot for slot in decision.completed.slots] == [0, 1]
    assert state.is_terminal


def test_rejection_dispatches_retry_for_slot() -> None:
    state, attempt_ids = _admit(slots=1)
    decision = _score(state, attempt_ids[0], False)
    assert len(decision.dispatch) == 1
    assert decision.dispatch[0].slot == 0
    assert decision.dispatch[0].attempt_no == 2
    assert decision.dispatch[0].seed != state.seed_base


def test_attempt_limit_falls_back_to_best_rejected() -> None:
    state, attempt_ids = _admit(slots=1, max_attempts=2)
    retry = _score(state, attempt_ids[0], False, score=0.4).dispatch[0]
    decision = _score(state, retry.attempt_id, False, score=0.3)
    assert decision.completed is not None
    assert decision.completed.status == JobStatus.COMPLETED
    slot = decision.completed.slots[0]
    assert slot.fallback
    assert slot.attempt_id == attempt_ids[0]


def test_failed_attempts_end_job_failed() -> None:
    state, attempt_ids = _admit(slots=1, max_attempts=1)
    finished = AttemptFinished(
        attempt_id=attempt_ids[0], job_id=state.job_id, job_key=state.job_key, worker_id="w",
        status=AttemptStatus.FAILED, slot=0, gpu_s=0.0, error="boom",
    )
    decision = state.on_finished(finished, NOW)
    assert decision.completed is not None
    assert decision.completed.status == JobStatus.FAILED
    assert decision.completed.slots == []


def test_redelivered_score_changes_nothing() -> None:
    state, attempt_ids = _admit(slots=2)
    _score(state, attempt_ids[0], True)
    before = state.model_dump()
    again = _score(state, attempt_ids[0], True)
    assert again.completed is None and again.dispatch == []
    assert state.model_dump() == before


def test_deadline_ends_job_partial() -> None:
    state, attempt_ids = _admit(slots=2)
    _score(state, attempt_ids[0], True)
    assert state.on_deadline(NOW).completed is None
    decision = state.on_deadline(NOW + timedelta(seconds=61))
    assert decision.completed is not None
    assert decision.completed.status == JobStatus.PARTIAL
    assert decision.completed.reason == "deadline reached"


def test_state_survives_json_round_trip() -> None:
    state, attempt_ids = _admit(slots=2)
    _score(state, attempt_ids[0], False)
    restored = JobState.model_validate(state.model_dump(mode="json"))
    assert restored == state
