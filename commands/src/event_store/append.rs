//! Appending events with optimistic concurrency.

use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use sqlx::{PgConnection, PgExecutor, Row};
use time::OffsetDateTime;
use tracing::Instrument as _;
use uuid::Uuid;

use super::lease::Lease;
use super::EventStore;
use crate::envelope::{EventMetadata, ExpectedVersion, NewEvent, RecordedEvent};
use crate::error::AppendError;

/// Most events in one append: the low 16 bits of a position index the events
/// of one transaction.
pub const MAX_EVENTS_PER_APPEND: usize = 1 << 16;

const APPEND: &str = include_str!("sql/append.sql");
const STREAM_VERSION: &str = include_str!("sql/stream_version.sql");

/// How many times an `Any` append re-reads the version after losing a race.
const ANY_RETRIES: u32 = 16;

/// The columns of a batch, as parallel arrays for `UNNEST`, borrowed from
/// the events: the JSON documents are serialised once, straight into the
/// statement's buffer.
struct Batch<'a> {
    command_id: Uuid,
    correlation_id: Uuid,
    tenant: &'a str,
    ids: Vec<Uuid>,
    types: Vec<&'a str>,
    versions: Vec<i32>,
    data: Vec<Json<&'a Value>>,
    metadata: Vec<Json<&'a EventMetadata>>,
}

/// Refuses an empty append or one too large for one transaction.
fn check_count(events: &[NewEvent]) -> Result<(), AppendError> {
    if events.is_empty() || events.len() > MAX_EVENTS_PER_APPEND {
        return Err(AppendError::BadBatch {
            count: events.len(),
            max: MAX_EVENTS_PER_APPEND,
        });
    }
    Ok(())
}

impl<'a> Batch<'a> {
    fn new(events: &'a [NewEvent]) -> Result<Self, AppendError> {
        check_count(events)?;
        let Some(first) = events.first() else {
            return Err(AppendError::BadBatch {
                count: 0,
                max: MAX_EVENTS_PER_APPEND,
            });
        };
        Ok(Self {
            command_id: first.metadata.command_id,
            correlation_id: first.metadata.correlation_id,
            tenant: &first.metadata.tenant,
            ids: events.iter().map(|e| e.metadata.event_id).collect(),
            types: events.iter().map(|e| e.event_type.as_str()).collect(),
            versions: events.iter().map(|e| e.schema_version).collect(),
            data: events.iter().map(|e| Json(&e.data)).collect(),
            metadata: events.iter().map(|e| Json(&e.metadata)).collect(),
        })
    }

    async fn insert<'e, E: PgExecutor<'e>>(
        &self,
        executor: E,
        stream_id: &str,
        required: Option<i64>,
    ) -> Result<Vec<PgRow>, sqlx::Error> {
        sqlx::query(APPEND)
            .bind(stream_id)
            .bind(required)
            .bind(self.command_id)
            .bind(self.correlation_id)
            .bind(self.tenant)
            .bind(&self.ids)
            .bind(&self.types)
            .bind(&self.versions)
            .bind(&self.data)
            .bind(&self.metadata)
            .bind(i64::from(crate::partition::hash(self.tenant)))
            .fetch_all(executor)
            .await
    }
}

/// What one insert attempt amounted to.
pub(crate) enum Attempt {
    Done(Vec<PgRow>),
    VersionMismatch,
    Raced,
}

/// One append's statement on a leased connection, its outcome classified.
pub(super) async fn insert_one(
    conn: &mut Lease<'_>,
    stream_id: &str,
    required: Option<i64>,
    events: &[NewEvent],
) -> Result<Attempt, AppendError> {
    let batch = Batch::new(events)?;
    let result = batch.insert(&mut **conn, stream_id, required).await;
    conn.settle(&result);
    classify(stream_id, batch.command_id, result)
}

fn classify(
    stream_id: &str,
    command_id: Uuid,
    result: Result<Vec<PgRow>, sqlx::Error>,
) -> Result<Attempt, AppendError> {
    match result {
        // The version guard filtered every row out.
        Ok(rows) if rows.is_empty() => Ok(Attempt::VersionMismatch),
        Ok(rows) => Ok(Attempt::Done(rows)),
        Err(sqlx::Error::Database(db)) if db.constraint() == Some("events_event_id_unique") => {
            Err(AppendError::DuplicateEvent { command_id })
        }
        Err(sqlx::Error::Database(db))
            if db.constraint() == Some("events_stream_version_unique") =>
        {
            Ok(Attempt::Raced)
        }
        // Class 22 (data exception: a value PostgreSQL cannot store, such
        // as `\u0000` in jsonb) and 54 (program limit exceeded: a value too
        // large to index): the data is at fault, not the database.
        Err(sqlx::Error::Database(db))
            if db
                .code()
                .is_some_and(|code| code.starts_with("22") || code.starts_with("54")) =>
        {
            tracing::warn!(
                stream_id,
                code = db.code().as_deref().unwrap_or(""),
                error = db.message(),
                "PostgreSQL refused an append's data"
            );
            Err(AppendError::Refused {
                stream_id: stream_id.to_owned(),
                reason: format!(
                    "{} (SQLSTATE {})",
                    db.message(),
                    db.code().as_deref().unwrap_or("?")
                ),
            })
        }
        Err(source) => Err(AppendError::Database {
            stream_id: stream_id.to_owned(),
            source,
        }),
    }
}

impl EventStore {
    /// Appends `events` (all of one command) to `stream_id` atomically, if the
    /// stream is at `expected`. Returns the recorded events in order.
    ///
    /// All events must share the command id, correlation id and tenant of the
    /// first one. With [`ExpectedVersion::Any`] a lost race is retried.
    pub async fn append(
        &self,
        stream_id: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<Vec<RecordedEvent>, AppendError> {
        let span = crate::trace::step(|| {
            tracing::info_span!("event_store.append", stream_id, count = events.len())
        });
        let started = Instant::now();
        let result = self
            .append_unmetered(stream_id, expected, events)
            .instrument(span)
            .await;
        record_append(&result, started.elapsed());
        result
    }

    /// [`EventStore::append`] without its metrics.
    async fn append_unmetered(
        &self,
        stream_id: &str,
        expected: ExpectedVersion,
        mut events: Vec<NewEvent>,
    ) -> Result<Vec<RecordedEvent>, AppendError> {
        check_count(&events)?;
        let required = expected.required().map(to_i64);
        let mut attempt = 0;
        let rows = loop {
            attempt += 1;
            let result;
            (events, result) = self.attempt(stream_id, required, events).await;
            match result? {
                Attempt::Done(rows) => break rows,
                Attempt::Raced if required.is_none() && attempt < ANY_RETRIES => continue,
                Attempt::Raced | Attempt::VersionMismatch => {
                    let actual = self.stream_version(stream_id).await.map_err(|source| {
                        AppendError::Database {
                            stream_id: stream_id.to_owned(),
                            source,
                        }
                    })?;
                    return Err(AppendError::Conflict {
                        stream_id: stream_id.to_owned(),
                        expected,
                        actual,
                    });
                }
            }
        };
        self.signal_commit();
        recorded(stream_id, &rows, events)
    }

    /// One insert of an append: through the committers if they run (the
    /// events come back with the outcome), else on a leased connection.
    async fn attempt(
        &self,
        stream_id: &str,
        required: Option<i64>,
        events: Vec<NewEvent>,
    ) -> (Vec<NewEvent>, Result<Attempt, AppendError>) {
        let events = match &self.committers {
            Some(committers) if events.len() <= super::group::MOST_EVENTS_GROUPED => {
                match committers.append(stream_id, required, events).await {
                    Ok(settled) => return (settled.events, settled.attempt),
                    Err(events) => events,
                }
            }
            _ => events,
        };
        let result = match self.lease().await {
            Ok(mut conn) => insert_one(&mut conn, stream_id, required, &events).await,
            Err(source) => Err(AppendError::Database {
                stream_id: stream_id.to_owned(),
                source,
            }),
        };
        (events, result)
    }

    /// Appends inside a transaction the caller owns (to write events together
    /// with other rows). Nothing is visible until the caller commits; call
    /// [`EventStore::announce_commit`] afterwards so relays wake at once.
    /// Keep such transactions short: while one is open, gap-safe readers
    /// cannot read past its position.
    pub async fn append_in(
        &self,
        conn: &mut PgConnection,
        stream_id: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<Vec<RecordedEvent>, AppendError> {
        let batch = Batch::new(&events)?;
        let required = expected.required().map(to_i64);
        let result = batch.insert(&mut *conn, stream_id, required).await;
        match classify(stream_id, batch.command_id, result)? {
            Attempt::Done(rows) => recorded(stream_id, &rows, events),
            Attempt::Raced | Attempt::VersionMismatch => {
                let version: i64 = sqlx::query_scalar(STREAM_VERSION)
                    .bind(stream_id)
                    .fetch_one(&mut *conn)
                    .await
                    .map_err(|source| AppendError::Database {
                        stream_id: stream_id.to_owned(),
                        source,
                    })?;
                Err(AppendError::Conflict {
                    stream_id: stream_id.to_owned(),
                    expected,
                    actual: u64::try_from(version).unwrap_or(0),
                })
            }
        }
    }

    /// Wakes in-process relays after a transaction using
    /// [`EventStore::append_in`] committed.
    pub fn announce_commit(&self) {
        self.signal_commit();
    }

    /// Current version of a stream (0 if it has no events).
    pub async fn stream_version(&self, stream_id: &str) -> Result<u64, sqlx::Error> {
        let mut conn = self.lease().await?;
        let version = sqlx::query_scalar::<_, i64>(STREAM_VERSION)
            .bind(stream_id)
            .fetch_one(&mut *conn)
            .await;
        conn.settle(&version);
        Ok(u64::try_from(version?).unwrap_or(0))
    }
}

/// `neurectomy_appends_total{outcome}`, `neurectomy_appended_events_total`
/// and `neurectomy_append_seconds`.
fn record_append(result: &Result<Vec<RecordedEvent>, AppendError>, took: Duration) {
    super::note_duration("append", took);
    let outcome = match result {
        Ok(events) => {
            metrics::counter!("neurectomy_appended_events_total").increment(events.len() as u64);
            "ok"
        }
        Err(AppendError::Conflict { .. }) => "conflict",
        // The command ran before: its retry appends nothing.
        Err(AppendError::DuplicateEvent { .. }) => "duplicate",
        Err(AppendError::BadBatch { .. } | AppendError::Refused { .. }) => "invalid",
        Err(AppendError::Database { .. }) => "error",
    };
    metrics::counter!("neurectomy_appends_total", "outcome" => outcome).increment(1);
    metrics::histogram!("neurectomy_append_seconds").record(took.as_secs_f64());
}

/// Pairs the returned rows with the events appended.
fn recorded(
    stream_id: &str,
    rows: &[PgRow],
    events: Vec<NewEvent>,
) -> Result<Vec<RecordedEvent>, AppendError> {
    let mut committed: Vec<(i64, i64, OffsetDateTime)> = Vec::with_capacity(rows.len());
    for row in rows {
        let decoded = (|| -> Result<_, sqlx::Error> {
            Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?))
        })();
        committed.push(decoded.map_err(|source| AppendError::Database {
            stream_id: stream_id.to_owned(),
            source,
        })?);
    }
    committed.sort_unstable_by_key(|(_, version, _)| *version);
    Ok(committed
        .into_iter()
        .zip(events)
        .map(
            |((position, stream_version, recorded_at), event)| RecordedEvent {
                position,
                stream_id: stream_id.to_owned(),
                stream_version,
                event_id: event.metadata.event_id,
                event_type: event.event_type,
                schema_version: event.schema_version,
                data: event.data,
                metadata: event.metadata,
                recorded_at,
            },
        )
        .collect())
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
