//! # Neurectomy read side
//!
//! Projector workers turn the event log into read models. Everything here is
//! derived from the PostgreSQL event store and can be rebuilt from it.
//!
//! ## Contracts
//!
//! - **Order.** A projection applies events strictly in global position
//!   order, in batches.
//! - **Exactly-once effects.** A read model stores its checkpoint (the last
//!   applied position) in the same atomic write as the changes of a batch;
//!   the runtime skips events at or below it, so at-least-once delivery
//!   (redelivery, restarts) changes nothing twice.
//! - **Never skip.** JetStream messages are consumed by stream sequence; a
//!   missing sequence (retention, a wiped consumer) or a new, empty read model
//!   sends the projection back to the event store (gap-safe reader) until it
//!   is caught up, then to JetStream again. An event that cannot be applied
//!   stops the projection at its position, with the reason in its status.
//! - **Transient failures** (a store down) are retried with capped backoff,
//!   without acknowledging anything.
//! - **One writer at a time.** A projector under a lease ([`lease`]) applies
//!   only while it holds it and writes every batch with the lease's fencing
//!   token, which the model checks in the batch's atomic write; the Redis
//!   model also refuses a batch planned on a checkpoint that moved since.
//!
//! ## Layout
//!
//! - [`model`]: the [`ReadModel`] contract and [`ApplyError`].
//! - [`runtime`]: the projector loop (catch-up, JetStream consumer, status).
//! - [`lease`]: the projectors' leases on PostgreSQL, with fencing tokens,
//!   so that any number of processes can run a projection.
//! - [`redis`]: the Redis read model and the table of its keys; the API's
//!   reads ([`redis::read`]), the change feed's reader ([`redis::feed`]) and
//!   the projectors' health reports ([`redis::health`]).
//! - [`graph`]: the graph read model (Bolt / Neo4j 5), its queries, its
//!   namespaces and their administration ([`graph::admin`]).
//! - [`replay`]: rebuilds a read model into a fresh namespace while the
//!   active one serves, then switches over.
//! - [`verify`]: re-derives state from the event store and diffs it against
//!   the Redis and graph read models.
//! - `testkit` and `graph_testkit` (feature `testkit`, for tests and
//!   benchmarks; not in the `neurectomy` binary): per-test Redis key
//!   prefixes and graph databases, and dumps of a whole Redis model for
//!   comparing two built apart.

pub mod graph;
#[cfg(feature = "testkit")]
pub mod graph_testkit;
pub mod lease;
pub mod model;
pub mod redis;
pub mod replay;
pub mod runtime;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod verify;

pub use graph::{GraphConfig, GraphModel, GraphQueryError};
pub use lease::{LeaseConfig, LeaseError, LeaseHolder, Leases};
pub use model::{ApplyError, Fence, Projected, ReadModel};
// `self::`: `redis` alone would also name the Redis client crate.
pub use self::redis::read::{Entity, Fields};
pub use self::redis::{RedisModel, RedisModelConfig};
pub use runtime::{Projector, ProjectorConfig, ProjectorError, ProjectorState, ProjectorStatus};
