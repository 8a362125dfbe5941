//! `neurectomy-bench append`: commands through the real handler (load +
//! decide + append of one `TaskProgressReported`, writers picking streams at
//! random, so some collide and retry) and raw batched appends, on a scratch
//! database. Also the workload the other benchmarks share: running tasks to
//! report progress on, and progress events.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use api::settings::Settings;
use commands::{
    CommandContext, CommandError, CommandHandler, EventMetadata, EventStore, ExpectedVersion,
    HandlerConfig, NewEvent,
};
use domain::{
    AgentCommand, AgentId, AgentKind, Command, TaskCommand, TaskId, WorkflowCommand, WorkflowId,
};
use futures::StreamExt;
use serde_json::json;
use uuid::Uuid;

use crate::cli::BenchArgs;
use crate::figures::{drive_metered, median, wants, Figures};
use crate::meter::Peer;
use crate::scratch;

/// `append`: commands through the handler and raw batched appends.
pub async fn run(settings: &Settings, args: &BenchArgs) -> anyhow::Result<Vec<Figures>> {
    let db = scratch::database(settings, args.pool.max(1)).await?;
    // The scratch database is dropped whether the scenarios succeed or not.
    let result = append_scenarios(
        settings,
        args,
        EventStore::with_committers(db.pool.clone(), settings.database_committers),
    )
    .await;
    scratch::drop_database(db).await;
    result
}

async fn append_scenarios(
    settings: &Settings,
    args: &BenchArgs,
    store: EventStore,
) -> anyhow::Result<Vec<Figures>> {
    let handler = CommandHandler::new(
        store.clone(),
        HandlerConfig {
            max_attempts: 10,
            ..settings.handler_config()
        },
    );
    let duration = Duration::from_secs(args.seconds.max(1));
    let mut results = Vec::new();

    for (name, writers, streams) in [
        ("command: 1 writer, 1 stream", 1usize, 1usize),
        ("command: 8 writers, 1,000 streams", 8, 1_000),
        ("command: 64 writers, 10,000 streams", 64, 10_000),
    ] {
        if !wants(args, name) {
            continue;
        }
        eprintln!("setting up {streams} running task(s) for `{name}`…");
        let tasks = Arc::new(running_tasks(&handler, streams).await?);
        let mut runs = Vec::new();
        for run in 0..args.runs.max(1) {
            eprintln!(
                "running `{name}` ({}/{}) for {}s…",
                run + 1,
                args.runs.max(1),
                duration.as_secs()
            );
            let conflicts = Arc::new(AtomicU64::new(0));
            let mut f = {
                let handler = handler.clone();
                let tasks = tasks.clone();
                let conflicts = conflicts.clone();
                drive_metered(
                    name,
                    "cmd/s",
                    writers,
                    duration,
                    &[Peer::Postgres],
                    move |writer, n| {
                        let handler = handler.clone();
                        let tasks = tasks.clone();
                        let conflicts = conflicts.clone();
                        async move {
                            let (command, ctx) = progress_command(&tasks, writer, n);
                            let outcome = handler.execute(command, &ctx).await?;
                            conflicts.fetch_add(u64::from(outcome.attempts - 1), Ordering::Relaxed);
                            Ok(1)
                        }
                    },
                )
                .await?
            };
            f.conflicts = conflicts.load(Ordering::Relaxed);
            runs.push(f);
        }
        results.extend(median(runs));
        if writers == 1 {
            // What the load generator alone costs (the commands built, no
            // handler): the command figures above include it.
            let name = "command generator alone (1 writer, no handler)";
            eprintln!("running `{name}` for {}s…", duration.as_secs());
            let tasks = tasks.clone();
            results.push(
                drive_metered(name, "cmd/s", 1, duration, &[], move |writer, n| {
                    let built = progress_command(&tasks, writer, n);
                    async move {
                        std::hint::black_box(built);
                        // A yield, as the handler's awaits would: the
                        // generator alone must not monopolise a worker.
                        tokio::task::yield_now().await;
                        Ok(1)
                    }
                })
                .await?,
            );
        }
    }

    let name = "append: 10 events per append, 8 writers";
    if wants(args, name) {
        let mut runs = Vec::new();
        for run in 0..args.runs.max(1) {
            eprintln!(
                "running `{name}` ({}/{}) for {}s…",
                run + 1,
                args.runs.max(1),
                duration.as_secs()
            );
            let store = store.clone();
            let f = drive_metered(
                name,
                "ev/s",
                8,
                duration,
                &[Peer::Postgres],
                move |writer, n| {
                    let store = store.clone();
                    async move {
                        // Each writer appends to its own streams, so versions are known.
                        let stream = format!(
                            "task-{}",
                            Uuid::from_u128(((writer as u128) << 64) | u128::from(n % 100))
                        );
                        let version = (n / 100) * 10;
                        let events = progress_events(10);
                        store
                            .append(&stream, ExpectedVersion::Exact(version), events)
                            .await?;
                        Ok(10)
                    }
                },
            )
            .await?;
            runs.push(f);
        }
        results.extend(median(runs));
    }
    Ok(results)
}

/// Writer `writer`'s `n`th command: progress on a task picked at random
/// (seeded by writer and n), and its context.
fn progress_command(tasks: &[TaskId], writer: usize, n: u64) -> (Command, CommandContext) {
    // SplitMix64 of (writer, n): a different, repeatable draw per command
    // at a few instructions (seeding a StdRng per command cost more than
    // some of what is measured).
    let mut z = ((writer as u64) << 40 ^ n).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    let task_id = tasks[(z % tasks.len() as u64) as usize];
    let command = TaskCommand::ReportTaskProgress {
        task_id,
        percent: ((z >> 32) % 101) as u8,
        note: Some(NOTE.to_owned()),
    };
    let ctx = CommandContext::new(Uuid::new_v4(), "bench", "bench");
    (command.into(), ctx)
}

/// The note of every progress report (~100 bytes).
const NOTE: &str =
    "step 42: generated three files and is running the unit tests of module orchestration::planner";

/// `count` TaskProgressReported events of one command, ~200 bytes of data each.
pub fn progress_events(count: usize) -> Vec<NewEvent> {
    let command_id = Uuid::new_v4();
    let task_id = Uuid::new_v4();
    (0..count)
        .map(|index| NewEvent {
            event_type: "TaskProgressReported".to_owned(),
            schema_version: 1,
            data: json!({"task_id": task_id, "percent": (index * 10) % 100, "note": NOTE}),
            metadata: EventMetadata {
                event_id: commands::event_store::event_id("bench", command_id, index),
                command_id,
                command_type: "ReportTaskProgress".to_owned(),
                command_hash: String::new(),
                correlation_id: command_id,
                causation_id: command_id,
                actor: "bench".to_owned(),
                tenant: "bench".to_owned(),
                occurred_at: time::OffsetDateTime::now_utc(),
                traceparent: None,
            },
        })
        .collect()
}

/// Creates `n` running tasks (workflow started, agent registered, each task
/// created, assigned and started) through the handler.
pub async fn running_tasks(handler: &CommandHandler, n: usize) -> anyhow::Result<Vec<TaskId>> {
    running_tasks_of(handler, n, "bench").await
}

/// [`running_tasks`] of `tenant`.
pub async fn running_tasks_of(
    handler: &CommandHandler,
    n: usize,
    tenant: &str,
) -> anyhow::Result<Vec<TaskId>> {
    let ctx = || CommandContext::new(Uuid::new_v4(), "bench", tenant);
    let workflow = WorkflowId::from_uuid(Uuid::new_v4());
    let agent = AgentId::from_uuid(Uuid::new_v4());
    handler
        .execute(
            WorkflowCommand::StartWorkflow {
                workflow_id: workflow,
                name: "bench".into(),
                metadata: json!({}),
            }
            .into(),
            &ctx(),
        )
        .await?;
    handler
        .execute(
            AgentCommand::RegisterAgent {
                agent_id: agent,
                name: "bench-agent".into(),
                kind: AgentKind::Tool,
                model: None,
                capabilities: vec!["bench".into()],
                parent_agent_id: None,
            }
            .into(),
            &ctx(),
        )
        .await?;
    let ids: Vec<TaskId> = (0..n).map(|_| TaskId::from_uuid(Uuid::new_v4())).collect();
    let results: Vec<Result<(), CommandError>> = futures::stream::iter(ids.clone())
        .map(|task_id| {
            let handler = handler.clone();
            async move {
                let create = TaskCommand::CreateTask {
                    task_id,
                    workflow_id: workflow,
                    title: "bench task".into(),
                    input: json!({"bench": true}),
                    required_capabilities: vec!["bench".into()],
                    depends_on: vec![],
                    priority: 50,
                    max_attempts: 3,
                };
                handler.execute(create.into(), &ctx()).await?;
                handler
                    .execute(
                        TaskCommand::AssignTask {
                            task_id,
                            agent_id: agent,
                        }
                        .into(),
                        &ctx(),
                    )
                    .await?;
                handler
                    .execute(TaskCommand::StartTask { task_id }.into(), &ctx())
                    .await?;
                Ok(())
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    for result in results {
        result.context("setting up running tasks")?;
    }
    Ok(ids)
}
