//! The Redis live-state read model.
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
//! | `workflow:<id>` | hash | tenant, name, status, reason, tasks_total, tasks_<state> per task state, last_position |
//! | `agents:<tenant>:status:<status>` | set | agent ids by status |
//! | `agents:<tenant>:capability:<cap>` | set | agent ids by capability |
//! | `agents:<tenant>:recent` | sorted set | agent ids by last event time (ms) |
//! | `workflow:<id>:tasks:<state>` | set | task ids of a workflow by state |
//! | `workflows:<tenant>:status:<status>` | set | workflow ids by status |
//! | `feed:<tenant>` | stream | change feed; entry id `<position>-0`, capped |
//! | `checkpoint` | string | last applied global position |
//!
//! A batch is one `MULTI/EXEC` holding every change and the checkpoint, so a
//! crash leaves either all of a batch or none of it. Lists are stored as
//! comma-separated strings (ids and capability names contain no commas).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use domain::{AgentEvent, AgentStatus, DomainEvent, TaskEvent, TaskStatus, WorkflowEvent};
use redis::aio::ConnectionManager;

use crate::model::{ApplyError, Projected, ReadModel};

/// Settings of the Redis read model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveModelConfig {
    /// Prefix of every key, e.g. `neurectomy:`.
    pub prefix: String,
    /// Approximate cap of each tenant's change feed.
    pub feed_max_len: usize,
}

impl Default for LiveModelConfig {
    fn default() -> Self {
        Self {
            prefix: "neurectomy:".to_owned(),
            feed_max_len: 100_000,
        }
    }
}

/// The Redis read model. Cheap to clone (the connection is multiplexed and
/// reconnects by itself).
#[derive(Clone)]
pub struct LiveModel {
    conn: ConnectionManager,
    config: LiveModelConfig,
    /// The generation keys are built under. Follows `P` + `active` unless
    /// pinned (a replay builds a generation that is not active yet).
    generation: Arc<RwLock<String>>,
    /// Whether `generation` is fixed rather than following the pointer.
    pinned: bool,
}

/// The generation used when none was ever activated.
pub const FIRST_GENERATION: &str = "g0";

impl std::fmt::Debug for LiveModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveModel")
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
#[derive(Debug, Clone)]
struct TaskRow {
    workflow: String,
    state: String,
    assignee: Option<String>,
}

/// What the model needs to know of an agent to move it between indexes.
#[derive(Debug, Clone)]
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

impl LiveModel {
    /// Connects to Redis at `url`, following the active generation.
    pub async fn connect(url: &str, config: LiveModelConfig) -> Result<Self, ApplyError> {
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
        config: LiveModelConfig,
        generation: &str,
    ) -> Result<Self, ApplyError> {
        Self::open(url, config, generation.to_owned(), true).await
    }

    async fn open(
        url: &str,
        config: LiveModelConfig,
        generation: String,
        pinned: bool,
    ) -> Result<Self, ApplyError> {
        let client = redis::Client::open(url)
            .map_err(unavailable(format!("parsing the Redis URL {url}")))?;
        let conn = ConnectionManager::new(client)
            .await
            .map_err(unavailable(format!("connecting to {url}")))?;
        Ok(Self {
            conn,
            config,
            generation: Arc::new(RwLock::new(generation)),
            pinned,
        })
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

    /// Deletes every key of `generation`.
    pub async fn drop_generation(&self, generation: &str) -> Result<u64, redis::RedisError> {
        let mut conn = self.conn.clone();
        let pattern = format!("{}{generation}:*", self.config.prefix);
        let mut cursor: u64 = 0;
        let mut deleted = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            if !keys.is_empty() {
                deleted += redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async::<u64>(&mut conn)
                    .await?;
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.config.prefix
    }

    /// A connection for reads (queries, verify).
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// The full key for `suffix`.
    pub fn key(&self, suffix: &str) -> String {
        format!("{}{}:{suffix}", self.config.prefix, self.generation())
    }

    /// The stored checkpoint of the current generation.
    async fn stored_checkpoint(&self) -> Result<i64, ApplyError> {
        let mut conn = self.conn.clone();
        let value: Option<i64> = redis::cmd("GET")
            .arg(self.key("checkpoint"))
            .query_async(&mut conn)
            .await
            .map_err(unavailable("reading the checkpoint"))?;
        Ok(value.unwrap_or(0))
    }

    /// Re-reads the active generation (as [`LiveModel::refresh`]) and its
    /// stored checkpoint. In the usual case, the generation has not changed,
    /// both are read in one round trip: the pointer and the checkpoint of the
    /// generation last seen, which is the right checkpoint iff the pointer
    /// still names that generation (it is in the same pipeline, so both
    /// come from one moment). Otherwise it falls back to reading them in turn.
    async fn generation_and_checkpoint(&self) -> Result<(String, i64), ApplyError> {
        let known = self.generation();
        if !self.pinned && !known.is_empty() {
            let mut conn = self.conn.clone();
            let (active, checkpoint): (Option<String>, Option<i64>) = redis::pipe()
                .cmd("GET")
                .arg(self.pointer_key())
                .cmd("GET")
                .arg(self.key("checkpoint"))
                .query_async(&mut conn)
                .await
                .map_err(unavailable("reading the active generation and checkpoint"))?;
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

    /// Reads the prior state of the tasks and agents a batch touches: the
    /// tasks and the agents named by events in one pipeline, then, only if
    /// some are not among those, the assignees of the tasks (completing a
    /// task updates its agent) in a second one.
    ///
    /// With `head`, the first pipeline also reads the active generation and
    /// the checkpoint of the generation last seen (saving the round trip of
    /// [`LiveModel::generation_and_checkpoint`]); it returns `None` when the
    /// generation changed, as the rows were then read from the wrong one.
    async fn prior_rows(
        &self,
        head: bool,
        task_ids: &BTreeSet<String>,
        mut agent_ids: BTreeSet<String>,
    ) -> Result<Option<PriorRows>, ApplyError> {
        let mut tasks = HashMap::new();
        let mut agents = HashMap::new();
        if !head && task_ids.is_empty() && agent_ids.is_empty() {
            return Ok(Some((0, tasks, agents)));
        }
        let mut pipe = redis::pipe();
        let known = self.generation();
        if head {
            pipe.cmd("GET").arg(self.pointer_key());
            pipe.cmd("GET").arg(self.key("checkpoint"));
        }
        for id in task_ids {
            pipe.cmd("HMGET")
                .arg(self.key(&format!("task:{id}")))
                .arg(&["workflow", "state", "assignee"]);
        }
        self.hmget_agents(&mut pipe, &agent_ids);
        let mut conn = self.conn.clone();
        let found: Vec<redis::Value> = pipe
            .query_async(&mut conn)
            .await
            .map_err(unavailable("reading tasks and agents"))?;
        let mut found = found.into_iter();
        let mut checkpoint = 0;
        if head {
            let mut next = || -> Result<Option<String>, ApplyError> {
                redis::from_owned_redis_value(found.next().unwrap_or(redis::Value::Nil))
                    .map_err(unavailable("reading the active generation and checkpoint"))
            };
            let (active, stored) = (next()?, next()?);
            if !self.pinned && active.as_deref() != Some(known.as_str()) {
                return Ok(None);
            }
            checkpoint = match stored {
                Some(stored) => stored.parse().map_err(|_| ApplyError::Unavailable {
                    store: "Redis",
                    doing: "reading the checkpoint".to_owned(),
                    source: format!("the checkpoint is not a number: {stored:?}").into(),
                })?,
                None => 0,
            };
        }
        let rows: Vec<Vec<Option<String>>> = found
            .map(redis::from_owned_redis_value)
            .collect::<Result<_, _>>()
            .map_err(unavailable("reading tasks and agents"))?;
        let mut found = rows.into_iter();
        for (id, row) in task_ids.iter().zip(found.by_ref()) {
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
        Self::agent_rows(&mut agents, &agent_ids, found);
        let assignees: BTreeSet<String> = tasks
            .values()
            .filter_map(|t| t.assignee.clone())
            .filter(|a| !agent_ids.contains(a))
            .collect();
        if !assignees.is_empty() {
            let mut pipe = redis::pipe();
            self.hmget_agents(&mut pipe, &assignees);
            let found: Vec<Vec<Option<String>>> = pipe
                .query_async(&mut conn)
                .await
                .map_err(unavailable("reading agents"))?;
            Self::agent_rows(&mut agents, &assignees, found.into_iter());
            agent_ids.extend(assignees);
        }
        Ok(Some((checkpoint, tasks, agents)))
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

/// The checkpoint and the prior task and agent rows of a batch.
type PriorRows = (i64, HashMap<String, TaskRow>, HashMap<String, AgentRow>);

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

/// Builds the writes of one batch into an atomic pipeline, tracking the
/// state the batch itself changes.
///
/// Writes are not sent as planned: hash fields, counters, set memberships
/// and sorted-set scores are coalesced per key in [`Writes`] and emitted
/// once at the end (a batch touches the same few keys many times: a task's
/// hash gets `last_position`, `state`, `assignee`… from every event). Only
/// the change feed gets one `XADD` per event, in order, as it is per event.
struct Planner<'a> {
    model: &'a LiveModel,
    /// `P` + `G` + `:`, computed once per batch.
    base: String,
    pipe: redis::Pipeline,
    writes: Writes,
    tasks: HashMap<String, TaskRow>,
    agents: HashMap<String, AgentRow>,
}

/// The final effect of a batch's writes to one hash field.
#[derive(Debug)]
struct FieldWrite {
    /// The value the batch sets, if any: `HSET` (`nx == false`) or
    /// `HSETNX` (`nx == true`, only when the batch touches the field first
    /// with `HSETNX`).
    set: Option<(String, bool)>,
    /// The sum of the `HINCRBY`s applied after `set` (kept even when zero:
    /// `HINCRBY f 0` creates a missing field, as `+1` then `-1` would).
    delta: Option<i64>,
}

/// A batch's writes coalesced per key. Applying them gives the same result
/// as applying the planned commands one by one: commands on different keys
/// commute, a later `HSET` of a field overrides what came before, `HINCRBY`s
/// add up, an `HSETNX` after any write of the field is a no-op, and a set
/// member's or sorted-set member's last write is its final state.
#[derive(Debug, Default)]
struct Writes {
    /// Hash key → fields in the order the batch first touched them (hashes
    /// have at most a few dozen fields, so a linear scan beats hashing).
    hashes: HashMap<String, Vec<(String, FieldWrite)>>,
    /// Set key → member → whether it ends up added (`SADD`) or removed.
    sets: HashMap<String, BTreeMap<String, bool>>,
    /// Sorted-set key → member → last score.
    zsets: HashMap<String, BTreeMap<String, i64>>,
}

impl Writes {
    fn field(&mut self, key: &str, field: &str) -> (&mut FieldWrite, bool) {
        if !self.hashes.contains_key(key) {
            self.hashes.insert(key.to_owned(), Vec::new());
        }
        let Some(fields) = self.hashes.get_mut(key) else {
            unreachable!("inserted above")
        };
        let found = fields.iter().position(|(f, _)| f == field);
        let fresh = found.is_none();
        let index = found.unwrap_or_else(|| {
            fields.push((
                field.to_owned(),
                FieldWrite {
                    set: None,
                    delta: None,
                },
            ));
            fields.len() - 1
        });
        (&mut fields[index].1, fresh)
    }

    fn hset(&mut self, key: &str, field: &str, value: String) {
        let (write, _) = self.field(key, field);
        write.set = Some((value, false));
        write.delta = None;
    }

    fn hsetnx(&mut self, key: &str, field: &str, value: String) {
        let (write, fresh) = self.field(key, field);
        // Written earlier in the batch: the field exists, HSETNX is a no-op.
        if fresh {
            write.set = Some((value, true));
        }
    }

    fn hincrby(&mut self, key: &str, field: &str, by: i64) {
        let (write, _) = self.field(key, field);
        match &mut write.set {
            // A plain HSET of an integer followed by HINCRBY: fold into the
            // value (Redis would store the same decimal string).
            Some((value, false)) if write.delta.is_none() => match value.parse::<i64>() {
                Ok(n) if n.to_string() == *value && n.checked_add(by).is_some() => {
                    *value = (n + by).to_string();
                }
                _ => write.delta = Some(by),
            },
            _ => write.delta = Some(write.delta.unwrap_or(0) + by),
        }
    }

    fn sadd(&mut self, key: String, member: &str) {
        self.sets
            .entry(key)
            .or_default()
            .insert(member.to_owned(), true);
    }

    fn srem(&mut self, key: String, member: &str) {
        self.sets
            .entry(key)
            .or_default()
            .insert(member.to_owned(), false);
    }

    fn zadd(&mut self, key: String, member: &str, score: i64) {
        self.zsets
            .entry(key)
            .or_default()
            .insert(member.to_owned(), score);
    }

    /// Appends the coalesced commands to `pipe`.
    fn emit(self, pipe: &mut redis::Pipeline) {
        for (key, fields) in self.hashes {
            let mut hset = redis::cmd("HSET");
            hset.arg(&key);
            let mut any = false;
            for (field, write) in &fields {
                match &write.set {
                    Some((value, true)) => {
                        pipe.cmd("HSETNX").arg(&key).arg(field).arg(value).ignore();
                    }
                    Some((value, false)) => {
                        hset.arg(field).arg(value);
                        any = true;
                    }
                    None => {}
                }
            }
            if any {
                pipe.add_command(hset).ignore();
            }
            for (field, write) in &fields {
                if let Some(by) = write.delta {
                    pipe.cmd("HINCRBY").arg(&key).arg(field).arg(by).ignore();
                }
            }
        }
        for (key, members) in self.sets {
            let (added, removed): (Vec<_>, Vec<_>) =
                members.into_iter().partition(|(_, added)| *added);
            if !removed.is_empty() {
                let mut cmd = redis::cmd("SREM");
                cmd.arg(&key);
                for (member, _) in removed {
                    cmd.arg(member);
                }
                pipe.add_command(cmd).ignore();
            }
            if !added.is_empty() {
                let mut cmd = redis::cmd("SADD");
                cmd.arg(&key);
                for (member, _) in added {
                    cmd.arg(member);
                }
                pipe.add_command(cmd).ignore();
            }
        }
        for (key, members) in self.zsets {
            let mut cmd = redis::cmd("ZADD");
            cmd.arg(&key);
            for (member, score) in members {
                cmd.arg(score).arg(member);
            }
            pipe.add_command(cmd).ignore();
        }
    }
}

impl Planner<'_> {
    fn key(&self, suffix: &str) -> String {
        let mut key = String::with_capacity(self.base.len() + suffix.len());
        key.push_str(&self.base);
        key.push_str(suffix);
        key
    }

    fn rejected(p: &Projected, reason: String) -> ApplyError {
        ApplyError::Rejected {
            position: p.recorded.position,
            event_type: p.recorded.event_type.clone(),
            reason,
        }
    }

    fn hset<const N: usize>(&mut self, key: String, fields: [(&str, String); N]) {
        for (field, value) in fields {
            self.writes.hset(&key, field, value);
        }
    }

    /// Records that an agent was involved in an event.
    fn touch_agent(&mut self, tenant: &str, agent: &str, position: i64, at_ms: i64) {
        let key = self.key(&format!("agent:{agent}"));
        self.hset(
            key,
            [
                ("last_position", position.to_string()),
                ("last_event_at", at_ms.to_string()),
            ],
        );
        let recent = self.key(&format!("agents:{tenant}:recent"));
        self.writes.zadd(recent, agent, at_ms);
    }

    fn move_task(&mut self, task: &str, to: TaskStatus) -> Option<()> {
        let row = self.tasks.get_mut(task)?;
        let from = std::mem::replace(&mut row.state, to.as_str().to_owned());
        let workflow = row.workflow.clone();
        let wf_key = self.key(&format!("workflow:{workflow}"));
        let from_set = self.key(&format!("workflow:{workflow}:tasks:{from}"));
        let to_set = self.key(&format!("workflow:{workflow}:tasks:{}", to.as_str()));
        self.writes.srem(from_set, task);
        self.writes.sadd(to_set, task);
        self.writes.hincrby(&wf_key, &format!("tasks_{from}"), -1);
        self.writes
            .hincrby(&wf_key, &format!("tasks_{}", to.as_str()), 1);
        let task_key = self.key(&format!("task:{task}"));
        self.hset(task_key, [("state", to.as_str().to_owned())]);
        Some(())
    }

    /// Clears `agent`'s current task if it is `task`.
    fn release_agent(&mut self, agent: &str, task: &str) {
        let holds = self
            .agents
            .get(agent)
            .is_some_and(|a| a.current_task.as_deref() == Some(task));
        if holds {
            if let Some(row) = self.agents.get_mut(agent) {
                row.current_task = None;
            }
            let key = self.key(&format!("agent:{agent}"));
            self.hset(key, [("current_task", String::new())]);
        }
    }

    fn occupy_agent(&mut self, agent: &str, task: &str) {
        if let Some(row) = self.agents.get_mut(agent) {
            row.current_task = Some(task.to_owned());
        }
        let key = self.key(&format!("agent:{agent}"));
        self.hset(key, [("current_task", task.to_owned())]);
    }

    fn plan(&mut self, p: &Projected) -> Result<(), ApplyError> {
        let position = p.recorded.position;
        let tenant = p.recorded.metadata.tenant.clone();
        let at_ms = (p.recorded.metadata.occurred_at.unix_timestamp_nanos() / 1_000_000) as i64;
        let pos = position.to_string();
        match &p.event {
            DomainEvent::Agent(event) => self.plan_agent(p, event, &tenant, position, at_ms)?,
            DomainEvent::Task(event) => self.plan_task(p, event, &tenant, position, at_ms)?,
            DomainEvent::Workflow(event) => self.plan_workflow(event, &tenant, &pos),
        }
        // The change feed: entry id = position, so subscribers resume by it.
        let feed = self.key(&format!("feed:{tenant}"));
        self.pipe
            .cmd("XADD")
            .arg(feed)
            .arg("MAXLEN")
            .arg("~")
            .arg(self.model.config.feed_max_len)
            .arg(format!("{position}-0"))
            .arg("position")
            .arg(&pos)
            .arg("type")
            .arg(&p.recorded.event_type)
            .arg("stream_id")
            .arg(&p.recorded.stream_id)
            .arg("stream_version")
            .arg(p.recorded.stream_version)
            .arg("data")
            // The same compact JSON as `to_string()`, without going through
            // `fmt` (cheaper for the larger payloads); a `Value` always
            // serializes.
            .arg(serde_json::to_vec(&p.recorded.data).unwrap_or_default())
            .ignore();
        Ok(())
    }

    fn plan_agent(
        &mut self,
        p: &Projected,
        event: &AgentEvent,
        tenant: &str,
        position: i64,
        at_ms: i64,
    ) -> Result<(), ApplyError> {
        let id = event.agent_id().to_string();
        let key = self.key(&format!("agent:{id}"));
        if let AgentEvent::AgentRegistered {
            name,
            kind,
            model,
            capabilities,
            parent_agent_id,
            ..
        } = event
        {
            self.hset(
                key,
                [
                    ("id", id.clone()),
                    ("tenant", tenant.to_owned()),
                    ("name", name.clone()),
                    ("kind", kind.as_str().to_owned()),
                    ("model", model.clone().unwrap_or_default()),
                    ("capabilities", capabilities.join(",")),
                    (
                        "parent",
                        parent_agent_id.map(|p| p.to_string()).unwrap_or_default(),
                    ),
                    ("status", AgentStatus::Active.as_str().to_owned()),
                    ("status_reason", String::new()),
                    ("current_task", String::new()),
                    ("tasks_completed", "0".to_owned()),
                    ("tasks_failed", "0".to_owned()),
                ],
            );
            let by_status = self.key(&format!("agents:{tenant}:status:active"));
            self.writes.sadd(by_status, &id);
            for capability in capabilities {
                let set = self.key(&format!("agents:{tenant}:capability:{capability}"));
                self.writes.sadd(set, &id);
            }
            self.agents.insert(
                id.clone(),
                AgentRow {
                    status: AgentStatus::Active.as_str().to_owned(),
                    current_task: None,
                },
            );
            self.touch_agent(tenant, &id, position, at_ms);
            return Ok(());
        }
        let (status, reason) = match event {
            AgentEvent::AgentRegistered { .. } => return Ok(()),
            AgentEvent::AgentPaused { reason, .. } => {
                (AgentStatus::Paused, reason.clone().unwrap_or_default())
            }
            AgentEvent::AgentResumed { .. } => (AgentStatus::Active, String::new()),
            AgentEvent::AgentFailed { reason, .. } => (AgentStatus::Failed, reason.clone()),
            AgentEvent::AgentRetired { reason, .. } => {
                (AgentStatus::Retired, reason.clone().unwrap_or_default())
            }
        };
        let Some(row) = self.agents.get_mut(&id) else {
            return Err(Self::rejected(
                p,
                format!("agent {id} is not in the read model"),
            ));
        };
        let previous = std::mem::replace(&mut row.status, status.as_str().to_owned());
        let from = self.key(&format!("agents:{tenant}:status:{previous}"));
        let to = self.key(&format!("agents:{tenant}:status:{}", status.as_str()));
        self.writes.srem(from, &id);
        self.writes.sadd(to, &id);
        self.hset(
            key,
            [
                ("status", status.as_str().to_owned()),
                ("status_reason", reason),
            ],
        );
        self.touch_agent(tenant, &id, position, at_ms);
        Ok(())
    }

    fn plan_task(
        &mut self,
        p: &Projected,
        event: &TaskEvent,
        tenant: &str,
        position: i64,
        at_ms: i64,
    ) -> Result<(), ApplyError> {
        let id = event.task_id().to_string();
        let key = self.key(&format!("task:{id}"));
        if let TaskEvent::TaskCreated {
            workflow_id,
            title,
            required_capabilities,
            depends_on,
            priority,
            max_attempts,
            ..
        } = event
        {
            let workflow = workflow_id.to_string();
            let deps: Vec<String> = depends_on.iter().map(ToString::to_string).collect();
            self.hset(
                key,
                [
                    ("id", id.clone()),
                    ("tenant", tenant.to_owned()),
                    ("workflow", workflow.clone()),
                    ("title", title.clone()),
                    ("state", TaskStatus::Pending.as_str().to_owned()),
                    ("assignee", String::new()),
                    ("progress", "0".to_owned()),
                    ("progress_note", String::new()),
                    ("attempt", "1".to_owned()),
                    ("max_attempts", max_attempts.to_string()),
                    ("priority", priority.to_string()),
                    ("required_capabilities", required_capabilities.join(",")),
                    ("depends_on", deps.join(",")),
                    ("last_error", String::new()),
                    ("last_position", position.to_string()),
                ],
            );
            let set = self.key(&format!("workflow:{workflow}:tasks:pending"));
            self.writes.sadd(set, &id);
            let wf_key = self.key(&format!("workflow:{workflow}"));
            self.writes.hincrby(&wf_key, "tasks_total", 1);
            self.writes.hincrby(&wf_key, "tasks_pending", 1);
            self.tasks.insert(
                id,
                TaskRow {
                    workflow,
                    state: TaskStatus::Pending.as_str().to_owned(),
                    assignee: None,
                },
            );
            return Ok(());
        }
        let Some(row) = self.tasks.get(&id).cloned() else {
            return Err(Self::rejected(
                p,
                format!("task {id} is not in the read model"),
            ));
        };
        self.hset(key.clone(), [("last_position", position.to_string())]);
        let missing =
            |p: &Projected| Self::rejected(p, format!("task {id} vanished from the batch state"));
        match event {
            TaskEvent::TaskCreated { .. } => {}
            TaskEvent::TaskAssigned { agent_id, .. } => {
                let agent = agent_id.to_string();
                self.move_task(&id, TaskStatus::Assigned)
                    .ok_or_else(|| missing(p))?;
                self.hset(key, [("assignee", agent.clone())]);
                if let Some(t) = self.tasks.get_mut(&id) {
                    t.assignee = Some(agent.clone());
                }
                self.touch_agent(tenant, &agent, position, at_ms);
            }
            TaskEvent::TaskStarted { agent_id, .. } => {
                let agent = agent_id.to_string();
                self.move_task(&id, TaskStatus::Running)
                    .ok_or_else(|| missing(p))?;
                self.hset(key, [("assignee", agent.clone())]);
                if let Some(t) = self.tasks.get_mut(&id) {
                    t.assignee = Some(agent.clone());
                }
                self.occupy_agent(&agent, &id);
                self.touch_agent(tenant, &agent, position, at_ms);
            }
            TaskEvent::TaskProgressReported { percent, note, .. } => {
                self.hset(
                    key,
                    [
                        ("progress", percent.to_string()),
                        ("progress_note", note.clone().unwrap_or_default()),
                    ],
                );
            }
            TaskEvent::TaskCompleted { .. } => {
                self.move_task(&id, TaskStatus::Completed)
                    .ok_or_else(|| missing(p))?;
                self.hset(key, [("progress", "100".to_owned())]);
                if let Some(agent) = row.assignee {
                    let agent_key = self.key(&format!("agent:{agent}"));
                    self.writes.hincrby(&agent_key, "tasks_completed", 1);
                    self.release_agent(&agent, &id);
                    self.touch_agent(tenant, &agent, position, at_ms);
                }
            }
            TaskEvent::TaskFailed { error, .. } => {
                self.move_task(&id, TaskStatus::Failed)
                    .ok_or_else(|| missing(p))?;
                self.hset(key, [("last_error", error.clone())]);
                if let Some(agent) = row.assignee {
                    let agent_key = self.key(&format!("agent:{agent}"));
                    self.writes.hincrby(&agent_key, "tasks_failed", 1);
                    self.release_agent(&agent, &id);
                    self.touch_agent(tenant, &agent, position, at_ms);
                }
            }
            TaskEvent::TaskRetried { attempt, .. } => {
                self.move_task(&id, TaskStatus::Pending)
                    .ok_or_else(|| missing(p))?;
                self.hset(
                    key,
                    [
                        ("attempt", attempt.to_string()),
                        ("assignee", String::new()),
                        ("progress", "0".to_owned()),
                        ("progress_note", String::new()),
                    ],
                );
                if let Some(t) = self.tasks.get_mut(&id) {
                    t.assignee = None;
                }
            }
            TaskEvent::TaskCancelled { .. } => {
                self.move_task(&id, TaskStatus::Cancelled)
                    .ok_or_else(|| missing(p))?;
                if let Some(agent) = row.assignee {
                    self.release_agent(&agent, &id);
                }
            }
            TaskEvent::TaskDelegated {
                from_agent_id,
                to_agent_id,
                ..
            } => {
                let (from, to) = (from_agent_id.to_string(), to_agent_id.to_string());
                self.hset(key, [("assignee", to.clone())]);
                if let Some(t) = self.tasks.get_mut(&id) {
                    t.assignee = Some(to.clone());
                }
                if row.state == TaskStatus::Running.as_str() {
                    self.release_agent(&from, &id);
                    self.occupy_agent(&to, &id);
                }
                self.touch_agent(tenant, &from, position, at_ms);
                self.touch_agent(tenant, &to, position, at_ms);
            }
        }
        Ok(())
    }

    fn plan_workflow(&mut self, event: &WorkflowEvent, tenant: &str, position: &str) {
        let (id, status, reason) = match event {
            WorkflowEvent::WorkflowStarted {
                workflow_id, name, ..
            } => {
                let id = workflow_id.to_string();
                let key = self.key(&format!("workflow:{id}"));
                let fields = [
                    ("id", id.clone()),
                    ("tenant", tenant.to_owned()),
                    ("name", name.clone()),
                    ("status", "running".to_owned()),
                    ("reason", String::new()),
                    ("last_position", position.to_owned()),
                ];
                // Counters are HINCRBY'd by task events; they start at 0.
                for counter in workflow_task_counters() {
                    self.writes.hsetnx(&key, &counter, "0".to_owned());
                }
                self.hset(key, fields);
                let set = self.key(&format!("workflows:{tenant}:status:running"));
                self.writes.sadd(set, &id);
                return;
            }
            WorkflowEvent::WorkflowCompleted { workflow_id } => {
                (workflow_id.to_string(), "completed", String::new())
            }
            WorkflowEvent::WorkflowFailed {
                workflow_id,
                reason,
            } => (workflow_id.to_string(), "failed", reason.clone()),
            WorkflowEvent::WorkflowCancelled {
                workflow_id,
                reason,
            } => (workflow_id.to_string(), "cancelled", reason.clone()),
        };
        let key = self.key(&format!("workflow:{id}"));
        self.hset(
            key,
            [
                ("status", status.to_owned()),
                ("reason", reason),
                ("last_position", position.to_owned()),
            ],
        );
        // Only running workflows end, so the previous status is "running".
        let from = self.key(&format!("workflows:{tenant}:status:running"));
        let to = self.key(&format!("workflows:{tenant}:status:{status}"));
        self.writes.srem(from, &id);
        self.writes.sadd(to, &id);
    }
}

impl ReadModel for LiveModel {
    fn name(&self) -> &str {
        "redis"
    }

    async fn checkpoint(&self) -> Result<i64, ApplyError> {
        Ok(self.generation_and_checkpoint().await?.1)
    }

    async fn apply(&self, events: &[Projected]) -> Result<(), ApplyError> {
        self.apply_checked(None, events).await
    }

    async fn apply_after(&self, after: i64, events: &[Projected]) -> Result<(), ApplyError> {
        self.apply_checked(Some(after), events).await
    }
}

impl LiveModel {
    /// Applies a batch; with `after`, refuses ([`ApplyError::Moved`]) when
    /// the stored checkpoint is behind what the projector believes.
    async fn apply_checked(
        &self,
        after: Option<i64>,
        events: &[Projected],
    ) -> Result<(), ApplyError> {
        let before = self.generation();
        // Usually one round trip reads the generation, the checkpoint and the
        // prior rows together; the rows are of every event handed in, also
        // those at or below the checkpoint (the planner skips them, their rows
        // are just not used). Should the generation have changed, read in turn.
        let (first_tasks, first_agents) = touched(&events.iter().collect::<Vec<_>>());
        let (now, checkpoint, prior) = match self
            .prior_rows(!before.is_empty(), &first_tasks, first_agents)
            .await?
        {
            Some((checkpoint, tasks, agents)) if !before.is_empty() => {
                (before.clone(), checkpoint, Some((tasks, agents)))
            }
            _ => {
                let (now, checkpoint) = self.generation_and_checkpoint().await?;
                (now, checkpoint, None)
            }
        };
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
            return Ok(());
        };
        let (tasks, agents) = match prior {
            Some(prior) => prior,
            None => {
                let (task_ids, agent_ids) = touched(&events);
                match self.prior_rows(false, &task_ids, agent_ids).await? {
                    Some((_, tasks, agents)) => (tasks, agents),
                    None => unreachable!("rows read without the head are always returned"),
                }
            }
        };
        let mut planner = Planner {
            model: self,
            base: format!("{}{now}:", self.config.prefix),
            pipe: redis::pipe(),
            writes: Writes::default(),
            tasks,
            agents,
        };
        planner.pipe.atomic();
        for p in &events {
            planner.plan(p)?;
        }
        let writes = std::mem::take(&mut planner.writes);
        writes.emit(&mut planner.pipe);
        planner
            .pipe
            .cmd("SET")
            .arg(self.key("checkpoint"))
            .arg(last)
            .ignore();
        let mut conn = self.conn.clone();
        planner
            .pipe
            .query_async::<()>(&mut conn)
            .await
            .map_err(unavailable(format!(
                "applying a batch ending at position {last}"
            )))
    }
}
