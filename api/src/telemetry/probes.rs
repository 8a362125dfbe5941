//! Periodic probes behind the metrics: every [`PROBE_EVERY`], each
//! long-running role checks the dependencies it uses
//! (`neurectomy_dependency_up{dependency}`: 1 answered, 0 did not, within
//! [`PROBE_TIMEOUT`]), a projector process exports its projections'
//! checkpoint and lag, and the recorder drains its histogram samples (so
//! that memory stays bounded when nothing scrapes).
//!
//! The probes are cheap: `SELECT 1` on the pool, the NATS client's
//! connection state (it pings the server by itself), `PING` to Redis and a
//! one-row read of the graph's checkpoint.

use std::time::Duration;

use commands::EventStore;
use projections::{GraphModel, ProjectorStatus, RedisModel};
use sqlx::PgPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How often the probes run.
pub const PROBE_EVERY: Duration = Duration::from_secs(5);
/// How long a probe may take before its dependency counts as down.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What a process probes; `None`: a dependency it does not use.
#[derive(Clone, Default)]
pub struct Probes {
    /// The event store's pool.
    pub postgres: Option<PgPool>,
    /// The NATS client.
    pub nats: Option<async_nats::Client>,
    /// The Redis read model.
    pub redis: Option<RedisModel>,
    /// The graph read model.
    pub graph: Option<GraphModel>,
    /// Projectors running in this process, by name, whose checkpoint and
    /// lag to export (the API computes them at scrape time instead).
    pub projections: Vec<(String, watch::Receiver<ProjectorStatus>)>,
}

/// Runs `check` within [`PROBE_TIMEOUT`]: whether it succeeded.
async fn answered<T, E>(check: impl std::future::Future<Output = Result<T, E>>) -> bool {
    matches!(tokio::time::timeout(PROBE_TIMEOUT, check).await, Ok(Ok(_)))
}

impl Probes {
    /// Probes every dependency once (concurrently) and records the results.
    pub async fn probe(&self) {
        let postgres = async {
            match &self.postgres {
                Some(pool) => Some(answered(sqlx::query("SELECT 1").execute(pool)).await),
                None => None,
            }
        };
        let redis = async {
            match &self.redis {
                Some(model) => {
                    let mut conn = model.connection();
                    let ping = redis::cmd("PING");
                    Some(answered(ping.query_async::<String>(&mut conn)).await)
                }
                None => None,
            }
        };
        let graph = async {
            match &self.graph {
                Some(graph) => Some(answered(graph.read_checkpoint()).await),
                None => None,
            }
        };
        let (postgres, redis, graph) = tokio::join!(postgres, redis, graph);
        let nats = self
            .nats
            .as_ref()
            .map(|client| client.connection_state() == async_nats::connection::State::Connected);
        for (name, up) in [
            ("postgres", postgres),
            ("nats", nats),
            ("redis", redis),
            ("graph", graph),
        ] {
            if let Some(up) = up {
                crate::telemetry::metrics::dependency_up(name, up);
            }
        }
    }

    /// Exports the checkpoint and lag of this process's projectors (of the
    /// ones holding their lease), and which leases it holds.
    async fn projection_lag(&self) {
        let Some(pool) = &self.postgres else {
            return;
        };
        // Reads only: no group-commit task for a store that never appends.
        let store = EventStore::with_committers(pool.clone(), 0);
        for (name, status) in &self.projections {
            let (checkpoint, state, token, pending) = {
                let status = status.borrow();
                (
                    status.checkpoint,
                    status.state,
                    status.token,
                    status.pending,
                )
            };
            crate::telemetry::metrics::projection_lease(name, token.is_some());
            // The lease holder (another process) exports the lag.
            if state == projections::ProjectorState::Standby {
                continue;
            }
            // A live projector knows its lag from its consumer (exact per
            // partition); otherwise it is counted in the log past the
            // checkpoint.
            if let Some(pending) = pending.filter(|_| state == projections::ProjectorState::Live) {
                let lag = i64::try_from(pending).unwrap_or(i64::MAX);
                crate::telemetry::metrics::projection(name, checkpoint, lag);
            } else if let Ok(lag) = store.lag(checkpoint).await {
                crate::telemetry::metrics::projection(name, checkpoint, lag.events);
            }
        }
    }

    /// Probes now and every [`PROBE_EVERY`] until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            self.probe().await;
            self.projection_lag().await;
            crate::telemetry::metrics::upkeep();
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(PROBE_EVERY) => {}
            }
        }
    }
}
