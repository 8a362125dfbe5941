//! `erasePersonalData` (role `eraser`, the caller's tenant only): replaces
//! personal values by their digests while every seal stays valid (README,
//! "Erasure").

use async_graphql::{Context, SimpleObject, ID};
use commands::erasure::{erase, EraseError, Request, Scope};
use uuid::Uuid;

use crate::auth::Role;
use crate::graphql::{caller, services, Position};

/// What an erasure did.
#[derive(Debug, Clone, SimpleObject)]
pub struct ErasureResult {
    /// The `PersonalDataErased` event (null: nothing in scope held a
    /// personal value any more; nothing was written).
    pub event_id: Option<ID>,
    /// Its stream, `erasure-<id>`.
    pub stream_id: Option<ID>,
    /// Its position: read models show the erasure once they reach it
    /// (`atLeastPosition`).
    pub position: Option<Position>,
    /// Events that lost at least one value.
    pub events: i64,
    /// Values replaced by their digests.
    pub values: i64,
    /// Agents, tasks and workflows whose shown values changed.
    pub aggregates: i64,
    /// Whether this answers an earlier request with the same `commandId`.
    pub replayed: bool,
}

/// What to erase, as the mutation's arguments give it.
pub struct Arguments {
    pub stream_id: Option<ID>,
    pub event_id: Option<ID>,
    pub actor: Option<String>,
    pub fields: Option<Vec<String>>,
    pub command_id: Option<ID>,
    pub correlation_id: Option<ID>,
    pub causation_id: Option<ID>,
}

fn uuid(name: &str, id: &ID) -> async_graphql::Result<Uuid> {
    Uuid::parse_str(id.trim()).map_err(|_| {
        crate::error::validation(format!("`{name}` must be a UUID, not {:?}", id.as_str()))
    })
}

/// `erasePersonalData(...)`.
pub async fn erase_personal_data(
    ctx: &Context<'_>,
    arguments: Arguments,
) -> async_graphql::Result<ErasureResult> {
    let who = caller(ctx, Role::Eraser)?;
    let Arguments {
        stream_id,
        event_id,
        actor,
        fields,
        command_id,
        correlation_id,
        causation_id,
    } = arguments;
    let scope = match (stream_id, event_id, actor) {
        (Some(stream), None, None) => Scope::Stream(stream.trim().to_owned()),
        (None, Some(event), None) => Scope::Event {
            event_id: uuid("eventId", &event)?,
            fields: fields.clone().unwrap_or_default(),
        },
        (None, None, Some(actor)) => Scope::Actor(actor),
        _ => {
            return Err(crate::error::validation(
                "name exactly one of `streamId` (every personal field of an agent's, task's or workflow's events), `eventId` (one event's, or its `fields`) and `actor` (the actor of every event by them)",
            ))
        }
    };
    if fields.is_some() && !matches!(scope, Scope::Event { .. }) {
        return Err(crate::error::validation(
            "`fields` goes with `eventId` only",
        ));
    }
    let services = services(ctx);
    let causation_id = causation_id.map(|c| uuid("causationId", &c)).transpose()?;
    if let Some(cause) = causation_id {
        let known = services
            .store
            .has_event_of_tenant(&who.tenant, cause)
            .await
            .map_err(|e| crate::error::unavailable("the event store", e))?;
        if !known {
            return Err(crate::error::validation(format!(
                "causationId {cause} is not an event of this tenant; name the event that caused the erasure, or leave it out"
            )));
        }
    }
    let request = Request {
        tenant: who.tenant.clone(),
        scope,
        actor: who.subject.clone(),
        command_id: match command_id {
            Some(id) => uuid("commandId", &id)?,
            None => Uuid::new_v4(),
        },
        causation_id,
        correlation_id: correlation_id
            .map(|c| uuid("correlationId", &c))
            .transpose()?,
    };
    let store = services.store.clone();
    // A task of its own: the erasure runs to its end even if the request
    // is dropped, and a shutdown waits for it.
    let erased = crate::shutdown::spawn_command(async move { erase(&store, &request).await })
        .await
        .map_err(|e| crate::error::internal("the erasure failed unexpectedly", e))?
        .map_err(|e| match e {
            EraseError::NotFound { .. } => crate::error::not_found(e),
            EraseError::Invalid(_) => crate::error::validation(e),
            EraseError::Append(commands::AppendError::Conflict { .. }) => crate::error::validation(
                format!("{e}: this commandId was used for another request"),
            ),
            other => crate::error::unavailable("the event store", other),
        })?;
    let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    Ok(ErasureResult {
        event_id: erased.event.as_ref().map(|e| ID(e.event_id.to_string())),
        stream_id: erased.event.as_ref().map(|e| ID(e.stream_id.clone())),
        position: erased.event.as_ref().map(|e| Position(e.position)),
        events: count(erased.events),
        values: count(erased.values),
        aggregates: count(erased.aggregates),
        replayed: erased.replayed,
    })
}
