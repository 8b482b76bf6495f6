-- Failed spans grouped by pipeline stage, error type and worker, most frequent first.
-- {table} is replaced with the quoted table name. Query parameters:
--   top       UInt32  maximum number of groups returned
--   since_ns  Int64   first span start to include, Unix nanoseconds
--   until_ns  Int64   span starts at or after this Unix nanosecond are left out
-- A span counts as failed when its status is Error or it carries error.type. A failure
-- without error.type is grouped as "_OTHER", the OpenTelemetry fallback value. The worker is
-- slotforge.worker.id, or the service name for spans of processes that are not GPU workers.
SELECT
    SpanAttributes['slotforge.stage'] AS stage,
    if(SpanAttributes['error.type'] != '', SpanAttributes['error.type'], '_OTHER') AS error_type,
    if(SpanAttributes['slotforge.worker.id'] != '',
       SpanAttributes['slotforge.worker.id'],
       ServiceName) AS worker,
    count() AS failures,
    uniqExact(TraceId) AS traces,
    toDateTime64(min(Timestamp), 3, 'UTC') AS first_seen,
    toDateTime64(max(Timestamp), 3, 'UTC') AS last_seen,
    argMax(StatusMessage, Timestamp) AS last_message
FROM {table}
WHERE (StatusCode = 'Error' OR SpanAttributes['error.type'] != '')
  AND Timestamp >= fromUnixTimestamp64Nano({since_ns:Int64})
  AND Timestamp < fromUnixTimestamp64Nano({until_ns:Int64})
GROUP BY stage, error_type, worker
ORDER BY failures DESC, stage, error_type, worker
LIMIT {top:UInt32}
