-- GPU seconds spent per attempt outcome and tier: how much GPU time produced accepted
-- results and how much went to rejected, cancelled, timed-out or failed attempts.
-- {table} is replaced with the quoted table name. Query parameters:
--   since_ns  Int64   first span start to include, Unix nanoseconds
--   until_ns  Int64   span starts at or after this Unix nanosecond are left out
-- Spans are grouped by slotforge.attempt.id first, so an attempt counts once even when the
-- span sink stored one of its spans twice (delivery is at least once). The attempt's GPU
-- time is the largest slotforge.gpu_s among its spans. Several spans of one attempt may
-- carry slotforge.attempt.outcome, for example "rejected" when scored and "fallback" when
-- the job ends; the latest in this order wins:
-- failed < cancelled < timed_out < rejected < accepted < fallback.
-- An attempt with no outcome attribute is reported as "unknown".
WITH attempts AS (
    SELECT
        SpanAttributes['slotforge.attempt.id'] AS attempt_id,
        max(toFloat64OrZero(SpanAttributes['slotforge.gpu_s'])) AS gpu_s,
        argMax(
            SpanAttributes['slotforge.attempt.outcome'],
            indexOf(['failed', 'cancelled', 'timed_out', 'rejected', 'accepted', 'fallback'],
                    SpanAttributes['slotforge.attempt.outcome'])
        ) AS final_outcome,
        anyIf(SpanAttributes['slotforge.tier'], SpanAttributes['slotforge.tier'] != '') AS tier
    FROM {table}
    WHERE SpanAttributes['slotforge.attempt.id'] != ''
      AND Timestamp >= fromUnixTimestamp64Nano({since_ns:Int64})
      AND Timestamp < fromUnixTimestamp64Nano({until_ns:Int64})
    GROUP BY attempt_id
)
SELECT
    if(final_outcome = '', 'unknown', final_outcome) AS outcome,
    tier,
    count() AS attempts,
    sum(gpu_s) AS gpu_seconds
FROM attempts
GROUP BY outcome, tier
ORDER BY gpu_seconds DESC, outcome, tier
