//! What one GraphQL document may cost, measured before it is validated or
//! executed.
//!
//! Three numbers, each with its own limit (the error names both):
//!
//! - **fields**: field selections once every fragment spread is expanded.
//!   A document of a few hundred bytes can spread a fragment that spreads
//!   the next one twice, twenty levels down: millions of fields for the
//!   validator and the executor, which both expand spreads inline. Also
//!   bounded: the expansion of every fragment defined (an unused one is
//!   still walked by validation) and the document's own selections.
//! - **depth**: the deepest nesting of fields. Introspection (`__schema`,
//!   `__type` and what they select) does not count: its depth is fixed by
//!   the schema, and GraphiQL's and graphql-js's own introspection query
//!   nest `ofType` eight levels deep.
//! - **complexity**: every field counts 1, and a field with a page size
//!   (a `first` argument, given or by default) counts that many times its
//!   selection, so a full page is paid for; the page size is taken within
//!   `1..=max_page` (a resolver refuses any other with the page limit in
//!   its message). Introspection does not count here either.
//!
//! The walk is linear in the document's size: each fragment is measured
//! once (memoised), and a spread adds its fragment's figures. Arithmetic
//! saturates, so a bomb measures as `u64::MAX`, not as an overflow.

use std::collections::{HashMap, HashSet};

use async_graphql::parser::types::{
    DocumentOperations, ExecutableDocument, Field, OperationDefinition, Selection, SelectionSet,
};
use async_graphql::{Value, Variables};

/// Page size of a field whose `first` is not given.
pub const DEFAULT_PAGE: usize = 50;

/// The limits a document is measured against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most field selections, fragments expanded.
    pub max_fields: usize,
    /// Deepest nesting of fields (introspection aside).
    pub max_depth: usize,
    /// Highest complexity (introspection aside).
    pub max_complexity: usize,
    /// Largest page size; larger `first`s are counted as this.
    pub max_page: usize,
}

/// What a document costs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cost {
    /// Field selections, fragments expanded.
    pub fields: u64,
    /// Deepest nesting of fields.
    pub depth: u64,
    /// Complexity.
    pub complexity: u64,
    /// Selections the measurement visited (the work it did): at most the
    /// number of selections written in the document.
    pub visited: u64,
}

/// A document over a limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// Too many field selections.
    #[error("the document selects {fields} fields once its fragments are expanded; the limit is {limit} — send a smaller document")]
    TooLarge {
        /// Fields counted (saturated at `u64::MAX`).
        fields: u64,
        /// The limit.
        limit: usize,
    },
    /// Nested too deep.
    #[error("the query nests fields {depth} levels deep; the limit is {limit} (introspection does not count)")]
    TooDeep {
        /// The depth.
        depth: u64,
        /// The limit.
        limit: usize,
    },
    /// Too complex.
    #[error("the query's complexity is {complexity}; the limit is {limit}. Each field counts 1, and a field with `first: n` counts n times its selection{heaviest}; ask for smaller pages or fewer fields")]
    TooComplex {
        /// The complexity.
        complexity: u64,
        /// The limit.
        limit: usize,
        /// The costliest page, described (`" (agents(first: 500) counts 500 × 5)"`), or empty.
        heaviest: String,
    },
}

impl LimitError {
    /// The error's `extensions.code`.
    pub fn code(&self) -> &'static str {
        match self {
            LimitError::TooLarge { .. } => "QUERY_TOO_LARGE",
            LimitError::TooDeep { .. } => "QUERY_TOO_DEEP",
            LimitError::TooComplex { .. } => "QUERY_TOO_COMPLEX",
        }
    }
}

/// The figures of a selection set (or a fragment).
#[derive(Debug, Clone, Copy, Default)]
struct Summary {
    fields: u64,
    depth: u64,
    complexity: u64,
}

impl Summary {
    /// Adds `other`, a part of the same selection set; `counted`: whether its
    /// depth and complexity count (not inside introspection).
    fn add(&mut self, other: Summary, counted: bool) {
        self.fields = self.fields.saturating_add(other.fields);
        if counted {
            self.depth = self.depth.max(other.depth);
            self.complexity = self.complexity.saturating_add(other.complexity);
        }
    }
}

/// The costliest page seen: field name, page size, its selection's complexity.
type Page = (String, u64, u64);

struct Walk<'a> {
    document: &'a ExecutableDocument,
    variables: &'a Variables,
    /// Names of fields that take a page size (`first`).
    paged: &'a HashSet<String>,
    max_page: u64,
    /// Fragments measured (`None`: being measured — a cycle, which
    /// validation reports; it adds nothing here).
    fragments: HashMap<&'a str, Option<Summary>>,
    visited: u64,
    heaviest: Option<Page>,
}

impl<'a> Walk<'a> {
    fn selection_set(&mut self, set: &'a SelectionSet, introspection: bool) -> Summary {
        let mut summary = Summary::default();
        for selection in &set.items {
            self.visited += 1;
            match &selection.node {
                Selection::Field(field) => {
                    let name = field.node.name.node.as_str();
                    // `__schema` and `__type` open introspection: neither
                    // they nor what they select count.
                    let introspection = introspection || name == "__schema" || name == "__type";
                    summary.add(self.field(&field.node, introspection), !introspection);
                }
                Selection::InlineFragment(inline) => {
                    let inner = self.selection_set(&inline.node.selection_set.node, introspection);
                    summary.add(inner, !introspection);
                }
                Selection::FragmentSpread(spread) => {
                    let inner = self.fragment(spread.node.fragment_name.node.as_str());
                    summary.add(inner, !introspection);
                }
            }
        }
        summary
    }

    fn field(&mut self, field: &'a Field, introspection: bool) -> Summary {
        let name = field.name.node.as_str();
        let child = self.selection_set(&field.selection_set.node, introspection);
        let page = self.page_size(field);
        let complexity = match page {
            Some(size) => {
                let cost = size.saturating_mul(child.complexity);
                if !introspection && self.heaviest.as_ref().is_none_or(|h| h.1 * h.2 < cost) {
                    self.heaviest = Some((name.to_owned(), size, child.complexity));
                }
                cost
            }
            None => child.complexity,
        };
        Summary {
            fields: child.fields.saturating_add(1),
            depth: child.depth.saturating_add(1),
            complexity: complexity.saturating_add(1),
        }
    }

    /// The page size a field with `first` is counted with, within
    /// `1..=max_page`; `None` for a field without one.
    fn page_size(&self, field: &Field) -> Option<u64> {
        if !self.paged.contains(field.name.node.as_str()) {
            return None;
        }
        let given = field
            .arguments
            .iter()
            .find(|(name, _)| name.node.as_str() == "first")
            .and_then(|(_, value)| {
                value
                    .node
                    .clone()
                    .into_const_with(|name| self.variables.get(&name).cloned().ok_or(()))
                    .ok()
            });
        let size = match given {
            Some(Value::Number(n)) => n.as_i64().map_or(self.max_page, |n| n.max(1) as u64),
            _ => DEFAULT_PAGE as u64,
        };
        Some(size.clamp(1, self.max_page))
    }

    fn fragment(&mut self, name: &'a str) -> Summary {
        match self.fragments.get(name) {
            Some(Some(done)) => return *done,
            Some(None) => return Summary::default(),
            None => {}
        }
        let Some(fragment) = self.document.fragments.get(name) else {
            // Unknown: validation says so.
            return Summary::default();
        };
        self.fragments.insert(name, None);
        let summary = self.selection_set(&fragment.node.selection_set.node, false);
        self.fragments.insert(name, Some(summary));
        summary
    }
}

/// The operation a request runs: the one named, or the only one; `None`
/// when that is ambiguous or missing (execution reports it).
pub fn operation<'a>(
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

/// Measures `document` (the operation `operation_name` selects, or every
/// operation when none is selected) against `limits`. `paged` names the
/// fields that take a page size.
pub fn check(
    document: &ExecutableDocument,
    operation_name: Option<&str>,
    variables: &Variables,
    paged: &HashSet<String>,
    limits: &Limits,
) -> Result<Cost, LimitError> {
    let cost = measure(document, operation_name, variables, paged, limits.max_page);
    if cost.fields > limits.max_fields as u64 {
        return Err(LimitError::TooLarge {
            fields: cost.fields,
            limit: limits.max_fields,
        });
    }
    if cost.depth > limits.max_depth as u64 {
        return Err(LimitError::TooDeep {
            depth: cost.depth,
            limit: limits.max_depth,
        });
    }
    if cost.complexity > limits.max_complexity as u64 {
        let heaviest = measure_heaviest(document, operation_name, variables, paged, limits);
        return Err(LimitError::TooComplex {
            complexity: cost.complexity,
            limit: limits.max_complexity,
            heaviest,
        });
    }
    Ok(cost)
}

fn walk<'a>(
    document: &'a ExecutableDocument,
    variables: &'a Variables,
    paged: &'a HashSet<String>,
    max_page: usize,
) -> Walk<'a> {
    Walk {
        document,
        variables,
        paged,
        max_page: max_page.max(1) as u64,
        fragments: HashMap::new(),
        visited: 0,
        heaviest: None,
    }
}

/// The figures of the selected operation (or of all of them), with
/// `fields` the largest of: its expansion, any fragment's expansion, and
/// the selections written in the document.
pub fn measure(
    document: &ExecutableDocument,
    operation_name: Option<&str>,
    variables: &Variables,
    paged: &HashSet<String>,
    max_page: usize,
) -> Cost {
    let mut walk = walk(document, variables, paged, max_page);
    let mut summary = Summary::default();
    match operation(document, operation_name) {
        Some(op) => summary.add(walk.selection_set(&op.selection_set.node, false), true),
        None => {
            for (_, op) in document.operations.iter() {
                let one = walk.selection_set(&op.node.selection_set.node, false);
                summary.fields = summary.fields.max(one.fields);
                summary.depth = summary.depth.max(one.depth);
                summary.complexity = summary.complexity.max(one.complexity);
            }
        }
    }
    let mut fields = summary.fields;
    for name in document.fragments.keys() {
        fields = fields.max(walk.fragment(name.as_str()).fields);
    }
    // Every selection written, whether or not an operation reaches it
    // (what validation walks): the fragments are all measured by now, so
    // this adds the operations not walked above.
    let written: u64 = document
        .operations
        .iter()
        .map(|(_, op)| written(&op.node.selection_set.node))
        .chain(
            document
                .fragments
                .values()
                .map(|f| written(&f.node.selection_set.node)),
        )
        .fold(0, u64::saturating_add);
    Cost {
        fields: fields.max(written),
        depth: summary.depth,
        complexity: summary.complexity,
        visited: walk.visited,
    }
}

/// Selections written in a selection set (spreads not followed).
fn written(set: &SelectionSet) -> u64 {
    set.items
        .iter()
        .map(|selection| match &selection.node {
            Selection::Field(field) => 1 + written(&field.node.selection_set.node),
            Selection::InlineFragment(inline) => 1 + written(&inline.node.selection_set.node),
            Selection::FragmentSpread(_) => 1,
        })
        .fold(0, u64::saturating_add)
}

/// `" (agents(first: 500) counts 500 × 21)"` for the costliest page of an
/// operation over the complexity limit, or empty.
fn measure_heaviest(
    document: &ExecutableDocument,
    operation_name: Option<&str>,
    variables: &Variables,
    paged: &HashSet<String>,
    limits: &Limits,
) -> String {
    let mut walk = walk(document, variables, paged, limits.max_page);
    match operation(document, operation_name) {
        Some(op) => {
            walk.selection_set(&op.selection_set.node, false);
        }
        None => {
            for (_, op) in document.operations.iter() {
                walk.selection_set(&op.node.selection_set.node, false);
            }
        }
    }
    match walk.heaviest {
        Some((name, size, child)) => format!(" ({name}(first: {size}) counts {size} × {child})"),
        None => String::new(),
    }
}

/// The complexity of one full page (`max_page`) of agents with every field
/// an `Agent` has, with its cursors and page info: the configured complexity
/// limit must allow it, or the page limit would be unreachable.
pub fn full_page_complexity(max_page: usize, agent_fields: &[&str]) -> u64 {
    let query = format!(
        "{{ agents(first: {max_page}) {{ edges {{ cursor node {{ id {} }} }} pageInfo {{ hasNextPage hasPreviousPage startCursor endCursor }} }} }}",
        agent_fields.join(" ")
    );
    let paged: HashSet<String> = ["agents".to_owned()].into();
    match async_graphql::parser::parse_query(&query) {
        Ok(document) => {
            measure(&document, None, &Variables::default(), &paged, max_page).complexity
        }
        Err(_) => u64::MAX,
    }
}

/// The configuration check of these limits (a [`CrossCheck`]): the
/// complexity limit must allow one full page of agents with every field,
/// or the page limit could not be reached.
///
/// [`CrossCheck`]: crate::settings::config::CrossCheck
pub fn settings_check(settings: &crate::settings::Settings) -> Vec<(&'static str, String)> {
    let api = &settings.api;
    let agent_fields: Vec<&str> = super::types::Agent::STORED
        .iter()
        .map(|(field, _)| *field)
        .collect();
    let needed = full_page_complexity(api.api_max_page.max(1), &agent_fields);
    if api.api_max_complexity as u64 >= needed {
        return Vec::new();
    }
    vec![(
        "api.max_complexity",
        format!(
            "{} is below {needed}, what one full page (api.max_page = {}) of agents with every field counts; raise it, or lower api.max_page",
            api.api_max_complexity, api.api_max_page
        ),
    )]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paged() -> HashSet<String> {
        ["agents".to_owned(), "tasks".to_owned()].into()
    }

    const LIMITS: Limits = Limits {
        max_fields: 2_000,
        max_depth: 12,
        max_complexity: 20_000,
        max_page: 500,
    };

    fn cost(query: &str, variables: serde_json::Value) -> Result<Cost, LimitError> {
        let document =
            async_graphql::parser::parse_query(query).unwrap_or_else(|e| panic!("{query}: {e}"));
        check(
            &document,
            None,
            &Variables::from_json(variables),
            &paged(),
            &LIMITS,
        )
    }

    /// `{ ...F0 } fragment F0 on Query { ...F1 ...F1 } … fragment Fn on
    /// Query { __typename }`: 2^n `__typename`s once expanded.
    fn doubling(levels: usize) -> String {
        let mut query = "{ ...F0 }".to_owned();
        for level in 0..levels {
            query.push_str(&format!(
                " fragment F{level} on Query {{ ...F{next} ...F{next} }}",
                next = level + 1
            ));
        }
        query.push_str(&format!(" fragment F{levels} on Query {{ __typename }}"));
        query
    }

    #[test]
    fn the_doubling_family_is_refused_with_bounded_work_at_every_level() {
        for levels in [4usize, 10, 11, 23, 40, 63, 64, 200] {
            let query = doubling(levels);
            let document =
                async_graphql::parser::parse_query(&query).unwrap_or_else(|e| panic!("{e}"));
            let measured = measure(&document, None, &Variables::default(), &paged(), 500);
            // Each selection written is visited once, however deep the
            // expansion: the work is linear in the document.
            let written_selections = 1 + 2 * levels as u64 + 1;
            assert!(
                measured.visited <= written_selections,
                "level {levels}: visited {} of {written_selections}",
                measured.visited
            );
            assert_eq!(
                measured.fields,
                fields_of_spreads(levels).max(written_selections),
                "level {levels}"
            );
            let refused = cost(&query, serde_json::json!({}));
            if fields_of_spreads(levels) > LIMITS.max_fields as u64 {
                assert!(
                    matches!(refused, Err(LimitError::TooLarge { .. })),
                    "level {levels}: {refused:?}"
                );
            } else {
                assert!(refused.is_ok(), "level {levels}: {refused:?}");
            }
        }
    }

    /// Fields of the doubling document's expansion: the `__typename`s only
    /// (spreads are not fields).
    fn fields_of_spreads(levels: usize) -> u64 {
        1u64.checked_shl(levels as u32).unwrap_or(u64::MAX)
    }

    #[test]
    fn unused_fragments_and_the_written_document_are_bounded_too() {
        // The operation is tiny; an unused fragment expands to 2^30.
        let query = doubling(30).replacen("{ ...F0 }", "{ __typename }", 1);
        assert!(matches!(
            cost(&query, serde_json::json!({})),
            Err(LimitError::TooLarge { .. })
        ));
        // Many written fields, no fragments.
        let wide = format!("{{ {} }}", "__typename ".repeat(2_001));
        assert!(matches!(
            cost(&wide, serde_json::json!({})),
            Err(LimitError::TooLarge { fields: 2_001, .. })
        ));
    }

    #[test]
    fn depth_and_complexity_name_their_numbers() {
        let deep = "{ a { b { c { d { e { f { g { h { i { j { k { l { m } } } } } } } } } } } } }";
        match cost(deep, serde_json::json!({})) {
            Err(
                e @ LimitError::TooDeep {
                    depth: 13,
                    limit: 12,
                },
            ) => {
                assert!(e.to_string().contains("13 levels"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        // A full page of the widest node fits; a page of 500 with a
        // selection of 60 fields does not, and the error says why.
        let full = "{ agents(first: 500) { edges { node { id name status } } } }";
        assert_eq!(
            cost(full, serde_json::json!({})).map(|c| c.complexity),
            Ok(1 + 500 * 5)
        );
        let fields = (0..60)
            .map(|i| format!("f{i}: name"))
            .collect::<Vec<_>>()
            .join(" ");
        let heavy = format!("{{ agents(first: 500) {{ edges {{ node {{ {fields} }} }} }} }}");
        match cost(&heavy, serde_json::json!({})) {
            Err(e @ LimitError::TooComplex { .. }) => {
                let text = e.to_string();
                assert!(
                    text.contains("agents(first: 500) counts 500 × 62"),
                    "{text}"
                );
                assert!(text.contains("limit is 20000"), "{text}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn page_sizes_come_from_arguments_variables_or_the_default_within_the_page_limit() {
        let by_variable = "query($n: Int) { agents(first: $n) { edges { node { id } } } }";
        let complexity = |vars| cost(by_variable, vars).map(|c| c.complexity);
        assert_eq!(complexity(serde_json::json!({"n": 2})), Ok(1 + 2 * 3));
        assert_eq!(complexity(serde_json::json!({})), Ok(1 + 50 * 3));
        // Out of range: counted as the nearest allowed size (the resolver
        // refuses it with the page limit in its words).
        assert_eq!(
            complexity(serde_json::json!({"n": 100_000})),
            Ok(1 + 500 * 3)
        );
        assert_eq!(complexity(serde_json::json!({"n": -4})), Ok(1 + 3));
        // Fields without a page size are not multiplied.
        assert_eq!(
            cost("{ agent(id: \"x\") { id name } }", serde_json::json!({})).map(|c| c.complexity),
            Ok(3)
        );
    }

    #[test]
    fn introspection_counts_as_fields_but_not_as_depth_or_complexity() {
        let query = "{ __schema { types { fields { type { ofType { ofType { ofType { ofType { ofType { ofType { ofType { ofType { name } } } } } } } } } } } } }";
        let measured = cost(query, serde_json::json!({}));
        assert_eq!(
            measured.map(|c| (c.depth, c.complexity, c.fields)),
            Ok((0, 0, 13))
        );
    }

    /// graphql-js 16's `getIntrospectionQuery()` with every option GraphiQL
    /// 3 sets.
    const INTROSPECTION: &str = "query IntrospectionQuery { __schema { description queryType { name } mutationType { name } subscriptionType { name } types { ...FullType } directives { name description isRepeatable locations args(includeDeprecated: true) { ...InputValue } } } } fragment FullType on __Type { kind name description specifiedByURL fields(includeDeprecated: true) { name description args(includeDeprecated: true) { ...InputValue } type { ...TypeRef } isDeprecated deprecationReason } inputFields(includeDeprecated: true) { ...InputValue } interfaces { ...TypeRef } enumValues(includeDeprecated: true) { name description isDeprecated deprecationReason } possibleTypes { ...TypeRef } } fragment InputValue on __InputValue { name description type { ...TypeRef } defaultValue isDeprecated deprecationReason } fragment TypeRef on __Type { kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name } } } } } } } } } }";

    #[test]
    fn the_standard_introspection_query_fits_with_room_to_spare() {
        let measured = cost(INTROSPECTION, serde_json::json!({}));
        let Ok(measured) = measured else {
            panic!("{measured:?}")
        };
        assert_eq!((measured.depth, measured.complexity), (0, 0));
        assert!(
            measured.fields * 4 < LIMITS.max_fields as u64,
            "{} fields",
            measured.fields
        );
    }

    #[test]
    fn a_full_page_of_agents_is_within_the_default_complexity() {
        let fields = [
            "name",
            "kind",
            "model",
            "capabilities",
            "parentId",
            "status",
        ];
        assert!(full_page_complexity(500, &fields) <= 20_000);
        assert!(full_page_complexity(500, &fields) > 500 * fields.len() as u64);
    }

    #[test]
    fn fragment_cycles_add_nothing_and_end() {
        let query = "{ ...A } fragment A on Query { __typename ...B } fragment B on Query { ...A }";
        assert!(cost(query, serde_json::json!({})).is_ok());
    }
}
