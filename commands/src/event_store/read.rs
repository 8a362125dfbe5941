//! Reading streams, the global log (gap-safely) and command look-ups, and
//! the tenant-scoped reads of the audit queries (a stream's history, a
//! tenant's log, a correlation id across streams). Tenant-scoped reads
//! filter by the `tenant` column in SQL, so another tenant's events never
//! leave the database: its streams read as empty.

use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use sqlx::Row;

use super::partition_index::with_partition;
use super::EventStore;
use crate::envelope::{EventMetadata, RecordedEvent};
use crate::error::ReadError;

const LOAD_STREAM: &str = include_str!("sql/load_stream.sql");
const READ_STREAM: &str = include_str!("sql/read_stream.sql");
const READ_ALL: &str = include_str!("sql/read_all.sql");
const READ_PARTITION: &str = include_str!("sql/read_partition.sql");
const LAST_IN_PARTITION: &str = include_str!("sql/last_in_partition.sql");
const EVENTS_OF_COMMAND: &str = include_str!("sql/events_of_command.sql");
const HEAD: &str = include_str!("sql/head.sql");
const COUNT_AFTER: &str = include_str!("sql/count_after.sql");
const ESTIMATE_AFTER: &str = include_str!("sql/estimate_after.sql");

/// [`EventStore::lag`] counts up to this many events exactly (an index-only
/// walk of at most this many entries: a few milliseconds).
pub const EXACT_LAG: i64 = 10_000;

/// How far a reader is behind the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lag {
    /// Events after the reader's position: exact up to [`EXACT_LAG`],
    /// beyond it PostgreSQL's estimate (never less than `EXACT_LAG + 1`).
    pub events: i64,
    /// Whether `events` was counted (true) or estimated.
    pub exact: bool,
}

impl std::fmt::Display for Lag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.exact {
            write!(f, "{}", self.events)
        } else {
            write!(f, "~{} (estimated)", self.events)
        }
    }
}
const READ_STREAM_AFTER: &str = include_str!("sql/read_stream_after.sql");
const READ_STREAM_OF_TENANT: &str = include_str!("sql/read_stream_of_tenant.sql");
const READ_EVENT_OF_TENANT: &str = include_str!("sql/read_event_of_tenant.sql");
const READ_CAUSES_OF_TENANT: &str = include_str!("sql/read_causes_of_tenant.sql");
const READ_EFFECTS_OF_TENANT: &str = include_str!("sql/read_effects_of_tenant.sql");
const STREAM_VERSION_OF_TENANT: &str = include_str!("sql/stream_version_of_tenant.sql");
const READ_LOG_OF_TENANT: &str = include_str!("sql/read_log_of_tenant.sql");
const READ_LOG_OF_CORRELATION: &str = include_str!("sql/read_log_of_correlation.sql");
const READ_POSITIONS: &str = include_str!("sql/read_positions.sql");

/// One stored event, undecoded, as loading a stream returns it.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    /// Version in its stream.
    pub version: i64,
    /// Type name.
    pub event_type: String,
    /// Schema version of `data`.
    pub schema_version: i32,
    /// Payload as stored.
    pub data: Value,
    /// Global position.
    pub position: i64,
}

/// A stream as the command handler needs it: the snapshot (if any) and the
/// raw events after it.
#[derive(Debug, Clone, Default)]
pub struct LoadedStream {
    /// Snapshot state and its version.
    pub snapshot: Option<(i64, Value)>,
    /// The events after the snapshot, in version order.
    pub events: Vec<StoredEvent>,
    /// Tenant owning the stream, if it has any events.
    pub tenant: Option<String>,
}

impl LoadedStream {
    /// The stream's current version.
    pub fn version(&self) -> i64 {
        self.events
            .last()
            .map(|e| e.version)
            .or(self.snapshot.as_ref().map(|s| s.0))
            .unwrap_or(0)
    }

    /// Decodes rows in the layout of `load_stream.sql` (snapshot row first,
    /// if any, then events).
    fn from_rows(rows: Vec<PgRow>, stream_id: &str) -> Result<Self, ReadError> {
        let mut loaded = LoadedStream::default();
        for row in rows {
            let decoded = (|| -> Result<(), sqlx::Error> {
                let version: i64 = row.try_get(1)?;
                let data: Value = row.try_get(4)?;
                loaded.tenant = Some(row.try_get(5)?);
                if row.try_get::<bool, _>(0)? {
                    loaded.snapshot = Some((version, data));
                } else {
                    loaded.events.push(StoredEvent {
                        version,
                        event_type: row.try_get(2)?,
                        schema_version: row.try_get(3)?,
                        data,
                        position: row.try_get(6)?,
                    });
                }
                Ok(())
            })();
            decoded.map_err(db(format!("decoding stream {stream_id}")))?;
        }
        Ok(loaded)
    }
}

/// Where the log ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogHead {
    /// Highest position written, including transactions not yet safe to read.
    pub written: i64,
    /// Highest position a gap-safe reader can see now.
    pub readable: i64,
}

pub(super) fn db(doing: impl Into<String>) -> impl FnOnce(sqlx::Error) -> ReadError {
    let doing = doing.into();
    move |source| ReadError::Database { doing, source }
}

impl EventStore {
    /// Loads a stream's snapshot (taken under `snapshot_version`) and the
    /// events after it, in one round trip.
    pub async fn load_stream(
        &self,
        stream_id: &str,
        snapshot_version: i32,
    ) -> Result<LoadedStream, ReadError> {
        let rows = self
            .fetch_all(
                sqlx::query(LOAD_STREAM)
                    .bind(stream_id)
                    .bind(snapshot_version),
            )
            .await
            .map_err(db(format!("loading stream {stream_id}")))?;
        LoadedStream::from_rows(rows, stream_id)
    }

    /// The raw events of a stream after `version` (no snapshot), to bring a
    /// cached state up to date.
    pub async fn load_stream_after(
        &self,
        stream_id: &str,
        version: i64,
    ) -> Result<LoadedStream, ReadError> {
        let rows = self
            .fetch_all(sqlx::query(READ_STREAM_AFTER).bind(stream_id).bind(version))
            .await
            .map_err(db(format!(
                "loading stream {stream_id} after version {version}"
            )))?;
        LoadedStream::from_rows(rows, stream_id)
    }

    /// Reads versions `from..=to` of a stream, at most `limit` events.
    pub async fn read_stream(
        &self,
        stream_id: &str,
        from_version: i64,
        to_version: i64,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        let rows = sqlx::query(READ_STREAM)
            .bind(stream_id)
            .bind(from_version)
            .bind(to_version)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(db(format!("reading stream {stream_id}")))?;
        rows.iter().map(recorded).collect()
    }

    /// Reads the global log after `after`, at most `limit` events, gap-safely:
    /// an event is returned only once every transaction that could still
    /// commit a lower position has finished. Positions increase strictly.
    pub async fn read_all(&self, after: i64, limit: i64) -> Result<Vec<RecordedEvent>, ReadError> {
        let started = std::time::Instant::now();
        let rows = self
            .fetch_all(sqlx::query(READ_ALL).bind(after).bind(limit))
            .await
            .map_err(db(format!("reading the global log after position {after}")))?;
        super::note_duration("read_all", started.elapsed());
        rows.iter().map(recorded).collect()
    }

    /// Reads partition `partition` of `partitions` of the global log after
    /// `after` (see [`crate::partition`]), at most `limit` events, gap-safely
    /// as [`EventStore::read_all`]: what it returns is contiguous in the
    /// partition and nothing of the partition can later appear below it.
    pub async fn read_partition(
        &self,
        after: i64,
        limit: i64,
        partitions: u32,
        partition: u32,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        let started = std::time::Instant::now();
        let sql = with_partition(READ_PARTITION, partitions, partition);
        let rows = self
            .fetch_in_order(sqlx::query(&sql).bind(after).bind(limit))
            .await
            .map_err(db(format!(
                "reading partition {partition} of {partitions} of the log after position {after}"
            )))?;
        super::note_duration("read_partition", started.elapsed());
        rows.iter().map(recorded).collect()
    }

    /// The position of the last event of partition `partition` of
    /// `partitions` at or below `position` (0: none).
    pub async fn last_in_partition(
        &self,
        position: i64,
        partitions: u32,
        partition: u32,
    ) -> Result<i64, ReadError> {
        let sql = with_partition(LAST_IN_PARTITION, partitions, partition);
        let rows = self
            .fetch_in_order(sqlx::query(&sql).bind(position))
            .await
            .map_err(db(format!(
                "finding the last event of partition {partition} of {partitions} at or below position {position}"
            )))?;
        match rows.first() {
            Some(row) => row.try_get(0).map_err(db(format!(
                "reading the last event of partition {partition} of {partitions}"
            ))),
            None => Ok(0),
        }
    }

    /// Runs a read of one partition in position order with sorting turned
    /// off for the statement (`SET LOCAL enable_sort = off`, one round trip
    /// with its `BEGIN`), so that it walks the partition's index and stops
    /// at its limit. Left to its estimates the planner often chooses
    /// otherwise: it does not know a partition's share of the log (the
    /// partial indexes' predicate has no statistics; it assumes 0.5 %), and
    /// on a log loaded since the last `ANALYZE` it expects fewer rows than
    /// the limit — then it fetches the whole rest of the partition and
    /// sorts it, on disk, for every page: measured, 50–120 ms a page of
    /// 2,000 events instead of 4 ms, a rebuild's PostgreSQL time ×4.
    async fn fetch_in_order<'q>(
        &self,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<Vec<PgRow>, sqlx::Error> {
        let mut tx = self
            .pool
            .begin_with("BEGIN READ ONLY; SET LOCAL enable_sort = off")
            .await?;
        let rows = query.fetch_all(&mut *tx).await?;
        tx.commit().await?;
        Ok(rows)
    }

    /// The event `event_id` of `tenant` and its chain of causes, at most
    /// `depth` steps back, the event first (audit `why`); empty when the
    /// tenant has no such event.
    pub async fn read_causes_of_tenant(
        &self,
        tenant: &str,
        event_id: uuid::Uuid,
        depth: i32,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        let rows = sqlx::query(READ_CAUSES_OF_TENANT)
            .bind(tenant)
            .bind(event_id)
            .bind(depth)
            .fetch_all(&self.pool)
            .await
            .map_err(db(format!("following the causes of event {event_id}")))?;
        rows.iter().map(recorded).collect()
    }

    /// The event `event_id` of `tenant` and what it caused, at most `depth`
    /// steps forward and `limit` events, breadth first, the event first
    /// (audit `effects`); empty when the tenant has no such event.
    pub async fn read_effects_of_tenant(
        &self,
        tenant: &str,
        event_id: uuid::Uuid,
        depth: i32,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        let rows = sqlx::query(READ_EFFECTS_OF_TENANT)
            .bind(tenant)
            .bind(event_id)
            .bind(depth)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(db(format!("following the effects of event {event_id}")))?;
        rows.iter().map(recorded).collect()
    }

    /// Whether `tenant` has the event `event_id` (a command's cause);
    /// another tenant's event is as absent as an unknown one.
    pub async fn has_event_of_tenant(
        &self,
        tenant: &str,
        event_id: uuid::Uuid,
    ) -> Result<bool, ReadError> {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM events WHERE event_id = $2 AND tenant = $1)",
        )
        .bind(tenant)
        .bind(event_id)
        .fetch_one(&self.pool)
        .await
        .map_err(db(format!("looking up event {event_id}")))
    }

    /// The event `event_id` of `tenant` (audit proofs); another tenant's
    /// event reads as none.
    pub async fn read_event_of_tenant(
        &self,
        tenant: &str,
        event_id: uuid::Uuid,
    ) -> Result<Option<RecordedEvent>, ReadError> {
        let row = sqlx::query(READ_EVENT_OF_TENANT)
            .bind(tenant)
            .bind(event_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db(format!("reading event {event_id}")))?;
        row.as_ref().map(recorded).transpose()
    }

    /// Reads versions `from..=to` of a stream of `tenant`, at most `limit`
    /// events (audit). Another tenant's stream reads as empty.
    pub async fn read_stream_of_tenant(
        &self,
        tenant: &str,
        stream_id: &str,
        from_version: i64,
        to_version: i64,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        let rows = sqlx::query(READ_STREAM_OF_TENANT)
            .bind(tenant)
            .bind(stream_id)
            .bind(from_version)
            .bind(to_version)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(db(format!(
                "reading versions {from_version} to {to_version} of stream {stream_id}"
            )))?;
        rows.iter().map(recorded).collect()
    }

    /// The current version of a stream of `tenant`: 0 when it has no events
    /// or they belong to another tenant.
    pub async fn stream_version_of_tenant(
        &self,
        tenant: &str,
        stream_id: &str,
    ) -> Result<i64, ReadError> {
        sqlx::query_scalar(STREAM_VERSION_OF_TENANT)
            .bind(tenant)
            .bind(stream_id)
            .fetch_one(&self.pool)
            .await
            .map_err(db(format!("reading the version of stream {stream_id}")))
    }

    /// Reads the log of `tenant` after `after`, at most `limit` events,
    /// gap-safely (the horizon of [`EventStore::read_all`]): once an event at
    /// position `p` was returned, no event these filters select appears
    /// below `p` later. `event_types` keeps only those types (`None`: all);
    /// `correlation_id` keeps only one intent's events, across streams.
    /// Fewer than `limit` events means none more are readable now; more may
    /// become readable as running transactions finish.
    pub async fn read_log_of_tenant(
        &self,
        tenant: &str,
        after: i64,
        limit: i64,
        event_types: Option<&[String]>,
        correlation_id: Option<uuid::Uuid>,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        let query = match correlation_id {
            Some(correlation_id) => sqlx::query(READ_LOG_OF_CORRELATION)
                .bind(tenant)
                .bind(after)
                .bind(limit)
                .bind(event_types)
                .bind(correlation_id),
            None => sqlx::query(READ_LOG_OF_TENANT)
                .bind(tenant)
                .bind(after)
                .bind(limit)
                .bind(event_types),
        };
        let rows = query.fetch_all(&self.pool).await.map_err(db(format!(
            "reading the log of a tenant after position {after}"
        )))?;
        rows.iter().map(recorded).collect()
    }

    /// One tenant's events after `after` up to `until` (inclusive), at most
    /// `limit`, only of `types` if given, gap-safely (see
    /// [`EventStore::read_log_of_tenant`]). Fewer than `limit` events means
    /// the range is exhausted up to the horizon (at or above `until` when
    /// `until` came from [`EventStore::head`]'s `readable`).
    pub async fn read_tenant(
        &self,
        tenant: &str,
        after: i64,
        until: i64,
        limit: i64,
        types: Option<&[String]>,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        let mut events = self
            .read_log_of_tenant(tenant, after, limit, types, None)
            .await?;
        // Positions increase: what lies beyond `until` is a suffix.
        events.retain(|e| e.position <= until);
        Ok(events)
    }

    /// The events at `positions` (any order), in position order; positions
    /// not in the log are left out. For readers that learnt of positions
    /// elsewhere (the change feed) and need the whole events.
    pub async fn read_positions(&self, positions: &[i64]) -> Result<Vec<RecordedEvent>, ReadError> {
        if positions.is_empty() {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(READ_POSITIONS)
            .bind(positions)
            .fetch_all(&self.pool)
            .await
            .map_err(db(format!(
                "reading {} event(s) by position",
                positions.len()
            )))?;
        rows.iter().map(recorded).collect()
    }

    /// Every event command `command_id` of `tenant` produced, in order
    /// (empty if it never ran; another tenant's command of the same id is
    /// not this one).
    pub async fn events_of_command(
        &self,
        tenant: &str,
        command_id: uuid::Uuid,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        let rows = self
            .fetch_all(
                sqlx::query(EVENTS_OF_COMMAND)
                    .bind(crate::idempotency::event_id(tenant, command_id, 0))
                    .bind(command_id)
                    .bind(tenant)
                    .bind(crate::idempotency::legacy_event_id(command_id, 0)),
            )
            .await
            .map_err(db(format!("looking up command {command_id}")))?;
        rows.iter().map(recorded).collect()
    }

    /// How many events lie after `position`, counting at most `cap`.
    pub async fn count_after(&self, position: i64, cap: i64) -> Result<i64, ReadError> {
        sqlx::query_scalar(COUNT_AFTER)
            .bind(position)
            .bind(cap)
            .fetch_one(&self.pool)
            .await
            .map_err(db(format!("counting events after position {position}")))
    }

    /// How far a reader at `position` is behind: counted up to
    /// [`EXACT_LAG`] events, estimated beyond (counting millions of index
    /// entries took seconds per call, and status, `projectionStatus` and
    /// every metrics scrape ask).
    pub async fn lag(&self, position: i64) -> Result<Lag, ReadError> {
        let counted = self.count_after(position, EXACT_LAG + 1).await?;
        if counted <= EXACT_LAG {
            return Ok(Lag {
                events: counted,
                exact: true,
            });
        }
        let plan: Json<Value> = sqlx::query_scalar(ESTIMATE_AFTER)
            .bind(position)
            .fetch_one(&self.pool)
            .await
            .map_err(db(format!(
                "estimating the events after position {position}"
            )))?;
        let estimate = plan
            .0
            .pointer("/0/Plan/Plan Rows")
            .and_then(Value::as_f64)
            .unwrap_or(0.0);
        Ok(Lag {
            events: (estimate as i64).max(EXACT_LAG + 1),
            exact: false,
        })
    }

    /// The end of the log, to measure a reader's lag.
    pub async fn head(&self) -> Result<LogHead, ReadError> {
        let row = sqlx::query(HEAD)
            .fetch_one(&self.pool)
            .await
            .map_err(db("reading the head of the log"))?;
        Ok(LogHead {
            written: row.try_get(0).map_err(db("decoding the head of the log"))?,
            readable: row.try_get(1).map_err(db("decoding the head of the log"))?,
        })
    }
}

/// Decodes a full event row (the column order of `read_stream.sql`).
///
/// The metadata is parsed straight from the column's JSON into
/// [`EventMetadata`] (not through a `Value` tree: it is the larger half of
/// a row, and catch-up reads the whole log).
fn recorded(row: &PgRow) -> Result<RecordedEvent, ReadError> {
    let position: i64 = row.try_get(0).map_err(db("decoding an event row"))?;
    let metadata = match row.try_get::<Json<EventMetadata>, _>(7) {
        Ok(Json(metadata)) => metadata,
        Err(sqlx::Error::ColumnDecode { index, source }) => {
            return Err(match source.downcast::<serde_json::Error>() {
                Ok(source) => ReadError::Metadata {
                    position,
                    source: *source,
                },
                Err(source) => db(format!("decoding the event at position {position}"))(
                    sqlx::Error::ColumnDecode { index, source },
                ),
            })
        }
        Err(error) => {
            return Err(db(format!("decoding the event at position {position}"))(
                error,
            ))
        }
    };
    let decoded = (|| -> Result<_, sqlx::Error> {
        Ok((
            row.try_get::<String, _>(1)?,
            row.try_get::<i64, _>(2)?,
            row.try_get::<uuid::Uuid, _>(3)?,
            row.try_get::<String, _>(4)?,
            row.try_get::<i32, _>(5)?,
            row.try_get::<Value, _>(6)?,
            row.try_get::<time::OffsetDateTime, _>(8)?,
        ))
    })();
    let (stream_id, stream_version, event_id, event_type, schema_version, data, recorded_at) =
        decoded.map_err(db(format!("decoding the event at position {position}")))?;
    Ok(RecordedEvent {
        position,
        stream_id,
        stream_version,
        event_id,
        event_type,
        schema_version,
        data,
        metadata,
        recorded_at,
    })
}
