//! `neurectomy-bench project`: projection replay rates and end-to-end
//! freshness, measured in one run.
//!
//! - **Replay.** A realistic log (the workload simulator, unpaced, through the
//!   real command handler) is preloaded into a scratch database. Each read
//!   model then catches up from PostgreSQL through the projector runtime
//!   (a [`Projector`] on an empty read model and an empty JetStream stream),
//!   timed until it has applied the whole log. Redis is also timed applying
//!   the pre-read, decoded log directly (the model alone). For the graph,
//!   the statements the model sends are precomputed from its fold and sent
//!   directly to another fresh database ("raw": the server alone); the
//!   ratio of the two rates is reported.
//! - **Freshness.** The relay and both projectors run in this process
//!   against a scratch database, stream, Redis prefix and graph database;
//!   paced writers send 500 `ReportTaskProgress` commands/s through the
//!   handler. Each command's commit instant and position are recorded, and
//!   so is every change of the relay's acknowledged position and of each
//!   projector's checkpoint; latency is the time from a command's commit to
//!   the first change that covers its position.
//!
//! Everything the run creates (databases, stream, Redis keys, graph
//! databases) is removed at the end, also when a scenario fails.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use api::settings::Settings;
use api::simulate::SimulateArgs;
use commands::{CommandContext, CommandHandler, EventStore, Relay, RelayConfig};
use domain::{DomainEvent, TaskCommand, TaskId};
use hdrhistogram::Histogram;
use neo4rs::Query;
use projections::graph::replay_statements;
use projections::{
    GraphModel, Projected, Projector, ProjectorConfig, ProjectorState, ProjectorStatus, ReadModel,
    RedisModel,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::append::running_tasks;
use crate::cli::BenchArgs;
use crate::figures::{figures, histogram, median, wants, Figures};
use crate::meter::{Meter, Peer};
use crate::scratch;

/// Scenario names.
const REDIS_REPLAY: &str = "redis replay: projector catch-up from PostgreSQL";
const REDIS_APPLY: &str = "redis replay: RedisModel::apply alone (log pre-read)";
const GRAPH_REPLAY: &str = "graph replay: projector catch-up from PostgreSQL";
const GRAPH_RAW: &str = "graph raw: the same statements, sent directly";
const READ_ALONE: &str = "postgres: read_all + decode alone (no read model)";
/// The services a projected event costs besides this process.
const REDIS_PEERS: &[Peer] = &[Peer::Postgres, Peer::Redis];
const GRAPH_PEERS: &[Peer] = &[Peer::Postgres, Peer::Graph];
/// Redis replay target, events/s.
const REDIS_REPLAY_TARGET: f64 = 50_000.0;
/// Graph replay target, share of the server's raw rate.
const GRAPH_RATIO_TARGET: f64 = 0.70;
/// Commands per second of the freshness scenario.
const FRESHNESS_RATE: u64 = 500;
/// Freshness targets, p99 milliseconds.
const REDIS_P99_TARGET_MS: f64 = 10.0;
const GRAPH_P99_TARGET_MS: f64 = 250.0;
/// Longest wait for a projector to catch up.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(900);

/// Everything a run creates, removed by [`Scratch::cleanup`].
struct Scratch {
    /// The databases, streams, Redis prefixes and graph databases.
    fixtures: scratch::Fixtures,
    /// Cancels every task spawned by the run.
    stop: CancellationToken,
    /// The relay and projector tasks of the freshness scenario.
    tasks: Vec<JoinHandle<()>>,
}

impl Scratch {
    fn new() -> Self {
        Self {
            fixtures: scratch::Fixtures::default(),
            stop: CancellationToken::new(),
            tasks: Vec::new(),
        }
    }

    /// A scratch event store (migrated).
    async fn store(&mut self, settings: &Settings, pool: u32) -> anyhow::Result<EventStore> {
        let db = scratch::database(settings, pool).await?;
        let store = EventStore::new(db.pool.clone());
        self.fixtures.databases.push(db);
        Ok(store)
    }

    /// A relay configuration on a scratch stream, the stream (created), and
    /// a client of its server.
    async fn stream(
        &mut self,
        settings: &Settings,
        store: &EventStore,
    ) -> anyhow::Result<(RelayConfig, async_nats::Client)> {
        let nats = scratch::nats(settings).await?;
        let config = scratch::relay_config(settings, &nats);
        let client = nats.client.clone();
        self.fixtures.streams.push(nats);
        Relay::new(store.clone(), client.clone(), config.clone())
            .ensure_stream()
            .await
            .context("creating the scratch JetStream stream")?;
        Ok((config, client))
    }

    /// A Redis read model under a fresh prefix.
    async fn live(&mut self, settings: &Settings) -> anyhow::Result<RedisModel> {
        let (model, prefix) = scratch::redis(settings).await?;
        self.fixtures.prefixes.push(prefix);
        Ok(model)
    }

    /// A graph read model on a fresh database.
    async fn graph(&mut self, settings: &Settings) -> anyhow::Result<GraphModel> {
        let (model, database) = scratch::graph(settings).await?;
        self.fixtures.graphs.push(database);
        Ok(model)
    }

    /// Stops the tasks and removes everything.
    async fn cleanup(self) {
        self.stop.cancel();
        for task in self.tasks {
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        scratch::remove(self.fixtures).await;
    }
}

/// Runs the scenarios, then removes what they created.
pub async fn run(settings: &Settings, args: &BenchArgs) -> anyhow::Result<Vec<Figures>> {
    let mut scratch = Scratch::new();
    let result = scenarios(settings, args, &mut scratch).await;
    eprintln!("removing the scratch databases, stream, Redis keys and graph databases…");
    scratch.cleanup().await;
    result
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

async fn scenarios(
    settings: &Settings,
    args: &BenchArgs,
    scratch: &mut Scratch,
) -> anyhow::Result<Vec<Figures>> {
    let mut results = Vec::new();
    if [
        READ_ALONE,
        REDIS_REPLAY,
        REDIS_APPLY,
        GRAPH_REPLAY,
        GRAPH_RAW,
        PARTITIONED_REBUILD,
        GRAPH_REBUILD,
    ]
    .iter()
    .any(|name| wants(args, name))
    {
        results.extend(replays(settings, args, scratch).await?);
    }
    let freshness_name = "freshness 500 cmd/s: commit";
    if wants(args, freshness_name) {
        results.extend(freshness(settings, args, scratch).await?);
    }
    if wants(args, CLUSTER_FRESHNESS) {
        results.extend(cluster_freshness(settings, args, scratch).await?);
    }
    Ok(results)
}

/// Preloads a realistic log with the simulator, unpaced, for `seconds`.
async fn preload(
    store: &EventStore,
    settings: &Settings,
    (seconds, tenants): (u64, usize),
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let handler = CommandHandler::new(store.clone(), settings.handler_config());
    let simulation = SimulateArgs {
        // Enough agents per tenant that no tenant's workflows stall waiting
        // for a capable one (64 agents over 64 tenants wrote 270 events/s).
        agents: 64.max(tenants * 8),
        workflows: 32.max(tenants),
        tasks_per_workflow: 8,
        rate: 0,
        duration: seconds,
        tenant: "bench".to_owned(),
        tenants,
        seed: 42,
    };
    api::simulate::drive(handler, simulation, stop.child_token())
        .await
        .context("preloading the log with the simulator")
}

/// The whole log, decoded, in batches of `batch_size`.
async fn read_log(
    store: &EventStore,
    batch_size: usize,
    per_batch: &mut Histogram<u64>,
) -> anyhow::Result<Vec<Vec<Projected>>> {
    let limit = i64::try_from(batch_size.max(1)).unwrap_or(500);
    let mut batches = Vec::new();
    let mut after = 0;
    loop {
        let t0 = Instant::now();
        let batch = store.read_all(after, limit).await?;
        let full = batch.len() as i64 == limit;
        let Some(last) = batch.last().map(|e| e.position) else {
            break;
        };
        let mut projected = Vec::with_capacity(batch.len());
        for recorded in batch {
            let event = DomainEvent::from_stored(
                &recorded.event_type,
                recorded.schema_version,
                recorded.data.clone(),
            )
            .with_context(|| format!("decoding the event at position {}", recorded.position))?;
            projected.push(Projected::new(recorded, event));
        }
        let _ = per_batch.record(t0.elapsed().as_micros().max(1) as u64);
        batches.push(projected);
        after = last;
        if !full {
            break;
        }
    }
    Ok(batches)
}

/// Prints the event mix of the log.
fn describe(batches: &[Vec<Projected>]) {
    let mut counts = std::collections::BTreeMap::<&str, u64>::new();
    let mut total = 0u64;
    for p in batches.iter().flatten() {
        *counts.entry(p.event.event_type()).or_default() += 1;
        total += 1;
    }
    let mut mix: Vec<(&str, u64)> = counts.into_iter().collect();
    mix.sort_by_key(|m| std::cmp::Reverse(m.1));
    let mix: Vec<String> = mix
        .iter()
        .map(|(kind, n)| format!("{kind} {:.1}%", *n as f64 * 100.0 / total.max(1) as f64))
        .collect();
    eprintln!("log: {total} events: {}", mix.join(", "));
}

/// Runs a projector on `model` (empty) until it has applied `total` events
/// from the store; returns (events, per-batch time, seconds).
async fn catch_up<M: ReadModel>(
    model: M,
    store: &EventStore,
    nats: &async_nats::Client,
    config: ProjectorConfig,
    total: u64,
    stop: &CancellationToken,
) -> anyhow::Result<(u64, Histogram<u64>, f64)> {
    let projector = Arc::new(Projector::new(model, store.clone(), nats.clone(), config));
    let mut status = projector.status();
    let token = stop.child_token();
    let started = Instant::now();
    let task = tokio::spawn({
        let projector = projector.clone();
        let token = token.clone();
        async move { projector.run(token).await }
    });
    let mut per_batch = histogram();
    let mut last = (started, 0u64);
    let deadline = tokio::time::Instant::from_std(started + CATCH_UP_LIMIT);
    let outcome: anyhow::Result<u64> = loop {
        let now = Instant::now();
        let s = status.borrow_and_update().clone();
        if s.applied > last.1 {
            let _ = per_batch.record(now.duration_since(last.0).as_micros().max(1) as u64);
            last = (now, s.applied);
        }
        if s.applied >= total {
            break Ok(s.applied);
        }
        if s.state == ProjectorState::Stopped {
            break Err(anyhow::anyhow!(
                "projection {} stopped: {}",
                s.name,
                s.last_error.unwrap_or_default()
            ));
        }
        match tokio::time::timeout_at(deadline, status.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => break Err(anyhow::anyhow!("the projector ended early")),
            Err(_) => {
                break Err(anyhow::anyhow!(
                    "projection {} applied {} of {total} events within {} s",
                    s.name,
                    s.applied,
                    CATCH_UP_LIMIT.as_secs()
                ))
            }
        }
    };
    let secs = started.elapsed().as_secs_f64();
    token.cancel();
    let joined = task.await.context("joining the projector")?;
    let applied = outcome?;
    joined?;
    Ok((applied, per_batch, secs))
}

/// Applies pre-read batches to `model` directly; returns (events, per-batch time, seconds).
async fn apply_directly<M: ReadModel>(
    model: &M,
    batches: &[Vec<Projected>],
) -> anyhow::Result<(u64, Histogram<u64>, f64)> {
    let mut per_batch = histogram();
    let mut count = 0u64;
    let started = Instant::now();
    for batch in batches {
        let t0 = Instant::now();
        model.apply(batch).await?;
        let _ = per_batch.record(t0.elapsed().as_micros().max(1) as u64);
        count += batch.len() as u64;
    }
    Ok((count, per_batch, started.elapsed().as_secs_f64()))
}

/// The replay scenarios.
async fn replays(
    settings: &Settings,
    args: &BenchArgs,
    scratch: &mut Scratch,
) -> anyhow::Result<Vec<Figures>> {
    let seconds = args.seconds.clamp(1, 120);
    let runs = args.runs.max(1);

    let store = scratch.store(settings, args.pool.max(8)).await?;
    eprintln!("preloading a realistic log: the simulator, unpaced, for {seconds}s…");
    preload(&store, settings, (seconds, args.tenants), &scratch.stop).await?;
    let batch_size = settings.projector_batch_size.max(1);
    let batches = read_log(&store, batch_size, &mut histogram()).await?;
    describe(&batches);
    let total: u64 = batches.iter().map(|b| b.len() as u64).sum();
    anyhow::ensure!(total > 0, "the simulator wrote no events");
    // An empty stream: the projectors catch up from PostgreSQL, then idle.
    let (relay_config, nats) = scratch.stream(settings, &store).await?;
    let projector_config = ProjectorConfig {
        stream_name: relay_config.stream_name.clone(),
        ..settings.projector_config()
    };
    let mut results = Vec::new();
    // What the catch-up path spends reading: the same reads and decoding,
    // with no read model, in batches of the projector's size (a second pass:
    // the first one above also set the tuples' hint bits, as the first
    // projector's reads would).
    if wants(args, READ_ALONE) {
        let mut figs = Vec::new();
        for run in 0..runs {
            eprintln!("running `{READ_ALONE}` ({}/{runs})…", run + 1);
            let mut per_batch = histogram();
            let started = Instant::now();
            let read = read_log(&store, batch_size, &mut per_batch).await?;
            let secs = started.elapsed().as_secs_f64();
            let count = read.iter().map(|b| b.len() as u64).sum();
            figs.push(figures(READ_ALONE, "ev/s", count, &per_batch, secs, 0));
        }
        results.extend(median(figs));
    }

    if wants(args, REDIS_REPLAY) {
        let mut figs = Vec::new();
        for run in 0..runs {
            eprintln!(
                "running `{REDIS_REPLAY}` ({}/{runs}), {total} events…",
                run + 1
            );
            let model = scratch.live(settings).await?;
            let meter = Meter::start(REDIS_REPLAY, std::process::id(), REDIS_PEERS).await?;
            let (count, hist, secs) = catch_up(
                model,
                &store,
                &nats,
                projector_config.clone(),
                total,
                &scratch.stop,
            )
            .await?;
            let cost = meter.finish(count).await?;
            figs.push(figures(REDIS_REPLAY, "ev/s", count, &hist, secs, 0).with_cost(cost));
        }
        if let Some(mut f) = median(figs) {
            f.scenario = format!(
                "{REDIS_REPLAY} (target ≥ {REDIS_REPLAY_TARGET:.0} ev/s: {})",
                verdict(f.rate >= REDIS_REPLAY_TARGET)
            );
            results.push(f);
        }
    }

    if wants(args, REDIS_APPLY) {
        let mut figs = Vec::new();
        for run in 0..runs {
            eprintln!("running `{REDIS_APPLY}` ({}/{runs})…", run + 1);
            let model = scratch.live(settings).await?;
            let meter = Meter::start(REDIS_APPLY, std::process::id(), &[Peer::Redis]).await?;
            let (count, hist, secs) = apply_directly(&model, &batches).await?;
            let cost = meter.finish(count).await?;
            figs.push(figures(REDIS_APPLY, "ev/s", count, &hist, secs, 0).with_cost(cost));
        }
        results.extend(median(figs));
    }

    let want_graph = wants(args, GRAPH_REPLAY);
    let want_raw = wants(args, GRAPH_RAW);
    // Checks the plan once up front (and that the log folds cleanly).
    let mut planned_once = if want_raw {
        Some(plan_raw(&batches)?)
    } else {
        None
    };
    let mut graph_runs = Vec::new();
    let mut raw_runs = Vec::new();
    for run in 0..runs {
        if want_graph {
            eprintln!(
                "running `{GRAPH_REPLAY}` ({}/{runs}), {total} events…",
                run + 1
            );
            let model = scratch.graph(settings).await?;
            let meter = Meter::start(GRAPH_REPLAY, std::process::id(), GRAPH_PEERS).await?;
            let (count, hist, secs) = catch_up(
                model,
                &store,
                &nats,
                projector_config.clone(),
                total,
                &scratch.stop,
            )
            .await?;
            let cost = meter.finish(count).await?;
            graph_runs.push(figures(GRAPH_REPLAY, "ev/s", count, &hist, secs, 0).with_cost(cost));
        }
        if want_raw {
            let planned = match planned_once.take() {
                Some(planned) => planned,
                None => plan_raw(&batches)?,
            };
            let statements: usize = planned.iter().map(|b| b.statements.len()).sum();
            eprintln!(
                "running `{GRAPH_RAW}` ({}/{runs}): {} transactions, {statements} statements…",
                run + 1,
                planned.len()
            );
            let model = scratch.graph(settings).await?;
            let mut per_batch = histogram();
            let mut count = 0u64;
            let started = Instant::now();
            for batch in planned {
                let events = batch.events as u64;
                let t0 = Instant::now();
                write_raw(&model, batch).await?;
                let _ = per_batch.record(t0.elapsed().as_micros().max(1) as u64);
                count += events;
            }
            let secs = started.elapsed().as_secs_f64();
            raw_runs.push(figures(GRAPH_RAW, "ev/s", count, &per_batch, secs, 0));
        }
    }
    let graph = median(graph_runs);
    let raw = median(raw_runs);
    if let Some(mut graph) = graph {
        if let Some(raw) = &raw {
            let ratio = graph.rate / raw.rate.max(1e-9);
            graph.scenario = format!(
                "{GRAPH_REPLAY} (= {:.0} % of raw; target ≥ {:.0} %: {})",
                ratio * 100.0,
                GRAPH_RATIO_TARGET * 100.0,
                verdict(ratio >= GRAPH_RATIO_TARGET)
            );
        }
        results.push(graph);
    }
    results.extend(raw);
    let (want_rebuild, want_graph_rebuild) =
        (wants(args, PARTITIONED_REBUILD), wants(args, GRAPH_REBUILD));
    if want_rebuild || want_graph_rebuild {
        let database_url = scratch
            .fixtures
            .databases
            .last()
            .map(|db| db.url.clone())
            .context("the scratch database")?;
        if want_rebuild {
            results.extend(
                partitioned_rebuilds(settings, args, scratch, (&database_url, &store), total)
                    .await?,
            );
        }
        if want_graph_rebuild {
            results.extend(
                graph_rebuilds(settings, args, scratch, (&database_url, &store), total).await?,
            );
        }
    }
    Ok(results)
}

/// The writes of one batch, exactly as [`GraphModel`] sends them after its
/// reads and its fold (every `UNWIND $rows …` statement and the
/// checkpoint), ready to send.
struct RawBatch {
    /// The statements, in order.
    statements: Vec<Query>,
    /// Events of the batch.
    events: usize,
}

/// The raw writes of each of `batches` applied in order to an empty graph
/// (`projections::graph::replay_statements`); an empty batch writes
/// nothing and is left out.
fn plan_raw(batches: &[Vec<Projected>]) -> anyhow::Result<Vec<RawBatch>> {
    let planned = replay_statements(batches).context("folding the log for the raw graph writes")?;
    Ok(batches
        .iter()
        .zip(planned)
        .filter(|(batch, _)| !batch.is_empty())
        .map(|(batch, statements)| RawBatch {
            statements,
            events: batch.len(),
        })
        .collect())
}

/// Sends a precomputed batch in one transaction on `model`'s database, with
/// nothing else: no checkpoint or prior-state reads, no folding.
async fn write_raw(model: &GraphModel, batch: RawBatch) -> anyhow::Result<()> {
    let database = model.config().database.as_str();
    let mut txn = model
        .graph()
        .start_txn_on(database)
        .await
        .context("starting a raw graph transaction")?;
    for statement in batch.statements {
        txn.run(statement)
            .await
            .context("writing a raw batch to the graph")?;
    }
    txn.commit()
        .await
        .context("committing a raw batch to the graph")
}

/// When a position became visible: (checkpoint, instant) at every change.
type Timeline = Vec<(i64, Instant)>;

/// Records every change of `rx`'s position until `stop`.
fn record_timeline<T: Send + Sync + 'static>(
    mut rx: watch::Receiver<T>,
    position: fn(&T) -> i64,
    timeline: Arc<Mutex<Timeline>>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let now = Instant::now();
            let at = position(&*rx.borrow_and_update());
            {
                let mut timeline = timeline.lock().unwrap_or_else(|p| p.into_inner());
                if timeline.last().is_none_or(|(last, _)| *last < at) {
                    timeline.push((at, now));
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                changed = rx.changed() => if changed.is_err() { return },
            }
        }
    })
}

/// Commit → visible latencies of `commits` against `timeline`; the number
/// of commits never seen is returned too.
fn latencies(commits: &[(i64, Instant)], timeline: &Timeline) -> (Histogram<u64>, u64) {
    let mut hist = histogram();
    let mut unseen = 0;
    for (position, committed) in commits {
        let index = timeline.partition_point(|(at, _)| at < position);
        match timeline.get(index) {
            Some((_, visible)) => {
                // A change seen before the writer took its commit instant
                // (the writer was descheduled) counts as immediate.
                let micros = visible.saturating_duration_since(*committed).as_micros();
                let _ = hist.record(micros.max(1) as u64);
            }
            None => unseen += 1,
        }
    }
    (hist, unseen)
}

/// Waits until every receiver's position reaches `target`.
async fn wait_for(
    what: &str,
    target: i64,
    mut relay: watch::Receiver<commands::RelayProgress>,
    projectors: &mut [watch::Receiver<ProjectorStatus>],
) -> anyhow::Result<()> {
    let deadline = Instant::now() + CATCH_UP_LIMIT;
    loop {
        let relay_at = relay.borrow_and_update().position;
        let mut behind = Vec::new();
        if relay_at < target {
            behind.push(format!("relay at {relay_at}"));
        }
        for rx in projectors.iter_mut() {
            let s = rx.borrow_and_update().clone();
            anyhow::ensure!(
                s.state != ProjectorState::Stopped,
                "projection {} stopped: {}",
                s.name,
                s.last_error.unwrap_or_default()
            );
            if s.checkpoint < target {
                behind.push(format!("{} at {}", s.name, s.checkpoint));
            }
        }
        if behind.is_empty() {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{what}: not at position {target} within {} s ({})",
            CATCH_UP_LIMIT.as_secs(),
            behind.join(", ")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The freshness scenario.
async fn freshness(
    settings: &Settings,
    args: &BenchArgs,
    scratch: &mut Scratch,
) -> anyhow::Result<Vec<Figures>> {
    let seconds = args.seconds.max(1);
    let store = scratch.store(settings, args.pool.max(8)).await?;
    let handler = CommandHandler::new(store.clone(), settings.handler_config());
    eprintln!("setting up 1,000 running tasks for the freshness scenario…");
    let tasks = Arc::new(running_tasks(&handler, 1_000).await?);

    let (relay_config, nats) = scratch.stream(settings, &store).await?;
    let projector_config = ProjectorConfig {
        stream_name: relay_config.stream_name.clone(),
        ..settings.projector_config()
    };
    let stop = scratch.stop.child_token();
    let relay = Relay::new(store.clone(), nats.clone(), relay_config);
    let relay_progress = relay.progress();
    scratch.tasks.push(tokio::spawn({
        let stop = stop.clone();
        async move { relay.run(stop).await }
    }));
    let live = Projector::new(
        scratch.live(settings).await?,
        store.clone(),
        nats.clone(),
        projector_config.clone(),
    );
    let graph = Projector::new(
        scratch.graph(settings).await?,
        store.clone(),
        nats.clone(),
        projector_config,
    );
    let mut statuses = [live.status(), graph.status()];
    scratch.tasks.push(tokio::spawn({
        let stop = stop.clone();
        async move {
            let _ = live.run(stop).await;
        }
    }));
    scratch.tasks.push(tokio::spawn({
        let stop = stop.clone();
        async move {
            let _ = graph.run(stop).await;
        }
    }));
    let head = store.head().await?.readable;
    eprintln!("waiting for the relay and both projectors to reach position {head}…");
    wait_for("setting up", head, relay_progress.clone(), &mut statuses).await?;
    // Let the projectors go live on JetStream (their status moves to Live
    // once the consumer exists).
    for rx in &mut statuses {
        let deadline = Instant::now() + Duration::from_secs(30);
        while rx.borrow_and_update().state != ProjectorState::Live {
            anyhow::ensure!(
                Instant::now() < deadline,
                "projection {} did not go live within 30 s",
                rx.borrow().name
            );
            let _ = tokio::time::timeout(Duration::from_millis(100), rx.changed()).await;
        }
    }

    let watching = stop.child_token();
    let relay_timeline: Arc<Mutex<Timeline>> = Arc::default();
    let redis_timeline: Arc<Mutex<Timeline>> = Arc::default();
    let graph_timeline: Arc<Mutex<Timeline>> = Arc::default();
    let watchers = [
        record_timeline(
            relay_progress.clone(),
            |p| p.position,
            relay_timeline.clone(),
            watching.clone(),
        ),
        record_timeline(
            statuses[0].clone(),
            |s| s.checkpoint,
            redis_timeline.clone(),
            watching.clone(),
        ),
        record_timeline(
            statuses[1].clone(),
            |s| s.checkpoint,
            graph_timeline.clone(),
            watching.clone(),
        ),
    ];

    eprintln!("running `freshness` at {FRESHNESS_RATE} commands/s for {seconds}s…");
    // 4 writers, each paced at a quarter of the rate.
    let writers = 4u64;
    let interval = Duration::from_micros(1_000_000 * writers / FRESHNESS_RATE);
    let commits: Arc<Mutex<Vec<(i64, Instant)>>> = Arc::default();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut handles = Vec::new();
    for writer in 0..writers {
        let handler = handler.clone();
        let tasks = tasks.clone();
        let commits = commits.clone();
        handles.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(writer);
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            while Instant::now() < deadline {
                ticker.tick().await;
                let task_id: TaskId = tasks[rng.gen_range(0..tasks.len())];
                let command = TaskCommand::ReportTaskProgress {
                    task_id,
                    percent: rng.gen_range(0..=99),
                    note: Some(format!("writer {writer}: step {}", rng.gen_range(0..1000))),
                };
                let ctx = CommandContext::new(Uuid::new_v4(), "bench", "bench");
                let outcome = handler.execute(command.into(), &ctx).await?;
                let committed = Instant::now();
                commits
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((outcome.position, committed));
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for handle in handles {
        handle.await.context("joining a writer")??;
    }
    let secs = started.elapsed().as_secs_f64();
    let commits = std::mem::take(&mut *commits.lock().unwrap_or_else(|p| p.into_inner()));
    let last = commits.iter().map(|(p, _)| *p).max().unwrap_or(head);
    wait_for("after the run", last, relay_progress, &mut statuses).await?;
    watching.cancel();
    for watcher in watchers {
        let _ = watcher.await;
    }
    stop.cancel();

    let count = commits.len() as u64;
    let mut results = Vec::new();
    for (name, timeline, target) in [
        (
            "freshness 500 cmd/s: commit → JetStream ack (relay)",
            relay_timeline,
            None,
        ),
        (
            "freshness 500 cmd/s: commit → visible in Redis",
            redis_timeline,
            Some(REDIS_P99_TARGET_MS),
        ),
        (
            "freshness 500 cmd/s: commit → visible in the graph",
            graph_timeline,
            Some(GRAPH_P99_TARGET_MS),
        ),
    ] {
        let timeline = timeline.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let (hist, unseen) = latencies(&commits, &timeline);
        anyhow::ensure!(
            unseen == 0,
            "{name}: {unseen} command(s) were never seen as visible"
        );
        let mut f = figures(name, "cmd/s", count, &hist, secs, 0);
        if let Some(target) = target {
            f.scenario = format!(
                "{name} (target p99 ≤ {target:.0} ms: {})",
                verdict(f.p99_ms <= target)
            );
        }
        results.push(f);
    }
    Ok(results)
}

/// The partitioned rebuild scenario's name.
pub const PARTITIONED_REBUILD: &str =
    "rebuild: `neurectomy project` processes on an empty Redis model";
/// The graph's partitioned rebuild scenario's name.
pub const GRAPH_REBUILD: &str = "rebuild: `neurectomy project` processes on an empty graph";

/// Which read model a rebuild scenario rebuilds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rebuilt {
    Redis,
    Graph,
}
/// Partitions of the partitioned rebuild.
const REBUILD_PARTITIONS: u32 = 4;
/// Target: two processes rebuild at this multiple of one's rate.
const REBUILD_SPEEDUP_TARGET: f64 = 1.4;

/// One rebuild: `processes` real `neurectomy project --only redis` processes
/// (the release binary beside this one) on an empty Redis model of the
/// preloaded log in `partitions` partitions, timed from their start until
/// every partition's checkpoint is its last event's position. The cost is
/// the processes' CPU (and PostgreSQL's and Redis's) per event.
async fn rebuild_with_processes(
    settings: &Settings,
    scratch: &mut Scratch,
    (database_url, store): (&str, &EventStore),
    (kind, partitions, processes): (Rebuilt, u32, usize),
    total: u64,
    cluster: Option<&str>,
) -> anyhow::Result<Figures> {
    let on = if cluster.is_some() {
        " on a Redis Cluster"
    } else {
        ""
    };
    let name = match kind {
        Rebuilt::Redis => PARTITIONED_REBUILD,
        Rebuilt::Graph => GRAPH_REBUILD,
    };
    let label = format!("{name}{on}: {processes} process(es), {partitions} partition(s)");
    // A stream of its own, split as the processes expect.
    let nats = scratch::nats(settings).await?;
    let relay_config = RelayConfig {
        partitions,
        ..scratch::relay_config(settings, &nats)
    };
    let client = nats.client.clone();
    scratch.fixtures.streams.push(nats);
    Relay::new(store.clone(), client, relay_config.clone())
        .ensure_stream()
        .await
        .context("creating the scratch JetStream stream")?;
    let live = scratch.live(settings).await?;
    let graph = match kind {
        Rebuilt::Graph => {
            let model = scratch.graph(settings).await?;
            Some(
                GraphModel::connect(projections::GraphConfig {
                    partitions,
                    ..model.config().clone()
                })
                .await?,
            )
        }
        Rebuilt::Redis => None,
    };
    let model = match cluster {
        None => {
            RedisModel::connect(
                &settings.redis_url,
                projections::RedisModelConfig {
                    partitions,
                    ..live.config().clone()
                },
            )
            .await?
        }
        Some(seeds) => RedisModel::connect(
            seeds,
            projections::RedisModelConfig {
                prefix: format!("bench:{}:", Uuid::new_v4().simple()),
                partitions,
                cluster: true,
                ..settings.redis_config()
            },
        )
        .await
        .with_context(|| format!("connecting to the Redis Cluster at {seeds}"))?,
    };
    // As `neurectomy migrate` leaves a partitioned deployment.
    store.ensure_partition_index(partitions).await?;
    let head = store.head().await?.readable;
    let mut lasts = Vec::new();
    for k in 0..partitions {
        lasts.push(if partitions > 1 {
            store.last_in_partition(head, partitions, k).await?
        } else {
            head
        });
    }
    let project_env = ProjectEnv {
        database_url,
        stream: &relay_config,
        partitions,
        redis: (
            cluster.unwrap_or(&settings.redis_url),
            cluster.is_some(),
            model.prefix(),
        ),
        graph: graph.as_ref().map(|g| g.config().database.as_str()),
    };
    let mut children = Vec::new();
    for _ in 0..processes {
        children.push(spawn_project(settings, &project_env)?);
    }
    let pids: Vec<u32> = children.iter().filter_map(|c| c.id()).collect();
    let first = *pids.first().context("a process without a pid")?;
    let peers = match kind {
        Rebuilt::Redis => REDIS_PEERS,
        Rebuilt::Graph => GRAPH_PEERS,
    };
    let meter = Meter::start(&label, first, peers).await?;
    let others: Vec<(u32, f64)> = pids[1..]
        .iter()
        .map(|&pid| Ok((pid, crate::meter::cpu_seconds(pid)?)))
        .collect::<anyhow::Result<_>>()?;
    let started = Instant::now();
    loop {
        let each = match &graph {
            Some(graph) => graph.partition_checkpoints().await?,
            None => model.partition_checkpoints().await?,
        };
        let done = each
            .iter()
            .zip(&lasts)
            .all(|(reached, last)| reached.unwrap_or(0) >= *last);
        if done {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < CATCH_UP_LIMIT,
            "the rebuild did not finish within {} s: {each:?} of {lasts:?}",
            CATCH_UP_LIMIT.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let more: f64 = others
        .iter()
        .map(|(pid, before)| Ok(crate::meter::cpu_seconds(*pid)? - before))
        .collect::<anyhow::Result<Vec<f64>>>()?
        .iter()
        .sum();
    let mut cost = meter.finish(total).await?;
    cost.cpu_us += more * 1e6 / total.max(1) as f64;
    stop_processes(children).await;
    if cluster.is_some() {
        let generation = model.generation();
        if let Err(error) = model.drop_generation(&generation).await {
            eprintln!("could not remove the scenario's keys from the Redis Cluster: {error}");
        }
    }
    let mut per_batch = histogram();
    let _ = per_batch.record((secs * 1e6) as u64);
    Ok(figures(&label, "ev/s", total, &per_batch, secs, 0).with_cost(cost))
}

/// `runs` rebuilds of one configuration ([`rebuild_with_processes`]).
async fn rebuild_runs(
    settings: &Settings,
    scratch: &mut Scratch,
    store: (&str, &EventStore),
    (kind, partitions, processes): (Rebuilt, u32, usize),
    (total, runs): (u64, usize),
    cluster: Option<&str>,
) -> anyhow::Result<Vec<Figures>> {
    let on = if cluster.is_some() {
        " on a Redis Cluster"
    } else {
        ""
    };
    let mut figs = Vec::new();
    for run in 0..runs {
        let name = match kind {
            Rebuilt::Redis => PARTITIONED_REBUILD,
            Rebuilt::Graph => GRAPH_REBUILD,
        };
        eprintln!(
            "running `{name}`{on} with {processes} process(es) and {partitions} partition(s) ({}/{runs}), {total} events…",
            run + 1
        );
        figs.push(
            rebuild_with_processes(
                settings,
                scratch,
                store,
                (kind, partitions, processes),
                total,
                cluster,
            )
            .await?,
        );
    }
    Ok(figs)
}

/// The partitioned rebuild scenarios: one process of the unpartitioned
/// model (the baseline of per-event CPU), then one and two processes of
/// [`REBUILD_PARTITIONS`] partitions; the two-process rate as a multiple
/// of the unpartitioned one-process rate, against [`REBUILD_SPEEDUP_TARGET`]
/// (and of the partitioned one-process rate).
async fn partitioned_rebuilds(
    settings: &Settings,
    args: &BenchArgs,
    scratch: &mut Scratch,
    (database_url, store): (&str, &EventStore),
    total: u64,
) -> anyhow::Result<Vec<Figures>> {
    let runs = args.runs.max(1);
    let mut results = Vec::new();
    let mut rates = Vec::new();
    for (partitions, processes) in [(1, 1), (REBUILD_PARTITIONS, 1), (REBUILD_PARTITIONS, 2)] {
        let figs = rebuild_runs(
            settings,
            scratch,
            (database_url, store),
            (Rebuilt::Redis, partitions, processes),
            (total, runs),
            None,
        )
        .await?;
        if let Some(f) = median(figs) {
            rates.push(f.rate);
            results.push(f);
        }
    }
    if let ([whole, one, two], Some(last)) = (rates.as_slice(), results.last_mut()) {
        // The target's "one process" is the projector as it was before
        // partitions: one process of the whole log. One process of four
        // partitions already spreads them over both cores (a task each).
        let speedup = two / whole.max(1e-9);
        last.scenario = format!(
            "{} (= {speedup:.2}× one process of the whole log, target ≥ {REBUILD_SPEEDUP_TARGET}×: {}; {:.2}× one process of the partitions)",
            last.scenario,
            verdict(speedup >= REBUILD_SPEEDUP_TARGET),
            two / one.max(1e-9)
        );
    }
    results.extend(cluster_rebuilds(settings, args, scratch, (database_url, store), total).await?);
    Ok(results)
}

/// The same rebuild on the Redis Cluster at [`CLUSTER_SEEDS`] (when set):
/// one process of the whole log (one slot), then two of
/// [`REBUILD_PARTITIONS`] partitions (their slots spread over the
/// primaries); reported, with the ratio, not held to the target.
async fn cluster_rebuilds(
    settings: &Settings,
    args: &BenchArgs,
    scratch: &mut Scratch,
    (database_url, store): (&str, &EventStore),
    total: u64,
) -> anyhow::Result<Vec<Figures>> {
    let Ok(seeds) = std::env::var(CLUSTER_SEEDS) else {
        eprintln!("not rebuilding on a Redis Cluster: {CLUSTER_SEEDS} is not set (scripts/bench.sh sets it)");
        return Ok(Vec::new());
    };
    one_against_two(
        settings,
        (args, scratch),
        (database_url, store),
        (Rebuilt::Redis, total),
        Some(&seeds),
    )
    .await
}

/// The graph rebuilt by real processes: one process of the whole log, then
/// two of [`REBUILD_PARTITIONS`] partitions (a projector per partition,
/// side by side on one graph database); reported with the ratio.
async fn graph_rebuilds(
    settings: &Settings,
    args: &BenchArgs,
    scratch: &mut Scratch,
    store: (&str, &EventStore),
    total: u64,
) -> anyhow::Result<Vec<Figures>> {
    one_against_two(
        settings,
        (args, scratch),
        store,
        (Rebuilt::Graph, total),
        None,
    )
    .await
}

/// Rebuilds of `kind`: one process of the whole log, then two of
/// [`REBUILD_PARTITIONS`] partitions (on the Redis Cluster at `cluster`,
/// if given), the medians of `args.runs`, the second with its multiple of
/// the first.
async fn one_against_two(
    settings: &Settings,
    (args, scratch): (&BenchArgs, &mut Scratch),
    store: (&str, &EventStore),
    (kind, total): (Rebuilt, u64),
    cluster: Option<&str>,
) -> anyhow::Result<Vec<Figures>> {
    let mut results = Vec::new();
    for (partitions, processes) in [(1, 1), (REBUILD_PARTITIONS, 2)] {
        let figs = rebuild_runs(
            settings,
            scratch,
            store,
            (kind, partitions, processes),
            (total, args.runs.max(1)),
            cluster,
        )
        .await?;
        results.extend(median(figs));
    }
    if let [one, two] = results.as_mut_slice() {
        let ratio = two.rate / one.rate.max(1e-9);
        two.scenario = format!(
            "{} (= {ratio:.2}× one process of the whole log)",
            two.scenario
        );
    }
    Ok(results)
}

/// The Redis Cluster freshness scenario's name.
pub const CLUSTER_FRESHNESS: &str =
    "freshness 500 cmd/s on a Redis Cluster: 3 `project` processes, 4 partitions";
/// Its target, p99 milliseconds (commit → visible).
const CLUSTER_P99_TARGET_MS: f64 = 25.0;
/// Where the scenario finds the cluster: its seed nodes, comma-separated
/// (`scripts/bench.sh` starts one with `scripts/redis-cluster.sh`).
const CLUSTER_SEEDS: &str = "NEURECTOMY_BENCH_REDIS_CLUSTER";

/// Commit → visible at 500 commands/s of eight tenants with the Redis
/// projection in four partitions on a Redis Cluster, applied by three real
/// release `neurectomy project --only redis` processes sharing the
/// partitions (the relay in this process, one JetStream node). Visible: the
/// command's partition's checkpoint, polled every millisecond through the
/// cluster client, at or past its position. The cost is the three
/// processes' CPU (and Redis's, PostgreSQL's) per command.
async fn cluster_freshness(
    settings: &Settings,
    args: &BenchArgs,
    scratch: &mut Scratch,
) -> anyhow::Result<Vec<Figures>> {
    let seeds = match std::env::var(CLUSTER_SEEDS) {
        Ok(seeds) => seeds,
        Err(_) if args.only.as_deref().is_some_and(|o| o.contains("Cluster")) => anyhow::bail!(
            "`{CLUSTER_FRESHNESS}` needs a Redis Cluster: start one with scripts/redis-cluster.sh up \
             and set {CLUSTER_SEEDS}=redis://127.0.0.1:7301,redis://127.0.0.1:7302,redis://127.0.0.1:7303"
        ),
        Err(_) => {
            eprintln!("not running `{CLUSTER_FRESHNESS}`: {CLUSTER_SEEDS} is not set (scripts/bench.sh sets it)");
            return Ok(Vec::new());
        }
    };
    const PARTITIONS: u32 = 4;
    const PROCESSES: usize = 3;
    let seconds = args.seconds.max(1);
    let store = scratch.store(settings, args.pool.max(8)).await?;
    let database_url = scratch
        .fixtures
        .databases
        .last()
        .map(|db| db.url.clone())
        .context("the scratch database")?;
    let handler = CommandHandler::new(store.clone(), settings.handler_config());
    eprintln!("setting up 8 tenants × 125 running tasks for `{CLUSTER_FRESHNESS}`…");
    let mut tasks = Vec::new();
    for t in 0..8 {
        let tenant = format!("bench-{t}");
        for task in crate::append::running_tasks_of(&handler, 125, &tenant).await? {
            tasks.push((tenant.clone(), task));
        }
    }
    let tasks = Arc::new(tasks);
    let nats = scratch::nats(settings).await?;
    let relay_config = RelayConfig {
        partitions: PARTITIONS,
        ..scratch::relay_config(settings, &nats)
    };
    let client = nats.client.clone();
    scratch.fixtures.streams.push(nats);
    let stop = scratch.stop.child_token();
    let relay = Relay::new(store.clone(), client, relay_config.clone());
    relay.ensure_stream().await?;
    scratch.tasks.push(tokio::spawn({
        let stop = stop.clone();
        async move { relay.run(stop).await }
    }));
    let model = RedisModel::connect(
        &seeds,
        projections::RedisModelConfig {
            prefix: format!("bench:{}:", Uuid::new_v4().simple()),
            partitions: PARTITIONS,
            cluster: true,
            ..settings.redis_config()
        },
    )
    .await
    .with_context(|| format!("connecting to the Redis Cluster at {seeds}"))?;
    let project_env = ProjectEnv {
        database_url: &database_url,
        stream: &relay_config,
        partitions: PARTITIONS,
        redis: (&seeds, true, model.prefix()),
        graph: None,
    };
    let mut children = Vec::new();
    for _ in 0..PROCESSES {
        children.push(spawn_project(settings, &project_env)?);
    }
    let pids: Vec<u32> = children.iter().filter_map(|c| c.id()).collect();
    let outcome = async {
        // Set-up applied, every partition reported live, the shares settled.
        let head = store.head().await?.readable;
        let mut lasts = Vec::new();
        for k in 0..PARTITIONS {
            lasts.push(store.last_in_partition(head, PARTITIONS, k).await?);
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let each = model.partition_checkpoints().await?;
            let mut live = true;
            for k in 0..PARTITIONS {
                let report =
                    projections::redis::health::projector_report(&model, &format!("redis/p{k}"))
                        .await?;
                live &= report.state == "live";
            }
            let reached = each
                .iter()
                .zip(&lasts)
                .all(|(c, last)| c.unwrap_or(0) >= *last);
            if live && reached {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the partitions did not apply the set-up and go live within 120 s: {each:?} of {lasts:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;

        // Every partition's checkpoint, polled.
        let watching = stop.child_token();
        let timelines: Arc<Mutex<Vec<Timeline>>> =
            Arc::new(Mutex::new(vec![Vec::new(); PARTITIONS as usize]));
        let poller = tokio::spawn({
            let (model, timelines, watching) = (model.clone(), timelines.clone(), watching.clone());
            async move {
                let mut tick = tokio::time::interval(Duration::from_millis(1));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                while !watching.is_cancelled() {
                    tick.tick().await;
                    let Ok(each) = model.partition_checkpoints().await else {
                        continue;
                    };
                    let now = Instant::now();
                    let mut timelines = timelines.lock().unwrap_or_else(|p| p.into_inner());
                    for (timeline, at) in timelines.iter_mut().zip(each) {
                        let at = at.unwrap_or(0);
                        if timeline.last().is_none_or(|(last, _)| *last < at) {
                            timeline.push((at, now));
                        }
                    }
                }
            }
        });
        let cpu_before: Vec<f64> = pids
            .iter()
            .map(|pid| crate::meter::cpu_seconds(*pid))
            .collect::<anyhow::Result<_>>()?;
        let meter = Meter::start(CLUSTER_FRESHNESS, std::process::id(), REDIS_PEERS).await?;
        eprintln!("running `{CLUSTER_FRESHNESS}` for {seconds}s…");
        let writers = 4u64;
        let interval = Duration::from_micros(1_000_000 * writers / FRESHNESS_RATE);
        let commits: Arc<Mutex<Vec<(u32, i64, Instant)>>> = Arc::default();
        let started = Instant::now();
        let until = started + Duration::from_secs(seconds);
        let mut handles = Vec::new();
        for writer in 0..writers {
            let (handler, tasks, commits) = (handler.clone(), tasks.clone(), commits.clone());
            handles.push(tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(writer);
                let mut ticker = tokio::time::interval(interval);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                while Instant::now() < until {
                    ticker.tick().await;
                    let (tenant, task_id) = &tasks[rng.gen_range(0..tasks.len())];
                    let command = TaskCommand::ReportTaskProgress {
                        task_id: *task_id,
                        percent: rng.gen_range(0..=99),
                        note: Some(format!("writer {writer}")),
                    };
                    let ctx = CommandContext::new(Uuid::new_v4(), "bench", tenant.as_str());
                    let outcome = handler.execute(command.into(), &ctx).await?;
                    let committed = Instant::now();
                    let partition = commands::partition::of(tenant, PARTITIONS);
                    commits
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((partition, outcome.position, committed));
                }
                Ok::<_, anyhow::Error>(())
            }));
        }
        for handle in handles {
            handle.await.context("joining a writer")??;
        }
        let secs = started.elapsed().as_secs_f64();
        let commits = std::mem::take(&mut *commits.lock().unwrap_or_else(|p| p.into_inner()));
        let last = commits.iter().map(|(_, p, _)| *p).max().unwrap_or(head);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut reached = true;
            for k in 0..PARTITIONS {
                let wanted = store.last_in_partition(last, PARTITIONS, k).await?;
                let at = timelines.lock().unwrap_or_else(|p| p.into_inner())[k as usize]
                    .last()
                    .map_or(0, |(at, _)| *at);
                reached &= at >= wanted;
            }
            if reached {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the partitions did not apply the run within 60 s of its end"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let count = commits.len() as u64;
        let processes: f64 = pids
            .iter()
            .zip(&cpu_before)
            .map(|(pid, before)| Ok(crate::meter::cpu_seconds(*pid)? - before))
            .collect::<anyhow::Result<Vec<f64>>>()?
            .iter()
            .sum();
        let mut cost = meter.finish(count).await?;
        cost.cpu_us = processes * 1e6 / count.max(1) as f64;
        watching.cancel();
        let _ = poller.await;
        let timelines = timelines.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut hist = histogram();
        let mut unseen = 0;
        for (partition, position, committed) in &commits {
            let timeline = &timelines[*partition as usize];
            let index = timeline.partition_point(|(at, _)| at < position);
            match timeline.get(index) {
                Some((_, visible)) => {
                    let micros = visible.saturating_duration_since(*committed).as_micros();
                    let _ = hist.record(micros.max(1) as u64);
                }
                None => unseen += 1,
            }
        }
        anyhow::ensure!(unseen == 0, "{unseen} command(s) were never seen as visible");
        let mut f = figures(CLUSTER_FRESHNESS, "cmd/s", count, &hist, secs, 0).with_cost(cost);
        f.scenario = format!(
            "{CLUSTER_FRESHNESS}: commit → visible (target p99 ≤ {CLUSTER_P99_TARGET_MS:.0} ms: {})",
            verdict(f.p99_ms <= CLUSTER_P99_TARGET_MS)
        );
        Ok(vec![f])
    }
    .await;
    stop_processes(children).await;
    let generation = model.generation();
    if let Err(error) = model.drop_generation(&generation).await {
        eprintln!("could not remove the scenario's keys from the Redis Cluster: {error}");
    }
    outcome
}

/// What a `neurectomy project` process of a scenario runs on.
struct ProjectEnv<'a> {
    database_url: &'a str,
    /// The stream and subject prefix.
    stream: &'a RelayConfig,
    partitions: u32,
    /// Redis URL (seeds when clustered), whether it is a cluster, prefix:
    /// the Redis model, or, for the graph, where its reports go.
    redis: (&'a str, bool, &'a str),
    /// The graph database it projects (`--only graph`), or none
    /// (`--only redis`).
    graph: Option<&'a str>,
}

/// Starts the release `neurectomy project --only redis` (or `--only graph`)
/// beside this binary on `env` (1 s lease ttl, warnings only), killed if
/// dropped.
fn spawn_project(
    settings: &Settings,
    env: &ProjectEnv<'_>,
) -> anyhow::Result<tokio::process::Child> {
    let binary = std::env::current_exe()
        .context("locating this binary")?
        .with_file_name("neurectomy");
    anyhow::ensure!(
        binary.exists(),
        "{} is missing: build it with `cargo build --release -p neurectomy-api`",
        binary.display()
    );
    let (redis_url, cluster, prefix) = env.redis;
    let mut command = tokio::process::Command::new(&binary);
    command.env_clear();
    match env.graph {
        None => command.args(["project", "--only", "redis"]),
        Some(database) => command
            .args(["project", "--only", "graph"])
            .env("NEURECTOMY_GRAPH_URI", &settings.graph_uri)
            .env("NEURECTOMY_GRAPH_USER", &settings.graph_user)
            .env(
                "NEURECTOMY_GRAPH_PASSWORD",
                settings.graph_password.expose(),
            )
            .env("NEURECTOMY_GRAPH_DATABASE", database),
    };
    command
        .env("NEURECTOMY_DATABASE_URL", env.database_url)
        .env("NEURECTOMY_NATS_URL", &settings.nats_url)
        .env("NEURECTOMY_JETSTREAM_STREAM", &env.stream.stream_name)
        .env("NEURECTOMY_SUBJECT_PREFIX", &env.stream.subject_prefix)
        .env(
            "NEURECTOMY_JETSTREAM_PARTITIONS",
            env.partitions.to_string(),
        )
        .env("NEURECTOMY_REDIS_CLUSTER", cluster.to_string())
        .env("NEURECTOMY_REDIS_URL", redis_url)
        .env("NEURECTOMY_REDIS_PREFIX", prefix)
        .env(
            "NEURECTOMY_PROJECTOR_BATCH_SIZE",
            settings.projector_batch_size.to_string(),
        )
        .env("NEURECTOMY_PROJECTOR_LEASE_TTL_MS", "1000")
        .env("NEURECTOMY_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))
}

/// SIGTERM to each of `children`, then waits (at most 30 s each).
async fn stop_processes(children: Vec<tokio::process::Child>) {
    for pid in children.iter().filter_map(tokio::process::Child::id) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    for mut child in children {
        let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    }
}
