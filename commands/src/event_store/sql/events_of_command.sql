-- Every event a command of a tenant produced (idempotency look-up). A
-- command's events are consecutive in one stream and its first event's id is
-- derived from the tenant and the command id ($1; $4 is the id before the
-- tenant was part of it, for commands stored then), so this is two index
-- look-ups instead of an index on command_id that every append would pay
-- for. $2 = the command id, $3 = the tenant: another tenant's command of the
-- same id is never found.
WITH first AS (
    SELECT stream_id, stream_version FROM events
    WHERE event_id IN ($1, $4) AND tenant = $3
    ORDER BY position
    LIMIT 1
)
SELECT e.position, e.stream_id, e.stream_version, e.event_id, e.event_type, e.schema_version,
       e.data, e.metadata, e.recorded_at
FROM events e, first
WHERE e.stream_id = first.stream_id
  AND e.stream_version >= first.stream_version
  AND e.stream_version < first.stream_version + 65536
  AND e.command_id = $2
  AND e.tenant = $3
ORDER BY e.stream_version
