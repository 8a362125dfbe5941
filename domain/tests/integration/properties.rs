//! Property tests of the aggregates over random command sequences.
//!
//! A small universe (3 workflows, 4 agents, 8 tasks, 3 capabilities) is driven
//! by random commands, biased toward legal ones so that deep states are
//! reached. Each command is decided the way a handler does it: the target
//! stream's state, plus a [`Related`] holding exactly the streams
//! [`Aggregate::related`] names; on success the events are folded into the
//! target state. After every step the test checks
//!
//! - an independent transition table (transcribed from the module docs of
//!   `agent.rs`, `task.rs`, `workflow.rs`) and a model of the guards: legal
//!   commands succeed and land on the table's status, illegal ones fail with
//!   the expected code;
//! - that `decide` is deterministic, reads no stream outside `related()`, and
//!   returns exactly one event on success;
//! - the domain invariants (assignees, attempts, dependencies, capability
//!   cover, active agents only, terminal states, one stream per command);
//!
//! and at the end of a sequence, that replaying each stream's stored events
//! (`to_data` → `from_stored` → `evolve`) rebuilds the same states.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};

use neurectomy_domain::event::EVENT_TYPES;
use neurectomy_domain::validate;
use neurectomy_domain::{
    AgentCommand, AgentEvent, AgentId, AgentKind, AgentState, AgentStatus, Aggregate,
    AggregateKind, Command, DomainError, DomainEvent, Related, StreamId, TaskCommand, TaskEvent,
    TaskId, TaskState, TaskStatus, WorkflowCommand, WorkflowId, WorkflowState, WorkflowStatus,
};
use proptest::prelude::*;
use serde_json::json;
use uuid::Uuid;

use crate::support::samples;

// ---------------------------------------------------------------------------
// The universe
// ---------------------------------------------------------------------------

const WORKFLOWS: usize = 3;
const AGENTS: usize = 4;
const TASKS: usize = 8;
const CAPS: [&str; 3] = ["code", "review", "search"];

fn wid(i: usize) -> WorkflowId {
    WorkflowId::from_uuid(Uuid::from_u128(0x1000 + i as u128))
}
fn aid(i: usize) -> AgentId {
    AgentId::from_uuid(Uuid::from_u128(0x2000 + i as u128))
}
fn tid(i: usize) -> TaskId {
    TaskId::from_uuid(Uuid::from_u128(0x3000 + i as u128))
}

/// The latest state of every stream of the universe.
#[derive(Debug, Clone, PartialEq)]
struct World {
    agents: BTreeMap<AgentId, AgentState>,
    tasks: BTreeMap<TaskId, TaskState>,
    workflows: BTreeMap<WorkflowId, WorkflowState>,
}

impl World {
    fn new() -> Self {
        Self {
            agents: (0..AGENTS)
                .map(|i| (aid(i), AgentState::default()))
                .collect(),
            tasks: (0..TASKS).map(|i| (tid(i), TaskState::default())).collect(),
            workflows: (0..WORKFLOWS)
                .map(|i| (wid(i), WorkflowState::default()))
                .collect(),
        }
    }

    fn agent(&self, id: AgentId) -> AgentState {
        self.agents.get(&id).cloned().unwrap_or_default()
    }
    fn task(&self, id: TaskId) -> TaskState {
        self.tasks.get(&id).cloned().unwrap_or_default()
    }
    fn workflow(&self, id: WorkflowId) -> WorkflowState {
        self.workflows.get(&id).cloned().unwrap_or_default()
    }

    /// What a handler loads for `streams`: their latest states, nothing else.
    fn related_for(&self, streams: &[StreamId]) -> Related {
        let mut related = Related::default();
        for stream in streams {
            match stream.kind() {
                AggregateKind::Agent => {
                    let id = AgentId::from_uuid(stream.uuid());
                    related.insert_agent(id, self.agent(id));
                }
                AggregateKind::Task => {
                    let id = TaskId::from_uuid(stream.uuid());
                    related.insert_task(id, self.task(id));
                }
                AggregateKind::Workflow => {
                    let id = WorkflowId::from_uuid(stream.uuid());
                    related.insert_workflow(id, self.workflow(id));
                }
                // No command relates to an erasure.
                AggregateKind::Erasure => {}
            }
        }
        related
    }

    /// Every stream of the universe (to detect reads outside `related()`).
    fn related_all(&self) -> Related {
        let mut related = Related::default();
        for (id, s) in &self.agents {
            related.insert_agent(*id, s.clone());
        }
        for (id, s) in &self.tasks {
            related.insert_task(*id, s.clone());
        }
        for (id, s) in &self.workflows {
            related.insert_workflow(*id, s.clone());
        }
        related
    }

    fn status(&self, stream: StreamId) -> St {
        match stream.kind() {
            AggregateKind::Agent => self
                .agent(AgentId::from_uuid(stream.uuid()))
                .get()
                .map_or(St::Absent, |a| St::Agent(a.status)),
            AggregateKind::Task => self
                .task(TaskId::from_uuid(stream.uuid()))
                .get()
                .map_or(St::Absent, |t| St::Task(t.status)),
            AggregateKind::Workflow => self
                .workflow(WorkflowId::from_uuid(stream.uuid()))
                .get()
                .map_or(St::Absent, |w| St::Workflow(w.status)),
            AggregateKind::Erasure => St::Absent,
        }
    }

    fn streams(&self) -> Vec<StreamId> {
        self.agents
            .keys()
            .map(AgentId::stream_id)
            .chain(self.tasks.keys().map(TaskId::stream_id))
            .chain(self.workflows.keys().map(WorkflowId::stream_id))
            .collect()
    }

    fn agents_where(&self, f: impl Fn(&AgentState) -> bool) -> Vec<AgentId> {
        self.agents
            .iter()
            .filter(|(_, s)| f(s))
            .map(|(id, _)| *id)
            .collect()
    }
    fn tasks_where(&self, f: impl Fn(&TaskState) -> bool) -> Vec<TaskId> {
        self.tasks
            .iter()
            .filter(|(_, s)| f(s))
            .map(|(id, _)| *id)
            .collect()
    }
    fn workflows_where(&self, f: impl Fn(&WorkflowState) -> bool) -> Vec<WorkflowId> {
        self.workflows
            .iter()
            .filter(|(_, s)| f(s))
            .map(|(id, _)| *id)
            .collect()
    }
}

// ---------------------------------------------------------------------------
// The transition table, transcribed from the module docs
// ---------------------------------------------------------------------------

/// Status of any stream; `Absent` before its first event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Absent,
    Agent(AgentStatus),
    Task(TaskStatus),
    Workflow(WorkflowStatus),
}

use St::Absent;
const A_ACTIVE: St = St::Agent(AgentStatus::Active);
const A_PAUSED: St = St::Agent(AgentStatus::Paused);
const A_FAILED: St = St::Agent(AgentStatus::Failed);
const A_RETIRED: St = St::Agent(AgentStatus::Retired);
const T_PENDING: St = St::Task(TaskStatus::Pending);
const T_ASSIGNED: St = St::Task(TaskStatus::Assigned);
const T_RUNNING: St = St::Task(TaskStatus::Running);
const T_COMPLETED: St = St::Task(TaskStatus::Completed);
const T_FAILED: St = St::Task(TaskStatus::Failed);
const T_CANCELLED: St = St::Task(TaskStatus::Cancelled);
const W_RUNNING: St = St::Workflow(WorkflowStatus::Running);
const W_COMPLETED: St = St::Workflow(WorkflowStatus::Completed);
const W_FAILED: St = St::Workflow(WorkflowStatus::Failed);
const W_CANCELLED: St = St::Workflow(WorkflowStatus::Cancelled);

/// `(status before, command) -> status after`. Anything not listed is an
/// illegal transition.
const TABLE: &[(St, &str, St)] = &[
    // agent.rs
    (Absent, "RegisterAgent", A_ACTIVE),
    (A_ACTIVE, "PauseAgent", A_PAUSED),
    (A_PAUSED, "ResumeAgent", A_ACTIVE),
    (A_FAILED, "ResumeAgent", A_ACTIVE),
    (A_ACTIVE, "FailAgent", A_FAILED),
    (A_PAUSED, "FailAgent", A_FAILED),
    (A_ACTIVE, "RetireAgent", A_RETIRED),
    (A_PAUSED, "RetireAgent", A_RETIRED),
    (A_FAILED, "RetireAgent", A_RETIRED),
    // task.rs
    (Absent, "CreateTask", T_PENDING),
    (T_PENDING, "AssignTask", T_ASSIGNED),
    (T_ASSIGNED, "StartTask", T_RUNNING),
    (T_RUNNING, "ReportTaskProgress", T_RUNNING),
    (T_RUNNING, "CompleteTask", T_COMPLETED),
    (T_ASSIGNED, "FailTask", T_FAILED),
    (T_RUNNING, "FailTask", T_FAILED),
    (T_FAILED, "RetryTask", T_PENDING),
    (T_ASSIGNED, "DelegateTask", T_ASSIGNED),
    (T_RUNNING, "DelegateTask", T_RUNNING),
    (T_PENDING, "CancelTask", T_CANCELLED),
    (T_ASSIGNED, "CancelTask", T_CANCELLED),
    (T_RUNNING, "CancelTask", T_CANCELLED),
    (T_FAILED, "CancelTask", T_CANCELLED),
    // workflow.rs
    (Absent, "StartWorkflow", W_RUNNING),
    (W_RUNNING, "CompleteWorkflow", W_COMPLETED),
    (W_RUNNING, "FailWorkflow", W_FAILED),
    (W_RUNNING, "CancelWorkflow", W_CANCELLED),
];

const CREATING: [&str; 3] = ["RegisterAgent", "CreateTask", "StartWorkflow"];

fn table(before: St, command: &str) -> Option<St> {
    TABLE
        .iter()
        .find(|(from, c, _)| *from == before && *c == command)
        .map(|(_, _, to)| *to)
}

/// Terminal: the stream never changes again.
fn is_terminal(status: St) -> bool {
    matches!(
        status,
        A_RETIRED | T_COMPLETED | T_CANCELLED | W_COMPLETED | W_FAILED | W_CANCELLED
    )
}

/// The event each command emits.
fn event_of(command: &str) -> &'static str {
    match command {
        "RegisterAgent" => "AgentRegistered",
        "PauseAgent" => "AgentPaused",
        "ResumeAgent" => "AgentResumed",
        "FailAgent" => "AgentFailed",
        "RetireAgent" => "AgentRetired",
        "CreateTask" => "TaskCreated",
        "AssignTask" => "TaskAssigned",
        "StartTask" => "TaskStarted",
        "ReportTaskProgress" => "TaskProgressReported",
        "CompleteTask" => "TaskCompleted",
        "FailTask" => "TaskFailed",
        "RetryTask" => "TaskRetried",
        "CancelTask" => "TaskCancelled",
        "DelegateTask" => "TaskDelegated",
        "StartWorkflow" => "WorkflowStarted",
        "CompleteWorkflow" => "WorkflowCompleted",
        "FailWorkflow" => "WorkflowFailed",
        "CancelWorkflow" => "WorkflowCancelled",
        other => panic!("unknown command {other}"),
    }
}

// ---------------------------------------------------------------------------
// The model of the guards
// ---------------------------------------------------------------------------

/// What the model expects of `decide`.
#[derive(Debug, Clone, PartialEq)]
enum Expected {
    /// Exactly one event, landing on this status.
    Accept(St),
    /// An error with one of these codes (several guards may fail at once;
    /// which one `decide` reports first is its own business).
    Refuse(BTreeSet<&'static str>),
}

fn missing_caps(agent: &AgentState, required: &[String]) -> bool {
    agent
        .get()
        .is_some_and(|a| required.iter().any(|c| !a.capabilities.contains(c)))
}

/// The guards on the agent that receives a task (assign or delegate).
fn taker_problems(world: &World, agent: AgentId, required: &[String]) -> Vec<&'static str> {
    let state = world.agent(agent);
    match state.get() {
        None => vec!["NOT_FOUND"],
        Some(a) => {
            let mut problems = Vec::new();
            if a.status != AgentStatus::Active {
                problems.push("AGENT_UNAVAILABLE");
            }
            if missing_caps(&state, required) {
                problems.push("CAPABILITY_MISMATCH");
            }
            problems
        }
    }
}

/// Whether the command's own fields are within `validate.rs` bounds.
fn payload_is_valid(command: &Command) -> bool {
    let opt_text = |field, v: &Option<String>| {
        v.as_deref()
            .is_none_or(|t| validate::text(field, t).is_ok())
    };
    match command {
        Command::Agent(c) => match c {
            AgentCommand::RegisterAgent {
                name,
                model,
                capabilities,
                ..
            } => {
                validate::name("name", name).is_ok()
                    && model
                        .as_deref()
                        .is_none_or(|m| validate::name("model", m).is_ok())
                    && validate::capabilities("capabilities", capabilities).is_ok()
            }
            AgentCommand::PauseAgent { reason, .. } | AgentCommand::RetireAgent { reason, .. } => {
                opt_text("reason", reason)
            }
            AgentCommand::ResumeAgent { .. } => true,
            AgentCommand::FailAgent { reason, .. } => validate::text("reason", reason).is_ok(),
        },
        Command::Task(c) => match c {
            TaskCommand::CreateTask {
                title,
                input,
                required_capabilities,
                depends_on,
                priority,
                max_attempts,
                ..
            } => {
                validate::name("title", title).is_ok()
                    && validate::json("input", input).is_ok()
                    && validate::capabilities("required_capabilities", required_capabilities)
                        .is_ok()
                    && *priority <= 100
                    && (1..=validate::MAX_ATTEMPTS).contains(max_attempts)
                    && depends_on.len() <= validate::MAX_DEPENDENCIES
            }
            TaskCommand::ReportTaskProgress { percent, note, .. } => {
                *percent <= 100 && opt_text("note", note)
            }
            TaskCommand::CompleteTask { output, .. } => validate::json("output", output).is_ok(),
            TaskCommand::FailTask { error, .. } => {
                validate::text("error", error).is_ok() && !error.trim().is_empty()
            }
            TaskCommand::CancelTask { reason, .. } => validate::text("reason", reason).is_ok(),
            TaskCommand::AssignTask { .. }
            | TaskCommand::StartTask { .. }
            | TaskCommand::RetryTask { .. }
            | TaskCommand::DelegateTask { .. } => true,
        },
        Command::Workflow(c) => match c {
            WorkflowCommand::StartWorkflow { name, metadata, .. } => {
                validate::name("name", name).is_ok() && validate::json("metadata", metadata).is_ok()
            }
            WorkflowCommand::CompleteWorkflow { .. } => true,
            WorkflowCommand::FailWorkflow { reason, .. }
            | WorkflowCommand::CancelWorkflow { reason, .. } => {
                validate::text("reason", reason).is_ok()
            }
        },
    }
}

/// The guards of a command the table allows, as error codes.
fn guard_problems(world: &World, command: &Command) -> Vec<&'static str> {
    let mut problems = Vec::new();
    match command {
        Command::Agent(AgentCommand::RegisterAgent {
            agent_id,
            parent_agent_id: Some(parent),
            ..
        }) => {
            if parent == agent_id {
                problems.push("VALIDATION");
            } else {
                match world.agent(*parent).get() {
                    None => problems.push("NOT_FOUND"),
                    Some(p) if p.status == AgentStatus::Retired => {
                        problems.push("AGENT_UNAVAILABLE");
                    }
                    Some(_) => {}
                }
            }
        }
        Command::Task(TaskCommand::CreateTask {
            task_id,
            workflow_id,
            depends_on,
            ..
        }) => {
            match world.workflow(*workflow_id).get() {
                None => problems.push("NOT_FOUND"),
                Some(w) if w.status != WorkflowStatus::Running => {
                    problems.push("INVALID_TRANSITION");
                }
                Some(_) => {}
            }
            for dep in depends_on {
                if dep == task_id {
                    problems.push("VALIDATION");
                    continue;
                }
                match world.task(*dep).get() {
                    None => problems.push("NOT_FOUND"),
                    Some(d) if d.workflow_id != *workflow_id => problems.push("VALIDATION"),
                    Some(_) => {}
                }
            }
        }
        Command::Task(TaskCommand::AssignTask { task_id, agent_id }) => {
            let task = world.task(*task_id);
            let required = &task.get().unwrap().required_capabilities;
            problems.extend(taker_problems(world, *agent_id, required));
        }
        Command::Task(TaskCommand::StartTask { task_id }) => {
            let task = world.task(*task_id);
            let deps_done = task.get().unwrap().depends_on.iter().all(|d| {
                world
                    .task(*d)
                    .get()
                    .is_some_and(|t| t.status == TaskStatus::Completed)
            });
            if !deps_done {
                problems.push("DEPENDENCY_NOT_COMPLETED");
            }
            let assignee = task.get().unwrap().assignee.map(|a| world.agent(a));
            let assignee_active = assignee
                .as_ref()
                .and_then(AgentState::get)
                .is_some_and(|a| a.status == AgentStatus::Active);
            if !assignee_active {
                problems.push("AGENT_UNAVAILABLE");
            }
        }
        Command::Task(TaskCommand::RetryTask { task_id }) => {
            let task = world.task(*task_id);
            let t = task.get().unwrap();
            if !t.retryable || t.attempt >= t.max_attempts {
                problems.push("INVALID_TRANSITION");
            }
        }
        Command::Task(TaskCommand::DelegateTask {
            task_id,
            from_agent_id,
            to_agent_id,
        }) => {
            let task = world.task(*task_id);
            let t = task.get().unwrap();
            if t.assignee != Some(*from_agent_id) || from_agent_id == to_agent_id {
                problems.push("VALIDATION");
            }
            problems.extend(taker_problems(
                world,
                *to_agent_id,
                &t.required_capabilities,
            ));
        }
        _ => {}
    }
    if !payload_is_valid(command) {
        problems.push("VALIDATION");
    }
    problems
}

fn expected(world: &World, command: &Command) -> Expected {
    let name = command.name();
    let before = world.status(command.stream_id());
    let Some(after) = table(before, name) else {
        // Illegal per the table.
        let code = if before == Absent {
            "NOT_FOUND"
        } else if CREATING.contains(&name) {
            "ALREADY_EXISTS"
        } else {
            "INVALID_TRANSITION"
        };
        let mut codes = BTreeSet::from([code]);
        // Field validation may come before the state check.
        if code == "INVALID_TRANSITION" && !payload_is_valid(command) {
            codes.insert("VALIDATION");
        }
        return Expected::Refuse(codes);
    };
    let problems = guard_problems(world, command);
    if problems.is_empty() {
        Expected::Accept(after)
    } else {
        Expected::Refuse(problems.into_iter().collect())
    }
}

// ---------------------------------------------------------------------------
// Random commands, biased toward legal ones
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    StartWorkflow,
    CompleteWorkflow,
    FailWorkflow,
    CancelWorkflow,
    RegisterAgent,
    PauseAgent,
    ResumeAgent,
    FailAgent,
    RetireAgent,
    CreateTask,
    AssignTask,
    StartTask,
    ReportTaskProgress,
    CompleteTask,
    FailTask,
    RetryTask,
    CancelTask,
    DelegateTask,
}

/// One random step: a command kind and raw choices that [`build`] turns into
/// a command against the current world. With `smart`, the ids are picked
/// among those the table (and guards) allow, when there are any.
#[derive(Debug, Clone)]
struct Op {
    kind: Kind,
    smart: bool,
    valid: bool,
    a: usize,
    b: usize,
    c: usize,
    mask: u8,
    flag: bool,
}

fn arb_kind() -> impl Strategy<Value = Kind> {
    use Kind::*;
    prop_oneof![
        4 => Just(StartWorkflow),
        1 => Just(CompleteWorkflow),
        1 => Just(FailWorkflow),
        1 => Just(CancelWorkflow),
        5 => Just(RegisterAgent),
        2 => Just(PauseAgent),
        3 => Just(ResumeAgent),
        2 => Just(FailAgent),
        1 => Just(RetireAgent),
        10 => Just(CreateTask),
        12 => Just(AssignTask),
        12 => Just(StartTask),
        3 => Just(ReportTaskProgress),
        12 => Just(CompleteTask),
        4 => Just(FailTask),
        4 => Just(RetryTask),
        1 => Just(CancelTask),
        4 => Just(DelegateTask),
    ]
}

fn arb_op() -> impl Strategy<Value = Op> {
    (
        arb_kind(),
        prop::bool::weighted(0.85),
        prop::bool::weighted(0.95),
        0..64usize,
        0..64usize,
        0..64usize,
        any::<u8>(),
        any::<bool>(),
    )
        .prop_map(|(kind, smart, valid, a, b, c, mask, flag)| Op {
            kind,
            smart,
            valid,
            a,
            b,
            c,
            mask,
            flag,
        })
}

fn arb_ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(arb_op(), 1..=60)
}

/// The command's own stream: a candidate (by `op.a`) if `smart` and there
/// are candidates; otherwise `None` if `strict`, else any id of the universe.
fn pick_target<T: Copy>(
    op: &Op,
    strict: bool,
    candidates: &[T],
    n: usize,
    universe: fn(usize) -> T,
) -> Option<T> {
    if op.smart && !candidates.is_empty() {
        Some(candidates[op.a % candidates.len()])
    } else if strict {
        None
    } else {
        Some(universe(op.a % n))
    }
}

/// A secondary id: `candidates[i]` if `smart` and there are candidates, else
/// `universe(i)`.
fn pick<T: Copy>(smart: bool, candidates: &[T], i: usize, n: usize, universe: fn(usize) -> T) -> T {
    if smart && !candidates.is_empty() {
        candidates[i % candidates.len()]
    } else {
        universe(i % n)
    }
}

fn caps_from(mask: u8) -> Vec<String> {
    CAPS.iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, c)| (*c).to_owned())
        .collect()
}

fn reason(op: &Op) -> String {
    if op.valid {
        format!("reason {}\nline two\t{}", op.c, "é".repeat(op.c))
    } else {
        match op.c % 3 {
            0 => "bell \u{7}".to_owned(),
            1 => "x".repeat(validate::MAX_TEXT_CHARS + 1),
            _ => "nul \u{0}".to_owned(),
        }
    }
}

fn optional_reason(op: &Op) -> Option<String> {
    (op.flag || !op.valid).then(|| reason(op))
}

fn name(op: &Op, base: &str) -> String {
    if op.valid {
        format!("{base} {}", op.c)
    } else {
        match op.c % 3 {
            0 => String::new(),
            1 => format!(" {base}"),
            _ => "n".repeat(validate::MAX_NAME_CHARS + 1),
        }
    }
}

/// The command of `kind` for `op`. With `strict`, `None` when no target makes
/// the command legal (so that [`build`] can pick another kind).
fn build_kind(world: &World, op: &Op, kind: Kind, strict: bool) -> Option<Command> {
    macro_rules! target {
        ($candidates:expr, $n:expr, $universe:expr) => {
            pick_target(op, strict, &$candidates, $n, $universe)?
        };
    }
    let s = op.smart;
    let agent_is =
        |f: fn(AgentStatus) -> bool| world.agents_where(|a| a.get().is_some_and(|a| f(a.status)));
    let task_is =
        |f: fn(TaskStatus) -> bool| world.tasks_where(|t| t.get().is_some_and(|t| f(t.status)));
    let running_workflows =
        world.workflows_where(|w| w.get().is_some_and(|w| w.status == WorkflowStatus::Running));
    // Active agents able to take a task.
    let takers = |task: TaskId, except: Option<AgentId>| {
        let state = world.task(task);
        let required = state
            .get()
            .map(|t| t.required_capabilities.clone())
            .unwrap_or_default();
        world.agents_where(|a| {
            a.get().is_some_and(|a| {
                a.status == AgentStatus::Active
                    && Some(a.id) != except
                    && required.iter().all(|c| a.capabilities.contains(c))
            })
        })
    };

    let command = match kind {
        Kind::StartWorkflow => {
            let targets = world.workflows_where(|w| w.get().is_none());
            Command::Workflow(WorkflowCommand::StartWorkflow {
                workflow_id: target!(targets, WORKFLOWS, wid),
                name: name(op, "workflow"),
                metadata: json!({"owner": op.b, "tags": ["x", op.flag]}),
            })
        }
        Kind::CompleteWorkflow => Command::Workflow(WorkflowCommand::CompleteWorkflow {
            workflow_id: target!(running_workflows, WORKFLOWS, wid),
        }),
        Kind::FailWorkflow => Command::Workflow(WorkflowCommand::FailWorkflow {
            workflow_id: target!(running_workflows, WORKFLOWS, wid),
            reason: reason(op),
        }),
        Kind::CancelWorkflow => Command::Workflow(WorkflowCommand::CancelWorkflow {
            workflow_id: target!(running_workflows, WORKFLOWS, wid),
            reason: reason(op),
        }),
        Kind::RegisterAgent => {
            let targets = world.agents_where(|a| a.get().is_none());
            let agent_id = target!(targets, AGENTS, aid);
            let parents: Vec<AgentId> = world
                .agents_where(|a| a.get().is_some_and(|a| a.status != AgentStatus::Retired))
                .into_iter()
                .filter(|p| *p != agent_id)
                .collect();
            // Agents mostly have several capabilities so that tasks find takers.
            let mut capabilities = caps_from(op.mask | if op.flag { 0b011 } else { 0 });
            if op.mask & 0b1000 != 0 {
                capabilities.push(CAPS[op.c % CAPS.len()].to_owned()); // a duplicate
            }
            if !op.valid && op.c % 2 == 0 {
                capabilities.push("Not A Capability".to_owned());
            }
            let name = if !op.valid && op.c % 2 == 0 {
                "agent".to_owned()
            } else {
                name(op, "agent")
            };
            Command::Agent(AgentCommand::RegisterAgent {
                agent_id,
                name,
                kind: [AgentKind::Llm, AgentKind::Tool, AgentKind::Human][op.c % 3],
                model: (op.c % 2 == 0).then(|| "model-x".to_owned()),
                capabilities,
                parent_agent_id: (op.mask & 0b1_0000 != 0)
                    .then(|| pick(s, &parents, op.b, AGENTS, aid)),
            })
        }
        Kind::PauseAgent => Command::Agent(AgentCommand::PauseAgent {
            agent_id: target!(agent_is(|st| st == AgentStatus::Active), AGENTS, aid),
            reason: optional_reason(op),
        }),
        Kind::ResumeAgent => Command::Agent(AgentCommand::ResumeAgent {
            agent_id: target!(
                agent_is(|st| matches!(st, AgentStatus::Paused | AgentStatus::Failed)),
                AGENTS,
                aid
            ),
        }),
        Kind::FailAgent => Command::Agent(AgentCommand::FailAgent {
            agent_id: target!(
                agent_is(|st| matches!(st, AgentStatus::Active | AgentStatus::Paused)),
                AGENTS,
                aid
            ),
            reason: reason(op),
        }),
        Kind::RetireAgent => Command::Agent(AgentCommand::RetireAgent {
            agent_id: target!(agent_is(|st| st != AgentStatus::Retired), AGENTS, aid),
            reason: optional_reason(op),
        }),
        Kind::CreateTask => {
            let targets = world.tasks_where(|t| t.get().is_none());
            let task_id = target!(targets, TASKS, tid);
            if strict && running_workflows.is_empty() {
                return None;
            }
            let workflow_id = pick(s, &running_workflows, op.b, WORKFLOWS, wid);
            // Dependencies: a subset (by mask) of the existing tasks of that
            // workflow when smart, of any tasks otherwise.
            let pool: Vec<TaskId> = if s {
                world.tasks_where(|t| t.get().is_some_and(|t| t.workflow_id == workflow_id))
            } else {
                (0..TASKS).map(tid).collect()
            };
            let mut depends_on: Vec<TaskId> = pool
                .iter()
                .enumerate()
                .filter(|(i, _)| op.mask & (1 << (i % 8)) != 0 && op.mask & 0b1000_0000 == 0)
                .map(|(_, t)| *t)
                .take(3)
                .collect();
            if op.flag && !depends_on.is_empty() {
                depends_on.push(depends_on[0]); // a duplicate
            }
            let (mut priority, mut max_attempts) = ((op.c * 7 % 101) as u8, 1 + (op.c % 3) as u32);
            let mut title = name(op, "task");
            if !op.valid {
                match op.b % 3 {
                    0 => priority = 101,
                    1 => max_attempts = [0, validate::MAX_ATTEMPTS + 1][op.c % 2],
                    _ => {}
                }
                if op.b % 3 != 2 {
                    title = "task".to_owned();
                }
            }
            Command::Task(TaskCommand::CreateTask {
                task_id,
                workflow_id,
                title,
                input: json!({"n": op.a, "nested": {"list": [1, 2.5, null, "ü"]}}),
                // Tasks need few capabilities.
                required_capabilities: caps_from(op.mask & op.mask >> 3),
                depends_on,
                priority,
                max_attempts,
            })
        }
        Kind::AssignTask => {
            // Pending tasks that some agent can take, if any.
            let takeable: Vec<TaskId> = task_is(|st| st == TaskStatus::Pending)
                .into_iter()
                .filter(|t| !takers(*t, None).is_empty())
                .collect();
            let targets = if takeable.is_empty() && !strict {
                task_is(|st| st == TaskStatus::Pending)
            } else {
                takeable
            };
            let task_id = target!(targets, TASKS, tid);
            Command::Task(TaskCommand::AssignTask {
                task_id,
                agent_id: pick(s, &takers(task_id, None), op.b, AGENTS, aid),
            })
        }
        Kind::StartTask => {
            let ready = world.tasks_where(|t| {
                t.get().is_some_and(|t| {
                    t.status == TaskStatus::Assigned
                        && t.depends_on.iter().all(|d| {
                            world
                                .task(*d)
                                .get()
                                .is_some_and(|d| d.status == TaskStatus::Completed)
                        })
                })
            });
            let targets = if !strict && (ready.is_empty() || op.flag && op.c % 4 == 0) {
                task_is(|st| st == TaskStatus::Assigned)
            } else {
                ready
            };
            Command::Task(TaskCommand::StartTask {
                task_id: target!(targets, TASKS, tid),
            })
        }
        Kind::ReportTaskProgress => Command::Task(TaskCommand::ReportTaskProgress {
            task_id: target!(task_is(|st| st == TaskStatus::Running), TASKS, tid),
            percent: if op.valid {
                (op.c * 3 % 101) as u8
            } else {
                101 + op.mask % 155
            },
            note: if op.valid || op.flag {
                op.flag.then(|| format!("step {}", op.b))
            } else {
                Some("\u{1b}[31m".to_owned())
            },
        }),
        Kind::CompleteTask => Command::Task(TaskCommand::CompleteTask {
            task_id: target!(task_is(|st| st == TaskStatus::Running), TASKS, tid),
            output: if op.valid {
                json!({"result": op.b, "ok": op.flag})
            } else {
                json!("x".repeat(validate::MAX_JSON_BYTES))
            },
        }),
        Kind::FailTask => Command::Task(TaskCommand::FailTask {
            task_id: target!(
                task_is(|st| matches!(st, TaskStatus::Assigned | TaskStatus::Running)),
                TASKS,
                tid
            ),
            error: if op.valid {
                format!("error {}", op.b)
            } else {
                [" \t\n ", ""][op.c % 2].to_owned()
            },
            // Mostly retryable, so that retries happen.
            retryable: op.flag || op.c % 3 != 0,
        }),
        Kind::RetryTask => {
            let retryable = world.tasks_where(|t| {
                t.get().is_some_and(|t| {
                    t.status == TaskStatus::Failed && t.retryable && t.attempt < t.max_attempts
                })
            });
            let targets = if !strict && (retryable.is_empty() || op.flag && op.c % 3 == 0) {
                task_is(|st| st == TaskStatus::Failed)
            } else {
                retryable
            };
            Command::Task(TaskCommand::RetryTask {
                task_id: target!(targets, TASKS, tid),
            })
        }
        Kind::CancelTask => Command::Task(TaskCommand::CancelTask {
            task_id: target!(task_is(|st| !st.is_terminal()), TASKS, tid),
            reason: reason(op),
        }),
        Kind::DelegateTask => {
            let task_id = target!(
                task_is(|st| matches!(st, TaskStatus::Assigned | TaskStatus::Running)),
                TASKS,
                tid
            );
            let assignee = world.task(task_id).get().and_then(|t| t.assignee);
            let from_agent_id = match assignee {
                Some(a) if s && !(op.flag && op.c % 5 == 0) => a,
                _ => aid(op.b % AGENTS),
            };
            Command::Task(TaskCommand::DelegateTask {
                task_id,
                from_agent_id,
                to_agent_id: pick(s, &takers(task_id, Some(from_agent_id)), op.c, AGENTS, aid),
            })
        }
    };
    Some(command)
}

/// When a smart op's kind has no legal target, the deepest step of the task
/// pipeline that has one is taken instead, so that sequences make progress.
const PIPELINE: [Kind; 6] = [
    Kind::CompleteTask,
    Kind::StartTask,
    Kind::AssignTask,
    Kind::CreateTask,
    Kind::RegisterAgent,
    Kind::StartWorkflow,
];

fn build(world: &World, op: &Op) -> Command {
    if op.smart {
        let strict = std::iter::once(op.kind)
            .chain(PIPELINE)
            .find_map(|kind| build_kind(world, op, kind, true));
        if let Some(command) = strict {
            return command;
        }
    }
    build_kind(world, op, op.kind, false).expect("a lenient build always yields a command")
}

// ---------------------------------------------------------------------------
// Running a sequence
// ---------------------------------------------------------------------------

/// What a run reached, to show the properties are not vacuous.
#[derive(Debug, Default)]
struct Coverage {
    accepted: BTreeMap<&'static str, usize>,
    refused: BTreeMap<&'static str, usize>,
    statuses: BTreeSet<String>,
    completed_tasks: usize,
    completed_with_dependencies: usize,
    retried_then_completed: usize,
    delegated_then_completed: usize,
}

/// Decides like a handler, checking determinism and that `decide` reads no
/// stream outside `related()`. Returns the outcome and the folded state.
fn decide_and_evolve<A: Aggregate>(
    state: &A,
    command: &A::Command,
    world: &World,
) -> Result<(Result<Vec<DomainEvent>, DomainError>, A), TestCaseError> {
    let snapshot = state.clone();
    let related = world.related_for(&state.related(command));
    let outcome = state.decide(command, &related);
    let again = snapshot.decide(command, &world.related_for(&snapshot.related(command)));
    prop_assert_eq!(
        &outcome,
        &again,
        "decide is not deterministic for {:?}",
        command
    );
    let everything = state.decide(command, &world.related_all());
    prop_assert_eq!(
        &outcome,
        &everything,
        "decide of {:?} reads a stream that related() does not list ({:?})",
        command,
        state.related(command)
    );
    prop_assert_eq!(state, &snapshot, "decide changed its state");
    let mut next = state.clone();
    let events = match outcome {
        Ok(events) => {
            for e in &events {
                next.evolve(e);
            }
            Ok(events.into_iter().map(A::into_domain).collect())
        }
        Err(e) => Err(e),
    };
    Ok((events, next))
}

/// The agent ids an event names as the one acting or receiving work.
fn agents_targeted(event: &DomainEvent) -> Vec<AgentId> {
    match event {
        DomainEvent::Agent(AgentEvent::AgentRegistered {
            parent_agent_id, ..
        }) => parent_agent_id.iter().copied().collect(),
        DomainEvent::Agent(
            AgentEvent::AgentPaused { agent_id, .. }
            | AgentEvent::AgentResumed { agent_id }
            | AgentEvent::AgentFailed { agent_id, .. }
            | AgentEvent::AgentRetired { agent_id, .. },
        ) => vec![*agent_id],
        DomainEvent::Task(
            TaskEvent::TaskAssigned { agent_id, .. } | TaskEvent::TaskStarted { agent_id, .. },
        ) => vec![*agent_id],
        DomainEvent::Task(TaskEvent::TaskDelegated { to_agent_id, .. }) => vec![*to_agent_id],
        _ => Vec::new(),
    }
}

/// The stream an event belongs to.
fn stream_of(event: &DomainEvent) -> StreamId {
    event.stream_id()
}

/// Checks every invariant of a world.
fn check_invariants(world: &World) -> Result<(), TestCaseError> {
    for (id, state) in &world.tasks {
        let Some(task) = state.get() else { continue };
        let status = task.status;
        match status {
            TaskStatus::Assigned | TaskStatus::Running => prop_assert!(
                task.assignee.is_some(),
                "task {} is {:?} without an assignee",
                id,
                status
            ),
            TaskStatus::Pending => prop_assert!(
                task.assignee.is_none(),
                "pending task {} has assignee {:?}",
                id,
                task.assignee
            ),
            _ => {}
        }
        prop_assert!(
            (1..=task.max_attempts).contains(&task.attempt),
            "task {} is on attempt {} of {}",
            id,
            task.attempt,
            task.max_attempts
        );
        for dep in &task.depends_on {
            let dep_state = world.task(*dep);
            let Some(d) = dep_state.get() else {
                return Err(TestCaseError::fail(format!(
                    "task {id} depends on {dep}, which does not exist"
                )));
            };
            prop_assert_eq!(
                d.workflow_id,
                task.workflow_id,
                "task {} depends on {} of another workflow",
                id,
                dep
            );
            if matches!(status, TaskStatus::Running | TaskStatus::Completed) {
                prop_assert_eq!(
                    d.status,
                    TaskStatus::Completed,
                    "task {} is {:?} but its dependency {} is {:?}",
                    id,
                    status,
                    dep,
                    d.status
                );
            }
        }
    }
    // The dependency graph is acyclic (depth-first search, three colours).
    fn visit(
        world: &World,
        id: TaskId,
        colour: &mut BTreeMap<TaskId, u8>,
        path: &mut Vec<TaskId>,
    ) -> Result<(), TestCaseError> {
        match colour.get(&id) {
            Some(2) => return Ok(()),
            Some(1) => {
                return Err(TestCaseError::fail(format!(
                    "dependency cycle: {path:?} -> {id}"
                )))
            }
            _ => {}
        }
        colour.insert(id, 1);
        path.push(id);
        for dep in world
            .task(id)
            .get()
            .map(|t| t.depends_on.clone())
            .unwrap_or_default()
        {
            visit(world, dep, colour, path)?;
        }
        path.pop();
        colour.insert(id, 2);
        Ok(())
    }
    let mut colour = BTreeMap::new();
    for id in world.tasks.keys() {
        visit(world, *id, &mut colour, &mut Vec::new())?;
    }
    Ok(())
}

/// Runs one command sequence, checking everything after every step.
fn run(ops: &[Op], coverage: &mut Coverage) -> Result<(), TestCaseError> {
    let mut world = World::new();
    let mut log: BTreeMap<StreamId, Vec<DomainEvent>> = BTreeMap::new();
    // Tasks that were retried or delegated at some point.
    let mut retried = BTreeSet::new();
    let mut delegated = BTreeSet::new();

    for (step, op) in ops.iter().enumerate() {
        let command = build(&world, op);
        let name = command.name();
        let target = command.stream_id();
        let before = world.clone();
        let status_before = world.status(target);
        let expectation = expected(&world, &command);
        let context = || format!("step {step}: {command:?} on {status_before:?}");

        let outcome = match &command {
            Command::Agent(c) => {
                let id = c.agent_id();
                let (outcome, next) = decide_and_evolve(&world.agent(id), c, &world)?;
                if outcome.is_ok() {
                    world.agents.insert(id, next);
                }
                outcome
            }
            Command::Task(c) => {
                let id = c.task_id();
                let (outcome, next) = decide_and_evolve(&world.task(id), c, &world)?;
                if outcome.is_ok() {
                    world.tasks.insert(id, next);
                }
                outcome
            }
            Command::Workflow(c) => {
                let id = c.workflow_id();
                let (outcome, next) = decide_and_evolve(&world.workflow(id), c, &world)?;
                if outcome.is_ok() {
                    world.workflows.insert(id, next);
                }
                outcome
            }
        };
        let status_after = world.status(target);

        // The table and the guards.
        match (&expectation, &outcome) {
            (Expected::Accept(to), Ok(events)) => {
                prop_assert_eq!(events.len(), 1, "{}: {:?}", context(), events);
                let event = &events[0];
                prop_assert_eq!(event.event_type(), event_of(name), "{}", context());
                prop_assert_eq!(
                    stream_of(event),
                    target,
                    "{}: event of another stream",
                    context()
                );
                prop_assert_eq!(
                    status_after,
                    *to,
                    "{}: evolve landed elsewhere than the table",
                    context()
                );
            }
            (Expected::Accept(to), Err(e)) => prop_assert!(
                false,
                "{}: the model expects {:?}, decide refused: {} ({})",
                context(),
                to,
                e,
                e.code()
            ),
            (Expected::Refuse(codes), Ok(events)) => prop_assert!(
                false,
                "{}: the model expects an error in {:?}, decide accepted: {:?}",
                context(),
                codes,
                events
            ),
            (Expected::Refuse(codes), Err(e)) => prop_assert!(
                codes.contains(e.code()),
                "{}: expected an error in {:?}, got {} ({})",
                context(),
                codes,
                e.code(),
                e
            ),
        }
        // Independently of the model: a transition the table forbids fails
        // with the state-machine code (or a field error, if a field is bad).
        if table(status_before, name).is_none() {
            let code = outcome.as_ref().err().map(DomainError::code);
            let field_error = code == Some("VALIDATION") && !payload_is_valid(&command);
            prop_assert!(
                matches!(
                    code,
                    Some("INVALID_TRANSITION" | "NOT_FOUND" | "ALREADY_EXISTS")
                ) || field_error,
                "{}: illegal per the table, decide gave {:?}",
                context(),
                outcome
            );
        }

        match &outcome {
            Err(e) => {
                prop_assert_eq!(
                    &world,
                    &before,
                    "{}: a refused command ({}) changed the world",
                    context(),
                    e
                );
                *coverage.refused.entry(e.code()).or_default() += 1;
            }
            Ok(events) => {
                *coverage.accepted.entry(name).or_default() += 1;
                for event in events {
                    // Work goes only to active agents that cover the task.
                    if let DomainEvent::Task(
                        TaskEvent::TaskAssigned {
                            task_id, agent_id, ..
                        }
                        | TaskEvent::TaskDelegated {
                            task_id,
                            to_agent_id: agent_id,
                            ..
                        },
                    ) = event
                    {
                        let agent = before.agent(*agent_id);
                        let task = before.task(*task_id);
                        let required = &task.get().unwrap().required_capabilities;
                        prop_assert!(
                            agent.get().is_some_and(|a| a.status == AgentStatus::Active)
                                && !missing_caps(&agent, required),
                            "{}: task given to {:?} needing {:?}",
                            context(),
                            agent,
                            required
                        );
                    }
                    // No event names a retired agent.
                    for agent_id in agents_targeted(event) {
                        prop_assert!(
                            before
                                .agent(agent_id)
                                .get()
                                .is_none_or(|a| a.status != AgentStatus::Retired),
                            "{}: {:?} targets retired agent {}",
                            context(),
                            event,
                            agent_id
                        );
                    }
                    if let DomainEvent::Task(TaskEvent::TaskRetried { task_id, .. }) = event {
                        retried.insert(*task_id);
                    }
                    if let DomainEvent::Task(TaskEvent::TaskDelegated { task_id, .. }) = event {
                        delegated.insert(*task_id);
                    }
                    log.entry(target).or_default().push(event.clone());
                }
            }
        }

        // A command writes to exactly one stream; terminal streams never change.
        for stream in world.streams() {
            let unchanged = match stream.kind() {
                AggregateKind::Agent => {
                    let id = AgentId::from_uuid(stream.uuid());
                    world.agent(id) == before.agent(id)
                }
                AggregateKind::Task => {
                    let id = TaskId::from_uuid(stream.uuid());
                    world.task(id) == before.task(id)
                }
                AggregateKind::Workflow => {
                    let id = WorkflowId::from_uuid(stream.uuid());
                    world.workflow(id) == before.workflow(id)
                }
                // The world holds no erasure streams.
                AggregateKind::Erasure => true,
            };
            if stream != target {
                prop_assert!(unchanged, "{}: stream {} changed too", context(), stream);
            }
            if is_terminal(before.status(stream)) {
                prop_assert!(
                    unchanged,
                    "{}: terminal stream {} ({:?}) changed",
                    context(),
                    stream,
                    before.status(stream)
                );
            }
        }
        check_invariants(&world).map_err(|e| TestCaseError::fail(format!("{}: {e}", context())))?;
        coverage.statuses.insert(format!("{status_after:?}"));
    }

    // Replaying the stored events rebuilds every state.
    for (stream, events) in &log {
        let decoded: Vec<DomainEvent> = events
            .iter()
            .map(|e| {
                DomainEvent::from_stored(e.event_type(), e.schema_version(), e.to_data())
                    .map_err(|err| TestCaseError::fail(format!("{}: {err}", e.event_type())))
            })
            .collect::<Result<_, _>>()?;
        prop_assert_eq!(
            &decoded,
            events,
            "stored events of {} do not round-trip",
            stream
        );
        let replayed_equal = match stream.kind() {
            AggregateKind::Agent => {
                replay::<AgentState>(&decoded) == world.agent(AgentId::from_uuid(stream.uuid()))
            }
            AggregateKind::Task => {
                replay::<TaskState>(&decoded) == world.task(TaskId::from_uuid(stream.uuid()))
            }
            AggregateKind::Workflow => {
                replay::<WorkflowState>(&decoded)
                    == world.workflow(WorkflowId::from_uuid(stream.uuid()))
            }
            // Commands write no erasure events.
            AggregateKind::Erasure => false,
        };
        prop_assert!(
            replayed_equal,
            "replaying {} does not rebuild its state",
            stream
        );
    }

    for (id, state) in &world.tasks {
        if let Some(task) = state.get().filter(|t| t.status == TaskStatus::Completed) {
            coverage.completed_tasks += 1;
            if !task.depends_on.is_empty() {
                coverage.completed_with_dependencies += 1;
            }
            if retried.contains(id) {
                coverage.retried_then_completed += 1;
            }
            if delegated.contains(id) {
                coverage.delegated_then_completed += 1;
            }
        }
    }
    Ok(())
}

fn replay<A: Aggregate>(events: &[DomainEvent]) -> A {
    let mut state = A::default();
    for e in events {
        let e = A::from_domain(e.clone()).expect("event of the stream's kind");
        state.evolve(&e);
    }
    state
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// 256 cases, or `PROPTEST_CASES` for a longer soak.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn random_command_sequences_keep_every_invariant(ops in arb_ops()) {
        run(&ops, &mut Coverage::default())?;
    }
}

/// The generator reaches deep states: with a fixed seed, every command
/// succeeds somewhere, every status is visited, and tasks complete (also after
/// dependencies, retries and delegations).
#[test]
fn sequences_reach_deep_states() {
    let mut coverage = Coverage::default();
    for ops in samples(arb_ops()).take(200) {
        run(&ops, &mut coverage).unwrap();
    }
    let commands: BTreeSet<&str> = TABLE.iter().map(|(_, c, _)| *c).collect();
    for command in &commands {
        assert!(
            coverage.accepted.contains_key(command),
            "{command} never succeeded: {coverage:#?}"
        );
    }
    let statuses: BTreeSet<String> = TABLE.iter().map(|(_, _, to)| format!("{to:?}")).collect();
    for status in &statuses {
        assert!(
            coverage.statuses.contains(status),
            "status {status} never reached: {coverage:#?}"
        );
    }
    for code in [
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "INVALID_TRANSITION",
        "VALIDATION",
        "CAPABILITY_MISMATCH",
        "DEPENDENCY_NOT_COMPLETED",
        "AGENT_UNAVAILABLE",
    ] {
        assert!(
            coverage.refused.contains_key(code),
            "no command was refused with {code}: {coverage:#?}"
        );
    }
    eprintln!("{coverage:#?}");
    assert!(coverage.completed_tasks >= 50, "{coverage:#?}");
    assert!(coverage.completed_with_dependencies > 0, "{coverage:#?}");
    assert!(coverage.retried_then_completed > 0, "{coverage:#?}");
    assert!(coverage.delegated_then_completed > 0, "{coverage:#?}");
    // Every event type of an aggregate is produced by some command in the
    // table (erasures are written by the store, not decided by commands).
    let produced: BTreeSet<&str> = commands.iter().map(|c| event_of(c)).collect();
    let known: BTreeSet<&str> = EVENT_TYPES
        .iter()
        .filter(|(_, kind, _)| *kind != AggregateKind::Erasure)
        .map(|(t, _, _)| *t)
        .collect();
    assert_eq!(produced, known);
}

/// The table lists each (status, command) pair at most once.
#[test]
fn the_table_is_a_function() {
    for (i, (from, command, _)) in TABLE.iter().enumerate() {
        assert!(
            !TABLE[..i].iter().any(|(f, c, _)| f == from && c == command),
            "{from:?} {command} listed twice"
        );
    }
}

/// Decides and folds one command like a handler, returning the number of
/// events or the error.
fn apply(world: &mut World, command: Command) -> Result<usize, DomainError> {
    fn one<A: Aggregate>(
        world: &World,
        state: &mut A,
        c: &A::Command,
    ) -> Result<usize, DomainError> {
        let events = state.decide(c, &world.related_for(&state.related(c)))?;
        for e in &events {
            state.evolve(e);
        }
        Ok(events.len())
    }
    match &command {
        Command::Agent(c) => {
            let mut state = world.agent(c.agent_id());
            let n = one(world, &mut state, c)?;
            world.agents.insert(c.agent_id(), state);
            Ok(n)
        }
        Command::Task(c) => {
            let mut state = world.task(c.task_id());
            let n = one(world, &mut state, c)?;
            world.tasks.insert(c.task_id(), state);
            Ok(n)
        }
        Command::Workflow(c) => {
            let mut state = world.workflow(c.workflow_id());
            let n = one(world, &mut state, c)?;
            world.workflows.insert(c.workflow_id(), state);
            Ok(n)
        }
    }
}

/// Regression: a task is assigned, its agent retires, and the task must not
/// start under the retired agent's name.
#[test]
fn start_task_refuses_an_unavailable_assignee() {
    let mut world = World::new();
    let setup: Vec<Command> = vec![
        WorkflowCommand::StartWorkflow {
            workflow_id: wid(0),
            name: "w".into(),
            metadata: json!({}),
        }
        .into(),
        TaskCommand::CreateTask {
            task_id: tid(0),
            workflow_id: wid(0),
            title: "t".into(),
            input: json!(null),
            required_capabilities: vec![],
            depends_on: vec![],
            priority: 50,
            max_attempts: 1,
        }
        .into(),
        AgentCommand::RegisterAgent {
            agent_id: aid(0),
            name: "a".into(),
            kind: AgentKind::Llm,
            model: None,
            capabilities: vec![],
            parent_agent_id: None,
        }
        .into(),
        TaskCommand::AssignTask {
            task_id: tid(0),
            agent_id: aid(0),
        }
        .into(),
        AgentCommand::RetireAgent {
            agent_id: aid(0),
            reason: None,
        }
        .into(),
    ];
    for command in setup {
        assert_eq!(apply(&mut world, command.clone()), Ok(1), "{command:?}");
    }
    let err = apply(
        &mut world,
        TaskCommand::StartTask { task_id: tid(0) }.into(),
    )
    .expect_err("a task must not start under a retired agent");
    assert_eq!(err.code(), "AGENT_UNAVAILABLE", "{err}");
}
