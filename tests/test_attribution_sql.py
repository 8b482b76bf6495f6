"""Attribution queries in infra/sql, run on real OpenTelemetry spans stored in embedded chDB."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from clickhouse_connect.driver.client import Client
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Span, Status, StatusCode

from infra.clickhouse import SpanRow, ensure_schema, insert_spans, open_client
from streams.config import ClickHouseSettings
from streams.report import (
    TimeRange,
    failures,
    gpu_seconds_by_outcome,
    queue_wait_by_concurrency,
    slow_jobs,
    stage_latency,
    stage_latency_windows,
    trace_spans,
)
from streams.tracing import STAGE_ATTRIBUTE, span_to_row

TABLE = "otel_traces"
# 2025-01-01T00:00:00Z in nanoseconds, so every offset below is exact.
BASE_NS = 1_735_689_600_000_000_000
BASE_TIME = datetime(2025, 1, 1, tzinfo=UTC)
MS = 1_000_000


class TraceRecorder:
    """Record spans through real TracerProviders, one per service, at chosen times in ms."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self._providers: dict[str, TracerProvider] = {}

    def _tracer(self, service: str) -> trace.Tracer:
        provider = self._providers.get(service)
        if provider is None:
            provider = TracerProvider(resource=Resource.create({"service.name": service}))
            provider.add_span_processor(SimpleSpanProcessor(self.exporter))
            self._providers[service] = provider
        return provider.get_tracer("slotforge", "1")

    def span(
        self,
        service: str,
        stage: str,
        start_ms: float,
        end_ms: float,
        *,
        parent: Span | None = None,
        name: str | None = None,
        attributes: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> Span:
        """Record one finished span; ``error`` sets an Error status with that message."""
        context = trace.set_span_in_context(parent) if parent is not None else None
        span = self._tracer(service).start_span(
            name or stage,
            context=context,
            start_time=BASE_NS + round(start_ms * MS),
            attributes={STAGE_ATTRIBUTE: stage, **(attributes or {})},
        )
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end(end_time=BASE_NS + round(end_ms * MS))
        return span

    def rows(self) -> list[dict[str, Any]]:
        """Return every recorded span as an otel_traces row, through span_to_row."""
        for provider in self._providers.values():
            provider.shutdown()
        return [span_to_row(span) for span in self.exporter.get_finished_spans()]


def record_attempt(
    recorder: TraceRecorder,
    root: Span,
    *,
    attempt_id: str,
    tier: str,
    dispatch_ms: float,
    taken_ms: float,
    done_ms: float,
    worker: str,
    gpu_s: float,
    concurrency: int,
    outcome: str | None = None,
    error_type: str | None = None,
    scored_ms: tuple[float, float] | None = None,
) -> None:
    """Record dispatch, queue_wait, generation and optionally postprocess of one attempt."""
    attempt = {"slotforge.attempt.id": attempt_id}
    recorder.span("coordinator", "dispatch", dispatch_ms, dispatch_ms + 2, parent=root,
                  attributes=attempt)
    recorder.span("gpu-worker", "queue_wait", dispatch_ms + 1, taken_ms, parent=root,
                  attributes={**attempt, "slotforge.tier": tier,
                              "slotforge.pool.concurrency": concurrency})
    generation: dict[str, Any] = {**attempt, "slotforge.tier": tier,
                                  "slotforge.worker.id": worker, "slotforge.gpu_s": gpu_s}
    if error_type is not None:
        generation["error.type"] = error_type
    if outcome is not None and scored_ms is None:
        generation["slotforge.attempt.outcome"] = outcome
    recorder.span("gpu-worker", "generation", taken_ms, done_ms, parent=root,
                  attributes=generation, error=f"{error_type} on {worker}" if error_type else None)
    if scored_ms is not None:
        scored = {**attempt, "slotforge.worker.id": worker}
        if outcome is not None:
            scored["slotforge.attempt.outcome"] = outcome
        recorder.span("postprocess", "postprocess", scored_ms[0], scored_ms[1], parent=root,
                      attributes=scored)


def record_job(
    recorder: TraceRecorder, job_id: str, tier: str, status: str, start_ms: float,
    end_ms: float,
) -> Span:
    """Record the client's submit span (the trace root) and the job span; return the root."""
    root = recorder.span("client", "submit", start_ms, start_ms + 5,
                         attributes={"slotforge.job.id": job_id})
    recorder.span("coordinator", "job", start_ms, end_ms, parent=root,
                  attributes={"slotforge.job.id": job_id, "slotforge.tier": tier,
                              "slotforge.job.status": status})
    return root


def scenario_rows() -> list[dict[str, Any]]:
    """Record three jobs with known timings as otel_traces rows.

    Job A (interactive, 1 s, first minute): attempt a1 fails with OutOfMemoryError after
    300 ms on w1, retry a2 runs 450 ms on w2 and is accepted. Job B (standard, 300 ms, second
    minute): b1 is accepted, b2 is a racing attempt that is cancelled. Job C (batch, 500 ms,
    second minute): c1 is rejected and later used as fallback, c2 times out on w2 with no
    outcome recorded, c3 fails with OutOfMemoryError on w1.
    """
    recorder = TraceRecorder()

    a = record_job(recorder, "job-a", "interactive", "completed", 0, 1_000)
    recorder.span("coordinator", "admission", 10, 20, parent=a,
                  attributes={"slotforge.job.id": "job-a", "slotforge.tier": "interactive"})
    record_attempt(recorder, a, attempt_id="a1", tier="interactive", dispatch_ms=15,
                   taken_ms=100, done_ms=400, worker="w1", gpu_s=0.3, concurrency=2,
                   outcome="failed", error_type="OutOfMemoryError")
    record_attempt(recorder, a, attempt_id="a2", tier="interactive", dispatch_ms=410,
                   taken_ms=450, done_ms=900, worker="w2", gpu_s=0.45, concurrency=1,
                   outcome="accepted", scored_ms=(910, 950))
    recorder.span("coordinator", "completion", 980, 990, parent=a,
                  attributes={"slotforge.job.id": "job-a"})
    recorder.span("delivery", "delivery", 1_005, 1_010, parent=a,
                  attributes={"slotforge.job.id": "job-a"})

    b = record_job(recorder, "job-b", "standard", "completed", 61_000, 61_300)
    recorder.span("coordinator", "admission", 61_005, 61_010, parent=b,
                  attributes={"slotforge.job.id": "job-b", "slotforge.tier": "standard"})
    record_attempt(recorder, b, attempt_id="b1", tier="standard", dispatch_ms=61_007,
                   taken_ms=61_020, done_ms=61_200, worker="w1", gpu_s=0.18, concurrency=1,
                   outcome="accepted", scored_ms=(61_210, 61_250))
    record_attempt(recorder, b, attempt_id="b2", tier="standard", dispatch_ms=61_007,
                   taken_ms=61_030, done_ms=61_100, worker="w2", gpu_s=0.07, concurrency=2,
                   outcome="cancelled")
    recorder.span("coordinator", "completion", 61_280, 61_290, parent=b,
                  attributes={"slotforge.job.id": "job-b"})

    c = record_job(recorder, "job-c", "batch", "partial", 62_000, 62_500)
    recorder.span("coordinator", "admission", 62_002, 62_006, parent=c,
                  attributes={"slotforge.job.id": "job-c", "slotforge.tier": "batch"})
    record_attempt(recorder, c, attempt_id="c1", tier="batch", dispatch_ms=62_004,
                   taken_ms=62_010, done_ms=62_210, worker="w1", gpu_s=0.2, concurrency=1,
                   outcome="rejected", scored_ms=(62_220, 62_260))
    record_attempt(recorder, c, attempt_id="c2", tier="batch", dispatch_ms=62_004,
                   taken_ms=62_010, done_ms=62_110, worker="w2", gpu_s=0.1, concurrency=2,
                   error_type="TimeoutError")
    record_attempt(recorder, c, attempt_id="c3", tier="batch", dispatch_ms=62_270,
                   taken_ms=62_280, done_ms=62_330, worker="w1", gpu_s=0.05, concurrency=1,
                   outcome="failed", error_type="OutOfMemoryError")
    # The coordinator gives up on slot 0 and delivers c1 as the fallback result.
    recorder.span("coordinator", "completion", 62_480, 62_490, parent=c,
                  attributes={"slotforge.job.id": "job-c", "slotforge.attempt.id": "c1",
                              "slotforge.attempt.outcome": "fallback"})
    # A coordinator failure without an error.type attribute.
    recorder.span("coordinator", "admission", 62_495, 62_497, parent=c,
                  attributes={"slotforge.job.id": "job-c"}, error="state store unavailable")
    return recorder.rows()


def insert_rows(client: Client, rows: list[dict[str, Any]], table: str = TABLE) -> None:
    values = [SpanRow.model_validate_json(json.dumps(row)).column_values() for row in rows]
    insert_spans(client, table, values)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[Client]:
    # chDB hosts one data directory per process, so every test closes its client.
    opened = open_client(ClickHouseSettings(dsn=f"chdb://{tmp_path / 'clickhouse'}"))
    try:
        ensure_schema(opened, TABLE)
        yield opened
    finally:
        opened.close()


@pytest.fixture
def scenario(client: Client) -> Client:
    insert_rows(client, scenario_rows())
    return client


def by_key(rows: list[dict[str, Any]], *keys: str) -> dict[tuple[Any, ...], dict[str, Any]]:
    return {tuple(row[key] for key in keys): row for row in rows}


def test_windows_split_by_minute(scenario: Client) -> None:
    rows = stage_latency_windows(scenario, TABLE, window_s=60)

    assert sorted({row["window_start"] for row in rows}) == [
        BASE_TIME, BASE_TIME + timedelta(minutes=1)
    ]
    first = by_key([row for row in rows if row["window_start"] == BASE_TIME], "stage", "tier")
    generation = first[("generation", "interactive")]
    assert generation["count"] == 2
    assert generation["p50_ms"] == pytest.approx(375.0)
    assert generation["p99_ms"] == pytest.approx(float(np.percentile([300, 450], 99)))
    # The submit span has no tier attribute and takes the tier of its trace.
    assert first[("submit", "interactive")]["count"] == 1
    assert first[("job", "interactive")]["p50_ms"] == pytest.approx(1_000.0)


def test_windows_group_tiers(scenario: Client) -> None:
    rows = stage_latency_windows(scenario, TABLE, window_s=60)

    second = by_key(
        [row for row in rows if row["window_start"] == BASE_TIME + timedelta(minutes=1)],
        "stage", "tier",
    )
    assert second[("generation", "standard")]["count"] == 2
    assert second[("generation", "standard")]["p50_ms"] == pytest.approx(125.0)
    assert second[("generation", "batch")]["count"] == 3
    assert second[("generation", "batch")]["p50_ms"] == pytest.approx(100.0)
    assert second[("job", "batch")]["p50_ms"] == pytest.approx(500.0)
    assert ("generation", "interactive") not in second


def test_windows_one_large_window(scenario: Client) -> None:
    rows = stage_latency_windows(scenario, TABLE, window_s=3_600)

    assert {row["window_start"] for row in rows} == {BASE_TIME}
    assert sum(row["count"] for row in rows if row["stage"] == "generation") == 7


def test_windows_time_range(scenario: Client) -> None:
    second_minute = TimeRange(BASE_TIME + timedelta(minutes=1), BASE_TIME + timedelta(minutes=2))

    rows = stage_latency_windows(scenario, TABLE, window_s=60, time_range=second_minute)

    assert {row["tier"] for row in rows} == {"standard", "batch"}
    assert sum(row["count"] for row in rows if row["stage"] == "job") == 2


def test_windows_reject_zero_window(scenario: Client) -> None:
    with pytest.raises(ValueError, match="window_s must be at least 1"):
        stage_latency_windows(scenario, TABLE, window_s=0)


def test_stage_latency_time_range(scenario: Client) -> None:
    first_minute = TimeRange(until=BASE_TIME + timedelta(minutes=1))

    stages = stage_latency(scenario, TABLE, first_minute)

    assert stages["generation"]["count"] == 2
    assert stages["job"]["count"] == 1
    assert stages["delivery"]["count"] == 1


def test_slow_jobs_ordered_by_duration(scenario: Client) -> None:
    jobs = slow_jobs(scenario, TABLE, top=2)

    assert [job["job_id"] for job in jobs] == ["job-a", "job-c"]
    assert [job["duration_ms"] for job in jobs] == [pytest.approx(1_000.0), pytest.approx(500.0)]
    assert jobs[0]["tier"] == "interactive"
    assert jobs[1]["status"] == "partial"
    assert len(jobs[0]["trace_id"]) == 32


def test_slow_job_critical_path(scenario: Client) -> None:
    job = slow_jobs(scenario, TABLE, top=1)[0]

    path = job["critical_path_ms"]
    # Walking back from 1,000 ms: completion, postprocess, a2's generation, queue wait and
    # dispatch, then the failed a1 that delayed the retry, a1's queue wait, admission, submit.
    assert path == {
        "generation": pytest.approx(750.0),
        "queue_wait": pytest.approx(123.0),
        "untraced": pytest.approx(65.0),
        "postprocess": pytest.approx(40.0),
        "completion": pytest.approx(10.0),
        "admission": pytest.approx(6.0),
        "submit": pytest.approx(5.0),
        "dispatch": pytest.approx(1.0),
    }
    assert sum(path.values()) == pytest.approx(job["duration_ms"])
    assert job["dominant_stage"] == "generation"
    assert job["dominant_ms"] == pytest.approx(750.0)
    # The critical path map is sorted from the largest part down.
    assert list(path)[:3] == ["generation", "queue_wait", "untraced"]


def test_slow_job_skips_cancelled_race(scenario: Client) -> None:
    job_b = next(job for job in slow_jobs(scenario, TABLE, top=3) if job["job_id"] == "job-b")

    path = job_b["critical_path_ms"]
    # b2 ran from 30 to 100 ms but b1 ended later, so the path goes through b1 only.
    assert path["generation"] == pytest.approx(180.0)
    assert path["queue_wait"] == pytest.approx(12.0)
    assert sum(path.values()) == pytest.approx(300.0)


def test_slow_jobs_time_range(scenario: Client) -> None:
    jobs = slow_jobs(scenario, TABLE, top=5,
                     time_range=TimeRange(since=BASE_TIME + timedelta(seconds=61.5)))

    assert [job["job_id"] for job in jobs] == ["job-c"]


def test_queue_wait_by_concurrency(scenario: Client) -> None:
    rows = by_key(queue_wait_by_concurrency(scenario, TABLE), "tier", "concurrency")

    assert set(rows) == {
        ("batch", 1), ("batch", 2), ("interactive", 1), ("interactive", 2),
        ("standard", 1), ("standard", 2),
    }
    # Queue wait runs from dispatch + 1 ms to the moment the worker took the attempt.
    assert rows[("interactive", 2)]["p50_ms"] == pytest.approx(84.0)
    assert rows[("interactive", 1)]["p50_ms"] == pytest.approx(39.0)
    assert rows[("standard", 2)]["mean_ms"] == pytest.approx(22.0)
    batch_one = rows[("batch", 1)]
    assert batch_one["count"] == 2
    assert batch_one["mean_ms"] == pytest.approx((5.0 + 9.0) / 2)
    assert batch_one["p50_ms"] == pytest.approx(7.0)


def test_gpu_seconds_by_outcome(scenario: Client) -> None:
    rows = gpu_seconds_by_outcome(scenario, TABLE)

    assert [(row["outcome"], row["tier"]) for row in rows] == [
        ("accepted", "interactive"),
        ("failed", "interactive"),
        ("fallback", "batch"),
        ("accepted", "standard"),
        ("unknown", "batch"),
        ("cancelled", "standard"),
        ("failed", "batch"),
    ]
    gpu = {(row["outcome"], row["tier"]): row["gpu_s"] for row in rows}
    assert gpu[("accepted", "interactive")] == pytest.approx(0.45)
    assert gpu[("fallback", "batch")] == pytest.approx(0.2)
    assert gpu[("unknown", "batch")] == pytest.approx(0.1)
    assert all(row["attempts"] == 1 for row in rows)
    assert sum(row["share"] for row in rows) == pytest.approx(1.0, abs=1e-5)
    assert rows[0]["share"] == pytest.approx(0.45 / 1.35)


def test_gpu_seconds_count_duplicates_once(client: Client) -> None:
    rows = scenario_rows()
    # The span sink delivers at least once, so the same span may be stored twice.
    insert_rows(client, rows)
    insert_rows(client, [row for row in rows if row["SpanAttributes"].get("slotforge.gpu_s")])

    result = gpu_seconds_by_outcome(client, TABLE)

    assert sum(row["attempts"] for row in result) == 7
    assert sum(row["gpu_s"] for row in result) == pytest.approx(1.35)


def test_failures_grouped(scenario: Client) -> None:
    rows = failures(scenario, TABLE, top=10)

    assert [(row["stage"], row["error_type"], row["worker"]) for row in rows] == [
        ("generation", "OutOfMemoryError", "w1"),
        ("admission", "_OTHER", "coordinator"),
        ("generation", "TimeoutError", "w2"),
    ]
    oom = rows[0]
    assert oom["failures"] == 2
    assert oom["traces"] == 2
    assert oom["first_seen"] == BASE_TIME + timedelta(milliseconds=100)
    assert oom["last_seen"] == BASE_TIME + timedelta(milliseconds=62_280)
    assert oom["last_message"] == "OutOfMemoryError on w1"
    assert rows[1]["last_message"] == "state store unavailable"


def test_failures_top_limits_groups(scenario: Client) -> None:
    rows = failures(scenario, TABLE, top=1)

    assert len(rows) == 1
    assert rows[0]["error_type"] == "OutOfMemoryError"


def test_trace_spans_waterfall(scenario: Client) -> None:
    job = slow_jobs(scenario, TABLE, top=1)[0]

    spans = trace_spans(scenario, TABLE, job["trace_id"])

    # The job span and the submit span both start at 0; the longer one comes first.
    assert [span["stage"] for span in spans[:2]] == ["job", "submit"]
    assert spans[1]["offset_ms"] == 0.0
    assert len(spans) == 12
    generations = [span for span in spans if span["stage"] == "generation"]
    assert [(span["attempt_id"], span["worker"]) for span in generations] == [
        ("a1", "w1"), ("a2", "w2")
    ]
    assert generations[1]["offset_ms"] == pytest.approx(450.0)
    assert generations[1]["duration_ms"] == pytest.approx(450.0)
    assert generations[0]["status"] == "Error"


def test_trace_spans_rejects_bad_id(scenario: Client) -> None:
    with pytest.raises(ValueError, match="invalid trace id"):
        trace_spans(scenario, TABLE, "x' OR 1=1 --")


def test_queries_on_empty_table(client: Client) -> None:
    assert stage_latency_windows(client, TABLE) == []
    assert slow_jobs(client, TABLE) == []
    assert queue_wait_by_concurrency(client, TABLE) == []
    assert gpu_seconds_by_outcome(client, TABLE) == []
    assert failures(client, TABLE) == []


def test_time_range_rejects_reversed() -> None:
    with pytest.raises(ValueError, match="is not before"):
        TimeRange(BASE_TIME, BASE_TIME)


def test_time_range_parameters() -> None:
    bounds = TimeRange(BASE_TIME, BASE_TIME + timedelta(microseconds=1)).parameters()

    assert bounds == {"since_ns": BASE_NS, "until_ns": BASE_NS + 1_000}
