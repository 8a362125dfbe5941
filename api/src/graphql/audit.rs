//! Audit queries on the event store, the source of truth (not the read
//! models): a stream's history with full metadata, an aggregate's state at
//! a version or a point in time rebuilt by replaying its events, and the
//! tenant's global event log, filtered by type or correlation id.
//!
//! Contracts:
//! - Every query needs the `auditor` role (`FORBIDDEN` otherwise) and reads
//!   only the caller's tenant: the store filters by tenant in SQL, so another
//!   tenant's stream is `NOT_FOUND` and its events never appear in a log.
//! - `eventLog` is gap-safe (the horizon of the store's `read_all`): paging
//!   with `after: next` never skips an event and never repeats one, even
//!   while appends commit out of position order.
//! - `agentAt`, `taskAt` and `workflowAt` fold events with the domain's
//!   `evolve` from version 1 and ignore snapshots: what they show is derived
//!   from the stored events alone.
//! - Malformed input is `VALIDATION` with what to send instead; an
//!   unreachable store is `UNAVAILABLE`; stored history that does not decode
//!   is `INTERNAL` (logged here, once).

pub mod erase;
pub mod proof;
mod replay;
mod types;

use async_graphql::{Context, Json, Object, ID};
use commands::ReadError;
use domain::event::EVENT_TYPES;
use domain::{AgentState, TaskState, WorkflowState};
use uuid::Uuid;

use self::replay::{folded_to_nothing, rebuild, state_json, Rebuilt};
pub use self::types::{
    AgentAt, EventLogPage, Replayed, StreamHistory, TaskAt, WorkflowAt, WorkflowStatus,
};
use super::types::Event;
use super::{boxed, caller, services, DateTime, Position};
use crate::auth::Role;
use crate::error::unavailable;

/// Page size of `streamHistory` and `eventLog` when `first` is not given.
const DEFAULT_PAGE: usize = 50;

/// `VALIDATION`: the input is malformed; `message` says what to send.
fn validation(message: impl std::fmt::Display) -> async_graphql::Error {
    crate::error::validation(message)
}

/// A read failure as a client error: `UNAVAILABLE` when PostgreSQL failed,
/// `INTERNAL` (logged, details hidden) when stored history is unreadable.
fn store_error(e: ReadError) -> async_graphql::Error {
    match e {
        ReadError::Database { .. } => unavailable("the event store", e),
        corrupt => corrupt_history(&corrupt),
    }
}

/// `INTERNAL`: stored history cannot be interpreted. Logged here (the one
/// boundary that sees it), with its cause; the client gets no internals.
fn corrupt_history(e: &dyn std::error::Error) -> async_graphql::Error {
    crate::error::internal(
        "stored history cannot be read; an operator has been told",
        format_args!("audit read: {e} ({:?})", e.source()),
    )
}

/// `first` (default [`DEFAULT_PAGE`]) within `1..=max`.
fn page_size(first: Option<i32>, max: usize) -> async_graphql::Result<usize> {
    match first {
        None => Ok(DEFAULT_PAGE.min(max)),
        Some(n) => match usize::try_from(n) {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(validation(format!(
                "`first` must be between 1 and {max}, not {n}"
            ))),
        },
    }
}

/// Checks event type names against the types this build knows.
fn event_types(types: Option<Vec<String>>) -> async_graphql::Result<Option<Vec<String>>> {
    let Some(types) = types else {
        return Ok(None);
    };
    if types.is_empty() {
        return Err(validation(
            "`types` is empty: name at least one event type, or omit it for every type",
        ));
    }
    for name in &types {
        if !EVENT_TYPES.iter().any(|(known, _, _)| known == name) {
            let known: Vec<&str> = EVENT_TYPES.iter().map(|(t, _, _)| *t).collect();
            return Err(validation(format!(
                "unknown event type {name:?}; known types: {}",
                known.join(", ")
            )));
        }
    }
    Ok(Some(types))
}

/// Audit queries (the `auditor` role).
#[derive(Default)]
pub struct AuditQuery;

#[Object]
impl AuditQuery {
    /// A stream's events with full metadata (actor, command, correlation,
    /// causation, times), versions `fromVersion..=toVersion` (default: from
    /// 1 to the end), at most `first` per page.
    async fn stream_history(
        &self,
        ctx: &Context<'_>,
        stream_id: ID,
        from_version: Option<i64>,
        to_version: Option<i64>,
        first: Option<i32>,
    ) -> async_graphql::Result<StreamHistory> {
        boxed(async move {
            let who = caller(ctx, Role::Auditor)?;
            let services = services(ctx);
            let stream = super::ids::stream("streamId", &stream_id)?;
            let size = page_size(first, services.limits.max_page)?;
            let from = from_version.unwrap_or(1);
            let to = to_version.unwrap_or(i64::MAX);
            for (name, value) in [("fromVersion", from), ("toVersion", to)] {
                if value < 1 {
                    return Err(validation(format!(
                        "`{name}` must be 1 (the first event) or more, not {value}"
                    )));
                }
            }
            if from > to {
                return Err(validation(format!(
                    "`fromVersion` ({from}) is after `toVersion` ({to}); ask for fromVersion <= toVersion"
                )));
            }
            let name = stream.to_string();
            // One more than the page, to tell whether the range goes on.
            let limit = i64::try_from(size).unwrap_or(i64::MAX - 1) + 1;
            let mut events = services
                .store
                .read_stream_of_tenant(&who.tenant, &name, from, to, limit)
                .await
                .map_err(store_error)?;
            // Read after the events, so it is never below the last one returned.
            let current = services
                .store
                .stream_version_of_tenant(&who.tenant, &name)
                .await
                .map_err(store_error)?;
            if current == 0 {
                return Err(crate::error::not_found(format!(
                    "stream {name} does not exist"
                )));
            }
            let has_more = events.len() > size;
            events.truncate(size);
            Ok(StreamHistory {
                kind: stream.kind().to_string(),
                stream_id: ID(name),
                current_version: current,
                events: events.iter().map(Event::from).collect(),
                has_more,
            })
        })
        .await
    }

    /// An agent as it was after `version`, or after the last event recorded
    /// at or before `asOf` (RFC 3339), or now (neither), rebuilt by
    /// replaying its events. `id` is the agent's UUID (or `agent-<uuid>`).
    async fn agent_at(
        &self,
        ctx: &Context<'_>,
        id: ID,
        version: Option<i64>,
        as_of: Option<DateTime>,
    ) -> async_graphql::Result<AgentAt> {
        boxed(async move {
            let Rebuilt { state, replayed } =
                rebuild::<AgentState>(ctx, &id, version, as_of).await?;
            let json = state_json(&state)?;
            let agent = state.get().ok_or_else(|| folded_to_nothing(&replayed))?;
            Ok(AgentAt {
                id: ID(agent.id.to_string()),
                name: agent.name.clone(),
                kind: agent.kind.as_str().to_owned(),
                model: agent.model.clone(),
                capabilities: agent.capabilities.clone(),
                parent_id: agent.parent_agent_id.map(|p| ID(p.to_string())),
                status: agent.status.into(),
                status_reason: agent.status_reason.clone(),
                state: json,
                replayed,
            })
        })
        .await
    }

    /// A task as it was after `version`, or after the last event recorded
    /// at or before `asOf` (RFC 3339), or now (neither), rebuilt by
    /// replaying its events. `id` is the task's UUID (or `task-<uuid>`).
    async fn task_at(
        &self,
        ctx: &Context<'_>,
        id: ID,
        version: Option<i64>,
        as_of: Option<DateTime>,
    ) -> async_graphql::Result<TaskAt> {
        boxed(async move {
            let Rebuilt { state, replayed } =
                rebuild::<TaskState>(ctx, &id, version, as_of).await?;
            let json = state_json(&state)?;
            let task = state.get().ok_or_else(|| folded_to_nothing(&replayed))?;
            Ok(TaskAt {
                id: ID(task.id.to_string()),
                workflow_id: ID(task.workflow_id.to_string()),
                title: task.title.clone(),
                status: task.status.into(),
                assignee_id: task.assignee.map(|a| ID(a.to_string())),
                input: Json(task.input.clone()),
                output: task.output.clone().map(Json),
                required_capabilities: task.required_capabilities.clone(),
                depends_on: task.depends_on.iter().map(|d| ID(d.to_string())).collect(),
                priority: i32::from(task.priority),
                progress: i32::from(task.progress),
                progress_note: task.progress_note.clone(),
                attempt: i64::from(task.attempt),
                max_attempts: i64::from(task.max_attempts),
                last_error: task.last_error.clone(),
                retryable: task.retryable,
                cancel_reason: task.cancel_reason.clone(),
                state: json,
                replayed,
            })
        })
        .await
    }

    /// A workflow as it was after `version`, or after the last event
    /// recorded at or before `asOf` (RFC 3339), or now (neither), rebuilt by
    /// replaying its events. `id` is the workflow's UUID (or
    /// `workflow-<uuid>`).
    async fn workflow_at(
        &self,
        ctx: &Context<'_>,
        id: ID,
        version: Option<i64>,
        as_of: Option<DateTime>,
    ) -> async_graphql::Result<WorkflowAt> {
        boxed(async move {
            let Rebuilt { state, replayed } =
                rebuild::<WorkflowState>(ctx, &id, version, as_of).await?;
            let json = state_json(&state)?;
            let workflow = state.get().ok_or_else(|| folded_to_nothing(&replayed))?;
            Ok(WorkflowAt {
                id: ID(workflow.id.to_string()),
                name: workflow.name.clone(),
                status: workflow.status.into(),
                reason: workflow.reason.clone(),
                metadata: Json(workflow.metadata.clone()),
                state: json,
                replayed,
            })
        })
        .await
    }

    /// Why event `eventId` happened: the event, then the event that caused
    /// the command that produced it (its `causationId`), and so on back to
    /// a command that named no cause, at most `depth` steps (default 20,
    /// at most 100). Each event carries its command's type, actor and time
    /// in its metadata. Across aggregates, the caller's tenant only.
    async fn why(
        &self,
        ctx: &Context<'_>,
        event_id: ID,
        depth: Option<i32>,
    ) -> async_graphql::Result<Vec<Event>> {
        boxed(async move {
            let who = caller(ctx, Role::Auditor)?;
            let depth = depth.unwrap_or(20);
            if !(1..=100).contains(&depth) {
                return Err(validation(format!(
                    "`depth` must be between 1 and 100, not {depth}"
                )));
            }
            let id = Uuid::parse_str(event_id.trim()).map_err(|_| {
                validation(format!(
                    "`eventId` must be an event's UUID (as in event metadata), not {:?}",
                    event_id.as_str()
                ))
            })?;
            let chain = services(ctx)
                .store
                .read_causes_of_tenant(&who.tenant, id, depth)
                .await
                .map_err(store_error)?;
            if chain.is_empty() {
                return Err(crate::error::not_found(format!(
                    "event {id} does not exist"
                )));
            }
            Ok(chain.iter().map(Event::from).collect())
        })
        .await
    }

    /// What event `eventId` caused: the event, then the events whose
    /// commands named it as their cause, their effects, and so on, breadth
    /// first, at most `depth` steps (default 20, at most 100) and `first`
    /// events (default and most: the page limit). The caller's tenant only.
    async fn effects(
        &self,
        ctx: &Context<'_>,
        event_id: ID,
        depth: Option<i32>,
        first: Option<i32>,
    ) -> async_graphql::Result<Vec<Event>> {
        boxed(async move {
            let who = caller(ctx, Role::Auditor)?;
            let services = services(ctx);
            let depth = depth.unwrap_or(20);
            if !(1..=100).contains(&depth) {
                return Err(validation(format!(
                    "`depth` must be between 1 and 100, not {depth}"
                )));
            }
            let size = page_size(first, services.limits.max_page)?;
            let id = Uuid::parse_str(event_id.trim()).map_err(|_| {
                validation(format!(
                    "`eventId` must be an event's UUID (as in event metadata), not {:?}",
                    event_id.as_str()
                ))
            })?;
            let tree = services
                .store
                .read_effects_of_tenant(
                    &who.tenant,
                    id,
                    depth,
                    i64::try_from(size).unwrap_or(i64::MAX),
                )
                .await
                .map_err(store_error)?;
            if tree.is_empty() {
                return Err(crate::error::not_found(format!(
                    "event {id} does not exist"
                )));
            }
            Ok(tree.iter().map(Event::from).collect())
        })
        .await
    }

    /// The public keys seals are checked against (the sealing key's and
    /// those trusted from before a rotation). Empty when the log is not
    /// sealed.
    async fn seal_keys(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<proof::SealKey>> {
        proof::seal_keys(ctx)
    }

    /// The proof that event `eventId` (of the caller's tenant) is in a
    /// signed seal: its leaf, the paths to its tenant's root and to the
    /// block root, and the seal. `UNSEALED` while its block is open.
    async fn audit_proof(
        &self,
        ctx: &Context<'_>,
        event_id: ID,
    ) -> async_graphql::Result<proof::AuditProof> {
        boxed(proof::audit_proof(ctx, event_id)).await
    }

    /// Checks the caller's events against the seals holding positions
    /// `from..=to` (default: all), every seal's signature and chain link
    /// included; at most 200 seals per call (`hasMore`: continue from
    /// `verifiedTo` + 1). The open block is reported as `unsealed`.
    async fn verify_log(
        &self,
        ctx: &Context<'_>,
        from: Option<Position>,
        to: Option<Position>,
    ) -> async_graphql::Result<proof::LogVerification> {
        boxed(proof::verify_log(ctx, from, to)).await
    }

    /// The tenant's events in global order after `after` (default: from the
    /// start), at most `first`, optionally only of `types` (e.g.
    /// `["TaskAssigned"]`) and of one `correlationId` (one intent followed
    /// across agents, tasks and workflows). Gap-safe: continue with
    /// `after: next`; nothing is skipped or repeated.
    // No complexity multiplier: events are plain data read in one statement,
    // and `first` is bounded by the page limit.
    async fn event_log(
        &self,
        ctx: &Context<'_>,
        after: Option<Position>,
        first: Option<i32>,
        types: Option<Vec<String>>,
        correlation_id: Option<ID>,
    ) -> async_graphql::Result<EventLogPage> {
        boxed(async move {
            let who = caller(ctx, Role::Auditor)?;
            let services = services(ctx);
            let size = page_size(first, services.limits.max_page)?;
            let types = event_types(types)?;
            let correlation = correlation_id
                .map(|c| {
                    Uuid::parse_str(c.trim()).map_err(|_| {
                        validation(format!(
                            "`correlationId` must be a UUID (as returned in event metadata), not {:?}",
                            c.as_str()
                        ))
                    })
                })
                .transpose()?;
            let after = after.unwrap_or(Position(0));
            // One more than the page, to tell whether more are readable now.
            let limit = i64::try_from(size).unwrap_or(i64::MAX - 1) + 1;
            let mut events = services
                .store
                .read_log_of_tenant(&who.tenant, after.0, limit, types.as_deref(), correlation)
                .await
                .map_err(store_error)?;
            let has_more = events.len() > size;
            events.truncate(size);
            let next = events.last().map_or(after, |e| Position(e.position));
            Ok(EventLogPage {
                events: events.iter().map(Event::from).collect(),
                next,
                has_more,
            })
        })
        .await
    }
}
