-- Every event a command produced (idempotency look-up).
SELECT position, stream_id, stream_version, event_id, event_type, schema_version,
       data, metadata, recorded_at
FROM events
WHERE command_id = $1
ORDER BY position
