//! Health: projectors publish their state to Redis (so an API process can
//! tell whether projections run elsewhere are stopped), and `/readyz`
//! checks every dependency.

use std::time::Duration;

use projections::{ProjectorState, ProjectorStatus, RedisModel};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How often a projector's state is re-published while unchanged.
const HEARTBEAT: Duration = Duration::from_secs(5);

/// A report older than this counts as no report.
const STALE_AFTER_MS: i64 = 30_000;

fn state_name(state: ProjectorState) -> &'static str {
    match state {
        ProjectorState::Starting => "starting",
        ProjectorState::CatchingUp => "catching_up",
        ProjectorState::Live => "live",
        ProjectorState::Retrying => "retrying",
        ProjectorState::Stopped => "stopped",
    }
}

fn report_key(model: &RedisModel, name: &str) -> String {
    format!("{}projector:{name}", model.prefix())
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// Publishes a projector's status to Redis on every change and every
/// [`HEARTBEAT`], until `shutdown`.
pub async fn publish_status(
    model: RedisModel,
    mut status: watch::Receiver<ProjectorStatus>,
    shutdown: CancellationToken,
) {
    loop {
        let current = status.borrow_and_update().clone();
        let mut conn = model.connection();
        let key = report_key(&model, &current.name);
        let written: Result<(), redis::RedisError> = redis::pipe()
            .atomic()
            .cmd("HSET")
            .arg(&key)
            .arg("state")
            .arg(state_name(current.state))
            .arg("checkpoint")
            .arg(current.checkpoint)
            .arg("last_error")
            .arg(current.last_error.as_deref().unwrap_or(""))
            .arg("at_ms")
            .arg(now_ms())
            .ignore()
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(STALE_AFTER_MS * 2)
            .ignore()
            .query_async(&mut conn)
            .await;
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
    /// Its state, or `unknown` without a recent report.
    pub state: String,
    /// Its last error.
    pub last_error: Option<String>,
}

/// Reads what the projector of `name` last published.
pub async fn projector_report(model: &RedisModel, name: &str) -> Result<Report, redis::RedisError> {
    let mut conn = model.connection();
    let (state, last_error, at_ms): (Option<String>, Option<String>, Option<i64>) =
        redis::cmd("HMGET")
            .arg(report_key(model, name))
            .arg("state")
            .arg("last_error")
            .arg("at_ms")
            .query_async(&mut conn)
            .await?;
    let fresh = at_ms.is_some_and(|at| now_ms() - at <= STALE_AFTER_MS);
    Ok(Report {
        state: match state {
            Some(state) if fresh => state,
            _ => "unknown".to_owned(),
        },
        last_error: last_error.filter(|e| !e.is_empty()),
    })
}
