//! Which fields of a stored event hold personal data: names, free text,
//! task inputs and outputs, workflow metadata — never the ids, statuses,
//! kinds, capabilities or numbers that `evolve` folds state from.
//!
//! The audit log commits each of these fields by its own digest (see the
//! README, "Sealed audit log"), so that erasing one (replacing the value
//! by that digest) leaves every seal valid and the event still folds: each
//! is a string or any JSON value, and a digest string is a valid value of
//! either. The event schemas mark the same fields with
//! `"x-neurectomy-personal": true` (checked in `domain/tests`).

/// The top-level fields of `data` that hold personal data in events of
/// `event_type` at `schema_version` (empty for an unknown type).
pub fn personal_fields(event_type: &str, schema_version: i32) -> &'static [&'static str] {
    match (event_type, schema_version) {
        ("AgentRegistered", 1 | 2) => &["name"],
        ("AgentPaused" | "AgentFailed" | "AgentRetired", 1) => &["reason"],
        ("TaskCreated", 1) => &["input", "title"],
        ("TaskProgressReported", 1) => &["note"],
        ("TaskCompleted", 1) => &["output"],
        ("TaskFailed", 1) => &["error"],
        ("TaskCancelled", 1) => &["reason"],
        ("WorkflowStarted", 1) => &["metadata", "name"],
        ("WorkflowFailed" | "WorkflowCancelled", 1) => &["reason"],
        _ => &[],
    }
}

/// The metadata fields that identify a person: `actor`.
pub const PERSONAL_METADATA: &[&str] = &["actor"];
