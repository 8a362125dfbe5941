-- Indexes of the audit queries (GraphQL `eventLog`, `streamHistory`, `*At`).
--
-- Each index is paid on every append, so only these two:
-- - events_tenant_position: a tenant's slice of the global log, walked in
--   position order from a cursor (read_log_of_tenant.sql). Without it the
--   log of a small tenant is a scan of every tenant's events.
-- - events_correlation_position: one intent followed across aggregates, in
--   global order (read_log_of_correlation.sql). The tenant is checked on the
--   rows; correlation ids are UUIDs, so rows of other tenants are rare.
-- Stream history and time travel use events_stream_version_unique.
--
-- Plain CREATE INDEX: it blocks appends while it builds, which is brief on a
-- young store. On a large one, create both with CREATE INDEX CONCURRENTLY
-- (same names) before upgrading; IF NOT EXISTS then makes this a no-op.
CREATE INDEX IF NOT EXISTS events_tenant_position ON events (tenant, position);
CREATE INDEX IF NOT EXISTS events_correlation_position ON events (correlation_id, position);
