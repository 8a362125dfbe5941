-- Reads a stream forward: versions in [$2, $3], at most $4 events.
SELECT position, stream_id, stream_version, event_id, event_type, schema_version,
       data, metadata, recorded_at
FROM events
WHERE stream_id = $1 AND stream_version >= $2 AND stream_version <= $3
ORDER BY stream_version
LIMIT $4
