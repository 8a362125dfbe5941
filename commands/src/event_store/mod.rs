//! The PostgreSQL event store, split by operation: [`append`], [`read`]
//! and [`snapshot`]. SQL lives in `sql/*.sql`; tables in `migrations/`.

mod append;
mod group;
mod lease;
mod partition_index;
mod read;
mod snapshot;

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use crate::idempotency::event_id;
pub use append::MAX_EVENTS_PER_APPEND;
pub use group::{MAX_APPENDS as MAX_APPENDS_PER_GROUP, MOST_EVENTS_GROUPED};
pub use lease::FRESH as KEPT_CONNECTION_FRESH;
pub use partition_index::{in_partition, partition_index_name, row_partition, PartitionIndex};
pub use read::{Lag, LoadedStream, LogHead, StoredEvent, EXACT_LAG};

/// Statements slower than this are logged at warn, by name and duration
/// ([`note_duration`]); a process should turn sqlx's own statement log off
/// (it prints the whole SQL text, ~1.5 KB for an append, every time).
pub const SLOW_STATEMENT: Duration = Duration::from_secs(1);

/// Logs `statement` (a name) if it took [`SLOW_STATEMENT`] or longer.
pub(crate) fn note_duration(statement: &'static str, took: Duration) {
    if took >= SLOW_STATEMENT {
        tracing::warn!(
            statement,
            took_ms = took.as_millis() as u64,
            "slow PostgreSQL statement"
        );
    }
}

/// Group-commit tasks of [`EventStore::new`].
pub const DEFAULT_COMMITTERS: usize = 1;

/// The PostgreSQL channel on which appenders announce commits to relays in
/// other processes (relays in the same process use [`EventStore::commits`]).
pub const COMMIT_CHANNEL: &str = "neurectomy_events";

/// Handle to the event store. Cheap to clone; all clones share the pool and
/// the commit signal.
#[derive(Clone, Debug)]
pub struct EventStore {
    /// Connection pool; every operation is one short statement.
    pool: PgPool,
    /// Connections kept checked out between statements (one round trip
    /// per statement instead of three).
    leases: Arc<lease::Leases>,
    /// The group-commit tasks appends go through (see the `group`
    /// module); `None` outside a runtime or when turned off.
    committers: Option<Arc<group::Committers>>,
    /// Bumped after every successful append, so an in-process relay wakes at
    /// once instead of polling.
    commits: Arc<watch::Sender<u64>>,
}

impl EventStore {
    /// Wraps a pool (migrations must have run), with group commit by
    /// [`DEFAULT_COMMITTERS`] tasks (fewer on a small pool).
    pub fn new(pool: PgPool) -> Self {
        Self::with_committers(pool, DEFAULT_COMMITTERS)
    }

    /// Wraps a pool with `committers` group-commit tasks: at most that many
    /// appends are written at once, each write taking every append queued
    /// meanwhile. 0 writes each append alone, on its caller's task. At most
    /// the connections the store keeps (under half the pool) are used;
    /// outside a runtime there is no group commit.
    pub fn with_committers(pool: PgPool, committers: usize) -> Self {
        let (commits, _) = watch::channel(0);
        let leases = lease::Leases::for_pool(&pool);
        let committers =
            group::Committers::start(&leases, committers.min(leases.kept_max())).map(Arc::new);
        Self {
            leases,
            committers,
            pool,
            commits: Arc::new(commits),
        }
    }

    /// The underlying pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A receiver that changes after every append committed through this handle.
    pub fn commits(&self) -> watch::Receiver<u64> {
        self.commits.subscribe()
    }

    /// A connection for one statement (see the `lease` module).
    async fn lease(&self) -> Result<lease::Lease<'_>, sqlx::Error> {
        self.leases.take().await
    }

    /// Runs a query on a leased connection and returns its rows.
    async fn fetch_all<'q>(
        &self,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<Vec<sqlx::postgres::PgRow>, sqlx::Error> {
        let mut conn = self.lease().await?;
        let rows = query.fetch_all(&mut *conn).await;
        conn.settle(&rows);
        rows
    }

    fn signal_commit(&self) {
        self.commits.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Forwards this process's commit signal to PostgreSQL `NOTIFY` so relays
    /// in other processes wake at once. Notifications are coalesced: while one
    /// `NOTIFY` is in flight, further commits collapse into the next one, so
    /// the cost is bounded by round trips, not by commits. (`NOTIFY` is not
    /// issued inside append transactions because it serializes commits on a
    /// global lock.)
    pub fn spawn_commit_notifier(
        &self,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let mut commits = self.commits();
        let pool = self.pool.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    changed = commits.changed() => if changed.is_err() { return },
                }
                commits.borrow_and_update();
                if let Err(error) = sqlx::query("SELECT pg_notify($1, '')")
                    .bind(COMMIT_CHANNEL)
                    .execute(&pool)
                    .await
                {
                    tracing::warn!(%error, "could not notify relays of a commit; they will poll");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        })
    }
}
