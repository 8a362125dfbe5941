-- Reads one partition after position $1, at most $2 events, gap-safely
-- (as read_all.sql): the inner query takes the partition's events after $1
-- in position order up to the limit — a range scan of the partition's index
-- (events_partition_<k>_of_<P>, partition_index.rs), whose predicate
-- {in_partition} spells exactly, so PostgreSQL passes over no other
-- partition's rows; without the index it walks the primary key testing
-- each row. The partition key is the stored tenant_hash, or the tenant's
-- for rows older than that column (see the migrations). The outer filter
-- keeps those below the transaction horizon, always a prefix of the inner
-- rows, so the result is contiguous in the partition.
SELECT position, stream_id, stream_version, event_id, event_type, schema_version,
       data, metadata, recorded_at
FROM (
    SELECT position, transaction_id, stream_id, stream_version, event_id, event_type,
           schema_version, data, metadata, recorded_at
    FROM events
    WHERE {in_partition}
      AND position > $1
    ORDER BY position
    LIMIT $2
) AS next
WHERE next.transaction_id < pg_snapshot_xmin(pg_current_snapshot())
ORDER BY position
