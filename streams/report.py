"""Latency attribution from the spans stored in ClickHouse, for ``slotforge report``.

Each query lives in ``infra/sql``, so Grafana or clickhouse-client can run the same text.
The functions here bind its parameters and turn its rows into plain dictionaries.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import Error as ClickHouseClientError

from infra.clickhouse import (
    MAX_TIMESTAMP_NS,
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
# Sections of the report in output order. The stage table is always printed first.
REPORT_QUERIES = ("stages", "windows", "slow-jobs", "queue-wait", "gpu", "failures")
DEFAULT_WINDOW_S = 60
DEFAULT_TOP = 10
_LATENCY_KEYS = ("p50_ms", "p95_ms", "p99_ms")
_TRACE_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def parse_utc_time(text: str) -> datetime:
    """Parse an ISO 8601 time for a command-line option, reading a time without a zone as UTC.

    Raises argparse.ArgumentTypeError, so argparse reports the invalid value and exits.
    """
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"invalid time {text!r}: use ISO 8601, for example 2025-01-31T14:00:00Z"
        ) from err
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment


def unix_ns(moment: datetime) -> int:
    """Return an aware datetime as integer Unix nanoseconds, without float rounding."""
    return (moment - _EPOCH) // timedelta(microseconds=1) * 1_000


@dataclass(frozen=True)
class TimeRange:
    """Half-open range [since, until) of span start times. None leaves that side open."""

    since: datetime | None = None
    until: datetime | None = None

    def __post_init__(self) -> None:
        for moment in (self.since, self.until):
            if moment is not None and moment.tzinfo is None:
                raise ValueError(
                    f"time {moment.isoformat()} has no time zone; pass an aware datetime"
                )
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise ValueError(
                f"invalid time range: since {self.since.isoformat()} is not before "
                f"until {self.until.isoformat()}"
            )

    def parameters(self) -> dict[str, int]:
        """Return the ``since_ns`` and ``until_ns`` query parameters of the SQL files."""
        since_ns = unix_ns(self.since) if self.since is not None else 0
        until_ns = unix_ns(self.until) if self.until is not None else MAX_TIMESTAMP_NS
        return {"since_ns": max(0, since_ns), "until_ns": min(until_ns, MAX_TIMESTAMP_NS)}


ALL_TIME = TimeRange()


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")


def _latencies(values: Sequence[float], keys: Sequence[str] = _LATENCY_KEYS) -> dict[str, float]:
    # Six decimals of a millisecond is the nanosecond resolution of Duration.
    return {key: round(float(value), 6) for key, value in zip(keys, values, strict=True)}


def _query(
    client: Client, file_name: str, table: str, parameters: dict[str, Any]
) -> list[dict[str, Any]]:
    """Run one SQL file with bound parameters and return its rows as dicts by column name."""
    result = client.query(load_sql(file_name, table), parameters=parameters)
    names = result.column_names
    return [dict(zip(names, row, strict=True)) for row in result.result_rows]


def stage_latency(
    client: Client, table: str, time_range: TimeRange = ALL_TIME
) -> dict[str, dict[str, Any]]:
    """Return ``{stage: {"count", "p50_ms", "p95_ms", "p99_ms"}}`` for spans with a stage.

    Stages come from the ``slotforge.stage`` span attribute, sorted by name. The quantiles
    are exact up to 8,192 spans per stage and deterministic estimates beyond that.
    """
    stages: dict[str, dict[str, Any]] = {}
    for row in _query(client, "stage_latency.sql", table, time_range.parameters()):
        entry = {"count": int(row["span_count"]), **_latencies(row["latency_ms"])}
        stages[str(row["stage"])] = entry
    return stages


def span_count(client: Client, table: str) -> int:
    """Return the number of spans stored, with or without a stage attribute."""
    result = client.query(f"SELECT count() FROM {quote_table(table)}")
    return int(result.result_rows[0][0])


def stage_latency_windows(
    client: Client, table: str, *, window_s: int = DEFAULT_WINDOW_S,
    time_range: TimeRange = ALL_TIME,
) -> list[dict[str, Any]]:
    """Return latency percentiles per time window, stage and tier, oldest window first.

    Each row has ``window_start`` (aware UTC datetime), ``stage``, ``tier`` (empty when no
    span of the trace names one), ``count`` and ``p50_ms``/``p95_ms``/``p99_ms``.
    """
    _check_positive("window_s", window_s)
    parameters = {"window_s": window_s, **time_range.parameters()}
    return [
        {
            "window_start": row["window_start"].replace(tzinfo=UTC),
            "stage": str(row["stage"]),
            "tier": str(row["tier"]),
            "count": int(row["span_count"]),
            **_latencies(row["latency_ms"]),
        }
        for row in _query(client, "stage_latency_windows.sql", table, parameters)
    ]


def slow_jobs(
    client: Client, table: str, *, top: int = DEFAULT_TOP, time_range: TimeRange = ALL_TIME
) -> list[dict[str, Any]]:
    """Return the ``top`` slowest jobs with the critical path of each, slowest first.

    ``critical_path_ms`` maps each stage on the path, plus ``untraced`` for time in no span,
    to milliseconds, largest first. The values add up to ``duration_ms``, and
    ``dominant_stage`` is the largest.
    """
    _check_positive("top", top)
    parameters = {"top": top, **time_range.parameters()}
    jobs = []
    for row in _query(client, "slow_jobs.sql", table, parameters):
        path = sorted(row["critical_path_ms"].items(), key=lambda item: (-item[1], item[0]))
        jobs.append({
            "job_id": str(row["job_id"]),
            "trace_id": str(row["trace_id"]),
            "tier": str(row["tier"]),
            "status": str(row["status"]),
            "duration_ms": round(float(row["duration_ms"]), 6),
            "dominant_stage": str(row["dominant_stage"]),
            "dominant_ms": round(float(row["dominant_ms"]), 6),
            "critical_path_ms": {str(stage): round(float(ms), 6) for stage, ms in path},
        })
    return jobs


def queue_wait_by_concurrency(
    client: Client, table: str, *, time_range: TimeRange = ALL_TIME
) -> list[dict[str, Any]]:
    """Return queue-wait percentiles per tier and worker concurrency at take time.

    ``concurrency`` is 0 for queue_wait spans without ``slotforge.pool.concurrency``.
    """
    return [
        {
            "tier": str(row["tier"]),
            "concurrency": int(row["concurrency"]),
            "count": int(row["span_count"]),
            "mean_ms": round(float(row["mean_wait_ms"]), 6),
            **_latencies(row["wait_ms"]),
        }
        for row in _query(client, "queue_wait_by_concurrency.sql", table, time_range.parameters())
    ]


def gpu_seconds_by_outcome(
    client: Client, table: str, *, time_range: TimeRange = ALL_TIME
) -> list[dict[str, Any]]:
    """Return attempts and GPU seconds per final attempt outcome and tier, most GPU time first.

    ``share`` is the row's fraction of all GPU seconds in the result.
    """
    rows = _query(client, "gpu_seconds_by_outcome.sql", table, time_range.parameters())
    total = sum(float(row["gpu_seconds"]) for row in rows)
    return [
        {
            "outcome": str(row["outcome"]),
            "tier": str(row["tier"]),
            "attempts": int(row["attempts"]),
            "gpu_s": round(float(row["gpu_seconds"]), 6),
            "share": round(float(row["gpu_seconds"]) / total, 6) if total else 0.0,
        }
        for row in rows
    ]


def failures(
    client: Client, table: str, *, top: int = DEFAULT_TOP, time_range: TimeRange = ALL_TIME
) -> list[dict[str, Any]]:
    """Return failed spans grouped by stage, error type and worker, most frequent first."""
    _check_positive("top", top)
    parameters = {"top": top, **time_range.parameters()}
    return [
        {
            "stage": str(row["stage"]),
            "error_type": str(row["error_type"]),
            "worker": str(row["worker"]),
            "failures": int(row["failures"]),
            "traces": int(row["traces"]),
            "first_seen": row["first_seen"].replace(tzinfo=UTC),
            "last_seen": row["last_seen"].replace(tzinfo=UTC),
            "last_message": str(row["last_message"]),
        }
        for row in _query(client, "failures.sql", table, parameters)
    ]


def trace_spans(client: Client, table: str, trace_id: str) -> list[dict[str, Any]]:
    """Return every span of one trace in start order, with ``offset_ms`` from the first start."""
    if not _TRACE_ID_PATTERN.match(trace_id):
        raise ValueError(f"invalid trace id {trace_id!r}: expected 32 lower-case hex digits")
    rows = _query(client, "trace_spans.sql", table, {"trace_id": trace_id})
    if not rows:
        return []
    first_ns = min(int(row["start_ns"]) for row in rows)
    return [
        {
            "span_id": str(row["SpanId"]),
            "parent_span_id": str(row["parent_span_id"]),
            "name": str(row["span_name"]),
            "stage": str(row["stage"]),
            "service": str(row["service"]),
            "attempt_id": str(row["attempt_id"]),
            "worker": str(row["worker"]),
            "status": str(row["status"]),
            "offset_ms": (int(row["start_ns"]) - first_ns) / 1e6,
            "duration_ms": int(row["duration_ns"]) / 1e6,
        }
        for row in rows
    ]


# ---- report assembly ----------------------------------------------------------------------


@dataclass(frozen=True)
class ReportOptions:
    """Options of ``slotforge report``: the sections, their parameters and the HTML folder."""

    queries: tuple[str, ...] = ("stages",)
    window_s: int = DEFAULT_WINDOW_S
    top: int = DEFAULT_TOP
    time_range: TimeRange = field(default_factory=TimeRange)
    # Folder for a self-contained index.html with every section and its charts.
    html_dir: Path | None = None

    def __post_init__(self) -> None:
        unknown = [name for name in self.queries if name not in REPORT_QUERIES]
        if unknown:
            raise ValueError(
                f"unknown report query {', '.join(unknown)}; use {', '.join(REPORT_QUERIES)}"
            )
        _check_positive("window", self.window_s)
        _check_positive("top", self.top)


_SECTION_READERS: dict[str, Callable[[Client, str, ReportOptions], Any]] = {
    "windows": lambda client, table, options: stage_latency_windows(
        client, table, window_s=options.window_s, time_range=options.time_range
    ),
    "slow-jobs": lambda client, table, options: slow_jobs(
        client, table, top=options.top, time_range=options.time_range
    ),
    "queue-wait": lambda client, table, options: queue_wait_by_concurrency(
        client, table, time_range=options.time_range
    ),
    "gpu": lambda client, table, options: gpu_seconds_by_outcome(
        client, table, time_range=options.time_range
    ),
    "failures": lambda client, table, options: failures(
        client, table, top=options.top, time_range=options.time_range
    ),
}


def section_key(query: str) -> str:
    """Return the JSON key of a report section, for example ``slow_jobs`` for ``slow-jobs``."""
    return query.replace("-", "_")


def build_report(
    client: Client, table: str, options: ReportOptions | None = None
) -> dict[str, Any]:
    """Run the stage query and every query named in ``options.queries``, in report order."""
    options = options or ReportOptions()
    report: dict[str, Any] = {
        "stages": stage_latency(client, table, options.time_range),
        "clickhouse_spans": span_count(client, table),
    }
    for query in REPORT_QUERIES[1:]:
        if query in options.queries:
            report[section_key(query)] = _SECTION_READERS[query](client, table, options)
    return report


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def report_json(report: dict[str, Any]) -> str:
    """Render a report as indented JSON with times as ISO 8601 UTC strings."""
    return json.dumps(report, indent=2, default=_json_default)


# ---- terminal tables ----------------------------------------------------------------------


def format_rows(
    header: Sequence[str], rows: Sequence[Sequence[str]], numeric: set[int]
) -> list[str]:
    """Align text cells in columns, right-aligning the columns whose index is in ``numeric``."""
    lines = [list(header), *(list(row) for row in rows)]
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    rendered = []
    for line in lines:
        cells = [
            cell.rjust(width) if column in numeric else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        rendered.append("  ".join(cells).rstrip())
    return rendered


def _ms(value: float) -> str:
    return f"{value:.3f}"


def _time(value: datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S")


def _stage_lines(report: dict[str, Any]) -> list[str]:
    rows = [
        [stage, str(entry["count"]), *(_ms(entry[key]) for key in _LATENCY_KEYS)]
        for stage, entry in report["stages"].items()
    ]
    lines = format_rows(("stage", "count", *_LATENCY_KEYS), rows, {1, 2, 3, 4})
    if not report["stages"]:
        lines.append("(no spans with a slotforge.stage attribute)")
    return lines


def _window_lines(rows: list[dict[str, Any]]) -> list[str]:
    cells = [
        [_time(row["window_start"]), row["stage"], row["tier"] or "-", str(row["count"]),
         *(_ms(row[key]) for key in _LATENCY_KEYS)]
        for row in rows
    ]
    header = ("window_start_utc", "stage", "tier", "count", *_LATENCY_KEYS)
    return format_rows(header, cells, {3, 4, 5, 6})


def _slow_job_lines(rows: list[dict[str, Any]]) -> list[str]:
    cells = []
    for row in rows:
        share = row["dominant_ms"] / row["duration_ms"] if row["duration_ms"] else 0.0
        # The three largest parts of the critical path, which usually explain the job.
        parts = ", ".join(
            f"{stage} {ms:.1f}" for stage, ms in list(row["critical_path_ms"].items())[:3]
        )
        cells.append([
            row["job_id"] or row["trace_id"], row["tier"] or "-", row["status"] or "-",
            _ms(row["duration_ms"]), row["dominant_stage"], f"{share:.0%}", parts,
        ])
    header = ("job_id", "tier", "status", "duration_ms", "dominant", "share", "critical path ms")
    return format_rows(header, cells, {3, 5})


def _queue_wait_lines(rows: list[dict[str, Any]]) -> list[str]:
    cells = [
        [row["tier"] or "-", str(row["concurrency"]), str(row["count"]), _ms(row["mean_ms"]),
         *(_ms(row[key]) for key in _LATENCY_KEYS)]
        for row in rows
    ]
    header = ("tier", "concurrency", "count", "mean_ms", *_LATENCY_KEYS)
    return format_rows(header, cells, {1, 2, 3, 4, 5, 6})


def _gpu_lines(rows: list[dict[str, Any]]) -> list[str]:
    cells = [
        [row["outcome"], row["tier"] or "-", str(row["attempts"]), f"{row['gpu_s']:.3f}",
         f"{row['share']:.1%}"]
        for row in rows
    ]
    return format_rows(("outcome", "tier", "attempts", "gpu_s", "share"), cells, {2, 3, 4})


def _failure_lines(rows: list[dict[str, Any]]) -> list[str]:
    cells = [
        [row["stage"] or "-", row["error_type"], row["worker"] or "-", str(row["failures"]),
         str(row["traces"]), _time(row["last_seen"]), row["last_message"][:60]]
        for row in rows
    ]
    header = ("stage", "error_type", "worker", "failures", "traces", "last_seen_utc",
              "last message")
    return format_rows(header, cells, {3, 4})


# Title, renderer and the message printed when the query returned no rows.
_SECTION_TABLES: dict[str, tuple[str, Callable[[list[dict[str, Any]]], list[str]], str]] = {
    "windows": ("Stage latency per window and tier", _window_lines,
                "(no spans with a slotforge.stage attribute)"),
    "slow_jobs": ("Slowest jobs and their critical path", _slow_job_lines,
                  "(no spans with slotforge.stage = job)"),
    "queue_wait": ("Queue wait by worker concurrency", _queue_wait_lines,
                   "(no queue_wait spans)"),
    "gpu": ("GPU seconds by attempt outcome", _gpu_lines,
            "(no spans with slotforge.attempt.id)"),
    "failures": ("Failures by stage, error type and worker", _failure_lines,
                 "(no spans with status Error or error.type)"),
}


def format_table(report: dict[str, Any]) -> str:
    """Render a report as text tables with right-aligned numbers, for a person to read.

    The stage table comes first and the ``ClickHouse spans`` count line last.
    """
    lines = _stage_lines(report)
    for key, (title, render, empty) in _SECTION_TABLES.items():
        if key not in report:
            continue
        lines += ["", f"{title}:"]
        lines += render(report[key]) if report[key] else [empty]
    lines += ["", f"ClickHouse spans: {report['clickhouse_spans']}"]
    return "\n".join(lines)


# ---- command ------------------------------------------------------------------------------


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``slotforge report`` options to its subcommand parser."""
    parser.add_argument("--format", choices=REPORT_FORMATS, default="table",
                        help="output format on stdout (default: table)")
    parser.add_argument(
        "--query", action="append", choices=[*REPORT_QUERIES, "all"], dest="queries",
        metavar="NAME",
        help=f"section to print after the stage table: {', '.join(REPORT_QUERIES)} or all; "
             "repeat for several (default: stages only)",
    )
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW_S, dest="window_s",
                        metavar="SECONDS",
                        help=f"window length of the windows query in seconds "
                             f"(default: {DEFAULT_WINDOW_S})")
    parser.add_argument("--top", type=int, default=DEFAULT_TOP, metavar="N",
                        help=f"rows of the slow-jobs and failures queries (default: {DEFAULT_TOP})")
    parser.add_argument("--since", type=parse_utc_time, metavar="TIME",
                        help="first span start to include, ISO 8601; UTC when no zone is given")
    parser.add_argument("--until", type=parse_utc_time, metavar="TIME",
                        help="leave out spans that start at or after this ISO 8601 time")
    parser.add_argument("--html", type=Path, metavar="DIR", dest="html_dir",
                        help="also write DIR/index.html with every section and its charts")


def report_from_args(
    settings: Settings, args: argparse.Namespace, *, out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Run ``report_command`` with the options that ``add_report_arguments`` parsed."""
    err = err or sys.stderr
    queries = tuple(args.queries or ("stages",))
    if "all" in queries:
        queries = REPORT_QUERIES
    try:
        options = ReportOptions(
            queries=queries, window_s=args.window_s, top=args.top,
            time_range=TimeRange(args.since, args.until), html_dir=args.html_dir,
        )
    except ValueError as error:
        err.write(f"report: {error}\n")
        return 2
    return report_command(settings, args.format, options=options, out=out, err=err)


def report_command(
    settings: Settings, fmt: str, *, options: ReportOptions | None = None,
    out: TextIO | None = None, err: TextIO | None = None,
) -> int:
    """Print the report as JSON or text tables, write the HTML page if asked, return the status.

    Returns 0 on success, 1 when ClickHouse cannot be read (locked store, no span table,
    connection failure) or the HTML page cannot be written, and 2 for an unknown format.
    Errors go to ``err`` as one message, without a traceback.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    options = options or ReportOptions()
    if fmt not in REPORT_FORMATS:
        err.write(f"report: unknown format {fmt!r}; use one of {', '.join(REPORT_FORMATS)}\n")
        return 2

    table = settings.clickhouse.table
    dsn = redact_dsn(settings.clickhouse.dsn)
    try:
        report, page = _read_report(settings, table, options)
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
        out.write(report_json(report) + "\n")
    else:
        out.write(format_table(report) + "\n")
    if page is not None and options.html_dir is not None:
        try:
            path = _write_page(options.html_dir, page)
        except OSError as error:
            err.write(f"report: failed to write the HTML report to {options.html_dir}: {error}\n")
            return 1
        # stderr keeps stdout parseable when the format is json.
        err.write(f"HTML report written to {path}\n")
    return 0


def _write_page(directory: Path, page: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "index.html"
    path.write_text(page, encoding="utf-8")
    return path


def _read_report(
    settings: Settings, table: str, options: ReportOptions
) -> tuple[dict[str, Any], str | None]:
    """Read the report and, when ``options.html_dir`` is set, render the HTML page."""
    # The report opens the store without creating it, so a mistyped path leaves nothing behind.
    client = open_client(settings.clickhouse, create_store=False)
    try:
        if not table_exists(client, table):
            raise SpanTableMissingError(
                f"table {table} not found at {redact_dsn(settings.clickhouse.dsn)}, so no "
                "spans were stored yet. Run the span sink (python -m consumers.span_sink) "
                "to create it."
            )
        report = build_report(client, table, options)
        if options.html_dir is None:
            return report, None
        # Imported here because matplotlib.pyplot takes about 0.4 s to import.
        from streams.report_html import read_page_data, render_page

        data = read_page_data(client, table, options)
        return report, render_page(data, source=redact_dsn(settings.clickhouse.dsn))
    finally:
        client.close()
