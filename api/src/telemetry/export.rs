//! OTLP export from a bounded queue: finished spans are queued without
//! waiting and exported in batches by a thread of its own; what does not
//! fit, or fails to export, is dropped and counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SpanData, SpanExporter as _};
use opentelemetry_sdk::Resource;

use super::TelemetryError;
use crate::settings::OtelVariables;

/// The counter of spans lost to a full queue or a failed export.
pub const DROPPED_SPANS: &str = "neurectomy_otlp_dropped_spans_total";

/// Service name when `OTEL_SERVICE_NAME` is not set.
pub(super) const DEFAULT_SERVICE_NAME: &str = "neurectomy";

/// OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// Protobuf over HTTP (`http/protobuf`; the default).
    HttpProtobuf,
    /// gRPC (`grpc`).
    Grpc,
}

/// Where and how spans are exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpConfig {
    /// The endpoint, as given to the exporter; `None` lets it read
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as is) or
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` (`/v1/traces` appended for HTTP).
    pub endpoint: Option<String>,
    /// Transport.
    pub protocol: OtlpProtocol,
    /// `service.name` of the spans.
    pub service_name: String,
    /// Longest export of one batch (then its spans are dropped).
    pub timeout: Duration,
    /// Most finished spans waiting for export; more are dropped.
    pub queue: usize,
    /// Most spans per export.
    pub batch: usize,
    /// Longest a finished span waits for its batch to fill.
    pub delay: Duration,
}

impl OtlpConfig {
    /// A configuration exporting to `endpoint` with the standard defaults.
    pub fn new(endpoint: Option<String>, protocol: OtlpProtocol) -> Self {
        Self {
            endpoint,
            protocol,
            service_name: DEFAULT_SERVICE_NAME.to_owned(),
            timeout: Duration::from_secs(10),
            queue: 2048,
            batch: 512,
            delay: Duration::from_secs(5),
        }
    }

    /// The configuration of the standard `OTEL_*` variables, as the
    /// settings read them; `None` (no export) when no endpoint is set. Also
    /// returns warnings about values it could not use, to log once logging
    /// works.
    pub fn from_settings(otel: &OtelVariables) -> (Option<Self>, Vec<String>) {
        Self::from_vars(|name| otel.get(name))
    }

    /// [`OtlpConfig::from_settings`] over `var` (a variable's non-empty value).
    fn from_vars(var: impl Fn(&str) -> Option<String>) -> (Option<Self>, Vec<String>) {
        let mut warnings = Vec::new();
        let disabled = var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let endpoint = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"));
        if disabled || endpoint.is_none() {
            return (None, warnings);
        }
        let protocol = match var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"))
            .as_deref()
        {
            None | Some("http/protobuf") => OtlpProtocol::HttpProtobuf,
            Some("grpc") => OtlpProtocol::Grpc,
            Some(other) => {
                warnings.push(format!(
                    "OTLP protocol {other:?} is not supported (use http/protobuf or grpc); using http/protobuf"
                ));
                OtlpProtocol::HttpProtobuf
            }
        };
        let mut config = Self::new(None, protocol);
        if let Some(name) = var("OTEL_SERVICE_NAME") {
            config.service_name = name;
        }
        let mut millis = |names: &[&str], default: Duration| {
            let Some((name, value)) = names.iter().find_map(|n| var(n).map(|v| (*n, v))) else {
                return default;
            };
            value
                .parse()
                .map(Duration::from_millis)
                .unwrap_or_else(|_| {
                    warnings.push(format!("{name}={value:?} is not a number of milliseconds"));
                    default
                })
        };
        config.timeout = millis(
            &[
                "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
                "OTEL_EXPORTER_OTLP_TIMEOUT",
            ],
            config.timeout,
        );
        config.delay = millis(&["OTEL_BSP_SCHEDULE_DELAY"], config.delay);
        let mut count = |name: &str, default: usize| match var(name) {
            None => default,
            Some(value) => match value.parse::<usize>() {
                Ok(n) if n > 0 => n,
                _ => {
                    warnings.push(format!("{name}={value:?} is not a positive number"));
                    default
                }
            },
        };
        config.queue = count("OTEL_BSP_MAX_QUEUE_SIZE", config.queue);
        config.batch = count("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", config.batch).min(config.queue);
        (Some(config), warnings)
    }
}

/// A control message to the export thread.
enum Control {
    /// Export everything queued, then answer whether it all went out.
    Flush(std::sync::mpsc::SyncSender<bool>),
    /// Like `Flush`, then stop.
    Shutdown(std::sync::mpsc::SyncSender<bool>),
}

/// A span processor with a bounded queue, exporting from a thread of its
/// own: [`SpanProcessor::on_end`] never waits.
///
/// [`SpanProcessor::on_end`]: opentelemetry_sdk::trace::SpanProcessor::on_end
#[derive(Debug)]
pub(super) struct ExportQueue {
    /// Finished spans waiting for export (bounded).
    spans: tokio::sync::mpsc::Sender<SpanData>,
    /// Flush and shutdown requests (rare; bounded too).
    control: tokio::sync::mpsc::Sender<Control>,
    /// Spans dropped so far.
    pub(super) dropped: Arc<AtomicU64>,
    /// How long a flush may take.
    wait: Duration,
    /// The export thread, joined at shutdown.
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Counts `n` spans as dropped.
fn count_dropped(dropped: &AtomicU64, n: u64) {
    dropped.fetch_add(n, Ordering::Relaxed);
    metrics::counter!(DROPPED_SPANS).increment(n);
}

impl ExportQueue {
    /// Starts the export thread, building the exporter on it (the gRPC and
    /// HTTP clients need its runtime).
    pub(super) fn start(config: OtlpConfig, resource: Resource) -> Result<Self, TelemetryError> {
        let (spans, queued) = tokio::sync::mpsc::channel(config.queue.max(1));
        let (control, requests) = tokio::sync::mpsc::channel(4);
        let dropped = Arc::new(AtomicU64::new(0));
        let (ready, started) = std::sync::mpsc::sync_channel(1);
        let wait = config.timeout + Duration::from_secs(1);
        let counter = dropped.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(TelemetryError::Thread)?;
        let thread = std::thread::Builder::new()
            .name("otlp-export".to_owned())
            .spawn(move || {
                // Nothing the exporter does (HTTP, gRPC) is traced itself.
                let _suppressed = opentelemetry::Context::enter_telemetry_suppressed_scope();
                runtime.block_on(async move {
                    let exporter = match build_exporter(&config, &resource) {
                        Ok(exporter) => exporter,
                        Err(error) => {
                            let _ = ready.send(Err(error));
                            return;
                        }
                    };
                    let _ = ready.send(Ok(()));
                    Exporter {
                        exporter,
                        queued,
                        requests,
                        dropped: counter,
                        timeout: config.timeout,
                        batch: config.batch.max(1),
                        delay: config.delay,
                        failing: false,
                    }
                    .run()
                    .await;
                });
            })
            .map_err(TelemetryError::Thread)?;
        match started.recv() {
            Ok(Ok(())) => Ok(Self {
                spans,
                control,
                dropped,
                wait,
                thread: Mutex::new(Some(thread)),
            }),
            Ok(Err(error)) => Err(TelemetryError::Exporter(error)),
            Err(_) => Err(TelemetryError::Thread(std::io::Error::other(
                "the export thread ended at start",
            ))),
        }
    }

    /// Sends a control request and waits at most `wait` for its answer.
    fn request(
        &self,
        make: fn(std::sync::mpsc::SyncSender<bool>) -> Control,
        wait: Duration,
    ) -> OTelSdkResult {
        let (answer, answered) = std::sync::mpsc::sync_channel(1);
        self.control.try_send(make(answer)).map_err(|e| {
            OTelSdkError::InternalFailure(format!("the export thread is busy or gone: {e}"))
        })?;
        match answered.recv_timeout(wait) {
            Ok(true) => Ok(()),
            Ok(false) => Err(OTelSdkError::InternalFailure(
                "some spans could not be exported".to_owned(),
            )),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(OTelSdkError::Timeout(wait)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                Err(OTelSdkError::AlreadyShutdown)
            }
        }
    }
}

impl opentelemetry_sdk::trace::SpanProcessor for ExportQueue {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        // Full (or stopped): drop rather than wait.
        if self.spans.try_send(span).is_err() {
            count_dropped(&self.dropped, 1);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.request(Control::Flush, self.wait)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        // At exit, the caller's bound wins: a stuck collector must not hold
        // the process past its grace period.
        let result = self.request(Control::Shutdown, timeout.min(self.wait));
        let thread = crate::sync::lock(&self.thread).take();
        // It has answered (or is stuck past the wait): join only the former.
        if let (Ok(()), Some(thread)) = (&result, thread) {
            let _ = thread.join();
        }
        result
    }
}

/// Builds the OTLP exporter of `config` (on the export thread's runtime).
fn build_exporter(
    config: &OtlpConfig,
    resource: &Resource,
) -> Result<opentelemetry_otlp::SpanExporter, opentelemetry_otlp::ExporterBuildError> {
    let mut exporter = match config.protocol {
        OtlpProtocol::HttpProtobuf => {
            let mut builder = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_timeout(config.timeout);
            if let Some(endpoint) = &config.endpoint {
                builder = builder.with_endpoint(endpoint);
            }
            builder.build()?
        }
        OtlpProtocol::Grpc => {
            let mut builder = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_timeout(config.timeout);
            if let Some(endpoint) = &config.endpoint {
                builder = builder.with_endpoint(endpoint);
            }
            builder.build()?
        }
    };
    exporter.set_resource(resource);
    Ok(exporter)
}

/// The export thread's loop.
struct Exporter {
    exporter: opentelemetry_otlp::SpanExporter,
    queued: tokio::sync::mpsc::Receiver<SpanData>,
    requests: tokio::sync::mpsc::Receiver<Control>,
    dropped: Arc<AtomicU64>,
    timeout: Duration,
    batch: usize,
    delay: Duration,
    /// Whether the last export failed (to warn once per outage).
    failing: bool,
}

impl Exporter {
    async fn run(mut self) {
        let mut batch: Vec<SpanData> = Vec::with_capacity(self.batch);
        let mut due: Option<tokio::time::Instant> = None;
        loop {
            let deadline = due.unwrap_or_else(tokio::time::Instant::now);
            // `batch` holds fewer than `self.batch` spans here: a full one
            // is exported at once.
            let room = self.batch - batch.len();
            tokio::select! {
                biased;
                request = self.requests.recv() => {
                    let (answer, stop) = match request {
                        Some(Control::Flush(answer)) => (Some(answer), false),
                        Some(Control::Shutdown(answer)) => (Some(answer), true),
                        None => (None, true),
                    };
                    let exported = self.drain(&mut batch).await;
                    due = None;
                    if stop {
                        let _ = self.exporter.shutdown();
                    }
                    if let Some(answer) = answer {
                        let _ = answer.try_send(exported);
                    }
                    if stop {
                        return;
                    }
                }
                received = self.queued.recv_many(&mut batch, room) => {
                    if received == 0 {
                        // Every sender is gone: the provider was dropped.
                        self.drain(&mut batch).await;
                        return;
                    }
                    if batch.len() >= self.batch {
                        self.export(&mut batch).await;
                        due = None;
                    } else if due.is_none() {
                        due = Some(tokio::time::Instant::now() + self.delay);
                    }
                }
                () = tokio::time::sleep_until(deadline), if due.is_some() => {
                    self.export(&mut batch).await;
                    due = None;
                }
            }
        }
    }

    /// Exports `batch` and everything queued, within one export timeout
    /// in all (what is left then is dropped); whether it all went out.
    async fn drain(&mut self, batch: &mut Vec<SpanData>) -> bool {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut exported = true;
        loop {
            while batch.len() < self.batch {
                match self.queued.try_recv() {
                    Ok(span) => batch.push(span),
                    Err(_) => break,
                }
            }
            if batch.is_empty() {
                return exported;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            exported &= self.export_within(batch, left).await;
        }
    }

    /// Exports `batch` (emptied); its spans are dropped if that fails.
    async fn export(&mut self, batch: &mut Vec<SpanData>) -> bool {
        self.export_within(batch, self.timeout).await
    }

    /// [`Exporter::export`] with its own time limit.
    async fn export_within(&mut self, batch: &mut Vec<SpanData>, limit: Duration) -> bool {
        if batch.is_empty() {
            return true;
        }
        let spans = std::mem::replace(batch, Vec::with_capacity(self.batch));
        let n = spans.len() as u64;
        let failure = if limit.is_zero() {
            Some("no time left to export".to_owned())
        } else {
            match tokio::time::timeout(limit, self.exporter.export(spans)).await {
                Ok(Ok(())) => None,
                Ok(Err(error)) => Some(error.to_string()),
                Err(_) => Some(format!("no answer within {limit:?}")),
            }
        };
        match failure {
            None => {
                if self.failing {
                    tracing::info!("exporting spans works again");
                    self.failing = false;
                }
                true
            }
            Some(error) => {
                count_dropped(&self.dropped, n);
                if !self.failing {
                    tracing::warn!(%error, dropped = n, "exporting spans failed; dropping them until it works again (counted in {DROPPED_SPANS})");
                    self.failing = true;
                }
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use std::time::Instant;
    use tracing_subscriber::layer::SubscriberExt as _;

    fn from(vars: &[(&str, &str)]) -> (Option<OtlpConfig>, Vec<String>) {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        OtlpConfig::from_vars(|name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
    }

    #[test]
    fn the_standard_variables_configure_export() {
        assert_eq!(from(&[]).0, None, "no endpoint: no export");
        assert_eq!(
            from(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_SDK_DISABLED", "true")
            ])
            .0,
            None
        );
        let (config, warnings) = from(&[
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_SERVICE_NAME", "neurectomy-relay"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "100"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "512"),
            ("OTEL_BSP_SCHEDULE_DELAY", "soon"),
        ]);
        let config = config.unwrap();
        // The exporter reads the endpoint variables itself (the generic one
        // gets `/v1/traces` for HTTP).
        assert_eq!(config.endpoint, None);
        assert_eq!(config.protocol, OtlpProtocol::Grpc);
        assert_eq!(config.service_name, "neurectomy-relay");
        assert_eq!(config.timeout, Duration::from_millis(2500));
        assert_eq!((config.queue, config.batch), (100, 100));
        assert_eq!(config.delay, Duration::from_secs(5));
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        let (config, warnings) = from(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ]);
        assert_eq!(config.unwrap().protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
    }

    /// Names of the spans a gRPC collector received.
    #[derive(Clone, Default)]
    struct Received(Arc<Mutex<Vec<(String, String)>>>);

    #[tonic::async_trait]
    impl TraceService for Received {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let mut received = self.0.lock().unwrap();
            for resource in request.into_inner().resource_spans {
                let service = resource
                    .resource
                    .iter()
                    .flat_map(|r| &r.attributes)
                    .find(|a| a.key == "service.name")
                    .and_then(|a| a.value.as_ref()?.value.as_ref())
                    .map(|v| format!("{v:?}"))
                    .unwrap_or_default();
                for scope in resource.scope_spans {
                    for span in scope.spans {
                        received.push((service.clone(), span.name));
                    }
                }
            }
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spans_reach_a_grpc_collector() {
        let received = Received::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(received.clone()))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        let config = OtlpConfig::new(Some(format!("http://{addr}")), OtlpProtocol::Grpc);
        let resource = Resource::builder_empty()
            .with_service_name("grpc-test")
            .build();
        let queue = ExportQueue::start(config, resource).unwrap();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(queue)
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            tracing::info_span!("over.grpc").in_scope(|| {});
        });
        tokio::task::spawn_blocking(move || provider.force_flush())
            .await
            .unwrap()
            .unwrap();
        let received = received.0.lock().unwrap().clone();
        assert_eq!(received.len(), 1, "{received:?}");
        assert_eq!(received[0].1, "over.grpc");
        assert!(received[0].0.contains("grpc-test"), "{received:?}");
        server.abort();
    }

    /// A collector that takes connections and never answers: every export
    /// waits for its whole timeout. A burst of spans must not wait for it:
    /// they are queued or dropped at once, and every drop is counted.
    #[test]
    fn an_unresponsive_collector_never_slows_spans_and_drops_are_counted() {
        let metrics = crate::telemetry::metrics::install().expect("the metrics recorder");
        let collector = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let timeout = Duration::from_secs(3);
        let config = OtlpConfig {
            endpoint: Some(format!(
                "http://{}/v1/traces",
                collector.local_addr().unwrap()
            )),
            protocol: OtlpProtocol::HttpProtobuf,
            service_name: "test".to_owned(),
            timeout,
            queue: 64,
            batch: 16,
            delay: Duration::from_millis(10),
        };
        let queue = ExportQueue::start(config, Resource::builder_empty().build()).unwrap();
        let dropped = queue.dropped.clone();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(queue)
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        const SPANS: u64 = 2_000;
        let started = Instant::now();
        tracing::subscriber::with_default(subscriber, || {
            for n in 0..SPANS {
                let span = tracing::info_span!("request", n);
                let _entered = span.enter();
            }
        });
        let took = started.elapsed();
        // Waiting for the collector even once would take the export timeout.
        assert!(
            took < timeout / 2,
            "{SPANS} spans took {took:?} with an unresponsive collector"
        );
        // At most the queue and one batch in flight are not dropped yet.
        let at_once = dropped.load(Ordering::Relaxed);
        assert!(at_once >= SPANS - 64 - 16, "only {at_once} dropped");
        // The batch in flight times out and is counted too.
        let deadline = Instant::now() + timeout * 2;
        while dropped.load(Ordering::Relaxed) < at_once + 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            dropped.load(Ordering::Relaxed) > at_once,
            "a failed export was not counted"
        );
        let rendered = metrics.render();
        let counted: f64 = rendered
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{DROPPED_SPANS} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {DROPPED_SPANS} in {rendered}"));
        assert!(counted >= at_once as f64, "{counted} < {at_once}");
        // Shutting down with spans queued takes at most one export timeout.
        let stopping = Instant::now();
        let _ = provider.shutdown();
        assert!(stopping.elapsed() < timeout + Duration::from_secs(2));
        drop(collector);
    }
}
