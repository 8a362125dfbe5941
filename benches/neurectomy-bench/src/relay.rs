//! `neurectomy-bench relay`: the outbox relay on a scratch database and
//! JetStream streams: draining a backlog, keeping up with 8 batch writers,
//! and commit → JetStream ack latency at a paced 2,000 events/s; then the
//! same drain with the sealer on (its CPU per event beside the unsealed
//! drain's: the target is ≤ 1.15×) and commit → sealed latency at 2,000
//! events/s (target p99 ≤ 1 s).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use api::settings::Settings;
use commands::testkit::TestNats;
use commands::{EventStore, ExpectedVersion, Relay};
use futures::StreamExt;
use hdrhistogram::Histogram;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::append::progress_events;
use crate::cli::BenchArgs;
use crate::figures::{drive, figures, histogram, median, wants, Figures};
use crate::meter::{Meter, Peer};
use crate::scratch;

/// The services a relayed event costs besides this process.
const RELAY_PEERS: &[Peer] = &[Peer::Postgres, Peer::Nats];

/// The drain scenarios' names.
const DRAIN: &str = "relay: drain a backlog (commit → JetStream ack)";
const DRAIN_SEALED: &str = "relay: drain a backlog, sealed";

/// One drain of the `total` events of `store` onto a fresh stream, sealed
/// as it goes with a new key when `sealed` (then until every event is
/// sealed too); its figures, and the sealed log's name and key.
async fn drain(
    store: &EventStore,
    settings: &Settings,
    total: u64,
    sealed: bool,
    (pair, pairs): (usize, usize),
) -> anyhow::Result<(Figures, Option<(String, commands::seal::key::SealKey)>)> {
    let name = if sealed { DRAIN_SEALED } else { DRAIN };
    let nats = scratch::nats(settings).await?;
    eprintln!("running `{name}` ({}/{pairs})…", pair + 1);
    let meter = Meter::start(name, std::process::id(), RELAY_PEERS).await?;
    let started = Instant::now();
    let (relay, log) = if sealed {
        let key = commands::seal::key::SealKey::generate();
        let log = nats.relay.stream_name.clone();
        let relay = BenchRelay::start_sealed(store, settings, nats, key.clone());
        (relay, Some((log, key)))
    } else {
        (BenchRelay::start(store, settings, nats), None)
    };
    match relay.sealed.clone() {
        Some(mut progress) => {
            let head = store.head().await?.readable;
            while progress.borrow_and_update().sealed_to < head
                || relay.progress.borrow().published < total
            {
                let _ = tokio::time::timeout(Duration::from_millis(50), progress.changed()).await;
            }
        }
        None => {
            let mut progress = relay.progress.clone();
            while progress.borrow_and_update().published < total {
                if progress.changed().await.is_err() {
                    break;
                }
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let published = relay.progress.borrow().published;
    let cost = meter.finish(published).await?;
    relay.finish().await?;
    let f = figures(name, "ev/s", published, &histogram(), secs, 0).with_cost(cost);
    Ok((f, log))
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

/// `relay`: backlog drain rate, rate under concurrent load, and
/// commit → JetStream-ack latency at a paced 2,000 events/s.
pub async fn run(settings: &Settings, args: &BenchArgs) -> anyhow::Result<Vec<Figures>> {
    let db = scratch::database(settings, args.pool.max(8)).await?;
    let result = relay_scenarios(settings, args, EventStore::new(db.pool.clone())).await;
    scratch::drop_database(db).await;
    result
}

async fn relay_scenarios(
    settings: &Settings,
    args: &BenchArgs,
    store: EventStore,
) -> anyhow::Result<Vec<Figures>> {
    let seconds = args.seconds.max(1);
    let mut results = Vec::new();

    let name = DRAIN;
    if wants(args, name) {
        let total = 20_000 * seconds.min(15);
        eprintln!("preloading {total} events…");
        preload(&store, total).await?;
        // The same backlog drained onto fresh streams, unsealed and sealed
        // in alternation — (plain, sealed), (sealed, plain), … — so that
        // whatever else the machine does drifts over both alike; the ratio
        // is the median of the pairs' ratios of CPU per event.
        let sealed_too = wants(args, DRAIN_SEALED);
        let pairs = if sealed_too { args.runs.max(3) } else { 1 };
        let (mut plain, mut sealed, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        let mut last_log = None;
        for pair in 0..pairs {
            let order: &[bool] = match (sealed_too, pair % 2) {
                (false, _) => &[false],
                (true, 0) => &[false, true],
                (true, _) => &[true, false],
            };
            let mut costs = [0.0; 2];
            for &with_seal in order {
                let (f, log) = drain(&store, settings, total, with_seal, (pair, pairs)).await?;
                costs[usize::from(with_seal)] = f.cost.as_ref().map_or(0.0, |c| c.cpu_us);
                if with_seal {
                    sealed.push(f);
                    last_log = log;
                } else {
                    plain.push(f);
                }
            }
            if sealed_too && costs[0] > 0.0 {
                ratios.push(costs[1] / costs[0]);
            }
        }
        results.extend(median(plain));
        if let Some(mut f) = median(sealed) {
            ratios.sort_by(f64::total_cmp);
            let ratio = ratios.get(ratios.len() / 2).copied().unwrap_or(f64::NAN);
            let each: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
            f.scenario = format!(
                "{DRAIN_SEALED} (CPU per event {ratio:.2}× unsealed, median of {} alternating pairs: {}; target ≤ 1.15×)",
                ratios.len(),
                each.join(", ")
            );
            results.push(f);
        }
        if let Some((log, key)) = last_log {
            results.extend(verify_against_reading(&store, &log, &key).await?);
        }
    }

    let name = "relay: 2,000 events/s paced, commit → ack latency";
    if wants(args, name) {
        let relay = BenchRelay::start(&store, settings, scratch::nats(settings).await?);
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
        let meter = Meter::start(name, std::process::id(), RELAY_PEERS).await?;
        let started = Instant::now();
        let count = paced_writers(&store, &pending, seconds).await?;
        let secs = started.elapsed().as_secs_f64();
        wait_caught_up(&store, progress.clone()).await?;
        // The appends and their relaying: the cost of one event end to end.
        let cost = meter.finish(count).await?;
        relay.finish().await?;
        let _ = watcher.await;
        let hist = latencies.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut f = figures(name, "ev/s", count, &hist, secs, 0).with_cost(cost);
        f.count = hist.len();
        results.push(f);
    }

    let name = "relay: 2,000 events/s paced, sealed: commit → sealed latency";
    if wants(args, name) {
        let relay = BenchRelay::start_sealed(
            &store,
            settings,
            scratch::nats(settings).await?,
            commands::seal::key::SealKey::generate(),
        );
        let sealed = relay.sealed.clone().context("the sealer's progress")?;
        // The new log's sealer first seals what the store holds.
        wait_caught_up(&store, relay.progress.clone()).await?;
        wait_sealed(&store, sealed.clone()).await?;
        eprintln!("running `{name}` for {seconds}s…");
        let pending: Arc<Mutex<BTreeMap<i64, Instant>>> = Arc::default();
        let latencies = Arc::new(Mutex::new(histogram()));
        let stop = relay.stop.clone();
        let watcher = tokio::spawn(watch_sealed(
            sealed.clone(),
            pending.clone(),
            latencies.clone(),
            stop.clone(),
        ));
        let meter = Meter::start(name, std::process::id(), RELAY_PEERS).await?;
        let started = Instant::now();
        let count = paced_writers(&store, &pending, seconds).await?;
        let secs = started.elapsed().as_secs_f64();
        wait_sealed(&store, sealed.clone()).await?;
        let cost = meter.finish(count).await?;
        relay.finish().await?;
        let _ = watcher.await;
        let hist = latencies.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut f = figures(name, "ev/s", count, &hist, secs, 0).with_cost(cost);
        f.count = hist.len();
        results.push(f);
    }

    let name = "audit: why, 20-step chains in a 1,000,000-event log";
    if wants(args, name) {
        results.push(why_chains(&store, name, seconds).await?);
    }

    let name = "relay: under 8 batch writers at full speed";
    if wants(args, name) {
        let relay = BenchRelay::start(&store, settings, scratch::nats(settings).await?);
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

/// 4 writers × 500 appends/s of one event each = 2,000 events/s for
/// `seconds`, each commit's instant put in `pending` by position; returns
/// the events written.
async fn paced_writers(
    store: &EventStore,
    pending: &Arc<Mutex<BTreeMap<i64, Instant>>>,
    seconds: u64,
) -> anyhow::Result<u64> {
    let interval = Duration::from_micros(2_000);
    let deadline = Instant::now() + Duration::from_secs(seconds);
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
    Ok(count)
}

/// A relay running on a JetStream stream of its own for one scenario.
struct BenchRelay {
    /// What the relay has published and had acknowledged.
    progress: tokio::sync::watch::Receiver<commands::RelayProgress>,
    /// The sealer's progress, when it seals.
    sealed: Option<tokio::sync::watch::Receiver<commands::seal::sealer::SealProgress>>,
    /// Stops the relay.
    stop: CancellationToken,
    /// The relay's task.
    task: tokio::task::JoinHandle<()>,
    /// The stream and its client; dropping it deletes the stream.
    nats: TestNats,
}

impl BenchRelay {
    /// Starts a relay configured by `settings` on `nats`'s stream.
    fn start(store: &EventStore, settings: &Settings, nats: TestNats) -> Self {
        let config = scratch::relay_config(settings, &nats);
        let relay = Relay::new(store.clone(), nats.client.clone(), config);
        Self::spawn(relay, nats)
    }

    /// [`BenchRelay::start`], sealing the log with a new key (the block
    /// settings of `settings`).
    fn start_sealed(
        store: &EventStore,
        settings: &Settings,
        nats: TestNats,
        key: commands::seal::key::SealKey,
    ) -> Self {
        let config = scratch::relay_config(settings, &nats);
        let sealing = commands::seal::sealer::SealerConfig {
            block_events: settings.seal_block_events.max(1),
            block_time: Duration::from_millis(settings.seal_block_ms.max(1)),
            ..commands::seal::sealer::SealerConfig::for_relay(&config)
        };
        let relay = Relay::new(store.clone(), nats.client.clone(), config).with_sealer(
            commands::seal::sealer::Sealer::new(store.clone(), nats.client.clone(), key, sealing),
        );
        Self::spawn(relay, nats)
    }

    fn spawn(relay: Relay, nats: TestNats) -> Self {
        let sealed = relay.sealer().map(|s| s.progress());
        let progress = relay.progress();
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move { relay.run(stop).await }
        });
        Self {
            progress,
            sealed,
            stop,
            task,
            nats,
        }
    }

    /// Stops the relay and deletes its stream.
    async fn finish(self) -> anyhow::Result<()> {
        self.stop.cancel();
        let joined = self.task.await.context("joining the relay");
        scratch::drop_stream(self.nats).await;
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

/// Waits until the sealer has sealed everything readable now.
async fn wait_sealed(
    store: &EventStore,
    mut sealed: tokio::sync::watch::Receiver<commands::seal::sealer::SealProgress>,
) -> anyhow::Result<()> {
    let head = store.head().await?.readable;
    let deadline = Instant::now() + Duration::from_secs(120);
    while sealed.borrow_and_update().sealed_to < head {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the sealer did not catch up within 120 s"
        );
        let _ = tokio::time::timeout(Duration::from_millis(200), sealed.changed()).await;
    }
    Ok(())
}

/// Records commit → sealed latency for every pending position the sealer
/// seals.
async fn watch_sealed(
    mut sealed: tokio::sync::watch::Receiver<commands::seal::sealer::SealProgress>,
    pending: Arc<Mutex<BTreeMap<i64, Instant>>>,
    latencies: Arc<Mutex<Histogram<u64>>>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            changed = sealed.changed() => if changed.is_err() { return },
        }
        let now = Instant::now();
        let position = sealed.borrow_and_update().sealed_to;
        let done: Vec<Instant> = {
            let mut pending = pending.lock().unwrap_or_else(|p| p.into_inner());
            let rest = pending.split_off(&(position + 1));
            std::mem::replace(&mut *pending, rest)
                .into_values()
                .collect()
        };
        let mut hist = latencies.lock().unwrap_or_else(|p| p.into_inner());
        for committed in done {
            let _ = hist.record(now.duration_since(committed).as_micros().max(1) as u64);
        }
    }
}

/// `audit verify` of the sealed log `log` beside merely reading and
/// decoding the same events, one after the other in this process (target:
/// verify at ≥ 90 % of the reading rate).
async fn verify_against_reading(
    store: &EventStore,
    log: &str,
    key: &commands::seal::key::SealKey,
) -> anyhow::Result<Vec<Figures>> {
    let name = "audit: read and decode the log";
    eprintln!("running `{name}`…");
    let meter = Meter::start(name, std::process::id(), &[Peer::Postgres]).await?;
    let started = Instant::now();
    let (mut after, mut read) = (0, 0u64);
    loop {
        let batch = store.read_all(after, 2_000).await?;
        let Some(last) = batch.last() else { break };
        after = last.position;
        for event in &batch {
            event.decode().context("decoding an event")?;
        }
        read += batch.len() as u64;
    }
    let read_secs = started.elapsed().as_secs_f64();
    let cost = meter.finish(read).await?;
    let reading = figures(name, "ev/s", read, &histogram(), read_secs, 0).with_cost(cost);

    let name = "audit: verify the sealed log";
    eprintln!("running `{name}`…");
    let options = commands::seal::verify::VerifyOptions {
        log: log.to_owned(),
        trusted: vec![key.public().clone()],
        ..Default::default()
    };
    let meter = Meter::start(name, std::process::id(), &[Peer::Postgres]).await?;
    let started = Instant::now();
    let report = commands::seal::verify::verify(store.pool(), None, &options, |_| {}).await?;
    let secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        report.problem.is_none(),
        "the sealed log does not verify: {report:?}"
    );
    let cost = meter.finish(report.events).await?;
    let ratio = (report.events as f64 / secs) / (read as f64 / read_secs);
    let mut verifying = figures(name, "ev/s", report.events, &histogram(), secs, 0).with_cost(cost);
    verifying.scenario = format!(
        "{name} ({} seals; {:.0} % of the read-and-decode rate; target ≥ 90 %)",
        report.seals,
        ratio * 100.0
    );
    Ok(vec![reading, verifying])
}

/// `why` on 20-step chains of causes in a log of a million events: 50
/// agents each paused and resumed 10 times, every command caused by the
/// agent's previous event, among events of other streams; then `why` of a
/// chain's last event, over and over for `seconds` (p99 target ≤ 50 ms).
async fn why_chains(store: &EventStore, name: &str, seconds: u64) -> anyhow::Result<Figures> {
    use commands::{CommandContext, CommandHandler, HandlerConfig};
    use domain::{AgentCommand, AgentId, AgentKind};
    const LOG: i64 = 1_000_000;
    const CHAINS: usize = 50;
    let present = store.count_after(0, LOG).await?;
    if present < LOG {
        let more = u64::try_from(LOG - present).unwrap_or(0);
        eprintln!("preloading {more} events for `{name}`…");
        preload(store, more).await?;
    }
    let handler = CommandHandler::new(store.clone(), HandlerConfig::default());
    let mut lasts = Vec::with_capacity(CHAINS);
    for _ in 0..CHAINS {
        let agent = AgentId::from_uuid(Uuid::new_v4());
        let mut cause: Option<Uuid> = None;
        for step in 0..21 {
            let command = match step {
                0 => AgentCommand::RegisterAgent {
                    agent_id: agent,
                    name: "why".into(),
                    kind: AgentKind::Tool,
                    model: None,
                    capabilities: vec!["search".into()],
                    parent_agent_id: None,
                },
                n if n % 2 == 1 => AgentCommand::PauseAgent {
                    agent_id: agent,
                    reason: Some("bench".into()),
                },
                _ => AgentCommand::ResumeAgent { agent_id: agent },
            };
            let mut ctx = CommandContext::new(Uuid::new_v4(), "bench", "bench");
            ctx.causation_id = cause;
            let outcome = handler.execute(command.into(), &ctx).await?;
            cause = outcome.events.last().map(|e| e.event_id);
        }
        lasts.extend(cause);
    }
    eprintln!("running `{name}` for {seconds}s…");
    let mut hist = histogram();
    let meter = Meter::start(name, std::process::id(), &[Peer::Postgres]).await?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut count = 0u64;
    while Instant::now() < deadline {
        let last = lasts[count as usize % lasts.len()];
        let asked = Instant::now();
        let chain = store.read_causes_of_tenant("bench", last, 20).await?;
        let _ = hist.record(asked.elapsed().as_micros().max(1) as u64);
        anyhow::ensure!(
            chain.len() == 21,
            "a chain of {} events, 21 expected",
            chain.len()
        );
        count += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    let cost = meter.finish(count).await?;
    Ok(figures(name, "req/s", count, &hist, secs, 0).with_cost(cost))
}
