//! The graph read model (Neo4j 5 over Bolt; ArcadeDB's Bolt server in
//! development and CI).
//!
//! Nodes (every one keyed by a unique `id`, scoped by a `tenant` property):
//!
//! | label | properties |
//! |---|---|
//! | `Agent` | id, tenant, name, kind, model, capabilities (list), status, status_reason, current_task, last_position, updated_at |
//! | `Task` | id, tenant, workflow, title, state, assignee, progress, attempt, max_attempts, priority, required_capabilities (list), last_error, last_position, updated_at |
//! | `Workflow` | id, tenant, name, status, reason, last_position |
//! | `Checkpoint` | projection (`graph`, or `graph/p<k>` per partition, [`GraphModel::for_partition`]), position, fence (highest lease token a batch was written under, [`crate::lease`]) |
//!
//! Relationships:
//!
//! | relationship | meaning |
//! |---|---|
//! | `(Task)-[:PART_OF]->(Workflow)` | the task's workflow |
//! | `(Task)-[:DEPENDS_ON]->(Task)` | the task waits for the other one |
//! | `(Task)-[:ASSIGNED_TO {position, at}]->(Agent)` | the task's assignee: at most one per task |
//! | `(Task)-[:DELEGATED_TO {from, position, at}]->(Agent)` | one per delegation, `from` = previous assignee |
//! | `(Agent)-[:SPAWNED]->(Agent)` | parent → child |
//!
//! `ASSIGNED_TO` follows the task's `assignee`: assigning, starting by
//! another agent or delegating replaces the edge (the new one carries the
//! position of that event); a retry removes it (the task is pending again);
//! completion, failure and cancellation keep it, so "who did this task" and
//! an agent's past tasks stay answerable. Earlier holders of a delegated task
//! remain visible through `DELEGATED_TO.from`.
//!
//! `last_position` is the position of the last event applied to a node. Every
//! event that changes a node's properties or its outgoing `PART_OF`,
//! `DEPENDS_ON` or `ASSIGNED_TO` sets it in the same transaction (the one
//! exception: a cancelled task clears its agent's `current_task` without
//! it); `verify` relies on that to skip what changed while it read
//! (`crate::verify`; a unit test in `fold.rs` checks it per event type).
//!
//! Times are epoch milliseconds (`at`, `updated_at`): Bolt datetimes lose
//! their offsets on some servers. Positions are global event-store positions.
//!
//! A batch is folded in memory into final node properties and relationship
//! changes, written with a handful of `UNWIND $rows` statements, and
//! committed in one transaction together with the checkpoint, so a crash
//! leaves either all of a batch or none of it. Constraints (unique `id` per
//! label, unique `Checkpoint.projection`) are created at connect; no index
//! on frequently updated properties such as `state`.
//!
//! ## Namespaces
//!
//! The configured database is the *home* database. The read model lives in
//! the home database itself until a replay (`neurectomy replay --projection
//! graph`) rebuilds it into a database of its own (`<home>-g<id>`) and
//! switches over by writing one pointer node in the home database,
//! `(:ReadModel {projection: 'graph', database})`. Readers resolve the
//! pointer (cached for [`READ_POINTER_TTL`]); the projector resolves it
//! before every batch and, finding it moved, re-reads its checkpoint there
//! ([`ApplyError::Moved`]).

pub mod admin;
mod fold;
mod namespace;
mod read;
mod write;

use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use neo4rs::{query, ConfigBuilder, Graph, Query, Row, Txn};

use crate::model::{ApplyError, Fence, Projected, ReadModel};

pub use read::{
    AgentNeighbourhood, AgentTask, BlockedTask, DagEdge, DagTask, Delegation, GraphQueryError,
    LineageTask, WorkflowDag,
};
pub use write::replay_statements;

/// The name of the projection (and of its checkpoint node).
pub const PROJECTION: &str = "graph";

/// How long readers trust the resolved namespace pointer.
pub const READ_POINTER_TTL: Duration = Duration::from_secs(1);

/// Connections kept by the Bolt pool.
const MAX_CONNECTIONS: usize = 8;

/// The constraints the model relies on: every `MERGE` key is unique.
const SCHEMA: &[&str] = &[
    "CREATE CONSTRAINT agent_id IF NOT EXISTS FOR (a:Agent) REQUIRE a.id IS UNIQUE",
    "CREATE CONSTRAINT task_id IF NOT EXISTS FOR (t:Task) REQUIRE t.id IS UNIQUE",
    "CREATE CONSTRAINT workflow_id IF NOT EXISTS FOR (w:Workflow) REQUIRE w.id IS UNIQUE",
    "CREATE CONSTRAINT checkpoint_projection IF NOT EXISTS FOR (c:Checkpoint) REQUIRE c.projection IS UNIQUE",
];

/// Where the graph server is.
#[derive(Clone, PartialEq, Eq)]
pub struct GraphConfig {
    /// Bolt URI, e.g. `bolt://127.0.0.1:7687`.
    pub uri: String,
    /// User name (`neo4j` on Neo4j, `root` on ArcadeDB).
    pub user: String,
    /// Password.
    pub password: String,
    /// Database name, e.g. `neurectomy` (always sent: servers differ in their default).
    pub database: String,
    /// Longest a unit of work may take: a query with its results, a
    /// batch's transaction, a connection (neo4rs has no timeouts of its
    /// own). Past it the call fails as unavailable and the connection pool
    /// is replaced.
    pub timeout: Duration,
    /// Partitions the model is projected in (`commands::partition`; 1: one
    /// projector of the whole log). Each partition keeps a checkpoint node
    /// of its own (`graph/p<k>`); readers wait for their tenant's
    /// ([`GraphModel::read_checkpoint_of`]).
    pub partitions: u32,
}

impl std::fmt::Debug for GraphConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GraphConfig")
            .field("uri", &self.uri)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("database", &self.database)
            .field("timeout", &self.timeout)
            .field("partitions", &self.partitions)
            .finish()
    }
}

/// The graph read model. Cheap to clone (the Bolt pool is shared).
#[derive(Clone)]
pub struct GraphModel {
    /// The Bolt client and its pool; replaced after a timeout (see
    /// [`GraphModel::bounded`]).
    graph: Arc<RwLock<Graph>>,
    config: GraphConfig,
    namespace: Arc<namespace::Namespace>,
    /// The partition this model applies (see [`GraphModel::for_partition`]).
    partition: Option<u32>,
}

impl std::fmt::Debug for GraphModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GraphModel")
            .field("config", &self.config)
            .field("namespace", &self.namespace)
            .field("partition", &self.partition)
            .finish_non_exhaustive()
    }
}

/// Whether a neo4rs error means the store (not the data) is the problem, so
/// that retrying may succeed: I/O, the connection, authentication, transient
/// server errors (deadlocks, conflicting transactions).
pub(crate) fn is_transient(error: &neo4rs::Error) -> bool {
    match error {
        neo4rs::Error::IOError { .. }
        | neo4rs::Error::ConnectionError
        | neo4rs::Error::UrlParseError(_)
        | neo4rs::Error::UnsupportedScheme(_)
        | neo4rs::Error::InvalidDnsName(_)
        | neo4rs::Error::InvalidConfig
        | neo4rs::Error::UnsupportedVersion(_)
        | neo4rs::Error::AuthenticationError(_) => true,
        neo4rs::Error::Neo4j(e) => {
            matches!(e.kind(), neo4rs::Neo4jErrorKind::Transient)
                || matches!(
                    e.kind(),
                    neo4rs::Neo4jErrorKind::Client(
                        neo4rs::Neo4jClientErrorKind::Security(_)
                            | neo4rs::Neo4jClientErrorKind::SessionExpired
                    )
                )
        }
        // Failures reported at COMMIT arrive as text ("unexpected response
        // for COMMIT: Failure(... code ...)"), and so does a connection lost
        // while rows are pulled ("unexpected response for PULL:
        // Err(IOError { ... })"): the server went away, the data is fine.
        neo4rs::Error::UnexpectedMessage(text) | neo4rs::Error::UnknownMessage(text) => {
            text.contains("Neo.TransientError")
                || text.contains(": Err(IOError")
                || text.contains(": Err(ConnectionError")
        }
        _ => false,
    }
}

/// A Bolt client for `config` (its pool connects lazily).
async fn client(config: &GraphConfig) -> Result<Graph, neo4rs::Error> {
    let bolt = ConfigBuilder::default()
        .uri(&config.uri)
        .user(&config.user)
        .password(&config.password)
        .db(config.database.as_str())
        .max_connections(MAX_CONNECTIONS)
        .build()?;
    Graph::connect(bolt).await
}

/// Runs `q` in `txn` and collects its rows.
pub(crate) async fn collect(txn: &mut Txn, q: Query) -> Result<Vec<Row>, neo4rs::Error> {
    let mut stream = txn.execute(q).await?;
    let mut rows = Vec::new();
    while let Some(row) = stream.next(txn.handle()).await? {
        rows.push(row);
    }
    Ok(rows)
}

/// Ends a read-only transaction. What it read is read either way; a failed
/// commit leaves nothing behind (the pool resets the connection).
pub(crate) async fn finish(txn: Txn) {
    let _ = txn.commit().await;
}

fn unavailable(doing: impl Into<String>) -> impl FnOnce(neo4rs::Error) -> ApplyError {
    let doing = doing.into();
    move |source| ApplyError::Unavailable {
        store: "the graph",
        doing,
        source: Box::new(source),
    }
}

impl GraphModel {
    /// Connects to the graph server, follows the home database's namespace
    /// pointer, and makes sure the constraints exist there.
    pub async fn connect(config: GraphConfig) -> Result<Self, ApplyError> {
        Self::open(config, None).await
    }

    /// Connects to one database of the graph server, ignoring the pointer:
    /// what a replay writes its new namespace with.
    pub async fn connect_database(config: GraphConfig, database: &str) -> Result<Self, ApplyError> {
        Self::open(config, Some(database.to_owned())).await
    }

    async fn open(config: GraphConfig, pinned: Option<String>) -> Result<Self, ApplyError> {
        let where_ = format!("{} (database {})", config.uri, config.database);
        // Connecting is lazy: the first query below is what reaches the server.
        let graph = client(&config)
            .await
            .map_err(unavailable(format!("connecting to {where_}")))?;
        let namespace = Arc::new(namespace::Namespace::new(&config.database, pinned));
        let model = Self {
            graph: Arc::new(RwLock::new(graph)),
            config,
            namespace,
            partition: None,
        };
        model.ensure_schema().await?;
        Ok(model)
    }

    /// Runs `work` (a unit of graph work: a transaction and its queries)
    /// within the configured timeout. Past it, the work is dropped, the
    /// connection pool is replaced — a connection cut off in the middle of
    /// an answer would be out of step with the server, and neo4rs would
    /// hand it to the next caller — and the call fails with a timed-out
    /// I/O error (transient: the projector retries, the API answers
    /// `UNAVAILABLE`).
    pub async fn bounded<T>(
        &self,
        doing: &str,
        work: impl Future<Output = Result<T, neo4rs::Error>>,
    ) -> Result<T, neo4rs::Error> {
        match tokio::time::timeout(self.config.timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(self.timed_out(doing).await),
        }
    }

    /// Replaces the connection pool after a timeout; the error to return.
    async fn timed_out(&self, doing: &str) -> neo4rs::Error {
        let ms = self.config.timeout.as_millis();
        tracing::warn!(
            uri = %self.config.uri,
            timeout_ms = ms as u64,
            doing,
            "the graph server did not answer in time; replacing the Bolt connections"
        );
        match client(&self.config).await {
            Ok(fresh) => match self.graph.write() {
                Ok(mut graph) => *graph = fresh,
                Err(poisoned) => *poisoned.into_inner() = fresh,
            },
            Err(error) => tracing::warn!(%error, "could not set up new Bolt connections"),
        }
        neo4rs::Error::IOError {
            detail: std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the graph server did not answer within {ms} ms while {doing}"),
            ),
        }
    }

    /// Creates the unique constraints the model relies on, if missing.
    pub async fn ensure_schema(&self) -> Result<(), ApplyError> {
        for statement in SCHEMA {
            let doing = format!(
                "creating the graph schema on {} (database {}): {statement}",
                self.config.uri, self.config.database
            );
            // One transaction per schema statement (Neo4j refuses schema and
            // data changes in one transaction); see `begin` for why not `run`.
            self.bounded(&doing, async {
                let mut txn = self.begin().await?;
                txn.run(query(statement)).await?;
                txn.commit().await
            })
            .await
            .map_err(unavailable(doing.clone()))?;
        }
        Ok(())
    }

    /// Starts a transaction. Everything here runs in explicit transactions:
    /// neo4rs retries `Graph::run` / `Graph::execute` on connection failures
    /// for up to 60 s, while a transaction fails at once, leaving retries to
    /// the caller (the projector's backoff, the API's client).
    pub(crate) async fn begin(&self) -> Result<Txn, neo4rs::Error> {
        let database = self.database(READ_POINTER_TTL).await?;
        self.graph().start_txn_on(database).await
    }

    /// The Bolt client (its pool is replaced after a timeout), for ad-hoc
    /// reads (tests, tools).
    pub fn graph(&self) -> Graph {
        match self.graph.read() {
            Ok(graph) => graph.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The settings it was connected with.
    pub fn config(&self) -> &GraphConfig {
        &self.config
    }

    /// This model applying partition `partition` of the log (see
    /// `commands::partition`): its checkpoint node (with its fence) is the
    /// partition's own, `Checkpoint {projection: 'graph/p<k>'}`; every
    /// other node is a tenant's — agents, tasks and workflows, and the
    /// relationships between them, never cross tenants — and a tenant is in
    /// one partition, so partitions write disjoint nodes and their
    /// projectors run side by side. It shares the connections and the
    /// namespace.
    #[must_use]
    pub fn for_partition(&self, partition: u32) -> Self {
        Self {
            partition: Some(partition),
            ..self.clone()
        }
    }

    /// The name of this model's checkpoint node: `graph`, or `graph/p<k>`
    /// of partition `k`.
    pub(crate) fn checkpoint_name(&self) -> String {
        match self.partition {
            None => PROJECTION.to_owned(),
            Some(k) => partition_name(k),
        }
    }
}

/// The checkpoint node (and projector) name of partition `k`.
pub fn partition_name(k: u32) -> String {
    format!("{PROJECTION}/p{k}")
}

impl ReadModel for GraphModel {
    fn name(&self) -> &str {
        PROJECTION
    }

    async fn checkpoint(&self) -> Result<i64, ApplyError> {
        // The projector re-reads the checkpoint where the pointer is now.
        let doing = "reading the checkpoint";
        let rows = self
            .bounded(doing, async {
                let database = self.database(Duration::ZERO).await?;
                self.namespace.set_writing(&database);
                let mut txn = self.graph().start_txn_on(database).await?;
                let rows =
                    collect(&mut txn, write::checkpoint_query(&self.checkpoint_name())).await?;
                finish(txn).await;
                Ok(rows)
            })
            .await
            .map_err(unavailable(doing))?;
        Ok(rows
            .first()
            .and_then(|r| r.get::<i64>("position").ok())
            .unwrap_or(0))
    }

    async fn apply(&self, events: &[Projected]) -> Result<(), ApplyError> {
        self.apply_bounded(None, None, events).await
    }

    async fn apply_after(
        &self,
        after: i64,
        fence: Option<Fence>,
        events: &[Projected],
    ) -> Result<(), ApplyError> {
        self.apply_bounded(Some(after), fence, events).await
    }
}

impl GraphModel {
    /// [`write::apply`] within the timeout (see [`GraphModel::bounded`]):
    /// a batch cut off is not committed, so it is retried whole.
    async fn apply_bounded(
        &self,
        after: Option<i64>,
        fence: Option<Fence>,
        events: &[Projected],
    ) -> Result<(), ApplyError> {
        let doing = "applying a batch";
        match tokio::time::timeout(
            self.config.timeout,
            write::apply(self, after, fence, events),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => Err(ApplyError::Unavailable {
                store: "the graph",
                doing: doing.to_owned(),
                source: Box::new(self.timed_out(doing).await),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_transient;

    /// neo4rs reports a connection reset while it pulls rows as an
    /// unexpected response holding the I/O error (a graph server killed
    /// mid-answer); a batch failing so must be retried, not refused.
    #[test]
    fn a_connection_lost_while_pulling_rows_is_transient() {
        let reset = neo4rs::Error::IOError {
            detail: std::io::Error::from(std::io::ErrorKind::ConnectionReset),
        };
        let pulled: Result<(), neo4rs::Error> = Err(reset);
        let text = format!("unexpected response for PULL: {pulled:?}");
        assert!(is_transient(&neo4rs::Error::UnexpectedMessage(text)));
        let lost: Result<(), neo4rs::Error> = Err(neo4rs::Error::ConnectionError);
        let text = format!("unexpected response for PULL: {lost:?}");
        assert!(is_transient(&neo4rs::Error::UnexpectedMessage(text)));
        // What the server refuses stays refused.
        let refused = "unexpected response for COMMIT: Failure { code: \"Neo.ClientError.Schema.ConstraintValidationFailed\" }";
        assert!(!is_transient(&neo4rs::Error::UnexpectedMessage(
            refused.to_owned()
        )));
    }
}
