//! Time travel: an aggregate's state at a version or a point in time,
//! rebuilt by folding its stream with the domain's `evolve` from version 1.
//! Snapshots are ignored on purpose: an auditor sees what the stored events
//! say, not what a cache says they say.

use async_graphql::{Context, Json, ID};
use commands::{ReadError, RecordedEvent};
use domain::{Aggregate, StreamId};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::types::Replayed;
use super::{corrupt_history, store_error, validation};
use crate::auth::Role;
use crate::graphql::types::Event;
use crate::graphql::{caller, ids, services, DateTime, Position};

/// Events fetched per round trip while replaying a stream.
const REPLAY_CHUNK: i64 = 1_000;

/// Which point of a stream's history to rebuild.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Point {
    /// The latest state.
    Latest,
    /// After this version.
    Version(i64),
    /// After the last event recorded at or before this time.
    AsOf(OffsetDateTime),
}

impl Point {
    fn parse(version: Option<i64>, as_of: Option<DateTime>) -> async_graphql::Result<Self> {
        match (version, as_of) {
            (Some(_), Some(_)) => Err(validation(
                "give either `version` or `asOf`, not both (neither: the latest state)",
            )),
            (Some(v), None) if v < 1 => Err(validation(format!(
                "`version` must be 1 (the first event) or more, not {v}"
            ))),
            (Some(v), None) => Ok(Point::Version(v)),
            (None, Some(time)) => Ok(Point::AsOf(time.0)),
            (None, None) => Ok(Point::Latest),
        }
    }
}

/// A state rebuilt by replaying a stream.
pub(super) struct Rebuilt<A> {
    pub(super) state: A,
    pub(super) replayed: Replayed,
}

/// Folds the caller's stream `stream` up to `point` with `A::evolve`, from
/// version 1 (no snapshot). `NOT_FOUND` when the tenant has no such stream
/// or it did not exist yet at `point`.
#[tracing::instrument(level = "debug", skip(ctx), fields(kind = %A::KIND))]
pub(super) async fn rebuild<A: Aggregate>(
    ctx: &Context<'_>,
    id: &str,
    version: Option<i64>,
    as_of: Option<DateTime>,
) -> async_graphql::Result<Rebuilt<A>> {
    let who = caller(ctx, Role::Auditor)?;
    let stream = StreamId::new(A::KIND, ids::entity(A::KIND, "id", id)?);
    let point = Point::parse(version, as_of)?;
    let stream_id = stream.to_string();
    let uuid = stream.uuid();
    let kind = A::KIND;
    let store = &services(ctx).store;

    let current = store
        .stream_version_of_tenant(&who.tenant, &stream_id)
        .await
        .map_err(store_error)?;
    if current == 0 {
        return Err(crate::error::not_found(format!(
            "{kind} {uuid} does not exist"
        )));
    }
    let target = match point {
        Point::Version(v) if v > current => {
            return Err(validation(format!(
                "{kind} {uuid} is at version {current}; `version` must be between 1 and {current}"
            )))
        }
        Point::Version(v) => v,
        Point::Latest | Point::AsOf(_) => current,
    };

    let mut state = A::default();
    let mut last: Option<RecordedEvent> = None;
    let mut first_recorded: Option<OffsetDateTime> = None;
    let mut next = 1;
    'replay: while next <= target {
        let chunk = store
            .read_stream_of_tenant(&who.tenant, &stream_id, next, target, REPLAY_CHUNK)
            .await
            .map_err(store_error)?;
        let Some(end) = chunk.last().map(|e| e.stream_version) else {
            break;
        };
        for recorded in chunk {
            first_recorded.get_or_insert(recorded.recorded_at);
            // Stop at the first event recorded after `asOf`. An append is
            // one statement whose start (`recorded_at`) follows the commit
            // of the version before, so times do not decrease along a stream
            // and this prefix is every event recorded at or before `asOf`.
            // Were they ever to (a caller-owned transaction of `append_in`
            // that began early), a prefix is still a state the stream really
            // had; folding by time alone could skip an event.
            if let Point::AsOf(limit) = point {
                if recorded.recorded_at > limit {
                    break 'replay;
                }
            }
            let event = recorded.decode().map_err(|source| {
                store_error(ReadError::Decode {
                    position: recorded.position,
                    stream_id: stream_id.clone(),
                    source,
                })
            })?;
            let event = A::from_domain(event).ok_or_else(|| {
                corrupt_history(&StrayEvent {
                    stream_id: stream_id.clone(),
                    position: recorded.position,
                    event_type: recorded.event_type.clone(),
                })
            })?;
            state.evolve(&event);
            last = Some(recorded);
        }
        next = end + 1;
    }

    let Some(last) = last else {
        let first = first_recorded
            .and_then(|t| t.format(&Rfc3339).ok())
            .unwrap_or_default();
        let when = as_of
            .and_then(|t| t.0.format(&Rfc3339).ok())
            .unwrap_or_default();
        return Err(crate::error::not_found(format!(
            "{kind} {uuid} did not exist yet at {when}; its first event was recorded at {first}"
        )));
    };
    tracing::debug!(stream = %stream_id, version = last.stream_version, current, "replayed for audit");
    let last_event = Event::from(&last);
    Ok(Rebuilt {
        state,
        replayed: Replayed {
            stream_id: ID(stream_id),
            version: last.stream_version,
            position: Position(last.position),
            recorded_at: last_event.metadata.recorded_at,
            current_version: current,
            last_event,
        },
    })
}

/// An event of another aggregate kind inside a stream (corrupt history).
#[derive(Debug, thiserror::Error)]
#[error("event {event_type} at position {position} does not belong in stream {stream_id}")]
struct StrayEvent {
    /// The stream.
    stream_id: String,
    /// The event's position.
    position: i64,
    /// Its type (and what is wrong with it).
    event_type: String,
}

/// A rebuilt state as JSON (the aggregate's serde form, as in snapshots).
pub(super) fn state_json<A: Aggregate>(
    state: &A,
) -> async_graphql::Result<Json<serde_json::Value>> {
    // Aggregate states are plain data; failing here is a bug worth a log line.
    serde_json::to_value(state)
        .map(Json)
        .map_err(|e| corrupt_history(&e))
}

/// `INTERNAL`: the stream folded to no aggregate (its first event does not
/// create one).
pub(super) fn folded_to_nothing(replayed: &Replayed) -> async_graphql::Error {
    corrupt_history(&StrayEvent {
        stream_id: replayed.stream_id.to_string(),
        position: replayed.position.0,
        event_type: format!(
            "{} (the stream folds to no aggregate at version {})",
            replayed.last_event.event_type, replayed.version
        ),
    })
}
