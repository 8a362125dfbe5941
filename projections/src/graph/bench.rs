//! Support for `neurectomy bench project`: the statements the model sends
//! for a replay, precomputed so that sending them measures the server alone,
//! and scratch databases on ArcadeDB's HTTP server API.

use neo4rs::Query;

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
