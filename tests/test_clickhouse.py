"""The otel_traces schema, span inserts and stage attribution on a real embedded chDB store."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from clickhouse_connect.driver.client import Client
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from pydantic import ValidationError

from bench.reliability import clickhouse_unavailable
from infra.clickhouse import (
    SPAN_COLUMNS,
    SPAN_ROW_ADAPTER,
    SchemaMismatchError,
    SpanRow,
    SpanTableMissingError,
    StoreLockedError,
    chdb_directory,
    ensure_schema,
    insert_spans,
    lock_holder,
    open_client,
    quote_table,
    redact_dsn,
    span_column_values,
    table_columns,
    table_exists,
)
from streams.config import ClickHouseSettings
from streams.report import span_count, stage_latency
from streams.tracing import STAGE_ATTRIBUTE, span_to_row

TABLE = "otel_traces"

# Stored columns of otel_traces as the OpenTelemetry Collector ClickHouse exporter creates
# them (traces_table.sql in opentelemetry-collector-contrib), written out independently of
# infra.clickhouse.SPAN_COLUMNS.
EXPORTER_COLUMNS = [
    ("Timestamp", "DateTime64(9)"),
    ("TraceId", "String"),
    ("SpanId", "String"),
    ("ParentSpanId", "String"),
    ("TraceState", "String"),
    ("SpanName", "LowCardinality(String)"),
    ("SpanKind", "LowCardinality(String)"),
    ("ServiceName", "LowCardinality(String)"),
    ("ResourceAttributes", "Map(LowCardinality(String), String)"),
    ("ScopeName", "String"),
    ("ScopeVersion", "String"),
    ("SpanAttributes", "Map(LowCardinality(String), String)"),
    ("Duration", "UInt64"),
    ("StatusCode", "LowCardinality(String)"),
    ("StatusMessage", "String"),
    ("Events.Timestamp", "Array(DateTime64(9))"),
    ("Events.Name", "Array(LowCardinality(String))"),
    ("Events.Attributes", "Array(Map(LowCardinality(String), String))"),
    ("Links.TraceId", "Array(String)"),
    ("Links.SpanId", "Array(String)"),
    ("Links.TraceState", "Array(String)"),
    ("Links.Attributes", "Array(Map(LowCardinality(String), String))"),
]

# A base time in nanoseconds (2025-01-01T00:00:00Z) so durations are exact.
BASE_NS = 1_735_689_600_000_000_000
MS = 1_000_000

# Keeps a chDB store open in a child process, as a running span sink does, and yields its pid.
store_held_by_other_process = clickhouse_unavailable


def make_span_rows(stage_durations_ms: dict[str, list[float]]) -> list[dict[str, Any]]:
    """Record real OpenTelemetry spans with the given durations per stage and return their rows.

    Each stage span gets the ``slotforge.stage`` attribute. One extra span without a stage,
    with an event, a link and an error status, comes last.
    """
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "test-service"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("slotforge", "1")

    start_ns = BASE_NS
    for stage, durations in stage_durations_ms.items():
        for duration_ms in durations:
            span = tracer.start_span(
                f"{stage} work", start_time=start_ns, attributes={STAGE_ATTRIBUTE: stage}
            )
            span.end(end_time=start_ns + round(duration_ms * MS))
            start_ns += 1_000

    parent = tracer.start_span("job", start_time=BASE_NS)
    parent.end(end_time=BASE_NS + 5 * MS)
    linked = tracer.start_span(
        "unstaged",
        kind=SpanKind.CONSUMER,
        start_time=BASE_NS + MS,
        attributes={"job.id": "job-1", "attempt": 3},
        links=[Link(parent.get_span_context(), {"link.kind": "retry"})],
    )
    linked.add_event("claimed", {"worker": "w1"}, timestamp=BASE_NS + 2 * MS)
    linked.set_status(Status(StatusCode.ERROR, "worker lost"))
    linked.end(end_time=BASE_NS + 4 * MS)

    provider.shutdown()
    spans = [span for span in exporter.get_finished_spans() if span.name != "job"]
    return [span_to_row(span) for span in spans]


def insert_rows(client: Client, rows: list[dict[str, Any]]) -> None:
    values = [SpanRow.model_validate_json(json.dumps(row)).column_values() for row in rows]
    insert_spans(client, TABLE, values)


@pytest.fixture
def store_settings(tmp_path: Path) -> ClickHouseSettings:
    return ClickHouseSettings(dsn=f"chdb://{tmp_path / 'clickhouse'}", table=TABLE)


@pytest.fixture
def client(store_settings: ClickHouseSettings) -> Iterator[Client]:
    # chDB hosts one data directory per process, so every test closes its client.
    opened = open_client(store_settings)
    try:
        yield opened
    finally:
        opened.close()


def test_schema_columns_match_exporter(client: Client) -> None:
    ensure_schema(client, TABLE)

    assert table_columns(client, TABLE) == EXPORTER_COLUMNS
    assert list(SPAN_COLUMNS) == EXPORTER_COLUMNS


def test_schema_alias_columns(client: Client) -> None:
    ensure_schema(client, TABLE)

    result = client.query(
        "SELECT name, type FROM system.columns "
        "WHERE table = {table:String} AND default_kind = 'ALIAS' ORDER BY position",
        parameters={"table": TABLE},
    )

    assert result.result_rows == [
        ("ResourceAttributeItems", "Array(String)"),
        ("SpanAttributeItems", "Array(String)"),
    ]


def test_schema_keys_and_indexes(client: Client) -> None:
    ensure_schema(client, TABLE)

    keys = client.query(
        "SELECT engine, partition_key, primary_key, sorting_key FROM system.tables "
        "WHERE database = currentDatabase() AND name = {table:String}",
        parameters={"table": TABLE},
    ).result_rows
    indexes = client.query(
        "SELECT name, type_full FROM system.data_skipping_indices "
        "WHERE database = currentDatabase() AND table = {table:String} ORDER BY name",
        parameters={"table": TABLE},
    ).result_rows

    engine, partition_key, primary_key, sorting_key = keys[0]
    assert engine == "MergeTree"
    assert partition_key == "toDate(Timestamp)"
    assert primary_key == "ServiceName, SpanName, toDateTime(Timestamp)"
    assert sorting_key == "ServiceName, SpanName, toDateTime(Timestamp), Timestamp"
    assert {name: index_type for name, index_type in indexes} == {
        "idx_duration": "minmax",
        "idx_lower_span_name": "tokenbf_v1(32768, 3, 0)",
        "idx_res_attr_key": "bloom_filter(0.01)",
        "idx_res_attr_value": "bloom_filter(0.01)",
        "idx_span_attr_key": "bloom_filter(0.01)",
        "idx_span_attr_value": "bloom_filter(0.01)",
        "idx_trace_id": "bloom_filter(0.001)",
    }


def test_ensure_schema_keeps_existing_rows(client: Client) -> None:
    ensure_schema(client, TABLE)
    insert_rows(client, make_span_rows({"dispatch": [1.0]}))

    ensure_schema(client, TABLE)

    assert span_count(client, TABLE) == 2


def test_ensure_schema_rejects_other_layout(client: Client) -> None:
    client.command(
        "CREATE TABLE otel_traces (Timestamp DateTime, TraceId String, Duration Int64) "
        "ENGINE = MergeTree ORDER BY Timestamp"
    )

    with pytest.raises(SchemaMismatchError) as caught:
        ensure_schema(client, TABLE)

    message = str(caught.value)
    assert "Timestamp is DateTime, expected DateTime64(9)" in message
    assert "Duration is Int64, expected UInt64" in message
    assert "SpanId is missing" in message


def test_ensure_schema_in_named_database(client: Client) -> None:
    client.command("CREATE DATABASE otel")

    ensure_schema(client, "otel.spans")

    assert table_exists(client, "otel.spans")
    assert not table_exists(client, "spans")
    assert table_columns(client, "otel.spans") == EXPORTER_COLUMNS


@pytest.mark.parametrize(
    "table", ["", "otel traces", "a.b.c", "x;DROP TABLE y", "`t`", "1table", "db."]
)
def test_quote_table_rejects_invalid_name(table: str) -> None:
    with pytest.raises(ValueError, match="invalid ClickHouse table name"):
        quote_table(table)


def test_quote_table_quotes_parts() -> None:
    assert quote_table("otel_traces") == "`otel_traces`"
    assert quote_table("otel.otel_traces") == "`otel`.`otel_traces`"


def test_span_values_round_trip(client: Client) -> None:
    ensure_schema(client, TABLE)
    rows = make_span_rows({"gpu": [12.5]})
    insert_rows(client, rows)

    stored = client.query(
        "SELECT toUnixTimestamp64Nano(Timestamp), TraceId, SpanId, ParentSpanId, SpanName, "
        "SpanKind, ServiceName, ResourceAttributes['service.name'], ScopeName, ScopeVersion, "
        "SpanAttributes, Duration, StatusCode, StatusMessage, "
        "arrayMap(t -> toUnixTimestamp64Nano(t), Events.Timestamp), Events.Name, "
        "Events.Attributes, Links.TraceId, Links.SpanId, Links.Attributes "
        "FROM otel_traces ORDER BY SpanName"
    ).result_rows

    assert len(stored) == 2
    gpu, unstaged = stored
    assert gpu[0] == BASE_NS
    assert gpu[1] == rows[0]["TraceId"]
    assert len(gpu[1]) == 32
    assert gpu[2] == rows[0]["SpanId"]
    assert gpu[4] == "gpu work"
    assert gpu[5] == "Internal"
    assert gpu[6] == "test-service"
    assert gpu[7] == "test-service"
    assert gpu[8] == "slotforge"
    assert gpu[9] == "1"
    assert gpu[10] == {STAGE_ATTRIBUTE: "gpu"}
    assert gpu[11] == 12_500_000
    assert gpu[12] == "Unset"
    assert gpu[14] == []

    assert unstaged[5] == "Consumer"
    assert unstaged[10] == {"job.id": "job-1", "attempt": "3"}
    assert unstaged[11] == 3 * MS
    assert unstaged[12] == "Error"
    assert unstaged[13] == "worker lost"
    assert unstaged[14] == [BASE_NS + 2 * MS]
    assert unstaged[15] == ["claimed"]
    assert unstaged[16] == [{"worker": "w1"}]
    assert unstaged[17] == [rows[1]["Links"][0]["TraceId"]]
    assert unstaged[18] == [rows[1]["Links"][0]["SpanId"]]
    assert unstaged[19] == [{"link.kind": "retry"}]


def test_stage_latency_quantiles(client: Client) -> None:
    ensure_schema(client, TABLE)
    gpu_ms = [float(value) for value in range(1, 101)]
    dispatch_ms = [0.25, 0.5, 4.0]
    insert_rows(client, make_span_rows({"gpu": gpu_ms, "dispatch": dispatch_ms}))

    stages = stage_latency(client, TABLE)

    assert list(stages) == ["dispatch", "gpu"]
    for stage, durations in (("gpu", gpu_ms), ("dispatch", dispatch_ms)):
        expected = np.percentile(durations, [50, 95, 99])
        assert stages[stage]["count"] == len(durations)
        assert stages[stage]["p50_ms"] == pytest.approx(expected[0], abs=1e-6)
        assert stages[stage]["p95_ms"] == pytest.approx(expected[1], abs=1e-6)
        assert stages[stage]["p99_ms"] == pytest.approx(expected[2], abs=1e-6)


def test_stage_latency_empty_table(client: Client) -> None:
    ensure_schema(client, TABLE)

    assert stage_latency(client, TABLE) == {}
    assert span_count(client, TABLE) == 0


def test_span_count_includes_unstaged(client: Client) -> None:
    ensure_schema(client, TABLE)
    insert_rows(client, make_span_rows({"gpu": [1.0, 2.0]}))

    assert span_count(client, TABLE) == 3
    assert sum(entry["count"] for entry in stage_latency(client, TABLE).values()) == 2


def test_open_client_store_locked(store_settings: ClickHouseSettings) -> None:
    directory = chdb_directory(store_settings.dsn)
    assert directory is not None

    with store_held_by_other_process(store_settings.dsn) as pid:
        assert lock_holder(directory) == pid
        with pytest.raises(StoreLockedError) as caught:
            open_client(store_settings)

    message = str(caught.value)
    assert f"locked by process {pid}" in message
    assert str(directory) in message
    assert "span sink" in message
    assert lock_holder(directory) is None
    # Once the other process has closed the store, this one can open it.
    reopened = open_client(store_settings)
    reopened.close()


def test_open_client_missing_store_not_created(tmp_path: Path) -> None:
    directory = tmp_path / "absent"
    settings = ClickHouseSettings(dsn=f"chdb://{directory}")

    with pytest.raises(SpanTableMissingError, match="does not exist"):
        open_client(settings, create_store=False)

    assert not directory.exists()


def test_open_client_creates_nested_store(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "b"
    client = open_client(ClickHouseSettings(dsn=f"chdb://{directory}"))
    client.close()

    assert directory.is_dir()


def test_chdb_directory_forms() -> None:
    assert chdb_directory("chdb:///var/lib/spans") == Path("/var/lib/spans")
    assert chdb_directory("chdb://memory") is None
    assert chdb_directory("https://clickhouse.example:8443") is None


def test_redact_dsn_hides_password() -> None:
    assert redact_dsn("https://user:secret@host:8443/db?x=1") == "https://user:***@host:8443/db?x=1"
    assert redact_dsn("http://host:8123") == "http://host:8123"


def test_span_row_accepts_tracing_output() -> None:
    rows = make_span_rows({"gpu": [1.0]})

    for row in rows:
        assert SpanRow.model_validate_json(json.dumps(row)).SpanId == row["SpanId"]


@pytest.mark.parametrize(
    "validate",
    [SpanRow.model_validate_json, SPAN_ROW_ADAPTER.validate_json],
    ids=["model", "adapter"],
)
@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"Timestamp": 1.5e18}, "Timestamp"),
        ({"Timestamp": -1}, "Timestamp"),
        ({"Timestamp": 2**63}, "Timestamp"),
        ({"Duration": -5}, "Duration"),
        ({"Duration": "5"}, "Duration"),
        ({"SpanAttributes": {"attempt": 3}}, "SpanAttributes"),
        ({"TraceId": ""}, "TraceId"),
        ({"Events": [{"Name": "no timestamp"}]}, "Events"),
    ],
)
def test_span_row_rejects_invalid_field(
    validate: Callable[[str], object], change: dict[str, Any], field: str
) -> None:
    row = make_span_rows({"gpu": [1.0]})[0]
    row.update(change)

    with pytest.raises(ValidationError) as caught:
        validate(json.dumps(row))

    assert caught.value.errors()[0]["loc"][0] == field


def test_span_column_values_match_model() -> None:
    rows = make_span_rows({"gpu": [1.0]})
    assert rows[1]["Events"]
    assert rows[1]["Links"]

    for row in rows:
        text = json.dumps(row)
        expected = SpanRow.model_validate_json(text).column_values()
        assert span_column_values(SPAN_ROW_ADAPTER.validate_json(text)) == expected


def test_span_column_values_fill_defaults() -> None:
    text = json.dumps({
        "Timestamp": BASE_NS,
        "TraceId": "a",
        "SpanId": "b",
        "SpanName": "s",
        "Duration": 1,
        "Events": [{"Timestamp": BASE_NS, "Name": "e"}],
        "Links": [{"TraceId": "c", "SpanId": "d"}],
    })

    values = span_column_values(SPAN_ROW_ADAPTER.validate_json(text))

    assert values == SpanRow.model_validate_json(text).column_values()
    assert values[6] == "Internal"
    assert values[13] == "Unset"
    assert values[17] == [{}]
    assert values[20] == [""]
