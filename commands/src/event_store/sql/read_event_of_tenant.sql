-- One event of one tenant by its id (audit proofs): $1 tenant, $2 event id.
-- Another tenant's event reads as none. Uses events_event_id_unique.
SELECT position, stream_id, stream_version, event_id, event_type, schema_version,
       data, metadata, recorded_at
FROM events
WHERE event_id = $2 AND tenant = $1
