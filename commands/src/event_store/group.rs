//! Group commit: appends to different streams that arrive while earlier
//! ones are being written share one statement, one transaction and one
//! commit.
//!
//! A few committer tasks take appends from one queue. A committer that
//! finds the queue empty waits for the next append and writes it alone, at
//! once: a lone writer waits for nothing. One that comes back from a write
//! takes everything queued meanwhile — up to [`MAX_APPENDS`] appends and
//! [`MAX_EVENTS_PER_APPEND`] events, no stream twice — and writes it with
//! one statement (`sql/append_group.sql`). So the busier the store, the
//! more appends share a round trip and a commit, with no timer anywhere.
//!
//! Each append keeps its own outcome:
//!
//! - A stream not at the version its append requires drops that append's
//!   rows only (the statement's version guard is per append): the others
//!   commit and the caller gets its conflict, as alone.
//! - A statement the server refuses — a unique violation (a retried command,
//!   a writer elsewhere racing for a version), data PostgreSQL cannot store
//!   — wrote nothing; the group's appends are then written one by one on
//!   the same connection, each with its own outcome.
//! - A connection that fails or a pool that times out fails every append of
//!   the group, as it would have failed each alone; a retried command is
//!   recognised by its event ids.
//! - An append whose caller has gone (a cancelled request) before its group
//!   is written is left out: nothing of it is written.
//!
//! One committer is the default: on two cores, two group statements at
//! once ran no faster and stretched the 99th percentile at 64 writers from
//! 7 ms to 17 ms (a PostgreSQL backend preempted while holding a lock the
//! other needs). Appends of more than [`MOST_EVENTS_GROUPED`] events skip
//! the queue.
//!
//! Committers are tasks, not callers taking turns as leader, so a caller
//! cancelled half-way cannot abandon the others' appends.

use std::collections::HashSet;
use std::sync::Arc;

use sqlx::postgres::PgRow;
use sqlx::types::Json;
use sqlx::{PgConnection, Row};
use tokio::sync::{mpsc, oneshot, Mutex};

use super::append::{insert_one, Attempt, MAX_EVENTS_PER_APPEND};
use super::lease::{Lease, Leases};
use crate::envelope::NewEvent;
use crate::error::AppendError;

const APPEND_GROUP: &str = include_str!("sql/append_group.sql");

/// Most appends written by one statement.
pub const MAX_APPENDS: usize = 128;

/// Appends of more events than this are written by their caller, alone and
/// beside the committers: they already share one commit among several
/// events, and grouping them would serialise large statements that run well
/// side by side (measured: 10-event appends from 8 writers ran at 27.6k
/// events/s through one committer, 37k alone).
pub const MOST_EVENTS_GROUPED: usize = 4;

/// One append waiting for a committer.
struct Pending {
    stream_id: String,
    required: Option<i64>,
    /// Never empty: [`super::EventStore::append`] checks.
    events: Vec<NewEvent>,
    reply: oneshot::Sender<Settled>,
}

/// What became of one append, with its events handed back.
pub(crate) struct Settled {
    pub(crate) events: Vec<NewEvent>,
    pub(crate) attempt: Result<Attempt, AppendError>,
}

/// The queue to the committer tasks; they end when it is dropped.
#[derive(Debug)]
pub(crate) struct Committers {
    queue: mpsc::UnboundedSender<Pending>,
}

impl Committers {
    /// Starts `count` committers on the current runtime (none outside one,
    /// or for a count of 0).
    pub(crate) fn start(leases: &Arc<Leases>, count: usize) -> Option<Self> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        if count == 0 {
            return None;
        }
        let (queue, receiver) = mpsc::unbounded_channel();
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..count {
            runtime.spawn(commit_loop(leases.clone(), receiver.clone()));
        }
        Some(Self { queue })
    }

    /// Queues an append and waits for its outcome. `Err` gives the events
    /// back untouched when the committers have stopped (their runtime
    /// ended).
    pub(crate) async fn append(
        &self,
        stream_id: &str,
        required: Option<i64>,
        events: Vec<NewEvent>,
    ) -> Result<Settled, Vec<NewEvent>> {
        let (reply, settled) = oneshot::channel();
        let pending = Pending {
            stream_id: stream_id.to_owned(),
            required,
            events,
            reply,
        };
        if let Err(mpsc::error::SendError(pending)) = self.queue.send(pending) {
            return Err(pending.events);
        }
        // A committer drops an append unanswered only when its runtime
        // shuts down mid-write: the outcome is unknown.
        Ok(settled.await.unwrap_or_else(|_| Settled {
            events: Vec::new(),
            attempt: Err(AppendError::Database {
                stream_id: stream_id.to_owned(),
                source: sqlx::Error::WorkerCrashed,
            }),
        }))
    }
}

/// One committer: takes a group from the queue, writes it, answers.
async fn commit_loop(leases: Arc<Leases>, queue: Arc<Mutex<mpsc::UnboundedReceiver<Pending>>>) {
    // An append taken from the queue that did not fit the last group.
    let mut held: Option<Pending> = None;
    loop {
        let mut group = Group::default();
        if let Some(pending) = held.take() {
            group.push(pending);
        }
        {
            // With an append in hand, do not wait for the queue: another
            // committer may be waiting on it for the next append.
            let receiver = if group.appends.is_empty() {
                Some(queue.lock().await)
            } else {
                queue.try_lock().ok()
            };
            if let Some(mut receiver) = receiver {
                if group.appends.is_empty() {
                    match receiver.recv().await {
                        Some(pending) => group.push(pending),
                        None => return,
                    }
                }
                while group.appends.len() < MAX_APPENDS {
                    match receiver.try_recv() {
                        Ok(pending) if group.fits(&pending) => group.push(pending),
                        Ok(pending) => {
                            held = Some(pending);
                            break;
                        }
                        Err(_) => break,
                    }
                }
            }
        }
        group.commit(&leases).await;
    }
}

/// Appends to be written together: no stream twice, at most
/// [`MAX_EVENTS_PER_APPEND`] events in all.
#[derive(Default)]
struct Group {
    appends: Vec<Pending>,
    streams: HashSet<String>,
    events: usize,
}

impl Group {
    fn fits(&self, pending: &Pending) -> bool {
        !self.streams.contains(&pending.stream_id)
            && self.events + pending.events.len() <= MAX_EVENTS_PER_APPEND
    }

    /// Adds an append whose caller still waits (one that has gone is left
    /// out: nothing of it is written).
    fn push(&mut self, pending: Pending) {
        if pending.reply.is_closed() {
            return;
        }
        self.events += pending.events.len();
        self.streams.insert(pending.stream_id.clone());
        self.appends.push(pending);
    }

    async fn commit(self, leases: &Leases) {
        if self.appends.is_empty() {
            return;
        }
        metrics::histogram!("neurectomy_append_group_appends").record(self.appends.len() as f64);
        let mut conn = match leases.take().await {
            Ok(conn) => conn,
            Err(error) => return self.fail(&error),
        };
        if self.appends.len() == 1 {
            return self.one_by_one(&mut conn).await;
        }
        let result = self.insert(&mut conn).await;
        conn.settle(&result);
        match result {
            Ok(rows) => self.distribute(rows),
            // Refused by the server, nothing written, connection fine.
            Err(sqlx::Error::Database(_)) if conn.healthy() => self.one_by_one(&mut conn).await,
            Err(error) => self.fail(&error),
        }
    }

    /// The group's statement: its rows, in no particular order.
    async fn insert(&self, conn: &mut PgConnection) -> Result<Vec<PgRow>, sqlx::Error> {
        let n = self.appends.len();
        let mut streams = Vec::with_capacity(n);
        let mut required = Vec::with_capacity(n);
        let mut command_ids = Vec::with_capacity(n);
        let mut correlation_ids = Vec::with_capacity(n);
        let mut tenants = Vec::with_capacity(n);
        let mut tenant_hashes: Vec<i64> = Vec::with_capacity(n);
        let total = self.events;
        let mut owners = Vec::with_capacity(total);
        let mut indexes = Vec::with_capacity(total);
        let mut ids = Vec::with_capacity(total);
        let mut types = Vec::with_capacity(total);
        let mut versions = Vec::with_capacity(total);
        let mut data = Vec::with_capacity(total);
        let mut metadata = Vec::with_capacity(total);
        for (append, pending) in (1_i32..).zip(&self.appends) {
            let Some(first) = pending.events.first() else {
                continue;
            };
            streams.push(pending.stream_id.as_str());
            required.push(pending.required);
            command_ids.push(first.metadata.command_id);
            correlation_ids.push(first.metadata.correlation_id);
            tenants.push(first.metadata.tenant.as_str());
            tenant_hashes.push(i64::from(crate::partition::hash(&first.metadata.tenant)));
            for (index, event) in (1_i32..).zip(&pending.events) {
                owners.push(append);
                indexes.push(index);
                ids.push(event.metadata.event_id);
                types.push(event.event_type.as_str());
                versions.push(event.schema_version);
                data.push(Json(&event.data));
                metadata.push(Json(&event.metadata));
            }
        }
        sqlx::query(APPEND_GROUP)
            .bind(&streams)
            .bind(&required)
            .bind(&command_ids)
            .bind(&correlation_ids)
            .bind(&tenants)
            .bind(&owners)
            .bind(&indexes)
            .bind(&ids)
            .bind(&types)
            .bind(&versions)
            .bind(&data)
            .bind(&metadata)
            .bind(&tenant_hashes)
            .fetch_all(conn)
            .await
    }

    /// Hands each append its rows: none means its version guard held it
    /// back.
    fn distribute(self, rows: Vec<PgRow>) {
        // The low 16 bits of a position index the statement's events.
        let mut owner = Vec::with_capacity(self.events);
        for (append, pending) in self.appends.iter().enumerate() {
            owner.extend(std::iter::repeat_n(append, pending.events.len()));
        }
        let mut shares: Vec<Vec<PgRow>> = self.appends.iter().map(|_| Vec::new()).collect();
        for row in rows {
            let position = match row.try_get::<i64, _>(0) {
                Ok(position) => position,
                // Written, but unreadable: the callers learn of a failure
                // and a retried command is recognised by its event ids.
                Err(error) => return self.fail(&error),
            };
            let index = usize::try_from(position & 0xFFFF).unwrap_or(usize::MAX);
            match owner.get(index) {
                Some(&append) => shares[append].push(row),
                None => {
                    return self.fail(&sqlx::Error::Protocol(format!(
                        "the group append returned position {position}, outside its {} events",
                        owner.len()
                    )))
                }
            }
        }
        for (pending, rows) in self.appends.into_iter().zip(shares) {
            let attempt = if rows.is_empty() {
                Attempt::VersionMismatch
            } else {
                Attempt::Done(rows)
            };
            answer(pending, Ok(attempt));
        }
    }

    /// Writes each append alone, in order, each its own transaction.
    async fn one_by_one(self, conn: &mut Lease<'_>) {
        for pending in self.appends {
            let attempt =
                insert_one(conn, &pending.stream_id, pending.required, &pending.events).await;
            answer(pending, attempt);
        }
    }

    /// Fails every append of the group with (a copy of) `error`.
    fn fail(self, error: &sqlx::Error) {
        for pending in self.appends {
            let attempt = Err(AppendError::Database {
                stream_id: pending.stream_id.clone(),
                source: replicate(error),
            });
            answer(pending, attempt);
        }
    }
}

fn answer(pending: Pending, attempt: Result<Attempt, AppendError>) {
    // A caller that has gone meanwhile does not need the answer.
    let _ = pending.reply.send(Settled {
        events: pending.events,
        attempt,
    });
}

/// A copy of a connection-level error for each append of a failed group
/// (`sqlx::Error` is not `Clone`): the variants callers tell apart are
/// kept, the rest keep their message.
fn replicate(error: &sqlx::Error) -> sqlx::Error {
    match error {
        sqlx::Error::PoolTimedOut => sqlx::Error::PoolTimedOut,
        sqlx::Error::PoolClosed => sqlx::Error::PoolClosed,
        sqlx::Error::WorkerCrashed => sqlx::Error::WorkerCrashed,
        sqlx::Error::Io(io) => sqlx::Error::Io(std::io::Error::new(io.kind(), io.to_string())),
        other => sqlx::Error::Protocol(other.to_string()),
    }
}
