//! `neurectomy replay`: rebuilds a projection from the event store into a
//! fresh namespace while the live one keeps serving, then switches over
//! (`projections::replay`), with a progress bar on the terminal.

use commands::EventStore;
use indicatif::{ProgressBar, ProgressStyle};
use projections::replay::{Progress, ReplaySummary};

use super::ReplayArgs;
use crate::settings::{Projection, Settings};
use crate::startup::connect;

/// Runs `neurectomy replay`.
pub async fn run(settings: &Settings, args: ReplayArgs) -> anyhow::Result<()> {
    let pool = connect::connect_database(settings).await?;
    let nats = connect::connect_nats(settings).await?;
    let store = EventStore::new(pool.clone());
    let batch_size = args.batch_size.max(1);
    let bar = Bar::new();
    let (summary, describe) = match args.projection {
        Projection::Redis => {
            let replay = projections::replay::replay_redis_into(
                &store,
                &nats,
                &settings.redis_url,
                settings.redis_config(),
                batch_size,
                |progress| bar.show("redis generation", progress),
            )
            .await;
            (replay, "Redis generation")
        }
        Projection::Graph => {
            let replay = projections::replay::replay_graph_into(
                &store,
                &nats,
                settings.graph_config(),
                &settings.graph_http(),
                batch_size,
                |progress| bar.show("graph database", progress),
            )
            .await;
            (replay, "graph database")
        }
    };
    pool.close().await;
    let s: ReplaySummary = summary?;
    println!(
        "replayed {} event(s) in {:.1}s ({:.0} events/s); {describe} {} is now active (was {}); {} key(s)/node(s) of the old one deleted",
        s.events,
        s.seconds,
        s.events as f64 / s.seconds.max(1e-9),
        s.generation,
        s.previous.as_deref().unwrap_or("none"),
        s.deleted_keys,
    );
    Ok(())
}

/// The progress bar of a replay, on standard error.
struct Bar(ProgressBar);

impl Bar {
    fn new() -> Self {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} replay [{bar:40}] {pos}/{len} events · {per_sec} · ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Self(bar)
    }

    /// Shows `progress` of a replay into a `kind` (`redis generation`,
    /// `graph database`).
    fn show(&self, kind: &str, progress: Progress) {
        let bar = &self.0;
        match progress {
            Progress::Started {
                total,
                namespace,
                active,
            } => {
                eprintln!("replaying {total} event(s) into {kind} {namespace} (live: {active})");
                bar.set_length(total);
            }
            Progress::Applied(applied) => {
                bar.set_position(applied);
                if bar.length().is_some_and(|len| bar.position() > len) {
                    bar.set_length(bar.position());
                }
            }
            Progress::CaughtUp { .. } => bar.finish(),
        }
    }
}
