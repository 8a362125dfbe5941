//! The command scenarios of `neurectomy-bench append`, run against the peer
//! framework: `cqrs-es` with `postgres-es` (`PostgresEventRepository`).
//!
//! Same method as `benches/neurectomy-bench/src/append.rs`: a scratch
//! database created for the run and dropped after it, a pool of 16
//! connections, streams created during an untimed setup, writers that pick
//! a random stream per command, one command = load aggregate + decide +
//! append one ~200-byte event, per-command latency in an HDR histogram.
//! Version conflicts are retried (up to `--attempts`, as our handler does)
//! and counted; commands that still fail, or fail otherwise, are counted as
//! errors and the writers keep going.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, AggregateError, DomainEvent};
use futures::StreamExt as _;
use hdrhistogram::Histogram;
use postgres_es::{postgres_cqrs, postgres_snapshot_cqrs, PostgresCqrs};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde::{Deserialize, Serialize};
use sqlx::migrate::MigrateDatabase as _;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Postgres};
use uuid::Uuid;

/// Same note as our benchmark's, so the event payload is the same size.
const NOTE: &str =
    "step 42: generated three files and is running the unit tests of module orchestration::planner";

/// The tables postgres-es reads and writes (its `db/init.sql`).
const SCHEMA: &str = "
CREATE TABLE events
(
    aggregate_type text                         NOT NULL,
    aggregate_id   text                         NOT NULL,
    sequence       bigint CHECK (sequence >= 0) NOT NULL,
    event_type     text                         NOT NULL,
    event_version  text                         NOT NULL,
    payload        json                         NOT NULL,
    metadata       json                         NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);
CREATE TABLE snapshots
(
    aggregate_type   text                                 NOT NULL,
    aggregate_id     text                                 NOT NULL,
    last_sequence    bigint CHECK (last_sequence >= 0)    NOT NULL,
    current_snapshot bigint CHECK (current_snapshot >= 0) NOT NULL,
    payload          json                                 NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, last_sequence)
);";

#[derive(Debug, Parser)]
#[command(about = "cqrs-es + postgres-es under the `neurectomy-bench append` command scenarios")]
struct Args {
    /// Seconds each scenario runs.
    #[arg(long, default_value_t = 15)]
    seconds: u64,
    /// Only run the scenarios whose name contains this text.
    #[arg(long)]
    only: Option<String>,
    /// PostgreSQL connections of the pool the framework uses.
    #[arg(long, default_value_t = 16)]
    pool: u32,
    /// Attempts per command when writers conflict (our benchmark allows 10).
    #[arg(long, default_value_t = 10)]
    attempts: u32,
    /// PostgreSQL URL; only its server part is used, the run creates a
    /// scratch database next to it and drops it afterwards.
    #[arg(
        long,
        env = "NEURECTOMY_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/neurectomy"
    )]
    database_url: String,
}

// ---------------------------------------------------------------------------
// The aggregate: a task that reports progress.

#[derive(Debug, Default, Serialize, Deserialize)]
struct Task {
    percent: u8,
    reports: u64,
}

#[derive(Debug, Serialize, Deserialize)]
enum TaskCommand {
    ReportProgress {
        task_id: String,
        percent: u8,
        note: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum TaskEvent {
    ProgressReported {
        task_id: String,
        percent: u8,
        note: String,
    },
}

impl DomainEvent for TaskEvent {
    fn event_type(&self) -> String {
        match self {
            Self::ProgressReported { .. } => "ProgressReported".to_owned(),
        }
    }

    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

#[derive(Debug)]
struct TaskError(String);

impl std::fmt::Display for TaskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TaskError {}

impl Aggregate for Task {
    const TYPE: &'static str = "Task";
    type Command = TaskCommand;
    type Event = TaskEvent;
    type Error = TaskError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        match command {
            TaskCommand::ReportProgress {
                task_id,
                percent,
                note,
            } => {
                if percent > 100 {
                    return Err(TaskError(format!("percent {percent} is above 100")));
                }
                sink.write(
                    TaskEvent::ProgressReported {
                        task_id,
                        percent,
                        note,
                    },
                    self,
                )
                .await;
                Ok(())
            }
        }
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            TaskEvent::ProgressReported { percent, .. } => {
                self.percent = percent;
                self.reports += 1;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Measuring.

/// One scenario's figures.
struct Figures {
    scenario: &'static str,
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    conflicts: u64,
    errors: u64,
}

#[allow(clippy::expect_used)]
fn histogram() -> Histogram<u64> {
    // Microseconds from 1 µs to 60 s, 3 significant digits: constant, valid bounds.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant histogram bounds are valid")
}

/// Metadata of about the size of ours (~450 bytes as JSON).
fn metadata() -> HashMap<String, String> {
    let command_id = Uuid::new_v4().to_string();
    HashMap::from([
        ("event_id".to_owned(), Uuid::new_v4().to_string()),
        ("command_id".to_owned(), command_id.clone()),
        ("command_type".to_owned(), "ReportProgress".to_owned()),
        ("command_hash".to_owned(), "0".repeat(64)),
        ("correlation_id".to_owned(), command_id.clone()),
        ("causation_id".to_owned(), command_id),
        ("actor".to_owned(), "bench".to_owned()),
        ("tenant".to_owned(), "bench".to_owned()),
        (
            "occurred_at".to_owned(),
            "2026-01-01T00:00:00.000000Z".to_owned(),
        ),
    ])
}

enum Outcome {
    /// Committed after this many conflicts.
    Done(u64),
    /// Given up after this many conflicts, or failed otherwise.
    Failed(u64),
}

/// One command (load + decide + append), retried on version conflicts.
async fn command(cqrs: &PostgresCqrs<Task>, task_id: &str, percent: u8, attempts: u32) -> Outcome {
    let mut conflicts = 0;
    for _ in 0..attempts.max(1) {
        let command = TaskCommand::ReportProgress {
            task_id: task_id.to_owned(),
            percent,
            note: NOTE.to_owned(),
        };
        match cqrs
            .execute_with_metadata(task_id, command, metadata())
            .await
        {
            Ok(()) => return Outcome::Done(conflicts),
            Err(AggregateError::AggregateConflict) => conflicts += 1,
            Err(error) => {
                eprintln!("command on {task_id} failed: {error}");
                return Outcome::Failed(conflicts);
            }
        }
    }
    Outcome::Failed(conflicts)
}

/// Sends one command to each stream (untimed), 16 at a time.
async fn create_streams(
    cqrs: &Arc<PostgresCqrs<Task>>,
    streams: usize,
) -> anyhow::Result<Vec<String>> {
    let ids: Vec<String> = (0..streams)
        .map(|_| format!("task-{}", Uuid::new_v4()))
        .collect();
    let failed = futures::stream::iter(ids.clone())
        .map(|id| {
            let cqrs = cqrs.clone();
            async move { command(&cqrs, &id, 0, 10).await }
        })
        .buffer_unordered(16)
        .filter(|outcome| std::future::ready(matches!(outcome, Outcome::Failed(_))))
        .count()
        .await;
    anyhow::ensure!(failed == 0, "{failed} stream(s) could not be created");
    Ok(ids)
}

/// Runs `writers` loops of random-stream commands for `duration`.
async fn drive(
    name: &'static str,
    cqrs: Arc<PostgresCqrs<Task>>,
    streams: Arc<Vec<String>>,
    writers: usize,
    duration: Duration,
    attempts: u32,
) -> anyhow::Result<Figures> {
    let conflicts = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::with_capacity(writers);
    for writer in 0..writers {
        let (cqrs, streams) = (cqrs.clone(), streams.clone());
        let (conflicts, errors) = (conflicts.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut hist = histogram();
            let mut done = 0u64;
            let mut n = 0u64;
            while Instant::now() < deadline {
                let mut rng = StdRng::seed_from_u64(((writer as u64) << 32) | n);
                n += 1;
                let task_id = &streams[rng.gen_range(0..streams.len())];
                let percent = rng.gen_range(0..=100);
                let t0 = Instant::now();
                match command(&cqrs, task_id, percent, attempts).await {
                    Outcome::Done(c) => {
                        let _ = hist.record(t0.elapsed().as_micros().max(1) as u64);
                        conflicts.fetch_add(c, Ordering::Relaxed);
                        done += 1;
                    }
                    Outcome::Failed(c) => {
                        conflicts.fetch_add(c, Ordering::Relaxed);
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            (done, hist)
        }));
    }
    let mut count = 0;
    let mut merged = histogram();
    for task in tasks {
        let (done, hist) = task.await.context("joining a bench writer")?;
        count += done;
        let _ = merged.add(&hist);
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Figures {
        scenario: name,
        rate: count as f64 / seconds.max(1e-9),
        p50_ms: merged.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: merged.value_at_quantile(0.99) as f64 / 1000.0,
        conflicts: conflicts.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
    })
}

async fn scenarios(args: &Args, pool: &PgPool) -> anyhow::Result<Vec<Figures>> {
    let events = Arc::new(postgres_cqrs::<Task>(pool.clone(), vec![], ()));
    let snapshots = Arc::new(postgres_snapshot_cqrs::<Task>(
        pool.clone(),
        vec![],
        100,
        (),
    ));
    let duration = Duration::from_secs(args.seconds.max(1));
    let mut results = Vec::new();
    for (name, writers, streams, snapshotted) in [
        ("command: 1 writer, 1 stream", 1usize, 1usize, false),
        ("command: 1 writer, 1 stream (snapshots/100)", 1, 1, true),
        ("command: 8 writers, 1,000 streams", 8, 1_000, false),
        ("command: 64 writers, 10,000 streams", 64, 10_000, false),
    ] {
        if args
            .only
            .as_deref()
            .is_some_and(|only| !name.contains(only))
        {
            continue;
        }
        let cqrs = if snapshotted { &snapshots } else { &events };
        eprintln!("setting up {streams} stream(s) for `{name}`…");
        let ids = Arc::new(create_streams(cqrs, streams).await?);
        eprintln!("running `{name}` for {}s…", duration.as_secs());
        let figures = drive(name, cqrs.clone(), ids, writers, duration, args.attempts).await?;
        results.push(figures);
    }
    Ok(results)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let base = args
        .database_url
        .rsplit_once('/')
        .map_or(args.database_url.as_str(), |(base, _)| base);
    let url = format!("{base}/peer_cqrs_es_bench_{}", Uuid::new_v4().simple());
    Postgres::create_database(&url)
        .await
        .context("creating the scratch database")?;
    let pool = PgPoolOptions::new()
        .max_connections(args.pool.max(1))
        .min_connections(args.pool.clamp(1, 8))
        .acquire_timeout(Duration::from_secs(30))
        .connect(&url)
        .await
        .context("connecting to the scratch database");
    let results = match pool {
        Ok(pool) => {
            let results = match sqlx::raw_sql(SCHEMA).execute(&pool).await {
                Ok(_) => scenarios(&args, &pool).await,
                Err(error) => Err(anyhow::Error::new(error).context("creating the tables")),
            };
            pool.close().await;
            results
        }
        Err(error) => Err(error),
    };
    if let Err(error) = Postgres::force_drop_database(&url).await {
        eprintln!("could not drop the scratch database: {error}");
    }
    let results = results?;

    println!(
        "\n{:<44} {:>14} {:>9} {:>9} {:>10} {:>7}",
        "scenario", "rate", "p50 ms", "p99 ms", "conflicts", "errors"
    );
    for f in &results {
        println!(
            "{:<44} {:>9.0} {:<4} {:>9.2} {:>9.2} {:>10} {:>7}",
            f.scenario, f.rate, "cmd/s", f.p50_ms, f.p99_ms, f.conflicts, f.errors
        );
    }
    Ok(())
}
