//! `neurectomy-bench api`: the GraphQL API's throughput, latency and memory,
//! measured in one run against a real `neurectomy serve` process.
//!
//! - **Set-up.** A scratch database, JetStream stream, Redis prefix and
//!   graph database are created; this process runs the relay and the Redis
//!   projector on them, registers `--agents` agents through the command
//!   handler and waits until Redis has them. The API is the `neurectomy`
//!   binary (`--neurectomy`; by default the one next to this executable),
//!   spawned as `neurectomy serve` on a free port with those scratch
//!   resources, so that its memory can be read from `/proc/<pid>/status`.
//! - **Idle RSS.** After start-up, a few warm requests and ~2 s of quiet.
//! - **HTTP.** `wrk --latency` (same connections, threads and duration)
//!   against `GET /healthz` (the trivial endpoint: the server's ceiling on
//!   this machine) and against `POST /graphql` with `agent(id)` (one Redis
//!   read), the body and bearer token set by a Lua script. The query's rate
//!   is reported as a share of `/healthz`'s, measured in the same run; the
//!   API's RSS is sampled every 50 ms during the runs.
//! - **WebSockets.** `--subscribers` connections speak `graphql-transport-ws`
//!   and each subscribes to [`SUBSCRIPTION`] on one agent; once they are all
//!   in, the API's RSS is read, one `pauseAgent` mutation changes that agent,
//!   and the time from the mutation's response to each connection's `next`
//!   message is recorded. If the server refuses the subscription (the field
//!   does not exist yet, say), the figures read "not available" and the
//!   reason is shown.
//!
//! wrk and the WebSocket clients run on the same machine as the API, so the
//! figures include their share of the CPU; compare them as ratios within one
//! run. Everything the run creates (the API process, databases, stream,
//! Redis keys, graph database, the Lua script) is removed at the end, also
//! when a step fails.

//!
//! ## Layout
//!
//! - this module: the run, its scratch resources, the set-up (relay, Redis
//!   projector, agents, the API process) and the report.
//! - `http`: a one-shot HTTP client; wrk, its runs and its output;
//!   `/healthz`, `{ __typename }` and `agent(id)` under wrk; the document
//!   bombs.
//! - `ws`: the `graphql-transport-ws` subscribers and the timing of one
//!   change's delivery to all of them.
//! - `process`: what `/proc` says about the API process (memory, CPU
//!   time) and this one (open-files limit, load average), and how much of
//!   the link order the binary has.

mod http;
mod process;
mod ws;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use api::auth::{Authenticator, Role};
use api::settings::Settings;
use commands::{CommandContext, CommandHandler, EventStore, Relay};
use domain::{AgentCommand, AgentId, AgentKind};
use futures::StreamExt as _;
use projections::{Projector, ProjectorConfig, ProjectorState, ReadModel as _};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::cli::BenchApiArgs;
use crate::scratch;
use http::{bomb_scenario, check_wrk, http, http_scenarios};
use process::{link_order, memory, mib, raise_fd_limit};
use ws::ws_scenario;

/// The query of the HTTP scenario: one agent, read from Redis.
pub const AGENT_QUERY: &str = "query($id: ID!){ agent(id: $id) { id name status capabilities } }";

/// The cheapest authenticated GraphQL request (no read model): context for
/// where `agent(id)`'s time goes.
pub const TYPENAME_QUERY: &str = "{ __typename }";

/// The subscription every WebSocket holds (one agent's changes).
pub const SUBSCRIPTION: &str =
    "subscription($id: ID!){ agentUpdated(id: $id) { position agent { id status } } }";

/// The field of [`SUBSCRIPTION`] whose `position` a `next` message carries.
pub const SUBSCRIPTION_FIELD: &str = "agentUpdated";

/// The state change delivered to every subscriber.
pub const PAUSE: &str = "mutation($id: ID!){ pauseAgent(agentId: $id) { position } }";

/// Targets (from the issue).
const RATIO_TARGET: f64 = 0.40;

const QUERY_P99_TARGET_MS: f64 = 5.0;

const IDLE_RSS_TARGET_MIB: f64 = 12.0;

const LOAD_RSS_TARGET_MIB: f64 = 45.0;

const WS_RSS_TARGET_MIB: f64 = 160.0;

const WS_P99_TARGET_MS: f64 = 100.0;

/// The tenant of every agent and token of the run.
const TENANT: &str = "bench";

/// How long the API has to answer `/healthz` after it was spawned.
const START_LIMIT: Duration = Duration::from_secs(30);

/// How long the API sits idle before its idle RSS is read.
const SETTLE: Duration = Duration::from_secs(2);

/// File descriptors beyond the subscriptions (wrk, pools, clients).
const FD_HEADROOM: u64 = 256;

/// What a figure's target says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Within its target.
    Met,
    /// Outside its target.
    Missed,
    /// Could not be measured (the reason is in the detail).
    NotAvailable,
    /// No target: context for the others.
    Info,
}

impl Verdict {
    fn of(met: bool) -> Self {
        if met {
            Self::Met
        } else {
            Self::Missed
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Met => "met",
            Self::Missed => "MISSED",
            Self::NotAvailable => "not available",
            Self::Info => "—",
        }
    }
}

/// One figure of the run.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// What was measured.
    pub scenario: String,
    /// The figure (`None`: not available).
    pub value: Option<f64>,
    /// Its unit.
    pub unit: &'static str,
    /// The target, in words.
    pub target: String,
    /// Whether the figure meets it.
    pub verdict: Verdict,
    /// Percentiles, counts, breakdowns, or why it is not available.
    pub detail: String,
}

impl Row {
    fn new(scenario: &str, value: f64, unit: &'static str) -> Self {
        Self {
            scenario: scenario.to_owned(),
            value: Some(value),
            unit,
            target: "—".to_owned(),
            verdict: Verdict::Info,
            detail: String::new(),
        }
    }

    fn target(mut self, target: String, met: bool) -> Self {
        self.target = target;
        self.verdict = Verdict::of(met);
        self
    }

    fn detail(mut self, detail: String) -> Self {
        self.detail = detail;
        self
    }

    fn not_available(scenario: &str, target: String, why: String) -> Self {
        Self {
            scenario: scenario.to_owned(),
            value: None,
            unit: "",
            target,
            verdict: Verdict::NotAvailable,
            detail: why,
        }
    }
}

/// The run: where and under which load it ran, and its figures.
#[derive(Debug, Serialize)]
struct Report {
    cores: usize,
    load_before: String,
    load_after: String,
    wrk: String,
    rows: Vec<Row>,
}

/// Runs the benchmark, prints its table and writes `--json`.
pub async fn run(settings: &Settings, args: &BenchApiArgs) -> anyhow::Result<()> {
    let load_before = process::load_average();
    let mut scratch = Scratch::new();
    let mut rows = Vec::new();
    let result = scenarios(settings, args, &mut scratch, &mut rows).await;
    eprintln!(
        "stopping the API process; removing the scratch database, stream, Redis keys and graph database…"
    );
    scratch.cleanup().await;
    let report = Report {
        cores: std::thread::available_parallelism().map_or(0, usize::from),
        load_before,
        load_after: process::load_average(),
        wrk: format!(
            "-t{} -c{} -d{}s, {} run(s)",
            args.wrk_threads.max(1),
            args.connections.max(1),
            args.seconds.max(1),
            args.runs.max(1)
        ),
        rows,
    };
    print(&report);
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    result
}

fn print(report: &Report) {
    println!(
        "\n{} cores; load average {} before, {} after; wrk {}",
        report.cores, report.load_before, report.load_after, report.wrk
    );
    println!(
        "\n{:<52} {:>16} {:<26} {:<13} detail",
        "scenario", "measured", "target", "verdict"
    );
    for row in &report.rows {
        let measured = match row.value {
            Some(v) if row.unit == "%" || v >= 100.0 => format!("{v:.0} {}", row.unit),
            Some(v) => format!("{v:.2} {}", row.unit),
            None => "n/a".to_owned(),
        };
        println!(
            "{:<52} {:>16} {:<26} {:<13} {}",
            row.scenario,
            measured,
            row.target,
            row.verdict.label(),
            row.detail
        );
    }
}

fn wants(args: &BenchApiArgs, part: &str) -> bool {
    args.only.as_deref().is_none_or(|only| part.contains(only))
}

/// Everything a run creates, removed by [`Scratch::cleanup`].
struct Scratch {
    /// The database, stream, Redis prefix and graph database.
    fixtures: scratch::Fixtures,
    /// The Lua script given to wrk (it holds a token).
    files: Vec<PathBuf>,
    /// The API process (stopped with SIGTERM; killed if dropped).
    server: Option<tokio::process::Child>,
    /// Cancels every task spawned by the run (relay, projector, clients).
    stop: CancellationToken,
    /// The relay and projector tasks.
    tasks: Vec<JoinHandle<()>>,
}

impl Scratch {
    fn new() -> Self {
        Self {
            fixtures: scratch::Fixtures::default(),
            files: Vec::new(),
            server: None,
            stop: CancellationToken::new(),
            tasks: Vec::new(),
        }
    }

    /// Removes everything, best effort, reporting what could not be removed.
    async fn cleanup(mut self) {
        if let Some(mut server) = self.server.take() {
            // A graceful stop first (a profiler wrapped around it writes its
            // report on exit), then SIGKILL.
            let terminated = match server.id() {
                Some(pid) => tokio::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status()
                    .await
                    .is_ok_and(|s| s.success()),
                None => false,
            };
            let stopped = terminated
                && tokio::time::timeout(Duration::from_secs(20), server.wait())
                    .await
                    .is_ok();
            if !stopped {
                if let Err(error) = server.start_kill() {
                    tracing::warn!(%error, "could not kill the API process");
                }
                if tokio::time::timeout(Duration::from_secs(10), server.wait())
                    .await
                    .is_err()
                {
                    tracing::warn!("the API process did not exit within 10 s of SIGKILL");
                }
            }
        }
        self.stop.cancel();
        for task in self.tasks {
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        for file in &self.files {
            if let Err(error) = std::fs::remove_file(file) {
                tracing::warn!(%error, file = %file.display(), "could not remove a scratch file");
            }
        }
        scratch::remove(self.fixtures).await;
    }
}

/// The API process and what a client needs to talk to it.
struct Api {
    addr: SocketAddr,
    pid: u32,
    token: String,
}

async fn scenarios(
    settings: &Settings,
    args: &BenchApiArgs,
    scratch: &mut Scratch,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let want_http = wants(args, "http");
    let want_ws = wants(args, "ws") && args.subscribers > 0;
    if want_http {
        check_wrk().await?;
    }
    if want_ws {
        raise_fd_limit(args.subscribers as u64 + FD_HEADROOM).await;
    }
    let neurectomy = neurectomy_binary(args)?;
    let (api, agents) = set_up(settings, args, &neurectomy, scratch).await?;
    let first = agents
        .first()
        .context("no agent was registered (--agents 0?)")?
        .to_string();

    // Idle: start-up done, a few warm requests, then quiet.
    let body = query_body(&first);
    for _ in 0..20 {
        http(api.addr, "GET", "/healthz", None, None).await?;
        let (status, answer) = http(api.addr, "POST", "/graphql", Some(&api.token), Some(&body))
            .await
            .context("warming up with agent(id)")?;
        check_agent(status, &answer, &first)?;
    }
    // A deliberate quiet period (not a wait for an effect): allocator
    // caches and lazily started tasks settle before the idle figure.
    tokio::time::sleep(SETTLE).await;
    let idle = memory(api.pid)?;
    rows.push(
        Row::new(
            "API RSS idle (after start-up, 40 requests)",
            mib(idle.rss_kib),
            "MiB",
        )
        .target(
            format!("≤ {IDLE_RSS_TARGET_MIB:.0} MiB"),
            mib(idle.rss_kib) <= IDLE_RSS_TARGET_MIB,
        )
        .detail(match link_order(&neurectomy) {
            Some(order) => format!("{}; {order}", idle.describe()),
            None => idle.describe(),
        }),
    );

    if want_http {
        http_scenarios(args, scratch, &api, &first, rows).await?;
    }
    if wants(args, "bombs") {
        check_wrk().await?;
        bomb_scenario(args, scratch, &api, rows).await?;
    }
    if want_ws {
        // A second agent, untouched by the HTTP part, so its only change is ours.
        let agent = agents.get(1).map_or_else(|| first.clone(), Uuid::to_string);
        ws_scenario(args, scratch, &api, &agent, rows).await;
    }
    Ok(())
}

/// The `neurectomy` binary to spawn: `--neurectomy`, or the `neurectomy`
/// next to this executable (where cargo builds both).
fn neurectomy_binary(args: &BenchApiArgs) -> anyhow::Result<PathBuf> {
    if let Some(path) = &args.neurectomy {
        return Ok(path.clone());
    }
    let exe = std::env::current_exe().context("finding this executable")?;
    let path = exe.with_file_name(format!("neurectomy{}", std::env::consts::EXE_SUFFIX));
    anyhow::ensure!(
        path.is_file(),
        "no neurectomy binary next to this one, at {}: build it (cargo build -p neurectomy-api, with the same profile) or name one with --neurectomy <path>",
        path.display()
    );
    Ok(path)
}

/// Creates the scratch resources, runs the relay and the Redis projector,
/// registers the agents and starts `neurectomy serve` from `neurectomy`.
async fn set_up(
    settings: &Settings,
    args: &BenchApiArgs,
    neurectomy: &Path,
    scratch: &mut Scratch,
) -> anyhow::Result<(Api, Vec<Uuid>)> {
    let database = scratch::database(settings, 8).await?;
    let store = EventStore::new(database.pool.clone());
    let database_url = database.url.clone();
    scratch.fixtures.databases.push(database);

    let nats = scratch::nats(settings).await?;
    let relay_config = scratch::relay_config(settings, &nats);
    let client = nats.client.clone();
    scratch.fixtures.streams.push(nats);
    let relay = Relay::new(store.clone(), client.clone(), relay_config.clone());
    relay
        .ensure_stream()
        .await
        .context("creating the scratch JetStream stream")?;

    let (live, prefix) = scratch::redis(settings).await?;
    let prefix_name = prefix.prefix.clone();
    scratch.fixtures.prefixes.push(prefix);

    // The API connects to the graph at start-up: it needs a database too.
    let graph = scratch::graph_database(settings).await?;
    let graph_name = graph.database.clone();
    let graph_http = graph.http.clone();
    scratch.fixtures.graphs.push(graph);

    // The write path of the API's mutations: relay → JetStream → Redis
    // projector (whose change feed also feeds the subscriptions).
    let stop = scratch.stop.clone();
    scratch.tasks.push(tokio::spawn({
        let stop = stop.clone();
        async move { relay.run(stop).await }
    }));
    let projector = Projector::new(
        live.clone(),
        store.clone(),
        client,
        ProjectorConfig {
            stream_name: relay_config.stream_name.clone(),
            ..settings.projector_config()
        },
    );
    let mut status = projector.status();
    scratch.tasks.push(tokio::spawn(async move {
        if let Err(error) = projector.run(stop).await {
            tracing::error!("{error}");
        }
    }));

    eprintln!("registering {} agents…", args.agents);
    let agents = register_agents(&store, settings, args.agents).await?;
    let head = store.head().await.context("reading the head of the log")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = status.borrow_and_update().clone();
        anyhow::ensure!(
            s.state != ProjectorState::Stopped,
            "the Redis projection stopped: {}",
            s.last_error.unwrap_or_default()
        );
        if s.checkpoint >= head.readable && s.state == ProjectorState::Live {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "Redis did not reach position {} within 60 s (at {})",
            head.readable,
            s.checkpoint
        );
        let _ = tokio::time::timeout(Duration::from_millis(100), status.changed()).await;
    }
    let checkpoint = live
        .checkpoint()
        .await
        .context("reading Redis's checkpoint")?;
    eprintln!("Redis has the agents (checkpoint {checkpoint}); starting the API process…");

    let secret = format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple());
    let token = Authenticator::new(Some(&secret), None)
        .context("building the token minter")?
        .mint("bench", TENANT, &[Role::Operator], 24 * 3600)
        .map_err(|e| anyhow::anyhow!("minting a token: {e}"))?;
    let addr = free_port()?;
    let mut command = match &args.callgrind {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let mut valgrind = tokio::process::Command::new("valgrind");
            valgrind
                .arg("--tool=callgrind")
                .arg(format!(
                    "--callgrind-out-file={}/callgrind.out.%p",
                    std::path::absolute(dir)?.display()
                ))
                .arg(neurectomy);
            valgrind
        }
        None => tokio::process::Command::new(neurectomy),
    };
    command
        .arg("serve")
        .env("NEURECTOMY_API_LISTEN", addr.to_string())
        .env("NEURECTOMY_JWT_SECRET", &secret)
        .env_remove("NEURECTOMY_JWT_PUBLIC_KEY")
        .env("NEURECTOMY_DATABASE_URL", &database_url)
        .env(
            "NEURECTOMY_DATABASE_POOL_SIZE",
            args.server_pool
                .unwrap_or(settings.database_pool_size)
                .to_string(),
        )
        .env("NEURECTOMY_NATS_URL", &settings.nats_url)
        .env("NEURECTOMY_JETSTREAM_STREAM", &relay_config.stream_name)
        .env("NEURECTOMY_SUBJECT_PREFIX", &relay_config.subject_prefix)
        .env("NEURECTOMY_STATE_CACHE", settings.state_cache.to_string())
        .env("NEURECTOMY_REDIS_URL", &settings.redis_url)
        .env("NEURECTOMY_REDIS_PREFIX", &prefix_name)
        .env("NEURECTOMY_GRAPH_URI", &settings.graph_uri)
        .env("NEURECTOMY_GRAPH_USER", &settings.graph_user)
        .env(
            "NEURECTOMY_GRAPH_PASSWORD",
            settings.graph_password.expose(),
        )
        .env("NEURECTOMY_GRAPH_DATABASE", &graph_name)
        .env("NEURECTOMY_GRAPH_HTTP", &graph_http)
        .env(
            "NEURECTOMY_API_SUBSCRIBER_BUFFER",
            settings.api.api_subscriber_buffer.to_string(),
        )
        .env("NEURECTOMY_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    if let Some(workers) = args.server_workers {
        command.env("TOKIO_WORKER_THREADS", workers.max(1).to_string());
    }
    let child = command
        .spawn()
        .with_context(|| format!("spawning {} serve", neurectomy.display()))?;
    let pid = child.id().context("the API process has no pid")?;
    scratch.server = Some(child);
    // Under callgrind, start-up is ~50× slower.
    let limit = START_LIMIT * if args.callgrind.is_some() { 10 } else { 1 };
    wait_ready(scratch, addr, limit).await?;
    eprintln!("API process {pid} listening on {addr}");
    Ok((Api { addr, pid, token }, agents))
}

/// Registers `count` agents (tenant [`TENANT`]) through the command handler.
async fn register_agents(
    store: &EventStore,
    settings: &Settings,
    count: usize,
) -> anyhow::Result<Vec<Uuid>> {
    let handler = CommandHandler::new(store.clone(), settings.handler_config());
    let ids: Vec<Uuid> = (0..count.max(2)).map(|_| Uuid::new_v4()).collect();
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(ids.iter().copied().enumerate())
        .map(|(n, id)| {
            let handler = handler.clone();
            async move {
                let command = AgentCommand::RegisterAgent {
                    agent_id: AgentId::from_uuid(id),
                    name: format!("bench-agent-{n}"),
                    kind: AgentKind::Llm,
                    model: Some("bench-model".to_owned()),
                    capabilities: vec!["code".into(), "review".into(), "bench".into()],
                    parent_agent_id: None,
                };
                let ctx = CommandContext::new(Uuid::new_v4(), "bench", TENANT);
                handler
                    .execute(command.into(), &ctx)
                    .await
                    .with_context(|| format!("registering agent {id}"))?;
                Ok(())
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    results.into_iter().collect::<anyhow::Result<()>>()?;
    Ok(ids)
}

/// A free local port (bound and released: another process could take it in
/// between, in which case the API fails to start and says so).
fn free_port() -> anyhow::Result<SocketAddr> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("finding a free local port")?;
    listener.local_addr().context("reading the free port")
}

/// Waits until the API answers `/healthz`, or fails if it exits first.
async fn wait_ready(
    scratch: &mut Scratch,
    addr: SocketAddr,
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(server) = scratch.server.as_mut() {
            if let Some(status) = server.try_wait().context("checking on the API process")? {
                anyhow::bail!("the API process exited at start-up ({status}); its log is above");
            }
        }
        if let Ok((200, _)) = http(addr, "GET", "/healthz", None, None).await {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the API did not answer /healthz on {addr} within {} s",
            limit.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The JSON body of the `agent(id)` request.
fn query_body(agent: &str) -> String {
    json!({"query": AGENT_QUERY, "variables": {"id": agent}}).to_string()
}

/// Fails unless the answer to `agent(id)` is that agent.
fn check_agent(status: u16, answer: &str, agent: &str) -> anyhow::Result<()> {
    let value: Value = serde_json::from_str(answer)
        .with_context(|| format!("agent(id) answered HTTP {status} with non-JSON: {answer}"))?;
    let found = value.pointer("/data/agent/id").and_then(Value::as_str);
    anyhow::ensure!(
        status == 200 && found == Some(agent),
        "agent(id) did not return agent {agent} (HTTP {status}): {answer}"
    );
    Ok(())
}
