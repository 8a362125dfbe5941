//! End-to-end: the real binary, killed and restarted, against real
//! PostgreSQL and NATS JetStream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use commands::testkit::{eventually, mirror, TestDatabase, TestNats};
use commands::EventStore;
use neurectomy_e2e::Target;

const BINARY: &str = env!("CARGO_BIN_EXE_neurectomy-e2e");

async fn fixture() -> (TestDatabase, TestNats, Target) {
    let db = TestDatabase::create(4)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let nats = TestNats::create().await.unwrap_or_else(|e| panic!("{e}"));
    let target = Target {
        binary: BINARY.to_owned(),
        database_url: db.url.clone(),
        nats_url: nats.url.clone(),
        stream: nats.relay.stream_name.clone(),
        subject_prefix: nats.relay.subject_prefix.clone(),
    };
    (db, nats, target)
}

async fn event_count(db: &TestDatabase) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// The `application_name` of the session holding this database's advisory
/// lock (the leading relay's), if any.
async fn lock_holder(db: &TestDatabase) -> Option<String> {
    sqlx::query_scalar(
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted \
         AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_optional(&db.pool)
    .await
    .unwrap()
}

/// `target` for a process whose PostgreSQL sessions are named `name`.
fn named(target: &Target, name: &str) -> Target {
    let separator = if target.database_url.contains('?') {
        '&'
    } else {
        '?'
    };
    Target {
        database_url: format!("{}{separator}application_name={name}", target.database_url),
        ..target.clone()
    }
}

/// The simulator's seed: `NEURECTOMY_TEST_SEED`, or a new one; printed.
fn seed() -> String {
    let seed = std::env::var("NEURECTOMY_TEST_SEED")
        .unwrap_or_else(|_| (rand_seed() % 1_000_000).to_string());
    eprintln!("simulator seed {seed} (NEURECTOMY_TEST_SEED={seed} repeats it)");
    seed
}

fn rand_seed() -> u64 {
    u64::from(uuid::Uuid::new_v4().as_fields().0)
}

async fn jetstream_count(nats: &TestNats) -> u64 {
    match nats.jetstream().get_stream(&nats.relay.stream_name).await {
        Ok(mut stream) => stream.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

/// Two relay processes (leader and standby) and a simulator process; the
/// leader is SIGKILLed mid-stream, the standby takes over, the killed one is
/// restarted as a standby. JetStream must end up holding every event of the
/// store exactly once, in global order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_relay_process_loses_nothing_and_publishes_nothing_twice() {
    let (db, nats, target) = fixture().await;
    let (relay_1, relay_2) = (named(&target, "relay-1"), named(&target, "relay-2"));

    // The first relay leads (it holds the advisory lock) before the second
    // starts, which stands by.
    let mut first = relay_1.spawn("relay-1", &["relay"]).unwrap();
    eventually(
        "relay-1 to take the lock",
        Duration::from_secs(30),
        || async { (lock_holder(&db).await.as_deref() == Some("relay-1")).then_some(()) },
    )
    .await;
    let mut second = relay_2.spawn("relay-2", &["relay"]).unwrap();
    let seed = seed();
    let simulate = target
        .command(&[
            "simulate",
            "--duration",
            "6",
            "--rate",
            "400",
            "--seed",
            &seed,
            "--workflows",
            "4",
            // Enough agents that workflows seldom wait for a paused one:
            // the log grows all along, whatever the machine is doing.
            "--agents",
            "64",
        ])
        .output();
    let simulate = tokio::spawn(simulate);

    eventually(
        "the first relay to publish",
        Duration::from_secs(30),
        || async { (jetstream_count(&nats).await > 200).then_some(()) },
    )
    .await;
    // The process killed is the leader, and it is killed mid-stream.
    assert_eq!(lock_holder(&db).await.as_deref(), Some("relay-1"));
    first.kill().await.unwrap();
    let killed_at = jetstream_count(&nats).await;

    // The standby takes the lock and goes on publishing.
    eventually(
        "relay-2 to take the lock",
        Duration::from_secs(30),
        || async { (lock_holder(&db).await.as_deref() == Some("relay-2")).then_some(()) },
    )
    .await;
    eventually(
        "the standby to publish",
        Duration::from_secs(30),
        || async { (jetstream_count(&nats).await > killed_at + 200).then_some(()) },
    )
    .await;
    first = relay_1.spawn("relay-1 (restarted)", &["relay"]).unwrap();

    let output = simulate.await.unwrap().unwrap();
    assert!(
        output.status.success(),
        "simulate failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let total = event_count(&db).await;
    assert!(total > 1000, "the simulator wrote only {total} events");
    eventually(
        "JetStream to hold every event",
        Duration::from_secs(30),
        || async { (jetstream_count(&nats).await == total as u64).then_some(()) },
    )
    .await;

    // Same events, same order, once each.
    let events = mirror::read_everything(&EventStore::new(db.pool.clone())).await;
    mirror::assert_mirror(&events, &nats.jetstream(), &nats.relay).await;
    first.kill().await.unwrap();
    second.kill().await.unwrap();
}

/// Bad configuration fails fast with a message naming what was wrong.
#[tokio::test]
async fn unreachable_database_is_reported_with_its_address() {
    let target = Target {
        binary: BINARY.to_owned(),
        database_url: "postgres://postgres:secret@127.0.0.1:1/nowhere".to_owned(),
        nats_url: "nats://127.0.0.1:4222".to_owned(),
        stream: "UNUSED".to_owned(),
        subject_prefix: "unused".to_owned(),
    };
    let mut command = target.command(&["relay"]);
    command.env("NEURECTOMY_LOG", "error");
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("the relay should give up on an unreachable database")
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(
            "connecting to PostgreSQL at postgres://postgres:<redacted>@127.0.0.1:1/nowhere"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("secret"), "the password leaked: {stderr}");
}
