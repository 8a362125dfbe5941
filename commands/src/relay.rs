//! The outbox relay: publishes committed events, in gap-safe global order, to
//! one JetStream stream.
//!
//! - **Exactly one mirror.** Every message carries `Nats-Msg-Id` = event id
//!   (JetStream drops duplicates) and `Nats-Expected-Last-Sequence` = the
//!   sequence of the message before it (JetStream rejects anything out of
//!   order), so the stream's sequence order is the store's global order.
//!   Within a batch every message after the first also carries
//!   `Nats-Expected-Last-Msg-Id` = the event id of the one before it: once
//!   one publish of a pipelined batch is rejected, every later one is too
//!   (the sequence check alone would accept the message after a rejected
//!   one when something else's message took that sequence, leaving a hole).
//! - **Crash safety.** After a restart or an error the relay walks back from
//!   the stream's last message to the last one it published (see *Foreign
//!   messages*) and continues after the position that message carries,
//!   chaining on the stream's real last sequence; the PostgreSQL
//!   checkpoint bounds the walk and is the fallback when no message of the
//!   relay is left above it (purged, deleted). Publishing twice is harmless;
//!   skipping is impossible.
//! - **Foreign messages.** Anything else published on the relay's subjects
//!   lands in the stream too. The relay never takes such a message for its
//!   own: one of its messages carries every header the relay sets ([`stamp`])
//!   *and* names, by `Nats-Msg-Id`, the event the store holds at its
//!   `Neurectomy-Position`. A foreign message makes the next publish fail
//!   (wrong last sequence); the relay resynchronizes past it, logs what it
//!   passed over and goes on. NATS permissions (`deploy/nats.conf`) keep
//!   other users from publishing there at all.
//! - **One active relay.** Leadership is a PostgreSQL session advisory lock
//!   held on a dedicated connection; standbys retry until it frees. The
//!   checkpoint is written on that connection, so a relay whose connection
//!   (and hence lock) died finds out at its next batch and steps down. Even
//!   two relays publishing at once cannot break the mirror: the sequence
//!   check makes one of them fail and resynchronize.
//! - **Latency.** The relay wakes on the in-process commit signal, on
//!   PostgreSQL `NOTIFY` from other processes, and otherwise polls.
//! - **Throughput.** A batch is published without waiting (pipelined), then
//!   every acknowledgement is awaited before the checkpoint moves.
//! - **Shutdown.** Cancellation is seen between batches only: the batch in
//!   hand is published and acknowledged, the checkpoint written, the lock
//!   released. [`Relay::in_hand`] tells a shutdown what it still holds.
//! - **Metrics.** `neurectomy_relay_publish_seconds` (per batch, from the
//!   first send to the last ack) and, while leading,
//!   `neurectomy_relay_lag_events` (events committed after the last one
//!   acknowledged, sampled about every [`LAG_SAMPLE_EVERY`]; 0 once it steps
//!   down).

use std::time::{Duration, Instant};

use async_nats::jetstream::stream::{RawMessageErrorKind, Stream};
use async_nats::jetstream::{self, context::PublishAckFuture, stream::StorageType};
use async_nats::HeaderMap;
use futures::StreamExt as _;
use sha2::{Digest, Sha256};
use sqlx::postgres::PgListener;
use sqlx::{Connection, PgConnection};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::envelope::RecordedEvent;
use crate::error::RelayError;
use crate::event_store::{EventStore, COMMIT_CHANNEL};
use crate::in_hand::InHand;
use crate::seal::sealer::{Feed, Sealer};

const CHECKPOINT_GET: &str = include_str!("event_store/sql/relay_checkpoint_get.sql");
const CHECKPOINT_PUT: &str = include_str!("event_store/sql/relay_checkpoint_put.sql");

/// Header carrying the event's global position.
pub const HEADER_POSITION: &str = "Neurectomy-Position";
/// Header carrying the event's stream id.
pub const HEADER_STREAM_ID: &str = "Neurectomy-Stream-Id";
/// Header carrying the event's version in its stream.
pub const HEADER_STREAM_VERSION: &str = "Neurectomy-Stream-Version";
/// Header carrying the event type.
pub const HEADER_EVENT_TYPE: &str = "Neurectomy-Event-Type";
/// Header carrying the schema version of the payload.
pub const HEADER_SCHEMA_VERSION: &str = "Neurectomy-Schema-Version";
/// Header carrying the tenant.
pub const HEADER_TENANT: &str = "Neurectomy-Tenant";
/// W3C trace context header.
pub const HEADER_TRACEPARENT: &str = "traceparent";
/// JetStream's de-duplication header; the relay sets it to the event id.
pub const HEADER_MESSAGE_ID: &str = "Nats-Msg-Id";

/// The relay's mark on a JetStream message, read from its headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// `Neurectomy-Position`: the event's global position.
    pub position: i64,
    /// `Nats-Msg-Id`: the event's id.
    pub event_id: Uuid,
}

/// The relay's stamp on a message with these headers: `Some` only when every
/// header the relay sets is there (`traceparent` aside: only traced events
/// have one) and the position, versions and id parse. A message without it
/// was published by something else on the relay's subjects (a mistyped
/// subject elsewhere, an operator's test); readers pass over it. A stamp
/// alone proves little to the relay itself, which also checks the event id
/// against the store before it trusts a position (see the module docs).
pub fn stamp(headers: &HeaderMap) -> Option<Stamp> {
    let text = |name: &str| headers.get(name).map(|value| value.as_str());
    let position = text(HEADER_POSITION)?.parse().ok()?;
    let event_id = text(HEADER_MESSAGE_ID)?.parse().ok()?;
    text(HEADER_STREAM_VERSION)?.parse::<i64>().ok()?;
    text(HEADER_SCHEMA_VERSION)?.parse::<i32>().ok()?;
    for name in [HEADER_STREAM_ID, HEADER_EVENT_TYPE, HEADER_TENANT] {
        text(name)?;
    }
    Some(Stamp { position, event_id })
}

/// How long a leadership term's end waits for the sealer to seal its open
/// block.
const SEAL_STOP: Duration = Duration::from_secs(10);

/// JetStream messages read at once while walking back to the relay's last
/// message (past foreign or deleted ones).
const WALK_AHEAD: usize = 16;

/// How often the leading relay samples its lag (`neurectomy_relay_lag_events`)
/// at most.
pub const LAG_SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Configuration of one relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayConfig {
    /// JetStream stream name; also the checkpoint and advisory-lock key.
    pub stream_name: String,
    /// Subjects are `<prefix>.<aggregate kind>.<event type>`.
    pub subject_prefix: String,
    /// Most events read and published per batch.
    pub batch_size: usize,
    /// Poll interval when no commit signal arrives.
    pub idle_poll: Duration,
    /// How often a standby tries to take leadership.
    pub standby_poll: Duration,
    /// Longest wait between retries after failures.
    pub max_backoff: Duration,
    /// JetStream duplicate window (how long `Nats-Msg-Id`s are remembered).
    pub duplicate_window: Duration,
    /// How often to log progress and lag.
    pub report_every: Duration,
    /// Least time between two PostgreSQL checkpoint writes (JetStream's last
    /// message is the primary record of progress).
    pub checkpoint_every: Duration,
    /// How long to wait for a JetStream publish acknowledgement. Acks of
    /// publishes lost with a dropped connection never come, so this bounds
    /// the pause before the relay resynchronizes after a NATS outage.
    pub ack_timeout: Duration,
    /// How long the stream keeps a message (`Duration::ZERO`: no limit).
    /// PostgreSQL is the log; JetStream is its transport, and a consumer
    /// that finds its next message gone reads the store instead. At least
    /// `duplicate_window` (JetStream refuses a shorter one).
    pub max_age: Duration,
    /// Most bytes the stream keeps, the oldest messages going first (0: no
    /// limit).
    pub max_bytes: u64,
    /// Copies of the stream kept by a JetStream cluster (1 on a single
    /// server; 3 or 5 in a cluster, so that it survives a node's loss).
    pub replicas: usize,
    /// Partitions of the stream by tenant ([`crate::partition`]); fixed
    /// for a stream when it is created (stated in its description).
    pub partitions: u32,
}

/// [`RelayConfig::max_age`] by default: a week.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// [`RelayConfig::max_bytes`] by default: 1 GiB (about a million events).
pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            stream_name: "NEURECTOMY_EVENTS".to_owned(),
            subject_prefix: "neurectomy.events".to_owned(),
            batch_size: 1000,
            idle_poll: Duration::from_millis(250),
            standby_poll: Duration::from_millis(500),
            max_backoff: Duration::from_secs(5),
            duplicate_window: Duration::from_secs(120),
            report_every: Duration::from_secs(10),
            checkpoint_every: Duration::from_secs(1),
            ack_timeout: Duration::from_secs(3),
            max_age: DEFAULT_MAX_AGE,
            max_bytes: DEFAULT_MAX_BYTES,
            replicas: 1,
            partitions: 1,
        }
    }
}

/// Where the relay is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayProgress {
    /// Last global position acknowledged by JetStream.
    pub position: i64,
    /// JetStream sequence of that message.
    pub jetstream_sequence: u64,
    /// Events this process published (acknowledged, not duplicates).
    pub published: u64,
    /// Whether this relay holds leadership.
    pub leader: bool,
    /// Batches that failed after JetStream had acknowledged part of them
    /// (e.g. something else published between two of their messages); the
    /// acknowledged part counts as published, the rest is published again
    /// after resynchronizing.
    pub interrupted: u64,
    /// Messages the relay did not publish (foreign, see the module docs)
    /// that it walked past while resynchronizing.
    pub passed_over: u64,
}

/// Why a leadership term ended.
enum TermEnd {
    /// Shutdown was requested.
    Shutdown,
    /// The lock connection failed; leadership may have passed to another relay.
    LostLock(sqlx::Error),
}

/// A batch that could not be published whole: how many of its events
/// JetStream acknowledged, in order, before `failure`.
#[derive(Debug)]
struct Interrupted {
    acknowledged: usize,
    failure: PublishFailure,
}

/// Why a batch could not be published; the relay resynchronizes and retries.
#[derive(Debug, thiserror::Error)]
enum PublishFailure {
    /// The client or server failed (NATS down, timeout, rejected).
    #[error("NATS: {0}")]
    Nats(String),
    /// JetStream's sequence is not what the relay expected.
    #[error("JetStream acknowledged sequence {got} (duplicate: {duplicate}) where {expected} was expected")]
    OutOfSync {
        expected: u64,
        got: u64,
        duplicate: bool,
    },
}

/// The outbox relay.
#[derive(Debug)]
pub struct Relay {
    store: EventStore,
    jetstream: jetstream::Context,
    config: RelayConfig,
    progress: watch::Sender<RelayProgress>,
    /// The batch being published, for shutdown reports.
    in_hand: InHand,
    /// Seals the log as it is read, while leading (`None`: no seal key).
    sealer: Option<Sealer>,
}

/// Batches the leader's sealer may be behind before it reads the store
/// itself instead (the relay never waits for it).
const SEAL_FEED: usize = 64;

impl Relay {
    /// A relay publishing `store`'s events through `client`.
    pub fn new(store: EventStore, client: async_nats::Client, config: RelayConfig) -> Self {
        let jetstream = jetstream::ContextBuilder::new()
            .timeout(config.ack_timeout)
            .build(client);
        let (progress, _) = watch::channel(RelayProgress::default());
        Self {
            store,
            jetstream,
            config,
            progress,
            in_hand: InHand::default(),
            sealer: None,
        }
    }

    /// Seals the log while leading (README, "Sealed audit log").
    pub fn with_sealer(mut self, sealer: Sealer) -> Self {
        self.sealer = Some(sealer);
        self
    }

    /// The sealer, if the relay seals.
    pub fn sealer(&self) -> Option<&Sealer> {
        self.sealer.as_ref()
    }

    /// Events of the batch being published now (0 between batches).
    pub fn in_hand(&self) -> InHand {
        self.in_hand.clone()
    }

    /// Progress updates, one per acknowledged batch.
    pub fn progress(&self) -> watch::Receiver<RelayProgress> {
        self.progress.subscribe()
    }

    /// The stream configuration the relay creates when it is missing.
    pub fn stream_config(&self) -> jetstream::stream::Config {
        jetstream::stream::Config {
            name: self.config.stream_name.clone(),
            subjects: vec![format!("{}.>", self.config.subject_prefix)],
            storage: StorageType::File,
            duplicate_window: self.config.duplicate_window,
            allow_direct: true,
            max_age: self.retained_age(),
            max_bytes: self.retained_bytes(),
            num_replicas: self.config.replicas.max(1),
            description: Some(crate::partition::describe(self.config.partitions)),
            ..Default::default()
        }
    }

    /// The stream's age limit: none for zero, else at least the duplicate
    /// window.
    fn retained_age(&self) -> Duration {
        match self.config.max_age {
            Duration::ZERO => Duration::ZERO,
            age => age.max(self.config.duplicate_window),
        }
    }

    /// The stream's byte limit as JetStream writes it (-1: none).
    fn retained_bytes(&self) -> i64 {
        match self.config.max_bytes {
            0 => -1,
            bytes => i64::try_from(bytes).unwrap_or(i64::MAX),
        }
    }

    /// Creates the JetStream stream if it does not exist, and gives an
    /// existing one the configured retention (age and bytes) and replica
    /// count when it has others — logged, since a lower limit may drop old
    /// messages at once.
    pub async fn ensure_stream(&self) -> Result<jetstream::stream::Stream, RelayError> {
        let mut stream = self
            .jetstream
            .get_or_create_stream(self.stream_config())
            .await
            .map_err(|e| self.nats_error("creating the JetStream stream", e))?;
        let current = stream
            .info()
            .await
            .map_err(|e| self.nats_error("reading the JetStream stream's configuration", e))?
            .config
            .clone();
        let partitions = crate::partition::described(current.description.as_deref());
        if partitions != self.config.partitions.max(1) {
            return Err(self.nats_error(
                "checking the JetStream stream's partitions",
                format!(
                    "the stream is split into {partitions} partition(s) and this relay is configured for {} \
                     (nats.stream_partitions); a stream's partition count cannot change: configure {partitions}, or \
                     give the relay a new stream (nats.stream), which it fills from the event store, and \
                     rebuild both read models with the new count (neurectomy replay --projection redis, \
                     then --projection graph): their checkpoints are kept per partition",
                    self.config.partitions.max(1)
                ),
            ));
        }
        let (max_age, max_bytes) = (self.retained_age(), self.retained_bytes());
        let replicas = self.config.replicas.max(1);
        // JetStream reports "no limit" as 0 for the age, -1 for bytes.
        let current_bytes = if current.max_bytes <= 0 {
            -1
        } else {
            current.max_bytes
        };
        if current.max_age == max_age
            && current_bytes == max_bytes
            && current.num_replicas.max(1) == replicas
        {
            return Ok(stream);
        }
        tracing::info!(
            stream = %self.config.stream_name,
            from_max_age_s = current.max_age.as_secs(),
            from_max_bytes = current_bytes,
            from_replicas = current.num_replicas,
            max_age_s = max_age.as_secs(),
            max_bytes,
            replicas,
            "applying the configured retention and replicas to the JetStream stream (0 s / -1: no limit); messages beyond it are dropped, consumers that need them read PostgreSQL"
        );
        // Not fatal: a relay whose NATS user may not edit the stream (an
        // older permission file) still publishes, on the limits it finds.
        if let Err(error) = self
            .jetstream
            .update_stream(jetstream::stream::Config {
                max_age,
                max_bytes,
                num_replicas: replicas,
                ..current
            })
            .await
        {
            tracing::warn!(
                stream = %self.config.stream_name,
                %error,
                "could not apply the retention or replicas to the JetStream stream (allow $JS.API.STREAM.UPDATE.<stream> to the relay's NATS user; replicas need a JetStream cluster of at least that many servers); publishing on its current configuration"
            );
            return Ok(stream);
        }
        self.jetstream
            .get_stream(&self.config.stream_name)
            .await
            .map_err(|e| self.nats_error("reading the JetStream stream", e))
    }

    fn nats_error(&self, doing: &str, error: impl std::fmt::Display) -> RelayError {
        RelayError::JetStream {
            relay: self.config.stream_name.clone(),
            doing: doing.to_owned(),
            message: error.to_string(),
        }
    }

    fn lock_key(&self) -> i64 {
        let digest =
            Sha256::digest(format!("neurectomy-relay:{}", self.config.stream_name).as_bytes());
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&digest[..8]);
        i64::from_be_bytes(bytes)
    }

    /// Runs until `shutdown`: waits for leadership, then publishes. Survives
    /// NATS and PostgreSQL outages by retrying with capped backoff.
    #[tracing::instrument(name = "relay", skip_all, fields(stream = %self.config.stream_name))]
    pub async fn run(&self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(self.config.max_backoff);
        loop {
            let Some(mut lock) = self.acquire_leadership(&shutdown).await else {
                return;
            };
            tracing::info!("relay is the leader");
            self.progress.send_modify(|p| p.leader = true);
            let sampling = CancellationToken::new();
            let sampler = tokio::spawn(sample_lag(
                self.store.clone(),
                self.progress.subscribe(),
                sampling.clone(),
            ));
            // Erased events' messages are deleted while leading.
            let purging = CancellationToken::new();
            let purger = tokio::spawn(crate::erasure::purge_loop(
                self.store.clone(),
                self.jetstream.clone(),
                self.config.stream_name.clone(),
                self.progress.subscribe(),
                purging.clone(),
            ));
            // The sealer follows the leader's reads for this term.
            let (feed, sealing) = match &self.sealer {
                Some(sealer) => {
                    let (feed, batches) = tokio::sync::mpsc::channel(SEAL_FEED);
                    let stop = CancellationToken::new();
                    let task = tokio::spawn({
                        let (sealer, stop) = (sealer.clone(), stop.clone());
                        async move { sealer.run(batches, stop).await }
                    });
                    (Some(feed), Some((stop, task)))
                }
                None => (None, None),
            };
            let end = self.lead(&mut lock, &shutdown, feed.as_ref()).await;
            drop(feed);
            if let Some((stop, task)) = sealing {
                // It seals its open block, then stops; bounded, so a
                // PostgreSQL outage cannot hold the relay here.
                stop.cancel();
                if tokio::time::timeout(SEAL_STOP, task).await.is_err() {
                    tracing::warn!("the sealer did not stop in time; its open block is sealed by the next leader");
                }
            }
            sampling.cancel();
            let _ = sampler.await;
            purging.cancel();
            let _ = purger.await;
            self.progress.send_modify(|p| p.leader = false);
            match end {
                TermEnd::Shutdown => {
                    if let Err(error) = self.checkpoint(&mut lock).await {
                        tracing::warn!(%error, "could not write the final relay checkpoint");
                    }
                    // Closing the connection releases the advisory lock at once.
                    let _ = lock.close().await;
                    return;
                }
                TermEnd::LostLock(error) => {
                    tracing::warn!(%error, "lost the leadership connection; standing by");
                    if backoff.wait(&shutdown).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Blocks until this relay holds the advisory lock (or shutdown).
    async fn acquire_leadership(&self, shutdown: &CancellationToken) -> Option<PgConnection> {
        let options = self.store.pool().connect_options();
        let mut announced = false;
        loop {
            let attempt = async {
                let mut conn = PgConnection::connect_with(&options).await?;
                let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                    .bind(self.lock_key())
                    .fetch_one(&mut conn)
                    .await?;
                Ok::<_, sqlx::Error>(locked.then_some(conn))
            };
            // Bounded like every other PostgreSQL call of this process: a
            // connection attempt to a server that does not answer is given up
            // after the pool's acquire timeout, and tried again.
            let timeout = self.store.pool().options().get_acquire_timeout();
            let attempt = async {
                tokio::time::timeout(timeout, attempt)
                    .await
                    .unwrap_or(Err(sqlx::Error::PoolTimedOut))
            };
            match attempt.await {
                Ok(Some(conn)) => return Some(conn),
                Ok(None) if !announced => {
                    tracing::info!("another relay is active; standing by");
                    announced = true;
                }
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(%error, "cannot reach PostgreSQL to take relay leadership")
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return None,
                () = tokio::time::sleep(self.config.standby_poll) => {}
            }
        }
    }

    /// One leadership term.
    async fn lead(
        &self,
        lock: &mut PgConnection,
        shutdown: &CancellationToken,
        seal_feed: Option<&tokio::sync::mpsc::Sender<Feed>>,
    ) -> TermEnd {
        let mut wake = self.store.commits();
        let mut listener = self.listen().await;
        let mut backoff = Backoff::new(self.config.max_backoff);
        let mut report = Reporter::new(self.config.report_every);

        let (mut position, mut sequence, mut chain) =
            match self.resync(lock, &mut backoff, shutdown).await {
                Ok(found) => found,
                Err(end) => return end,
            };
        tracing::info!(position, sequence, "relay resumes");
        let mut checkpointed = Instant::now();

        loop {
            if shutdown.is_cancelled() {
                return TermEnd::Shutdown;
            }
            // JetStream itself records how far the relay got (its last
            // message), so the PostgreSQL checkpoint is a fallback and need
            // not cost a commit per batch. Writing it on the lock connection
            // also proves the lock is still held.
            if checkpointed.elapsed() >= self.config.checkpoint_every {
                if let Err(error) = self.checkpoint(lock).await {
                    return TermEnd::LostLock(error);
                }
                checkpointed = Instant::now();
            }
            wake.borrow_and_update();
            let limit = i64::try_from(self.config.batch_size).unwrap_or(1000);
            let batch = match self.store.read_all(position, limit).await {
                Ok(batch) => batch,
                Err(error) => {
                    tracing::warn!(error = %error, "cannot read the event store; retrying");
                    if backoff.wait(shutdown).await.is_err() {
                        return TermEnd::Shutdown;
                    }
                    continue;
                }
            };
            if batch.is_empty() {
                report.maybe_log(&self.store, position).await;
                tokio::select! {
                    () = shutdown.cancelled() => return TermEnd::Shutdown,
                    _ = wake.changed() => {}
                    notified = recv(&mut listener) => if let Err(error) = notified {
                        tracing::warn!(%error, "lost the NOTIFY listener; polling until it is back");
                        listener = None;
                    },
                    () = tokio::time::sleep(self.config.idle_poll) => {
                        if listener.is_none() { listener = self.listen().await; }
                    }
                }
                continue;
            }

            let batch: std::sync::Arc<[RecordedEvent]> = batch.into();
            if let Some(feed) = seal_feed {
                // Full: the sealer reads these from the store when it gets
                // to them.
                let _ = feed.try_send(Feed {
                    after: position,
                    events: batch.clone(),
                });
            }
            let started = Instant::now();
            let holding = self.in_hand.hold(batch.len());
            let published = self.publish(&batch, sequence, &mut chain).await;
            drop(holding);
            match published {
                Ok(last_sequence) => {
                    metrics::histogram!("neurectomy_relay_publish_seconds")
                        .record(started.elapsed().as_secs_f64());
                    backoff.reset();
                    position = batch.last().map_or(position, |e| e.position);
                    sequence = last_sequence;
                    let count = batch.len() as u64;
                    self.progress.send_modify(|p| {
                        p.position = position;
                        p.jetstream_sequence = sequence;
                        p.published += count;
                    });
                    report.published(count);
                    tracing::debug!(
                        count,
                        position,
                        elapsed_us = started.elapsed().as_micros() as u64,
                        "batch published"
                    );
                }
                Err(Interrupted {
                    acknowledged,
                    failure,
                }) => {
                    // What JetStream acknowledged before the failure is
                    // published (resynchronizing finds it there too).
                    if let Some(last) = acknowledged.checked_sub(1).and_then(|i| batch.get(i)) {
                        let count = acknowledged as u64;
                        self.progress.send_modify(|p| {
                            p.position = last.position;
                            p.jetstream_sequence = sequence + count;
                            p.published += count;
                            p.interrupted += 1;
                        });
                        report.published(count);
                    }
                    tracing::warn!(
                        %failure,
                        acknowledged,
                        of = batch.len(),
                        "publishing failed; resynchronizing with JetStream"
                    );
                    if backoff.wait(shutdown).await.is_err() {
                        return TermEnd::Shutdown;
                    }
                    match self.resync(lock, &mut backoff, shutdown).await {
                        Ok(found) => (position, sequence, chain) = found,
                        Err(end) => return end,
                    }
                }
            }
        }
    }

    /// Stores the acknowledged position and sequence (from `progress`) as
    /// the PostgreSQL checkpoint, on the leadership connection.
    async fn checkpoint(&self, lock: &mut PgConnection) -> Result<(), sqlx::Error> {
        let progress = *self.progress.borrow();
        if progress.jetstream_sequence == 0 {
            return Ok(());
        }
        sqlx::query(CHECKPOINT_PUT)
            .bind(&self.config.stream_name)
            .bind(progress.position)
            .bind(i64::try_from(progress.jetstream_sequence).unwrap_or(i64::MAX))
            .execute(lock)
            .await
            .map(|_| ())
    }

    async fn listen(&self) -> Option<PgListener> {
        let result = async {
            let mut listener = PgListener::connect_with(self.store.pool()).await?;
            listener.listen(COMMIT_CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        }
        .await;
        match result {
            Ok(listener) => Some(listener),
            Err(error) => {
                tracing::warn!(%error, "cannot LISTEN for commits; polling instead");
                None
            }
        }
    }

    /// [`Relay::synchronize`], retried with backoff until it succeeds, and
    /// published as progress; ends the term on a lost lock or shutdown.
    async fn resync(
        &self,
        lock: &mut PgConnection,
        backoff: &mut Backoff,
        shutdown: &CancellationToken,
    ) -> Result<(i64, u64, Chain), TermEnd> {
        loop {
            match self.synchronize(lock).await {
                Ok((position, sequence)) => {
                    let chain = match self.chain_at(position).await {
                        Ok(chain) => chain,
                        Err(error) => {
                            tracing::warn!(%error, "cannot read the partitions' last events; retrying");
                            if backoff.wait(shutdown).await.is_err() {
                                return Err(TermEnd::Shutdown);
                            }
                            continue;
                        }
                    };
                    self.progress.send_modify(|p| {
                        p.position = position;
                        p.jetstream_sequence = sequence;
                    });
                    return Ok((position, sequence, chain));
                }
                Err(Sync::Lock(error)) => return Err(TermEnd::LostLock(error)),
                Err(Sync::Other(error)) => {
                    tracing::warn!(%error, "cannot synchronize with JetStream yet; retrying");
                    if backoff.wait(shutdown).await.is_err() {
                        return Err(TermEnd::Shutdown);
                    }
                }
            }
        }
    }

    /// Finds where to continue: after the position of the last message the
    /// relay published (walking back past anything else, at most down to
    /// the checkpoint's sequence), or after the checkpoint when none is left
    /// there (from the start when the checkpoint is from an earlier stream
    /// of that name). Returns the position and the JetStream sequence to
    /// chain on: the stream's real last sequence, whoever published it.
    async fn synchronize(&self, lock: &mut PgConnection) -> Result<(i64, u64), Sync> {
        let checkpoint: Option<(i64, i64)> = sqlx::query_as(CHECKPOINT_GET)
            .bind(&self.config.stream_name)
            .fetch_optional(&mut *lock)
            .await
            .map_err(Sync::Lock)?;
        let stream = self
            .ensure_stream()
            .await
            .map_err(|e| Sync::Other(e.to_string()))?;
        let info = stream
            .get_info()
            .await
            .map_err(|e| Sync::Other(format!("reading stream info: {e}")))?;
        let (first_sequence, last_sequence) = (info.state.first_sequence, info.state.last_sequence);
        let (checkpoint_position, checkpoint_sequence) =
            checkpoint.map_or((0, 0), |(p, s)| (p, u64::try_from(s).unwrap_or(0)));
        if last_sequence == 0 {
            if checkpoint_position > 0 {
                tracing::warn!(
                    checkpoint_position,
                    "the JetStream stream is empty but events were published before; republishing the whole log"
                );
            }
            return Ok((0, 0));
        }
        // Everything the relay published at or below the checkpoint's
        // sequence is at or below the checkpoint's position, so the walk
        // need not go below it (while it is still in the stream).
        let floor = if (first_sequence..=last_sequence).contains(&checkpoint_sequence) {
            checkpoint_sequence
        } else {
            first_sequence.max(1)
        };
        // Sequences never go down in a stream: a checkpoint beyond its last
        // one was taken in an earlier stream of that name (deleted and
        // created anew), which holds none of what it counts.
        let fallback = if checkpoint_sequence <= last_sequence {
            checkpoint_position
        } else {
            0
        };
        let walk = self.walk_back(&stream, floor, last_sequence).await?;
        if walk.passed_over > 0 {
            let (sequence, subject) = walk.newest_foreign.unwrap_or_default();
            tracing::warn!(
                passed_over = walk.passed_over,
                newest_sequence = sequence,
                newest_subject = %subject,
                "messages the relay did not publish are on its subjects (another publisher: see the NATS permissions in deploy/nats.conf); passing over them"
            );
            let passed_over = walk.passed_over;
            self.progress.send_modify(|p| p.passed_over += passed_over);
        }
        match walk.found {
            Some((sequence, position)) => {
                if sequence < last_sequence {
                    tracing::info!(
                        sequence,
                        position,
                        last_sequence,
                        "continuing after the relay's last message, below the stream's last"
                    );
                }
                Ok((position, last_sequence))
            }
            None => {
                tracing::warn!(
                    floor,
                    last_sequence,
                    checkpoint_position,
                    checkpoint_sequence,
                    fallback,
                    "no message of the relay in JetStream from the walk's floor up; continuing after the fallback position (the checkpoint's, or 0 when the checkpoint is from an earlier stream)"
                );
                Ok((fallback, last_sequence))
            }
        }
    }

    /// Walks down from `last` to `floor` (both included) to the first
    /// message the relay published: its [`stamp`] names the event the store
    /// holds at that position. Deleted sequences are stepped over.
    async fn walk_back(&self, stream: &Stream, floor: u64, last: u64) -> Result<Walk, Sync> {
        let mut walk = Walk::default();
        if floor > last {
            return Ok(walk);
        }
        // The last message is the relay's unless something else published:
        // read it alone, then the rest a few at a time.
        let get = |sequence: u64| async move { (sequence, stream.get_raw_message(sequence).await) };
        let mut messages = futures::stream::once(get(last))
            .chain(
                futures::stream::iter((floor..last).rev())
                    .map(get)
                    .buffered(WALK_AHEAD),
            )
            .boxed();
        while let Some((sequence, message)) = messages.next().await {
            let message = match message {
                Ok(message) => message,
                Err(error) if error.kind() == RawMessageErrorKind::NoMessageFound => continue,
                Err(error) => {
                    return Err(Sync::Other(format!(
                        "reading JetStream message {sequence}: {error}"
                    )))
                }
            };
            if let Some(stamp) = stamp(&message.headers) {
                if self.recorded(stamp).await? {
                    walk.found = Some((sequence, stamp.position));
                    return Ok(walk);
                }
            }
            walk.passed_over += 1;
            walk.newest_foreign
                .get_or_insert_with(|| (sequence, message.subject.to_string()));
        }
        Ok(walk)
    }

    /// Whether the store holds the event `stamp` names, at its position.
    async fn recorded(&self, stamp: Stamp) -> Result<bool, Sync> {
        let events = self
            .store
            .read_positions(&[stamp.position])
            .await
            .map_err(|e| Sync::Other(e.to_string()))?;
        Ok(events
            .first()
            .is_some_and(|e| e.position == stamp.position && e.event_id == stamp.event_id))
    }

    /// The partitions' chain after `position` (every event up to it is in
    /// the stream): each partition's last event at or below it, from the
    /// store. Empty for a stream of one partition.
    async fn chain_at(&self, position: i64) -> Result<Chain, crate::ReadError> {
        let partitions = self.config.partitions;
        let mut previous = Vec::new();
        if partitions > 1 {
            for partition in 0..partitions {
                previous.push(
                    self.store
                        .last_in_partition(position, partitions, partition)
                        .await?,
                );
            }
        }
        Ok(Chain { previous })
    }

    /// Publishes a batch pipelined, chaining expected sequences from
    /// `sequence`, then awaits every acknowledgement. Returns the sequence of
    /// the last message. On a stream of several partitions, each message
    /// names the previous event of its partition (`chain`, moved on once
    /// every message is acknowledged).
    async fn publish(
        &self,
        batch: &[RecordedEvent],
        sequence: u64,
        chain: &mut Chain,
    ) -> Result<u64, Interrupted> {
        let failed = |acknowledged: usize| {
            move |failure: PublishFailure| Interrupted {
                acknowledged,
                failure,
            }
        };
        let mut acks: Vec<PublishAckFuture> = Vec::with_capacity(batch.len());
        let partitions = self.config.partitions;
        let mut next = chain.clone();
        // One span per event of a sampled trace, from its send to the batch's
        // acknowledgements (they end when dropped), in the event's trace.
        let mut spans = Vec::new();
        for (offset, event) in batch.iter().enumerate() {
            spans.extend(crate::trace::follow(
                event.metadata.traceparent.as_deref(),
                || {
                    tracing::info_span!(
                        parent: None,
                        "relay.publish",
                        "otel.kind" = "producer",
                        position = event.position,
                        event_type = %event.event_type,
                    )
                },
            ));
            let partition = crate::partition::of(&event.metadata.tenant, partitions);
            let subject = crate::partition::subject(
                &self.config.subject_prefix,
                partitions,
                partition,
                event.kind(),
                &event.event_type,
            );
            let payload = serde_json::to_vec(event)
                .map_err(|e| PublishFailure::Nats(e.to_string()))
                .map_err(failed(0))?;
            let mut headers = HeaderMap::new();
            headers.insert(HEADER_POSITION, event.position.to_string().as_str());
            headers.insert(HEADER_STREAM_ID, event.stream_id.as_str());
            headers.insert(
                HEADER_STREAM_VERSION,
                event.stream_version.to_string().as_str(),
            );
            headers.insert(HEADER_EVENT_TYPE, event.event_type.as_str());
            headers.insert(
                HEADER_SCHEMA_VERSION,
                event.schema_version.to_string().as_str(),
            );
            headers.insert(HEADER_TENANT, event.metadata.tenant.as_str());
            if let Some(traceparent) = &event.metadata.traceparent {
                headers.insert(HEADER_TRACEPARENT, traceparent.as_str());
            }
            if let Some(previous) = next.previous.get_mut(partition as usize) {
                headers.insert(
                    crate::partition::HEADER_PARTITION_PREVIOUS,
                    previous.to_string().as_str(),
                );
                *previous = event.position;
            }
            let mut message = jetstream::message::PublishMessage::build()
                .payload(payload.into())
                .headers(headers)
                .message_id(event.event_id.to_string())
                .expected_last_sequence(sequence + offset as u64);
            // Chained on the previous event's id too: if that publish was
            // rejected, so is this one, even when something else's message
            // has taken the sequence it expects (see the module docs). Not
            // on a batch's first message: the server keeps the last id only
            // in memory.
            if let Some(previous) = offset.checked_sub(1).and_then(|i| batch.get(i)) {
                message = message.expected_last_message_id(previous.event_id.to_string());
            }
            let ack = self
                .jetstream
                .send_publish(subject, message)
                .await
                .map_err(|e| PublishFailure::Nats(e.to_string()))
                .map_err(failed(0))?;
            acks.push(ack);
        }
        let mut expected = sequence;
        for (acknowledged, ack) in acks.into_iter().enumerate() {
            let ack = ack
                .await
                .map_err(|e| PublishFailure::Nats(e.to_string()))
                .map_err(failed(acknowledged))?;
            expected += 1;
            if ack.duplicate || ack.sequence != expected {
                return Err(failed(acknowledged)(PublishFailure::OutOfSync {
                    expected,
                    got: ack.sequence,
                    duplicate: ack.duplicate,
                }));
            }
        }
        drop(spans);
        *chain = next;
        Ok(expected)
    }
}

/// What a walk back through the stream found.
#[derive(Debug, Default)]
struct Walk {
    /// Sequence and position of the relay's last message, if any.
    found: Option<(u64, i64)>,
    /// Messages above it that the relay did not publish.
    passed_over: u64,
    /// Sequence and subject of the newest of those.
    newest_foreign: Option<(u64, String)>,
}

/// Why synchronizing failed.
enum Sync {
    /// The leadership connection failed.
    Lock(sqlx::Error),
    /// JetStream is unreachable or inconsistent.
    Other(String),
}

/// Samples the leader's lag every [`LAG_SAMPLE_EVERY`] until `stop` (the
/// end of the leadership term), then reports 0: only the leader's counts.
/// A task of its own, so that counting never delays a batch.
async fn sample_lag(
    store: EventStore,
    progress: watch::Receiver<RelayProgress>,
    stop: CancellationToken,
) {
    let gauge = metrics::gauge!("neurectomy_relay_lag_events");
    let mut pause = LAG_SAMPLE_EVERY;
    loop {
        // The first sample waits too: until the term has resynchronized,
        // the position is not known.
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(pause) => {}
        }
        let position = progress.borrow().position;
        let started = Instant::now();
        match store.lag(position).await {
            Ok(lag) => gauge.set(lag.events as f64),
            Err(error) => tracing::debug!(%error, "could not sample the relay's lag"),
        }
        // A sample counts at most `EXACT_LAG` index entries, then asks the
        // planner; should even that be slow, sample less often, so that it
        // never costs more than ~5 % of a core.
        pause = LAG_SAMPLE_EVERY.max(started.elapsed() * 20);
    }
    gauge.set(0.0);
}

async fn recv(listener: &mut Option<PgListener>) -> Result<(), sqlx::Error> {
    match listener {
        Some(l) => l.recv().await.map(|_| ()),
        None => std::future::pending().await,
    }
}

/// Each partition's last event in the stream (see [`crate::partition`]):
/// what the next message of a partition names as its previous one. Empty on
/// a stream of one partition.
#[derive(Debug, Clone, Default)]
struct Chain {
    previous: Vec<i64>,
}

/// Capped exponential backoff, cancellable.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(max: Duration) -> Self {
        Self {
            next: Duration::from_millis(50),
            max,
        }
    }
    fn reset(&mut self) {
        self.next = Duration::from_millis(50);
    }
    /// Sleeps; `Err` if shutdown was requested meanwhile.
    async fn wait(&mut self, shutdown: &CancellationToken) -> Result<(), ()> {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        tokio::select! {
            () = shutdown.cancelled() => Err(()),
            () = tokio::time::sleep(delay) => Ok(()),
        }
    }
}

/// Periodic progress and lag log.
struct Reporter {
    every: Duration,
    last: Instant,
    count: u64,
}

impl Reporter {
    fn new(every: Duration) -> Self {
        Self {
            every,
            last: Instant::now(),
            count: 0,
        }
    }
    fn published(&mut self, n: u64) {
        self.count += n;
    }
    async fn maybe_log(&mut self, store: &EventStore, position: i64) {
        let elapsed = self.last.elapsed();
        if elapsed < self.every {
            return;
        }
        let lag = store.count_after(position, 1_000_000).await.unwrap_or(-1);
        let rate = self.count as f64 / elapsed.as_secs_f64();
        tracing::info!(
            position,
            lag_events = lag,
            events_per_sec = format!("{rate:.0}"),
            "relay progress"
        );
        self.count = 0;
        self.last = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The headers the relay sets on an event's message (`traceparent`
    /// aside).
    fn relay_headers(event_id: Uuid) -> Vec<(&'static str, String)> {
        vec![
            (HEADER_MESSAGE_ID, event_id.to_string()),
            (HEADER_POSITION, "4295032832".to_owned()),
            (HEADER_STREAM_ID, format!("task-{event_id}")),
            (HEADER_STREAM_VERSION, "3".to_owned()),
            (HEADER_EVENT_TYPE, "TaskStarted".to_owned()),
            (HEADER_SCHEMA_VERSION, "1".to_owned()),
            (HEADER_TENANT, "acme".to_owned()),
        ]
    }

    fn map(headers: &[(&'static str, String)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, value.as_str());
        }
        map
    }

    #[test]
    fn a_message_with_every_relay_header_is_stamped() {
        let id = Uuid::new_v4();
        assert_eq!(
            stamp(&map(&relay_headers(id))),
            Some(Stamp {
                position: 4_295_032_832,
                event_id: id,
            })
        );
    }

    #[test]
    fn a_message_missing_any_relay_header_or_with_a_bad_value_is_foreign() {
        let id = Uuid::new_v4();
        let all = relay_headers(id);
        assert_eq!(stamp(&HeaderMap::new()), None);
        for missing in 0..all.len() {
            let mut headers = all.clone();
            let (name, _) = headers.remove(missing);
            assert_eq!(stamp(&map(&headers)), None, "without {name}");
        }
        for (name, bad) in [
            (HEADER_POSITION, "9e9"),
            (HEADER_MESSAGE_ID, "not-a-uuid"),
            (HEADER_STREAM_VERSION, "three"),
            (HEADER_SCHEMA_VERSION, ""),
        ] {
            let mut headers = all.clone();
            for (n, value) in &mut headers {
                if *n == name {
                    *value = bad.to_owned();
                }
            }
            assert_eq!(stamp(&map(&headers)), None, "{name}: {bad:?}");
        }
    }
}
