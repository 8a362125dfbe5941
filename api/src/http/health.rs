//! `/healthz` (the process answers), `/readyz` (its dependencies and
//! projections are ready, each checked within a short deadline) and
//! `/metrics` (Prometheus).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use super::state::AppState;

pub(crate) async fn healthz() -> &'static str {
    "ok\n"
}

pub(crate) async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    // Projection lag is computed at scrape time, each read within the
    // readiness timeout (a scrape never hangs on a dependency).
    let services = &state.services;
    let lag = |checkpoint| probe(READY_TIMEOUT, services.store.lag(checkpoint));
    if services.redis.config().partitions > 1 {
        let views = projections::redis::health::partition_views(&services.redis, &services.store);
        if let Ok(views) = probe(READY_TIMEOUT, views).await {
            for view in views {
                crate::telemetry::metrics::projection(&view.name, view.checkpoint, view.lag);
            }
        }
    } else if let Ok(checkpoint) = probe(READY_TIMEOUT, services.redis.read_checkpoint()).await {
        let lag = lag(checkpoint).await.map_or(-1, |lag| lag.events);
        crate::telemetry::metrics::projection("redis", checkpoint, lag);
    }
    if services.graph.config().partitions > 1 {
        let views = projections::redis::health::graph_partition_views(
            &services.graph,
            &services.redis,
            &services.store,
        );
        if let Ok(views) = probe(READY_TIMEOUT, views).await {
            for view in views {
                crate::telemetry::metrics::projection(&view.name, view.checkpoint, view.lag);
            }
        }
    } else if let Ok(checkpoint) = probe(READY_TIMEOUT, services.graph.read_checkpoint()).await {
        let lag = lag(checkpoint).await.map_or(-1, |lag| lag.events);
        crate::telemetry::metrics::projection("graph", checkpoint, lag);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::telemetry::metrics::render(),
    )
        .into_response()
}

/// How long `/readyz` waits for each dependency (all are asked at once, so
/// this bounds the whole answer).
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// `ok`, the error, or that it timed out.
async fn probe<T, E: std::fmt::Display>(
    timeout: Duration,
    check: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(timeout, check).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {} s", timeout.as_secs())),
    }
}

fn shown<T>(result: &Result<T, String>) -> String {
    match result {
        Ok(_) => "ok".to_owned(),
        Err(e) => e.clone(),
    }
}

/// Ready: every dependency answers, the Redis read model has its
/// checkpoint (unless the log is empty: a model that lost its data is being
/// rebuilt, and reads would answer from nothing), and every projection
/// reports `live` (a projector catching up, retrying or stopped means reads
/// are behind). Every check runs at once, each within [`READY_TIMEOUT`].
pub(crate) async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let services = &state.services;
    // A Redis model projected in partitions has a projector per partition.
    let names = projector_names(services.redis.config().partitions);
    let reports = async {
        let reports = futures::future::try_join_all(
            names
                .iter()
                .map(|name| projections::redis::health::projector_report(&services.redis, name)),
        )
        .await?;
        Ok::<_, redis::RedisError>(names.iter().cloned().zip(reports).collect::<Vec<_>>())
    };
    let (head, redis, graph, reports) = tokio::join!(
        probe(READY_TIMEOUT, services.store.head()),
        probe(READY_TIMEOUT, services.redis.checkpoint_if_any()),
        probe(READY_TIMEOUT, services.graph.read_checkpoint()),
        probe(READY_TIMEOUT, reports),
    );
    let nats = match state.nats.connection_state() {
        async_nats::connection::State::Connected => "ok".to_owned(),
        other => format!("{other:?}"),
    };
    let redis = match (&redis, &head) {
        (Ok(None), Ok(head)) if head.readable > 0 => Err(
            "the read model has no checkpoint (Redis lost its data?); the projector rebuilds it"
                .to_owned(),
        ),
        _ => redis,
    };
    let mut projections = serde_json::Map::new();
    let mut live = true;
    match &reports {
        Ok(reports) => {
            for (name, report) in reports {
                live &= report.state == "live";
                projections.insert(
                    name.clone(),
                    serde_json::Value::String(report.state.clone()),
                );
            }
        }
        Err(e) => {
            live = false;
            for name in &names {
                projections.insert(name.clone(), serde_json::Value::String(e.clone()));
            }
        }
    }
    let (postgres, redis, graph) = (shown(&head), shown(&redis), shown(&graph));
    let ready = [&postgres, &nats, &redis, &graph]
        .iter()
        .all(|s| *s == "ok")
        && live;
    let body = serde_json::json!({
        "ready": ready,
        "postgres": postgres,
        "nats": nats,
        "redis": redis,
        "graph": graph,
        "projections": projections,
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// The projectors whose reports `/readyz` reads: `redis` and `graph` (or
/// `redis/p<k>` and `graph/p<k>` per partition).
fn projector_names(partitions: u32) -> Vec<String> {
    ["redis", "graph"]
        .into_iter()
        .flat_map(|projection| {
            if partitions > 1 {
                (0..partitions)
                    .map(|k| format!("{projection}/p{k}"))
                    .collect()
            } else {
                vec![projection.to_owned()]
            }
        })
        .collect()
}
