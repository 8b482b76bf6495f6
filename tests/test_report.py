"""The stage latency report command on a real embedded chDB store."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from infra.clickhouse import ensure_schema, open_client
from streams.config import ClickHouseSettings, Settings
from streams.report import format_table, report_command
from tests.test_clickhouse import insert_rows, make_span_rows, store_held_by_other_process

GPU_MS = [2.0, 4.0, 6.0, 8.0, 100.0]
DISPATCH_MS = [0.5, 1.5]


def run_report(settings: Settings, fmt: str) -> tuple[int, str, str]:
    out = io.StringIO()
    err = io.StringIO()
    status = report_command(settings, fmt, out=out, err=err)
    return status, out.getvalue(), err.getvalue()


@pytest.fixture
def report_settings(tmp_path: Path) -> Settings:
    """Settings with an empty chDB location in tmp_path. These tests need no Kafka."""
    return Settings(clickhouse=ClickHouseSettings(dsn=f"chdb://{tmp_path / 'clickhouse'}"))


@pytest.fixture
def stored_settings(report_settings: Settings) -> Settings:
    """Settings whose store contains spans of two stages plus one span without a stage."""
    client = open_client(report_settings.clickhouse)
    try:
        ensure_schema(client, report_settings.clickhouse.table)
        insert_rows(client, make_span_rows({"gpu": GPU_MS, "dispatch": DISPATCH_MS}))
    finally:
        client.close()
    return report_settings


def test_report_json(stored_settings: Settings) -> None:
    status, out, err = run_report(stored_settings, "json")

    assert status == 0
    assert err == ""
    report = json.loads(out)
    assert report["clickhouse_spans"] == len(GPU_MS) + len(DISPATCH_MS) + 1
    assert set(report["stages"]) == {"gpu", "dispatch"}
    gpu = report["stages"]["gpu"]
    assert set(gpu) == {"count", "p50_ms", "p95_ms", "p99_ms"}
    assert gpu["count"] == len(GPU_MS)
    expected = np.percentile(GPU_MS, [50, 95, 99])
    assert gpu["p50_ms"] == pytest.approx(expected[0])
    assert gpu["p95_ms"] == pytest.approx(expected[1])
    assert gpu["p99_ms"] == pytest.approx(expected[2])
    assert report["stages"]["dispatch"]["count"] == len(DISPATCH_MS)


def test_report_table_aligned(stored_settings: Settings) -> None:
    status, out, err = run_report(stored_settings, "table")

    assert status == 0
    assert err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["stage", "count", "p50_ms", "p95_ms", "p99_ms"]
    assert lines[1].split()[0] == "dispatch"
    assert lines[2].split()[0] == "gpu"
    assert lines[2].split()[1] == str(len(GPU_MS))
    assert lines[2].split()[2] == "6.000"
    # Right-aligned numbers end in the same column as their header.
    assert len({len(line) for line in lines[:3]}) == 1
    assert lines[-1] == f"ClickHouse spans: {len(GPU_MS) + len(DISPATCH_MS) + 1}"


def test_format_table_without_stages() -> None:
    text = format_table({"stages": {}, "clickhouse_spans": 4})

    assert "(no spans with a slotforge.stage attribute)" in text
    assert text.endswith("ClickHouse spans: 4")


def test_report_missing_store(report_settings: Settings) -> None:
    status, out, err = run_report(report_settings, "json")

    assert status == 1
    assert out == ""
    assert "does not exist" in err
    assert "Traceback" not in err
    assert not Path(report_settings.clickhouse.dsn.removeprefix("chdb://")).exists()


def test_report_missing_table(report_settings: Settings) -> None:
    open_client(report_settings.clickhouse).close()

    status, out, err = run_report(report_settings, "table")

    assert status == 1
    assert out == ""
    assert "table otel_traces not found" in err
    assert "span sink" in err


def test_report_store_locked(stored_settings: Settings) -> None:
    with store_held_by_other_process(stored_settings.clickhouse.dsn) as pid:
        status, out, err = run_report(stored_settings, "json")

    assert status == 1
    assert out == ""
    assert f"locked by process {pid}" in err
    assert "span sink" in err
    assert "Traceback" not in err


def test_report_unknown_format(stored_settings: Settings) -> None:
    status, out, err = run_report(stored_settings, "yaml")

    assert status == 2
    assert out == ""
    assert "unknown format 'yaml'" in err


def test_report_invalid_table_name(stored_settings: Settings) -> None:
    stored_settings.clickhouse.table = "bad name"

    status, _, err = run_report(stored_settings, "json")

    assert status == 1
    assert "invalid ClickHouse table name" in err
