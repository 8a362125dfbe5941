//! Shapes of events as stored and as handed to the store, and the metadata
//! every event carries.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use uuid::Uuid;

/// The version a writer expects the stream to be at before its append.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "version", rename_all = "snake_case")]
pub enum ExpectedVersion {
    /// Append whatever the current version is.
    Any,
    /// The stream must not exist yet.
    NoStream,
    /// The stream must be exactly at this version (0 = no stream).
    Exact(u64),
}

impl ExpectedVersion {
    /// The exact version required, if any (`NoStream` is version 0).
    pub fn required(self) -> Option<u64> {
        match self {
            ExpectedVersion::Any => None,
            ExpectedVersion::NoStream => Some(0),
            ExpectedVersion::Exact(v) => Some(v),
        }
    }
}

impl std::fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any version"),
            ExpectedVersion::NoStream => f.write_str("no stream"),
            ExpectedVersion::Exact(v) => write!(f, "version {v}"),
        }
    }
}

/// Who sent a command and in which causal context. Supplied by the caller
/// (API, simulator, tests); the handler derives event metadata from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandContext {
    /// Idempotency key: retries of one logical command share it.
    pub command_id: Uuid,
    /// Groups every event caused by one user intent; defaults to the command id.
    pub correlation_id: Option<Uuid>,
    /// The event or command that caused this one; defaults to the command id.
    pub causation_id: Option<Uuid>,
    /// Who issued the command (user, service or agent name).
    pub actor: String,
    /// The tenant whose data this is; streams never cross tenants.
    pub tenant: String,
    /// W3C trace context of a caller without a span of its own: the
    /// command's span continues it, and the events carry the command span's
    /// context (this one as is when spans are not traced).
    pub traceparent: Option<String>,
    /// Version the caller requires; `None` lets the handler retry on conflict.
    pub expected_version: Option<ExpectedVersion>,
}

impl CommandContext {
    /// A context with fresh correlation defaults.
    pub fn new(command_id: Uuid, actor: impl Into<String>, tenant: impl Into<String>) -> Self {
        Self {
            command_id,
            correlation_id: None,
            causation_id: None,
            actor: actor.into(),
            tenant: tenant.into(),
            traceparent: None,
            expected_version: None,
        }
    }
}

/// Metadata stored with every event (the `metadata` column).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventMetadata {
    /// The event's id (UUID v5 of the command id and the event's index).
    pub event_id: Uuid,
    /// The command that produced it.
    pub command_id: Uuid,
    /// The command's type, e.g. `AssignTask`.
    pub command_type: String,
    /// SHA-256 of the command's canonical JSON, to detect a reused command id.
    pub command_hash: String,
    /// Correlation id.
    pub correlation_id: Uuid,
    /// Causation id.
    pub causation_id: Uuid,
    /// Who issued the command.
    pub actor: String,
    /// Tenant.
    pub tenant: String,
    /// When the command was decided (handler clock).
    #[serde(with = "time::serde::rfc3339")]
    pub occurred_at: OffsetDateTime,
    /// W3C traceparent of the command's span, if traced: later stages
    /// (relay, projectors, subscriptions) continue its trace.
    pub traceparent: Option<String>,
}

/// An event to append.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// Type name, e.g. `TaskAssigned`.
    pub event_type: String,
    /// Schema version of `data`.
    pub schema_version: i32,
    /// Payload.
    pub data: Value,
    /// Metadata (its `event_id` is the event's id).
    pub metadata: EventMetadata,
}

/// An event as committed to the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedEvent {
    /// Global position: unique, and increasing in gap-safe read order.
    pub position: i64,
    /// Stream id, e.g. `task-<uuid>`.
    pub stream_id: String,
    /// 1-based version within the stream.
    pub stream_version: i64,
    /// Event id.
    pub event_id: Uuid,
    /// Type name.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Schema version of `data` as stored (before upcasting).
    pub schema_version: i32,
    /// Payload as stored.
    pub data: Value,
    /// Metadata.
    pub metadata: EventMetadata,
    /// Commit-side timestamp (transaction start in PostgreSQL).
    #[serde(with = "time::serde::rfc3339")]
    pub recorded_at: OffsetDateTime,
}

impl RecordedEvent {
    /// Decodes the payload into a domain event, upcasting old versions.
    pub fn decode(&self) -> Result<domain::DomainEvent, domain::EventDecodeError> {
        domain::DomainEvent::from_stored(&self.event_type, self.schema_version, self.data.clone())
    }

    /// The aggregate kind, from the stream id prefix.
    pub fn kind(&self) -> &str {
        self.stream_id.split_once('-').map_or("unknown", |(k, _)| k)
    }
}
