//! Planning a batch: every event becomes writes to the read model's keys,
//! tracking the task and agent state the batch itself changes.

use std::collections::HashMap;
use std::io::Write as _;

use domain::{
    AgentEvent, AgentStatus, AggregateKind, DomainEvent, ErasedState, ErasureEvent, StreamId,
    TaskEvent, TaskStatus, WorkflowEvent,
};

use super::writes::Writes;
use super::{workflow_task_counters, AgentRow, RedisModel, TaskRow};
use crate::model::{ApplyError, Projected};

/// Builds the writes of one batch into an atomic pipeline, tracking the
/// state the batch itself changes.
///
/// Writes are not sent as planned: hash fields, counters, set memberships
/// and sorted-set scores are coalesced per key in [`Writes`] and emitted
/// once at the end (a batch touches the same few keys many times: a task's
/// hash gets `last_position`, `state`, `assignee`… from every event). The
/// change feed gets one `XADD` per event, in order, except for entries its
/// cap would trim within the same batch, and one `XTRIM` per tenant.
pub(super) struct Planner<'a> {
    model: &'a RedisModel,
    /// `P` + `G` + `:`, computed once per batch.
    base: String,
    writes: Writes,
    tasks: HashMap<String, TaskRow>,
    agents: HashMap<String, AgentRow>,
    /// Each tenant's feed entries of the batch, in order.
    feeds: HashMap<&'a str, Vec<&'a Projected>>,
    /// Each tenant's feed entries to delete (of erased events).
    feed_deletes: HashMap<&'a str, Vec<i64>>,
}

/// A state value as the model's hashes show it (`""` for none).
fn shown_value(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// What a planned batch leaves: its atomic pipeline and the task and agent
/// rows as they are once it is applied.
pub(super) struct Planned {
    pub(super) pipe: redis::Pipeline,
    pub(super) tasks: HashMap<String, TaskRow>,
    pub(super) agents: HashMap<String, AgentRow>,
}

/// A feed entry's id, `<position>-0`, written straight into the command.
struct EntryId(i64);

impl redis::ToRedisArgs for EntryId {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + redis::RedisWrite,
    {
        // Writing to the command's buffer cannot fail.
        let _ = write!(out.writer_for_next_arg(), "{}-0", self.0);
    }
}

/// A payload as compact JSON (as `to_string()` gives), serialized straight
/// into the command's buffer.
struct JsonArg<'a>(&'a serde_json::Value);

impl redis::ToRedisArgs for JsonArg<'_> {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + redis::RedisWrite,
    {
        // A `Value` always serializes, and the buffer takes every byte.
        let _ = serde_json::to_writer(out.writer_for_next_arg(), self.0);
    }
}

impl<'a> Planner<'a> {
    /// A planner writing generation `generation` of `model`, starting from
    /// the prior task and agent rows.
    pub(super) fn new(
        model: &'a RedisModel,
        generation: &str,
        tasks: HashMap<String, TaskRow>,
        agents: HashMap<String, AgentRow>,
    ) -> Self {
        Self {
            model,
            // As `RedisModel::key`: on a cluster, tagged with the model's
            // partition (every key of a batch in one slot).
            base: if model.config.cluster {
                format!(
                    "{}{generation}:{{p{}}}:",
                    model.config.prefix,
                    model.partition.unwrap_or(0)
                )
            } else {
                format!("{}{generation}:", model.config.prefix)
            },
            writes: Writes::default(),
            tasks,
            agents,
            feeds: HashMap::new(),
            feed_deletes: HashMap::new(),
        }
    }

    /// The batch's `MULTI/EXEC`: the coalesced writes, the feed entries and
    /// finally the checkpoint.
    pub(super) fn finish(self, last: i64) -> Planned {
        let mut pipe = redis::pipe();
        pipe.atomic();
        let checkpoint = self.key(&[&self.model.checkpoint_name()]);
        let cap = self.model.config.feed_max_len;
        for (tenant, entries) in &self.feeds {
            let feed = self.key(&[super::feed::FEED_KEY, tenant]);
            // Entries beyond the cap would be trimmed at once: an exact trim
            // keeps the batch's last `cap` entries, so only those are added.
            let kept = &entries[entries.len().saturating_sub(cap)..];
            for p in kept {
                let r = &p.recorded;
                let mut xadd = redis::Cmd::with_capacity(
                    15,
                    feed.len() + r.event_type.len() + r.stream_id.len() + 448,
                );
                xadd.arg("XADD")
                    .arg(&feed)
                    .arg(EntryId(r.position))
                    .arg("position")
                    .arg(r.position)
                    .arg("type")
                    .arg(&r.event_type)
                    .arg("stream_id")
                    .arg(&r.stream_id)
                    .arg("stream_version")
                    .arg(r.stream_version)
                    .arg("data")
                    .arg(JsonArg(&r.data));
                // Optional: readers of older entries find none.
                if let Some(traceparent) = &p.traceparent {
                    xadd.arg("traceparent").arg(traceparent);
                }
                pipe.add_command(xadd);
            }
            // One trim per tenant and batch rather than one per entry.
            pipe.cmd("XTRIM").arg(&feed).arg("MAXLEN").arg("~").arg(cap);
        }
        // After the batch's own entries: an event erased in the batch that
        // wrote it leaves no entry either.
        for (tenant, positions) in &self.feed_deletes {
            let feed = self.key(&[super::feed::FEED_KEY, tenant]);
            let mut xdel = redis::cmd("XDEL");
            xdel.arg(&feed);
            for position in positions {
                xdel.arg(EntryId(*position));
            }
            pipe.add_command(xdel);
        }
        self.writes.emit(&mut pipe);
        pipe.cmd("SET").arg(checkpoint).arg(last);
        Planned {
            pipe,
            tasks: self.tasks,
            agents: self.agents,
        }
    }

    /// The full key of `P` + `G` + `:` + the concatenation of `parts`.
    fn key(&self, parts: &[&str]) -> String {
        let len = self.base.len() + parts.iter().map(|p| p.len()).sum::<usize>();
        let mut key = String::with_capacity(len);
        key.push_str(&self.base);
        for part in parts {
            key.push_str(part);
        }
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
        let hash = self.writes.hash(key);
        for (field, value) in fields {
            hash.set(field, value);
        }
    }

    /// Records that an agent was involved in an event.
    fn touch_agent(&mut self, tenant: &str, agent: &str, position: i64, at_ms: i64) {
        let key = self.key(&["agent:", agent]);
        self.hset(
            key,
            [
                ("last_position", position.to_string()),
                ("last_event_at", at_ms.to_string()),
            ],
        );
        let recent = self.key(&["agents:", tenant, ":recent"]);
        self.writes.zadd(recent, agent, at_ms);
    }

    fn move_task(&mut self, task: &str, to: TaskStatus) -> Option<()> {
        let row = self.tasks.get_mut(task)?;
        let from = std::mem::replace(&mut row.state, to.as_str().to_owned());
        let workflow = row.workflow.clone();
        let wf_key = self.key(&["workflow:", &workflow]);
        let from_set = self.key(&["workflow:", &workflow, ":tasks:", &from]);
        let to_set = self.key(&["workflow:", &workflow, ":tasks:", to.as_str()]);
        self.writes.srem(from_set, task);
        self.writes.sadd(to_set, task);
        let counters = self.writes.hash(wf_key);
        counters.incr(&format!("tasks_{from}"), -1);
        counters.incr(&format!("tasks_{}", to.as_str()), 1);
        let task_key = self.key(&["task:", task]);
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
            let key = self.key(&["agent:", agent]);
            self.hset(key, [("current_task", String::new())]);
        }
    }

    fn occupy_agent(&mut self, agent: &str, task: &str) {
        if let Some(row) = self.agents.get_mut(agent) {
            row.current_task = Some(task.to_owned());
        }
        let key = self.key(&["agent:", agent]);
        self.hset(key, [("current_task", task.to_owned())]);
    }

    pub(super) fn plan(&mut self, p: &'a Projected) -> Result<(), ApplyError> {
        let position = p.recorded.position;
        let tenant = p.recorded.metadata.tenant.as_str();
        let at_ms = (p.recorded.metadata.occurred_at.unix_timestamp_nanos() / 1_000_000) as i64;
        match &p.event {
            DomainEvent::Agent(event) => self.plan_agent(p, event, tenant, position, at_ms)?,
            DomainEvent::Task(event) => self.plan_task(p, event, tenant, position, at_ms)?,
            DomainEvent::Workflow(event) => {
                self.plan_workflow(event, tenant, &position.to_string());
            }
            DomainEvent::Erasure(ErasureEvent::PersonalDataErased {
                positions, changes, ..
            }) => self.plan_erasure(tenant, positions, changes, position),
        }
        // The change feed: entry id = position, so subscribers resume by it.
        self.feeds.entry(tenant).or_default().push(p);
        Ok(())
    }

    /// An erasure: the changed state fields the model shows take their
    /// digests, and the erased events' change feed entries go.
    /// Each changed entity's position moves (verify compares `name`).
    fn plan_erasure(
        &mut self,
        tenant: &'a str,
        positions: &[i64],
        changes: &[ErasedState],
        position: i64,
    ) {
        for change in changes {
            let Ok(stream) = StreamId::parse(&change.stream_id) else {
                continue;
            };
            let (prefix, shown): (&str, &[&str]) = match stream.kind() {
                AggregateKind::Agent => ("agent:", &["name", "status_reason"]),
                AggregateKind::Task => ("task:", &["title", "progress_note", "last_error"]),
                AggregateKind::Workflow => ("workflow:", &["name", "reason"]),
                AggregateKind::Erasure => continue,
            };
            let key = self.key(&[prefix, &stream.uuid().to_string()]);
            let hash = self.writes.hash(key);
            hash.set("last_position", position.to_string());
            for (field, value) in &change.fields {
                if let Some(field) = shown.iter().find(|f| **f == field.as_str()) {
                    hash.set(field, shown_value(value));
                }
            }
        }
        if !positions.is_empty() {
            self.feed_deletes
                .entry(tenant)
                .or_default()
                .extend_from_slice(positions);
        }
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
        let key = self.key(&["agent:", &id]);
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
            let by_status = self.key(&["agents:", tenant, ":status:active"]);
            self.writes.sadd(by_status, &id);
            for capability in capabilities {
                let set = self.key(&["agents:", tenant, ":capability:", capability]);
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
        let from = self.key(&["agents:", tenant, ":status:", &previous]);
        let to = self.key(&["agents:", tenant, ":status:", status.as_str()]);
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
        let key = self.key(&["task:", &id]);
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
            let set = self.key(&["workflow:", &workflow, ":tasks:pending"]);
            self.writes.sadd(set, &id);
            let counters = self.writes.hash(self.key(&["workflow:", &workflow]));
            counters.incr("tasks_total", 1);
            counters.incr("tasks_pending", 1);
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
                    let agent_key = self.key(&["agent:", &agent]);
                    self.writes.hash(agent_key).incr("tasks_completed", 1);
                    self.release_agent(&agent, &id);
                    self.touch_agent(tenant, &agent, position, at_ms);
                }
            }
            TaskEvent::TaskFailed { error, .. } => {
                self.move_task(&id, TaskStatus::Failed)
                    .ok_or_else(|| missing(p))?;
                self.hset(key, [("last_error", error.clone())]);
                if let Some(agent) = row.assignee {
                    let agent_key = self.key(&["agent:", &agent]);
                    self.writes.hash(agent_key).incr("tasks_failed", 1);
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
                let key = self.key(&["workflow:", &id]);
                let fields = [
                    ("id", id.clone()),
                    ("tenant", tenant.to_owned()),
                    ("name", name.clone()),
                    ("status", "running".to_owned()),
                    ("reason", String::new()),
                    ("last_position", position.to_owned()),
                ];
                // Counters are HINCRBY'd by task events; they start at 0.
                let hash = self.writes.hash(key);
                for counter in workflow_task_counters() {
                    hash.set_nx(&counter, "0".to_owned());
                }
                for (field, value) in fields {
                    hash.set(field, value);
                }
                let set = self.key(&["workflows:", tenant, ":status:running"]);
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
        let key = self.key(&["workflow:", &id]);
        self.hset(
            key,
            [
                ("status", status.to_owned()),
                ("reason", reason),
                ("last_position", position.to_owned()),
            ],
        );
        // Only running workflows end, so the previous status is "running".
        let from = self.key(&["workflows:", tenant, ":status:running"]);
        let to = self.key(&["workflows:", tenant, ":status:", status]);
        self.writes.srem(from, &id);
        self.writes.sadd(to, &id);
    }
}
