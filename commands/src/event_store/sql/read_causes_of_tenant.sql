-- The chain of causes of one event of one tenant (audit `why`): the event
-- ($2), the event its command names as its cause (`causation_id` in its
-- metadata, when the command named one: else it is the command id), that
-- event's cause, … at most $3 steps back; $1 tenant. Each step is a look-up
-- by event id (events_event_id_unique); a cause is always an earlier event
-- of the same tenant (the handler checks it), so the chain has no cycle.
WITH RECURSIVE chain (step, position, stream_id, stream_version, event_id, event_type,
                      schema_version, data, metadata, recorded_at) AS (
    SELECT 0, position, stream_id, stream_version, event_id, event_type, schema_version,
           data, metadata, recorded_at
    FROM events
    WHERE event_id = $2 AND tenant = $1
  UNION ALL
    SELECT c.step + 1, e.position, e.stream_id, e.stream_version, e.event_id, e.event_type,
           e.schema_version, e.data, e.metadata, e.recorded_at
    FROM chain c
    JOIN events e ON e.event_id = (c.metadata->>'causation_id')::uuid AND e.tenant = $1
    WHERE c.step < $3 AND c.metadata->>'causation_id' <> c.metadata->>'command_id'
)
SELECT position, stream_id, stream_version, event_id, event_type, schema_version,
       data, metadata, recorded_at
FROM chain
ORDER BY step
