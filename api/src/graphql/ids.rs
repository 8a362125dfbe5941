//! One rule for ids, in every query, mutation, subscription and audit query:
//!
//! - An agent, task or workflow id argument is an `ID`: the aggregate's UUID
//!   (`0b7e6a4e-1c2d-4f5a-9b8c-3d2e1f0a9b8c`, in any form a UUID may be
//!   written), or its stream id (`agent-0b7e…`), the form mutations return
//!   as `streamId`. A stream id of another kind is refused.
//! - Every `id` the API returns is the UUID, lower-case and hyphenated.
//! - Anything else is `VALIDATION`, naming the argument and what to send.
//! - An id the caller's tenant does not have reads as absent (`null`, or
//!   `NOT_FOUND` where an answer needs it), whether it does not exist or
//!   belongs to another tenant.
//! - `streamHistory(streamId)` takes a stream id (`<kind>-<uuid>`).

use domain::{AgentId, AggregateKind, StreamId, TaskId, WorkflowId};
use uuid::Uuid;

/// The UUID of a `kind` id given as `argument`: a UUID or a stream id of
/// that kind; `VALIDATION` otherwise.
pub fn entity(kind: AggregateKind, argument: &str, value: &str) -> async_graphql::Result<Uuid> {
    let trimmed = value.trim();
    if let Ok(uuid) = Uuid::parse_str(trimmed) {
        return Ok(uuid);
    }
    match StreamId::parse(trimmed) {
        Ok(stream) if stream.kind() == kind => Ok(stream.uuid()),
        Ok(stream) => Err(crate::error::validation(format!(
            "`{argument}` {value:?} is a {} id; it must be a {kind} id (a UUID, or {kind}-<uuid>)",
            stream.kind()
        ))),
        Err(_) => Err(crate::error::validation(format!(
            "`{argument}` must be a {kind} id (a UUID, or {kind}-<uuid>), not {value:?}"
        ))),
    }
}

/// An agent id argument.
pub fn agent(argument: &str, value: &str) -> async_graphql::Result<AgentId> {
    entity(AggregateKind::Agent, argument, value).map(AgentId::from_uuid)
}

/// A task id argument.
pub fn task(argument: &str, value: &str) -> async_graphql::Result<TaskId> {
    entity(AggregateKind::Task, argument, value).map(TaskId::from_uuid)
}

/// A workflow id argument.
pub fn workflow(argument: &str, value: &str) -> async_graphql::Result<WorkflowId> {
    entity(AggregateKind::Workflow, argument, value).map(WorkflowId::from_uuid)
}

/// A stream id argument (`<kind>-<uuid>`).
pub fn stream(argument: &str, value: &str) -> async_graphql::Result<StreamId> {
    StreamId::parse(value.trim()).map_err(|_| {
        crate::error::validation(format!(
                "`{argument}` must be a stream id (agent-<uuid>, task-<uuid> or workflow-<uuid>), not {value:?}"
            ),
        )
    })
}

/// A UUID argument that is not an aggregate id (`commandId`,
/// `correlationId`).
pub fn uuid(argument: &str, value: &str) -> async_graphql::Result<Uuid> {
    Uuid::parse_str(value.trim()).map_err(|_| {
        crate::error::validation(format!("`{argument}` must be a UUID, not {value:?}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(result: async_graphql::Result<Uuid>) -> String {
        match result {
            Ok(uuid) => uuid.to_string(),
            Err(e) => match e.extensions.as_ref().and_then(|x| x.get("code")) {
                Some(async_graphql::Value::String(code)) => format!("{code}: {}", e.message),
                _ => e.message,
            },
        }
    }

    #[test]
    fn an_id_is_its_uuid_or_its_stream_id_and_nothing_else() {
        let uuid = Uuid::from_u128(0x0b7e_6a4e_1c2d_4f5a_9b8c_3d2e_1f0a_9b8c);
        let canonical = uuid.to_string();
        for form in [
            canonical.clone(),
            canonical.to_uppercase(),
            format!(" {canonical} "),
            uuid.simple().to_string(),
            format!("agent-{canonical}"),
        ] {
            assert_eq!(
                code(entity(AggregateKind::Agent, "id", &form)),
                canonical,
                "{form}"
            );
        }
        for bad in [
            "not-a-uuid".to_owned(),
            String::new(),
            format!("task-{canonical}"),
            format!("agent-{canonical}x"),
            format!("agent:{canonical}"),
        ] {
            let answer = code(entity(AggregateKind::Agent, "id", &bad));
            assert!(answer.starts_with("VALIDATION: `id`"), "{bad}: {answer}");
        }
    }
}
