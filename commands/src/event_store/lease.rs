//! Connections kept checked out of the pool between statements.
//!
//! A statement run on `&PgPool` costs three round trips in sqlx 0.8: the
//! pool pings a connection before handing it out (`test_before_acquire`),
//! then the statement, then — in a task spawned when the connection is
//! dropped — another ping before it goes back. On a one-statement append
//! that is two thirds of the round trips and most of the wake-ups.
//!
//! The store keeps up to half the pool's connections checked out in a
//! short list instead, and hands them out again without asking the pool:
//! one round trip per statement. What the pings were for is kept:
//!
//! - A connection is kept only after a statement on it completed (or the
//!   server refused it: the connection is fine). A statement that failed
//!   on the connection — I/O, protocol, a timeout — or was cancelled
//!   half-way drops it back to the pool, whose release ping tests it and
//!   closes it if it is broken.
//! - A kept connection unused for [`FRESH`] goes back to the pool too (and
//!   is tested there), within a second more: after an outage, a restarted
//!   server is met with connections the pool has checked, not with ones
//!   that died meanwhile, and a store gone quiet holds none of the pool.
//! - Fewer than half the pool is kept (none of a pool of one or two), so
//!   every other user of the pool (the relay's lock, the API's reads, a
//!   health check) still gets connections.
//! - No one is overtaken: while any caller of the store waits for the pool
//!   (more concurrent statements than connections), a finished connection
//!   goes back to the pool, which hands it to the longest waiter, and a new
//!   caller queues behind them instead of taking a kept one. (Kept
//!   connections used to go round among the callers that arrived while one
//!   was free: with 64 writers on 16 connections, a third of the writers
//!   waited in the pool's queue for the whole 10-second benchmark run.)

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};

/// How long a kept connection may sit unused before it goes back to the
/// pool (and its ping).
pub const FRESH: Duration = Duration::from_secs(1);

/// The connections kept checked out, most recently used last.
#[derive(Debug)]
pub(crate) struct Leases {
    kept: Mutex<Vec<(PoolConnection<Postgres>, Instant)>>,
    max: usize,
    pool: PgPool,
    /// Callers of [`Leases::take`] waiting for the pool.
    waiting: AtomicUsize,
    /// Dropped with the leases: ends the task that hands the kept
    /// connections back when the pool closes.
    _alive: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Leases {
    /// Keeps fewer than half of `pool`'s connections: none of a pool of
    /// one or two, where a kept connection sitting idle could leave the
    /// pool's other users (the relay's lock, a health check) waiting.
    ///
    /// A task hands kept connections back when they have been unused for
    /// [`FRESH`], and all of them as soon as the pool starts closing
    /// (`Pool::close` waits for every checked-out connection); it ends when
    /// the leases are dropped. Outside a runtime nothing is kept.
    pub(crate) fn for_pool(pool: &PgPool) -> Arc<Self> {
        let max = (pool.options().get_max_connections() as usize).saturating_sub(1) / 2;
        let runtime = tokio::runtime::Handle::try_current()
            .ok()
            .filter(|_| max > 0);
        let (alive, dropped) = tokio::sync::oneshot::channel::<()>();
        let leases = Arc::new(Self {
            kept: Mutex::new(Vec::with_capacity(max)),
            max: if runtime.is_some() { max } else { 0 },
            pool: pool.clone(),
            waiting: AtomicUsize::new(0),
            _alive: Some(alive),
        });
        if let Some(runtime) = runtime {
            let closing = pool.close_event();
            let leases = Arc::downgrade(&leases);
            runtime.spawn(async move {
                tokio::pin!(closing, dropped);
                loop {
                    tokio::select! {
                        () = &mut closing => {
                            if let Some(leases) = leases.upgrade() {
                                drop(std::mem::take(&mut *leases.lock()));
                            }
                            return;
                        }
                        _ = &mut dropped => return,
                        () = tokio::time::sleep(FRESH) => {
                            if let Some(leases) = leases.upgrade() {
                                leases.release_stale();
                            }
                        }
                    }
                }
            });
        }
        leases
    }

    /// How many connections may be kept (0 outside a runtime).
    pub(crate) fn kept_max(&self) -> usize {
        self.max
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(PoolConnection<Postgres>, Instant)>> {
        // Pushes and pops are single calls: a poisoned list is consistent.
        self.kept.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connection: the most recently used kept one if it is fresh and
    /// no one waits for the pool, else one from the pool (tested by it), in
    /// the pool's order.
    pub(crate) async fn take(&self) -> Result<Lease<'_>, sqlx::Error> {
        if self.waiting.load(Ordering::Acquire) == 0 {
            if let Some(conn) = self.pop_fresh() {
                return Ok(self.lease(conn));
            }
        }
        let _waiting = Waiting::on(&self.waiting);
        // Kept before this caller counted as waiting: no one else gets it
        // back to the pool now.
        if let Some(conn) = self.pop_fresh() {
            return Ok(self.lease(conn));
        }
        let conn = self.pool.acquire().await?;
        Ok(self.lease(conn))
    }

    fn lease(&self, conn: PoolConnection<Postgres>) -> Lease<'_> {
        Lease {
            conn: Some(conn),
            home: self,
            keep: false,
        }
    }

    /// The most recently used kept connection, if fresh (the stale ones go
    /// back to the pool, which tests them).
    fn pop_fresh(&self) -> Option<PoolConnection<Postgres>> {
        let mut stale = Vec::new();
        let kept = {
            let mut kept = self.lock();
            loop {
                match kept.pop() {
                    Some((conn, used)) if used.elapsed() < FRESH => break Some(conn),
                    Some((conn, _)) => stale.push(conn),
                    None => break None,
                }
            }
        };
        // Dropped outside the lock.
        drop(stale);
        kept
    }

    /// Hands the connections unused for [`FRESH`] back to the pool, so
    /// that a store gone quiet does not hold them from the pool's other
    /// users (with several stores on one small pool, they could otherwise
    /// wait for a connection until their timeout).
    fn release_stale(&self) {
        let stale: Vec<PoolConnection<Postgres>> = {
            let mut kept = self.lock();
            // Most recently used last: the stale ones are a prefix.
            let stale = kept
                .iter()
                .position(|(_, used)| used.elapsed() < FRESH)
                .unwrap_or(kept.len());
            kept.drain(..stale).map(|(conn, _)| conn).collect()
        };
        drop(stale);
    }

    fn put_back(&self, conn: PoolConnection<Postgres>) {
        if self.waiting.load(Ordering::Acquire) > 0 {
            // To the pool, which hands it to the caller waiting longest.
            drop(conn);
            return;
        }
        let mut kept = self.lock();
        // Checked under the lock: a close that began before this either
        // emptied the list already or will find this connection in it.
        if kept.len() < self.max && !self.pool.is_closed() {
            kept.push((conn, Instant::now()));
        } else {
            drop(kept);
            drop(conn);
        }
    }
}

/// Counts a caller as waiting for the pool while it lives (a cancelled
/// wait included).
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn on(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A connection taken from [`Leases`]: kept for the next statement if
/// [`Lease::settle`] saw its statement complete, else back to the pool.
pub(crate) struct Lease<'a> {
    conn: Option<PoolConnection<Postgres>>,
    home: &'a Leases,
    keep: bool,
}

impl Lease<'_> {
    /// Notes how the statement on this connection ended: completed, or
    /// refused by the server (an error response leaves the connection
    /// ready), keeps it; anything else — and the server's own goodbyes,
    /// SQLSTATE classes 08 (connection exception) and 57 (operator
    /// intervention: shutdown, terminated backend) — returns it to the pool
    /// to be tested.
    pub(crate) fn settle<T>(&mut self, result: &Result<T, sqlx::Error>) {
        self.keep = match result {
            Ok(_) => true,
            Err(sqlx::Error::Database(error)) => !error
                .code()
                .is_some_and(|code| code.starts_with("08") || code.starts_with("57")),
            Err(_) => false,
        };
    }

    /// Whether the last [`Lease::settle`] found the connection fit to use
    /// again.
    pub(crate) fn healthy(&self) -> bool {
        self.keep
    }
}

impl Deref for Lease<'_> {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        // Present from creation until drop.
        match &self.conn {
            Some(conn) => conn,
            None => unreachable!("a lease holds its connection until dropped"),
        }
    }
}

impl DerefMut for Lease<'_> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        match &mut self.conn {
            Some(conn) => conn,
            None => unreachable!("a lease holds its connection until dropped"),
        }
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            if self.keep {
                self.home.put_back(conn);
            }
            // Otherwise dropped: back to the pool, which tests it.
        }
    }
}
