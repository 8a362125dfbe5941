//! The projector loop: catch up from the event store, then consume the
//! JetStream stream from the first message after the checkpoint, applying
//! batches in order and acknowledging them only once applied.
//!
//! Shutdown is seen between batches: the batch in hand is applied (with its
//! checkpoint) and acknowledged first ([`Projector::in_hand`] reports it).
//! Each applied batch records `neurectomy_projector_batch_events` and
//! `neurectomy_projector_apply_seconds` (label `projection`).
//!
//! What the consumer may deliver besides the next event, and what happens:
//!
//! - **A foreign message** (anything without the relay's headers, see
//!   [`commands::relay::stamp`]: something else published on the relay's
//!   subjects) is passed over: acknowledged with its batch, logged once at
//!   warn with its sequence and subject, counted in
//!   `neurectomy_projector_foreign_messages_total`. A message *with* the
//!   relay's headers whose body is not the event they describe is the
//!   relay's own data gone bad: the projection stops there.
//! - **A redelivery** (a sequence below the next one expected: its
//!   acknowledgement was lost, e.g. in a NATS restart, or came after the
//!   consumer's ack wait) was applied already and is skipped.
//! - **A gap** (a sequence above the next one expected: messages deleted
//!   from the stream) sends the projector back to the event store, from its
//!   checkpoint.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::stream::RawMessageErrorKind;
use async_nats::jetstream::{self, consumer::pull, consumer::AckPolicy, consumer::DeliverPolicy};
use commands::relay::Stamp;
use commands::{EventStore, InHand, ReadError, RecordedEvent};
use domain::DomainEvent;
use futures::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::lease::Leases;
use crate::model::{ApplyError, Fence, Projected, ReadModel};

/// Catch-up batches read from the event store at once. One: with catch-up
/// batches of thousands of events, a read's fixed cost is already spread
/// thin, and a larger first page (which nothing overlaps) costs more than
/// it saves.
const BATCHES_PER_PAGE: usize = 1;

/// How often an idle live projector checks that its read model still holds
/// its checkpoint.
const MODEL_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Configuration of one projector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectorConfig {
    /// JetStream stream the relay publishes to.
    pub stream_name: String,
    /// Most events applied in one atomic write.
    pub batch_size: usize,
    /// Longest wait for a batch to fill before applying what arrived; zero
    /// applies what is already buffered at once (lowest latency; under load
    /// the client buffers whole pulls, so batches still form).
    pub linger: Duration,
    /// Longest wait between retries after transient failures.
    pub max_backoff: Duration,
    /// How long JetStream waits for a delivered message's acknowledgement
    /// before it delivers the message again (the consumer's `ack_wait`).
    pub ack_wait: Duration,
    /// Partitions of the stream (`commands::partition`; 1: not split).
    pub partitions: u32,
    /// The partition this projector applies (below `partitions`): it reads
    /// only that partition of the store and consumes only its subjects, and
    /// its model must keep that partition's checkpoint
    /// ([`crate::RedisModel::for_partition`]).
    pub partition: u32,
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        Self {
            stream_name: "NEURECTOMY_EVENTS".to_owned(),
            batch_size: 500,
            linger: Duration::ZERO,
            // A store that is back is used again within a second.
            max_backoff: Duration::from_secs(1),
            ack_wait: Duration::from_secs(30),
            partitions: 1,
            partition: 0,
        }
    }
}

/// What a projector is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProjectorState {
    /// Not started yet.
    Starting,
    /// Waiting for the projection's lease, which another process holds
    /// (see [`crate::lease`]).
    Standby,
    /// Reading the event store to catch up.
    CatchingUp,
    /// Consuming JetStream.
    Live,
    /// Waiting to retry after a transient failure.
    Retrying,
    /// Stopped on an event it cannot apply; needs an operator.
    Stopped,
}

/// A projector's status, for `neurectomy status` and health checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectorStatus {
    /// Projection name.
    pub name: String,
    /// State.
    pub state: ProjectorState,
    /// Last applied position.
    pub checkpoint: i64,
    /// Events applied by this process.
    pub applied: u64,
    /// The last error, if any (kept after recovery for context).
    pub last_error: Option<String>,
    /// Messages without the relay's headers passed over by this process
    /// (each counted once).
    pub foreign: u64,
    /// Redelivered messages skipped by this process (applied before).
    pub redelivered: u64,
    /// Times this process went back to the event store because JetStream
    /// skipped sequences.
    pub gaps: u64,
    /// This process's name in the lease table, when it runs under a lease.
    pub owner: Option<String>,
    /// The fencing token of the lease while this process holds it.
    pub token: Option<u64>,
    /// While live: the messages of its consumer JetStream still had to
    /// deliver after the last batch (its lag behind the stream, exact per
    /// partition); `None` while catching up or stopped.
    pub pending: Option<u64>,
}

/// Why a projector stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum ProjectorError {
    /// An event cannot be decoded or applied; the projection stops there.
    #[error("projection {name} stopped at position {position} ({event_type}): {reason}")]
    Stopped {
        /// Projection.
        name: String,
        /// Position of the offending event.
        position: i64,
        /// Its type.
        event_type: String,
        /// Why.
        reason: String,
    },
    /// A catch-up ([`Projector::catch_up`]) could not finish.
    #[error("catching up projection {name} was interrupted: {reason}")]
    Interrupted {
        /// Projection.
        name: String,
        /// Why.
        reason: String,
    },
}

/// Why one pass of the loop ended.
enum Interrupt {
    /// Shutdown requested.
    Shutdown,
    /// JetStream skipped a sequence: go back to the event store.
    Gap,
    /// Something failed that retrying may fix.
    Transient(String),
    /// The read model holds a newer lease's token: the lease is over.
    Fenced(String),
    /// Stop for good.
    Fatal(ProjectorError),
}

/// A page of the log, decoded up to its first event that does not decode.
struct Page {
    /// Rows read.
    read: i64,
    /// Position of the last row read.
    last: Option<i64>,
    /// The events before the first that does not decode, in order.
    events: Vec<Projected>,
    /// The first event that does not decode, and why (the rest is dropped).
    undecodable: Option<(RecordedEvent, String)>,
}

impl Page {
    /// Reads at most `limit` events of `partition` of `partitions` after
    /// `after` and decodes them.
    async fn read(
        store: &EventStore,
        (partitions, partition): (u32, u32),
        after: i64,
        limit: i64,
    ) -> Result<Page, ReadError> {
        let rows = if partitions > 1 {
            store
                .read_partition(after, limit, partitions, partition)
                .await?
        } else {
            store.read_all(after, limit).await?
        };
        let read = rows.len() as i64;
        let last = rows.last().map(|e| e.position);
        Ok(Page {
            read,
            last,
            ..Page::decode(rows)
        })
    }

    /// Decodes events in order, stopping at the first that does not decode.
    fn decode(rows: impl IntoIterator<Item = RecordedEvent>) -> Page {
        let rows = rows.into_iter();
        let mut events = Vec::with_capacity(rows.size_hint().0);
        let mut undecodable = None;
        for recorded in rows {
            match DomainEvent::from_stored(
                &recorded.event_type,
                recorded.schema_version,
                recorded.data.clone(),
            ) {
                Ok(event) => events.push(Projected::new(recorded, event)),
                Err(error) => {
                    undecodable = Some((recorded, error.to_string()));
                    break;
                }
            }
        }
        Page {
            read: 0,
            last: None,
            events,
            undecodable,
        }
    }
}

/// Drives one read model.
pub struct Projector<M> {
    model: M,
    store: EventStore,
    jetstream: jetstream::Context,
    config: ProjectorConfig,
    status: watch::Sender<ProjectorStatus>,
    /// The batch being applied and acknowledged, for shutdown reports.
    in_hand: InHand,
    /// Highest stream sequence of a foreign message counted and logged, so
    /// that a pass starting again below it does not count it twice.
    foreign_seen: AtomicU64,
    /// The projection's leases, when more than one process may run it.
    leases: Option<Leases>,
}

impl<M: ReadModel> Projector<M> {
    /// A projector feeding `model` from `store` and JetStream.
    pub fn new(
        model: M,
        store: EventStore,
        client: async_nats::Client,
        config: ProjectorConfig,
    ) -> Self {
        // A partition's projector reports under a name of its own.
        let name = if config.partitions > 1 {
            format!("{}/p{}", model.name(), config.partition)
        } else {
            model.name().to_owned()
        };
        let status = ProjectorStatus {
            name,
            state: ProjectorState::Starting,
            checkpoint: 0,
            applied: 0,
            last_error: None,
            foreign: 0,
            redelivered: 0,
            gaps: 0,
            owner: None,
            token: None,
            pending: None,
        };
        let (status, _) = watch::channel(status);
        Self {
            model,
            store,
            jetstream: jetstream::new(client),
            config,
            status,
            in_hand: InHand::default(),
            foreign_seen: AtomicU64::new(0),
            leases: None,
        }
    }

    /// Runs the projection only while holding its lease (partition 0 of
    /// `leases`), standing by otherwise, and writes every batch fenced by
    /// the lease's token: any number of processes may then run it.
    #[must_use]
    pub fn with_leases(mut self, leases: Leases) -> Self {
        self.status
            .send_modify(|s| s.owner = Some(leases.owner().to_owned()));
        self.leases = Some(leases);
        self
    }

    /// Events of the batch being applied and acknowledged now (0 between
    /// batches).
    pub fn in_hand(&self) -> InHand {
        self.in_hand.clone()
    }

    /// Status updates.
    pub fn status(&self) -> watch::Receiver<ProjectorStatus> {
        self.status.subscribe()
    }

    /// The read model.
    pub fn model(&self) -> &M {
        &self.model
    }

    fn consumer_name(&self) -> String {
        if self.config.partitions > 1 {
            format!(
                "projection-{}-p{}",
                self.model.name(),
                self.config.partition
            )
        } else {
            format!("projection-{}", self.model.name())
        }
    }

    /// Runs until shutdown, or until an event cannot be applied. With
    /// leases ([`Projector::with_leases`]), applies only while holding the
    /// lease of its partition and stands by otherwise; hands the lease over
    /// when its process holds more than its fair share.
    #[tracing::instrument(name = "projector", skip_all, fields(projection = %self.model.name()))]
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), ProjectorError> {
        // Exported from the start, at 0, so that an alert can watch it grow.
        self.foreign_counter().increment(0);
        let Some(leases) = self.leases.clone() else {
            return self.drive(&shutdown, None).await;
        };
        let partition = self.config.partition;
        let row = i32::try_from(partition).unwrap_or(i32::MAX);
        loop {
            let Some((token, asked)) = self.stand_by(&leases, &shutdown).await else {
                return Ok(());
            };
            leases.took(partition);
            tracing::info!(
                token,
                owner = leases.owner(),
                "holding the projection's lease: applying"
            );
            self.status.send_modify(|s| {
                s.token = Some(token);
                s.state = ProjectorState::Starting;
            });
            // Cancelled by shutdown, by the keeper when the lease cannot be
            // renewed in time, or here when the lease turns out to be over.
            let held = shutdown.child_token();
            // Stops the keeper however this future ends, dropped included
            // (an aborted task must not go on renewing a lease it no longer
            // uses).
            let _stop_keeper = held.clone().drop_guard();
            let keeper = tokio::spawn(keep(
                leases.clone(),
                (partition, token),
                asked,
                held.clone(),
            ));
            let ended = self.drive(&held, Some(Fence(token))).await;
            held.cancel();
            let handed_over = matches!(keeper.await, Ok(Kept::HandedOver));
            self.status.send_modify(|s| s.token = None);
            let stops = shutdown.is_cancelled() || ended.is_err();
            if stops || handed_over {
                // A clean stop hands the lease over at once; so does a
                // projection stopped at an event (another process stops
                // there too, with the same report), and a rebalance.
                if let Err(error) = leases.release(row, token).await {
                    tracing::warn!(%error, "could not release the projection's lease; it expires on its own");
                }
            }
            leases.gave_up(partition);
            if stops {
                return ended;
            }
            if handed_over {
                tracing::info!(
                    token,
                    partition,
                    "handed the partition over: this process held more than its share"
                );
            } else {
                tracing::warn!(
                    token,
                    "this process's lease of the projection is over; standing by"
                );
            }
        }
    }

    /// Asks for the lease until it is this process's (its token, and when
    /// it was asked for), or shutdown (`None`).
    async fn stand_by(
        &self,
        leases: &Leases,
        shutdown: &CancellationToken,
    ) -> Option<(u64, Instant)> {
        let mut reported = false;
        let row = i32::try_from(self.config.partition).unwrap_or(i32::MAX);
        loop {
            let asked = Instant::now();
            if !leases.may_take() {
                // Holding its fair share already: leave this one to others.
                self.status
                    .send_modify(|s| s.state = ProjectorState::Standby);
                tokio::select! {
                    () = shutdown.cancelled() => return None,
                    () = tokio::time::sleep(leases.standby_poll()) => {}
                }
                continue;
            }
            match leases.try_acquire(row).await {
                Ok(Some(token)) => return Some((token, asked)),
                Ok(None) => {
                    if !reported {
                        tracing::info!(
                            owner = leases.owner(),
                            "another process holds the projection's lease: standing by"
                        );
                        reported = true;
                    }
                    self.status
                        .send_modify(|s| s.state = ProjectorState::Standby);
                }
                Err(error) => {
                    tracing::warn!(%error, "could not ask for the projection's lease; retrying");
                    self.status.send_modify(|s| {
                        s.state = ProjectorState::Standby;
                        s.last_error = Some(error.to_string());
                    });
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return None,
                () = tokio::time::sleep(leases.standby_poll()) => {}
            }
        }
    }

    /// Applies the projection until `stop` is cancelled (or, with a fence,
    /// the read model holds a newer one), or until an event cannot be
    /// applied.
    async fn drive(
        &self,
        stop: &CancellationToken,
        fence: Option<Fence>,
    ) -> Result<(), ProjectorError> {
        let mut delay = Duration::from_millis(50);
        loop {
            match self.pass(stop, fence).await {
                Interrupt::Shutdown => return Ok(()),
                Interrupt::Fenced(reason) => {
                    tracing::warn!(%reason, "a newer lease holder wrote to the read model");
                    self.status.send_modify(|s| s.last_error = Some(reason));
                    return Ok(());
                }
                Interrupt::Gap => {
                    self.status.send_modify(|s| s.gaps += 1);
                    tracing::info!("resuming from the read model's checkpoint: catching up from the event store");
                }
                Interrupt::Transient(error) => {
                    tracing::warn!(%error, "projection interrupted; retrying");
                    self.status.send_modify(|s| {
                        s.state = ProjectorState::Retrying;
                        s.last_error = Some(error);
                    });
                    tokio::select! {
                        () = stop.cancelled() => return Ok(()),
                        () = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(self.config.max_backoff);
                }
                Interrupt::Fatal(error) => {
                    tracing::error!(%error, "projection stopped");
                    self.status.send_modify(|s| {
                        s.state = ProjectorState::Stopped;
                        s.last_error = Some(error.to_string());
                    });
                    return Err(error);
                }
            }
        }
    }

    /// Applies the event store from the model's checkpoint up to its
    /// readable head (the first half of every pass) and returns the
    /// checkpoint reached. For rebuilds (`replay`): transient store failures
    /// are retried as in a pass; shutdown or a failed read ends it with an
    /// error.
    pub async fn catch_up(&self, shutdown: &CancellationToken) -> Result<i64, ProjectorError> {
        let interrupted = |reason: String| ProjectorError::Interrupted {
            name: self.model.name().to_owned(),
            reason,
        };
        let checkpoint = self
            .model
            .checkpoint()
            .await
            .map_err(|error| interrupted(error.to_string()))?;
        match self.catch_up_from(checkpoint, None, shutdown).await {
            Ok(checkpoint) => Ok(checkpoint),
            Err(Interrupt::Fatal(error)) => Err(error),
            Err(Interrupt::Fenced(reason)) => Err(interrupted(reason)),
            Err(Interrupt::Shutdown) => Err(interrupted("shutdown was requested".to_owned())),
            Err(Interrupt::Gap) => Err(interrupted("the read model moved under it".to_owned())),
            Err(Interrupt::Transient(reason)) => Err(interrupted(reason)),
        }
    }

    /// Catches up from `checkpoint` to the store's readable head.
    async fn catch_up_from(
        &self,
        mut checkpoint: i64,
        fence: Option<Fence>,
        shutdown: &CancellationToken,
    ) -> Result<i64, Interrupt> {
        // The log is read in pages of catch-up batches, and reading page n+1
        // overlaps applying page n (they wait on different servers, and the
        // read, with the decoding of its events, runs as its own task so that
        // it can use another worker thread). Pages are large because a read's
        // cost is not only per row: the gap-safe query has a fixed part per
        // call. Page n+1 is read from page n's last position, which is where
        // the checkpoint is once page n is applied, so what is applied and
        // when the checkpoint moves are the same as reading batch by batch in
        // turn: batches of at most the catch-up batch size are applied
        // strictly in order, each after the previous one succeeded; a failed
        // apply discards the read-ahead.
        let batch_size = self
            .model
            .catch_up_batch_size()
            .unwrap_or(0)
            .max(self.config.batch_size)
            .max(1);
        let limit = i64::try_from(batch_size * BATCHES_PER_PAGE).unwrap_or(2000);
        let part = (self.config.partitions, self.config.partition);
        let mut read = Page::read(&self.store, part, checkpoint, limit).await;
        loop {
            if shutdown.is_cancelled() {
                return Err(Interrupt::Shutdown);
            }
            let page = match read {
                Ok(page) => page,
                Err(error) => return Err(Interrupt::Transient(error.to_string())),
            };
            let Some(last) = page.last else {
                break;
            };
            // Below a full page is the store's readable head: nothing to read
            // ahead, apply it and go live. The next page is decoded in its
            // task too, so decoding overlaps applying as well.
            let next = (page.read == limit).then(|| {
                let store = self.store.clone();
                tokio::spawn(async move { Page::read(&store, part, last, limit).await })
            });
            let abort = |next: Option<tokio::task::JoinHandle<_>>| {
                if let Some(next) = next {
                    next.abort();
                }
            };
            let decoded = page.events.len();
            let mut events = page.events.into_iter();
            let mut start = 0;
            while start < decoded || page.undecodable.is_some() {
                if shutdown.is_cancelled() {
                    abort(next);
                    return Err(Interrupt::Shutdown);
                }
                // The batch holding an event that does not decode is not
                // applied (as when batches are decoded one by one).
                if let Some(bad) = page
                    .undecodable
                    .as_ref()
                    .filter(|_| start + batch_size > decoded)
                {
                    abort(next);
                    return Err(self.undecodable(bad));
                }
                let batch: Vec<Projected> = events.by_ref().take(batch_size).collect();
                start += batch_size;
                let Some(batch_last) = batch.last().map(|p| p.recorded.position) else {
                    break;
                };
                let _holding = self.in_hand.hold(batch.len());
                if let Err(interrupt) = self
                    .apply_decoded(
                        batch,
                        checkpoint,
                        fence,
                        ProjectorState::CatchingUp,
                        shutdown,
                    )
                    .await
                {
                    abort(next);
                    return Err(interrupt);
                }
                checkpoint = batch_last;
            }
            let Some(next) = next else {
                break;
            };
            read = match next.await {
                Ok(read) => read,
                Err(error) => {
                    return Err(Interrupt::Transient(format!(
                        "reading the event store: {error}"
                    )))
                }
            };
        }

        Ok(checkpoint)
    }

    /// One pass: catch up from the store, then consume JetStream until
    /// something interrupts.
    async fn pass(&self, shutdown: &CancellationToken, fence: Option<Fence>) -> Interrupt {
        let checkpoint = match self.model.checkpoint().await {
            Ok(checkpoint) => checkpoint,
            Err(error) => return Interrupt::Transient(error.to_string()),
        };
        self.status.send_modify(|s| {
            s.checkpoint = checkpoint;
            s.state = ProjectorState::CatchingUp;
            s.pending = None;
        });

        // 1. Catch up from the event store (gap-safe) to its readable head.
        let mut checkpoint = match self.catch_up_from(checkpoint, fence, shutdown).await {
            Ok(checkpoint) => checkpoint,
            Err(interrupt) => return interrupt,
        };

        // 2. Consume JetStream from the first message after the checkpoint.
        let (consumer, mut expected) = match self.position_consumer(checkpoint).await {
            Ok(found) => found,
            Err(error) => return Interrupt::Transient(error),
        };
        let pending = consumer.cached_info().num_pending;
        self.status.send_modify(|s| {
            s.state = ProjectorState::Live;
            s.pending = Some(pending);
        });
        tracing::info!(checkpoint, start_sequence = expected, "projection is live");
        let partitioned = self.config.partitions > 1;
        // The position of the last event of the partition taken (partitioned
        // streams).
        let mut taken = checkpoint;
        // While no message comes, the model is looked at every
        // MODEL_CHECK_EVERY: one that lost its checkpoint (Redis restarted
        // without its data, a graph wiped) is rebuilt at once, not when the
        // next event happens to arrive.
        let mut model_check = tokio::time::interval(MODEL_CHECK_EVERY);
        model_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        model_check.reset();
        // A continuous pull stream (the client keeps requests flowing and
        // watches heartbeats); batches are formed locally: the first message
        // is awaited, then more are taken until the batch is full or `linger`
        // has passed.
        let mut messages = match consumer
            .stream()
            .max_messages_per_batch(self.config.batch_size.max(1))
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
        {
            Ok(messages) => messages,
            Err(error) => {
                return Interrupt::Transient(format!("subscribing to JetStream: {error}"))
            }
        };
        loop {
            let first = tokio::select! {
                biased;
                () = shutdown.cancelled() => return Interrupt::Shutdown,
                next = messages.next() => next,
                _ = model_check.tick() => {
                    match self.model.checkpoint().await {
                        Ok(stored) if stored < checkpoint => {
                            tracing::warn!(
                                stored,
                                checkpoint,
                                "the read model is behind what this projector applied (its store lost data, or it was wiped): rebuilding from the event store"
                            );
                            return Interrupt::Gap;
                        }
                        Ok(_) => continue,
                        Err(error) => return Interrupt::Transient(error.to_string()),
                    }
                }
            };
            model_check.reset();
            let mut received = vec![first];
            let deadline = tokio::time::Instant::now() + self.config.linger;
            while received.len() < self.config.batch_size.max(1) {
                match tokio::time::timeout_at(deadline, messages.next()).await {
                    Ok(next) => received.push(next),
                    Err(_) => break,
                }
            }
            // Held until the batch is acknowledged (or abandoned).
            let _holding = self.in_hand.hold(received.len());
            let mut batch = Vec::new();
            // The message of the highest sequence taken, whatever it was:
            // acknowledging it acknowledges the whole batch.
            let mut last_message: Option<(u64, jetstream::Message)> = None;
            for message in received {
                let message = match message {
                    Some(Ok(message)) => message,
                    Some(Err(error)) => {
                        return Interrupt::Transient(format!("receiving from JetStream: {error}"))
                    }
                    None => {
                        return Interrupt::Transient("the JetStream subscription ended".to_owned())
                    }
                };
                let (sequence, delivered) = match message.info() {
                    Ok(info) => (info.stream_sequence, info.delivered),
                    Err(error) => {
                        return Interrupt::Transient(format!("reading message metadata: {error}"))
                    }
                };
                // Where the message stands: taken before (a redelivery), the
                // next one, or past a gap. One partition's messages are not
                // consecutive in the stream: they follow the chain of
                // positions the relay stamps on them instead.
                let order = if partitioned {
                    chained(&message, &mut taken)
                } else {
                    sequenced(sequence, &mut expected)
                };
                if order == Order::Taken {
                    // Taken before: its acknowledgement was lost or late,
                    // and JetStream delivered it again.
                    tracing::info!(
                        sequence,
                        expected,
                        delivered,
                        "JetStream redelivered a message this projector has taken already; skipping it"
                    );
                    self.status.send_modify(|s| s.redelivered += 1);
                    if last_message
                        .as_ref()
                        .is_none_or(|(last, _)| *last < sequence)
                    {
                        last_message = Some((sequence, message));
                    }
                    continue;
                }
                if order == Order::Gap {
                    tracing::warn!(expected, sequence, taken, "JetStream skipped messages");
                    return Interrupt::Gap;
                }
                let stamp = message.headers.as_ref().and_then(commands::relay::stamp);
                if let Some(stamp) = stamp {
                    let event = match ours(stamp, &message.payload) {
                        Ok(event) => event,
                        Err(reason) => {
                            return Interrupt::Fatal(ProjectorError::Stopped {
                                name: self.model.name().to_owned(),
                                position: stamp.position,
                                event_type: format!("JetStream message {sequence}"),
                                reason,
                            });
                        }
                    };
                    if event.position > checkpoint
                        && batch
                            .last()
                            .is_none_or(|e: &RecordedEvent| e.position < event.position)
                    {
                        batch.push(event);
                    }
                } else {
                    self.pass_over(sequence, &message);
                }
                if last_message
                    .as_ref()
                    .is_none_or(|(last, _)| *last < sequence)
                {
                    last_message = Some((sequence, message));
                }
            }
            let Some((_, last_message)) = last_message else {
                continue;
            };
            let pending = last_message.info().map_or(0, |info| info.pending);
            if let Some(last) = batch.last().map(|e| e.position) {
                if let Err(interrupt) = self.apply(batch, checkpoint, fence, shutdown).await {
                    return interrupt;
                }
                checkpoint = last;
            }
            // AckPolicy::All: acknowledging the last message acknowledges the
            // batch. If this fails the batch is redelivered and skipped.
            if let Err(error) = last_message.ack().await {
                return Interrupt::Transient(format!("acknowledging to JetStream: {error}"));
            }
            self.status.send_if_modified(|s| {
                let changed = s.pending != Some(pending);
                s.pending = Some(pending);
                changed
            });
        }
    }

    /// The per-projection counter of foreign messages.
    fn foreign_counter(&self) -> metrics::Counter {
        metrics::counter!("neurectomy_projector_foreign_messages_total", "projection" => self.model.name().to_owned())
    }

    /// Passes over a message the relay did not publish: counted and logged
    /// once (a later pass that meets it again stays quiet).
    fn pass_over(&self, sequence: u64, message: &jetstream::Message) {
        if self.foreign_seen.fetch_max(sequence, Ordering::Relaxed) >= sequence {
            return;
        }
        tracing::warn!(
            sequence,
            subject = %message.subject,
            "passing over a JetStream message without the relay's headers: something else publishes on the relay's subjects (see the NATS permissions in deploy/nats.conf)"
        );
        self.foreign_counter().increment(1);
        self.status.send_modify(|s| s.foreign += 1);
    }

    /// Decodes and applies one batch, retrying transient failures until they
    /// pass or shutdown.
    async fn apply(
        &self,
        batch: Vec<RecordedEvent>,
        checkpoint: i64,
        fence: Option<Fence>,
        shutdown: &CancellationToken,
    ) -> Result<(), Interrupt> {
        let page = Page::decode(batch.into_iter().filter(|r| r.position > checkpoint));
        if let Some(bad) = &page.undecodable {
            return Err(self.undecodable(bad));
        }
        self.apply_decoded(
            page.events,
            checkpoint,
            fence,
            ProjectorState::Live,
            shutdown,
        )
        .await
    }

    /// Stops the projection at an event that does not decode.
    fn undecodable(&self, (recorded, reason): &(RecordedEvent, String)) -> Interrupt {
        Interrupt::Fatal(ProjectorError::Stopped {
            name: self.model.name().to_owned(),
            position: recorded.position,
            event_type: recorded.event_type.clone(),
            reason: reason.clone(),
        })
    }

    /// Applies one decoded batch, retrying transient failures until they
    /// pass or shutdown. Once it is applied the state is `phase` again (a
    /// projector that was retrying is catching up or live once more).
    async fn apply_decoded(
        &self,
        mut projected: Vec<Projected>,
        checkpoint: i64,
        fence: Option<Fence>,
        phase: ProjectorState,
        shutdown: &CancellationToken,
    ) -> Result<(), Interrupt> {
        projected.retain(|p| p.recorded.position > checkpoint);
        let Some(last) = projected.last().map(|p| p.recorded.position) else {
            return Ok(());
        };
        let count = projected.len() as u64;
        let (batch_span, _event_spans) = self.trace(&mut projected);
        let mut delay = Duration::from_millis(50);
        loop {
            let started = Instant::now();
            let applied = self
                .model
                .apply_after(checkpoint, fence, &projected)
                .instrument(batch_span.clone())
                .await;
            match applied {
                Ok(()) => {
                    let took = started.elapsed();
                    let projection = self.model.name().to_owned();
                    metrics::histogram!("neurectomy_projector_batch_events", "projection" => projection.clone())
                        .record(count as f64);
                    metrics::histogram!("neurectomy_projector_apply_seconds", "projection" => projection)
                        .record(took.as_secs_f64());
                    tracing::debug!(
                        count,
                        last,
                        elapsed_us = took.as_micros() as u64,
                        "batch applied"
                    );
                    self.status.send_modify(|s| {
                        s.checkpoint = last;
                        s.applied += count;
                        s.state = phase;
                    });
                    return Ok(());
                }
                Err(ApplyError::Rejected {
                    position,
                    event_type,
                    reason,
                }) => {
                    return Err(Interrupt::Fatal(ProjectorError::Stopped {
                        name: self.model.name().to_owned(),
                        position,
                        event_type,
                        reason,
                    }))
                }
                Err(error @ ApplyError::Fenced { .. }) => {
                    return Err(Interrupt::Fenced(error.to_string()));
                }
                Err(error @ ApplyError::Moved { .. }) => {
                    tracing::info!(%error, "re-reading the checkpoint");
                    return Err(Interrupt::Gap);
                }
                Err(error @ ApplyError::Unavailable { .. }) => {
                    tracing::warn!(error = %with_causes(&error), "applying a batch failed; retrying");
                    self.status.send_modify(|s| {
                        s.state = ProjectorState::Retrying;
                        s.last_error = Some(error.to_string());
                    });
                    tokio::select! {
                        () = shutdown.cancelled() => return Err(Interrupt::Shutdown),
                        () = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(self.config.max_backoff);
                }
            }
        }
    }

    /// Spans of a batch: one for the batch (linked to the events' traces),
    /// and one per event of a sampled trace, a child of the event's context
    /// that lasts until the batch is applied (dropped by the caller). Each
    /// such event carries its span's context (else its own, if sampled) to
    /// what the model writes.
    fn trace(&self, projected: &mut [Projected]) -> (tracing::Span, Vec<tracing::Span>) {
        let name = self.model.name();
        let batch = tracing::info_span!(
            "projector.apply_batch",
            projection = %name,
            count = projected.len(),
            first = projected.first().map_or(0, |p| p.recorded.position),
            last = projected.last().map_or(0, |p| p.recorded.position),
        );
        let mut spans = Vec::new();
        for p in projected.iter_mut() {
            let recorded = &p.recorded;
            // Without a span of its own (not exported here) the event's
            // sampled context goes on as is.
            if commands::trace::sampled(recorded.metadata.traceparent.as_deref()) {
                p.traceparent.clone_from(&recorded.metadata.traceparent);
            }
            let Some(span) =
                commands::trace::follow(recorded.metadata.traceparent.as_deref(), || {
                    tracing::info_span!(
                        parent: None,
                        "projector.apply",
                        "otel.kind" = "consumer",
                        projection = %name,
                        position = recorded.position,
                        event_type = %recorded.event_type,
                    )
                })
            else {
                continue;
            };
            p.traceparent = commands::trace::traceparent_of(&span);
            if let Some(context) = p.traceparent.as_deref().and_then(commands::trace::parse) {
                batch.add_link(context);
            }
            spans.push(span);
        }
        (batch, spans)
    }

    /// (Re)creates the durable consumer so that it delivers from the first
    /// message whose position is above `checkpoint`. Returns the consumer and
    /// that message's stream sequence.
    async fn position_consumer(
        &self,
        checkpoint: i64,
    ) -> Result<(jetstream::consumer::Consumer<pull::Config>, u64), String> {
        let stream = self
            .jetstream
            .get_stream(&self.config.stream_name)
            .await
            .map_err(|e| format!("opening JetStream stream {}: {e}", self.config.stream_name))?;
        let info = stream
            .get_info()
            .await
            .map_err(|e| format!("reading stream info: {e}"))?;
        let (first, last) = (info.state.first_sequence, info.state.last_sequence);
        // The smallest sequence s in [first, last + 1] such that the first
        // relay message at or after s has a position above the checkpoint
        // (or there is none): positions increase with sequences (the relay
        // chains them), so a binary search over a few direct gets finds it.
        // Foreign messages and deleted sequences at a probe point are
        // stepped over to the next relay message; the consumer passes over
        // those between s and it.
        let (mut lo, mut hi) = (first.max(1), last + 1);
        if info.state.messages == 0 {
            lo = last + 1;
        }
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match next_stamped(&stream, mid, hi).await? {
                Some((_, stamp)) if stamp.position > checkpoint => hi = mid,
                Some((sequence, _)) => lo = sequence + 1,
                None => hi = mid,
            }
        }
        // One partition's subjects, below the stream's `<prefix>.>`.
        let filter_subject = if self.config.partitions > 1 {
            let prefix = info
                .config
                .subjects
                .iter()
                .find_map(|s| s.strip_suffix(".>"))
                .ok_or_else(|| {
                    format!(
                        "stream {} has no `<prefix>.>` subject to take partition {} from",
                        self.config.stream_name, self.config.partition
                    )
                })?;
            commands::partition::filter(prefix, self.config.partitions, self.config.partition)
        } else {
            String::new()
        };
        let name = self.consumer_name();
        // A consumer left from an earlier run may point anywhere: replace it.
        let _ = stream.delete_consumer(&name).await;
        let consumer = stream
            .create_consumer(pull::Config {
                durable_name: Some(name.clone()),
                deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: lo },
                filter_subject,
                ack_policy: AckPolicy::All,
                ack_wait: self.config.ack_wait,
                max_ack_pending: i64::try_from(self.config.batch_size.max(1) * 4).unwrap_or(2000),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("creating consumer {name}: {e}"))?;
        Ok((consumer, lo))
    }
}

/// How a keeper ended.
enum Kept {
    /// Its projector stopped (or lost the lease).
    Ended,
    /// It stopped its projector to hand the partition over (rebalance).
    HandedOver,
}

/// Renews the lease of `partition` held under `token` (asked for at
/// `asked`) until `held` is cancelled; cancels it when the lease is not
/// confirmed to last (taken over, or no renewal answered within the ttl
/// counted from when it was sent), or when the partition is to be handed
/// over ([`Leases::should_hand_over`]).
async fn keep(
    leases: Leases,
    (partition, token): (u32, u64),
    asked: Instant,
    held: CancellationToken,
) -> Kept {
    let row = i32::try_from(partition).unwrap_or(i32::MAX);
    let mut valid_until = asked + leases.ttl();
    loop {
        let next = (Instant::now() + leases.renew_every()).min(valid_until);
        tokio::select! {
            () = held.cancelled() => return Kept::Ended,
            () = tokio::time::sleep_until(next.into()) => {}
        }
        if Instant::now() >= valid_until {
            tracing::warn!(
                token,
                "the projection's lease could not be renewed in time: stopping before it expires"
            );
            held.cancel();
            return Kept::Ended;
        }
        if leases.should_hand_over(partition) {
            held.cancel();
            return Kept::HandedOver;
        }
        let sent = Instant::now();
        match leases.renew(row, token).await {
            Ok(true) => valid_until = sent + leases.ttl(),
            Ok(false) => {
                tracing::warn!(token, "the projection's lease was taken over");
                held.cancel();
                return Kept::Ended;
            }
            Err(error) => {
                tracing::warn!(%error, "renewing the projection's lease failed; retrying");
            }
        }
    }
}

/// Where a delivered message stands in what the projector consumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    /// Taken before (a redelivery): skip it.
    Taken,
    /// The next one (or a foreign message in its place): take it.
    Next,
    /// Messages before it were not delivered: back to the event store.
    Gap,
}

/// The order of the message at `sequence` of a stream consumed whole:
/// by sequence (`expected` is the next one, moved on past this one).
fn sequenced(sequence: u64, expected: &mut u64) -> Order {
    if sequence < *expected {
        return Order::Taken;
    }
    if sequence > *expected {
        return Order::Gap;
    }
    *expected += 1;
    Order::Next
}

/// The order of a message of one partition: by the chain of positions the
/// relay stamps (`Neurectomy-Partition-Previous`), `taken` being the last
/// position taken (moved on to this one). A foreign message (no stamp) is
/// next, to be passed over; one of the relay's without the chain header (a
/// relay configured for one partition on a split stream) is a gap, which
/// the store then fills.
fn chained(message: &jetstream::Message, taken: &mut i64) -> Order {
    let Some(headers) = message.headers.as_ref() else {
        return Order::Next;
    };
    let Some(stamp) = commands::relay::stamp(headers) else {
        return Order::Next;
    };
    if stamp.position <= *taken {
        return Order::Taken;
    }
    let previous = headers
        .get(commands::partition::HEADER_PARTITION_PREVIOUS)
        .and_then(|v| v.as_str().parse::<i64>().ok());
    if previous != Some(*taken) {
        return Order::Gap;
    }
    *taken = stamp.position;
    Order::Next
}

/// The first message at or after `from` and before `until` that carries the
/// relay's headers, with its sequence (`None`: only foreign messages or
/// deleted sequences in between).
async fn next_stamped(
    stream: &jetstream::stream::Stream,
    from: u64,
    until: u64,
) -> Result<Option<(u64, Stamp)>, String> {
    for sequence in from..until {
        match stream.get_raw_message(sequence).await {
            Ok(message) => {
                if let Some(stamp) = commands::relay::stamp(&message.headers) {
                    return Ok(Some((sequence, stamp)));
                }
            }
            Err(error) if error.kind() == RawMessageErrorKind::NoMessageFound => {}
            Err(error) => return Err(format!("reading JetStream message {sequence}: {error}")),
        }
    }
    Ok(None)
}

/// The event in the body of a message that carries the relay's headers;
/// the reason it is not the event they describe otherwise.
fn ours(stamp: Stamp, payload: &[u8]) -> Result<RecordedEvent, String> {
    let event: RecordedEvent = serde_json::from_slice(payload).map_err(|error| {
        format!("the message has the relay's headers but its body is not a recorded event: {error}")
    })?;
    if (event.position, event.event_id) != (stamp.position, stamp.event_id) {
        return Err(format!(
            "the message's headers name event {} at position {} but its body holds event {} at position {}",
            stamp.event_id, stamp.position, event.event_id, event.position
        ));
    }
    Ok(event)
}

/// `error` and its causes, `: `-separated (what a log line needs to say why
/// a store was unavailable, not only that it was).
fn with_causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(next) = cause {
        text.push_str(": ");
        text.push_str(&next.to_string());
        cause = next.source();
    }
    text
}
