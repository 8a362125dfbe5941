//! The leaf of an event: what the sealed log commits to, per event.
//!
//! The leaf is the canonical JSON (RFC 8785) of
//!
//! ```text
//! {"command":"<command id>","correlation":"<correlation id>",
//!  "data":"<hex SHA-256 of the canonical committed data>",
//!  "event":"<event id>","metadata":"<hex SHA-256 of the canonical committed metadata>",
//!  "position":"<global position, decimal>","recorded_at":"<UTC, microseconds, Z>",
//!  "schema":<schema version>,"stream":"<stream id>","tenant":"<tenant>",
//!  "type":"<event type>","v":1,"version":<stream version>}
//! ```
//!
//! and its hash in the tree is RFC 9162's `SHA-256(0x00 ‖ leaf)`. The
//! *committed* data is the stored `data` with every personal field
//! ([`domain::personal::personal_fields`]) replaced by its field digest; the
//! committed metadata is the metadata with `actor` replaced the same way. A
//! field digest is `"sha256:" + hex(SHA-256(canonical({"event":<event id>,
//! "field":<name>,"value":<value>})))` (`field` is `actor` for the
//! metadata's). Erasing a personal field stores that very digest in its
//! place, so the leaf — and every seal above it — stays the same.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use uuid::Uuid;

use super::jcs::{canonical, write_value};
use super::merkle::{leaf_hash, Hash};
use crate::envelope::RecordedEvent;

/// The leaf format's version (`"v"` in every leaf).
pub const LEAF_VERSION: u32 = 1;

/// The prefix of a field digest.
pub const DIGEST_PREFIX: &str = "sha256:";

/// The digest that commits to personal field `field` of event `event_id`
/// holding `value`, and that erasure stores in the value's place.
pub fn field_digest(event_id: Uuid, field: &str, value: &Value) -> String {
    let mut bytes = Vec::with_capacity(64);
    bytes.extend_from_slice(b"{\"event\":\"");
    bytes.extend_from_slice(event_id.hyphenated().to_string().as_bytes());
    bytes.extend_from_slice(b"\",\"field\":");
    super::jcs::write_str(&mut bytes, field);
    bytes.extend_from_slice(b",\"value\":");
    write_value(&mut bytes, value);
    bytes.push(b'}');
    format!("{DIGEST_PREFIX}{}", hex::encode(Sha256::digest(&bytes)))
}

/// `object` with each of `fields` it has replaced by its field digest,
/// except those in `erased` (their stored value is that digest already).
fn committed(
    event_id: Uuid,
    object: &Map<String, Value>,
    fields: &[&str],
    erased: &[&str],
) -> Value {
    let mut out = object.clone();
    for field in fields {
        if erased.contains(field) {
            continue;
        }
        if let Some(value) = out.get_mut(*field) {
            *value = Value::String(field_digest(event_id, field, value));
        }
    }
    Value::Object(out)
}

/// The data the leaf commits to: `data` with its personal fields digested
/// (those named in `erased` hold their digest already).
pub fn committed_data(event: &RecordedEvent, erased: &[&str]) -> Value {
    match &event.data {
        Value::Object(object) => committed(
            event.event_id,
            object,
            domain::personal::personal_fields(&event.event_type, event.schema_version),
            erased,
        ),
        other => other.clone(),
    }
}

/// The metadata the leaf commits to: the metadata as the system reads it
/// (`EventMetadata`), `actor` digested.
pub fn committed_metadata(event: &RecordedEvent, erased: &[&str]) -> Value {
    match serde_json::to_value(&event.metadata) {
        Ok(Value::Object(object)) => committed(
            event.event_id,
            &object,
            domain::personal::PERSONAL_METADATA,
            erased,
        ),
        // EventMetadata always serializes to an object.
        Ok(other) => other,
        Err(_) => Value::Null,
    }
}

/// `recorded_at` as the leaf spells it: UTC, microseconds, `Z`.
pub fn timestamp(at: OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.microsecond()
    )
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The leaf's canonical bytes. `erased` names the personal fields (of the
/// data, and `actor`) whose stored values are their digests already.
pub fn leaf_bytes(event: &RecordedEvent, erased: &[&str]) -> Vec<u8> {
    let data = sha256_hex(&canonical(&committed_data(event, erased)));
    let metadata = sha256_hex(&canonical(&committed_metadata(event, erased)));
    canonical(&serde_json::json!({
        "command": event.metadata.command_id,
        "correlation": event.metadata.correlation_id,
        "data": data,
        "event": event.event_id,
        "metadata": metadata,
        "position": event.position.to_string(),
        "recorded_at": timestamp(event.recorded_at),
        "schema": event.schema_version,
        "stream": event.stream_id,
        "tenant": event.metadata.tenant,
        "type": event.event_type,
        "v": LEAF_VERSION,
        "version": event.stream_version,
    }))
}

/// The event's leaf hash in its tenant's tree.
pub fn leaf(event: &RecordedEvent, erased: &[&str]) -> Hash {
    leaf_hash(&leaf_bytes(event, erased))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::EventMetadata;
    use serde_json::json;

    pub(crate) fn event() -> RecordedEvent {
        let id = Uuid::from_u128(0x1234);
        RecordedEvent {
            position: 18_861_654_016,
            stream_id: "task-00000000-0000-0000-0000-000000000001".into(),
            stream_version: 3,
            event_id: id,
            event_type: "TaskCompleted".into(),
            schema_version: 1,
            data: json!({"task_id": "00000000-0000-0000-0000-000000000001", "output": {"answer": 42}}),
            metadata: EventMetadata {
                event_id: id,
                command_id: Uuid::from_u128(7),
                command_type: "CompleteTask".into(),
                command_hash: "abc".into(),
                correlation_id: Uuid::from_u128(8),
                causation_id: Uuid::from_u128(9),
                actor: "ada@example.com".into(),
                tenant: "acme".into(),
                occurred_at: time::macros::datetime!(2026-12-07 16:00:00.5 UTC),
                traceparent: None,
            },
            recorded_at: time::macros::datetime!(2026-12-07 16:00:00.123456 UTC),
        }
    }

    #[test]
    fn the_leaf_is_the_documented_canonical_object() {
        let e = event();
        let text = String::from_utf8(leaf_bytes(&e, &[])).unwrap();
        let parsed: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed["position"], "18861654016");
        assert_eq!(parsed["recorded_at"], "2026-12-07T16:00:00.123456Z");
        assert_eq!(parsed["tenant"], "acme");
        assert_eq!(parsed["v"], 1);
        assert!(
            text.starts_with(r#"{"command":"00000000-0000-0000-0000-000000000007","correlation":"#)
        );
        // The data digest is over the data with `output` digested.
        let output = field_digest(e.event_id, "output", &json!({"answer": 42}));
        let committed =
            json!({"output": output, "task_id": "00000000-0000-0000-0000-000000000001"});
        assert_eq!(parsed["data"], sha256_hex(&canonical(&committed)));
    }

    #[test]
    fn erasing_a_personal_field_by_its_digest_keeps_the_leaf() {
        let e = event();
        let before = leaf(&e, &[]);
        let mut erased = e.clone();
        erased.data["output"] = json!(field_digest(e.event_id, "output", &e.data["output"]));
        erased.metadata.actor = field_digest(e.event_id, "actor", &json!(e.metadata.actor));
        assert_eq!(leaf(&erased, &["output", "actor"]), before);
        // Not declared erased, the digest is itself digested: a different leaf.
        assert_ne!(leaf(&erased, &[]), before);
    }

    #[test]
    fn every_part_of_the_event_changes_the_leaf() {
        let e = event();
        let before = leaf(&e, &[]);
        type Edit = Box<dyn Fn(&mut RecordedEvent)>;
        let edits: Vec<Edit> = vec![
            Box::new(|e| e.position += 1),
            Box::new(|e| e.stream_id.push('x')),
            Box::new(|e| e.stream_version += 1),
            Box::new(|e| e.event_id = Uuid::from_u128(1)),
            Box::new(|e| e.event_type = "TaskFailed".into()),
            Box::new(|e| e.schema_version = 2),
            Box::new(|e| e.data["task_id"] = json!("other")),
            Box::new(|e| e.data["output"]["answer"] = json!(43)),
            Box::new(|e| e.metadata.actor = "eve".into()),
            Box::new(|e| e.metadata.tenant = "globex".into()),
            Box::new(|e| e.metadata.command_type = "FailTask".into()),
            Box::new(|e| e.metadata.causation_id = Uuid::from_u128(1)),
            Box::new(|e| e.metadata.traceparent = Some("00-x".into())),
            Box::new(|e| e.recorded_at += time::Duration::microseconds(1)),
        ];
        for (i, edit) in edits.iter().enumerate() {
            let mut edited = e.clone();
            edit(&mut edited);
            assert_ne!(leaf(&edited, &[]), before, "edit {i}");
        }
    }
}
