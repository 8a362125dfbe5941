-- Reads the global log after position $1, at most $2 events, gap-safely:
-- only events of transactions older than the oldest still-running transaction
-- are returned. Such transactions have all finished, so nothing can later
-- appear below the last position returned. The second bound is the same
-- condition expressed on the primary key so that the scan is an index range.
SELECT position, stream_id, stream_version, event_id, event_type, schema_version,
       data, metadata, recorded_at
FROM events
WHERE position > $1
  AND transaction_id < pg_snapshot_xmin(pg_current_snapshot())
  AND position < (pg_snapshot_xmin(pg_current_snapshot())::text::bigint << 16)
ORDER BY position
LIMIT $2
