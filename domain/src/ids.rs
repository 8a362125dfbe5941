//! Typed identifiers. Every aggregate instance lives in its own stream whose id
//! is `<kind>-<uuid>` (`agent-…`, `task-…`, `workflow-…`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The aggregate kinds; the prefix of every stream id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AggregateKind {
    /// An AI agent (or a tool or human acting as one).
    Agent,
    /// A unit of work inside a workflow.
    Task,
    /// A group of tasks with a lifecycle of its own.
    Workflow,
    /// An erasure of personal data (one event; not decided by commands).
    Erasure,
}

impl AggregateKind {
    /// The stream-id prefix and NATS subject token of this kind.
    pub fn as_str(self) -> &'static str {
        match self {
            AggregateKind::Agent => "agent",
            AggregateKind::Task => "task",
            AggregateKind::Workflow => "workflow",
            AggregateKind::Erasure => "erasure",
        }
    }
}

impl fmt::Display for AggregateKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a string is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdParseError {
    /// The text is not a UUID.
    #[error("`{input}` is not a valid {kind} id: expected a UUID such as 0b7e6a4e-1c2d-4f5a-9b8c-3d2e1f0a9b8c")]
    NotUuid {
        /// Which id was being parsed.
        kind: &'static str,
        /// The rejected text.
        input: String,
    },
    /// The text is not a stream id of a known kind.
    #[error("`{input}` is not a stream id: expected agent-<uuid>, task-<uuid> or workflow-<uuid>")]
    NotStreamId {
        /// The rejected text.
        input: String,
    },
}

macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident, $kind:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// Wraps an existing UUID (ids are generated outside the domain).
            pub const fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }

            /// The underlying UUID.
            pub const fn as_uuid(&self) -> Uuid {
                self.0
            }

            /// Parses a UUID in any of its textual forms.
            pub fn parse(input: &str) -> Result<Self, IdParseError> {
                Uuid::parse_str(input.trim()).map(Self).map_err(|_| IdParseError::NotUuid {
                    kind: $kind.as_str(),
                    input: input.to_owned(),
                })
            }

            /// The id of the stream holding this aggregate's events.
            pub fn stream_id(&self) -> StreamId {
                StreamId::new($kind, self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl FromStr for $name {
            type Err = IdParseError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s)
            }
        }
    };
}

typed_id!(
    /// Identifies an agent; stream `agent-<uuid>`.
    AgentId,
    AggregateKind::Agent
);
typed_id!(
    /// Identifies a task; stream `task-<uuid>`.
    TaskId,
    AggregateKind::Task
);
typed_id!(
    /// Identifies a workflow; stream `workflow-<uuid>`.
    WorkflowId,
    AggregateKind::Workflow
);

/// The id of one event stream: an aggregate kind and the aggregate's UUID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId {
    kind: AggregateKind,
    id: Uuid,
}

impl StreamId {
    /// Builds a stream id from its parts.
    pub const fn new(kind: AggregateKind, id: Uuid) -> Self {
        Self { kind, id }
    }

    /// The aggregate kind of the stream.
    pub const fn kind(&self) -> AggregateKind {
        self.kind
    }

    /// The aggregate's UUID.
    pub const fn uuid(&self) -> Uuid {
        self.id
    }

    /// Parses `agent-<uuid>`, `task-<uuid>` or `workflow-<uuid>`.
    pub fn parse(input: &str) -> Result<Self, IdParseError> {
        let not_stream = || IdParseError::NotStreamId {
            input: input.to_owned(),
        };
        let (prefix, rest) = input.split_once('-').ok_or_else(not_stream)?;
        let kind = match prefix {
            "agent" => AggregateKind::Agent,
            "task" => AggregateKind::Task,
            "workflow" => AggregateKind::Workflow,
            "erasure" => AggregateKind::Erasure,
            _ => return Err(not_stream()),
        };
        let id = Uuid::parse_str(rest).map_err(|_| not_stream())?;
        Ok(Self { kind, id })
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.kind.as_str(), self.id)
    }
}

impl FromStr for StreamId {
    type Err = IdParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for StreamId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for StreamId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_round_trip() {
        let id = AgentId::from_uuid(Uuid::from_u128(7));
        let stream = id.stream_id();
        assert_eq!(stream.to_string(), format!("agent-{}", Uuid::from_u128(7)));
        assert_eq!(StreamId::parse(&stream.to_string()), Ok(stream));
    }

    #[test]
    fn bad_ids_are_rejected_with_the_input() {
        let err = TaskId::parse("nope").unwrap_err();
        assert!(err.to_string().contains("`nope` is not a valid task id"));
        assert!(StreamId::parse("robot-123").is_err());
        assert!(StreamId::parse(&format!("task-{}x", Uuid::nil())).is_err());
    }
}
