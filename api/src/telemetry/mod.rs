//! Telemetry, set up once in `main`: logs on stderr and spans to
//! OpenTelemetry.
//!
//! - **Logs**: pretty text or JSON lines (`NEURECTOMY_LOG_FORMAT`), filtered
//!   by `NEURECTOMY_LOG`. A line written inside a traced span carries its
//!   trace and span ids: `trace_id` and `span_id` fields in JSON, a
//!   `[<trace id> <span id>]` prefix in text.
//! - **Spans**: `tracing` spans of this workspace at `INFO` or above become
//!   OpenTelemetry spans (`tracing-opentelemetry`), whatever the log filter
//!   says, so that trace context exists and propagates (W3C `traceparent`
//!   in event metadata, NATS headers and the change feed; see
//!   [`commands::trace`]) in every process.
//! - **Export**: OTLP, configured by the standard variables
//!   (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
//!   `OTEL_EXPORTER_OTLP_PROTOCOL` `http/protobuf` or `grpc`,
//!   `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT`,
//!   `OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER`, `OTEL_BSP_*`), off when no
//!   endpoint is set (or `OTEL_SDK_DISABLED=true`). Off, spans are not
//!   sampled unless the caller's context says so, and nothing is recorded.
//!
//! Export never slows request handling: finished spans go into a bounded
//! queue ([`OtlpConfig::queue`]) without waiting, and a thread of its own
//! (with its own single-threaded runtime) exports them in batches. When the
//! queue is full, or an export fails or times out, the spans are dropped
//! and counted in `neurectomy_otlp_dropped_spans_total`. (The SDK's batch
//! processor counts its drops only in its own logs, hence this processor.)
//!
//! Spans that live as long as a task (`relay`, `projector`) stay in the
//! logs but out of traces: every batch under them would join one endless
//! trace. Their batches start traces of their own.
//!
//! ## Layout
//!
//! - this module: [`init`]/[`install`] (the subscriber and its layers),
//!   which spans are traced, and the GraphQL operation's span.
//! - `export`: [`OtlpConfig`] (from the `OTEL_*` variables) and the bounded
//!   export queue with its thread.
//! - `logs`: the log line formats with trace and span ids.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::OTelSdkError;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing::{Level, Metadata};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

use crate::settings::{LogFormat, LogSettings};

mod export;
mod logs;
pub mod metrics;
pub mod probes;

use export::{ExportQueue, DEFAULT_SERVICE_NAME};
pub use export::{OtlpConfig, OtlpProtocol, DROPPED_SPANS};
use logs::WithTraceIds;

/// Spans that last as long as a task: logs only, never traced.
const TASK_SPANS: &[&str] = &["relay", "projector"];

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// A global subscriber was installed before.
    #[error("a tracing subscriber is already installed")]
    AlreadyInstalled(#[source] tracing_subscriber::util::TryInitError),
    /// The exporter's thread or runtime could not start.
    #[error("cannot start the OTLP export thread")]
    Thread(#[source] std::io::Error),
    /// The OTLP exporter rejected its configuration.
    #[error("cannot configure the OTLP exporter")]
    Exporter(#[source] opentelemetry_otlp::ExporterBuildError),
    /// Flushing did not complete.
    #[error("flushing spans failed")]
    Flush(#[source] OTelSdkError),
}

/// The installed telemetry: flush it before the process exits.
#[derive(Debug)]
pub struct Telemetry {
    /// The tracer provider of the span layer (flushed and shut down here).
    provider: SdkTracerProvider,
    /// The export queue's drop count, when exporting.
    dropped: Option<Arc<AtomicU64>>,
}

impl Telemetry {
    /// Exports every span finished so far (waits at most the export
    /// timeout, plus a second).
    pub fn flush(&self) -> Result<(), TelemetryError> {
        self.provider.force_flush().map_err(TelemetryError::Flush)
    }

    /// Spans dropped so far (queue full, export failed): the value of
    /// `neurectomy_otlp_dropped_spans_total` for this process.
    pub fn dropped_spans(&self) -> u64 {
        self.dropped
            .as_ref()
            .map_or(0, |d| d.load(Ordering::Relaxed))
    }

    /// Exports what is left and stops exporting (at process exit), within
    /// 3 s: an unresponsive collector must not hold the process past its
    /// grace period.
    pub fn shutdown(&self) {
        if let Err(error) = self.provider.shutdown_with_timeout(Duration::from_secs(3)) {
            // The subscriber may be gone by now.
            eprintln!("warning: exporting the last spans failed: {error}");
        }
    }
}

/// Installs the global subscriber from `settings` and the standard `OTEL_*`
/// variables. Problems are reported, not fatal: without export (or with
/// logs only) the process still runs.
pub fn init(settings: &LogSettings) -> Option<Telemetry> {
    let (otlp, warnings) = OtlpConfig::from_settings(&settings.otel);
    let endpoint = otlp.as_ref().map(|c| (c.endpoint.clone(), c.protocol));
    let installed = match install(settings, otlp) {
        Ok(telemetry) => Some(telemetry),
        Err(TelemetryError::AlreadyInstalled(error)) => {
            eprintln!("warning: tracing already initialised: {error}");
            return None;
        }
        Err(error) => {
            eprintln!(
                "warning: {} ({}); spans are not exported",
                error,
                std::error::Error::source(&error).map_or(String::new(), |s| s.to_string())
            );
            install(settings, None).ok()
        }
    };
    for warning in warnings {
        tracing::warn!("{warning}");
    }
    if let (Some(_), Some((endpoint, protocol))) = (&installed, endpoint) {
        tracing::debug!(?endpoint, ?protocol, "exporting spans over OTLP");
    }
    installed
}

/// Installs the global subscriber: the log layer from `log`, the span
/// layer, and export per `otlp` (`None`: no export).
pub fn install(log: &LogSettings, otlp: Option<OtlpConfig>) -> Result<Telemetry, TelemetryError> {
    let service = otlp.as_ref().map_or_else(
        || {
            log.otel
                .get("OTEL_SERVICE_NAME")
                .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_owned())
        },
        |c| c.service_name.clone(),
    );
    let resource = Resource::builder().with_service_name(service).build();
    let mut provider = SdkTracerProvider::builder().with_resource(resource.clone());
    let mut dropped = None;
    match otlp {
        Some(config) => {
            let queue = ExportQueue::start(config, resource)?;
            dropped = Some(queue.dropped.clone());
            provider = provider.with_span_processor(queue);
        }
        // Nothing is recorded: a root span is not sampled, but has ids (for
        // the logs and the `traceparent`s it passes on), and a caller's
        // sampled context is still followed, for processes that export.
        None => {
            provider = provider.with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOff)))
        }
    }
    let provider = provider.build();
    let spans = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("neurectomy"))
        .with_threads(false)
        // No `busy_ns`/`idle_ns` attributes: they cost two clock reads on
        // every enter and exit of every span (each poll of an instrumented
        // future), a few percent of a small request's CPU; span durations
        // are in the trace anyway.
        .with_tracked_inactivity(false)
        // The layer's max level (INFO) must be a hint of both halves: an
        // `and` with a filter that gives none has none, the process's max
        // level becomes TRACE, and every dependency's `log::trace!` (the
        // WebSocket codec's, per frame) goes through the `log` bridge into
        // the dispatcher before being dropped — half the CPU of a
        // delivered subscription message. With the hint, the `log` macros
        // and callsites below the level stop at a load and a compare.
        .with_filter(tracing_subscriber::filter::FilterExt::and(
            tracing_subscriber::filter::LevelFilter::INFO,
            tracing_subscriber::filter::filter_fn(traced)
                .with_max_level_hint(tracing_subscriber::filter::LevelFilter::INFO),
        ));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (json, text) = match log.format {
        LogFormat::Json => (
            Some(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr)
                    .event_format(WithTraceIds::json(
                        tracing_subscriber::fmt::format()
                            .json()
                            .with_current_span(true),
                    ))
                    .with_filter(log_filter(log)),
            ),
            None,
        ),
        LogFormat::Pretty => (
            None,
            Some(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(ansi)
                    .event_format(WithTraceIds::text(
                        tracing_subscriber::fmt::format().compact(),
                    ))
                    .with_filter(log_filter(log)),
            ),
        ),
    };
    let result = tracing_subscriber::registry()
        .with(spans)
        .with(json)
        .with(text)
        .try_init();
    if let Err(error) = result {
        let _ = provider.shutdown();
        return Err(TelemetryError::AlreadyInstalled(error));
    }
    // Per-event spans only where they are exported.
    commands::trace::set_recording(dropped.is_some());
    Ok(Telemetry { provider, dropped })
}

/// The log filter of `NEURECTOMY_LOG` (`info` if it does not parse).
fn log_filter(log: &LogSettings) -> EnvFilter {
    EnvFilter::try_new(&log.filter).unwrap_or_else(|error| {
        eprintln!(
            "warning: NEURECTOMY_LOG `{}` is not a valid filter ({error}); using `info`",
            log.filter
        );
        EnvFilter::new("info")
    })
}

/// What becomes an OpenTelemetry span (or span event): this workspace's
/// spans at `INFO` and above, except task-long ones; warnings and errors.
fn traced(metadata: &Metadata<'_>) -> bool {
    if metadata.is_span() {
        *metadata.level() <= Level::INFO
            && metadata.target().starts_with("neurectomy")
            && !TASK_SPANS.contains(&metadata.name())
    } else {
        *metadata.level() <= Level::WARN
    }
}

/// The span of one GraphQL request over HTTP: a child of the caller's
/// `traceparent` when it sent a valid one.
pub fn operation_span(
    traceparent: Option<&str>,
    request: &async_graphql::BatchRequest,
) -> tracing::Span {
    // At INFO where spans are exported; elsewhere at DEBUG, as a command's
    // span (`commands::handler`): creating, entering, leaving and closing
    // it in the registry was ~5 % of an `agent(id)` request's CPU, for a
    // span recorded nowhere. The caller's `traceparent` still reaches the
    // events a mutation appends (through `RequestMeta`).
    let span = if commands::trace::recording() {
        tracing::info_span!(
            "graphql.operation",
            "otel.kind" = "server",
            "graphql.operation.name" = tracing::field::Empty,
        )
    } else {
        tracing::debug_span!(
            "graphql.operation",
            "otel.kind" = "server",
            "graphql.operation.name" = tracing::field::Empty,
        )
    };
    if let async_graphql::BatchRequest::Single(r) = request {
        if let Some(name) = &r.operation_name {
            span.record("graphql.operation.name", name.as_str());
        }
    }
    if let Some(traceparent) = traceparent {
        commands::trace::continue_from(&span, traceparent);
    }
    span
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn task_long_and_foreign_spans_are_not_traced() {
        let metadata = |span: tracing::Span| span.metadata().map(|m| (m.name(), traced(m)));
        let _guard = tracing::subscriber::set_default(tracing_subscriber::registry());
        assert_eq!(
            metadata(tracing::info_span!("command")),
            Some(("command", true))
        );
        assert_eq!(
            metadata(tracing::info_span!("relay")),
            Some(("relay", false))
        );
        assert_eq!(
            metadata(tracing::debug_span!("detail")),
            Some(("detail", false))
        );
        assert_eq!(
            metadata(tracing::info_span!(target: "h2", "stream")),
            Some(("stream", false))
        );
    }
}
