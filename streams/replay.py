"""Re-publish records of a topic, or the originals of dead letters, for ``slotforge replay``.

The replay reads without a consumer group (assign and seek), so it never moves a group's
committed offsets. It reads a bounded range: the end offsets are taken when it starts, so
replaying a topic into itself ends. Keys and headers are copied unchanged; each record gets
a new timestamp from the producer.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, TextIO

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from schemas.errors import EventDecodeError, SlotforgeError
from schemas.events import DeadLetter, decode_event
from streams.config import Settings
from streams.kafka import Headers, make_consumer, make_producer, topic_partitions
from streams.report import parse_utc_time

logger = logging.getLogger(__name__)

FETCH_TIMEOUT_MS = 500
FETCH_MAX_RECORDS = 500
# Sent records awaited together, which bounds memory and the records lost to one failed flush.
SEND_WINDOW = 1_000
# A partition that returns no record for this long while its position is short of the end
# is given up, because an open transaction can hold the last stable offset back.
IDLE_TIMEOUT_S = 10.0
NO_EVENT_TYPE = "(none)"


class ReplayError(SlotforgeError):
    """The replay cannot start: a missing topic or partition, or options that conflict."""


@dataclass(frozen=True)
class ReplayOptions:
    """Options of one replay: the source range, the record filters and the target.

    Offset and time bounds combine: each partition is read from the later of
    ``start_offset`` and the first offset at ``since``, up to the earlier of ``end_offset``
    and the first offset at ``until`` (both ends exclusive of the upper bound).
    """

    source: str | None = None
    target: str | None = None
    from_deadletter: bool = False
    partitions: tuple[int, ...] = ()
    start_offset: int | None = None
    end_offset: int | None = None
    since: datetime | None = None
    until: datetime | None = None
    keys: tuple[str, ...] = ()
    event_types: tuple[str, ...] = ()
    tenants: tuple[str, ...] = ()
    # Maximum records sent per second. None sends as fast as the broker accepts.
    rate: float | None = None
    dry_run: bool = False
    idle_timeout_s: float = IDLE_TIMEOUT_S

    def __post_init__(self) -> None:
        if not self.from_deadletter and not self.source:
            raise ReplayError("a source topic is required: pass --topic, or --from-deadletter")
        if not self.from_deadletter and not self.target:
            raise ReplayError(
                "a target topic is required: pass --to (only --from-deadletter may omit it, "
                "because each dead letter names its source topic)"
            )
        for name in ("start_offset", "end_offset"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ReplayError(f"--{name.replace('_', '-')} must be 0 or more, got {value}")
        if (self.start_offset is not None and self.end_offset is not None
                and self.start_offset >= self.end_offset):
            raise ReplayError(
                f"--start-offset {self.start_offset} must be below --end-offset "
                f"{self.end_offset}, which is exclusive"
            )
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise ReplayError(
                f"--since {self.since.isoformat()} must be before --until {self.until.isoformat()}"
            )
        if self.rate is not None and self.rate <= 0:
            raise ReplayError(f"--rate must be above 0 records per second, got {self.rate}")


@dataclass
class ReplaySummary:
    """Counts of one replay, by event type, source partition and target topic."""

    source: str
    dry_run: bool
    scanned: int = 0
    matched: int = 0
    sent: int = 0
    undecodable: int = 0
    missing_target: int = 0
    elapsed_s: float = 0.0
    by_event_type: Counter[str] = field(default_factory=Counter)
    by_partition: Counter[int] = field(default_factory=Counter)
    by_target: Counter[str] = field(default_factory=Counter)

    def format(self) -> str:
        """Render the summary as text for a person."""
        verb = "Would send" if self.dry_run else "Sent"
        lines = [
            f"{verb} {self.matched} of {self.scanned} records read from {self.source} "
            f"in {self.elapsed_s:.1f} s" + (" (dry run: nothing was sent)" if self.dry_run else "")
        ]
        sections = (
            ("By event type", self.by_event_type),
            ("By source partition", self.by_partition),
            ("By target topic", self.by_target),
        )
        for title, counts in sections:
            if not counts:
                continue
            lines.append(f"{title}:")
            width = max(len(str(name)) for name in counts)
            for name, count in sorted(counts.items(), key=lambda item: (-item[1], str(item[0]))):
                lines.append(f"  {str(name).ljust(width)}  {count}")
        if self.undecodable:
            lines.append(f"Skipped {self.undecodable} records that are not valid dead letters")
        if self.missing_target:
            lines.append(
                f"Skipped {self.missing_target} dead letters whose source topic no longer exists"
            )
        return "\n".join(lines)


@dataclass(frozen=True)
class _Replayable:
    """One record to re-publish: what goes out, where to, and what the filters look at."""

    target: str
    key: bytes | None
    value: bytes
    headers: Headers
    event_type: str
    tenant_id: str | None


@dataclass
class _Range:
    start: int
    stop: int


class RateLimiter:
    """Space sends so that send n goes out no earlier than n / rate seconds after the first."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self._started: float | None = None
        self._count = 0

    async def wait(self) -> None:
        if self.rate is None:
            return
        now = time.monotonic()
        if self._started is None:
            self._started = now
        due = self._started + self._count / self.rate
        self._count += 1
        if due > now:
            await asyncio.sleep(due - now)


class Progress:
    """Progress over offsets on stderr: tqdm when installed, else a carriage-return counter."""

    def __init__(self, total: int, stream: TextIO | None, description: str) -> None:
        self._stream = stream
        self._done = 0
        self._total = total
        self._last_draw = 0.0
        self._bar: Any = None
        if stream is None:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=total, file=stream, unit="rec", desc=description,
                         mininterval=0.5, dynamic_ncols=True)

    def update(self, count: int) -> None:
        self._done += count
        if self._bar is not None:
            self._bar.update(count)
        elif self._stream is not None and time.monotonic() - self._last_draw >= 0.5:
            self._last_draw = time.monotonic()
            self._stream.write(f"\r{self._done}/{self._total} records")
            self._stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._stream is not None:
            self._stream.write(f"\r{self._done}/{self._total} records\n")
            self._stream.flush()


def _payload_fields(value: bytes | None) -> tuple[str, str | None]:
    """Return the record's ``event_type`` and ``tenant_id`` fields, if it is a JSON object."""
    if not value:
        return NO_EVENT_TYPE, None
    try:
        payload = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        # json raises RecursionError, not JSONDecodeError, on deeply nested arrays.
        return NO_EVENT_TYPE, None
    if not isinstance(payload, dict):
        return NO_EVENT_TYPE, None
    event_type = payload.get("event_type")
    tenant_id = payload.get("tenant_id")
    return (
        event_type if isinstance(event_type, str) else NO_EVENT_TYPE,
        tenant_id if isinstance(tenant_id, str) else None,
    )


def _unwrap(
    record: ConsumerRecord[bytes, bytes], options: ReplayOptions
) -> _Replayable:
    """Return what to re-publish for a record: itself, or the original inside a dead letter.

    Raises EventDecodeError for a dead-letter record that is not a valid DeadLetter.
    """
    headers = [(key, value) for key, value in (record.headers or ()) if isinstance(value, bytes)]
    if not options.from_deadletter:
        assert options.target is not None
        event_type, tenant_id = _payload_fields(record.value)
        return _Replayable(options.target, record.key, record.value or b"", headers,
                           event_type, tenant_id)

    letter: DeadLetter = decode_event(record.value, DeadLetter)
    try:
        value = base64.b64decode(letter.payload_b64, validate=True)
        key = base64.b64decode(letter.key_b64, validate=True) if letter.key_b64 else None
    except binascii.Error as err:
        raise EventDecodeError(f"dead letter contains invalid base64: {err}",
                               error_type="validation") from err
    event_type, tenant_id = _payload_fields(value)
    return _Replayable(options.target or letter.source_topic, key, value, headers,
                       event_type, tenant_id)


def _matches(item: _Replayable, options: ReplayOptions) -> bool:
    if options.keys:
        try:
            key_text = item.key.decode("utf-8") if item.key is not None else None
        except UnicodeDecodeError:
            return False
        if key_text not in options.keys:
            return False
    if options.event_types and item.event_type not in options.event_types:
        return False
    return not options.tenants or item.tenant_id in options.tenants


async def _resolve_topic(settings: Settings, name: str) -> tuple[str, list[TopicPartition]]:
    """Find a topic by full name, or by a name under the configured topic prefix."""
    candidates = [name]
    if not name.startswith(settings.kafka.topic_prefix):
        candidates.append(f"{settings.kafka.topic_prefix}{name}")
    for candidate in candidates:
        partitions = await topic_partitions(settings.kafka, candidate)
        if partitions:
            return candidate, sorted(partitions)
    raise ReplayError(
        f"topic {' or '.join(map(repr, candidates))} not found at "
        f"{settings.kafka.bootstrap_servers}; check the name, or create the pipeline's topics "
        "with `slotforge topics create`"
    )


def _millis(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000)


async def _offset_ranges(
    consumer: AIOKafkaConsumer, partitions: list[TopicPartition], options: ReplayOptions
) -> dict[TopicPartition, _Range]:
    """Return the offsets to read per partition, from the options and the current ends."""
    beginnings = await consumer.beginning_offsets(partitions)
    ends = await consumer.end_offsets(partitions)
    since_offsets: dict[TopicPartition, Any] = {}
    until_offsets: dict[TopicPartition, Any] = {}
    if options.since is not None:
        since_offsets = await consumer.offsets_for_times(
            dict.fromkeys(partitions, _millis(options.since)))
    if options.until is not None:
        until_offsets = await consumer.offsets_for_times(
            dict.fromkeys(partitions, _millis(options.until)))

    ranges: dict[TopicPartition, _Range] = {}
    for partition in partitions:
        start = beginnings[partition]
        stop = ends[partition]
        if options.start_offset is not None:
            start = max(start, options.start_offset)
        if options.end_offset is not None:
            stop = min(stop, options.end_offset)
        if options.since is not None:
            found = since_offsets.get(partition)
            # No record at or after ``since``: nothing in this partition qualifies.
            start = max(start, found.offset) if found is not None else stop
        if options.until is not None:
            found = until_offsets.get(partition)
            if found is not None:
                stop = min(stop, found.offset)
        ranges[partition] = _Range(start, max(start, stop))
    return ranges


class _Sender:
    """Producer side of a replay: rate limit, target checks and a window of pending sends."""

    def __init__(self, settings: Settings, options: ReplayOptions,
                 producer: AIOKafkaProducer | None) -> None:
        self._settings = settings
        self._producer = producer
        self._limiter = RateLimiter(options.rate)
        self._pending: list[asyncio.Future[Any]] = []
        self._target_exists: dict[str, bool] = {}

    async def target_exists(self, topic: str) -> bool:
        exists = self._target_exists.get(topic)
        if exists is None:
            exists = bool(await topic_partitions(self._settings.kafka, topic))
            self._target_exists[topic] = exists
            if not exists:
                logger.warning("Target topic %s does not exist; its records are skipped", topic)
        return exists

    async def send(self, item: _Replayable) -> None:
        # A dry run sends nothing, so it has nothing to space out either.
        if self._producer is None:
            return
        await self._limiter.wait()
        future = await self._producer.send(item.target, item.value, key=item.key,
                                           headers=item.headers)
        self._pending.append(future)
        if len(self._pending) >= SEND_WINDOW:
            await self.flush()

    async def flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending:
            await asyncio.gather(*pending)


async def replay(
    settings: Settings, options: ReplayOptions, *, progress: TextIO | None = None
) -> ReplaySummary:
    """Re-publish the records that ``options`` selects and return what was sent.

    ``progress`` receives a progress bar, usually ``sys.stderr``, and None draws none.
    Raises ReplayError when a topic or partition does not exist, and KafkaError when the
    broker fails.
    """
    requested = options.source or settings.topics.deadletter
    source, partitions = await _resolve_topic(settings, requested)
    if options.partitions:
        known = {partition.partition for partition in partitions}
        missing = sorted(set(options.partitions) - known)
        if missing:
            raise ReplayError(
                f"topic {source} has no partition {', '.join(map(str, missing))}; "
                f"it has partitions 0-{max(known)}"
            )
        partitions = [tp for tp in partitions if tp.partition in options.partitions]
    if options.target is not None:
        target, _ = await _resolve_topic(settings, options.target)
        options = replace(options, target=target)

    summary = ReplaySummary(source=source, dry_run=options.dry_run)
    consumer = make_consumer(settings.kafka, group_id=None, max_poll_records=FETCH_MAX_RECORDS)
    producer = None if options.dry_run else make_producer(settings.kafka)
    started = time.monotonic()
    await consumer.start()
    try:
        if producer is not None:
            await producer.start()
        ranges = await _offset_ranges(consumer, partitions, options)
        logger.info(
            "Replaying %s: %s", source,
            ", ".join(f"[{tp.partition}] {r.start}-{r.stop}" for tp, r in sorted(ranges.items())),
        )
        sender = _Sender(settings, options, producer)
        meter = Progress(sum(r.stop - r.start for r in ranges.values()), progress,
                         f"replay {source}")
        try:
            await _copy(consumer, ranges, options, sender, summary, meter)
            await sender.flush()
        finally:
            meter.close()
    finally:
        await consumer.stop()
        if producer is not None:
            await producer.stop()
    summary.elapsed_s = time.monotonic() - started
    logger.info("Replay of %s done: %d of %d records matched, %d sent", source,
                summary.matched, summary.scanned, summary.sent)
    return summary


async def _copy(
    consumer: AIOKafkaConsumer,
    ranges: dict[TopicPartition, _Range],
    options: ReplayOptions,
    sender: _Sender,
    summary: ReplaySummary,
    meter: Progress,
) -> None:
    """Read every partition up to its stop offset and send the records that match."""
    active = {tp: r for tp, r in ranges.items() if r.start < r.stop}
    if not active:
        return
    consumer.assign(list(active))
    for partition, offsets in active.items():
        consumer.seek(partition, offsets.start)
    positions = {tp: r.start for tp, r in active.items()}

    last_progress = time.monotonic()
    while active:
        batches = await consumer.getmany(*active, timeout_ms=FETCH_TIMEOUT_MS,
                                         max_records=FETCH_MAX_RECORDS)
        for partition, records in batches.items():
            stop = active[partition].stop if partition in active else -1
            for record in records:
                if record.offset >= stop:
                    break
                await _handle(record, options, sender, summary)
        for partition in list(active):
            position = await consumer.position(partition)
            stop = active[partition].stop
            advanced = min(position, stop) - positions[partition]
            if advanced > 0:
                meter.update(advanced)
                positions[partition] = min(position, stop)
                last_progress = time.monotonic()
            if position >= stop:
                consumer.pause(partition)
                del active[partition]
        if active and time.monotonic() - last_progress > options.idle_timeout_s:
            logger.warning(
                "No records for %.0f s before the end of %s; stopping there. An open "
                "transaction may hold back the last stable offset",
                options.idle_timeout_s,
                ", ".join(f"{tp.topic}[{tp.partition}] at {positions[tp]}" for tp in active),
            )
            return


async def _handle(
    record: ConsumerRecord[bytes, bytes], options: ReplayOptions, sender: _Sender,
    summary: ReplaySummary,
) -> None:
    summary.scanned += 1
    try:
        item = _unwrap(record, options)
    except EventDecodeError as err:
        summary.undecodable += 1
        logger.warning("Skipping record %s[%d]@%d: %s", record.topic, record.partition,
                       record.offset, err)
        return
    if not _matches(item, options):
        return
    if options.from_deadletter and not await sender.target_exists(item.target):
        summary.missing_target += 1
        return
    await sender.send(item)
    summary.matched += 1
    if not options.dry_run:
        summary.sent += 1
    summary.by_event_type[item.event_type] += 1
    summary.by_partition[record.partition] += 1
    summary.by_target[item.target] += 1


# ---- command line -------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``slotforge replay`` options to its subcommand parser."""
    # What to read.
    parser.add_argument("--topic", metavar="TOPIC",
                        help="topic to read: a full name, or a name under the configured "
                             "prefix such as jobs.requested")
    parser.add_argument("--from-deadletter", action="store_true",
                        help="read DeadLetter records (from the dead-letter topic, or --topic) "
                             "and re-publish each original key and payload to its source "
                             "topic, or to --to")
    parser.add_argument("--to", dest="target", metavar="TOPIC",
                        help="topic to publish to; required unless --from-deadletter")

    # Which offsets or times.
    parser.add_argument("--partition", type=int, action="append", dest="partitions",
                        metavar="N",
                        help="partition to read; repeat for several (default: all)")
    parser.add_argument("--start-offset", type=int, metavar="OFFSET",
                        help="first offset to read in each selected partition")
    parser.add_argument("--end-offset", type=int, metavar="OFFSET",
                        help="offset to stop before in each selected partition (exclusive)")
    parser.add_argument("--since", type=parse_utc_time, metavar="TIME",
                        help="first record timestamp to read, ISO 8601; UTC when no zone is given")
    parser.add_argument("--until", type=parse_utc_time, metavar="TIME",
                        help="stop before records with a timestamp at or after this ISO 8601 time")

    # Which records.
    parser.add_argument("--key", action="append", dest="keys", metavar="KEY",
                        help="only records whose key, as UTF-8 text, is KEY; repeat for several")
    parser.add_argument("--event-type", action="append", dest="event_types",
                        metavar="TYPE",
                        help="only records whose event_type field is this, such as "
                             "job.requested; repeat for several")
    parser.add_argument("--tenant", action="append", dest="tenants", metavar="TENANT",
                        help="only records whose tenant_id field is this; repeat for several")

    # How to send.
    parser.add_argument("--rate", type=float, metavar="N",
                        help="maximum records sent per second (default: no limit)")
    parser.add_argument("--dry-run", action="store_true",
                        help="read and filter, print what would be sent, send nothing")
    parser.add_argument("--no-progress", action="store_true",
                        help="draw no progress bar on stderr")


def options_from_args(args: argparse.Namespace) -> ReplayOptions:
    """Build ReplayOptions from parsed arguments, raising ReplayError on conflicting options."""

    def _tuple(values: Sequence[Any] | None) -> tuple[Any, ...]:
        return tuple(values or ())

    return ReplayOptions(
        source=args.topic,
        target=args.target,
        from_deadletter=args.from_deadletter,
        partitions=_tuple(args.partitions),
        start_offset=args.start_offset,
        end_offset=args.end_offset,
        since=args.since,
        until=args.until,
        keys=_tuple(args.keys),
        event_types=_tuple(args.event_types),
        tenants=_tuple(args.tenants),
        rate=args.rate,
        dry_run=args.dry_run,
    )


def replay_command(
    settings: Settings, args: argparse.Namespace, *, out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Run a replay from parsed arguments, print its summary and return the exit status.

    Returns 0 on success, 1 when Kafka fails and 2 for invalid options or a missing topic.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        options = options_from_args(args)
        summary = asyncio.run(replay(settings, options, progress=None if args.no_progress else err))
    except ReplayError as error:
        err.write(f"replay: {error}\n")
        return 2
    except KafkaError as error:
        err.write(f"replay: Kafka at {settings.kafka.bootstrap_servers} failed: {error!r}\n")
        return 1
    out.write(summary.format() + "\n")
    return 0
