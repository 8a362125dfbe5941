//! Optimistic concurrency of `EventStore::append`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use neurectomy_commands::testkit::TestDatabase;
use neurectomy_commands::{AppendError, EventStore, ExpectedVersion, RecordedEvent};
use uuid::Uuid;

use crate::support::{event_count, events, stream_id, TENANT};

const WRITERS: usize = 8;
const TARGET: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_exact_appenders_win_each_version_once() {
    let db = TestDatabase::create(WRITERS as u32 + 2).await.unwrap();
    let store = EventStore::new(db.pool.clone());
    let stream = stream_id("task");
    let successes = Arc::new(AtomicUsize::new(0));

    let mut tasks = Vec::new();
    for _ in 0..WRITERS {
        let (store, stream, successes) = (store.clone(), stream.clone(), successes.clone());
        tasks.push(tokio::spawn(async move {
            // (version won, event id) and the number of conflicts seen.
            let mut won: Vec<(i64, Uuid)> = Vec::new();
            let mut conflicts = 0usize;
            while successes.load(Ordering::SeqCst) < TARGET {
                let v = store.stream_version(&stream).await.unwrap();
                let batch = events(&stream, 1, TENANT);
                let id = batch[0].metadata.event_id;
                match store.append(&stream, ExpectedVersion::Exact(v), batch).await {
                    Ok(recorded) => {
                        assert_eq!(recorded.len(), 1);
                        assert_eq!(recorded[0].stream_version, v as i64 + 1);
                        assert_eq!(recorded[0].event_id, id);
                        won.push((recorded[0].stream_version, id));
                        successes.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(AppendError::Conflict {
                        stream_id,
                        expected,
                        actual,
                    }) => {
                        assert_eq!(stream_id, stream);
                        assert_eq!(expected, ExpectedVersion::Exact(v));
                        assert!(
                            actual > v,
                            "a conflict at version {v} must report a newer actual version, got {actual}"
                        );
                        conflicts += 1;
                    }
                    Err(other) => panic!("unexpected append error: {other}"),
                }
            }
            (won, conflicts)
        }));
    }
    let mut won = Vec::new();
    let mut conflicts = 0;
    for task in tasks {
        let (w, c) = task.await.unwrap();
        won.extend(w);
        conflicts += c;
    }

    let n = won.len();
    assert!(n >= TARGET, "{n} successful appends");
    let final_version = store.stream_version(&stream).await.unwrap();
    assert_eq!(
        final_version as usize, n,
        "successes must equal the final version"
    );
    assert!(
        conflicts > 0,
        "{WRITERS} racing writers must have collided at least once"
    );

    // Exactly one winner per version.
    let mut versions: Vec<i64> = won.iter().map(|(v, _)| *v).collect();
    versions.sort_unstable();
    assert_eq!(versions, (1..=n as i64).collect::<Vec<_>>());

    // The stream holds versions 1..=n, no gap, no duplicate, and exactly the
    // winners' events.
    let stored = store
        .read_stream(&stream, 1, i64::MAX, 10_000)
        .await
        .unwrap();
    let stored_versions: Vec<i64> = stored.iter().map(|e| e.stream_version).collect();
    assert_eq!(stored_versions, (1..=n as i64).collect::<Vec<_>>());
    let mut by_version = won.clone();
    by_version.sort_unstable();
    let stored_pairs: Vec<(i64, Uuid)> = stored
        .iter()
        .map(|e| (e.stream_version, e.event_id))
        .collect();
    assert_eq!(stored_pairs, by_version);
    assert_eq!(
        event_count(&db.pool).await,
        n as i64,
        "losers appended nothing"
    );
}

#[tokio::test]
async fn stale_expectations_conflict_and_append_nothing() {
    let db = TestDatabase::create(3).await.unwrap();
    let store = EventStore::new(db.pool.clone());
    let stream = stream_id("agent");

    let first = store
        .append(
            &stream,
            ExpectedVersion::NoStream,
            events(&stream, 3, TENANT),
        )
        .await
        .unwrap();
    assert_eq!(
        first.iter().map(|e| e.stream_version).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert!(
        first.windows(2).all(|w| w[0].position < w[1].position),
        "positions increase within one append"
    );
    store
        .append(
            &stream,
            ExpectedVersion::Exact(3),
            events(&stream, 1, TENANT),
        )
        .await
        .unwrap();
    let before = event_count(&db.pool).await;
    assert_eq!(before, 4);

    // NoStream on an existing stream.
    match store
        .append(
            &stream,
            ExpectedVersion::NoStream,
            events(&stream, 1, TENANT),
        )
        .await
    {
        Err(AppendError::Conflict {
            expected, actual, ..
        }) => assert_eq!((expected, actual), (ExpectedVersion::NoStream, 4)),
        other => panic!("expected a conflict, got {other:?}"),
    }
    // A stale exact version (and one from the future).
    for stale in [3, 0, 5] {
        match store
            .append(
                &stream,
                ExpectedVersion::Exact(stale),
                events(&stream, 2, TENANT),
            )
            .await
        {
            Err(AppendError::Conflict {
                expected, actual, ..
            }) => assert_eq!((expected, actual), (ExpectedVersion::Exact(stale), 4)),
            other => panic!("expected a conflict for version {stale}, got {other:?}"),
        }
    }
    // Re-appending events that exist (same ids) is a duplicate, not a new append.
    let mut again = events(&stream, 1, TENANT);
    again[0].metadata = first[0].metadata.clone();
    match store.append(&stream, ExpectedVersion::Any, again).await {
        Err(AppendError::DuplicateEvent { command_id }) => {
            assert_eq!(command_id, first[0].metadata.command_id);
        }
        other => panic!("expected a duplicate, got {other:?}"),
    }
    // An empty batch is refused.
    assert!(matches!(
        store
            .append(&stream, ExpectedVersion::Any, Vec::new())
            .await,
        Err(AppendError::BadBatch { count: 0, .. })
    ));

    assert_eq!(
        event_count(&db.pool).await,
        before,
        "failed appends wrote nothing"
    );
    assert_eq!(store.stream_version(&stream).await.unwrap(), 4);
    let ids: HashSet<Uuid> = store
        .read_stream(&stream, 1, 100, 100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.event_id)
        .collect();
    assert_eq!(ids.len(), 4);
}

/// One event appended to a stream of its own.
async fn append_to_a_new_stream(store: EventStore) -> Result<Vec<RecordedEvent>, AppendError> {
    let stream = stream_id("task");
    store
        .append(
            &stream,
            ExpectedVersion::NoStream,
            events(&stream, 1, TENANT),
        )
        .await
}

/// Ends every other session on the test database, as a restart of the
/// server or an administrator would.
async fn terminate_sessions(db: &TestDatabase) -> u64 {
    use sqlx::Connection as _;
    let mut admin = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let ended: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .fetch_all(&mut admin)
    .await
    .unwrap();
    ended.into_iter().filter(|ended| *ended).count() as u64
}

#[tokio::test]
async fn connections_the_server_ended_are_replaced_not_kept() {
    let db = TestDatabase::create(4).await.unwrap();
    let store = EventStore::new(db.pool.clone());
    let append = append_to_a_new_stream;
    append(store.clone()).await.unwrap();

    // Straight after: the kept connection is the one ended. Its statement
    // may fail (the store does not test a connection it used a moment
    // ago), but the connection is not kept: the next append succeeds.
    assert!(terminate_sessions(&db).await >= 1);
    let first = append(store.clone()).await;
    if let Err(error) = &first {
        assert!(
            matches!(error, AppendError::Database { .. }),
            "a lost connection is a database error: {error:?}"
        );
        append(store.clone())
            .await
            .expect("the ended connection was kept for the next append");
    }

    // After a pause as long as a kept connection stays fresh, the store
    // has it tested by the pool first: the first append succeeds.
    append(store.clone()).await.unwrap();
    assert!(terminate_sessions(&db).await >= 1);
    tokio::time::sleep(
        neurectomy_commands::event_store::KEPT_CONNECTION_FRESH
            + std::time::Duration::from_millis(200),
    )
    .await;
    append(store.clone())
        .await
        .expect("a connection unused for a while was used without a test");
    // One event per successful append: the first, the one after the ended
    // connection (the first try or its retry), and the two after.
    assert_eq!(event_count(&db.pool).await, 4);
}

#[tokio::test]
async fn closing_the_pool_does_not_wait_for_kept_connections() {
    let db = TestDatabase::create(8).await.unwrap();
    let store = EventStore::new(db.pool.clone());
    // Concurrent appends leave several connections kept by the store.
    let appends = (0..6).map(|_| append_to_a_new_stream(store.clone()));
    for result in futures::future::join_all(appends).await {
        result.unwrap();
    }
    // `Pool::close` waits for every checked-out connection; the store,
    // still alive, must hand its kept ones back.
    tokio::time::timeout(std::time::Duration::from_secs(10), db.pool.close())
        .await
        .expect("closing the pool waited for the store's kept connections");
    drop(store);
}

#[tokio::test]
async fn a_store_gone_quiet_hands_its_connections_back() {
    let db = TestDatabase::create(8).await.unwrap();
    let store = EventStore::new(db.pool.clone());
    let appends = (0..6).map(|_| append_to_a_new_stream(store.clone()));
    for result in futures::future::join_all(appends).await {
        result.unwrap();
    }
    assert!(
        db.pool.num_idle() < db.pool.size() as usize,
        "the store keeps connections after a burst"
    );
    // Unused for a while, kept connections go back to the pool (where its
    // other users can have them) within a second more.
    tokio::time::sleep(
        neurectomy_commands::event_store::KEPT_CONNECTION_FRESH * 2
            + std::time::Duration::from_millis(500),
    )
    .await;
    assert_eq!(
        db.pool.num_idle(),
        db.pool.size() as usize,
        "a quiet store still holds connections"
    );
    drop(store);
}

/// More writers than connections: every writer gets its turn. Kept
/// connections used to go round among the writers that arrived while one
/// was free, and the writers queued in the pool waited for as long as the
/// others kept coming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_writer_waits_while_others_keep_appending() {
    const WRITERS: usize = 24;
    let db = TestDatabase::create(6).await.unwrap();
    let store = EventStore::new(db.pool.clone());
    let stop = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let writers = (0..WRITERS).map(|_| {
        let store = store.clone();
        tokio::spawn(async move {
            let (mut appended, mut longest) = (0u32, std::time::Duration::ZERO);
            while std::time::Instant::now() < stop {
                let started = std::time::Instant::now();
                append_to_a_new_stream(store.clone()).await.unwrap();
                longest = longest.max(started.elapsed());
                appended += 1;
            }
            (appended, longest)
        })
    });
    let mut results = Vec::new();
    for writer in futures::future::join_all(writers).await {
        results.push(writer.unwrap());
    }
    let fewest = results.iter().map(|(n, _)| *n).min().unwrap_or(0);
    let most = results.iter().map(|(n, _)| *n).max().unwrap_or(0);
    let longest = results.iter().map(|(_, l)| *l).max().unwrap_or_default();
    // Fair shares within a factor (a stall of the shared machine stalls
    // every writer alike); a writer left waiting has one append, at the end.
    assert!(
        fewest * 4 >= most,
        "appends per writer from {fewest} to {most}, the longest {longest:?}: {results:?}"
    );
}

/// Writes `n` events in one transaction, straight in SQL (the store's
/// position scheme), and refreshes the table's statistics.
async fn bulk_events(pool: &sqlx::PgPool, n: i64) {
    sqlx::query(
        "INSERT INTO events (position, transaction_id, stream_id, stream_version, event_id, \
                             command_id, correlation_id, tenant, event_type, schema_version, \
                             data, metadata) \
         SELECT (pg_current_xact_id()::text::bigint << 16) | g, pg_current_xact_id(), \
                'task-bulk-' || g, 1, gen_random_uuid(), gen_random_uuid(), gen_random_uuid(), \
                'tenant-a', 'TaskProgressReported', 1, '{}'::jsonb, '{}'::jsonb \
         FROM generate_series(0, $1 - 1) AS g",
    )
    .bind(n)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE events").execute(pool).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_is_counted_when_small_and_estimated_when_large() {
    use neurectomy_commands::event_store::EXACT_LAG;
    let db = TestDatabase::create(4).await.unwrap();
    let store = EventStore::new(db.pool.clone());
    const N: i64 = 60_000;
    bulk_events(&db.pool, N).await;
    let positions: Vec<i64> = sqlx::query_scalar("SELECT position FROM events ORDER BY position")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(positions.len() as i64, N);

    // Small lags are exact, up to the bound.
    for behind in [0, 1, 500, EXACT_LAG] {
        let at = positions[(N - behind - 1) as usize];
        let lag = store.lag(at).await.unwrap();
        assert_eq!((lag.events, lag.exact), (behind, true), "{behind} behind");
    }
    // Beyond it, PostgreSQL's estimate: never below the bound, and near
    // the truth with fresh statistics.
    for behind in [EXACT_LAG + 1, 30_000, N] {
        let at = if behind == N {
            0
        } else {
            positions[(N - behind - 1) as usize]
        };
        let lag = store.lag(at).await.unwrap();
        assert!(!lag.exact, "{behind} behind: {lag:?}");
        assert!(lag.events > EXACT_LAG, "{behind} behind: {lag:?}");
        assert!(
            (lag.events - behind).abs() <= behind / 4,
            "{behind} behind, estimated {}",
            lag.events
        );
    }
}
