-- The partition key of each event, stored with it: the first 32 bits of the
-- MD5 digest of its tenant, big-endian (commands::partition::hash). An
-- event's partition among P is tenant_hash % P. Reading one partition
-- (read_partition.sql) tests every row it walks past, P readers each
-- walking the whole log in a parallel rebuild: an integer modulo per row
-- instead of an MD5 digest and two casts (measured: PostgreSQL spent more
-- on the digests than on the rows).
--
-- Written by the appends, computed in Rust. Events written before this
-- migration have NULL and are read through neurectomy_tenant_hash(tenant),
-- so no row is rewritten here (adding a nullable column without a default
-- is instant on any size of table).
ALTER TABLE events ADD COLUMN IF NOT EXISTS tenant_hash bigint;

CREATE FUNCTION neurectomy_tenant_hash(tenant text)
RETURNS bigint
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
    SELECT ('x' || substr(md5(tenant), 1, 8))::bit(32)::bigint
$$;

CREATE OR REPLACE FUNCTION neurectomy_partition(tenant text, partitions integer)
RETURNS integer
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
    SELECT CASE WHEN partitions <= 1 THEN 0
                ELSE (neurectomy_tenant_hash(tenant) % partitions)::integer
           END
$$;
