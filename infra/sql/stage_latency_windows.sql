-- Latency percentiles per time window, pipeline stage and job tier.
-- {table} is replaced with the quoted table name. Query parameters:
--   window_s  UInt32  window length in seconds; windows start at multiples of it since 1970
--   since_ns  Int64   first span start to include, Unix nanoseconds
--   until_ns  Int64   span starts at or after this Unix nanosecond are left out
-- Only some stages know the tier (the client's submit span does not), so a span without
-- slotforge.tier takes the tier of another span in its trace. The tier lookup reads the same
-- time range, so a job that straddles since_ns may show an empty tier for its first spans.
-- The join is on a 64-bit hash of TraceId, which took about a quarter less CPU than the
-- 32-digit text in bench/spans.py; two of 10^5 traces share a hash with odds near 3 in 10^10.
WITH trace_tiers AS (
    SELECT cityHash64(TraceId) AS trace_hash, any(SpanAttributes['slotforge.tier']) AS trace_tier
    FROM {table}
    WHERE SpanAttributes['slotforge.tier'] != ''
      AND Timestamp >= fromUnixTimestamp64Nano({since_ns:Int64})
      AND Timestamp < fromUnixTimestamp64Nano({until_ns:Int64})
    GROUP BY trace_hash
)
SELECT
    toStartOfInterval(toDateTime(spans.Timestamp, 'UTC'), INTERVAL {window_s:UInt32} SECOND)
        AS window_start,
    spans.SpanAttributes['slotforge.stage'] AS stage,
    if(spans.SpanAttributes['slotforge.tier'] != '',
       spans.SpanAttributes['slotforge.tier'],
       trace_tiers.trace_tier) AS tier,
    count() AS span_count,
    quantilesDeterministic(0.5, 0.95, 0.99)(spans.Duration / 1e6, cityHash64(spans.SpanId))
        AS latency_ms
FROM {table} AS spans
LEFT JOIN trace_tiers ON cityHash64(spans.TraceId) = trace_tiers.trace_hash
WHERE mapContains(spans.SpanAttributes, 'slotforge.stage')
  AND spans.Timestamp >= fromUnixTimestamp64Nano({since_ns:Int64})
  AND spans.Timestamp < fromUnixTimestamp64Nano({until_ns:Int64})
GROUP BY window_start, stage, tier
ORDER BY window_start, stage, tier
