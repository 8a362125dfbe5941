//! The sealed log in GraphQL (role `auditor`, the caller's tenant only):
//! the public keys, an event's inclusion proof with its signed seal, and a
//! verification of the tenant's events against the seals. What the proof
//! holds is what the README's "Sealed audit log" formats need to check it
//! in another language, with the public key alone.

use async_graphql::{Context, Enum, Json, SimpleObject, ID};
use base64::Engine as _;
use commands::seal::block::EventProof;
use commands::seal::key::PublicKey;
use commands::seal::leaf::{committed_data, committed_metadata, leaf_bytes, leaf_value};
use commands::seal::merkle::leaf_hash;
use commands::seal::record::SealBody;
use commands::seal::verify::{verify, Problem, VerifyOptions};
use commands::seal::{store, SealError};
use uuid::Uuid;

use crate::auth::Role;
use crate::graphql::{caller, services, Position};

/// What the API knows of the sealing: the log's name and the keys seals
/// may be signed with (the sealing key's and the trusted ones).
#[derive(Clone, Debug, Default)]
pub struct Seals {
    /// The log (the relay's stream name).
    pub log: String,
    /// The trusted public keys.
    pub keys: Vec<PublicKey>,
}

/// Most seals one `verifyLog` call checks.
pub const VERIFY_SEALS_PER_CALL: u64 = 200;

/// A public key seals are checked against.
#[derive(Debug, Clone, SimpleObject)]
pub struct SealKey {
    /// `ed25519:` and 16 hex digits: the id seals name.
    pub id: String,
    /// Always `Ed25519`.
    pub algorithm: String,
    /// The 32-byte public key, base64.
    pub public_key: String,
}

/// Whether an event is covered by a seal yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
pub enum SealState {
    /// In a signed seal: the proof checks it.
    Sealed,
    /// In the open block: not sealed yet (ask again within `seal.block_ms`).
    Unsealed,
}

/// A signed seal.
#[derive(Debug, Clone, SimpleObject)]
pub struct Seal {
    /// Its number, from 0.
    pub seq: i64,
    /// The signed body: canonical JSON, byte for byte.
    pub body: String,
    /// Ed25519 signature of `body`, base64.
    pub signature: String,
    /// The id of the key that signed it.
    pub key_id: String,
    /// The block root it signs (hex).
    pub root: String,
    /// Its block's first position.
    pub first: Position,
    /// Its block's last position.
    pub last: Position,
}

/// An event's proof of inclusion in a signed seal.
#[derive(Debug, Clone, SimpleObject)]
pub struct AuditProof {
    /// Sealed, or still in the open block.
    pub state: SealState,
    /// The event's position.
    pub position: Position,
    /// The leaf's fields (`data` and `metadata` as the digests it holds),
    /// with the committed data and metadata whole beside them
    /// (`committedData`, `committedMetadata`: personal fields replaced by
    /// their digests), so that the leaf can be re-derived.
    pub committed: Json<serde_json::Value>,
    /// The leaf: canonical JSON.
    pub leaf: String,
    /// SHA-256(0x00 ‖ leaf), hex.
    pub leaf_hash: String,
    /// The event's index among its tenant's events in the block.
    pub index: Option<i32>,
    /// How many events the tenant has in the block.
    pub count: Option<i32>,
    /// Sibling hashes from the leaf to the tenant's root (hex).
    pub tenant_path: Vec<String>,
    /// The tenant's index among the block's tenants.
    pub tenant_index: Option<i32>,
    /// How many tenants the block has.
    pub tenants: Option<i32>,
    /// Sibling hashes from the tenant's leaf to the block root (hex).
    pub block_path: Vec<String>,
    /// The signed seal (none while unsealed).
    pub seal: Option<Seal>,
}

/// The first thing that does not match.
#[derive(Debug, Clone, SimpleObject)]
pub struct LogProblem {
    /// `edited`, `missing`, `inserted`, `bad signature`, `unknown key`,
    /// `seal chain broken`, `seal altered`.
    pub kind: String,
    /// The position it is at (event problems).
    pub position: Option<Position>,
    /// The seal it is at (seal problems).
    pub seal: Option<i64>,
    /// What differs.
    pub message: String,
}

/// A verification of the tenant's events against the seals.
#[derive(Debug, Clone, SimpleObject)]
pub struct LogVerification {
    /// No problem found in what was checked.
    pub clean: bool,
    /// Seals checked (every seal's signature and chain link).
    pub seals: i64,
    /// The tenant's events checked.
    pub events: i64,
    /// The last position checked.
    pub verified_to: Position,
    /// More seals follow within the range: call again with `from` =
    /// `verifiedTo` + 1.
    pub has_more: bool,
    /// The tenant's events after the last seal (the open block): not
    /// verified (only when the range reaches the end of the log).
    pub unsealed: i64,
    /// The first problem, if any.
    pub problem: Option<LogProblem>,
}

fn seal_error(e: SealError) -> async_graphql::Error {
    match e {
        SealError::Database { .. } | SealError::Read(commands::ReadError::Database { .. }) => {
            crate::error::unavailable("the event store", e)
        }
        other => crate::error::internal(
            "the sealed log cannot be read; an operator has been told",
            format_args!("audit proof: {other}"),
        ),
    }
}

fn hexes(hashes: &[[u8; 32]]) -> Vec<String> {
    hashes.iter().map(hex::encode).collect()
}

fn small(n: usize) -> Option<i32> {
    i32::try_from(n).ok()
}

/// `sealKeys`.
pub fn seal_keys(ctx: &Context<'_>) -> async_graphql::Result<Vec<SealKey>> {
    caller(ctx, Role::Auditor)?;
    Ok(services(ctx)
        .seals
        .keys
        .iter()
        .map(|k| SealKey {
            id: k.id().to_owned(),
            algorithm: "Ed25519".to_owned(),
            public_key: k.text(),
        })
        .collect())
}

/// `auditProof(eventId)`.
pub async fn audit_proof(ctx: &Context<'_>, event_id: ID) -> async_graphql::Result<AuditProof> {
    let who = caller(ctx, Role::Auditor)?;
    let services = services(ctx);
    let id = Uuid::parse_str(event_id.trim()).map_err(|_| {
        crate::error::validation(format!(
            "`eventId` must be an event's UUID (as in event metadata), not {:?}",
            event_id.as_str()
        ))
    })?;
    // The same answer whether the id is another tenant's or nobody's.
    let event = services
        .store
        .read_event_of_tenant(&who.tenant, id)
        .await
        .map_err(|e| seal_error(SealError::Read(e)))?
        .ok_or_else(|| crate::error::not_found(format!("event {id} does not exist")))?;
    // Fields erased (README, "Erasure") hold their digests already.
    let tombstoned = commands::erasure::tombstoned(services.store.pool(), &[event.position])
        .await
        .map_err(|e| crate::error::unavailable("the event store", e))?;
    let erased: Vec<&str> = tombstoned
        .get(&event.position)
        .map(|fields| fields.iter().map(String::as_str).collect())
        .unwrap_or_default();
    let leaf = leaf_bytes(&event, &erased);
    let hash = leaf_hash(&leaf);
    // The leaf's fields, with the committed data and metadata beside the
    // digests of them it holds.
    let mut committed = leaf_value(&event, &erased);
    committed["committedData"] = committed_data(&event, &erased);
    committed["committedMetadata"] = committed_metadata(&event, &erased);
    let mut proof = AuditProof {
        state: SealState::Unsealed,
        position: Position(event.position),
        committed: Json(committed),
        leaf: String::from_utf8_lossy(&leaf).into_owned(),
        leaf_hash: hex::encode(hash),
        index: None,
        count: None,
        tenant_path: Vec::new(),
        tenant_index: None,
        tenants: None,
        block_path: Vec::new(),
        seal: None,
    };
    let seal = store::covering(services.store.pool(), &services.seals.log, event.position)
        .await
        .map_err(seal_error)?;
    let Some(seal) = seal.filter(|s| s.first <= event.position) else {
        return Ok(proof);
    };
    let record = &seal.record;
    let tenant_index = record.tenants.iter().position(|t| t.tenant == who.tenant);
    let leaves: Vec<[u8; 32]> = match tenant_index {
        Some(t) => record
            .leaves
            .iter()
            .filter(|l| l.tenant as usize == t)
            .map(|l| l.hash)
            .collect(),
        None => Vec::new(),
    };
    let index = record
        .leaves
        .iter()
        .filter(|l| Some(l.tenant as usize) == tenant_index)
        .position(|l| l.position == event.position);
    let made = index.and_then(|i| EventProof::new(&record.tenants, &who.tenant, &leaves, i));
    let Some(made) = made else {
        // Sealed range, but not this event as it is now: `verifyLog` says
        // what differs.
        return Err(crate::error::internal(
            "the event is not in the seal of its position; run verifyLog",
            format_args!(
                "audit proof: event at {} not among seal {}'s leaves",
                event.position, seal.seq
            ),
        ));
    };
    let body = SealBody::parse(&record.body).map_err(|e| {
        seal_error(SealError::Stored {
            seq: seal.seq,
            what: e.what,
        })
    })?;
    proof.state = SealState::Sealed;
    proof.index = small(made.index);
    proof.count = small(made.count);
    proof.tenant_path = hexes(&made.tenant_path);
    proof.tenant_index = small(made.tenant_index);
    proof.tenants = small(made.tenants);
    proof.block_path = hexes(&made.block_path);
    proof.seal = Some(Seal {
        seq: seal.seq,
        body: String::from_utf8_lossy(&record.body).into_owned(),
        signature: base64::engine::general_purpose::STANDARD.encode(&record.signature),
        key_id: body.key,
        root: hex::encode(body.root),
        first: Position(seal.first),
        last: Position(seal.last),
    });
    Ok(proof)
}

/// `verifyLog(from, to)`.
pub async fn verify_log(
    ctx: &Context<'_>,
    from: Option<Position>,
    to: Option<Position>,
) -> async_graphql::Result<LogVerification> {
    let who = caller(ctx, Role::Auditor)?;
    let services = services(ctx);
    if let (Some(from), Some(to)) = (from, to) {
        if from.0 > to.0 {
            return Err(crate::error::validation(format!(
                "`from` ({}) is after `to` ({}); ask for from <= to",
                from.0, to.0
            )));
        }
    }
    let options = VerifyOptions {
        log: services.seals.log.clone(),
        tenant: Some(who.tenant.clone()),
        from: from.map(|p| p.0),
        to: to.map(|p| p.0),
        trusted: services.seals.keys.clone(),
        copies: None,
        most_seals: Some(VERIFY_SEALS_PER_CALL),
    };
    let report = verify(services.store.pool(), None, &options, |_| {})
        .await
        .map_err(seal_error)?;
    Ok(LogVerification {
        clean: report.problem.is_none(),
        seals: i64::try_from(report.seals).unwrap_or(i64::MAX),
        events: i64::try_from(report.events).unwrap_or(i64::MAX),
        verified_to: Position(report.sealed_to),
        has_more: report.stopped_early,
        unsealed: i64::try_from(report.unsealed).unwrap_or(i64::MAX),
        problem: report.problem.map(|p: Problem| LogProblem {
            kind: p.kind().to_owned(),
            position: p.position().map(Position),
            seal: p.seal(),
            message: p.to_string(),
        }),
    })
}
