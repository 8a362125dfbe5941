//! # Errors to the client, mapped in one place
//!
//! Every error a client sees — from a resolver, from the HTTP layer before
//! GraphQL runs, or on a WebSocket — is an [`ApiError`]: one variant per kind
//! of failure, each with its `extensions.code` ([`ApiError::code`]), the
//! message the client reads ([`ApiError::message`]) and, for the HTTP layer,
//! its status ([`ApiError::status`]). It becomes a GraphQL error with
//! `From<ApiError> for async_graphql::Error`, an HTTP response in GraphQL's
//! error shape with [`ApiError::into_response`], and a JSON `errors` array for
//! the WebSocket protocols with [`ApiError::to_errors_json`].
//!
//! What a dependency said when it failed is logged here, once, and never sent
//! to the client: `UNAVAILABLE` names the dependency and says to retry, and
//! `INTERNAL` points at the server log. The caller's own mistakes are
//! `VALIDATION` (or `BAD_REQUEST` before GraphQL runs), never `UNAVAILABLE`.
//!
//! | code | when |
//! |---|---|
//! | `BAD_REQUEST` | the HTTP request is not a GraphQL request (body, method, subprotocol, header) |
//! | `VALIDATION` | an argument is malformed or out of range |
//! | `UNAUTHENTICATED` / `FORBIDDEN` | no valid token / the token lacks the role |
//! | `NOT_FOUND` | what an id names does not exist for the caller's tenant |
//! | `STALE` | a read model has not reached `atLeastPosition` in time |
//! | `UNAVAILABLE` | a dependency failed, or the server is stopping; retrying may succeed |
//! | `INTERNAL` | a bug or unreadable stored history; see the server log |
//! | `SUBSCRIBER_TOO_SLOW` | a subscriber fell behind its buffer |
//! | `TOO_MANY_SUBSCRIPTIONS` | a socket holds `api.ws_max_subscriptions` already |
//! | `QUERY_TOO_*`, `GRAPHQL_*` | the document's own limits and validation ([`crate::graphql::limits`]) |
//! | the command's code | [`commands::CommandError::code`] (`CONFLICT`, `ALREADY_EXISTS`, `INVALID_TRANSITION`, …) |

use std::fmt::Display;

use async_graphql::ErrorExtensions as _;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use commands::CommandError;

/// An error the client sees; [`ApiError::message`] is what it reads.
///
/// Deliberately not `Display`: async-graphql turns any `Display` type into an
/// error *without* a code, so `?` on an `ApiError` must go through
/// `From<ApiError> for async_graphql::Error`, which sets it.
#[derive(Debug)]
pub enum ApiError {
    /// The HTTP request is not a GraphQL request; `status` says which way.
    BadRequest {
        /// 400, 405, 415 …
        status: StatusCode,
        /// What to send instead.
        message: String,
    },
    /// An argument is malformed or out of range.
    Validation(String),
    /// No valid token.
    Unauthenticated(String),
    /// The token lacks a role.
    Forbidden(String),
    /// What an id names does not exist (for the caller's tenant).
    NotFound(String),
    /// A read model has not reached the wanted position in time.
    Stale(String),
    /// A dependency failed; `detail` is logged, not sent.
    Unavailable {
        /// The dependency, as the client may read it ("Redis", "the graph").
        dependency: &'static str,
        /// What it said (logged only).
        detail: String,
    },
    /// The server is stopping; `0` says what to do instead.
    ShuttingDown(String),
    /// A bug or unreadable history; `detail` is logged, not sent.
    Internal {
        /// What failed, for the client.
        message: &'static str,
        /// Why (logged only).
        detail: String,
    },
    /// A subscriber fell behind its buffer.
    SubscriberTooSlow(String),
    /// A socket holds as many subscriptions as it may.
    TooManySubscriptions(String),
    /// The document broke a limit or GraphQL validation; `code` is the
    /// limit's (`QUERY_TOO_LARGE`, `GRAPHQL_VALIDATION_FAILED`, …).
    Document {
        /// The limit's code.
        code: &'static str,
        /// What the limit is and by how much it was passed.
        message: String,
    },
    /// A command was refused or failed.
    Command(CommandError),
}

impl ApiError {
    /// `UNAVAILABLE` naming `dependency`; what it said is logged here.
    pub fn unavailable(dependency: &'static str, detail: impl Display) -> Self {
        tracing::warn!(dependency, error = %detail, "a dependency failed");
        ApiError::Unavailable {
            dependency,
            detail: detail.to_string(),
        }
    }

    /// `INTERNAL`; `detail` is logged here with `message`.
    pub fn internal(message: &'static str, detail: impl Display) -> Self {
        tracing::error!(error = %detail, "{message}");
        ApiError::Internal {
            message,
            detail: detail.to_string(),
        }
    }

    /// A command's error, logged here when it is not the caller's doing.
    pub fn command(e: CommandError) -> Self {
        match &e {
            CommandError::Unavailable { .. } => {
                tracing::warn!(error = %e, "command failed: event store unavailable");
                ApiError::Unavailable {
                    dependency: "the event store",
                    detail: e.to_string(),
                }
            }
            CommandError::Corrupt { .. } => ApiError::internal(
                "stored history cannot be read; an operator has been told",
                format_args!("{e:?}"),
            ),
            _ => ApiError::Command(e),
        }
    }

    /// The `extensions.code`.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest { .. } => "BAD_REQUEST",
            ApiError::Validation(_) => "VALIDATION",
            ApiError::Unauthenticated(_) => "UNAUTHENTICATED",
            ApiError::Forbidden(_) => "FORBIDDEN",
            ApiError::NotFound(_) => "NOT_FOUND",
            ApiError::Stale(_) => "STALE",
            ApiError::Unavailable { .. } | ApiError::ShuttingDown(_) => "UNAVAILABLE",
            ApiError::Internal { .. } => "INTERNAL",
            ApiError::SubscriberTooSlow(_) => "SUBSCRIBER_TOO_SLOW",
            ApiError::TooManySubscriptions(_) => "TOO_MANY_SUBSCRIPTIONS",
            ApiError::Document { code, .. } => code,
            ApiError::Command(e) => e.code(),
        }
    }

    /// The client's message. Nothing a dependency said is in it.
    pub fn message(&self) -> String {
        match self {
            ApiError::BadRequest { message, .. } | ApiError::Document { message, .. } => {
                message.clone()
            }
            ApiError::Validation(m)
            | ApiError::Unauthenticated(m)
            | ApiError::Forbidden(m)
            | ApiError::NotFound(m)
            | ApiError::Stale(m)
            | ApiError::ShuttingDown(m)
            | ApiError::SubscriberTooSlow(m)
            | ApiError::TooManySubscriptions(m) => m.clone(),
            ApiError::Unavailable {
                dependency: "the event store",
                ..
            } => "the event store is unavailable; retry with the same commandId".to_owned(),
            ApiError::Unavailable { dependency, .. } => {
                format!("{dependency} is unavailable; retry later")
            }
            ApiError::Internal { message, .. } => format!("{message}; see the server log"),
            ApiError::Command(e) => e.to_string(),
        }
    }

    /// The HTTP status of an error answered before GraphQL runs.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { status, .. } => *status,
            ApiError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Unavailable { .. } | ApiError::ShuttingDown(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    /// One GraphQL error object: `{"message": …, "extensions": {"code": …}}`.
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "message": self.message(), "extensions": { "code": self.code() } })
    }

    /// A JSON array holding this one error, as the WebSocket protocols'
    /// `error` message carries it.
    pub fn to_errors_json(&self) -> String {
        serde_json::Value::Array(vec![self.to_json()]).to_string()
    }

    /// The HTTP response: GraphQL's error shape with [`Self::status`]; a 401
    /// says `WWW-Authenticate: Bearer`. Counted in the error metric.
    pub fn into_response(self) -> Response {
        crate::telemetry::metrics::graphql_errors([self.code()]);
        let status = self.status();
        let body = serde_json::json!({ "errors": [self.to_json()] });
        let mut response = (status, body.to_string()).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl ApiError {
    /// As an error of the request (before execution, no path).
    pub fn into_server_error(self) -> async_graphql::ServerError {
        let mut error = async_graphql::ServerError::new(self.message(), None);
        error
            .extensions
            .get_or_insert_with(Default::default)
            .set("code", self.code());
        error
    }
}

impl From<ApiError> for async_graphql::Error {
    fn from(e: ApiError) -> Self {
        let code = e.code();
        async_graphql::Error::new(e.message()).extend_with(|_, x| x.set("code", code))
    }
}

impl From<CommandError> for ApiError {
    fn from(e: CommandError) -> Self {
        ApiError::command(e)
    }
}

/// `VALIDATION` as a GraphQL error.
pub fn validation(message: impl Display) -> async_graphql::Error {
    ApiError::Validation(message.to_string()).into()
}

/// `NOT_FOUND` as a GraphQL error.
pub fn not_found(message: impl Display) -> async_graphql::Error {
    ApiError::NotFound(message.to_string()).into()
}

/// `UNAVAILABLE` naming `dependency`, as a GraphQL error; `detail` is
/// logged, not sent.
pub fn unavailable(dependency: &'static str, detail: impl Display) -> async_graphql::Error {
    ApiError::unavailable(dependency, detail).into()
}

/// `INTERNAL` as a GraphQL error; `detail` is logged, not sent.
pub fn internal(message: &'static str, detail: impl Display) -> async_graphql::Error {
    ApiError::internal(message, detail).into()
}

/// An HTTP request that is not a GraphQL request.
pub fn bad_request(status: StatusCode, message: impl Display) -> Response {
    ApiError::BadRequest {
        status,
        message: message.to_string(),
    }
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailable_names_the_dependency_and_hides_what_it_said() {
        let e = ApiError::unavailable("Redis", "Connection refused (os error 111) at 10.0.0.7");
        assert_eq!(e.code(), "UNAVAILABLE");
        assert_eq!(e.message(), "Redis is unavailable; retry later");
        let json = e.to_errors_json();
        assert!(!json.contains("10.0.0.7"), "{json}");
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn an_event_store_outage_says_to_retry_with_the_same_command_id() {
        let e: async_graphql::Error = ApiError::Unavailable {
            dependency: "the event store",
            detail: "pool timed out".into(),
        }
        .into();
        assert_eq!(
            e.message,
            "the event store is unavailable; retry with the same commandId"
        );
    }

    #[test]
    fn internal_points_at_the_log_and_keeps_the_detail_out() {
        let e = ApiError::internal("a command task failed", "panicked at src/x.rs:1");
        assert_eq!(e.code(), "INTERNAL");
        assert_eq!(e.message(), "a command task failed; see the server log");
    }

    #[test]
    fn graphql_errors_carry_the_code() {
        let e: async_graphql::Error = ApiError::Validation("bad id".into()).into();
        let code = e
            .extensions
            .as_ref()
            .and_then(|x| x.get("code"))
            .map(|v| v.to_string());
        assert_eq!(code.as_deref(), Some("\"VALIDATION\""));
        assert_eq!(e.message, "bad id");
    }
}
