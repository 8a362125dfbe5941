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

use super::jcs::{canonical, write_str, write_value};
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
    canonical(&leaf_value(event, erased))
}

/// The leaf as a JSON value (the reference the fast [`leaf`] is checked
/// against, and what the API shows an auditor).
pub fn leaf_value(event: &RecordedEvent, erased: &[&str]) -> Value {
    let data = sha256_hex(&canonical(&committed_data(event, erased)));
    let metadata = sha256_hex(&canonical(&committed_metadata(event, erased)));
    serde_json::json!({
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
    })
}

/// The event's leaf hash in its tenant's tree: the hash of
/// [`leaf_bytes`], written straight from the event without building JSON
/// values (the sealer and the verifier hash every event; this is their
/// cost per event). Checked equal to the reference in the tests.
pub fn leaf(event: &RecordedEvent, erased: &[&str]) -> Hash {
    BUFFERS.with(|buffers| {
        let mut buffers = buffers.borrow_mut();
        let Buffers { out, scratch } = &mut *buffers;
        let data = data_digest(event, erased, out, scratch);
        let metadata = metadata_digest(event, erased, out, scratch);
        out.clear();
        out.extend_from_slice(b"{\"command\":");
        write_uuid(out, event.metadata.command_id);
        out.extend_from_slice(b",\"correlation\":");
        write_uuid(out, event.metadata.correlation_id);
        out.extend_from_slice(b",\"data\":");
        write_hex(out, &data);
        out.extend_from_slice(b",\"event\":");
        write_uuid(out, event.event_id);
        out.extend_from_slice(b",\"metadata\":");
        write_hex(out, &metadata);
        out.extend_from_slice(b",\"position\":\"");
        out.extend_from_slice(event.position.to_string().as_bytes());
        out.extend_from_slice(b"\",\"recorded_at\":\"");
        out.extend_from_slice(timestamp(event.recorded_at).as_bytes());
        out.extend_from_slice(b"\",\"schema\":");
        write_value(out, &Value::from(event.schema_version));
        out.extend_from_slice(b",\"stream\":");
        write_str(out, &event.stream_id);
        out.extend_from_slice(b",\"tenant\":");
        write_str(out, &event.metadata.tenant);
        out.extend_from_slice(b",\"type\":");
        write_str(out, &event.event_type);
        out.extend_from_slice(b",\"v\":");
        out.extend_from_slice(LEAF_VERSION.to_string().as_bytes());
        out.extend_from_slice(b",\"version\":");
        write_value(out, &Value::from(event.stream_version));
        out.push(b'}');
        leaf_hash(out)
    })
}

/// Buffers reused by [`leaf`] on each thread.
#[derive(Default)]
struct Buffers {
    out: Vec<u8>,
    scratch: Vec<u8>,
}

thread_local! {
    static BUFFERS: std::cell::RefCell<Buffers> = std::cell::RefCell::default();
}

fn write_uuid(out: &mut Vec<u8>, id: Uuid) {
    let mut text = [0u8; 36];
    out.push(b'"');
    out.extend_from_slice(id.hyphenated().encode_lower(&mut text).as_bytes());
    out.push(b'"');
}

fn write_hex(out: &mut Vec<u8>, hash: &[u8; 32]) {
    let mut text = [0u8; 64];
    // 64 bytes for 32: encoding cannot fail.
    let _ = hex::encode_to_slice(hash, &mut text);
    out.push(b'"');
    out.extend_from_slice(&text);
    out.push(b'"');
}

/// Writes the field digest of `field` = `value` (see [`field_digest`]) as a
/// JSON string, using `scratch`.
fn write_field_digest(
    out: &mut Vec<u8>,
    scratch: &mut Vec<u8>,
    event_id: Uuid,
    field: &str,
    value: &Value,
) {
    scratch.clear();
    scratch.extend_from_slice(b"{\"event\":");
    write_uuid(scratch, event_id);
    scratch.extend_from_slice(b",\"field\":");
    write_str(scratch, field);
    scratch.extend_from_slice(b",\"value\":");
    write_value(scratch, value);
    scratch.push(b'}');
    let digest: Hash = Sha256::digest(&scratch[..]).into();
    let mut text = [0u8; 64];
    let _ = hex::encode_to_slice(digest, &mut text);
    out.push(b'"');
    out.extend_from_slice(DIGEST_PREFIX.as_bytes());
    out.extend_from_slice(&text);
    out.push(b'"');
}

/// Whether `keys` are in RFC 8785's order (UTF-16 code units).
fn in_jcs_order<'a>(mut keys: impl Iterator<Item = &'a String>) -> bool {
    let Some(mut previous) = keys.next() else {
        return true;
    };
    for key in keys {
        if previous.encode_utf16().cmp(key.encode_utf16()) != std::cmp::Ordering::Less {
            return false;
        }
        previous = key;
    }
    true
}

/// SHA-256 of the canonical committed data (see [`committed_data`]).
fn data_digest(
    event: &RecordedEvent,
    erased: &[&str],
    out: &mut Vec<u8>,
    scratch: &mut Vec<u8>,
) -> Hash {
    out.clear();
    let Value::Object(object) = &event.data else {
        write_value(out, &event.data);
        return Sha256::digest(&out[..]).into();
    };
    let personal = domain::personal::personal_fields(&event.event_type, event.schema_version);
    let mut members: Vec<(&String, &Value)> = object.iter().collect();
    if !in_jcs_order(members.iter().map(|(k, _)| *k)) {
        members.sort_by(|(a, _), (b, _)| a.encode_utf16().cmp(b.encode_utf16()));
    }
    out.push(b'{');
    for (i, (name, value)) in members.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, name);
        out.push(b':');
        if personal.contains(&name.as_str()) && !erased.contains(&name.as_str()) {
            write_field_digest(out, scratch, event.event_id, name, value);
        } else {
            write_value(out, value);
        }
    }
    out.push(b'}');
    Sha256::digest(&out[..]).into()
}

/// SHA-256 of the canonical committed metadata (see
/// [`committed_metadata`]), its members written in their canonical order.
fn metadata_digest(
    event: &RecordedEvent,
    erased: &[&str],
    out: &mut Vec<u8>,
    scratch: &mut Vec<u8>,
) -> Hash {
    let m = &event.metadata;
    out.clear();
    out.extend_from_slice(b"{\"actor\":");
    if erased.contains(&"actor") {
        write_str(out, &m.actor);
    } else {
        let actor = Value::String(m.actor.clone());
        write_field_digest(out, scratch, event.event_id, "actor", &actor);
    }
    out.extend_from_slice(b",\"causation_id\":");
    write_uuid(out, m.causation_id);
    out.extend_from_slice(b",\"command_hash\":");
    write_str(out, &m.command_hash);
    out.extend_from_slice(b",\"command_id\":");
    write_uuid(out, m.command_id);
    out.extend_from_slice(b",\"command_type\":");
    write_str(out, &m.command_type);
    out.extend_from_slice(b",\"correlation_id\":");
    write_uuid(out, m.correlation_id);
    out.extend_from_slice(b",\"event_id\":");
    write_uuid(out, m.event_id);
    out.extend_from_slice(b",\"occurred_at\":");
    match m
        .occurred_at
        .format(&time::format_description::well_known::Rfc3339)
    {
        Ok(text) => write_str(out, &text),
        // Not a time RFC 3339 can spell (a year beyond 9999): serde
        // refuses it too, so no stored event has one.
        Err(_) => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"tenant\":");
    write_str(out, &m.tenant);
    out.extend_from_slice(b",\"traceparent\":");
    match &m.traceparent {
        Some(t) => write_str(out, t),
        None => out.extend_from_slice(b"null"),
    }
    out.push(b'}');
    Sha256::digest(&out[..]).into()
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
    fn the_fast_leaf_is_the_hash_of_the_reference_leaf() {
        use rand::{Rng as _, SeedableRng as _};
        let mut rng = rand::rngs::StdRng::seed_from_u64(16);
        let types = [
            ("TaskCreated", 1),
            ("TaskCompleted", 1),
            ("AgentRegistered", 2),
            ("AgentRegistered", 1),
            ("WorkflowStarted", 1),
            ("TaskAssigned", 1),
            ("Unknown", 7),
        ];
        let keys = [
            "title",
            "input",
            "output",
            "name",
            "metadata",
            "task_id",
            "é",
            "\u{1f600}",
            "\u{fb33}",
            "z",
            "A",
        ];
        let values = [
            json!(null),
            json!(1.5),
            json!(-0.0),
            json!(12345678901234567890u64),
            json!("tab\tquote\"\u{7}é"),
            json!({"b": [1, 2, {"\u{1f600}": true}], "a": 1e21}),
            json!([]),
        ];
        for round in 0..2_000 {
            let mut e = event();
            let (t, v) = types[round % types.len()];
            e.event_type = t.into();
            e.schema_version = v;
            let mut data = serde_json::Map::new();
            for _ in 0..rng.gen_range(0..6) {
                let key = keys[rng.gen_range(0..keys.len())];
                data.insert(key.into(), values[rng.gen_range(0..values.len())].clone());
            }
            e.data = if round % 50 == 0 {
                json!([1, "x"])
            } else {
                Value::Object(data)
            };
            e.metadata.actor = format!("actor-{round}-\u{e9}");
            e.metadata.traceparent = (round % 3 == 0).then(|| format!("00-{round}"));
            e.metadata.occurred_at += time::Duration::nanoseconds(rng.gen_range(0..1_000_000_000));
            e.recorded_at += time::Duration::microseconds(rng.gen_range(0..1_000_000));
            e.stream_version = rng.gen_range(1..1_000_000);
            let erased: &[&str] = match round % 4 {
                0 => &["actor"],
                1 => &["title", "output"],
                _ => &[],
            };
            assert_eq!(
                leaf(&e, erased),
                leaf_hash(&leaf_bytes(&e, erased)),
                "{e:?} {erased:?}"
            );
        }
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
