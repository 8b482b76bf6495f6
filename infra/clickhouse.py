"""ClickHouse access for spans: client set-up, the ``otel_traces`` schema and span inserts.

clickhouse-connect is the only client. The default DSN ``chdb:///abs/dir`` runs the embedded
chDB engine inside this process, and an ``http(s)://`` DSN reaches a ClickHouse server with
the same SQL. chDB allows one engine per process and one process per data directory, so while
the span sink runs, no other process can open its store.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Final, NotRequired
from urllib.parse import unquote, urlsplit, urlunsplit

import clickhouse_connect
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import Error as ClickHouseClientError
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, with_config

# pydantic accepts only typing_extensions.TypedDict before Python 3.12.
from typing_extensions import TypedDict

from schemas.errors import SlotforgeError
from streams.config import ClickHouseSettings

# Stored columns of the exporter's otel_traces table, in table order, as system.columns
# lists them. Nested columns are stored as parallel arrays named ``Events.Timestamp`` etc.
SPAN_COLUMNS: Final[tuple[tuple[str, str], ...]] = (
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
)
SPAN_COLUMN_NAMES: Final[tuple[str, ...]] = tuple(name for name, _ in SPAN_COLUMNS)
SPAN_COLUMN_TYPES: Final[tuple[str, ...]] = tuple(type_name for _, type_name in SPAN_COLUMNS)

# An optional database and a table name, each a plain ClickHouse identifier.
_TABLE_PATTERN = re.compile(r"^(?:([A-Za-z_][A-Za-z0-9_]*)\.)?([A-Za-z_][A-Za-z0-9_]*)$")
_PID_PATTERN = re.compile(r"^PID:\s*(\d+)", re.MULTILINE)

# DateTime64(9) stores signed 64-bit nanoseconds, so it ends at 2262-04-11.
MAX_TIMESTAMP_NS: Final = 2**63 - 1
MAX_UINT64: Final = 2**64 - 1


class ClickHouseStoreError(SlotforgeError):
    """ClickHouse could not be opened or queried; a later retry may succeed."""

    retriable = True


class StoreLockedError(ClickHouseStoreError):
    """Another process has locked the chDB data directory, usually a running span sink."""


class SpanTableMissingError(ClickHouseStoreError):
    """The chDB store or the span table does not exist yet."""

    retriable = False


class SchemaMismatchError(ClickHouseStoreError):
    """The span table exists but lacks a column of the otel_traces layout or has another type."""

    retriable = False


def split_table(table: str) -> tuple[str | None, str]:
    """Split ``[database.]table`` into its parts, raising ValueError on any other spelling."""
    match = _TABLE_PATTERN.match(table)
    if match is None:
        raise ValueError(
            f"invalid ClickHouse table name {table!r}: use letters, digits and underscores, "
            "optionally prefixed by a database name and a dot (SLOTFORGE_CLICKHOUSE__TABLE)"
        )
    return match.group(1), match.group(2)


def quote_table(table: str) -> str:
    """Return ``[database.]table`` as a backtick-quoted SQL identifier."""
    database, name = split_table(table)
    if database is None:
        return f"`{name}`"
    return f"`{database}`.`{name}`"


def load_sql(file_name: str, table: str) -> str:
    """Read a statement from ``infra/sql`` and put the quoted table name in place of {table}."""
    text = resources.files("infra").joinpath("sql", file_name).read_text(encoding="utf-8")
    return text.replace("{table}", quote_table(table))


def chdb_directory(dsn: str) -> Path | None:
    """Return the data directory of a ``chdb://`` DSN, or None for in-memory and server DSNs."""
    parsed = urlsplit(dsn)
    if parsed.scheme != "chdb":
        return None
    # chdb:///abs/dir names a directory, while chdb://memory names the in-memory engine.
    if parsed.netloc:
        return None
    if parsed.path in ("", "/"):
        return None
    return Path(unquote(parsed.path))


def redact_dsn(dsn: str) -> str:
    """Return the DSN with any password replaced by ``***``, safe for logs and messages."""
    parsed = urlsplit(dsn)
    if parsed.password is None:
        return dsn
    host = parsed.netloc.rpartition("@")[2]
    netloc = f"{parsed.username or ''}:***@{host}"
    return urlunsplit((parsed.scheme, netloc, parsed.path, parsed.query, parsed.fragment))


def lock_holder(directory: Path) -> int | None:
    """Return the pid that locks a chDB data directory, 0 when it is locked by an unknown pid.

    Returns None when no other process holds the lock. ClickHouse takes an exclusive
    ``flock`` on ``<directory>/status`` and writes ``PID: <pid>`` into that file.
    Probing from a process that has the same directory open itself reports it as locked.
    """
    status_path = directory / "status"
    try:
        descriptor = os.open(status_path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
        else:
            fcntl.flock(descriptor, fcntl.LOCK_UN)
            return None
        match = _PID_PATTERN.search(os.read(descriptor, 4_096).decode("utf-8", "replace"))
        return int(match.group(1)) if match else 0
    finally:
        os.close(descriptor)


def _locked_store_message(directory: Path, pid: int) -> str:
    holder = f"process {pid}" if pid else "another process"
    return (
        f"ClickHouse store {directory} is locked by {holder}. The embedded chDB engine "
        "allows one process per data directory, and the span sink (python -m "
        "consumers.span_sink) owns the store while it runs. Stop the span sink to read the "
        "store, or set SLOTFORGE_CLICKHOUSE__DSN to an http(s):// ClickHouse server that "
        "several processes can share."
    )


def _raise_if_locked(directory: Path, cause: Exception | None = None) -> None:
    pid = lock_holder(directory)
    # This process's own lock is fine: further chDB clients on the same path share its engine.
    if pid is None or pid == os.getpid():
        return
    raise StoreLockedError(_locked_store_message(directory, pid)) from cause


def open_client(settings: ClickHouseSettings, *, create_store: bool = True) -> Client:
    """Open a clickhouse-connect client for ``settings.dsn``, which the caller must close.

    A ``chdb://`` directory is created when missing, unless ``create_store`` is false.
    Raises StoreLockedError when another process holds the chDB directory,
    SpanTableMissingError when the directory is missing and may not be created, and
    ClickHouseStoreError for any other failure to connect.
    """
    directory = chdb_directory(settings.dsn)
    if directory is not None:
        if not directory.is_dir():
            if not create_store:
                raise SpanTableMissingError(
                    f"ClickHouse store {directory} does not exist, so no spans were stored "
                    "yet. Run the span sink (python -m consumers.span_sink) to create it."
                )
            directory.mkdir(parents=True, exist_ok=True)
        # Probe first: chDB reports a held lock only as "Error initializing EmbeddedServer".
        _raise_if_locked(directory)

    try:
        return clickhouse_connect.get_client(dsn=settings.dsn)
    except ClickHouseClientError as err:
        # The lock may have been taken between the probe and the open.
        if directory is not None:
            _raise_if_locked(directory, cause=err)
        raise ClickHouseStoreError(
            f"failed to open ClickHouse at {redact_dsn(settings.dsn)}: {err}"
        ) from err


def table_exists(client: Client, table: str) -> bool:
    database, name = split_table(table)
    result = client.query(
        "SELECT count() FROM system.tables "
        "WHERE database = coalesce({database:Nullable(String)}, currentDatabase()) "
        "AND name = {name:String}",
        parameters={"database": database, "name": name},
    )
    return bool(result.result_rows[0][0])


def table_columns(client: Client, table: str) -> list[tuple[str, str]]:
    """Return the stored columns of a table as (name, type) in table order.

    ALIAS and MATERIALIZED columns are left out because an insert does not write them.
    """
    database, name = split_table(table)
    result = client.query(
        "SELECT name, type FROM system.columns "
        "WHERE database = coalesce({database:Nullable(String)}, currentDatabase()) "
        "AND table = {name:String} AND default_kind NOT IN ('ALIAS', 'MATERIALIZED') "
        "ORDER BY position",
        parameters={"database": database, "name": name},
    )
    return [(str(column), str(type_name)) for column, type_name in result.result_rows]


def ensure_schema(client: Client, table: str) -> None:
    """Create the span table when missing, then check that it has every otel_traces column.

    Raises SchemaMismatchError naming each missing or differently typed column, because an
    insert into such a table would fail on every batch.
    """
    client.command(load_sql("otel_traces.sql", table))

    existing = dict(table_columns(client, table))
    problems = []
    for name, expected_type in SPAN_COLUMNS:
        actual_type = existing.get(name)
        if actual_type is None:
            problems.append(f"{name} is missing")
        elif actual_type != expected_type:
            problems.append(f"{name} is {actual_type}, expected {expected_type}")
    if problems:
        raise SchemaMismatchError(
            f"table {table} does not match the otel_traces layout: {'; '.join(problems)}. "
            "Drop or rename it, or set SLOTFORGE_CLICKHOUSE__TABLE to another table."
        )


class _RowModel(BaseModel):
    # Strict JSON types and ranges that fit the columns, so ClickHouse can convert every value
    # of an accepted row. streams.tracing.span_to_row writes rows of exactly this shape.
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


TimestampNs = Annotated[int, Field(ge=0, le=MAX_TIMESTAMP_NS)]
DurationNs = Annotated[int, Field(ge=0, le=MAX_UINT64)]
SpanIdentifier = Annotated[str, Field(min_length=1)]
AttributeMap = dict[str, str]


class SpanEvent(_RowModel):
    """One entry of a span's ``Events`` column."""

    Timestamp: TimestampNs
    Name: str
    Attributes: AttributeMap = Field(default_factory=dict)


class SpanLink(_RowModel):
    """One entry of a span's ``Links`` column."""

    TraceId: str
    SpanId: str
    TraceState: str = ""
    Attributes: AttributeMap = Field(default_factory=dict)


class SpanRow(_RowModel):
    """One span as a JSON row on the spans topic. Field names are the otel_traces columns.

    Timestamps and Duration are integer nanoseconds.
    """

    Timestamp: TimestampNs
    TraceId: SpanIdentifier
    SpanId: SpanIdentifier
    ParentSpanId: str = ""
    TraceState: str = ""
    SpanName: str
    SpanKind: str = "Internal"
    ServiceName: str = ""
    ResourceAttributes: AttributeMap = Field(default_factory=dict)
    ScopeName: str = ""
    ScopeVersion: str = ""
    SpanAttributes: AttributeMap = Field(default_factory=dict)
    Duration: DurationNs
    StatusCode: str = "Unset"
    StatusMessage: str = ""
    Events: list[SpanEvent] = Field(default_factory=list)
    Links: list[SpanLink] = Field(default_factory=list)

    def column_values(self) -> list[Any]:
        """Return the row's values in SPAN_COLUMNS order, nested columns as parallel lists."""
        return span_column_values(self.model_dump())  # type: ignore[arg-type]


# The span sink's decoder: the fields, rules and defaults of SpanRow, as TypedDicts. Validating
# into plain dicts took half the time of SpanRow.model_validate_json in py-spy profiles of
# `slotforge bench spans` (pydantic 2.14). Keep both in step: tests compare their results.
_ROW_CONFIG = ConfigDict(strict=True, extra="ignore")


@with_config(_ROW_CONFIG)
class SpanEventFields(TypedDict):
    """One entry of a span's ``Events`` column, as validated by SPAN_ROW_ADAPTER."""

    Timestamp: TimestampNs
    Name: str
    Attributes: NotRequired[AttributeMap]


@with_config(_ROW_CONFIG)
class SpanLinkFields(TypedDict):
    """One entry of a span's ``Links`` column, as validated by SPAN_ROW_ADAPTER."""

    TraceId: str
    SpanId: str
    TraceState: NotRequired[str]
    Attributes: NotRequired[AttributeMap]


@with_config(_ROW_CONFIG)
class SpanRowFields(TypedDict):
    """One span row as validated by SPAN_ROW_ADAPTER. Missing optional keys get SpanRow's defaults
    in ``span_column_values``."""

    Timestamp: TimestampNs
    TraceId: SpanIdentifier
    SpanId: SpanIdentifier
    ParentSpanId: NotRequired[str]
    TraceState: NotRequired[str]
    SpanName: str
    SpanKind: NotRequired[str]
    ServiceName: NotRequired[str]
    ResourceAttributes: NotRequired[AttributeMap]
    ScopeName: NotRequired[str]
    ScopeVersion: NotRequired[str]
    SpanAttributes: NotRequired[AttributeMap]
    Duration: DurationNs
    StatusCode: NotRequired[str]
    StatusMessage: NotRequired[str]
    Events: NotRequired[list[SpanEventFields]]
    Links: NotRequired[list[SpanLinkFields]]


SPAN_ROW_ADAPTER: Final[TypeAdapter[SpanRowFields]] = TypeAdapter(SpanRowFields)


def span_column_values(row: SpanRowFields) -> list[Any]:
    """Return a validated row's values in SPAN_COLUMNS order, nested columns as parallel lists.

    Missing keys take the defaults of SpanRow.
    """
    # Bound once, because this runs for every span the sink stores.
    get = row.get
    events: list[SpanEventFields] = get("Events", [])  # type: ignore[assignment]
    links: list[SpanLinkFields] = get("Links", [])  # type: ignore[assignment]
    return [
        row["Timestamp"],
        row["TraceId"],
        row["SpanId"],
        get("ParentSpanId", ""),
        get("TraceState", ""),
        row["SpanName"],
        get("SpanKind", "Internal"),
        get("ServiceName", ""),
        get("ResourceAttributes", {}),
        get("ScopeName", ""),
        get("ScopeVersion", ""),
        get("SpanAttributes", {}),
        row["Duration"],
        get("StatusCode", "Unset"),
        get("StatusMessage", ""),
        [event["Timestamp"] for event in events],
        [event["Name"] for event in events],
        [event.get("Attributes", {}) for event in events],
        [link["TraceId"] for link in links],
        [link["SpanId"] for link in links],
        [link.get("TraceState", "") for link in links],
        [link.get("Attributes", {}) for link in links],
    ]


def insert_spans(client: Client, table: str, rows: Sequence[Sequence[Any]]) -> None:
    """Insert rows in SPAN_COLUMNS order, as ``span_column_values`` makes them, in one INSERT.

    The rows go in column-oriented, which saves clickhouse-connect a Python pivot per block.
    Passing the column types skips the DESCRIBE round trip that clickhouse-connect would
    otherwise make before each insert.
    """
    if not rows:
        return
    database, name = split_table(table)
    client.insert(
        name,
        list(zip(*rows, strict=True)),
        column_names=list(SPAN_COLUMN_NAMES),
        database=database,
        column_type_names=list(SPAN_COLUMN_TYPES),
        column_oriented=True,
    )


def preload_insert_modules() -> None:
    """Import the modules that clickhouse-connect imports lazily on its first insert.

    clickhouse-connect 1.12 checks every insert's data against pandas and numpy types, and
    importing pandas there stalls the first insert by 0.5-2 s on a loaded 2-CPU machine.
    """
    from clickhouse_connect.driver import options

    # Reading the attributes runs the lazy imports; a missing package reads as None.
    _ = options.np, options.pd
