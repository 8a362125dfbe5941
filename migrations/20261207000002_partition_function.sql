-- The partition of a tenant's events (commands::partition::of): the first
-- 32 bits of the MD5 digest of the tenant, big-endian, modulo the number
-- of partitions. Used to read the log one partition at a time
-- (read_partition.sql); Rust computes the same value (a test checks that
-- both agree).
CREATE FUNCTION neurectomy_partition(tenant text, partitions integer)
RETURNS integer
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
    SELECT CASE WHEN partitions <= 1 THEN 0
                ELSE (('x' || substr(md5(tenant), 1, 8))::bit(32)::bigint % partitions)::integer
           END
$$;
