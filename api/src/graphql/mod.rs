//! The GraphQL schema: queries on the read models (Redis, the graph),
//! mutations (one per domain command), subscriptions fed by the change
//! feed, and audit queries on the event store.
//!
//! Every resolver takes the caller's [`Principal`] from the request data:
//! the tenant scopes what it reads and writes (another tenant's ids read as
//! absent), and its roles decide what it may do (`FORBIDDEN` otherwise).
//! Errors carry `extensions.code`.

pub mod audit;
mod extension;
pub mod fast;
pub use extension::is_request_error;
pub mod feed;
pub mod ids;
pub mod limits;
pub mod mutations;
pub mod near;
pub mod reads;
pub mod subscriptions;
pub mod types;

use async_graphql::parser::types::ExecutableDocument;
use std::time::Duration;

use async_graphql::{
    Context, InputValueError, InputValueResult, MergedObject, Scalar, ScalarType, Value,
};
use commands::{CommandHandler, EventStore};
use projections::{GraphModel, RedisModel};

use crate::auth::{Principal, Role};
use crate::error::{unavailable, ApiError};

/// The schema type.
pub type ApiSchema = async_graphql::Schema<Query, mutations::Mutation, subscriptions::Subscription>;

/// All queries.
#[derive(MergedObject, Default)]
pub struct Query(reads::ReadQuery, audit::AuditQuery);

/// Limits and timeouts of the API.
#[derive(Debug, Clone)]
pub struct ApiLimits {
    /// How long a read waits for `atLeastPosition` before `STALE`.
    pub consistency_timeout: Duration,
    /// Largest page of a connection or of the event log.
    pub max_page: usize,
    /// Query depth limit (introspection aside).
    pub max_depth: usize,
    /// Query complexity limit (a field counts 1, a page of `first` counts
    /// `first` times its selection; introspection aside).
    pub max_complexity: usize,
    /// Most field selections a document may expand to.
    pub max_fields: usize,
    /// Whether introspection is allowed.
    pub introspection: bool,
    /// Messages buffered per subscriber before it is cut off.
    pub subscriber_buffer: usize,
    /// Agents kept by `agent(id)`'s near cache (0: none).
    pub agent_cache: usize,
}

impl ApiLimits {
    /// The GraphQL limits these settings describe.
    pub fn from_settings(api: &crate::settings::ApiSettings) -> Self {
        Self {
            consistency_timeout: Duration::from_millis(api.api_consistency_timeout_ms),
            max_page: api.api_max_page.max(1),
            max_depth: api.api_max_depth.max(1),
            max_complexity: api.api_max_complexity.max(1),
            max_fields: api.api_max_fields.max(1),
            introspection: api.api_introspection,
            subscriber_buffer: api.api_subscriber_buffer.max(1),
            agent_cache: api.api_agent_cache,
        }
    }
}

impl Default for ApiLimits {
    fn default() -> Self {
        Self {
            consistency_timeout: Duration::from_secs(5),
            max_page: 500,
            max_depth: 12,
            max_complexity: 20_000,
            max_fields: 2_000,
            introspection: true,
            subscriber_buffer: 1_024,
            agent_cache: 100_000,
        }
    }
}

impl ApiLimits {
    /// The limits a document is measured against.
    pub fn document(&self) -> limits::Limits {
        limits::Limits {
            max_fields: self.max_fields,
            max_depth: self.max_depth,
            max_complexity: self.max_complexity,
            max_page: self.max_page,
        }
    }
}

/// What resolvers use: the event store, the command handler and the read
/// models. Shared by every request (schema data).
#[derive(Clone)]
pub struct Services {
    /// The event store (audit queries, subscription catch-up).
    pub store: EventStore,
    /// Commands (mutations).
    pub handler: CommandHandler,
    /// The Redis read model.
    pub redis: RedisModel,
    /// The graph read model.
    pub graph: GraphModel,
    /// The change feed shared by the subscribers of this process.
    pub feed: subscriptions::Feed,
    /// Limits.
    pub limits: ApiLimits,
    /// The sealed log's name and keys (audit proofs).
    pub seals: audit::proof::Seals,
}

/// Per-request data beside the principal.
#[derive(Debug, Clone, Default)]
pub struct RequestMeta {
    /// `X-Min-Position`: every read waits for this position.
    pub min_position: Option<i64>,
    /// The caller's W3C `traceparent`, carried onto the events it causes.
    pub traceparent: Option<String>,
}

/// The API's schemas: the strict one and the fast path (see [`fast`]).
pub struct Schemas {
    /// With the extension: limits, full validation, error codes.
    pub strict: ApiSchema,
    /// Documents the strict schema accepted, run without extensions.
    pub fast: fast::FastPath,
}

/// Builds the schemas with their limits.
pub fn schemas(services: Services) -> Schemas {
    let limits = services.limits.clone();
    let accepted = std::sync::Arc::new(extension::Accepted::default());
    let build = || {
        let builder = async_graphql::Schema::build(
            Query::default(),
            mutations::Mutation,
            subscriptions::Subscription,
        )
        // Depth and complexity are measured by the extension (or the fast
        // path), before validation (async-graphql's own limits walk
        // fragments inline, count introspection and name no numbers).
        .limit_recursive_depth(64)
        .limit_directives(16);
        if limits.introspection {
            builder
        } else {
            builder.disable_introspection()
        }
    };
    let strict = build()
        .extension(extension::ApiExtension::new(
            limits.document(),
            accepted.clone(),
        ))
        .data(services.clone())
        .finish();
    let fast = build()
        .validation_mode(async_graphql::ValidationMode::Fast)
        .data(services)
        .finish();
    Schemas {
        strict,
        fast: fast::FastPath::new(fast, accepted, limits.document()),
    }
}

/// Builds the strict schema alone (the shape of the API: its SDL).
pub fn schema(services: Services) -> ApiSchema {
    schemas(services).strict
}

/// Parsed documents by query text, shared by the requests of a process:
/// clients send the same few documents with different variables, and
/// parsing is the largest single cost of a small query. Bounded: queries
/// longer than [`DocumentCache::LONGEST`] bytes are not kept, and the cache
/// starts over when it holds [`DocumentCache::ENTRIES`] documents. Only
/// parsing is skipped here; the schema's extension decides whether the
/// document must be validated again (see `extension`).
#[derive(Debug, Default)]
pub struct DocumentCache {
    entries: std::sync::Mutex<std::collections::HashMap<String, ExecutableDocument>>,
}

impl DocumentCache {
    /// Documents kept at most.
    pub const ENTRIES: usize = 1_000;
    /// Longest query text kept, bytes.
    pub const LONGEST: usize = 16 * 1024;

    /// The parsed document of `query`, from the cache or parsed now (and
    /// kept); `None` if it does not parse (execution reports why).
    pub fn parsed(&self, query: &str) -> Option<ExecutableDocument> {
        if query.len() > Self::LONGEST {
            return async_graphql::parser::parse_query(query).ok();
        }
        if let Some(document) = self.lock().get(query) {
            return Some(document.clone());
        }
        let document = async_graphql::parser::parse_query(query).ok()?;
        let mut entries = self.lock();
        if entries.len() >= Self::ENTRIES {
            entries.clear();
        }
        entries.insert(query.to_owned(), document.clone());
        Some(document)
    }

    /// Gives `request` its parsed document, so the schema does not parse it.
    pub fn prepare(&self, request: &mut async_graphql::Request) {
        if let Some(document) = self.parsed(&request.query) {
            request.set_parsed_query(document);
        }
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, ExecutableDocument>> {
        // Held for a lookup or an insert only; a panic leaves a usable map.
        crate::sync::lock(&self.entries)
    }
}

/// The services of the schema.
pub fn services<'a>(ctx: &Context<'a>) -> &'a Services {
    // `schema` always puts them in; a schema built otherwise is a bug.
    ctx.data_unchecked::<Services>()
}

/// The caller, if allowed what `role` allows: `UNAUTHENTICATED` without a
/// principal, `FORBIDDEN` without the role.
pub fn caller<'a>(ctx: &Context<'a>, role: Role) -> async_graphql::Result<&'a Principal> {
    let principal = ctx.data_opt::<Principal>().ok_or_else(|| {
        async_graphql::Error::from(ApiError::Unauthenticated(
            "no valid bearer token; `neurectomy token` mints one".into(),
        ))
    })?;
    if principal.may(role) {
        Ok(principal)
    } else {
        Err(ApiError::Forbidden(format!(
            "this needs the `{}` role; the token grants {}",
            role.as_str(),
            principal
                .roles
                .iter()
                .map(|r| r.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))
        .into())
    }
}

/// A global event-store position. Serialized as a string of digits (64-bit
/// values exceed what JSON numbers carry exactly in JavaScript); accepted as
/// a string or an integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position(pub i64);

#[Scalar(name = "Position")]
impl ScalarType for Position {
    fn parse(value: Value) -> InputValueResult<Self> {
        let parsed = match &value {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => s.parse().ok(),
            _ => None,
        };
        match parsed {
            Some(p) if p >= 0 => Ok(Position(p)),
            _ => Err(InputValueError::custom(
                "a position is a non-negative 64-bit integer (as a string or a number)",
            )),
        }
    }

    fn is_valid(value: &Value) -> bool {
        Self::parse(value.clone()).is_ok()
    }

    fn to_value(&self) -> Value {
        Value::String(self.0.to_string())
    }
}

/// A point in time: an RFC 3339 string with a time zone, e.g.
/// `2026-11-24T12:00:00.123Z` (written in UTC; read with any offset).
/// GraphQL's `Int` is 32-bit, so times are never epoch numbers here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct DateTime(pub time::OffsetDateTime);

impl DateTime {
    /// From epoch milliseconds (as the read models store times).
    pub fn from_millis(ms: i64) -> Self {
        let nanos = i128::from(ms) * 1_000_000;
        Self(
            time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
        )
    }
}

#[Scalar(
    name = "DateTime",
    specified_by_url = "https://datatracker.ietf.org/doc/html/rfc3339"
)]
impl ScalarType for DateTime {
    fn parse(value: Value) -> InputValueResult<Self> {
        let parsed = match &value {
            Value::String(s) => time::OffsetDateTime::parse(
                s.trim(),
                &time::format_description::well_known::Rfc3339,
            )
            .ok(),
            _ => None,
        };
        parsed.map(DateTime).ok_or_else(|| {
            InputValueError::custom(
                "a DateTime is an RFC 3339 string with a time zone, such as 2026-11-24T12:00:00Z or 2026-11-24T13:00:00.5+01:00",
            )
        })
    }

    // A literal that does not parse is refused by validation (with the
    // other errors of the document), not when the field runs.
    fn is_valid(value: &Value) -> bool {
        Self::parse(value.clone()).is_ok()
    }

    fn to_value(&self) -> Value {
        let utc = self.0.to_offset(time::UtcOffset::UTC);
        // Formatting fails only outside years 0–9999, which no stored time
        // reaches; the number of seconds is still a time then.
        Value::String(
            utc.format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_else(|_| utc.unix_timestamp().to_string()),
        )
    }
}

/// Which read model a resolver reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadModelKind {
    /// Redis.
    Redis,
    /// The graph.
    Graph,
}

/// A resolver's body, boxed. async-graphql awaits a type's resolvers inside
/// one generated future per field (the largest resolver's state sets its
/// size) and moves that future, whole, into a box for every field it
/// resolves — for a small read, tens of KB copied per request. With the
/// bodies boxed, each resolver adds a pointer to that future.
pub(crate) fn boxed<'a, T>(
    body: impl std::future::Future<Output = T> + Send + 'a,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>> {
    Box::pin(body)
}

/// Whether the request asks every read to wait for a position
/// (`X-Min-Position`).
pub fn has_min_position(ctx: &Context<'_>) -> bool {
    ctx.data_opt::<RequestMeta>()
        .is_some_and(|m| m.min_position.is_some())
}

/// Read-your-writes: waits until the read model has applied the larger of
/// `at_least` and the request's `X-Min-Position`, up to the configured
/// timeout; `STALE` if it does not get there.
pub async fn consistent(
    ctx: &Context<'_>,
    model: ReadModelKind,
    at_least: Option<Position>,
) -> async_graphql::Result<()> {
    let header = ctx.data_opt::<RequestMeta>().and_then(|m| m.min_position);
    let Some(wanted) = at_least.map(|p| p.0).max(header) else {
        return Ok(());
    };
    // Boxed: the checkpoint reads' state (the graph driver's is KBs) is
    // not carried by every read that asks for no position.
    boxed(reach(ctx, model, wanted)).await
}

/// [`consistent`]'s wait for `wanted`. A model projected in partitions is
/// waited for in the caller's tenant's partition only: its
/// checkpoint is the position of the partition's last event applied, so
/// when a position of another partition is asked for (a header copied
/// from another tenant's write), the wait is for the last event of the
/// tenant's partition at or below it, looked up once.
async fn reach(ctx: &Context<'_>, model: ReadModelKind, wanted: i64) -> async_graphql::Result<()> {
    let services = services(ctx);
    let deadline = tokio::time::Instant::now() + services.limits.consistency_timeout;
    let tenant = ctx.data_opt::<Principal>().map(|p| p.tenant.as_str());
    let mut wanted = wanted;
    let mut looked_up = false;
    let mut pause = Duration::from_millis(1);
    loop {
        let reached = match (model, tenant) {
            (ReadModelKind::Redis, Some(tenant)) if services.redis.config().partitions > 1 => {
                let (partition, reached) = services
                    .redis
                    .read_checkpoint_of(tenant)
                    .await
                    .map_err(|e| unavailable("Redis", e))?;
                if reached < wanted && !looked_up {
                    looked_up = true;
                    wanted = services
                        .store
                        .last_in_partition(wanted, services.redis.config().partitions, partition)
                        .await
                        .map_err(|e| unavailable("the event store", e))?;
                }
                reached
            }
            (ReadModelKind::Redis, _) => services
                .redis
                .read_checkpoint()
                .await
                .map_err(|e| unavailable("Redis", e))?,
            (ReadModelKind::Graph, Some(tenant)) if services.graph.config().partitions > 1 => {
                let (partition, reached) = services
                    .graph
                    .read_checkpoint_of(tenant)
                    .await
                    .map_err(|e| unavailable("the graph", e))?;
                if reached < wanted && !looked_up {
                    looked_up = true;
                    wanted = services
                        .store
                        .last_in_partition(wanted, services.graph.config().partitions, partition)
                        .await
                        .map_err(|e| unavailable("the event store", e))?;
                }
                reached
            }
            (ReadModelKind::Graph, _) => services
                .graph
                .read_checkpoint()
                .await
                .map_err(|e| unavailable("the graph", e))?,
        };
        if reached >= wanted {
            return Ok(());
        }
        if tokio::time::Instant::now() + pause > deadline {
            let name = match model {
                ReadModelKind::Redis => "redis",
                ReadModelKind::Graph => "graph",
            };
            return Err(ApiError::Stale(format!(
                    "the {name} projection has applied position {reached}, not yet {wanted}, after {} ms; retry, or read without atLeastPosition",
                services.limits.consistency_timeout.as_millis()
            ))
            .into());
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(25));
    }
}
