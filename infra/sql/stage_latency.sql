-- Latency per pipeline stage, from spans that carry the slotforge.stage attribute.
-- {table} is replaced with the quoted table name. Duration is in nanoseconds.
-- Query parameters since_ns and until_ns (Int64 Unix nanoseconds) bound span starts to the
-- half-open range [since_ns, until_ns).
-- quantilesDeterministic is exact up to 8,192 spans per stage. Past that it interpolates
-- over a reservoir sample of 8,192 spans, chosen by a hash of SpanId, so the quantiles are
-- estimates that stay the same for the same stored spans.
SELECT
    SpanAttributes['slotforge.stage'] AS stage,
    count() AS span_count,
    quantilesDeterministic(0.5, 0.95, 0.99)(Duration / 1e6, cityHash64(SpanId)) AS latency_ms
FROM {table}
WHERE mapContains(SpanAttributes, 'slotforge.stage')
  AND Timestamp >= fromUnixTimestamp64Nano({since_ns:Int64})
  AND Timestamp < fromUnixTimestamp64Nano({until_ns:Int64})
GROUP BY stage
ORDER BY stage
