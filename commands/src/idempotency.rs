//! The ids that make a command idempotent, all derived from the caller's
//! tenant and command id (UUID v5 in namespaces of our own):
//!
//! - the id of a command's `index`-th event ([`event_id`]): a retry of the
//!   command produces the same ids and collides with its first run's events
//!   (unique `event_id`), and the handler answers with that first result;
//! - the id of the aggregate a creation command creates when the caller
//!   gives none ([`new_aggregate_id`]): the same request, retried, names the
//!   same agent, task or workflow, so it is the same command.
//!
//! The tenant is part of every derivation and of the look-up of a command's
//! earlier events, so two tenants may use the same command id: each gets
//! its own events and aggregate, and neither learns of the other.

use domain::AggregateKind;
use uuid::Uuid;

const EVENT_NAMESPACE: Uuid = Uuid::from_u128(0x6e65_7572_6563_746f_6d79_2d65_7665_6e74);
const AGGREGATE_NAMESPACE: Uuid = Uuid::from_u128(0x6e65_7572_6563_746f_6d79_2d61_6767_7265);

/// The name hashed for a command of `tenant`: the tenant's bytes, a NUL
/// (which no tenant contains: tokens with control characters are refused),
/// the command id and `suffix`.
fn name(tenant: &str, command_id: Uuid, suffix: &[u8]) -> Vec<u8> {
    let mut name = Vec::with_capacity(tenant.len() + 1 + 16 + suffix.len());
    name.extend_from_slice(tenant.as_bytes());
    name.push(0);
    name.extend_from_slice(command_id.as_bytes());
    name.extend_from_slice(suffix);
    name
}

/// The id of the `index`-th event of command `command_id` of `tenant`.
pub fn event_id(tenant: &str, command_id: Uuid, index: usize) -> Uuid {
    Uuid::new_v5(
        &EVENT_NAMESPACE,
        &name(tenant, command_id, &(index as u64).to_be_bytes()),
    )
}

/// The id events of a command had before event ids included the tenant
/// (looked up too, so that a retry of such a command is still recognised).
pub(crate) fn legacy_event_id(command_id: Uuid, index: usize) -> Uuid {
    let mut name = [0u8; 24];
    name[..16].copy_from_slice(command_id.as_bytes());
    name[16..].copy_from_slice(&(index as u64).to_be_bytes());
    Uuid::new_v5(&EVENT_NAMESPACE, &name)
}

/// What tells a retry of a command from a different command reusing its id:
/// the hash of the command's canonical JSON (the compact JSON of its value,
/// keys sorted), stored in every event's metadata as 64 hex digits.
///
/// BLAKE3: on a CPU without SHA extensions (most servers before 2020, and
/// valgrind's) SHA-256 of a command was a fifth of the command handler's
/// instructions; BLAKE3 costs a few times less. Events written before carry
/// SHA-256 of the same bytes, which [`CommandHash::matches`] also accepts,
/// so a command retried across the upgrade is still recognised.
#[derive(Debug, Clone)]
pub struct CommandHash {
    hex: String,
    canonical: Vec<u8>,
}

impl CommandHash {
    /// The hash of a command's canonical JSON bytes.
    pub fn of(canonical: Vec<u8>) -> Self {
        let hex = blake3::hash(&canonical).to_hex().to_string();
        Self { hex, canonical }
    }

    /// The 64 hex digits stored in the events' metadata.
    pub fn as_str(&self) -> &str {
        &self.hex
    }

    /// Whether `stored` (an event's `command_hash`) is this command's: its
    /// BLAKE3, or its SHA-256 (events written before BLAKE3).
    pub fn matches(&self, stored: &str) -> bool {
        use sha2::Digest as _;
        stored == self.hex
            || (stored.len() == 64 && stored == hex::encode(sha2::Sha256::digest(&self.canonical)))
    }
}

/// The id of the `kind` aggregate that creation command `command_id` of
/// `tenant` creates when the caller names none.
pub fn new_aggregate_id(tenant: &str, command_id: Uuid, kind: AggregateKind) -> Uuid {
    Uuid::new_v5(
        &AGGREGATE_NAMESPACE,
        &name(tenant, command_id, kind.as_str().as_bytes()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_tenant_and_the_command() {
        let command = Uuid::from_u128(1);
        let other = Uuid::from_u128(2);
        assert_eq!(event_id("a", command, 0), event_id("a", command, 0));
        assert_ne!(event_id("a", command, 0), event_id("a", command, 1));
        assert_ne!(event_id("a", command, 0), event_id("b", command, 0));
        assert_ne!(event_id("a", command, 0), event_id("a", other, 0));
        // The tenant's end is marked: "ab" + id is not "a" + "b…".
        assert_ne!(event_id("ab", command, 0), event_id("a", command, 0));
        assert_ne!(event_id("a", command, 0), legacy_event_id(command, 0));
        let agent = new_aggregate_id("a", command, AggregateKind::Agent);
        assert_eq!(agent, new_aggregate_id("a", command, AggregateKind::Agent));
        assert_ne!(agent, new_aggregate_id("b", command, AggregateKind::Agent));
        assert_ne!(agent, new_aggregate_id("a", command, AggregateKind::Task));
        assert_ne!(agent, event_id("a", command, 0));
    }

    #[test]
    fn a_command_hash_matches_its_blake3_and_its_sha256_only() {
        use sha2::Digest as _;
        let bytes = br#"{"agent_id":"a","type":"PauseAgent"}"#.to_vec();
        let other = br#"{"agent_id":"b","type":"PauseAgent"}"#.to_vec();
        let hash = CommandHash::of(bytes.clone());
        // BLAKE3's published test vector: the empty input.
        assert_eq!(
            CommandHash::of(Vec::new()).as_str(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
        assert_eq!(hash.as_str().len(), 64);
        assert!(hash.matches(hash.as_str()));
        assert!(hash.matches(&hex::encode(sha2::Sha256::digest(&bytes))));
        assert!(!hash.matches(&hex::encode(sha2::Sha256::digest(&other))));
        assert!(!hash.matches(CommandHash::of(other).as_str()));
        assert!(!hash.matches(""));
    }
}
