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

use super::jcs::{canonical, utf8_order_is_utf16_order, write_str, write_value};
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
        write_digits(out, event.position);
        out.extend_from_slice(b"\",\"recorded_at\":\"");
        write_timestamp(out, event.recorded_at);
        out.extend_from_slice(b"\",\"schema\":");
        write_integer(out, i64::from(event.schema_version));
        out.extend_from_slice(b",\"stream\":");
        write_str(out, &event.stream_id);
        out.extend_from_slice(b",\"tenant\":");
        write_str(out, &event.metadata.tenant);
        out.extend_from_slice(b",\"type\":");
        write_str(out, &event.event_type);
        out.extend_from_slice(b",\"v\":");
        write_integer(out, i64::from(LEAF_VERSION));
        out.extend_from_slice(b",\"version\":");
        write_integer(out, event.stream_version);
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

/// An integer as JCS spells it: exact up to ±2^53; beyond, the double it
/// denotes (RFC 8785), as [`write_value`] writes it.
fn write_integer(out: &mut Vec<u8>, n: i64) {
    const EXACT: i64 = 1 << 53;
    if (-EXACT..=EXACT).contains(&n) {
        write_digits(out, n);
    } else {
        write_value(out, &Value::from(n));
    }
}

/// `n` in decimal, exactly.
fn write_digits(out: &mut Vec<u8>, n: i64) {
    if n < 0 {
        out.push(b'-');
    }
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = n.unsigned_abs();
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// [`timestamp`] straight into `out`.
fn write_timestamp(out: &mut Vec<u8>, at: OffsetDateTime) {
    let at = at.to_offset(time::UtcOffset::UTC);
    let year = at.year();
    if !(0..=9999).contains(&year) {
        out.extend_from_slice(timestamp(at).as_bytes());
        return;
    }
    let two = |out: &mut Vec<u8>, n: u32| {
        out.push(b'0' + (n / 10 % 10) as u8);
        out.push(b'0' + (n % 10) as u8);
    };
    let year = year as u32;
    two(out, year / 100);
    two(out, year % 100);
    out.push(b'-');
    two(out, u32::from(u8::from(at.month())));
    out.push(b'-');
    two(out, u32::from(at.day()));
    out.push(b'T');
    two(out, u32::from(at.hour()));
    out.push(b':');
    two(out, u32::from(at.minute()));
    out.push(b':');
    two(out, u32::from(at.second()));
    out.push(b'.');
    let micros = at.microsecond();
    two(out, micros / 10_000);
    two(out, micros / 100 % 100);
    two(out, micros % 100);
    out.push(b'Z');
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
    write_digest_of(out, scratch, event_id, field, |scratch| {
        write_value(scratch, value)
    });
}

/// Writes the field digest of `field` whose canonical value `value`
/// writes, as a JSON string, using `scratch`.
fn write_digest_of(
    out: &mut Vec<u8>,
    scratch: &mut Vec<u8>,
    event_id: Uuid,
    field: &str,
    value: impl FnOnce(&mut Vec<u8>),
) {
    scratch.clear();
    scratch.extend_from_slice(b"{\"event\":");
    write_uuid(scratch, event_id);
    scratch.extend_from_slice(b",\"field\":");
    write_str(scratch, field);
    scratch.extend_from_slice(b",\"value\":");
    value(scratch);
    scratch.push(b'}');
    let digest: Hash = Sha256::digest(&scratch[..]).into();
    let mut text = [0u8; 64];
    let _ = hex::encode_to_slice(digest, &mut text);
    out.push(b'"');
    out.extend_from_slice(DIGEST_PREFIX.as_bytes());
    out.extend_from_slice(&text);
    out.push(b'"');
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
    let mut member = |out: &mut Vec<u8>, i: usize, name: &str, value: &Value| {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, name);
        out.push(b':');
        if personal.contains(&name) && !erased.contains(&name) {
            write_field_digest(out, scratch, event.event_id, name, value);
        } else {
            write_value(out, value);
        }
    };
    out.push(b'{');
    // The map's order is RFC 8785's unless a key holds a character beyond
    // U+DFFF (see `jcs::utf8_order_is_utf16_order`).
    if object.keys().all(|k| utf8_order_is_utf16_order(k)) {
        for (i, (name, value)) in object.iter().enumerate() {
            member(out, i, name, value);
        }
    } else {
        let mut members: Vec<(&String, &Value)> = object.iter().collect();
        members.sort_by(|(a, _), (b, _)| a.encode_utf16().cmp(b.encode_utf16()));
        for (i, (name, value)) in members.into_iter().enumerate() {
            member(out, i, name, value);
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
        write_digest_of(out, scratch, event.event_id, "actor", |scratch| {
            write_str(scratch, &m.actor)
        });
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
    out.extend_from_slice(b",\"occurred_at\":\"");
    // RFC 3339 as serde writes it (digits, '-', ':', 'T', '.', 'Z', '+':
    // nothing to escape), straight into the buffer.
    let mark = out.len() - 1;
    if m.occurred_at
        .format_into(out, &time::format_description::well_known::Rfc3339)
        .is_ok()
    {
        out.push(b'"');
    } else {
        // Not a time RFC 3339 can spell (a year beyond 9999): serde
        // refuses it too, so no stored event has one.
        out.truncate(mark);
        out.extend_from_slice(b"null");
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
            e.position = match round % 5 {
                0 => rng.gen_range(1..i64::MAX),
                1 => (1 << 53) + rng.gen_range(-3..3),
                _ => rng.gen_range(1..1 << 40),
            };
            e.recorded_at += time::Duration::days(rng.gen_range(-40_000..40_000));
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
