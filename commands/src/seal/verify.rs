//! `audit verify`: re-derives every leaf, tenant root, block root, chain
//! link and signature of the sealed log from the store, and compares the
//! stored seals with their JetStream copies. It stops at the first problem
//! and says where (the position or the seal) and what it is.

use std::collections::{BTreeMap, HashMap};

use async_nats::jetstream;
use sha2::{Digest, Sha256};
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row as _};
use uuid::Uuid;

use super::block::{block_root, TenantSummary};
use super::key::PublicKey;
use super::leaf::leaf as leaf_hash_of;
use super::merkle::{root, Hash};
use super::record::{body_digest, SealBody, SealRecord, GENESIS};
use super::sealer::HEADER_SEAL_SEQ;
use super::store::{self, StoredSeal};
use super::SealError;
use crate::envelope::{EventMetadata, RecordedEvent};

/// What to verify.
#[derive(Clone, Debug, Default)]
pub struct VerifyOptions {
    /// The log (the relay's stream name).
    pub log: String,
    /// Only this tenant's events (and the seals' signatures and chain).
    pub tenant: Option<String>,
    /// From the seal holding this position on.
    pub from: Option<i64>,
    /// Up to the seal holding this position.
    pub to: Option<i64>,
    /// The keys seals may be signed with.
    pub trusted: Vec<PublicKey>,
    /// The seal stream holding the seals' copies, if they are to be checked.
    pub copies: Option<String>,
    /// Stop after this many seals (the report says where it stopped).
    pub most_seals: Option<u64>,
}

/// The first thing that does not match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// The event at `position` is not what was sealed.
    Edited {
        /// Its position.
        position: i64,
        /// What the store holds there (stream and version).
        stream: String,
        /// What differs, as far as it can be told.
        what: String,
    },
    /// A sealed event is not in the store.
    Missing {
        /// Its position.
        position: i64,
    },
    /// The store holds an event inside a sealed range that was not sealed.
    Inserted {
        /// Its position.
        position: i64,
        /// Its stream.
        stream: String,
    },
    /// A seal's signature does not verify.
    BadSignature {
        /// The seal.
        seq: i64,
        /// The key it names.
        key: String,
    },
    /// A seal names a key that is not trusted.
    UnknownKey {
        /// The seal.
        seq: i64,
        /// The key it names.
        key: String,
    },
    /// The seals do not follow each other.
    ChainBroken {
        /// The seal where it breaks.
        seq: i64,
        /// How.
        what: String,
    },
    /// What is kept beside a seal does not give its signed root.
    SealAltered {
        /// The seal.
        seq: i64,
        /// What does not match.
        what: String,
    },
    /// A seal is on the seal stream and not in PostgreSQL.
    SealDeleted {
        /// The seal.
        seq: i64,
    },
    /// A seal differs from its copy on the seal stream.
    CopyDiffers {
        /// The seal.
        seq: i64,
    },
    /// A tombstone (an erased field) that no erasure event accounts for.
    Unaccounted {
        /// The tombstoned event's position.
        position: i64,
        /// What is wrong.
        what: String,
    },
}

impl Problem {
    /// A short name of the kind of problem.
    pub fn kind(&self) -> &'static str {
        match self {
            Problem::Edited { .. } => "edited",
            Problem::Missing { .. } => "missing",
            Problem::Inserted { .. } => "inserted",
            Problem::BadSignature { .. } => "bad signature",
            Problem::UnknownKey { .. } => "unknown key",
            Problem::ChainBroken { .. } => "seal chain broken",
            Problem::SealAltered { .. } => "seal altered",
            Problem::SealDeleted { .. } => "seal deleted",
            Problem::CopyDiffers { .. } => "seal differs from its copy",
            Problem::Unaccounted { .. } => "unaccounted tombstone",
        }
    }

    /// The position it is at, for the event problems.
    pub fn position(&self) -> Option<i64> {
        match self {
            Problem::Edited { position, .. }
            | Problem::Missing { position }
            | Problem::Inserted { position, .. }
            | Problem::Unaccounted { position, .. } => Some(*position),
            _ => None,
        }
    }

    /// The seal it is at, for the seal problems.
    pub fn seal(&self) -> Option<i64> {
        match self {
            Problem::BadSignature { seq, .. }
            | Problem::UnknownKey { seq, .. }
            | Problem::ChainBroken { seq, .. }
            | Problem::SealAltered { seq, .. }
            | Problem::SealDeleted { seq }
            | Problem::CopyDiffers { seq } => Some(*seq),
            _ => None,
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Edited { position, stream, what } => {
                write!(f, "edited: the event at position {position} ({stream}) {what}")
            }
            Problem::Missing { position } => write!(
                f,
                "missing: the event sealed at position {position} is not in the store"
            ),
            Problem::Inserted { position, stream } => write!(
                f,
                "inserted: the event at position {position} ({stream}) lies in a sealed range but was never sealed"
            ),
            Problem::BadSignature { seq, key } => {
                write!(f, "bad signature: seal {seq} is not signed by the key it names ({key})")
            }
            Problem::UnknownKey { seq, key } => write!(
                f,
                "bad signature: seal {seq} names the key {key}, which is not trusted"
            ),
            Problem::ChainBroken { seq, what } => write!(f, "seal chain broken at seal {seq}: {what}"),
            Problem::SealAltered { seq, what } => write!(f, "seal {seq} altered: {what}"),
            Problem::SealDeleted { seq } => write!(
                f,
                "seal deleted: seal {seq} is on the seal stream but not in PostgreSQL"
            ),
            Problem::CopyDiffers { seq } => write!(
                f,
                "seal {seq} in PostgreSQL differs from its copy on the seal stream"
            ),
            Problem::Unaccounted { position, what } => write!(
                f,
                "unaccounted tombstone: the event at position {position} has erased fields that {what}"
            ),
        }
    }
}

/// What a verification found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Seals checked.
    pub seals: u64,
    /// Events checked against them.
    pub events: u64,
    /// The last position checked.
    pub sealed_to: i64,
    /// Events after the last seal (the open block): not verified.
    pub unsealed: u64,
    /// Seals with no copy on the seal stream yet (the sealer copies them
    /// when JetStream is back).
    pub copies_missing: u64,
    /// The first problem, if any.
    pub problem: Option<Problem>,
    /// Whether it stopped at [`VerifyOptions::most_seals`] before the end.
    pub stopped_early: bool,
}

/// How far a verification got, for a progress bar.
#[derive(Clone, Copy, Debug, Default)]
pub struct VerifyProgress {
    /// Seals checked.
    pub seals: u64,
    /// Of how many.
    pub of: u64,
    /// Events checked.
    pub events: u64,
}

/// The event's columns and whether its tenant hash is its tenant's.
const EVENT_COLUMNS: &str = "position, stream_id, stream_version, event_id, event_type, \
    schema_version, data, metadata, recorded_at, command_id, correlation_id, tenant, \
    tenant_hash";

/// A seal's events in position order, at most `$3` ([`read_events`]).
static WHOLE_LOG_READ: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT {EVENT_COLUMNS} FROM events WHERE position > $1 AND position <= $2 \
         ORDER BY position LIMIT $3"
    )
});

/// A seal's events of tenant `$3`, in position order.
static TENANT_READ: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT {EVENT_COLUMNS} FROM events WHERE position > $1 AND position <= $2 \
         AND tenant = $3 ORDER BY position"
    )
});

/// The metadata as stored, read strictly: a field the format lacks is an
/// edit (the system would ignore it; the verifier does not).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StrictMetadata {
    event_id: Uuid,
    command_id: Uuid,
    command_type: String,
    command_hash: String,
    correlation_id: Uuid,
    causation_id: Uuid,
    actor: String,
    tenant: String,
    #[serde(with = "time::serde::rfc3339")]
    occurred_at: time::OffsetDateTime,
    traceparent: Option<String>,
}

impl From<StrictMetadata> for EventMetadata {
    fn from(m: StrictMetadata) -> Self {
        EventMetadata {
            event_id: m.event_id,
            command_id: m.command_id,
            command_type: m.command_type,
            command_hash: m.command_hash,
            correlation_id: m.correlation_id,
            causation_id: m.causation_id,
            actor: m.actor,
            tenant: m.tenant,
            occurred_at: m.occurred_at,
            traceparent: m.traceparent,
        }
    }
}

/// What is wrong with metadata that does not read strictly.
fn metadata_problem(error: &dyn std::fmt::Display) -> String {
    let text = error.to_string();
    match text
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split_once('`'))
    {
        Some((field, _)) => format!("has a metadata field the format lacks (`{field}`)"),
        None => format!("has metadata the system cannot read ({text})"),
    }
}

/// An event row as the verifier reads it: the event, or why it cannot be
/// one.
struct Row {
    position: i64,
    stream: String,
    event: Result<RecordedEvent, String>,
    /// The event's leaf hash (with the fields its tombstones name as
    /// erased), computed by the read, beside the checks of the seal before.
    hash: Option<Hash>,
}

fn db(doing: impl Into<String>) -> impl FnOnce(sqlx::Error) -> SealError {
    let doing = doing.into();
    move |source| SealError::Database { doing, source }
}

/// The partition key of each tenant met so far (`partition::hash`, as
/// PostgreSQL's `neurectomy_tenant_hash`), computed here rather than per row
/// by PostgreSQL.
#[derive(Default)]
struct TenantHashes(HashMap<String, i64>);

impl TenantHashes {
    fn of(&mut self, tenant: &str) -> i64 {
        if let Some(hash) = self.0.get(tenant) {
            return *hash;
        }
        let hash = i64::from(crate::partition::hash(tenant));
        self.0.insert(tenant.to_owned(), hash);
        hash
    }
}

fn read_row(row: &PgRow, hashes: &mut TenantHashes) -> Result<Row, sqlx::Error> {
    let position: i64 = row.try_get(0)?;
    let stream: String = row.try_get(1)?;
    let tenant: String = row.try_get(11)?;
    let event = (|| {
        let metadata: EventMetadata = match row.try_get::<sqlx::types::Json<StrictMetadata>, _>(7) {
            Ok(sqlx::types::Json(metadata)) => metadata.into(),
            Err(sqlx::Error::ColumnDecode { source, .. }) => {
                return Err(metadata_problem(&source));
            }
            Err(e) => return Err(format!("has metadata the system cannot read ({e})")),
        };
        let event_id: Uuid = row.try_get(3).map_err(|e| e.to_string())?;
        let command_id: Uuid = row.try_get(9).map_err(|e| e.to_string())?;
        let correlation_id: Uuid = row.try_get(10).map_err(|e| e.to_string())?;
        let stored_hash: Option<i64> = row.try_get(12).map_err(|e| e.to_string())?;
        let hash_ok = stored_hash.is_none_or(|h| h == hashes.of(&tenant));
        for (column, stored, in_metadata) in [
            ("event_id", event_id, metadata.event_id),
            ("command_id", command_id, metadata.command_id),
            ("correlation_id", correlation_id, metadata.correlation_id),
        ] {
            if stored != in_metadata {
                return Err(format!(
                    "has {column} {stored} in its column and {in_metadata} in its metadata"
                ));
            }
        }
        if tenant != metadata.tenant {
            return Err(format!(
                "has tenant `{tenant}` in its column and `{}` in its metadata",
                metadata.tenant
            ));
        }
        if !hash_ok {
            return Err("has a tenant_hash that is not its tenant's".into());
        }
        Ok(RecordedEvent {
            position,
            stream_id: stream.clone(),
            stream_version: row.try_get(2).map_err(|e| e.to_string())?,
            event_id,
            event_type: row.try_get(4).map_err(|e| e.to_string())?,
            schema_version: row.try_get(5).map_err(|e| e.to_string())?,
            data: row.try_get(6).map_err(|e| e.to_string())?,
            metadata,
            recorded_at: row.try_get(8).map_err(|e| e.to_string())?,
        })
    })();
    Ok(Row {
        position,
        stream,
        event,
        hash: None,
    })
}

/// Reads the events in `(after, through]` (of `tenant` only, if given);
/// of the whole log, at most `sealed + 1` of them (`sealed`: the seal's
/// leaves).
///
/// The whole log's read walks the primary key in order, with a limit: a
/// range alone let the planner pick a bitmap scan and a sort of the block's
/// rows (wide ones, with their documents), twice PostgreSQL's CPU per event
/// of reading the log in order. The limit hides nothing: one row more than
/// the seal's leaves is enough for the check to find the first row that
/// is not sealed, or the first leaf without its row, at its position. A
/// tenant's read keeps the plain range: a limit there would count other
/// tenants' rows and could cut off the tenant's own.
async fn read_events(
    pool: &PgPool,
    after: i64,
    through: i64,
    tenant: Option<&str>,
    sealed: usize,
) -> Result<Vec<Row>, SealError> {
    let query = match tenant {
        None => sqlx::query(&WHOLE_LOG_READ)
            .bind(after)
            .bind(through)
            .bind(i64::try_from(sealed).unwrap_or(i64::MAX - 1) + 1),
        Some(tenant) => sqlx::query(&TENANT_READ)
            .bind(after)
            .bind(through)
            .bind(tenant),
    };
    let rows = query.fetch_all(pool).await.map_err(db(format!(
        "reading the events after {after} through {through}"
    )))?;
    let mut hashes = TenantHashes::default();
    rows.iter()
        .map(|row| read_row(row, &mut hashes))
        .collect::<Result<_, _>>()
        .map_err(db("decoding an event row"))
}

/// Digests of the seal stream's copies, by seal number.
async fn copies(
    jetstream: &jetstream::Context,
    stream: &str,
) -> Result<BTreeMap<i64, Hash>, SealError> {
    let nats = |doing: &str, e: &dyn std::fmt::Display| SealError::JetStream {
        doing: doing.to_owned(),
        message: e.to_string(),
    };
    let mut found = BTreeMap::new();
    let mut stream = match jetstream.get_stream(stream).await {
        Ok(stream) => stream,
        Err(e)
            if matches!(
                e.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            ) =>
        {
            return Ok(found); // no stream yet: no copies
        }
        Err(e) => return Err(nats("opening the seal stream", &e)),
    };
    let info = stream
        .info()
        .await
        .map_err(|e| nats("reading the seal stream", &e))?;
    let (first, last) = (info.state.first_sequence, info.state.last_sequence);
    if info.state.messages == 0 {
        return Ok(found);
    }
    for sequence in first..=last {
        let message = match stream.get_raw_message(sequence).await {
            Ok(message) => message,
            Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => {
                continue
            }
            Err(e) => return Err(nats("reading the seal stream", &e)),
        };
        let seq = message
            .headers
            .get(HEADER_SEAL_SEQ)
            .and_then(|v| v.as_str().parse::<i64>().ok());
        if let Some(seq) = seq {
            found.insert(seq, Sha256::digest(&message.payload).into());
        }
    }
    Ok(found)
}

/// Verifies the sealed log (see the module docs); `progress` is called
/// after each seal.
pub async fn verify(
    pool: &PgPool,
    jetstream: Option<&jetstream::Context>,
    options: &VerifyOptions,
    mut progress: impl FnMut(VerifyProgress),
) -> Result<Report, SealError> {
    let log = options.log.as_str();
    let tenant = options.tenant.as_deref();
    let mut report = Report::default();
    let copies = match (jetstream, &options.copies) {
        (Some(js), Some(stream)) => Some(copies(js, stream).await?),
        _ => None,
    };
    let (last_seq, count) = store::extent(pool, log).await?;
    let trusted: HashMap<&str, &PublicKey> = options.trusted.iter().map(|k| (k.id(), k)).collect();

    // Where to start: seal 0, or the seal holding `from` (its predecessor
    // read for the chain link).
    let start = match options.from {
        Some(from) => store::covering(pool, log, from)
            .await?
            .map_or(count, |s| s.seq),
        None => 0,
    };
    let (mut prev, mut cursor) = if start == 0 {
        (GENESIS, i64::MIN)
    } else {
        match store::from_seq(pool, log, start - 1, 1).await?.pop() {
            Some(before) if before.seq == start - 1 => {
                (body_digest(&before.record.body), before.last)
            }
            _ => {
                report.problem = Some(Problem::ChainBroken {
                    seq: start,
                    what: format!("seal {} is not in PostgreSQL", start - 1),
                });
                return Ok(report);
            }
        }
    };
    let mut expected = start;
    let mut next = start;
    // Erasures checked so far: `None` when one accounts for its tombstones.
    let mut erasures: HashMap<Uuid, Option<String>> = HashMap::new();
    // The events of the next seal are read while this one's are hashed
    // (PostgreSQL's work and ours overlap): `(after, through)` and the task.
    let mut ahead = Ahead(std::collections::VecDeque::new());
    let read_ahead = |after: i64, through: i64, sealed: usize| {
        let (pool, tenant) = (pool.clone(), tenant.map(str::to_owned));
        tokio::spawn(
            async move { Events::read(&pool, after, through, tenant.as_deref(), sealed).await },
        )
    };
    'seals: loop {
        let seals = store::from_seq(pool, log, next, 50).await?;
        if seals.is_empty() {
            break;
        }
        for (i, seal) in seals.iter().enumerate() {
            next = seal.seq + 1;
            // This seal's events and the next seals' of this page are read
            // ahead, by the range each will be read with (a page's first
            // seal reads from where the last page ended).
            for k in i..=(i + READ_AHEAD).min(seals.len() - 1) {
                let after = if k == i { cursor } else { seals[k - 1].last };
                if ahead.0.iter().all(|(a, _, _)| *a != after) {
                    let (through, sealed) = (seals[k].last, seals[k].record.leaves.len());
                    ahead
                        .0
                        .push_back((after, through, read_ahead(after, through, sealed)));
                }
            }
            // The read of this seal's range; reads queued before it are of
            // ranges no longer wanted (a seal's range is not what the one
            // before it announced: it fails its checks below).
            let wanted = ahead
                .0
                .iter()
                .position(|(a, t, _)| *a == cursor && *t == seal.last);
            let task = wanted.and_then(|p| {
                for (_, _, stale) in ahead.0.drain(..p) {
                    stale.abort();
                }
                ahead.0.pop_front().map(|(_, _, task)| task)
            });
            let events = match task {
                Some(task) => match task.await {
                    Ok(events) => events?,
                    Err(_) => {
                        Events::read(pool, cursor, seal.last, tenant, seal.record.leaves.len())
                            .await?
                    }
                },
                None => {
                    Events::read(pool, cursor, seal.last, tenant, seal.record.leaves.len()).await?
                }
            };
            if let Some(problem) = check_seal(seal, expected, &prev, cursor, log, &trusted, &copies)
            {
                report.problem = Some(problem);
                return Ok(report);
            }
            if let Some(problem) =
                check_events(pool, seal, events, tenant, &mut report, &mut erasures).await?
            {
                report.problem = Some(problem);
                return Ok(report);
            }
            if let Some(problem) = check_copy(seal, &copies) {
                report.problem = Some(problem);
                return Ok(report);
            }
            prev = body_digest(&seal.record.body);
            cursor = seal.last;
            expected = seal.seq + 1;
            report.seals += 1;
            report.sealed_to = seal.last;
            if copies.as_ref().is_some_and(|c| !c.contains_key(&seal.seq)) {
                report.copies_missing += 1;
            }
            progress(VerifyProgress {
                seals: report.seals,
                of: u64::try_from(last_seq.map_or(0, |l| l + 1 - start)).unwrap_or(0),
                events: report.events,
            });
            if options.to.is_some_and(|to| seal.last >= to) {
                break 'seals;
            }
            if options.most_seals.is_some_and(|most| report.seals >= most) {
                report.stopped_early = seal.seq < last_seq.unwrap_or(seal.seq);
                return Ok(report);
            }
        }
    }
    // A seal on the stream beyond the last one stored: deleted from
    // PostgreSQL (the chain check finds one deleted in the middle).
    if options.to.is_none() {
        if let Some((&seq, _)) = copies.as_ref().and_then(|c| c.range(expected..).next()) {
            report.problem = Some(Problem::SealDeleted { seq });
            return Ok(report);
        }
        report.unsealed = unsealed(pool, cursor, tenant).await?;
    }
    Ok(report)
}

/// Events after the last seal.
async fn unsealed(pool: &PgPool, after: i64, tenant: Option<&str>) -> Result<u64, SealError> {
    let count: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE position > $1 AND ($2::text IS NULL OR tenant = $2)",
    )
    .bind(after)
    .bind(tenant)
    .fetch_one(pool)
    .await
    .map_err(db("counting the unsealed events"))?;
    Ok(u64::try_from(count).unwrap_or(0))
}

/// The seal itself: number, chain link, range, signature, root, copy.
fn check_seal(
    seal: &StoredSeal,
    expected: i64,
    prev: &Hash,
    cursor: i64,
    log: &str,
    trusted: &HashMap<&str, &PublicKey>,
    copies: &Option<BTreeMap<i64, Hash>>,
) -> Option<Problem> {
    let seq = seal.seq;
    // (`copies` only to tell a deleted seal from a missing one.)
    if seq != expected {
        if copies.as_ref().is_some_and(|c| c.contains_key(&expected)) {
            return Some(Problem::SealDeleted { seq: expected });
        }
        return Some(Problem::ChainBroken {
            seq,
            what: format!("seal {expected} is missing"),
        });
    }
    let body = match SealBody::parse(&seal.record.body) {
        Ok(body) => body,
        Err(e) => return Some(Problem::SealAltered { seq, what: e.what }),
    };
    let Some(key) = trusted.get(body.key.as_str()) else {
        return Some(Problem::UnknownKey { seq, key: body.key });
    };
    if !key.verifies(&seal.record.body, &seal.record.signature) {
        return Some(Problem::BadSignature { seq, key: body.key });
    }
    if body.seq != u64::try_from(seq).unwrap_or(u64::MAX) || body.log != log {
        return Some(Problem::SealAltered {
            seq,
            what: format!(
                "it is stored as seal {seq} of {log} and signed as seal {} of {}",
                body.seq, body.log
            ),
        });
    }
    if body.prev != *prev {
        return Some(Problem::ChainBroken {
            seq,
            what: "its `prev` is not the digest of the seal before it".into(),
        });
    }
    if body.first <= cursor || body.first != seal.first || body.last != seal.last {
        return Some(Problem::ChainBroken {
            seq,
            what: format!(
                "its range {}..={} overlaps the seal before it or is not the stored range",
                body.first, body.last
            ),
        });
    }
    let tenants = &seal.record.tenants;
    if block_root(tenants) != body.root
        || tenants.len() as u64 != body.tenants
        || tenants.iter().map(|t| t.count as u64).sum::<u64>() != body.count
    {
        return Some(Problem::SealAltered {
            seq,
            what: "its tenants' summaries do not give its signed root".into(),
        });
    }
    None
}

/// The seal against its copy on the seal stream (after its events: what
/// differs there says more than that the copy differs).
fn check_copy(seal: &StoredSeal, copies: &Option<BTreeMap<i64, Hash>>) -> Option<Problem> {
    let copy = copies.as_ref()?.get(&seal.seq)?;
    let mine: Hash = Sha256::digest(seal.record.to_message()).into();
    (mine != *copy).then_some(Problem::CopyDiffers { seq: seal.seq })
}

/// The seal's events: each stored leaf against the event at its position,
/// each tenant's recomputed root against its summary.
async fn check_events(
    pool: &PgPool,
    seal: &StoredSeal,
    events: Events,
    tenant: Option<&str>,
    report: &mut Report,
    erasures: &mut HashMap<Uuid, Option<String>>,
) -> Result<Option<Problem>, SealError> {
    let record: &SealRecord = &seal.record;
    let only = match tenant {
        Some(t) => match record.tenants.iter().position(|s| s.tenant == t) {
            Some(i) => Some(u32::try_from(i).unwrap_or(u32::MAX)),
            None => Some(u32::MAX), // none of its events here
        },
        None => None,
    };
    let sealed: Vec<_> = record
        .leaves
        .iter()
        .filter(|l| only.is_none_or(|t| l.tenant == t))
        .collect();
    if record.leaves.len() as u64 != record.tenants.iter().map(|t| t.count as u64).sum::<u64>()
        || record
            .leaves
            .windows(2)
            .any(|w| w[0].position >= w[1].position)
        || record.leaves.first().map(|l| l.position) != Some(seal.first)
        || record.leaves.last().map(|l| l.position) != Some(seal.last)
    {
        return Ok(Some(Problem::SealAltered {
            seq: seal.seq,
            what: "its leaves do not match its range and counts".into(),
        }));
    }
    let Events { rows, tombstones } = events;
    for (position, tombstone) in &tombstones {
        for erasure in &tombstone.erasures {
            if !erasures.contains_key(erasure) {
                let verdict = check_erasure(pool, *erasure).await?;
                erasures.insert(*erasure, verdict);
            }
            if let Some(Some(what)) = erasures.get(erasure) {
                return Ok(Some(Problem::Unaccounted {
                    position: *position,
                    what: what.clone(),
                }));
            }
        }
    }
    // Merge the store's rows with the sealed leaves by position.
    let mut recomputed: BTreeMap<u32, Vec<Hash>> = BTreeMap::new();
    let (mut r, mut s) = (0, 0);
    while r < rows.len() || s < sealed.len() {
        let row = rows.get(r);
        let leaf = sealed.get(s);
        match (row, leaf) {
            (Some(row), Some(leaf)) if row.position == leaf.position => {
                let event = match &row.event {
                    Ok(event) => event,
                    Err(what) => {
                        return Ok(Some(Problem::Edited {
                            position: row.position,
                            stream: row.stream.clone(),
                            what: what.clone(),
                        }))
                    }
                };
                let erased = match tombstones.get(&row.position) {
                    Some(tombstone) => {
                        if tombstone.event_id != event.event_id {
                            return Ok(Some(Problem::Unaccounted {
                                position: row.position,
                                what: format!(
                                    "are recorded for event {}, not for the event {} there",
                                    tombstone.event_id, event.event_id
                                ),
                            }));
                        }
                        if let Some(field) =
                            tombstone.fields.iter().find(|f| !holds_digest(event, f))
                        {
                            return Ok(Some(Problem::Edited {
                                position: row.position,
                                stream: row.stream.clone(),
                                what: format!(
                                    "holds a value in its erased field `{field}`, not the field's digest"
                                ),
                            }));
                        }
                        tombstone.fields.iter().map(String::as_str).collect()
                    }
                    None => Vec::new(),
                };
                // The read hashed it with these same erased fields.
                let hash = row.hash.unwrap_or_else(|| leaf_hash_of(event, &erased));
                if hash != leaf.hash {
                    return Ok(Some(Problem::Edited {
                        position: row.position,
                        stream: row.stream.clone(),
                        what: "does not match its sealed leaf".into(),
                    }));
                }
                let t = record
                    .tenants
                    .get(leaf.tenant as usize)
                    .map(|s| s.tenant.as_str());
                if t != Some(event.metadata.tenant.as_str()) {
                    return Ok(Some(Problem::Edited {
                        position: row.position,
                        stream: row.stream.clone(),
                        what: "is sealed under another tenant".into(),
                    }));
                }
                recomputed.entry(leaf.tenant).or_default().push(hash);
                report.events += 1;
                r += 1;
                s += 1;
            }
            (Some(row), Some(leaf)) if row.position > leaf.position => {
                return Ok(Some(Problem::Missing {
                    position: leaf.position,
                }));
            }
            (None, Some(leaf)) => {
                return Ok(Some(Problem::Missing {
                    position: leaf.position,
                }))
            }
            (Some(row), _) => {
                return Ok(Some(Problem::Inserted {
                    position: row.position,
                    stream: row.stream.clone(),
                }))
            }
            (None, None) => break,
        }
    }
    // The events check out one by one; their tenants' trees must give the
    // summaries the signed root is made of (else the stored leaves were
    // rewritten to match rewritten events).
    for (index, summary) in record.tenants.iter().enumerate() {
        let index = u32::try_from(index).unwrap_or(u32::MAX);
        if only.is_some_and(|t| t != index) {
            continue;
        }
        let leaves = recomputed.remove(&index).unwrap_or_default();
        let rebuilt = TenantSummary {
            tenant: summary.tenant.clone(),
            count: leaves.len(),
            root: root(&leaves),
        };
        if rebuilt != *summary {
            return Ok(Some(Problem::SealAltered {
                seq: seal.seq,
                what: format!(
                    "the events of tenant `{}` do not give the root it signs (its stored leaves were rewritten)",
                    summary.tenant
                ),
            }));
        }
    }
    Ok(None)
}

/// The events of one seal's range, and their tombstones.
struct Events {
    rows: Vec<Row>,
    tombstones: BTreeMap<i64, Tombstone>,
}

impl Events {
    /// The events in `(after, through]` (of `tenant` only, if given).
    async fn read(
        pool: &PgPool,
        after: i64,
        through: i64,
        tenant: Option<&str>,
        sealed: usize,
    ) -> Result<Self, SealError> {
        let mut rows = read_events(pool, after, through, tenant, sealed).await?;
        let tombstones = read_tombstones(pool, after, through, tenant).await?;
        // Hashed here, in the read ahead, so the hashing of one block and the
        // checks of the one before it run side by side.
        for row in &mut rows {
            if let Ok(event) = &row.event {
                let erased: Vec<&str> = tombstones
                    .get(&row.position)
                    .map(|t| t.fields.iter().map(String::as_str).collect())
                    .unwrap_or_default();
                row.hash = Some(leaf_hash_of(event, &erased));
            }
        }
        Ok(Self { rows, tombstones })
    }
}

/// Reads of the next seals' events under way, in order (`(after, through)`
/// and the task); aborted if not used.
type Reading = (i64, i64, tokio::task::JoinHandle<Result<Events, SealError>>);
struct Ahead(std::collections::VecDeque<Reading>);

/// How many seals' events are read ahead of the one being checked.
const READ_AHEAD: usize = 2;

impl Drop for Ahead {
    fn drop(&mut self) {
        for (_, _, task) in self.0.drain(..) {
            task.abort();
        }
    }
}

/// The tombstones of one event: the fields erased and by which erasures.
struct Tombstone {
    event_id: Uuid,
    fields: Vec<String>,
    erasures: Vec<Uuid>,
}

/// The tombstones in `(after, through]` (of `tenant` only, if given), by
/// position.
async fn read_tombstones(
    pool: &PgPool,
    after: i64,
    through: i64,
    tenant: Option<&str>,
) -> Result<BTreeMap<i64, Tombstone>, SealError> {
    let rows: Vec<(i64, Uuid, Vec<String>, Uuid)> = sqlx::query_as(
        "SELECT position, event_id, fields, erasure FROM tombstones \
         WHERE position > $1 AND position <= $2 AND ($3::text IS NULL OR tenant = $3) \
         ORDER BY position",
    )
    .bind(after)
    .bind(through)
    .bind(tenant)
    .fetch_all(pool)
    .await
    .map_err(db("reading the tombstones"))?;
    let mut found: BTreeMap<i64, Tombstone> = BTreeMap::new();
    for (position, event_id, fields, erasure) in rows {
        let tombstone = found.entry(position).or_insert_with(|| Tombstone {
            event_id,
            fields: Vec::new(),
            erasures: Vec::new(),
        });
        if tombstone.event_id != event_id {
            // Two tombstones of one position naming different events: the
            // first one's check against the event fails.
            tombstone.event_id = Uuid::nil();
        }
        for field in fields {
            if !tombstone.fields.contains(&field) {
                tombstone.fields.push(field);
            }
        }
        tombstone.erasures.push(erasure);
    }
    Ok(found)
}

/// Whether the event's field `field` (of its data, or `actor`) holds a
/// digest.
fn holds_digest(event: &RecordedEvent, field: &str) -> bool {
    if domain::personal::PERSONAL_METADATA.contains(&field) {
        return crate::erasure::is_digest_str(&event.metadata.actor);
    }
    event.data.get(field).is_some_and(crate::erasure::is_digest)
}

/// Whether the erasure event `erasure` accounts for exactly the tombstones
/// that name it: `None` when it does, else what is wrong.
async fn check_erasure(pool: &PgPool, erasure: Uuid) -> Result<Option<String>, SealError> {
    let event: Option<(i64, String, String, i32, serde_json::Value)> = sqlx::query_as(
        "SELECT position, tenant, event_type, schema_version, data FROM events WHERE event_id = $1",
    )
    .bind(erasure)
    .fetch_optional(pool)
    .await
    .map_err(db("reading an erasure event"))?;
    let Some((position, tenant, event_type, schema_version, data)) = event else {
        return Ok(Some(format!(
            "name erasure {erasure}, which is not in the log"
        )));
    };
    let (count, digest) = match domain::DomainEvent::from_stored(&event_type, schema_version, data)
    {
        Ok(domain::DomainEvent::Erasure(domain::ErasureEvent::PersonalDataErased {
            tombstones,
            tombstone_digest,
            ..
        })) => (tombstones, tombstone_digest),
        _ => {
            return Ok(Some(format!(
                "name event {erasure}, which is not an erasure (`{event_type}`)"
            )))
        }
    };
    let rows: Vec<(i64, Uuid, Vec<String>, String)> = sqlx::query_as(
        "SELECT position, event_id, fields, tenant FROM tombstones WHERE erasure = $1",
    )
    .bind(erasure)
    .fetch_all(pool)
    .await
    .map_err(db("reading an erasure's tombstones"))?;
    let mut listed = Vec::with_capacity(rows.len());
    for (p, id, fields, t) in rows {
        if t != tenant || p >= position {
            return Ok(Some(format!(
                "erasure {erasure} (tenant `{tenant}`, position {position}) cannot have erased: its tombstone at {p} is of tenant `{t}`"
            )));
        }
        listed.push((p, id, fields));
    }
    if listed.len() as u64 != count || crate::erasure::tombstone_digest(&listed) != digest {
        return Ok(Some(format!(
            "erasure {erasure} does not account for: it records {count} tombstones and their digest, the store holds {} that do not match them",
            listed.len()
        )));
    }
    Ok(None)
}
