-- The events at the positions in $1 (a list), in position order; positions
-- not in the log are left out. Walks the primary key.
SELECT position, stream_id, stream_version, event_id, event_type, schema_version,
       data, metadata, recorded_at
FROM events
WHERE position = ANY($1)
ORDER BY position
