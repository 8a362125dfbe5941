-- The position of the last event of one partition at or below position $1
-- (none: no row). With the partition's index (see read_partition.sql) one
-- descent of it; without, a walk of the primary key down from $1 to the
-- first such event.
SELECT position
FROM events
WHERE {in_partition}
  AND position <= $1
ORDER BY position DESC
LIMIT 1
