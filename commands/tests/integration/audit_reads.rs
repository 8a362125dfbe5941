//! The tenant-scoped reads of the audit queries: a tenant's log and a
//! correlation id's events are gap-safe like `read_all`, and another
//! tenant's streams read as empty.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use neurectomy_commands::testkit::{eventually, TestDatabase};
use neurectomy_commands::{EventStore, ExpectedVersion, NewEvent};
use uuid::Uuid;

use crate::support::{events, stream_id, WAIT};

const OPEN: usize = 12;
const OTHER: &str = "tenant-b";
const MINE: &str = "tenant-a";

/// One event of `tenant` under `correlation`.
fn event(stream: &str, tenant: &str, correlation: Uuid) -> Vec<NewEvent> {
    let mut batch = events(stream, 1, tenant);
    batch[0].metadata.correlation_id = correlation;
    batch
}

#[tokio::test]
async fn tenant_and_correlation_logs_are_read_without_gaps() {
    let db = TestDatabase::create(OPEN as u32 + 4).await.unwrap();
    let store = EventStore::new(db.pool.clone());
    let correlation = Uuid::new_v4();

    // OPEN transactions, alternating tenants, each appending one event whose
    // position follows opening order; they commit in reverse.
    let mut open = Vec::new();
    let mut mine = Vec::new();
    for i in 0..OPEN {
        let tenant = if i % 2 == 0 { MINE } else { OTHER };
        let mut tx = db.pool.begin().await.unwrap();
        let stream = stream_id("task");
        let recorded = store
            .append_in(
                &mut tx,
                &stream,
                ExpectedVersion::NoStream,
                event(&stream, tenant, correlation),
            )
            .await
            .unwrap();
        if tenant == MINE {
            mine.push(recorded[0].position);
        }
        open.push(tx);
    }

    let types = ["TaskProgressReported".to_owned()];
    let mut seen_log: Vec<i64> = Vec::new();
    let mut seen_correlation: Vec<i64> = Vec::new();
    while let Some(tx) = open.pop() {
        tx.commit().await.unwrap();
        let first_still_open = !open.is_empty();
        let after = seen_log.last().copied().unwrap_or(0);
        let log = store
            .read_log_of_tenant(MINE, after, 100, Some(&types), None)
            .await
            .unwrap();
        let after = seen_correlation.last().copied().unwrap_or(0);
        let by_correlation = store
            .read_log_of_tenant(MINE, after, 100, None, Some(correlation))
            .await
            .unwrap();
        if first_still_open {
            assert!(
                log.is_empty() && by_correlation.is_empty(),
                "a gap-safe reader returned events while the first-opened transaction was open"
            );
        }
        assert!(log
            .iter()
            .chain(&by_correlation)
            .all(|e| e.metadata.tenant == MINE));
        seen_log.extend(log.iter().map(|e| e.position));
        seen_correlation.extend(by_correlation.iter().map(|e| e.position));
    }

    // Everything committed: both readers catch up, each event once, in order.
    for (what, correlation_id, seen) in [
        ("tenant log", None, seen_log),
        ("correlation log", Some(correlation), seen_correlation),
    ] {
        let store = store.clone();
        let want = mine.len();
        let seen = eventually(what, WAIT, || {
            let mut seen = seen.clone();
            let store = store.clone();
            async move {
                let after = seen.last().copied().unwrap_or(0);
                let more = store
                    .read_log_of_tenant(MINE, after, 100, None, correlation_id)
                    .await
                    .unwrap();
                seen.extend(more.iter().map(|e| e.position));
                (seen.len() >= want).then_some(seen)
            }
        })
        .await;
        assert_eq!(
            seen, mine,
            "{what}: every event of the tenant once, in order"
        );
    }

    // Other filters select nothing of these events.
    let none = store
        .read_log_of_tenant(MINE, 0, 100, None, Some(Uuid::new_v4()))
        .await
        .unwrap();
    assert!(none.is_empty());
    let none = store
        .read_log_of_tenant(MINE, 0, 100, Some(&["AgentPaused".to_owned()]), None)
        .await
        .unwrap();
    assert!(none.is_empty());
    // Limits page.
    let first = store
        .read_log_of_tenant(MINE, 0, 2, None, None)
        .await
        .unwrap();
    assert_eq!(
        first.iter().map(|e| e.position).collect::<Vec<_>>(),
        mine[..2]
    );
}

#[tokio::test]
async fn another_tenants_stream_reads_as_empty() {
    let db = TestDatabase::create(4).await.unwrap();
    let store = EventStore::new(db.pool.clone());
    let stream = stream_id("agent");
    for _ in 0..3 {
        store
            .append(&stream, ExpectedVersion::Any, events(&stream, 1, MINE))
            .await
            .unwrap();
    }
    assert_eq!(
        store.stream_version_of_tenant(MINE, &stream).await.unwrap(),
        3
    );
    assert_eq!(
        store
            .stream_version_of_tenant(OTHER, &stream)
            .await
            .unwrap(),
        0
    );
    let versions: Vec<i64> = store
        .read_stream_of_tenant(MINE, &stream, 2, 3, 10)
        .await
        .unwrap()
        .iter()
        .map(|e| e.stream_version)
        .collect();
    assert_eq!(versions, [2, 3]);
    let limited = store
        .read_stream_of_tenant(MINE, &stream, 1, i64::MAX, 2)
        .await
        .unwrap();
    assert_eq!(limited.len(), 2);
    assert!(store
        .read_stream_of_tenant(OTHER, &stream, 1, i64::MAX, 10)
        .await
        .unwrap()
        .is_empty());
}
