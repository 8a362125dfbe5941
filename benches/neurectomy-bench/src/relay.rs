//! `neurectomy-bench relay`: the outbox relay on a scratch database and
//! JetStream streams: draining a backlog, keeping up with 8 batch writers,
//! and commit → JetStream ack latency at a paced 2,000 events/s.

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
use crate::figures::{drive, figures, histogram, wants, Figures};
use crate::meter::{Meter, Peer};
use crate::scratch;

/// The services a relayed event costs besides this process.
const RELAY_PEERS: &[Peer] = &[Peer::Postgres, Peer::Nats];

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

    let name = "relay: drain a backlog (commit → JetStream ack)";
    if wants(args, name) {
        let total = 20_000 * seconds.min(15);
        eprintln!("preloading {total} events…");
        preload(&store, total).await?;
        let nats = scratch::nats(settings).await?;
        eprintln!("running `{name}`…");
        let meter = Meter::start(name, std::process::id(), RELAY_PEERS).await?;
        let started = Instant::now();
        let relay = BenchRelay::start(&store, settings, nats);
        let mut progress = relay.progress.clone();
        while progress.borrow_and_update().published < total {
            if progress.changed().await.is_err() {
                break;
            }
        }
        let secs = started.elapsed().as_secs_f64();
        let published = progress.borrow().published;
        let cost = meter.finish(published).await?;
        relay.finish().await?;
        results.push(figures(name, "ev/s", published, &histogram(), secs, 0).with_cost(cost));
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
        // 4 writers × 500 appends/s of one event each = 2,000 events/s.
        let interval = Duration::from_micros(2_000);
        let meter = Meter::start(name, std::process::id(), RELAY_PEERS).await?;
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
        // The appends and their relaying: the cost of one event end to end.
        let cost = meter.finish(count).await?;
        relay.finish().await?;
        let _ = watcher.await;
        let hist = latencies.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut f = figures(name, "ev/s", count, &hist, secs, 0).with_cost(cost);
        f.count = hist.len();
        results.push(f);
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

/// A relay running on a JetStream stream of its own for one scenario.
struct BenchRelay {
    /// What the relay has published and had acknowledged.
    progress: tokio::sync::watch::Receiver<commands::RelayProgress>,
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
