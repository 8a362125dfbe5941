//! The HTTP server: GraphQL over HTTP (`POST`/`GET /graphql`), GraphQL
//! over WebSocket (`/graphql/ws`: `graphql-transport-ws` and the legacy
//! `graphql-ws`), GraphiQL at `/` (with its assets under `/graphiql/`, see
//! [`graphiql`]), `/healthz`, `/readyz` and `/metrics`.

//!
//! | module | what |
//! |---|---|
//! | [`state`] | [`AppState`] every handler shares, [`ServerConfig`] |
//! | [`graphql`] | GraphQL over HTTP |
//! | [`ws`] | GraphQL over WebSocket: the upgrade, both protocols, a socket's subscriptions |
//! | [`hub`] | shared subscription executions and the protocols' messages |
//! | [`health`] | `/healthz`, `/readyz`, `/metrics` |
//! | [`graphiql`] | the GraphiQL page and its assets, compiled in |
//!
//! Errors answered before GraphQL runs go through [`crate::error`].

pub mod graphiql;
pub mod graphql;
pub mod health;
pub mod hub;
pub mod state;
pub mod ws;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderValue, Method};
use axum::routing::get;
use axum::Router;
use tower_http::cors::{AllowOrigin, CorsLayer};

pub use state::{AppState, ServerConfig};

/// The router.
pub fn router(state: Arc<AppState>) -> Router {
    let config = state.config.clone();
    let mut router = Router::new()
        .route("/", get(graphiql::page))
        .route("/graphiql/{version}/{file}", get(graphiql::asset))
        .route(
            "/graphql",
            get(graphql::graphql_get).post(graphql::graphql_post),
        )
        .route("/graphql/ws", get(ws::websocket))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
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
