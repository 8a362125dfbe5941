//! Output types of the audit queries.

use async_graphql::{Enum, Json, SimpleObject, ID};

use crate::graphql::reads::{AgentStatus, TaskState as TaskStatus};
use crate::graphql::types::Event;
use crate::graphql::{DateTime, Position};

/// A page of one stream's history.
#[derive(Debug, Clone, SimpleObject)]
pub struct StreamHistory {
    /// The stream (`agent-…`, `task-…`, `workflow-…`).
    pub stream_id: ID,
    /// `agent`, `task` or `workflow`.
    pub kind: String,
    /// The stream's version now (its last event).
    pub current_version: i64,
    /// Events of the requested range, in version order, with metadata.
    pub events: Vec<Event>,
    /// The range holds more events after the last one returned: ask again
    /// with `fromVersion` = its version + 1.
    pub has_more: bool,
}

/// A page of the tenant's event log.
#[derive(Debug, Clone, SimpleObject)]
pub struct EventLogPage {
    /// Events in global position order.
    pub events: Vec<Event>,
    /// Pass as `after` to continue: the position of the last event returned,
    /// or the given `after` when the page is empty.
    pub next: Position,
    /// More matching events are readable now after `next`. When false, poll
    /// again later from `next`: events still being committed appear then,
    /// never below `next`.
    pub has_more: bool,
}

/// Where a rebuilt state stands in its stream.
#[derive(Debug, Clone, SimpleObject)]
pub struct Replayed {
    /// The stream replayed.
    pub stream_id: ID,
    /// Version of the last event folded (the state is as of this version).
    pub version: i64,
    /// Global position of the last event folded.
    pub position: Position,
    /// When the store recorded the last event folded.
    pub recorded_at: DateTime,
    /// The stream's version now; larger than `version` when looking back.
    pub current_version: i64,
    /// The last event folded, with who caused it and why (metadata).
    pub last_event: Event,
}

/// Workflow statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[graphql(remote = "domain::WorkflowStatus")]
pub enum WorkflowStatus {
    /// Accepting and running tasks.
    Running,
    /// Finished successfully.
    Completed,
    /// Finished unsuccessfully.
    Failed,
    /// Abandoned.
    Cancelled,
}

/// An agent as it was at a version or time, rebuilt from its events.
#[derive(Debug, Clone, SimpleObject)]
pub struct AgentAt {
    /// Agent id.
    pub id: ID,
    /// Display name.
    pub name: String,
    /// `llm`, `tool` or `human`.
    pub kind: String,
    /// Model name (LLM agents).
    pub model: Option<String>,
    /// Capabilities.
    pub capabilities: Vec<String>,
    /// The agent that spawned it.
    pub parent_id: Option<ID>,
    /// Status.
    pub status: AgentStatus,
    /// Why it was paused, failed or retired.
    pub status_reason: Option<String>,
    /// The whole aggregate state, as the command handler holds it.
    pub state: Json<serde_json::Value>,
    /// Where in its stream this state stands.
    #[graphql(flatten)]
    pub replayed: Replayed,
}

/// A task as it was at a version or time, rebuilt from its events.
#[derive(Debug, Clone, SimpleObject)]
pub struct TaskAt {
    /// Task id.
    pub id: ID,
    /// Its workflow.
    pub workflow_id: ID,
    /// Title.
    pub title: String,
    /// Lifecycle state.
    pub status: TaskStatus,
    /// The agent holding it (or the last one, once finished).
    pub assignee_id: Option<ID>,
    /// Input document.
    pub input: Json<serde_json::Value>,
    /// Output of a completed task.
    pub output: Option<Json<serde_json::Value>>,
    /// Capabilities an assignee needs.
    pub required_capabilities: Vec<String>,
    /// Tasks it depends on.
    pub depends_on: Vec<ID>,
    /// Priority, 0–100.
    pub priority: i32,
    /// Progress in percent.
    pub progress: i32,
    /// The last progress note.
    pub progress_note: Option<String>,
    /// Attempt number (1-based).
    pub attempt: i64,
    /// Attempts allowed.
    pub max_attempts: i64,
    /// The last failure's message.
    pub last_error: Option<String>,
    /// Whether the last failure may be retried.
    pub retryable: bool,
    /// Why it was cancelled.
    pub cancel_reason: Option<String>,
    /// The whole aggregate state, as the command handler holds it.
    pub state: Json<serde_json::Value>,
    /// Where in its stream this state stands.
    #[graphql(flatten)]
    pub replayed: Replayed,
}

/// A workflow as it was at a version or time, rebuilt from its events.
#[derive(Debug, Clone, SimpleObject)]
pub struct WorkflowAt {
    /// Workflow id.
    pub id: ID,
    /// Name.
    pub name: String,
    /// Status.
    pub status: WorkflowStatus,
    /// Why it failed or was cancelled.
    pub reason: Option<String>,
    /// Its metadata document.
    pub metadata: Json<serde_json::Value>,
    /// The whole aggregate state, as the command handler holds it.
    pub state: Json<serde_json::Value>,
    /// Where in its stream this state stands.
    #[graphql(flatten)]
    pub replayed: Replayed,
}
