-- The events of tenant $1 after position $2 up to position $3 (inclusive),
-- of the types in $5 (every type when $5 is NULL), at most $4, in position
-- order, gap-safely: only positions below the horizon of finished
-- transactions (pg_snapshot_xmin of this statement's snapshot, shifted as
-- positions are) are returned. Every row below that horizon is final, so
-- nothing can later appear below the last position returned: a reader that
-- continues after it misses nothing. Uses events_tenant_position.
SELECT position, stream_id, stream_version, event_id, event_type, schema_version,
       data, metadata, recorded_at
FROM events
WHERE tenant = $1
  AND position > $2
  AND position <= $3
  AND position < (pg_snapshot_xmin(pg_current_snapshot())::text::bigint << 16)
  AND ($5::text[] IS NULL OR event_type = ANY($5))
ORDER BY position
LIMIT $4
