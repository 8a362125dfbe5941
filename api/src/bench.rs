//! Benchmarks: `neurectomy bench append` and `neurectomy bench relay`.
//!
//! Each run creates a scratch database (and JetStream stream) of its own next
//! to the configured one, and drops it afterwards. Figures are rates and
//! latency percentiles measured inside one run, so they can be compared as
//! ratios on a shared, noisy machine.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use commands::{
    CommandContext, CommandError, CommandHandler, EventMetadata, EventStore, ExpectedVersion,
    HandlerConfig, NewEvent, Relay, RelayConfig,
};
use domain::{AgentCommand, AgentId, AgentKind, TaskCommand, TaskId, WorkflowCommand, WorkflowId};
use futures::StreamExt;
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::json;
use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Postgres};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::app::redact;
use crate::settings::{BenchArgs, BenchCommand, Settings};

/// One scenario's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    /// Scenario name.
    pub scenario: String,
    /// What `rate` counts.
    pub unit: &'static str,
    /// Operations per second.
    pub rate: f64,
    /// Median latency of one operation, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile latency, milliseconds.
    pub p99_ms: f64,
    /// Operations completed.
    pub count: u64,
    /// Version conflicts retried (command scenarios).
    pub conflicts: u64,
    /// Seconds measured.
    pub seconds: f64,
}

/// Runs a benchmark sub-command.
pub async fn run(settings: &Settings, bench: BenchCommand) -> anyhow::Result<()> {
    let (args, results) = match bench {
        // Its figures are memory and ratios as well as rates: a table of its own.
        BenchCommand::Api(args) => return crate::bench_api::run(settings, &args).await,
        BenchCommand::Append(args) => {
            let results = append(settings, &args).await?;
            (args, results)
        }
        BenchCommand::Relay(args) => {
            let results = relay(settings, &args).await?;
            (args, results)
        }
        BenchCommand::Project(args) => {
            let results = crate::bench_project::run(settings, &args).await?;
            (args, results)
        }
    };
    println!(
        "\n{:<44} {:>14} {:>9} {:>9} {:>10}",
        "scenario", "rate", "p50 ms", "p99 ms", "conflicts"
    );
    for f in &results {
        println!(
            "{:<44} {:>9.0} {:<4} {:>9.2} {:>9.2} {:>10}",
            f.scenario, f.rate, f.unit, f.p50_ms, f.p99_ms, f.conflicts
        );
    }
    if let Some(path) = args.json {
        let json = serde_json::to_string_pretty(&results)?;
        std::fs::write(&path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// A database created for one benchmark run and dropped after it.
pub(crate) struct ScratchDatabase {
    url: String,
    pub(crate) pool: PgPool,
}

impl ScratchDatabase {
    pub(crate) async fn create(settings: &Settings, pool_size: u32) -> anyhow::Result<Self> {
        let base = settings
            .database_url
            .rsplit_once('/')
            .map_or(settings.database_url.as_str(), |(base, _)| base);
        let url = format!("{base}/neurectomy_bench_{}", Uuid::new_v4().simple());
        Postgres::create_database(&url)
            .await
            .with_context(|| format!("creating the scratch database {}", redact(&url)))?;
        let pool = PgPoolOptions::new()
            .max_connections(pool_size)
            .min_connections(pool_size.min(8))
            .acquire_timeout(Duration::from_secs(30))
            .connect(&url)
            .await
            .with_context(|| format!("connecting to {}", redact(&url)))?;
        commands::migrate(&pool)
            .await
            .context("migrating the scratch database")?;
        Ok(Self { url, pool })
    }

    pub(crate) async fn drop_database(self) {
        self.pool.close().await;
        if let Err(error) = Postgres::force_drop_database(&self.url).await {
            tracing::warn!(%error, "could not drop the scratch database");
        }
    }
}

pub(crate) fn wants(args: &BenchArgs, name: &str) -> bool {
    args.only.as_deref().is_none_or(|only| name.contains(only))
}

/// Keeps the median (by rate) of several runs of one scenario.
pub(crate) fn median(mut runs: Vec<Figures>) -> Option<Figures> {
    runs.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    let middle = runs.len() / 2;
    runs.into_iter().nth(middle)
}

#[allow(clippy::expect_used)]
pub(crate) fn histogram() -> Histogram<u64> {
    // Microseconds from 1 µs to 60 s, 3 significant digits: constant, valid
    // bounds, so construction cannot fail.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant histogram bounds are valid")
}

pub(crate) fn figures(
    scenario: &str,
    unit: &'static str,
    count: u64,
    per_op: &Histogram<u64>,
    seconds: f64,
    conflicts: u64,
) -> Figures {
    Figures {
        scenario: scenario.to_owned(),
        unit,
        rate: count as f64 / seconds.max(1e-9),
        p50_ms: per_op.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: per_op.value_at_quantile(0.99) as f64 / 1000.0,
        count,
        conflicts,
        seconds,
    }
}

/// Runs `writers` concurrent loops of `op` for `duration`; each `op` returns
/// how many units it completed. Returns (units, per-op latency histogram).
async fn drive<F, Fut>(
    writers: usize,
    duration: Duration,
    op: F,
) -> anyhow::Result<(u64, Histogram<u64>, f64)>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<u64>> + Send,
{
    let op = Arc::new(op);
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::with_capacity(writers);
    for writer in 0..writers {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = histogram();
            let mut units = 0u64;
            let mut n = 0u64;
            while Instant::now() < deadline {
                let t0 = Instant::now();
                units += op(writer, n).await?;
                let _ = hist.record(t0.elapsed().as_micros().max(1) as u64);
                n += 1;
            }
            Ok::<_, anyhow::Error>((units, hist))
        }));
    }
    let mut total = 0;
    let mut merged = histogram();
    for task in tasks {
        let (units, hist) = task.await.context("joining a bench writer")??;
        total += units;
        let _ = merged.add(&hist);
    }
    Ok((total, merged, started.elapsed().as_secs_f64()))
}

/// Creates `n` running tasks (workflow started, agent registered, each task
/// created, assigned and started) through the handler.
pub(crate) async fn running_tasks(
    handler: &CommandHandler,
    n: usize,
) -> anyhow::Result<Vec<TaskId>> {
    let ctx = || CommandContext::new(Uuid::new_v4(), "bench", "bench");
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

const NOTE: &str =
    "step 42: generated three files and is running the unit tests of module orchestration::planner";

/// `bench append`: commands through the handler and raw batched appends.
async fn append(settings: &Settings, args: &BenchArgs) -> anyhow::Result<Vec<Figures>> {
    let db = ScratchDatabase::create(settings, args.pool.max(1)).await?;
    // The scratch database is dropped whether the scenarios succeed or not.
    let result = append_scenarios(settings, args, EventStore::new(db.pool.clone())).await;
    db.drop_database().await;
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
            let (count, hist, secs) = {
                let handler = handler.clone();
                let tasks = tasks.clone();
                let conflicts = conflicts.clone();
                drive(writers, duration, move |writer, n| {
                    let handler = handler.clone();
                    let tasks = tasks.clone();
                    let conflicts = conflicts.clone();
                    async move {
                        let mut rng = StdRng::seed_from_u64((writer as u64) << 32 | n);
                        let task_id = tasks[rng.gen_range(0..tasks.len())];
                        let command = TaskCommand::ReportTaskProgress {
                            task_id,
                            percent: rng.gen_range(0..=100),
                            note: Some(NOTE.to_owned()),
                        };
                        let ctx = CommandContext::new(Uuid::new_v4(), "bench", "bench");
                        let outcome = handler.execute(command.into(), &ctx).await?;
                        conflicts.fetch_add(u64::from(outcome.attempts - 1), Ordering::Relaxed);
                        Ok(1)
                    }
                })
                .await?
            };
            runs.push(figures(
                name,
                "cmd/s",
                count,
                &hist,
                secs,
                conflicts.load(Ordering::Relaxed),
            ));
        }
        results.extend(median(runs));
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
            let (count, hist, secs) = drive(8, duration, move |writer, n| {
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
            })
            .await?;
            runs.push(figures(name, "ev/s", count, &hist, secs, 0));
        }
        results.extend(median(runs));
    }
    Ok(results)
}

/// `count` TaskProgressReported events of one command, ~200 bytes of data each.
fn progress_events(count: usize) -> Vec<NewEvent> {
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

/// Appends `total` events in batches of 100 with 4 writers; returns the last position.
async fn preload(store: &EventStore, total: u64) -> anyhow::Result<()> {
    let batches = total.div_ceil(100);
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(0..batches)
        .map(|_| {
            let store = store.clone();
            async move {
                let stream = format!("task-{}", Uuid::new_v4());
                store
                    .append(&stream, ExpectedVersion::NoStream, progress_events(100))
                    .await?;
                Ok(())
            }
        })
        .buffer_unordered(4)
        .collect()
        .await;
    results.into_iter().collect()
}

/// `bench relay`: backlog drain rate, rate under concurrent load, and
/// commit → JetStream-ack latency at a paced 2,000 events/s.
async fn relay(settings: &Settings, args: &BenchArgs) -> anyhow::Result<Vec<Figures>> {
    let db = ScratchDatabase::create(settings, args.pool.max(8)).await?;
    let result = relay_scenarios(settings, args, EventStore::new(db.pool.clone())).await;
    db.drop_database().await;
    result
}

async fn relay_scenarios(
    settings: &Settings,
    args: &BenchArgs,
    store: EventStore,
) -> anyhow::Result<Vec<Figures>> {
    let nats = crate::app::connect_nats(settings).await?;
    let seconds = args.seconds.max(1);
    let mut results = Vec::new();
    let relay_config = |tag: &str| {
        let id = Uuid::new_v4().simple().to_string();
        RelayConfig {
            stream_name: format!("BENCH_{tag}_{id}"),
            subject_prefix: format!("bench{id}.events"),
            ..settings.relay_config()
        }
    };

    let name = "relay: drain a backlog (commit → JetStream ack)";
    if wants(args, name) {
        let total = 20_000 * seconds.min(15);
        eprintln!("preloading {total} events…");
        preload(&store, total).await?;
        eprintln!("running `{name}`…");
        let started = Instant::now();
        let relay = BenchRelay::start(&store, &nats, relay_config("DRAIN"));
        let mut progress = relay.progress.clone();
        while progress.borrow_and_update().published < total {
            if progress.changed().await.is_err() {
                break;
            }
        }
        let secs = started.elapsed().as_secs_f64();
        let published = progress.borrow().published;
        relay.finish().await?;
        results.push(figures(name, "ev/s", published, &histogram(), secs, 0));
    }

    let name = "relay: 2,000 events/s paced, commit → ack latency";
    if wants(args, name) {
        let relay = BenchRelay::start(&store, &nats, relay_config("PACED"));
        let progress = relay.progress.clone();
        let stop = relay.stop.clone();
        // Let the new relay catch up with anything already in the store.
        wait_caught_up(&store, progress.clone()).await?;
        eprintln!("running `{name}` for {seconds}s…");
        let pending: Arc<Mutex<BTreeMap<i64, Instant>>> = Arc::default();
        let latencies = Arc::new(Mutex::new(histogram()));
        let watcher = tokio::spawn(watch_acks(
            progress.clone(),
            pending.clone(),
            latencies.clone(),
            stop.clone(),
        ));
        // 4 writers × 500 appends/s of one event each = 2,000 events/s.
        let interval = Duration::from_micros(2_000);
        let started = Instant::now();
        let deadline = started + Duration::from_secs(seconds);
        let mut writers = Vec::new();
        for _ in 0..4 {
            let store = store.clone();
            let pending = pending.clone();
            writers.push(tokio::spawn(async move {
                let mut ticker = tokio::time::interval(interval);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let mut count = 0u64;
                while Instant::now() < deadline {
                    ticker.tick().await;
                    let stream = format!("task-{}", Uuid::new_v4());
                    let recorded = store
                        .append(&stream, ExpectedVersion::NoStream, progress_events(1))
                        .await?;
                    let committed = Instant::now();
                    if let Some(event) = recorded.last() {
                        pending
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(event.position, committed);
                    }
                    count += 1;
                }
                Ok::<_, anyhow::Error>(count)
            }));
        }
        let mut count = 0;
        for writer in writers {
            count += writer.await.context("joining a writer")??;
        }
        let secs = started.elapsed().as_secs_f64();
        wait_caught_up(&store, progress.clone()).await?;
        relay.finish().await?;
        let _ = watcher.await;
        let hist = latencies.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut f = figures(name, "ev/s", count, &hist, secs, 0);
        f.count = hist.len();
        results.push(f);
    }

    let name = "relay: under 8 batch writers at full speed";
    if wants(args, name) {
        let relay = BenchRelay::start(&store, &nats, relay_config("LOAD"));
        let progress = relay.progress.clone();
        wait_caught_up(&store, progress.clone()).await?;
        let before = progress.borrow().published;
        eprintln!("running `{name}` for {seconds}s…");
        let writer_store = store.clone();
        let (written, _, secs) = drive(8, Duration::from_secs(seconds), move |_, _| {
            let store = writer_store.clone();
            async move {
                let stream = format!("task-{}", Uuid::new_v4());
                store
                    .append(&stream, ExpectedVersion::NoStream, progress_events(10))
                    .await?;
                Ok(10)
            }
        })
        .await?;
        let published = progress.borrow().published - before;
        relay.finish().await?;
        let mut f = figures(name, "ev/s", published, &histogram(), secs, 0);
        f.scenario = format!("{name} (written {:.0} ev/s)", written as f64 / secs);
        results.push(f);
    }
    Ok(results)
}

/// A relay running on a JetStream stream of its own for one scenario.
struct BenchRelay {
    progress: tokio::sync::watch::Receiver<commands::RelayProgress>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    jetstream: async_nats::jetstream::Context,
    stream_name: String,
}

impl BenchRelay {
    fn start(store: &EventStore, nats: &async_nats::Client, config: RelayConfig) -> Self {
        let stream_name = config.stream_name.clone();
        let relay = Relay::new(store.clone(), nats.clone(), config);
        let progress = relay.progress();
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move { relay.run(stop).await }
        });
        Self {
            progress,
            stop,
            task,
            jetstream: async_nats::jetstream::new(nats.clone()),
            stream_name,
        }
    }

    /// Stops the relay and deletes its stream.
    async fn finish(self) -> anyhow::Result<()> {
        self.stop.cancel();
        let joined = self.task.await.context("joining the relay");
        let _ = self.jetstream.delete_stream(&self.stream_name).await;
        joined
    }
}

/// Waits until the relay has published everything readable now.
async fn wait_caught_up(
    store: &EventStore,
    mut progress: tokio::sync::watch::Receiver<commands::RelayProgress>,
) -> anyhow::Result<()> {
    let head = store.head().await?.readable;
    let deadline = Instant::now() + Duration::from_secs(120);
    while progress.borrow_and_update().position < head {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the relay did not catch up within 120 s"
        );
        let _ = tokio::time::timeout(Duration::from_millis(200), progress.changed()).await;
    }
    Ok(())
}

/// Records commit → ack latency for every pending position the relay acknowledges.
async fn watch_acks(
    mut progress: tokio::sync::watch::Receiver<commands::RelayProgress>,
    pending: Arc<Mutex<BTreeMap<i64, Instant>>>,
    latencies: Arc<Mutex<Histogram<u64>>>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            changed = progress.changed() => if changed.is_err() { return },
        }
        let now = Instant::now();
        let position = progress.borrow_and_update().position;
        let acked: Vec<Instant> = {
            let mut pending = pending.lock().unwrap_or_else(|p| p.into_inner());
            let rest = pending.split_off(&(position + 1));
            let acked = std::mem::replace(&mut *pending, rest);
            acked.into_values().collect()
        };
        let mut hist = latencies.lock().unwrap_or_else(|p| p.into_inner());
        for committed in acked {
            let _ = hist.record(now.duration_since(committed).as_micros().max(1) as u64);
        }
    }
}
