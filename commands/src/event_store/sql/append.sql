-- Appends a batch of events to one stream in one statement (one transaction).
-- $1 stream id, $2 required current version (NULL = any), $3 command id,
-- $4 correlation id, $5 tenant, $6..$10 parallel arrays of the events, $11
-- the tenant's hash (commands::partition::hash).
-- Inserts nothing when the stream is not at $2; two writers racing for the
-- same version collide on events_stream_version_unique.
WITH current_version AS (
    SELECT coalesce(max(stream_version), 0) AS version
    FROM events
    WHERE stream_id = $1
)
INSERT INTO events (position, transaction_id, stream_id, stream_version, event_id, command_id,
                    correlation_id, tenant, tenant_hash, event_type, schema_version, data, metadata)
SELECT (pg_current_xact_id()::text::bigint << 16) | (e.ord - 1),
       pg_current_xact_id(),
       $1,
       current_version.version + e.ord,
       e.event_id,
       $3,
       $4,
       $5,
       $11,
       e.event_type,
       e.schema_version,
       e.data,
       e.metadata
FROM current_version,
     UNNEST($6::uuid[], $7::text[], $8::int4[], $9::jsonb[], $10::jsonb[])
         WITH ORDINALITY AS e(event_id, event_type, schema_version, data, metadata, ord)
WHERE $2::bigint IS NULL OR current_version.version = $2::bigint
RETURNING position, stream_version, recorded_at
