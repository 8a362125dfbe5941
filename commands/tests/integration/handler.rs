//! The command handler: idempotency, refusals, retries, snapshots and
//! upcasting, against a real event store.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;

use domain::{
    AgentCommand, AgentEvent, AgentId, AgentKind, Aggregate, Command, DomainEvent, TaskCommand,
    TaskId, TaskState, TaskStatus,
};
use neurectomy_commands::testkit::TestDatabase;
use neurectomy_commands::{
    event_store, CommandError, CommandHandler, EventMetadata, EventStore, ExpectedVersion,
    HandlerConfig,
};
use serde_json::{json, Value};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::support::{code_of, event_count, World, TENANT};

async fn world(pool_size: u32, config: HandlerConfig) -> (TestDatabase, World) {
    let db = TestDatabase::create(pool_size).await.unwrap();
    let handler = CommandHandler::new(EventStore::new(db.pool.clone()), config);
    (db, World::new(handler, TENANT).with_config(config))
}

fn progress(task: TaskId, percent: u8) -> Command {
    TaskCommand::ReportTaskProgress {
        task_id: task,
        percent,
        note: Some(format!("at {percent}%")),
    }
    .into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_id_appends_once_and_replays_its_first_result() {
    let (db, world) = world(12, HandlerConfig::default()).await;
    let h = &world.handler;
    let workflow = world.workflow().await;

    // A creating command retried: the second run is refused by the domain
    // (already exists) and answers with the first result.
    let (task, create) = World::create_task(workflow, &["code"], Vec::new());
    let ctx = world.ctx();
    let first = h.execute(create.clone().into(), &ctx).await.unwrap();
    assert!(!first.replayed);
    assert_eq!((first.version, first.events.len()), (1, 1));
    let count = event_count(&db.pool).await;
    let second = h.execute(create.into(), &ctx).await.unwrap();
    assert!(second.replayed);
    assert_eq!(
        (
            &second.stream_id,
            second.version,
            second.position,
            &second.events
        ),
        (
            &first.stream_id,
            first.version,
            first.position,
            &first.events
        )
    );
    assert_eq!(
        event_count(&db.pool).await,
        count,
        "the retry appended nothing"
    );

    // A command that would still be legal when retried: the event ids
    // (derived from the command id) stop the second append.
    let agent = world.agent(&["code"]).await;
    world
        .run(TaskCommand::AssignTask {
            task_id: task,
            agent_id: agent,
        })
        .await;
    world.run(TaskCommand::StartTask { task_id: task }).await;
    let ctx = world.ctx();
    let first = h.execute(progress(task, 10), &ctx).await.unwrap();
    let count = event_count(&db.pool).await;
    let second = h.execute(progress(task, 10), &ctx).await.unwrap();
    assert!(!first.replayed && second.replayed);
    assert_eq!(
        (second.version, second.position, &second.events),
        (first.version, first.position, &first.events)
    );
    assert_eq!(event_count(&db.pool).await, count);

    // The same command id sent concurrently: one append, every caller gets it.
    let ctx_concurrent = world.ctx();
    let runs: Vec<_> = (0..8)
        .map(|_| {
            let (h, ctx) = (h.clone(), ctx_concurrent.clone());
            tokio::spawn(async move { h.execute(progress(task, 20), &ctx).await })
        })
        .collect();
    let mut outcomes = Vec::new();
    for run in runs {
        outcomes.push(run.await.unwrap().unwrap());
    }
    assert_eq!(outcomes.iter().filter(|o| !o.replayed).count(), 1);
    assert!(outcomes
        .iter()
        .all(|o| o.position == outcomes[0].position && o.events == outcomes[0].events));
    assert_eq!(event_count(&db.pool).await, count + 1);

    // The same id for a different command: CommandIdReused, nothing appended,
    // whether the domain would accept it (same stream, other stream) or not.
    let count = event_count(&db.pool).await;
    let reused: [Command; 3] = [
        progress(task, 99),
        AgentCommand::PauseAgent {
            agent_id: agent,
            reason: None,
        }
        .into(),
        TaskCommand::StartTask { task_id: task }.into(),
    ];
    for command in reused {
        let name = command.name();
        match h.execute(command, &ctx).await {
            Err(e @ CommandError::CommandIdReused { .. }) => {
                assert_eq!(e.code(), "CONFLICT");
                let CommandError::CommandIdReused {
                    command_id,
                    stream_id,
                    previous_type,
                } = e
                else {
                    unreachable!()
                };
                assert_eq!(command_id, ctx.command_id);
                assert_eq!(stream_id, task.stream_id().to_string());
                assert_eq!(previous_type, "ReportTaskProgress");
            }
            other => {
                panic!("{name} with a reused command id: expected CommandIdReused, got {other:?}")
            }
        }
    }
    assert_eq!(event_count(&db.pool).await, count);

    // A retried CompleteTask is now illegal (the task is completed), yet the
    // retry returns the first result instead of an error.
    let ctx = world.ctx();
    let complete: Command = TaskCommand::CompleteTask {
        task_id: task,
        output: json!({ "answer": 42 }),
    }
    .into();
    let first = h.execute(complete.clone(), &ctx).await.unwrap();
    let count = event_count(&db.pool).await;
    let second = h.execute(complete.clone(), &ctx).await.unwrap();
    assert!(second.replayed);
    assert_eq!(
        (second.version, second.position, &second.events),
        (first.version, first.position, &first.events)
    );
    // With a fresh id it is refused.
    assert_eq!(code_of(world.try_run(complete).await), "INVALID_TRANSITION");
    assert_eq!(event_count(&db.pool).await, count);
}

#[tokio::test]
async fn refused_commands_append_nothing_and_say_why() {
    let (db, world) = world(5, HandlerConfig::default()).await;
    let workflow = world.workflow().await;
    let coder = world.agent(&["code"]).await;
    let pending = world.task(workflow, &["code"], Vec::new()).await;
    let needs_deploy = world.task(workflow, &["code", "deploy"], Vec::new()).await;
    let dependent = world.task(workflow, &["code"], vec![pending]).await;
    world
        .run(TaskCommand::AssignTask {
            task_id: dependent,
            agent_id: coder,
        })
        .await;
    let retired = world.agent(&["code"]).await;
    world
        .run(AgentCommand::RetireAgent {
            agent_id: retired,
            reason: Some("replaced".into()),
        })
        .await;
    let unknown = AgentId::from_uuid(Uuid::new_v4());
    let (_, mut oversized) = World::create_task(workflow, &[], Vec::new());
    if let TaskCommand::CreateTask { input, .. } = &mut oversized {
        *input = json!("x".repeat(64 * 1024 + 1));
    }

    let other = world.as_tenant("tenant-b");
    let other_workflow = other.workflow().await;
    let other_task = other.task(other_workflow, &[], Vec::new()).await;

    let cases: Vec<(&World, Command, &str)> = vec![
        (
            &world,
            TaskCommand::AssignTask {
                task_id: pending,
                agent_id: unknown,
            }
            .into(),
            "NOT_FOUND",
        ),
        (
            &world,
            AgentCommand::PauseAgent {
                agent_id: unknown,
                reason: None,
            }
            .into(),
            "NOT_FOUND",
        ),
        (
            &world,
            TaskCommand::StartTask { task_id: pending }.into(),
            "INVALID_TRANSITION",
        ),
        (
            &world,
            TaskCommand::AssignTask {
                task_id: needs_deploy,
                agent_id: coder,
            }
            .into(),
            "CAPABILITY_MISMATCH",
        ),
        (
            &world,
            TaskCommand::StartTask { task_id: dependent }.into(),
            "DEPENDENCY_NOT_COMPLETED",
        ),
        (
            &world,
            TaskCommand::AssignTask {
                task_id: pending,
                agent_id: retired,
            }
            .into(),
            "AGENT_UNAVAILABLE",
        ),
        (&world, oversized.into(), "VALIDATION"),
        // Another tenant's streams look absent, directly or as related state.
        (
            &other,
            AgentCommand::PauseAgent {
                agent_id: coder,
                reason: None,
            }
            .into(),
            "NOT_FOUND",
        ),
        (
            &other,
            TaskCommand::CancelTask {
                task_id: pending,
                reason: "not yours".into(),
            }
            .into(),
            "NOT_FOUND",
        ),
        (
            &other,
            TaskCommand::AssignTask {
                task_id: other_task,
                agent_id: coder,
            }
            .into(),
            "NOT_FOUND",
        ),
        (
            &other,
            World::create_task(workflow, &[], Vec::new()).1.into(),
            "NOT_FOUND",
        ),
        (
            &world,
            TaskCommand::CancelTask {
                task_id: other_task,
                reason: "not yours".into(),
            }
            .into(),
            "NOT_FOUND",
        ),
    ];
    for (who, command, code) in cases {
        let name = command.name();
        let before = event_count(&db.pool).await;
        let result = who.try_run(command).await;
        let got = match &result {
            Ok(o) => panic!(
                "{name} as {} should fail with {code}, got {o:?}",
                who.tenant
            ),
            Err(e) => e.code(),
        };
        assert_eq!(got, code, "{name} as {}: {:?}", who.tenant, result);
        assert_eq!(
            event_count(&db.pool).await,
            before,
            "{name} appended events"
        );
    }

    // Malformed JSON never becomes a command.
    let task = pending.to_string();
    let malformed = [
        "not json".to_owned(),
        r#"{"type":"LaunchRockets"}"#.to_owned(),
        r#"{"type":"StartTask","task_id":"not-a-uuid"}"#.to_owned(),
        format!(r#"{{"type":"ReportTaskProgress","task_id":"{task}","percent":300}}"#),
        format!(r#"{{"type":"CreateTask","task_id":"{task}"}}"#),
        format!(r#"{{"task_id":"{task}"}}"#),
    ];
    for text in &malformed {
        assert!(
            serde_json::from_str::<Command>(text).is_err(),
            "{text} should not deserialize"
        );
    }
    // ... while the well-formed version of the same JSON does, and works.
    let before = event_count(&db.pool).await;
    let command: Command = serde_json::from_value(
        json!({ "type": "CancelTask", "task_id": task, "reason": "done testing" }),
    )
    .unwrap();
    world.run(command).await;
    assert_eq!(event_count(&db.pool).await, before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commands_on_one_stream_all_land_through_bounded_retries() {
    const N: usize = 16;
    // Each failed attempt of a writer means another writer committed in
    // between, so N attempts always suffice for N writers.
    let config = HandlerConfig {
        max_attempts: N as u32,
        ..HandlerConfig::default()
    };
    let (db, world) = world(N as u32 + 4, config).await;
    let (task, _) = world.running_task().await;
    let stream = task.stream_id().to_string();

    let runs: Vec<_> = (0..N)
        .map(|i| {
            let world = world.clone();
            tokio::spawn(async move {
                let ctx = world.ctx();
                let outcome = world
                    .handler
                    .execute(progress(task, i as u8), &ctx)
                    .await
                    .unwrap_or_else(|e| panic!("writer {i}: {e}"));
                (ctx.command_id, outcome)
            })
        })
        .collect();
    let mut versions = Vec::new();
    let mut command_ids = HashSet::new();
    let mut most_attempts = 0;
    for run in runs {
        let (command_id, outcome) = run.await.unwrap();
        assert!(!outcome.replayed);
        assert!((1..=N as u32).contains(&outcome.attempts), "{outcome:?}");
        most_attempts = most_attempts.max(outcome.attempts);
        versions.push(outcome.version);
        command_ids.insert(command_id);
    }
    assert!(
        most_attempts > 1,
        "{N} concurrent writers must have lost races"
    );
    versions.sort_unstable();
    let last = 3 + N as i64;
    assert_eq!(versions, (4..=last).collect::<Vec<_>>());

    let stored = world
        .store()
        .read_stream(&stream, 1, i64::MAX, 1000)
        .await
        .unwrap();
    assert_eq!(
        stored.iter().map(|e| e.stream_version).collect::<Vec<_>>(),
        (1..=last).collect::<Vec<_>>(),
        "gap-free, duplicate-free stream"
    );
    let progress_ids: HashSet<Uuid> = stored[3..].iter().map(|e| e.metadata.command_id).collect();
    assert_eq!(progress_ids, command_ids, "one event per command");

    // A caller pinning a stale version gets a conflict and appends nothing.
    let before = event_count(&db.pool).await;
    let mut ctx = world.ctx();
    ctx.expected_version = Some(ExpectedVersion::Exact(3));
    match world.handler.execute(progress(task, 50), &ctx).await {
        Err(e @ CommandError::Conflict { .. }) => {
            assert_eq!(e.code(), "CONFLICT");
            let CommandError::Conflict {
                expected, actual, ..
            } = e
            else {
                unreachable!()
            };
            assert_eq!((expected, actual), (ExpectedVersion::Exact(3), last as u64));
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(event_count(&db.pool).await, before);
    // Pinning the current version works.
    let mut ctx = world.ctx();
    ctx.expected_version = Some(ExpectedVersion::Exact(last as u64));
    let outcome = world
        .handler
        .execute(progress(task, 51), &ctx)
        .await
        .unwrap();
    assert_eq!(outcome.version, last + 1);
}

/// Folds versions `1..=to` of a task stream from the store.
async fn fold_task(store: &EventStore, stream: &str, to: i64) -> TaskState {
    let mut state = TaskState::default();
    for event in store.read_stream(stream, 1, to, 1000).await.unwrap() {
        let event = TaskState::from_domain(event.decode().unwrap()).unwrap();
        state.evolve(&event);
    }
    state
}

#[tokio::test]
async fn snapshots_are_taken_every_n_events_and_loaded_with_the_tail() {
    let config = HandlerConfig {
        snapshot_every: 5,
        ..HandlerConfig::default()
    };
    let (db, world) = world(5, config).await;
    let workflow = world.workflow().await;
    let agent = world.agent(&["code"]).await;
    // 12 commands on one task: create, assign, start, 9 progress reports.
    let task = world.task(workflow, &["code"], Vec::new()).await;
    world
        .run(TaskCommand::AssignTask {
            task_id: task,
            agent_id: agent,
        })
        .await;
    world.run(TaskCommand::StartTask { task_id: task }).await;
    for percent in 1..=9u8 {
        world.run(progress(task, percent * 10)).await;
    }
    let stream = task.stream_id().to_string();
    assert_eq!(world.store().stream_version(&stream).await.unwrap(), 12);

    let (version, snapshot_version, tenant, state): (i64, i32, String, Value) = sqlx::query_as(
        "SELECT stream_version, snapshot_version, tenant, state FROM snapshots WHERE stream_id = $1",
    )
    .bind(&stream)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(version, 10);
    assert_eq!(snapshot_version, TaskState::SNAPSHOT_VERSION);
    assert_eq!(tenant, TENANT);
    let snapshot: TaskState = serde_json::from_value(state.clone()).unwrap();
    assert_eq!(snapshot, fold_task(world.store(), &stream, 10).await);
    assert_ne!(
        snapshot,
        fold_task(world.store(), &stream, 12).await,
        "the tail after the snapshot changes the state"
    );
    assert_eq!(snapshot.get().unwrap().progress, 70);

    // A further command decides on snapshot + tail. Each check below uses a
    // handler with a cold state cache (as a freshly started process would),
    // so that the stream is loaded from the store.
    let out = cold(&world).run(progress(task, 95)).await;
    assert_eq!(out.version, 13);

    // The handler really reads the snapshot: one that claims the task is
    // completed makes progress illegal.
    let mut completed = state.clone();
    completed["status"] = json!("completed");
    set_snapshot(&db, &stream, &completed).await;
    let before = event_count(&db.pool).await;
    let err = cold(&world).try_run(progress(task, 96)).await.unwrap_err();
    assert_eq!(err.code(), "INVALID_TRANSITION");
    assert!(err.to_string().contains("completed"), "{err}");
    assert_eq!(event_count(&db.pool).await, before);

    // With the genuine snapshot back, the task completes; the tail then
    // forbids progress.
    set_snapshot(&db, &stream, &state).await;
    let out = cold(&world)
        .run(TaskCommand::CompleteTask {
            task_id: task,
            output: json!("done"),
        })
        .await;
    assert_eq!(out.version, 14);
    assert_eq!(
        code_of(cold(&world).try_run(progress(task, 97)).await),
        "INVALID_TRANSITION"
    );

    // An unreadable snapshot is ignored: the state is rebuilt from events
    // (a default state would answer NOT_FOUND).
    set_snapshot(&db, &stream, &json!({ "state": "from the future" })).await;
    let err = cold(&world)
        .try_run(TaskCommand::CancelTask {
            task_id: task,
            reason: "too late".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), "INVALID_TRANSITION", "{err}");
    let full = fold_task(world.store(), &stream, 14).await;
    assert_eq!(full.get().unwrap().status, TaskStatus::Completed);
}

/// Events written before the command hash was BLAKE3 carry SHA-256 of the
/// same canonical JSON: a retry of such a command is still recognised (and
/// answered with its first result); a different command reusing its id is
/// still refused.
#[tokio::test]
async fn a_command_stored_with_a_sha256_hash_is_recognised_when_retried() {
    use sha2::Digest as _;
    let (db, world) = world(4, HandlerConfig::default()).await;
    let h = &world.handler;
    let (task, _agent) = world.running_task().await;
    let command = TaskCommand::ReportTaskProgress {
        task_id: task,
        percent: 30,
        note: Some("legacy".into()),
    };
    let ctx = world.ctx();
    let first = h.execute(command.clone().into(), &ctx).await.unwrap();
    let canonical = serde_json::to_vec(&serde_json::to_value(&command).unwrap()).unwrap();
    let stored: String =
        sqlx::query_scalar("SELECT metadata->>'command_hash' FROM events WHERE command_id = $1")
            .bind(ctx.command_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(stored, blake3::hash(&canonical).to_hex().as_str());
    // As an event written before BLAKE3 would have it.
    let sha256 = hex::encode(sha2::Sha256::digest(&canonical));
    let rewritten = sqlx::query(
        "UPDATE events SET metadata = jsonb_set(metadata, '{command_hash}', to_jsonb($2::text)) \
         WHERE command_id = $1",
    )
    .bind(ctx.command_id)
    .bind(&sha256)
    .execute(&db.pool)
    .await
    .unwrap()
    .rows_affected();
    assert_eq!(rewritten, 1);
    let count = event_count(&db.pool).await;
    let retried = h.execute(command.into(), &ctx).await.unwrap();
    assert!(retried.replayed, "{retried:?}");
    assert_eq!(
        (retried.version, retried.position),
        (first.version, first.position)
    );
    let other = TaskCommand::ReportTaskProgress {
        task_id: task,
        percent: 31,
        note: Some("legacy".into()),
    };
    match h.execute(other.into(), &ctx).await {
        Err(CommandError::CommandIdReused { command_id, .. }) => {
            assert_eq!(command_id, ctx.command_id);
        }
        other => panic!("a different command reusing the id: {other:?}"),
    }
    assert_eq!(event_count(&db.pool).await, count, "nothing appended");
}

/// A handler like `world`'s with an empty state cache.
fn cold(world: &World) -> World {
    let handler = CommandHandler::new(world.store().clone(), world.config);
    World::new(handler, &world.tenant)
}

async fn set_snapshot(db: &TestDatabase, stream: &str, state: &Value) {
    let updated = sqlx::query("UPDATE snapshots SET state = $2 WHERE stream_id = $1")
        .bind(stream)
        .bind(state)
        .execute(&db.pool)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(updated, 1);
}

#[tokio::test]
async fn v1_agent_registrations_are_upcast_on_load() {
    let (db, world) = world(3, HandlerConfig::default()).await;
    let agent = AgentId::from_uuid(Uuid::new_v4());
    let stream = agent.stream_id().to_string();
    let command_id = Uuid::new_v4();
    let metadata = EventMetadata {
        event_id: event_store::event_id(TENANT, command_id, 0),
        command_id,
        command_type: "RegisterAgent".into(),
        command_hash: "0".repeat(64),
        correlation_id: command_id,
        causation_id: command_id,
        actor: "legacy-importer".into(),
        tenant: TENANT.into(),
        occurred_at: OffsetDateTime::now_utc(),
        traceparent: None,
    };
    let v1 = json!({
        "agent_id": agent,
        "name": "legacy",
        "model": "gpt-3.5-turbo",
        "capabilities": ["summarize"],
    });
    // The same position/transaction_id scheme as append.sql.
    sqlx::query(
        "INSERT INTO events (position, transaction_id, stream_id, stream_version, event_id, \
         command_id, correlation_id, tenant, event_type, schema_version, data, metadata) \
         VALUES ((pg_current_xact_id()::text::bigint << 16), pg_current_xact_id(), $1, 1, $2, \
         $3, $4, $5, 'AgentRegistered', 1, $6, $7)",
    )
    .bind(&stream)
    .bind(metadata.event_id)
    .bind(command_id)
    .bind(command_id)
    .bind(TENANT)
    .bind(&v1)
    .bind(serde_json::to_value(&metadata).unwrap())
    .execute(&db.pool)
    .await
    .unwrap();

    let out = world
        .run(AgentCommand::PauseAgent {
            agent_id: agent,
            reason: Some("maintenance".into()),
        })
        .await;
    assert_eq!(out.version, 2);
    // The upcast state is a registered, now paused agent.
    assert_eq!(
        code_of(
            world
                .try_run(AgentCommand::PauseAgent {
                    agent_id: agent,
                    reason: None,
                })
                .await
        ),
        "INVALID_TRANSITION"
    );
    world
        .run(AgentCommand::ResumeAgent { agent_id: agent })
        .await;

    let stored = world.store().read_stream(&stream, 1, 10, 10).await.unwrap();
    assert_eq!(stored.len(), 3);
    assert_eq!(stored[0].schema_version, 1, "stored as written");
    assert_eq!(stored[0].data, v1, "the row itself is never rewritten");
    assert_eq!(stored[0].metadata, metadata);
    match stored[0].decode().unwrap() {
        DomainEvent::Agent(AgentEvent::AgentRegistered {
            agent_id,
            name,
            kind,
            model,
            capabilities,
            parent_agent_id,
        }) => {
            assert_eq!(agent_id, agent);
            assert_eq!(name, "legacy");
            assert_eq!(kind, AgentKind::Llm);
            assert_eq!(model.as_deref(), Some("gpt-3.5-turbo"));
            assert_eq!(capabilities, vec!["summarize".to_owned()]);
            assert_eq!(parent_agent_id, None);
        }
        other => panic!("expected AgentRegistered, got {other:?}"),
    }
    assert!(matches!(
        stored[1].decode().unwrap(),
        DomainEvent::Agent(AgentEvent::AgentPaused { .. })
    ));
    assert_eq!(stored[1].schema_version, 1);
    assert_eq!(
        stored[1].event_type, "AgentPaused",
        "new events are written in the current schema"
    );
}

#[tokio::test]
async fn without_retries_refusals_and_replays_are_still_answered_faithfully() {
    // One attempt: no retry after a version conflict. The state cache must
    // not turn a refusal (or an idempotent replay) into a conflict.
    let config = HandlerConfig {
        max_attempts: 1,
        ..HandlerConfig::default()
    };
    let (db, world) = world(3, config).await;
    let retired = world.agent(&["code"]).await;
    world
        .run(AgentCommand::RetireAgent {
            agent_id: retired,
            reason: None,
        })
        .await;
    let before = event_count(&db.pool).await;
    let result = world
        .try_run(AgentCommand::PauseAgent {
            agent_id: retired,
            reason: None,
        })
        .await;
    assert_eq!(code_of(result), "INVALID_TRANSITION");

    let agent = world.agent(&["code"]).await;
    let pause: Command = AgentCommand::PauseAgent {
        agent_id: agent,
        reason: None,
    }
    .into();
    let ctx = world.ctx();
    let first = world.handler.execute(pause.clone(), &ctx).await.unwrap();
    let again = world.handler.execute(pause, &ctx).await.unwrap();
    assert!(again.replayed);
    assert_eq!(
        (again.version, again.position),
        (first.version, first.position)
    );
    assert_eq!(event_count(&db.pool).await, before + 2);

    // Another process (a handler with a cache of its own) moves the stream
    // on: this handler's cached state is stale, which is no lost race, both
    // when the stale state refuses the command and when it accepts it.
    cold(&world)
        .run(AgentCommand::ResumeAgent { agent_id: agent })
        .await;
    let out = world
        .try_run(AgentCommand::PauseAgent {
            agent_id: agent,
            reason: Some("again".into()),
        })
        .await
        .unwrap();
    assert_eq!((out.version, out.attempts), (4, 1));
    world
        .run(AgentCommand::ResumeAgent { agent_id: agent })
        .await;
    cold(&world)
        .run(AgentCommand::PauseAgent {
            agent_id: agent,
            reason: None,
        })
        .await;
    cold(&world)
        .run(AgentCommand::ResumeAgent { agent_id: agent })
        .await;
    let out = world
        .try_run(AgentCommand::FailAgent {
            agent_id: agent,
            reason: "crashed".into(),
        })
        .await
        .unwrap();
    assert_eq!((out.version, out.attempts), (8, 1));
    assert_eq!(event_count(&db.pool).await, before + 8);
}
