//! One trace from a mutation to the subscriber that saw its effect.
//!
//! The test installs the production telemetry (`api::telemetry::install`)
//! exporting over OTLP/HTTP to a collector of its own (axum on port 0,
//! decoding the protobuf requests with `opentelemetry-proto`), starts the
//! API as in production with the relay and the Redis projector in-process,
//! holds a live subscription over a real `graphql-transport-ws` connection,
//! sends a mutation over HTTP with a `traceparent` header, and checks what
//! was exported: the spans of the GraphQL operation, the command, its
//! append, the relay publish, the projector apply, the change-feed fan-out
//! and the subscription delivery share the caller's trace id, and each
//! one's parent is an earlier one, back to the caller's span.
//!
//! The global subscriber is process-wide: this file holds one test, and it
//! is a test binary of its own rather than a module of `e2e`. Installed in
//! the process running every other test, the production telemetry would
//! fail (another test may have installed a subscriber first), export every
//! span of every test through this test's queue (the test asserts that
//! nothing was dropped), and outlive this test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api::auth::Role;
use api::settings::{LogFormat, LogSettings};
use api::telemetry::{OtlpConfig, OtlpProtocol};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use commands::{CommandContext, CommandHandler, HandlerConfig};
use domain::{AgentCommand, AgentId, AgentKind, Command};
use futures::{SinkExt as _, StreamExt as _};
use neurectomy_e2e::pipeline::{Pipeline, Running};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use projections::graph_testkit::TestGraph;
use projections::testkit::TestRedis;
use prost::Message as _;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

const SECRET: &str = "tracing-tests-secret-of-at-least-32-bytes!";
const SERVICE: &str = "neurectomy-trace-test";

/// The chain, in causal order, with each span's expected parent.
const CHAIN: &[(&str, &str)] = &[
    ("graphql.operation", "<caller>"),
    ("command", "graphql.operation"),
    ("event_store.append", "command"),
    ("relay.publish", "command"),
    ("projector.apply", "command"),
    ("feed.fanout", "projector.apply"),
    ("subscription.deliver", "feed.fanout"),
];

/// A span as exported, reduced to what the test checks.
#[derive(Debug, Clone)]
struct Exported {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
}

/// What the in-test collector received.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Exported>>>,
    /// Requests that were not OTLP protobuf.
    rejected: Arc<Mutex<Vec<String>>>,
}

impl Collector {
    fn of_trace(&self, trace_id: &str) -> Vec<Exported> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    }
}

/// `POST /v1/traces`: an OTLP/HTTP protobuf export request.
async fn receive(
    State(collector): State<Collector>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, Vec<u8>) {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    if content_type != "application/x-protobuf" {
        collector.rejected.lock().unwrap().push(content_type);
        return (StatusCode::UNSUPPORTED_MEDIA_TYPE, Vec::new());
    }
    let request = match ExportTraceServiceRequest::decode(body) {
        Ok(request) => request,
        Err(error) => {
            collector.rejected.lock().unwrap().push(error.to_string());
            return (StatusCode::BAD_REQUEST, Vec::new());
        }
    };
    let mut spans = collector.spans.lock().unwrap();
    for resource_spans in request.resource_spans {
        let service = resource_spans
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|a| a.key == "service.name")
            .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                AnyValue::StringValue(s) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_default();
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                spans.push(Exported {
                    service: service.clone(),
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                });
            }
        }
    }
    (
        StatusCode::OK,
        ExportTraceServiceResponse::default().encode_to_vec(),
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Starts the collector on a free port.
async fn collector() -> (SocketAddr, Collector) {
    let collector = Collector::default();
    let app = axum::Router::new()
        .route("/v1/traces", axum::routing::post(receive))
        .with_state(collector.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, collector)
}

/// The pipeline (relay), a Redis projector, and the API on port 0.
struct World {
    pipe: Pipeline,
    _redis: TestRedis,
    _graph: TestGraph,
    _projector: Running,
    addr: SocketAddr,
    hub: api::http::hub::Hub,
    auth: api::auth::Authenticator,
    handler: CommandHandler,
}

async fn world() -> World {
    let pipe = Pipeline::start().await;
    let redis = TestRedis::create().await.unwrap_or_else(|e| panic!("{e}"));
    let graph = TestGraph::create().await.unwrap_or_else(|e| panic!("{e}"));
    let projector = pipe.spawn(&pipe.projector(redis.model.clone()));
    let cli = neurectomy_e2e::api_cli(&pipe, &redis, &graph, SECRET, &[]);
    let app = neurectomy_e2e::start_api(cli.settings.clone(), &pipe.stop.child_token()).await;
    let (addr, hub) = (app.addr().unwrap(), app.hub().unwrap().clone());
    tokio::spawn(app.run_until_stopped());
    World {
        handler: CommandHandler::new(pipe.store.clone(), HandlerConfig::default()),
        auth: api::startup::connect::authenticator(&cli.settings.api).unwrap(),
        pipe,
        _redis: redis,
        _graph: graph,
        _projector: projector,
        addr,
        hub,
    }
}

/// A `graphql-transport-ws` client, initialised.
async fn connect(
    addr: SocketAddr,
    token: &str,
) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut request = format!("ws://{addr}/graphql/ws")
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "graphql-transport-ws".parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .unwrap();
    let init =
        json!({"type": "connection_init", "payload": {"authorization": format!("Bearer {token}")}});
    ws.send(Message::text(init.to_string())).await.unwrap();
    assert_eq!(next(&mut ws).await["type"], "connection_ack");
    ws
}

/// The next protocol message other than a ping (answered); panics after 20 s.
async fn next(ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>) -> Value {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("no message from the API within 20 s")
            .expect("the API closed the connection")
            .unwrap();
        if let Message::Text(text) = message {
            let value: Value = serde_json::from_str(text.as_str()).unwrap();
            if value["type"] == "ping" {
                ws.send(Message::text(json!({"type": "pong"}).to_string()))
                    .await
                    .unwrap();
                continue;
            }
            return value;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_trace_links_a_mutation_to_the_subscriber_that_saw_it() {
    let (collector_addr, collector) = collector().await;
    let mut otlp = OtlpConfig::new(
        Some(format!("http://{collector_addr}/v1/traces")),
        OtlpProtocol::HttpProtobuf,
    );
    otlp.service_name = SERVICE.to_owned();
    otlp.delay = Duration::from_millis(50);
    otlp.queue = 100_000;
    let log = LogSettings {
        filter: std::env::var("TEST_LOG").unwrap_or_else(|_| "warn".to_owned()),
        format: LogFormat::Pretty,
        otel: Default::default(),
    };
    let telemetry = Arc::new(api::telemetry::install(&log, Some(otlp)).unwrap());
    // Exporting INFO spans, logging warnings: nothing below INFO is enabled
    // anywhere, so the `log` bridge and dependencies' debug/trace
    // callsites stop before the dispatcher.
    if std::env::var_os("TEST_LOG").is_none() {
        assert_eq!(
            tracing_subscriber::filter::LevelFilter::current(),
            tracing_subscriber::filter::LevelFilter::INFO,
            "the process's max level"
        );
    }
    let world = world().await;
    let token = world
        .auth
        .mint("tester", "acme", &[Role::Viewer, Role::Operator], 600)
        .unwrap();

    // A live (shared) subscription to an agent, seen working on a first,
    // untraced change.
    let agent = Uuid::new_v4();
    let mut ws = connect(world.addr, &token).await;
    let subscribe = json!({
        "id": "agent",
        "type": "subscribe",
        "payload": {
            "query": "subscription($id: ID!) { agentUpdated(id: $id) { position agent { status } } }",
            "variables": {"id": agent.to_string()},
        }
    });
    ws.send(Message::text(subscribe.to_string())).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while world.hub.executions() != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the subscription never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let register = Command::Agent(AgentCommand::RegisterAgent {
        agent_id: AgentId::from_uuid(agent),
        name: "traced".to_owned(),
        kind: AgentKind::Llm,
        model: None,
        capabilities: Vec::new(),
        parent_agent_id: None,
    });
    world
        .handler
        .execute(
            register,
            &CommandContext::new(Uuid::new_v4(), "tester", "acme"),
        )
        .await
        .unwrap();
    let first = next(&mut ws).await;
    assert_eq!(
        first["payload"]["data"]["agentUpdated"]["agent"]["status"], "active",
        "{first}"
    );

    // The traced mutation, as a caller inside a trace of its own.
    let trace_id = Uuid::new_v4().simple().to_string();
    let caller_span = Uuid::new_v4().simple().to_string()[..16].to_owned();
    let traceparent = format!("00-{trace_id}-{caller_span}-01");
    let response: Value = reqwest::Client::new()
        .post(format!("http://{}/graphql", world.addr))
        .bearer_auth(&token)
        .header("traceparent", &traceparent)
        .json(&json!({
            "query": "mutation Pause($id: ID!) { pauseAgent(agentId: $id) { position } }",
            "operationName": "Pause",
            "variables": {"id": agent.to_string()},
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(response["errors"].is_null(), "{response}");
    let position = &response["data"]["pauseAgent"]["position"];
    let seen = next(&mut ws).await;
    assert_eq!(
        seen["payload"]["data"]["agentUpdated"]["agent"]["status"], "paused",
        "{seen}"
    );
    assert_eq!(
        &seen["payload"]["data"]["agentUpdated"]["position"], position,
        "{seen}"
    );

    // Every stage's span reaches the collector (some end just after the
    // subscriber saw the change: flush until they are all there).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let spans = loop {
        let flushing = telemetry.clone();
        tokio::task::spawn_blocking(move || flushing.flush())
            .await
            .unwrap()
            .unwrap();
        let spans = collector.of_trace(&trace_id);
        if CHAIN
            .iter()
            .all(|(name, _)| spans.iter().any(|s| s.name == *name))
        {
            break spans;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "missing spans of trace {trace_id}: {:?} (got {:#?}; rejected requests: {:?})",
            CHAIN
                .iter()
                .filter(|(name, _)| !spans.iter().any(|s| s.name == *name))
                .collect::<Vec<_>>(),
            spans,
            collector.rejected.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // One span per stage, each a child of the stage before it in the chain,
    // back to the caller's span: one parent chain in one trace.
    let tree = spans
        .iter()
        .map(|s| format!("{} {} <- {}", s.name, s.span_id, s.parent_span_id))
        .collect::<Vec<_>>()
        .join("\n");
    let only = |name: &str| {
        let found: Vec<&Exported> = spans.iter().filter(|s| s.name == name).collect();
        assert_eq!(
            found.len(),
            1,
            "expected one {name} span in the trace:\n{tree}"
        );
        found[0]
    };
    for (name, parent) in CHAIN {
        let span = only(name);
        let expected = if *parent == "<caller>" {
            caller_span.clone()
        } else {
            only(parent).span_id.clone()
        };
        assert_eq!(
            span.parent_span_id, expected,
            "{name} is not a child of {parent}:\n{tree}"
        );
        assert_eq!(span.service, SERVICE, "{name}");
    }
    // Load and decide happen inside the command.
    let command = only("command").span_id.clone();
    for name in ["load", "decide"] {
        assert!(
            spans
                .iter()
                .any(|s| s.name == name && s.parent_span_id == command),
            "no {name} span under the command:\n{tree}"
        );
    }
    assert!(collector.rejected.lock().unwrap().is_empty());
    assert_eq!(telemetry.dropped_spans(), 0);

    drop(ws);
    world.pipe.shutdown().await;
    telemetry.shutdown();
}
