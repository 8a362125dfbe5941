-- Reads the global log of tenant $1 after position $2, at most $3 events,
-- gap-safely, optionally only events whose type is in $4 (NULL: every type).
--
-- Gap safety as in read_all.sql: the inner query walks
-- events_tenant_position from $2 with the limit; the outer filter keeps the
-- rows of transactions older than the oldest one still running. Positions
-- order events by transaction id, so what the filter keeps is a prefix of the
-- inner rows: no event the filters select can later appear below the last
-- position returned.
SELECT position, stream_id, stream_version, event_id, event_type, schema_version,
       data, metadata, recorded_at
FROM (
    SELECT position, transaction_id, stream_id, stream_version, event_id, event_type,
           schema_version, data, metadata, recorded_at
    FROM events
    WHERE tenant = $1
      AND position > $2
      AND ($4::text[] IS NULL OR event_type = ANY ($4::text[]))
    ORDER BY position
    LIMIT $3
) AS next
WHERE next.transaction_id < pg_snapshot_xmin(pg_current_snapshot())
ORDER BY position
