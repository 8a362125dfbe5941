//! Erasure of personal data against the real services: the values go from
//! the store, the snapshots, the state cache and the JetStream log, every
//! seal still verifies, and `audit verify` catches a tombstone no erasure
//! accounts for, a value erased without one, and a value put back.

use std::time::Duration;

use domain::{
    AgentCommand, AgentId, AgentKind, DomainEvent, ErasureEvent, TaskCommand, WorkflowId,
};
use neurectomy_commands::erasure::{erase, EraseError, Erased, Request, Scope};
use neurectomy_commands::seal::key::SealKey;
use neurectomy_commands::seal::leaf::field_digest;
use neurectomy_commands::seal::verify::Problem;
use neurectomy_commands::testkit::{eventually, TestDatabase, TestNats};
use neurectomy_commands::{CommandHandler, EventStore, HandlerConfig};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::support::{fast, seal_report, sealed_and_clean, sealing_relay, World, WAIT};

const TENANT: &str = "acme";
/// Personal values the test writes, searched for everywhere afterwards.
const NAME: &str = "Ada Lovelace";
const TITLE: &str = "Plan for Ada";
const SECRET: &str = "123-45-6789";
const NOTE: &str = "Ada's progress";
const OUTPUT: &str = "Ada's answer";

/// How many rows of `table` hold `text` anywhere.
async fn rows_holding(db: &TestDatabase, table: &str, text: &str) -> i64 {
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {table} t WHERE strpos(to_jsonb(t)::text, $1) > 0"
    ))
    .bind(text)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

fn request(scope: Scope) -> Request {
    Request {
        tenant: TENANT.to_owned(),
        scope,
        actor: "dpo@acme".to_owned(),
        command_id: Uuid::new_v4(),
        causation_id: None,
        correlation_id: None,
    }
}

/// An agent named [`NAME`] that ran a task holding the other values.
async fn history(world: &World) -> (AgentId, String) {
    let agent = AgentId::from_uuid(Uuid::new_v4());
    world
        .run(AgentCommand::RegisterAgent {
            agent_id: agent,
            name: NAME.into(),
            kind: AgentKind::Human,
            model: None,
            capabilities: vec!["code".into()],
            parent_agent_id: None,
        })
        .await;
    let workflow: WorkflowId = world.workflow().await;
    let (task, mut create) = World::create_task(workflow, &["code"], Vec::new());
    if let TaskCommand::CreateTask { title, input, .. } = &mut create {
        *title = TITLE.into();
        *input = json!({ "ssn": SECRET, "n": 1.5 });
    }
    world.run(create).await;
    world
        .run(TaskCommand::AssignTask {
            task_id: task,
            agent_id: agent,
        })
        .await;
    world.run(TaskCommand::StartTask { task_id: task }).await;
    world
        .run(TaskCommand::ReportTaskProgress {
            task_id: task,
            percent: 50,
            note: Some(NOTE.into()),
        })
        .await;
    world
        .run(TaskCommand::CompleteTask {
            task_id: task,
            output: json!({ "answer": OUTPUT }),
        })
        .await;
    (agent, task.stream_id().to_string())
}

/// A database, a stream and a sealing key of the test's own.
async fn services() -> (TestDatabase, TestNats, EventStore, SealKey) {
    let db = TestDatabase::create(8).await.unwrap();
    let nats = TestNats::create().await.unwrap();
    let store = EventStore::new(db.pool.clone());
    (db, nats, store, SealKey::generate())
}

/// A handler for the test's tenant.
fn world_of(store: &EventStore) -> World {
    World::new(
        CommandHandler::new(store.clone(), HandlerConfig::default()),
        TENANT,
    )
}

/// A relay sealing in blocks of 5 events, running until the token.
fn relaying(
    store: &EventStore,
    nats: &TestNats,
    key: &SealKey,
) -> (
    tokio::sync::watch::Receiver<neurectomy_commands::RelayProgress>,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let relay = sealing_relay(store, nats.client.clone(), &fast(&nats.relay), key, 5);
    let progress = relay.progress();
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { relay.run(stop).await }
    });
    (progress, stop, task)
}

fn changes_of(erased: &Erased) -> Vec<domain::ErasedState> {
    let event = erased.event.as_ref().expect("an erasure event");
    match event.decode().unwrap() {
        DomainEvent::Erasure(ErasureEvent::PersonalDataErased { changes, .. }) => changes,
        other => panic!("not an erasure: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_keeps_every_seal_valid_and_leaves_no_value_behind() {
    let (db, nats, store, key) = services().await;
    let world = world_of(&store);
    let (agent, task_stream) = history(&world).await;
    let (progress, stop, relaying) = relaying(&store, &nats, &key);
    sealed_and_clean(&db, &nats, &key, &store).await;
    let head = store.head().await.unwrap().written;
    eventually("every event on JetStream", WAIT, || async {
        (progress.borrow().position >= head).then_some(())
    })
    .await;

    // Refused, and nothing written: unknown and foreign streams, a field
    // that is not personal, an erasure's own stream.
    let written = store.count_after(0, i64::MAX).await.unwrap();
    let foreign = Request {
        tenant: "globex".into(),
        ..request(Scope::Stream(task_stream.clone()))
    };
    assert!(matches!(
        erase(&store, &foreign).await,
        Err(EraseError::NotFound { .. })
    ));
    let created = store.read_stream(&task_stream, 1, 1, 1).await.unwrap();
    let created_id = created[0].event_id;
    let not_personal = request(Scope::Event {
        event_id: created_id,
        fields: vec!["workflow_id".into()],
    });
    assert!(matches!(
        erase(&store, &not_personal).await,
        Err(EraseError::Invalid(_))
    ));
    assert!(matches!(
        erase(
            &store,
            &request(Scope::Stream(format!("erasure-{}", Uuid::new_v4())))
        )
        .await,
        Err(EraseError::Invalid(_))
    ));
    assert_eq!(store.count_after(0, i64::MAX).await.unwrap(), written);

    // The task's stream: title, input, note and output.
    let first = request(Scope::Stream(task_stream.clone()));
    let erased = erase(&store, &first).await.unwrap();
    assert_eq!(
        (erased.events, erased.values, erased.aggregates),
        (3, 4, 1),
        "{erased:?}"
    );
    for value in [TITLE, SECRET, NOTE, OUTPUT] {
        assert_eq!(
            rows_holding(&db, "events", value).await,
            0,
            "`{value}` is still in the store"
        );
    }
    // The state change carried to the read models is the digest.
    let changes = changes_of(&erased);
    assert_eq!(changes.len(), 1);
    assert_eq!(
        changes[0].fields.get("title"),
        Some(&Value::String(field_digest(
            created_id,
            "title",
            &json!(TITLE)
        )))
    );
    assert!(
        changes[0]
            .fields
            .keys()
            .all(|f| ["title", "input", "progress_note", "output"].contains(&f.as_str())),
        "{changes:?}"
    );
    // A retry answers the same erasure; a second one finds nothing left.
    let again = erase(&store, &first).await.unwrap();
    assert!(again.replayed);
    assert_eq!(
        again.event.map(|e| e.event_id),
        erased.event.as_ref().map(|e| e.event_id)
    );
    let nothing = erase(&store, &request(Scope::Stream(task_stream.clone())))
        .await
        .unwrap();
    assert!(
        nothing.event.is_none() && nothing.events == 0,
        "{nothing:?}"
    );

    // The agent's name, and then the actor of every event by the tester.
    let named = erase(
        &store,
        &request(Scope::Stream(agent.stream_id().to_string())),
    )
    .await
    .unwrap();
    assert_eq!((named.events, named.values), (1, 1), "{named:?}");
    assert_eq!(rows_holding(&db, "events", NAME).await, 0);
    let actors = erase(&store, &request(Scope::Actor("integration-test".into())))
        .await
        .unwrap();
    assert_eq!(actors.events as i64, written, "{actors:?}");
    assert_eq!(rows_holding(&db, "events", "integration-test").await, 0);

    // Every seal still verifies, the erasures' events sealed too.
    sealed_and_clean(&db, &nats, &key, &store).await;

    // The relay leader deletes the erased events' messages from JetStream.
    eventually("the erasures purged from JetStream", WAIT, || async {
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM erasures WHERE purged_at IS NULL")
                .fetch_one(&db.pool)
                .await
                .unwrap();
        (pending == 0).then_some(())
    })
    .await;
    let stream = nats
        .jetstream()
        .get_stream(&nats.relay.stream_name)
        .await
        .unwrap();
    let info = stream.get_info().await.unwrap();
    let mut kept = 0;
    for sequence in info.state.first_sequence..=info.state.last_sequence {
        if let Ok(message) = stream.get_raw_message(sequence).await {
            let body = String::from_utf8_lossy(&message.payload).into_owned();
            for value in [NAME, TITLE, SECRET, NOTE, OUTPUT] {
                assert!(
                    !body.contains(value),
                    "message {sequence} still holds `{value}`"
                );
            }
            kept += 1;
        }
    }
    // Every event erased was on the stream before: all of them deleted
    // (the actor erasure covered every event written before it).
    assert_eq!(
        kept as i64,
        store.count_after(0, i64::MAX).await.unwrap() - written
    );

    // Tampering with erasure is caught.
    let tamper = |sql: &'static str| {
        let pool = db.pool.clone();
        async move { sqlx::raw_sql(sql).execute(&pool).await.unwrap() }
    };
    let clean = seal_report(&db, &nats, &key).await;
    assert_eq!(clean.problem, None);
    // A value put back where its digest was.
    let progress_position: i64 =
        sqlx::query_scalar("SELECT position FROM events WHERE event_type = 'TaskProgressReported'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    tamper("CREATE TABLE saved AS SELECT * FROM events; CREATE TABLE saved_tombstones AS SELECT * FROM tombstones").await;
    sqlx::query("UPDATE events SET data = jsonb_set(data, '{note}', to_jsonb($1::text)) WHERE position = $2")
        .bind(NOTE)
        .bind(progress_position)
        .execute(&db.pool)
        .await
        .unwrap();
    match seal_report(&db, &nats, &key).await.problem {
        Some(Problem::Edited { position, what, .. }) => {
            assert_eq!(position, progress_position);
            assert!(what.contains("erased field `note`"), "{what}");
        }
        other => panic!("a value put back: {other:?}"),
    }
    let restore = "UPDATE events e SET data = s.data, metadata = s.metadata FROM saved s WHERE s.position = e.position; \
                   DELETE FROM tombstones; INSERT INTO tombstones SELECT * FROM saved_tombstones";
    tamper(restore).await;
    assert_eq!(seal_report(&db, &nats, &key).await.problem, None);
    // A tombstone deleted: its digest is hashed as a value.
    sqlx::query("DELETE FROM tombstones WHERE position = $1")
        .bind(progress_position)
        .execute(&db.pool)
        .await
        .unwrap();
    // The erasure no longer accounts for its tombstones (flagged at the
    // first of them), and the event holds digests no tombstone explains.
    match seal_report(&db, &nats, &key).await.problem {
        Some(Problem::Unaccounted { position, what }) => {
            assert!(position <= progress_position);
            assert!(what.contains("does not account for"), "{what}");
        }
        other => panic!("a tombstone deleted: {other:?}"),
    }
    sqlx::query("DELETE FROM tombstones WHERE position <> $1")
        .bind(progress_position)
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM tombstones WHERE position = $1")
        .bind(progress_position)
        .execute(&db.pool)
        .await
        .unwrap();
    assert!(
        matches!(
            seal_report(&db, &nats, &key).await.problem,
            Some(Problem::Edited { .. })
        ),
        "digests without tombstones"
    );
    tamper(restore).await;
    // A value erased by hand, with a tombstone naming no erasure, and then
    // naming a real erasure that does not account for it.
    let workflow: (i64, Uuid, Value) = sqlx::query_as(
        "SELECT position, event_id, data->'name' FROM events WHERE event_type = 'WorkflowStarted'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let digest = field_digest(workflow.1, "name", &workflow.2);
    sqlx::query("UPDATE events SET data = jsonb_set(data, '{name}', to_jsonb($1::text)) WHERE position = $2")
        .bind(&digest)
        .bind(workflow.0)
        .execute(&db.pool)
        .await
        .unwrap();
    assert!(
        matches!(seal_report(&db, &nats, &key).await.problem, Some(Problem::Edited { position, .. }) if position == workflow.0),
        "a value erased without a tombstone"
    );
    for erasure in [Uuid::new_v4(), erased.event.as_ref().unwrap().event_id] {
        sqlx::query(
            "INSERT INTO tombstones (position, erasure, event_id, tenant, stream_id, fields) \
             SELECT position, $2, event_id, tenant, stream_id, ARRAY['name'] FROM events WHERE position = $1",
        )
        .bind(workflow.0)
        .bind(erasure)
        .execute(&db.pool)
        .await
        .unwrap();
        match seal_report(&db, &nats, &key).await.problem {
            Some(Problem::Unaccounted { position, .. }) => assert_eq!(position, workflow.0),
            other => {
                panic!("a tombstone of erasure {erasure} that does not account for it: {other:?}")
            }
        }
        sqlx::query("DELETE FROM tombstones WHERE position = $1 AND erasure = $2")
            .bind(workflow.0)
            .bind(erasure)
            .execute(&db.pool)
            .await
            .unwrap();
    }
    tamper(restore).await;
    assert_eq!(seal_report(&db, &nats, &key).await.problem, None);
    stop.cancel();
    relaying.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_erased_before_they_are_sealed_seal_and_verify() {
    let (db, nats, store, key) = services().await;
    let world = world_of(&store);
    let (_, task_stream) = history(&world).await;
    // Erased before any relay ran: the sealer reads the digests from the
    // store, and the relay publishes them. The same request twice at once
    // is one erasure (the second waits for the first's locks, then answers
    // its result).
    let once = request(Scope::Stream(task_stream));
    let (a, b) = tokio::join!(erase(&store, &once), erase(&store, &once));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(
        a.event.as_ref().map(|e| e.event_id),
        b.event.as_ref().map(|e| e.event_id)
    );
    assert!(a.event.is_some() && a.replayed != b.replayed, "{a:?} {b:?}");
    let (_, stop, relaying) = relaying(&store, &nats, &key);
    sealed_and_clean(&db, &nats, &key, &store).await;
    stop.cancel();
    relaying.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erased_state_is_neither_cached_nor_snapshotted() {
    let db = TestDatabase::create(6).await.unwrap();
    let store = EventStore::new(db.pool.clone());
    let config = HandlerConfig {
        snapshot_every: 2,
        ..HandlerConfig::default()
    };
    let handler = CommandHandler::new(store.clone(), config);
    let stop = CancellationToken::new();
    let watching = tokio::spawn({
        let (handler, stop) = (handler.clone(), stop.clone());
        async move { handler.watch_erasures(stop).await }
    });
    // Listening first: the watcher's first connection moves the cache's
    // epoch, and a command running across that moment takes no snapshot.
    let listening = std::time::Instant::now();
    while !handler.watching_erasures() {
        assert!(
            listening.elapsed() < std::time::Duration::from_secs(10),
            "the handler did not start listening for erasures within 10 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let world = World::new(handler, TENANT).with_config(config);
    let agent = AgentId::from_uuid(Uuid::new_v4());
    world
        .run(AgentCommand::RegisterAgent {
            agent_id: agent,
            name: NAME.into(),
            kind: AgentKind::Human,
            model: None,
            capabilities: vec![],
            parent_agent_id: None,
        })
        .await;
    let pause = AgentCommand::PauseAgent {
        agent_id: agent,
        reason: None,
    };
    let resume = AgentCommand::ResumeAgent { agent_id: agent };
    world.run(pause.clone()).await; // version 2: a snapshot, the state cached
    assert_eq!(rows_holding(&db, "snapshots", NAME).await, 1);
    let stream = agent.stream_id().to_string();
    erase(&store, &request(Scope::Stream(stream.clone())))
        .await
        .unwrap();
    assert_eq!(
        rows_holding(&db, "snapshots", NAME).await,
        0,
        "the snapshot goes with the erasure"
    );
    // Within the guard's window no snapshot of the stream is taken at all.
    world.run(resume.clone()).await;
    world.run(pause.clone()).await; // version 4
    let snapshots: i64 = sqlx::query_scalar("SELECT count(*) FROM snapshots WHERE stream_id = $1")
        .bind(&stream)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(snapshots, 0);
    // Past the window (moved back), the handler snapshots again — from a
    // state without the name: the erasure's NOTIFY dropped the cached one.
    sqlx::query("UPDATE tombstones SET erased_at = erased_at - interval '11 minutes'")
        .execute(&db.pool)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    world.run(resume).await;
    world.run(pause).await; // version 6
    let state: Value = sqlx::query_scalar("SELECT state FROM snapshots WHERE stream_id = $1")
        .bind(&stream)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(!state.to_string().contains(NAME), "{state}");
    assert!(
        state["name"]
            .as_str()
            .is_some_and(|n| n.starts_with("sha256:")),
        "{state}"
    );
    stop.cancel();
    watching.await.unwrap();
}
