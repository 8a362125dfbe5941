//! Queries the API runs against the graph. Each is scoped by tenant: an
//! entity of another tenant is reported as absent (`None`).

use std::collections::{BTreeMap, BTreeSet};

use neo4rs::{query, Query, Row};
use serde::Deserialize;

use super::{collect, finish, GraphModel};

/// Why a graph query failed.
#[derive(Debug, thiserror::Error)]
pub enum GraphQueryError {
    /// The server failed or is unreachable; retrying may succeed.
    #[error("the graph is unavailable while {doing}")]
    Unavailable {
        /// What was being done.
        doing: String,
        /// The cause.
        #[source]
        source: neo4rs::Error,
    },
    /// A row did not have the expected shape (the graph was written by
    /// something else, or the schema changed).
    #[error("the graph returned an unexpected row while {doing}")]
    Decode {
        /// What was being done.
        doing: String,
        /// The cause.
        #[source]
        source: neo4rs::DeError,
    },
}

/// A task as a node of a workflow's DAG.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DagTask {
    /// Task id.
    pub id: String,
    /// Title.
    pub title: String,
    /// State (`pending`, `assigned`, `running`, `completed`, `failed`, `cancelled`).
    pub state: String,
    /// Current (or, once finished, last) assignee.
    pub assignee: Option<String>,
}

/// A dependency: `from` waits for `to`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DagEdge {
    /// The dependent task.
    pub from: String,
    /// The task it depends on.
    pub to: String,
}

/// A workflow's tasks and their dependencies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkflowDag {
    /// Workflow id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Status.
    pub status: String,
    /// Tasks, by id.
    pub tasks: Vec<DagTask>,
    /// Dependency edges, sorted.
    pub edges: Vec<DagEdge>,
}

/// An unfinished task waiting for unfinished dependencies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockedTask {
    /// Task id.
    pub id: String,
    /// Title.
    pub title: String,
    /// State.
    pub state: String,
    /// Direct dependencies not completed yet, sorted.
    pub blocked_by: Vec<String>,
}

/// One hop of a task's delegation chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delegation {
    /// Previous assignee.
    pub from: String,
    /// New assignee.
    pub to: String,
    /// Position of the `TaskDelegated` event.
    pub position: i64,
    /// When it happened (epoch ms).
    pub at: i64,
}

/// A task an agent holds or held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentTask {
    /// Task id.
    pub id: String,
    /// Title.
    pub title: String,
    /// State.
    pub state: String,
    /// Its workflow.
    pub workflow: String,
    /// Whether the agent is its assignee now and the task is not finished.
    pub current: bool,
}

/// An agent and what surrounds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentNeighbourhood {
    /// Agent id.
    pub id: String,
    /// Tasks assigned to it now or before (holding `ASSIGNED_TO`, or
    /// delegated to or from it), by id.
    pub tasks: Vec<AgentTask>,
    /// Other agents that worked on tasks of the same workflows (assignees,
    /// delegation sources and targets), which includes every agent it
    /// delegated to or from; sorted.
    pub collaborators: Vec<String>,
    /// The agent that spawned it.
    pub parent: Option<String>,
    /// Agents it spawned, sorted.
    pub children: Vec<String>,
}

/// A task upstream of another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineageTask {
    /// Task id.
    pub id: String,
    /// Title.
    pub title: String,
    /// State.
    pub state: String,
    /// Length of the shortest `DEPENDS_ON` path to it (1 = direct dependency).
    pub depth: i64,
}

fn decode<'r, T: Deserialize<'r>>(
    row: &'r Row,
    key: &str,
    doing: &str,
) -> Result<T, GraphQueryError> {
    row.get::<T>(key).map_err(|source| GraphQueryError::Decode {
        doing: format!("{doing} (column {key})"),
        source,
    })
}

impl GraphModel {
    /// Runs `queries` in one read transaction (a consistent view), one
    /// result set each.
    async fn rows<const N: usize>(
        &self,
        queries: [Query; N],
        doing: &str,
    ) -> Result<[Vec<Row>; N], GraphQueryError> {
        let unavailable = |source| GraphQueryError::Unavailable {
            doing: doing.to_owned(),
            source,
        };
        self.bounded(doing, async {
            let mut txn = self.begin().await?;
            let mut out: [Vec<Row>; N] = std::array::from_fn(|_| Vec::new());
            for (slot, q) in out.iter_mut().zip(queries) {
                *slot = collect(&mut txn, q).await?;
            }
            finish(txn).await;
            Ok(out)
        })
        .await
        .map_err(unavailable)
    }

    /// A query returning a row if a node of `label` with `id` exists in
    /// `tenant`.
    fn exists(label: &str, tenant: &str, id: &str) -> Query {
        // Labels cannot be parameters; callers pass constants.
        let cypher =
            format!("MATCH (n:{label} {{id: $id}}) WHERE n.tenant = $tenant RETURN n.id AS id");
        query(&cypher).param("id", id).param("tenant", tenant)
    }

    /// A workflow's tasks and dependency edges; `None` if the tenant has no
    /// such workflow.
    pub async fn workflow_dag(
        &self,
        tenant: &str,
        workflow_id: &str,
    ) -> Result<Option<WorkflowDag>, GraphQueryError> {
        let doing = format!("reading the DAG of workflow {workflow_id}");
        let workflow = query("MATCH (w:Workflow {id: $id}) WHERE w.tenant = $tenant RETURN w.name AS name, w.status AS status");
        let tasks = query(
            "MATCH (t:Task)-[:PART_OF]->(:Workflow {id: $id}) WHERE t.tenant = $tenant \
             RETURN t.id AS id, t.title AS title, t.state AS state, t.assignee AS assignee ORDER BY id",
        );
        let edges = query(
            "MATCH (t:Task)-[:PART_OF]->(:Workflow {id: $id}) WHERE t.tenant = $tenant \
             MATCH (t)-[:DEPENDS_ON]->(d:Task) RETURN t.id AS from, d.id AS to",
        );
        let queries =
            [workflow, tasks, edges].map(|q| q.param("id", workflow_id).param("tenant", tenant));
        let [workflow, task_rows, edge_rows] = self.rows(queries, &doing).await?;
        let Some(w) = workflow.first() else {
            return Ok(None);
        };
        let name = decode::<Option<String>>(w, "name", &doing)?.unwrap_or_default();
        let status = decode::<Option<String>>(w, "status", &doing)?.unwrap_or_default();
        let mut tasks = Vec::new();
        for row in &task_rows {
            tasks.push(DagTask {
                id: decode(row, "id", &doing)?,
                title: decode::<Option<String>>(row, "title", &doing)?.unwrap_or_default(),
                state: decode::<Option<String>>(row, "state", &doing)?.unwrap_or_default(),
                assignee: decode(row, "assignee", &doing)?,
            });
        }
        let mut edges = Vec::new();
        for row in &edge_rows {
            edges.push(DagEdge {
                from: decode(row, "from", &doing)?,
                to: decode(row, "to", &doing)?,
            });
        }
        edges.sort();
        edges.dedup();
        Ok(Some(WorkflowDag {
            id: workflow_id.to_owned(),
            name,
            status,
            tasks,
            edges,
        }))
    }

    /// Tasks of a workflow that are neither completed nor cancelled and
    /// depend directly on at least one task that is not completed, by id;
    /// `None` if the tenant has no such workflow.
    pub async fn blocked_tasks(
        &self,
        tenant: &str,
        workflow_id: &str,
    ) -> Result<Option<Vec<BlockedTask>>, GraphQueryError> {
        let doing = format!("reading the blocked tasks of workflow {workflow_id}");
        let q = query(
            "MATCH (t:Task)-[:PART_OF]->(:Workflow {id: $id}) \
             WHERE t.tenant = $tenant AND NOT t.state IN ['completed', 'cancelled'] \
             MATCH (t)-[:DEPENDS_ON]->(d:Task) WHERE d.state <> 'completed' \
             RETURN t.id AS id, t.title AS title, t.state AS state, collect(DISTINCT d.id) AS blocked_by \
             ORDER BY id",
        )
        .param("id", workflow_id)
        .param("tenant", tenant);
        let [found, rows] = self
            .rows([Self::exists("Workflow", tenant, workflow_id), q], &doing)
            .await?;
        if found.is_empty() {
            return Ok(None);
        }
        let mut blocked = Vec::new();
        for row in &rows {
            let mut blocked_by: Vec<String> = decode(row, "blocked_by", &doing)?;
            blocked_by.sort();
            blocked.push(BlockedTask {
                id: decode(row, "id", &doing)?,
                title: decode::<Option<String>>(row, "title", &doing)?.unwrap_or_default(),
                state: decode::<Option<String>>(row, "state", &doing)?.unwrap_or_default(),
                blocked_by,
            });
        }
        Ok(Some(blocked))
    }

    /// The delegations of a task in the order they happened; `None` if the
    /// tenant has no such task.
    pub async fn delegation_chain(
        &self,
        tenant: &str,
        task_id: &str,
    ) -> Result<Option<Vec<Delegation>>, GraphQueryError> {
        let doing = format!("reading the delegation chain of task {task_id}");
        let q = query(
            "MATCH (t:Task {id: $id})-[r:DELEGATED_TO]->(a:Agent) WHERE t.tenant = $tenant \
             RETURN r.from AS from, a.id AS to, r.position AS position, r.at AS at ORDER BY position",
        )
        .param("id", task_id)
        .param("tenant", tenant);
        let [found, rows] = self
            .rows([Self::exists("Task", tenant, task_id), q], &doing)
            .await?;
        if found.is_empty() {
            return Ok(None);
        }
        let mut hops = Vec::new();
        for row in &rows {
            hops.push(Delegation {
                from: decode(row, "from", &doing)?,
                to: decode(row, "to", &doing)?,
                position: decode(row, "position", &doing)?,
                at: decode(row, "at", &doing)?,
            });
        }
        hops.sort_by_key(|h| h.position);
        Ok(Some(hops))
    }

    /// An agent's tasks, collaborators, parent and children; `None` if the
    /// tenant has no such agent. (Two read transactions: the collaborators
    /// come from the workflows of the tasks found by the first.)
    pub async fn agent_neighbourhood(
        &self,
        tenant: &str,
        agent_id: &str,
    ) -> Result<Option<AgentNeighbourhood>, GraphQueryError> {
        let doing = format!("reading the neighbourhood of agent {agent_id}");
        let family = query(
            "MATCH (a:Agent {id: $id}) WHERE a.tenant = $tenant \
             OPTIONAL MATCH (p:Agent)-[:SPAWNED]->(a) \
             OPTIONAL MATCH (a)-[:SPAWNED]->(c:Agent) \
             RETURN p.id AS parent, collect(DISTINCT c.id) AS children",
        );
        // Its tasks: the ones it holds (or held, once finished) and the ones
        // delegated to or away from it.
        let tasks = query(
            "MATCH (t:Task)-[:ASSIGNED_TO]->(:Agent {id: $id}) WHERE t.tenant = $tenant \
             RETURN t.id AS id, t.title AS title, t.state AS state, t.workflow AS workflow, t.assignee AS assignee \
             UNION \
             MATCH (t:Task)-[r:DELEGATED_TO]->(b:Agent) WHERE t.tenant = $tenant AND (b.id = $id OR r.from = $id) \
             RETURN t.id AS id, t.title AS title, t.state AS state, t.workflow AS workflow, t.assignee AS assignee",
        );
        let queries = [family, tasks].map(|q| q.param("id", agent_id).param("tenant", tenant));
        let [family, task_rows] = self.rows(queries, &doing).await?;
        let Some(row) = family.first() else {
            return Ok(None);
        };
        let parent: Option<String> = decode(row, "parent", &doing)?;
        let mut children: Vec<String> = decode(row, "children", &doing)?;
        children.sort();
        children.dedup();

        let mut tasks = BTreeMap::new();
        for row in &task_rows {
            let id: String = decode(row, "id", &doing)?;
            let state = decode::<Option<String>>(row, "state", &doing)?.unwrap_or_default();
            let assignee: Option<String> = decode(row, "assignee", &doing)?;
            let current = assignee.as_deref() == Some(agent_id)
                && matches!(state.as_str(), "assigned" | "running");
            tasks.insert(
                id.clone(),
                AgentTask {
                    id,
                    title: decode::<Option<String>>(row, "title", &doing)?.unwrap_or_default(),
                    state,
                    workflow: decode::<Option<String>>(row, "workflow", &doing)?
                        .unwrap_or_default(),
                    current,
                },
            );
        }

        let workflows: Vec<String> = tasks
            .values()
            .map(|t| t.workflow.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut collaborators = BTreeSet::new();
        if !workflows.is_empty() {
            let q = query(
                "UNWIND $workflows AS wf MATCH (t:Task)-[:PART_OF]->(:Workflow {id: wf}) WHERE t.tenant = $tenant \
                 MATCH (t)-[:ASSIGNED_TO|DELEGATED_TO]->(b:Agent) RETURN DISTINCT b.id AS id \
                 UNION \
                 UNWIND $workflows AS wf MATCH (t:Task)-[:PART_OF]->(:Workflow {id: wf}) WHERE t.tenant = $tenant \
                 MATCH (t)-[r:DELEGATED_TO]->(:Agent) RETURN DISTINCT r.from AS id",
            )
            .param("workflows", workflows)
            .param("tenant", tenant);
            let [rows] = self.rows([q], &doing).await?;
            for row in &rows {
                if let Some(id) = decode::<Option<String>>(row, "id", &doing)? {
                    collaborators.insert(id);
                }
            }
        }
        collaborators.remove(agent_id);
        Ok(Some(AgentNeighbourhood {
            id: agent_id.to_owned(),
            tasks: tasks.into_values().collect(),
            collaborators: collaborators.into_iter().collect(),
            parent,
            children,
        }))
    }

    /// Every task upstream of a task (transitive `DEPENDS_ON`) with its
    /// shortest distance, by depth then id; `None` if the tenant has no such
    /// task.
    pub async fn task_lineage(
        &self,
        tenant: &str,
        task_id: &str,
    ) -> Result<Option<Vec<LineageTask>>, GraphQueryError> {
        let doing = format!("reading the lineage of task {task_id}");
        let q = query(
            "MATCH p = (t:Task {id: $id})-[:DEPENDS_ON*1..]->(u:Task) WHERE t.tenant = $tenant \
             RETURN u.id AS id, u.title AS title, u.state AS state, min(length(p)) AS depth",
        )
        .param("id", task_id)
        .param("tenant", tenant);
        let [found, rows] = self
            .rows([Self::exists("Task", tenant, task_id), q], &doing)
            .await?;
        if found.is_empty() {
            return Ok(None);
        }
        let mut upstream = Vec::new();
        for row in &rows {
            upstream.push(LineageTask {
                id: decode(row, "id", &doing)?,
                title: decode::<Option<String>>(row, "title", &doing)?.unwrap_or_default(),
                state: decode::<Option<String>>(row, "state", &doing)?.unwrap_or_default(),
                depth: decode(row, "depth", &doing)?,
            });
        }
        upstream.sort_by(|a, b| (a.depth, &a.id).cmp(&(b.depth, &b.id)));
        Ok(Some(upstream))
    }
}
