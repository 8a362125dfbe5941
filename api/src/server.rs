//! The HTTP server: GraphQL over HTTP (`POST`/`GET /graphql`), GraphQL
//! over WebSocket (`/graphql/ws`: `graphql-transport-ws` and the legacy
//! `graphql-ws`), GraphiQL at `/` (with its assets under `/graphiql/`, see
//! [`crate::graphiql`]), `/healthz`, `/readyz` and `/metrics`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_graphql::http::WebSocketProtocols;
use async_graphql::{BatchRequest, BatchResponse};
use axum::body::Bytes;
use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures::StreamExt as _;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::auth::{AuthError, Authenticator, Principal};
use crate::error::{bad_request, ApiError};
use crate::graphql::{ApiSchema, RequestMeta, Services};

/// Settings of the HTTP layer.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest request body, bytes.
    pub body_limit: usize,
    /// Largest WebSocket message, bytes.
    pub ws_message_limit: usize,
    /// How long a WebSocket client has to send `connection_init`.
    pub ws_init_timeout: Duration,
    /// Most subscriptions one WebSocket may hold at once.
    pub ws_max_subscriptions: usize,
    /// Origins allowed by CORS (`*` for any; empty: no CORS headers).
    pub cors_origins: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            body_limit: 256 * 1024,
            ws_message_limit: 64 * 1024,
            ws_init_timeout: Duration::from_secs(10),
            ws_max_subscriptions: 200,
            cors_origins: Vec::new(),
        }
    }
}

/// What the handlers share.
pub struct AppState {
    /// The schema.
    pub schema: ApiSchema,
    /// Token verification.
    pub auth: Authenticator,
    /// The services (for readiness).
    pub services: Services,
    /// NATS (for readiness).
    pub nats: async_nats::Client,
    /// HTTP settings.
    pub config: ServerConfig,
    /// Cancelled at shutdown: open WebSockets close with 1001 (going away).
    pub shutdown: tokio_util::sync::CancellationToken,
    /// Shared subscription executions (GraphQL over WebSocket).
    pub hub: crate::ws::Hub,
    /// Parsed documents of recent queries.
    pub documents: crate::graphql::DocumentCache,
}

/// The router.
pub fn router(state: Arc<AppState>) -> Router {
    let config = state.config.clone();
    let mut router = Router::new()
        .route("/", get(crate::graphiql::page))
        .route("/graphiql/{version}/{file}", get(crate::graphiql::asset))
        .route("/graphql", get(graphql_get).post(graphql_post))
        .route("/graphql/ws", get(websocket))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(config.body_limit))
        .with_state(state);
    if !config.cors_origins.is_empty() {
        let origins = if config.cors_origins.iter().any(|o| o == "*") {
            AllowOrigin::any()
        } else {
            AllowOrigin::list(
                config
                    .cors_origins
                    .iter()
                    .filter_map(|o| HeaderValue::from_str(o).ok()),
            )
        };
        router = router.layer(
            CorsLayer::new()
                .allow_origin(origins)
                .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
                .allow_headers([
                    header::AUTHORIZATION,
                    header::CONTENT_TYPE,
                    header::ACCEPT,
                    header::HeaderName::from_static("x-min-position"),
                    header::HeaderName::from_static("traceparent"),
                ])
                .max_age(Duration::from_secs(600)),
        );
    }
    router
}

const GRAPHQL_RESPONSE: &str = "application/graphql-response+json";

fn auth_error(e: &AuthError) -> Response {
    ApiError::Unauthenticated(e.to_string()).into_response()
}

/// The request's data: the principal and `X-Min-Position`/`traceparent`.
fn request_data(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<(Principal, RequestMeta), Box<Response>> {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().map_err(|_| AuthError::Malformed))
        .transpose()
        .map_err(|e| Box::new(auth_error(&e)))?;
    let principal = state
        .auth
        .verify_header(authorization)
        .map_err(|e| Box::new(auth_error(&e)))?;
    let min_position = match headers.get("x-min-position") {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<i64>().ok())
                .filter(|p| *p >= 0)
                .ok_or_else(|| {
                    Box::new(bad_request(
                        StatusCode::BAD_REQUEST,
                        "X-Min-Position must be a non-negative integer position",
                    ))
                })?,
        ),
    };
    let traceparent = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    Ok((
        principal,
        RequestMeta {
            min_position,
            traceparent,
        },
    ))
}

fn wants_graphql_response(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains(GRAPHQL_RESPONSE))
}

async fn execute(
    state: &AppState,
    headers: &HeaderMap,
    request: BatchRequest,
    route: &'static str,
    started: Instant,
) -> Response {
    let (principal, meta) = match request_data(state, headers) {
        Ok(data) => data,
        Err(response) => {
            crate::metrics::http(route, response.status().as_u16(), started.elapsed());
            return *response;
        }
    };
    let span = crate::telemetry::operation_span(meta.traceparent.as_deref(), &request);
    let mut request = request.data(principal).data(meta);
    match &mut request {
        BatchRequest::Single(r) => state.documents.prepare(r),
        BatchRequest::Batch(rs) => rs.iter_mut().for_each(|r| state.documents.prepare(r)),
    }
    let response = tracing::Instrument::instrument(state.schema.execute_batch(request), span).await;
    let codes: Vec<String> = match &response {
        BatchResponse::Single(r) => error_codes(r),
        BatchResponse::Batch(rs) => rs.iter().flat_map(error_codes).collect(),
    };
    crate::metrics::graphql_errors(codes.iter().map(String::as_str));
    let graphql_response = wants_graphql_response(headers);
    // With application/graphql-response+json, a request that did not
    // execute (parse or validation errors: no data) is a 400.
    let request_failed = match &response {
        BatchResponse::Single(r) => r.data == async_graphql::Value::Null && r.is_err(),
        BatchResponse::Batch(_) => false,
    };
    let status = if graphql_response && request_failed {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    };
    let body = match serde_json::to_string(&response) {
        Ok(body) => body,
        Err(e) => {
            return ApiError::internal("the response could not be encoded", e).into_response()
        }
    };
    let mut http = (status, body).into_response();
    http.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(if graphql_response {
            GRAPHQL_RESPONSE
        } else {
            "application/json"
        }),
    );
    crate::metrics::http(route, status.as_u16(), started.elapsed());
    http
}

fn error_codes(response: &async_graphql::Response) -> Vec<String> {
    response
        .errors
        .iter()
        .map(|e| {
            e.extensions
                .as_ref()
                .and_then(|x| x.get("code"))
                .and_then(|v| match v {
                    async_graphql::Value::String(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_else(|| "GRAPHQL_VALIDATION_FAILED".to_owned())
        })
        .collect()
}

async fn graphql_post(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = Instant::now();
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type.starts_with("application/json")
        && !content_type.starts_with("application/graphql-response+json")
    {
        crate::metrics::http("graphql", 415, started.elapsed());
        return bad_request(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("send the request as application/json, not {content_type:?}"),
        );
    }
    let request: BatchRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            crate::metrics::http("graphql", 400, started.elapsed());
            return bad_request(
                StatusCode::BAD_REQUEST,
                format!("the body is not a GraphQL request (JSON with a \"query\" string): {e}"),
            );
        }
    };
    let empty = match &request {
        BatchRequest::Single(r) => r.query.trim().is_empty(),
        BatchRequest::Batch(rs) => rs.is_empty() || rs.iter().any(|r| r.query.trim().is_empty()),
    };
    if empty {
        crate::metrics::http("graphql", 400, started.elapsed());
        return bad_request(StatusCode::BAD_REQUEST, "the request has no \"query\"");
    }
    execute(&state, &headers, request, "graphql", started).await
}

async fn graphql_get(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let started = Instant::now();
    let request = match async_graphql::http::parse_query_string(query.as_deref().unwrap_or("")) {
        Ok(request) => request,
        Err(e) => {
            crate::metrics::http("graphql", 400, started.elapsed());
            return bad_request(
                StatusCode::BAD_REQUEST,
                format!("the query string is not a GraphQL request (?query=…&variables=…): {e}"),
            );
        }
    };
    // GET never changes anything (GraphQL over HTTP): mutations need POST.
    if let Some(document) = state.documents.parsed(&request.query) {
        let mutation = document.operations.iter().any(|(name, op)| {
            let selected = match (&request.operation_name, name) {
                (Some(wanted), Some(name)) => wanted.as_str() == name.as_str(),
                (None, _) => true,
                (Some(_), None) => false,
            };
            selected && op.node.ty == async_graphql::parser::types::OperationType::Mutation
        });
        if mutation {
            crate::metrics::http("graphql", 405, started.elapsed());
            let mut response = bad_request(
                StatusCode::METHOD_NOT_ALLOWED,
                "mutations are not allowed over GET; use POST",
            );
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
            return response;
        }
    }
    execute(
        &state,
        &headers,
        BatchRequest::Single(request),
        "graphql",
        started,
    )
    .await
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    // Projection lag is computed at scrape time, each read within the
    // readiness timeout (a scrape never hangs on a dependency).
    let services = &state.services;
    let lag = |checkpoint| {
        probe(
            READY_TIMEOUT,
            services.store.count_after(checkpoint, 10_000_000),
        )
    };
    if let Ok(checkpoint) = probe(READY_TIMEOUT, services.redis.read_checkpoint()).await {
        let lag = lag(checkpoint).await.unwrap_or(-1);
        crate::metrics::projection("redis", checkpoint, lag);
    }
    if let Ok(checkpoint) = probe(READY_TIMEOUT, services.graph.read_checkpoint()).await {
        let lag = lag(checkpoint).await.unwrap_or(-1);
        crate::metrics::projection("graph", checkpoint, lag);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::render(),
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
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let services = &state.services;
    let reports = async {
        let (redis, graph) = tokio::join!(
            projections::redis::health::projector_report(&services.redis, "redis"),
            projections::redis::health::projector_report(&services.redis, "graph"),
        );
        Ok::<_, redis::RedisError>([("redis", redis?), ("graph", graph?)])
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
                    (*name).to_owned(),
                    serde_json::Value::String(report.state.clone()),
                );
            }
        }
        Err(e) => {
            live = false;
            for name in ["redis", "graph"] {
                projections.insert(name.to_owned(), serde_json::Value::String(e.clone()));
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

async fn websocket(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let protocol = headers
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .and_then(|protocols| {
            protocols
                .split(',')
                .find_map(|p| p.trim().parse::<WebSocketProtocols>().ok())
        });
    let Some(protocol) = protocol else {
        return bad_request(
            StatusCode::BAD_REQUEST,
            "request the `graphql-transport-ws` (or legacy `graphql-ws`) subprotocol",
        );
    };
    // The socket refuses what is far too large (it would have to be held
    // to be read); a message over the configured limit but within this is
    // read whole and refused by the connection with 1009, so the close
    // frame reaches a client that is not still sending (unread bytes at a
    // close make the kernel reset the connection, and the client never sees
    // the code).
    let limit = state.config.ws_message_limit;
    let hard_limit = limit.saturating_mul(4).max(1 << 20);
    upgrade
        .protocols(["graphql-transport-ws", "graphql-ws"])
        .max_message_size(hard_limit)
        .max_frame_size(hard_limit)
        // Small per-connection buffers: one process holds ~10,000 sockets
        // (tungstenite's defaults are 128 KiB each way). The read buffer is
        // allocated up front for every socket and kept for its lifetime,
        // while client messages are small (`subscribe`, `ping`, `complete`);
        // a larger frame grows it to the frame's length as needed.
        .read_buffer_size(512)
        .write_buffer_size(4 * 1024)
        .on_upgrade(move |socket| serve_websocket(state, socket, protocol))
}

/// Splits the socket before the connection's future is built: an `async fn`
/// keeps its arguments in its state for its whole life, and the unsplit
/// socket is large (one process holds ~10,000 of these futures).
fn serve_websocket(
    state: Arc<AppState>,
    socket: WebSocket,
    protocol: WebSocketProtocols,
) -> impl std::future::Future<Output = ()> + Send {
    let (sink, source) = socket.split();
    crate::ws::serve(state, sink, source, protocol)
}
