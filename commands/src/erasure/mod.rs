//! Erasure of personal data that keeps the sealed log valid (README,
//! "Erasure").
//!
//! [`erase`] replaces, in one transaction, the personal values in scope
//! ([`domain::personal`]) by their field digests — the very values the
//! sealed leaves commit to, so every seal still verifies — and writes with
//! them a tombstone per changed event, a row in `erasures`, and the audited
//! event `PersonalDataErased` (stream `erasure-<id>`). That event names the
//! scope, commits to the tombstones (count and [`tombstone_digest`]) and
//! carries what the erasure changed in the folded state of each affected
//! aggregate (digests only), which the read models apply in the log's
//! order. The same transaction deletes the affected streams' snapshots and
//! notifies command handlers (`NOTIFY neurectomy_erasures`) to drop their
//! cached states. The relay leader later deletes the erased events'
//! messages from the JetStream log ([`purge`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use domain::personal::{personal_fields, PERSONAL_METADATA};
use domain::{
    AgentState, Aggregate, AggregateKind, DomainEvent, ErasedState, ErasureEvent, ErasureScope,
    StreamId, TaskState, WorkflowState,
};
use serde_json::{json, Map, Value};
use sha2::{Digest as _, Sha256};
use sqlx::{PgConnection, PgPool, Row as _};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::envelope::{EventMetadata, ExpectedVersion, NewEvent, RecordedEvent};
use crate::error::AppendError;
use crate::idempotency::{event_id, new_aggregate_id, CommandHash};
use crate::seal::jcs::canonical;
use crate::seal::leaf::{field_digest, DIGEST_PREFIX};
use crate::EventStore;

mod purge;

pub use purge::{purge, purge_loop, PURGE_EVERY};

/// The channel erasures are announced on (payload: the erasure event's id).
pub const CHANNEL: &str = "neurectomy_erasures";

/// The command type recorded in an erasure event's metadata.
pub const COMMAND_TYPE: &str = "ErasePersonalData";

/// What to erase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every personal field of the data of every event of an agent, task
    /// or workflow stream.
    Stream(String),
    /// The personal fields of one event: those named, or all of them
    /// (data and `actor`) when none is.
    Event {
        /// The event.
        event_id: Uuid,
        /// The fields (of `data`, or `actor`); empty: all.
        fields: Vec<String>,
    },
    /// The `actor` of every event of the tenant by this actor.
    Actor(String),
}

/// An erasure to do.
#[derive(Debug, Clone)]
pub struct Request {
    /// Whose events.
    pub tenant: String,
    /// What.
    pub scope: Scope,
    /// Who erases (the erasure event's actor).
    pub actor: String,
    /// The request's id: a retry with the same id is the same erasure.
    pub command_id: Uuid,
    /// The event that caused the request, if any (of the tenant).
    pub causation_id: Option<Uuid>,
    /// The correlation id (default: the command id).
    pub correlation_id: Option<Uuid>,
}

/// What an erasure did.
#[derive(Debug, Clone)]
pub struct Erased {
    /// The `PersonalDataErased` event (`None`: nothing in scope held a
    /// personal value any more, and nothing was written).
    pub event: Option<RecordedEvent>,
    /// Events that lost at least one value.
    pub events: u64,
    /// Values replaced by their digests.
    pub values: u64,
    /// Aggregates whose folded state changed.
    pub aggregates: u64,
    /// Whether this is the answer to an earlier request with the same id.
    pub replayed: bool,
}

/// Why an erasure was refused or failed. Nothing is written on an error.
#[derive(Debug, thiserror::Error)]
pub enum EraseError {
    /// The scope names nothing of the tenant.
    #[error("{what} is not in tenant `{tenant}`'s log")]
    NotFound {
        /// What was looked for.
        what: String,
        /// The tenant.
        tenant: String,
    },
    /// The request is malformed (an unknown field, an erasure stream…).
    #[error("{0}")]
    Invalid(String),
    /// PostgreSQL failed.
    #[error("PostgreSQL failed while {doing}")]
    Database {
        /// What was being done.
        doing: String,
        /// The cause.
        #[source]
        source: sqlx::Error,
    },
    /// Appending the erasure event failed.
    #[error(transparent)]
    Append(#[from] AppendError),
    /// JetStream failed (purging erased events' messages).
    #[error("JetStream failed while {doing}: {message}")]
    JetStream {
        /// What was being done.
        doing: String,
        /// The cause.
        message: String,
    },
}

fn db(doing: impl Into<String>) -> impl FnOnce(sqlx::Error) -> EraseError {
    let doing = doing.into();
    move |source| EraseError::Database { doing, source }
}

/// One event in scope, as stored.
struct Stored {
    position: i64,
    event_id: Uuid,
    stream_id: String,
    event_type: String,
    schema_version: i32,
    data: Value,
    actor: Option<String>,
}

/// One event's erasure.
struct Change {
    position: i64,
    event_id: Uuid,
    stream_id: String,
    /// Data fields → their digests.
    data: Map<String, Value>,
    /// The actor's digest, when the actor is erased.
    actor: Option<String>,
}

impl Change {
    fn fields(&self) -> Vec<String> {
        let mut fields: Vec<String> = self.data.keys().cloned().collect();
        if self.actor.is_some() {
            fields.push("actor".to_owned());
        }
        fields.sort();
        fields
    }
}

/// Whether `value` has the form of a field digest.
pub fn is_digest(value: &Value) -> bool {
    value.as_str().is_some_and(is_digest_str)
}

/// Whether `s` has the form of a field digest.
pub fn is_digest_str(s: &str) -> bool {
    s.strip_prefix(DIGEST_PREFIX)
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The personal fields of `event` (of its data, and `actor`) that hold a
/// digest: those it may have lost to an erasure.
pub fn digest_fields(event: &RecordedEvent) -> Vec<&'static str> {
    let mut fields: Vec<&'static str> = personal_fields(&event.event_type, event.schema_version)
        .iter()
        .copied()
        .filter(|f| event.data.get(*f).is_some_and(is_digest))
        .collect();
    if is_digest_str(&event.metadata.actor) {
        fields.extend_from_slice(PERSONAL_METADATA);
    }
    fields
}

/// The canonical list a `PersonalDataErased` event's `tombstone_digest`
/// is the hex SHA-256 of: `[{"event","fields","position"}, …]` in position
/// order, fields sorted, positions as decimal strings.
pub fn tombstone_digest(tombstones: &[(i64, Uuid, Vec<String>)]) -> String {
    let mut sorted: Vec<_> = tombstones.iter().collect();
    sorted.sort_by_key(|(position, _, _)| *position);
    let list: Vec<Value> = sorted
        .into_iter()
        .map(|(position, event, fields)| {
            let mut fields = fields.clone();
            fields.sort();
            json!({"event": event, "fields": fields, "position": position.to_string()})
        })
        .collect();
    hex::encode(Sha256::digest(canonical(&Value::Array(list))))
}

/// Erases what `request` names (see the module docs).
pub async fn erase(store: &EventStore, request: &Request) -> Result<Erased, EraseError> {
    let erasure_event_id = event_id(&request.tenant, request.command_id, 0);
    if let Some(done) = earlier(store.pool(), erasure_event_id, &request.tenant).await? {
        return Ok(done);
    }
    let mut tx = store
        .pool()
        .begin()
        .await
        .map_err(db("starting the erasure"))?;
    let events = in_scope(&mut tx, request).await?;
    let erased = already_erased(&mut tx, &events).await?;
    let changes = changes(request, &events, &erased)?;
    if changes.is_empty() {
        drop(tx);
        // A concurrent run of the same request may have erased it all.
        if let Some(done) = earlier(store.pool(), erasure_event_id, &request.tenant).await? {
            return Ok(done);
        }
        return Ok(Erased {
            event: None,
            events: 0,
            values: 0,
            aggregates: 0,
            replayed: false,
        });
    }
    rewrite(&mut tx, &changes).await?;
    let states = state_changes(&mut tx, &events, &changes).await?;
    let tombstones: Vec<(i64, Uuid, Vec<String>)> = changes
        .iter()
        .map(|c| (c.position, c.event_id, c.fields()))
        .collect();
    let values: u64 = tombstones.iter().map(|(_, _, f)| f.len() as u64).sum();
    let erasure_id = new_aggregate_id(&request.tenant, request.command_id, AggregateKind::Erasure);
    let event = ErasureEvent::PersonalDataErased {
        erasure_id,
        scope: match &request.scope {
            Scope::Stream(stream) => ErasureScope::Stream(stream.clone()),
            Scope::Event { event_id, .. } => ErasureScope::Event(*event_id),
            Scope::Actor(actor) => ErasureScope::Actor(hex::encode(Sha256::digest(actor))),
        },
        events: changes.len() as u64,
        tombstones: changes.len() as u64,
        tombstone_digest: tombstone_digest(&tombstones),
        positions: changes
            .iter()
            .filter(|c| !c.data.is_empty())
            .map(|c| c.position)
            .collect(),
        changes: states,
    };
    let aggregates = match &event {
        ErasureEvent::PersonalDataErased { changes, .. } => changes.len() as u64,
    };
    let domain_event = DomainEvent::Erasure(event);
    let data = domain_event.to_data();
    let hash = CommandHash::of(canonical(&json!({
        "type": COMMAND_TYPE,
        "tenant": request.tenant,
        "scope": data["scope"],
        "fields": match &request.scope { Scope::Event { fields, .. } => json!(fields), _ => Value::Null },
    })));
    let stream = domain_event.stream_id().to_string();
    let new = NewEvent {
        event_type: domain_event.event_type().to_owned(),
        schema_version: domain_event.schema_version(),
        data,
        metadata: EventMetadata {
            event_id: erasure_event_id,
            command_id: request.command_id,
            command_type: COMMAND_TYPE.to_owned(),
            command_hash: hash.as_str().to_owned(),
            correlation_id: request.correlation_id.unwrap_or(request.command_id),
            causation_id: request.causation_id.unwrap_or(request.command_id),
            actor: request.actor.clone(),
            tenant: request.tenant.clone(),
            occurred_at: OffsetDateTime::now_utc(),
            traceparent: None,
        },
    };
    let recorded = match store
        .append_in(&mut tx, &stream, ExpectedVersion::NoStream, vec![new])
        .await
    {
        Ok(mut recorded) => recorded.pop(),
        Err(error) => {
            drop(tx);
            // A concurrent retry of the same request got there first.
            if let Some(done) = earlier(store.pool(), erasure_event_id, &request.tenant).await? {
                return Ok(done);
            }
            return Err(error.into());
        }
    };
    let Some(recorded) = recorded else {
        return Err(EraseError::Invalid(
            "the erasure event was not recorded".into(),
        ));
    };
    record(&mut tx, &recorded, &changes).await?;
    tx.commit().await.map_err(db("committing the erasure"))?;
    store.announce_commit();
    tracing::info!(
        tenant = %request.tenant,
        erasure = %erasure_id,
        position = recorded.position,
        events = changes.len(),
        values,
        "personal data erased"
    );
    Ok(Erased {
        event: Some(recorded),
        events: changes.len() as u64,
        values,
        aggregates,
        replayed: false,
    })
}

/// The answer to an earlier request whose erasure event is `event_id`.
async fn earlier(
    pool: &PgPool,
    event_id: Uuid,
    tenant: &str,
) -> Result<Option<Erased>, EraseError> {
    let row = sqlx::query(
        "SELECT position, stream_id, stream_version, event_id, event_type, schema_version, \
         data, metadata, recorded_at FROM events WHERE event_id = $1 AND tenant = $2",
    )
    .bind(event_id)
    .bind(tenant)
    .fetch_optional(pool)
    .await
    .map_err(db("looking for an earlier erasure with this id"))?;
    let Some(row) = row else {
        return Ok(None);
    };
    let decode = |e: sqlx::Error| EraseError::Database {
        doing: "reading an earlier erasure".into(),
        source: e,
    };
    let metadata: sqlx::types::Json<EventMetadata> = row.try_get(7).map_err(decode)?;
    let recorded = RecordedEvent {
        position: row.try_get(0).map_err(decode)?,
        stream_id: row.try_get(1).map_err(decode)?,
        stream_version: row.try_get(2).map_err(decode)?,
        event_id: row.try_get(3).map_err(decode)?,
        event_type: row.try_get(4).map_err(decode)?,
        schema_version: row.try_get(5).map_err(decode)?,
        data: row.try_get(6).map_err(decode)?,
        metadata: metadata.0,
        recorded_at: row.try_get(8).map_err(decode)?,
    };
    let (events, aggregates) = match recorded.decode() {
        Ok(DomainEvent::Erasure(ErasureEvent::PersonalDataErased {
            events, changes, ..
        })) => (events, changes.len() as u64),
        _ => {
            return Err(EraseError::Invalid(format!(
                "command id {} was used for another command",
                recorded.metadata.command_id
            )))
        }
    };
    let values: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(cardinality(fields)), 0)::bigint FROM tombstones WHERE erasure = $1",
    )
    .bind(event_id)
    .fetch_one(pool)
    .await
    .map_err(db("counting an earlier erasure's values"))?;
    Ok(Some(Erased {
        event: Some(recorded),
        events,
        values: u64::try_from(values).unwrap_or(0),
        aggregates,
        replayed: true,
    }))
}

/// The tenant's events in scope, locked.
async fn in_scope(tx: &mut PgConnection, request: &Request) -> Result<Vec<Stored>, EraseError> {
    const COLUMNS: &str = "position, event_id, stream_id, event_type, schema_version, data, \
                           metadata->>'actor'";
    let tenant = request.tenant.as_str();
    let (sql, what) = match &request.scope {
        Scope::Stream(stream) => {
            match StreamId::parse(stream) {
                Ok(id) if id.kind() != AggregateKind::Erasure => {}
                _ => {
                    return Err(EraseError::Invalid(format!(
                        "`{stream}` is not the stream of an agent, task or workflow (agent-<uuid>, task-<uuid>, workflow-<uuid>)"
                    )))
                }
            }
            (
                format!("SELECT {COLUMNS} FROM events WHERE tenant = $1 AND stream_id = $2 ORDER BY position FOR UPDATE"),
                format!("stream `{stream}`"),
            )
        }
        Scope::Event { event_id, .. } => (
            format!(
                "SELECT {COLUMNS} FROM events WHERE tenant = $1 AND event_id = $2::uuid FOR UPDATE"
            ),
            format!("event {event_id}"),
        ),
        Scope::Actor(actor) => {
            if actor.is_empty() {
                return Err(EraseError::Invalid("the actor to erase is empty".into()));
            }
            (
                format!("SELECT {COLUMNS} FROM events WHERE tenant = $1 AND metadata->>'actor' = $2 ORDER BY position FOR UPDATE"),
                format!("an event by actor `{actor}`"),
            )
        }
    };
    let key = match &request.scope {
        Scope::Stream(s) | Scope::Actor(s) => s.clone(),
        Scope::Event { event_id, .. } => event_id.to_string(),
    };
    let rows = sqlx::query(&sql)
        .bind(tenant)
        .bind(key)
        .fetch_all(&mut *tx)
        .await
        .map_err(db("reading the events to erase"))?;
    if rows.is_empty() {
        return Err(EraseError::NotFound {
            what,
            tenant: tenant.to_owned(),
        });
    }
    let decode = db("decoding an event to erase");
    let mut events = Vec::with_capacity(rows.len());
    for row in &rows {
        let stored = (|| {
            Ok::<_, sqlx::Error>(Stored {
                position: row.try_get(0)?,
                event_id: row.try_get(1)?,
                stream_id: row.try_get(2)?,
                event_type: row.try_get(3)?,
                schema_version: row.try_get(4)?,
                data: row.try_get(5)?,
                actor: row.try_get(6)?,
            })
        })();
        match stored {
            Ok(stored) => events.push(stored),
            Err(e) => return Err(decode(e)),
        }
    }
    if let Scope::Event { .. } = &request.scope {
        if events.iter().any(|e| e.stream_id.starts_with("erasure-")) {
            return Err(EraseError::Invalid(
                "an erasure event holds no personal data to erase".into(),
            ));
        }
    }
    Ok(events)
}

/// The fields each event in scope lost to earlier erasures.
async fn already_erased(
    tx: &mut PgConnection,
    events: &[Stored],
) -> Result<HashMap<i64, BTreeSet<String>>, EraseError> {
    let positions: Vec<i64> = events.iter().map(|e| e.position).collect();
    tombstoned(&mut *tx, &positions).await
}

/// The fields tombstoned at each of `positions` (those with any).
pub async fn tombstoned<'e, E: sqlx::PgExecutor<'e>>(
    executor: E,
    positions: &[i64],
) -> Result<HashMap<i64, BTreeSet<String>>, EraseError> {
    let rows = sqlx::query("SELECT position, fields FROM tombstones WHERE position = ANY($1)")
        .bind(positions)
        .fetch_all(executor)
        .await
        .map_err(db("reading tombstones"))?;
    let mut erased: HashMap<i64, BTreeSet<String>> = HashMap::new();
    for row in rows {
        let position: i64 = row.try_get(0).map_err(db("decoding a tombstone"))?;
        let fields: Vec<String> = row.try_get(1).map_err(db("decoding a tombstone"))?;
        erased.entry(position).or_default().extend(fields);
    }
    Ok(erased)
}

/// What erasing `request` changes in each event (events left unchanged
/// are left out).
fn changes(
    request: &Request,
    events: &[Stored],
    erased: &HashMap<i64, BTreeSet<String>>,
) -> Result<Vec<Change>, EraseError> {
    let none = BTreeSet::new();
    let mut changes = Vec::new();
    for event in events {
        let done = erased.get(&event.position).unwrap_or(&none);
        let personal = personal_fields(&event.event_type, event.schema_version);
        let (data_fields, actor): (Vec<&str>, bool) = match &request.scope {
            Scope::Stream(_) => (personal.to_vec(), false),
            Scope::Actor(_) => (Vec::new(), true),
            Scope::Event { fields, .. } if fields.is_empty() => (personal.to_vec(), true),
            Scope::Event { fields, .. } => {
                let mut data = Vec::new();
                let mut actor = false;
                for field in fields {
                    if PERSONAL_METADATA.contains(&field.as_str()) {
                        actor = true;
                    } else if let Some(f) = personal.iter().find(|p| **p == field.as_str()) {
                        data.push(*f);
                    } else {
                        return Err(EraseError::Invalid(format!(
                            "`{field}` is not a personal field of {} v{} events (personal: {}, and actor)",
                            event.event_type,
                            event.schema_version,
                            if personal.is_empty() { "none".to_owned() } else { personal.join(", ") }
                        )));
                    }
                }
                (data, actor)
            }
        };
        let mut data = Map::new();
        for field in data_fields {
            if done.contains(field) {
                continue;
            }
            if let Some(value) = event.data.get(field) {
                if value.is_null() {
                    continue;
                }
                data.insert(
                    field.to_owned(),
                    Value::String(field_digest(event.event_id, field, value)),
                );
            }
        }
        let actor = match (&event.actor, actor && !done.contains("actor")) {
            (Some(actor), true) => Some(field_digest(
                event.event_id,
                "actor",
                &Value::String(actor.clone()),
            )),
            _ => None,
        };
        if !data.is_empty() || actor.is_some() {
            changes.push(Change {
                position: event.position,
                event_id: event.event_id,
                stream_id: event.stream_id.clone(),
                data,
                actor,
            });
        }
    }
    Ok(changes)
}

/// Writes the digests in place of the values.
async fn rewrite(tx: &mut PgConnection, changes: &[Change]) -> Result<(), EraseError> {
    let positions: Vec<i64> = changes.iter().map(|c| c.position).collect();
    let data: Vec<Value> = changes
        .iter()
        .map(|c| Value::Object(c.data.clone()))
        .collect();
    let metadata: Vec<Value> = changes
        .iter()
        .map(|c| match &c.actor {
            Some(actor) => json!({ "actor": actor }),
            None => json!({}),
        })
        .collect();
    let updated = sqlx::query(
        "UPDATE events e SET data = e.data || u.data, metadata = e.metadata || u.metadata \
         FROM UNNEST($1::bigint[], $2::jsonb[], $3::jsonb[]) AS u(position, data, metadata) \
         WHERE e.position = u.position",
    )
    .bind(&positions)
    .bind(&data)
    .bind(&metadata)
    .execute(&mut *tx)
    .await
    .map_err(db("writing the digests"))?;
    if updated.rows_affected() != changes.len() as u64 {
        return Err(EraseError::Invalid(format!(
            "{} of {} events to erase were rewritten",
            updated.rows_affected(),
            changes.len()
        )));
    }
    Ok(())
}

/// For each aggregate whose data changed: the top-level fields of its
/// folded state that differ once its events are erased.
async fn state_changes(
    tx: &mut PgConnection,
    events: &[Stored],
    changes: &[Change],
) -> Result<Vec<ErasedState>, EraseError> {
    let streams: BTreeSet<&str> = changes
        .iter()
        .filter(|c| !c.data.is_empty())
        .map(|c| c.stream_id.as_str())
        .collect();
    let originals: HashMap<i64, &Value> = events.iter().map(|e| (e.position, &e.data)).collect();
    let changed: BTreeSet<i64> = changes
        .iter()
        .filter(|c| !c.data.is_empty())
        .map(|c| c.position)
        .collect();
    let mut out = Vec::new();
    for stream in streams {
        let rows: Vec<(i64, String, i32, Value)> = sqlx::query_as(
            "SELECT position, event_type, schema_version, data FROM events \
             WHERE stream_id = $1 ORDER BY stream_version",
        )
        .bind(stream)
        .fetch_all(&mut *tx)
        .await
        .map_err(db(format!("reading stream {stream}")))?;
        let mut before = Vec::with_capacity(rows.len());
        let mut after = Vec::with_capacity(rows.len());
        for (position, event_type, schema_version, data) in rows {
            let original = match (changed.contains(&position), originals.get(&position)) {
                (true, Some(original)) => (*original).clone(),
                _ => data.clone(),
            };
            let decode = |data: Value| {
                DomainEvent::from_stored(&event_type, schema_version, data).map_err(|e| {
                    EraseError::Invalid(format!(
                        "event at position {position} of {stream} does not decode: {e}"
                    ))
                })
            };
            before.push(decode(original)?);
            after.push(decode(data)?);
        }
        let kind = StreamId::parse(stream).map(|s| s.kind()).ok();
        let (old, new) = match kind {
            Some(AggregateKind::Agent) => (fold::<AgentState>(before), fold::<AgentState>(after)),
            Some(AggregateKind::Task) => (fold::<TaskState>(before), fold::<TaskState>(after)),
            Some(AggregateKind::Workflow) => {
                (fold::<WorkflowState>(before), fold::<WorkflowState>(after))
            }
            _ => continue,
        };
        let fields: BTreeMap<String, Value> = match (old, new) {
            (Value::Object(old), Value::Object(new)) => new
                .into_iter()
                .filter(|(k, v)| old.get(k) != Some(v))
                .collect(),
            _ => BTreeMap::new(),
        };
        if !fields.is_empty() {
            out.push(ErasedState {
                stream_id: stream.to_owned(),
                fields,
            });
        }
    }
    Ok(out)
}

/// The state `events` fold to, as JSON.
fn fold<A: Aggregate>(events: Vec<DomainEvent>) -> Value {
    let mut state = A::default();
    for event in events {
        if let Some(event) = A::from_domain(event) {
            state.evolve(&event);
        }
    }
    serde_json::to_value(&state).unwrap_or(Value::Null)
}

/// The erasure's row, its tombstones, the snapshots it voids, the notice.
async fn record(
    tx: &mut PgConnection,
    event: &RecordedEvent,
    changes: &[Change],
) -> Result<(), EraseError> {
    sqlx::query("INSERT INTO erasures (event_id, tenant, position) VALUES ($1, $2, $3)")
        .bind(event.event_id)
        .bind(&event.metadata.tenant)
        .bind(event.position)
        .execute(&mut *tx)
        .await
        .map_err(db("recording the erasure"))?;
    let positions: Vec<i64> = changes.iter().map(|c| c.position).collect();
    let ids: Vec<Uuid> = changes.iter().map(|c| c.event_id).collect();
    let streams: Vec<&str> = changes.iter().map(|c| c.stream_id.as_str()).collect();
    // text[][] must be rectangular: one comma-joined string per event.
    let fields: Vec<String> = changes.iter().map(|c| c.fields().join(",")).collect();
    sqlx::query(
        "INSERT INTO tombstones (position, erasure, event_id, tenant, stream_id, fields) \
         SELECT u.position, $1, u.event_id, $2, u.stream_id, string_to_array(u.fields, ',') \
         FROM UNNEST($3::bigint[], $4::uuid[], $5::text[], $6::text[]) \
           AS u(position, event_id, stream_id, fields)",
    )
    .bind(event.event_id)
    .bind(&event.metadata.tenant)
    .bind(&positions)
    .bind(&ids)
    .bind(&streams)
    .bind(&fields)
    .execute(&mut *tx)
    .await
    .map_err(db("writing the tombstones"))?;
    let mut affected: Vec<&str> = streams.clone();
    affected.sort_unstable();
    affected.dedup();
    sqlx::query("DELETE FROM snapshots WHERE stream_id = ANY($1)")
        .bind(&affected)
        .execute(&mut *tx)
        .await
        .map_err(db("deleting the erased streams' snapshots"))?;
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(event.event_id.to_string())
        .execute(&mut *tx)
        .await
        .map_err(db("announcing the erasure"))?;
    Ok(())
}

/// The streams an erasure (by its event id) erased values of.
pub async fn streams_of(pool: &PgPool, erasure: Uuid) -> Result<Vec<String>, EraseError> {
    sqlx::query_scalar("SELECT DISTINCT stream_id FROM tombstones WHERE erasure = $1")
        .bind(erasure)
        .fetch_all(pool)
        .await
        .map_err(db("reading the streams of an erasure"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_recognised_and_the_tombstone_digest_is_order_free() {
        let id = Uuid::from_u128(7);
        let digest = field_digest(id, "name", &json!("Ada"));
        assert!(is_digest(&json!(digest)));
        assert!(!is_digest(&json!("Ada")));
        assert!(!is_digest(&json!(format!("{DIGEST_PREFIX}abc"))));
        let a = (5, id, vec!["name".to_owned()]);
        let b = (
            9,
            Uuid::from_u128(8),
            vec!["title".to_owned(), "input".to_owned()],
        );
        assert_eq!(
            tombstone_digest(&[a.clone(), b.clone()]),
            tombstone_digest(&[b.clone(), a.clone()])
        );
        let c = (9, Uuid::from_u128(8), vec!["title".to_owned()]);
        assert_ne!(tombstone_digest(&[a.clone(), b]), tombstone_digest(&[a, c]));
    }
}
