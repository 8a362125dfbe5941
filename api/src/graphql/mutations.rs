//! Mutations: one per domain command. Each takes an optional `commandId`
//! (idempotency: a retry with the same id returns the first run's events
//! and writes nothing), `expectedVersion` (optimistic concurrency: the
//! stream must be at exactly this version), `correlationId` and
//! `causationId` (the id of the event that caused the command: an event of
//! the caller's tenant, else `VALIDATION`; `why` follows it), and returns
//! the stream, its new version, the global position and the events written.
//! The caller needs the `operator` role; the command runs in its tenant.
//!
//! A creation (`registerAgent`, `startWorkflow`, `createTask`) without an
//! `id` creates the aggregate whose id follows from the tenant and the
//! command id ([`commands::idempotency::new_aggregate_id`]), so a retried
//! request is the same command and gets the first run's result. Ids follow
//! the rule of [`super::ids`].

// A resolver's arguments are the mutation's GraphQL arguments.
#![allow(clippy::too_many_arguments)]

use async_graphql::{Context, Enum, Json, Object, SimpleObject, ID};
use commands::{CommandContext, CommandError, CommandOutcome, ExpectedVersion};
use domain::{
    AgentCommand, AgentId, AggregateKind, Command, TaskCommand, TaskId, WorkflowCommand, WorkflowId,
};
use uuid::Uuid;

use super::types::Event;
use super::{caller, ids, services, Position, RequestMeta};
use crate::auth::Role;
use crate::error::ApiError;

/// What a command did.
#[derive(Debug, Clone, SimpleObject)]
pub struct CommandResult {
    /// The stream written (`agent-…`, `task-…`, `workflow-…`).
    pub stream_id: ID,
    /// The stream's version after the command.
    pub version: i64,
    /// Global position of the command's last event: pass it as
    /// `atLeastPosition` to read your write.
    pub position: Position,
    /// The events written.
    pub events: Vec<Event>,
    /// True when this command id had run before: these are the events of
    /// that run, and nothing new was written.
    pub replayed: bool,
    /// The command id (generated when not given).
    pub command_id: ID,
}

/// Kinds of agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[graphql(remote = "domain::AgentKind")]
pub enum AgentKindInput {
    /// A language-model agent.
    Llm,
    /// A tool.
    Tool,
    /// A person.
    Human,
}

/// Options every mutation takes, checked.
struct Options {
    /// The command id given, or a new one.
    command_id: Uuid,
    expected_version: Option<i64>,
    correlation_id: Option<Uuid>,
    causation_id: Option<Uuid>,
}

impl Options {
    /// The options every mutation takes, once the caller is known to be
    /// allowed to run commands (so an unauthorised caller hears that first,
    /// whatever else is wrong).
    fn new(
        ctx: &Context<'_>,
        command_id: Option<ID>,
        expected_version: Option<i64>,
        correlation_id: Option<ID>,
        causation_id: Option<ID>,
    ) -> async_graphql::Result<Self> {
        caller(ctx, Role::Operator)?;
        Ok(Self {
            command_id: match command_id {
                Some(id) => ids::uuid("commandId", &id)?,
                None => Uuid::new_v4(),
            },
            expected_version,
            correlation_id: correlation_id
                .map(|c| ids::uuid("correlationId", &c))
                .transpose()?,
            causation_id: causation_id
                .map(|c| ids::uuid("causationId", &c))
                .transpose()?,
        })
    }

    /// The id of the aggregate a creation makes: `given`, or the one that
    /// follows from the caller's tenant and the command id.
    fn created(
        &self,
        ctx: &Context<'_>,
        kind: AggregateKind,
        given: Option<&ID>,
    ) -> async_graphql::Result<Uuid> {
        match given {
            Some(id) => ids::entity(kind, "id", id),
            None => {
                let who = caller(ctx, Role::Operator)?;
                Ok(commands::idempotency::new_aggregate_id(
                    &who.tenant,
                    self.command_id,
                    kind,
                ))
            }
        }
    }

    /// Runs `command` with these options as the caller.
    async fn run(
        self,
        ctx: &Context<'_>,
        command: impl Into<Command>,
    ) -> async_graphql::Result<CommandResult> {
        let command: Command = command.into();
        let who = caller(ctx, Role::Operator)?;
        let command_id = self.command_id;
        let mut context = CommandContext::new(command_id, who.subject.clone(), who.tenant.clone());
        context.correlation_id = self.correlation_id;
        context.causation_id = self.causation_id;
        context.expected_version = match self.expected_version {
            None => None,
            Some(v) if v >= 0 => Some(ExpectedVersion::Exact(v.unsigned_abs())),
            Some(v) => {
                return Err(crate::error::validation(format!(
                    "`expectedVersion` must be 0 (no stream yet) or more, not {v}"
                )))
            }
        };
        context.traceparent = ctx
            .data_opt::<RequestMeta>()
            .and_then(|m| m.traceparent.clone());
        let command_type = command.name();
        let started = std::time::Instant::now();
        // A task of its own: the command runs to its end even if the request is
        // dropped, and a shutdown waits for it (see `crate::shutdown`).
        let handler = services(ctx).handler.clone();
        let outcome =
            crate::shutdown::spawn_command(async move { handler.execute(command, &context).await })
                .await
                .map_err(|e| crate::error::internal("the command failed unexpectedly", e))?;
        crate::telemetry::metrics::command(
            command_type,
            started.elapsed(),
            outcome.as_ref().err().map(CommandError::code),
        );
        let outcome: CommandOutcome = outcome.map_err(ApiError::command)?;
        Ok(CommandResult {
            stream_id: ID(outcome.stream_id),
            version: outcome.version,
            position: Position(outcome.position),
            events: outcome.events.iter().map(Event::from).collect(),
            replayed: outcome.replayed,
            command_id: ID(command_id.to_string()),
        })
    }
}

/// All mutations.
#[derive(Default)]
pub struct Mutation;

#[Object]
impl Mutation {
    /// Registers an agent. Without an `id`, its id follows from the tenant
    /// and the command id (a retry names the same agent).
    async fn register_agent(
        &self,
        ctx: &Context<'_>,
        id: Option<ID>,
        name: String,
        kind: AgentKindInput,
        model: Option<String>,
        #[graphql(default)] capabilities: Vec<String>,
        parent_agent_id: Option<ID>,
        command_id: Option<ID>,
        expected_version: Option<i64>,
        correlation_id: Option<ID>,
        causation_id: Option<ID>,
    ) -> async_graphql::Result<CommandResult> {
        let options = Options::new(
            ctx,
            command_id,
            expected_version,
            correlation_id,
            causation_id,
        )?;
        let command = AgentCommand::RegisterAgent {
            agent_id: AgentId::from_uuid(options.created(
                ctx,
                AggregateKind::Agent,
                id.as_ref(),
            )?),
            name,
            kind: kind.into(),
            model,
            capabilities,
            parent_agent_id: parent_agent_id
                .map(|p| ids::agent("parentAgentId", &p))
                .transpose()?,
        };
        options.run(ctx, command).await
    }

    /// Pauses an active agent.
    async fn pause_agent(
        &self,
        ctx: &Context<'_>,
        agent_id: ID,
        reason: Option<String>,
        command_id: Option<ID>,
        expected_version: Option<i64>,
        correlation_id: Option<ID>,
        causation_id: Option<ID>,
    ) -> async_graphql::Result<CommandResult> {
        let options = Options::new(
            ctx,
            command_id,
            expected_version,
            correlation_id,
            causation_id,
        )?;
        let command = AgentCommand::PauseAgent {
            agent_id: ids::agent("agentId", &agent_id)?,
            reason,
        };
        options.run(ctx, command).await
    }

    /// Makes a paused or failed agent active again.
    async fn resume_agent(
        &self,
        ctx: &Context<'_>,
        agent_id: ID,
        command_id: Option<ID>,
        expected_version: Option<i64>,
        correlation_id: Option<ID>,
        causation_id: Option<ID>,
    ) -> async_graphql::Result<CommandResult> {
        let options = Options::new(
            ctx,
            command_id,
            expected_version,
            correlation_id,
            causation_id,
        )?;
        let command = AgentCommand::ResumeAgent {
            agent_id: ids::agent("agentId", &agent_id)?,
        };
        options.run(ctx, command).await
    }

    /// Records that an agent broke.
    async fn fail_agent(
        &self,
        ctx: &Context<'_>,
        agent_id: ID,
        reason: String,
        command_id: Option<ID>,
        expected_version: Option<i64>,
        correlation_id: Option<ID>,
        causation_id: Option<ID>,
    ) -> async_graphql::Result<CommandResult> {
        let options = Options::new(
            ctx,
            command_id,
            expected_version,
            correlation_id,
            causation_id,
        )?;
        let command = AgentCommand::FailAgent {
            agent_id: ids::agent("agentId", &agent_id)?,
            reason,
        };
        options.run(ctx, command).await
    }

    /// Retires an agent for good.
    async fn retire_agent(
        &self,
        ctx: &Context<'_>,
        agent_id: ID,
        reason: Option<String>,
        command_id: Option<ID>,
        expected_version: Option<i64>,
        correlation_id: Option<ID>,
        causation_id: Option<ID>,
    ) -> async_graphql::Result<CommandResult> {
        let options = Options::new(
            ctx,
            command_id,
            expected_version,
            correlation_id,
            causation_id,
        )?;
        let command = AgentCommand::RetireAgent {
            agent_id: ids::agent("agentId", &agent_id)?,
            reason,
        };
        options.run(ctx, command).await
    }

    /// Starts a workflow. Without an `id`, its id follows from the tenant
    /// and the command id (a retry names the same workflow).
    async fn start_workflow(
        &self,
        ctx: &Context<'_>,
        id: Option<ID>,
        name: String,
        metadata: Option<Json<serde_json::Value>>,
        command_id: Option<ID>,
        expected_version: Option<i64>,
        correlation_id: Option<ID>,
        causation_id: Option<ID>,
    ) -> async_graphql::Result<CommandResult> {
        let options = Options::new(
            ctx,
            command_id,
            expected_version,
            correlation_id,
            causation_id,
        )?;
        let command = WorkflowCommand::StartWorkflow {
            workflow_id: WorkflowId::from_uuid(options.created(
                ctx,
                AggregateKind::Workflow,
                id.as_ref(),
            )?),
            name,
            metadata: metadata.map_or(serde_json::Value::Null, |m| m.0),
        };
        options.run(ctx, command).await
    }

    /// Completes a running workflow.
    async fn complete_workflow(
        &self,
        ctx: &Context<'_>,
        workflow_id: ID,
        command_id: Option<ID>,
        expected_version: Option<i64>,
        correlation_id: Option<ID>,
        causation_id: Option<ID>,
    ) -> async_graphql::Result<CommandResult> {
        let options = Options::new(
            ctx,
            command_id,
            expected_version,
            correlation_id,
            causation_id,
        )?;
        let command = WorkflowCommand::CompleteWorkflow {
            workflow_id: ids::workflow("workflowId", &workflow_id)?,
        };
        options.run(ctx, command).await
    }

    /// Records that a workflow failed.
    async fn fail_workflow(
        &self,
        ctx: &Context<'_>,
        workflow_id: ID,
        reason: String,
        command_id: Option<ID>,
        expected_version: Option<i64>,
        correlation_id: Option<ID>,
        causation_id: Option<ID>,
    ) -> async_graphql::Result<CommandResult> {
        let options = Options::new(
            ctx,
            command_id,
            expected_version,
            correlation_id,
            causation_id,
        )?;
        let command = WorkflowCommand::FailWorkflow {
            workflow_id: ids::workflow("workflowId", &workflow_id)?,
            reason,
        };
        options.run(ctx, command).await
    }

    /// Cancels a running workflow.
    async fn cancel_workflow(
        &self,
        ctx: &Context<'_>,
        workflow_id: ID,
        reason: String,
        command_id: Option<ID>,
        expected_version: Option<i64>,
        correlation_id: Option<ID>,
        causation_id: Option<ID>,
    ) -> async_graphql::Result<CommandResult> {
        let options = Options::new(
            ctx,
            command_id,
            expected_version,
            correlation_id,
            causation_id,
        )?;
        let command = WorkflowCommand::CancelWorkflow {
            workflow_id: ids::workflow("workflowId", &workflow_id)?,
            reason,
        };
        options.run(ctx, command).await
    }

    /// Creates a task in a running workflow. Without an `id`, its id follows
    /// from the tenant and the command id (a retry names the same task).
    async fn create_task(
        &self,
        ctx: &Context<'_>,
        id: Option<ID>,
        workflow_id: ID,
        title: String,
        input: Option<Json<serde_json::Value>>,
        #[graphql(default)] required_capabilities: Vec<String>,
        #[graphql(default)] depends_on: Vec<ID>,
        #[graphql(default = 50)] priority: i32,
        #[graphql(default = 3)] max_attempts: i32,
        command_id: Option<ID>,
        expected_version: Option<i64>,
        correlation_id: Option<ID>,
        causation_id: Option<ID>,
    ) -> async_graphql::Result<CommandResult> {
        let options = Options::new(
            ctx,
            command_id,
            expected_version,
            correlation_id,
            causation_id,
        )?;
        let priority = u8::try_from(priority)
            .ok()
            .filter(|p| *p <= 100)
            .ok_or_else(|| {
                crate::error::validation(format!("`priority` must be 0–100, not {priority}"))
            })?;
        let max_attempts = u32::try_from(max_attempts).map_err(|_| {
            crate::error::validation(format!("`maxAttempts` must be 1–100, not {max_attempts}"))
        })?;
        let command = TaskCommand::CreateTask {
            task_id: TaskId::from_uuid(options.created(ctx, AggregateKind::Task, id.as_ref())?),
            workflow_id: ids::workflow("workflowId", &workflow_id)?,
            title,
            input: input.map_or(serde_json::Value::Null, |i| i.0),
            required_capabilities,
            depends_on: depends_on
                .iter()
                .map(|d| ids::task("dependsOn", d))
                .collect::<Result<_, _>>()?,
            priority,
            max_attempts,
        };
        options.run(ctx, command).await
    }

    /// Gives a pending task to an active agent with the capabilities.
    async fn assign_task(
        &self,
        ctx: &Context<'_>,
        task_id: ID,
        agent_id: ID,
        command_id: Option<ID>,
        expected_version: Option<i64>,
        correlation_id: Option<ID>,
        causation_id: Option<ID>,
    ) -> async_graphql::Result<CommandResult> {
        let options = Options::new(
            ctx,
            command_id,
            expected_version,
            correlation_id,
            causation_id,
        )?;
        let command = TaskCommand::AssignTask {
            task_id: ids::task("taskId", &task_id)?,
            agent_id: ids::agent("agentId", &agent_id)?,
        };
        options.run(ctx, command).await
    }

    /// Starts an assigned task whose dependencies completed.
    async fn start_task(
        &self,
        ctx: &Context<'_>,
        task_id: ID,
        command_id: Option<ID>,
        expected_version: Option<i64>,
        correlation_id: Option<ID>,
        causation_id: Option<ID>,
    ) -> async_graphql::Result<CommandResult> {
        let options = Options::new(
            ctx,
            command_id,
            expected_version,
            correlation_id,
            causation_id,
        )?;
        let command = TaskCommand::StartTask {
            task_id: ids::task("taskId", &task_id)?,
        };
        options.run(ctx, command).await
    }

    /// Reports progress (0–100) of a running task.
    async fn report_task_progress(
        &self,
        ctx: &Context<'_>,
        task_id: ID,
        percent: i32,
        note: Option<String>,
        command_id: Option<ID>,
        expected_version: Option<i64>,
        correlation_id: Option<ID>,
        causation_id: Option<ID>,
    ) -> async_graphql::Result<CommandResult> {
        let options = Options::new(
            ctx,
            command_id,
            expected_version,
            correlation_id,
            causation_id,
        )?;
        let percent = u8::try_from(percent)
            .ok()
            .filter(|p| *p <= 100)
            .ok_or_else(|| {
                crate::error::validation(format!("`percent` must be 0–100, not {percent}"))
            })?;
        let command = TaskCommand::ReportTaskProgress {
            task_id: ids::task("taskId", &task_id)?,
            percent,
            note,
        };
        options.run(ctx, command).await
    }

    /// Completes a running task with its output.
    async fn complete_task(
        &self,
        ctx: &Context<'_>,
        task_id: ID,
        output: Option<Json<serde_json::Value>>,
        command_id: Option<ID>,
        expected_version: Option<i64>,
        correlation_id: Option<ID>,
        causation_id: Option<ID>,
    ) -> async_graphql::Result<CommandResult> {
        let options = Options::new(
            ctx,
            command_id,
            expected_version,
            correlation_id,
            causation_id,
        )?;
        let command = TaskCommand::CompleteTask {
            task_id: ids::task("taskId", &task_id)?,
            output: output.map_or(serde_json::Value::Null, |o| o.0),
        };
        options.run(ctx, command).await
    }

    /// Records that an assigned or running task failed.
    async fn fail_task(
        &self,
        ctx: &Context<'_>,
        task_id: ID,
        error: String,
        #[graphql(default = true)] retryable: bool,
        command_id: Option<ID>,
        expected_version: Option<i64>,
        correlation_id: Option<ID>,
        causation_id: Option<ID>,
    ) -> async_graphql::Result<CommandResult> {
        let options = Options::new(
            ctx,
            command_id,
            expected_version,
            correlation_id,
            causation_id,
        )?;
        let command = TaskCommand::FailTask {
            task_id: ids::task("taskId", &task_id)?,
            error,
            retryable,
        };
        options.run(ctx, command).await
    }

    /// Puts a retryable failed task back to pending.
    async fn retry_task(
        &self,
        ctx: &Context<'_>,
        task_id: ID,
        command_id: Option<ID>,
        expected_version: Option<i64>,
        correlation_id: Option<ID>,
        causation_id: Option<ID>,
    ) -> async_graphql::Result<CommandResult> {
        let options = Options::new(
            ctx,
            command_id,
            expected_version,
            correlation_id,
            causation_id,
        )?;
        let command = TaskCommand::RetryTask {
            task_id: ids::task("taskId", &task_id)?,
        };
        options.run(ctx, command).await
    }

    /// Abandons a task that has not finished.
    async fn cancel_task(
        &self,
        ctx: &Context<'_>,
        task_id: ID,
        reason: String,
        command_id: Option<ID>,
        expected_version: Option<i64>,
        correlation_id: Option<ID>,
        causation_id: Option<ID>,
    ) -> async_graphql::Result<CommandResult> {
        let options = Options::new(
            ctx,
            command_id,
            expected_version,
            correlation_id,
            causation_id,
        )?;
        let command = TaskCommand::CancelTask {
            task_id: ids::task("taskId", &task_id)?,
            reason,
        };
        options.run(ctx, command).await
    }

    /// Hands a task from its assignee to another active, capable agent.
    async fn delegate_task(
        &self,
        ctx: &Context<'_>,
        task_id: ID,
        from_agent_id: ID,
        to_agent_id: ID,
        command_id: Option<ID>,
        expected_version: Option<i64>,
        correlation_id: Option<ID>,
        causation_id: Option<ID>,
    ) -> async_graphql::Result<CommandResult> {
        let options = Options::new(
            ctx,
            command_id,
            expected_version,
            correlation_id,
            causation_id,
        )?;
        let command = TaskCommand::DelegateTask {
            task_id: ids::task("taskId", &task_id)?,
            from_agent_id: ids::agent("fromAgentId", &from_agent_id)?,
            to_agent_id: ids::agent("toAgentId", &to_agent_id)?,
        };
        options.run(ctx, command).await
    }

    /// Erases personal data of the caller's tenant (role `eraser`): the
    /// personal fields of every event of a stream (`streamId`), of one
    /// event (`eventId`, optionally only `fields`, which may name
    /// `actor`), or the actor of every event by `actor`. Each value is
    /// replaced by its digest, so the sealed log still verifies; the
    /// erasure is itself an event (README, "Erasure"). Retrying with the
    /// same `commandId` answers the first erasure again.
    #[allow(clippy::too_many_arguments)]
    async fn erase_personal_data(
        &self,
        ctx: &Context<'_>,
        stream_id: Option<ID>,
        event_id: Option<ID>,
        actor: Option<String>,
        fields: Option<Vec<String>>,
        command_id: Option<ID>,
        correlation_id: Option<ID>,
        causation_id: Option<ID>,
    ) -> async_graphql::Result<crate::graphql::audit::erase::ErasureResult> {
        crate::graphql::audit::erase::erase_personal_data(
            ctx,
            crate::graphql::audit::erase::Arguments {
                stream_id,
                event_id,
                actor,
                fields,
                command_id,
                correlation_id,
                causation_id,
            },
        )
        .await
    }
}
