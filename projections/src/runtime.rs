//! The projector loop: catch up from the event store, then consume the
//! JetStream stream from the first message after the checkpoint, applying
//! batches in order and acknowledging them only once applied.
//!
//! Shutdown is seen between batches: the batch in hand is applied (with its
//! checkpoint) and acknowledged first ([`Projector::in_hand`] reports it).
//! Each applied batch records `neurectomy_projector_batch_events` and
//! `neurectomy_projector_apply_seconds` (label `projection`).

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, consumer::AckPolicy, consumer::DeliverPolicy};
use commands::relay::HEADER_POSITION;
use commands::{EventStore, InHand, ReadError, RecordedEvent};
use domain::DomainEvent;
use futures::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::model::{ApplyError, Projected, ReadModel};

/// Catch-up batches read from the event store at once. One: with catch-up
/// batches of thousands of events, a read's fixed cost is already spread
/// thin, and a larger first page (which nothing overlaps) costs more than
/// it saves.
const BATCHES_PER_PAGE: usize = 1;

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
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        Self {
            stream_name: "NEURECTOMY_EVENTS".to_owned(),
            batch_size: 500,
            linger: Duration::ZERO,
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// What a projector is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProjectorState {
    /// Not started yet.
    Starting,
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
    /// Reads at most `limit` events after `after` and decodes them.
    async fn read(store: &EventStore, after: i64, limit: i64) -> Result<Page, ReadError> {
        let rows = store.read_all(after, limit).await?;
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
}

impl<M: ReadModel> Projector<M> {
    /// A projector feeding `model` from `store` and JetStream.
    pub fn new(
        model: M,
        store: EventStore,
        client: async_nats::Client,
        config: ProjectorConfig,
    ) -> Self {
        let status = ProjectorStatus {
            name: model.name().to_owned(),
            state: ProjectorState::Starting,
            checkpoint: 0,
            applied: 0,
            last_error: None,
        };
        let (status, _) = watch::channel(status);
        Self {
            model,
            store,
            jetstream: jetstream::new(client),
            config,
            status,
            in_hand: InHand::default(),
        }
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
        format!("projection-{}", self.model.name())
    }

    /// Runs until shutdown, or until an event cannot be applied.
    #[tracing::instrument(name = "projector", skip_all, fields(projection = %self.model.name()))]
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), ProjectorError> {
        let mut delay = Duration::from_millis(50);
        loop {
            match self.pass(&shutdown).await {
                Interrupt::Shutdown => return Ok(()),
                Interrupt::Gap => {
                    tracing::info!("resuming from the read model's checkpoint: catching up from the event store");
                }
                Interrupt::Transient(error) => {
                    tracing::warn!(%error, "projection interrupted; retrying");
                    self.status.send_modify(|s| {
                        s.state = ProjectorState::Retrying;
                        s.last_error = Some(error);
                    });
                    tokio::select! {
                        () = shutdown.cancelled() => return Ok(()),
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
        match self.catch_up_from(checkpoint, shutdown).await {
            Ok(checkpoint) => Ok(checkpoint),
            Err(Interrupt::Fatal(error)) => Err(error),
            Err(Interrupt::Shutdown) => Err(interrupted("shutdown was requested".to_owned())),
            Err(Interrupt::Gap) => Err(interrupted("the read model moved under it".to_owned())),
            Err(Interrupt::Transient(reason)) => Err(interrupted(reason)),
        }
    }

    /// Catches up from `checkpoint` to the store's readable head.
    async fn catch_up_from(
        &self,
        mut checkpoint: i64,
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
        let mut read = Page::read(&self.store, checkpoint, limit).await;
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
                tokio::spawn(async move { Page::read(&store, last, limit).await })
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
                if let Err(interrupt) = self.apply_decoded(batch, checkpoint, shutdown).await {
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
    async fn pass(&self, shutdown: &CancellationToken) -> Interrupt {
        let checkpoint = match self.model.checkpoint().await {
            Ok(checkpoint) => checkpoint,
            Err(error) => return Interrupt::Transient(error.to_string()),
        };
        self.status.send_modify(|s| {
            s.checkpoint = checkpoint;
            s.state = ProjectorState::CatchingUp;
        });

        // 1. Catch up from the event store (gap-safe) to its readable head.
        let mut checkpoint = match self.catch_up_from(checkpoint, shutdown).await {
            Ok(checkpoint) => checkpoint,
            Err(interrupt) => return interrupt,
        };

        // 2. Consume JetStream from the first message after the checkpoint.
        let (consumer, mut expected) = match self.position_consumer(checkpoint).await {
            Ok(found) => found,
            Err(error) => return Interrupt::Transient(error),
        };
        self.status.send_modify(|s| s.state = ProjectorState::Live);
        tracing::info!(checkpoint, start_sequence = expected, "projection is live");
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
                () = shutdown.cancelled() => return Interrupt::Shutdown,
                next = messages.next() => next,
            };
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
            let mut last_message = None;
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
                let sequence = match message.info() {
                    Ok(info) => info.stream_sequence,
                    Err(error) => {
                        return Interrupt::Transient(format!("reading message metadata: {error}"))
                    }
                };
                if sequence != expected {
                    tracing::warn!(expected, sequence, "JetStream sequence gap");
                    return Interrupt::Gap;
                }
                expected += 1;
                let event: RecordedEvent = match serde_json::from_slice(&message.payload) {
                    Ok(event) => event,
                    Err(error) => {
                        let position = message
                            .headers
                            .as_ref()
                            .and_then(|h| h.get(HEADER_POSITION))
                            .and_then(|v| v.as_str().parse().ok())
                            .unwrap_or(-1);
                        return Interrupt::Fatal(ProjectorError::Stopped {
                            name: self.model.name().to_owned(),
                            position,
                            event_type: format!("JetStream message {sequence}"),
                            reason: format!("the message is not a recorded event: {error}"),
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
                last_message = Some(message);
            }
            let Some(last_message) = last_message else {
                continue;
            };
            if let Some(last) = batch.last().map(|e| e.position) {
                if let Err(interrupt) = self.apply(batch, checkpoint, shutdown).await {
                    return interrupt;
                }
                checkpoint = last;
            }
            // AckPolicy::All: acknowledging the last message acknowledges the
            // batch. If this fails the batch is redelivered and skipped.
            if let Err(error) = last_message.ack().await {
                return Interrupt::Transient(format!("acknowledging to JetStream: {error}"));
            }
        }
    }

    /// Decodes and applies one batch, retrying transient failures until they
    /// pass or shutdown.
    async fn apply(
        &self,
        batch: Vec<RecordedEvent>,
        checkpoint: i64,
        shutdown: &CancellationToken,
    ) -> Result<(), Interrupt> {
        let page = Page::decode(batch.into_iter().filter(|r| r.position > checkpoint));
        if let Some(bad) = &page.undecodable {
            return Err(self.undecodable(bad));
        }
        self.apply_decoded(page.events, checkpoint, shutdown).await
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
    /// pass or shutdown.
    async fn apply_decoded(
        &self,
        mut projected: Vec<Projected>,
        checkpoint: i64,
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
                .apply_after(checkpoint, &projected)
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
                Err(error @ ApplyError::Moved { .. }) => {
                    tracing::info!(%error, "re-reading the checkpoint");
                    return Err(Interrupt::Gap);
                }
                Err(error @ ApplyError::Unavailable { .. }) => {
                    tracing::warn!(%error, "applying a batch failed; retrying");
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
        // Smallest sequence in [first, last] whose position is above the
        // checkpoint; positions increase with sequences (the relay chains
        // them), so a binary search over a few direct gets finds it.
        let (mut lo, mut hi) = (first.max(1), last + 1);
        if info.state.messages == 0 {
            lo = last + 1;
        }
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let message = stream
                .get_raw_message(mid)
                .await
                .map_err(|e| format!("reading JetStream message {mid}: {e}"))?;
            let position: i64 = message
                .headers
                .get(HEADER_POSITION)
                .and_then(|v| v.as_str().parse().ok())
                .ok_or_else(|| {
                    format!("JetStream message {mid} has no {HEADER_POSITION} header")
                })?;
            if position > checkpoint {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        let name = self.consumer_name();
        // A consumer left from an earlier run may point anywhere: replace it.
        let _ = stream.delete_consumer(&name).await;
        let consumer = stream
            .create_consumer(pull::Config {
                durable_name: Some(name.clone()),
                deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: lo },
                ack_policy: AckPolicy::All,
                ack_wait: Duration::from_secs(30),
                max_ack_pending: i64::try_from(self.config.batch_size.max(1) * 4).unwrap_or(2000),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("creating consumer {name}: {e}"))?;
        Ok((consumer, lo))
    }
}
