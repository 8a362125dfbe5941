//! A realistic orchestration workload driven through the real command
//! handler: agents register (some spawned by others), workflows start, tasks
//! are created as random DAGs, assigned by capability, started once their
//! dependencies complete, report progress, complete or fail and retry, are
//! sometimes delegated; agents are paused and resumed meanwhile. A progress
//! line each second shows events/s, conflicts, refusals and errors.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use commands::{CommandContext, CommandError, CommandHandler, CommandOutcome};
use domain::{
    AgentCommand, AgentId, AgentKind, Command, TaskCommand, TaskId, WorkflowCommand, WorkflowId,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use clap::Args;

const CAPABILITIES: &[&str] = &[
    "code",
    "search",
    "review",
    "test",
    "deploy",
    "summarize",
    "plan",
    "browse",
];
const MODELS: &[&str] = &["gpt-4o", "claude-sonnet", "llama-3-70b", "mistral-large"];

/// Options of the workload simulator.
#[derive(Debug, Clone, Args)]
pub struct SimulateArgs {
    /// Agents to register at start.
    #[arg(long, env = "NEURECTOMY_SIM_AGENTS", default_value_t = 24)]
    pub agents: usize,
    /// Workflows running at once (each a concurrent driver).
    #[arg(long, env = "NEURECTOMY_SIM_WORKFLOWS", default_value_t = 6)]
    pub workflows: usize,
    /// Tasks per workflow (a random DAG).
    #[arg(long, env = "NEURECTOMY_SIM_TASKS", default_value_t = 8)]
    pub tasks_per_workflow: usize,
    /// Commands per second across all drivers (0 = as fast as possible).
    #[arg(long, env = "NEURECTOMY_SIM_RATE", default_value_t = 200)]
    pub rate: u32,
    /// Seconds to run (0 = until SIGINT/SIGTERM).
    #[arg(long, env = "NEURECTOMY_SIM_DURATION", default_value_t = 0)]
    pub duration: u64,
    /// Tenant the simulated data belongs to (with `--tenants` above 1, the
    /// prefix of their names: `<tenant>-01`, `<tenant>-02`, …).
    #[arg(long, env = "NEURECTOMY_SIM_TENANT", default_value = "demo")]
    pub tenant: String,
    /// Tenants the workload is spread over, with a skewed share: tenant k
    /// (from 1) gets workflows and agent churn in proportion to 1/k, as a
    /// few large customers beside many small ones. The agents are split
    /// among them, at least 2 each.
    #[arg(long, env = "NEURECTOMY_SIM_TENANTS", default_value_t = 1)]
    pub tenants: usize,
    /// Random seed (0 = random).
    #[arg(long, env = "NEURECTOMY_SIM_SEED", default_value_t = 0)]
    pub seed: u64,
}

/// Counters shown on the progress line.
#[derive(Debug, Default)]
struct Stats {
    commands: AtomicU64,
    events: AtomicU64,
    conflicts: AtomicU64,
    refusals: AtomicU64,
    errors: AtomicU64,
    workflows_done: AtomicU64,
}

/// Spaces commands evenly to hit a target rate across all drivers.
struct RateLimiter {
    interval: Option<Duration>,
    next: Mutex<Instant>,
}

impl RateLimiter {
    fn new(rate: u32) -> Self {
        Self {
            interval: (rate > 0).then(|| Duration::from_secs_f64(1.0 / f64::from(rate))),
            next: Mutex::new(Instant::now()),
        }
    }

    async fn acquire(&self) {
        let Some(interval) = self.interval else {
            return;
        };
        let slot = {
            let mut next = crate::sync::lock(&self.next);
            let slot = (*next).max(Instant::now());
            *next = slot + interval;
            slot
        };
        tokio::time::sleep_until(slot.into()).await;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AgentMode {
    Active,
    Paused,
}

#[derive(Debug, Clone)]
struct SimAgent {
    id: AgentId,
    capabilities: BTreeSet<String>,
    mode: AgentMode,
    /// The event that last paused or failed it: the cause of handing its
    /// task to another agent.
    down: Option<Uuid>,
}

/// One tenant's simulator state; the counters, the rate and the shutdown
/// are shared by all tenants.
struct Sim {
    handler: CommandHandler,
    tenant: String,
    stats: Arc<Stats>,
    limiter: Arc<RateLimiter>,
    /// The simulator's own view of agents (no await while locked).
    agents: Mutex<Vec<SimAgent>>,
    shutdown: CancellationToken,
}

impl Sim {
    async fn send(
        &self,
        command: impl Into<Command>,
        correlation: Uuid,
    ) -> Result<CommandOutcome, CommandError> {
        self.send_caused(command, correlation, None).await
    }

    /// [`Sim::send`] naming the event that caused the command, as an
    /// orchestrator does (`causationId`).
    async fn send_caused(
        &self,
        command: impl Into<Command>,
        correlation: Uuid,
        cause: Option<Uuid>,
    ) -> Result<CommandOutcome, CommandError> {
        self.limiter.acquire().await;
        let mut ctx = CommandContext::new(Uuid::new_v4(), "simulator", self.tenant.clone());
        ctx.correlation_id = Some(correlation);
        ctx.causation_id = cause;
        let result = self.handler.execute(command.into(), &ctx).await;
        self.stats.commands.fetch_add(1, Ordering::Relaxed);
        match &result {
            Ok(outcome) => {
                self.stats
                    .events
                    .fetch_add(outcome.events.len() as u64, Ordering::Relaxed);
                self.stats.conflicts.fetch_add(
                    u64::from(outcome.attempts.saturating_sub(1)),
                    Ordering::Relaxed,
                );
            }
            Err(CommandError::Domain(_)) => {
                self.stats.refusals.fetch_add(1, Ordering::Relaxed);
            }
            Err(CommandError::Conflict { attempts, .. }) => {
                self.stats
                    .conflicts
                    .fetch_add(u64::from(*attempts), Ordering::Relaxed);
            }
            Err(error) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(code = error.code(), "{error}");
            }
        }
        result
    }

    fn agents(&self) -> std::sync::MutexGuard<'_, Vec<SimAgent>> {
        crate::sync::lock(&self.agents)
    }

    /// An active agent (in our view) covering `required`, other than `not`.
    fn pick_agent(
        &self,
        rng: &mut StdRng,
        required: &BTreeSet<String>,
        not: Option<AgentId>,
    ) -> Option<AgentId> {
        let agents = self.agents();
        let capable: Vec<AgentId> = agents
            .iter()
            .filter(|a| {
                a.mode == AgentMode::Active
                    && Some(a.id) != not
                    && required.is_subset(&a.capabilities)
            })
            .map(|a| a.id)
            .collect();
        capable.choose(rng).copied()
    }

    /// The event that last paused or failed `agent`, if we saw one.
    fn down_event(&self, agent: AgentId) -> Option<Uuid> {
        self.agents()
            .iter()
            .find(|a| a.id == agent)
            .and_then(|a| a.down)
    }

    /// Resumes a paused (in our view) agent covering `required`. A refusal
    /// means the store has it active already: our view catches up.
    async fn resume_capable(
        &self,
        rng: &mut StdRng,
        required: &BTreeSet<String>,
        correlation: Uuid,
    ) {
        let paused: Option<AgentId> = {
            let agents = self.agents();
            let paused: Vec<AgentId> = agents
                .iter()
                .filter(|a| a.mode == AgentMode::Paused && required.is_subset(&a.capabilities))
                .map(|a| a.id)
                .collect();
            paused.choose(rng).copied()
        };
        let Some(id) = paused else { return };
        match self
            .send(AgentCommand::ResumeAgent { agent_id: id }, correlation)
            .await
        {
            Ok(_) | Err(CommandError::Domain(_)) => set_mode(self, id, AgentMode::Active),
            Err(_) => {}
        }
    }
}

/// Drives the workload until `shutdown` (or the configured duration).
pub async fn drive(
    handler: CommandHandler,
    args: SimulateArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let shutdown = shutdown.child_token();
    if args.duration > 0 {
        let stop = shutdown.clone();
        let duration = Duration::from_secs(args.duration);
        tokio::spawn(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                () = tokio::time::sleep(duration) => stop.cancel(),
            }
        });
    }
    let seed = if args.seed == 0 {
        rand::random()
    } else {
        args.seed
    };
    tracing::info!(
        seed,
        agents = args.agents,
        workflows = args.workflows,
        rate = args.rate,
        "simulation starts"
    );
    let (stats, limiter) = (
        Arc::new(Stats::default()),
        Arc::new(RateLimiter::new(args.rate)),
    );
    let tenants = Tenants::new(
        tenant_names(&args.tenant, args.tenants)
            .into_iter()
            .map(|tenant| {
                Arc::new(Sim {
                    handler: handler.clone(),
                    tenant,
                    stats: stats.clone(),
                    limiter: limiter.clone(),
                    agents: Mutex::new(Vec::new()),
                    shutdown: shutdown.clone(),
                })
            })
            .collect(),
    );

    let reporter = tokio::spawn(report(tenants.sims[0].clone()));
    let mut rng = StdRng::seed_from_u64(seed);
    let per_tenant = (args.agents.max(1) / tenants.sims.len()).max(2);
    for sim in tenants.sims.iter() {
        register_agents(sim, &mut rng, per_tenant).await;
    }

    let mut drivers = Vec::new();
    for n in 0..args.workflows.max(1) {
        let tenants = tenants.clone();
        let mut rng = StdRng::seed_from_u64(seed.wrapping_add(n as u64 + 1));
        let tasks = args.tasks_per_workflow.max(1);
        drivers.push(tokio::spawn(async move {
            loop {
                let sim = tenants.pick(&mut rng);
                if sim.shutdown.is_cancelled() {
                    break;
                }
                run_workflow(&sim, &mut rng, tasks).await;
            }
        }));
    }
    drivers.push(tokio::spawn(agent_churn(
        tenants.clone(),
        StdRng::seed_from_u64(seed ^ 0x5eed),
    )));
    for driver in drivers {
        if let Err(error) = driver.await {
            tracing::error!(%error, "a simulator driver panicked");
        }
    }
    shutdown.cancel();
    let _ = reporter.await;
    let errors = stats.errors.load(Ordering::Relaxed);
    if errors > 0 {
        anyhow::bail!("{errors} command(s) failed with infrastructure errors (see the log)");
    }
    Ok(())
}

/// The tenants' names: `prefix` alone for one, else `prefix-01`, ….
fn tenant_names(prefix: &str, count: usize) -> Vec<String> {
    match count {
        0 | 1 => vec![prefix.to_owned()],
        n => {
            let width = n.to_string().len().max(2);
            (1..=n).map(|k| format!("{prefix}-{k:0width$}")).collect()
        }
    }
}

/// The simulated tenants and their skewed shares of the work.
#[derive(Clone)]
struct Tenants {
    sims: Arc<[Arc<Sim>]>,
    /// Tenant k's share is 1/k (Zipf, exponent 1).
    weights: Arc<[f64]>,
}

impl Tenants {
    fn new(sims: Vec<Arc<Sim>>) -> Self {
        let weights = (1..=sims.len()).map(|k| 1.0 / k as f64).collect();
        Self {
            sims: sims.into(),
            weights,
        }
    }

    /// A tenant, by share.
    fn pick(&self, rng: &mut StdRng) -> Arc<Sim> {
        let total: f64 = self.weights.iter().sum();
        let mut at = rng.gen_range(0.0..total);
        for (sim, weight) in self.sims.iter().zip(self.weights.iter()) {
            if at < *weight {
                return sim.clone();
            }
            at -= weight;
        }
        self.sims[self.sims.len() - 1].clone()
    }
}

async fn register_agents(sim: &Sim, rng: &mut StdRng, count: usize) {
    let correlation = Uuid::new_v4();
    for n in 0..count {
        let id = AgentId::from_uuid(Uuid::new_v4());
        let how_many = rng.gen_range(2..=4);
        let mut capabilities: Vec<String> = CAPABILITIES
            .choose_multiple(rng, how_many)
            .map(|c| (*c).to_owned())
            .collect();
        capabilities.sort();
        let parent = if n > 2 && rng.gen_bool(0.3) {
            sim.agents().choose(rng).map(|a| a.id)
        } else {
            None
        };
        let kind = if rng.gen_bool(0.8) {
            AgentKind::Llm
        } else {
            AgentKind::Tool
        };
        let command = AgentCommand::RegisterAgent {
            agent_id: id,
            name: format!("agent-{n:03}"),
            kind,
            model: (kind == AgentKind::Llm)
                .then(|| MODELS.choose(rng).copied().unwrap_or("gpt-4o").to_owned()),
            capabilities: capabilities.clone(),
            parent_agent_id: parent,
        };
        if sim.send(command, correlation).await.is_ok() {
            sim.agents().push(SimAgent {
                id,
                capabilities: capabilities.into_iter().collect(),
                mode: AgentMode::Active,
                down: None,
            });
        }
        if sim.shutdown.is_cancelled() {
            return;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SimTaskState {
    Pending,
    Completed,
    Dead,
}

struct SimTask {
    id: TaskId,
    deps: Vec<usize>,
    capabilities: BTreeSet<String>,
    state: SimTaskState,
    attempt: u32,
    /// Its `TaskCompleted` event: what causes the start of the tasks that
    /// wait for it.
    completed: Option<Uuid>,
    /// The last event of its own: what causes its next command.
    last: Option<Uuid>,
}

const MAX_ATTEMPTS: u32 = 3;

/// Indexes of the pending tasks whose dependencies' states satisfy `deps`.
fn pending_where(tasks: &[SimTask], deps: impl Fn(&[SimTaskState]) -> bool) -> Vec<usize> {
    (0..tasks.len())
        .filter(|&i| {
            let states: Vec<SimTaskState> = tasks[i].deps.iter().map(|&d| tasks[d].state).collect();
            tasks[i].state == SimTaskState::Pending && deps(&states)
        })
        .collect()
}

async fn run_workflow(sim: &Sim, rng: &mut StdRng, task_count: usize) {
    let workflow = WorkflowId::from_uuid(Uuid::new_v4());
    let correlation = Uuid::new_v4();
    let start = WorkflowCommand::StartWorkflow {
        workflow_id: workflow,
        name: format!("workflow-{}", &workflow.to_string()[..8]),
        metadata: json!({"source": "simulate", "tasks": task_count}),
    };
    if sim.send(start, correlation).await.is_err() {
        return;
    }

    let mut tasks: Vec<SimTask> = Vec::with_capacity(task_count);
    for i in 0..task_count {
        let deps: Vec<usize> = if i == 0 {
            Vec::new()
        } else {
            let how_many = rng.gen_range(0..=i.min(2));
            (0..i)
                .collect::<Vec<_>>()
                .choose_multiple(rng, how_many)
                .copied()
                .collect()
        };
        let capabilities: BTreeSet<String> = {
            let agents = sim.agents();
            agents
                .choose(rng)
                .map(|a| {
                    let caps: Vec<&String> = a.capabilities.iter().collect();
                    let how_many = rng.gen_range(0..=2);
                    caps.choose_multiple(rng, how_many)
                        .map(|c| (*c).clone())
                        .collect()
                })
                .unwrap_or_default()
        };
        let id = TaskId::from_uuid(Uuid::new_v4());
        let create = TaskCommand::CreateTask {
            task_id: id,
            workflow_id: workflow,
            title: format!("step {i} of {}", &workflow.to_string()[..8]),
            input: json!({"step": i, "prompt": "lorem ipsum dolor sit amet"}),
            required_capabilities: capabilities.iter().cloned().collect(),
            depends_on: deps.iter().map(|d| tasks[*d].id).collect(),
            priority: rng.gen_range(0..=100),
            max_attempts: MAX_ATTEMPTS,
        };
        let ok = sim.send(create, correlation).await.is_ok();
        tasks.push(SimTask {
            id,
            deps,
            capabilities,
            state: if ok {
                SimTaskState::Pending
            } else {
                SimTaskState::Dead
            },
            attempt: 1,
            completed: None,
            last: None,
        });
        if sim.shutdown.is_cancelled() {
            return;
        }
    }

    // A small share of workflows is abandoned half-way.
    let cancel_at = rng.gen_bool(0.05).then(|| rng.gen_range(0..task_count));
    let mut finished = 0;
    while !sim.shutdown.is_cancelled() {
        let ready = pending_where(&tasks, |deps| {
            deps.iter().all(|&d| d == SimTaskState::Completed)
        });
        let blocked_forever = pending_where(&tasks, |deps| deps.contains(&SimTaskState::Dead));
        for i in blocked_forever {
            let cancel = TaskCommand::CancelTask {
                task_id: tasks[i].id,
                reason: "a dependency failed for good".to_owned(),
            };
            let _ = sim.send(cancel, correlation).await;
            tasks[i].state = SimTaskState::Dead;
        }
        if tasks.iter().all(|t| t.state != SimTaskState::Pending) {
            break;
        }
        if ready.is_empty() {
            // Waiting for a capable agent to be resumed.
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        if rng.gen_bool(0.02) {
            // An eager client tries to start a task too early: refused.
            if let Some(waiting) = tasks
                .iter()
                .find(|t| t.state == SimTaskState::Pending && !t.deps.is_empty())
            {
                let _ = sim
                    .send(
                        TaskCommand::StartTask {
                            task_id: waiting.id,
                        },
                        correlation,
                    )
                    .await;
            }
        }
        let mut progressed = false;
        for i in ready {
            // A task whose dependencies completed is started because the
            // last of them did.
            let cause = tasks[i]
                .deps
                .iter()
                .filter_map(|&d| tasks[d].completed)
                .next_back();
            progressed |= run_task(sim, rng, &mut tasks[i], correlation, cause).await;
            finished += 1;
            if Some(finished) == cancel_at {
                let cancel = WorkflowCommand::CancelWorkflow {
                    workflow_id: workflow,
                    reason: "cancelled by the operator".to_owned(),
                };
                let _ = sim.send(cancel, correlation).await;
                for task in tasks.iter().filter(|t| t.state == SimTaskState::Pending) {
                    let cancel = TaskCommand::CancelTask {
                        task_id: task.id,
                        reason: "workflow cancelled".to_owned(),
                    };
                    let _ = sim.send(cancel, correlation).await;
                }
                sim.stats.workflows_done.fetch_add(1, Ordering::Relaxed);
                return;
            }
            if sim.shutdown.is_cancelled() {
                return;
            }
        }
        if !progressed {
            // No capable agent is active right now: wait for one to resume.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    if sim.shutdown.is_cancelled() {
        return;
    }
    let end: Command = if tasks.iter().all(|t| t.state == SimTaskState::Completed) {
        WorkflowCommand::CompleteWorkflow {
            workflow_id: workflow,
        }
        .into()
    } else {
        WorkflowCommand::FailWorkflow {
            workflow_id: workflow,
            reason: "some tasks failed for good".to_owned(),
        }
        .into()
    };
    let _ = sim.send(end, correlation).await;
    sim.stats.workflows_done.fetch_add(1, Ordering::Relaxed);
}

/// Takes one ready task through assign → start → progress → complete/fail.
/// Returns whether it got as far as an assignment.
async fn run_task(
    sim: &Sim,
    rng: &mut StdRng,
    task: &mut SimTask,
    correlation: Uuid,
    cause: Option<Uuid>,
) -> bool {
    let Some(agent) = sim.pick_agent(rng, &task.capabilities, None) else {
        // An orchestrator does not wait on the churn to bring a capable
        // agent back (for a small tenant that can take minutes): it resumes
        // one itself.
        sim.resume_capable(rng, &task.capabilities, correlation)
            .await;
        return false;
    };
    let id = task.id;
    let assign = TaskCommand::AssignTask {
        task_id: id,
        agent_id: agent,
    };
    if let Err(error) = step(sim, task, assign, correlation, cause).await {
        if matches!(error, CommandError::Domain(_)) {
            // The agent was paused meanwhile (or our view of it is stale):
            // stop picking it until it is resumed.
            set_mode(sim, agent, AgentMode::Paused);
        }
        return false; // try again next round
    }
    let mut holder = agent;
    let mut started = step(
        sim,
        task,
        TaskCommand::StartTask { task_id: id },
        correlation,
        None,
    )
    .await
    .is_ok();
    // The assignee may have been paused meanwhile: hand the task to another
    // capable agent and try again, a few times.
    for _ in 0..3 {
        if started {
            break;
        }
        let Some(to) = sim.pick_agent(rng, &task.capabilities, Some(holder)) else {
            break;
        };
        let delegate = TaskCommand::DelegateTask {
            task_id: id,
            from_agent_id: holder,
            to_agent_id: to,
        };
        // Handed over because the holder went down.
        let down = sim.down_event(holder);
        if step(sim, task, delegate, correlation, down).await.is_ok() {
            holder = to;
        }
        started = step(
            sim,
            task,
            TaskCommand::StartTask { task_id: id },
            correlation,
            None,
        )
        .await
        .is_ok();
    }
    if !started {
        // Give up on this attempt: fail it (retryable) so it can go back to pending.
        let fail = TaskCommand::FailTask {
            task_id: id,
            error: "no available agent could start it".to_owned(),
            retryable: true,
        };
        if step(sim, task, fail, correlation, None).await.is_ok() && task.attempt < MAX_ATTEMPTS {
            retry(sim, task, correlation).await;
        } else {
            task.state = SimTaskState::Dead;
        }
        return true;
    }
    let agent = holder;
    if rng.gen_bool(0.1) {
        if let Some(to) = sim.pick_agent(rng, &task.capabilities, Some(agent)) {
            let delegate = TaskCommand::DelegateTask {
                task_id: id,
                from_agent_id: agent,
                to_agent_id: to,
            };
            let _ = step(sim, task, delegate, correlation, None).await;
        }
    }
    let mut percent = 0u8;
    for _ in 0..rng.gen_range(1..=3) {
        percent = percent.saturating_add(rng.gen_range(10..=30)).min(99);
        let progress = TaskCommand::ReportTaskProgress {
            task_id: id,
            percent,
            note: Some(format!("{percent}% done")),
        };
        let _ = step(sim, task, progress, correlation, None).await;
    }
    if rng.gen_bool(0.85) {
        let complete = TaskCommand::CompleteTask {
            task_id: id,
            output: json!({"result": "ok", "tokens": rng.gen_range(100..5000)}),
        };
        if step(sim, task, complete, correlation, None).await.is_ok() {
            task.state = SimTaskState::Completed;
            task.completed = task.last;
        }
        return true;
    }
    let retryable = rng.gen_bool(0.8);
    let fail = TaskCommand::FailTask {
        task_id: id,
        error: if retryable {
            "rate limited by the model provider"
        } else {
            "tool returned invalid output"
        }
        .to_owned(),
        retryable,
    };
    if step(sim, task, fail, correlation, None).await.is_err() {
        return true;
    }
    if retryable && task.attempt < MAX_ATTEMPTS {
        retry(sim, task, correlation).await;
    } else {
        task.state = SimTaskState::Dead;
    }
    true
}

/// Puts a failed `task` back to pending for another attempt.
async fn retry(sim: &Sim, task: &mut SimTask, correlation: Uuid) {
    let command = TaskCommand::RetryTask { task_id: task.id };
    if step(sim, task, command, correlation, None).await.is_ok() {
        task.attempt += 1;
    }
}

/// Sends `command` for `task` as an orchestrator would: caused by `cause`
/// when given, else by the task's last event; remembers the command's last
/// event as the task's.
async fn step(
    sim: &Sim,
    task: &mut SimTask,
    command: impl Into<Command>,
    correlation: Uuid,
    cause: Option<Uuid>,
) -> Result<CommandOutcome, CommandError> {
    let result = sim
        .send_caused(command, correlation, cause.or(task.last))
        .await;
    if let Some(event) = result.as_ref().ok().and_then(|o| o.events.last()) {
        task.last = Some(event.event_id);
    }
    result
}

/// Pauses and resumes random agents, and now and then fails and recovers one.
async fn agent_churn(tenants: Tenants, mut rng: StdRng) {
    let correlation = Uuid::new_v4();
    loop {
        let sim = tenants.pick(&mut rng);
        tokio::select! {
            () = sim.shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(rng.gen_range(300..1500))) => {}
        }
        let picked = {
            let agents = sim.agents();
            agents.choose(&mut rng).map(|a| (a.id, a.mode))
        };
        let Some((id, mode)) = picked else { continue };
        let (command, next): (AgentCommand, AgentMode) = match mode {
            AgentMode::Active if rng.gen_bool(0.2) => (
                AgentCommand::FailAgent {
                    agent_id: id,
                    reason: "process crashed".to_owned(),
                },
                AgentMode::Paused,
            ),
            AgentMode::Active => (
                AgentCommand::PauseAgent {
                    agent_id: id,
                    reason: Some("maintenance".to_owned()),
                },
                AgentMode::Paused,
            ),
            AgentMode::Paused => (
                AgentCommand::ResumeAgent { agent_id: id },
                AgentMode::Active,
            ),
        };
        // Mark paused before sending so drivers stop picking it; mark active after.
        if next == AgentMode::Paused {
            set_mode(&sim, id, next);
        }
        let sent = sim.send(command, correlation).await;
        if next == AgentMode::Paused {
            // What a delegation away from it will name as its cause.
            let down = sent
                .as_ref()
                .ok()
                .and_then(|o| o.events.last())
                .map(|e| e.event_id);
            if let Some(agent) = sim.agents().iter_mut().find(|a| a.id == id) {
                agent.down = down;
            }
        }
        if next == AgentMode::Active && sent.is_ok() {
            set_mode(&sim, id, next);
        }
    }
}

fn set_mode(sim: &Sim, id: AgentId, mode: AgentMode) {
    if let Some(agent) = sim.agents().iter_mut().find(|a| a.id == id) {
        agent.mode = mode;
    }
}

/// Prints the progress line once a second, and a summary at the end.
async fn report(sim: Arc<Sim>) {
    let started = Instant::now();
    let mut last_events = 0;
    let mut last = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    loop {
        let done = tokio::select! {
            () = sim.shutdown.cancelled() => true,
            _ = ticker.tick() => false,
        };
        let s = &sim.stats;
        let events = s.events.load(Ordering::Relaxed);
        let rate = (events - last_events) as f64 / last.elapsed().as_secs_f64().max(1e-3);
        last_events = events;
        last = Instant::now();
        println!(
            "simulate {:>5.0}s | events {events} ({rate:.0}/s) | commands {} | conflicts {} | refusals {} | errors {} | workflows done {}",
            started.elapsed().as_secs_f64(),
            s.commands.load(Ordering::Relaxed),
            s.conflicts.load(Ordering::Relaxed),
            s.refusals.load(Ordering::Relaxed),
            s.errors.load(Ordering::Relaxed),
            s.workflows_done.load(Ordering::Relaxed),
        );
        if done {
            return;
        }
    }
}
