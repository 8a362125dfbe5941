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
}
