//! Gap-safe global reads: a reader that has seen position p never later
//! finds an event below p, however transactions interleave.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use neurectomy_commands::testkit::{eventually, TestDatabase};
use neurectomy_commands::{EventStore, ExpectedVersion};
use rand::Rng;
use sqlx::PgPool;

use crate::support::{all_positions, events, stream_id, TENANT, WAIT};

const OPEN: usize = 20;

/// What a reader that trusts positions alone would do.
async fn naive_read(pool: &PgPool, after: i64) -> Vec<i64> {
    sqlx::query_scalar("SELECT position FROM events WHERE position > $1 ORDER BY position")
        .bind(after)
        .fetch_all(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn transactions_committed_in_reverse_order_are_read_without_gaps() {
    let db = TestDatabase::create(OPEN as u32 + 4).await.unwrap();
    let store = EventStore::new(db.pool.clone());

    // Open OPEN transactions; each appends, which assigns its transaction id,
    // hence its position, in opening order.
    let mut open = Vec::new();
    let mut positions = Vec::new();
    for _ in 0..OPEN {
        let mut tx = db.pool.begin().await.unwrap();
        let stream = stream_id("task");
        let recorded = store
            .append_in(
                &mut tx,
                &stream,
                ExpectedVersion::NoStream,
                events(&stream, 1, TENANT),
            )
            .await
            .unwrap();
        positions.push(recorded[0].position);
        open.push(tx);
    }
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "positions follow opening order: {positions:?}"
    );

    let mut safe_seen: Vec<i64> = Vec::new();
    let mut naive_seen: Vec<i64> = Vec::new();
    // Commit in reverse order; after each commit both readers poll once.
    while let Some(tx) = open.pop() {
        tx.commit().await.unwrap();
        store.announce_commit();
        let first_still_open = !open.is_empty();

        let after = safe_seen.last().copied().unwrap_or(0);
        let batch = store.read_all(after, 1000).await.unwrap();
        if first_still_open {
            assert!(
                batch.is_empty(),
                "the gap-safe reader returned {:?} while the first-opened transaction was open",
                batch.iter().map(|e| e.position).collect::<Vec<_>>()
            );
        }
        safe_seen.extend(batch.iter().map(|e| e.position));

        let after = naive_seen.last().copied().unwrap_or(0);
        naive_seen.extend(naive_read(&db.pool, after).await);
    }

    // Everything is committed: the gap-safe reader catches up (transactions of
    // other databases in the cluster may delay it, never change its answer).
    let safe_seen = eventually("the gap-safe reader to see all events", WAIT, || {
        let mut seen = safe_seen.clone();
        let store = store.clone();
        async move {
            let after = seen.last().copied().unwrap_or(0);
            seen.extend(
                store
                    .read_all(after, 1000)
                    .await
                    .unwrap()
                    .iter()
                    .map(|e| e.position),
            );
            (seen.len() >= OPEN).then_some(seen)
        }
    })
    .await;
    assert_eq!(
        safe_seen, positions,
        "every event exactly once, in position order"
    );

    // The naive reader skipped events for good: the test can see the bug.
    let missed: Vec<i64> = positions
        .iter()
        .copied()
        .filter(|p| !naive_seen.contains(p))
        .collect();
    assert!(
        !missed.is_empty(),
        "the naive reader should have missed events committed below its checkpoint"
    );
    assert_eq!(
        naive_seen,
        vec![positions[OPEN - 1]],
        "it only saw the first commit"
    );
    assert!(naive_read(&db.pool, *naive_seen.last().unwrap())
        .await
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_polling_during_random_interleavings_sees_exactly_the_log() {
    const WRITERS: usize = 8;
    const APPENDS: usize = 25;
    let db = TestDatabase::create(WRITERS as u32 + 3).await.unwrap();
    let store = EventStore::new(db.pool.clone());
    let writers_done = Arc::new(AtomicBool::new(false));

    let reader = tokio::spawn({
        let (store, writers_done) = (store.clone(), writers_done.clone());
        async move {
            let mut seen: Vec<i64> = Vec::new();
            let mut polls = 0u64;
            loop {
                let done = writers_done.load(Ordering::SeqCst);
                let after = seen.last().copied().unwrap_or(0);
                let batch = store.read_all(after, 50).await.unwrap();
                polls += 1;
                for event in &batch {
                    assert!(
                        event.position > after,
                        "position {} after checkpoint {after}",
                        event.position
                    );
                }
                seen.extend(batch.iter().map(|e| e.position));
                if done && batch.is_empty() {
                    return (seen, polls);
                }
                tokio::task::yield_now().await;
            }
        }
    });

    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let store = store.clone();
        let mut rng = crate::support::rng(writer as u64);
        writers.push(tokio::spawn(async move {
            let stream = stream_id("task");
            let mut written = 0usize;
            for _ in 0..APPENDS {
                let mut tx = store.pool().begin().await.unwrap();
                tokio::time::sleep(Duration::from_micros(rng.gen_range(0..2000))).await;
                let count = rng.gen_range(1..=3);
                store
                    .append_in(
                        &mut tx,
                        &stream,
                        ExpectedVersion::Any,
                        events(&stream, count, TENANT),
                    )
                    .await
                    .unwrap();
                // Hold the transaction open after its position is fixed.
                tokio::time::sleep(Duration::from_micros(rng.gen_range(0..3000))).await;
                tx.commit().await.unwrap();
                store.announce_commit();
                written += count;
            }
            written
        }));
    }
    let mut written = 0;
    for writer in writers {
        written += writer.await.unwrap();
    }
    let expected = all_positions(&db.pool).await;
    assert_eq!(expected.len(), written);

    // The reader stops at its first empty poll after the writers finished;
    // other databases' transactions can still hide a tail, so finish reading.
    writers_done.store(true, Ordering::SeqCst);
    let (seen, polls) = reader.await.unwrap();
    let want = expected.len();
    let seen = eventually("the reader to catch up", WAIT, || {
        let mut seen = seen.clone();
        let store = store.clone();
        async move {
            let after = seen.last().copied().unwrap_or(0);
            seen.extend(
                store
                    .read_all(after, 10_000)
                    .await
                    .unwrap()
                    .iter()
                    .map(|e| e.position),
            );
            (seen.len() >= want).then_some(seen)
        }
    })
    .await;
    assert!(
        polls > 10,
        "the reader should have polled during the writes ({polls})"
    );
    assert_eq!(
        seen, expected,
        "the reader's sequence must equal the table in position order"
    );
}
