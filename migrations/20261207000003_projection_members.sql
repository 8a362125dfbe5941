-- The processes running a projection (projections::lease): each keeps its
-- row alive while it runs, and each takes at most its fair share of the
-- partitions, ceil(partitions / live members), handing extras over when
-- another process joins. Expiry by this server's clock, as the leases'.
CREATE TABLE projection_members (
    projection text        NOT NULL,
    owner      text        NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (projection, owner)
);
