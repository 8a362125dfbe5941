-- Neurectomy event store. PostgreSQL is the only source of truth; everything
-- else (JetStream, Redis, the graph) is derived from this table.
--
-- Global order. `position` is (transaction id << 16) | index-in-append, where
-- the transaction id is `pg_current_xact_id()` of the appending transaction.
-- Transaction ids are handed out in increasing order and a reader only reads
-- rows whose transaction is older than `pg_snapshot_xmin(pg_current_snapshot())`
-- (every such transaction has committed or aborted), so once a reader has seen
-- position p no row with a position below p can ever become visible: the
-- global log is read gap-safely with a single monotonic number as checkpoint.
-- One append is one transaction and at most 65,536 events.
CREATE TABLE events (
    position        bigint      PRIMARY KEY,
    transaction_id  xid8        NOT NULL,
    stream_id       text        NOT NULL,
    stream_version  bigint      NOT NULL CHECK (stream_version > 0),
    event_id        uuid        NOT NULL,
    command_id      uuid        NOT NULL,
    correlation_id  uuid        NOT NULL,
    tenant          text        NOT NULL,
    event_type      text        NOT NULL,
    schema_version  integer     NOT NULL CHECK (schema_version > 0),
    data            jsonb       NOT NULL,
    metadata        jsonb       NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT events_event_id_unique UNIQUE (event_id),
    CONSTRAINT events_stream_version_unique UNIQUE (stream_id, stream_version),
    CONSTRAINT events_position_matches_transaction
        CHECK (position >> 16 = transaction_id::text::bigint)
);

-- Deliberately no further indexes: every index is paid on every append.
-- Idempotency look-ups find a command's events through the deterministic id
-- of its first event (events_event_id_unique), and stream reads use
-- events_stream_version_unique. Audit indexes (correlation id, tenant) come
-- with the queries that need them, in later migrations.

-- Latest snapshot per stream; an optimisation only (state is always
-- re-derivable from events). Snapshots of another `snapshot_version` than the
-- running code's are ignored.
CREATE TABLE snapshots (
    stream_id        text        PRIMARY KEY,
    stream_version   bigint      NOT NULL,
    snapshot_version integer     NOT NULL,
    tenant           text        NOT NULL,
    state            jsonb       NOT NULL,
    taken_at         timestamptz NOT NULL DEFAULT now()
);

-- What each outbox relay has published: the last global position and the
-- JetStream sequence it got. Keyed by the JetStream stream name.
CREATE TABLE relay_checkpoints (
    relay              text        PRIMARY KEY,
    position           bigint      NOT NULL,
    jetstream_sequence bigint      NOT NULL,
    updated_at         timestamptz NOT NULL DEFAULT now()
);
