//! The schema's one extension: it times top-level resolvers and does not
//! validate again a document the schema has already accepted.
//!
//! Validation walks the whole document with some twenty rules; for a small
//! query that is a tenth of the API's CPU, and clients send the same few
//! documents over and over with different variables. Whether a document is
//! valid depends on the document, the operation chosen and the schema, except
//! for two things that depend on the variables:
//! - the variables' values must fit the arguments they are used in, and
//! - a field whose complexity is computed from its arguments (`first × …`)
//!   may count differently.
//!
//! So once `(query, operation)` has passed full validation, a later request
//! for it reuses the result if its variables pass a strict check of their
//! own: every variable the operation declares is given, not null, and fits
//! its declared type (scalars, enums and lists of them; input objects are
//! not checked here). A document whose complexity may depend on variables,
//! and any request whose variables this check does not accept, goes through
//! full validation, which gives the usual error. The check may refuse a
//! request full validation would accept (that only costs the full walk); it
//! never accepts one that full validation would refuse.
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
    BaseType, DocumentOperations, ExecutableDocument, OperationDefinition, Selection, SelectionSet,
    Type,
};
use async_graphql::registry::{MetaType, Registry};
use async_graphql::{ServerError, ServerResult, ValidationResult, Value, Variables};

/// Which document and operation a request runs (the key of the cache).
type Key = (String, Option<String>);

/// The extension factory, shared by the requests of a schema.
#[derive(Default)]
pub struct ApiExtension {
    accepted: Arc<Accepted>,
}

/// Documents that passed full validation.
#[derive(Default)]
struct Accepted {
    entries: Mutex<HashMap<Key, Entry>>,
    /// Names of fields whose complexity is computed from their arguments.
    complexity_fields: OnceLock<HashSet<String>>,
}

#[derive(Clone, Copy)]
struct Entry {
    result: ValidationResult,
    /// Complexity may depend on variables: validate every time.
    varies: bool,
}

impl Accepted {
    /// Documents kept at most; the cache starts over when full.
    const ENTRIES: usize = 1_000;
    /// Longest query text kept, bytes.
    const LONGEST: usize = 16 * 1024;

    fn lock(&self) -> MutexGuard<'_, HashMap<Key, Entry>> {
        // Held for a lookup or an insert only; a panic leaves a usable map.
        match self.entries.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn complexity_fields(&self, registry: &Registry) -> &HashSet<String> {
        self.complexity_fields.get_or_init(|| {
            registry
                .types
                .values()
                .filter_map(|ty| match ty {
                    MetaType::Object { fields, .. } | MetaType::Interface { fields, .. } => {
                        Some(fields)
                    }
                    _ => None,
                })
                .flat_map(|fields| fields.values())
                .filter(|field| field.compute_complexity.is_some())
                .map(|field| field.name.clone())
                .collect()
        })
    }
}

impl ExtensionFactory for ApiExtension {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(RequestExtension {
            accepted: self.accepted.clone(),
            state: Mutex::new(State::default()),
        })
    }
}

/// The extension of one request.
struct RequestExtension {
    accepted: Arc<Accepted>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The request's key (`None`: not cacheable).
    key: Option<Key>,
    /// A result reused for this request (its variables passed the check).
    reuse: Option<ValidationResult>,
}

impl RequestExtension {
    fn state(&self) -> MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
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
        let request = next.run(ctx, request).await?;
        if request.query.len() <= Accepted::LONGEST {
            self.state().key = Some((request.query.clone(), request.operation_name.clone()));
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
        let document = next.run(ctx, query, variables).await?;
        let mut state = self.state();
        let entry = match &state.key {
            Some(key) if key.0 == query => self.accepted.lock().get(key).copied(),
            _ => None,
        };
        if let Some(entry) = entry {
            let operation = state
                .key
                .as_ref()
                .and_then(|(_, name)| operation(&document, name.as_deref()));
            let registry = &ctx.schema_env.registry;
            if !entry.varies && operation.is_some_and(|op| variables_fit(registry, op, variables)) {
                state.reuse = Some(entry.result);
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
        let result = next.run(ctx).await?;
        let key = self.state().key.take();
        if let Some(key) = key {
            let varies = {
                // Parsing again is rare (once per new document); the
                // document itself is not handed to this hook.
                let fields = self.accepted.complexity_fields(&ctx.schema_env.registry);
                async_graphql::parser::parse_query(&key.0)
                    .map_or(true, |document| complexity_may_vary(&document, fields))
            };
            let mut entries = self.accepted.lock();
            if entries.len() >= Accepted::ENTRIES {
                entries.clear();
            }
            entries.insert(key, Entry { result, varies });
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
        crate::metrics::resolver(field, started.elapsed());
        result
    }
}

/// The operation a request runs: the one named, or the only one.
fn operation<'a>(
    document: &'a ExecutableDocument,
    name: Option<&str>,
) -> Option<&'a OperationDefinition> {
    match (&document.operations, name) {
        (DocumentOperations::Single(op), None) => Some(&op.node),
        (DocumentOperations::Single(_), Some(_)) => None,
        (DocumentOperations::Multiple(ops), Some(name)) => ops.get(name).map(|op| &op.node),
        (DocumentOperations::Multiple(ops), None) if ops.len() == 1 => {
            ops.values().next().map(|op| &op.node)
        }
        (DocumentOperations::Multiple(_), None) => None,
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

/// Whether the document's complexity may depend on its variables: it uses
/// variables and selects a field whose complexity is computed from its
/// arguments.
fn complexity_may_vary(document: &ExecutableDocument, fields: &HashSet<String>) -> bool {
    let uses_variables = document
        .operations
        .iter()
        .any(|(_, op)| !op.node.variable_definitions.is_empty());
    if !uses_variables || fields.is_empty() {
        return false;
    }
    document
        .operations
        .iter()
        .any(|(_, op)| selects_any(&op.node.selection_set.node, fields))
        || document
            .fragments
            .values()
            .any(|fragment| selects_any(&fragment.node.selection_set.node, fields))
}

fn selects_any(set: &SelectionSet, fields: &HashSet<String>) -> bool {
    set.items.iter().any(|selection| match &selection.node {
        Selection::Field(field) => {
            fields.contains(field.node.name.node.as_str())
                || selects_any(&field.node.selection_set.node, fields)
        }
        Selection::InlineFragment(fragment) => {
            selects_any(&fragment.node.selection_set.node, fields)
        }
        // Fragment definitions are checked on their own.
        Selection::FragmentSpread(_) => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn document(query: &str) -> ExecutableDocument {
        async_graphql::parser::parse_query(query).unwrap_or_else(|e| panic!("{query}: {e}"))
    }

    #[test]
    fn complexity_varies_only_with_variables_and_a_computed_field() {
        let fields: HashSet<String> = ["agents".to_owned()].into();
        let cases = [
            ("query($id: ID!) { agent(id: $id) { id } }", false),
            ("{ agents(first: 5) { edges { node { id } } } }", false),
            ("query($n: Int) { agents(first: $n) { edges { node { id } } } }", true),
            (
                "query($n: Int) { ...F } fragment F on Query { agents(first: $n) { edges { node { id } } } }",
                true,
            ),
            (
                "query($id: ID!) { agent(id: $id) { ... on Agent { id } } }",
                false,
            ),
        ];
        for (query, varies) in cases {
            assert_eq!(
                complexity_may_vary(&document(query), &fields),
                varies,
                "{query}"
            );
        }
    }

    #[test]
    fn operation_is_the_named_one_or_the_only_one() {
        let two = document("query A { a } query B { b }");
        assert!(operation(&two, None).is_none());
        assert!(operation(&two, Some("B")).is_some());
        assert!(operation(&two, Some("C")).is_none());
        let one = document("{ a }");
        assert!(operation(&one, None).is_some());
        assert!(operation(&one, Some("A")).is_none());
    }
}
