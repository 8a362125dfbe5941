-- Erasure of personal data (README, "Erasure").
--
-- An erasure replaces personal values of stored events by their digests
-- (the values the sealed log commits to, so every seal stays valid) and
-- records, in the same transaction, the audited event `PersonalDataErased`
-- (stream `erasure-<id>`), one row here, and one tombstone per event it
-- changed. `audit verify` hashes a tombstoned field's stored value as the
-- digest it is, and flags a tombstone that no erasure event accounts for.
CREATE TABLE erasures (
    event_id   uuid        PRIMARY KEY,          -- the PersonalDataErased event
    tenant     text        NOT NULL,
    position   bigint      NOT NULL,             -- of that event
    erased_at  timestamptz NOT NULL DEFAULT now(),
    -- When the relay leader deleted the erased events' messages from the
    -- JetStream log (NULL: still to do).
    purged_at  timestamptz
);
CREATE INDEX erasures_unpurged ON erasures (position) WHERE purged_at IS NULL;

CREATE TABLE tombstones (
    position   bigint      NOT NULL,             -- of the erased event
    erasure    uuid        NOT NULL,             -- erasures.event_id
    event_id   uuid        NOT NULL,
    tenant     text        NOT NULL,
    stream_id  text        NOT NULL,
    fields     text[]      NOT NULL,             -- erased by this erasure, sorted
    erased_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (position, erasure)
);
CREATE INDEX tombstones_erasure ON tombstones (erasure);
-- Snapshots of a stream erased a moment ago are not saved (save_snapshot.sql).
CREATE INDEX tombstones_stream ON tombstones (stream_id, erased_at);
