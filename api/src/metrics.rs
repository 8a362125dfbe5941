//! Prometheus metrics: one process-wide recorder (the `metrics` facade),
//! rendered as text at `/metrics`.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `neurectomy_http_requests_total` | counter | route, status |
//! | `neurectomy_http_request_seconds` | histogram | route |
//! | `neurectomy_graphql_resolver_seconds` | histogram | field (top-level fields) |
//! | `neurectomy_graphql_errors_total` | counter | code |
//! | `neurectomy_commands_total` | counter | command, outcome (`ok` or an error code) |
//! | `neurectomy_command_seconds` | histogram | command |
//! | `neurectomy_websocket_connections` | gauge | |
//! | `neurectomy_subscriptions` | gauge | | (clients' subscriptions)
//! | `neurectomy_subscription_executions` | gauge | shared (`true`: one execution serves every client with the same subscription) |
//! | `neurectomy_feed_subscribers` | gauge | | (executions reading the change feed)
//! | `neurectomy_subscription_drops_total` | counter | reason |
//! | `neurectomy_otlp_dropped_spans_total` | counter | | (spans not exported: queue full or export failed; see `crate::telemetry`)
//! | `neurectomy_projection_checkpoint` | gauge | projection |
//! | `neurectomy_projection_lag_events` | gauge | projection |

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Latency buckets, seconds: 100 µs to 10 s.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Installs the recorder once per process; returns its handle (`None` if
/// another recorder was installed first, e.g. by an embedding program).
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), BUCKETS)
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
    metrics::counter!("neurectomy_http_requests_total", "route" => route, "status" => status.to_string())
        .increment(1);
    metrics::histogram!("neurectomy_http_request_seconds", "route" => route)
        .record(took.as_secs_f64());
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
pub fn projection(name: &'static str, checkpoint: i64, lag: i64) {
    metrics::gauge!("neurectomy_projection_checkpoint", "projection" => name)
        .set(checkpoint as f64);
    metrics::gauge!("neurectomy_projection_lag_events", "projection" => name).set(lag as f64);
}

/// Times top-level GraphQL fields (`neurectomy_graphql_resolver_seconds`).
pub struct ResolverTiming;

impl async_graphql::extensions::ExtensionFactory for ResolverTiming {
    fn create(&self) -> std::sync::Arc<dyn async_graphql::extensions::Extension> {
        std::sync::Arc::new(ResolverTimingExtension)
    }
}

struct ResolverTimingExtension;

#[async_graphql::async_trait::async_trait]
impl async_graphql::extensions::Extension for ResolverTimingExtension {
    async fn resolve(
        &self,
        ctx: &async_graphql::extensions::ExtensionContext<'_>,
        info: async_graphql::extensions::ResolveInfo<'_>,
        next: async_graphql::extensions::NextResolve<'_>,
    ) -> async_graphql::ServerResult<Option<async_graphql::Value>> {
        // Top-level fields only: nested fields are plain struct reads.
        if info.path_node.parent.is_some() {
            return next.run(ctx, info).await;
        }
        let field = info.name.to_owned();
        let started = std::time::Instant::now();
        let result = next.run(ctx, info).await;
        metrics::histogram!("neurectomy_graphql_resolver_seconds", "field" => field)
            .record(started.elapsed().as_secs_f64());
        result
    }
}
