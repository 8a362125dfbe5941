-- The events of a stream after version $2 (to catch a cached state up), in
-- the column layout of load_stream.sql.
SELECT FALSE AS is_snapshot, stream_version, event_type, schema_version, data, tenant, position
FROM events
WHERE stream_id = $1 AND stream_version > $2
ORDER BY stream_version
