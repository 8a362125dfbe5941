-- Subscriptions catch up per tenant: a subscriber resuming after position p
-- reads its tenant's events after p (read_tenant.sql), which without this
-- index would scan every tenant's events after p.
CREATE INDEX events_tenant_position ON events (tenant, position);
