//! Leases of the projectors, on PostgreSQL (table `projection_leases`).
//!
//! Any number of `neurectomy project` processes may run one projection. The
//! process holding the lease of a partition applies it; the others stand by,
//! asking for the lease every [`Leases::standby_poll`], and take it once it
//! has expired (its holder was killed or cut off) or was released (its
//! holder stopped cleanly: taken over at the next poll).
//!
//! - **Expiry** is judged by PostgreSQL's clock alone: a lease is taken with
//!   `expires_at = clock_timestamp() + ttl` and renewed every third of the
//!   ttl. The holder keeps applying only while its last renewal *sent* less
//!   than a ttl ago was confirmed, so it stops before the server could see
//!   its lease expire, whatever the two clocks say.
//! - **Fencing.** Every change of hands raises the lease's token by one. The
//!   projector writes each batch with its token, and the read model checks
//!   it inside the batch's atomic write ([`crate::ReadModel::apply_after`]):
//!   a holder paused past its expiry (a stopped process, a long GC-like
//!   stall, a partition from PostgreSQL) that wakes up and writes is refused,
//!   because its successor's token is in the read model already.
//! - **Partitions.** A lease is of one partition of a projection; a
//!   projection not split into partitions has partition 0.
//! - **Fair shares.** Every process running a projection keeps a member
//!   row alive ([`Leases::keep_membership`], table `projection_members`)
//!   and takes at most ceil(partitions / live members) leases; a holder of
//!   more hands its highest partitions over (stops, releases them) when
//!   another process joins, and a process whose members died takes their
//!   partitions once their leases expire. Without membership a process
//!   counts itself alone and may take every partition.
//!
//! Every call is bounded by a timeout: a lease that cannot be renewed in
//! time is treated as lost.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::PgPool;

/// Why a lease call failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// PostgreSQL failed the call.
    #[error("PostgreSQL failed while {doing}: {source}")]
    Database {
        /// What was being done.
        doing: &'static str,
        /// The cause.
        #[source]
        source: sqlx::Error,
    },
    /// PostgreSQL did not answer in time.
    #[error("PostgreSQL did not answer within {timeout:?} while {doing}")]
    TimedOut {
        /// What was being done.
        doing: &'static str,
        /// The bound.
        timeout: Duration,
    },
}

/// Settings of the leases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    /// How long a lease lasts without renewal: how soon a killed holder's
    /// partitions are taken over.
    pub ttl: Duration,
    /// This process's name in the lease table (`host:pid:random`).
    pub owner: String,
}

impl LeaseConfig {
    /// Shortest lease accepted: a renewal (every third of it) must fit
    /// several PostgreSQL round trips.
    pub const MIN_TTL: Duration = Duration::from_millis(300);

    /// Leases of `ttl` held by this process under a fresh owner name.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl: ttl.max(Self::MIN_TTL),
            owner: owner_name(),
        }
    }
}

/// A unique name for this process: host, pid and a random suffix (a pid
/// can come back after a restart).
pub fn owner_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "host".to_owned());
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}:{}:{}", std::process::id(), &random[..8])
}

/// A lease row, for status reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseHolder {
    /// The partition.
    pub partition: i32,
    /// Who holds (or last held) it.
    pub owner: String,
    /// Its fencing token.
    pub token: u64,
    /// Whether it is still held (not expired or released).
    pub live: bool,
}

/// The leases of one projection, shared by this process's projectors of
/// its partitions (clones share what this process holds).
#[derive(Debug, Clone)]
pub struct Leases {
    pool: PgPool,
    name: String,
    config: LeaseConfig,
    share: Arc<Share>,
}

/// What this process holds of a projection, and its fair share.
#[derive(Debug)]
struct Share {
    /// Partitions of the projection.
    partitions: AtomicU32,
    /// Live processes running it (1 until membership says otherwise).
    members: AtomicU32,
    /// The partitions whose leases this process holds.
    held: Mutex<BTreeSet<u32>>,
}

impl Share {
    fn held(&self) -> std::sync::MutexGuard<'_, BTreeSet<u32>> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// ceil(partitions / members).
    fn fair(&self) -> usize {
        let partitions = self.partitions.load(Ordering::Relaxed).max(1);
        let members = self.members.load(Ordering::Relaxed).max(1);
        partitions.div_ceil(members) as usize
    }
}

const ACQUIRE: &str = "\
INSERT INTO projection_leases AS l (projection, partition, owner, token, expires_at, acquired_at)
VALUES ($1, $2, $3, 1, clock_timestamp() + $4 * interval '1 millisecond', clock_timestamp())
ON CONFLICT (projection, partition) DO UPDATE
   SET owner = EXCLUDED.owner, token = l.token + 1,
       expires_at = EXCLUDED.expires_at, acquired_at = EXCLUDED.acquired_at
 WHERE l.expires_at <= clock_timestamp()
RETURNING token";

// Renewal needs the same owner and token, not an unexpired lease: one that
// expired without anyone taking it over is still this holder's (no other
// token was handed out).
const RENEW: &str = "\
UPDATE projection_leases
   SET expires_at = clock_timestamp() + $5 * interval '1 millisecond'
 WHERE projection = $1 AND partition = $2 AND owner = $3 AND token = $4";

const RELEASE: &str = "\
UPDATE projection_leases SET expires_at = '-infinity'
 WHERE projection = $1 AND partition = $2 AND owner = $3 AND token = $4";

const JOIN: &str = "\
INSERT INTO projection_members (projection, owner, expires_at)
VALUES ($1, $2, clock_timestamp() + $3 * interval '1 millisecond')
ON CONFLICT (projection, owner) DO UPDATE SET expires_at = EXCLUDED.expires_at";

const MEMBERS: &str = "\
SELECT count(*) FROM projection_members WHERE projection = $1 AND expires_at > clock_timestamp()";

const LEAVE: &str = "DELETE FROM projection_members WHERE projection = $1 AND owner = $2";

const HOLDERS: &str = "\
SELECT partition, owner, token, expires_at > clock_timestamp() AS live
  FROM projection_leases WHERE projection = $1 ORDER BY partition";

impl Leases {
    /// The leases named `name` (`<stream>/<projection>`).
    pub fn new(pool: PgPool, name: impl Into<String>, config: LeaseConfig) -> Self {
        Self {
            pool,
            name: name.into(),
            config,
            share: Arc::new(Share {
                partitions: AtomicU32::new(1),
                members: AtomicU32::new(1),
                held: Mutex::new(BTreeSet::new()),
            }),
        }
    }

    /// These leases for a projection of `partitions` partitions.
    #[must_use]
    pub fn with_partitions(self, partitions: u32) -> Self {
        self.share
            .partitions
            .store(partitions.max(1), Ordering::Relaxed);
        self
    }

    /// Whether this process may take one more lease (it holds fewer than
    /// its fair share).
    pub fn may_take(&self) -> bool {
        self.share.held().len() < self.share.fair()
    }

    /// Records that this process holds `partition`'s lease.
    pub fn took(&self, partition: u32) {
        self.share.held().insert(partition);
    }

    /// Records that this process no longer holds `partition`'s lease.
    pub fn gave_up(&self, partition: u32) {
        self.share.held().remove(&partition);
    }

    /// Whether `partition`, held here, should be handed over: this process
    /// holds more than its fair share and `partition` is its highest.
    pub fn should_hand_over(&self, partition: u32) -> bool {
        let held = self.share.held();
        held.len() > self.share.fair() && held.last() == Some(&partition)
    }

    /// Keeps this process's member row alive and the count of live members
    /// current, every third of the ttl, until `stop`; then leaves.
    pub async fn keep_membership(&self, stop: tokio_util::sync::CancellationToken) {
        loop {
            let counted = async {
                self.bounded(
                    "joining a projection's members",
                    sqlx::query(JOIN)
                        .bind(&self.name)
                        .bind(&self.config.owner)
                        .bind(self.ttl_ms())
                        .execute(&self.pool),
                )
                .await?;
                self.bounded(
                    "counting a projection's members",
                    sqlx::query_scalar::<_, i64>(MEMBERS)
                        .bind(&self.name)
                        .fetch_one(&self.pool),
                )
                .await
            };
            match counted.await {
                Ok(members) => self.share.members.store(
                    u32::try_from(members).unwrap_or(u32::MAX).max(1),
                    Ordering::Relaxed,
                ),
                Err(error) => tracing::warn!(%error, "could not renew this process's membership"),
            }
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(self.renew_every()) => {}
            }
        }
        let _ = self
            .bounded(
                "leaving a projection's members",
                sqlx::query(LEAVE)
                    .bind(&self.name)
                    .bind(&self.config.owner)
                    .execute(&self.pool),
            )
            .await;
    }

    /// The lease's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This process's owner name.
    pub fn owner(&self) -> &str {
        &self.config.owner
    }

    /// How long a lease lasts.
    pub fn ttl(&self) -> Duration {
        self.config.ttl
    }

    /// How often a held lease is renewed.
    pub fn renew_every(&self) -> Duration {
        self.config.ttl / 3
    }

    /// How often a standby asks for the lease.
    pub fn standby_poll(&self) -> Duration {
        (self.config.ttl / 6).clamp(Duration::from_millis(50), Duration::from_secs(1))
    }

    /// Bound of one call: a renewal must be answered before the next one is
    /// due.
    fn timeout(&self) -> Duration {
        self.renew_every()
    }

    fn ttl_ms(&self) -> i64 {
        i64::try_from(self.config.ttl.as_millis()).unwrap_or(i64::MAX)
    }

    async fn bounded<T>(
        &self,
        doing: &'static str,
        call: impl std::future::Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, LeaseError> {
        let timeout = self.timeout();
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(source)) => Err(LeaseError::Database { doing, source }),
            Err(_) => Err(LeaseError::TimedOut { doing, timeout }),
        }
    }

    /// Takes the lease of `partition` if nobody holds it; its fencing token.
    pub async fn try_acquire(&self, partition: i32) -> Result<Option<u64>, LeaseError> {
        let token: Option<i64> = self
            .bounded(
                "taking a projection lease",
                sqlx::query_scalar(ACQUIRE)
                    .bind(&self.name)
                    .bind(partition)
                    .bind(&self.config.owner)
                    .bind(self.ttl_ms())
                    .fetch_optional(&self.pool),
            )
            .await?;
        Ok(token.and_then(|t| u64::try_from(t).ok()))
    }

    /// Extends the lease of `partition` held under `token`; false when it is
    /// not this process's any more.
    pub async fn renew(&self, partition: i32, token: u64) -> Result<bool, LeaseError> {
        let renewed = self
            .bounded(
                "renewing a projection lease",
                sqlx::query(RENEW)
                    .bind(&self.name)
                    .bind(partition)
                    .bind(&self.config.owner)
                    .bind(i64::try_from(token).unwrap_or(i64::MAX))
                    .bind(self.ttl_ms())
                    .execute(&self.pool),
            )
            .await?;
        Ok(renewed.rows_affected() == 1)
    }

    /// Gives the lease of `partition` up (a standby takes it at its next
    /// poll).
    pub async fn release(&self, partition: i32, token: u64) -> Result<(), LeaseError> {
        self.bounded(
            "releasing a projection lease",
            sqlx::query(RELEASE)
                .bind(&self.name)
                .bind(partition)
                .bind(&self.config.owner)
                .bind(i64::try_from(token).unwrap_or(i64::MAX))
                .execute(&self.pool),
        )
        .await?;
        Ok(())
    }

    /// Every partition's lease as PostgreSQL has it now.
    pub async fn holders(&self) -> Result<Vec<LeaseHolder>, LeaseError> {
        let rows: Vec<(i32, String, i64, bool)> = self
            .bounded(
                "reading the projection leases",
                sqlx::query_as(HOLDERS)
                    .bind(&self.name)
                    .fetch_all(&self.pool),
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|(partition, owner, token, live)| LeaseHolder {
                partition,
                owner,
                token: u64::try_from(token).unwrap_or(0),
                live,
            })
            .collect())
    }
}
