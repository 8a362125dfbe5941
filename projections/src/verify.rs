//! `verify`: folds every stream of the event store with `domain::evolve` and
//! diffs the result against the Redis read model.

use std::collections::BTreeMap;

use commands::EventStore;
use domain::{AgentState, Aggregate, DomainEvent, TaskState, TaskStatus, WorkflowState};
use redis::AsyncCommands;

use crate::live::LiveModel;

/// One field where the read model disagrees with the events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// Redis key.
    pub key: String,
    /// Field.
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
}

#[derive(Default)]
struct Folded {
    agents: BTreeMap<String, AgentState>,
    tasks: BTreeMap<String, TaskState>,
    workflows: BTreeMap<String, WorkflowState>,
}

/// Folds the whole log up to `until` (inclusive) and compares it with the
/// Redis read model. Returns every difference (empty = the model is right).
pub async fn verify_live(
    store: &EventStore,
    model: &LiveModel,
    until: i64,
) -> Result<Vec<Difference>, VerifyError> {
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
    for (id, state) in &folded.agents {
        let Some(agent) = state.get() else { continue };
        let key = model.key(&format!("agent:{id}"));
        let actual: BTreeMap<String, String> = conn.hgetall(&key).await?;
        check(&key, "status", agent.status.as_str().to_owned(), &actual);
        check(&key, "name", agent.name.clone(), &actual);
        check(&key, "capabilities", agent.capabilities.join(","), &actual);
    }
    let mut counts: BTreeMap<String, BTreeMap<&'static str, i64>> = BTreeMap::new();
    for (id, state) in &folded.tasks {
        let Some(task) = state.get() else { continue };
        let key = model.key(&format!("task:{id}"));
        let actual: BTreeMap<String, String> = conn.hgetall(&key).await?;
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
        check(&key, "status", workflow.status.as_str().to_owned(), &actual);
        let per_workflow = counts.get(id);
        for state in [
            "total",
            "pending",
            "assigned",
            "running",
            "completed",
            "failed",
            "cancelled",
        ] {
            let expected = per_workflow
                .and_then(|c| c.get(state))
                .copied()
                .unwrap_or(0);
            check(
                &key,
                &format!("tasks_{state}"),
                expected.to_string(),
                &actual,
            );
        }
    }
    Ok(differences)
}
