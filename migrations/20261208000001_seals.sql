-- The sealed audit log (README, "Sealed audit log"): one row per seal, in
-- order, written by the relay leader's sealer after the events it covers
-- were read gap-safely. Nothing on the append path touches this table.
--
-- `body` is the signed canonical JSON, byte for byte (text, not jsonb:
-- jsonb would not keep the bytes); `tenants` and `leaves` are kept beside
-- it so that proofs and `audit verify` need not re-derive a block (the
-- signed root commits to both). A copy of every seal is published on a
-- JetStream stream of its own.
CREATE TABLE seals (
    log            text        NOT NULL,
    seq            bigint      NOT NULL CHECK (seq >= 0),
    first_position bigint      NOT NULL,
    last_position  bigint      NOT NULL CHECK (last_position >= first_position),
    body           text        NOT NULL,
    signature      bytea       NOT NULL,
    tenants        jsonb       NOT NULL,
    leaves         bytea       NOT NULL,
    PRIMARY KEY (log, seq)
);
-- The seal that holds a position (proofs).
CREATE INDEX seals_last_position ON seals (log, last_position);
