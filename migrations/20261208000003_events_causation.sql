-- Audit `effects`: the events caused by an event, found by the cause their
-- command named (`causationId`). Partial: only events whose command named a
-- cause are indexed (without one, `causation_id` is the command id), so an
-- append without a cause pays the predicate, not an index entry.
--
-- Plain CREATE INDEX, as the audit indexes (20261124000002_audit.sql): on a
-- large store create it CONCURRENTLY under this name before upgrading.
CREATE INDEX IF NOT EXISTS events_causation
    ON events (((metadata->>'causation_id')::uuid), position)
    WHERE metadata->>'causation_id' <> metadata->>'command_id';
