-- Leases of the projectors (projections::lease). Any number of
-- `neurectomy project` processes may run a projection; the one holding the
-- lease of a partition applies it, the others stand by and take the lease
-- over once it expires (a killed process) or is released (a clean stop).
--
-- `token` is the fencing token: it grows by one whenever the lease changes
-- hands, and the read model refuses a batch written with a token below the
-- highest one it has seen (checked inside the batch's atomic write), so a
-- process paused past its lease cannot apply a batch after another took
-- over. Expiry is judged by this server's clock only (`clock_timestamp()`),
-- never by the projectors' clocks.
--
-- `projection` names the lease: `<JetStream stream>/<projection>`, so that
-- deployments sharing a database with different streams do not share leases.
CREATE TABLE projection_leases (
    projection  text        NOT NULL,
    partition   integer     NOT NULL CHECK (partition >= 0),
    owner       text        NOT NULL,
    token       bigint      NOT NULL CHECK (token > 0),
    expires_at  timestamptz NOT NULL,
    acquired_at timestamptz NOT NULL,
    PRIMARY KEY (projection, partition)
);
