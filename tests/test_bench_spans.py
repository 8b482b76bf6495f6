"""The spans benchmark: its synthetic traces, its Markdown, and a small run end to end."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import pytest

from bench import spans
from bench.spans import TraceFactory, column_values, render_markdown
from infra.clickhouse import SPAN_COLUMN_NAMES, SpanRow

BASE_NS = 1_735_689_600_000_000_000


def test_factory_rows_exact_count() -> None:
    rows = TraceFactory(seed=1, start_ns=BASE_NS).rows(1_234)

    assert len(rows) == 1_234


def test_factory_rows_are_valid_span_rows() -> None:
    rows = TraceFactory(seed=2, start_ns=BASE_NS).rows(500)

    for row in rows:
        decoded = SpanRow.model_validate_json(json.dumps(row))
        assert column_values(row) == decoded.column_values()
    assert len(column_values(rows[0])) == len(SPAN_COLUMN_NAMES)


def test_factory_jobs_have_pipeline_shape() -> None:
    factory = TraceFactory(seed=3, start_ns=BASE_NS)
    rows = [row for _ in range(200) for row in factory.job()]

    stages = Counter(row["SpanAttributes"]["slotforge.stage"] for row in rows)
    assert stages["job"] == 200
    assert stages["submit"] == 200
    assert stages["dispatch"] == stages["queue_wait"] == stages["generation"]
    assert stages["generation"] >= 200
    outcomes = Counter(row["SpanAttributes"].get("slotforge.attempt.outcome") for row in rows)
    assert outcomes["accepted"] > 0
    assert outcomes["failed"] + outcomes["timed_out"] > 0
    assert set(outcomes) <= {None, "accepted", "rejected", "fallback", "failed", "timed_out"}
    # Every span of a job shares the trace of its submit span, which is the root.
    by_trace = Counter(row["TraceId"] for row in rows)
    assert len(by_trace) == 200
    roots = [row for row in rows if row["ParentSpanId"] == ""]
    assert {row["SpanAttributes"]["slotforge.stage"] for row in roots} == {"submit"}


def test_factory_job_span_covers_attempts() -> None:
    rows = TraceFactory(seed=4, start_ns=BASE_NS).job()

    job = next(row for row in rows if row["SpanAttributes"]["slotforge.stage"] == "job")
    job_end = job["Timestamp"] + job["Duration"]
    for row in rows:
        if row["SpanAttributes"]["slotforge.stage"] in ("generation", "postprocess"):
            assert job["Timestamp"] <= row["Timestamp"]
            assert row["Timestamp"] + row["Duration"] <= job_end


def sample_results(ingest: int, slowest_query_s: float) -> dict[str, object]:
    return {
        "results": {"ingest_spans_per_s": ingest,
                    "query_s": {"stage_latency": 0.1, "slow_jobs": slowest_query_s}},
        "details": {
            "ingest": {
                "spans": 1_000,
                "warmup": {"ingest_spans_per_s": 9_000, "first_commit_s": 2.0},
                "runs": [{"ingest_spans_per_s": ingest, "first_commit_s": 0.5}],
            },
            "queries": {"spans": 5_000, "insert_s": 0.5,
                        "query_max_s": {"stage_latency": 0.2, "slow_jobs": slowest_query_s}},
        },
        "targets": {"ingest_spans_per_s": 20_000, "query_s": 1.0},
        "setup": {
            "ingest_spans": 1_000, "ingest_runs": 1, "query_spans": 5_000, "repeats": 3,
            "seed": 7,
            "synthetic_jobs": 300, "spans_partitions": 3, "sink_batch_rows": 5_000,
            "sink_batch_wait_s": 1.0, "versions": {"chdb": "4.4.0"},
            "machine": {"cpus": 2, "processor": "x86_64", "platform": "Linux", "python": "3.11",
                        "load_average_1m": [1.5, 2.25]},
        },
    }


def test_markdown_states_targets_and_verdicts() -> None:
    text = render_markdown(sample_results(ingest=25_000, slowest_query_s=1.5))

    assert text.startswith("## Span sink and attribution queries")
    assert "| span sink ingest, spans/s | >= 20,000 | 25,000 | yes |" in text
    assert "One warm-up run (9,000 spans/s, 2.0 s to its first commit)" in text
    assert "(1-minute load average 1.5 before and 2.25 after this run)" in text
    stage_row = "| `stage_latency` over 5,000 spans, s (slowest run) | < 1 | 0.100 (0.200) | yes |"
    slow_row = "| `slow_jobs` over 5,000 spans, s (slowest run) | < 1 | 1.500 (1.500) | **no** |"
    assert stage_row in text
    assert slow_row in text
    assert "slotforge bench spans --out bench/results/spans.json" in text


def test_markdown_marks_missed_ingest() -> None:
    text = render_markdown(sample_results(ingest=12_000, slowest_query_s=0.5))

    assert "| >= 20,000 | 12,000 | **no** |" in text


@pytest.mark.integration
def test_bench_runs_small(tmp_path: Path) -> None:
    args = argparse.Namespace(ingest_spans=2_000, ingest_runs=2, query_spans=5_000, repeats=2,
                              seed=5)

    results = spans.run(tmp_path / "spans.json", args)

    ingest = results["details"]["ingest"]
    assert ingest["spans"] == 2_000
    assert ingest["warmup"]["stored_spans"] == 2_000
    assert [run["stored_spans"] for run in ingest["runs"]] == [2_000, 2_000]
    rates = sorted(run["ingest_spans_per_s"] for run in ingest["runs"])
    assert results["results"]["ingest_spans_per_s"] == round(sum(rates) / 2)
    assert set(results["results"]["query_s"]) == {
        "stage_latency", "stage_latency_windows", "slow_jobs", "queue_wait_by_concurrency",
        "gpu_seconds_by_outcome", "failures", "trace_spans",
    }
    assert results["details"]["queries"]["spans"] == 5_000
    assert "## Span sink and attribution queries" in render_markdown(results)
