//! Partitions of the log by tenant: how the relay spreads events over
//! subjects so that a projection can be split into independent parts.
//!
//! A stream of the log is split into `P` partitions (a property of the
//! JetStream stream, fixed when the relay creates it). An event belongs to
//! partition [`of`]`(tenant, P)`: the first 32 bits of the MD5 digest of the
//! tenant, big-endian, modulo `P`. The tenant is the natural key: no command
//! reads or writes another tenant's streams, so a partition holds every
//! cross-stream effect of its tenants, in the log's order. PostgreSQL
//! computes the same function (`neurectomy_partition(tenant, P)`, in the
//! migrations), so the store can be read one partition at a time
//! ([`crate::EventStore::read_partition`]).
//!
//! With `P` > 1 the relay publishes an event on
//! `<prefix>.p<partition>.<aggregate>.<EventType>` (one filter subject per
//! partition: `<prefix>.p<partition>.>`) and stamps it with
//! [`HEADER_PARTITION_PREVIOUS`], the position of the previous event of its
//! partition in the stream (0 for the first): a consumer of one partition
//! sees its messages' stream sequences jump (other partitions' messages lie
//! between), and follows this chain instead to tell a redelivery from a gap.
//! With `P` = 1 subjects and headers are as they always were.

use md5::{Digest as _, Md5};

/// Header carrying the position of the previous event of the message's
/// partition (0: none), on streams of more than one partition.
pub const HEADER_PARTITION_PREVIOUS: &str = "Neurectomy-Partition-Previous";

/// The partition of `tenant`'s events among `partitions` (0 when there is
/// one).
pub fn of(tenant: &str, partitions: u32) -> u32 {
    if partitions <= 1 {
        return 0;
    }
    hash(tenant) % partitions
}

/// The partition key of `tenant`'s events: the first 32 bits of the MD5
/// digest of the tenant, big-endian. Stored with every event
/// (`events.tenant_hash`) so that the store reads a partition with an
/// integer modulo per row.
pub fn hash(tenant: &str) -> u32 {
    let digest = Md5::digest(tenant.as_bytes());
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
}

/// The subject of an event of `kind` and `event_type` in `partition` of a
/// stream of `partitions` under `prefix`.
pub fn subject(
    prefix: &str,
    partitions: u32,
    partition: u32,
    kind: &str,
    event_type: &str,
) -> String {
    if partitions <= 1 {
        format!("{prefix}.{kind}.{event_type}")
    } else {
        format!("{prefix}.p{partition}.{kind}.{event_type}")
    }
}

/// The filter subject of `partition` of a stream of `partitions` under
/// `prefix` (every subject when there is one partition).
pub fn filter(prefix: &str, partitions: u32, partition: u32) -> String {
    if partitions <= 1 {
        format!("{prefix}.>")
    } else {
        format!("{prefix}.p{partition}.>")
    }
}

/// The marker of the partition count in a stream's description
/// (`neurectomy partitions=<P>`); a stream without one has one partition.
pub fn describe(partitions: u32) -> String {
    format!("neurectomy partitions={}", partitions.max(1))
}

/// The partition count a stream's description states (1 when it states
/// none).
pub fn described(description: Option<&str>) -> u32 {
    description
        .and_then(|d| {
            d.split_whitespace()
                .find_map(|w| w.strip_prefix("partitions="))
        })
        .and_then(|p| p.parse().ok())
        .filter(|p: &u32| *p >= 1)
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_partition_is_partition_zero_and_the_old_subjects() {
        assert_eq!(of("acme", 1), 0);
        assert_eq!(of("acme", 0), 0);
        assert_eq!(
            subject("x", 1, 0, "task", "TaskCreated"),
            "x.task.TaskCreated"
        );
        assert_eq!(filter("x", 1, 0), "x.>");
    }

    #[test]
    fn tenants_spread_over_partitions_by_their_digest() {
        // md5("acme") = 53bce4f1…: 0x53bce4f1 % 8 = 1 (PostgreSQL agrees).
        assert_eq!(of("acme", 8), 0x53bc_e4f1 % 8);
        let mut counts = [0u32; 4];
        for t in 0..4_000 {
            counts[of(&format!("tenant-{t}"), 4) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (900..=1100).contains(&c)),
            "{counts:?}"
        );
        assert_eq!(
            subject("x", 4, 3, "task", "TaskCreated"),
            "x.p3.task.TaskCreated"
        );
        assert_eq!(filter("x", 4, 3), "x.p3.>");
    }

    #[test]
    fn the_partition_count_is_read_back_from_the_description() {
        assert_eq!(described(Some(&describe(16))), 16);
        assert_eq!(described(None), 1);
        assert_eq!(described(Some("something else")), 1);
        assert_eq!(described(Some("neurectomy partitions=0")), 1);
    }
}
