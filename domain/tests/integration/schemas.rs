//! The JSON Schemas in `event-schemas/` against the events the domain writes.
//!
//! - every event the domain can produce (arbitrary domain-valid data) validates
//!   against `event-schemas/<Type>.v<current>.json`;
//! - the schema files match `EVENT_TYPES` exactly: one per readable
//!   `(type, version)`, nothing missing, nothing stray;
//! - legacy `AgentRegistered` v1 payloads validate against v1, decode, and the
//!   upcast event validates against v2;
//! - `from_stored(type, version, to_data())` gives back the original event;
//! - the schemas are strict: they reject missing and extra fields, malformed
//!   uuids, out-of-range numbers, and accept a string exactly when
//!   `domain/src/validate.rs` does.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::OnceLock;

use jsonschema::Validator;
use neurectomy_domain::event::{current_version, EVENT_TYPES};
use neurectomy_domain::validate;
use neurectomy_domain::{
    AgentEvent, AgentId, AgentKind, DomainEvent, ErasedState, ErasureEvent, ErasureScope,
    TaskEvent, TaskId, WorkflowEvent, WorkflowId,
};
use proptest::prelude::*;
use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::support::samples;

/// `event-schemas/` of the checkout being tested. Resolved at run time
/// (cargo sets `CARGO_MANIFEST_DIR` for test processes): a path baked in at
/// compile time points into whichever checkout built the binary, which with a
/// build cache shared between checkouts may be another one, or a deleted one.
fn schema_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
        .join("../event-schemas")
}

// ---------------------------------------------------------------------------
// Schema loading and validation
// ---------------------------------------------------------------------------

fn schema_path(event_type: &str, version: i32) -> PathBuf {
    schema_dir().join(format!("{event_type}.v{version}.json"))
}

fn load_schema(event_type: &str, version: i32) -> Value {
    let path = schema_path(event_type, version);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{event_type} v{version}: cannot read schema {}: {e}",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "{event_type} v{version}: {} is not JSON: {e}",
            path.display()
        )
    })
}

fn compile(event_type: &str, version: i32, schema: &Value) -> Validator {
    jsonschema::draft202012::options()
        // `format` is an annotation by default in draft 2020-12; make
        // `"format": "uuid"` an assertion.
        .should_validate_formats(true)
        .should_ignore_unknown_formats(false)
        .build(schema)
        .unwrap_or_else(|e| panic!("{event_type} v{version}: schema does not compile: {e}"))
}

/// Every readable `(type, version)`: 1 to the current version of each type.
fn known_versions() -> BTreeSet<(String, i32)> {
    EVENT_TYPES
        .iter()
        .flat_map(|(t, _, current)| (1..=*current).map(move |v| ((*t).to_owned(), v)))
        .collect()
}

/// Compiled validators of every known `(type, version)`, built once.
fn validators() -> &'static HashMap<(String, i32), Validator> {
    static VALIDATORS: OnceLock<HashMap<(String, i32), Validator>> = OnceLock::new();
    VALIDATORS.get_or_init(|| {
        known_versions()
            .into_iter()
            .map(|(t, v)| {
                let validator = compile(&t, v, &load_schema(&t, v));
                ((t, v), validator)
            })
            .collect()
    })
}

fn validator(event_type: &str, version: i32) -> &'static Validator {
    validators()
        .get(&(event_type.to_owned(), version))
        .unwrap_or_else(|| panic!("{event_type} v{version}: no schema (unknown type or version)"))
}

/// The validation errors of `data`, one line each (`path: message`).
fn schema_errors(event_type: &str, version: i32, data: &Value) -> Vec<String> {
    validator(event_type, version)
        .iter_errors(data)
        .map(|e| format!("at `{}`: {e}", e.instance_path()))
        .collect()
}

fn excerpt(value: &Value) -> String {
    let text = value.to_string();
    if text.chars().count() > 1_500 {
        format!(
            "{}… ({} bytes)",
            text.chars().take(1_500).collect::<String>(),
            text.len()
        )
    } else {
        text
    }
}

/// Fails the case, naming the event type, when `data` does not validate.
fn check_valid(event_type: &str, version: i32, data: &Value) -> Result<(), TestCaseError> {
    let errors = schema_errors(event_type, version, data);
    prop_assert!(
        errors.is_empty(),
        "{event_type} v{version} payload does not match event-schemas/{event_type}.v{version}.json:\n  {}\npayload: {}",
        errors.join("\n  "),
        excerpt(data)
    );
    Ok(())
}

/// Fails the case, naming the event type, when `data` validates.
fn check_invalid(
    event_type: &str,
    version: i32,
    data: &Value,
    why: &str,
) -> Result<(), TestCaseError> {
    prop_assert!(
        !validator(event_type, version).is_valid(data),
        "{event_type} v{version}: schema accepts a payload with {why}: {}",
        excerpt(data)
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Strategies: arbitrary but domain-valid event data
// ---------------------------------------------------------------------------

fn arb_uuid() -> impl Strategy<Value = Uuid> {
    any::<u128>().prop_map(Uuid::from_u128)
}
fn arb_agent_id() -> impl Strategy<Value = AgentId> {
    arb_uuid().prop_map(AgentId::from_uuid)
}
fn arb_task_id() -> impl Strategy<Value = TaskId> {
    arb_uuid().prop_map(TaskId::from_uuid)
}
fn arb_workflow_id() -> impl Strategy<Value = WorkflowId> {
    arb_uuid().prop_map(WorkflowId::from_uuid)
}

/// Characters that sit on the edges of the validation rules (whitespace as
/// `str::trim` sees it, control characters, look-alikes), mixed with anything.
fn arb_char() -> impl Strategy<Value = char> {
    prop_oneof![
        4 => any::<char>(),
        2 => prop::sample::select(vec![
            ' ', '\t', '\n', '\r', '\u{0}', '\u{7}', '\u{b}', '\u{1b}', '\u{7f}', '\u{85}',
            '\u{9f}', '\u{a0}', '\u{1680}', '\u{2000}', '\u{200a}', '\u{200b}', '\u{2028}',
            '\u{2029}', '\u{202f}', '\u{205f}', '\u{3000}', '\u{feff}', '\u{ad}',
        ]),
        3 => prop::sample::select(vec!['a', 'Z', '7', 'é', 'ß', '中', '😀', '-', '.', '"', '\\']),
    ]
}

/// Arbitrary strings up to `max + 5` characters, often near the bound.
fn arb_raw_string(max: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::collection::vec(arb_char(), 0..24),
        1 => prop::collection::vec(arb_char(), max.saturating_sub(5)..=max + 5),
    ]
    .prop_map(|chars| chars.into_iter().collect())
}

fn forbidden_control(c: char) -> bool {
    c.is_control() && c != '\n' && c != '\t'
}

/// Free text accepted by `validate::text`.
fn arb_text() -> impl Strategy<Value = String> {
    arb_raw_string(validate::MAX_TEXT_CHARS).prop_map(|s| {
        s.chars()
            .filter(|c| !forbidden_control(*c))
            .take(validate::MAX_TEXT_CHARS)
            .collect::<String>()
    })
}

/// A name accepted by `validate::name`.
fn arb_name() -> impl Strategy<Value = String> {
    arb_raw_string(validate::MAX_NAME_CHARS).prop_map(|s| {
        let cleaned: String = s.chars().filter(|c| !forbidden_control(*c)).collect();
        let trimmed: String = cleaned
            .trim()
            .chars()
            .take(validate::MAX_NAME_CHARS)
            .collect();
        let trimmed = trimmed.trim_end().to_owned();
        if trimmed.is_empty() {
            "x".to_owned()
        } else {
            trimmed
        }
    })
}

/// Text with at least one non-whitespace character (`TaskFailed.error`).
fn arb_nonblank_text() -> impl Strategy<Value = String> {
    arb_text().prop_map(|s| {
        if s.trim().is_empty() {
            format!(
                "e{}",
                s.chars()
                    .take(validate::MAX_TEXT_CHARS - 1)
                    .collect::<String>()
            )
        } else {
            s
        }
    })
}

fn arb_capability() -> impl Strategy<Value = String> {
    "[a-z0-9][a-z0-9._:-]{0,63}"
}

/// Sorted, deduplicated capabilities, as events carry them.
fn arb_capabilities() -> impl Strategy<Value = Vec<String>> {
    prop_oneof![
        6 => prop::collection::btree_set(arb_capability(), 0..6),
        1 => prop::collection::btree_set(arb_capability(), validate::MAX_CAPABILITIES),
    ]
    .prop_map(|set| set.into_iter().collect())
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(any::<String>(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn arb_kind() -> impl Strategy<Value = AgentKind> {
    prop_oneof![
        Just(AgentKind::Llm),
        Just(AgentKind::Tool),
        Just(AgentKind::Human)
    ]
}

/// Dependencies: distinct, in the order given, up to the limit.
fn arb_depends_on() -> impl Strategy<Value = Vec<TaskId>> {
    prop_oneof![
        6 => prop::collection::vec(arb_task_id(), 0..8),
        1 => prop::collection::vec(arb_task_id(), validate::MAX_DEPENDENCIES),
    ]
    .prop_map(|ids| {
        let mut seen = BTreeSet::new();
        ids.into_iter().filter(|id| seen.insert(*id)).collect()
    })
}

fn arb_agent_event() -> impl Strategy<Value = AgentEvent> {
    prop_oneof![
        (
            arb_agent_id(),
            arb_name(),
            arb_kind(),
            proptest::option::of(arb_name()),
            arb_capabilities(),
            proptest::option::of(arb_agent_id()),
        )
            .prop_map(
                |(agent_id, name, kind, model, capabilities, parent_agent_id)| {
                    AgentEvent::AgentRegistered {
                        agent_id,
                        name,
                        kind,
                        model,
                        capabilities,
                        parent_agent_id,
                    }
                }
            ),
        (arb_agent_id(), proptest::option::of(arb_text()))
            .prop_map(|(agent_id, reason)| AgentEvent::AgentPaused { agent_id, reason }),
        arb_agent_id().prop_map(|agent_id| AgentEvent::AgentResumed { agent_id }),
        (arb_agent_id(), arb_text())
            .prop_map(|(agent_id, reason)| AgentEvent::AgentFailed { agent_id, reason }),
        (arb_agent_id(), proptest::option::of(arb_text()))
            .prop_map(|(agent_id, reason)| AgentEvent::AgentRetired { agent_id, reason }),
    ]
}

fn arb_task_event() -> impl Strategy<Value = TaskEvent> {
    prop_oneof![
        (
            arb_task_id(),
            arb_workflow_id(),
            arb_name(),
            arb_json(),
            arb_capabilities(),
            arb_depends_on(),
            0..=100u8,
            1..=validate::MAX_ATTEMPTS,
        )
            .prop_map(
                |(
                    task_id,
                    workflow_id,
                    title,
                    input,
                    required_capabilities,
                    depends_on,
                    priority,
                    max_attempts,
                )| TaskEvent::TaskCreated {
                    task_id,
                    workflow_id,
                    title,
                    input,
                    required_capabilities,
                    depends_on,
                    priority,
                    max_attempts,
                }
            ),
        (arb_task_id(), arb_agent_id())
            .prop_map(|(task_id, agent_id)| TaskEvent::TaskAssigned { task_id, agent_id }),
        (arb_task_id(), arb_agent_id())
            .prop_map(|(task_id, agent_id)| TaskEvent::TaskStarted { task_id, agent_id }),
        (arb_task_id(), 0..=100u8, proptest::option::of(arb_text())).prop_map(
            |(task_id, percent, note)| TaskEvent::TaskProgressReported {
                task_id,
                percent,
                note
            }
        ),
        (arb_task_id(), arb_json())
            .prop_map(|(task_id, output)| TaskEvent::TaskCompleted { task_id, output }),
        (arb_task_id(), arb_nonblank_text(), any::<bool>()).prop_map(
            |(task_id, error, retryable)| TaskEvent::TaskFailed {
                task_id,
                error,
                retryable
            }
        ),
        (arb_task_id(), 2..=validate::MAX_ATTEMPTS)
            .prop_map(|(task_id, attempt)| TaskEvent::TaskRetried { task_id, attempt }),
        (arb_task_id(), arb_text())
            .prop_map(|(task_id, reason)| TaskEvent::TaskCancelled { task_id, reason }),
        (arb_task_id(), arb_agent_id(), arb_agent_id()).prop_map(
            |(task_id, from_agent_id, to_agent_id)| TaskEvent::TaskDelegated {
                task_id,
                from_agent_id,
                to_agent_id
            }
        ),
    ]
}

fn arb_workflow_event() -> impl Strategy<Value = WorkflowEvent> {
    prop_oneof![
        (arb_workflow_id(), arb_name(), arb_json()).prop_map(|(workflow_id, name, metadata)| {
            WorkflowEvent::WorkflowStarted {
                workflow_id,
                name,
                metadata,
            }
        }),
        arb_workflow_id().prop_map(|workflow_id| WorkflowEvent::WorkflowCompleted { workflow_id }),
        (arb_workflow_id(), arb_text()).prop_map(|(workflow_id, reason)| {
            WorkflowEvent::WorkflowFailed {
                workflow_id,
                reason,
            }
        }),
        (arb_workflow_id(), arb_text()).prop_map(|(workflow_id, reason)| {
            WorkflowEvent::WorkflowCancelled {
                workflow_id,
                reason,
            }
        }),
    ]
}

/// Any event; agent, task and workflow variants weighted by how many there are.
fn arb_event() -> impl Strategy<Value = DomainEvent> {
    prop_oneof![
        5 => arb_agent_event().prop_map(DomainEvent::Agent),
        9 => arb_task_event().prop_map(DomainEvent::Task),
        4 => arb_workflow_event().prop_map(DomainEvent::Workflow),
        1 => arb_erasure_event().prop_map(DomainEvent::Erasure),
    ]
}

fn arb_erasure_event() -> impl Strategy<Value = ErasureEvent> {
    let digest = "[0-9a-f]{64}";
    let scope = prop_oneof![
        arb_task_id().prop_map(|id| ErasureScope::Stream(id.stream_id().to_string())),
        arb_uuid().prop_map(ErasureScope::Event),
        digest.prop_map(ErasureScope::Actor),
    ];
    let change = (arb_agent_id(), arb_name()).prop_map(|(id, name)| ErasedState {
        stream_id: id.stream_id().to_string(),
        fields: [("name".to_owned(), json!(name))].into_iter().collect(),
    });
    (
        arb_uuid(),
        scope,
        0..1_000u64,
        digest,
        prop::collection::vec(1..i64::MAX, 0..4),
        prop::collection::vec(change, 0..3),
    )
        .prop_map(
            |(erasure_id, scope, events, tombstone_digest, mut positions, changes)| {
                positions.sort_unstable();
                ErasureEvent::PersonalDataErased {
                    erasure_id,
                    scope,
                    events,
                    tombstones: events,
                    tombstone_digest,
                    positions,
                    changes,
                }
            },
        )
}

/// A legacy `AgentRegistered` v1 payload: `agent_id`, `name`, `model`
/// (mandatory string), `capabilities`.
fn arb_agent_registered_v1() -> impl Strategy<Value = Value> {
    (arb_uuid(), arb_name(), arb_name(), arb_capabilities()).prop_map(
        |(agent_id, name, model, capabilities)| {
            json!({
                "agent_id": agent_id,
                "name": name,
                "model": model,
                "capabilities": capabilities,
            })
        },
    )
}

fn config() -> ProptestConfig {
    ProptestConfig::with_cases(256)
}

// ---------------------------------------------------------------------------
// (a) every event validates against its current schema; (d) round trip
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    #[test]
    fn every_event_matches_its_current_schema(event in arb_event()) {
        let event_type = event.event_type();
        let version = event.schema_version();
        prop_assert_eq!(Some(version), current_version(event_type), "{}", event_type);
        check_valid(event_type, version, &event.to_data())?;
    }

    #[test]
    fn stored_events_decode_to_the_original(event in arb_event()) {
        let event_type = event.event_type();
        let version = event.schema_version();
        let decoded = DomainEvent::from_stored(event_type, version, event.to_data());
        match decoded {
            Ok(decoded) => prop_assert_eq!(&decoded, &event, "{} v{} round trip", event_type, version),
            Err(e) => prop_assert!(false, "{event_type} v{version} does not decode its own payload: {e}\npayload: {}", excerpt(&event.to_data())),
        }
    }

    // -----------------------------------------------------------------------
    // (c) legacy AgentRegistered v1 → v2
    // -----------------------------------------------------------------------

    #[test]
    fn agent_registered_v1_validates_and_upcasts_to_a_valid_v2(v1 in arb_agent_registered_v1()) {
        check_valid("AgentRegistered", 1, &v1)?;
        let event = match DomainEvent::from_stored("AgentRegistered", 1, v1.clone()) {
            Ok(event) => event,
            Err(e) => return Err(TestCaseError::fail(format!(
                "AgentRegistered v1 payload does not decode: {e}\npayload: {}", excerpt(&v1)
            ))),
        };
        prop_assert_eq!(event.event_type(), "AgentRegistered");
        prop_assert_eq!(event.schema_version(), 2);
        let data = event.to_data();
        check_valid("AgentRegistered", 2, &data)?;
        // Nothing of v1 is lost; the new fields get the documented defaults.
        for field in ["agent_id", "name", "model", "capabilities"] {
            prop_assert_eq!(&data[field], &v1[field], "AgentRegistered upcast changed `{}`", field);
        }
        prop_assert_eq!(&data["kind"], &json!("llm"));
        prop_assert_eq!(&data["parent_agent_id"], &Value::Null);
        // A v1 payload is not a v2 payload and vice versa.
        check_invalid("AgentRegistered", 2, &v1, "the v1 shape")?;
        check_invalid("AgentRegistered", 1, &data, "the v2 shape")?;
    }

    // -----------------------------------------------------------------------
    // The schemas are strict
    // -----------------------------------------------------------------------

    #[test]
    fn schemas_reject_missing_extra_and_malformed_fields(event in arb_event(), extra in "[a-z_]{1,12}") {
        let event_type = event.event_type();
        let version = event.schema_version();
        let Value::Object(fields) = event.to_data() else {
            return Err(TestCaseError::fail(format!("{event_type}: payload is not an object")));
        };
        for (name, value) in &fields {
            let mut missing = fields.clone();
            missing.remove(name);
            check_invalid(event_type, version, &Value::Object(missing), &format!("`{name}` missing"))?;

            if is_uuid_field(name) && !value.is_null() {
                let mut bad = fields.clone();
                bad.insert(name.clone(), json!("not-a-uuid"));
                check_invalid(event_type, version, &Value::Object(bad), &format!("a malformed uuid in `{name}`"))?;
            }
        }
        if !fields.contains_key(&extra) {
            let mut more = fields.clone();
            more.insert(extra.clone(), json!(1));
            check_invalid(event_type, version, &Value::Object(more), &format!("an unknown field `{extra}`"))?;
        }
        check_invalid(event_type, version, &json!([]), "an array instead of an object")?;
    }

    /// The string patterns accept exactly what `validate.rs` accepts.
    #[test]
    fn string_rules_match_the_domain(
        name in arb_raw_string(validate::MAX_NAME_CHARS),
        text in arb_raw_string(validate::MAX_TEXT_CHARS),
        capability in prop_oneof![
            arb_capability(),
            prop::collection::vec(
                prop::sample::select(vec!['a', 'z', '0', '9', '.', '_', ':', '-', 'A', ' ', 'é', '\n']),
                0..70,
            ).prop_map(|c| c.into_iter().collect::<String>()),
        ],
    ) {
        let id = Uuid::from_u128(1);

        let started = json!({"workflow_id": id, "name": name, "metadata": null});
        prop_assert_eq!(
            validator("WorkflowStarted", 1).is_valid(&started),
            validate::name("name", &name).is_ok(),
            "WorkflowStarted name {:?}: schema and validate::name disagree", name
        );

        let failed = json!({"workflow_id": id, "reason": text});
        prop_assert_eq!(
            validator("WorkflowFailed", 1).is_valid(&failed),
            validate::text("reason", &text).is_ok(),
            "WorkflowFailed reason {:?}: schema and validate::text disagree", text
        );

        let task_failed = json!({"task_id": id, "error": text, "retryable": true});
        prop_assert_eq!(
            validator("TaskFailed", 1).is_valid(&task_failed),
            validate::text("error", &text).is_ok() && !text.trim().is_empty(),
            "TaskFailed error {:?}: schema and the FailTask rule disagree", text
        );

        let registered = json!({
            "agent_id": id, "name": "a", "kind": "tool", "model": null,
            "capabilities": [capability], "parent_agent_id": null,
        });
        prop_assert_eq!(
            validator("AgentRegistered", 2).is_valid(&registered),
            validate::capabilities("capabilities", std::slice::from_ref(&capability)).is_ok(),
            "AgentRegistered capability {:?}: schema and validate::capabilities disagree", capability
        );
    }
}

fn is_uuid_field(name: &str) -> bool {
    name.ends_with("_id")
}

// ---------------------------------------------------------------------------
// (b) the schema folder matches EVENT_TYPES
// ---------------------------------------------------------------------------

/// Parses `<Type>.v<N>.json`.
fn parse_schema_file_name(file_name: &str) -> Option<(String, i32)> {
    let stem = file_name.strip_suffix(".json")?;
    let (event_type, version) = stem.rsplit_once(".v")?;
    let version: i32 = version.parse().ok()?;
    let well_formed = !event_type.is_empty()
        && event_type.chars().all(|c| c.is_ascii_alphanumeric())
        && version >= 1
        && format!("{event_type}.v{version}.json") == file_name;
    well_formed.then(|| (event_type.to_owned(), version))
}

#[test]
fn schema_files_match_event_types_exactly() {
    let mut found = BTreeSet::new();
    let mut stray = Vec::new();
    for entry in std::fs::read_dir(schema_dir()).expect("event-schemas/ is readable") {
        let entry = entry.unwrap();
        let file_name = entry.file_name().to_string_lossy().into_owned();
        if file_name == "README.md" {
            continue;
        }
        match parse_schema_file_name(&file_name) {
            Some(pair) => {
                found.insert(pair);
            }
            None => stray.push(file_name),
        }
    }
    assert!(
        stray.is_empty(),
        "event-schemas/ holds files that are not named <Type>.v<N>.json: {stray:?}"
    );

    let known = known_versions();
    for (event_type, _, current) in EVENT_TYPES {
        assert!(
            found.contains(&((*event_type).to_owned(), *current)),
            "{event_type} is at schema version {current} in EVENT_TYPES but event-schemas/{event_type}.v{current}.json is missing"
        );
    }
    let missing: Vec<_> = known.difference(&found).collect();
    assert!(
        missing.is_empty(),
        "readable (type, version) pairs without a schema (keep a schema for every version that can still be upcast): {missing:?}"
    );
    let unknown: Vec<_> = found.difference(&known).collect();
    assert!(
        unknown.is_empty(),
        "schemas for (type, version) pairs that EVENT_TYPES does not know (stray, or EVENT_TYPES not bumped): {unknown:?}"
    );
    assert_eq!(
        validators().len(),
        known.len(),
        "every schema file compiles"
    );
}

#[test]
fn schema_file_names_are_parsed_strictly() {
    assert_eq!(
        parse_schema_file_name("TaskAssigned.v1.json"),
        Some(("TaskAssigned".to_owned(), 1))
    );
    assert_eq!(
        parse_schema_file_name("AgentRegistered.v12.json"),
        Some(("AgentRegistered".to_owned(), 12))
    );
    for bad in [
        "TaskAssigned.json",
        "TaskAssigned.v0.json",
        "TaskAssigned.v01.json",
        "TaskAssigned.v1.json.bak",
        "TaskAssigned.v1.schema.json",
        "task-assigned.v1.json",
        ".v1.json",
    ] {
        assert_eq!(parse_schema_file_name(bad), None, "{bad}");
    }
}

/// Structure every schema must have: draft 2020-12, `$id` from the file
/// name, a title and a description, a closed object whose properties are all
/// required.
#[test]
fn schemas_are_well_formed() {
    for (event_type, version) in known_versions() {
        let schema = load_schema(&event_type, version);
        let file = format!("{event_type}.v{version}.json");
        if let Err(e) = jsonschema::draft202012::meta::validate(&schema) {
            panic!("{event_type} v{version}: {file} is not a valid draft 2020-12 schema: {e}");
        }
        assert_eq!(
            schema["$schema"],
            json!("https://json-schema.org/draft/2020-12/schema"),
            "{event_type} v{version}: $schema"
        );
        assert_eq!(
            schema["$id"],
            json!(format!("https://neurectomy.dev/event-schemas/{file}")),
            "{event_type} v{version}: $id"
        );
        for key in ["title", "description"] {
            assert!(
                schema[key].as_str().is_some_and(|s| !s.trim().is_empty()),
                "{event_type} v{version}: missing `{key}`"
            );
        }
        assert_eq!(schema["type"], json!("object"), "{event_type} v{version}");
        assert_eq!(
            schema["additionalProperties"],
            json!(false),
            "{event_type} v{version}: additionalProperties must be false"
        );
        let properties: BTreeSet<&str> = schema["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("{event_type} v{version}: no `properties`"))
            .keys()
            .map(String::as_str)
            .collect();
        let required: BTreeSet<&str> = schema["required"]
            .as_array()
            .unwrap_or_else(|| panic!("{event_type} v{version}: no `required`"))
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(
            properties, required,
            "{event_type} v{version}: every property must be required (optional values are nullable)"
        );
        for (name, property) in schema["properties"].as_object().unwrap() {
            if is_uuid_field(name) {
                assert_eq!(
                    property["format"],
                    json!("uuid"),
                    "{event_type} v{version}: `{name}` must be a uuid"
                );
            }
        }
    }
}

/// The strategies produce every event type (so a new event with a schema but
/// no strategy fails here rather than going untested).
#[test]
fn strategies_cover_every_event_type() {
    let expected: BTreeSet<&str> = EVENT_TYPES.iter().map(|(t, _, _)| *t).collect();
    let mut seen = BTreeMap::<&'static str, usize>::new();
    for event in samples(arb_event()).take(2_000) {
        *seen.entry(event.event_type()).or_default() += 1;
        if seen.len() == expected.len() {
            break;
        }
    }
    let got: BTreeSet<&str> = seen.keys().copied().collect();
    assert_eq!(got, expected, "event types produced by arb_event: {seen:?}");
}

/// Numeric bounds of `validate.rs` and the task aggregate.
#[test]
fn numeric_bounds_are_enforced() {
    let id = Uuid::from_u128(1);
    let created = |priority: Value, max_attempts: Value| {
        json!({
            "task_id": id, "workflow_id": id, "title": "t", "input": null,
            "required_capabilities": [], "depends_on": [],
            "priority": priority, "max_attempts": max_attempts,
        })
    };
    let ok = |t: &str, data: &Value| {
        let version = current_version(t).unwrap();
        let errors = schema_errors(t, version, data);
        assert!(errors.is_empty(), "{t} v{version}: {errors:?} for {data}");
    };
    let bad = |t: &str, data: &Value| {
        let version = current_version(t).unwrap();
        assert!(
            !validator(t, version).is_valid(data),
            "{t} v{version}: schema accepts {data}"
        );
    };
    ok("TaskCreated", &created(json!(0), json!(1)));
    ok("TaskCreated", &created(json!(100), json!(100)));
    bad("TaskCreated", &created(json!(-1), json!(1)));
    bad("TaskCreated", &created(json!(101), json!(1)));
    bad("TaskCreated", &created(json!(50.5), json!(1)));
    bad("TaskCreated", &created(json!(50), json!(0)));
    bad("TaskCreated", &created(json!(50), json!(101)));
    bad("TaskCreated", &created(json!("50"), json!(3)));

    let progress = |p: Value| json!({"task_id": id, "percent": p, "note": null});
    ok("TaskProgressReported", &progress(json!(0)));
    ok("TaskProgressReported", &progress(json!(100)));
    bad("TaskProgressReported", &progress(json!(101)));
    bad("TaskProgressReported", &progress(json!(-1)));

    let retried = |a: Value| json!({"task_id": id, "attempt": a});
    ok("TaskRetried", &retried(json!(2)));
    ok("TaskRetried", &retried(json!(100)));
    bad("TaskRetried", &retried(json!(1)));
    bad("TaskRetried", &retried(json!(101)));

    let many_caps: Vec<String> = (0..=validate::MAX_CAPABILITIES)
        .map(|i| format!("c{i}"))
        .collect();
    let registered = |caps: &[String], kind: &str| {
        json!({
            "agent_id": id, "name": "a", "kind": kind, "model": null,
            "capabilities": caps, "parent_agent_id": null,
        })
    };
    ok(
        "AgentRegistered",
        &registered(&many_caps[..validate::MAX_CAPABILITIES], "llm"),
    );
    bad("AgentRegistered", &registered(&many_caps, "llm"));
    bad(
        "AgentRegistered",
        &registered(&["a".into(), "a".into()], "llm"),
    );
    bad("AgentRegistered", &registered(&[], "robot"));
    ok("AgentRegistered", &registered(&[], "human"));
    let mut empty_model = registered(&[], "llm");
    empty_model["model"] = json!("");
    bad("AgentRegistered", &empty_model);
}

/// The schemas mark exactly the fields `personal_fields` names.
#[test]
fn schemas_mark_exactly_the_personal_fields() {
    for (event_type, version) in known_versions() {
        let schema = load_schema(&event_type, version);
        let marked: BTreeSet<&str> = schema["properties"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(_, p)| p.get("x-neurectomy-personal") == Some(&Value::Bool(true)))
            .map(|(name, _)| name.as_str())
            .collect();
        let named: BTreeSet<&str> =
            neurectomy_domain::personal::personal_fields(&event_type, version)
                .iter()
                .copied()
                .collect();
        assert_eq!(marked, named, "{event_type} v{version}");
    }
}

proptest! {
    /// An event whose personal fields were erased (each replaced by a
    /// digest string) still decodes: it folds as before, without the data.
    #[test]
    fn an_event_with_its_personal_fields_erased_still_decodes(event in arb_event()) {
        let event_type = event.event_type();
        let version = event.schema_version();
        let mut data = event.to_data();
        for field in neurectomy_domain::personal::personal_fields(event_type, version) {
            data[*field] = json!(format!("sha256:{}", "ab".repeat(32)));
        }
        let decoded = DomainEvent::from_stored(event_type, version, data);
        prop_assert!(decoded.is_ok(), "{event_type}: {decoded:?}");
    }
}
