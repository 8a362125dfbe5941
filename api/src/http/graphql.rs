//! GraphQL over HTTP: `POST` and `GET /graphql`.

use std::sync::Arc;
use std::time::Instant;

use async_graphql::{BatchRequest, BatchResponse};
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::state::AppState;
use crate::auth::{AuthError, Principal};
use crate::error::{bad_request, ApiError};
use crate::graphql::RequestMeta;

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
            crate::telemetry::metrics::http(route, response.status().as_u16(), started.elapsed());
            return *response;
        }
    };
    let span = crate::telemetry::operation_span(meta.traceparent.as_deref(), &request);
    let mut request = request.data(principal).data(meta);
    match &mut request {
        BatchRequest::Single(r) => state.documents.prepare(r),
        BatchRequest::Batch(rs) => rs.iter_mut().for_each(|r| state.documents.prepare(r)),
    }
    let response = match request {
        BatchRequest::Single(mut single) => match state.fast.admits(&mut single) {
            Some(field) => {
                let run = state.fast.execute(single, &field);
                BatchResponse::Single(tracing::Instrument::instrument(run, span).await)
            }
            None => {
                let run = state.schema.execute_batch(BatchRequest::Single(single));
                tracing::Instrument::instrument(run, span).await
            }
        },
        batch => tracing::Instrument::instrument(state.schema.execute_batch(batch), span).await,
    };
    let codes: Vec<String> = match &response {
        BatchResponse::Single(r) => error_codes(r),
        BatchResponse::Batch(rs) => rs.iter().flat_map(error_codes).collect(),
    };
    crate::telemetry::metrics::graphql_errors(codes.iter().map(String::as_str));
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
    crate::telemetry::metrics::http(route, status.as_u16(), started.elapsed());
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

pub(crate) async fn graphql_post(
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
        crate::telemetry::metrics::http("graphql", 415, started.elapsed());
        return bad_request(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("send the request as application/json, not {content_type:?}"),
        );
    }
    let request: BatchRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            crate::telemetry::metrics::http("graphql", 400, started.elapsed());
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
        crate::telemetry::metrics::http("graphql", 400, started.elapsed());
        return bad_request(StatusCode::BAD_REQUEST, "the request has no \"query\"");
    }
    execute(&state, &headers, request, "graphql", started).await
}

pub(crate) async fn graphql_get(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let started = Instant::now();
    let request = match async_graphql::http::parse_query_string(query.as_deref().unwrap_or("")) {
        Ok(request) => request,
        Err(e) => {
            crate::telemetry::metrics::http("graphql", 400, started.elapsed());
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
            crate::telemetry::metrics::http("graphql", 405, started.elapsed());
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
