//! The Redis read model: the current state of agents, tasks and workflows
//! with the indexes the API reads, and each tenant's change feed.
//!
//! Keys live under a configurable prefix `P` (e.g. `neurectomy:`) and a
//! *generation* `G`: `P` + `active` names the generation readers and the
//! live projector use, and every key below is `P` + `G` + `:` + the name
//! shown. `neurectomy replay` builds a new generation from the event store
//! while the live one keeps serving, then switches `P` + `active` with one
//! `SET` (atomic for readers) and deletes the old generation. A projector
//! that finds the generation switched under it re-reads the checkpoint and
//! catches up from there ([`ApplyError::Moved`]).
//!
//! Keys of a generation:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `agent:<id>` | hash | tenant, name, kind, model, capabilities, parent, status, status_reason, current_task, tasks_completed, tasks_failed, last_position, last_event_at |
//! | `task:<id>` | hash | tenant, workflow, title, state, assignee, progress, progress_note, attempt, max_attempts, priority, required_capabilities, depends_on, last_error, last_position |
//! | `workflow:<id>` | hash | tenant, name, status, reason, tasks_total, `tasks_<state>` per task state, last_position |
//! | `agents:<tenant>:status:<status>` | set | agent ids by status |
//! | `agents:<tenant>:capability:<cap>` | set | agent ids by capability |
//! | `agents:<tenant>:recent` | sorted set | agent ids by last event time (ms) |
//! | `workflow:<id>:tasks:<state>` | set | task ids of a workflow by state |
//! | `workflows:<tenant>:status:<status>` | set | workflow ids by status |
//! | `feed:<tenant>` | stream | change feed; entry id `<position>-0`, capped; fields position, type, stream_id, stream_version, data and, when traced, traceparent (of the event's projection) |
//! | `checkpoint` | string | last applied global position |
//! | `fence` | string | highest lease token a batch was written under ([`crate::lease`]) |
//! | `checkpoint:p<k>`, `fence:p<k>` | string | the same, of partition `k` when the model applies one partition ([`RedisModel::for_partition`]) |
//!
//! Keys outside the generations, directly under `P`:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `active` | string | the active generation (`g0` until a replay switches it) |
//! | `projector:<name>` | hash | the projector's health report: state, checkpoint, last_error, at_ms; expires ([`health`]) |
//!
//! `last_position` of a hash is the position of the last event that changed
//! it, except for a workflow's task counters (moved by its tasks' events,
//! which set the task's `last_position`) and an agent's `current_task` when
//! a task is cancelled; `verify` relies on that (`crate::verify`).
//!
//! A batch is one `MULTI/EXEC` holding every change and the checkpoint, so a
//! crash leaves either all of a batch or none of it. It is sent on a
//! connection of the model's own (the *writer*), which first `WATCH`es the
//! checkpoint and the `fence` in the round trip that reads them and the
//! rows the batch changes: if another writer moves either before the
//! `EXEC`, the transaction is discarded ([`ApplyError::Moved`], nothing
//! written). A projector under a lease writes its token to `fence` in the
//! transaction, and a batch whose token is below the stored one is refused
//! ([`ApplyError::Fenced`], nothing written). The writer is dropped after
//! any failure, so no `WATCH` outlives its batch. Lists are stored as
//! comma-separated strings (ids and capability names contain no commas).
//!
//! Layout: this file holds the model, its generations and the batch's
//! round trips; `plan` and `writes` build a batch's `MULTI/EXEC`; [`read`]
//! is what the API reads; [`feed`] reads the change feeds (the API's
//! subscriptions); [`health`] publishes and reads the projectors' reports.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};

use domain::{AgentEvent, DomainEvent, TaskEvent, TaskStatus};
use redis::aio::ConnectionManager;

use crate::model::{ApplyError, Fence, Projected, ReadModel};

pub use conn::Connection;

mod conn;
pub mod feed;
pub mod health;
mod plan;
pub mod read;
mod writes;

use plan::Planner;

/// Settings of the Redis read model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisModelConfig {
    /// Prefix of every key, e.g. `neurectomy:`.
    pub prefix: String,
    /// Approximate cap of each tenant's change feed.
    pub feed_max_len: usize,
    /// How long one connection attempt may take.
    pub connect_timeout: std::time::Duration,
    /// How long a command may wait for its reply.
    pub response_timeout: std::time::Duration,
    /// Partitions the log is projected in (`commands::partition`; 1: not
    /// split): then each partition keeps `checkpoint:p<k>`, and the
    /// checkpoint a tenant's reader waits for is its partition's
    /// ([`RedisModel::read_checkpoint_of`]).
    pub partitions: u32,
    /// The URL names a Redis Cluster (comma-separated seed nodes): the
    /// model uses the cluster client, tags every key with its partition
    /// (`{p<k>}`, one hash slot per partition) and writes each batch on a
    /// connection to the primary serving its partition's slot.
    pub cluster: bool,
}

impl Default for RedisModelConfig {
    fn default() -> Self {
        Self {
            prefix: "neurectomy:".to_owned(),
            feed_max_len: 100_000,
            connect_timeout: std::time::Duration::from_secs(1),
            response_timeout: std::time::Duration::from_secs(2),
            partitions: 1,
            cluster: false,
        }
    }
}

impl RedisModelConfig {
    /// How a connection to Redis is kept: every command answered within
    /// `response_timeout`; a dropped connection is re-established in the
    /// background with a few attempts of at most `connect_timeout` each,
    /// 250 ms apart, which commands issued meanwhile wait for — so during
    /// an outage a command fails within about a second or two instead of
    /// waiting out the client's default backoff (up to a minute per
    /// attempt), and once Redis is back the next command reconnects.
    pub fn connection_manager(&self) -> redis::aio::ConnectionManagerConfig {
        redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(self.connect_timeout)
            .set_response_timeout(self.response_timeout)
            .set_number_of_retries(2)
            .set_factor(2)
            .set_max_delay(250)
    }
}

/// The Redis read model. Cheap to clone (the connection is multiplexed and
/// reconnects by itself).
#[derive(Clone)]
pub struct RedisModel {
    conn: Connection,
    /// Opens the writer.
    client: redis::Client,
    /// The connection batches are written on (see the module's docs): a
    /// plain multiplexed one, used by one batch at a time, never
    /// reconnecting by itself (a `WATCH` must not silently vanish).
    writer: Arc<tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>>,
    config: RedisModelConfig,
    /// The generation keys are built under. Follows `P` + `active` unless
    /// pinned (a replay builds a generation that is not active yet).
    generation: Arc<RwLock<String>>,
    /// Whether `generation` is fixed rather than following the pointer.
    pinned: bool,
    /// The partition of the log this model instance applies
    /// ([`RedisModel::for_partition`]); `None`: the whole log.
    partition: Option<u32>,
    /// The task and agent rows as the last batch applied through this model
    /// (or a clone) left them; see [`Carried`].
    carried: Arc<Mutex<Option<Carried>>>,
    /// Held by every clone; the connection's keeper (see
    /// [`RedisModel::keep`]) stops when the last one is dropped.
    _alive: Arc<()>,
}

/// The task and agent rows a batch's planner ended with, kept for the next
/// batch so that it reads from Redis only the rows it has not seen.
///
/// The read model is a function of the log: the rows under generation
/// `generation` at checkpoint `checkpoint` are the same whoever wrote them.
/// So they are used only when the next batch's read (in the same round trip
/// as its misses) finds that generation active (or pinned) with that
/// checkpoint; any other writer in between moved the checkpoint.
struct Carried {
    /// The generation the rows are of.
    generation: String,
    /// The checkpoint they are at.
    checkpoint: i64,
    /// Task rows by id (only tasks that exist).
    tasks: HashMap<String, TaskRow>,
    /// Agent rows by id (only agents that exist).
    agents: HashMap<String, AgentRow>,
}

/// Events per atomic write while catching up (see
/// [`ReadModel::catch_up_batch_size`]).
const CATCH_UP_BATCH: usize = 2000;

/// Most task rows carried from one batch to the next; beyond it, finished
/// tasks are dropped first, then everything.
const CARRIED_TASKS: usize = 20_000;
/// Most agent rows carried from one batch to the next.
const CARRIED_AGENTS: usize = 20_000;

impl Carried {
    /// Keeps the rows within their bounds.
    fn bounded(mut self) -> Self {
        if self.tasks.len() > CARRIED_TASKS {
            // Completed and cancelled tasks accept no further event.
            self.tasks.retain(|_, t| {
                t.state != TaskStatus::Completed.as_str()
                    && t.state != TaskStatus::Cancelled.as_str()
            });
            if self.tasks.len() > CARRIED_TASKS {
                self.tasks.clear();
            }
        }
        if self.agents.len() > CARRIED_AGENTS {
            self.agents.clear();
        }
        self
    }
}

/// How often a model pings Redis (see [`RedisModel::keep`]).
const KEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The generation used when none was ever activated.
pub const FIRST_GENERATION: &str = "g0";

impl std::fmt::Debug for RedisModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisModel")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn unavailable(doing: impl Into<String>) -> impl FnOnce(redis::RedisError) -> ApplyError {
    let doing = doing.into();
    move |source| ApplyError::Unavailable {
        store: "Redis",
        doing,
        source: Box::new(source),
    }
}

/// What the model needs to know of a task to move it between states.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TaskRow {
    workflow: String,
    state: String,
    assignee: Option<String>,
}

/// What the model needs to know of an agent to move it between indexes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AgentRow {
    status: String,
    current_task: Option<String>,
}

fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.is_empty())
}

/// The task counters of a workflow hash: `tasks_total` and one
/// `tasks_<state>` per task status.
pub fn workflow_task_counters() -> impl Iterator<Item = String> {
    std::iter::once("total")
        .chain(TaskStatus::ALL.iter().map(|s| s.as_str()))
        .map(|state| format!("tasks_{state}"))
}

impl RedisModel {
    /// Connects to Redis at `url`, following the active generation.
    pub async fn connect(url: &str, config: RedisModelConfig) -> Result<Self, ApplyError> {
        let model = Self::open(url, config, String::new(), false).await?;
        model
            .refresh()
            .await
            .map_err(unavailable("reading the active generation"))?;
        Ok(model)
    }

    /// Connects to Redis at `url`, writing generation `generation` whether
    /// or not it is active (to build it for a switch-over).
    pub async fn connect_generation(
        url: &str,
        config: RedisModelConfig,
        generation: &str,
    ) -> Result<Self, ApplyError> {
        Self::open(url, config, generation.to_owned(), true).await
    }

    async fn open(
        url: &str,
        config: RedisModelConfig,
        generation: String,
        pinned: bool,
    ) -> Result<Self, ApplyError> {
        let seeds = conn::seeds(url);
        if seeds.len() > 1 && !config.cluster {
            return Err(ApplyError::Unavailable {
                store: "Redis",
                doing: format!("connecting to {} Redis URLs", seeds.len()),
                source: "several URLs name a Redis Cluster's seed nodes: set redis.cluster = true (NEURECTOMY_REDIS_CLUSTER), or give one URL".into(),
            });
        }
        let first = seeds.first().map_or(url, String::as_str);
        let client = redis::Client::open(first)
            .map_err(unavailable(format!("parsing the Redis URL {first}")))?;
        let conn = if config.cluster {
            let cluster = redis::cluster::ClusterClientBuilder::new(seeds.clone())
                .connection_timeout(config.connect_timeout)
                .response_timeout(config.response_timeout)
                .retries(2)
                .min_retry_wait(50)
                .max_retry_wait(250)
                .build()
                .map_err(unavailable(format!("parsing the Redis Cluster URLs {url}")))?;
            let connected =
                tokio::time::timeout(config.connect_timeout * 3, cluster.get_async_connection())
                    .await
                    .map_err(|_| ApplyError::Unavailable {
                        store: "Redis",
                        doing: format!("connecting to the Redis Cluster at {url}"),
                        source: format!("no connection within {:?}", config.connect_timeout * 3)
                            .into(),
                    })?
                    .map_err(unavailable(format!(
                        "connecting to the Redis Cluster at {url}"
                    )))?;
            Connection::Cluster(connected)
        } else {
            let manager =
                ConnectionManager::new_with_config(client.clone(), config.connection_manager())
                    .await
                    .map_err(unavailable(format!("connecting to {url}")))?;
            Connection::Single(manager)
        };
        let alive = Arc::new(());
        Self::keep(conn.clone(), Arc::downgrade(&alive));
        Ok(Self {
            conn,
            client,
            writer: Arc::new(tokio::sync::Mutex::new(None)),
            config,
            generation: Arc::new(RwLock::new(generation)),
            pinned,
            partition: None,
            carried: Arc::new(Mutex::new(None)),
            _alive: alive,
        })
    }

    /// Pings Redis every [`KEEP_EVERY`] while the model lives. The
    /// connection manager reconnects only when a command fails, and after
    /// an outage its last failed reconnection is what the next command
    /// gets: without a command of its own, the first request after Redis
    /// returns would fail. The ping is that command, so a Redis that is
    /// back is used again within about a second, whoever asks next.
    fn keep(conn: Connection, alive: std::sync::Weak<()>) {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(KEEP_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if alive.strong_count() == 0 {
                    return;
                }
                let mut conn = conn.clone();
                let _: Result<String, _> = redis::cmd("PING").query_async(&mut conn).await;
            }
        });
    }

    /// The key naming the active generation.
    pub fn pointer_key(&self) -> String {
        format!("{}active", self.config.prefix)
    }

    /// The generation keys are currently built under.
    pub fn generation(&self) -> String {
        match self.generation.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Whether the generation read is `generation` (no copy made).
    pub fn generation_is(&self, generation: &str) -> bool {
        match self.generation.read() {
            Ok(g) => *g == generation,
            Err(poisoned) => *poisoned.into_inner() == generation,
        }
    }

    fn set_generation(&self, generation: &str) {
        let mut current = match self.generation.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        generation.clone_into(&mut current);
    }

    /// Re-reads the active generation (creating the first one if none was
    /// ever activated) unless pinned; returns the generation in use.
    pub async fn refresh(&self) -> Result<String, redis::RedisError> {
        if self.pinned {
            return Ok(self.generation());
        }
        let mut conn = self.conn.clone();
        let pointer = self.pointer_key();
        let mut active: Option<String> = redis::cmd("GET")
            .arg(&pointer)
            .query_async(&mut conn)
            .await?;
        if active.is_none() {
            // SET NX: of two first readers, one creates it, both read it.
            let (set, now): (Option<String>, Option<String>) = redis::pipe()
                .cmd("SET")
                .arg(&pointer)
                .arg(FIRST_GENERATION)
                .arg("NX")
                .cmd("GET")
                .arg(&pointer)
                .query_async(&mut conn)
                .await?;
            let _ = set;
            active = now;
        }
        let active = active.unwrap_or_else(|| FIRST_GENERATION.to_owned());
        self.set_generation(&active);
        Ok(active)
    }

    /// Makes this model's generation the active one (one `SET`: readers
    /// switch atomically). Returns the generation that was active before.
    pub async fn activate(&self) -> Result<Option<String>, redis::RedisError> {
        let mut conn = self.conn.clone();
        redis::cmd("SET")
            .arg(self.pointer_key())
            .arg(self.generation())
            .arg("GET")
            .query_async(&mut conn)
            .await
    }

    /// Deletes every key of `generation` (on a cluster, on each primary).
    pub async fn drop_generation(&self, generation: &str) -> Result<u64, redis::RedisError> {
        let pattern = format!("{}{generation}:*", self.config.prefix);
        if self.config.cluster {
            let mut conn = self.conn.clone();
            let slots: redis::Value = redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query_async(&mut conn)
                .await?;
            let mut deleted = 0;
            for (host, port) in conn::primaries(&slots) {
                let mut info = self.client.get_connection_info().clone();
                info.addr = redis::ConnectionAddr::Tcp(host, port);
                let mut node = redis::Client::open(info)?
                    .get_multiplexed_async_connection()
                    .await?;
                deleted += Self::scan_and_unlink(&mut node, &pattern, true).await?;
            }
            return Ok(deleted);
        }
        let mut conn = self.conn.clone();
        Self::scan_and_unlink(&mut conn, &pattern, false).await
    }

    /// `SCAN`s `conn` for `pattern` and unlinks what it finds (one key per
    /// `UNLINK` when `per_key`: on a cluster node, keys of several slots
    /// cannot share a command).
    async fn scan_and_unlink<C: redis::aio::ConnectionLike + Send>(
        conn: &mut C,
        pattern: &str,
        per_key: bool,
    ) -> Result<u64, redis::RedisError> {
        let mut cursor: u64 = 0;
        let mut deleted = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(conn)
                .await?;
            if keys.is_empty() {
            } else if per_key {
                let mut pipe = redis::pipe();
                for key in &keys {
                    pipe.cmd("UNLINK").arg(key);
                }
                let each: Vec<u64> = pipe.query_async(conn).await?;
                deleted += each.iter().sum::<u64>();
            } else {
                deleted += redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async::<u64>(conn)
                    .await?;
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }

    /// The settings it was connected with.
    pub fn config(&self) -> &RedisModelConfig {
        &self.config
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.config.prefix
    }

    /// A connection for reads (queries, verify).
    pub fn connection(&self) -> Connection {
        self.conn.clone()
    }

    /// Whether the model is on a Redis Cluster.
    pub fn clustered(&self) -> bool {
        self.config.cluster
    }

    /// The full key for `suffix` of this model's partition (partition 0
    /// when it applies the whole log).
    pub fn key(&self, suffix: &str) -> String {
        self.key_in(self.partition.unwrap_or(0), suffix)
    }

    /// The full key for `suffix` of `partition`: `P` + `G` + `:` + suffix,
    /// and on a cluster `P` + `G` + `:{p<k>}:` + suffix, so that a
    /// partition's keys share one hash slot.
    pub fn key_in(&self, partition: u32, suffix: &str) -> String {
        if self.config.cluster {
            format!(
                "{}{}:{{p{partition}}}:{suffix}",
                self.config.prefix,
                self.generation()
            )
        } else {
            format!("{}{}:{suffix}", self.config.prefix, self.generation())
        }
    }

    /// The full key for `suffix` of `tenant`'s partition.
    pub fn key_of(&self, tenant: &str, suffix: &str) -> String {
        if self.config.cluster {
            self.key_in(
                commands::partition::of(tenant, self.config.partitions),
                suffix,
            )
        } else {
            self.key(suffix)
        }
    }

    /// This model applying partition `partition` of the log (see
    /// `commands::partition`): its checkpoint and fence are the partition's
    /// own (`checkpoint:p<k>`, `fence:p<k>`); every other key is a tenant's,
    /// and a tenant is in one partition, so partitions write disjoint keys
    /// and their projectors run side by side. It has its own batch writer
    /// and carried rows, and shares the connection and generation.
    #[must_use]
    pub fn for_partition(&self, partition: u32) -> Self {
        Self {
            writer: Arc::new(tokio::sync::Mutex::new(None)),
            partition: Some(partition),
            carried: Arc::new(Mutex::new(None)),
            ..self.clone()
        }
    }

    /// The name of this model's checkpoint key (below the generation).
    pub(crate) fn checkpoint_name(&self) -> String {
        match self.partition {
            None => "checkpoint".to_owned(),
            Some(k) => format!("checkpoint:p{k}"),
        }
    }

    /// The name of this model's fence key (below the generation).
    fn fence_name(&self) -> String {
        match self.partition {
            None => "fence".to_owned(),
            Some(k) => format!("fence:p{k}"),
        }
    }

    /// The stored checkpoint of the current generation.
    async fn stored_checkpoint(&self) -> Result<i64, ApplyError> {
        let mut conn = self.conn.clone();
        let value: Option<i64> = redis::cmd("GET")
            .arg(self.key(&self.checkpoint_name()))
            .query_async(&mut conn)
            .await
            .map_err(unavailable("reading the checkpoint"))?;
        Ok(value.unwrap_or(0))
    }

    /// Re-reads the active generation (as [`RedisModel::refresh`]) and its
    /// stored checkpoint. In the usual case, the generation has not changed,
    /// both are read in one round trip: the pointer and the checkpoint of the
    /// generation last seen, which is the right checkpoint iff the pointer
    /// still names that generation (it is in the same pipeline, so both
    /// come from one moment). Otherwise it falls back to reading them in turn.
    async fn generation_and_checkpoint(&self) -> Result<(String, i64), ApplyError> {
        let known = self.generation();
        if !self.pinned && !known.is_empty() {
            let mut conn = self.conn.clone();
            let (active, checkpoint): (Option<String>, Option<i64>) = if self.config.cluster {
                // Two slots: the checkpoint first, then the pointer (which
                // still naming the generation means the checkpoint was its).
                let checkpoint: Option<i64> = redis::cmd("GET")
                    .arg(self.key(&self.checkpoint_name()))
                    .query_async(&mut conn)
                    .await
                    .map_err(unavailable("reading the checkpoint"))?;
                let active: Option<String> = redis::cmd("GET")
                    .arg(self.pointer_key())
                    .query_async(&mut conn)
                    .await
                    .map_err(unavailable("reading the active generation"))?;
                (active, checkpoint)
            } else {
                redis::pipe()
                    .cmd("GET")
                    .arg(self.pointer_key())
                    .cmd("GET")
                    .arg(self.key(&self.checkpoint_name()))
                    .query_async(&mut conn)
                    .await
                    .map_err(unavailable("reading the active generation and checkpoint"))?
            };
            if active.as_deref() == Some(known.as_str()) {
                return Ok((known, checkpoint.unwrap_or(0)));
            }
        }
        let now = self
            .refresh()
            .await
            .map_err(unavailable("reading the active generation"))?;
        Ok((now, self.stored_checkpoint().await?))
    }

    /// Reads, in one round trip, the active generation, the checkpoint and
    /// the prior task and agent rows (under the model's current generation);
    /// agents found only as assignees of those tasks take a second one.
    ///
    /// Rows found in `carried` are not read again when the checkpoint read
    /// along shows they are current (see [`Carried`]); when it shows they
    /// are not, every row is read afresh. Unless the model is pinned, the
    /// rows are only meaningful when `active` names the model's generation
    /// (the caller re-reads otherwise).
    ///
    /// The checkpoint and the fence are `WATCH`ed first, on `conn` (the
    /// writer), so that the batch's `EXEC` is discarded if either moves.
    async fn read_prior(
        &self,
        conn: &mut redis::aio::MultiplexedConnection,
        task_ids: &BTreeSet<String>,
        agent_ids: &BTreeSet<String>,
        carried: Option<Carried>,
    ) -> Result<Prior, ApplyError> {
        let generation = self.generation();
        let mut carried = carried.filter(|c| c.generation == generation);
        loop {
            let (mut tasks, mut agents, carried_at) = match carried.take() {
                Some(c) => (c.tasks, c.agents, Some(c.checkpoint)),
                None => (HashMap::new(), HashMap::new(), None),
            };
            let task_misses: Vec<&String> = task_ids
                .iter()
                .filter(|id| !tasks.contains_key(*id))
                .collect();
            let agent_misses: BTreeSet<String> = agent_ids
                .iter()
                .filter(|id| !agents.contains_key(*id))
                .cloned()
                .collect();
            let mut pipe = redis::pipe();
            let (checkpoint_key, fence_key) = (
                self.key(&self.checkpoint_name()),
                self.key(&self.fence_name()),
            );
            pipe.cmd("WATCH")
                .arg(&checkpoint_key)
                .arg(&fence_key)
                .ignore();
            // On a cluster the writer is a connection to the primary of the
            // partition's slot, which the pointer is not in: it is read
            // through the cluster connection, just before.
            let pointer = if self.config.cluster {
                let mut cluster = self.conn.clone();
                let active: Option<String> = redis::cmd("GET")
                    .arg(self.pointer_key())
                    .query_async(&mut cluster)
                    .await
                    .map_err(unavailable("reading the active generation"))?;
                Some(active)
            } else {
                pipe.cmd("GET").arg(self.pointer_key());
                None
            };
            pipe.cmd("GET").arg(&checkpoint_key);
            pipe.cmd("GET").arg(&fence_key);
            for id in &task_misses {
                pipe.cmd("HMGET")
                    .arg(self.key(&format!("task:{id}")))
                    .arg(&["workflow", "state", "assignee"]);
            }
            self.hmget_agents(&mut pipe, &agent_misses);
            let found: Vec<redis::Value> = pipe
                .query_async(conn)
                .await
                .map_err(unavailable("reading tasks and agents"))?;
            let mut found = found.into_iter();
            let mut next = || -> Result<Option<String>, ApplyError> {
                redis::from_owned_redis_value(found.next().unwrap_or(redis::Value::Nil))
                    .map_err(unavailable("reading the active generation and checkpoint"))
            };
            let active = match pointer {
                Some(active) => active,
                None => next()?,
            };
            let (stored, fence) = (next()?, next()?);
            let number = |what: &str, stored: Option<String>| match stored {
                Some(stored) => stored.parse::<i64>().map_err(|_| ApplyError::Unavailable {
                    store: "Redis",
                    doing: format!("reading the {what}"),
                    source: format!("the {what} is not a number: {stored:?}").into(),
                }),
                None => Ok(0),
            };
            let checkpoint = number("checkpoint", stored)?;
            let fence = u64::try_from(number("fence", fence)?).unwrap_or(0);
            let current = self.pinned || active.as_deref() == Some(generation.as_str());
            if let Some(at) = carried_at {
                if current && at != checkpoint {
                    // Someone else wrote this generation since: forget the
                    // carried rows and read every row.
                    continue;
                }
            }
            let rows: Vec<Vec<Option<String>>> = found
                .map(redis::from_owned_redis_value)
                .collect::<Result<_, _>>()
                .map_err(unavailable("reading tasks and agents"))?;
            let mut rows = rows.into_iter();
            for (id, row) in task_misses.into_iter().zip(rows.by_ref()) {
                let mut row = row.into_iter();
                let (workflow, state, assignee) = (
                    row.next().flatten(),
                    row.next().flatten(),
                    row.next().flatten(),
                );
                if let (Some(workflow), Some(state)) = (workflow, state) {
                    tasks.insert(
                        id.clone(),
                        TaskRow {
                            workflow,
                            state,
                            assignee: non_empty(assignee),
                        },
                    );
                }
            }
            Self::agent_rows(&mut agents, &agent_misses, rows);
            let assignees: BTreeSet<String> = task_ids
                .iter()
                .filter_map(|id| tasks.get(id)?.assignee.clone())
                .filter(|a| !agents.contains_key(a) && !agent_misses.contains(a))
                .collect();
            if !assignees.is_empty() {
                let mut pipe = redis::pipe();
                self.hmget_agents(&mut pipe, &assignees);
                let found: Vec<Vec<Option<String>>> = pipe
                    .query_async(conn)
                    .await
                    .map_err(unavailable("reading agents"))?;
                Self::agent_rows(&mut agents, &assignees, found.into_iter());
            }
            return Ok(Prior {
                active,
                checkpoint,
                fence,
                tasks,
                agents,
            });
        }
    }

    /// Takes the rows carried from the last batch, if any.
    /// A new writer (see the module's docs), within the model's timeouts.
    async fn open_writer(&self) -> Result<redis::aio::MultiplexedConnection, ApplyError> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(self.config.connect_timeout)
            .set_response_timeout(self.config.response_timeout);
        let doing = "connecting the batch writer";
        let client = if self.config.cluster {
            self.slot_owner().await?
        } else {
            self.client.clone()
        };
        match tokio::time::timeout(
            self.config.connect_timeout,
            client.get_multiplexed_async_connection_with_config(&config),
        )
        .await
        {
            Ok(connected) => connected.map_err(unavailable(doing)),
            Err(_) => Err(ApplyError::Unavailable {
                store: "Redis",
                doing: doing.to_owned(),
                source: format!("no connection within {:?}", self.config.connect_timeout).into(),
            }),
        }
    }

    /// On a cluster: a client of the primary serving this model's
    /// partition's slot (the seed's credentials, that node's address), as
    /// the cluster says now. A batch written there after a failover moved
    /// the slot fails (`MOVED`); the writer is then dropped and the next
    /// batch asks again.
    async fn slot_owner(&self) -> Result<redis::Client, ApplyError> {
        self.partition_owner(self.partition.unwrap_or(0)).await
    }

    /// On a cluster: a client of the primary serving `partition`'s slot (as
    /// the cluster says now), with the seed's credentials.
    pub async fn partition_owner(&self, partition: u32) -> Result<redis::Client, ApplyError> {
        let mut conn = self.conn.clone();
        let key = self.key_in(partition, "checkpoint");
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .map_err(unavailable("asking the cluster for the partition's slot"))?;
        let slots: redis::Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut conn)
            .await
            .map_err(unavailable(
                "asking the cluster who serves the partition's slot",
            ))?;
        let Some((host, port)) = conn::primary_of_slot(&slots, slot) else {
            return Err(ApplyError::Unavailable {
                store: "Redis",
                doing: "finding the primary of the partition's slot".to_owned(),
                source: format!("no node serves slot {slot} (is the cluster failing over?)").into(),
            });
        };
        let mut info = self.client.get_connection_info().clone();
        info.addr = redis::ConnectionAddr::Tcp(host, port);
        redis::Client::open(info).map_err(unavailable("addressing the partition's primary"))
    }

    /// Takes the rows carried from the last batch, if any.
    fn take_carried(&self) -> Option<Carried> {
        match self.carried.lock() {
            Ok(mut c) => c.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        }
    }

    /// Keeps `carried` for the next batch.
    fn keep_carried(&self, carried: Carried) {
        let carried = Some(carried.bounded());
        match self.carried.lock() {
            Ok(mut c) => *c = carried,
            Err(poisoned) => *poisoned.into_inner() = carried,
        }
    }

    fn hmget_agents(&self, pipe: &mut redis::Pipeline, ids: &BTreeSet<String>) {
        for id in ids {
            pipe.cmd("HMGET")
                .arg(self.key(&format!("agent:{id}")))
                .arg(&["status", "current_task"]);
        }
    }

    fn agent_rows(
        rows: &mut HashMap<String, AgentRow>,
        ids: &BTreeSet<String>,
        found: impl Iterator<Item = Vec<Option<String>>>,
    ) {
        for (id, row) in ids.iter().zip(found) {
            let mut row = row.into_iter();
            let (status, current_task) = (row.next().flatten(), row.next().flatten());
            if let Some(status) = status {
                rows.insert(
                    id.clone(),
                    AgentRow {
                        status,
                        current_task: non_empty(current_task),
                    },
                );
            }
        }
    }
}

/// What a batch needs to know before it is planned.
struct Prior {
    /// The active generation (`None`: no pointer, e.g. Redis was flushed).
    active: Option<String>,
    /// The stored checkpoint of the model's generation.
    checkpoint: i64,
    /// The highest lease token a batch of the generation was written under.
    fence: u64,
    /// Prior rows of the tasks the batch names (and any carried ones).
    tasks: HashMap<String, TaskRow>,
    /// Prior rows of the agents the batch names or the tasks are assigned to
    /// (and any carried ones).
    agents: HashMap<String, AgentRow>,
}

/// Collects the ids whose prior state a batch needs.
fn touched(events: &[&Projected]) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut tasks = BTreeSet::new();
    let mut agents = BTreeSet::new();
    for p in events {
        match &p.event {
            DomainEvent::Task(e) => {
                if !matches!(e, TaskEvent::TaskCreated { .. }) {
                    tasks.insert(e.task_id().to_string());
                }
                match e {
                    TaskEvent::TaskAssigned { agent_id, .. }
                    | TaskEvent::TaskStarted { agent_id, .. } => {
                        agents.insert(agent_id.to_string());
                    }
                    TaskEvent::TaskDelegated {
                        from_agent_id,
                        to_agent_id,
                        ..
                    } => {
                        agents.insert(from_agent_id.to_string());
                        agents.insert(to_agent_id.to_string());
                    }
                    _ => {}
                }
            }
            DomainEvent::Agent(e) if !matches!(e, AgentEvent::AgentRegistered { .. }) => {
                agents.insert(e.agent_id().to_string());
            }
            _ => {}
        }
    }
    (tasks, agents)
}

impl ReadModel for RedisModel {
    fn name(&self) -> &str {
        "redis"
    }

    /// Catch-up batches of 2,000 events: a batch's fixed cost (its round
    /// trips and checkpoint) is spread thinner and more writes to the same
    /// keys merge (a task's whole life often falls within one batch), for
    /// about a fifth less CPU per event in Redis than batches of 500. The
    /// `MULTI/EXEC` of such a batch keeps Redis busy for a few milliseconds.
    fn catch_up_batch_size(&self) -> Option<usize> {
        Some(CATCH_UP_BATCH)
    }

    async fn checkpoint(&self) -> Result<i64, ApplyError> {
        Ok(self.generation_and_checkpoint().await?.1)
    }

    async fn apply(&self, events: &[Projected]) -> Result<(), ApplyError> {
        self.apply_checked(None, None, events).await
    }

    async fn apply_after(
        &self,
        after: i64,
        fence: Option<Fence>,
        events: &[Projected],
    ) -> Result<(), ApplyError> {
        self.apply_checked(Some(after), fence, events).await
    }
}

impl RedisModel {
    /// Applies a batch; with `after`, refuses ([`ApplyError::Moved`]) when
    /// the stored checkpoint is behind what the projector believes; with a
    /// `fence`, refuses ([`ApplyError::Fenced`]) when a newer lease wrote.
    /// Batches are written one at a time, on the writer; after a failure
    /// the writer is dropped (a fresh one holds no `WATCH`).
    async fn apply_checked(
        &self,
        after: Option<i64>,
        fence: Option<Fence>,
        events: &[Projected],
    ) -> Result<(), ApplyError> {
        let mut writer = self.writer.lock().await;
        let mut conn = match writer.as_ref() {
            Some(conn) => conn.clone(),
            None => {
                let conn = self.open_writer().await?;
                *writer = Some(conn.clone());
                conn
            }
        };
        let applied = self.apply_watched(&mut conn, after, fence, events).await;
        if applied.is_err() {
            *writer = None;
        }
        applied
    }

    async fn apply_watched(
        &self,
        conn: &mut redis::aio::MultiplexedConnection,
        after: Option<i64>,
        fence: Option<Fence>,
        events: &[Projected],
    ) -> Result<(), ApplyError> {
        let before = self.generation();
        let (task_ids, agent_ids) = touched(&events.iter().collect::<Vec<_>>());
        // Usually one round trip watches and reads the checkpoint and the
        // fence, the active generation and the prior rows the last batch
        // did not leave. The rows are of every event handed in, also those
        // at or below the checkpoint (the planner skips them). Until the
        // batch is applied, nothing is carried: a failure or a cancelled
        // apply leaves the next batch to read every row.
        let carried = self.take_carried();
        let mut prior = self
            .read_prior(conn, &task_ids, &agent_ids, carried)
            .await?;
        if !self.pinned && prior.active.as_deref() != Some(before.as_str()) {
            // The generation switched, or its pointer is gone (Redis was
            // flushed): resolve it and read (and watch) again under it.
            self.refresh()
                .await
                .map_err(unavailable("reading the active generation"))?;
            prior = self.read_prior(conn, &task_ids, &agent_ids, None).await?;
        }
        let now = self.generation();
        let checkpoint = prior.checkpoint;
        if let Some(fence) = fence.filter(|f| prior.fence > f.0) {
            return Err(ApplyError::Fenced {
                store: "Redis",
                token: fence.0,
                newer: prior.fence,
            });
        }
        // The runtime already skips what is at or below the checkpoint; the
        // model checks again against the stored value, so even a batch handed
        // to it twice (two projectors racing, a replayed batch) is a no-op.
        if let Some(after) = after {
            if checkpoint < after {
                return Err(ApplyError::Moved {
                    store: "Redis",
                    reason: if before == now {
                        format!("its checkpoint is {checkpoint}, behind the projector's {after} (was it flushed?)")
                    } else {
                        format!("generation {now} replaced {before}")
                    },
                });
            }
        }
        let events: Vec<&Projected> = events
            .iter()
            .filter(|p| p.recorded.position > checkpoint)
            .collect();
        let Some(last) = events.last().map(|p| p.recorded.position) else {
            redis::cmd("UNWATCH")
                .query_async::<()>(conn)
                .await
                .map_err(unavailable("unwatching the checkpoint"))?;
            self.keep_carried(Carried {
                generation: now,
                checkpoint,
                tasks: prior.tasks,
                agents: prior.agents,
            });
            return Ok(());
        };
        let mut planner = Planner::new(self, &now, prior.tasks, prior.agents);
        for p in events {
            planner.plan(p)?;
        }
        let mut planned = planner.finish(last);
        if let Some(fence) = fence.filter(|f| prior.fence < f.0) {
            planned
                .pipe
                .cmd("SET")
                .arg(self.key(&self.fence_name()))
                .arg(fence.0)
                .ignore();
        }
        let executed: Option<redis::Value> =
            planned
                .pipe
                .query_async(conn)
                .await
                .map_err(unavailable(format!(
                    "applying a batch ending at position {last}"
                )))?;
        if executed.is_none() {
            // A watched key moved since it was read: another writer. Nothing
            // of the batch was written.
            let (stored, newer): (Option<i64>, Option<u64>) = redis::pipe()
                .cmd("GET")
                .arg(self.key(&self.checkpoint_name()))
                .cmd("GET")
                .arg(self.key(&self.fence_name()))
                .query_async(conn)
                .await
                .map_err(unavailable("reading the checkpoint"))?;
            let newer = newer.unwrap_or(0);
            if let Some(fence) = fence.filter(|f| newer > f.0) {
                return Err(ApplyError::Fenced {
                    store: "Redis",
                    token: fence.0,
                    newer,
                });
            }
            return Err(ApplyError::Moved {
                store: "Redis",
                reason: format!(
                    "another writer moved its checkpoint from {checkpoint} to {} while this batch was planned",
                    stored.unwrap_or(0)
                ),
            });
        }
        self.keep_carried(Carried {
            generation: now,
            checkpoint: last,
            tasks: planned.tasks,
            agents: planned.agents,
        });
        Ok(())
    }
}
