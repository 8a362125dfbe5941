//! Folding a batch of events, in order, into its end result: the final
//! properties of every node it touches and the relationship changes.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use domain::{
    AgentEvent, AgentStatus, AggregateKind, DomainEvent, ErasedState, ErasureEvent, StreamId,
    TaskEvent, TaskStatus, WorkflowEvent,
};
use neo4rs::BoltType;

use crate::model::{ApplyError, Projected};

pub(super) fn rejected(p: &Projected, reason: String) -> ApplyError {
    ApplyError::Rejected {
        position: p.recorded.position,
        event_type: p.recorded.event_type.clone(),
        reason,
    }
}

/// What the fold needs to know of a task.
#[derive(Debug, Clone)]
pub(super) struct TaskRow {
    pub(super) state: String,
    pub(super) assignee: Option<String>,
}

/// What the fold needs to know of an agent.
#[derive(Debug, Clone)]
pub(super) struct AgentRow {
    pub(super) current_task: Option<String>,
}

/// Properties to set on one node (`null` removes one).
pub(super) type Props = BTreeMap<&'static str, BoltType>;

/// An edge from a task to an agent, stamped with the event that made it.
#[derive(Debug, Clone)]
pub(super) struct Stamped {
    pub(super) agent: String,
    pub(super) position: i64,
    pub(super) at: i64,
}

/// A batch folded into its end result.
#[derive(Default)]
pub(super) struct Fold {
    /// Workflows known (stored or started in the batch).
    pub(super) workflows: BTreeSet<String>,
    /// Tasks known, with their state as of the events folded so far.
    pub(super) tasks: HashMap<String, TaskRow>,
    /// Agents known, likewise.
    pub(super) agents: HashMap<String, AgentRow>,
    pub(super) workflow_props: BTreeMap<String, Props>,
    pub(super) agent_props: BTreeMap<String, Props>,
    pub(super) task_props: BTreeMap<String, Props>,
    /// (task, workflow)
    pub(super) part_of: Vec<(String, String)>,
    /// (task, dependency)
    pub(super) depends_on: Vec<(String, String)>,
    /// (parent, child)
    pub(super) spawned: Vec<(String, String)>,
    /// Tasks whose `ASSIGNED_TO` edge is replaced: the new edge, or none.
    pub(super) assignment: BTreeMap<String, Option<Stamped>>,
    /// (task, from, to stamped)
    pub(super) delegations: Vec<(String, String, Stamped)>,
}

fn set(
    map: &mut BTreeMap<String, Props>,
    id: &str,
    fields: impl IntoIterator<Item = (&'static str, BoltType)>,
) {
    map.entry(id.to_owned()).or_default().extend(fields);
}

pub(super) fn text(value: impl Into<String>) -> BoltType {
    BoltType::from(value.into())
}

pub(super) fn int(value: impl Into<i64>) -> BoltType {
    BoltType::from(value.into())
}

fn null() -> BoltType {
    BoltType::Null(neo4rs::BoltNull)
}

fn opt(value: Option<String>) -> BoltType {
    value.map_or_else(null, BoltType::from)
}

impl Fold {
    pub(super) fn event(&mut self, p: &Projected) -> Result<(), ApplyError> {
        let position = p.recorded.position;
        let at = i64::try_from(p.recorded.metadata.occurred_at.unix_timestamp_nanos() / 1_000_000)
            .unwrap_or(i64::MAX);
        let tenant = p.recorded.metadata.tenant.as_str();
        match &p.event {
            DomainEvent::Workflow(e) => self.workflow(p, e, tenant, position),
            DomainEvent::Agent(e) => self.agent(p, e, tenant, position, at),
            DomainEvent::Task(e) => self.task(p, e, tenant, position, at),
            DomainEvent::Erasure(ErasureEvent::PersonalDataErased { changes, .. }) => {
                self.erasure(changes, position);
                Ok(())
            }
        }
    }

    /// An erasure: the changed state fields the graph shows take their
    /// digests (on the nodes the graph has), and the nodes' positions move
    /// (verify compares `name`).
    fn erasure(&mut self, changes: &[ErasedState], position: i64) {
        for change in changes {
            let Ok(stream) = StreamId::parse(&change.stream_id) else {
                continue;
            };
            let id = stream.uuid().to_string();
            let (props, shown): (&mut BTreeMap<String, Props>, &[&'static str]) =
                match stream.kind() {
                    AggregateKind::Agent if self.agents.contains_key(&id) => {
                        (&mut self.agent_props, &["name", "status_reason"])
                    }
                    AggregateKind::Task if self.tasks.contains_key(&id) => {
                        (&mut self.task_props, &["title", "last_error"])
                    }
                    AggregateKind::Workflow if self.workflows.contains(&id) => {
                        (&mut self.workflow_props, &["name", "reason"])
                    }
                    _ => continue,
                };
            let fields = change.fields.iter().filter_map(|(field, value)| {
                let field = shown.iter().find(|f| **f == field.as_str())?;
                let value = match value {
                    serde_json::Value::String(s) => text(s.as_str()),
                    serde_json::Value::Null => null(),
                    other => text(other.to_string()),
                };
                Some((*field, value))
            });
            set(props, &id, fields.chain([("last_position", int(position))]));
        }
    }

    fn workflow(
        &mut self,
        p: &Projected,
        event: &WorkflowEvent,
        tenant: &str,
        position: i64,
    ) -> Result<(), ApplyError> {
        let id = event.workflow_id().to_string();
        let (status, reason) = match event {
            WorkflowEvent::WorkflowStarted { name, .. } => {
                self.workflows.insert(id.clone());
                set(
                    &mut self.workflow_props,
                    &id,
                    [
                        ("id", text(&id)),
                        ("tenant", text(tenant)),
                        ("name", text(name)),
                    ],
                );
                ("running", None)
            }
            WorkflowEvent::WorkflowCompleted { .. } => ("completed", None),
            WorkflowEvent::WorkflowFailed { reason, .. } => ("failed", Some(reason.clone())),
            WorkflowEvent::WorkflowCancelled { reason, .. } => ("cancelled", Some(reason.clone())),
        };
        if !self.workflows.contains(&id) {
            return Err(rejected(p, format!("workflow {id} is not in the graph")));
        }
        set(
            &mut self.workflow_props,
            &id,
            [
                ("status", text(status)),
                ("reason", opt(reason)),
                ("last_position", int(position)),
            ],
        );
        Ok(())
    }

    /// Records that an agent took part in an event.
    fn touch_agent(&mut self, agent: &str, position: i64, at: i64) {
        set(
            &mut self.agent_props,
            agent,
            [("last_position", int(position)), ("updated_at", int(at))],
        );
    }

    fn agent(
        &mut self,
        p: &Projected,
        event: &AgentEvent,
        tenant: &str,
        position: i64,
        at: i64,
    ) -> Result<(), ApplyError> {
        let id = event.agent_id().to_string();
        let (status, reason) = match event {
            AgentEvent::AgentRegistered {
                name,
                kind,
                model,
                capabilities,
                parent_agent_id,
                ..
            } => {
                if let Some(parent) = parent_agent_id.map(|a| a.to_string()) {
                    if !self.agents.contains_key(&parent) {
                        return Err(rejected(
                            p,
                            format!("parent agent {parent} is not in the graph"),
                        ));
                    }
                    self.spawned.push((parent, id.clone()));
                }
                self.agents
                    .insert(id.clone(), AgentRow { current_task: None });
                set(
                    &mut self.agent_props,
                    &id,
                    [
                        ("id", text(&id)),
                        ("tenant", text(tenant)),
                        ("name", text(name)),
                        ("kind", text(kind.as_str())),
                        ("model", opt(model.clone())),
                        ("capabilities", BoltType::from(capabilities.clone())),
                        ("current_task", null()),
                    ],
                );
                (AgentStatus::Active, None)
            }
            AgentEvent::AgentPaused { reason, .. } => (AgentStatus::Paused, reason.clone()),
            AgentEvent::AgentResumed { .. } => (AgentStatus::Active, None),
            AgentEvent::AgentFailed { reason, .. } => (AgentStatus::Failed, Some(reason.clone())),
            AgentEvent::AgentRetired { reason, .. } => (AgentStatus::Retired, reason.clone()),
        };
        if !self.agents.contains_key(&id) {
            return Err(rejected(p, format!("agent {id} is not in the graph")));
        }
        set(
            &mut self.agent_props,
            &id,
            [
                ("status", text(status.as_str())),
                ("status_reason", opt(reason)),
            ],
        );
        self.touch_agent(&id, position, at);
        Ok(())
    }

    fn known_agent(&self, p: &Projected, agent: &str) -> Result<(), ApplyError> {
        if self.agents.contains_key(agent) {
            Ok(())
        } else {
            Err(rejected(p, format!("agent {agent} is not in the graph")))
        }
    }

    /// Points the task's `ASSIGNED_TO` edge at `agent` (or removes it).
    fn assign(&mut self, task: &str, agent: Option<&str>, position: i64, at: i64) {
        if let Some(row) = self.tasks.get_mut(task) {
            row.assignee = agent.map(str::to_owned);
        }
        let edge = agent.map(|a| Stamped {
            agent: a.to_owned(),
            position,
            at,
        });
        self.assignment.insert(task.to_owned(), edge);
        set(
            &mut self.task_props,
            task,
            [("assignee", opt(agent.map(str::to_owned)))],
        );
    }

    fn occupy(&mut self, agent: &str, task: &str) {
        if let Some(row) = self.agents.get_mut(agent) {
            row.current_task = Some(task.to_owned());
        }
        set(&mut self.agent_props, agent, [("current_task", text(task))]);
    }

    /// Clears `agent`'s current task if it is `task`.
    fn release(&mut self, agent: &str, task: &str) {
        let holds = self
            .agents
            .get(agent)
            .is_some_and(|a| a.current_task.as_deref() == Some(task));
        if holds {
            if let Some(row) = self.agents.get_mut(agent) {
                row.current_task = None;
            }
            set(&mut self.agent_props, agent, [("current_task", null())]);
        }
    }

    fn task(
        &mut self,
        p: &Projected,
        event: &TaskEvent,
        tenant: &str,
        position: i64,
        at: i64,
    ) -> Result<(), ApplyError> {
        let id = event.task_id().to_string();
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
            if !self.workflows.contains(&workflow) {
                return Err(rejected(
                    p,
                    format!("workflow {workflow} is not in the graph"),
                ));
            }
            for dep in depends_on.iter().map(ToString::to_string) {
                if !self.tasks.contains_key(&dep) {
                    return Err(rejected(p, format!("dependency {dep} is not in the graph")));
                }
                self.depends_on.push((id.clone(), dep));
            }
            self.part_of.push((id.clone(), workflow.clone()));
            self.tasks.insert(
                id.clone(),
                TaskRow {
                    state: TaskStatus::Pending.as_str().to_owned(),
                    assignee: None,
                },
            );
            set(
                &mut self.task_props,
                &id,
                [
                    ("id", text(&id)),
                    ("tenant", text(tenant)),
                    ("workflow", text(workflow)),
                    ("title", text(title)),
                    ("state", text(TaskStatus::Pending.as_str())),
                    ("assignee", null()),
                    ("progress", int(0)),
                    ("attempt", int(1)),
                    ("max_attempts", int(*max_attempts)),
                    ("priority", int(*priority)),
                    (
                        "required_capabilities",
                        BoltType::from(required_capabilities.clone()),
                    ),
                    ("last_error", null()),
                    ("last_position", int(position)),
                    ("updated_at", int(at)),
                ],
            );
            return Ok(());
        }
        let Some(row) = self.tasks.get(&id).cloned() else {
            return Err(rejected(p, format!("task {id} is not in the graph")));
        };
        set(
            &mut self.task_props,
            &id,
            [("last_position", int(position)), ("updated_at", int(at))],
        );
        let state = |fold: &mut Self, to: TaskStatus| {
            if let Some(t) = fold.tasks.get_mut(&id) {
                t.state = to.as_str().to_owned();
            }
            set(&mut fold.task_props, &id, [("state", text(to.as_str()))]);
        };
        match event {
            TaskEvent::TaskCreated { .. } => {}
            TaskEvent::TaskAssigned { agent_id, .. } => {
                let agent = agent_id.to_string();
                self.known_agent(p, &agent)?;
                state(self, TaskStatus::Assigned);
                self.assign(&id, Some(&agent), position, at);
                self.touch_agent(&agent, position, at);
            }
            TaskEvent::TaskStarted { agent_id, .. } => {
                let agent = agent_id.to_string();
                self.known_agent(p, &agent)?;
                state(self, TaskStatus::Running);
                // Started by its assignee (the normal case): the edge stays
                // as assigned.
                if row.assignee.as_deref() != Some(agent.as_str()) {
                    self.assign(&id, Some(&agent), position, at);
                }
                self.occupy(&agent, &id);
                self.touch_agent(&agent, position, at);
            }
            TaskEvent::TaskProgressReported { percent, .. } => {
                set(&mut self.task_props, &id, [("progress", int(*percent))]);
            }
            TaskEvent::TaskCompleted { .. } => {
                state(self, TaskStatus::Completed);
                set(&mut self.task_props, &id, [("progress", int(100))]);
                if let Some(agent) = row.assignee {
                    self.release(&agent, &id);
                    self.touch_agent(&agent, position, at);
                }
            }
            TaskEvent::TaskFailed { error, .. } => {
                state(self, TaskStatus::Failed);
                set(&mut self.task_props, &id, [("last_error", text(error))]);
                if let Some(agent) = row.assignee {
                    self.release(&agent, &id);
                    self.touch_agent(&agent, position, at);
                }
            }
            TaskEvent::TaskRetried { attempt, .. } => {
                state(self, TaskStatus::Pending);
                set(
                    &mut self.task_props,
                    &id,
                    [("attempt", int(*attempt)), ("progress", int(0))],
                );
                self.assign(&id, None, position, at);
            }
            TaskEvent::TaskCancelled { .. } => {
                state(self, TaskStatus::Cancelled);
                if let Some(agent) = row.assignee {
                    self.release(&agent, &id);
                }
            }
            TaskEvent::TaskDelegated {
                from_agent_id,
                to_agent_id,
                ..
            } => {
                let (from, to) = (from_agent_id.to_string(), to_agent_id.to_string());
                self.known_agent(p, &from)?;
                self.known_agent(p, &to)?;
                self.assign(&id, Some(&to), position, at);
                self.delegations.push((
                    id.clone(),
                    from.clone(),
                    Stamped {
                        agent: to.clone(),
                        position,
                        at,
                    },
                ));
                if row.state == TaskStatus::Running.as_str() {
                    self.release(&from, &id);
                    self.occupy(&to, &id);
                }
                self.touch_agent(&from, position, at);
                self.touch_agent(&to, position, at);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! The rule `verify` relies on (see `crate::verify`): every change it
    //! compares moves the position of the node it is compared under.

    use commands::{EventMetadata, RecordedEvent};
    use domain::event::EVENT_TYPES;
    use domain::{AgentId, AgentKind, TaskId, WorkflowId};
    use serde_json::json;
    use uuid::Uuid;

    use super::*;
    use crate::verify::{GRAPH_AGENT_FIELDS, GRAPH_TASK_FIELDS, GRAPH_WORKFLOW_FIELDS};

    fn at(position: i64, event: DomainEvent) -> Projected {
        let occurred_at = time::OffsetDateTime::from_unix_timestamp(1_700_000_000 + position)
            .expect("a valid time");
        let recorded = RecordedEvent {
            position,
            stream_id: format!("{}-{position}", event.kind()),
            stream_version: 1,
            event_id: Uuid::new_v4(),
            event_type: event.event_type().to_owned(),
            schema_version: event.schema_version(),
            data: event.to_data(),
            metadata: EventMetadata {
                event_id: Uuid::new_v4(),
                command_id: Uuid::new_v4(),
                command_type: "Test".to_owned(),
                command_hash: String::new(),
                correlation_id: Uuid::new_v4(),
                causation_id: Uuid::new_v4(),
                actor: "test".to_owned(),
                tenant: "acme".to_owned(),
                occurred_at,
                traceparent: None,
            },
            recorded_at: occurred_at,
        };
        Projected::new(recorded, event)
    }

    /// Every event type, in an order the domain allows.
    fn scenario() -> Vec<DomainEvent> {
        let id = |n: u128| Uuid::from_u128(n);
        let (w1, w2, w3) = (
            WorkflowId::from_uuid(id(1)),
            WorkflowId::from_uuid(id(2)),
            WorkflowId::from_uuid(id(3)),
        );
        let (a1, a2) = (AgentId::from_uuid(id(11)), AgentId::from_uuid(id(12)));
        let (t1, t2) = (TaskId::from_uuid(id(21)), TaskId::from_uuid(id(22)));
        let w = DomainEvent::Workflow;
        let a = DomainEvent::Agent;
        let t = DomainEvent::Task;
        let registered = |agent_id, parent_agent_id| {
            a(AgentEvent::AgentRegistered {
                agent_id,
                name: "coder".to_owned(),
                kind: AgentKind::Llm,
                model: None,
                capabilities: vec!["code".to_owned()],
                parent_agent_id,
            })
        };
        let created = |task_id, depends_on| {
            t(TaskEvent::TaskCreated {
                task_id,
                workflow_id: w1,
                title: "build".to_owned(),
                input: json!({}),
                required_capabilities: vec!["code".to_owned()],
                depends_on,
                priority: 1,
                max_attempts: 3,
            })
        };
        vec![
            w(WorkflowEvent::WorkflowStarted {
                workflow_id: w1,
                name: "release".to_owned(),
                metadata: json!({}),
            }),
            registered(a1, None),
            registered(a2, Some(a1)),
            created(t1, vec![]),
            created(t2, vec![t1]),
            t(TaskEvent::TaskAssigned {
                task_id: t1,
                agent_id: a1,
            }),
            // Delegated while assigned, then while running.
            t(TaskEvent::TaskDelegated {
                task_id: t1,
                from_agent_id: a1,
                to_agent_id: a2,
            }),
            t(TaskEvent::TaskStarted {
                task_id: t1,
                agent_id: a2,
            }),
            t(TaskEvent::TaskProgressReported {
                task_id: t1,
                percent: 40,
                note: None,
            }),
            t(TaskEvent::TaskDelegated {
                task_id: t1,
                from_agent_id: a2,
                to_agent_id: a1,
            }),
            t(TaskEvent::TaskCompleted {
                task_id: t1,
                output: json!({}),
            }),
            t(TaskEvent::TaskAssigned {
                task_id: t2,
                agent_id: a2,
            }),
            // Started by another agent than the assignee.
            t(TaskEvent::TaskStarted {
                task_id: t2,
                agent_id: a1,
            }),
            t(TaskEvent::TaskFailed {
                task_id: t2,
                error: "flaky".to_owned(),
                retryable: true,
            }),
            t(TaskEvent::TaskRetried {
                task_id: t2,
                attempt: 2,
            }),
            t(TaskEvent::TaskAssigned {
                task_id: t2,
                agent_id: a1,
            }),
            t(TaskEvent::TaskStarted {
                task_id: t2,
                agent_id: a1,
            }),
            t(TaskEvent::TaskCancelled {
                task_id: t2,
                reason: "no longer needed".to_owned(),
            }),
            a(AgentEvent::AgentPaused {
                agent_id: a1,
                reason: None,
            }),
            a(AgentEvent::AgentResumed { agent_id: a1 }),
            a(AgentEvent::AgentFailed {
                agent_id: a1,
                reason: "crashed".to_owned(),
            }),
            a(AgentEvent::AgentRetired {
                agent_id: a2,
                reason: None,
            }),
            w(WorkflowEvent::WorkflowCompleted { workflow_id: w1 }),
            w(WorkflowEvent::WorkflowStarted {
                workflow_id: w2,
                name: "two".to_owned(),
                metadata: json!({}),
            }),
            w(WorkflowEvent::WorkflowFailed {
                workflow_id: w2,
                reason: "broken".to_owned(),
            }),
            w(WorkflowEvent::WorkflowStarted {
                workflow_id: w3,
                name: "three".to_owned(),
                metadata: json!({}),
            }),
            w(WorkflowEvent::WorkflowCancelled {
                workflow_id: w3,
                reason: "dropped".to_owned(),
            }),
            DomainEvent::Erasure(ErasureEvent::PersonalDataErased {
                erasure_id: id(31),
                scope: domain::ErasureScope::Stream(a1.stream_id().to_string()),
                events: 1,
                tombstones: 1,
                tombstone_digest: "0".repeat(64),
                positions: vec![1],
                changes: vec![
                    ErasedState {
                        stream_id: a1.stream_id().to_string(),
                        fields: [("name".to_owned(), json!("sha256:00"))]
                            .into_iter()
                            .collect(),
                    },
                    ErasedState {
                        stream_id: w2.stream_id().to_string(),
                        fields: [("name".to_owned(), json!("sha256:01"))]
                            .into_iter()
                            .collect(),
                    },
                ],
            }),
        ]
    }

    fn positioned(props: Option<&Props>, position: i64) -> bool {
        matches!(
            props.and_then(|p| p.get("last_position")),
            Some(BoltType::Integer(i)) if i.value == position
        )
    }

    #[test]
    fn every_change_verify_compares_moves_the_position_of_its_node() {
        let events = scenario();
        let covered: BTreeSet<&str> = events.iter().map(|e| e.event_type()).collect();
        let all: BTreeSet<&str> = EVENT_TYPES.iter().map(|(t, _, _)| *t).collect();
        assert_eq!(covered, all, "the scenario must use every event type");

        let mut known = Fold::default();
        for (position, event) in (1..).zip(events) {
            let p = at(position, event);
            let what = &p.recorded.event_type;
            // Each event alone, on the state the earlier ones left.
            let mut fold = Fold {
                workflows: std::mem::take(&mut known.workflows),
                tasks: std::mem::take(&mut known.tasks),
                agents: std::mem::take(&mut known.agents),
                ..Fold::default()
            };
            fold.event(&p).expect("the scenario applies");
            let compared =
                |props: &Props, fields: &[&str]| props.keys().any(|k| fields.contains(k));
            for (id, props) in &fold.agent_props {
                if compared(props, GRAPH_AGENT_FIELDS) {
                    assert!(positioned(Some(props), position), "{what}: agent {id}");
                }
            }
            for (id, props) in &fold.workflow_props {
                if compared(props, GRAPH_WORKFLOW_FIELDS) {
                    assert!(positioned(Some(props), position), "{what}: workflow {id}");
                }
            }
            for (id, props) in &fold.task_props {
                if compared(props, GRAPH_TASK_FIELDS) {
                    assert!(positioned(Some(props), position), "{what}: task {id}");
                }
            }
            // Relationships compared under their task: PART_OF,
            // DEPENDS_ON, ASSIGNED_TO.
            let tasks = fold
                .part_of
                .iter()
                .chain(&fold.depends_on)
                .map(|(task, _)| task)
                .chain(fold.assignment.keys());
            for task in tasks {
                assert!(
                    positioned(fold.task_props.get(task), position),
                    "{what}: a relationship of task {task}"
                );
            }
            known = fold;
        }
    }
}
