"""Span sink ingest rate from Kafka into chDB, and attribution query latency over 1M spans.

Ingest: a local broker is started, N span rows are produced to the spans topic first, then
the span sink (consumers.span_sink.run, default batch settings) runs in this process until
its consumer group has committed every record. Queries: synthetic jobs shaped like the
pipeline's traces are inserted straight into a second table of the same chDB store, then
each attribution query runs several times and the median is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from bench.pipeline_run import run_until_sigterm
from consumers import span_sink
from infra.clickhouse import ensure_schema, insert_spans, open_client, quote_table
from infra.kafka_broker import KafkaBroker
from streams import report
from streams.config import ClickHouseSettings, KafkaSettings, Settings
from streams.kafka import create_topics, make_consumer, make_producer, topic_partitions

logger = logging.getLogger(__name__)

INGEST_TARGET_SPANS_PER_S = 20_000
QUERY_TARGET_S = 1.0
DEFAULT_INGEST_SPANS = 200_000
DEFAULT_QUERY_SPANS = 1_000_000
DEFAULT_REPEATS = 5
DEFAULT_INGEST_RUNS = 3
INGEST_PARTITIONS = 3
QUERY_TABLE = "bench_traces"
INSERT_CHUNK_ROWS = 100_000
REPRODUCE = "slotforge bench spans --out bench/results/spans.json && python -m bench.render"

TIERS = ("interactive", "standard", "batch")
TIER_WEIGHTS = (0.3, 0.5, 0.2)
# Median queue wait per tier in ms. Batch jobs wait behind the other tiers.
QUEUE_WAIT_MS = {"interactive": 40.0, "standard": 300.0, "batch": 2_000.0}
WORKERS = tuple(f"gpu-{number:02d}" for number in range(16))
GENERATION_ERRORS = ("OutOfMemoryError", "TimeoutError", "CudaError")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ingest-spans", type=int, default=DEFAULT_INGEST_SPANS,
                        help=f"spans produced for the ingest runs "
                             f"(default: {DEFAULT_INGEST_SPANS})")
    parser.add_argument("--ingest-runs", type=int, default=DEFAULT_INGEST_RUNS,
                        help=f"timed span sink runs after one warm-up run; the median is "
                             f"reported (default: {DEFAULT_INGEST_RUNS})")
    parser.add_argument("--query-spans", type=int, default=DEFAULT_QUERY_SPANS,
                        help=f"spans inserted for the query runs (default: {DEFAULT_QUERY_SPANS})")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS,
                        help=f"runs of each query; the median is reported (default: "
                             f"{DEFAULT_REPEATS})")
    parser.add_argument("--seed", type=int, default=7, help="seed of the synthetic jobs")


# ---- synthetic traces ---------------------------------------------------------------------


class TraceFactory:
    """Build otel_traces rows of synthetic jobs that follow the pipeline's stages and timing.

    A job has a submit, admission, job, completion, delivery and thumbnail span, and per
    slot one or more attempts (dispatch, queue_wait, generation, postprocess on success).
    Generation time is lognormal with p99/p50 = 10 (sigma 0.99) around 800 ms.
    """

    def __init__(self, seed: int, start_ns: int, jobs_per_s: float = 10.0) -> None:
        self.random = random.Random(seed)
        self.numbers = np.random.default_rng(seed)
        self.clock_ns = start_ns
        self.jobs_per_s = jobs_per_s
        self.jobs = 0

    def _id(self, bits: int) -> str:
        return format(self.random.getrandbits(bits), f"0{bits // 4}x")

    def _lognormal_ms(self, median_ms: float, sigma: float) -> float:
        return float(median_ms * np.exp(sigma * self.numbers.standard_normal()))

    def _row(
        self, trace_id: str, parent_id: str, service: str, name: str, stage: str,
        start_ns: int, duration_ns: int, attributes: dict[str, str],
        error: str | None = None, kind: str = "Internal",
    ) -> dict[str, Any]:
        return {
            "Timestamp": start_ns,
            "TraceId": trace_id,
            "SpanId": self._id(64),
            "ParentSpanId": parent_id,
            "TraceState": "",
            "SpanName": name,
            "SpanKind": kind,
            "ServiceName": service,
            "ResourceAttributes": {"service.name": service},
            "ScopeName": "slotforge",
            "ScopeVersion": "1",
            "SpanAttributes": {"slotforge.stage": stage, **attributes},
            "Duration": max(0, duration_ns),
            "StatusCode": "Error" if error else "Unset",
            "StatusMessage": error or "",
            "Events": [],
            "Links": [],
        }

    def job(self) -> list[dict[str, Any]]:
        """Return the rows of one job. Jobs arrive as a Poisson process of ``jobs_per_s``."""
        self.clock_ns += int(self.random.expovariate(self.jobs_per_s) * 1e9)
        self.jobs += 1
        start = self.clock_ns
        trace_id = self._id(128)
        job_id = self._id(128)
        tier = self.random.choices(TIERS, TIER_WEIGHTS)[0]
        job_attrs = {"slotforge.job.id": job_id, "slotforge.tier": tier}
        ms = 1_000_000

        rows = []
        submit = self._row(trace_id, "", "client", "send jobs.requested", "submit", start,
                           int(self._lognormal_ms(3, 0.3) * ms), {"slotforge.job.id": job_id},
                           kind="Producer")
        root = submit["SpanId"]
        admitted = start + int(self._lognormal_ms(5, 0.4) * ms)
        rows += [submit, self._row(trace_id, root, "coordinator", "admission", "admission",
                                   admitted, int(self._lognormal_ms(2, 0.5) * ms), job_attrs,
                                   kind="Consumer")]

        slot_ends = []
        gpu_total = 0.0
        for _ in range(self.random.choice((1, 1, 2, 4))):
            end, slot_rows, gpu_s = self._slot(trace_id, root, tier, job_attrs,
                                               admitted + 3 * ms)
            slot_ends.append(end)
            rows += slot_rows
            gpu_total += gpu_s

        completed = max(slot_ends) + int(self._lognormal_ms(4, 0.3) * ms)
        status = "completed" if self.random.random() < 0.95 else "partial"
        rows.append(self._row(trace_id, root, "coordinator", "job", "job", start,
                              completed - start,
                              {**job_attrs, "slotforge.job.status": status,
                               "slotforge.gpu_s": f"{gpu_total:.3f}"}))
        rows.append(self._row(trace_id, root, "coordinator", "send jobs.completed", "completion",
                              completed, int(self._lognormal_ms(3, 0.3) * ms), job_attrs,
                              kind="Producer"))
        delivered = completed + int(self._lognormal_ms(8, 0.5) * ms)
        rows.append(self._row(trace_id, root, "delivery", "process jobs.completed", "delivery",
                              delivered, int(self._lognormal_ms(6, 0.5) * ms),
                              {"slotforge.job.id": job_id}, kind="Consumer"))
        rows.append(self._row(trace_id, root, "thumbnails", "process jobs.completed",
                              "thumbnail", delivered, int(self._lognormal_ms(30, 0.8) * ms),
                              {"slotforge.job.id": job_id}, kind="Consumer"))
        return rows

    def _slot(
        self, trace_id: str, root: str, tier: str, job_attrs: dict[str, str], dispatched: int
    ) -> tuple[int, list[dict[str, Any]], float]:
        """Run one slot's attempts until one is accepted, and return its end, rows and GPU s."""
        ms = 1_000_000
        rows: list[dict[str, Any]] = []
        gpu_total = 0.0
        now = dispatched
        for attempt_no in range(1, 5):
            attempt_id = self._id(128)
            attempt = {**job_attrs, "slotforge.attempt.id": attempt_id}
            worker = self.random.choice(WORKERS)
            rows.append(self._row(trace_id, root, "coordinator", "send attempts", "dispatch",
                                  now, int(self._lognormal_ms(1, 0.3) * ms), attempt,
                                  kind="Producer"))
            wait = int(self._lognormal_ms(QUEUE_WAIT_MS[tier], 1.0) * ms)
            rows.append(self._row(trace_id, root, "gpu-worker", "queue_wait", "queue_wait", now,
                                  wait, {**attempt,
                                         "slotforge.pool.concurrency": str(
                                             self.random.randint(1, 4))}))
            taken_ns = now + wait
            generation_ms = min(self._lognormal_ms(800, 0.99), 60_000.0)
            gpu_s = generation_ms / 1_000
            gpu_total += gpu_s
            generation = {**attempt, "slotforge.worker.id": worker,
                          "slotforge.gpu_s": f"{gpu_s:.3f}"}
            roll = self.random.random()
            if roll < 0.06:
                error_type = self.random.choice(GENERATION_ERRORS)
                generation["error.type"] = error_type
                generation["slotforge.attempt.outcome"] = (
                    "timed_out" if error_type == "TimeoutError" else "failed")
                rows.append(self._row(trace_id, root, "gpu-worker", "generation", "generation",
                                      taken_ns, int(generation_ms * ms), generation,
                                      error=f"{error_type} on {worker}", kind="Consumer"))
                now = taken_ns + int(generation_ms * ms) + 2 * ms
                continue
            rows.append(self._row(trace_id, root, "gpu-worker", "generation", "generation",
                                  taken_ns, int(generation_ms * ms), generation, kind="Consumer"))
            scored = taken_ns + int(generation_ms * ms) + int(self._lognormal_ms(5, 0.5) * ms)
            accepted = self.random.random() < 0.85
            outcome = "accepted" if accepted else "rejected"
            if attempt_no == 4 and not accepted:
                # The last allowed attempt: the coordinator delivers its result anyway.
                outcome = "fallback"
            postprocess_ms = self._lognormal_ms(40, 0.4)
            rows.append(self._row(trace_id, root, "postprocess", "postprocess", "postprocess",
                                  scored, int(postprocess_ms * ms),
                                  {**attempt, "slotforge.worker.id": worker,
                                   "slotforge.attempt.outcome": outcome}, kind="Consumer"))
            now = scored + int(postprocess_ms * ms) + 2 * ms
            if accepted or outcome == "fallback":
                break
        return now, rows, gpu_total

    def rows(self, count: int) -> list[dict[str, Any]]:
        """Return whole jobs until at least ``count`` rows exist, cut to exactly ``count``."""
        rows: list[dict[str, Any]] = []
        while len(rows) < count:
            rows += self.job()
        return rows[:count]


def column_values(row: dict[str, Any]) -> list[Any]:
    """Return a row in SPAN_COLUMNS order. The synthetic rows have no events or links."""
    return [
        row["Timestamp"], row["TraceId"], row["SpanId"], row["ParentSpanId"], row["TraceState"],
        row["SpanName"], row["SpanKind"], row["ServiceName"], row["ResourceAttributes"],
        row["ScopeName"], row["ScopeVersion"], row["SpanAttributes"], row["Duration"],
        row["StatusCode"], row["StatusMessage"], [], [], [], [], [], [], [],
    ]


# ---- ingest -------------------------------------------------------------------------------


async def _produce(settings: Settings, rows: list[dict[str, Any]]) -> float:
    """Produce every row to the spans topic and return the seconds it took."""
    started = time.perf_counter()
    producer = make_producer(settings.kafka, linger_ms=20, max_batch_size=512 * 1024)
    await producer.start()
    try:
        pending = []
        for row in rows:
            pending.append(await producer.send(
                settings.topics.spans, json.dumps(row).encode(), key=row["TraceId"].encode()))
            if len(pending) >= 5_000:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return time.perf_counter() - started


async def _committed(admin: AIOKafkaAdminClient, group_id: str) -> int:
    """Return the sum of the group's committed offsets, 0 before its first commit."""
    try:
        offsets = await admin.list_consumer_group_offsets(group_id)
    except KafkaError as err:
        # A fresh broker elects the group coordinator only after the first request.
        if not err.retriable:
            raise
        return 0
    return sum(item.offset for item in offsets.values() if item.offset >= 0)


def _run_settings(settings: Settings, name: str) -> Settings:
    """Return settings whose sink uses its own consumer group and table, named ``name``."""
    clickhouse = settings.clickhouse.model_copy(
        update={"table": f"spans_{name}", "sink_group_id": f"bench-span-sink-{name}"})
    return settings.model_copy(update={"clickhouse": clickhouse})


async def _sink_run(settings: Settings, total: int) -> dict[str, Any]:
    """Run the span sink on a fresh group until it committed ``total`` records; time it."""
    admin = AIOKafkaAdminClient(**settings.kafka.client_options())
    await admin.start()
    stop = asyncio.Event()
    started = time.perf_counter()
    sink = asyncio.create_task(span_sink.run(settings, stop))
    first_commit_at: float | None = None
    committed_then = 0
    try:
        while True:
            if sink.done():
                sink.result()
                raise RuntimeError("the span sink stopped before storing every span")
            committed = await _committed(admin, settings.clickhouse.sink_group_id)
            now = time.perf_counter()
            if committed and first_commit_at is None:
                first_commit_at, committed_then = now, committed
            if committed >= total:
                done_at = now
                break
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.wait_for(sink, 60)
        await admin.close()

    assert first_commit_at is not None
    stored = _stored_spans(settings)
    if stored < total:
        raise RuntimeError(
            f"the span sink committed {total} records but stored only {stored} spans, so the "
            f"rest went to the dead-letter topic {settings.topics.deadletter}"
        )
    # A finished run's table is dropped, so its background merges do not slow the next run.
    _drop_table(settings)
    steady_s = done_at - first_commit_at
    return {
        "stored_spans": stored,
        "sink_total_s": round(done_at - started, 3),
        "first_commit_s": round(first_commit_at - started, 3),
        "ingest_spans_per_s": round(total / (done_at - started)),
        # None when the first commit already covered every span.
        "steady_spans_per_s": round((total - committed_then) / steady_s) if steady_s else None,
    }


async def _ingest(settings: Settings, rows: list[dict[str, Any]], runs: int) -> dict[str, Any]:
    """Produce the rows once, warm up with one sink run, then time ``runs`` more sink runs.

    The warm-up run takes the one-time costs of a fresh process out of the measured runs:
    imports done on first use (clickhouse-connect loads pandas on its first insert), chDB's
    start and the broker's first fetches. Each run reads the whole topic with a new group.
    """
    await create_topics(settings.kafka, [settings.topics.spans, settings.topics.deadletter],
                        partitions=INGEST_PARTITIONS)
    produce_s = await _produce(settings, rows)
    total = await _end_offset_sum(settings)

    warmup = await _sink_run(_run_settings(settings, "warmup"), total)
    measured = [await _sink_run(_run_settings(settings, f"run{number}"), total)
                for number in range(1, runs + 1)]
    rates = [run["ingest_spans_per_s"] for run in measured]
    return {
        "spans": total,
        "produce_s": round(produce_s, 3),
        "ingest_spans_per_s": round(statistics.median(rates)),
        "warmup": warmup,
        "runs": measured,
    }


def _drop_table(settings: Settings) -> None:
    client = open_client(settings.clickhouse)
    try:
        client.command(f"DROP TABLE IF EXISTS {quote_table(settings.clickhouse.table)}")
    finally:
        client.close()


def _stored_spans(settings: Settings) -> int:
    client = open_client(settings.clickhouse)
    try:
        return report.span_count(client, settings.clickhouse.table)
    finally:
        client.close()


async def _end_offset_sum(settings: Settings) -> int:
    consumer = make_consumer(settings.kafka, group_id=None)
    await consumer.start()
    try:
        partitions = await topic_partitions(settings.kafka, settings.topics.spans)
        return sum((await consumer.end_offsets(partitions)).values())
    finally:
        await consumer.stop()


# ---- queries ------------------------------------------------------------------------------


def _queries(trace_id: str) -> dict[str, Callable[[Any], Any]]:
    table = QUERY_TABLE
    return {
        "stage_latency": lambda client: report.stage_latency(client, table),
        "stage_latency_windows": lambda client: report.stage_latency_windows(
            client, table, window_s=60),
        "slow_jobs": lambda client: report.slow_jobs(client, table, top=10),
        "queue_wait_by_concurrency": lambda client: report.queue_wait_by_concurrency(
            client, table),
        "gpu_seconds_by_outcome": lambda client: report.gpu_seconds_by_outcome(client, table),
        "failures": lambda client: report.failures(client, table, top=10),
        "trace_spans": lambda client: report.trace_spans(client, table, trace_id),
    }


def _time_queries(settings: Settings, rows: list[dict[str, Any]], repeats: int) -> dict[str, Any]:
    client = open_client(settings.clickhouse)
    try:
        ensure_schema(client, QUERY_TABLE)
        started = time.perf_counter()
        for offset in range(0, len(rows), INSERT_CHUNK_ROWS):
            chunk = rows[offset:offset + INSERT_CHUNK_ROWS]
            insert_spans(client, QUERY_TABLE, [column_values(row) for row in chunk])
        insert_s = time.perf_counter() - started
        stored = report.span_count(client, QUERY_TABLE)

        slowest = report.slow_jobs(client, QUERY_TABLE, top=1)
        trace_id = slowest[0]["trace_id"]
        timings: dict[str, list[float]] = {}
        for name, query in _queries(trace_id).items():
            timings[name] = []
            for _ in range(repeats):
                began = time.perf_counter()
                query(client)
                timings[name].append(time.perf_counter() - began)
    finally:
        client.close()
    return {
        "spans": stored,
        "insert_s": round(insert_s, 3),
        "query_s": {name: round(statistics.median(values), 4) for name, values in timings.items()},
        "query_max_s": {name: round(max(values), 4) for name, values in timings.items()},
    }


# ---- suite entry points -------------------------------------------------------------------


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def run(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run both measurements and return the results JSON for ``slotforge bench spans``."""
    for name in ("ingest_spans", "ingest_runs", "query_spans", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    load_before = os.getloadavg()[0]
    # Start from a fixed point in the past, so the rows fall into stable daily partitions.
    factory = TraceFactory(args.seed, start_ns=1_735_689_600_000_000_000)
    started = time.perf_counter()
    query_rows = factory.rows(args.query_spans)
    ingest_rows = factory.rows(args.ingest_spans)
    generate_s = time.perf_counter() - started
    # The sink runs in this process, but a span sink process keeps none of these rows. The
    # cyclic GC skips frozen objects, and its full collections during the ingest runs would
    # otherwise traverse every generated row each time and slow the measured sink.
    gc.freeze()

    with tempfile.TemporaryDirectory(prefix="slotforge-bench-spans-") as directory:
        broker = KafkaBroker(Path(directory) / "kafka")
        settings = Settings(
            kafka=KafkaSettings(bootstrap_servers=broker.bootstrap_servers,
                                topic_prefix="bench.", partitions=INGEST_PARTITIONS),
            clickhouse=ClickHouseSettings(dsn=f"chdb://{Path(directory) / 'clickhouse'}"),
        )
        broker.start()
        try:
            ingest = run_until_sigterm(_ingest(settings, ingest_rows, args.ingest_runs))
        finally:
            broker.stop()
        queries = _time_queries(settings, query_rows, args.repeats)

    return {
        "results": {
            "ingest_spans_per_s": ingest["ingest_spans_per_s"],
            "query_s": queries["query_s"],
        },
        "details": {"ingest": ingest, "queries": {k: v for k, v in queries.items()
                                                  if k != "query_s"}},
        "targets": {"ingest_spans_per_s": INGEST_TARGET_SPANS_PER_S,
                    "query_s": QUERY_TARGET_S},
        "setup": {
            "ingest_spans": args.ingest_spans,
            "ingest_runs": args.ingest_runs,
            "query_spans": args.query_spans,
            "repeats": args.repeats,
            "seed": args.seed,
            "synthetic_jobs": factory.jobs,
            "generate_s": round(generate_s, 3),
            "spans_partitions": INGEST_PARTITIONS,
            "sink_batch_rows": settings.clickhouse.batch_rows,
            "sink_batch_wait_s": settings.clickhouse.batch_wait_s,
            "versions": {package: _version(package) for package in
                         ("aiokafka", "chdb", "clickhouse-connect", "pydantic")},
            "machine": {
                # Other processes on the machine share its CPUs with the broker and the sink.
                "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                "platform": platform.platform(),
                "processor": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
            },
        },
    }


def render_markdown(results: dict[str, Any]) -> str:
    """Render the spans section of docs/benchmarks.md."""
    measured = results["results"]
    details = results["details"]
    setup = results["setup"]
    machine = setup["machine"]
    ingest = details["ingest"]
    ingest_rate = measured["ingest_spans_per_s"]
    ingest_target = results["targets"]["ingest_spans_per_s"]
    query_target = results["targets"]["query_s"]

    def verdict(met: bool) -> str:
        return "yes" if met else "**no**"

    run_rates = ", ".join(f"{run['ingest_spans_per_s']:,}" for run in ingest["runs"])
    first_commits = ", ".join(f"{run['first_commit_s']:.1f}" for run in ingest["runs"])
    warmup = ingest["warmup"]
    lines = [
        "## Span sink and attribution queries",
        "",
        f"Ingest: {ingest['spans']:,} span rows (JSON, as `streams.tracing.span_to_row` writes "
        f"them) were produced to a {setup['spans_partitions']}-partition spans topic on a "
        "local single-node Kafka broker. The span sink "
        f"(`consumers.span_sink.run`, batches of {setup['sink_batch_rows']:,} rows or "
        f"{setup['sink_batch_wait_s']:g} s) then read the whole topic in the benchmark process "
        "with embedded chDB, each run with a new consumer group and table, until the group had "
        "committed every record. One warm-up run "
        f"({warmup['ingest_spans_per_s']:,} spans/s, {warmup['first_commit_s']:.1f} s to its "
        "first commit) takes the one-time costs of a fresh process, such as the pandas import "
        f"of clickhouse-connect's first insert, out of the {len(ingest['runs'])} timed runs. A "
        "run's rate is spans over the time from starting the sink to the last commit, so it "
        "includes joining the group and opening chDB "
        f"({first_commits} s to the first commit). Runs: {run_rates} spans/s; the table shows "
        "the median.",
        "",
        f"Queries: {details['queries']['spans']:,} synthetic spans of {setup['synthetic_jobs']:,} "
        "jobs (submit, admission, attempts with queue wait, lognormal generation time with "
        "p99/p50 = 10, retries after failures, postprocess, completion, delivery) were "
        f"inserted into chDB in {details['queries']['insert_s']:.1f} s, then each query of "
        f"`streams.report` ran {setup['repeats']} times; the table shows the median.",
        "",
        "| measurement | target | measured | met |",
        "| --- | --- | --- | --- |",
        f"| span sink ingest, spans/s | >= {ingest_target:,} | {ingest_rate:,} | "
        f"{verdict(ingest_rate >= ingest_target)} |",
    ]
    for name, seconds in measured["query_s"].items():
        slowest = details["queries"]["query_max_s"][name]
        lines.append(
            f"| `{name}` over {details['queries']['spans']:,} spans, s (slowest run) | "
            f"< {query_target:g} | {seconds:.3f} ({slowest:.3f}) | "
            f"{verdict(seconds < query_target)} |"
        )
    versions = ", ".join(f"{name} {version}" for name, version in setup["versions"].items())
    load = machine.get("load_average_1m")
    load_text = (f" (1-minute load average {load[0]:g} before and {load[1]:g} after this run)"
                 if load else "")
    lines += [
        "",
        f"Machine: {machine['cpus']} CPUs ({machine['processor']}), {machine['platform']}, "
        f"Python {machine['python']}; {versions}. The broker, the sink and chDB share these "
        f"CPUs with whatever else runs, so the absolute numbers move with machine load{load_text}.",
        "",
        f"Reproduce: `{REPRODUCE}` (seed {setup['seed']}; `--ingest-spans`, `--ingest-runs`, "
        "`--query-spans` and `--repeats` change the sizes).",
        "",
    ]
    return "\n".join(lines)
