"""Per-job state kept in the coordinator's table, and the pure transitions that change it.

Every transition takes an event and returns the attempts to dispatch and, once the job is
over, its completion. Nothing here touches Kafka, so the same code runs in tests and tools.
Transitions are idempotent: a redelivered event changes nothing the second time.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.events import (
    AttemptDispatched,
    AttemptFinished,
    AttemptStarted,
    AttemptStatus,
    GenerationParams,
    JobCompleted,
    JobRequested,
    JobStatus,
    ResultScored,
    SlotResult,
    Tier,
)

AttemptPhase = Literal[
    "dispatched", "running", "generated", "accepted", "rejected", "failed", "cancelled"
]
JobPhase = Literal["running", "completed", "partial", "failed", "cancelled"]
_SEED_STRIDE = 1_000_003


class AttemptRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    attempt_id: str
    slot: int
    attempt_no: int
    epoch: int = 1
    phase: AttemptPhase = "dispatched"
    worker_id: str | None = None
    gpu_s: float = 0.0
    score: float | None = None
    artifact_uri: str | None = None
    error: str | None = None


class SlotState(BaseModel):
    model_config = ConfigDict(extra="ignore")

    slot: int
    attempts: int = 0
    result: SlotResult | None = None
    exhausted: bool = False


@dataclass
class Decision:
    """What the coordinator must publish after one transition."""

    dispatch: list[AttemptDispatched] = field(default_factory=list)
    completed: JobCompleted | None = None


class JobState(BaseModel):
    """Everything the coordinator remembers about one job; stored as JSON in a faust table."""

    model_config = ConfigDict(extra="ignore")

    job_id: str
    job_key: str
    tenant_id: str
    user_id: str
    params: GenerationParams
    tier: Tier
    requested_slots: int
    seed_base: int
    max_attempts_per_slot: int
    requested_at: datetime
    deadline_at: datetime
    phase: JobPhase = "running"
    slots: list[SlotState]
    attempts: dict[str, AttemptRecord] = Field(default_factory=dict)
    attempts_dispatched: int = 0
    gpu_s_total: float = 0.0
    traceparent: str | None = None
    finished_at: datetime | None = None

    @classmethod
    def admit(
        cls, request: JobRequested, *, max_attempts_per_slot: int, now: datetime
    ) -> tuple[JobState, Decision]:
        """Create the state of a new job and one attempt per slot."""
        seed_base = request.seed if request.seed is not None else _seed_from(request.job_id)
        state = cls(
            job_id=request.job_id,
            job_key=request.job_key,
            tenant_id=request.tenant_id,
            user_id=request.user_id,
            params=request.params,
            tier=request.tier,
            requested_slots=request.slots,
            seed_base=seed_base,
            max_attempts_per_slot=max_attempts_per_slot,
            requested_at=request.requested_at,
            deadline_at=now + timedelta(seconds=request.deadline_s),
            slots=[SlotState(slot=index) for index in range(request.slots)],
        )
        decision = Decision(dispatch=[state._dispatch(slot.slot, now) for slot in state.slots])
        return state, decision

    @property
    def is_terminal(self) -> bool:
        return self.phase != "running"

    def _dispatch(self, slot: int, now: datetime) -> AttemptDispatched:
        self.attempts_dispatched += 1
        slot_state = self.slots[slot]
        slot_state.attempts += 1
        attempt_id = f"{self.job_id}-{self.attempts_dispatched}"
        seed = (self.seed_base + self.attempts_dispatched * _SEED_STRIDE) % 2**63
        self.attempts[attempt_id] = AttemptRecord(
            attempt_id=attempt_id, slot=slot, attempt_no=slot_state.attempts
        )
        return AttemptDispatched(
            attempt_id=attempt_id,
            job_id=self.job_id,
            job_key=self.job_key,
            tenant_id=self.tenant_id,
            slot=slot,
            attempt_no=slot_state.attempts,
            params=self.params,
            seed=seed,
            tier=self.tier,
            dispatched_at=now,
            deadline_at=self.deadline_at,
        )

    def pending_dispatches(self, now: datetime) -> list[AttemptDispatched]:
        """Rebuild the dispatch events of attempts no worker has reported on yet.

        A coordinator that crashed between writing its table and publishing uses this to
        publish them again; workers see the same attempt ids, so nothing runs twice by design.
        """
        events = []
        for record in self.attempts.values():
            if record.phase != "dispatched":
                continue
            seed_index = int(record.attempt_id.rsplit("-", 1)[1])
            events.append(
                AttemptDispatched(
                    attempt_id=record.attempt_id,
                    job_id=self.job_id,
                    job_key=self.job_key,
                    tenant_id=self.tenant_id,
                    slot=record.slot,
                    attempt_no=record.attempt_no,
                    params=self.params,
                    seed=(self.seed_base + seed_index * _SEED_STRIDE) % 2**63,
                    tier=self.tier,
                    dispatched_at=now,
                    deadline_at=self.deadline_at,
                )
            )
        return events

    def on_started(self, event: AttemptStarted) -> Decision:
        record = self.attempts.get(event.attempt_id)
        if record is not None and record.phase == "dispatched":
            record.phase = "running"
            record.worker_id = event.worker_id
        return Decision()

    def on_finished(self, event: AttemptFinished, now: datetime) -> Decision:
        record = self.attempts.get(event.attempt_id)
        if record is None or record.phase not in ("dispatched", "running"):
            return Decision()

        record.gpu_s = event.gpu_s
        record.worker_id = event.worker_id
        self.gpu_s_total += event.gpu_s
        if event.status == AttemptStatus.SUCCEEDED:
            record.phase = "generated"
            record.artifact_uri = event.artifact_uri
            return Decision()

        record.phase = "failed" if event.status == AttemptStatus.FAILED else "cancelled"
        record.error = event.error
        if self.is_terminal:
            return Decision()
        return self._retry_or_give_up(record.slot, now)

    def on_scored(self, event: ResultScored, now: datetime) -> Decision:
        record = self.attempts.get(event.attempt_id)
        if record is None or record.phase in ("accepted", "rejected"):
            return Decision()

        record.score = event.score
        record.artifact_uri = event.artifact_uri
        if self.is_terminal:
            record.phase = "accepted" if event.accepted else "rejected"
            return Decision()

        slot = self.slots[record.slot]
        if event.accepted and slot.result is None:
            record.phase = "accepted"
            slot.result = SlotResult(
                slot=slot.slot,
                attempt_id=record.attempt_id,
                artifact_uri=event.artifact_uri,
                score=event.score,
            )
            return self._complete_if_done(now)

        record.phase = "rejected"
        if slot.result is not None:
            return Decision()
        return self._retry_or_give_up(slot.slot, now)

    def on_deadline(self, now: datetime) -> Decision:
        """End a job whose deadline passed, filling open slots with fallback results."""
        if self.is_terminal or now < self.deadline_at:
            return Decision()
        for slot in self.slots:
            if slot.result is None:
                slot.exhausted = True
        return self._complete_if_done(now, reason="deadline reached")

    def _retry_or_give_up(self, slot_index: int, now: datetime) -> Decision:
        slot = self.slots[slot_index]
        if slot.attempts < self.max_attempts_per_slot and now < self.deadline_at:
            return Decision(dispatch=[self._dispatch(slot_index, now)])
        if self._slot_has_attempt_in_flight(slot_index):
            return Decision()
        slot.exhausted = True
        return self._complete_if_done(now)

    def _slot_has_attempt_in_flight(self, slot_index: int) -> bool:
        return any(
            record.slot == slot_index and record.phase in ("dispatched", "running", "generated")
            for record in self.attempts.values()
        )

    def _fallback_candidates(self) -> list[AttemptRecord]:
        used = {slot.result.attempt_id for slot in self.slots if slot.result is not None}
        candidates = [
            record
            for record in self.attempts.values()
            if record.phase == "rejected"
            and record.artifact_uri
            and record.score is not None
            and record.attempt_id not in used
        ]
        return sorted(candidates, key=lambda record: record.score or 0.0, reverse=True)

    def _complete_if_done(self, now: datetime, reason: str | None = None) -> Decision:
        if any(slot.result is None and not slot.exhausted for slot in self.slots):
            return Decision()

        # Open slots take the best-scoring rejected generations, marked as fallback.
        candidates = iter(self._fallback_candidates())
        for slot in self.slots:
            if slot.result is not None:
                continue
            candidate = next(candidates, None)
            if candidate is None:
                break
            assert candidate.artifact_uri is not None and candidate.score is not None
            slot.result = SlotResult(
                slot=slot.slot,
                attempt_id=candidate.attempt_id,
                artifact_uri=candidate.artifact_uri,
                score=candidate.score,
                fallback=True,
            )

        filled = [slot.result for slot in self.slots if slot.result is not None]
        if len(filled) == self.requested_slots:
            status = JobStatus.COMPLETED
        elif filled:
            status = JobStatus.PARTIAL
        else:
            status = JobStatus.FAILED
        if status != JobStatus.COMPLETED and reason is None:
            reason = f"attempt limit of {self.max_attempts_per_slot} per slot reached"

        self.phase = status.value
        self.finished_at = now
        completed = JobCompleted(
            job_id=self.job_id,
            job_key=self.job_key,
            tenant_id=self.tenant_id,
            user_id=self.user_id,
            status=status,
            requested_slots=self.requested_slots,
            slots=filled,
            attempts=self.attempts_dispatched,
            tier=self.tier,
            requested_at=self.requested_at,
            completed_at=now,
            reason=reason,
        )
        return Decision(completed=completed)


def _seed_from(job_id: str) -> int:
    return int.from_bytes(hashlib.sha256(job_id.encode()).digest()[:8], "big") % 2**63
