-- Appends the events of several appends, each to a different stream, in one
-- statement (one transaction): group commit.
-- $1..$5 one element per append: stream id, required current version (NULL =
-- any), command id, correlation id, tenant; and $13 the tenant's hash
-- (commands::partition::hash).
-- $6..$12 one element per event, the events of the first append first: the
-- append's index in $1 (1-based), the event's index in its append (1-based),
-- then the event as in append.sql.
-- An append whose stream is not at its required version inserts nothing; the
-- others go ahead. The low 16 bits of a returned position are the event's
-- index in $6 (0-based), which names its append. Two writers racing for the
-- same version collide on events_stream_version_unique, which fails the
-- whole statement: the caller then appends one by one.
WITH appends AS (
    SELECT a.n,
           a.stream_id,
           a.required,
           a.command_id,
           a.correlation_id,
           a.tenant,
           a.tenant_hash,
           coalesce((SELECT max(stream_version) FROM events WHERE events.stream_id = a.stream_id), 0)
               AS version
    FROM UNNEST($1::text[], $2::int8[], $3::uuid[], $4::uuid[], $5::text[], $13::int8[])
             WITH ORDINALITY AS a(stream_id, required, command_id, correlation_id, tenant, tenant_hash, n)
)
INSERT INTO events (position, transaction_id, stream_id, stream_version, event_id, command_id,
                    correlation_id, tenant, tenant_hash, event_type, schema_version, data, metadata)
SELECT (pg_current_xact_id()::text::bigint << 16) | (e.ord - 1),
       pg_current_xact_id(),
       a.stream_id,
       a.version + e.k,
       e.event_id,
       a.command_id,
       a.correlation_id,
       a.tenant,
       a.tenant_hash,
       e.event_type,
       e.schema_version,
       e.data,
       e.metadata
FROM UNNEST($6::int4[], $7::int4[], $8::uuid[], $9::text[], $10::int4[], $11::jsonb[], $12::jsonb[])
         WITH ORDINALITY AS e(append, k, event_id, event_type, schema_version, data, metadata, ord)
JOIN appends a ON a.n = e.append
WHERE a.required IS NULL OR a.version = a.required
RETURNING position, stream_version, recorded_at
