//! The sealer: seals the log in order, block after block, as the relay
//! leader reads it (README, "Sealed audit log").
//!
//! It runs beside the leading relay for as long as its term, fed each
//! batch the relay read (no read of its own while fed, nothing on the
//! append path). It starts where the last stored seal ends and reads from
//! the store whatever it was not fed — at start, after a batch it missed
//! (the feed is bounded and never slows the relay), with no seal yet the
//! whole log, and when unfed for a while (an idle log: one empty read; a
//! relay stuck on a NATS outage: sealing goes on).
//! A block closes at `block_events` events or `block_time` after its first
//! event; its seal is stored in PostgreSQL (the seal number is the primary
//! key: of two sealers, during a leadership change, one stores it and the
//! other starts again from it) and then published on the seal stream, whose
//! copies are caught up at start and after any failed publish.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, stream::StorageType};
use async_nats::HeaderMap;
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::block::{block_root, TenantSummary};
use super::key::SealKey;
use super::leaf::leaf;
use super::merkle::{root, Hash};
use super::record::{body_digest, SealBody, SealRecord, SealedLeaf, GENESIS};
use super::{store, SealError};
use crate::envelope::RecordedEvent;
use crate::event_store::EventStore;

/// Header of a seal stream message: the seal's number.
pub const HEADER_SEAL_SEQ: &str = "Neurectomy-Seal-Seq";

/// How the log is sealed.
#[derive(Clone, Debug)]
pub struct SealerConfig {
    /// The log's name in every seal: the relay's stream name.
    pub log: String,
    /// The JetStream stream of the seals' copies.
    pub stream: String,
    /// Its one subject.
    pub subject: String,
    /// Most events per block.
    pub block_events: usize,
    /// Longest a block stays open after its first event.
    pub block_time: Duration,
    /// Copies of the seal stream in a JetStream cluster.
    pub replicas: usize,
    /// How long to wait for a publish acknowledgement.
    pub ack_timeout: Duration,
    /// Longest wait between retries after failures.
    pub max_backoff: Duration,
}

impl SealerConfig {
    /// The sealing of the log the relay `relay` publishes: its stream's
    /// name with `_SEALS`, its subject prefix with `-seals` (outside the
    /// event subjects, so the relay's sequence chain is untouched).
    pub fn for_relay(relay: &crate::relay::RelayConfig) -> Self {
        Self {
            log: relay.stream_name.clone(),
            stream: format!("{}_SEALS", relay.stream_name),
            subject: format!("{}-seals", relay.subject_prefix),
            block_events: 1000,
            block_time: Duration::from_millis(500),
            replicas: relay.replicas,
            ack_timeout: relay.ack_timeout,
            max_backoff: relay.max_backoff,
        }
    }
}

/// A batch the relay read: the events right after position `after`.
#[derive(Clone, Debug)]
pub struct Feed {
    /// The position the batch was read after.
    pub after: i64,
    /// The batch.
    pub events: Arc<[RecordedEvent]>,
}

/// Where the sealer is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SealProgress {
    /// The last seal stored (`None`: none yet).
    pub seq: Option<i64>,
    /// The last position sealed.
    pub sealed_to: i64,
    /// Events left in the open block when the last block closed.
    pub open: usize,
}

/// One event of the open block.
struct Pending {
    position: i64,
    tenant: String,
    leaf: Hash,
    recorded_at: OffsetDateTime,
}

/// The sealer of one log.
#[derive(Clone, Debug)]
pub struct Sealer {
    store: EventStore,
    jetstream: jetstream::Context,
    key: Arc<SealKey>,
    config: SealerConfig,
    progress: Arc<watch::Sender<SealProgress>>,
}

/// The chain's head and the open block, within one run.
struct State {
    next_seq: i64,
    prev: Hash,
    fed_to: i64,
    open: Vec<Pending>,
    opened: Option<Instant>,
    /// Signed seals on their way to the writer (in order).
    signed: mpsc::Sender<Signed>,
}

/// A signed seal for the writer to store and copy.
struct Signed {
    seq: i64,
    first: i64,
    last: i64,
    oldest: Option<OffsetDateTime>,
    sealed_at: OffsetDateTime,
    record: SealRecord,
}

/// Signed seals the writer may be behind before sealing waits for it.
const SIGNED_AHEAD: usize = 8;

impl Sealer {
    /// A sealer signing with `key`.
    pub fn new(
        store: EventStore,
        client: async_nats::Client,
        key: SealKey,
        config: SealerConfig,
    ) -> Self {
        Self {
            store,
            jetstream: jetstream::new(client),
            key: Arc::new(key),
            config,
            progress: Arc::new(watch::Sender::new(SealProgress::default())),
        }
    }

    /// Where it is.
    pub fn progress(&self) -> watch::Receiver<SealProgress> {
        self.progress.subscribe()
    }

    /// Its configuration.
    pub fn config(&self) -> &SealerConfig {
        &self.config
    }

    /// The seal stream's configuration: no limits (the evidence never ages
    /// out), one subject.
    pub fn stream_config(&self) -> jetstream::stream::Config {
        jetstream::stream::Config {
            name: self.config.stream.clone(),
            subjects: vec![self.config.subject.clone()],
            storage: StorageType::File,
            allow_direct: true,
            num_replicas: self.config.replicas.max(1),
            description: Some(format!("seals of the log {}", self.config.log)),
            ..Default::default()
        }
    }

    fn nats(&self, doing: &str, error: impl std::fmt::Display) -> SealError {
        SealError::JetStream {
            doing: doing.to_owned(),
            message: error.to_string(),
        }
    }

    /// Creates the seal stream when it is missing.
    pub async fn ensure_stream(&self) -> Result<jetstream::stream::Stream, SealError> {
        self.jetstream
            .get_or_create_stream(self.stream_config())
            .await
            .map_err(|e| self.nats("creating the seal stream", e))
    }

    /// Seals until `shutdown` (then seals the open block too) or until the
    /// feed closes; failures are retried with backoff.
    #[tracing::instrument(name = "sealer", skip_all, fields(log = %self.config.log))]
    pub async fn run(&self, mut feed: mpsc::Receiver<Feed>, shutdown: CancellationToken) {
        let mut delay = Duration::from_millis(100);
        loop {
            match self.term(&mut feed, &shutdown).await {
                Ok(()) => return,
                Err(SealError::Raced { seq }) => {
                    tracing::info!(
                        seq,
                        "another sealer stored this seal first; continuing from it"
                    );
                    continue;
                }
                Err(error) => tracing::warn!(%error, "sealing failed; retrying"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(self.config.max_backoff);
        }
    }

    /// From the last stored seal until shutdown, the feed's end or an error.
    async fn term(
        &self,
        feed: &mut mpsc::Receiver<Feed>,
        shutdown: &CancellationToken,
    ) -> Result<(), SealError> {
        let pool = self.store.pool();
        let last = store::last(pool, &self.config.log).await?;
        // Storing and copying a seal (a PostgreSQL commit, a JetStream
        // acknowledgement) runs beside the hashing of the next block.
        let (signed, to_write) = mpsc::channel(SIGNED_AHEAD);
        let mut writer = Some(tokio::spawn(self.clone().write(to_write)));
        let mut state = State {
            next_seq: last.as_ref().map_or(0, |s| s.seq + 1),
            prev: last
                .as_ref()
                .map_or(GENESIS, |s| body_digest(&s.record.body)),
            fed_to: last.as_ref().map_or(i64::MIN, |s| s.last),
            open: Vec::new(),
            opened: None,
            signed,
        };
        self.progress.send_modify(|p| {
            p.seq = last.as_ref().map(|s| s.seq);
            p.sealed_to = last.as_ref().map_or(0, |s| s.last);
        });
        let ended = self.follow(&mut state, feed, shutdown, &mut writer).await;
        // The writer stores what was signed, then ends.
        drop(state);
        let Some(mut writer) = writer else {
            return ended; // it ended already, and said why
        };
        let written = match tokio::time::timeout(Duration::from_secs(10), &mut writer).await {
            Ok(Ok(written)) => written,
            Ok(Err(failed)) => Err(SealError::Stored {
                seq: -1,
                what: format!("the seal writer failed: {failed}"),
            }),
            Err(_) => {
                writer.abort();
                Ok(())
            }
        };
        ended.and(written)
    }

    /// Feeds the open block until shutdown, the feed's end or an error
    /// (the writer's included).
    async fn follow(
        &self,
        state: &mut State,
        feed: &mut mpsc::Receiver<Feed>,
        shutdown: &CancellationToken,
        writer: &mut Option<tokio::task::JoinHandle<Result<(), SealError>>>,
    ) -> Result<(), SealError> {
        // What precedes the relay's first batch is read from the store when
        // that batch comes (its `after` says where the relay resumed), or,
        // if none comes, when the sealer finds itself unfed: unfed this long
        // (the relay idle, or stuck on a NATS outage), it reads the store
        // itself, so sealing never waits for NATS.
        let starved_after = (self.config.block_time * 4).max(Duration::from_secs(1));
        let mut fed = Instant::now();
        loop {
            let deadline = state.opened.map(|at| at + self.config.block_time);
            tokio::select! {
                ended = async {
                    match writer.as_mut() {
                        Some(task) => task.await,
                        None => std::future::pending().await,
                    }
                } => {
                    // It stops early only on an error: start again from
                    // what is stored.
                    *writer = None;
                    return match ended {
                        Ok(Err(error)) => Err(error),
                        _ => Err(SealError::Stored {
                            seq: -1,
                            what: "the seal writer stopped".into(),
                        }),
                    };
                }
                () = tokio::time::sleep_until(fed + starved_after) => {
                    self.catch_up(state, None).await?;
                    fed = Instant::now();
                }
                () = shutdown.cancelled() => {
                    return self.close(state, usize::MAX).await;
                }
                batch = feed.recv() => {
                    let Some(batch) = batch else {
                        return self.close(state, usize::MAX).await;
                    };
                    fed = Instant::now();
                    if batch.after > state.fed_to {
                        self.catch_up(state, Some(batch.after)).await?;
                    }
                    for event in batch.events.iter() {
                        self.push(state, event).await?;
                    }
                }
                () = sleep_until(deadline) => {
                    self.close(state, usize::MAX).await?;
                }
            }
        }
    }

    /// Stores each signed seal in order and copies it to the seal stream
    /// (copies that fail are published later, in order, before new ones).
    async fn write(self, mut signed: mpsc::Receiver<Signed>) -> Result<(), SealError> {
        let mut copies_behind = self.copy_missing().await;
        while let Some(seal) = signed.recv().await {
            let Signed {
                seq,
                first,
                last,
                oldest,
                sealed_at,
                record,
            } = seal;
            store::insert(
                self.store.pool(),
                &self.config.log,
                seq,
                first,
                last,
                &record,
            )
            .await?;
            if let Some(oldest) = oldest {
                let delay = (sealed_at - oldest).as_seconds_f64().max(0.0);
                metrics::histogram!("neurectomy_seal_delay_seconds").record(delay);
            }
            metrics::counter!("neurectomy_sealed_events_total")
                .increment(record.leaves.len() as u64);
            self.progress.send_modify(|p| {
                p.seq = Some(seq);
                p.sealed_to = last;
            });
            tracing::debug!(
                seq,
                first,
                last,
                count = record.leaves.len(),
                "block sealed"
            );
            if copies_behind {
                copies_behind = self.copy_missing().await;
            } else if let Err(error) = self.publish(seq, &record).await {
                tracing::warn!(%error, seq, "could not copy the seal to JetStream; retrying later");
                copies_behind = true;
            }
        }
        if copies_behind {
            self.copy_missing().await;
        }
        Ok(())
    }

    /// Reads from the store what follows the last event fed, up to
    /// `target` (`None`: as far as the log is readable).
    async fn catch_up(&self, state: &mut State, target: Option<i64>) -> Result<(), SealError> {
        loop {
            if target.is_some_and(|t| state.fed_to >= t) {
                return Ok(());
            }
            let after = state.fed_to.max(0);
            let batch = self.store.read_all(after, 2_000).await?;
            if batch.is_empty() {
                return Ok(());
            }
            for event in &batch {
                if target.is_some_and(|t| event.position > t) {
                    return Ok(());
                }
                self.push(state, event).await?;
            }
        }
    }

    /// Adds the next event to the open block; closes it when full.
    async fn push(&self, state: &mut State, event: &RecordedEvent) -> Result<(), SealError> {
        if event.position <= state.fed_to {
            return Ok(()); // sealed or pushed already
        }
        state.fed_to = event.position;
        let erased = self.erased(event).await?;
        let erased: Vec<&str> = erased.iter().map(String::as_str).collect();
        state.open.push(Pending {
            position: event.position,
            tenant: event.metadata.tenant.clone(),
            leaf: leaf(event, &erased),
            recorded_at: event.recorded_at,
        });
        state.opened.get_or_insert_with(Instant::now);
        if state.open.len() >= self.config.block_events.max(1) {
            self.close(state, self.config.block_events.max(1)).await?;
        }
        Ok(())
    }

    /// The fields of `event` erased before it was read: those holding a
    /// digest that a tombstone names. (An event read before its erasure
    /// holds its values, which the leaf digests the same way.) The store
    /// is asked only about an event with a digest in a personal field.
    async fn erased(&self, event: &RecordedEvent) -> Result<Vec<String>, SealError> {
        let candidates = crate::erasure::digest_fields(event);
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let tombstoned = crate::erasure::tombstoned(self.store.pool(), &[event.position])
            .await
            .map_err(|e| SealError::Stored {
                seq: -1,
                what: e.to_string(),
            })?;
        Ok(candidates
            .into_iter()
            .filter(|f| {
                tombstoned
                    .get(&event.position)
                    .is_some_and(|t| t.contains(*f))
            })
            .map(str::to_owned)
            .collect())
    }

    /// Seals the first `most` events of the open block (all, for
    /// `usize::MAX`), if any.
    async fn close(&self, state: &mut State, most: usize) -> Result<(), SealError> {
        let take = most.min(state.open.len());
        if take == 0 {
            state.opened = None;
            return Ok(());
        }
        let events = &state.open[..take];
        // Tenants in the order of their bytes; each one's events in log order.
        let mut by_tenant: BTreeMap<&str, Vec<Hash>> = BTreeMap::new();
        for event in events {
            by_tenant.entry(&event.tenant).or_default().push(event.leaf);
        }
        let index: BTreeMap<&str, u32> = by_tenant
            .keys()
            .enumerate()
            .map(|(i, t)| (*t, u32::try_from(i).unwrap_or(u32::MAX)))
            .collect();
        let tenants: Vec<TenantSummary> = by_tenant
            .iter()
            .map(|(tenant, leaves)| TenantSummary {
                tenant: (*tenant).to_owned(),
                count: leaves.len(),
                root: root(leaves),
            })
            .collect();
        let leaves: Vec<SealedLeaf> = events
            .iter()
            .map(|e| SealedLeaf {
                position: e.position,
                tenant: index.get(e.tenant.as_str()).copied().unwrap_or(0),
                hash: e.leaf,
            })
            .collect();
        let (first, last) = (events[0].position, events[take - 1].position);
        let oldest = events.iter().map(|e| e.recorded_at).min();
        let sealed_at = now_micros();
        let body = SealBody {
            log: self.config.log.clone(),
            seq: u64::try_from(state.next_seq).unwrap_or(0),
            first,
            last,
            count: take as u64,
            tenants: tenants.len() as u64,
            root: block_root(&tenants),
            prev: state.prev,
            key: self.key.id().to_owned(),
            sealed_at,
        }
        .canonical();
        let record = SealRecord {
            signature: self.key.sign(&body).to_vec(),
            body,
            tenants,
            leaves,
        };
        let seq = state.next_seq;
        state.prev = body_digest(&record.body);
        state.next_seq += 1;
        state.open.drain(..take);
        state.opened = (!state.open.is_empty()).then(Instant::now);
        self.progress.send_modify(|p| p.open = state.open.len());
        let signed = Signed {
            seq,
            first,
            last,
            oldest,
            sealed_at,
            record,
        };
        state
            .signed
            .send(signed)
            .await
            .map_err(|_| SealError::Stored {
                seq,
                what: "the seal writer stopped".into(),
            })
    }

    /// Publishes seal `seq` on the seal stream and waits for the ack.
    async fn publish(&self, seq: i64, record: &SealRecord) -> Result<(), SealError> {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("{}:{seq}", self.config.log).as_str());
        headers.insert(HEADER_SEAL_SEQ, seq.to_string().as_str());
        let ack = self
            .jetstream
            .publish_with_headers(
                self.config.subject.clone(),
                headers,
                record.to_message().into(),
            )
            .await
            .map_err(|e| self.nats("publishing a seal", e))?;
        tokio::time::timeout(self.config.ack_timeout, ack)
            .await
            .map_err(|_| self.nats("publishing a seal", "no acknowledgement in time"))?
            .map_err(|e| self.nats("publishing a seal", e))?;
        Ok(())
    }

    /// Publishes the stored seals the seal stream lacks (after its last
    /// message's seal number), in order; whether some are still missing
    /// (failures leave them for later).
    async fn copy_missing(&self) -> bool {
        match self.try_copy_missing().await {
            Ok(copied) => {
                if copied > 0 {
                    tracing::info!(copied, "copied stored seals to the seal stream");
                }
                false
            }
            Err(error) => {
                tracing::warn!(%error, "could not bring the seal stream up to date; retrying later");
                true
            }
        }
    }

    async fn try_copy_missing(&self) -> Result<usize, SealError> {
        let stream = self.ensure_stream().await?;
        let copied_to: i64 = match stream
            .get_last_raw_message_by_subject(&self.config.subject)
            .await
        {
            Ok(message) => message
                .headers
                .get(HEADER_SEAL_SEQ)
                .and_then(|v| v.as_str().parse().ok())
                .unwrap_or(-1),
            Err(e)
                if e.kind()
                    == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
            {
                -1
            }
            Err(e) => return Err(self.nats("reading the seal stream's last message", e)),
        };
        let mut copied = 0;
        let mut from = copied_to + 1;
        loop {
            let seals = store::from_seq(self.store.pool(), &self.config.log, from, 100).await?;
            let Some(last) = seals.last().map(|s| s.seq) else {
                return Ok(copied);
            };
            for seal in &seals {
                self.publish(seal.seq, &seal.record).await?;
                copied += 1;
            }
            from = last + 1;
        }
    }
}

/// Now, to the microsecond (what a seal's `sealed_at` keeps).
fn now_micros() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(now.nanosecond() / 1_000 * 1_000)
        .unwrap_or(now)
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
