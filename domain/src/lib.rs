//! # Neurectomy domain
//!
//! The pure model of AI-agent orchestration: agents, tasks and workflows as
//! event-sourced aggregates. Nothing in this crate performs I/O, reads a clock or
//! generates an id: time and new ids arrive as command arguments, so every
//! decision is a deterministic function of `(state, command, related state)`.
//!
//! ## Contracts
//!
//! - [`Aggregate::decide`] either returns the events a command produces or a
//!   [`DomainError`] with a stable code; it never returns an empty success for a
//!   command that changes nothing (such commands are errors).
//! - [`Aggregate::evolve`] is total: folding any event sequence that `decide`
//!   produced reproduces the state `decide` reasoned about.
//! - Invariants (legal transitions, dependency completion, capability cover,
//!   active agents only) are enforced in `decide`, never in `evolve`.
//! - Event payloads serialize to stable snake_case JSON; each event type has a
//!   schema version, and older stored versions are upcast on read
//!   ([`event::upcast`]).
//! - Cross-aggregate checks (assigning a task checks the agent) read the other
//!   aggregate's latest committed state through [`Related`]; a command writes to
//!   exactly one stream.
//!
//! ## Layout
//!
//! - [`ids`]: typed identifiers and stream ids.
//! - [`error`]: [`DomainError`] with its codes.
//! - [`validate`]: payload limits shared by all aggregates.
//! - [`agent`], [`task`], [`workflow`]: one module per aggregate (commands,
//!   events, state, decide, evolve, tests).
//! - [`event`]: the union of all events, their type names, schema versions and
//!   upcasting from stored payloads.
//! - [`command`]: the union of all commands, routing to streams and related state.

pub mod agent;
pub mod command;
pub mod erasure;
pub mod error;
pub mod event;
pub mod ids;
pub mod personal;
pub mod task;
pub mod validate;
pub mod workflow;

pub use agent::{Agent, AgentCommand, AgentEvent, AgentKind, AgentState, AgentStatus};
pub use command::{Aggregate, Command, Related};
pub use erasure::{ErasedState, ErasureEvent, ErasureScope};
pub use error::DomainError;
pub use event::{DomainEvent, EventDecodeError};
pub use ids::{AgentId, AggregateKind, IdParseError, StreamId, TaskId, WorkflowId};
pub use task::{Task, TaskCommand, TaskEvent, TaskState, TaskStatus};
pub use workflow::{Workflow, WorkflowCommand, WorkflowEvent, WorkflowState, WorkflowStatus};
