-- The slowest jobs and the critical path of each: which stage the job waited on, and for
-- how long. {table} is replaced with the quoted table name. Query parameters:
--   top       UInt32  number of jobs, slowest first
--   since_ns  Int64   first job start to include, Unix nanoseconds
--   until_ns  Int64   job starts at or after this Unix nanosecond are left out
-- A job is the span with slotforge.stage = 'job' (request to completion) and the other
-- stage spans of its trace. The critical path walks back from the job's end. At each point
-- it takes the span that started before that point and ended last. A span still running
-- there counts as ending there, and a tie goes to the span that started first. The walk
-- charges that span's time to its stage and the gap after it to "untraced", then continues
-- from the span's start. Parallel attempts that finished earlier thus fall off the path,
-- while a failed attempt that delayed its retry stays on it. "untraced" is time in no span,
-- such as Kafka transit and coordinator work between spans.
WITH
slow_jobs AS (
    SELECT
        TraceId,
        any(SpanAttributes['slotforge.job.id']) AS job_id,
        any(SpanAttributes['slotforge.tier']) AS tier,
        any(SpanAttributes['slotforge.job.status']) AS status,
        toInt64(min(toUnixTimestamp64Nano(Timestamp))) AS job_start,
        toInt64(max(toUnixTimestamp64Nano(Timestamp) + Duration)) AS job_end
    FROM {table}
    WHERE SpanAttributes['slotforge.stage'] = 'job'
      AND Timestamp >= fromUnixTimestamp64Nano({since_ns:Int64})
      AND Timestamp < fromUnixTimestamp64Nano({until_ns:Int64})
    GROUP BY TraceId
    ORDER BY job_end - job_start DESC, TraceId
    LIMIT {top:UInt32}
),
stage_spans AS (
    SELECT
        TraceId,
        toInt64(toUnixTimestamp64Nano(Timestamp)) AS start_ns,
        start_ns + toInt64(Duration) AS end_ns,
        SpanAttributes['slotforge.stage'] AS stage
    FROM {table}
    WHERE TraceId IN (SELECT TraceId FROM slow_jobs)
      AND SpanAttributes['slotforge.stage'] NOT IN ('', 'job')
),
job_spans AS (
    SELECT
        slow_jobs.TraceId AS trace_id,
        job_id,
        tier,
        status,
        job_start,
        job_end,
        -- Only spans that overlap the job's own interval can be on its critical path.
        groupArrayIf(
            (stage_spans.start_ns, stage_spans.end_ns, stage_spans.stage),
            stage_spans.end_ns > job_start AND stage_spans.start_ns < job_end
        ) AS spans
    FROM slow_jobs
    LEFT JOIN stage_spans ON stage_spans.TraceId = slow_jobs.TraceId
    GROUP BY trace_id, job_id, tier, status, job_start, job_end
),
walks AS (
    SELECT
        trace_id,
        job_id,
        tier,
        status,
        job_start,
        job_end,
        -- The walk state is (cursor_ns, stages, nanoseconds). Each step consumes at most one
        -- span, so length(spans) steps always reach job_start or run out of spans.
        arrayFold(
            (walk, step) -> if(
                walk.1 <= job_start,
                walk,
                -- arrayMap over a one-element array binds the chosen span to a name.
                arrayMap(
                    best -> if(
                        best.2 > job_start,
                        (
                            greatest(best.1, job_start),
                            arrayConcat(walk.2, ['untraced', best.3]),
                            arrayConcat(walk.3, [
                                walk.1 - least(best.2, walk.1),
                                least(best.2, walk.1) - greatest(best.1, job_start)
                            ])
                        ),
                        -- No span left before the cursor: the rest is untraced.
                        (job_start, arrayPushBack(walk.2, 'untraced'),
                         arrayPushBack(walk.3, walk.1 - job_start))
                    ),
                    [arrayFirst(
                        span -> span.1 < walk.1 AND span.2 > job_start,
                        arraySort(span -> (-least(span.2, walk.1), span.1), spans)
                    )]
                )[1]
            ),
            range(length(spans)),
            (job_end, CAST([], 'Array(String)'), CAST([], 'Array(Int64)'))
        ) AS walk
    FROM job_spans
),
path_parts AS (
    SELECT
        trace_id,
        job_id,
        tier,
        status,
        (job_end - job_start) / 1e6 AS duration_ms,
        -- Time the walk did not reach because it ran out of steps is untraced too.
        arrayPushBack(walk.2, 'untraced') AS part_stages,
        arrayPushBack(walk.3, walk.1 - job_start) AS part_ns
    FROM walks
),
paths AS (
    SELECT
        trace_id,
        job_id,
        tier,
        status,
        duration_ms,
        sumMap(map(part_stage, part_ns / 1e6)) AS critical_path_ms
    FROM path_parts
    ARRAY JOIN part_stages AS part_stage, part_ns
    WHERE part_ns > 0
    GROUP BY trace_id, job_id, tier, status, duration_ms
)
SELECT
    job_id,
    trace_id,
    tier,
    status,
    duration_ms,
    arraySort((stage, ms) -> -ms, mapKeys(critical_path_ms), mapValues(critical_path_ms))[1]
        AS dominant_stage,
    arrayMax(mapValues(critical_path_ms)) AS dominant_ms,
    critical_path_ms
FROM paths
ORDER BY duration_ms DESC, trace_id
