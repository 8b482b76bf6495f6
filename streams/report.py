"""Latency attribution per pipeline stage, read from the spans stored in ClickHouse."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, TextIO

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import Error as ClickHouseClientError

from infra.clickhouse import (
    ClickHouseStoreError,
    SpanTableMissingError,
    load_sql,
    open_client,
    quote_table,
    redact_dsn,
    table_exists,
)
from streams.config import Settings

logger = logging.getLogger(__name__)

REPORT_FORMATS = ("json", "table")
_LATENCY_KEYS = ("p50_ms", "p95_ms", "p99_ms")


def stage_latency(client: Client, table: str) -> dict[str, dict[str, Any]]:
    """Return ``{stage: {"count", "p50_ms", "p95_ms", "p99_ms"}}`` for spans with a stage.

    Stages come from the ``slotforge.stage`` span attribute, sorted by name. The quantiles
    are exact up to 8,192 spans per stage and deterministic estimates beyond that.
    """
    result = client.query(load_sql("stage_latency.sql", table))
    stages: dict[str, dict[str, Any]] = {}
    for stage, count, latencies in result.result_rows:
        entry: dict[str, Any] = {"count": int(count)}
        for key, value in zip(_LATENCY_KEYS, latencies, strict=True):
            # Six decimals of a millisecond is the nanosecond resolution of Duration.
            entry[key] = round(float(value), 6)
        stages[str(stage)] = entry
    return stages


def span_count(client: Client, table: str) -> int:
    """Return the number of spans stored, with or without a stage attribute."""
    result = client.query(f"SELECT count() FROM {quote_table(table)}")
    return int(result.result_rows[0][0])


def build_report(client: Client, table: str) -> dict[str, Any]:
    return {"stages": stage_latency(client, table), "clickhouse_spans": span_count(client, table)}


def format_table(report: dict[str, Any]) -> str:
    """Render a report as a text table with right-aligned numbers, for a person to read."""
    header = ("stage", "count", *_LATENCY_KEYS)
    lines = [list(header)]
    for stage, entry in report["stages"].items():
        lines.append([stage, str(entry["count"]), *(f"{entry[key]:.3f}" for key in _LATENCY_KEYS)])
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]

    rendered = []
    for line in lines:
        cells = [line[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True)]
        rendered.append("  ".join(cells).rstrip())
    if not report["stages"]:
        rendered.append("(no spans with a slotforge.stage attribute)")
    rendered.append("")
    rendered.append(f"ClickHouse spans: {report['clickhouse_spans']}")
    return "\n".join(rendered)


def report_command(
    settings: Settings, fmt: str, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Print the stage latency report as JSON or a text table, and return the exit status.

    Returns 0 on success, 1 when ClickHouse cannot be read (locked store, no span table,
    connection failure) and 2 for an unknown format. Errors go to ``err`` as one message,
    without a traceback.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    if fmt not in REPORT_FORMATS:
        err.write(f"report: unknown format {fmt!r}; use one of {', '.join(REPORT_FORMATS)}\n")
        return 2

    table = settings.clickhouse.table
    dsn = redact_dsn(settings.clickhouse.dsn)
    try:
        report = _read_report(settings, table)
    except ClickHouseStoreError as error:
        err.write(f"report: {error}\n")
        return 1
    except ClickHouseClientError as error:
        err.write(f"report: failed to query table {table} at {dsn}: {error}\n")
        return 1
    except ValueError as error:
        # split_table rejects a malformed SLOTFORGE_CLICKHOUSE__TABLE with a ValueError.
        err.write(f"report: {error}\n")
        return 1

    if fmt == "json":
        out.write(json.dumps(report, indent=2) + "\n")
    else:
        out.write(format_table(report) + "\n")
    return 0


def _read_report(settings: Settings, table: str) -> dict[str, Any]:
    # The report opens the store without creating it, so a mistyped path leaves nothing behind.
    client = open_client(settings.clickhouse, create_store=False)
    try:
        if not table_exists(client, table):
            raise SpanTableMissingError(
                f"table {table} not found at {redact_dsn(settings.clickhouse.dsn)}, so no "
                "spans were stored yet. Run the span sink (python -m consumers.span_sink) "
                "to create it."
            )
        return build_report(client, table)
    finally:
        client.close()
