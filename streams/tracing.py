"""OpenTelemetry set-up shared by every process, with spans shipped to Kafka.

Spans leave each process through a bounded queue and the ``spans`` topic; the span sink
writes them to ClickHouse. Exporting never blocks or raises into the pipeline: when the
queue is full, new spans are dropped, counted and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import queue
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from aiokafka import AIOKafkaProducer
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Span, SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from streams.config import TracingSettings
from streams.metrics import SPANS_DROPPED

logger = logging.getLogger(__name__)

STAGE_ATTRIBUTE = "slotforge.stage"
SCOPE_NAME = "slotforge"
_PROPAGATOR = TraceContextTextMapPropagator()

# Names follow the OpenTelemetry Collector ClickHouse exporter, which stores these strings.
_KIND_NAMES = {
    SpanKind.INTERNAL: "Internal",
    SpanKind.SERVER: "Server",
    SpanKind.CLIENT: "Client",
    SpanKind.PRODUCER: "Producer",
    SpanKind.CONSUMER: "Consumer",
}
_STATUS_NAMES = {StatusCode.UNSET: "Unset", StatusCode.OK: "Ok", StatusCode.ERROR: "Error"}


def _attribute_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple):
        return json.dumps(list(value))
    return str(value)


def _attributes(attributes: Mapping[str, Any] | None) -> dict[str, str]:
    return {key: _attribute_text(value) for key, value in (attributes or {}).items()}


def span_to_row(span: ReadableSpan) -> dict[str, Any]:
    """Convert a finished span into one ``otel_traces`` row, timestamps in nanoseconds."""
    span_context = span.get_span_context()
    assert span_context is not None
    parent = span.parent
    start_ns = span.start_time or 0
    end_ns = span.end_time or start_ns
    scope = span.instrumentation_scope
    return {
        "Timestamp": start_ns,
        "TraceId": format(span_context.trace_id, "032x"),
        "SpanId": format(span_context.span_id, "016x"),
        "ParentSpanId": format(parent.span_id, "016x") if parent is not None else "",
        "TraceState": span_context.trace_state.to_header() if span_context.trace_state else "",
        "SpanName": span.name,
        "SpanKind": _KIND_NAMES.get(span.kind, "Internal"),
        "ServiceName": str(span.resource.attributes.get("service.name", "")),
        "ResourceAttributes": _attributes(span.resource.attributes),
        "ScopeName": scope.name if scope else "",
        "ScopeVersion": (scope.version or "") if scope else "",
        "SpanAttributes": _attributes(span.attributes),
        "Duration": max(0, end_ns - start_ns),
        "StatusCode": _STATUS_NAMES.get(span.status.status_code, "Unset"),
        "StatusMessage": span.status.description or "",
        "Events": [
            {"Timestamp": event.timestamp, "Name": event.name,
             "Attributes": _attributes(event.attributes)}
            for event in span.events
        ],
        "Links": [
            {
                "TraceId": format(link.context.trace_id, "032x"),
                "SpanId": format(link.context.span_id, "016x"),
                "TraceState": link.context.trace_state.to_header()
                if link.context.trace_state else "",
                "Attributes": _attributes(link.attributes),
            }
            for link in span.links
        ],
    }


class QueueSpanExporter(SpanExporter):
    """Hand finished spans to a bounded queue that an asyncio task publishes to Kafka."""

    def __init__(self, max_spans: int) -> None:
        self.queue: queue.Queue[tuple[bytes, bytes]] = queue.Queue(maxsize=max_spans)
        self.dropped = 0
        self._shutdown = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._shutdown:
            return SpanExportResult.FAILURE
        for span in spans:
            try:
                row = span_to_row(span)
                self.queue.put_nowait((row["TraceId"].encode(), json.dumps(row).encode()))
            except queue.Full:
                self.count_dropped()
                if self.dropped == 1 or self.dropped % 1_000 == 0:
                    logger.warning("Span queue is full; dropped %d spans so far", self.dropped)
            except Exception:  # noqa: BLE001 - an exporter must never raise into the pipeline
                self.count_dropped()
                logger.exception("Failed to encode span %s", span.name)
        return SpanExportResult.SUCCESS

    def count_dropped(self) -> None:
        self.dropped += 1
        SPANS_DROPPED.inc()

    def shutdown(self) -> None:
        self._shutdown = True


class Tracing:
    """Tracer provider of one process plus the task that publishes its spans."""

    def __init__(self, service_name: str, settings: TracingSettings, topic: str) -> None:
        self.settings = settings
        self.topic = topic
        self.exporter = QueueSpanExporter(settings.max_queue_spans)
        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        if settings.enabled:
            self.provider.add_span_processor(
                BatchSpanProcessor(self.exporter, schedule_delay_millis=200,
                                   max_export_batch_size=512)
            )
        self.tracer = self.provider.get_tracer(SCOPE_NAME, "1")

    async def publish_routine(self, producer: AIOKafkaProducer) -> None:
        """Publish queued spans until cancelled; run it in the process's task group."""
        while True:
            sent = await self._publish_batch(producer)
            if sent == 0:
                await asyncio.sleep(0.05)

    async def _publish_batch(self, producer: AIOKafkaProducer, max_rows: int = 1_000) -> int:
        sent = 0
        while sent < max_rows:
            try:
                key, value = self.exporter.queue.get_nowait()
            except queue.Empty:
                break
            try:
                await producer.send(self.topic, value, key=key)
            except Exception:  # noqa: BLE001 - losing a span must not stop the pipeline
                self.exporter.count_dropped()
                logger.exception("Failed to publish a span to %s", self.topic)
            sent += 1
        return sent

    async def flush(self, producer: AIOKafkaProducer) -> None:
        """Export finished spans and publish everything queued; call before the producer stops."""
        await asyncio.to_thread(self.provider.force_flush, 5_000)
        while await self._publish_batch(producer):
            pass
        await producer.flush()
        if self.exporter.dropped:
            logger.warning("Dropped %d spans in this process", self.exporter.dropped)

    def shutdown(self) -> None:
        self.provider.shutdown()

    def prompt_attribute(self, text: str) -> str:
        """Return a prompt or user id as it may appear in a span: raw, or hashed when redacted.

        The hash is a truncated SHA-256, so equal values still group together in SQL.
        """
        if self.settings.redact_prompts:
            return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]
        return text[:256]


def inject_headers(span: Span | None = None) -> list[tuple[str, bytes]]:
    """Return W3C ``traceparent``/``tracestate`` headers for the given or current span."""
    carrier: dict[str, str] = {}
    context = trace.set_span_in_context(span) if span is not None else None
    _PROPAGATOR.inject(carrier, context=context)
    return [(key, value.encode()) for key, value in carrier.items()]


def extract_context(headers: Sequence[tuple[str, bytes]] | None) -> otel_context.Context:
    """Read the trace context from Kafka headers; headers that are not UTF-8 are ignored."""
    carrier: dict[str, str] = {}
    for key, value in headers or ():
        if key in ("traceparent", "tracestate") and isinstance(value, bytes):
            with contextlib.suppress(UnicodeDecodeError):
                carrier[key] = value.decode("utf-8")
    return _PROPAGATOR.extract(carrier)


@functools.lru_cache(maxsize=4_096)
def traceparent_context(traceparent: str) -> otel_context.Context:
    """Parse a stored ``traceparent`` into a context, cached because a job's spans share it."""
    return _PROPAGATOR.extract({"traceparent": traceparent})


def datetime_ns(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000_000)


@contextlib.contextmanager
def stage_span(
    tracer: trace.Tracer,
    name: str,
    stage: str,
    *,
    parent: otel_context.Context | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
    start_time_ns: int | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> Iterator[Span]:
    """Open a span for one pipeline stage; its ``slotforge.stage`` attribute groups it in SQL."""
    with tracer.start_as_current_span(
        name,
        context=parent,
        kind=kind,
        start_time=start_time_ns,
        attributes={STAGE_ATTRIBUTE: stage, **(attributes or {})},
    ) as span:
        try:
            yield span
        except Exception as err:
            # The SDK records the exception and the Error status; error.type is what SQL groups.
            span.set_attribute("error.type", type(err).__qualname__)
            raise


def record_wait(
    tracer: trace.Tracer,
    stage: str,
    start: datetime,
    *,
    parent: otel_context.Context | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> None:
    """Record time spent waiting between stages (for example in a queue) as its own span."""
    span = tracer.start_span(
        stage,
        context=parent,
        start_time=datetime_ns(start),
        attributes={STAGE_ATTRIBUTE: stage, **(attributes or {})},
    )
    span.end()
