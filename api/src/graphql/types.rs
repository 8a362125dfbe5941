//! GraphQL output types: entities read from Redis (built from their stored
//! hashes), graph results, and events.

use async_graphql::{Json, SimpleObject, ID};
use commands::RecordedEvent;
use projections::Fields;

use super::{DateTime, Position};

fn text(fields: &Fields, name: &str) -> String {
    fields.get(name).cloned().unwrap_or_default()
}

fn optional(fields: &Fields, name: &str) -> Option<String> {
    fields.get(name).filter(|v| !v.is_empty()).cloned()
}

fn number(fields: &Fields, name: &str) -> i64 {
    fields.get(name).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn optional_id(fields: &Fields, name: &str) -> Option<ID> {
    optional(fields, name).map(ID)
}

fn id_list(fields: &Fields, name: &str) -> Vec<ID> {
    list(fields, name).into_iter().map(ID).collect()
}

fn list(fields: &Fields, name: &str) -> Vec<String> {
    fields
        .get(name)
        .map(|v| {
            v.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// An agent (from the Redis read model).
#[derive(Debug, Clone, SimpleObject)]
pub struct Agent {
    /// Agent id (its UUID).
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
    /// `active`, `paused`, `failed` or `retired`.
    pub status: String,
    /// Why it is paused, failed or retired.
    pub status_reason: Option<String>,
    /// The task it is running.
    pub current_task_id: Option<ID>,
    /// Tasks it completed.
    pub tasks_completed: i64,
    /// Tasks it failed.
    pub tasks_failed: i64,
    /// Position of the last event about it.
    pub last_position: Position,
    /// When the last event about it was decided.
    pub last_event_at: DateTime,
}

impl Agent {
    /// Its GraphQL fields and the hash fields they are built from (`id` is
    /// the key): a query reads only what it selects (`HMGET`).
    pub const STORED: &'static [(&'static str, &'static str)] = &[
        ("name", "name"),
        ("kind", "kind"),
        ("model", "model"),
        ("capabilities", "capabilities"),
        ("parentId", "parent"),
        ("status", "status"),
        ("statusReason", "status_reason"),
        ("currentTaskId", "current_task"),
        ("tasksCompleted", "tasks_completed"),
        ("tasksFailed", "tasks_failed"),
        ("lastPosition", "last_position"),
        ("lastEventAt", "last_event_at"),
    ];

    /// From its stored hash.
    pub fn from_fields(id: &str, f: &Fields) -> Self {
        Self {
            id: ID(id.to_owned()),
            name: text(f, "name"),
            kind: text(f, "kind"),
            model: optional(f, "model"),
            capabilities: list(f, "capabilities"),
            parent_id: optional_id(f, "parent"),
            status: text(f, "status"),
            status_reason: optional(f, "status_reason"),
            current_task_id: optional_id(f, "current_task"),
            tasks_completed: number(f, "tasks_completed"),
            tasks_failed: number(f, "tasks_failed"),
            last_position: Position(number(f, "last_position")),
            last_event_at: DateTime::from_millis(number(f, "last_event_at")),
        }
    }
}

/// A task (from the Redis read model).
#[derive(Debug, Clone, SimpleObject)]
pub struct Task {
    /// Task id (its UUID).
    pub id: ID,
    /// Its workflow.
    pub workflow_id: ID,
    /// Title.
    pub title: String,
    /// `pending`, `assigned`, `running`, `completed`, `failed` or `cancelled`.
    pub state: String,
    /// The agent holding it.
    pub assignee_id: Option<ID>,
    /// Progress in percent.
    pub progress: i64,
    /// The last progress note.
    pub progress_note: Option<String>,
    /// Attempt number (1-based).
    pub attempt: i64,
    /// Attempts allowed.
    pub max_attempts: i64,
    /// Priority (higher first).
    pub priority: i64,
    /// Capabilities an assignee needs.
    pub required_capabilities: Vec<String>,
    /// Tasks it depends on.
    pub depends_on: Vec<ID>,
    /// The last failure's message.
    pub last_error: Option<String>,
    /// Position of the last event about it.
    pub last_position: Position,
}

impl Task {
    /// From its stored hash.
    pub fn from_fields(id: &str, f: &Fields) -> Self {
        Self {
            id: ID(id.to_owned()),
            workflow_id: ID(text(f, "workflow")),
            title: text(f, "title"),
            state: text(f, "state"),
            assignee_id: optional_id(f, "assignee"),
            progress: number(f, "progress"),
            progress_note: optional(f, "progress_note"),
            attempt: number(f, "attempt"),
            max_attempts: number(f, "max_attempts"),
            priority: number(f, "priority"),
            required_capabilities: list(f, "required_capabilities"),
            depends_on: id_list(f, "depends_on"),
            last_error: optional(f, "last_error"),
            last_position: Position(number(f, "last_position")),
        }
    }
}

/// Task counts of a workflow by state.
#[derive(Debug, Clone, SimpleObject)]
pub struct WorkflowProgress {
    /// All tasks.
    pub total: i64,
    /// Pending.
    pub pending: i64,
    /// Assigned.
    pub assigned: i64,
    /// Running.
    pub running: i64,
    /// Completed.
    pub completed: i64,
    /// Failed.
    pub failed: i64,
    /// Cancelled.
    pub cancelled: i64,
    /// Completed share of all tasks, 0–100.
    pub percent_complete: f64,
}

/// A workflow (from the Redis read model).
#[derive(Debug, Clone, SimpleObject)]
pub struct Workflow {
    /// Workflow id (its UUID).
    pub id: ID,
    /// Name.
    pub name: String,
    /// `running`, `completed`, `failed` or `cancelled`.
    pub status: String,
    /// Why it failed or was cancelled.
    pub reason: Option<String>,
    /// Task counts.
    pub progress: WorkflowProgress,
    /// Position of the last event about it.
    pub last_position: Position,
}

impl Workflow {
    /// From its stored hash.
    pub fn from_fields(id: &str, f: &Fields) -> Self {
        let total = number(f, "tasks_total");
        let completed = number(f, "tasks_completed");
        Self {
            id: ID(id.to_owned()),
            name: text(f, "name"),
            status: text(f, "status"),
            reason: optional(f, "reason"),
            progress: WorkflowProgress {
                total,
                pending: number(f, "tasks_pending"),
                assigned: number(f, "tasks_assigned"),
                running: number(f, "tasks_running"),
                completed,
                failed: number(f, "tasks_failed"),
                cancelled: number(f, "tasks_cancelled"),
                percent_complete: if total > 0 {
                    completed as f64 * 100.0 / total as f64
                } else {
                    0.0
                },
            },
            last_position: Position(number(f, "last_position")),
        }
    }
}

/// Metadata of a stored event.
#[derive(Debug, Clone, SimpleObject)]
pub struct EventMetadata {
    /// The event's id.
    pub event_id: ID,
    /// The command that produced it (the idempotency key).
    pub command_id: ID,
    /// The command's type.
    pub command_type: String,
    /// Correlation id: follows one intent across aggregates.
    pub correlation_id: ID,
    /// Causation id.
    pub causation_id: ID,
    /// Who issued the command.
    pub actor: String,
    /// When the command was decided.
    pub occurred_at: DateTime,
    /// When the store recorded it.
    pub recorded_at: DateTime,
    /// W3C traceparent of the command.
    pub traceparent: Option<String>,
}

/// A stored event.
#[derive(Debug, Clone, SimpleObject)]
pub struct Event {
    /// Global position.
    pub position: Position,
    /// Stream id (`agent-…`, `task-…`, `workflow-…`).
    pub stream_id: ID,
    /// Version within the stream (1-based).
    pub version: i64,
    /// Type name, e.g. `TaskAssigned`.
    #[graphql(name = "type")]
    pub event_type: String,
    /// Schema version of the payload as stored.
    pub schema_version: i32,
    /// Payload.
    pub data: Json<serde_json::Value>,
    /// Metadata.
    pub metadata: EventMetadata,
}

impl From<&RecordedEvent> for Event {
    fn from(e: &RecordedEvent) -> Self {
        let m = &e.metadata;
        Self {
            position: Position(e.position),
            stream_id: ID(e.stream_id.clone()),
            version: e.stream_version,
            event_type: e.event_type.clone(),
            schema_version: e.schema_version,
            data: Json(e.data.clone()),
            metadata: EventMetadata {
                event_id: ID(m.event_id.to_string()),
                command_id: ID(m.command_id.to_string()),
                command_type: m.command_type.clone(),
                correlation_id: ID(m.correlation_id.to_string()),
                causation_id: ID(m.causation_id.to_string()),
                actor: m.actor.clone(),
                occurred_at: DateTime(m.occurred_at),
                recorded_at: DateTime(e.recorded_at),
                traceparent: m.traceparent.clone(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_graphql::OutputType as _;

    /// Every GraphQL field of `Agent` but `id` is in [`Agent::STORED`],
    /// and each maps to a hash field `from_fields` reads.
    #[test]
    fn agent_fields_are_all_stored() {
        let mut registry = async_graphql::registry::Registry::default();
        Agent::create_type_info(&mut registry);
        let Some(meta) = registry.types.get("Agent") else {
            panic!("Agent is not registered");
        };
        let all: Vec<String> = match meta {
            async_graphql::registry::MetaType::Object { fields, .. } => {
                fields.keys().cloned().collect()
            }
            _ => panic!("Agent is not an object"),
        };
        for name in all.iter().filter(|n| *n != "id") {
            let stored = Agent::STORED.iter().find(|(gql, _)| gql == name);
            let Some((_, hash_field)) = stored else {
                panic!("Agent.{name} is not in Agent::STORED: agent(id) would never read it");
            };
            let mut hash = Fields::new();
            hash.insert((*hash_field).to_owned(), "7".to_owned());
            let agent = Agent::from_fields("a", &hash);
            let value = serde_json::to_value(format!("{agent:?}")).unwrap_or_default();
            assert!(
                value.as_str().is_some_and(|d| d.contains('7')),
                "from_fields ignores the hash field {hash_field} of Agent.{name}"
            );
        }
        assert_eq!(all.len(), Agent::STORED.len() + 1, "{all:?}");
    }
}
