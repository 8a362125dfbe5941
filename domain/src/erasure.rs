//! Erasure of personal data: the audited event that records it.
//!
//! An erasure replaces personal values ([`crate::personal`]) in stored
//! events by their digests (README, "Erasure"). It is not decided by an
//! aggregate: the store writes it in the transaction that rewrites the
//! events, as the only event of a stream `erasure-<uuid>` of its own. The
//! event says what was erased (its scope), commits to every tombstone it
//! wrote (count and digest, so that `audit verify` can tell a tombstone
//! no erasure accounts for) and carries what the erasure changed in the
//! folded state of each affected aggregate, so that the read models apply
//! it in the log's order like any other event (those values are digests:
//! the event holds no personal data).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::ids::{AggregateKind, StreamId};

/// What an erasure covered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErasureScope {
    /// Every personal field of the data of every event of a stream.
    Stream(String),
    /// The personal fields of one event (data and `actor`).
    Event(Uuid),
    /// The metadata `actor` of every event of the tenant by that actor,
    /// named by the hex SHA-256 of the actor (the event holds no name).
    Actor(String),
}

/// The values an erasure changed in the folded state of one aggregate:
/// state field → its value now (a digest, or a document holding digests).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErasedState {
    /// The aggregate's stream.
    pub stream_id: String,
    /// The changed fields of its state (`name`, `title`, `progress_note`…).
    pub fields: BTreeMap<String, Value>,
}

/// Events of an erasure stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ErasureEvent {
    /// Personal values of stored events were replaced by their digests.
    PersonalDataErased {
        /// The erasure (its stream is `erasure-<id>`).
        erasure_id: Uuid,
        /// What it covered.
        scope: ErasureScope,
        /// Events that lost at least one value.
        events: u64,
        /// Tombstones written (one per such event).
        tombstones: u64,
        /// Hex SHA-256 of the canonical tombstone list (README, "Erasure").
        tombstone_digest: String,
        /// The positions of the events whose `data` changed (their change
        /// feed entries are deleted).
        positions: Vec<i64>,
        /// What changed in the state of each affected aggregate.
        changes: Vec<ErasedState>,
    },
}

impl ErasureEvent {
    /// The erasure's id.
    pub fn erasure_id(&self) -> Uuid {
        match self {
            ErasureEvent::PersonalDataErased { erasure_id, .. } => *erasure_id,
        }
    }

    /// The erasure's stream.
    pub fn stream_id(&self) -> StreamId {
        StreamId::new(AggregateKind::Erasure, self.erasure_id())
    }
}
