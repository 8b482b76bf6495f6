-- Queue wait of GPU attempts against how busy the worker was when it took the attempt.
-- {table} is replaced with the quoted table name. Query parameters:
--   since_ns  Int64   first span start to include, Unix nanoseconds
--   until_ns  Int64   span starts at or after this Unix nanosecond are left out
-- queue_wait spans run from dispatch until a GPU worker takes the attempt off its topic.
-- slotforge.pool.concurrency is the number of attempts the worker was running at that
-- moment, the taken one included; spans without it report concurrency 0.
SELECT
    SpanAttributes['slotforge.tier'] AS tier,
    toUInt32OrZero(SpanAttributes['slotforge.pool.concurrency']) AS concurrency,
    count() AS span_count,
    avg(Duration) / 1e6 AS mean_wait_ms,
    quantilesDeterministic(0.5, 0.95, 0.99)(Duration / 1e6, cityHash64(SpanId)) AS wait_ms
FROM {table}
WHERE SpanAttributes['slotforge.stage'] = 'queue_wait'
  AND Timestamp >= fromUnixTimestamp64Nano({since_ns:Int64})
  AND Timestamp < fromUnixTimestamp64Nano({until_ns:Int64})
GROUP BY tier, concurrency
ORDER BY tier, concurrency
