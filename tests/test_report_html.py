"""``slotforge report`` sections, options and the self-contained HTML page, on real spans."""

from __future__ import annotations

import argparse
import base64
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest

from infra.clickhouse import ensure_schema, open_client
from streams.config import ClickHouseSettings, Settings
from streams.report import add_report_arguments, report_from_args
from tests.test_attribution_sql import TraceRecorder, insert_rows, scenario_rows

DATA_URI = re.compile(r'src="data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)"')


def store_settings(tmp_path: Path, rows: list[dict[str, Any]]) -> Settings:
    settings = Settings(clickhouse=ClickHouseSettings(dsn=f"chdb://{tmp_path / 'clickhouse'}"))
    client = open_client(settings.clickhouse)
    try:
        ensure_schema(client, settings.clickhouse.table)
        if rows:
            insert_rows(client, rows)
    finally:
        client.close()
    return settings


def hostile_rows() -> list[dict[str, Any]]:
    """One failed span whose message and worker id are HTML, to check escaping."""
    recorder = TraceRecorder()
    recorder.span("gpu-worker", "generation", 70_000, 70_050,
                  attributes={"slotforge.worker.id": "<img src=x>", "error.type": "Bad<Type>"},
                  error="<script>alert(1)</script>")
    return recorder.rows()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return store_settings(tmp_path, scenario_rows() + hostile_rows())


def run(settings: Settings, argv: list[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="slotforge report")
    add_report_arguments(parser)
    out, err = io.StringIO(), io.StringIO()
    status = report_from_args(settings, parser.parse_args(argv), out=out, err=err)
    return status, out.getvalue(), err.getvalue()


def charts(page: str) -> list[str]:
    return [base64.b64decode(match).decode() for match in DATA_URI.findall(page)]


def test_report_default_is_stage_table(settings: Settings) -> None:
    status, out, err = run(settings, [])

    assert status == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["stage", "count", "p50_ms", "p95_ms", "p99_ms"]
    assert "Slowest jobs" not in out
    assert lines[-1].startswith("ClickHouse spans: ")


def test_report_json_all_sections(settings: Settings) -> None:
    status, out, err = run(settings, ["--format", "json", "--query", "all"])

    assert status == 0, err
    report = json.loads(out)
    assert list(report) == ["stages", "clickhouse_spans", "windows", "slow_jobs", "queue_wait",
                            "gpu", "failures"]
    assert report["slow_jobs"][0]["job_id"] == "job-a"
    assert report["slow_jobs"][0]["dominant_stage"] == "generation"
    assert report["windows"][0]["window_start"] == "2025-01-01T00:00:00Z"
    assert report["failures"][0]["last_seen"] == "2025-01-01T00:01:02.280000Z"


def test_report_table_sections_in_order(settings: Settings) -> None:
    status, out, err = run(settings, ["--query", "failures", "--query", "slow-jobs",
                                      "--top", "1"])

    assert status == 0, err
    # The stage table comes first, then the sections in report order, whatever the flags' order.
    assert out.index("stage ") < out.index("Slowest jobs") < out.index("Failures by stage")
    slow = out.split("Slowest jobs and their critical path:\n")[1].splitlines()
    assert slow[0].split()[:3] == ["job_id", "tier", "status"]
    assert slow[1].split()[:5] == ["job-a", "interactive", "completed", "1000.000", "generation"]
    assert "generation 750.0, queue_wait 123.0, untraced 65.0" in slow[1]
    assert slow[2] == ""
    failures = out.split("Failures by stage, error type and worker:\n")[1].splitlines()
    assert failures[1].split()[:4] == ["generation", "OutOfMemoryError", "w1", "2"]


def test_report_window_and_range(settings: Settings) -> None:
    status, out, err = run(settings, ["--format", "json", "--query", "windows",
                                      "--window", "3600", "--since", "2025-01-01T00:01:00",
                                      "--until", "2025-01-01T00:02:00Z"])

    assert status == 0, err
    report = json.loads(out)
    assert {row["window_start"] for row in report["windows"]} == {"2025-01-01T00:00:00Z"}
    assert {row["tier"] for row in report["windows"]} == {"standard", "batch", ""}
    assert report["stages"]["job"]["count"] == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--window", "0"], "window must be at least 1"),
        (["--top", "0"], "top must be at least 1"),
        (["--since", "2025-01-02", "--until", "2025-01-01"], "is not before until"),
    ],
)
def test_report_rejects_invalid_options(
    settings: Settings, argv: list[str], message: str
) -> None:
    status, out, err = run(settings, argv)

    assert status == 2
    assert out == ""
    assert message in err


def test_html_page_self_contained(settings: Settings, tmp_path: Path) -> None:
    page_dir = tmp_path / "page"

    status, out, err = run(settings, ["--html", str(page_dir)])

    assert status == 0, err
    assert out.startswith("stage ")
    page_path = page_dir / "index.html"
    assert f"HTML report written to {page_path}" in err
    page = page_path.read_text()
    assert page.startswith("<!DOCTYPE html>")
    for external in ("<script", "<link", "src=\"http", "href=\"http", "url("):
        assert external not in page, external
    svgs = charts(page)
    # Waterfall, stage percentiles, p95 over time, queue wait and GPU seconds.
    assert len(svgs) == 5
    assert all("<svg" in svg and "</svg>" in svg for svg in svgs)
    # matplotlib keeps each text as an XML comment beside the glyph paths.
    assert "Job job-a: 1000.0 ms, mostly generation" in svgs[0]
    assert "Latency percentiles per stage" in svgs[1]
    assert "GPU seconds by attempt outcome" in svgs[4]


def test_html_page_tables(settings: Settings, tmp_path: Path) -> None:
    status, _, err = run(settings, ["--html", str(tmp_path / "page")])

    assert status == 0, err
    page = (tmp_path / "page" / "index.html").read_text()
    assert "Critical path: generation 750.0 ms, queue_wait 123.0 ms, untraced 65.0 ms" in page
    assert "<td>OutOfMemoryError</td>" in page
    assert "<td>fallback</td>" in page
    assert "Table of " in page


def test_html_page_escapes_span_text(settings: Settings, tmp_path: Path) -> None:
    run(settings, ["--html", str(tmp_path / "page")])

    page = (tmp_path / "page" / "index.html").read_text()
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<img src=x>" not in page
    assert "Bad&lt;Type&gt;" in page


def test_html_page_empty_store(tmp_path: Path) -> None:
    settings = store_settings(tmp_path, [])

    status, _, err = run(settings, ["--html", str(tmp_path / "page")])

    assert status == 0, err
    page = (tmp_path / "page" / "index.html").read_text()
    assert charts(page) == []
    assert "No span with slotforge.stage = job" in page
    assert "No spans with status Error or an error.type attribute." in page


def test_html_page_unwritable_dir(settings: Settings, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")

    status, _, err = run(settings, ["--html", str(blocker / "page")])

    assert status == 1
    assert "failed to write the HTML report" in err
