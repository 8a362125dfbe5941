//! `neurectomy replay`: rebuilds a projection from the event store into a
//! fresh namespace while the live one keeps serving, then switches over.
//!
//! Redis: the new generation is written under its own key namespace; when
//! it has caught up with the log, the `active` pointer is switched with one
//! `SET`, so readers move atomically. A live projector (in another process)
//! notices the switch at its next batch and continues on the new generation
//! from its checkpoint. The old generation is deleted afterwards.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use commands::EventStore;
use indicatif::{ProgressBar, ProgressStyle};
use projections::{GraphModel, Projector, ProjectorConfig, ReadModel, RedisModel};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::settings::{Projection, ReplayArgs, Settings};

/// Runs `neurectomy replay`.
pub async fn run(settings: &Settings, args: ReplayArgs) -> anyhow::Result<()> {
    match args.projection {
        Projection::Redis => replay_redis(settings, args.batch_size.max(1)).await,
        Projection::Graph => replay_graph(settings, args.batch_size.max(1)).await,
    }
}

/// Connects to the store, runs `replay`, prints its summary.
async fn replay_with<F, Fut>(settings: &Settings, replay: F, describe: &str) -> anyhow::Result<()>
where
    F: FnOnce(EventStore, async_nats::Client) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<ReplaySummary>>,
{
    let pool = crate::app::connect_database(settings).await?;
    let nats = crate::app::connect_nats(settings).await?;
    let summary = replay(EventStore::new(pool.clone()), nats).await;
    pool.close().await;
    let s = summary?;
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

async fn replay_graph(settings: &Settings, batch_size: usize) -> anyhow::Result<()> {
    let replay = |store: EventStore, nats: async_nats::Client| async move {
        let (config, http) = (settings.graph_config(), settings.graph_http());
        replay_graph_into(&store, &nats, config, &http, batch_size, true).await
    };
    replay_with(settings, replay, "graph database").await
}

async fn replay_redis(settings: &Settings, batch_size: usize) -> anyhow::Result<()> {
    let replay = |store: EventStore, nats: async_nats::Client| async move {
        let config = settings.redis_config();
        replay_redis_into(&store, &nats, &settings.redis_url, config, batch_size, true).await
    };
    replay_with(settings, replay, "Redis generation").await
}

/// What a replay did.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplaySummary {
    /// Events applied.
    pub events: u64,
    /// Seconds taken (before the old generation was deleted).
    pub seconds: f64,
    /// The new, now active generation.
    pub generation: String,
    /// The generation that was active before.
    pub previous: Option<String>,
    /// Keys (Redis) or nodes (graph, when the home database was emptied) of
    /// the previous namespace deleted.
    pub deleted_keys: u64,
}

/// Rebuilds the Redis read model into a fresh generation from `store`,
/// activates it, and deletes the previous one.
pub async fn replay_redis_into(
    store: &EventStore,
    nats: &async_nats::Client,
    redis_url: &str,
    config: projections::RedisModelConfig,
    batch_size: usize,
    show_progress: bool,
) -> anyhow::Result<ReplaySummary> {
    let active = RedisModel::connect(redis_url, config.clone())
        .await
        .context("connecting to Redis")?;
    let old = active.generation();
    let generation = format!("g{}", &Uuid::new_v4().simple().to_string()[..12]);
    let target = RedisModel::connect_generation(redis_url, config, &generation)
        .await
        .context("connecting to Redis for the new generation")?;

    let started = Instant::now();
    let applied = catch_up_with_progress(
        store,
        nats,
        target.clone(),
        batch_size,
        &format!("redis generation {generation} (live: {old})"),
        show_progress,
    )
    .await?;

    let previous = target
        .activate()
        .await
        .context("switching the active generation")?;
    let seconds = started.elapsed().as_secs_f64();
    let mut deleted_keys = 0;
    if let Some(previous) = previous.as_ref().filter(|p| **p != generation) {
        // A live projector may still be finishing a batch on the old
        // generation; give it a moment before deleting it.
        tokio::time::sleep(Duration::from_secs(2)).await;
        deleted_keys = target
            .drop_generation(previous)
            .await
            .context("deleting the old generation")?;
    }
    Ok(ReplaySummary {
        events: applied,
        seconds,
        generation,
        previous,
        deleted_keys,
    })
}

/// Runs the projector's own catch-up (read-ahead, decoding, retries) on
/// `target` up to the head of the log, with a progress bar that follows its
/// status; returns the events applied.
async fn catch_up_with_progress<M: ReadModel>(
    store: &EventStore,
    nats: &async_nats::Client,
    target: M,
    batch_size: usize,
    into: &str,
    show_progress: bool,
) -> anyhow::Result<u64> {
    let total = store
        .count_after(0, i64::MAX)
        .await
        .context("counting events")?;
    let bar = if show_progress {
        ProgressBar::new(u64::try_from(total).unwrap_or(0))
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} replay [{bar:40}] {pos}/{len} events · {per_sec} · ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    if show_progress {
        eprintln!("replaying {total} event(s) into {into}");
    }
    let projector = Projector::new(
        target,
        store.clone(),
        nats.clone(),
        ProjectorConfig {
            batch_size,
            ..ProjectorConfig::default()
        },
    );
    let mut status = projector.status();
    let never = CancellationToken::new();
    let catch_up = projector.catch_up(&never);
    tokio::pin!(catch_up);
    let reached = loop {
        tokio::select! {
            reached = &mut catch_up => break reached,
            changed = status.changed() => if changed.is_ok() {
                bar.set_position(status.borrow_and_update().applied);
                if bar.length().is_some_and(|len| bar.position() > len) {
                    bar.set_length(bar.position());
                }
            },
        }
    };
    let checkpoint = reached.context("replaying the event store")?;
    let applied = projector.status().borrow().applied;
    tracing::debug!(checkpoint, applied, "replay caught up");
    bar.finish();
    Ok(applied)
}

/// Rebuilds the graph read model into a fresh database from `store`,
/// points the home database at it, and drops (or empties) the previous one.
pub async fn replay_graph_into(
    store: &EventStore,
    nats: &async_nats::Client,
    config: projections::GraphConfig,
    http: &str,
    batch_size: usize,
    show_progress: bool,
) -> anyhow::Result<ReplaySummary> {
    let home = GraphModel::connect(config.clone())
        .await
        .context("connecting to the graph")?;
    let old = home
        .database(Duration::ZERO)
        .await
        .context("resolving the graph's active database")?;
    let database = format!(
        "{}-g{}",
        home.home_database(),
        &Uuid::new_v4().simple().to_string()[..12]
    );
    projections::graph::admin::create_database(&home, http, &database)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context(
            "creating the replay's database (Neo4j Community has a single database: \
             rebuild in place instead by stopping the graph projector, deleting the graph's nodes \
             and starting it again)",
        )?;
    let built = async {
        let target = GraphModel::connect_database(config.clone(), &database)
            .await
            .context("connecting to the replay's database")?;
        let started = Instant::now();
        let applied = catch_up_with_progress(
            store,
            nats,
            target.clone(),
            batch_size,
            &format!("graph database {database} (live: {old})"),
            show_progress,
        )
        .await?;
        let previous = target
            .activate()
            .await
            .context("switching the graph's active database")?;
        Ok::<_, anyhow::Error>((applied, started.elapsed().as_secs_f64(), previous))
    }
    .await;
    let (events, seconds, previous) = match built {
        Ok(built) => built,
        Err(e) => {
            // Nothing points at the new database yet: drop it.
            if let Err(drop_error) =
                projections::graph::admin::drop_database(&home, http, &database).await
            {
                tracing::warn!(%drop_error, %database, "could not drop the abandoned replay database");
            }
            return Err(e);
        }
    };
    let mut deleted = 0;
    if previous != database {
        // A live projector may still be finishing a batch on the old
        // namespace; give it a moment before removing it.
        tokio::time::sleep(Duration::from_secs(2)).await;
        if previous == home.home_database() {
            deleted = home
                .clear_database(&previous)
                .await
                .context("emptying the previous namespace (the home database)")?;
        } else {
            projections::graph::admin::drop_database(&home, http, &previous)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))
                .context("dropping the previous namespace")?;
        }
    }
    Ok(ReplaySummary {
        events,
        seconds,
        generation: database,
        previous: Some(previous),
        deleted_keys: deleted,
    })
}
