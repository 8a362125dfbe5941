-- Loads what the command handler needs to rebuild a stream's state: the
-- snapshot (if one exists for this snapshot version) and the events after it.
-- The snapshot row comes first (its version is below every event's).
-- $1 stream id, $2 snapshot version of the running code.
WITH snap AS (
    SELECT stream_version, state, tenant
    FROM snapshots
    WHERE stream_id = $1 AND snapshot_version = $2
)
SELECT TRUE AS is_snapshot, snap.stream_version, NULL::text AS event_type,
       NULL::int4 AS schema_version, snap.state AS data, snap.tenant, NULL::bigint AS position
FROM snap
UNION ALL
SELECT FALSE, e.stream_version, e.event_type, e.schema_version, e.data, e.tenant, e.position
FROM events e
WHERE e.stream_id = $1
  AND e.stream_version > coalesce((SELECT stream_version FROM snap), 0)
ORDER BY 2
