//! The fast path: requests for documents the strict schema has accepted,
//! run on a second schema without extensions.
//!
//! With any extension installed, async-graphql sends every field's
//! resolution through the extension chain: a `ResolveInfo` built from two
//! registry look-ups, a boxed future per field and, for each item of a
//! list, its type names formatted — a fifth of the instructions of an
//! `agent(id)` request with four fields, and more the more fields a query
//! returns. Only a schema with no extension resolves fields directly.
//!
//! So the API has two schemas over the same types and services. The strict
//! one (with `super::extension`) runs a document the first time: it
//! measures it against the limits, validates it fully and gives its errors
//! their codes. A later request for a `(query, operation)` it accepted goes
//! to the fast one when [`Accepted::admits`] it — its variables fit the
//! operation's declarations, the document is within the limits for those
//! variables, and the operation selects one top-level field without
//! directives — where async-graphql's `Fast` validation still counts
//! complexity and depth and checks fragment cycles. Anything else (a batch,
//! several top-level fields, a request whose variables the check does not
//! accept) runs on the strict schema as before, so every refusal keeps its
//! code and message. The one top-level field's resolver time
//! (`neurectomy_graphql_resolver_seconds`) is taken around the execution.

use std::sync::Arc;

use async_graphql::{Request, Response};

use super::extension::Accepted;
use super::limits::Limits;
use super::ApiSchema;

/// The fast schema and what decides which requests it runs.
#[derive(Clone)]
pub struct FastPath {
    schema: ApiSchema,
    accepted: Arc<Accepted>,
    limits: Limits,
}

impl FastPath {
    pub(super) fn new(schema: ApiSchema, accepted: Arc<Accepted>, limits: Limits) -> Self {
        Self {
            schema,
            accepted,
            limits,
        }
    }

    /// The top-level field of `request` if the fast schema may run it
    /// (its parsed document must be in it already: `DocumentCache`).
    pub fn admits(&self, request: &mut Request) -> Option<String> {
        // Out of the request while its document is borrowed (restored).
        let operation = request.operation_name.take();
        let variables = std::mem::take(&mut request.variables);
        let query = std::mem::take(&mut request.query);
        let admitted = match request.parsed_query() {
            Ok(document) => self.accepted.admits(
                document,
                &query,
                operation.as_deref(),
                &variables,
                &self.limits,
            ),
            // Not parsed beforehand (the query text was taken out): strict.
            Err(_) => None,
        };
        request.query = query;
        request.variables = variables;
        request.operation_name = operation;
        admitted
    }

    /// Runs an admitted `request`, timing its top-level `field`.
    pub async fn execute(&self, request: Request, field: &str) -> Response {
        let started = std::time::Instant::now();
        let response = self.schema.execute(request).await;
        if field != "__typename" {
            crate::telemetry::metrics::resolver(field, started.elapsed());
        }
        response
    }
}
