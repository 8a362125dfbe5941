//! `verify`: folds every stream of the event store with `domain::evolve` and
//! diffs the result against a read model: the Redis live state
//! ([`verify_live`]) or the graph ([`verify_graph`]).

use std::collections::{BTreeMap, BTreeSet};

use commands::EventStore;
use domain::{AgentState, Aggregate, DomainEvent, TaskState, TaskStatus, WorkflowState};
use neo4rs::{query, BoltType, Query, Row};
use redis::AsyncCommands;

use crate::graph::{collect, finish, GraphModel, GraphQueryError, PROJECTION};
use crate::live::LiveModel;

/// One field where the read model disagrees with the events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// What disagrees: a Redis key, or a graph node (`Task <id>`).
    pub key: String,
    /// Field: a hash field, a node property, a relationship type, or `node`
    /// for a node missing from (or extra in) the graph.
    pub field: String,
    /// What the events say.
    pub expected: String,
    /// What the read model holds.
    pub actual: String,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: events say `{}`, read model has `{}`",
            self.key, self.field, self.expected, self.actual
        )
    }
}

/// Why verification could not run.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Reading the event store failed.
    #[error("reading the event store")]
    Store(#[from] commands::ReadError),
    /// Decoding an event failed.
    #[error("decoding the event at position {position}")]
    Decode {
        /// Position.
        position: i64,
        /// Why.
        #[source]
        source: domain::EventDecodeError,
    },
    /// Reading Redis failed.
    #[error("reading Redis")]
    Redis(#[from] redis::RedisError),
    /// Reading the graph failed.
    #[error("reading the graph")]
    Graph(#[from] GraphQueryError),
}

#[derive(Default)]
struct Folded {
    agents: BTreeMap<String, AgentState>,
    tasks: BTreeMap<String, TaskState>,
    workflows: BTreeMap<String, WorkflowState>,
}

/// Folds every stream of the log up to `until` (inclusive) with the
/// domain's `evolve`; keys are the aggregates' ids.
async fn fold(store: &EventStore, until: i64) -> Result<Folded, VerifyError> {
    let mut folded = Folded::default();
    let mut after = 0;
    loop {
        let batch = store.read_all(after, 5_000).await?;
        let Some(last) = batch.last().map(|e| e.position) else {
            break;
        };
        for recorded in &batch {
            if recorded.position > until {
                break;
            }
            let event = recorded.decode().map_err(|source| VerifyError::Decode {
                position: recorded.position,
                source,
            })?;
            let id = recorded
                .stream_id
                .split_once('-')
                .map_or("", |(_, id)| id)
                .to_owned();
            match event {
                DomainEvent::Agent(e) => folded.agents.entry(id).or_default().evolve(&e),
                DomainEvent::Task(e) => folded.tasks.entry(id).or_default().evolve(&e),
                DomainEvent::Workflow(e) => folded.workflows.entry(id).or_default().evolve(&e),
            }
        }
        if last >= until {
            break;
        }
        after = last;
    }
    Ok(folded)
}

/// Folds the whole log up to `until` (inclusive) and compares it with the
/// Redis read model. Returns every difference (empty = the model is right).
pub async fn verify_live(
    store: &EventStore,
    model: &LiveModel,
    until: i64,
) -> Result<Vec<Difference>, VerifyError> {
    let folded = fold(store, until).await?;

    let mut conn = model.connection();
    let mut differences = Vec::new();
    let mut check =
        |key: &str, field: &str, expected: String, actual: &BTreeMap<String, String>| {
            let actual = actual.get(field).cloned().unwrap_or_default();
            if actual != expected {
                differences.push(Difference {
                    key: key.to_owned(),
                    field: field.to_owned(),
                    expected,
                    actual,
                });
            }
        };
    // The projector may keep running while this reads: an entity whose
    // last event lies after `until` is not compared (the model moved on).
    let moved = |actual: &BTreeMap<String, String>| {
        actual
            .get("last_position")
            .and_then(|p| p.parse::<i64>().ok())
            .is_some_and(|p| p > until)
    };
    for (id, state) in &folded.agents {
        let Some(agent) = state.get() else { continue };
        let key = model.key(&format!("agent:{id}"));
        let actual: BTreeMap<String, String> = conn.hgetall(&key).await?;
        if moved(&actual) {
            continue;
        }
        check(&key, "status", agent.status.as_str().to_owned(), &actual);
        check(&key, "name", agent.name.clone(), &actual);
        check(&key, "capabilities", agent.capabilities.join(","), &actual);
    }
    // Workflows whose counters a task event after `until` already changed.
    let mut moved_workflows = std::collections::BTreeSet::new();
    let mut counts: BTreeMap<String, BTreeMap<&'static str, i64>> = BTreeMap::new();
    for (id, state) in &folded.tasks {
        let Some(task) = state.get() else { continue };
        let key = model.key(&format!("task:{id}"));
        let actual: BTreeMap<String, String> = conn.hgetall(&key).await?;
        if moved(&actual) {
            moved_workflows.insert(task.workflow_id.to_string());
            continue;
        }
        check(&key, "state", task.status.as_str().to_owned(), &actual);
        check(&key, "workflow", task.workflow_id.to_string(), &actual);
        check(&key, "attempt", task.attempt.to_string(), &actual);
        check(&key, "progress", task.progress.to_string(), &actual);
        let assignee = match task.status {
            TaskStatus::Pending => String::new(),
            _ => task.assignee.map(|a| a.to_string()).unwrap_or_default(),
        };
        check(&key, "assignee", assignee, &actual);
        let per_workflow = counts.entry(task.workflow_id.to_string()).or_default();
        *per_workflow.entry("total").or_default() += 1;
        *per_workflow.entry(task.status.as_str()).or_default() += 1;
    }
    for (id, state) in &folded.workflows {
        let Some(workflow) = state.get() else {
            continue;
        };
        let key = model.key(&format!("workflow:{id}"));
        let actual: BTreeMap<String, String> = conn.hgetall(&key).await?;
        if moved(&actual) || moved_workflows.contains(id) {
            continue;
        }
        // Tasks the model has beyond the fold: created after `until` (the
        // model moved on; skip the counters) or extra (a real difference).
        let members: Vec<String> = redis::cmd("SUNION")
            .arg(
                TaskStatus::ALL
                    .iter()
                    .map(|s| model.key(&format!("workflow:{id}:tasks:{}", s.as_str())))
                    .collect::<Vec<_>>(),
            )
            .query_async(&mut conn)
            .await?;
        let mut later = false;
        for task in members.iter().filter(|t| !folded.tasks.contains_key(*t)) {
            let position: Option<i64> = conn
                .hget(model.key(&format!("task:{task}")), "last_position")
                .await?;
            later |= position.is_some_and(|p| p > until);
        }
        if later {
            continue;
        }
        check(&key, "status", workflow.status.as_str().to_owned(), &actual);
        let per_workflow = counts.get(id);
        for counter in crate::live::workflow_task_counters() {
            let state = counter.trim_start_matches("tasks_");
            let expected = per_workflow
                .and_then(|c| c.get(state))
                .copied()
                .unwrap_or(0);
            check(&key, &counter, expected.to_string(), &actual);
        }
    }
    Ok(differences)
}

/// A graph value as text: strings as they are, lists joined with `,`, null
/// as the empty string (what the events' side renders for "none").
fn render(value: &BoltType) -> String {
    match value {
        BoltType::String(s) => s.value.clone(),
        BoltType::Integer(i) => i.value.to_string(),
        BoltType::Float(f) => f.value.to_string(),
        BoltType::Boolean(b) => b.value.to_string(),
        BoltType::Null(_) => String::new(),
        BoltType::List(list) => list.value.iter().map(render).collect::<Vec<_>>().join(","),
        other => format!("{other:?}"),
    }
}

/// The graph's nodes of one label, by id: column → rendered value.
type Nodes = BTreeMap<String, BTreeMap<String, String>>;
/// Relationships of one type, by source id: target ids, sorted.
type Edges = BTreeMap<String, Vec<String>>;

/// What the verifier reads of the graph, in one read transaction.
struct GraphState {
    checkpoint: Option<String>,
    agents: Nodes,
    tasks: Nodes,
    workflows: Nodes,
    part_of: Edges,
    assigned_to: Edges,
    depends_on: Edges,
}

fn columns(row: &Row, names: &[&str], doing: &str) -> Result<Vec<String>, GraphQueryError> {
    names
        .iter()
        .map(|name| {
            row.get::<BoltType>(name)
                .map(|v| render(&v))
                .map_err(|source| GraphQueryError::Decode {
                    doing: format!("{doing} (column {name})"),
                    source,
                })
        })
        .collect()
}

fn nodes(rows: &[Row], fields: &[&str], doing: &str) -> Result<Nodes, GraphQueryError> {
    let mut names = vec!["id"];
    names.extend_from_slice(fields);
    let mut out = Nodes::new();
    for row in rows {
        let mut values = columns(row, &names, doing)?.into_iter();
        let id = values.next().unwrap_or_default();
        out.insert(
            id,
            fields.iter().map(|f| (*f).to_owned()).zip(values).collect(),
        );
    }
    Ok(out)
}

fn edges(rows: &[Row], doing: &str) -> Result<Edges, GraphQueryError> {
    let mut out = Edges::new();
    for row in rows {
        let [from, to]: [String; 2] = columns(row, &["from", "to"], doing)?
            .try_into()
            .unwrap_or_default();
        out.entry(from).or_default().push(to);
    }
    for targets in out.values_mut() {
        targets.sort();
    }
    Ok(out)
}

async fn read_graph(model: &GraphModel) -> Result<GraphState, GraphQueryError> {
    let doing = "reading the graph for verification";
    let unavailable = |source| GraphQueryError::Unavailable {
        doing: doing.to_owned(),
        source,
    };
    let queries: [Query; 7] = [
        query("MATCH (c:Checkpoint {projection: $projection}) RETURN c.position AS position")
            .param("projection", PROJECTION),
        query(
            "MATCH (n:Agent) RETURN n.id AS id, n.status AS status, n.name AS name, \
             n.capabilities AS capabilities",
        ),
        query(
            "MATCH (n:Task) RETURN n.id AS id, n.state AS state, n.workflow AS workflow, \
             n.assignee AS assignee, n.attempt AS attempt, n.progress AS progress",
        ),
        query("MATCH (n:Workflow) RETURN n.id AS id, n.status AS status, n.name AS name"),
        query("MATCH (t:Task)-[:PART_OF]->(w:Workflow) RETURN t.id AS from, w.id AS to"),
        query("MATCH (t:Task)-[:ASSIGNED_TO]->(a:Agent) RETURN t.id AS from, a.id AS to"),
        query("MATCH (t:Task)-[:DEPENDS_ON]->(d:Task) RETURN t.id AS from, d.id AS to"),
    ];
    // One transaction: the reads see one state of the graph.
    let mut txn = model.begin().await.map_err(unavailable)?;
    let mut results = Vec::with_capacity(queries.len());
    for q in queries {
        results.push(collect(&mut txn, q).await.map_err(unavailable)?);
    }
    finish(txn).await;
    let [checkpoint, agents, tasks, workflows, part_of, assigned_to, depends_on]: [Vec<Row>; 7] =
        results.try_into().unwrap_or_default();
    let checkpoint = match checkpoint.first() {
        Some(row) => columns(row, &["position"], doing)?.pop(),
        None => None,
    };
    Ok(GraphState {
        checkpoint,
        agents: nodes(&agents, &["status", "name", "capabilities"], doing)?,
        tasks: nodes(
            &tasks,
            &["state", "workflow", "assignee", "attempt", "progress"],
            doing,
        )?,
        workflows: nodes(&workflows, &["status", "name"], doing)?,
        part_of: edges(&part_of, doing)?,
        assigned_to: edges(&assigned_to, doing)?,
        depends_on: edges(&depends_on, doing)?,
    })
}

/// Folds the whole log up to `until` (inclusive) and compares it with the
/// graph read model, which should hold exactly the effects of the events up
/// to `until` (its checkpoint is compared too):
///
/// - every agent: `status`, `name`, `capabilities`;
/// - every task: `state`, `workflow`, `assignee`, `attempt`, `progress`, its
///   `PART_OF` workflow, its `ASSIGNED_TO` agent (the task's assignee: none
///   once retried, kept once finished) and its `DEPENDS_ON` targets (as a
///   sorted set);
/// - every workflow: `status`, `name`;
/// - `Agent`, `Task` and `Workflow` nodes missing from the graph, or in the
///   graph without events (field `node`).
///
/// Reads the graph with a handful of whole-label queries in one read
/// transaction. Returns every difference (empty = the model is right).
pub async fn verify_graph(
    store: &EventStore,
    model: &GraphModel,
    until: i64,
) -> Result<Vec<Difference>, VerifyError> {
    let folded = fold(store, until).await?;
    let mut graph = read_graph(model).await?;
    let mut differences = Vec::new();
    let mut differ = |key: &str, field: &str, expected: String, actual: String| {
        if expected != actual {
            differences.push(Difference {
                key: key.to_owned(),
                field: field.to_owned(),
                expected,
                actual,
            });
        }
    };
    // Present in the events, absent from the graph: one difference for the
    // node, none for each of its fields.
    let node =
        |nodes: &mut Nodes, id: &str| -> Option<BTreeMap<String, String>> { nodes.remove(id) };
    let field = |props: &BTreeMap<String, String>, name: &str| -> String {
        props.get(name).cloned().unwrap_or_default()
    };
    let targets = |edges: &Edges, id: &str| -> String {
        edges.get(id).map(|t| t.join(",")).unwrap_or_default()
    };

    // A checkpoint above `until` means the projector applied more since it
    // was read (it cannot hold events the store lacks); below, it lost some.
    let stored = graph.checkpoint.clone().unwrap_or_else(|| "0".to_owned());
    if stored.parse::<i64>().map_or(true, |c| c < until) {
        differ(
            &format!("Checkpoint {PROJECTION}"),
            "position",
            until.to_string(),
            stored,
        );
    }
    for state in folded.agents.values() {
        let Some(agent) = state.get() else { continue };
        let id = agent.id.to_string();
        let key = format!("Agent {id}");
        let Some(props) = node(&mut graph.agents, &id) else {
            differ(&key, "node", "present".to_owned(), "missing".to_owned());
            continue;
        };
        differ(
            &key,
            "status",
            agent.status.as_str().to_owned(),
            field(&props, "status"),
        );
        differ(&key, "name", agent.name.clone(), field(&props, "name"));
        differ(
            &key,
            "capabilities",
            agent.capabilities.join(","),
            field(&props, "capabilities"),
        );
    }
    for state in folded.tasks.values() {
        let Some(task) = state.get() else { continue };
        let id = task.id.to_string();
        let key = format!("Task {id}");
        let Some(props) = node(&mut graph.tasks, &id) else {
            differ(&key, "node", "present".to_owned(), "missing".to_owned());
            continue;
        };
        let workflow = task.workflow_id.to_string();
        let assignee = task.assignee.map(|a| a.to_string()).unwrap_or_default();
        let depends_on: BTreeSet<String> =
            task.depends_on.iter().map(ToString::to_string).collect();
        let depended: BTreeSet<String> = graph
            .depends_on
            .get(&id)
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        differ(
            &key,
            "state",
            task.status.as_str().to_owned(),
            field(&props, "state"),
        );
        differ(
            &key,
            "workflow",
            workflow.clone(),
            field(&props, "workflow"),
        );
        differ(&key, "PART_OF", workflow, targets(&graph.part_of, &id));
        differ(
            &key,
            "assignee",
            assignee.clone(),
            field(&props, "assignee"),
        );
        differ(
            &key,
            "ASSIGNED_TO",
            assignee,
            targets(&graph.assigned_to, &id),
        );
        differ(
            &key,
            "attempt",
            task.attempt.to_string(),
            field(&props, "attempt"),
        );
        differ(
            &key,
            "progress",
            task.progress.to_string(),
            field(&props, "progress"),
        );
        differ(
            &key,
            "DEPENDS_ON",
            depends_on.into_iter().collect::<Vec<_>>().join(","),
            depended.into_iter().collect::<Vec<_>>().join(","),
        );
    }
    for state in folded.workflows.values() {
        let Some(workflow) = state.get() else {
            continue;
        };
        let id = workflow.id.to_string();
        let key = format!("Workflow {id}");
        let Some(props) = node(&mut graph.workflows, &id) else {
            differ(&key, "node", "present".to_owned(), "missing".to_owned());
            continue;
        };
        differ(
            &key,
            "status",
            workflow.status.as_str().to_owned(),
            field(&props, "status"),
        );
        differ(&key, "name", workflow.name.clone(), field(&props, "name"));
    }
    // What is left was never created by an event up to `until`.
    for (label, extra) in [
        ("Agent", &graph.agents),
        ("Task", &graph.tasks),
        ("Workflow", &graph.workflows),
    ] {
        for id in extra.keys() {
            differ(
                &format!("{label} {id}"),
                "node",
                "absent".to_owned(),
                "present".to_owned(),
            );
        }
    }
    Ok(differences)
}

/// What [`confirmed`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confirmed {
    /// The checkpoint the last pass verified up to.
    pub until: i64,
    /// Differences found in every pass (same key and field).
    pub differences: Vec<Difference>,
    /// Differences of the first pass that later passes did not find again:
    /// the read model moved on while it was being read.
    pub transient: usize,
}

/// Verifies a model that may be changing (its projector running): runs
/// `pass` (read the checkpoint, verify up to it) up to `passes` times and
/// keeps the differences found in every pass. A read model that is wrong
/// stays wrong at each checkpoint; one read while its projector applied a
/// batch past the checkpoint differs only in that pass. With the projector
/// idle, one pass is exact (and a clean pass ends the loop).
pub async fn confirmed<E, F, Fut>(passes: usize, mut pass: F) -> Result<Confirmed, E>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(i64, Vec<Difference>), E>>,
{
    let (mut until, first) = pass().await?;
    let mut differences = first.clone();
    for _ in 1..passes.max(1) {
        if differences.is_empty() {
            break;
        }
        let (next_until, next) = pass().await?;
        until = next_until;
        let again: std::collections::BTreeSet<(&str, &str)> = next
            .iter()
            .map(|d| (d.key.as_str(), d.field.as_str()))
            .collect();
        // Keep the latest reading of each persisting difference.
        differences = next
            .iter()
            .filter(|d| {
                differences
                    .iter()
                    .any(|p| p.key == d.key && p.field == d.field)
                    && again.contains(&(d.key.as_str(), d.field.as_str()))
            })
            .cloned()
            .collect();
    }
    let transient = first
        .iter()
        .filter(|d| {
            !differences
                .iter()
                .any(|c| c.key == d.key && c.field == d.field)
        })
        .count();
    Ok(Confirmed {
        until,
        differences,
        transient,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(key: &str, field: &str, actual: &str) -> Difference {
        Difference {
            key: key.to_owned(),
            field: field.to_owned(),
            expected: "x".to_owned(),
            actual: actual.to_owned(),
        }
    }

    #[tokio::test]
    async fn only_differences_found_in_every_pass_are_confirmed() {
        let passes = std::sync::Mutex::new(vec![
            vec![d("a", "f", "3")],
            vec![d("a", "f", "4"), d("c", "f", "1")],
            vec![d("a", "f", "5"), d("b", "f", "1")],
        ]);
        let found = confirmed(3, || {
            let next = passes.lock().unwrap().remove(0);
            async move { Ok::<_, ()>((7, next)) }
        })
        .await
        .unwrap();
        assert_eq!(found.differences, vec![d("a", "f", "5")]);
        assert_eq!(found.transient, 0);

        let passes = std::sync::Mutex::new(vec![vec![d("a", "f", "1"), d("b", "g", "2")], vec![]]);
        let found = confirmed(3, || {
            let next = passes.lock().unwrap().remove(0);
            async move { Ok::<_, ()>((9, next)) }
        })
        .await
        .unwrap();
        assert!(found.differences.is_empty());
        assert_eq!((found.until, found.transient), (9, 2));
    }
}
