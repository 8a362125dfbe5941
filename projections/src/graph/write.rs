//! Applying a batch: read the checkpoint and the prior state the batch
//! needs, fold the events in order into final node properties and
//! relationship changes, write them with a few `UNWIND $rows` statements and
//! move the checkpoint, all in one transaction.
//!
//! Folding first is what makes batching correct: every event takes effect in
//! order in memory, and what is written is only the end result (last value
//! of each property, the final assignee edge of each task), which no
//! reordering of the statements can change.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use domain::{
    AgentEvent, AggregateKind, DomainEvent, ErasureEvent, StreamId, TaskEvent, WorkflowEvent,
};
use neo4rs::{query, BoltType, Query, Row, Txn};

use super::fold::{int, rejected, text, AgentRow, Fold, Props, TaskRow};
use super::{collect, finish, is_transient, GraphModel, PROJECTION};
use crate::model::{ApplyError, Fence, Projected};

/// The stored checkpoint `name` (`graph`, or `graph/p<k>` of a partition).
pub(super) fn checkpoint_query(name: &str) -> Query {
    query("MATCH (c:Checkpoint {projection: $projection}) RETURN c.position AS position")
        .param("projection", name)
}

/// The stored checkpoint and fence of this projection, locking the
/// checkpoint node for the rest of the transaction (a write takes the lock
/// on Neo4j; ArcadeDB refuses the later of two transactions that changed
/// it), so no other batch can commit between this check and the commit.
fn fenced_checkpoint_query(name: &str) -> Query {
    query(
        "MATCH (c:Checkpoint {projection: $projection}) SET c.fence = coalesce(c.fence, 0) \
         RETURN c.position AS position, c.fence AS fence",
    )
    .param("projection", name)
}

/// Stores the batch's lease token with its checkpoint.
fn fence_query(name: &str, fence: Fence) -> Query {
    query("MATCH (c:Checkpoint {projection: $projection}) SET c.fence = $fence")
        .param("projection", name)
        .param("fence", i64::try_from(fence.0).unwrap_or(i64::MAX))
}

/// Why a transaction did not commit.
enum Failure {
    /// An event cannot be applied (found while folding).
    Event(ApplyError),
    /// The server failed a statement or the commit.
    Store {
        doing: String,
        source: neo4rs::Error,
    },
}

fn store(doing: impl Into<String>) -> impl FnOnce(neo4rs::Error) -> Failure {
    let doing = doing.into();
    move |source| Failure::Store { doing, source }
}

/// Applies `events`; see the module docs.
///
/// With `after` (what the projector believes the checkpoint is), a stored
/// checkpoint behind it (the graph was wiped) is [`ApplyError::Moved`]: the
/// projector catches up from the stored one instead of leaving a gap.
///
/// With a `fence`, a batch is refused ([`ApplyError::Fenced`], nothing
/// written) when the checkpoint node holds a newer lease token; otherwise
/// the token is stored on it in the same transaction.
pub(super) async fn apply(
    model: &GraphModel,
    after: Option<i64>,
    fence: Option<Fence>,
    events: &[Projected],
) -> Result<(), ApplyError> {
    let all: Vec<&Projected> = events.iter().collect();
    let database = model.database_for_batch().await?;
    let mut conflicts = 0;
    let failure = loop {
        match try_apply(model, &database, after, fence, &all).await {
            Ok(()) => return Ok(()),
            Err(Failure::Store { source, .. })
                if is_conflict(&source) && conflicts < CONFLICT_RETRIES =>
            {
                // Another transaction changed what this one did (partitions
                // applied side by side; on ArcadeDB, records on one page):
                // nothing was written, so the batch is tried again at once,
                // as a Neo4j driver's transaction function would, after a
                // short random pause that keeps the two apart.
                conflicts += 1;
                metrics::counter!("neurectomy_graph_conflicts_total").increment(1);
                tracing::debug!(conflicts, error = %source, "the graph refused a batch in a conflict; trying again");
                tokio::time::sleep(conflict_pause(conflicts)).await;
            }
            Err(failure) => break failure,
        }
    };
    match failure {
        Failure::Event(error) => Err(error),
        Failure::Store { doing, source } if is_transient(&source) => Err(ApplyError::Unavailable {
            store: "the graph",
            doing,
            source: Box::new(source),
        }),
        Failure::Store { doing, source } => {
            // The server refused the batch (a constraint, a statement it
            // rejects). Nothing of it was written; apply the events one by
            // one (each atomic with its checkpoint) to stop at the one it
            // refuses, with that event's position.
            if let [only] = all.as_slice() {
                return Err(rejected(
                    only,
                    format!("the graph refused it while {doing}: {source}"),
                ));
            }
            for p in &all {
                match try_apply(model, &database, None, fence, &[*p]).await {
                    Ok(()) => {}
                    Err(Failure::Event(error)) => return Err(error),
                    Err(Failure::Store { doing, source }) if is_transient(&source) => {
                        return Err(ApplyError::Unavailable {
                            store: "the graph",
                            doing,
                            source: Box::new(source),
                        })
                    }
                    Err(Failure::Store { doing, source }) => {
                        return Err(rejected(
                            p,
                            format!("the graph refused it while {doing}: {source}"),
                        ))
                    }
                }
            }
            Ok(())
        }
    }
}

/// Times a batch refused in a conflict with another transaction is tried
/// again at once (with a short pause) before the projector's own backoff.
const CONFLICT_RETRIES: u32 = 8;

/// Whether the server refused a transaction because a concurrent one
/// changed the same data (Neo4j's deadlock detection; ArcadeDB's concurrent
/// modification of a page): retrying it at once is expected to succeed.
fn is_conflict(error: &neo4rs::Error) -> bool {
    const CODE: &str = "Neo.TransientError.Transaction.";
    match error {
        neo4rs::Error::Neo4j(e) => e.code().starts_with(CODE),
        neo4rs::Error::UnexpectedMessage(text) | neo4rs::Error::UnknownMessage(text) => {
            text.contains(CODE)
        }
        _ => false,
    }
}

/// The pause before the `n`-th retry of a batch refused in a conflict:
/// random, below 2^n ms (at most 128 ms), so that two projectors that
/// collided do not collide again.
fn conflict_pause(n: u32) -> std::time::Duration {
    let ceiling = 1u128 << n.min(7);
    let random = uuid::Uuid::new_v4().as_u128() % (ceiling * 1_000);
    std::time::Duration::from_micros(u64::try_from(random).unwrap_or(0))
}

async fn fetch(txn: &mut Txn, q: Query, doing: &str) -> Result<Vec<Row>, Failure> {
    collect(txn, q).await.map_err(store(doing))
}

async fn try_apply(
    model: &GraphModel,
    database: &str,
    after: Option<i64>,
    fence: Option<Fence>,
    events: &[&Projected],
) -> Result<(), Failure> {
    let mut txn = model
        .graph()
        .start_txn_on(database)
        .await
        .map_err(store("starting a transaction"))?;
    // The runtime already skips what is at or below the checkpoint; the
    // model checks again against the stored value (in the same transaction),
    // so a batch handed to it twice is a no-op.
    let name = model.checkpoint_name();
    let read = match fence {
        Some(_) => fenced_checkpoint_query(&name),
        None => checkpoint_query(&name),
    };
    let stored = fetch(&mut txn, read, "reading the checkpoint").await?;
    let stored = stored.first();
    let checkpoint = stored
        .and_then(|r| r.get::<i64>("position").ok())
        .unwrap_or(0);
    if let Some(fence) = fence {
        let newer = stored
            .and_then(|r| r.get::<i64>("fence").ok())
            .and_then(|f| u64::try_from(f).ok())
            .unwrap_or(0);
        if newer > fence.0 {
            finish(txn).await;
            return Err(Failure::Event(ApplyError::Fenced {
                store: "graph",
                token: fence.0,
                newer,
            }));
        }
    }
    if let Some(after) = after.filter(|after| checkpoint < *after) {
        finish(txn).await;
        return Err(Failure::Event(ApplyError::Moved {
            store: "graph",
            reason: format!(
                "its checkpoint in database {database} is {checkpoint}, behind the projector's {after} \
                 (the graph was wiped or replaced)"
            ),
        }));
    }
    let events: Vec<&Projected> = events
        .iter()
        .copied()
        .filter(|p| p.recorded.position > checkpoint)
        .collect();
    let Some(last) = events.last().map(|p| p.recorded.position) else {
        finish(txn).await;
        return Ok(());
    };
    let mut fold = prior_state(&mut txn, &events).await?;
    for p in &events {
        fold.event(p).map_err(Failure::Event)?;
    }
    for (doing, statement) in statements(fold, last, &name) {
        txn.run(statement).await.map_err(store(doing))?;
    }
    if let Some(fence) = fence {
        txn.run(fence_query(&name, fence))
            .await
            .map_err(store("storing the lease token"))?;
    }
    txn.commit().await.map_err(store(format!(
        "committing the batch ending at position {last}"
    )))
}

/// Reads what the batch needs to know of entities it does not create.
async fn prior_state(txn: &mut Txn, events: &[&Projected]) -> Result<Fold, Failure> {
    let mut workflows = BTreeSet::new();
    let mut tasks = BTreeSet::new();
    let mut agents = BTreeSet::new();
    for p in events {
        match &p.event {
            DomainEvent::Workflow(WorkflowEvent::WorkflowStarted { .. }) => {}
            DomainEvent::Workflow(e) => {
                workflows.insert(e.workflow_id().to_string());
            }
            DomainEvent::Agent(AgentEvent::AgentRegistered {
                parent_agent_id, ..
            }) => {
                agents.extend(parent_agent_id.map(|id| id.to_string()));
            }
            DomainEvent::Agent(e) => {
                agents.insert(e.agent_id().to_string());
            }
            DomainEvent::Task(e) => match e {
                TaskEvent::TaskCreated {
                    workflow_id,
                    depends_on,
                    ..
                } => {
                    workflows.insert(workflow_id.to_string());
                    tasks.extend(depends_on.iter().map(ToString::to_string));
                }
                TaskEvent::TaskAssigned { task_id, agent_id }
                | TaskEvent::TaskStarted { task_id, agent_id } => {
                    tasks.insert(task_id.to_string());
                    agents.insert(agent_id.to_string());
                }
                TaskEvent::TaskDelegated {
                    task_id,
                    from_agent_id,
                    to_agent_id,
                } => {
                    tasks.insert(task_id.to_string());
                    agents.insert(from_agent_id.to_string());
                    agents.insert(to_agent_id.to_string());
                }
                other => {
                    tasks.insert(other.task_id().to_string());
                }
            },
            DomainEvent::Erasure(ErasureEvent::PersonalDataErased { changes, .. }) => {
                for change in changes {
                    let Ok(stream) = StreamId::parse(&change.stream_id) else {
                        continue;
                    };
                    let id = stream.uuid().to_string();
                    match stream.kind() {
                        AggregateKind::Agent => agents.insert(id),
                        AggregateKind::Task => tasks.insert(id),
                        AggregateKind::Workflow => workflows.insert(id),
                        AggregateKind::Erasure => false,
                    };
                }
            }
        }
    }
    let mut fold = Fold::default();
    if !workflows.is_empty() {
        let q = query("UNWIND $ids AS id MATCH (w:Workflow {id: id}) RETURN w.id AS id")
            .param("ids", workflows.into_iter().collect::<Vec<_>>());
        for row in fetch(txn, q, "reading workflows").await? {
            if let Ok(id) = row.get::<String>("id") {
                fold.workflows.insert(id);
            }
        }
    }
    if !tasks.is_empty() {
        let q = query(
            "UNWIND $ids AS id MATCH (t:Task {id: id}) \
             RETURN t.id AS id, t.state AS state, t.assignee AS assignee",
        )
        .param("ids", tasks.into_iter().collect::<Vec<_>>());
        for row in fetch(txn, q, "reading tasks").await? {
            let Ok(id) = row.get::<String>("id") else {
                continue;
            };
            let state = row
                .get::<Option<String>>("state")
                .ok()
                .flatten()
                .unwrap_or_default();
            let assignee = row.get::<Option<String>>("assignee").ok().flatten();
            // Completing a task releases its assignee: read that agent too.
            agents.extend(assignee.clone());
            fold.tasks.insert(id, TaskRow { state, assignee });
        }
    }
    if !agents.is_empty() {
        let q = query("UNWIND $ids AS id MATCH (a:Agent {id: id}) RETURN a.id AS id, a.current_task AS current_task")
            .param("ids", agents.into_iter().collect::<Vec<_>>());
        for row in fetch(txn, q, "reading agents").await? {
            let Ok(id) = row.get::<String>("id") else {
                continue;
            };
            let current_task = row.get::<Option<String>>("current_task").ok().flatten();
            fold.agents.insert(id, AgentRow { current_task });
        }
    }
    Ok(fold)
}

/// The statements the model writes for each of `batches` when it applies
/// them, in order, to an empty graph: every `UNWIND $rows …` statement and
/// the checkpoint, one list per batch (empty for an empty batch). What the
/// model reads from the graph before folding a batch (which entities exist,
/// task states and assignees, agents' current tasks) is carried in memory
/// from batch to batch instead, so these are the statements it sends, with
/// the same rows. Sending them measures the server alone (the "graph raw"
/// scenario of `neurectomy-bench project`).
pub fn replay_statements(batches: &[Vec<Projected>]) -> Result<Vec<Vec<Query>>, ApplyError> {
    let mut known = Fold::default();
    let mut planned = Vec::with_capacity(batches.len());
    for batch in batches {
        let Some(last) = batch.last().map(|p| p.recorded.position) else {
            planned.push(Vec::new());
            continue;
        };
        let mut fold = Fold {
            workflows: std::mem::take(&mut known.workflows),
            tasks: std::mem::take(&mut known.tasks),
            agents: std::mem::take(&mut known.agents),
            ..Fold::default()
        };
        for p in batch {
            fold.event(p)?;
        }
        known.workflows = std::mem::take(&mut fold.workflows);
        known.tasks = std::mem::take(&mut fold.tasks);
        known.agents = std::mem::take(&mut fold.agents);
        planned.push(
            statements(fold, last, PROJECTION)
                .into_iter()
                .map(|(_, q)| q)
                .collect(),
        );
    }
    Ok(planned)
}

/// The statements writing the folded batch, nodes before the
/// relationships that match them, the checkpoint (`checkpoint`: its name)
/// last.
pub(super) fn statements(fold: Fold, last: i64, checkpoint: &str) -> Vec<(String, Query)> {
    let mut out = Vec::new();
    let mut push = |doing: &str, cypher: &str, rows: Vec<HashMap<String, BoltType>>| {
        if !rows.is_empty() {
            out.push((doing.to_owned(), query(cypher).param("rows", rows)));
        }
    };
    let nodes = |props: BTreeMap<String, Props>| -> Vec<HashMap<String, BoltType>> {
        props
            .into_iter()
            .map(|(id, props)| {
                let props: HashMap<String, BoltType> =
                    props.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
                row([("id", text(id)), ("props", BoltType::from(props))])
            })
            .collect()
    };
    let pairs = |pairs: Vec<(String, String)>,
                 a: &'static str,
                 b: &'static str|
     -> Vec<HashMap<String, BoltType>> {
        pairs
            .into_iter()
            .map(|(x, y)| row([(a, text(x)), (b, text(y))]))
            .collect()
    };
    push(
        "writing workflows",
        "UNWIND $rows AS row MERGE (n:Workflow {id: row.id}) SET n += row.props",
        nodes(fold.workflow_props),
    );
    push(
        "writing agents",
        "UNWIND $rows AS row MERGE (n:Agent {id: row.id}) SET n += row.props",
        nodes(fold.agent_props),
    );
    push(
        "writing tasks",
        "UNWIND $rows AS row MERGE (n:Task {id: row.id}) SET n += row.props",
        nodes(fold.task_props),
    );
    push(
        "writing SPAWNED relationships",
        "UNWIND $rows AS row MATCH (p:Agent {id: row.parent}) MATCH (c:Agent {id: row.child}) \
         MERGE (p)-[:SPAWNED]->(c)",
        pairs(fold.spawned, "parent", "child"),
    );
    push(
        "writing PART_OF relationships",
        "UNWIND $rows AS row MATCH (t:Task {id: row.task}) MATCH (w:Workflow {id: row.workflow}) \
         MERGE (t)-[:PART_OF]->(w)",
        pairs(fold.part_of, "task", "workflow"),
    );
    push(
        "writing DEPENDS_ON relationships",
        "UNWIND $rows AS row MATCH (t:Task {id: row.task}) MATCH (d:Task {id: row.dependency}) \
         MERGE (t)-[:DEPENDS_ON]->(d)",
        pairs(fold.depends_on, "task", "dependency"),
    );
    let replaced: Vec<HashMap<String, BoltType>> = fold
        .assignment
        .keys()
        .map(|task| row([("task", text(task))]))
        .collect();
    push(
        "removing replaced ASSIGNED_TO relationships",
        "UNWIND $rows AS row MATCH (:Task {id: row.task})-[r:ASSIGNED_TO]->(:Agent) DELETE r",
        replaced,
    );
    let assigned: Vec<HashMap<String, BoltType>> = fold
        .assignment
        .into_iter()
        .filter_map(|(task, edge)| edge.map(|e| (task, e)))
        .map(|(task, e)| {
            row([
                ("task", text(task)),
                ("agent", text(e.agent)),
                ("position", int(e.position)),
                ("at", int(e.at)),
            ])
        })
        .collect();
    push(
        "writing ASSIGNED_TO relationships",
        "UNWIND $rows AS row MATCH (t:Task {id: row.task}) MATCH (a:Agent {id: row.agent}) \
         CREATE (t)-[:ASSIGNED_TO {position: row.position, at: row.at}]->(a)",
        assigned,
    );
    let delegated: Vec<HashMap<String, BoltType>> = fold
        .delegations
        .into_iter()
        .map(|(task, from, e)| {
            row([
                ("task", text(task)),
                ("from", text(from)),
                ("to", text(e.agent)),
                ("position", int(e.position)),
                ("at", int(e.at)),
            ])
        })
        .collect();
    push(
        "writing DELEGATED_TO relationships",
        "UNWIND $rows AS row MATCH (t:Task {id: row.task}) MATCH (a:Agent {id: row.to}) \
         MERGE (t)-[r:DELEGATED_TO {position: row.position}]->(a) SET r.from = row.from, r.at = row.at",
        delegated,
    );
    out.push((
        format!("moving the checkpoint to {last}"),
        query("MERGE (c:Checkpoint {projection: $projection}) SET c.position = $position")
            .param("projection", checkpoint)
            .param("position", last),
    ));
    out
}

fn row<const N: usize>(fields: [(&str, BoltType); N]) -> HashMap<String, BoltType> {
    fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

#[cfg(test)]
mod tests {
    use super::{conflict_pause, is_conflict};

    /// ArcadeDB reports a page changed by a concurrent transaction at
    /// COMMIT, as text; it is a conflict (retried at once), while a
    /// connection lost or a constraint refused is not.
    #[test]
    fn a_concurrent_change_refused_at_commit_is_a_conflict() {
        let refused = "unexpected response for COMMIT: Failure(Failure { metadata: BoltMap { value: {\
            BoltString { value: \"code\" }: String(BoltString { value: \"Neo.TransientError.Transaction.DeadlockDetected\" }), \
            BoltString { value: \"message\" }: String(BoltString { value: \"Slot rebase not possible on page PageId(db/5/0) slot 280 (concurrent change to the same record). Please retry the operation\" })} } })";
        assert!(is_conflict(&neo4rs::Error::UnexpectedMessage(
            refused.to_owned()
        )));
        let constraint = "unexpected response for COMMIT: Failure { code: \"Neo.ClientError.Schema.ConstraintValidationFailed\" }";
        assert!(!is_conflict(&neo4rs::Error::UnexpectedMessage(
            constraint.to_owned()
        )));
        assert!(!is_conflict(&neo4rs::Error::ConnectionError));
    }

    #[test]
    fn conflict_pauses_stay_below_their_ceiling() {
        for n in 1..12 {
            let ceiling = std::time::Duration::from_millis(1 << n.min(7));
            assert!(conflict_pause(n) < ceiling);
        }
    }
}
