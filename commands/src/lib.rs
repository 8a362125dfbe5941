//! # Neurectomy write side
//!
//! Commands become events in PostgreSQL, and committed events are relayed, in
//! global order, to one NATS JetStream stream.
//!
//! ## Contracts
//!
//! - **Optimistic concurrency.** Every append names the version it expects;
//!   a mismatch is [`AppendError::Conflict`] and writes nothing. Streams never
//!   get a duplicate version or a gap.
//! - **Idempotency.** Event ids derive from the tenant and the command id
//!   (UUID v5), and so does the id of an aggregate a creation makes when the
//!   caller names none, so a command retried with the same id appends
//!   nothing and returns the first result; the same id with different
//!   content is [`CommandError::CommandIdReused`]. Command ids are scoped by
//!   tenant: another tenant's command of the same id is another command.
//! - **Bad input writes nothing and is the caller's error.** Data that
//!   PostgreSQL itself refuses is [`CommandError::Malformed`] (`VALIDATION`),
//!   never `UNAVAILABLE`: retrying it cannot succeed.
//! - **Gap-safe global order.** [`EventStore::read_all`] only returns events of
//!   transactions older than every transaction still running, so a reader
//!   that has seen position `p` never later finds an event below `p`.
//! - **Delivery is at-least-once, effects exactly-once.** The relay may publish
//!   an event twice (crash between publish and checkpoint); JetStream drops the
//!   duplicate by `Nats-Msg-Id` and `Nats-Expected-Last-Sequence` rejects
//!   anything out of order, so the JetStream stream mirrors the store.
//!
//! ## Layout
//!
//! - [`envelope`]: stored event shapes, metadata and expected versions.
//! - [`event_store`]: PostgreSQL append, reads, snapshots (SQL in `.sql` files).
//! - [`handler`]: load → decide → append with bounded retries.
//! - [`idempotency`]: the event and aggregate ids derived from a command.
//! - [`relay`]: the outbox relay to JetStream, with leadership and checkpoints.
//! - [`partition`]: the partitions of the log by tenant (subjects, headers).
//! - [`seal`]: canonical JSON and Merkle proofs for the sealed audit log.
//! - [`in_hand`]: the batch a worker holds (what a shutdown waits for).
//! - [`error`]: the error enums of each operation.
//! - [`trace`]: W3C `traceparent` helpers that link the spans of one change
//!   across tasks and processes.
//! - `testkit` (feature `testkit`, for tests and benchmarks; not in the
//!   `neurectomy` binary): per-test isolated databases and JetStream streams.

mod cache;
pub mod envelope;
pub mod erasure;
pub mod error;
pub mod event_store;
pub mod handler;
pub mod idempotency;
pub mod in_hand;
pub mod partition;
pub mod relay;
pub mod seal;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod trace;

pub use envelope::{CommandContext, EventMetadata, ExpectedVersion, NewEvent, RecordedEvent};
pub use error::{AppendError, CommandError, ReadError, RelayError};
pub use event_store::{EventStore, PartitionIndex};
pub use handler::{CommandHandler, CommandOutcome, HandlerConfig};
pub use in_hand::InHand;
pub use relay::{Relay, RelayConfig, RelayProgress};

/// Runs the embedded sqlx migrations (`migrations/` at the repository root).
pub async fn migrate(pool: &sqlx::PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    sqlx::migrate!("../migrations").run(pool).await
}
