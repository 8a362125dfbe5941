//! Queries on the read models: entities and pages from Redis, structure
//! from the graph, and the projections' status. No event-store reads here
//! but the log head for `projectionStatus`.

use std::sync::Arc;

use async_graphql::connection::{Connection, Edge, OpaqueCursor};
use async_graphql::{Context, Enum, InputObject, Object, SimpleObject, ID};
use projections::Entity;

use super::types::{Agent, Task, Workflow};
use super::{
    boxed, caller, consistent, has_min_position, ids, services, DateTime, Position, ReadModelKind,
};
use crate::auth::Role;
use crate::error::unavailable;

/// Agent statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[graphql(remote = "domain::AgentStatus")]
pub enum AgentStatus {
    /// Takes work.
    Active,
    /// Paused by an operator.
    Paused,
    /// Failed.
    Failed,
    /// Retired for good.
    Retired,
}

impl AgentStatus {
    /// The name the read models store.
    pub fn as_str(self) -> &'static str {
        domain::AgentStatus::from(self).as_str()
    }
}

/// Task states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[graphql(remote = "domain::TaskStatus")]
pub enum TaskState {
    /// Waiting for an assignee.
    Pending,
    /// Assigned, not started.
    Assigned,
    /// Running.
    Running,
    /// Completed.
    Completed,
    /// Failed (attempts exhausted or not retried).
    Failed,
    /// Cancelled.
    Cancelled,
}

impl TaskState {
    /// The name the read models store.
    fn as_str(self) -> &'static str {
        domain::TaskStatus::from(self).as_str()
    }
}

/// Which agents `agents` lists.
#[derive(Debug, Clone, Default, InputObject)]
pub struct AgentFilter {
    /// Only agents in this status.
    pub status: Option<AgentStatus>,
    /// Only agents with this capability.
    pub capability: Option<String>,
}

/// A task of a workflow's DAG.
#[derive(Debug, Clone, SimpleObject)]
pub struct DagTask {
    /// Task id.
    pub id: ID,
    /// Title.
    pub title: String,
    /// State.
    pub state: String,
    /// Assignee.
    pub assignee_id: Option<ID>,
}

/// A dependency edge: `from` depends on `to`.
#[derive(Debug, Clone, SimpleObject)]
pub struct DagEdge {
    /// The dependent task.
    pub from: ID,
    /// The task it waits for.
    pub to: ID,
}

/// A workflow's DAG (from the graph).
#[derive(Debug, Clone, SimpleObject)]
pub struct WorkflowGraph {
    /// Workflow id.
    pub id: ID,
    /// Name.
    pub name: String,
    /// Status.
    pub status: String,
    /// Tasks.
    pub tasks: Vec<DagTask>,
    /// Dependencies.
    pub edges: Vec<DagEdge>,
}

/// A task waiting for unfinished dependencies.
#[derive(Debug, Clone, SimpleObject)]
pub struct BlockedTask {
    /// Task id.
    pub id: ID,
    /// Title.
    pub title: String,
    /// State.
    pub state: String,
    /// The unfinished tasks it waits for.
    pub blocked_by: Vec<ID>,
}

/// One delegation of a task.
#[derive(Debug, Clone, SimpleObject)]
pub struct Delegation {
    /// The agent that handed it on.
    pub from_agent_id: ID,
    /// The agent it went to.
    pub to_agent_id: ID,
    /// Position of the delegation event.
    pub position: Position,
    /// When it was decided.
    pub at: DateTime,
}

/// A task in an agent's neighbourhood.
#[derive(Debug, Clone, SimpleObject)]
pub struct NeighbourTask {
    /// Task id.
    pub id: ID,
    /// Title.
    pub title: String,
    /// State.
    pub state: String,
    /// Workflow.
    pub workflow_id: ID,
    /// Whether the agent holds it now.
    pub current: bool,
}

/// An agent's neighbourhood (from the graph).
#[derive(Debug, Clone, SimpleObject)]
pub struct AgentNeighbourhood {
    /// Agent id.
    pub id: ID,
    /// Tasks it holds or held.
    pub tasks: Vec<NeighbourTask>,
    /// Agents working on the same workflows.
    pub collaborator_ids: Vec<ID>,
    /// The agent that spawned it.
    pub parent_id: Option<ID>,
    /// Agents it spawned.
    pub children_ids: Vec<ID>,
}

/// A task upstream of another.
#[derive(Debug, Clone, SimpleObject)]
pub struct LineageTask {
    /// Task id.
    pub id: ID,
    /// Title.
    pub title: String,
    /// State.
    pub state: String,
    /// Shortest dependency distance (1 = direct).
    pub depth: i64,
}

/// A projection's progress.
#[derive(Debug, Clone, SimpleObject)]
pub struct ProjectionStatus {
    /// `redis` or `graph`; `redis/p<k>` for partition `k` of a Redis model
    /// projected in partitions (`nats.stream_partitions` > 1), one entry
    /// per partition.
    pub name: String,
    /// The partition, for a model projected in partitions.
    pub partition: Option<i32>,
    /// Last applied position.
    pub checkpoint: Position,
    /// The head of the event log.
    pub head: Position,
    /// Events committed but not applied yet: counted up to 10,000,
    /// PostgreSQL's estimate beyond. Of a partition: while it is live, the
    /// messages its JetStream consumer had still to deliver; otherwise
    /// every event past its checkpoint (an upper bound).
    pub lag: i64,
    /// What its projector last reported: `starting`, `catching_up`,
    /// `live`, `retrying`, `stopped`, or `unknown` (no report in 30 s).
    pub state: String,
    /// The projector's last error, if any.
    pub last_error: Option<String>,
    /// The `neurectomy project` process applying it (`host:pid:suffix`,
    /// the holder of the projection's lease; other processes stand by),
    /// or null without a recent report.
    pub owner: Option<String>,
}

fn graph_error(e: projections::GraphQueryError) -> async_graphql::Error {
    unavailable("the graph", e)
}

fn not_found(what: &str, id: &str) -> async_graphql::Error {
    crate::error::not_found(format!("{what} {id} does not exist"))
}

/// Page size: `first` (default 50) within `1..=max`.
fn page_size(first: Option<i32>, max: usize) -> async_graphql::Result<usize> {
    match first {
        None => Ok(super::limits::DEFAULT_PAGE.min(max)),
        Some(n) if n >= 1 && usize::try_from(n).is_ok_and(|n| n <= max) => {
            Ok(usize::try_from(n).unwrap_or(max))
        }
        Some(n) => Err(crate::error::validation(format!(
            "`first` must be between 1 and {max}, not {n}"
        ))),
    }
}

/// A page of sorted `ids` after the cursor.
fn page(
    ids: &[String],
    after: Option<String>,
    size: usize,
) -> async_graphql::Result<(Vec<String>, bool, bool)> {
    let start = match after {
        None => 0,
        Some(cursor) => {
            let OpaqueCursor(last) =
                <OpaqueCursor<String> as async_graphql::connection::CursorType>::decode_cursor(
                    &cursor,
                )
                .map_err(|_| {
                    crate::error::validation("`after` is not a cursor this API returned")
                })?;
            ids.partition_point(|id| *id <= last)
        }
    };
    let end = (start + size).min(ids.len());
    Ok((ids[start..end].to_vec(), start > 0, end < ids.len()))
}

/// A page of the entities with sorted `ids` after the cursor, as a
/// connection (entities gone or of another tenant are left out).
async fn connection<T: async_graphql::OutputType>(
    services: &super::Services,
    entity: Entity,
    tenant: &str,
    ids: &[String],
    after: Option<String>,
    size: usize,
    node: fn(&str, &projections::Fields) -> T,
) -> async_graphql::Result<Connection<OpaqueCursor<String>, T>> {
    let (ids, previous, next) = page(ids, after, size)?;
    let rows = services
        .redis
        .entities(entity, tenant, &ids)
        .await
        .map_err(|e| unavailable("Redis", e))?;
    let mut connection = Connection::new(previous, next);
    for (id, row) in ids.iter().zip(rows) {
        if let Some(fields) = row {
            connection
                .edges
                .push(Edge::new(OpaqueCursor(id.clone()), node(id, &fields)));
        }
    }
    Ok(connection)
}

/// Queries on the read models.
#[derive(Default)]
pub struct ReadQuery;

#[Object]
impl ReadQuery {
    /// An agent by id (Redis; without `atLeastPosition`, from the API's
    /// near cache when it holds the agent: at most the change feed's delay
    /// behind Redis).
    async fn agent(
        &self,
        ctx: &Context<'_>,
        id: ID,
        at_least_position: Option<Position>,
    ) -> async_graphql::Result<Option<Arc<Agent>>> {
        boxed(async move {
            let who = caller(ctx, Role::Viewer)?;
            let id = ids::agent("id", &id)?.to_string();
            let services = services(ctx);
            // The hash fields the selection needs (a near-cache hit needs none).
            let wanted = || -> Vec<&'static str> {
                let selection = ctx.look_ahead();
                Agent::STORED
                    .iter()
                    .filter(|(field, _)| selection.field(field).exists())
                    .map(|(_, stored)| *stored)
                    .collect()
            };
            if at_least_position.is_some() || has_min_position(ctx) {
                // Read-your-writes: Redis itself, once it has the position.
                consistent(ctx, ReadModelKind::Redis, at_least_position).await?;
                let fields = services
                    .redis
                    .entity_fields(Entity::Agent, &who.tenant, &id, &wanted())
                    .await
                    .map_err(|e| unavailable("Redis", e))?;
                return Ok(fields.map(|f| Arc::new(Agent::from_fields(&id, &f))));
            }
            services
                .feed
                .agent(&who.tenant, &id, wanted)
                .await
                .map_err(|e| unavailable("Redis", e))
        })
        .await
    }

    /// Agents by status and capability, by id (Redis).
    async fn agents(
        &self,
        ctx: &Context<'_>,
        filter: Option<AgentFilter>,
        first: Option<i32>,
        after: Option<String>,
        at_least_position: Option<Position>,
    ) -> async_graphql::Result<Connection<OpaqueCursor<String>, Agent>> {
        boxed(async move {
            let who = caller(ctx, Role::Viewer)?;
            consistent(ctx, ReadModelKind::Redis, at_least_position).await?;
            let services = services(ctx);
            let size = page_size(first, services.limits.max_page)?;
            let filter = filter.unwrap_or_default();
            let ids = services
                .redis
                .agent_ids(
                    &who.tenant,
                    filter.status.map(AgentStatus::as_str),
                    filter.capability.as_deref(),
                )
                .await
                .map_err(|e| unavailable("Redis", e))?;
            connection(
                services,
                Entity::Agent,
                &who.tenant,
                &ids,
                after,
                size,
                Agent::from_fields,
            )
            .await
        })
        .await
    }

    /// A task by id (Redis).
    async fn task(
        &self,
        ctx: &Context<'_>,
        id: ID,
        at_least_position: Option<Position>,
    ) -> async_graphql::Result<Option<Task>> {
        boxed(async move {
            let who = caller(ctx, Role::Viewer)?;
            let id = ids::task("id", &id)?.to_string();
            consistent(ctx, ReadModelKind::Redis, at_least_position).await?;
            let fields = services(ctx)
                .redis
                .entity(Entity::Task, &who.tenant, &id)
                .await
                .map_err(|e| unavailable("Redis", e))?;
            Ok(fields.map(|f| Task::from_fields(&id, &f)))
        })
        .await
    }

    /// A workflow's tasks, optionally in one state, by id (Redis).
    async fn tasks(
        &self,
        ctx: &Context<'_>,
        workflow_id: ID,
        state: Option<TaskState>,
        first: Option<i32>,
        after: Option<String>,
        at_least_position: Option<Position>,
    ) -> async_graphql::Result<Connection<OpaqueCursor<String>, Task>> {
        boxed(async move {
            let who = caller(ctx, Role::Viewer)?;
            let workflow_id = ids::workflow("workflowId", &workflow_id)?.to_string();
            consistent(ctx, ReadModelKind::Redis, at_least_position).await?;
            let services = services(ctx);
            let size = page_size(first, services.limits.max_page)?;
            // The workflow must be the caller's: its task sets are keyed by id only.
            let workflow = services
                .redis
                .entity(Entity::Workflow, &who.tenant, &workflow_id)
                .await
                .map_err(|e| unavailable("Redis", e))?;
            if workflow.is_none() {
                return Err(not_found("workflow", &workflow_id));
            }
            let ids = services
                .redis
                .task_ids(&who.tenant, &workflow_id, state.map(TaskState::as_str))
                .await
                .map_err(|e| unavailable("Redis", e))?;
            connection(
                services,
                Entity::Task,
                &who.tenant,
                &ids,
                after,
                size,
                Task::from_fields,
            )
            .await
        })
        .await
    }

    /// A workflow with its progress counts (Redis).
    async fn workflow(
        &self,
        ctx: &Context<'_>,
        id: ID,
        at_least_position: Option<Position>,
    ) -> async_graphql::Result<Option<Workflow>> {
        boxed(async move {
            let who = caller(ctx, Role::Viewer)?;
            let id = ids::workflow("id", &id)?.to_string();
            consistent(ctx, ReadModelKind::Redis, at_least_position).await?;
            let fields = services(ctx)
                .redis
                .entity(Entity::Workflow, &who.tenant, &id)
                .await
                .map_err(|e| unavailable("Redis", e))?;
            Ok(fields.map(|f| Workflow::from_fields(&id, &f)))
        })
        .await
    }

    /// A workflow's tasks and dependencies (the graph).
    async fn workflow_graph(
        &self,
        ctx: &Context<'_>,
        id: ID,
        at_least_position: Option<Position>,
    ) -> async_graphql::Result<Option<WorkflowGraph>> {
        boxed(async move {
            let who = caller(ctx, Role::Viewer)?;
            let id = ids::workflow("id", &id)?.to_string();
            consistent(ctx, ReadModelKind::Graph, at_least_position).await?;
            let dag = services(ctx)
                .graph
                .workflow_dag(&who.tenant, &id)
                .await
                .map_err(graph_error)?;
            Ok(dag.map(|d| WorkflowGraph {
                id: ID(d.id),
                name: d.name,
                status: d.status,
                tasks: d
                    .tasks
                    .into_iter()
                    .map(|t| DagTask {
                        id: ID(t.id),
                        title: t.title,
                        state: t.state,
                        assignee_id: t.assignee.map(ID),
                    })
                    .collect(),
                edges: d
                    .edges
                    .into_iter()
                    .map(|e| DagEdge {
                        from: ID(e.from),
                        to: ID(e.to),
                    })
                    .collect(),
            }))
        })
        .await
    }

    /// Tasks of a workflow waiting for unfinished dependencies (the graph).
    async fn blocked_tasks(
        &self,
        ctx: &Context<'_>,
        workflow_id: ID,
        at_least_position: Option<Position>,
    ) -> async_graphql::Result<Vec<BlockedTask>> {
        boxed(async move {
            let who = caller(ctx, Role::Viewer)?;
            let workflow_id = ids::workflow("workflowId", &workflow_id)?.to_string();
            consistent(ctx, ReadModelKind::Graph, at_least_position).await?;
            let blocked = services(ctx)
                .graph
                .blocked_tasks(&who.tenant, &workflow_id)
                .await
                .map_err(graph_error)?
                .ok_or_else(|| not_found("workflow", &workflow_id))?;
            Ok(blocked
                .into_iter()
                .map(|b| BlockedTask {
                    id: ID(b.id),
                    title: b.title,
                    state: b.state,
                    blocked_by: b.blocked_by.into_iter().map(ID).collect(),
                })
                .collect())
        })
        .await
    }

    /// The delegations of a task, in order (the graph).
    async fn delegation_chain(
        &self,
        ctx: &Context<'_>,
        task_id: ID,
        at_least_position: Option<Position>,
    ) -> async_graphql::Result<Vec<Delegation>> {
        boxed(async move {
            let who = caller(ctx, Role::Viewer)?;
            let task_id = ids::task("taskId", &task_id)?.to_string();
            consistent(ctx, ReadModelKind::Graph, at_least_position).await?;
            let chain = services(ctx)
                .graph
                .delegation_chain(&who.tenant, &task_id)
                .await
                .map_err(graph_error)?
                .ok_or_else(|| not_found("task", &task_id))?;
            Ok(chain
                .into_iter()
                .map(|d| Delegation {
                    from_agent_id: ID(d.from),
                    to_agent_id: ID(d.to),
                    position: Position(d.position),
                    at: DateTime::from_millis(d.at),
                })
                .collect())
        })
        .await
    }

    /// An agent's tasks, collaborators, parent and children (the graph).
    async fn agent_neighbourhood(
        &self,
        ctx: &Context<'_>,
        id: ID,
        at_least_position: Option<Position>,
    ) -> async_graphql::Result<Option<AgentNeighbourhood>> {
        boxed(async move {
            let who = caller(ctx, Role::Viewer)?;
            let id = ids::agent("id", &id)?.to_string();
            consistent(ctx, ReadModelKind::Graph, at_least_position).await?;
            let n = services(ctx)
                .graph
                .agent_neighbourhood(&who.tenant, &id)
                .await
                .map_err(graph_error)?;
            Ok(n.map(|n| AgentNeighbourhood {
                id: ID(n.id),
                tasks: n
                    .tasks
                    .into_iter()
                    .map(|t| NeighbourTask {
                        id: ID(t.id),
                        title: t.title,
                        state: t.state,
                        workflow_id: ID(t.workflow),
                        current: t.current,
                    })
                    .collect(),
                collaborator_ids: n.collaborators.into_iter().map(ID).collect(),
                parent_id: n.parent.map(ID),
                children_ids: n.children.into_iter().map(ID).collect(),
            }))
        })
        .await
    }

    /// Everything upstream of a task, nearest first (the graph).
    async fn task_lineage(
        &self,
        ctx: &Context<'_>,
        id: ID,
        at_least_position: Option<Position>,
    ) -> async_graphql::Result<Vec<LineageTask>> {
        boxed(async move {
            let who = caller(ctx, Role::Viewer)?;
            let id = ids::task("id", &id)?.to_string();
            consistent(ctx, ReadModelKind::Graph, at_least_position).await?;
            let lineage = services(ctx)
                .graph
                .task_lineage(&who.tenant, &id)
                .await
                .map_err(graph_error)?
                .ok_or_else(|| not_found("task", &id))?;
            Ok(lineage
                .into_iter()
                .map(|t| LineageTask {
                    id: ID(t.id),
                    title: t.title,
                    state: t.state,
                    depth: t.depth,
                })
                .collect())
        })
        .await
    }

    /// Each projection's checkpoint, lag behind the log and state.
    async fn projection_status(
        &self,
        ctx: &Context<'_>,
    ) -> async_graphql::Result<Vec<ProjectionStatus>> {
        boxed(async move {
            caller(ctx, Role::Viewer)?;
            let services = services(ctx);
            let head = services
                .store
                .head()
                .await
                .map_err(|e| unavailable("the event store", e))?
                .readable;
            let mut out = Vec::new();
            let shown = |view: projections::redis::health::PartitionView| ProjectionStatus {
                name: view.name,
                partition: i32::try_from(view.partition).ok(),
                checkpoint: Position(view.checkpoint),
                head: Position(head),
                lag: view.lag,
                state: view.report.state,
                last_error: view.report.last_error,
                owner: view.report.owner,
            };
            if services.redis.config().partitions > 1 {
                let views =
                    projections::redis::health::partition_views(&services.redis, &services.store)
                        .await
                        .map_err(|e| unavailable("Redis or the event store", e))?;
                out.extend(views.into_iter().map(shown));
            } else {
                let redis = services
                    .redis
                    .read_checkpoint()
                    .await
                    .map_err(|e| unavailable("Redis", e))?;
                out.push(whole(services, "redis", redis, head).await?);
            }
            if services.graph.config().partitions > 1 {
                let views = projections::redis::health::graph_partition_views(
                    &services.graph,
                    &services.redis,
                    &services.store,
                )
                .await
                .map_err(|e| unavailable("the graph, Redis or the event store", e))?;
                out.extend(views.into_iter().map(shown));
            } else {
                let graph = services
                    .graph
                    .read_checkpoint()
                    .await
                    .map_err(|e| unavailable("the graph", e))?;
                out.push(whole(services, "graph", graph, head).await?);
            }
            Ok(out)
        })
        .await
    }
}

/// The status of a projection applied whole (not in partitions).
async fn whole(
    services: &crate::graphql::Services,
    name: &str,
    checkpoint: i64,
    head: i64,
) -> async_graphql::Result<ProjectionStatus> {
    let lag = services
        .store
        .lag(checkpoint)
        .await
        .map_err(|e| unavailable("the event store", e))?
        .events;
    let report = projections::redis::health::projector_report(&services.redis, name)
        .await
        .map_err(|e| unavailable("Redis", e))?;
    Ok(ProjectionStatus {
        name: name.to_owned(),
        partition: None,
        checkpoint: Position(checkpoint),
        head: Position(head),
        lag,
        state: report.state,
        last_error: report.last_error,
        owner: report.owner,
    })
}
