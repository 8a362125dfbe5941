-- One append of TEN events to a fresh random stream in one statement and one
-- transaction, as commands/src/event_store/sql/append.sql does for a batch
-- (position = xid << 16 | index), each event as in insert.sql.
WITH args AS (
    SELECT 'task-' || gen_random_uuid() AS stream_id,
           gen_random_uuid()            AS command_id,
           gen_random_uuid()            AS task_id
),
current_version AS (
    SELECT coalesce(max(stream_version), 0) AS version
    FROM events
    WHERE stream_id = (SELECT stream_id FROM args)
),
batch AS (
    SELECT ord, gen_random_uuid() AS event_id
    FROM generate_series(1, 10) AS ord
)
INSERT INTO events (position, transaction_id, stream_id, stream_version, event_id, command_id,
                    correlation_id, tenant, event_type, schema_version, data, metadata)
SELECT (pg_current_xact_id()::text::bigint << 16) | (e.ord - 1),
       pg_current_xact_id(),
       a.stream_id,
       v.version + e.ord,
       e.event_id,
       a.command_id,
       a.command_id,
       'bench',
       'TaskProgressReported',
       1,
       jsonb_build_object(
           'task_id', a.task_id,
           'percent', (e.ord * 10) % 100,
           'note', 'step 42: generated three files and is running the unit tests of module orchestration::planner'),
       jsonb_build_object(
           'event_id', e.event_id,
           'command_id', a.command_id,
           'command_type', 'ReportTaskProgress',
           'command_hash', encode(sha256(convert_to(a.command_id::text, 'UTF8')), 'hex'),
           'correlation_id', a.command_id,
           'causation_id', a.command_id,
           'actor', 'bench',
           'tenant', 'bench',
           'occurred_at', now(),
           'traceparent', NULL)
FROM args a, current_version v, batch e
RETURNING position, stream_version, recorded_at;
