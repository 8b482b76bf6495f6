"""The main job: replay the Alibaba trace through the whole pipeline on a local broker.

It starts a single-node Kafka broker, creates the topics, starts every service as its own
process, replays trace requests through the producer client, waits for every job to end,
stops everything it started (also on Ctrl-C or SIGTERM), then reports per-stage latency
from the spans in ClickHouse and writes the summary to ``.local/demo/summary.json``.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.kafka_broker import KafkaBroker
from schemas.events import JobCompleted, Tier
from streams.client import JobRejectedError, SlotforgeClient
from streams.config import LOCAL_DIR, Settings, settings_to_env
from streams.kafka import create_topics, group_lag, make_producer
from streams.processes import ProcessGroup, sigterm_as_interrupt
from streams.trace_replay import (
    DEFAULT_TRACE,
    compress,
    densest_window,
    load_trace,
    replay,
    to_job_request,
)
from streams.tracing import Tracing

logger = logging.getLogger(__name__)

DEMO_DIR = LOCAL_DIR / "demo"
TENANT_ID = "demo"


@dataclass
class DemoOptions:
    jobs: int = 80
    arrival_window_s: float = 60.0
    workers: int = 2
    worker_slots: int = 2
    timeout_s: float = 900.0
    trace_path: Path = DEFAULT_TRACE
    out_dir: Path = DEMO_DIR


def _reset_local_state(settings: Settings, options: DemoOptions) -> None:
    """Remove what an earlier run left, so every run starts from the same place."""
    for path in (options.out_dir, settings.artifact_dir, settings.delivery_dir):
        shutil.rmtree(path, ignore_errors=True)
    dsn = settings.clickhouse.dsn
    if dsn.startswith("chdb://"):
        shutil.rmtree(dsn.removeprefix("chdb://"), ignore_errors=True)
    options.out_dir.mkdir(parents=True, exist_ok=True)


def run_demo(settings: Settings, options: DemoOptions) -> dict[str, Any]:
    """Run the main job end to end and return its summary."""
    _reset_local_state(settings, options)
    broker = KafkaBroker(options.out_dir / "kafka")
    processes: ProcessGroup | None = None
    with sigterm_as_interrupt():
        try:
            print(f"Starting Kafka broker (data in {broker.data_dir}) ...", flush=True)
            broker.start()
            settings = settings.model_copy(update={
                "kafka": settings.kafka.model_copy(
                    update={"bootstrap_servers": broker.bootstrap_servers})
            })
            asyncio.run(create_topics(settings.kafka, settings.topics.all))

            env = {key: value for key, value in os.environ.items()
                   if not key.startswith("SLOTFORGE_")}
            env.update(settings_to_env(settings))
            processes = ProcessGroup(options.out_dir / "logs", env)
            _start_services(processes, options)
            print(f"Started {len(processes.processes)} services; logs in "
                  f"{processes.log_dir}", flush=True)

            outcomes = asyncio.run(_replay_and_wait(settings, options, processes))
            _drain_spans(settings, processes)
        finally:
            if processes is not None:
                print("Stopping services ...", flush=True)
                processes.stop_all()
            broker.stop()

    summary = _summarize(settings, options, outcomes)
    (options.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _start_services(processes: ProcessGroup, options: DemoOptions) -> None:
    processes.start("span-sink")
    processes.start("coordinator")
    for index in range(1, options.workers + 1):
        processes.start("gpu-worker", name=f"gpu-worker-{index}", env={
            "SLOTFORGE_WORKER__WORKER_ID": f"gpu-worker-{index}",
            "SLOTFORGE_WORKER__SLOTS": str(options.worker_slots),
        })
    processes.start("postprocess")
    processes.start("retry-router")
    processes.start("delivery")
    processes.start("thumbnails")


async def _replay_and_wait(
    settings: Settings, options: DemoOptions, processes: ProcessGroup
) -> dict[str, Any]:
    trace = compress(densest_window(load_trace(options.trace_path), options.jobs),
                     options.arrival_window_s)
    requests = [(row.arrival_s, to_job_request(row, tenant_id=TENANT_ID, tier=Tier.STANDARD,
                                               deadline_s=options.timeout_s))
                for row in trace]
    print(f"Replaying {len(requests)} requests from {options.trace_path.name} over "
          f"{options.arrival_window_s:.0f} s ({sum(r.slots for _, r in requests)} slots)",
          flush=True)

    tracing = Tracing("demo-client", settings.tracing, settings.topics.spans)
    span_producer = make_producer(settings.kafka)
    await span_producer.start()
    outcomes: dict[str, Any] = {"submitted": 0, "results": {}}
    results: dict[str, str] = outcomes["results"]
    wait_budget_s = options.arrival_window_s + options.timeout_s

    async def wait_one(client: SlotforgeClient, job_id: str) -> None:
        try:
            completed: JobCompleted = await client.wait(job_id, wait_budget_s)
            results[job_id] = completed.status.value
        except JobRejectedError:
            results[job_id] = "rejected"
        except TimeoutError:
            results[job_id] = "timed_out"

    try:
        async with asyncio.TaskGroup() as group:
            spans_task = group.create_task(tracing.publish_routine(span_producer))
            progress_task = group.create_task(
                _progress_routine(results, len(requests), processes))
            async with SlotforgeClient(settings.kafka, tracer=tracing.tracer) as client:
                waiters: list[asyncio.Task[None]] = []

                async def submit(request: Any) -> None:
                    await client.submit(request)
                    outcomes["submitted"] += 1
                    waiters.append(group.create_task(wait_one(client, request.job_id)))

                await replay(requests, submit)
                await asyncio.gather(*waiters)
            progress_task.cancel()
            spans_task.cancel()
    finally:
        await tracing.flush(span_producer)
        await span_producer.stop()
        tracing.shutdown()
    counts = collections.Counter(results.values())
    print(f"  {len(results)}/{len(requests)} jobs ended {dict(counts)}", flush=True)
    return outcomes


async def _progress_routine(results: dict[str, str], total: int, processes: ProcessGroup,
                            interval_s: float = 10.0) -> None:
    reported_pids: set[int] = set()
    while True:
        await asyncio.sleep(interval_s)
        counts = collections.Counter(results.values())
        print(f"  {len(results)}/{total} jobs ended {dict(counts)}", flush=True)
        _warn_new_exits(processes, reported_pids)


def _warn_new_exits(processes: ProcessGroup, reported_pids: set[int]) -> None:
    """Warn once about each service that exited on its own, tracking pids in ``reported_pids``."""
    for child in processes.failed():
        if child.pid in reported_pids:
            continue
        reported_pids.add(child.pid)
        logger.warning("%s (pid %d) exited with status %s; see %s", child.name, child.pid,
                       child.process.returncode, child.log_path)


def _drain_spans(settings: Settings, processes: ProcessGroup) -> None:
    """Stop the producers of spans, then let the sink catch up before it stops."""
    for child in processes.processes:
        if child.service != "span-sink":
            processes.stop(child)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        lag = asyncio.run(group_lag(settings.kafka, settings.clickhouse.sink_group_id,
                                    settings.topics.spans))
        if lag == 0:
            return
        time.sleep(0.5)
    logger.warning("Span sink still had unconsumed spans after 60 s")


def _summarize(settings: Settings, options: DemoOptions,
               outcomes: dict[str, Any]) -> dict[str, Any]:
    from infra.clickhouse import open_client
    from streams.report import span_count, stage_latency

    counts = collections.Counter(outcomes["results"].values())
    client = open_client(settings.clickhouse)
    try:
        stages = stage_latency(client, settings.clickhouse.table)
        spans = span_count(client, settings.clickhouse.table)
    finally:
        client.close()
    return {
        "submitted": outcomes["submitted"],
        "completed": counts.get("completed", 0),
        "partial": counts.get("partial", 0),
        "failed": counts.get("failed", 0),
        "rejected": counts.get("rejected", 0),
        "cancelled": counts.get("cancelled", 0),
        "timed_out": counts.get("timed_out", 0),
        "stages": stages,
        "clickhouse_spans": spans,
        "trace": str(options.trace_path.name),
        "workers": options.workers,
        "worker_slots": options.worker_slots,
    }
