//! The change feed shared by every subscriber of one process.
//!
//! One upstream task per process reads the Redis change feeds
//! (`feed:<tenant>`, written by the Redis projector in the same
//! `MULTI/EXEC` as the state it describes; read with
//! `projections::redis::feed`) of the tenants that have subscribers: one
//! blocking `XREAD` over all their keys, on a connection of its own,
//! re-issued when the set of tenants changes (`CLIENT UNBLOCK` wakes it).
//! Each change is read once and fanned out in memory as an [`Arc`]'d
//! message on the tenant's two [`broadcast`] channels (events, agent
//! states), each holding at most `buffer` messages: a subscriber that falls
//! further behind sees `Lagged` and is closed by its stream; memory never
//! grows with a slow subscriber.
//!
//! Contracts:
//! - Per tenant, messages are published in increasing position order, and
//!   every message published after a subscriber joined (and its tenant was
//!   armed, [`Feed::join`]) reaches it unless it lags; every message
//!   published before has a position at or below the event store's readable
//!   head read afterwards. Subscribers rely on this for a gap-free seam:
//!   join, read the head, catch up from the store to it, then go live
//!   skipping what the catch-up covered.
//! - When in doubt (the Redis generation switched under the reader, or the
//!   capped feed was trimmed past the reader's cursor) the missed range is
//!   read from the event store instead, so no position is skipped.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use commands::{EventStore, ReadError, RecordedEvent};
use projections::redis::feed::{
    FeedClient, FeedEntry, FeedPage, FeedReadError, FeedReader, READ_COUNT,
};
use projections::{Entity, RedisModel};
use tokio::sync::{broadcast, watch, Notify};
use tokio_util::sync::CancellationToken;

use super::near::{Lookup, NearCache};
use super::types::{Agent, Event};
use crate::sync::lock;

/// How long a subscriber waits for the upstream to start reading its tenant.
const ARM_TIMEOUT: Duration = Duration::from_secs(10);
/// Events read from the store per page when filling a gap.
const FILL_PAGE: i64 = 1_000;
/// Task → workflow entries kept before the cache is cleared.
const WORKFLOW_CACHE: usize = 100_000;
/// Tenants the near cache follows at most.
const NEAR_TENANTS: usize = 1_000;
/// How often the near cache stops following tenants nobody asked about.
const NEAR_SWEEP: Duration = Duration::from_secs(60);

/// Why the feed cannot serve a subscriber.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    /// Redis failed or is unreachable.
    #[error("Redis failed while {doing}")]
    Redis {
        /// What the feed was doing.
        doing: String,
        /// The cause.
        #[source]
        source: redis::RedisError,
    },
    /// The event store failed.
    #[error("the event store failed")]
    Store(#[from] ReadError),
    /// The Redis URL does not parse.
    #[error("the Redis URL is invalid")]
    Url(#[source] redis::RedisError),
    /// The upstream did not start reading the tenant's changes in time.
    #[error("the change feed did not start reading tenant {tenant}'s changes within {seconds} s")]
    NotReady {
        /// The tenant.
        tenant: String,
        /// The timeout.
        seconds: u64,
    },
    /// The server is shutting down.
    #[error("the change feed has stopped (the server is shutting down)")]
    Stopped,
}

fn redis_failed(doing: impl Into<String>) -> impl FnOnce(redis::RedisError) -> FeedError {
    let doing = doing.into();
    move |source| FeedError::Redis { doing, source }
}

impl From<FeedReadError> for FeedError {
    fn from(error: FeedReadError) -> Self {
        match error {
            FeedReadError::Url(source) => FeedError::Url(source),
            FeedReadError::Redis { doing, source } => FeedError::Redis { doing, source },
        }
    }
}

/// One event as fanned out: built once, shared by every subscriber.
#[derive(Debug)]
pub struct EventMessage {
    /// Its global position.
    pub position: i64,
    /// The event, as the schema shows it.
    pub event: Arc<Event>,
    /// The workflow it belongs to (its own stream's, or its task's), if known.
    pub workflow: Option<String>,
    /// W3C `traceparent` of its fan-out, when its trace is sampled: the
    /// delivery to subscribers continues the trace from there.
    pub traceparent: Option<String>,
}

/// An agent's state after a change: read from Redis once, shared.
#[derive(Debug)]
pub struct AgentMessage {
    /// Position of the (last) event of the change.
    pub position: i64,
    /// The agent's state as Redis held it right after.
    pub agent: Arc<Agent>,
    /// W3C `traceparent` of the fan-out of that change, when sampled.
    pub traceparent: Option<String>,
}

/// The channels of one tenant with subscribers.
struct Slot {
    /// Events, in position order.
    events: broadcast::Sender<Arc<EventMessage>>,
    /// Agent states, in position order.
    agents: broadcast::Sender<Arc<AgentMessage>>,
    /// Live [`Subscriber`] guards of the tenant.
    subscribers: usize,
    /// Set once the upstream has a cursor for the tenant (see [`Feed::join`]).
    armed: watch::Sender<bool>,
}

struct Inner {
    store: EventStore,
    redis: RedisModel,
    buffer: usize,
    /// Tenants with subscribers. A std mutex: held for map operations only,
    /// never across an await.
    slots: Mutex<HashMap<String, Slot>>,
    /// Wakes the upstream when a tenant gains its first subscriber.
    /// Wakes the upstream reading a tenant's feeds (one upstream, or on a
    /// Redis Cluster one per partition: [`Inner::changed`]).
    changed: Vec<Notify>,
    /// Task id → workflow id (from `TaskCreated`, else the task hash).
    workflows: Mutex<HashMap<String, String>>,
    /// The near cache of `agent(id)`, kept current by this feed.
    near: NearCache,
    /// Redis's TCP address (the near cache's sentinel connects to it).
    redis_tcp: Option<(String, u16)>,
    shutdown: CancellationToken,
}

/// The change feed shared by the subscribers of this process. Cheap to clone.
#[derive(Clone)]
pub struct Feed {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Feed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Feed")
            .field("buffer", &self.inner.buffer)
            .field("tenants", &lock(&self.inner.slots).len())
            .finish_non_exhaustive()
    }
}

/// What [`Feed::join`] returns: the membership and the tenant's event and
/// agent-state receivers (a subscriber drops the one it does not need, so
/// the upstream only reads what someone listens to).
pub type Joined = (
    Subscriber,
    broadcast::Receiver<Arc<EventMessage>>,
    broadcast::Receiver<Arc<AgentMessage>>,
);

/// A subscriber's membership of its tenant's channels: while any exists the
/// upstream reads the tenant's feed. Counts in `neurectomy_feed_subscribers`.
pub struct Subscriber {
    inner: Arc<Inner>,
    tenant: String,
    /// Counted in `neurectomy_feed_subscribers` (the near cache's is not).
    counted: bool,
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        if self.counted {
            crate::telemetry::metrics::feed_subscriber(-1.0);
        }
        let mut slots = lock(&self.inner.slots);
        if let Some(slot) = slots.get_mut(&self.tenant) {
            slot.subscribers = slot.subscribers.saturating_sub(1);
            if slot.subscribers == 0 {
                slots.remove(&self.tenant);
            }
        }
    }
}

impl Feed {
    /// Starts the shared upstream reader (until `shutdown`), on a Redis
    /// connection of its own to `redis_url` (its `XREAD` blocks).
    /// `near` agents at most are kept for `agent(id)` (0: none; see
    /// [`super::near`]).
    pub fn start(
        store: EventStore,
        redis: RedisModel,
        redis_url: &str,
        buffer: usize,
        near: usize,
        shutdown: CancellationToken,
    ) -> Result<Self, FeedError> {
        // On a Redis Cluster one `XREAD` may only name keys of one slot: an
        // upstream per partition, each on the primary serving its slot.
        let clients: Vec<(Option<u32>, FeedClient)> = if redis.clustered() {
            (0..redis.config().partitions.max(1))
                .map(|k| (Some(k), FeedClient::for_partition(redis.clone(), k)))
                .collect()
        } else {
            vec![(None, FeedClient::open(redis_url, redis.clone())?)]
        };
        let redis_tcp = clients.first().and_then(|(_, c)| c.tcp_address());
        let inner = Arc::new(Inner {
            store,
            redis,
            buffer: buffer.max(1),
            slots: Mutex::new(HashMap::new()),
            changed: clients.iter().map(|_| Notify::new()).collect(),
            workflows: Mutex::new(HashMap::new()),
            near: NearCache::new(near, NEAR_TENANTS),
            redis_tcp,
            shutdown,
        });
        for (partition, client) in clients {
            tokio::spawn(upstream(inner.clone(), client, partition));
        }
        if inner.near.enabled() {
            tokio::spawn(sweep(inner.clone()));
        }
        Ok(Self { inner })
    }

    /// Agent `id` of `tenant` (`None`: no such agent of the tenant): from
    /// the near cache, else from Redis — the hash fields `wanted` names, or
    /// all of them when the answer may be kept.
    pub async fn agent(
        &self,
        tenant: &str,
        id: &str,
        wanted: impl FnOnce() -> Vec<&'static str>,
    ) -> Result<Option<Arc<Agent>>, redis::RedisError> {
        let redis = &self.inner.redis;
        let ticket = match self
            .inner
            .near
            .lookup(tenant, id, |g| redis.generation_is(g))
        {
            Lookup::Hit(agent) => return Ok(Some(agent)),
            Lookup::Miss(ticket) => ticket,
            Lookup::Follow => {
                self.follow(tenant);
                None
            }
        };
        let fields: Vec<&str> = match ticket {
            Some(_) => Agent::STORED.iter().map(|(_, stored)| *stored).collect(),
            None => wanted(),
        };
        let agent = redis
            .entity_fields(Entity::Agent, tenant, id, &fields)
            .await?
            .map(|f| Arc::new(Agent::from_fields(id, &f)));
        if let (Some(ticket), Some(agent)) = (ticket, &agent) {
            self.inner.near.store(tenant, id, ticket, agent.clone());
        }
        Ok(agent)
    }

    /// Has the feed follow `tenant` for the near cache (in the background).
    fn follow(&self, tenant: &str) {
        let feed = self.clone();
        let tenant = tenant.to_owned();
        tokio::spawn(async move {
            let member = match feed.join_as(&tenant, false).await {
                // Only the membership: the channels' receivers are dropped,
                // so nothing is fanned out for the cache alone.
                Ok((member, _, _)) => Some(Box::new(member) as Box<dyn std::any::Any + Send>),
                Err(error) => {
                    tracing::debug!(%tenant, %error, "the near cache could not follow a tenant");
                    None
                }
            };
            feed.inner.near.followed(&tenant, member);
        });
    }

    /// The event store the feed falls back to.
    pub fn store(&self) -> &EventStore {
        &self.inner.store
    }

    /// Messages buffered per subscriber.
    pub fn buffer(&self) -> usize {
        self.inner.buffer
    }

    /// Joins `tenant`'s channels and waits until the upstream reads its
    /// feed. Every message published from then on reaches the receivers;
    /// every one published before is at or below the store's readable head
    /// as read after this returns.
    #[tracing::instrument(skip(self), err)]
    pub async fn join(&self, tenant: &str) -> Result<Joined, FeedError> {
        self.join_as(tenant, true).await
    }

    /// [`Feed::join`], counted in `neurectomy_feed_subscribers` or not.
    async fn join_as(&self, tenant: &str, counted: bool) -> Result<Joined, FeedError> {
        if self.inner.shutdown.is_cancelled() {
            return Err(FeedError::Stopped);
        }
        let (events, agents, mut armed, new) = {
            let mut slots = lock(&self.inner.slots);
            let new = !slots.contains_key(tenant);
            let slot = slots.entry(tenant.to_owned()).or_insert_with(|| Slot {
                events: broadcast::channel(self.inner.buffer).0,
                agents: broadcast::channel(self.inner.buffer).0,
                subscribers: 0,
                armed: watch::channel(false).0,
            });
            slot.subscribers += 1;
            if counted {
                crate::telemetry::metrics::feed_subscriber(1.0);
            }
            (
                slot.events.subscribe(),
                slot.agents.subscribe(),
                slot.armed.subscribe(),
                new,
            )
        };
        let subscriber = Subscriber {
            inner: self.inner.clone(),
            tenant: tenant.to_owned(),
            counted,
        };
        if new {
            self.inner.changed(tenant).notify_one();
        }
        let waited = tokio::time::timeout(ARM_TIMEOUT, armed.wait_for(|a| *a))
            .await
            .map(|r| r.is_ok());
        match waited {
            Ok(true) => Ok((subscriber, events, agents)),
            Ok(false) => Err(FeedError::Stopped),
            Err(_) => Err(FeedError::NotReady {
                tenant: tenant.to_owned(),
                seconds: ARM_TIMEOUT.as_secs(),
            }),
        }
    }

    /// The workflow each event belongs to: its stream's for `workflow-…`,
    /// its task's for `task-…` (from `TaskCreated`, a shared cache, else
    /// the tenant's task hashes in one round trip).
    pub async fn workflows(
        &self,
        tenant: &str,
        events: &[RecordedEvent],
    ) -> Result<Vec<Option<String>>, FeedError> {
        self.inner.workflows(tenant, events).await
    }
}

impl Inner {
    async fn workflows(
        &self,
        tenant: &str,
        events: &[RecordedEvent],
    ) -> Result<Vec<Option<String>>, FeedError> {
        let mut found: Vec<Option<String>> = Vec::with_capacity(events.len());
        let mut missing: Vec<String> = Vec::new();
        {
            let mut cache = lock(&self.workflows);
            for event in events {
                let workflow = match event.stream_id.split_once('-') {
                    Some(("workflow", id)) => Some(id.to_owned()),
                    Some(("task", id)) => {
                        if event.event_type == "TaskCreated" {
                            if let Some(w) = event.data.get("workflow_id").and_then(|w| w.as_str())
                            {
                                if cache.len() >= WORKFLOW_CACHE {
                                    cache.clear();
                                }
                                cache.insert(id.to_owned(), w.to_owned());
                            }
                        }
                        let known = cache.get(id).cloned();
                        if known.is_none() && !missing.iter().any(|m| m == id) {
                            missing.push(id.to_owned());
                        }
                        known
                    }
                    _ => None,
                };
                found.push(workflow);
            }
        }
        if missing.is_empty() {
            return Ok(found);
        }
        let rows = self
            .redis
            .entities(Entity::Task, tenant, &missing)
            .await
            .map_err(redis_failed("reading the workflows of tasks"))?;
        let mut cache = lock(&self.workflows);
        for (id, row) in missing.iter().zip(rows) {
            if let Some(workflow) = row.and_then(|r| r.get("workflow").cloned()) {
                cache.insert(id.clone(), workflow);
            }
        }
        for (event, workflow) in events.iter().zip(found.iter_mut()) {
            if workflow.is_none() {
                if let Some(("task", id)) = event.stream_id.split_once('-') {
                    *workflow = cache.get(id).cloned();
                }
            }
        }
        Ok(found)
    }

    /// The key of `tenant`'s feed in the current generation.
    fn key(&self, tenant: &str) -> String {
        self.redis.feed_key(tenant)
    }

    /// The upstream reading `tenant`'s feed: on a cluster, its partition's.
    fn partition(&self, tenant: &str) -> usize {
        if self.changed.len() > 1 {
            let partitions = u32::try_from(self.changed.len()).unwrap_or(u32::MAX);
            commands::partition::of(tenant, partitions) as usize
        } else {
            0
        }
    }

    /// What wakes the upstream reading `tenant`'s feed.
    fn changed(&self, tenant: &str) -> &Notify {
        &self.changed[self.partition(tenant)]
    }

    /// Closes every channel (their subscribers' streams end).
    fn close(&self) {
        lock(&self.slots).clear();
    }
}

/// The upstream: reads, reconnecting after failures, until shutdown.
async fn upstream(inner: Arc<Inner>, client: FeedClient, partition: Option<u32>) {
    let mut reader = Reader {
        cursors: HashMap::new(),
        generation: inner.redis.generation(),
        partition: partition.map_or(0, |k| k as usize),
    };
    let mut pause = Duration::from_millis(100);
    while !inner.shutdown.is_cancelled() {
        match reader.run(&inner, &client).await {
            Ok(()) => break,
            Err(error) => {
                inner.near.suspend();
                tracing::warn!(error = %error, cause = ?std::error::Error::source(&error), "the subscriptions' change feed failed; reconnecting");
                tokio::select! {
                    () = inner.shutdown.cancelled() => break,
                    () = tokio::time::sleep(pause) => {}
                }
                // At most a second apart: Redis back is noticed at once.
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        }
    }
    inner.near.suspend();
    inner.close();
    tracing::debug!("the subscriptions' change feed stopped");
}

/// Stops following, every [`NEAR_SWEEP`], the tenants the near cache was
/// not asked about since the last time.
async fn sweep(inner: Arc<Inner>) {
    loop {
        tokio::select! {
            () = inner.shutdown.cancelled() => return,
            () = tokio::time::sleep(NEAR_SWEEP) => inner.near.sweep(),
        }
    }
}

/// A connection to Redis that nothing is sent on (the near cache's
/// sentinel); `None` if Redis is not on TCP or it cannot be opened.
async fn sentinel(inner: &Inner) -> Option<std::net::TcpStream> {
    let (host, port) = inner.redis_tcp.as_ref()?;
    let timeout = inner.redis.config().connect_timeout;
    let connected = tokio::time::timeout(
        timeout,
        tokio::net::TcpStream::connect((host.as_str(), *port)),
    )
    .await;
    match connected {
        // Still non-blocking: a peek never waits.
        Ok(Ok(stream)) => stream.into_std().ok(),
        Ok(Err(error)) => {
            tracing::debug!(%error, "the near cache's connection to Redis failed");
            None
        }
        Err(_) => None,
    }
}

/// The upstream's own state: where it is in each tenant's feed.
struct Reader {
    /// Tenant → last position read (published or known covered).
    cursors: HashMap<String, i64>,
    /// The Redis generation the cursors were read in.
    generation: String,
    /// The upstream's partition (its tenants; 0 when there is one).
    partition: usize,
}

impl Reader {
    /// Reads until shutdown (`Ok`) or a failure (`Err`; cursors are kept,
    /// so a reconnected reader continues where this one stopped).
    async fn run(&mut self, inner: &Inner, client: &FeedClient) -> Result<(), FeedError> {
        // A reply of the blocking `XREAD` is awaited for its block time plus
        // the reply timeout; past that, Redis is not answering: the read
        // fails and the reader reconnects.
        let mut feed = client.connect().await?;
        loop {
            if inner.shutdown.is_cancelled() {
                return Ok(());
            }
            self.sync(inner, &mut feed).await?;
            self.follow_generation(inner, &mut feed).await?;
            if inner.near.enabled() && !inner.near.follows(&self.generation) {
                // Reading (again), or in a new generation: the cache starts
                // over, answering from memory once its sentinel is open.
                inner.near.resume(&self.generation, sentinel(inner).await);
            }
            if self.cursors.is_empty() {
                tokio::select! {
                    () = inner.shutdown.cancelled() => return Ok(()),
                    () = inner.changed[self.partition].notified() => continue,
                }
            }
            let Some(pages) = self.read(inner, &mut feed).await? else {
                continue;
            };
            let read_at = Instant::now();
            for FeedPage { key, entries } in pages {
                let Some(tenant) = self.cursors.keys().find(|t| inner.key(t) == key).cloned()
                else {
                    continue;
                };
                self.deliver(inner, &mut feed, &tenant, &key, entries, read_at)
                    .await?;
            }
        }
    }

    /// Follows the set of tenants with subscribers: drops the cursors of
    /// tenants without, starts new ones at their feed's end, and arms them.
    async fn sync(&mut self, inner: &Inner, feed: &mut FeedReader) -> Result<(), FeedError> {
        let tenants: Vec<(String, bool)> = lock(&inner.slots)
            .iter()
            .filter(|(t, _)| inner.partition(t) == self.partition)
            .map(|(t, s)| (t.clone(), *s.armed.borrow()))
            .collect();
        self.cursors
            .retain(|t, _| tenants.iter().any(|(tenant, _)| tenant == t));
        for (tenant, armed) in tenants {
            if !self.cursors.contains_key(&tenant) {
                let tail = feed.last_position(&inner.key(&tenant)).await?;
                tracing::debug!(%tenant, tail, "following a tenant's change feed");
                self.cursors.insert(tenant.clone(), tail);
            }
            if !armed {
                if let Some(slot) = lock(&inner.slots).get(&tenant) {
                    slot.armed.send_replace(true);
                }
            }
        }
        Ok(())
    }

    /// After a replay switched the Redis generation, continues in the new
    /// one: what the new feed holds up to its end is read from the store.
    async fn follow_generation(
        &mut self,
        inner: &Inner,
        feed: &mut FeedReader,
    ) -> Result<(), FeedError> {
        let now = inner.redis.generation();
        if now == self.generation {
            return Ok(());
        }
        tracing::info!(from = %self.generation, to = %now, "the Redis generation switched; the change feed follows");
        let tenants: Vec<String> = self.cursors.keys().cloned().collect();
        for tenant in tenants {
            let tail = feed.last_position(&inner.key(&tenant)).await?;
            let cursor = self.cursors.get(&tenant).copied().unwrap_or(0);
            if tail > cursor {
                fill(inner, &tenant, cursor, tail).await?;
                self.cursors.insert(tenant, tail);
            }
        }
        self.generation = now;
        Ok(())
    }

    /// One blocking `XREAD` over the tenants' feeds; `None` when it timed
    /// out, was woken to re-issue (a new tenant), or the server stops.
    async fn read(
        &self,
        inner: &Inner,
        feed: &mut FeedReader,
    ) -> Result<Option<Vec<FeedPage>>, FeedError> {
        let feeds: Vec<(String, i64)> = self
            .cursors
            .iter()
            .map(|(tenant, cursor)| (inner.key(tenant), *cursor))
            .collect();
        let waker = feed.waker();
        let read = feed.read(&feeds);
        tokio::pin!(read);
        // Why not just drop the read on a change: the connection would stay
        // blocked until Redis answers it. `CLIENT UNBLOCK` (on another
        // connection) makes it answer now; it is retried until it lands,
        // since it may overtake the `XREAD` it should unblock.
        let mut wake = false;
        loop {
            tokio::select! {
                biased;
                reply = &mut read => return Ok(reply?),
                () = inner.shutdown.cancelled() => return Ok(None),
                () = inner.changed[self.partition].notified(), if !wake => wake = true,
                () = tokio::time::sleep(Duration::from_millis(20)), if wake => {}
            }
            if waker.wake().await? {
                wake = false;
            }
        }
    }

    /// Publishes entries read from `tenant`'s feed at `read_at`.
    async fn deliver(
        &mut self,
        inner: &Inner,
        feed: &mut FeedReader,
        tenant: &str,
        key: &str,
        entries: Vec<FeedEntry>,
        read_at: Instant,
    ) -> Result<(), FeedError> {
        let cursor = self.cursors.get(tenant).copied().unwrap_or(0);
        if entries.len() >= READ_COUNT {
            // Behind by a full page: the capped feed may have been trimmed
            // past the cursor. Whatever lies between the cursor and the
            // oldest entry left comes from the store.
            if let Some(oldest) = feed.first_position(key).await? {
                if oldest > cursor + 1 {
                    fill(inner, tenant, cursor, oldest - 1).await?;
                }
            }
        }
        if let Some(foreign) = entries.iter().find(|e| e.position.is_none()) {
            // The projector writes every entry with its position as the id;
            // this one came from elsewhere, so the page cannot be trusted:
            // its range is delivered from the event store instead.
            let until = match entries.iter().filter_map(|e| e.position).max() {
                Some(last) => last,
                None => inner.store.head().await?.readable,
            };
            tracing::error!(
                key,
                id = %foreign.id,
                "the change feed holds an entry the projector did not write; delivering positions {cursor}..={until} from the event store"
            );
            if until > cursor {
                fill(inner, tenant, cursor, until).await?;
                self.cursors.insert(tenant.to_owned(), until);
            }
            return Ok(());
        }
        let read = entries.len();
        let changes: Vec<Change> = entries
            .into_iter()
            .filter_map(|entry| {
                let position = entry.position.filter(|p| *p > cursor)?;
                Some(Change {
                    position,
                    event_type: entry.event_type,
                    stream_id: entry.stream_id,
                    data: entry.data,
                    traceparent: entry.traceparent,
                })
            })
            .collect();
        tracing::trace!(
            tenant,
            cursor,
            entries = read,
            changes = changes.len(),
            "read from the change feed"
        );
        publish(inner, tenant, &changes, None).await?;
        crate::telemetry::metrics::feed_fanout(changes.len(), read_at.elapsed());
        if let Some(last) = changes.last() {
            self.cursors.insert(tenant.to_owned(), last.position);
        }
        Ok(())
    }
}

/// What a feed entry says (the payload, not the metadata).
struct Change {
    position: i64,
    event_type: String,
    stream_id: String,
    data: serde_json::Value,
    /// The trace context the change continues (its projection's, or its
    /// command's when read from the store).
    traceparent: Option<String>,
}

impl Change {
    fn from_recorded(e: &RecordedEvent) -> Self {
        Self {
            position: e.position,
            event_type: e.event_type.clone(),
            stream_id: e.stream_id.clone(),
            data: e.data.clone(),
            traceparent: e.metadata.traceparent.clone(),
        }
    }
}

/// Publishes `tenant`'s events in `(after, until]` from the event store (a
/// range the feed cannot vouch for).
async fn fill(inner: &Inner, tenant: &str, after: i64, until: i64) -> Result<(), FeedError> {
    tracing::info!(
        tenant,
        after,
        until,
        "filling the change feed from the event store"
    );
    let mut after = after;
    while after < until {
        let page = inner
            .store
            .read_tenant(tenant, after, until, FILL_PAGE, None)
            .await?;
        let changes: Vec<Change> = page.iter().map(Change::from_recorded).collect();
        publish(inner, tenant, &changes, Some(&page)).await?;
        match page.last() {
            Some(last) if page.len() as i64 == FILL_PAGE => after = last.position,
            _ => break,
        }
    }
    Ok(())
}

/// Fans `changes` (in position order) out to the tenant's subscribers:
/// events (whole, from `recorded` or the store, once) if anyone listens for
/// events, agent states (each agent's hash read once per batch) if anyone
/// listens for agents.
async fn publish(
    inner: &Inner,
    tenant: &str,
    changes: &[Change],
    recorded: Option<&[RecordedEvent]>,
) -> Result<(), FeedError> {
    if changes.is_empty() {
        return Ok(());
    }
    // Before anything is awaited: a read of Redis that started before
    // these changes were read is not kept by the near cache.
    let cached = inner.near.changing(tenant);
    let Some((events, agents)) = lock(&inner.slots)
        .get(tenant)
        .map(|s| (s.events.clone(), s.agents.clone()))
    else {
        return Ok(());
    };
    // One span per change of a sampled trace, in that trace, until it is in
    // the subscribers' channels; messages carry its context to delivery
    // (or the change's own when no span is opened: spans not exported).
    let mut spans = Vec::new();
    let mut traces: Vec<(i64, String)> = Vec::new();
    for change in changes {
        let traced = change.traceparent.as_deref();
        let Some(span) = commands::trace::follow(traced, || {
            tracing::info_span!(
                parent: None,
                "feed.fanout",
                tenant,
                position = change.position,
                event_type = %change.event_type,
            )
        }) else {
            if let Some(traceparent) = traced.filter(|t| commands::trace::sampled(Some(t))) {
                traces.push((change.position, traceparent.to_owned()));
            }
            continue;
        };
        if let Some(traceparent) = commands::trace::traceparent_of(&span) {
            traces.push((change.position, traceparent));
        }
        spans.push(span);
    }
    if events.receiver_count() > 0 {
        let loaded;
        let records = match recorded {
            Some(records) => records,
            None => {
                let positions: Vec<i64> = changes.iter().map(|c| c.position).collect();
                loaded = inner.store.read_positions(&positions).await?;
                &loaded[..]
            }
        };
        // The feed is per tenant; checking again costs nothing and keeps
        // one tenant's events out of another's channel whatever happens.
        let records: Vec<RecordedEvent> = records
            .iter()
            .filter(|r| r.metadata.tenant == tenant)
            .cloned()
            .collect();
        let workflows = inner.workflows(tenant, &records).await?;
        for (record, workflow) in records.iter().zip(workflows) {
            // An error only means no receiver is left.
            let _ = events.send(Arc::new(EventMessage {
                position: record.position,
                event: Arc::new(Event::from(record)),
                workflow,
                traceparent: trace_at(&traces, record.position),
            }));
        }
    }
    let listening = agents.receiver_count() > 0;
    if listening || cached {
        let touched = touched_agents(inner, tenant, changes).await?;
        inner.near.forget(tenant, touched.keys());
        if listening {
            publish_agents(inner, tenant, &touched, &agents, &traces).await?;
        }
    }
    drop(spans);
    Ok(())
}

/// The fan-out context of the change at `position`, if traced.
fn trace_at(traces: &[(i64, String)], position: i64) -> Option<String> {
    traces
        .iter()
        .find(|(p, _)| *p == position)
        .map(|(_, t)| t.clone())
}

/// Which agents' hashes `changes` touched, by the last position touching
/// each.
async fn touched_agents(
    inner: &Inner,
    tenant: &str,
    changes: &[Change],
) -> Result<BTreeMap<String, i64>, FeedError> {
    let mut touched: BTreeMap<String, i64> = BTreeMap::new();
    // Completions, failures and cancellations name no agent: their task's
    // assignee (kept in the task hash) is the one released.
    let mut released: Vec<(String, i64)> = Vec::new();
    for change in changes {
        if let Some(("agent", id)) = change.stream_id.split_once('-') {
            touched.insert(id.to_owned(), change.position);
        }
        for field in ["agent_id", "from_agent_id", "to_agent_id"] {
            if let Some(id) = change.data.get(field).and_then(|v| v.as_str()) {
                touched.insert(id.to_owned(), change.position);
            }
        }
        // An erasure names the agents whose shown values it changed.
        if change.event_type == "PersonalDataErased" {
            let changed = change.data.get("changes").and_then(|c| c.as_array());
            for stream in changed.into_iter().flatten() {
                let stream = stream.get("stream_id").and_then(|s| s.as_str());
                if let Some(("agent", id)) = stream.and_then(|s| s.split_once('-')) {
                    touched.insert(id.to_owned(), change.position);
                }
            }
        }
        if matches!(
            change.event_type.as_str(),
            "TaskCompleted" | "TaskFailed" | "TaskCancelled"
        ) {
            if let Some(("task", id)) = change.stream_id.split_once('-') {
                released.push((id.to_owned(), change.position));
            }
        }
    }
    if !released.is_empty() {
        let ids: Vec<String> = released.iter().map(|(id, _)| id.clone()).collect();
        let rows = inner
            .redis
            .entities(Entity::Task, tenant, &ids)
            .await
            .map_err(redis_failed("reading the assignees of tasks"))?;
        for ((_, position), row) in released.iter().zip(rows) {
            if let Some(agent) = row.and_then(|r| r.get("assignee").cloned()) {
                if !agent.is_empty() {
                    let at = touched.entry(agent).or_insert(*position);
                    *at = (*at).max(*position);
                }
            }
        }
    }
    Ok(touched)
}

/// Reads the hash of each agent `touched` once and publishes it.
async fn publish_agents(
    inner: &Inner,
    tenant: &str,
    touched: &BTreeMap<String, i64>,
    agents: &broadcast::Sender<Arc<AgentMessage>>,
    traces: &[(i64, String)],
) -> Result<(), FeedError> {
    if touched.is_empty() {
        return Ok(());
    }
    let ids: Vec<String> = touched.keys().cloned().collect();
    let rows = inner
        .redis
        .entities(Entity::Agent, tenant, &ids)
        .await
        .map_err(redis_failed("reading changed agents"))?;
    let mut messages: Vec<AgentMessage> = ids
        .iter()
        .zip(rows)
        .filter_map(|(id, row)| {
            let fields = row?;
            let position = touched.get(id).copied().unwrap_or(0);
            Some(AgentMessage {
                position,
                agent: Arc::new(Agent::from_fields(id, &fields)),
                traceparent: trace_at(traces, position),
            })
        })
        .collect();
    messages.sort_by_key(|m| m.position);
    for message in messages {
        let _ = agents.send(Arc::new(message));
    }
    Ok(())
}
