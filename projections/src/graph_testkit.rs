//! Test isolation for the graph read model: a database of its own per test,
//! created through ArcadeDB's HTTP server API and dropped when the fixture is
//! dropped. Fails with the command that starts the graph server when it is
//! unreachable; never skips.
//!
//! Settings come from the environment:
//! - `NEURECTOMY_TEST_GRAPH_URI` (default `bolt://127.0.0.1:7687`)
//! - `NEURECTOMY_TEST_GRAPH_PASSWORD` (default `neurectomy-dev`; user `root`)
//! - `NEURECTOMY_TEST_GRAPH_HTTP` (default `127.0.0.1:2480`; the HTTP API
//!   port `scripts/graph.sh up` used is in `.run/arcadedb.http-port`)

use std::collections::BTreeMap;

use neo4rs::{query, BoltType};
use uuid::Uuid;

use crate::graph::{GraphConfig, GraphModel};

/// How to start the graph server on a development machine.
pub const START_GRAPH: &str = "scripts/graph.sh up";

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// Where a graph server is, and its `root` password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphServer {
    /// Bolt URI, e.g. `bolt://127.0.0.1:7687`.
    pub uri: String,
    /// `host:port` of ArcadeDB's HTTP API.
    pub http: String,
    /// The password of `root`.
    pub password: String,
}

impl GraphServer {
    /// The server the environment names (see the module docs).
    pub fn from_env() -> Self {
        Self {
            uri: env_or("NEURECTOMY_TEST_GRAPH_URI", "bolt://127.0.0.1:7687"),
            http: env_or("NEURECTOMY_TEST_GRAPH_HTTP", "127.0.0.1:2480"),
            password: env_or("NEURECTOMY_TEST_GRAPH_PASSWORD", "neurectomy-dev"),
        }
    }
}

/// A graph read model on a fresh database, dropped on drop.
#[derive(Debug)]
pub struct TestGraph {
    /// The model, connected to the database.
    pub model: GraphModel,
    /// The database's name.
    pub database: String,
    /// `host:port` of the server's HTTP API.
    pub http: String,
    password: String,
}

/// Sends one server command as `root`; unreachable servers get the hint
/// that starts the development server.
async fn server_command(
    http: &str,
    password: &str,
    command: &str,
) -> Result<(u16, String), String> {
    crate::graph::admin::server_command(http, "root", password, command)
        .await
        .map_err(|e| format!("{e}. Start the graph server with: {START_GRAPH}"))
}

impl TestGraph {
    /// Creates a fresh database and connects a model to it.
    pub async fn create() -> Result<Self, String> {
        Self::create_at(&GraphServer::from_env()).await
    }

    /// Like [`TestGraph::create`], the model projected in `partitions`
    /// partitions (its readers wait for a tenant's partition; use
    /// [`GraphModel::for_partition`] for each partition's projector).
    pub async fn create_partitioned(partitions: u32) -> Result<Self, String> {
        let mut graph = Self::create().await?;
        graph.model = GraphModel::connect(GraphConfig {
            partitions,
            ..graph.model.config().clone()
        })
        .await
        .map_err(|e| format!("connecting to test database {}: {e}", graph.database))?;
        Ok(graph)
    }

    /// Like [`TestGraph::create`] on `server` (e.g. a private server a test
    /// starts and stops).
    pub async fn create_at(server: &GraphServer) -> Result<Self, String> {
        let GraphServer {
            uri,
            http,
            password,
        } = server.clone();
        let database = format!("test_{}", Uuid::new_v4().simple());
        let (status, body) =
            server_command(&http, &password, &format!("create database {database}")).await?;
        if status != 200 {
            return Err(format!(
                "the graph server at {http} refused to create database {database} (HTTP {status}: {body}). \
                 Is it ArcadeDB started by `{START_GRAPH}` with this password?"
            ));
        }
        let config = GraphConfig {
            uri: uri.clone(),
            user: "root".to_owned(),
            password: password.clone(),
            database: database.clone(),
            timeout: std::time::Duration::from_secs(10),
            partitions: 1,
        };
        match GraphModel::connect(config).await {
            Ok(model) => Ok(Self {
                model,
                database,
                http,
                password,
            }),
            Err(e) => {
                drop_database(http, password, database);
                let cause = std::error::Error::source(&e)
                    .map(|c| format!(": {c}"))
                    .unwrap_or_default();
                Err(format!(
                    "the graph server at {uri} is not reachable over Bolt ({e}{cause}). Start it with: {START_GRAPH}"
                ))
            }
        }
    }

    /// Every node and relationship with its properties, one line each,
    /// sorted (for before/after comparisons of the whole graph).
    /// Reads the database the home database's pointer names (a replay's).
    pub async fn dump(&self) -> Result<Vec<String>, neo4rs::Error> {
        let graph = self.model.graph();
        let database = self.model.database(std::time::Duration::ZERO).await?;
        let mut lines = Vec::new();
        let mut nodes = graph
            .execute_on(
                &database,
                query(
                    "MATCH (n) WHERE NOT n:ReadModel RETURN labels(n) AS labels, properties(n) AS props",
                ),
            )
            .await?;
        while let Some(row) = nodes.next().await? {
            let mut labels: Vec<String> = row
                .get("labels")
                .map_err(neo4rs::Error::DeserializationError)?;
            labels.sort();
            let mut props: BoltType = row
                .get("props")
                .map_err(neo4rs::Error::DeserializationError)?;
            // The lease token a batch was written under is bookkeeping of
            // whoever wrote, not content: models built under different
            // leases (or none) compare equal.
            if let (true, BoltType::Map(map)) = (labels == ["Checkpoint"], &mut props) {
                map.value.remove(&neo4rs::BoltString::from("fence"));
            }
            lines.push(format!("node {labels:?} {}", render(&props)));
        }
        let mut rels = graph
            .execute_on(
                &database,
                query(
                    "MATCH (a)-[r]->(b) RETURN coalesce(a.id, a.projection) AS a, type(r) AS type, \
                     properties(r) AS props, coalesce(b.id, b.projection) AS b",
                ),
            )
            .await?;
        while let Some(row) = rels.next().await? {
            let a: Option<String> = row.get("a").map_err(neo4rs::Error::DeserializationError)?;
            let b: Option<String> = row.get("b").map_err(neo4rs::Error::DeserializationError)?;
            let kind: String = row
                .get("type")
                .map_err(neo4rs::Error::DeserializationError)?;
            let props: BoltType = row
                .get("props")
                .map_err(neo4rs::Error::DeserializationError)?;
            lines.push(format!("rel {a:?} -[{kind} {}]-> {b:?}", render(&props)));
        }
        lines.sort();
        Ok(lines)
    }
}

/// A value as deterministic text (map keys sorted).
fn render(value: &BoltType) -> String {
    match value {
        BoltType::Map(map) => {
            let sorted: BTreeMap<String, String> = map
                .value
                .iter()
                .map(|(k, v)| (k.value.clone(), render(v)))
                .collect();
            format!("{sorted:?}")
        }
        BoltType::List(list) => format!("{:?}", list.value.iter().map(render).collect::<Vec<_>>()),
        BoltType::String(s) => format!("{:?}", s.value),
        BoltType::Integer(i) => i.value.to_string(),
        BoltType::Float(f) => f.value.to_string(),
        BoltType::Boolean(b) => b.value.to_string(),
        BoltType::Null(_) => "null".to_owned(),
        other => format!("{other:?}"),
    }
}

/// Drops a database, and the databases replays made for it
/// (`<database>-g…`), from a `Drop` impl or an error path (best effort).
fn drop_database(http: String, password: String, database: String) {
    commands::testkit::clean_up(async move {
        let mut doomed = vec![database.clone()];
        if let Ok((200, body)) = server_command(&http, &password, "list databases").await {
            let listed: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let prefix = format!("{database}-g");
            doomed.extend(
                listed["result"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|name| name.as_str())
                    .filter(|name| name.starts_with(&prefix))
                    .map(str::to_owned),
            );
        }
        for name in doomed {
            let _ = server_command(&http, &password, &format!("drop database {name}")).await;
        }
    });
}

impl Drop for TestGraph {
    fn drop(&mut self) {
        drop_database(
            self.http.clone(),
            self.password.clone(),
            self.database.clone(),
        );
    }
}
