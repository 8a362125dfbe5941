//! The union of all events, their stable type names and schema versions, and
//! upcasting of older stored payloads.
//!
//! Stored form: a `type` (e.g. `TaskAssigned`), a `schema_version` and a JSON
//! `data` object holding the event's fields without the `type` tag. Each
//! `(type, version)` has a JSON Schema in `event-schemas/<Type>.v<N>.json`.
//! A published version is never edited: a new shape is a new version plus an
//! upcaster here that turns the old payload into the new one on read.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::agent::AgentEvent;
use crate::erasure::ErasureEvent;
use crate::ids::AggregateKind;
use crate::task::TaskEvent;
use crate::workflow::WorkflowEvent;

/// Every event type with its current schema version.
pub const EVENT_TYPES: &[(&str, AggregateKind, i32)] = &[
    ("AgentRegistered", AggregateKind::Agent, 2),
    ("AgentPaused", AggregateKind::Agent, 1),
    ("AgentResumed", AggregateKind::Agent, 1),
    ("AgentFailed", AggregateKind::Agent, 1),
    ("AgentRetired", AggregateKind::Agent, 1),
    ("TaskCreated", AggregateKind::Task, 1),
    ("TaskAssigned", AggregateKind::Task, 1),
    ("TaskStarted", AggregateKind::Task, 1),
    ("TaskProgressReported", AggregateKind::Task, 1),
    ("TaskCompleted", AggregateKind::Task, 1),
    ("TaskFailed", AggregateKind::Task, 1),
    ("TaskRetried", AggregateKind::Task, 1),
    ("TaskCancelled", AggregateKind::Task, 1),
    ("TaskDelegated", AggregateKind::Task, 1),
    ("WorkflowStarted", AggregateKind::Workflow, 1),
    ("WorkflowCompleted", AggregateKind::Workflow, 1),
    ("WorkflowFailed", AggregateKind::Workflow, 1),
    ("WorkflowCancelled", AggregateKind::Workflow, 1),
    ("PersonalDataErased", AggregateKind::Erasure, 1),
];

/// Why a stored event could not be turned into a [`DomainEvent`].
#[derive(Debug, thiserror::Error)]
pub enum EventDecodeError {
    /// The type is not one this build knows (written by a newer version?).
    #[error("unknown event type `{event_type}` (schema version {schema_version}); this build knows: {known}")]
    UnknownType {
        /// The stored type.
        event_type: String,
        /// The stored version.
        schema_version: i32,
        /// Comma-separated known types.
        known: String,
    },
    /// The version is newer than this build, or older than any upcaster.
    #[error("event type `{event_type}` has schema version {schema_version}, but this build reads versions 1 to {current}")]
    UnsupportedVersion {
        /// The stored type.
        event_type: String,
        /// The stored version.
        schema_version: i32,
        /// The newest version this build knows.
        current: i32,
    },
    /// The payload does not match the schema of its type and version.
    #[error("malformed `{event_type}` v{schema_version} payload: {source}")]
    Malformed {
        /// The stored type.
        event_type: String,
        /// The stored version.
        schema_version: i32,
        /// The deserialization error.
        #[source]
        source: serde_json::Error,
    },
}

/// Any event of any aggregate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DomainEvent {
    /// An agent event.
    Agent(AgentEvent),
    /// A task event.
    Task(TaskEvent),
    /// A workflow event.
    Workflow(WorkflowEvent),
    /// An erasure of personal data.
    Erasure(ErasureEvent),
}

impl DomainEvent {
    /// The stable type name, e.g. `TaskAssigned`.
    pub fn event_type(&self) -> &'static str {
        match self {
            DomainEvent::Agent(e) => match e {
                AgentEvent::AgentRegistered { .. } => "AgentRegistered",
                AgentEvent::AgentPaused { .. } => "AgentPaused",
                AgentEvent::AgentResumed { .. } => "AgentResumed",
                AgentEvent::AgentFailed { .. } => "AgentFailed",
                AgentEvent::AgentRetired { .. } => "AgentRetired",
            },
            DomainEvent::Task(e) => match e {
                TaskEvent::TaskCreated { .. } => "TaskCreated",
                TaskEvent::TaskAssigned { .. } => "TaskAssigned",
                TaskEvent::TaskStarted { .. } => "TaskStarted",
                TaskEvent::TaskProgressReported { .. } => "TaskProgressReported",
                TaskEvent::TaskCompleted { .. } => "TaskCompleted",
                TaskEvent::TaskFailed { .. } => "TaskFailed",
                TaskEvent::TaskRetried { .. } => "TaskRetried",
                TaskEvent::TaskCancelled { .. } => "TaskCancelled",
                TaskEvent::TaskDelegated { .. } => "TaskDelegated",
            },
            DomainEvent::Workflow(e) => match e {
                WorkflowEvent::WorkflowStarted { .. } => "WorkflowStarted",
                WorkflowEvent::WorkflowCompleted { .. } => "WorkflowCompleted",
                WorkflowEvent::WorkflowFailed { .. } => "WorkflowFailed",
                WorkflowEvent::WorkflowCancelled { .. } => "WorkflowCancelled",
            },
            DomainEvent::Erasure(e) => match e {
                ErasureEvent::PersonalDataErased { .. } => "PersonalDataErased",
            },
        }
    }

    /// The stream the event belongs to.
    pub fn stream_id(&self) -> crate::ids::StreamId {
        match self {
            DomainEvent::Agent(e) => e.agent_id().stream_id(),
            DomainEvent::Task(e) => e.task_id().stream_id(),
            DomainEvent::Workflow(e) => e.workflow_id().stream_id(),
            DomainEvent::Erasure(e) => e.stream_id(),
        }
    }

    /// The kind of aggregate that emits it.
    pub fn kind(&self) -> AggregateKind {
        match self {
            DomainEvent::Agent(_) => AggregateKind::Agent,
            DomainEvent::Task(_) => AggregateKind::Task,
            DomainEvent::Workflow(_) => AggregateKind::Workflow,
            DomainEvent::Erasure(_) => AggregateKind::Erasure,
        }
    }

    /// The schema version this build writes for the event's type.
    pub fn schema_version(&self) -> i32 {
        current_version(self.event_type()).unwrap_or(1)
    }

    /// The stored payload: the event's fields without the `type` tag.
    pub fn to_data(&self) -> Value {
        // Serializing these plain data types cannot fail (no maps with
        // non-string keys, no custom serializers that error).
        let mut value = serde_json::to_value(self).unwrap_or(Value::Null);
        if let Value::Object(map) = &mut value {
            map.remove("type");
        }
        value
    }

    /// Decodes a stored event, upcasting older schema versions first.
    pub fn from_stored(
        event_type: &str,
        schema_version: i32,
        data: Value,
    ) -> Result<Self, EventDecodeError> {
        let data = upcast(event_type, schema_version, data)?;
        let mut map = match data {
            Value::Object(map) => map,
            other => {
                let source = <serde_json::Error as serde::de::Error>::custom(format!(
                    "expected a JSON object, found {other}"
                ));
                return Err(EventDecodeError::Malformed {
                    event_type: event_type.to_owned(),
                    schema_version,
                    source,
                });
            }
        };
        map.insert("type".to_owned(), Value::String(event_type.to_owned()));
        let value = Value::Object(map);
        let kind = EVENT_TYPES
            .iter()
            .find(|(t, _, _)| *t == event_type)
            .map(|(_, k, _)| *k);
        let malformed = |source| EventDecodeError::Malformed {
            event_type: event_type.to_owned(),
            schema_version,
            source,
        };
        match kind {
            Some(AggregateKind::Agent) => serde_json::from_value(value)
                .map(DomainEvent::Agent)
                .map_err(malformed),
            Some(AggregateKind::Task) => serde_json::from_value(value)
                .map(DomainEvent::Task)
                .map_err(malformed),
            Some(AggregateKind::Workflow) => serde_json::from_value(value)
                .map(DomainEvent::Workflow)
                .map_err(malformed),
            Some(AggregateKind::Erasure) => serde_json::from_value(value)
                .map(DomainEvent::Erasure)
                .map_err(malformed),
            None => Err(unknown(event_type, schema_version)),
        }
    }
}

/// The current schema version of an event type, if known.
pub fn current_version(event_type: &str) -> Option<i32> {
    EVENT_TYPES
        .iter()
        .find(|(t, _, _)| *t == event_type)
        .map(|(_, _, v)| *v)
}

fn unknown(event_type: &str, schema_version: i32) -> EventDecodeError {
    EventDecodeError::UnknownType {
        event_type: event_type.to_owned(),
        schema_version,
        known: EVENT_TYPES
            .iter()
            .map(|(t, _, _)| *t)
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// Turns a stored payload of any supported version into the current version.
///
/// Upcasters:
/// - `AgentRegistered` v1 → v2: v1 (`agent_id`, `name`, `model`, `capabilities`)
///   predates agent kinds and parents; every v1 agent was a language model, so
///   v2 gets `kind: "llm"`, `model` kept as is, `parent_agent_id: null`, and
///   capabilities sorted and deduplicated as v2 writers store them.
pub fn upcast(
    event_type: &str,
    schema_version: i32,
    data: Value,
) -> Result<Value, EventDecodeError> {
    let current = current_version(event_type).ok_or_else(|| unknown(event_type, schema_version))?;
    if schema_version < 1 || schema_version > current {
        return Err(EventDecodeError::UnsupportedVersion {
            event_type: event_type.to_owned(),
            schema_version,
            current,
        });
    }
    let mut data = data;
    let mut version = schema_version;
    while version < current {
        data = match (event_type, version, data) {
            ("AgentRegistered", 1, Value::Object(v1)) => agent_registered_v1_to_v2(v1),
            (_, _, other) => {
                // Every type whose current version is above 1 has an upcaster
                // for each older version; a non-object payload is malformed.
                let source = <serde_json::Error as serde::de::Error>::custom(format!(
                    "expected a JSON object, found {other}"
                ));
                return Err(EventDecodeError::Malformed {
                    event_type: event_type.to_owned(),
                    schema_version,
                    source,
                });
            }
        };
        version += 1;
    }
    Ok(data)
}

fn agent_registered_v1_to_v2(mut v1: Map<String, Value>) -> Value {
    // v1 writers did not normalise capabilities; v2 stores them sorted and
    // deduplicated (capability checks rely on it).
    if let Some(Value::Array(caps)) = v1.get_mut("capabilities") {
        caps.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
        caps.dedup();
    }
    v1.insert("kind".to_owned(), Value::String("llm".to_owned()));
    v1.entry("model").or_insert(Value::Null);
    v1.insert("parent_agent_id".to_owned(), Value::Null);
    Value::Object(v1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::AgentKind;
    use serde_json::json;

    #[test]
    fn agent_registered_v1_is_upcast_to_v2() {
        let v1 = json!({
            "agent_id": "00000000-0000-0000-0000-000000000001",
            "name": "legacy",
            "model": "gpt-3.5-turbo",
            "capabilities": ["summarize"]
        });
        let event = DomainEvent::from_stored("AgentRegistered", 1, v1).unwrap();
        let DomainEvent::Agent(AgentEvent::AgentRegistered {
            kind,
            model,
            parent_agent_id,
            ..
        }) = event
        else {
            panic!("wrong variant: {event:?}");
        };
        assert_eq!(kind, AgentKind::Llm);
        assert_eq!(model.as_deref(), Some("gpt-3.5-turbo"));
        assert_eq!(parent_agent_id, None);
    }

    #[test]
    fn unknown_types_and_future_versions_are_errors_not_skips() {
        let err = DomainEvent::from_stored("AgentTeleported", 1, json!({})).unwrap_err();
        assert!(matches!(err, EventDecodeError::UnknownType { .. }), "{err}");
        let err = DomainEvent::from_stored("TaskStarted", 9, json!({})).unwrap_err();
        assert!(err.to_string().contains("reads versions 1 to 1"), "{err}");
        let err = DomainEvent::from_stored("TaskStarted", 1, json!({"task_id": 3})).unwrap_err();
        assert!(matches!(err, EventDecodeError::Malformed { .. }), "{err}");
    }

    #[test]
    fn every_type_is_listed_once() {
        let mut names: Vec<_> = EVENT_TYPES.iter().map(|(t, _, _)| *t).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), EVENT_TYPES.len());
    }
}
