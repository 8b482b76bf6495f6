"""Self-contained HTML page of the span report, with charts drawn by matplotlib.

Every chart is an SVG embedded as a base64 data URI in an ``<img>`` tag, so the page needs
no other file, script or network access, and the charts' element ids cannot collide.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from collections import defaultdict
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import matplotlib

# A non-interactive backend, because the report may run where no display exists.
matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402 - must follow matplotlib.use
from clickhouse_connect.driver.client import Client  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from streams.report import (  # noqa: E402
    ReportOptions,
    failures,
    gpu_seconds_by_outcome,
    queue_wait_by_concurrency,
    slow_jobs,
    span_count,
    stage_latency,
    stage_latency_windows,
    trace_spans,
)

logger = logging.getLogger(__name__)

# Stages in pipeline order, each with a fixed colour so every chart uses the same legend.
STAGE_COLORS = {
    "submit": "#9467bd",
    "admission": "#8c564b",
    "dispatch": "#e377c2",
    "queue_wait": "#ff7f0e",
    "claim": "#ffbb78",
    "model_load": "#98df8a",
    "generation": "#1f77b4",
    "upload": "#aec7e8",
    "postprocess": "#2ca02c",
    "completion": "#17becf",
    "job": "#c7c7c7",
    "delivery": "#bcbd22",
    "thumbnail": "#dbdb8d",
    "untraced": "#7f7f7f",
}
OTHER_COLOR = "#aaaaaa"
OUTCOME_ORDER = ("accepted", "fallback", "rejected", "cancelled", "timed_out", "failed",
                 "unknown")
PERCENTILE_COLORS = {"p50_ms": "#9ecae1", "p95_ms": "#4292c6", "p99_ms": "#08519c"}
# Waterfalls of very large traces stay readable by keeping the attempts that ended last.
MAX_WATERFALL_SPANS = 60


@dataclass
class PageData:
    """Every query result the page shows, read in one pass over the store."""

    table: str
    options: ReportOptions
    clickhouse_spans: int
    stages: dict[str, dict[str, Any]]
    windows: list[dict[str, Any]]
    slow_jobs: list[dict[str, Any]]
    queue_wait: list[dict[str, Any]]
    gpu: list[dict[str, Any]]
    failures: list[dict[str, Any]]
    # Spans of the slowest job's trace for the waterfall, empty when no job span exists.
    slowest_trace: list[dict[str, Any]] = field(default_factory=list)
    generated_at: datetime = field(default_factory=lambda: datetime.now(UTC))


def read_page_data(client: Client, table: str, options: ReportOptions) -> PageData:
    """Run every attribution query for the page, whatever ``options.queries`` selects."""
    time_range = options.time_range
    jobs = slow_jobs(client, table, top=options.top, time_range=time_range)
    return PageData(
        table=table,
        options=options,
        clickhouse_spans=span_count(client, table),
        stages=stage_latency(client, table, time_range),
        windows=stage_latency_windows(client, table, window_s=options.window_s,
                                      time_range=time_range),
        slow_jobs=jobs,
        queue_wait=queue_wait_by_concurrency(client, table, time_range=time_range),
        gpu=gpu_seconds_by_outcome(client, table, time_range=time_range),
        failures=failures(client, table, top=options.top, time_range=time_range),
        slowest_trace=trace_spans(client, table, jobs[0]["trace_id"]) if jobs else [],
    )


# ---- charts -------------------------------------------------------------------------------


def _stage_color(stage: str) -> str:
    return STAGE_COLORS.get(stage, OTHER_COLOR)


def _stage_order(stages: Collection[str]) -> list[str]:
    known = [stage for stage in STAGE_COLORS if stage in stages]
    return known + sorted(stage for stage in stages if stage not in STAGE_COLORS)


def _svg_data_uri(figure: Figure) -> str:
    buffer = io.BytesIO()
    # A fixed hash salt keeps the SVG identical for identical data, which eases diffs.
    with plt.rc_context({"svg.hashsalt": "slotforge"}):
        figure.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(figure)
    return "data:image/svg+xml;base64," + base64.b64encode(buffer.getvalue()).decode()


def _waterfall_spans(spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return the spans to draw: every job-level span, then whole attempts, latest first.

    The attempts that ended last held the job up, so their spans are kept whole, until
    MAX_WATERFALL_SPANS rows are used.
    """
    if len(spans) <= MAX_WATERFALL_SPANS:
        return spans
    keep = {span["span_id"] for span in spans if not span["attempt_id"]}
    by_attempt: dict[str, list[dict[str, Any]]] = {}
    for span in spans:
        if span["attempt_id"]:
            by_attempt.setdefault(span["attempt_id"], []).append(span)
    latest_first = sorted(
        by_attempt.values(),
        key=lambda group: -max(span["offset_ms"] + span["duration_ms"] for span in group),
    )
    for group in latest_first:
        if len(keep) + len(group) > MAX_WATERFALL_SPANS:
            break
        keep.update(span["span_id"] for span in group)
    return [span for span in spans if span["span_id"] in keep]


def waterfall_chart(spans: list[dict[str, Any]], job: dict[str, Any]) -> str:
    """Draw one bar per span of the slowest job's trace, by offset from its first span."""
    visible = _waterfall_spans(spans)

    height = 1.2 + 0.32 * len(visible)
    figure, axes = plt.subplots(figsize=(10, height))
    labels = []
    for row, span in enumerate(visible):
        failed = span["status"] == "Error"
        axes.barh(
            row, max(span["duration_ms"], 0.0), left=span["offset_ms"],
            color=_stage_color(span["stage"]), edgecolor="#d62728" if failed else "none",
            linewidth=1.5, hatch="//" if failed else None,
        )
        # Attempt ids end in "-<sequence>", so the sequence identifies one job's attempts.
        attempt_id = span["attempt_id"]
        detail = f"attempt {attempt_id.rpartition('-')[2]}" if attempt_id else span["service"]
        if span["worker"]:
            detail += f" on {span['worker']}"
        labels.append(f"{span['stage'] or span['name']}  ({detail})")
        axes.text(
            span["offset_ms"] + span["duration_ms"], row, f" {span['duration_ms']:.1f} ms",
            va="center", fontsize=7, color="#333333",
        )
    axes.set_yticks(range(len(visible)), labels, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel("milliseconds since the first span of the trace")
    axes.set_title(
        f"Job {job['job_id'] or job['trace_id']}: {job['duration_ms']:.1f} ms, "
        f"mostly {job['dominant_stage']}", fontsize=10,
    )
    axes.grid(axis="x", color="#e0e0e0")
    axes.set_axisbelow(True)
    # Leave room on the right for the duration labels of the last bars.
    right = max(span["offset_ms"] + span["duration_ms"] for span in visible)
    axes.set_xlim(0, right * 1.15 if right > 0 else 1)
    stages = _stage_order({span["stage"] for span in visible})
    handles = [Patch(color=_stage_color(stage), label=stage or "(no stage)") for stage in stages]
    handles.append(Patch(facecolor="white", edgecolor="#d62728", hatch="//", label="error"))
    # Outside the axes, so the legend never hides the last bars.
    axes.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _svg_data_uri(figure)


def percentile_chart(stages: dict[str, dict[str, Any]]) -> str:
    """Draw p50, p95 and p99 latency per stage as grouped horizontal bars on a log axis."""
    names = _stage_order(list(stages))
    figure, axes = plt.subplots(figsize=(10, 1.0 + 0.45 * len(names)))
    bar_height = 0.26
    for index, (key, color) in enumerate(PERCENTILE_COLORS.items()):
        positions = [row + (index - 1) * bar_height for row in range(len(names))]
        # A log axis cannot show 0, so a zero latency is drawn at 1 microsecond.
        values = [max(stages[name][key], 1e-3) for name in names]
        axes.barh(positions, values, height=bar_height, color=color, label=key.removesuffix("_ms"))
    axes.set_yticks(range(len(names)), [f"{name} ({stages[name]['count']})" for name in names],
                    fontsize=8)
    axes.invert_yaxis()
    axes.set_xscale("log")
    axes.set_xlabel("latency, milliseconds (log scale); span count in brackets")
    axes.set_title("Latency percentiles per stage", fontsize=10)
    axes.grid(axis="x", color="#e0e0e0", which="both")
    axes.set_axisbelow(True)
    axes.legend(fontsize=8, loc="lower right")
    return _svg_data_uri(figure)


def gpu_chart(rows: list[dict[str, Any]]) -> str:
    """Draw GPU seconds per attempt outcome, stacked by tier."""
    outcomes = [outcome for outcome in OUTCOME_ORDER if any(r["outcome"] == outcome for r in rows)]
    outcomes += sorted({row["outcome"] for row in rows} - set(outcomes))
    tiers = sorted({row["tier"] for row in rows})
    seconds: dict[tuple[str, str], float] = defaultdict(float)
    for row in rows:
        seconds[(row["outcome"], row["tier"])] += row["gpu_s"]

    figure, axes = plt.subplots(figsize=(10, 1.2 + 0.45 * len(outcomes)))
    tier_colors = plt.get_cmap("Set2")
    lefts = [0.0] * len(outcomes)
    for index, tier in enumerate(tiers):
        values = [seconds[(outcome, tier)] for outcome in outcomes]
        axes.barh(range(len(outcomes)), values, left=lefts, color=tier_colors(index),
                  label=tier or "(no tier)")
        lefts = [left + value for left, value in zip(lefts, values, strict=True)]
    total = sum(lefts)
    for position, value in enumerate(lefts):
        share = value / total if total else 0.0
        axes.text(value, position, f" {value:.2f} s ({share:.0%})", va="center", fontsize=8)
    axes.set_yticks(range(len(outcomes)), outcomes, fontsize=9)
    axes.invert_yaxis()
    axes.set_xlim(0, max(lefts) * 1.25 if lefts and max(lefts) > 0 else 1)
    axes.set_xlabel("GPU seconds")
    axes.set_title("GPU seconds by attempt outcome", fontsize=10)
    axes.grid(axis="x", color="#e0e0e0")
    axes.set_axisbelow(True)
    axes.legend(title="tier", fontsize=8, title_fontsize=8, loc="upper left",
                bbox_to_anchor=(1.01, 1.0))
    return _svg_data_uri(figure)


def queue_wait_chart(rows: list[dict[str, Any]]) -> str:
    """Draw p50 and p95 queue wait against worker concurrency, one pair of lines per tier."""
    by_tier: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_tier[row["tier"]].append(row)

    figure, axes = plt.subplots(figsize=(10, 3.5))
    tier_colors = plt.get_cmap("Set2")
    for index, (tier, tier_rows) in enumerate(sorted(by_tier.items())):
        tier_rows.sort(key=lambda row: row["concurrency"])
        levels = [row["concurrency"] for row in tier_rows]
        color = tier_colors(index)
        axes.plot(levels, [max(row["p95_ms"], 1e-3) for row in tier_rows], marker="o",
                  color=color, label=f"{tier or '(no tier)'} p95")
        axes.plot(levels, [max(row["p50_ms"], 1e-3) for row in tier_rows], marker="o",
                  linestyle="--", color=color, label=f"{tier or '(no tier)'} p50")
    axes.set_xlabel("attempts running on the worker when it took the attempt (0: unknown)")
    # Tiers wait for very different times, so a log axis keeps the shortest waits visible.
    axes.set_yscale("log")
    axes.set_ylabel("queue wait, ms (log scale)")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_title("Queue wait against worker concurrency", fontsize=10)
    axes.grid(color="#e0e0e0")
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _svg_data_uri(figure)


def window_chart(rows: list[dict[str, Any]]) -> str:
    """Draw p95 latency per stage over time, all tiers of a window merged by their maximum."""
    series: dict[str, dict[datetime, float]] = defaultdict(dict)
    for row in rows:
        points = series[row["stage"]]
        points[row["window_start"]] = max(points.get(row["window_start"], 0.0), row["p95_ms"])

    figure, axes = plt.subplots(figsize=(10, 4))
    for stage in _stage_order(list(series)):
        ordered = sorted(series[stage].items())
        moments = [moment for moment, _ in ordered]
        # matplotlib plots datetimes on a date axis, but its type stubs list only numbers.
        axes.plot(moments, [max(value, 1e-3) for _, value in ordered],  # type: ignore[arg-type]
                  marker="o", markersize=3, color=_stage_color(stage), label=stage)
    axes.set_yscale("log")
    axes.set_ylabel("p95 latency, ms (log scale)")
    axes.set_xlabel("window start, UTC")
    axes.set_title("p95 latency per stage over time (highest tier per window)", fontsize=10)
    axes.grid(color="#e0e0e0", which="both")
    axes.legend(fontsize=7, ncols=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.autofmt_xdate()
    return _svg_data_uri(figure)


# ---- page ---------------------------------------------------------------------------------

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { padding: 0.25em 0.7em; border-bottom: 1px solid #eee; text-align: left; }
th, td { white-space: nowrap; }
td.number, th.number { text-align: right; font-variant-numeric: tabular-nums; }
td.text { white-space: normal; }
details { margin: 0.5em 0; } summary { cursor: pointer; color: #444; }
img.chart { max-width: 100%; height: auto; display: block; margin: 0.5em 0; }
p.note { color: #555; font-size: 0.9em; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f'<td class="number">{value:,.3f}</td>'
    if isinstance(value, int):
        return f'<td class="number">{value:,}</td>'
    if isinstance(value, datetime):
        return f"<td>{value.strftime('%Y-%m-%d %H:%M:%S')}</td>"
    text = str(value)
    if text == "":
        return "<td>-</td>"
    # Long free text (messages, critical paths) may wrap, while ids and names stay on one line.
    css = ' class="text"' if len(text) > 40 else ""
    return f"<td{css}>{html.escape(text)}</td>"


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]], numeric: set[int]) -> str:
    """Render rows as an HTML table, right-aligning the columns whose index is in ``numeric``."""
    head = "".join(
        f'<th class="number">{html.escape(name)}</th>' if index in numeric
        else f"<th>{html.escape(name)}</th>"
        for index, name in enumerate(header)
    )
    body = "".join("<tr>" + "".join(_cell(value) for value in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _chart(uri: str, alt: str) -> str:
    return f'<img class="chart" alt="{html.escape(alt)}" src="{uri}">'


def _empty(message: str) -> str:
    return f'<p class="note">{html.escape(message)}</p>'


def _slowest_job_section(data: PageData) -> str:
    if not data.slow_jobs:
        return _empty("No span with slotforge.stage = job, so there is no job to show.")
    job = data.slow_jobs[0]
    parts = ", ".join(f"{stage} {ms:.1f} ms" for stage, ms in job["critical_path_ms"].items())
    chart = (_chart(waterfall_chart(data.slowest_trace, job), "waterfall of the slowest job")
             if data.slowest_trace else _empty("The slowest job's trace has no spans."))
    return (
        f"<p>Trace <code>{html.escape(job['trace_id'])}</code>, tier "
        f"{html.escape(job['tier'] or '-')}, status {html.escape(job['status'] or '-')}. "
        f"Critical path: {html.escape(parts)}.</p>{chart}"
        '<p class="note">Hatched bars with a red edge are spans with status Error. '
        "Spans after the job span ended (delivery, thumbnails) are not part of its "
        f"duration.{_hidden_note(data.slowest_trace)}</p>"
    )


def _hidden_note(spans: list[dict[str, Any]]) -> str:
    hidden = len(spans) - len(_waterfall_spans(spans))
    if hidden == 0:
        return ""
    return (f" The trace has {len(spans)} spans; {hidden} spans of the attempts that ended "
            "first are left out.")


def _stages_section(data: PageData) -> str:
    if not data.stages:
        return _empty("No spans with a slotforge.stage attribute.")
    rows = [[stage, entry["count"], entry["p50_ms"], entry["p95_ms"], entry["p99_ms"]]
            for stage, entry in data.stages.items()]
    return (_chart(percentile_chart(data.stages), "latency percentiles per stage")
            + html_table(("stage", "count", "p50 ms", "p95 ms", "p99 ms"), rows, {1, 2, 3, 4}))


def _windows_section(data: PageData) -> str:
    if not data.windows:
        return _empty("No spans with a slotforge.stage attribute.")
    chart = ""
    if len({row["window_start"] for row in data.windows}) > 1:
        chart = _chart(window_chart(data.windows), "p95 latency per stage over time")
    rows = [[row["window_start"], row["stage"], row["tier"], row["count"], row["p50_ms"],
             row["p95_ms"], row["p99_ms"]] for row in data.windows]
    header = ("window start (UTC)", "stage", "tier", "count", "p50 ms", "p95 ms", "p99 ms")
    # One row per window, stage and tier is long, so the table starts folded.
    return (f"{chart}<details><summary>Table of {len(rows)} rows</summary>"
            f"{html_table(header, rows, {3, 4, 5, 6})}</details>")


def _slow_jobs_section(data: PageData) -> str:
    if not data.slow_jobs:
        return _empty("No span with slotforge.stage = job.")
    rows = []
    for job in data.slow_jobs:
        path = ", ".join(f"{stage} {ms:.1f}" for stage, ms in job["critical_path_ms"].items())
        rows.append([job["job_id"], job["tier"], job["status"], job["duration_ms"],
                     job["dominant_stage"], job["dominant_ms"], path])
    header = ("job", "tier", "status", "duration ms", "dominant stage", "dominant ms",
              "critical path, ms per stage")
    return html_table(header, rows, {3, 5})


def _queue_wait_section(data: PageData) -> str:
    if not data.queue_wait:
        return _empty("No queue_wait spans.")
    rows = [[row["tier"], row["concurrency"], row["count"], row["mean_ms"], row["p50_ms"],
             row["p95_ms"], row["p99_ms"]] for row in data.queue_wait]
    header = ("tier", "worker concurrency", "count", "mean ms", "p50 ms", "p95 ms", "p99 ms")
    return (_chart(queue_wait_chart(data.queue_wait), "queue wait by worker concurrency")
            + html_table(header, rows, {1, 2, 3, 4, 5, 6}))


def _gpu_section(data: PageData) -> str:
    if not data.gpu:
        return _empty("No spans with slotforge.attempt.id.")
    rows = [[row["outcome"], row["tier"], row["attempts"], row["gpu_s"], f"{row['share']:.1%}"]
            for row in data.gpu]
    return (_chart(gpu_chart(data.gpu), "GPU seconds by attempt outcome")
            + html_table(("outcome", "tier", "attempts", "GPU s", "share"), rows, {2, 3, 4}))


def _failures_section(data: PageData) -> str:
    if not data.failures:
        return _empty("No spans with status Error or an error.type attribute.")
    rows = [[row["stage"], row["error_type"], row["worker"], row["failures"], row["traces"],
             row["first_seen"], row["last_seen"], row["last_message"][:200]]
            for row in data.failures]
    header = ("stage", "error type", "worker", "failures", "traces", "first seen (UTC)",
              "last seen (UTC)", "last message")
    return html_table(header, rows, {3, 4})


def _range_text(data: PageData) -> str:
    time_range = data.options.time_range
    since = time_range.since.isoformat() if time_range.since else "the first span"
    until = time_range.until.isoformat() if time_range.until else "the last span"
    return f"from {since} until {until}"


def render_page(data: PageData, *, source: str) -> str:
    """Render the whole report as one HTML document. ``source`` names the store, without secrets."""
    sections = [
        ("Slowest job", _slowest_job_section(data)),
        ("Latency per stage", _stages_section(data)),
        (f"Latency per {data.options.window_s}-second window", _windows_section(data)),
        (f"Slowest jobs (up to {data.options.top}) and their critical path",
         _slow_jobs_section(data)),
        ("Queue wait by worker concurrency", _queue_wait_section(data)),
        ("GPU seconds by attempt outcome", _gpu_section(data)),
        ("Failures by stage, error type and worker", _failures_section(data)),
    ]
    body = "".join(f"<h2>{html.escape(title)}</h2>{content}" for title, content in sections)
    generated = data.generated_at.strftime("%Y-%m-%d %H:%M:%S UTC")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<title>slotforge span report</title>"
        f"<style>{_STYLE}</style></head><body>"
        "<h1>slotforge span report</h1>"
        f'<p class="note">{data.clickhouse_spans:,} spans in table '
        f"<code>{html.escape(data.table)}</code> at <code>{html.escape(source)}</code>, "
        f"{html.escape(_range_text(data))}. Generated {generated}.</p>"
        f"{body}</body></html>\n"
    )
