//! Prometheus metrics: one process-wide recorder (the `metrics` facade),
//! rendered as text at `/metrics` (the API's port, or
//! `NEURECTOMY_METRICS_LISTEN` for the relay and projector roles, see
//! [`serve`]). The README's "Metrics" section lists every series with its
//! type, labels and meaning. Series of the write and read side
//! (`neurectomy_append*`, `neurectomy_relay_*`, `neurectomy_projector_*`)
//! are recorded in `commands` and `projections` through the same facade.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Latency buckets, seconds: 100 µs to 10 s.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Batch-size buckets, events (`neurectomy_projector_batch_events`).
const EVENT_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
];

/// Installs the recorder once per process; returns its handle (`None` if
/// another recorder was installed first, e.g. by an embedding program).
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            // Without buckets a histogram is rendered as a summary.
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("neurectomy_projector_batch_events".to_owned()),
                        EVENT_BUCKETS,
                    )
                })
                .ok()?;
            match builder.install_recorder() {
                Ok(handle) => Some(handle),
                Err(error) => {
                    tracing::warn!(%error, "metrics recorder not installed; /metrics will be empty");
                    None
                }
            }
        })
        .as_ref()
}

/// Drains recorded histogram samples into their buckets (rendering does
/// too): run periodically ([`crate::telemetry::probes`]) so that memory stays bounded
/// when nothing scrapes. Nothing to do before [`install`].
pub fn upkeep() {
    if let Some(Some(handle)) = HANDLE.get() {
        handle.run_upkeep();
    }
}

/// The metrics as Prometheus text.
pub fn render() -> String {
    install().map(PrometheusHandle::render).unwrap_or_default()
}

/// Records one command.
pub fn command(command: &'static str, took: Duration, error_code: Option<&'static str>) {
    let outcome = error_code.unwrap_or("ok");
    metrics::counter!("neurectomy_commands_total", "command" => command, "outcome" => outcome)
        .increment(1);
    metrics::histogram!("neurectomy_command_seconds", "command" => command)
        .record(took.as_secs_f64());
}

/// Records one HTTP request.
pub fn http(route: &'static str, status: u16, took: Duration) {
    let (requests, seconds) = cached(&HTTP, (route, status), || {
        (
            metrics::counter!("neurectomy_http_requests_total", "route" => route, "status" => status.to_string()),
            metrics::histogram!("neurectomy_http_request_seconds", "route" => route),
        )
    });
    requests.increment(1);
    seconds.record(took.as_secs_f64());
}

type HttpHandles = (metrics::Counter, metrics::Histogram);

thread_local! {
    /// Handles of the per-request series, per worker thread: the macros
    /// build and look up a labelled key (and format the status) on every
    /// call, a visible share of a small request's CPU. Bounded by the
    /// routes, statuses and top-level fields of the schema.
    static HTTP: RefCell<HashMap<(&'static str, u16), HttpHandles>> = RefCell::default();
    static RESOLVERS: RefCell<HashMap<String, metrics::Histogram>> = RefCell::default();
}

/// The handles under `key`, registered by `register` the first time (and
/// not kept before [`install`]: the recorder would not be the one that
/// renders).
fn cached<K, V>(
    cache: &'static std::thread::LocalKey<RefCell<HashMap<K, V>>>,
    key: K,
    register: impl FnOnce() -> V,
) -> V
where
    K: std::hash::Hash + Eq,
    V: Clone,
{
    if !matches!(HANDLE.get(), Some(Some(_))) {
        return register();
    }
    cache.with_borrow_mut(|map| map.entry(key).or_insert_with(register).clone())
}

/// Records GraphQL errors by code.
pub fn graphql_errors<'a>(codes: impl IntoIterator<Item = &'a str>) {
    for code in codes {
        metrics::counter!("neurectomy_graphql_errors_total", "code" => code.to_owned())
            .increment(1);
    }
}

/// A WebSocket opened (+1) or closed (-1).
pub fn websocket(delta: f64) {
    metrics::gauge!("neurectomy_websocket_connections").increment(delta);
}

/// A subscription started (+1) or ended (-1).
pub fn subscription(delta: f64) {
    metrics::gauge!("neurectomy_subscriptions").increment(delta);
}

/// A subscription execution started (+1) or ended (-1); `shared` when
/// it serves every client holding the same subscription.
pub fn subscription_execution(shared: bool, delta: f64) {
    let shared = if shared { "true" } else { "false" };
    metrics::gauge!("neurectomy_subscription_executions", "shared" => shared).increment(delta);
}

/// An execution joined (+1) or left (-1) the change feed.
pub fn feed_subscriber(delta: f64) {
    metrics::gauge!("neurectomy_feed_subscribers").increment(delta);
}

/// A subscriber was cut off.
pub fn subscription_drop(reason: &'static str) {
    metrics::counter!("neurectomy_subscription_drops_total", "reason" => reason).increment(1);
}

/// A projection's checkpoint and lag, refreshed at scrape time.
/// A partition's projection is named `redis/p<k>`.
pub fn projection(name: &str, checkpoint: i64, lag: i64) {
    let name = name.to_owned();
    metrics::gauge!("neurectomy_projection_checkpoint", "projection" => name.clone())
        .set(checkpoint as f64);
    metrics::gauge!("neurectomy_projection_lag_events", "projection" => name).set(lag as f64);
}

/// Whether this process holds a projection's lease (1) or stands by (0).
pub fn projection_lease(name: &str, held: bool) {
    metrics::gauge!("neurectomy_projector_lease_held", "projection" => name.to_owned())
        .set(if held { 1.0 } else { 0.0 });
}

/// Change-feed entries read together, `took` after the read, were
/// published to the in-memory channels (`neurectomy_feed_fanout_seconds`,
/// one sample per entry).
pub fn feed_fanout(entries: usize, took: Duration) {
    if entries > 0 {
        metrics::histogram!("neurectomy_feed_fanout_seconds")
            .record_many(took.as_secs_f64(), entries);
    }
}

/// Whether a dependency answered its last probe (`neurectomy_dependency_up`).
pub fn dependency_up(dependency: &'static str, up: bool) {
    metrics::gauge!("neurectomy_dependency_up", "dependency" => dependency).set(if up {
        1.0
    } else {
        0.0
    });
}

/// Serves `/metrics` (and `/healthz`) on `listener` until `shutdown`: the
/// metrics endpoint of the roles without the API (`relay`, `project`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    use axum::routing::get;
    let router = axum::Router::new()
        .route(
            "/metrics",
            get(|| async {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    render(),
                )
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }));
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Records how long a top-level GraphQL field took to resolve
/// (`neurectomy_graphql_resolver_seconds`).
pub fn resolver(field: &str, took: Duration) {
    let registered = matches!(HANDLE.get(), Some(Some(_)));
    let cached = RESOLVERS.with_borrow(|map| map.get(field).cloned());
    let histogram = cached.unwrap_or_else(|| {
        let histogram =
            metrics::histogram!("neurectomy_graphql_resolver_seconds", "field" => field.to_owned());
        if registered {
            RESOLVERS.with_borrow_mut(|map| map.insert(field.to_owned(), histogram.clone()));
        }
        histogram
    });
    histogram.record(took.as_secs_f64());
}
