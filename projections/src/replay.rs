//! Rebuilding a read model from the event store into a fresh namespace
//! while the active one keeps serving, then switching over (`neurectomy
//! replay`).
//!
//! - **Redis** ([`replay_redis_into`]): the new generation is written under
//!   its own key namespace; when it has caught up with the log, the
//!   `active` pointer is switched with one `SET`, so readers move
//!   atomically. The old generation is deleted afterwards.
//! - **Graph** ([`replay_graph_into`]): the new database is created on the
//!   graph server (Neo4j Enterprise's `CREATE DATABASE`, or ArcadeDB's HTTP
//!   API); when it has caught up, the pointer node in the home database is
//!   switched with one write. The previous database is dropped, or emptied
//!   when it is the home database. A replay that fails before the switch
//!   drops the database it was building.
//!
//! Contracts:
//! - The new namespace is built by the projector's own catch-up
//!   ([`Projector::catch_up`]: read-ahead, decoding, retries) up to the
//!   log's readable head. Nothing reads it before the switch.
//! - A live projector (in any process) notices the switch at its next batch
//!   ([`ApplyError::Moved`]) and continues on the new namespace from its
//!   checkpoint, so events committed during the replay are not lost; the
//!   old namespace is removed only after [`SWITCH_GRACE`], for a batch it
//!   may still be finishing there.
//! - Progress is reported through a callback ([`Progress`]); showing it is
//!   the caller's.

use std::time::{Duration, Instant};

use commands::EventStore;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::graph::{admin, GraphConfig, GraphModel};
use crate::model::{ApplyError, ReadModel};
use crate::redis::{RedisModel, RedisModelConfig};
use crate::runtime::{Projector, ProjectorConfig, ProjectorError};

/// How long the old namespace is kept after the switch: a live projector
/// may still be finishing a batch on it.
pub const SWITCH_GRACE: Duration = Duration::from_secs(2);

/// What a replay did.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplaySummary {
    /// Events applied.
    pub events: u64,
    /// Seconds taken (before the old generation was deleted).
    pub seconds: f64,
    /// The new, now active generation (Redis) or database (graph).
    pub generation: String,
    /// The generation that was active before.
    pub previous: Option<String>,
    /// Keys (Redis) or nodes (graph, when the home database was emptied) of
    /// the previous namespace deleted.
    pub deleted_keys: u64,
}

/// What a replay reports while it runs, in this order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// The catch-up into the new namespace starts.
    Started {
        /// Events in the log as it starts (more may be committed meanwhile).
        total: u64,
        /// The namespace being built: a Redis generation, a graph database.
        namespace: String,
        /// The namespace serving until the switch.
        active: String,
    },
    /// Events applied so far (may pass `total`).
    Applied(u64),
    /// Caught up with the log; the switch follows.
    CaughtUp {
        /// Events applied.
        applied: u64,
    },
}

/// Why a replay failed. Each variant names the step (`doing`) as the
/// operator would look for it.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// Reading the event store failed.
    #[error("counting events")]
    Store(#[source] commands::ReadError),
    /// A read model could not be connected.
    #[error("{doing}")]
    Connect {
        /// The step.
        doing: &'static str,
        /// The cause.
        #[source]
        source: ApplyError,
    },
    /// Redis failed while switching generations or deleting one.
    #[error("{doing}")]
    Redis {
        /// The step.
        doing: &'static str,
        /// The cause.
        #[source]
        source: redis::RedisError,
    },
    /// The graph failed while resolving, switching or emptying a database.
    #[error("{doing}")]
    Graph {
        /// The step.
        doing: &'static str,
        /// The cause.
        #[source]
        source: neo4rs::Error,
    },
    /// The graph server cannot create or drop a database (Neo4j Community
    /// has a single one).
    #[error("{doing}: {reason}")]
    Namespace {
        /// The step.
        doing: &'static str,
        /// What the server (over Bolt and over HTTP) said.
        reason: String,
    },
    /// The catch-up stopped: an event cannot be applied, or the event store
    /// failed for good.
    #[error("replaying the event store")]
    CatchUp(#[source] ProjectorError),
}

/// A fresh namespace id: `g` and 12 hex digits.
fn fresh_id() -> String {
    format!("g{}", &Uuid::new_v4().simple().to_string()[..12])
}

/// Rebuilds the Redis read model (prefix and timeouts of `config`, on the
/// Redis at `redis_url`) into a fresh generation from `store`, in batches
/// of `batch_size`, activates it, and deletes the previous one.
pub async fn replay_redis_into(
    store: &EventStore,
    nats: &async_nats::Client,
    redis_url: &str,
    config: RedisModelConfig,
    batch_size: usize,
    mut progress: impl FnMut(Progress) + Send,
) -> Result<ReplaySummary, ReplayError> {
    let connect = |doing: &'static str| move |source| ReplayError::Connect { doing, source };
    let failed = |doing: &'static str| move |source| ReplayError::Redis { doing, source };
    let active = RedisModel::connect(redis_url, config.clone())
        .await
        .map_err(connect("connecting to Redis"))?;
    let old = active.generation();
    let generation = fresh_id();
    let target = RedisModel::connect_generation(redis_url, config, &generation)
        .await
        .map_err(connect("connecting to Redis for the new generation"))?;

    let started = Instant::now();
    // A model projected in partitions is rebuilt a partition per task, each
    // ending at its partition's last event: the checkpoint its live
    // projector continues from once the generation is active.
    let applied = catch_up(
        store,
        nats,
        split(
            &target,
            (target.config().partitions, batch_size),
            RedisModel::for_partition,
        ),
        (generation.clone(), old),
        &mut progress,
    )
    .await?;

    let previous = target
        .activate()
        .await
        .map_err(failed("switching the active generation"))?;
    let seconds = started.elapsed().as_secs_f64();
    let mut deleted_keys = 0;
    if let Some(previous) = previous.as_ref().filter(|p| **p != generation) {
        tokio::time::sleep(SWITCH_GRACE).await;
        deleted_keys = target
            .drop_generation(previous)
            .await
            .map_err(failed("deleting the old generation"))?;
    }
    Ok(ReplaySummary {
        events: applied,
        seconds,
        generation,
        previous,
        deleted_keys,
    })
}

/// What rebuilds `target`: itself, or, when it is projected in
/// `partitions` partitions, one model per partition (`for_partition`), each
/// with its projector's configuration, ending at its partition's last
/// event — the checkpoint its live projector continues from once the
/// rebuilt namespace is active.
fn split<M: Clone>(
    target: &M,
    (partitions, batch_size): (u32, usize),
    for_partition: fn(&M, u32) -> M,
) -> Vec<(M, ProjectorConfig)> {
    if partitions <= 1 {
        let config = ProjectorConfig {
            batch_size,
            ..ProjectorConfig::default()
        };
        return vec![(target.clone(), config)];
    }
    (0..partitions)
        .map(|partition| {
            let config = ProjectorConfig {
                batch_size,
                partitions,
                partition,
                ..ProjectorConfig::default()
            };
            (for_partition(target, partition), config)
        })
        .collect()
}

/// Runs the projector's own catch-up (read-ahead, decoding, retries) on
/// each of `targets` (a model and its projector's configuration: the whole
/// log, or one partition each, side by side) up to the head of the log,
/// reporting their status as [`Progress`]; `namespaces` are the one built
/// and the one serving. Returns the events applied.
async fn catch_up<M: ReadModel + Send + Sync + 'static, P: FnMut(Progress) + Send>(
    store: &EventStore,
    nats: &async_nats::Client,
    targets: Vec<(M, ProjectorConfig)>,
    (namespace, active): (String, String),
    progress: &mut P,
) -> Result<u64, ReplayError> {
    // For progress reports only: an estimate beyond 10,000 events (an
    // exact count of a large log takes seconds).
    let total = store.lag(0).await.map_err(ReplayError::Store)?.events;
    progress(Progress::Started {
        total: u64::try_from(total).unwrap_or(0),
        namespace,
        active,
    });
    let projectors: Vec<_> = targets
        .into_iter()
        .map(|(target, config)| {
            std::sync::Arc::new(Projector::new(target, store.clone(), nats.clone(), config))
        })
        .collect();
    let applied = || -> u64 { projectors.iter().map(|p| p.status().borrow().applied).sum() };
    // Each on a task of its own: partitions are rebuilt on every core.
    let mut running = tokio::task::JoinSet::new();
    for projector in &projectors {
        let projector = projector.clone();
        running.spawn(async move { projector.catch_up(&CancellationToken::new()).await });
    }
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    let mut reached = Vec::new();
    loop {
        tokio::select! {
            done = running.join_next() => match done {
                None => break,
                Some(Ok(result)) => reached.push(result.map_err(ReplayError::CatchUp)?),
                Some(Err(error)) => {
                    return Err(ReplayError::CatchUp(ProjectorError::Interrupted {
                        name: "replay".to_owned(),
                        reason: format!("a catch-up task failed: {error}"),
                    }))
                }
            },
            _ = tick.tick() => progress(Progress::Applied(applied())),
        }
    }
    let applied = applied();
    tracing::debug!(?reached, applied, "replay caught up");
    progress(Progress::CaughtUp { applied });
    Ok(applied)
}

/// How often a replay reports its progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// Rebuilds the graph read model (`config`) into a fresh database from
/// `store`, in batches of `batch_size`, points the home database at it,
/// and drops (or empties) the previous one. `http` is ArcadeDB's HTTP API
/// (`host:port`), used when the server does not take Neo4j's
/// `CREATE DATABASE`.
pub async fn replay_graph_into(
    store: &EventStore,
    nats: &async_nats::Client,
    config: GraphConfig,
    http: &str,
    batch_size: usize,
    mut progress: impl FnMut(Progress) + Send,
) -> Result<ReplaySummary, ReplayError> {
    let failed = |doing: &'static str| move |source| ReplayError::Graph { doing, source };
    let home = GraphModel::connect(config.clone())
        .await
        .map_err(|source| ReplayError::Connect {
            doing: "connecting to the graph",
            source,
        })?;
    let old = home
        .database(Duration::ZERO)
        .await
        .map_err(failed("resolving the graph's active database"))?;
    let database = format!("{}-{}", home.home_database(), fresh_id());
    admin::create_database(&home, http, &database)
        .await
        .map_err(|reason| ReplayError::Namespace {
            doing: "creating the replay's database (Neo4j Community has a single database: \
                    rebuild in place instead by stopping the graph projector, deleting the graph's nodes \
                    and starting it again)",
            reason,
        })?;
    let built = async {
        let target = GraphModel::connect_database(config.clone(), &database)
            .await
            .map_err(|source| ReplayError::Connect {
                doing: "connecting to the replay's database",
                source,
            })?;
        let started = Instant::now();
        let applied = catch_up(
            store,
            nats,
            split(
                &target,
                (target.config().partitions, batch_size),
                GraphModel::for_partition,
            ),
            (database.clone(), old),
            &mut progress,
        )
        .await?;
        let previous = target
            .activate()
            .await
            .map_err(failed("switching the graph's active database"))?;
        Ok::<_, ReplayError>((applied, started.elapsed().as_secs_f64(), previous))
    }
    .await;
    let (events, seconds, previous) = match built {
        Ok(built) => built,
        Err(e) => {
            // Nothing points at the new database yet: drop it.
            if let Err(drop_error) = admin::drop_database(&home, http, &database).await {
                tracing::warn!(%drop_error, %database, "could not drop the abandoned replay database");
            }
            return Err(e);
        }
    };
    let mut deleted = 0;
    if previous != database {
        tokio::time::sleep(SWITCH_GRACE).await;
        if previous == home.home_database() {
            deleted = home.clear_database(&previous).await.map_err(failed(
                "emptying the previous namespace (the home database)",
            ))?;
        } else {
            admin::drop_database(&home, http, &previous)
                .await
                .map_err(|reason| ReplayError::Namespace {
                    doing: "dropping the previous namespace",
                    reason,
                })?;
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
