//! Group commit: appends queued while another is being written share one
//! statement and one transaction, and each keeps its own outcome.
//!
//! To queue appends deterministically, one committer is held up: its first
//! append waits on a row lock of a transaction the test keeps open (it
//! inserted the same stream version), and the test polls each further
//! append once, which queues it. Rolling the blocker back lets the first
//! append through; the committer then takes everything queued as one group.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use neurectomy_commands::event_store::MOST_EVENTS_GROUPED;
use neurectomy_commands::testkit::TestDatabase;
use neurectomy_commands::{AppendError, EventStore, ExpectedVersion, NewEvent, RecordedEvent};
use serde_json::json;
use sqlx::{PgPool, Postgres, Transaction};

use crate::support::{events, stream_id, TENANT};

type Appending<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<RecordedEvent>, AppendError>> + Send + 'a>>;

/// A store with one committer, whose first append (to a new stream, at
/// version 0) is stuck behind the returned open transaction.
struct HeldUp<'a> {
    store: &'a EventStore,
    blocker: Transaction<'static, Postgres>,
    first: Appending<'a>,
}

impl<'a> HeldUp<'a> {
    async fn start(db: &TestDatabase, store: &'a EventStore) -> Self {
        let stream = stream_id("task");
        let mut blocker = db.pool.begin().await.unwrap();
        store
            .append_in(
                &mut blocker,
                &stream,
                ExpectedVersion::Exact(0),
                events(&stream, 1, TENANT),
            )
            .await
            .unwrap();
        let batch = events(&stream, 1, TENANT);
        let mut first: Appending<'a> = Box::pin(async move {
            store
                .append(&stream, ExpectedVersion::Exact(0), batch)
                .await
        });
        assert!(poll_once(&mut first).await.is_pending());
        wait_for_a_lock_wait(&db.pool).await;
        Self {
            store,
            blocker,
            first,
        }
    }

    /// Queues an append behind the stuck one.
    async fn queue(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        batch: Vec<NewEvent>,
    ) -> Appending<'a> {
        let store = self.store;
        let stream = stream.to_owned();
        let mut appending: Appending<'a> =
            Box::pin(async move { store.append(&stream, expected, batch).await });
        assert!(poll_once(&mut appending).await.is_pending());
        appending
    }

    /// Lets the stuck append through (the blocker rolls back) and returns
    /// its outcome; the queued appends are written next, as one group.
    async fn release(self) -> Vec<RecordedEvent> {
        self.blocker.rollback().await.unwrap();
        self.first.await.expect("the held-up append goes through")
    }
}

async fn poll_once(appending: &mut Appending<'_>) -> Poll<()> {
    futures::poll!(appending.as_mut()).map(|_| ())
}

/// Waits until a session of this database waits on a lock (the held-up
/// append).
async fn wait_for_a_lock_wait(pool: &PgPool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if waiting > 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the first append never waited for the blocker's lock"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn transaction(recorded: &[RecordedEvent]) -> i64 {
    recorded[0].position >> 16
}

async fn stored(pool: &PgPool, stream: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events WHERE stream_id = $1")
        .bind(stream)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_appends_share_one_transaction_and_keep_their_own_conflicts() {
    let db = TestDatabase::create(8).await.unwrap();
    let store = EventStore::with_committers(db.pool.clone(), 1);
    // Streams already at version 1: one appended to with a stale version,
    // one with `Any`.
    let (stale, any) = (stream_id("task"), stream_id("task"));
    for stream in [&stale, &any] {
        store
            .append(stream, ExpectedVersion::Exact(0), events(stream, 1, TENANT))
            .await
            .unwrap();
    }

    let held = HeldUp::start(&db, &store).await;
    let fresh: Vec<String> = (0..5).map(|_| stream_id("task")).collect();
    let mut queued = Vec::new();
    for (i, stream) in fresh.iter().enumerate() {
        // One to three events each: positions index the group's events.
        queued.push(
            held.queue(
                stream,
                ExpectedVersion::Exact(0),
                events(stream, 1 + i % 3, TENANT),
            )
            .await,
        );
    }
    let stale_append = held
        .queue(&stale, ExpectedVersion::Exact(0), events(&stale, 1, TENANT))
        .await;
    let any_append = held
        .queue(&any, ExpectedVersion::Any, events(&any, 2, TENANT))
        .await;
    let first = held.release().await;

    let fresh_outcomes = futures::future::join_all(queued).await;
    let any_outcome = any_append
        .await
        .expect("an `Any` append in a group goes in");
    let group = transaction(&any_outcome);
    assert_ne!(
        group,
        transaction(&first),
        "the group is a transaction of its own"
    );
    assert_eq!(
        any_outcome
            .iter()
            .map(|e| e.stream_version)
            .collect::<Vec<_>>(),
        [2, 3]
    );
    for (i, (stream, outcome)) in fresh.iter().zip(fresh_outcomes).enumerate() {
        let recorded = outcome.expect("a fresh stream's append goes in");
        assert_eq!(recorded.len(), 1 + i % 3);
        assert!(recorded.iter().all(|e| &e.stream_id == stream));
        assert_eq!(
            recorded
                .iter()
                .map(|e| e.stream_version)
                .collect::<Vec<_>>(),
            (1..=recorded.len() as i64).collect::<Vec<_>>()
        );
        assert!(
            recorded.iter().all(|e| e.position >> 16 == group),
            "appends queued together commit together"
        );
    }
    match stale_append.await {
        Err(AppendError::Conflict {
            stream_id, actual, ..
        }) => assert_eq!((stream_id.as_str(), actual), (stale.as_str(), 1)),
        other => panic!("a stale append in a group must conflict alone, got {other:?}"),
    }
    assert_eq!(
        stored(&db.pool, &stale).await,
        1,
        "the stale append wrote nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_the_server_refuses_is_written_one_by_one() {
    let db = TestDatabase::create(8).await.unwrap();
    let store = EventStore::with_committers(db.pool.clone(), 1);
    // A command that ran before: its retry collides on the event ids.
    let retried = stream_id("task");
    let retry = events(&retried, 1, TENANT);
    store
        .append(&retried, ExpectedVersion::Exact(0), retry.clone())
        .await
        .unwrap();

    let held = HeldUp::start(&db, &store).await;
    let good = stream_id("task");
    let good_append = held
        .queue(&good, ExpectedVersion::Exact(0), events(&good, 2, TENANT))
        .await;
    let retry_append = held.queue(&retried, ExpectedVersion::Exact(1), retry).await;
    let bad = stream_id("task");
    let mut nul = events(&bad, 1, TENANT);
    nul[0].data = json!({ "text": "a\u{0000}b" });
    let bad_append = held.queue(&bad, ExpectedVersion::Exact(0), nul).await;
    let also_good = stream_id("task");
    let also_good_append = held
        .queue(
            &also_good,
            ExpectedVersion::Exact(0),
            events(&also_good, 1, TENANT),
        )
        .await;
    held.release().await;

    let good_outcome = good_append.await.expect("the good append goes in");
    assert_eq!(good_outcome.len(), 2);
    match retry_append.await {
        Err(AppendError::DuplicateEvent { .. }) => {}
        other => panic!("a retried command must be told it ran before, got {other:?}"),
    }
    match bad_append.await {
        Err(AppendError::Refused { stream_id, reason }) => {
            assert_eq!(stream_id, bad);
            assert!(reason.contains("SQLSTATE 22"), "{reason}");
        }
        other => panic!("data PostgreSQL cannot store must be refused, got {other:?}"),
    }
    let also_good_outcome = also_good_append
        .await
        .expect("the other good append goes in");
    assert_ne!(
        transaction(&good_outcome),
        transaction(&also_good_outcome),
        "written one by one, each in its own transaction"
    );
    assert_eq!(stored(&db.pool, &bad).await, 0);
    assert_eq!(stored(&db.pool, &retried).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_cancelled_while_queued_writes_nothing() {
    let db = TestDatabase::create(8).await.unwrap();
    let store = EventStore::with_committers(db.pool.clone(), 1);
    let held = HeldUp::start(&db, &store).await;
    let cancelled = stream_id("task");
    let cancelled_append = held
        .queue(
            &cancelled,
            ExpectedVersion::Exact(0),
            events(&cancelled, 1, TENANT),
        )
        .await;
    let kept = stream_id("task");
    let kept_append = held
        .queue(&kept, ExpectedVersion::Exact(0), events(&kept, 1, TENANT))
        .await;
    drop(cancelled_append);
    held.release().await;
    kept_append
        .await
        .expect("the append still waited for goes in");
    assert_eq!(stored(&db.pool, &cancelled).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_of_many_events_do_not_wait_for_the_group() {
    let db = TestDatabase::create(8).await.unwrap();
    let store = EventStore::with_committers(db.pool.clone(), 1);
    let held = HeldUp::start(&db, &store).await;
    let large = stream_id("task");
    let batch = events(&large, MOST_EVENTS_GROUPED + 1, TENANT);
    // Written by its caller while the committer is still held up.
    let recorded = tokio::time::timeout(
        Duration::from_secs(10),
        store.append(&large, ExpectedVersion::Exact(0), batch),
    )
    .await
    .expect("a large append is not queued behind the held-up group")
    .unwrap();
    assert_eq!(recorded.len(), MOST_EVENTS_GROUPED + 1);
    held.release().await;
}
