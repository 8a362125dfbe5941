-- Reads partition $4 of $3 of the global log after position $1, at most $2
-- events, gap-safely (as read_all.sql): the inner query walks the primary
-- key from $1 keeping the partition's events (by the stored tenant_hash, or
-- the tenant's for rows older than that column; see the migrations) up to
-- the limit; the outer filter keeps those below the
-- transaction horizon, always a prefix of the inner rows, so the result is
-- contiguous in the partition. It reads about $3 rows per row returned.
SELECT position, stream_id, stream_version, event_id, event_type, schema_version,
       data, metadata, recorded_at
FROM (
    SELECT position, transaction_id, stream_id, stream_version, event_id, event_type,
           schema_version, data, metadata, recorded_at
    FROM events
    WHERE position > $1
      AND coalesce(tenant_hash, neurectomy_tenant_hash(tenant)) % $3 = $4
    ORDER BY position
    LIMIT $2
) AS next
WHERE next.transaction_id < pg_snapshot_xmin(pg_current_snapshot())
ORDER BY position
