-- Reads the global log after position $1, at most $2 events, gap-safely:
-- only events of transactions older than the oldest still-running transaction
-- (pg_snapshot_xmin of this statement's snapshot) are returned. Such
-- transactions have all finished, so nothing can later appear below the last
-- position returned.
--
-- The inner query walks the primary key from $1 with the limit (whatever the
-- planner's statistics say); the outer filter then keeps the events below the
-- horizon. Positions order events by transaction id, so what the filter keeps
-- is always a prefix of the inner rows: the result is contiguous in the log.
SELECT position, stream_id, stream_version, event_id, event_type, schema_version,
       data, metadata, recorded_at
FROM (
    SELECT position, transaction_id, stream_id, stream_version, event_id, event_type,
           schema_version, data, metadata, recorded_at
    FROM events
    WHERE position > $1
    ORDER BY position
    LIMIT $2
) AS next
WHERE next.transaction_id < pg_snapshot_xmin(pg_current_snapshot())
ORDER BY position
