//! End-to-end: the real binary, killed and restarted, against real
//! PostgreSQL and NATS JetStream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::time::Duration;

use commands::relay::HEADER_POSITION;
use commands::testkit::{eventually, TestDatabase, TestNats};
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

    let mut first = target.spawn("relay-1", &["relay"]).unwrap();
    // Let the first relay take the lock before the standby starts.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut second = target.spawn("relay-2", &["relay"]).unwrap();
    let simulate = target
        .command(&[
            "simulate",
            "--duration",
            "6",
            "--rate",
            "400",
            "--seed",
            "7",
            "--workflows",
            "4",
        ])
        .output();
    let simulate = tokio::spawn(simulate);

    eventually(
        "the first relay to publish",
        Duration::from_secs(30),
        || async { (jetstream_count(&nats).await > 200).then_some(()) },
    )
    .await;
    first.kill().await.unwrap();
    let killed_at = jetstream_count(&nats).await;

    eventually(
        "the standby to take over",
        Duration::from_secs(30),
        || async { (jetstream_count(&nats).await > killed_at + 200).then_some(()) },
    )
    .await;
    first = target.spawn("relay-1 (restarted)", &["relay"]).unwrap();

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
    let positions: Vec<i64> = sqlx::query_scalar("SELECT position FROM events ORDER BY position")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let ids: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT event_id FROM events ORDER BY position")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let stream = nats
        .jetstream()
        .get_stream(&nats.relay.stream_name)
        .await
        .unwrap();
    let mut seen = HashSet::new();
    for (index, (position, id)) in positions.iter().zip(&ids).enumerate() {
        let message = stream.get_raw_message(index as u64 + 1).await.unwrap();
        let header = message
            .headers
            .get(HEADER_POSITION)
            .unwrap()
            .as_str()
            .to_owned();
        assert_eq!(
            header,
            position.to_string(),
            "message {} is out of order",
            index + 1
        );
        let msg_id = message
            .headers
            .get("Nats-Msg-Id")
            .unwrap()
            .as_str()
            .to_owned();
        assert_eq!(msg_id, id.to_string());
        assert!(seen.insert(msg_id), "event {id} published twice");
    }
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
        stderr.contains("connecting to PostgreSQL at postgres://postgres:***@127.0.0.1:1/nowhere"),
        "{stderr}"
    );
    assert!(!stderr.contains("secret"), "the password leaked: {stderr}");
}
