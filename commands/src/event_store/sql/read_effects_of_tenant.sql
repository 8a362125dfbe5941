-- The effects of one event of one tenant (audit `effects`): the events
-- whose commands named it as their cause, their effects, … at most $3
-- steps forward, at most $4 events in all, in breadth-first order; $1
-- tenant, $2 event id. Each step uses events_causation (whose predicate the
-- join repeats); effects are later events, so there is no cycle.
WITH RECURSIVE effects (step, position, stream_id, stream_version, event_id, event_type,
                        schema_version, data, metadata, recorded_at) AS (
    SELECT 0, position, stream_id, stream_version, event_id, event_type, schema_version,
           data, metadata, recorded_at
    FROM events
    WHERE event_id = $2 AND tenant = $1
  UNION ALL
    SELECT f.step + 1, e.position, e.stream_id, e.stream_version, e.event_id, e.event_type,
           e.schema_version, e.data, e.metadata, e.recorded_at
    FROM effects f
    JOIN events e ON (e.metadata->>'causation_id')::uuid = f.event_id
                 AND e.metadata->>'causation_id' <> e.metadata->>'command_id'
                 AND e.tenant = $1
    WHERE f.step < $3
)
SELECT position, stream_id, stream_version, event_id, event_type, schema_version,
       data, metadata, recorded_at
FROM effects
-- No ORDER BY: a recursive query yields its rows step after step, and
-- with LIMIT alone PostgreSQL stops expanding once it has $4 of them.
LIMIT $4
