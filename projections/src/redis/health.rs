//! Projector health reports: each projector publishes its state to Redis,
//! so that an API process can tell whether projections run elsewhere (a
//! `neurectomy project` process) are live, catching up or stopped
//! (`/readyz`, `projectionStatus`).
//!
//! A report is the hash `P` + `projector:<name>` (outside any generation:
//! it describes the projector, not the data), with fields `state`,
//! `checkpoint`, `last_error`, `owner`, `pending` (while live) and `at_ms` (when it was written, in
//! milliseconds since the Unix epoch). It is written on every change and
//! every [`HEARTBEAT`], and expires after twice [`STALE_AFTER`], so a
//! projector that died leaves no report behind for long; a report older
//! than [`STALE_AFTER`] reads as `unknown`.

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::RedisModel;
use crate::runtime::{ProjectorState, ProjectorStatus};

/// How often a projector's state is re-published while unchanged.
pub const HEARTBEAT: Duration = Duration::from_secs(5);

/// A report older than this counts as no report.
pub const STALE_AFTER: Duration = Duration::from_secs(30);

/// What the key of a report starts with, after the prefix.
pub const REPORT_KEY: &str = "projector:";

/// The name of a state in a report.
fn state_name(state: ProjectorState) -> &'static str {
    match state {
        ProjectorState::Starting => "starting",
        ProjectorState::Standby => "standby",
        ProjectorState::CatchingUp => "catching_up",
        ProjectorState::Live => "live",
        ProjectorState::Retrying => "retrying",
        ProjectorState::Stopped => "stopped",
    }
}

/// The key of the report of the projector `name`.
fn report_key(model: &RedisModel, name: &str) -> String {
    format!("{}{REPORT_KEY}{name}", model.prefix())
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as i64)
}

/// Publishes a projector's status to Redis on every change and every
/// [`HEARTBEAT`], until `shutdown` (or until the projector is gone). A
/// failed write is logged at debug and retried at the next one: a report
/// that stops arriving reads as `unknown`, which is what it then is. A
/// projector standing by publishes nothing: the report is the lease
/// holder's (with its `owner`).
pub async fn publish_status(
    model: RedisModel,
    mut status: watch::Receiver<ProjectorStatus>,
    shutdown: CancellationToken,
) {
    let stale_ms = STALE_AFTER.as_millis() as i64;
    loop {
        let current = status.borrow_and_update().clone();
        let mut conn = model.connection();
        let key = report_key(&model, &current.name);
        let written: Result<(), redis::RedisError> = if current.state == ProjectorState::Standby {
            Ok(())
        } else {
            redis::pipe()
                .atomic()
                .cmd("HSET")
                .arg(&key)
                .arg("state")
                .arg(state_name(current.state))
                .arg("checkpoint")
                .arg(current.checkpoint)
                .arg("last_error")
                .arg(current.last_error.as_deref().unwrap_or(""))
                .arg("owner")
                .arg(current.owner.as_deref().unwrap_or(""))
                .arg("pending")
                .arg(current.pending.map(|p| p.to_string()).unwrap_or_default())
                .arg("at_ms")
                .arg(now_ms())
                .ignore()
                .cmd("PEXPIRE")
                .arg(&key)
                .arg(stale_ms * 2)
                .ignore()
                .query_async(&mut conn)
                .await
        };
        if let Err(error) = written {
            tracing::debug!(%error, "could not publish the projector's status");
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = status.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(HEARTBEAT) => {}
        }
    }
}

/// What a projector last reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Its state (`starting`, `catching_up`, `live`, `retrying`,
    /// `stopped`), or `unknown` without a recent report.
    pub state: String,
    /// Its last error.
    pub last_error: Option<String>,
    /// The process that reported, when it runs under a lease: the lease
    /// holder, the one applying the projection (`host:pid:suffix`).
    pub owner: Option<String>,
    /// The messages its JetStream consumer still had to deliver after its
    /// last batch, while it is live (see `ProjectorStatus::pending`).
    pub pending: Option<u64>,
}

/// Reads what the projector of `name` last published.
pub async fn projector_report(model: &RedisModel, name: &str) -> Result<Report, redis::RedisError> {
    let mut conn = model.connection();
    type Fields = (
        Option<String>,
        Option<String>,
        Option<i64>,
        Option<String>,
        Option<String>,
    );
    let (state, last_error, at_ms, owner, pending): Fields = redis::cmd("HMGET")
        .arg(report_key(model, name))
        .arg("state")
        .arg("last_error")
        .arg("at_ms")
        .arg("owner")
        .arg("pending")
        .query_async(&mut conn)
        .await?;
    let fresh = at_ms.is_some_and(|at| now_ms() - at <= STALE_AFTER.as_millis() as i64);
    Ok(Report {
        state: match state {
            Some(state) if fresh => state,
            _ => "unknown".to_owned(),
        },
        last_error: last_error.filter(|e| !e.is_empty()),
        owner: owner.filter(|o| fresh && !o.is_empty()),
        pending: pending.filter(|_| fresh).and_then(|p| p.parse().ok()),
    })
}

/// Why the partitions of a model could not be looked at.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    /// Redis failed.
    #[error("reading the partitions' checkpoints and reports from Redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The event store failed.
    #[error("measuring a partition's lag in the event store: {0}")]
    Store(#[from] commands::ReadError),
    /// The graph failed.
    #[error("reading the partitions' checkpoints from the graph: {0}")]
    Graph(#[from] neo4rs::Error),
}

/// One partition of a model projected in partitions, as an operator sees
/// it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionView {
    /// The partition.
    pub partition: u32,
    /// Its projector's name (`redis/p<k>`, `graph/p<k>`).
    pub name: String,
    /// The position of the partition's last event applied (0: none).
    pub checkpoint: i64,
    /// Events of the partition not applied yet: while its projector is live,
    /// the messages its JetStream consumer still had to deliver (exact for
    /// what the relay published); otherwise every event of the log past the
    /// checkpoint, an upper bound (`lag_exact` false).
    pub lag: i64,
    /// Whether `lag` is exact.
    pub lag_exact: bool,
    /// Its projector's last report.
    pub report: Report,
}

/// Every partition of `model` (`RedisModelConfig::partitions` of them):
/// checkpoint, lag and report, without scanning the log (one `MGET`, one
/// `HMGET` per partition and, for a partition whose projector is not live,
/// one bounded count).
pub async fn partition_views(
    model: &RedisModel,
    store: &commands::EventStore,
) -> Result<Vec<PartitionView>, ViewError> {
    let checkpoints = model.partition_checkpoints().await?;
    views("redis", checkpoints, model, store).await
}

/// Every partition of the graph model `graph` (`GraphConfig::partitions` of
/// them), as [`partition_views`]: the checkpoints in one graph query, the
/// reports from `reports` (where projectors publish them).
pub async fn graph_partition_views(
    graph: &crate::GraphModel,
    reports: &RedisModel,
    store: &commands::EventStore,
) -> Result<Vec<PartitionView>, ViewError> {
    let checkpoints = graph.partition_checkpoints().await?;
    views(crate::graph::PROJECTION, checkpoints, reports, store).await
}

/// The views of projection `projection`'s partitions at `checkpoints`
/// (partition `k`'s at index `k`), with the reports in `reports`.
async fn views(
    projection: &str,
    checkpoints: Vec<Option<i64>>,
    reports: &RedisModel,
    store: &commands::EventStore,
) -> Result<Vec<PartitionView>, ViewError> {
    let mut views = Vec::with_capacity(checkpoints.len());
    for (k, checkpoint) in (0u32..).zip(checkpoints) {
        let name = format!("{projection}/p{k}");
        let report = projector_report(reports, &name).await?;
        let checkpoint = checkpoint.unwrap_or(0);
        let (lag, lag_exact) = match report.pending {
            Some(pending) if report.state == "live" => {
                (i64::try_from(pending).unwrap_or(i64::MAX), true)
            }
            _ => (store.lag(checkpoint).await?.events, false),
        };
        views.push(PartitionView {
            partition: k,
            name,
            checkpoint,
            lag,
            lag_exact,
            report,
        });
    }
    Ok(views)
}
