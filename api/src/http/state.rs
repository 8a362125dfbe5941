//! The state every handler shares, and the HTTP settings.

use std::time::Duration;

use crate::auth::Authenticator;
use crate::graphql::{ApiSchema, Services};

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

impl ServerConfig {
    /// The HTTP settings these settings describe.
    pub fn from_settings(api: &crate::settings::ApiSettings) -> Self {
        Self {
            body_limit: api.api_body_limit.max(1),
            ws_message_limit: api.api_ws_message_limit.max(64),
            ws_init_timeout: Duration::from_millis(api.api_ws_init_timeout_ms.max(1)),
            ws_max_subscriptions: api.api_ws_max_subscriptions.max(1),
            cors_origins: api
                .api_cors_origins
                .iter()
                .map(|o| o.trim().to_owned())
                .filter(|o| !o.is_empty())
                .collect(),
        }
    }
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
    /// Accepted documents, run without extensions (`graphql::fast`).
    pub fast: crate::graphql::fast::FastPath,
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
    pub hub: super::hub::Hub,
    /// Parsed documents of recent queries.
    pub documents: crate::graphql::DocumentCache,
}
