//! The aggregate contract and the union of all commands.

use std::collections::HashMap;
use std::fmt::Debug;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::agent::{AgentCommand, AgentState};
use crate::error::DomainError;
use crate::event::DomainEvent;
use crate::ids::{AgentId, AggregateKind, StreamId, TaskId, WorkflowId};
use crate::task::{TaskCommand, TaskState};
use crate::workflow::{WorkflowCommand, WorkflowState};

/// An event-sourced aggregate: a state folded from its own stream, a decision
/// function over commands, and the list of other streams a decision reads.
///
/// `Default` is the state of a stream with no events.
pub trait Aggregate:
    Default + Clone + Debug + PartialEq + Serialize + DeserializeOwned + Send + Sync + 'static
{
    /// The kind, i.e. the stream-id prefix.
    const KIND: AggregateKind;
    /// Version of the serialized state; snapshots written under another
    /// version are ignored (the state is rebuilt from events instead).
    const SNAPSHOT_VERSION: i32;
    /// Commands handled by this aggregate.
    type Command: Serialize + DeserializeOwned + Debug + Clone + Send + Sync;
    /// Events produced by this aggregate.
    type Event: Debug + Clone + PartialEq + Send + Sync;

    /// The stream a command writes to.
    fn stream_of(command: &Self::Command) -> StreamId;
    /// Whether the command creates its aggregate (its stream must not
    /// exist yet): registering, creating, starting.
    fn creates(command: &Self::Command) -> bool;
    /// Other streams whose current state `decide` needs (e.g. the agent a task
    /// is assigned to, the dependencies of a task that starts).
    fn related(&self, command: &Self::Command) -> Vec<StreamId>;
    /// Decides what happens: the events to append, or why not.
    fn decide(
        &self,
        command: &Self::Command,
        related: &Related,
    ) -> Result<Vec<Self::Event>, DomainError>;
    /// Folds one event into the state.
    fn evolve(&mut self, event: &Self::Event);
    /// Lifts an event into the union of all events.
    fn into_domain(event: Self::Event) -> DomainEvent;
    /// Narrows an event from the union; `None` if it belongs to another kind.
    fn from_domain(event: DomainEvent) -> Option<Self::Event>;
}

/// Current state of the other aggregates a decision reads. A stream missing
/// from the map is treated as empty (the aggregate does not exist).
#[derive(Debug, Clone, Default)]
pub struct Related {
    agents: HashMap<AgentId, AgentState>,
    tasks: HashMap<TaskId, TaskState>,
    workflows: HashMap<WorkflowId, WorkflowState>,
}

static NO_AGENT: AgentState = AgentState::Unregistered;
static NO_TASK: TaskState = TaskState::Absent;
static NO_WORKFLOW: WorkflowState = WorkflowState::NotStarted;

impl Related {
    /// Records an agent's state.
    pub fn insert_agent(&mut self, id: AgentId, state: AgentState) {
        self.agents.insert(id, state);
    }
    /// Records a task's state.
    pub fn insert_task(&mut self, id: TaskId, state: TaskState) {
        self.tasks.insert(id, state);
    }
    /// Records a workflow's state.
    pub fn insert_workflow(&mut self, id: WorkflowId, state: WorkflowState) {
        self.workflows.insert(id, state);
    }
    /// An agent's state (unregistered when unknown).
    pub fn agent(&self, id: &AgentId) -> &AgentState {
        self.agents.get(id).unwrap_or(&NO_AGENT)
    }
    /// A task's state (absent when unknown).
    pub fn task(&self, id: &TaskId) -> &TaskState {
        self.tasks.get(id).unwrap_or(&NO_TASK)
    }
    /// A workflow's state (not started when unknown).
    pub fn workflow(&self, id: &WorkflowId) -> &WorkflowState {
        self.workflows.get(id).unwrap_or(&NO_WORKFLOW)
    }
}

/// Any command, routed by aggregate kind. Serialized with a `type` tag naming
/// the command (`RegisterAgent`, `AssignTask`, …).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Command {
    /// A command on an agent.
    Agent(AgentCommand),
    /// A command on a task.
    Task(TaskCommand),
    /// A command on a workflow.
    Workflow(WorkflowCommand),
}

impl Command {
    /// The stream the command writes to.
    pub fn stream_id(&self) -> StreamId {
        match self {
            Command::Agent(c) => AgentState::stream_of(c),
            Command::Task(c) => TaskState::stream_of(c),
            Command::Workflow(c) => WorkflowState::stream_of(c),
        }
    }

    /// The command's type name, e.g. `AssignTask`.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Agent(c) => c.name(),
            Command::Task(c) => c.name(),
            Command::Workflow(c) => c.name(),
        }
    }
}

impl From<AgentCommand> for Command {
    fn from(c: AgentCommand) -> Self {
        Command::Agent(c)
    }
}
impl From<TaskCommand> for Command {
    fn from(c: TaskCommand) -> Self {
        Command::Task(c)
    }
}
impl From<WorkflowCommand> for Command {
    fn from(c: WorkflowCommand) -> Self {
        Command::Workflow(c)
    }
}
