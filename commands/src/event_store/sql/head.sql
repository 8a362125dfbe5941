-- Highest position written (committed or not yet safe to read) and the
-- highest position a gap-safe reader can see now.
SELECT coalesce(max(position), 0) AS written,
       coalesce((SELECT max(position) FROM events
                 WHERE position < (pg_snapshot_xmin(pg_current_snapshot())::text::bigint << 16)), 0) AS readable
FROM events
