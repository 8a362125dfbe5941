//! The one error `decide` returns. Each variant has a stable machine-readable
//! code (see [`DomainError::code`]) and a message a person can act on.

use crate::ids::AggregateKind;

/// Why a command was refused. Nothing is appended when `decide` returns this.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// The command targets (or references) an aggregate that does not exist.
    #[error("{kind} {id} does not exist")]
    NotFound {
        /// Kind of the missing aggregate.
        kind: AggregateKind,
        /// Its id.
        id: String,
    },
    /// A creating command targets an aggregate that already exists.
    #[error("{kind} {id} already exists")]
    AlreadyExists {
        /// Kind of the aggregate.
        kind: AggregateKind,
        /// Its id.
        id: String,
    },
    /// The command is not legal in the aggregate's current state.
    #[error("cannot {action} {kind} {id}: it is {state}")]
    InvalidTransition {
        /// Kind of the aggregate.
        kind: AggregateKind,
        /// Its id.
        id: String,
        /// What was attempted, e.g. `start`.
        action: &'static str,
        /// The state that forbids it, e.g. `completed`.
        state: String,
    },
    /// The agent does not have every capability the task requires.
    #[error("agent {agent_id} cannot take task {task_id}: it lacks the required capabilities [{missing}]")]
    CapabilityMismatch {
        /// The agent.
        agent_id: String,
        /// The task.
        task_id: String,
        /// Comma-separated missing capabilities.
        missing: String,
    },
    /// A task cannot start before all of its dependencies completed.
    #[error("task {task_id} cannot start: its dependencies [{pending}] have not completed")]
    DependencyNotCompleted {
        /// The task.
        task_id: String,
        /// Comma-separated `id (state)` of unfinished dependencies.
        pending: String,
    },
    /// The agent is not active (paused, failed or retired) and accepts no work.
    #[error("agent {agent_id} is {status} and accepts no tasks")]
    AgentUnavailable {
        /// The agent.
        agent_id: String,
        /// Its status.
        status: String,
    },
    /// A field of the command is malformed or out of bounds.
    #[error("invalid {field}: {reason}")]
    Validation {
        /// The offending field.
        field: &'static str,
        /// What is wrong and what is allowed.
        reason: String,
    },
}

impl DomainError {
    /// Stable machine-readable code, part of the public API.
    pub fn code(&self) -> &'static str {
        match self {
            DomainError::NotFound { .. } => "NOT_FOUND",
            DomainError::AlreadyExists { .. } => "ALREADY_EXISTS",
            DomainError::InvalidTransition { .. } => "INVALID_TRANSITION",
            DomainError::CapabilityMismatch { .. } => "CAPABILITY_MISMATCH",
            DomainError::DependencyNotCompleted { .. } => "DEPENDENCY_NOT_COMPLETED",
            DomainError::AgentUnavailable { .. } => "AGENT_UNAVAILABLE",
            DomainError::Validation { .. } => "VALIDATION",
        }
    }

    pub(crate) fn validation(field: &'static str, reason: impl Into<String>) -> Self {
        DomainError::Validation {
            field,
            reason: reason.into(),
        }
    }
}
