-- Every span of one trace in start order, for a waterfall chart. Of spans that start
-- together, the longest comes first. {table} is replaced with the quoted table name.
-- Query parameter:
--   trace_id  String  32 lower-case hex digits, as stored in TraceId
-- Duplicate rows of one span (the span sink delivers at least once) are merged by SpanId.
SELECT
    SpanId,
    any(ParentSpanId) AS parent_span_id,
    any(SpanName) AS span_name,
    any(SpanAttributes['slotforge.stage']) AS stage,
    any(ServiceName) AS service,
    any(SpanAttributes['slotforge.attempt.id']) AS attempt_id,
    any(SpanAttributes['slotforge.worker.id']) AS worker,
    any(StatusCode) AS status,
    min(toUnixTimestamp64Nano(Timestamp)) AS start_ns,
    any(Duration) AS duration_ns
FROM {table}
WHERE TraceId = {trace_id:String}
GROUP BY SpanId
ORDER BY start_ns, duration_ns DESC, span_name
