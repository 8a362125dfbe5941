//! The contract between the projector runtime and a read model.

use std::future::Future;

use commands::RecordedEvent;
use domain::DomainEvent;

/// An event as a projection sees it: the stored record and its decoded,
/// upcast domain event.
#[derive(Debug, Clone)]
pub struct Projected {
    /// The stored event (position, stream, metadata, raw payload).
    pub recorded: RecordedEvent,
    /// The decoded event.
    pub event: DomainEvent,
    /// W3C `traceparent` of this event's projection (the projector's span
    /// for it), when its trace is sampled: what a model writes for later
    /// stages (the Redis change feed) carries it, so they continue the
    /// trace. Set by the runtime; `None` elsewhere.
    pub traceparent: Option<String>,
}

impl Projected {
    /// An event to project, untraced.
    pub fn new(recorded: RecordedEvent, event: DomainEvent) -> Self {
        Self {
            recorded,
            event,
            traceparent: None,
        }
    }
}

/// Why a batch was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The read model's store failed or is unreachable; retrying may succeed.
    #[error("{store} is unavailable while {doing}")]
    Unavailable {
        /// Which store (`Redis`, `the graph`).
        store: &'static str,
        /// What was being done.
        doing: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The read model is not where the projector left it (it was wiped, or a
    /// replay switched it to another generation): the projector must re-read
    /// the checkpoint and catch up from there.
    #[error("the {store} read model moved: {reason}")]
    Moved {
        /// Which store.
        store: &'static str,
        /// What was found.
        reason: String,
    },
    /// A batch written under a newer lease is in the read model: this
    /// process's lease of the projection is over (it was paused or cut off
    /// past its expiry and another process took over). Nothing of the batch
    /// was written; the projector stands by.
    #[error("the {store} read model holds fencing token {newer}, newer than this projector's {token}: its lease is over")]
    Fenced {
        /// Which store.
        store: &'static str,
        /// The token the batch was written under.
        token: u64,
        /// The newer token found.
        newer: u64,
    },
    /// The event cannot be applied to the read model as it is (e.g. an
    /// update for an entity the model never saw). The projection stops.
    #[error("event at position {position} ({event_type}) cannot be applied: {reason}")]
    Rejected {
        /// The event's position.
        position: i64,
        /// Its type.
        event_type: String,
        /// Why.
        reason: String,
    },
}

/// A read model the runtime can drive.
pub trait ReadModel: Send + Sync + 'static {
    /// The projection's name (`redis`, `graph`); names its JetStream consumer.
    fn name(&self) -> &str;

    /// Most events the model takes in one atomic write while the projector
    /// catches up from the event store, if more than the projector's batch
    /// size suits it: a catch-up has a backlog rather than a latency to keep
    /// low, and a model whose writes have a fixed cost, or merge writes to
    /// the same keys, applies larger batches faster.
    fn catch_up_batch_size(&self) -> Option<usize> {
        None
    }

    /// The last position applied (0 when the model is empty).
    fn checkpoint(&self) -> impl Future<Output = Result<i64, ApplyError>> + Send;

    /// Applies `events` (positions strictly increasing, all above the
    /// checkpoint) and moves the checkpoint to the last one, atomically.
    fn apply(&self, events: &[Projected]) -> impl Future<Output = Result<(), ApplyError>> + Send;

    /// Like [`ReadModel::apply`], for a projector that believes the
    /// checkpoint is `after`: [`ApplyError::Moved`] when the stored
    /// checkpoint is not where the batch can follow it (behind `after`:
    /// applying would leave a gap).
    ///
    /// With a `fence` (the projector holds a lease, see [`crate::lease`]),
    /// the model checks it inside the same atomic write: a batch under a
    /// token below the highest the model has stored is refused with
    /// [`ApplyError::Fenced`] and writes nothing; otherwise the token is
    /// stored with the batch.
    fn apply_after(
        &self,
        after: i64,
        fence: Option<Fence>,
        events: &[Projected],
    ) -> impl Future<Output = Result<(), ApplyError>> + Send;
}

/// The fencing token of the lease a batch is applied under
/// ([`crate::lease`]): it grows every time the lease changes hands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fence(pub u64);

impl std::fmt::Display for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}
