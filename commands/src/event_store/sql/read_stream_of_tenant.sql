-- Reads a stream of one tenant forward (audit): versions in [$3, $4], at most
-- $5 events. $1 tenant, $2 stream id. Another tenant's stream reads as empty.
-- Uses events_stream_version_unique; the tenant is a filter on its rows.
SELECT position, stream_id, stream_version, event_id, event_type, schema_version,
       data, metadata, recorded_at
FROM events
WHERE stream_id = $2 AND tenant = $1 AND stream_version >= $3 AND stream_version <= $4
ORDER BY stream_version
LIMIT $5
