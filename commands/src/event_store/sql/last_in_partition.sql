-- The position of the last event of partition $3 of $2 at or below position
-- $1 (none: no row). Walks the primary key down from $1 to the first such
-- event: quick for a partition that has events near $1, a scan of
-- everything below for one that has none.
SELECT position
FROM events
WHERE position <= $1
  AND coalesce(tenant_hash, neurectomy_tenant_hash(tenant)) % $2 = $3
ORDER BY position DESC
LIMIT 1
