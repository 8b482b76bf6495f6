"""Run the Celery baseline: redis-server, Celery worker processes, and a replay of jobs.

``CeleryRun`` starts one ``jobs`` worker for chord callbacks and N ``generate`` workers with
Celery's default prefork pool, each with as many child processes as a slotforge GPU worker
has slots. The thread pool would share one device per process like slotforge's slots, but
with the Redis transport its workers fetched retried tasks in bursts seconds apart (Celery
5.5.3, kombu 5.5.4), so the baseline uses prefork. The run submits each job as a chord at
its arrival time, takes completions from a Redis list, and can SIGKILL a worker's process
group while jobs run, starting a fresh worker in its place.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import redis
from celery import Celery, chord, group

from bench.celery_app import (
    COMPLETED_KEY,
    EXECUTIONS_KEY,
    FINISH_TASK,
    GENERATE_QUEUE,
    GENERATE_TASK,
    JOBS_QUEUE,
    CelerySettings,
    make_app,
)
from bench.pipeline_run import JobOutcome
from schemas.events import JobRequested

logger = logging.getLogger(__name__)

STOP_GRACE_S = 15.0
# Pool processes of the worker that runs chord callbacks; they only append to a Redis list.
JOBS_WORKER_CONCURRENCY = 2


def _pop_completion(client: redis.Redis, timeout_s: float) -> tuple[bytes, bytes] | None:
    """Pop the oldest completion as (list name, JSON value), or None after ``timeout_s``."""
    # redis-py 5.2 types the timeout as int, but Redis 6 and later take fractional seconds.
    popped = client.blpop([COMPLETED_KEY], timeout=timeout_s)  # type: ignore[arg-type]
    # The synchronous client returns the reply itself, never an awaitable, and redis-py
    # turns BLPOP's reply into a (list name, value) tuple.
    return cast(tuple[bytes, bytes] | None, popped)


@dataclass
class CeleryNode:
    """One ``celery worker`` process, started in its own session so a kill takes its children."""

    name: str
    queue: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def hostname(self) -> str:
        return f"{self.name}@bench"

    def alive(self) -> bool:
        return self.process.poll() is None


@dataclass
class Execution:
    """One run of one attempt on one worker, in wall-clock seconds since the epoch."""

    attempt: str
    worker: str
    start: float
    end: float
    gpu_s: float
    finished: bool


@dataclass
class CeleryRecord:
    """Outcomes, delivered slots and executions of one replay through Celery."""

    outcomes: list[JobOutcome]
    delivered_slots: int
    fallback_slots: int
    executions: list[Execution] = field(default_factory=list)


class CeleryRun:
    """Celery worker processes of one run, on a running redis-server, stopped on exit.

    Args:
        settings: what every worker and the client use.
        workers: ``generate`` worker processes.
        concurrency: pool processes per ``generate`` worker.
        log_dir: one log file per worker process.
    """

    def __init__(self, settings: CelerySettings, workers: int, concurrency: int,
                 log_dir: Path) -> None:
        self.settings = settings
        self.workers = workers
        self.concurrency = concurrency
        self.log_dir = log_dir
        self.nodes: list[CeleryNode] = []
        self.kills: dict[str, float] = {}
        self.app: Celery = make_app(settings)
        self.redis = redis.Redis.from_url(f"{settings.redis_url}/2")
        self._restarts = 0

    def __enter__(self) -> CeleryRun:
        # A run starts from empty queues, results and records.
        for db in (0, 1, 2):
            redis.Redis.from_url(f"{self.settings.redis_url}/{db}").flushdb()
        self.start_node("jobs", JOBS_QUEUE, JOBS_WORKER_CONCURRENCY)
        for index in range(1, self.workers + 1):
            self.start_node(f"gpu-{index}", GENERATE_QUEUE, self.concurrency)
        return self

    def __exit__(self, *exc: object) -> None:
        for node in reversed(self.nodes):
            self._stop(node)
        self.app.close()
        self.redis.close()

    def start_node(self, name: str, queue: str, concurrency: int) -> CeleryNode:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"celery-{name}.log"
        command = [
            sys.executable, "-m", "celery", "-A", "bench.celery_app", "worker",
            "--hostname", f"{name}@bench", "--queues", queue,
            "--pool", "prefork", "--concurrency", str(concurrency),
            "--prefetch-multiplier", "1", "--optimization", "fair",
            # Gossip, mingle and heartbeats exchange events between workers that no task
            # of this benchmark uses.
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--loglevel", "INFO",
        ]
        env = {**os.environ, **self.settings.to_env()}
        with open(log_path, "ab") as log:
            process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        node = CeleryNode(name, queue, process, log_path)
        self.nodes.append(node)
        logger.info("Started Celery worker %s (pid %d), log %s", node.hostname, process.pid,
                    log_path)
        return node

    def _stop(self, node: CeleryNode) -> None:
        if not node.alive():
            return
        # Celery's warm shutdown lets running tasks finish; a second signal would cut it.
        os.killpg(node.process.pid, signal.SIGTERM)
        try:
            node.process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            logger.warning("Celery worker %s (pid %d) did not stop within %.0f s; killing it",
                           node.hostname, node.process.pid, STOP_GRACE_S)
            os.killpg(node.process.pid, signal.SIGKILL)
            node.process.wait()
        logger.info("Stopped Celery worker %s with status %s", node.hostname,
                    node.process.returncode)

    def kill_and_replace(self, victim_index: int) -> str:
        """SIGKILL the process group of one ``generate`` worker, then start a fresh one."""
        live = [node for node in self.nodes if node.queue == GENERATE_QUEUE and node.alive()]
        victim = live[victim_index % len(live)]
        os.killpg(victim.process.pid, signal.SIGKILL)
        victim.process.wait()
        self.kills[victim.hostname] = time.time()
        logger.info("Killed Celery worker %s (pid %d)", victim.hostname, victim.process.pid)
        self._restarts += 1
        self.start_node(f"gpu-r{self._restarts}", GENERATE_QUEUE, self.concurrency)
        return victim.hostname

    def check_alive(self) -> None:
        """Raise when a worker exited on its own, naming its log."""
        for node in self.nodes:
            if not node.alive() and node.hostname not in self.kills:
                raise RuntimeError(f"Celery worker {node.hostname} exited with status "
                                   f"{node.process.returncode}; see {node.log_path}")

    def wait_ready(self, timeout_s: float = 120.0) -> float:
        """Wait until every worker replies to a ping, then run one warm-up job through a chord."""
        started = time.monotonic()
        expected = {node.hostname for node in self.nodes}
        while True:
            self.check_alive()
            replies = self.app.control.ping(timeout=1.0)
            answered = {name for reply in replies for name in reply}
            if expected <= answered:
                break
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"Celery workers not ready after {timeout_s:.0f} s: "
                                   f"{sorted(expected - answered)} did not reply to a ping; "
                                   f"see the logs in {self.log_dir}")
        job = {"job_id": "warmup", "seed": 1,
               "params": {"model": "bench-warmup", "prompt": "warm-up", "steps": 2}}
        self._submit(job, 1)
        popped = _pop_completion(self.redis, max(1.0, timeout_s))
        if popped is None:
            raise TimeoutError(f"the warm-up job did not complete; see the logs in "
                               f"{self.log_dir}")
        self.redis.delete(EXECUTIONS_KEY)
        return time.monotonic() - started

    def _submit(self, job: dict[str, object], slots: int) -> None:
        header = group(self.app.signature(GENERATE_TASK, args=(job, slot))
                       for slot in range(slots))
        chord(header)(self.app.signature(FINISH_TASK, args=(job,)))

    def replay(self, schedule: Sequence[tuple[float, JobRequested]],
               wait_timeout_s: float) -> CeleryRecord:
        """Submit each job at its arrival offset and wait for every completion.

        A job without a completion within ``wait_timeout_s`` of its submission keeps the
        status ``timed_out``.
        """
        outcomes = {request.job_id: JobOutcome(request.job_id, request.slots, 0.0)
                    for _, request in schedule}
        record = CeleryRecord([outcomes[request.job_id] for _, request in schedule], 0, 0)
        origin = time.monotonic()
        submitted = threading.Event()
        listener = threading.Thread(target=self._listen, name="celery-completions",
                                    args=(record, outcomes, origin, submitted, wait_timeout_s))
        listener.start()
        try:
            for arrival_s, request in schedule:
                delay = origin + arrival_s - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                outcomes[request.job_id].submitted_s = time.monotonic() - origin
                job = {"job_id": request.job_id, "seed": request.seed or 0,
                       "params": request.params.model_dump(mode="json")}
                self._submit(job, request.slots)
        finally:
            submitted.set()
            listener.join()
        return record

    def _listen(self, record: CeleryRecord, outcomes: dict[str, JobOutcome], origin: float,
                submitted: threading.Event, wait_timeout_s: float) -> None:
        client = redis.Redis.from_url(f"{self.settings.redis_url}/2")
        try:
            while True:
                pending = [outcome for outcome in outcomes.values() if outcome.ended_s is None]
                if submitted.is_set():
                    now = time.monotonic() - origin
                    pending = [outcome for outcome in pending
                               if now < outcome.submitted_s + wait_timeout_s]
                    if not pending:
                        return
                popped = _pop_completion(client, 0.5)
                if popped is None:
                    continue
                completed = json.loads(popped[1])
                outcome = outcomes.get(completed["job_id"])
                if outcome is None or outcome.ended_s is not None:
                    continue
                outcome.ended_s = time.monotonic() - origin
                outcome.status = "completed"
                record.delivered_slots += len(completed["slots"])
                record.fallback_slots += sum(1 for slot in completed["slots"]
                                             if slot["fallback"])
        finally:
            client.close()

    def executions(self) -> list[Execution]:
        """Pair the start and finish records of every execution.

        An execution on a killed worker without a finish ends at the kill. One on a live
        worker without a finish runs until the newest record.
        """
        # The synchronous client returns the reply itself, never an awaitable.
        raws = cast(list[bytes], self.redis.lrange(EXECUTIONS_KEY, 0, -1))
        events = [json.loads(raw) for raw in raws]
        finishes = {(event["attempt"], event["node"]): event for event in events
                    if event["event"] == "finish"}
        last = max((event["at"] for event in events), default=time.time())
        runs = []
        for event in events:
            if event["event"] != "start":
                continue
            finish = finishes.get((event["attempt"], event["node"]))
            if finish is not None:
                runs.append(Execution(event["attempt"], event["node"], event["at"],
                                      finish["at"], finish["gpu_s"], True))
                continue
            killed_at = self.kills.get(event["node"])
            end = killed_at if killed_at is not None and killed_at >= event["at"] else last
            runs.append(Execution(event["attempt"], event["node"], event["at"], end,
                                  end - event["at"], False))
        return runs
