//! A seal: the signed statement of one block of the log, chained to the
//! seal before it.
//!
//! The signed bytes (the *body*) are the canonical JSON (RFC 8785) of
//!
//! ```text
//! {"count":<events>,"first":"<first position>","key":"<key id>",
//!  "last":"<last position>","log":"<log name>","prev":"<hex digest of the previous body>",
//!  "root":"<hex block root>","sealed_at":"<UTC, microseconds, Z>","seq":<n>,
//!  "tenants":<tenants in the block>,"v":1}
//! ```
//!
//! Seals are numbered from 0; seal 0's `prev` is 64 zeros, every other's
//! is the SHA-256 of the previous seal's body. The signature is Ed25519 over
//! the body. Beside each seal are kept, unsigned (the root commits to
//! them): the tenants' summaries (name, count, root; in block order) and,
//! per event in log order, its position, its tenant's index among the
//! summaries and its leaf hash — what proofs and the verifier need without
//! re-deriving the block. The seal stream's copy holds the body, the
//! signature and the summaries.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use super::block::TenantSummary;
use super::jcs::canonical;
use super::leaf::timestamp;
use super::merkle::Hash;

/// The seal format's version (`"v"` in every body).
pub const SEAL_VERSION: u32 = 1;

/// `prev` of seal 0.
pub const GENESIS: Hash = [0; 32];

/// A stored seal that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("seal {seq}: {what}")]
pub struct SealFormatError {
    /// The seal's number (-1 when unknown).
    pub seq: i64,
    /// What is wrong with it.
    pub what: String,
}

/// What a seal's body states.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealBody {
    /// The log (the relay's stream name).
    pub log: String,
    /// The seal's number, from 0.
    pub seq: u64,
    /// The block's first and last positions.
    pub first: i64,
    /// The block's last position.
    pub last: i64,
    /// Events in the block.
    pub count: u64,
    /// Tenants in the block.
    pub tenants: u64,
    /// The block's root.
    pub root: Hash,
    /// SHA-256 of the previous seal's body ([`GENESIS`] for seal 0).
    pub prev: Hash,
    /// The signing key's id.
    pub key: String,
    /// When it was sealed (microseconds).
    pub sealed_at: OffsetDateTime,
}

fn hash_field(value: &Value, name: &str, seq: i64) -> Result<Hash, SealFormatError> {
    let text = value[name].as_str().unwrap_or_default();
    let bytes = hex::decode(text).unwrap_or_default();
    bytes.try_into().map_err(|_| SealFormatError {
        seq,
        what: format!("`{name}` is not 64 hex digits"),
    })
}

impl SealBody {
    /// The canonical bytes that are signed.
    pub fn canonical(&self) -> Vec<u8> {
        canonical(&json!({
            "count": self.count,
            "first": self.first.to_string(),
            "key": self.key,
            "last": self.last.to_string(),
            "log": self.log,
            "prev": hex::encode(self.prev),
            "root": hex::encode(self.root),
            "sealed_at": timestamp(self.sealed_at),
            "seq": self.seq,
            "tenants": self.tenants,
            "v": SEAL_VERSION,
        }))
    }

    /// Reads a body; it must be canonical (re-encoding gives the same bytes).
    pub fn parse(bytes: &[u8]) -> Result<Self, SealFormatError> {
        let bad = |what: &str| SealFormatError {
            seq: -1,
            what: what.to_owned(),
        };
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| bad(&format!("not JSON: {e}")))?;
        let seq = value["seq"].as_u64().ok_or_else(|| bad("no `seq`"))?;
        let iseq = i64::try_from(seq).unwrap_or(-1);
        let position = |name: &str| -> Result<i64, SealFormatError> {
            value[name]
                .as_str()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| SealFormatError {
                    seq: iseq,
                    what: format!("`{name}` is not a position"),
                })
        };
        let sealed_at = value["sealed_at"]
            .as_str()
            .and_then(|s| {
                OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
            })
            .ok_or_else(|| SealFormatError {
                seq: iseq,
                what: "`sealed_at` is not a time".into(),
            })?;
        let body = Self {
            log: value["log"].as_str().unwrap_or_default().to_owned(),
            seq,
            first: position("first")?,
            last: position("last")?,
            count: value["count"].as_u64().unwrap_or(0),
            tenants: value["tenants"].as_u64().unwrap_or(0),
            root: hash_field(&value, "root", iseq)?,
            prev: hash_field(&value, "prev", iseq)?,
            key: value["key"].as_str().unwrap_or_default().to_owned(),
            sealed_at,
        };
        if value["v"] != json!(SEAL_VERSION) || body.canonical() != bytes {
            return Err(SealFormatError {
                seq: iseq,
                what: "the body is not a canonical version-1 seal".into(),
            });
        }
        Ok(body)
    }
}

/// SHA-256 of a seal's body: the next seal's `prev`.
pub fn body_digest(body: &[u8]) -> Hash {
    Sha256::digest(body).into()
}

/// One event of a sealed block, as kept beside its seal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SealedLeaf {
    /// The event's position.
    pub position: i64,
    /// Its tenant's index among the block's tenant summaries.
    pub tenant: u32,
    /// Its leaf hash.
    pub hash: Hash,
}

/// Bytes per [`SealedLeaf`] in [`encode_leaves`].
pub const LEAF_RECORD: usize = 8 + 4 + 32;

/// The leaves as kept: per leaf, the position (8 bytes, big-endian,
/// two's complement), the tenant index (4 bytes, big-endian), the hash.
pub fn encode_leaves(leaves: &[SealedLeaf]) -> Vec<u8> {
    let mut out = Vec::with_capacity(leaves.len() * LEAF_RECORD);
    for leaf in leaves {
        out.extend_from_slice(&leaf.position.to_be_bytes());
        out.extend_from_slice(&leaf.tenant.to_be_bytes());
        out.extend_from_slice(&leaf.hash);
    }
    out
}

/// Reads [`encode_leaves`]' bytes; `None` when their length is no multiple
/// of a record.
pub fn decode_leaves(bytes: &[u8]) -> Option<Vec<SealedLeaf>> {
    if bytes.len() % LEAF_RECORD != 0 {
        return None;
    }
    bytes
        .chunks_exact(LEAF_RECORD)
        .map(|record| {
            Some(SealedLeaf {
                position: i64::from_be_bytes(record[..8].try_into().ok()?),
                tenant: u32::from_be_bytes(record[8..12].try_into().ok()?),
                hash: record[12..].try_into().ok()?,
            })
        })
        .collect()
}

/// A seal with what is kept beside it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealRecord {
    /// The signed body, byte for byte.
    pub body: Vec<u8>,
    /// Ed25519 signature of `body`.
    pub signature: Vec<u8>,
    /// The tenants' summaries, in block order.
    pub tenants: Vec<TenantSummary>,
    /// The events, in log order.
    pub leaves: Vec<SealedLeaf>,
}

/// A tenant summary as JSON.
#[derive(Serialize, Deserialize)]
struct SummaryJson {
    tenant: String,
    count: usize,
    root: String,
}

/// The tenants' summaries as JSON (`[{"tenant","count","root"}]`).
pub fn summaries_json(tenants: &[TenantSummary]) -> Value {
    Value::Array(
        tenants
            .iter()
            .map(|t| json!({"tenant": t.tenant, "count": t.count, "root": hex::encode(t.root)}))
            .collect(),
    )
}

/// Reads [`summaries_json`]'s form.
pub fn summaries_from_json(value: &Value) -> Option<Vec<TenantSummary>> {
    let parsed: Vec<SummaryJson> = serde_json::from_value(value.clone()).ok()?;
    parsed
        .into_iter()
        .map(|s| {
            Some(TenantSummary {
                tenant: s.tenant,
                count: s.count,
                root: hex::decode(s.root).ok()?.try_into().ok()?,
            })
        })
        .collect()
}

/// A seal's copy on the seal stream: what is signed and what the signed
/// root is made of (the leaves stay in PostgreSQL: the events re-derive
/// them, and the root catches any change to either).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealCopy {
    /// The signed body, byte for byte.
    pub body: Vec<u8>,
    /// Ed25519 signature of `body`.
    pub signature: Vec<u8>,
    /// The tenants' summaries, in block order.
    pub tenants: Vec<TenantSummary>,
}

impl SealRecord {
    /// The message published on the seal stream (see [`SealCopy`]).
    pub fn to_message(&self) -> Vec<u8> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let message = json!({
            "body": String::from_utf8_lossy(&self.body),
            "signature": b64.encode(&self.signature),
            "tenants": summaries_json(&self.tenants),
        });
        serde_json::to_vec(&message).unwrap_or_default()
    }
}

impl SealCopy {
    /// Reads a seal stream message.
    pub fn from_message(bytes: &[u8]) -> Option<Self> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let value: Value = serde_json::from_slice(bytes).ok()?;
        Some(Self {
            body: value["body"].as_str()?.as_bytes().to_vec(),
            signature: b64.decode(value["signature"].as_str()?).ok()?,
            tenants: summaries_from_json(&value["tenants"])?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> SealBody {
        SealBody {
            log: "NEURECTOMY_EVENTS".into(),
            seq: 4,
            first: 65_536,
            last: 131_073,
            count: 3,
            tenants: 2,
            root: [7; 32],
            prev: GENESIS,
            key: "ed25519:0123456789abcdef".into(),
            sealed_at: time::macros::datetime!(2026-12-07 16:00:00.000001 UTC),
        }
    }

    #[test]
    fn a_body_is_canonical_and_reads_back() {
        let bytes = body().canonical();
        assert_eq!(
            String::from_utf8(bytes.clone()).unwrap(),
            format!(
                r#"{{"count":3,"first":"65536","key":"ed25519:0123456789abcdef","last":"131073","log":"NEURECTOMY_EVENTS","prev":"{}","root":"{}","sealed_at":"2026-12-07T16:00:00.000001Z","seq":4,"tenants":2,"v":1}}"#,
                "00".repeat(32),
                "07".repeat(32)
            )
        );
        assert_eq!(SealBody::parse(&bytes).unwrap(), body());
        // Not canonical (a space): refused.
        let spaced = String::from_utf8(bytes).unwrap().replacen(',', ", ", 1);
        assert!(SealBody::parse(spaced.as_bytes()).is_err());
    }

    #[test]
    fn leaves_and_messages_round_trip() {
        let record = SealRecord {
            body: body().canonical(),
            signature: vec![1; 64],
            tenants: vec![TenantSummary {
                tenant: "acme".into(),
                count: 2,
                root: [3; 32],
            }],
            leaves: vec![
                SealedLeaf {
                    position: 65_536,
                    tenant: 0,
                    hash: [1; 32],
                },
                SealedLeaf {
                    position: 131_073,
                    tenant: 0,
                    hash: [2; 32],
                },
            ],
        };
        assert_eq!(
            SealCopy::from_message(&record.to_message()),
            Some(SealCopy {
                body: record.body.clone(),
                signature: record.signature.clone(),
                tenants: record.tenants.clone(),
            })
        );
        assert_eq!(
            decode_leaves(&encode_leaves(&record.leaves)),
            Some(record.leaves)
        );
        assert_eq!(decode_leaves(&[0; 43]), None);
    }
}
