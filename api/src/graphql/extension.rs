//! The schema's one extension: it measures every document against the
//! API's limits before anything else walks it (see [`super::limits`]),
//! gives parse and validation errors their codes, times top-level
//! resolvers, and does not validate again a document the schema has
//! already accepted.
//!
//! Validation walks the whole document with some twenty rules; for a small
//! query that is a tenth of the API's CPU, and clients send the same few
//! documents over and over with different variables. Whether a document is
//! valid depends on the document, the operation chosen and the schema, and
//! on one thing of the request: its variables' values must fit the
//! arguments they are used in. (What a document costs may depend on its
//! variables too — `first: $n` — which is why the limits are measured on
//! every request, before this cache is consulted.)
//!
//! So once `(query, operation)` has passed full validation, a later request
//! for it reuses the result if its variables pass a strict check of their
//! own: every variable the operation declares is given, not null, and fits
//! its declared type (scalars, enums and lists of them; input objects are
//! not checked here). Any request whose variables this check does not
//! accept goes through full validation, which gives the usual error. The
//! check may refuse a request full validation would accept (that only
//! costs the full walk); it never accepts one that full validation would
//! refuse.
//!
//! Errors found before execution carry `extensions.code`:
//! `GRAPHQL_PARSE_FAILED`, `GRAPHQL_VALIDATION_FAILED`, or the limit's own
//! (`QUERY_TOO_LARGE`, `QUERY_TOO_DEEP`, `QUERY_TOO_COMPLEX`); the
//! WebSocket transport answers a subscription refused with one of these
//! with the protocol's `error` message ([`is_request_error`]).
//!
//! One extension, not two: with any extension installed every field's
//! resolution passes through the chain, and each member costs every field a
//! boxed future.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use async_graphql::extensions::{
    Extension, ExtensionContext, ExtensionFactory, NextParseQuery, NextPrepareRequest, NextResolve,
    NextValidation, ResolveInfo,
};
use async_graphql::parser::types::{
    BaseType, ExecutableDocument, OperationDefinition, Selection, Type,
};
use async_graphql::registry::{MetaType, Registry};
use async_graphql::{SchemaEnv, ServerError, ServerResult, ValidationResult, Value, Variables};

use super::limits::{self, Limits};

/// Which document and operation a request runs (the key of the cache).
type Key = (String, Option<String>);

/// Codes of errors found before execution.
const PARSE_FAILED: &str = "GRAPHQL_PARSE_FAILED";
const VALIDATION_FAILED: &str = "GRAPHQL_VALIDATION_FAILED";

/// Whether `error` refused the request before it executed (a parse or
/// validation error, or a limit): the codes this extension gives.
pub fn is_request_error(error: &ServerError) -> bool {
    matches!(
        error.extensions.as_ref().and_then(|x| x.get("code")),
        Some(Value::String(code)) if matches!(
            code.as_str(),
            PARSE_FAILED | VALIDATION_FAILED | "QUERY_TOO_LARGE" | "QUERY_TOO_DEEP" | "QUERY_TOO_COMPLEX"
        )
    )
}

/// `error` with `extensions.code` set to `code`, unless it has one.
fn with_code(mut error: ServerError, code: &str) -> ServerError {
    let extensions = error.extensions.get_or_insert_with(Default::default);
    if extensions.get("code").is_none() {
        extensions.set("code", code);
    }
    error
}

/// The extension factory, shared by the requests of a schema.
pub struct ApiExtension {
    limits: Limits,
    accepted: Arc<Accepted>,
}

impl ApiExtension {
    /// The extension measuring documents against `limits` and keeping what
    /// passed full validation in `accepted`.
    pub fn new(limits: Limits, accepted: Arc<Accepted>) -> Self {
        Self { limits, accepted }
    }
}

/// Operations of documents that passed full validation, by query text.
type Entries = HashMap<String, Vec<(Option<String>, ValidationResult)>>;

/// Documents that passed full validation (shared with the fast path of
/// `super::fast`, which runs them without extensions).
#[derive(Default)]
pub struct Accepted {
    entries: Mutex<Entries>,
    /// Names of fields that take a page size (a `first` argument).
    paged: OnceLock<HashSet<String>>,
    /// The strict schema's environment (its registry), kept by its first
    /// request: what the fast path checks variables against.
    env: OnceLock<SchemaEnv>,
}

impl Accepted {
    /// Documents kept at most; the cache starts over when full.
    const ENTRIES: usize = 1_000;
    /// Longest query text kept, bytes.
    const LONGEST: usize = 16 * 1024;

    fn lock(&self) -> MutexGuard<'_, Entries> {
        // Held for a lookup or an insert only; a panic leaves a usable map.
        crate::sync::lock(&self.entries)
    }

    fn paged(&self, registry: &Registry) -> &HashSet<String> {
        self.paged.get_or_init(|| paged_fields(registry))
    }

    /// The result of full validation of `(query, operation)`, if it passed.
    fn get(&self, query: &str, operation: Option<&str>) -> Option<ValidationResult> {
        self.lock()
            .get(query)
            .and_then(|ops| ops.iter().find(|(op, _)| op.as_deref() == operation))
            .map(|(_, result)| *result)
    }

    fn insert(&self, (query, operation): Key, result: ValidationResult) {
        let mut entries = self.lock();
        if entries.len() >= Self::ENTRIES {
            entries.clear();
        }
        let ops = entries.entry(query).or_default();
        if !ops.iter().any(|(op, _)| *op == operation) {
            ops.push((operation, result));
        }
    }

    /// The one top-level field of `document`'s operation if the request
    /// may skip the extension: `(query, operation)` passed full validation,
    /// the variables fit the operation's declarations, the document is
    /// within `limits`, and the operation selects one field without
    /// directives. `None`: run it on the strict schema.
    pub fn admits(
        &self,
        document: &ExecutableDocument,
        query: &str,
        operation: Option<&str>,
        variables: &Variables,
        limits: &Limits,
    ) -> Option<String> {
        let env = self.env.get()?;
        self.get(query, operation)?;
        let definition = limits::operation(document, operation)?;
        let [selection] = definition.selection_set.node.items.as_slice() else {
            return None;
        };
        let Selection::Field(field) = &selection.node else {
            return None;
        };
        if !field.node.directives.is_empty() || !definition.directives.is_empty() {
            return None;
        }
        if !variables_fit(&env.registry, definition, variables) {
            return None;
        }
        let paged = self.paged(&env.registry);
        limits::check(document, operation, variables, paged, limits).ok()?;
        Some(field.node.name.node.to_string())
    }
}

/// Names of the schema's fields that take a page size (`first`).
pub fn paged_fields(registry: &Registry) -> HashSet<String> {
    registry
        .types
        .values()
        .filter_map(|ty| match ty {
            MetaType::Object { fields, .. } | MetaType::Interface { fields, .. } => Some(fields),
            _ => None,
        })
        .flat_map(|fields| fields.values())
        .filter(|field| field.args.contains_key("first"))
        .map(|field| field.name.clone())
        .collect()
}

impl ExtensionFactory for ApiExtension {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(RequestExtension {
            limits: self.limits,
            accepted: self.accepted.clone(),
            state: Mutex::new(State::default()),
        })
    }
}

/// The extension of one request.
struct RequestExtension {
    limits: Limits,
    accepted: Arc<Accepted>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The operation the request names.
    operation: Option<String>,
    /// The request's key (`None`: not cacheable).
    key: Option<Key>,
    /// A result reused for this request (its variables passed the check).
    reuse: Option<ValidationResult>,
}

impl RequestExtension {
    fn state(&self) -> MutexGuard<'_, State> {
        crate::sync::lock(&self.state)
    }
}

#[async_graphql::async_trait::async_trait]
impl Extension for RequestExtension {
    async fn prepare_request(
        &self,
        ctx: &ExtensionContext<'_>,
        request: async_graphql::Request,
        next: NextPrepareRequest<'_>,
    ) -> ServerResult<async_graphql::Request> {
        self.accepted.env.get_or_init(|| ctx.schema_env.clone());
        let mut request = next.run(ctx, request).await?;
        // Before anything walks the document — async-graphql's own
        // recursion check, run with parsing, follows every fragment spread
        // without memoising, as validation and execution do: a document
        // over the limits is refused here. (The parse, kept in the request,
        // is not repeated; a document that does not parse is left to the
        // parse stage, which reports why.)
        let variables = std::mem::take(&mut request.variables);
        let operation = request.operation_name.take();
        let measured = match request.parsed_query() {
            Ok(document) => limits::check(
                document,
                operation.as_deref(),
                &variables,
                self.accepted.paged(&ctx.schema_env.registry),
                &self.limits,
            )
            .map(|_| ()),
            Err(_) => Ok(()),
        };
        request.variables = variables;
        request.operation_name = operation;
        if let Err(refused) = measured {
            return Err(crate::error::ApiError::Document {
                code: refused.code(),
                message: refused.to_string(),
            }
            .into_server_error());
        }
        let mut state = self.state();
        state.operation.clone_from(&request.operation_name);
        if request.query.len() <= Accepted::LONGEST {
            state.key = Some((request.query.clone(), request.operation_name.clone()));
        }
        Ok(request)
    }

    async fn parse_query(
        &self,
        ctx: &ExtensionContext<'_>,
        query: &str,
        variables: &Variables,
        next: NextParseQuery<'_>,
    ) -> ServerResult<ExecutableDocument> {
        let document = next
            .run(ctx, query, variables)
            .await
            .map_err(|e| with_code(e, PARSE_FAILED))?;
        let registry = &ctx.schema_env.registry;
        let mut state = self.state();
        let accepted = match &state.key {
            Some((q, operation)) if q == query => self.accepted.get(query, operation.as_deref()),
            _ => None,
        };
        if let Some(result) = accepted {
            let operation = limits::operation(&document, state.operation.as_deref());
            if operation.is_some_and(|op| variables_fit(registry, op, variables)) {
                state.reuse = Some(result);
            }
        }
        Ok(document)
    }

    async fn validation(
        &self,
        ctx: &ExtensionContext<'_>,
        next: NextValidation<'_>,
    ) -> Result<ValidationResult, Vec<ServerError>> {
        if let Some(result) = self.state().reuse {
            return Ok(result);
        }
        let result = next.run(ctx).await.map_err(|errors| {
            errors
                .into_iter()
                .map(|e| with_code(e, VALIDATION_FAILED))
                .collect::<Vec<_>>()
        })?;
        let key = self.state().key.take();
        if let Some(key) = key {
            self.accepted.insert(key, result);
        }
        Ok(result)
    }

    async fn resolve(
        &self,
        ctx: &ExtensionContext<'_>,
        info: ResolveInfo<'_>,
        next: NextResolve<'_>,
    ) -> ServerResult<Option<Value>> {
        // Top-level fields only: nested fields are plain struct reads.
        if info.path_node.parent.is_some() {
            return next.run(ctx, info).await;
        }
        let field = info.name;
        let started = Instant::now();
        let result = next.run(ctx, info).await;
        crate::telemetry::metrics::resolver(field, started.elapsed());
        result
    }
}

/// Whether every variable `operation` declares is given, not null, and
/// fits its type. `false` means "validate fully", not "invalid".
fn variables_fit(
    registry: &Registry,
    operation: &OperationDefinition,
    variables: &Variables,
) -> bool {
    operation.variable_definitions.iter().all(|definition| {
        let definition = &definition.node;
        match variables.get(&definition.name.node) {
            None | Some(Value::Null) => false,
            Some(value) => fits(registry, &definition.var_type.node, value),
        }
    })
}

fn fits(registry: &Registry, ty: &Type, value: &Value) -> bool {
    if matches!(value, Value::Null) {
        return ty.nullable;
    }
    match &ty.base {
        BaseType::List(item) => match value {
            Value::List(items) => items.iter().all(|v| fits(registry, item, v)),
            // A single value is coerced to a list of one.
            single => fits(registry, item, single),
        },
        BaseType::Named(name) => match registry.types.get(name.as_str()) {
            Some(MetaType::Scalar { is_valid, .. }) => is_valid.as_ref().is_none_or(|f| f(value)),
            Some(MetaType::Enum { enum_values, .. }) => match value {
                Value::String(s) => enum_values.contains_key(s.as_str()),
                Value::Enum(name) => enum_values.contains_key(name.as_str()),
                _ => false,
            },
            // Input objects (and anything else): full validation.
            _ => false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_graphql::{EmptyMutation, EmptySubscription, Object, Schema, ID};
    use serde_json::json;

    struct Query;

    #[derive(async_graphql::SimpleObject)]
    struct Thing {
        v: i32,
    }

    #[Object]
    impl Query {
        async fn item(&self, id: ID) -> String {
            id.to_string()
        }
        async fn items(&self, first: Option<i32>) -> Vec<Thing> {
            (0..first.unwrap_or(1)).map(|v| Thing { v }).collect()
        }
        async fn other(&self) -> i32 {
            2
        }
    }

    const LIMITS: Limits = Limits {
        max_fields: 100,
        max_depth: 5,
        max_complexity: 1_000,
        max_page: 500,
    };

    /// What the fast path admits: only what the strict schema accepted,
    /// with fitting variables, within the limits, one field, no directives.
    #[tokio::test]
    async fn the_fast_path_admits_only_accepted_documents_that_still_fit() {
        let accepted = Arc::new(Accepted::default());
        let schema = Schema::build(Query, EmptyMutation, EmptySubscription)
            .extension(ApiExtension::new(LIMITS, accepted.clone()))
            .finish();
        let admits = |query: &str, variables: serde_json::Value| {
            let variables = Variables::from_json(variables);
            accepted.admits(&document(query), query, None, &variables, &LIMITS)
        };
        let run = |query: &'static str, variables: serde_json::Value| {
            let schema = schema.clone();
            async move {
                let request =
                    async_graphql::Request::new(query).variables(Variables::from_json(variables));
                schema.execute(request).await
            }
        };
        let item = "query($id: ID!) { item(id: $id) }";
        assert_eq!(admits(item, json!({"id": "a"})), None, "never validated");
        assert!(run(item, json!({"id": "a"})).await.is_ok());
        assert_eq!(admits(item, json!({"id": "b"})), Some("item".to_owned()));
        assert_eq!(admits(item, json!({})), None, "a variable missing");
        assert_eq!(admits(item, json!({"id": null})), None, "null for ID!");
        assert_eq!(admits(item, json!({"id": [1, 2]})), None, "a list for ID");

        let refused = "query($id: ID!) { item(id: $id) nope }";
        assert!(run(refused, json!({"id": "a"})).await.is_err());
        assert_eq!(admits(refused, json!({"id": "a"})), None, "refused");

        let two = "{ item(id: \"a\") other }";
        assert!(run(two, json!({})).await.is_ok());
        assert_eq!(admits(two, json!({})), None, "two top-level fields");

        let directive = "query($id: ID!) { item(id: $id) @include(if: true) }";
        assert!(run(directive, json!({"id": "a"})).await.is_ok());
        assert_eq!(admits(directive, json!({"id": "a"})), None, "a directive");

        let paged = "query($n: Int) { items(first: $n) { v } }";
        assert!(run(paged, json!({"n": 2})).await.is_ok());
        assert_eq!(admits(paged, json!({"n": 3})), Some("items".to_owned()));
        assert_eq!(admits(paged, json!({"n": 500})), Some("items".to_owned()));
        // The same request with a complexity limit it is over.
        let over = Limits {
            max_complexity: 100,
            ..LIMITS
        };
        let variables = Variables::from_json(json!({"n": 400}));
        assert_eq!(
            accepted.admits(&document(paged), paged, None, &variables, &over),
            None,
            "over the complexity limit for these variables"
        );
    }

    fn document(query: &str) -> ExecutableDocument {
        async_graphql::parser::parse_query(query).unwrap_or_else(|e| panic!("{query}: {e}"))
    }

    #[test]
    fn operation_is_the_named_one_or_the_only_one() {
        let two = document("query A { a } query B { b }");
        let operation = limits::operation;
        assert!(operation(&two, None).is_none());
        assert!(operation(&two, Some("B")).is_some());
        assert!(operation(&two, Some("C")).is_none());
        let one = document("{ a }");
        assert!(operation(&one, None).is_some());
        assert!(operation(&one, Some("A")).is_none());
    }
}
