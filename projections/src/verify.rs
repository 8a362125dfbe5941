//! `verify`: folds every stream of the event store with `domain::evolve` and
//! diffs the result against a read model: Redis ([`verify_redis`]) or the
//! graph ([`verify_graph`]).
//!
//! ## Verifying a read model that is moving
//!
//! A pass compares the read model with the fold of the log up to one
//! position, the *compared position*, while its projector may go on
//! applying batches past it. What makes that sound is one rule of both
//! models: **every change the verifier compares moves the position of the
//! entity it is compared under** (its `last_position`), in the same atomic
//! write (Redis `MULTI/EXEC`, one graph transaction), and that position only
//! grows. So an entity whose position — read *after* everything compared
//! under it — is at or below the compared position holds exactly the fold up
//! to it; one above it was changed since, and is skipped: counted
//! ([`Verified::skipped`]), never reported.
//!
//! | compared | under | changed by | moves the position of |
//! |---|---|---|---|
//! | agent `status`, `name`, `capabilities` | the agent | its own events | the agent (task events involving it move it too: that only skips more) |
//! | task `state`, `workflow`, `assignee`, `attempt`, `progress`; in the graph also its `PART_OF`, `ASSIGNED_TO` and `DEPENDS_ON` relationships | the task | its own events | the task |
//! | workflow `status` (and `name` in the graph) | the workflow | its own events | the workflow |
//! | Redis workflow counters `tasks_total`, `tasks_<state>` | the workflow | its tasks' events | **the task**, not the workflow: see below |
//!
//! (Not compared, and not covered by the rule: an agent's `current_task`,
//! which cancelling a task clears without moving the agent's position, and
//! the `SPAWNED` and `DELEGATED_TO` relationships.)
//!
//! - **Redis.** The compared position is the checkpoint read before the
//!   pass, so every batch applied later is above it. Each hash is read whole
//!   (`HGETALL` is atomic). A workflow's counters are the exception to the
//!   rule: after its hash, the positions of every task it has (in the events
//!   or in the model's per-state sets) are read, and one above the compared
//!   position skips the workflow.
//! - **Graph.** Neo4j and ArcadeDB read committed, not a snapshot: each
//!   statement of the read transaction sees the batches committed before it
//!   started, so a batch may commit between two of them. The transaction
//!   reads the checkpoint *first* (the compared position: every batch
//!   committed later is above it), then the nodes and relationships, then
//!   every node's position again. A node whose two positions are at or below
//!   the checkpoint was touched by no batch committed during the reads, so
//!   all that was read of it is its state at the checkpoint.
//!
//! An entity without a readable position (the projectors write one with
//! every entity they create) cannot be placed: it is compared, and the
//! missing position is a difference of its own (`last_position`).
//!
//! What remains is a batch whose commit becomes visible piecemeal to a
//! reader racing it (read committed allows it); [`confirmed`] runs up to
//! three passes for that, and with the rule above the first pass is
//! normally exact.

use std::collections::{BTreeMap, BTreeSet};

use commands::EventStore;
use domain::{AgentState, Aggregate, DomainEvent, TaskState, TaskStatus, WorkflowState};
use neo4rs::{query, BoltType, Query, Row};
use redis::AsyncCommands;

use crate::graph::{collect, finish, GraphModel, GraphQueryError, PROJECTION};
use crate::model::{ApplyError, ReadModel};
use crate::redis::RedisModel;

/// Passes `neurectomy verify` makes per read model (see [`confirmed`]).
pub const PASSES: usize = 3;

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

/// What one verification pass found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The compared position: what was compared is the fold of the events
    /// up to it.
    pub until: i64,
    /// Every difference (empty = the model is right).
    pub differences: Vec<Difference>,
    /// Entities (Redis hashes, graph nodes) not compared because the
    /// projector changed them after `until` while the pass read them.
    pub skipped: usize,
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
    /// Reading a read model's checkpoint failed.
    #[error("reading the checkpoint")]
    Checkpoint(#[source] ApplyError),
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
    /// Each entity's tenant, by id.
    tenants: BTreeMap<String, String>,
}

/// The compared position of each part of a read model: one for a model
/// applied whole; one per partition for a model projected in
/// partitions (`commands::partition`), whose partitions each reached a
/// checkpoint of their own (the position of the partition's last event
/// applied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compared {
    /// Partition `k`'s compared position at index `k` (one entry: whole).
    untils: Vec<i64>,
}

impl Compared {
    /// One compared position for the whole model.
    pub fn whole(until: i64) -> Self {
        Self {
            untils: vec![until],
        }
    }

    /// One per partition, partition `k`'s at index `k`.
    pub fn partitions(untils: Vec<i64>) -> Self {
        if untils.is_empty() {
            return Self::whole(0);
        }
        Self { untils }
    }

    /// The compared position of `tenant`'s events and entities.
    pub fn of(&self, tenant: &str) -> i64 {
        match self.untils.as_slice() {
            [whole] => *whole,
            untils => {
                let partitions = u32::try_from(untils.len()).unwrap_or(u32::MAX);
                let k = commands::partition::of(tenant, partitions);
                untils.get(k as usize).copied().unwrap_or(0)
            }
        }
    }

    /// The highest compared position (what a pass reports).
    pub fn highest(&self) -> i64 {
        self.untils.iter().copied().max().unwrap_or(0)
    }
}

/// Folds every stream of the log up to `until` (inclusive) with the
/// domain's `evolve`; keys are the aggregates' ids.
async fn fold(store: &EventStore, compared: &Compared) -> Result<Folded, VerifyError> {
    let until = compared.highest();
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
            // A partition's events past its own compared position are not
            // in the fold (its projector may not have applied them).
            if recorded.position > compared.of(&recorded.metadata.tenant) {
                continue;
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
            if !folded.tenants.contains_key(&id) {
                folded
                    .tenants
                    .insert(id.clone(), recorded.metadata.tenant.clone());
            }
            match event {
                DomainEvent::Agent(e) => folded.agents.entry(id).or_default().evolve(&e),
                DomainEvent::Task(e) => folded.tasks.entry(id).or_default().evolve(&e),
                DomainEvent::Workflow(e) => folded.workflows.entry(id).or_default().evolve(&e),
                // What an erasure changed is in the events it rewrote.
                DomainEvent::Erasure(_) => {}
            }
        }
        if last >= until {
            break;
        }
        after = last;
    }
    Ok(folded)
}

/// Whether a position read from a read model (a hash field, a rendered node
/// property) lies after `until`. A missing or unreadable one does not: the
/// entity is compared, and the missing position reported (see
/// [`positioned`]).
fn after(position: Option<&String>, until: i64) -> bool {
    position
        .and_then(|p| p.parse::<i64>().ok())
        .is_some_and(|p| p > until)
}

/// Whether an entity carries a readable position. The projectors write one
/// with every entity they create; without it verification cannot tell
/// whether the entity moved, so its absence is a difference of its own
/// (field `last_position`, expected `a position`).
fn positioned(position: Option<&String>) -> bool {
    position.and_then(|p| p.parse::<i64>().ok()).is_some()
}

/// What the events "say" of an entity's position (they say it has one).
const HAS_POSITION: &str = "a position";

/// Folds the whole log up to `until` (inclusive) and compares it with the
/// Redis read model, whose checkpoint must be at or past `until`; entities
/// it changed after `until` are skipped (see the module docs).
pub async fn verify_redis(
    store: &EventStore,
    model: &RedisModel,
    until: i64,
) -> Result<Verified, VerifyError> {
    verify_redis_at(store, model, &Compared::whole(until)).await
}

/// [`verify_redis`] at a compared position per partition (a model projected
/// in partitions): each entity is compared with the fold of its tenant's
/// partition up to that partition's compared position.
pub async fn verify_redis_at(
    store: &EventStore,
    model: &RedisModel,
    compared: &Compared,
) -> Result<Verified, VerifyError> {
    let folded = fold(store, compared).await?;
    let until_of = |id: &str| folded.tenants.get(id).map_or(0, |t| compared.of(t));
    // An entity's key, in its tenant's partition (on a cluster, its slot).
    let tenant_of = |id: &str| folded.tenants.get(id).map_or("", String::as_str);

    let mut conn = model.connection();
    let mut differences = Vec::new();
    let mut skipped = 0;
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
    let moved = |id: &str, actual: &BTreeMap<String, String>| {
        after(actual.get("last_position"), until_of(id))
    };
    for (id, state) in &folded.agents {
        let Some(agent) = state.get() else { continue };
        let key = model.key_of(tenant_of(id), &format!("agent:{id}"));
        let actual: BTreeMap<String, String> = conn.hgetall(&key).await?;
        if moved(id, &actual) {
            skipped += 1;
            continue;
        }
        if !actual.is_empty() && !positioned(actual.get("last_position")) {
            check(&key, "last_position", HAS_POSITION.to_owned(), &actual);
        }
        check(&key, "status", agent.status.as_str().to_owned(), &actual);
        check(&key, "name", agent.name.clone(), &actual);
        check(&key, "capabilities", agent.capabilities.join(","), &actual);
    }
    // Every task of each workflow in the events, compared or not.
    let mut workflow_tasks: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    let mut counts: BTreeMap<String, BTreeMap<&'static str, i64>> = BTreeMap::new();
    for (id, state) in &folded.tasks {
        let Some(task) = state.get() else { continue };
        let workflow = task.workflow_id.to_string();
        workflow_tasks
            .entry(workflow.clone())
            .or_default()
            .push(id.as_str());
        let per_workflow = counts.entry(workflow).or_default();
        *per_workflow.entry("total").or_default() += 1;
        *per_workflow.entry(task.status.as_str()).or_default() += 1;
        let key = model.key_of(tenant_of(id), &format!("task:{id}"));
        let actual: BTreeMap<String, String> = conn.hgetall(&key).await?;
        if moved(id, &actual) {
            skipped += 1;
            continue;
        }
        if !actual.is_empty() && !positioned(actual.get("last_position")) {
            check(&key, "last_position", HAS_POSITION.to_owned(), &actual);
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
    }
    for (id, state) in &folded.workflows {
        let Some(workflow) = state.get() else {
            continue;
        };
        let key = model.key_of(tenant_of(id), &format!("workflow:{id}"));
        let actual: BTreeMap<String, String> = conn.hgetall(&key).await?;
        if moved(id, &actual) {
            skipped += 1;
            continue;
        }
        // The counters move with the tasks' positions, not the workflow's:
        // read, after the hash, the position of every task the workflow has
        // (in the events, or in the model: created after `until`, or extra).
        let members: Vec<String> = redis::cmd("SUNION")
            .arg(
                TaskStatus::ALL
                    .iter()
                    .map(|s| {
                        model.key_of(
                            tenant_of(id),
                            &format!("workflow:{id}:tasks:{}", s.as_str()),
                        )
                    })
                    .collect::<Vec<_>>(),
            )
            .query_async(&mut conn)
            .await?;
        let tasks: BTreeSet<&str> = members
            .iter()
            .map(String::as_str)
            .chain(workflow_tasks.get(id).into_iter().flatten().copied())
            .collect();
        let mut positions = redis::pipe();
        for task in &tasks {
            positions
                .cmd("HGET")
                .arg(model.key_of(tenant_of(id), &format!("task:{task}")))
                .arg("last_position");
        }
        let positions: Vec<Option<String>> = if tasks.is_empty() {
            Vec::new()
        } else {
            positions.query_async(&mut conn).await?
        };
        if positions.iter().any(|p| after(p.as_ref(), until_of(id))) {
            skipped += 1;
            continue;
        }
        if !actual.is_empty() && !positioned(actual.get("last_position")) {
            check(&key, "last_position", HAS_POSITION.to_owned(), &actual);
        }
        check(&key, "status", workflow.status.as_str().to_owned(), &actual);
        let per_workflow = counts.get(id);
        for counter in crate::redis::workflow_task_counters() {
            let state = counter.trim_start_matches("tasks_");
            let expected = per_workflow
                .and_then(|c| c.get(state))
                .copied()
                .unwrap_or(0);
            check(&key, &counter, expected.to_string(), &actual);
        }
    }
    Ok(Verified {
        until: compared.highest(),
        differences,
        skipped,
    })
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

/// The node property holding the position of the last event applied to it.
const POSITION: &str = "last_position";

/// What the verifier reads of the graph, in one read transaction.
struct GraphState {
    /// The checkpoint (one per partition of a model projected in
    /// partitions, partition `k`'s at index `k`), read first.
    checkpoints: Vec<Option<String>>,
    /// Nodes with the compared properties and [`POSITION`]: the greater of
    /// the position read with them and the one read after everything else.
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

/// `fields`, [`POSITION`] and the node's `tenant` (which partition's
/// compared position applies to it).
fn with_position(fields: &[&'static str]) -> Vec<&'static str> {
    let mut all = fields.to_vec();
    all.push(POSITION);
    all.push(TENANT);
    all
}

/// The tenant property of a graph node.
const TENANT: &str = "tenant";

/// Raises each node's [`POSITION`] to the one read again at the end (`rows`
/// of `id`, `position`).
fn reread(nodes: &mut Nodes, rows: &[Row], doing: &str) -> Result<(), GraphQueryError> {
    for row in rows {
        let [id, position]: [String; 2] = columns(row, &["id", POSITION], doing)?
            .try_into()
            .unwrap_or_default();
        let Ok(later) = position.parse::<i64>() else {
            continue;
        };
        if let Some(props) = nodes.get_mut(&id) {
            let first = props.get(POSITION).and_then(|p| p.parse::<i64>().ok());
            if first.is_none_or(|first| later > first) {
                props.insert(POSITION.to_owned(), later.to_string());
            }
        }
    }
    Ok(())
}

/// The properties compared on `Agent` nodes.
pub(crate) const GRAPH_AGENT_FIELDS: &[&str] = &["status", "name", "capabilities"];
/// The properties compared on `Task` nodes (with the `PART_OF`,
/// `ASSIGNED_TO` and `DEPENDS_ON` relationships).
pub(crate) const GRAPH_TASK_FIELDS: &[&str] =
    &["state", "workflow", "assignee", "attempt", "progress"];
/// The properties compared on `Workflow` nodes.
pub(crate) const GRAPH_WORKFLOW_FIELDS: &[&str] = &["status", "name"];

/// The checkpoint nodes of `model`: `graph`, or `graph/p<k>` per partition.
fn checkpoint_names(model: &GraphModel) -> Vec<String> {
    match model.config().partitions {
        0 | 1 => vec![PROJECTION.to_owned()],
        partitions => (0..partitions).map(crate::graph::partition_name).collect(),
    }
}

async fn read_graph(model: &GraphModel) -> Result<GraphState, GraphQueryError> {
    let doing = "reading the graph for verification";
    let unavailable = |source| GraphQueryError::Unavailable {
        doing: doing.to_owned(),
        source,
    };
    let labelled = |label: &str, fields: &[&'static str]| {
        let columns: Vec<String> = with_position(fields)
            .iter()
            .map(|f| format!("n.{f} AS {f}"))
            .collect();
        query(&format!(
            "MATCH (n:{label}) RETURN n.id AS id, {}",
            columns.join(", ")
        ))
    };
    let positions = |label: &str| {
        query(&format!(
            "MATCH (n:{label}) RETURN n.id AS id, n.{POSITION} AS {POSITION}"
        ))
    };
    let names = checkpoint_names(model);
    // In this order: the checkpoints first, the positions last (see the
    // module docs).
    let queries: [Query; 10] = [
        query(
            "MATCH (c:Checkpoint) WHERE c.projection IN $names \
             RETURN c.projection AS projection, c.position AS position",
        )
        .param("names", names.clone()),
        labelled("Agent", GRAPH_AGENT_FIELDS),
        labelled("Task", GRAPH_TASK_FIELDS),
        labelled("Workflow", GRAPH_WORKFLOW_FIELDS),
        query("MATCH (t:Task)-[:PART_OF]->(w:Workflow) RETURN t.id AS from, w.id AS to"),
        query("MATCH (t:Task)-[:ASSIGNED_TO]->(a:Agent) RETURN t.id AS from, a.id AS to"),
        query("MATCH (t:Task)-[:DEPENDS_ON]->(d:Task) RETURN t.id AS from, d.id AS to"),
        positions("Agent"),
        positions("Task"),
        positions("Workflow"),
    ];
    let mut txn = model.begin().await.map_err(unavailable)?;
    let mut results = Vec::with_capacity(queries.len());
    for q in queries {
        results.push(collect(&mut txn, q).await.map_err(unavailable)?);
    }
    finish(txn).await;
    let [checkpoint, agents, tasks, workflows, part_of, assigned_to, depends_on, agents_after, tasks_after, workflows_after]: [Vec<Row>; 10] =
        results.try_into().unwrap_or_default();
    let mut checkpoints = vec![None; names.len()];
    for row in &checkpoint {
        let [name, position]: [String; 2] = columns(row, &["projection", "position"], doing)?
            .try_into()
            .unwrap_or_default();
        if let Some(k) = names.iter().position(|n| *n == name) {
            checkpoints[k] = Some(position);
        }
    }
    let mut state = GraphState {
        checkpoints,
        agents: nodes(&agents, &with_position(GRAPH_AGENT_FIELDS), doing)?,
        tasks: nodes(&tasks, &with_position(GRAPH_TASK_FIELDS), doing)?,
        workflows: nodes(&workflows, &with_position(GRAPH_WORKFLOW_FIELDS), doing)?,
        part_of: edges(&part_of, doing)?,
        assigned_to: edges(&assigned_to, doing)?,
        depends_on: edges(&depends_on, doing)?,
    };
    reread(&mut state.agents, &agents_after, doing)?;
    reread(&mut state.tasks, &tasks_after, doing)?;
    reread(&mut state.workflows, &workflows_after, doing)?;
    Ok(state)
}

/// Reads the graph read model and compares it with the fold of the log up
/// to the graph's checkpoint (read first, in the same transaction), which
/// must be at or past `until` (a checkpoint behind it is a difference: the
/// graph lost events). Nodes the projector changed after the checkpoint
/// while the transaction read are skipped (see the module docs). Compared:
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
/// transaction.
pub async fn verify_graph(
    store: &EventStore,
    model: &GraphModel,
    until: i64,
) -> Result<Verified, VerifyError> {
    let partitions = model.config().partitions;
    if partitions <= 1 {
        return verify_graph_at(store, model, &Compared::whole(until)).await;
    }
    // Each partition must have applied its last event at or below `until`.
    let mut untils = Vec::with_capacity(partitions as usize);
    for k in 0..partitions {
        untils.push(store.last_in_partition(until, partitions, k).await?);
    }
    verify_graph_at(store, model, &Compared::partitions(untils)).await
}

/// [`verify_graph`] at `wanted`: each partition's checkpoint (of a model
/// projected in partitions) must be at or past its entry, and each
/// partition is compared at its own checkpoint.
async fn verify_graph_at(
    store: &EventStore,
    model: &GraphModel,
    wanted: &Compared,
) -> Result<Verified, VerifyError> {
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
    // A checkpoint above what is wanted means the projector applied more
    // since it was read (it cannot hold events the store lacks); below, it
    // lost some.
    let names = checkpoint_names(model);
    let mut untils = Vec::with_capacity(names.len());
    for (k, (name, stored)) in names.iter().zip(&graph.checkpoints).enumerate() {
        let until = wanted.untils.get(k).copied().unwrap_or(0);
        let stored = stored.clone().unwrap_or_else(|| "0".to_owned());
        untils.push(match stored.parse::<i64>() {
            Ok(checkpoint) if checkpoint >= until => checkpoint,
            _ => {
                differ(
                    &format!("Checkpoint {name}"),
                    "position",
                    until.to_string(),
                    stored,
                );
                until
            }
        });
    }
    let compared = if untils.len() > 1 {
        Compared::partitions(untils)
    } else {
        Compared::whole(untils.first().copied().unwrap_or(0))
    };
    let folded = fold(store, &compared).await?;
    let mut skipped = 0;
    // Present in the events, absent from the graph: one difference for the
    // node, none for each of its fields.
    let node =
        |nodes: &mut Nodes, id: &str| -> Option<BTreeMap<String, String>> { nodes.remove(id) };
    // Each node at its tenant's partition's compared position.
    let moved = |props: &BTreeMap<String, String>| {
        let tenant = props.get(TENANT).map_or("", String::as_str);
        after(props.get(POSITION), compared.of(tenant))
    };
    let field = |props: &BTreeMap<String, String>, name: &str| -> String {
        props.get(name).cloned().unwrap_or_default()
    };
    let targets = |edges: &Edges, id: &str| -> String {
        edges.get(id).map(|t| t.join(",")).unwrap_or_default()
    };

    for state in folded.agents.values() {
        let Some(agent) = state.get() else { continue };
        let id = agent.id.to_string();
        let key = format!("Agent {id}");
        let Some(props) = node(&mut graph.agents, &id) else {
            differ(&key, "node", "present".to_owned(), "missing".to_owned());
            continue;
        };
        if moved(&props) {
            skipped += 1;
            continue;
        }
        if !positioned(props.get(POSITION)) {
            differ(
                &key,
                POSITION,
                HAS_POSITION.to_owned(),
                field(&props, POSITION),
            );
        }
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
        if moved(&props) {
            skipped += 1;
            continue;
        }
        if !positioned(props.get(POSITION)) {
            differ(
                &key,
                POSITION,
                HAS_POSITION.to_owned(),
                field(&props, POSITION),
            );
        }
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
        if moved(&props) {
            skipped += 1;
            continue;
        }
        if !positioned(props.get(POSITION)) {
            differ(
                &key,
                POSITION,
                HAS_POSITION.to_owned(),
                field(&props, POSITION),
            );
        }
        differ(
            &key,
            "status",
            workflow.status.as_str().to_owned(),
            field(&props, "status"),
        );
        differ(&key, "name", workflow.name.clone(), field(&props, "name"));
    }
    // What is left was never created by an event up to the compared
    // position: created later (skipped), or by no event at all.
    for (label, extra) in [
        ("Agent", &graph.agents),
        ("Task", &graph.tasks),
        ("Workflow", &graph.workflows),
    ] {
        for (id, props) in extra {
            if moved(props) {
                skipped += 1;
                continue;
            }
            differ(
                &format!("{label} {id}"),
                "node",
                "absent".to_owned(),
                "present".to_owned(),
            );
        }
    }
    Ok(Verified {
        until: compared.highest(),
        differences,
        skipped,
    })
}

/// What [`confirmed`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confirmed {
    /// The position the last pass compared at.
    pub until: i64,
    /// Differences found in every pass (same key and field).
    pub differences: Vec<Difference>,
    /// Differences of the first pass that later passes did not find again.
    pub transient: usize,
    /// Entities the last pass skipped (changed after its position).
    pub skipped: usize,
}

/// Verifies a model that may be changing (its projector running): runs
/// `pass` up to `passes` times and keeps the differences found in every
/// pass; a clean pass ends the loop. With the rule of the module docs a pass
/// skips what moved while it read, so the first one is normally exact; the
/// later passes are for a batch seen half-committed by a read racing it. A
/// read model that is wrong stays wrong at each position.
pub async fn confirmed<E, F, Fut>(passes: usize, mut pass: F) -> Result<Confirmed, E>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Verified, E>>,
{
    let first = pass().await?;
    let (mut until, mut skipped) = (first.until, first.skipped);
    let mut differences = first.differences.clone();
    for _ in 1..passes.max(1) {
        if differences.is_empty() {
            break;
        }
        let next = pass().await?;
        (until, skipped) = (next.until, next.skipped);
        let again: BTreeSet<(&str, &str)> = next
            .differences
            .iter()
            .map(|d| (d.key.as_str(), d.field.as_str()))
            .collect();
        // Keep the latest reading of each persisting difference.
        differences = next
            .differences
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
        .differences
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
        skipped,
    })
}

/// `neurectomy verify` of the Redis read model, which may be moving:
/// [`PASSES`] [`confirmed`] passes of [`verify_redis`], each at the
/// checkpoint it reads first.
pub async fn verify_redis_confirmed(
    store: &EventStore,
    model: &RedisModel,
) -> Result<Confirmed, VerifyError> {
    confirmed(PASSES, || async {
        if model.config().partitions > 1 {
            // Each partition at its own checkpoint (absent: nothing applied).
            let untils = model.partition_checkpoints().await?;
            let compared =
                Compared::partitions(untils.into_iter().map(|c| c.unwrap_or(0)).collect());
            return verify_redis_at(store, model, &compared).await;
        }
        let until = model.checkpoint().await.map_err(VerifyError::Checkpoint)?;
        verify_redis(store, model, until).await
    })
    .await
}

/// `neurectomy verify` of the graph read model, which may be moving:
/// [`PASSES`] [`confirmed`] passes of [`verify_graph`], each at the graph's
/// checkpoint (no earlier than the one read before it).
pub async fn verify_graph_confirmed(
    store: &EventStore,
    model: &GraphModel,
) -> Result<Confirmed, VerifyError> {
    confirmed(PASSES, || async {
        if model.config().partitions > 1 {
            // Each partition at its own checkpoint (absent: nothing applied).
            let untils = model.partition_checkpoints().await.map_err(|source| {
                GraphQueryError::Unavailable {
                    doing: "reading the partitions' checkpoints".to_owned(),
                    source,
                }
            })?;
            let compared =
                Compared::partitions(untils.into_iter().map(|c| c.unwrap_or(0)).collect());
            return verify_graph_at(store, model, &compared).await;
        }
        let until = model.checkpoint().await.map_err(VerifyError::Checkpoint)?;
        verify_graph(store, model, until).await
    })
    .await
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

    fn pass(until: i64, differences: Vec<Difference>, skipped: usize) -> Verified {
        Verified {
            until,
            differences,
            skipped,
        }
    }

    #[tokio::test]
    async fn only_differences_found_in_every_pass_are_confirmed() {
        let passes = std::sync::Mutex::new(vec![
            pass(7, vec![d("a", "f", "3")], 0),
            pass(8, vec![d("a", "f", "4"), d("c", "f", "1")], 2),
            pass(9, vec![d("a", "f", "5"), d("b", "f", "1")], 1),
        ]);
        let found = confirmed(3, || {
            let next = passes.lock().unwrap().remove(0);
            async move { Ok::<_, ()>(next) }
        })
        .await
        .unwrap();
        assert_eq!(found.differences, vec![d("a", "f", "5")]);
        assert_eq!((found.until, found.transient, found.skipped), (9, 0, 1));

        let passes = std::sync::Mutex::new(vec![
            pass(9, vec![d("a", "f", "1"), d("b", "g", "2")], 0),
            pass(9, vec![], 4),
        ]);
        let found = confirmed(3, || {
            let next = passes.lock().unwrap().remove(0);
            async move { Ok::<_, ()>(next) }
        })
        .await
        .unwrap();
        assert!(found.differences.is_empty());
        assert_eq!((found.until, found.transient, found.skipped), (9, 2, 4));
    }

    #[test]
    fn only_a_readable_position_past_the_compared_one_skips() {
        let p = |s: &str| s.to_owned();
        assert!(after(Some(&p("11")), 10));
        assert!(!after(Some(&p("10")), 10));
        assert!(!after(Some(&p("")), 10));
        assert!(!after(Some(&p("bogus")), 10));
        assert!(!after(None, 10));
        assert!(positioned(Some(&p("0"))));
        assert!(!positioned(Some(&p(""))));
        assert!(!positioned(None));
    }
}
