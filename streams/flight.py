"""State of one flight: the running jobs that share a cache key, their attempts and cache.

Identical requests (same tenant, user, normalized prompt and parameters) share one key, so
they land on one coordinator partition and one entry of the flights table. Jobs in a
flight share their attempts (single-flight): an accepted result fills the oldest open
slot of any job in the flight, and surplus accepted results stay in the key's cache for
the next regeneration. The key starts with the tenant id, so a cache entry can only ever
reach jobs of the tenant and user that produced it.

Every transition is pure: it takes an event and the time, changes the state, and returns
the events to publish. A redelivered event changes nothing the second time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from schemas.events import (
    AttemptCancel,
    AttemptClaim,
    AttemptDispatched,
    AttemptFinished,
    AttemptProgress,
    AttemptStarted,
    AttemptStatus,
    ClaimDecision,
    DeliveryAck,
    GenerationParams,
    JobCompleted,
    JobDelivered,
    JobRequested,
    JobStatus,
    ResultScored,
    SlotResult,
    Tier,
    attempt_id_for,
)
from streams.racing import (
    STRAGGLER_ERROR_TYPE,
    AttemptRun,
    RaceInputs,
    RacingPolicy,
    attempts_to_launch,
    straggler_reason,
    stragglers,
    worth_finishing,
)

AttemptPhase = Literal[
    "dispatched", "running", "generated", "accepted", "rejected", "failed", "cancelled"
]
_LIVE_PHASES = ("dispatched", "running", "generated")
_SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class FlightLimits:
    """Coordinator settings that shape every flight."""

    max_attempts_per_slot: int = 4
    lease_s: float = 10.0
    dispatch_lease_s: float = 5.0
    cache_ttl_s: float = 3_600.0
    cache_max_entries: int = 16
    policy: RacingPolicy = RacingPolicy.ADAPTIVE
    # Transient failures re-run the same attempt under a higher epoch, up to these limits.
    # With 0 retries a failed attempt ends, and racing replaces it.
    max_retries_per_attempt: int = 0
    max_retries_per_job: int = 0


@dataclass(frozen=True)
class PoolView:
    """What the coordinator knows about the GPU pool and downstream stages right now."""

    acceptance_rate: float = 0.5
    idle_slots: int = 0
    backpressure: bool = False
    # Progress of this flight's running attempts by attempt id, and the median service
    # time of the flight's class; the adaptive policy replaces stragglers with both.
    running: Mapping[str, AttemptRun] = field(default_factory=dict)
    typical_service_s: float | None = None


@dataclass
class Decision:
    """Events the coordinator must publish after one transition."""

    dispatch: list[AttemptDispatched] = field(default_factory=list)
    cancel: list[AttemptCancel] = field(default_factory=list)
    claims: list[ClaimDecision] = field(default_factory=list)
    completed: list[JobCompleted] = field(default_factory=list)
    # Outcomes of jobs that ended earlier, whose completion events go out again.
    republish: list[JobCompleted] = field(default_factory=list)
    delivered: list[JobDelivered] = field(default_factory=list)
    # Attempts that ended for good in this transition, with their outcome, for accounting.
    outcomes: list[tuple[AttemptRecord, str]] = field(default_factory=list)
    # Attempts to run again after a transient failure, with their retry number; they go
    # out through a delay topic.
    retry: list[tuple[AttemptDispatched, int]] = field(default_factory=list)

    def extend(self, other: Decision) -> Decision:
        self.dispatch += other.dispatch
        self.retry += other.retry
        self.cancel += other.cancel
        self.claims += other.claims
        self.completed += other.completed
        self.republish += other.republish
        self.delivered += other.delivered
        self.outcomes += other.outcomes
        return self


class AttemptRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    attempt_id: str
    job_id: str
    seq: int
    seed: int
    epoch: int = 1
    phase: AttemptPhase = "dispatched"
    worker_id: str | None = None
    lease_expires_at: datetime | None = None
    dispatched_at: datetime
    gpu_s: float = 0.0
    score: float | None = None
    artifact_uri: str | None = None
    error: str | None = None
    cancel_reason: str | None = None
    used: bool = False
    retries: int = 0
    # Launched after the admission of a job: a retry, a replacement or a top-up.
    followup: bool = False

    @property
    def live(self) -> bool:
        return self.phase in _LIVE_PHASES


class CacheEntry(BaseModel):
    attempt_id: str
    artifact_uri: str
    score: float
    created_at: datetime


class JobRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    job_id: str
    tier: Tier
    requested_slots: int
    attempt_limit: int
    attempts_charged: int = 0
    # Stragglers cancelled so far; each one's charge was refunded to the attempt limit.
    stragglers_replaced: int = 0
    requested_at: datetime
    admitted_at: datetime
    deadline_at: datetime
    traceparent: str | None = None
    status: JobStatus | None = None
    slots: list[SlotResult] = Field(default_factory=list)
    finished_at: datetime | None = None
    reason: str | None = None
    # Acknowledgements of critical consumers: consumer name to (delivered, reason).
    acks: dict[str, tuple[bool, str]] = Field(default_factory=dict)
    delivery: Literal["delivered", "delivery_failed"] | None = None
    retries: int = 0
    # False from the job's end until the broker acknowledged its completion event, so a
    # coordinator that crashed in between publishes the outcome again.
    outcome_sent: bool = True

    @property
    def running(self) -> bool:
        return self.status is None

    @property
    def open_slots(self) -> int:
        return self.requested_slots - len(self.slots) if self.running else 0

    @property
    def budget_left(self) -> int:
        return max(0, self.attempt_limit - self.attempts_charged) if self.running else 0

    @property
    def straggler_refunds_left(self) -> bool:
        """Whether a replaced straggler's attempt is still given back, up to the attempt limit."""
        return self.stragglers_replaced < self.attempt_limit


class FlightState(BaseModel):
    """Everything the coordinator keeps for one cache key; stored as JSON in a faust table."""

    model_config = ConfigDict(extra="ignore")

    job_key: str
    tenant_id: str
    user_id: str
    params: GenerationParams
    seed_base: int
    seq: int = 0
    jobs: dict[str, JobRecord] = Field(default_factory=dict)
    attempts: dict[str, AttemptRecord] = Field(default_factory=dict)
    cache: list[CacheEntry] = Field(default_factory=list)
    # True only inside ``admit``; not stored.
    _admitting: bool = PrivateAttr(default=False)

    @classmethod
    def for_request(cls, request: JobRequested) -> FlightState:
        seed = request.seed if request.seed is not None else _seed_from(request.job_key)
        return cls(job_key=request.job_key, tenant_id=request.tenant_id,
                   user_id=request.user_id, params=request.params, seed_base=seed)

    # ---- views -------------------------------------------------------------------------

    def running_jobs(self) -> list[JobRecord]:
        return sorted((job for job in self.jobs.values() if job.running),
                      key=lambda job: job.admitted_at)

    def live_attempts(self) -> list[AttemptRecord]:
        return [record for record in self.attempts.values() if record.live]

    def queued_attempts(self) -> int:
        return sum(1 for record in self.attempts.values() if record.phase == "dispatched")

    @property
    def active(self) -> bool:
        return bool(self.running_jobs()) or bool(self.live_attempts())

    # ---- admission -----------------------------------------------------------------------

    def admit(self, request: JobRequested, now: datetime, limits: FlightLimits,
              pool: PoolView, traceparent: str | None = None) -> Decision:
        """Add a new job: fill what the cache holds, then race for the rest."""
        if request.job_id in self.jobs:
            return Decision(dispatch=self.pending_dispatches(now))

        job = JobRecord(
            job_id=request.job_id,
            tier=request.tier,
            requested_slots=request.slots,
            attempt_limit=request.slots * limits.max_attempts_per_slot,
            requested_at=request.requested_at,
            admitted_at=now,
            deadline_at=now + timedelta(seconds=request.deadline_s),
            traceparent=traceparent,
        )
        self.jobs[job.job_id] = job
        self._drop_expired_cache(now, limits)
        while job.open_slots and self.cache:
            entry = self.cache.pop(0)
            job.slots.append(SlotResult(slot=len(job.slots), attempt_id=entry.attempt_id,
                                        artifact_uri=entry.artifact_uri, score=entry.score,
                                        cached=True))
        # Attempts launched while admitting are first attempts, whichever job they are charged
        # to; every later one is a follow-up.
        self._admitting = True
        try:
            return self._settle(now, limits, pool)
        finally:
            self._admitting = False

    def pending_dispatches(self, now: datetime) -> list[AttemptDispatched]:
        """Dispatch events of attempts no worker has claimed yet, to publish again.

        A coordinator that crashed between storing its table and publishing uses this;
        the attempt ids and epochs are unchanged, so claims keep them from running twice.
        """
        return [self._dispatch_event(record, now) for record in self.attempts.values()
                if record.phase == "dispatched"]

    # ---- claims and progress ---------------------------------------------------------------

    def on_claim(self, claim: AttemptClaim, now: datetime, limits: FlightLimits) -> Decision:
        """Grant the attempt's lease to one worker at a time; the epoch is the fencing token.

        A lease held by a worker that stopped reporting is not handed over here under the
        same epoch: the holder may still run. ``on_lease_expired`` fences it first.
        """
        record = self.attempts.get(claim.attempt_id)
        job = self.jobs.get(record.job_id) if record is not None else None
        reason = ""
        if record is None or job is None:
            reason = "unknown attempt"
        elif claim.epoch < record.epoch:
            reason = f"stale dispatch: epoch {claim.epoch} < current epoch {record.epoch}"
        elif not record.live or record.phase == "generated":
            reason = f"attempt already {record.phase}"
        elif record.worker_id not in (None, claim.worker_id):
            # Even past its expiry the lease stays with its holder until the lease sweep
            # fences it with a new epoch, because the holder may be about to start.
            until = record.lease_expires_at.isoformat() if record.lease_expires_at else "-"
            reason = f"lease held by {record.worker_id} until {until}"
        if reason:
            return Decision(claims=[ClaimDecision(
                attempt_id=claim.attempt_id, job_id=claim.job_id, job_key=claim.job_key,
                epoch=claim.epoch, worker_id=claim.worker_id, granted=False, reason=reason,
            )])

        assert record is not None
        record.worker_id = claim.worker_id
        record.lease_expires_at = now + timedelta(seconds=limits.lease_s)
        return Decision(claims=[ClaimDecision(
            attempt_id=record.attempt_id, job_id=record.job_id, job_key=self.job_key,
            epoch=record.epoch, worker_id=claim.worker_id, granted=True,
            lease_expires_at=record.lease_expires_at,
        )])

    def grant_at_dispatch(self, attempt_id: str, epoch: int, worker_id: str, now: datetime,
                          limits: FlightLimits) -> datetime | None:
        """Grant the lease of an attempt being dispatched to the worker it is routed to.

        Returns the lease's expiry, or None when the attempt has a holder already or has
        moved on, as a pending attempt published again for a repeated request may have.
        """
        record = self.attempts.get(attempt_id)
        if (record is None or record.epoch != epoch or record.phase != "dispatched"
                or record.worker_id is not None):
            return None
        record.worker_id = worker_id
        record.lease_expires_at = now + timedelta(
            seconds=min(limits.lease_s, limits.dispatch_lease_s))
        return record.lease_expires_at

    def on_started(self, event: AttemptStarted) -> Decision:
        """Mark the attempt running on the worker that started it, or stop a run without
        the lease, which is a stale epoch's run or one on a worker other than the holder."""
        record = self.attempts.get(event.attempt_id)
        if record is None or event.epoch != record.epoch:
            return self._cancel_stale(event.attempt_id, event.job_id, event.epoch,
                                      event.worker_id)
        if record.worker_id not in (None, event.worker_id):
            return self._cancel_intruder(record, event.worker_id)
        if record.phase == "dispatched":
            record.phase = "running"
            record.worker_id = event.worker_id
        elif record.phase == "cancelled":
            return Decision(cancel=[self._cancel_event(record, record.cancel_reason or "")])
        return Decision()

    def on_progress(self, event: AttemptProgress) -> Decision:
        """Tell a worker to stop when its progress belongs to a fenced or cancelled attempt."""
        record = self.attempts.get(event.attempt_id)
        if record is None or event.epoch != record.epoch:
            return self._cancel_stale(event.attempt_id, event.job_id, event.epoch,
                                      event.worker_id)
        if record.worker_id not in (None, event.worker_id):
            return self._cancel_intruder(record, event.worker_id)
        if record.phase == "cancelled":
            return Decision(cancel=[self._cancel_event(record, record.cancel_reason or "")])
        return Decision()

    def _cancel_intruder(self, record: AttemptRecord, worker_id: str) -> Decision:
        """Stop the run of a worker that runs the current epoch without holding its lease.

        That happens when a lease granted with a dispatch was lost with a coordinator crash
        and granted again to another worker. The holder keeps running, so the cancel names
        only the intruding worker.
        """
        return Decision(cancel=[AttemptCancel(
            attempt_id=record.attempt_id, job_id=record.job_id, job_key=self.job_key,
            epoch=record.epoch, worker_id=worker_id,
            reason=f"lease held by {record.worker_id}",
        )])

    def stops_intruder(self, cancel: AttemptCancel) -> bool:
        """Check whether a cancel stops a worker that runs the current epoch without its lease."""
        record = self.attempts.get(cancel.attempt_id)
        return (record is not None and record.epoch == cancel.epoch
                and record.worker_id is not None and cancel.worker_id is not None
                and record.worker_id != cancel.worker_id)

    def _cancel_stale(self, attempt_id: str, job_id: str, epoch: int,
                      worker_id: str) -> Decision:
        return Decision(cancel=[AttemptCancel(
            attempt_id=attempt_id, job_id=job_id, job_key=self.job_key, epoch=epoch,
            worker_id=worker_id, reason="fenced: a newer epoch owns this attempt",
        )])

    def on_lease_expired(self, attempt_id: str, now: datetime, limits: FlightLimits,
                         pool: PoolView, gone_workers: Collection[str] = ()) -> Decision:
        """Re-dispatch an attempt whose worker stopped renewing its lease, with a higher epoch.

        A lease held by one of ``gone_workers`` counts as expired before its time.
        """
        record = self.attempts.get(attempt_id)
        if record is None or record.phase not in ("dispatched", "running"):
            return Decision()
        if record.lease_expires_at is None:
            return Decision()
        if record.lease_expires_at > now and record.worker_id not in gone_workers:
            return Decision()

        decision = Decision(cancel=[self._cancel_event(record, "lease expired")])
        job = self.jobs.get(record.job_id)
        if job is None or not job.running:
            record.phase = "cancelled"
            record.cancel_reason = "lease expired after the job ended"
            decision.outcomes.append((record.model_copy(), "timed_out"))
            return decision
        return decision.extend(self._run_again(job, record, now, limits, pool, "lease expired"))

    def on_attempt_timeout(self, attempt_id: str, epoch: int, now: datetime,
                           limits: FlightLimits, pool: PoolView, *, hung: bool,
                           reason: str) -> Decision:
        """Act on the timeout policy: re-dispatch a hung attempt, or cancel one too slow.

        A hung attempt goes out again under a higher epoch, so its worker is fenced even if
        it wakes up. An attempt that cannot meet its deadline is cancelled, and the flight
        launches what it still needs.
        """
        record = self.attempts.get(attempt_id)
        if record is None or record.epoch != epoch or record.phase not in ("dispatched",
                                                                           "running"):
            return Decision()
        decision = Decision(cancel=[self._cancel_event(record, reason)])
        decision.outcomes.append((record.model_copy(), "timed_out"))
        job = self.jobs.get(record.job_id)
        if hung and job is not None and job.running:
            return decision.extend(self._run_again(job, record, now, limits, pool, reason,
                                                   outcome_recorded=True))
        record.phase = "cancelled"
        record.cancel_reason = reason
        return decision.extend(self._settle(now, limits, pool))

    def _run_again(self, job: JobRecord, record: AttemptRecord, now: datetime,
                   limits: FlightLimits, pool: PoolView, reason: str, *,
                   outcome_recorded: bool = False) -> Decision:
        """Re-dispatch an attempt whose worker crashed or hung, under a higher epoch.

        With retry limits set, each re-dispatch counts as a retry of the attempt and of the
        job, so an attempt that brings down every worker that runs it ends at the limit.
        """
        if limits.max_retries_per_attempt > 0:
            if record.retries >= limits.max_retries_per_attempt \
                    or job.retries >= limits.max_retries_per_job:
                record.phase = "failed"
                record.error = f"{reason} after {record.retries} retries"
                decision = Decision()
                if not outcome_recorded:
                    decision.outcomes.append((record.model_copy(), "failed"))
                if job.retries >= limits.max_retries_per_job:
                    decision.completed.append(self._complete(
                        job, now, f"retry limit of {limits.max_retries_per_job} per job "
                        f"reached; last error {reason}"[:2_000]))
                return decision.extend(self._settle(now, limits, pool))
            record.retries += 1
            job.retries += 1
        return Decision(dispatch=[self._next_epoch(record, now)])

    def _next_epoch(self, record: AttemptRecord, now: datetime) -> AttemptDispatched:
        """Fence the attempt's current run and return its dispatch under the next epoch."""
        record.epoch += 1
        record.phase = "dispatched"
        record.worker_id = None
        record.lease_expires_at = None
        record.dispatched_at = now
        return self._dispatch_event(record, now)

    def renew_lease(self, attempt_id: str, epoch: int, worker_id: str, until: datetime) -> bool:
        """Extend a lease from a progress heartbeat of its current holder."""
        record = self.attempts.get(attempt_id)
        if record is None or record.epoch != epoch or record.worker_id != worker_id:
            return False
        if record.phase not in ("dispatched", "running"):
            return False
        record.lease_expires_at = until
        return True

    # ---- results -----------------------------------------------------------------------------

    def on_finished(self, event: AttemptFinished, now: datetime, limits: FlightLimits,
                    pool: PoolView) -> Decision:
        record = self.attempts.get(event.attempt_id)
        if record is None or event.epoch != record.epoch:
            return Decision()
        if record.phase == "cancelled" and record.gpu_s == 0.0:
            # The worker confirms a cancellation: account for the GPU time it used.
            record.gpu_s = event.gpu_s
            if event.status == AttemptStatus.SUCCEEDED:
                record.artifact_uri = event.artifact_uri
                return Decision()
            return Decision(outcomes=[(record.model_copy(), "cancelled")])
        if record.phase not in ("dispatched", "running"):
            return Decision()

        record.gpu_s = event.gpu_s
        record.worker_id = event.worker_id
        if event.status == AttemptStatus.SUCCEEDED:
            record.phase = "generated"
            record.artifact_uri = event.artifact_uri
            return Decision()

        outcome: AttemptPhase = (
            "cancelled" if event.status == AttemptStatus.CANCELLED else "failed")
        record.error = event.error
        job = self.jobs.get(record.job_id)
        if outcome == "cancelled" and event.error_type == STRAGGLER_ERROR_TYPE \
                and job is not None and job.running:
            # The worker stopped a straggler before this flight's own check saw it.
            self._refund_straggler(job)
        if outcome == "failed" and limits.max_retries_per_attempt > 0 and job is not None \
                and job.running:
            return self._on_failed(job, record, event, now, limits, pool)
        if record.phase != "cancelled":
            record.phase = outcome
        decision = Decision(outcomes=[(record.model_copy(), outcome)])
        return decision.extend(self._settle(now, limits, pool))

    def _on_failed(self, job: JobRecord, record: AttemptRecord, event: AttemptFinished,
                   now: datetime, limits: FlightLimits, pool: PoolView) -> Decision:
        """Retry a transient failure, or fail the job at once on a permanent one.

        The worker set ``retriable`` from the error's type. A permanent error (invalid
        parameters) fails every running job of the flight, since they share parameters.
        """
        error = f"{event.error_type}: {event.error}" if event.error_type else (event.error or "")
        failed = record.model_copy(update={"phase": "failed"})
        if not event.retriable:
            record.phase = "failed"
            decision = Decision(outcomes=[(failed, "failed")])
            for other in self.live_attempts():
                if other.phase in ("dispatched", "running"):
                    decision.cancel.append(self._cancel(other, "job failed permanently"))
            for running in self.running_jobs():
                decision.completed.append(
                    self._complete(running, now, f"permanent failure: {error}"[:2_000]))
            return decision

        if record.retries < limits.max_retries_per_attempt \
                and job.retries < limits.max_retries_per_job:
            record.retries += 1
            job.retries += 1
            return Decision(outcomes=[(failed, "failed")],
                            retry=[(self._next_epoch(record, now), record.retries)])

        record.phase = "failed"
        decision = Decision(outcomes=[(failed, "failed")])
        if job.retries >= limits.max_retries_per_job:
            decision.completed.append(self._complete(
                job, now, f"retry limit of {limits.max_retries_per_job} per job reached; "
                f"last error {error}"[:2_000]))
        return decision.extend(self._settle(now, limits, pool))

    def on_scored(self, event: ResultScored, now: datetime, limits: FlightLimits,
                  pool: PoolView) -> Decision:
        record = self.attempts.get(event.attempt_id)
        if record is None:
            return Decision()
        if event.epoch < record.epoch:
            # A fenced worker's late result never fills a slot, but may serve the cache.
            if event.accepted and not record.used and record.phase != "accepted":
                self._add_to_cache(event.attempt_id, event.artifact_uri, event.score, now, limits)
            return Decision()
        if record.phase in ("accepted", "rejected"):
            return Decision()

        record.score = event.score
        record.artifact_uri = event.artifact_uri
        if event.accepted:
            record.phase = "accepted"
            job = next((job for job in self.running_jobs() if job.open_slots), None)
            if job is not None:
                self._fill(job, record, fallback=False)
                outcome = "accepted"
            else:
                self._add_to_cache(record.attempt_id, event.artifact_uri, event.score, now,
                                   limits)
                outcome = "cached"
        else:
            record.phase = "rejected"
            outcome = "rejected"
        decision = Decision(outcomes=[(record.model_copy(), outcome)])
        return decision.extend(self._settle(now, limits, pool))

    def on_deadline(self, job_id: str, now: datetime, limits: FlightLimits,
                    pool: PoolView) -> Decision:
        """End a job whose deadline passed, filling open slots with fallback results."""
        job = self.jobs.get(job_id)
        if job is None or not job.running or now < job.deadline_at:
            return Decision()
        decision = Decision(completed=[self._complete(job, now, "deadline reached")])
        return decision.extend(self._settle(now, limits, pool))

    def on_delivery_ack(self, ack: DeliveryAck, critical: list[str]) -> Decision:
        """Mark the job delivered once every critical consumer acknowledged it.

        One failed acknowledgement ends delivery as ``delivery_failed``. Later or repeated
        acknowledgements change nothing.
        """
        job = self.jobs.get(ack.job_id)
        if job is None or job.running or job.delivery is not None:
            return Decision()
        # A consumer acknowledged the completion, so it reached the broker.
        job.outcome_sent = True
        job.acks[ack.consumer] = (ack.delivered, ack.reason)
        failed = [f"{name}: {reason}" for name, (ok, reason) in job.acks.items() if not ok]
        if failed:
            job.delivery = "delivery_failed"
        elif all(job.acks.get(name, (False, ""))[0] for name in critical):
            job.delivery = "delivered"
        else:
            return Decision()
        return Decision(delivered=[JobDelivered(
            job_id=job.job_id, tenant_id=self.tenant_id, status=job.delivery,
            reason="; ".join(failed)[:2_000],
        )])

    def replan(self, now: datetime, limits: FlightLimits, pool: PoolView) -> Decision:
        return self._settle(now, limits, pool)

    # ---- housekeeping ----------------------------------------------------------------------

    def expire(self, now: datetime, retention_s: float,
               limits: FlightLimits) -> tuple[list[str], list[str]]:
        """Forget finished jobs past retention, dead attempts and expired cache entries.

        Returns the job ids removed and the artifact URIs nothing refers to any more:
        rejected, cancelled and superseded generations, and cache entries past their TTL.
        """
        removed = [
            job.job_id for job in self.jobs.values()
            if not job.running and job.finished_at is not None
            and (now - job.finished_at).total_seconds() >= retention_s
        ]
        for job_id in removed:
            del self.jobs[job_id]

        orphans: list[str] = []
        if not self.running_jobs():
            kept = {entry.attempt_id for entry in self.cache}
            for record in self.attempts.values():
                if not record.live and not record.used and record.artifact_uri \
                        and record.attempt_id not in kept:
                    orphans.append(record.artifact_uri)
            self.attempts = {key: record for key, record in self.attempts.items()
                             if record.live}
        orphans += [entry.artifact_uri for entry in self._drop_expired_cache(now, limits)]
        return removed, orphans

    @property
    def empty(self) -> bool:
        return not self.jobs and not self.attempts and not self.cache

    # ---- internals ---------------------------------------------------------------------------

    def _settle(self, now: datetime, limits: FlightLimits, pool: PoolView) -> Decision:
        """Complete what can be completed, cancel surplus attempts, launch what is needed."""
        decision = Decision()
        for job in self.running_jobs():
            if job.open_slots == 0:
                decision.completed.append(self._complete(job, now, None))
            elif job.budget_left == 0 and not self._has_live_attempts(job.job_id):
                reason = f"attempt limit of {job.attempt_limit} reached"
                decision.completed.append(self._complete(job, now, reason))

        open_slots = sum(job.open_slots for job in self.running_jobs())
        live = self.live_attempts()
        if open_slots == 0:
            # The adaptive policy lets nearly finished surplus attempts fill the cache for a
            # later regeneration, up to the cache's free entries.
            cache_room = limits.cache_max_entries - len(self.cache)
            for record in live:
                if record.phase not in ("dispatched", "running"):
                    continue
                if (limits.policy is RacingPolicy.ADAPTIVE and record.phase == "running"
                        and cache_room > 0 and worth_finishing(
                            pool.running.get(record.attempt_id), pool.typical_service_s,
                            pool.idle_slots)):
                    cache_room -= 1
                    continue
                decision.cancel.append(self._cancel(record, "slots filled"))
            return decision

        if limits.policy is RacingPolicy.ADAPTIVE:
            decision.cancel += self._replace_stragglers(pool)
            live = self.live_attempts()
        race = attempts_to_launch(limits.policy, RaceInputs(
            open_slots=open_slots,
            in_flight=len(live),
            acceptance_rate=pool.acceptance_rate,
            budget_left=sum(job.budget_left for job in self.running_jobs()),
            pool_idle_slots=pool.idle_slots,
            backpressure=pool.backpressure,
        ))
        for _ in range(race.total):
            funded = next((job for job in self.running_jobs() if job.budget_left), None)
            if funded is None:
                break
            decision.dispatch.append(self._new_attempt(funded, now))
        return decision

    def _replace_stragglers(self, pool: PoolView) -> list[AttemptCancel]:
        """Cancel running attempts a fresh one should beat; the launch step replaces them.

        A straggler is cancelled early, so its charge goes back to the job's attempt limit
        and the replacement does not push the job into fallback. Each job may replace at
        most its attempt limit's worth of stragglers, so replacing cannot go on forever.
        """
        runs = {}
        for attempt_id, run in pool.running.items():
            record = self.attempts.get(attempt_id)
            job = self.jobs.get(record.job_id) if record is not None else None
            if record is None or job is None or record.phase != "running":
                continue
            if job.running and job.straggler_refunds_left:
                runs[attempt_id] = run
        cancels = []
        for attempt_id in stragglers(runs, pool.typical_service_s):
            run = runs[attempt_id]
            record = self.attempts[attempt_id]
            self._refund_straggler(self.jobs[record.job_id])
            cancels.append(self._cancel(record, straggler_reason(run)))
        return cancels

    def replaces_stragglers(self, job_id: str) -> bool:
        """Check whether the job may still replace a straggler with a refund.

        Dispatches of a job past this limit carry no straggler threshold, because a worker
        that stopped one would cost the job an attempt.
        """
        job = self.jobs.get(job_id)
        return job is not None and job.straggler_refunds_left

    @staticmethod
    def _refund_straggler(job: JobRecord) -> None:
        """Give a replaced straggler's attempt back to its job, up to the job's attempt limit."""
        if job.straggler_refunds_left:
            job.stragglers_replaced += 1
            job.attempts_charged -= 1

    def _has_live_attempts(self, job_id: str) -> bool:
        return any(record.job_id == job_id for record in self.live_attempts())

    def _new_attempt(self, job: JobRecord, now: datetime) -> AttemptDispatched:
        self.seq += 1
        job.attempts_charged += 1
        record = AttemptRecord(
            attempt_id=attempt_id_for(job.job_id, self.job_key, self.seq),
            job_id=job.job_id,
            seq=self.seq,
            seed=(self.seed_base + self.seq * _SEED_STRIDE) % 2**63,
            dispatched_at=now,
            followup=not self._admitting,
        )
        self.attempts[record.attempt_id] = record
        return self._dispatch_event(record, now)

    def _dispatch_event(self, record: AttemptRecord, now: datetime) -> AttemptDispatched:
        job = self.jobs[record.job_id]
        return AttemptDispatched(
            attempt_id=record.attempt_id,
            job_id=record.job_id,
            job_key=self.job_key,
            tenant_id=self.tenant_id,
            slot=min(len(job.slots), job.requested_slots - 1),
            attempt_no=record.seq,
            epoch=record.epoch,
            params=self.params,
            seed=record.seed,
            tier=job.tier,
            dispatched_at=now,
            deadline_at=job.deadline_at,
            followup=record.followup or record.epoch > 1,
        )

    def _cancel(self, record: AttemptRecord, reason: str) -> AttemptCancel:
        record.phase = "cancelled"
        record.cancel_reason = reason
        return self._cancel_event(record, reason)

    def _cancel_event(self, record: AttemptRecord, reason: str) -> AttemptCancel:
        return AttemptCancel(
            attempt_id=record.attempt_id, job_id=record.job_id, job_key=self.job_key,
            epoch=record.epoch, worker_id=record.worker_id, reason=reason,
        )

    def _fill(self, job: JobRecord, record: AttemptRecord, *, fallback: bool) -> None:
        assert record.artifact_uri is not None and record.score is not None
        record.used = True
        job.slots.append(SlotResult(slot=len(job.slots), attempt_id=record.attempt_id,
                                    artifact_uri=record.artifact_uri, score=record.score,
                                    fallback=fallback))

    def _complete(self, job: JobRecord, now: datetime, reason: str | None) -> JobCompleted:
        # Open slots take the best-scoring rejected generations, marked as fallback.
        if job.open_slots:
            candidates = sorted(
                (record for record in self.attempts.values()
                 if record.phase == "rejected" and not record.used
                 and record.artifact_uri and record.score is not None),
                key=lambda record: record.score or 0.0, reverse=True,
            )
            for record in candidates[:job.open_slots]:
                self._fill(job, record, fallback=True)

        filled = len(job.slots)
        if filled == job.requested_slots:
            status = JobStatus.COMPLETED
        elif filled:
            status = JobStatus.PARTIAL
        else:
            status = JobStatus.FAILED
        job.status = status
        job.finished_at = now
        job.reason = reason
        job.outcome_sent = False
        completed = self.completion_of(job.job_id)
        assert completed is not None
        return completed

    def unsent_outcomes(self) -> list[str]:
        """Return the ids of ended jobs whose completion event is not known to be sent."""
        return [job.job_id for job in self.jobs.values()
                if not job.running and not job.outcome_sent]

    def mark_outcome_sent(self, job_id: str) -> None:
        """Record that the broker acknowledged the completion event of ``job_id``."""
        job = self.jobs.get(job_id)
        if job is not None:
            job.outcome_sent = True

    def completion_of(self, job_id: str) -> JobCompleted | None:
        """Return the outcome of a job that ended, as it was published; None while it runs."""
        job = self.jobs.get(job_id)
        if job is None or job.status is None or job.finished_at is None:
            return None
        return JobCompleted(
            job_id=job.job_id,
            job_key=self.job_key,
            tenant_id=self.tenant_id,
            user_id=self.user_id,
            status=job.status,
            requested_slots=job.requested_slots,
            slots=list(job.slots),
            attempts=job.attempts_charged,
            tier=job.tier,
            requested_at=job.requested_at,
            completed_at=job.finished_at,
            reason=job.reason,
        )

    def _add_to_cache(self, attempt_id: str, artifact_uri: str, score: float,
                      now: datetime, limits: FlightLimits) -> None:
        if any(entry.attempt_id == attempt_id for entry in self.cache):
            return
        record = self.attempts.get(attempt_id)
        if record is not None:
            record.used = True
        self.cache.append(CacheEntry(attempt_id=attempt_id, artifact_uri=artifact_uri,
                                     score=score, created_at=now))
        self.cache.sort(key=lambda entry: entry.score, reverse=True)
        del self.cache[limits.cache_max_entries:]

    def _drop_expired_cache(self, now: datetime, limits: FlightLimits) -> list[CacheEntry]:
        ttl = timedelta(seconds=limits.cache_ttl_s)
        expired = [entry for entry in self.cache if now - entry.created_at >= ttl]
        if expired:
            self.cache = [entry for entry in self.cache if now - entry.created_at < ttl]
        return expired


def parameter_class(params: GenerationParams) -> str:
    """The class whose acceptance rate is estimated together: model, size and steps."""
    return f"{params.model}|{params.width}x{params.height}|{params.steps}"


def _seed_from(job_key: str) -> int:
    return int.from_bytes(hashlib.sha256(job_key.encode()).digest()[:8], "big") % 2**63
