//! Support for `neurectomy bench project`: the statements the model sends
//! for a replay, precomputed so that sending them measures the server alone,
//! and scratch databases on ArcadeDB's HTTP server API.

use std::time::Duration;

use neo4rs::Query;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::fold::Fold;
use super::write::statements;
use super::{unavailable, GraphModel};
use crate::model::{ApplyError, Projected};

/// The writes of one batch, exactly as [`GraphModel`] would send them after
/// its reads and its fold (every `UNWIND $rows …` statement and the
/// checkpoint), ready to send.
pub struct RawBatch {
    statements: Vec<Query>,
    events: usize,
}

impl std::fmt::Debug for RawBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawBatch")
            .field("statements", &self.statements.len())
            .field("events", &self.events)
            .finish()
    }
}

impl RawBatch {
    /// Events of the batch.
    pub fn events(&self) -> usize {
        self.events
    }

    /// Statements of the batch.
    pub fn statements(&self) -> usize {
        self.statements.len()
    }
}

/// Folds `batches`, in order, as the model applies them one by one to an
/// empty graph, into the statements each batch writes. What the model reads
/// from the graph before folding a batch (which entities exist, task states
/// and assignees, agents' current tasks) is carried in memory from batch to
/// batch instead, so the result is the same statements with the same rows.
pub fn plan_replay(batches: &[Vec<Projected>]) -> Result<Vec<RawBatch>, ApplyError> {
    let mut known = Fold::default();
    let mut planned = Vec::with_capacity(batches.len());
    for batch in batches {
        let Some(last) = batch.last().map(|p| p.recorded.position) else {
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
        planned.push(RawBatch {
            statements: statements(fold, last).into_iter().map(|(_, q)| q).collect(),
            events: batch.len(),
        });
    }
    Ok(planned)
}

impl GraphModel {
    /// Sends a precomputed batch in one transaction, with nothing else: no
    /// checkpoint or prior-state reads, no folding.
    pub async fn write_raw(&self, batch: RawBatch) -> Result<(), ApplyError> {
        let mut txn = self
            .begin()
            .await
            .map_err(unavailable("starting a transaction"))?;
        for statement in batch.statements {
            txn.run(statement)
                .await
                .map_err(unavailable("writing a raw batch"))?;
        }
        txn.commit()
            .await
            .map_err(unavailable("committing a raw batch"))
    }
}

/// Sends one ArcadeDB server command (`create database x`) to the HTTP API
/// at `http` (`host:port`); returns the status code and body.
pub async fn server_command(
    http: &str,
    user: &str,
    password: &str,
    command: &str,
) -> Result<(u16, String), String> {
    use base64::Engine;
    let body = serde_json::json!({ "command": command }).to_string();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let request = format!(
        "POST /api/v1/server HTTP/1.1\r\nHost: {http}\r\nAuthorization: Basic {auth}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(http).await?;
        stream.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .map_err(|_| {
            format!("the graph server's HTTP API at {http} did not answer `{command}` within 30 s")
        })?
        .map_err(|e| format!("the graph server's HTTP API at {http} is not reachable ({e})"))?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("the graph server at {http} sent a malformed HTTP response"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}
