-- One command's append of ONE event, as commands/src/event_store/sql/append.sql
-- does it (version look-up + INSERT in one statement, one transaction), to a
-- fresh random stream (so stream_version = 1): ~170 bytes of data and
-- ~450 bytes of metadata, as `neurectomy-bench append` writes.
\set percent random(0, 100)
WITH args AS (
    SELECT 'task-' || gen_random_uuid() AS stream_id,
           gen_random_uuid()            AS command_id,
           gen_random_uuid()            AS event_id,
           gen_random_uuid()            AS task_id
),
current_version AS (
    SELECT coalesce(max(stream_version), 0) AS version
    FROM events
    WHERE stream_id = (SELECT stream_id FROM args)
)
INSERT INTO events (position, transaction_id, stream_id, stream_version, event_id, command_id,
                    correlation_id, tenant, event_type, schema_version, data, metadata)
SELECT pg_current_xact_id()::text::bigint << 16,
       pg_current_xact_id(),
       a.stream_id,
       v.version + 1,
       a.event_id,
       a.command_id,
       a.command_id,
       'bench',
       'TaskProgressReported',
       1,
       jsonb_build_object(
           'task_id', a.task_id,
           'percent', :percent::int,
           'note', 'step 42: generated three files and is running the unit tests of module orchestration::planner'),
       jsonb_build_object(
           'event_id', a.event_id,
           'command_id', a.command_id,
           'command_type', 'ReportTaskProgress',
           'command_hash', encode(sha256(convert_to(a.command_id::text, 'UTF8')), 'hex'),
           'correlation_id', a.command_id,
           'causation_id', a.command_id,
           'actor', 'bench',
           'tenant', 'bench',
           'occurred_at', now(),
           'traceparent', NULL)
FROM args a, current_version v
RETURNING position, stream_version, recorded_at;
