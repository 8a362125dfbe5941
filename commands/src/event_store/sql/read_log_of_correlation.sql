-- Reads the events of correlation id $5 in tenant $1 after position $2, at
-- most $3 events, gap-safely, optionally only types in $4 (NULL: every type):
-- one intent followed across aggregates, in global order.
--
-- A statement of its own (not an optional filter of read_log_of_tenant.sql)
-- so that its plan always walks events_correlation_position. Gap safety as in
-- read_all.sql: the horizon filter keeps a prefix of the inner rows.
SELECT position, stream_id, stream_version, event_id, event_type, schema_version,
       data, metadata, recorded_at
FROM (
    SELECT position, transaction_id, stream_id, stream_version, event_id, event_type,
           schema_version, data, metadata, recorded_at
    FROM events
    WHERE correlation_id = $5
      AND position > $2
      AND tenant = $1
      AND ($4::text[] IS NULL OR event_type = ANY ($4::text[]))
    ORDER BY position
    LIMIT $3
) AS next
WHERE next.transaction_id < pg_snapshot_xmin(pg_current_snapshot())
ORDER BY position
