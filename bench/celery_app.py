"""The Celery baseline of the peers benchmark: tasks and app, tuned as Celery's docs advise.

A job is a chord: a group of K ``generate_slot`` tasks on the ``generate`` queue, whose
results ``finish_job`` collects on the ``jobs`` queue. Each ``generate_slot`` draws an image
from the same simulated GPU as slotforge's workers, stores it, scores it with the same
post-processing code, and retries itself with exponential backoff and full jitter when the
image is rejected or the device fails. At the attempt limit it returns the best-scoring
rejected image, as slotforge's fallback does.

Every execution records its start and finish in a Redis list, so the benchmark can count
executions of one attempt that ran at the same time. Workers start with
``celery -A bench.celery_app worker`` and read their settings from the environment variable
``SLOTFORGE_BENCH_CELERY`` (JSON of ``CelerySettings``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis
from celery import Celery, Task

from gpu_inference.artifacts import ArtifactStore
from gpu_inference.generation import GenerationRequest
from gpu_inference.scoring import judge, score_png
from gpu_inference.simulated import SimulatedRunner
from schemas.errors import TransientError
from schemas.events import GenerationParams
from streams.config import SimulationSettings

logger = logging.getLogger(__name__)

SETTINGS_ENV = "SLOTFORGE_BENCH_CELERY"
GENERATE_QUEUE = "generate"
JOBS_QUEUE = "jobs"
GENERATE_TASK = "bench.generate_slot"
FINISH_TASK = "bench.finish_job"
# Redis lists the tasks append to and the benchmark reads.
EXECUTIONS_KEY = "bench:executions"
COMPLETED_KEY = "bench:completed"


@dataclass(frozen=True)
class CelerySettings:
    """Settings of the baseline's Celery workers, passed as JSON in ``SLOTFORGE_BENCH_CELERY``."""

    redis_url: str
    artifact_dir: str
    p50_s: float
    sigma: float
    acceptance: float
    accept_threshold: float
    max_attempts_per_slot: int
    # Countdown before retry n is drawn from [0, min(max, base * 2**n)] (full jitter).
    retry_backoff_base_s: float
    retry_backoff_max_s: float
    # Seconds after which Redis hands an unacknowledged task to another worker.
    visibility_timeout_s: float

    def to_env(self) -> dict[str, str]:
        return {SETTINGS_ENV: json.dumps(asdict(self))}

    @classmethod
    def from_env(cls) -> CelerySettings:
        raw = os.environ.get(SETTINGS_ENV)
        if not raw:
            raise RuntimeError(f"{SETTINGS_ENV} is not set; the peers benchmark sets it to the "
                               "JSON of bench.celery_app.CelerySettings")
        return cls(**json.loads(raw))


def configure(app: Celery, settings: CelerySettings) -> None:
    """Apply the settings Celery's docs recommend for long tasks that must not be lost."""
    app.conf.update(
        broker_url=f"{settings.redis_url}/0",
        result_backend=f"{settings.redis_url}/1",
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # Acknowledge after the task ran, so a task of a killed worker is delivered again.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # Reserve one task per free pool slot, never a backlog behind a long task.
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        result_expires=3_600,
        worker_disable_rate_limits=True,
        task_routes={GENERATE_TASK: {"queue": GENERATE_QUEUE},
                     FINISH_TASK: {"queue": JOBS_QUEUE}},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )


def attempt_seed(job_seed: int, slot: int, retry: int) -> int:
    """Seed of one attempt of one slot, derived like slotforge's per-attempt seeds."""
    digest = hashlib.sha256(f"{job_seed}:{slot}:{retry}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 2**63


def retry_countdown_s(settings: CelerySettings, retry: int, rng: random.Random) -> float:
    """Exponential backoff with full jitter, as Celery's ``retry_backoff`` computes it."""
    ceiling = min(settings.retry_backoff_max_s, settings.retry_backoff_base_s * 2 ** retry)
    return rng.uniform(0.0, ceiling)


class _Worker:
    """Per-process state the tasks share: the simulated GPU, artifact store and Redis client."""

    def __init__(self, settings: CelerySettings) -> None:
        self.settings = settings
        self.runner = SimulatedRunner(SimulationSettings(
            enabled=True, p50_s=settings.p50_s, sigma=settings.sigma,
            acceptance=settings.acceptance))
        self.store = ArtifactStore(Path(settings.artifact_dir))
        self.redis = redis.Redis.from_url(f"{settings.redis_url}/2")
        self.rng = random.Random()

    def record(self, event: dict[str, Any]) -> None:
        self.redis.rpush(EXECUTIONS_KEY, json.dumps(event))


def make_app(settings: CelerySettings) -> Celery:
    """Build the Celery app and register its two tasks."""
    app = Celery("slotforge-bench-peer")
    configure(app, settings)
    state: dict[str, _Worker] = {}

    def worker() -> _Worker:
        if "worker" not in state:
            state["worker"] = _Worker(settings)
        return state["worker"]

    @app.task(name=GENERATE_TASK, bind=True, max_retries=settings.max_attempts_per_slot - 1)
    def generate_slot(self: Task, job: dict[str, Any], slot: int,
                      best: dict[str, Any] | None = None) -> dict[str, Any]:
        return _generate_slot(self, worker(), job, slot, best)

    @app.task(name=FINISH_TASK)
    def finish_job(slots: list[dict[str, Any]], job: dict[str, Any]) -> dict[str, Any]:
        completed = {"job_id": job["job_id"], "slots": slots, "completed_at": time.time(),
                     "status": "completed" if all(not item["fallback"] for item in slots)
                     else "partial_fallback"}
        worker().redis.rpush(COMPLETED_KEY, json.dumps(completed))
        logger.info("Job %s finished with %d slots", job["job_id"], len(slots))
        return completed

    return app


def _generate_slot(task: Task, worker: _Worker, job: dict[str, Any], slot: int,
                   best: dict[str, Any] | None) -> dict[str, Any]:
    retry = task.request.retries
    task_id = task.request.id
    attempt = f"{task_id}-{retry}"
    node = task.request.hostname or socket.gethostname()
    params = GenerationParams.model_validate(job["params"])
    request = GenerationRequest.from_params(params, attempt_seed(job["seed"], slot, retry))
    worker.record({"event": "start", "attempt": attempt, "job_id": job["job_id"],
                   "node": node, "at": time.time()})

    try:
        result = worker.runner.generate(request)
    except TransientError as err:
        worker.record({"event": "finish", "attempt": attempt, "node": node, "at": time.time(),
                       "gpu_s": 0.0, "accepted": False, "failed": True})
        logger.warning("Attempt %s of job %s slot %d failed: %s; retrying", attempt,
                       job["job_id"], slot, err)
        raise task.retry(exc=err, countdown=retry_countdown_s(worker.settings, retry,
                                                              worker.rng)) from err

    # Each Celery attempt has its own id, so every file is its first and only epoch.
    uri = worker.store.write_png(job["job_id"], attempt, result.image, epoch=1)
    score = score_png(worker.store.read(uri))
    accepted, reason = judge(score, worker.settings.accept_threshold)
    worker.record({"event": "finish", "attempt": attempt, "node": node, "at": time.time(),
                   "gpu_s": result.gpu_s, "accepted": accepted, "failed": False})
    candidate = {"slot": slot, "attempt": attempt, "artifact_uri": uri, "score": score.score,
                 "fallback": False}
    if accepted:
        return candidate

    if best is None or candidate["score"] > best["score"]:
        best = candidate
    if retry >= worker.settings.max_attempts_per_slot - 1:
        logger.info("Slot %d of job %s hit the attempt limit; returning the best rejected "
                    "image %s", slot, job["job_id"], best["attempt"])
        return {**best, "fallback": True}
    logger.info("Attempt %s of job %s slot %d %s; retrying", attempt, job["job_id"], slot,
                reason)
    raise task.retry(args=(job, slot), kwargs={"best": best},
                     countdown=retry_countdown_s(worker.settings, retry, worker.rng))


def __getattr__(name: str) -> Celery:
    # The worker's ``-A bench.celery_app`` looks up ``app``. Building it lazily keeps the
    # module importable by the benchmark process, which has no SLOTFORGE_BENCH_CELERY.
    if name == "app":
        app = make_app(CelerySettings.from_env())
        globals()["app"] = app
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
