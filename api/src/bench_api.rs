//! `neurectomy bench api`: the GraphQL API's throughput, latency and memory,
//! measured in one run against a real `neurectomy serve` process.
//!
//! - **Set-up.** A scratch database, JetStream stream, Redis prefix and
//!   graph database are created; this process runs the relay and the Redis
//!   projector on them, registers `--agents` agents through the command
//!   handler and waits until Redis has them. The API is this very binary,
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

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use commands::{CommandContext, CommandHandler, EventStore, Relay, RelayConfig};
use domain::{AgentCommand, AgentId, AgentKind};
use futures::{SinkExt as _, StreamExt as _};
use hdrhistogram::Histogram;
use projections::graph::admin::server_command;
use projections::{Projector, ProjectorConfig, ProjectorState, ReadModel as _, RedisModel};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::auth::{Authenticator, Role};
use crate::bench::{histogram, ScratchDatabase};
use crate::settings::{BenchApiArgs, Settings};

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
/// How often the API's RSS is sampled under load.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);
/// How long subscribers get to receive the change.
const DELIVERY_LIMIT: Duration = Duration::from_secs(30);
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
    let load_before = load_average();
    let mut scratch = Scratch::new(settings).await?;
    let mut rows = Vec::new();
    let result = scenarios(settings, args, &mut scratch, &mut rows).await;
    eprintln!(
        "stopping the API process; removing the scratch database, stream, Redis keys and graph database…"
    );
    scratch.cleanup(settings).await;
    let report = Report {
        cores: std::thread::available_parallelism().map_or(0, usize::from),
        load_before,
        load_after: load_average(),
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
    nats: async_nats::Client,
    graph_http: String,
    database: Option<ScratchDatabase>,
    stream: Option<String>,
    prefix: Option<String>,
    graph: Option<String>,
    /// The Lua script given to wrk (it holds a token).
    files: Vec<PathBuf>,
    /// The API process (stopped with SIGTERM; killed if dropped).
    server: Option<tokio::process::Child>,
    /// Cancels every task spawned by the run (relay, projector, clients).
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Scratch {
    async fn new(settings: &Settings) -> anyhow::Result<Self> {
        Ok(Self {
            nats: crate::app::connect_nats(settings).await?,
            graph_http: settings.graph_http(),
            database: None,
            stream: None,
            prefix: None,
            graph: None,
            files: Vec::new(),
            server: None,
            stop: CancellationToken::new(),
            tasks: Vec::new(),
        })
    }

    /// Removes everything, best effort, reporting what could not be removed.
    async fn cleanup(mut self, settings: &Settings) {
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
        if let Some(database) = self.database {
            database.drop_database().await;
        }
        if let Some(stream) = &self.stream {
            crate::bench_project::delete_scratch_stream(&self.nats, stream).await;
        }
        if let Some(prefix) = &self.prefix {
            crate::bench_project::wipe_scratch_prefix(settings, prefix).await;
        }
        if let Some(database) = &self.graph {
            crate::bench_project::drop_scratch_graph(settings, &self.graph_http, database).await;
        }
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
    let (api, agents) = set_up(settings, args, scratch).await?;
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
        .detail({
            let exe = args
                .server_binary
                .clone()
                .or_else(|| std::env::current_exe().ok());
            match exe.as_deref().and_then(link_order) {
                Some(order) => format!("{}; {order}", idle.describe()),
                None => idle.describe(),
            }
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

/// Creates the scratch resources, runs the relay and the Redis projector,
/// registers the agents and starts the API process.
async fn set_up(
    settings: &Settings,
    args: &BenchApiArgs,
    scratch: &mut Scratch,
) -> anyhow::Result<(Api, Vec<Uuid>)> {
    let id = Uuid::new_v4().simple().to_string();
    let database = ScratchDatabase::create(settings, 8).await?;
    let store = EventStore::new(database.pool.clone());
    let database_name = database
        .pool
        .connect_options()
        .get_database()
        .map(str::to_owned)
        .context("the scratch database has no name")?;
    scratch.database = Some(database);
    let base = settings
        .database_url
        .rsplit_once('/')
        .map_or(settings.database_url.as_str(), |(base, _)| base);
    let database_url = format!("{base}/{database_name}");

    let relay_config = RelayConfig {
        stream_name: format!("BENCH_API_{id}"),
        subject_prefix: format!("benchapi{id}.events"),
        ..settings.relay_config()
    };
    scratch.stream = Some(relay_config.stream_name.clone());
    let relay = Relay::new(store.clone(), scratch.nats.clone(), relay_config.clone());
    relay
        .ensure_stream()
        .await
        .context("creating the scratch JetStream stream")?;

    let prefix = format!("{}bench:{id}:", settings.redis_prefix);
    scratch.prefix = Some(prefix.clone());
    let redis = RedisModel::connect(
        &settings.redis_url,
        projections::RedisModelConfig {
            prefix: prefix.clone(),
            ..settings.redis_config()
        },
    )
    .await
    .with_context(|| format!("connecting to Redis at {}", settings.redis_url))?;

    // The API connects to the graph at start-up: it needs a database too.
    let graph = format!("bench_{id}");
    let (status, body) = server_command(
        &scratch.graph_http,
        &settings.graph_user,
        settings.graph_password.expose(),
        &format!("create database {graph}"),
    )
    .await
    .map_err(anyhow::Error::msg)
    .context("creating a scratch graph database (set NEURECTOMY_GRAPH_HTTP to the HTTP API's host:port if it is not on port 2480)")?;
    anyhow::ensure!(
        status == 200,
        "the graph server at {} refused to create database {graph} (HTTP {status}: {body})",
        scratch.graph_http
    );
    scratch.graph = Some(graph.clone());

    // The write path of the API's mutations: relay → JetStream → Redis
    // projector (whose change feed also feeds the subscriptions).
    let stop = scratch.stop.clone();
    scratch.tasks.push(tokio::spawn({
        let stop = stop.clone();
        async move { relay.run(stop).await }
    }));
    let projector = Projector::new(
        redis.clone(),
        store.clone(),
        scratch.nats.clone(),
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
    let checkpoint = redis
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
    let exe = match &args.server_binary {
        Some(binary) => binary.clone(),
        None => std::env::current_exe().context("finding the neurectomy binary")?,
    };
    let mut command = tokio::process::Command::new(&exe);
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
        .env("NEURECTOMY_REDIS_PREFIX", &prefix)
        .env("NEURECTOMY_GRAPH_URI", &settings.graph_uri)
        .env("NEURECTOMY_GRAPH_USER", &settings.graph_user)
        .env(
            "NEURECTOMY_GRAPH_PASSWORD",
            settings.graph_password.expose(),
        )
        .env("NEURECTOMY_GRAPH_DATABASE", &graph)
        .env("NEURECTOMY_GRAPH_HTTP", &scratch.graph_http)
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
        .with_context(|| format!("spawning {} serve", exe.display()))?;
    let pid = child.id().context("the API process has no pid")?;
    scratch.server = Some(child);
    wait_ready(scratch, addr).await?;
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
async fn wait_ready(scratch: &mut Scratch, addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_LIMIT;
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
            START_LIMIT.as_secs()
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

/// One HTTP/1.1 request on a fresh connection; returns (status, body).
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let mut request =
            format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        if let Some(token) = token {
            request.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        match body {
            Some(body) => request.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )),
            None => request.push_str("\r\n"),
        }
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within 10 s"))
        .and_then(|r| r.map_err(anyhow::Error::from))
        .with_context(|| format!("{method} http://{addr}{path}"))?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("{method} {path}: a malformed HTTP response: {text}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{method} {path}: no status in {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// Fails with how to install wrk if it is not on the PATH.
async fn check_wrk() -> anyhow::Result<()> {
    // `wrk --version` prints its banner and exits non-zero: only spawning matters.
    match tokio::process::Command::new("wrk")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
    {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Err(anyhow::anyhow!(
            "wrk is not installed (apt-get install -y wrk; scripts/bench.sh does it), or run `--only ws`"
        )),
        Err(error) => Err(error).context("running wrk"),
    }
}

/// Raises the soft limit on open files to the hard limit when `needed` is
/// above it (with util-linux `prlimit`: this crate forbids `unsafe`, so no
/// `setrlimit`). The API process inherits the limit. Only warns on failure:
/// the connections that cannot open are counted and reported.
async fn raise_fd_limit(needed: u64) {
    let Some((soft, hard)) = fd_limits() else {
        return;
    };
    if soft >= needed {
        return;
    }
    let pid = std::process::id().to_string();
    let raised = tokio::process::Command::new("prlimit")
        .args(["--pid", &pid, &format!("--nofile={hard}:{hard}")])
        .status()
        .await;
    match (raised, fd_limits()) {
        (Ok(status), Some((now, _))) if status.success() && now >= needed => {
            eprintln!("raised the open-files limit from {soft} to {now}");
        }
        (_, now) => eprintln!(
            "warning: the open-files limit is {} (hard {hard}), below the {needed} needed; `ulimit -n {needed}` first",
            now.map_or(soft, |(s, _)| s)
        ),
    }
}

/// (soft, hard) limits on open files of this process.
fn fd_limits() -> Option<(u64, u64)> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut numbers = line["Max open files".len()..].split_whitespace().map(|v| {
        if v == "unlimited" {
            Some(u64::MAX)
        } else {
            v.parse().ok()
        }
    });
    Some((numbers.next()??, numbers.next()??))
}

/// The 1-, 5- and 15-minute load averages.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// A process's memory, from `/proc/<pid>/status` (KiB).
#[derive(Debug, Clone, Copy, Default)]
struct Memory {
    rss_kib: u64,
    hwm_kib: u64,
    anon_kib: u64,
    file_kib: u64,
    threads: u64,
}

impl Memory {
    fn describe(&self) -> String {
        format!(
            "anon {:.1} + file {:.1} MiB; peak (VmHWM) {:.1} MiB; {} threads",
            mib(self.anon_kib),
            mib(self.file_kib),
            mib(self.hwm_kib),
            self.threads
        )
    }
}

/// How much of the link order (`api/link/neurectomy.order`, see
/// `api/build.rs`) `binary` has: the functions it names that the binary
/// lacks (renamed by a dependency, feature or compiler change) are laid out
/// anywhere, and idle RSS grows; `scripts/link-order.sh` makes it anew.
/// `None` outside the source tree or without `nm`.
fn link_order(binary: &Path) -> Option<String> {
    let order = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/link/neurectomy.order"
    ))
    .ok()?;
    let listing = std::process::Command::new("nm")
        .arg("--defined-only")
        .arg(binary)
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let listing = String::from_utf8_lossy(&listing.stdout);
    let symbols: std::collections::HashSet<&str> = listing
        .lines()
        .filter_map(|line| line.split_whitespace().nth(2))
        .collect();
    let wanted: Vec<&str> = order.lines().filter(|l| !l.is_empty()).collect();
    let found = wanted.iter().filter(|name| symbols.contains(*name)).count();
    let mut note = format!(
        "link order: {found} of {} functions in the binary",
        wanted.len()
    );
    if found * 10 < wanted.len() * 9 {
        note.push_str(" (stale: run scripts/link-order.sh)");
    }
    Some(note)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn memory(pid: u32) -> anyhow::Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    Ok(parse_status(&status))
}

fn parse_status(status: &str) -> Memory {
    let mut memory = Memory::default();
    for line in status.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let number = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        match key {
            "VmRSS" => memory.rss_kib = number,
            "VmHWM" => memory.hwm_kib = number,
            "RssAnon" => memory.anon_kib = number,
            "RssFile" => memory.file_kib = number,
            "Threads" => memory.threads = number,
            _ => {}
        }
    }
    memory
}

/// Samples a process's VmRSS every [`SAMPLE_EVERY`] until `stop`; returns the largest.
fn sample_rss(pid: u32, stop: CancellationToken) -> JoinHandle<u64> {
    tokio::spawn(async move {
        let mut largest = 0;
        loop {
            if let Ok(m) = memory(pid) {
                largest = largest.max(m.rss_kib);
            }
            tokio::select! {
                () = stop.cancelled() => return largest,
                () = tokio::time::sleep(SAMPLE_EVERY) => {}
            }
        }
    })
}

/// What wrk reported.
#[derive(Debug, Clone, Default, PartialEq)]
struct WrkRun {
    requests_per_sec: f64,
    requests: u64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    /// `Non-2xx or 3xx responses`.
    non_2xx: u64,
    /// `Socket errors: …`, if any.
    socket_errors: Option<String>,
}

impl WrkRun {
    fn describe(&self) -> String {
        let mut detail = format!(
            "p50 {:.2} ms, p90 {:.2} ms; {} requests",
            self.p50_ms, self.p90_ms, self.requests
        );
        if self.non_2xx > 0 {
            detail.push_str(&format!("; {} non-2xx", self.non_2xx));
        }
        if let Some(errors) = &self.socket_errors {
            detail.push_str(&format!("; socket errors: {errors}"));
        }
        detail
    }
}

/// A wrk duration (`312.45us`, `1.20ms`, `2.00s`, `1.50m`) in milliseconds.
fn wrk_millis(text: &str) -> Option<f64> {
    let (number, scale) = if let Some(n) = text.strip_suffix("us") {
        (n, 1e-3)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1e3)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60e3)
    } else if let Some(n) = text.strip_suffix('h') {
        (n, 3_600e3)
    } else {
        return None;
    };
    number.parse::<f64>().ok().map(|n| n * scale)
}

/// Parses the output of `wrk --latency`.
fn parse_wrk(output: &str) -> anyhow::Result<WrkRun> {
    let mut run = WrkRun::default();
    let mut percentiles = 0;
    for line in output.lines().map(str::trim) {
        if let Some(rate) = line.strip_prefix("Requests/sec:") {
            run.requests_per_sec = rate.trim().parse().context("wrk's Requests/sec")?;
        } else if let Some(count) = line.strip_prefix("Non-2xx or 3xx responses:") {
            run.non_2xx = count.trim().parse().context("wrk's non-2xx count")?;
        } else if let Some(errors) = line.strip_prefix("Socket errors:") {
            run.socket_errors = Some(errors.trim().to_owned());
        } else if line.contains(" requests in ") {
            run.requests = line
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .context("wrk's request count")?;
        } else if let Some((percent, value)) = line.split_once('%') {
            let slot = match percent.trim() {
                "50" => &mut run.p50_ms,
                "90" => &mut run.p90_ms,
                "99" => &mut run.p99_ms,
                _ => continue,
            };
            *slot =
                wrk_millis(value.trim()).with_context(|| format!("wrk's latency line {line:?}"))?;
            percentiles += 1;
        }
    }
    anyhow::ensure!(
        run.requests_per_sec > 0.0 && percentiles == 3,
        "wrk's output has no rate or latency distribution (was --latency given?):\n{output}"
    );
    Ok(run)
}

/// Runs wrk for `seconds` against `url` (with `script`, if any).
async fn wrk(
    args: &BenchApiArgs,
    seconds: u64,
    url: &str,
    script: Option<&Path>,
) -> anyhow::Result<WrkRun> {
    wrk_with(args, args.connections, seconds, url, script).await
}

/// [`wrk`] with `connections` of its own.
async fn wrk_with(
    args: &BenchApiArgs,
    connections: u32,
    seconds: u64,
    url: &str,
    script: Option<&Path>,
) -> anyhow::Result<WrkRun> {
    let connections = connections.max(1);
    let mut command = tokio::process::Command::new("wrk");
    command
        .arg(format!("-t{}", args.wrk_threads.clamp(1, connections)))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{seconds}s"))
        .args(["--timeout", "5s", "--latency"]);
    if let Some(script) = script {
        command.arg("-s").arg(script);
    }
    let output = command
        .arg(url)
        .kill_on_drop(true)
        .output()
        .await
        .context("running wrk")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(
        output.status.success(),
        "wrk failed ({}): {stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    parse_wrk(&stdout)
}

/// The Lua script that makes wrk send the `agent(id)` request.
fn wrk_script(body: &str, token: &str) -> String {
    // Long brackets: the JSON needs no escaping.
    format!(
        "wrk.method = \"POST\"\nwrk.body = [==[{body}]==]\nwrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.headers[\"Authorization\"] = \"Bearer {token}\"\n"
    )
}

fn median(mut runs: Vec<WrkRun>) -> Option<WrkRun> {
    runs.sort_by(|a, b| a.requests_per_sec.total_cmp(&b.requests_per_sec));
    let middle = runs.len() / 2;
    runs.into_iter().nth(middle)
}

/// `/healthz` and `agent(id)` under wrk, and the RSS under that load.
async fn http_scenarios(
    args: &BenchApiArgs,
    scratch: &mut Scratch,
    api: &Api,
    agent: &str,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let body = query_body(agent);
    let script = std::env::temp_dir().join(format!(
        "neurectomy-bench-api-{}.lua",
        Uuid::new_v4().simple()
    ));
    std::fs::write(&script, wrk_script(&body, &api.token))
        .with_context(|| format!("writing {}", script.display()))?;
    scratch.files.push(script.clone());
    // The same request path without the read: what GraphQL itself costs.
    let bare = script.with_extension("typename.lua");
    let bare_body = json!({"query": TYPENAME_QUERY}).to_string();
    std::fs::write(&bare, wrk_script(&bare_body, &api.token))
        .with_context(|| format!("writing {}", bare.display()))?;
    scratch.files.push(bare.clone());
    let healthz_url = format!("http://{}/healthz", api.addr);
    let graphql_url = format!("http://{}/graphql", api.addr);
    let seconds = args.seconds.max(1);

    let sampling = CancellationToken::new();
    let sampler = sample_rss(api.pid, sampling.clone());
    eprintln!("warming up with wrk (2 s per endpoint)…");
    wrk(args, 2, &healthz_url, None).await?;
    wrk(args, 2, &graphql_url, Some(&script)).await?;
    let mut healthz_runs = Vec::new();
    let mut query_runs = Vec::new();
    let mut bare_runs = Vec::new();
    let runs = args.runs.max(1);
    let mut measured = async {
        for run in 0..runs {
            eprintln!("wrk: GET /healthz for {seconds}s ({}/{runs})…", run + 1);
            healthz_runs.push(wrk(args, seconds, &healthz_url, None).await?);
            eprintln!(
                "wrk: POST /graphql {{ __typename }} for {seconds}s ({}/{runs})…",
                run + 1
            );
            bare_runs.push(wrk(args, seconds, &graphql_url, Some(&bare)).await?);
            eprintln!(
                "wrk: POST /graphql agent(id) for {seconds}s ({}/{runs})…",
                run + 1
            );
            query_runs.push(wrk(args, seconds, &graphql_url, Some(&script)).await?);
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    sampling.cancel();
    let largest = sampler.await.context("joining the RSS sampler")?;
    let after = memory(api.pid)?;
    // Still the same answer after the load (wrk cannot see GraphQL errors).
    if measured.is_ok() {
        measured = async {
            let (status, answer) =
                http(api.addr, "POST", "/graphql", Some(&api.token), Some(&body)).await?;
            check_agent(status, &answer, agent)
        }
        .await;
    }
    measured?;

    let (Some(healthz), Some(query), Some(bare)) =
        (median(healthz_runs), median(query_runs), median(bare_runs))
    else {
        anyhow::bail!("wrk made no runs");
    };
    let ratio = query.requests_per_sec / healthz.requests_per_sec.max(1e-9);
    rows.push(
        Row::new(
            "http: GET /healthz (trivial endpoint)",
            healthz.requests_per_sec,
            "req/s",
        )
        .detail(format!(
            "p99 {:.2} ms; {}",
            healthz.p99_ms,
            healthz.describe()
        )),
    );
    rows.push(
        Row::new(
            "http: { __typename } (GraphQL, no read)",
            bare.requests_per_sec,
            "req/s",
        )
        .detail(format!(
            "{:.0} % of /healthz; p99 {:.2} ms; {}",
            bare.requests_per_sec * 100.0 / healthz.requests_per_sec.max(1e-9),
            bare.p99_ms,
            bare.describe()
        )),
    );
    rows.push(
        Row::new(
            "http: agent(id) from Redis",
            query.requests_per_sec,
            "req/s",
        )
        .detail(format!("p99 {:.2} ms; {}", query.p99_ms, query.describe())),
    );
    rows.push(
        Row::new("http: agent(id) rate / /healthz rate", ratio * 100.0, "%").target(
            format!("≥ {:.0} %", RATIO_TARGET * 100.0),
            ratio >= RATIO_TARGET && query.non_2xx == 0,
        ),
    );
    rows.push(
        Row::new("http: agent(id) p99 latency", query.p99_ms, "ms").target(
            format!("≤ {QUERY_P99_TARGET_MS:.0} ms"),
            query.p99_ms <= QUERY_P99_TARGET_MS,
        ),
    );
    let largest = largest.max(after.rss_kib);
    rows.push(
        Row::new(
            "API RSS under that load (largest sample)",
            mib(largest),
            "MiB",
        )
        .target(
            format!("≤ {LOAD_RSS_TARGET_MIB:.0} MiB"),
            mib(largest) <= LOAD_RSS_TARGET_MIB,
        )
        .detail(format!("after the runs: {}", after.describe())),
    );
    Ok(())
}

/// The 23-level doubling document: ~900 bytes, 8,388,608 fields once its
/// fragments are expanded (refused before anything walks it).
fn bomb_document() -> String {
    let mut query = "{ ...F0 }".to_owned();
    for level in 0..23 {
        let next = level + 1;
        query.push_str(&format!(
            " fragment F{level} on Query {{ ...F{next} ...F{next} }}"
        ));
    }
    query.push_str(" fragment F23 on Query { __typename }");
    query
}

/// CPU time (user + system) the process has used, in seconds.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("an unreadable /proc/<pid>/stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(i)
            .context("a short /proc/<pid>/stat")?
            .parse::<f64>()?)
    };
    // utime and stime are fields 14 and 15 of the line: 12 and 13 here,
    // in clock ticks (USER_HZ, 100 on Linux).
    let hz = 100.0;
    Ok((ticks(11)? + ticks(12)?) / hz)
}

/// `/healthz` while a tiny, explosive document keeps arriving: wrk on
/// `/healthz` alone, then again while 16 connections send the doubling
/// document back to back; and the API's CPU per refused document, from a
/// run of the documents alone.
async fn bomb_scenario(
    args: &BenchApiArgs,
    scratch: &mut Scratch,
    api: &Api,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let script = std::env::temp_dir().join(format!(
        "neurectomy-bench-bombs-{}.lua",
        Uuid::new_v4().simple()
    ));
    let body = json!({ "query": bomb_document() }).to_string();
    std::fs::write(&script, wrk_script(&body, &api.token))
        .with_context(|| format!("writing {}", script.display()))?;
    scratch.files.push(script.clone());
    let (status, answer) =
        http(api.addr, "POST", "/graphql", Some(&api.token), Some(&body)).await?;
    anyhow::ensure!(
        status == 200 && answer.contains("QUERY_TOO_LARGE"),
        "the document was not refused: {status} {answer}"
    );
    let healthz_url = format!("http://{}/healthz", api.addr);
    let graphql_url = format!("http://{}/graphql", api.addr);
    let seconds = args.seconds.max(1);
    eprintln!("bombs: wrk GET /healthz alone for {seconds}s…");
    let alone = wrk(args, seconds, &healthz_url, None).await?;
    eprintln!("bombs: the document alone, 16 connections, for {seconds}s…");
    let before = cpu_seconds(api.pid)?;
    let bombs = wrk_with(args, 16, seconds, &graphql_url, Some(&script)).await?;
    let cpu = cpu_seconds(api.pid)? - before;
    let refused = bombs.requests_per_sec * seconds as f64;
    eprintln!("bombs: /healthz while the document arrives, for {seconds}s…");
    let (healthz, during) = tokio::join!(
        wrk(args, seconds, &healthz_url, None),
        wrk_with(args, 16, seconds, &graphql_url, Some(&script)),
    );
    let (healthz, during) = (healthz?, during?);
    rows.push(
        Row::new(
            "bombs: 23-level fragment document refused",
            bombs.requests_per_sec,
            "req/s",
        )
        .detail(format!(
            "API CPU {:.1} µs per document; p99 {:.2} ms; {}",
            cpu * 1e6 / refused.max(1.0),
            bombs.p99_ms,
            bombs.describe()
        )),
    );
    rows.push(
        Row::new("bombs: /healthz p99, alone", alone.p99_ms, "ms")
            .detail(format!("{:.0} req/s", alone.requests_per_sec)),
    );
    rows.push(
        Row::new(
            "bombs: /healthz p99 while they arrive",
            healthz.p99_ms,
            "ms",
        )
        .detail(format!(
            "{:.0} req/s ({:.0} % of alone) beside {:.0} refused documents/s",
            healthz.requests_per_sec,
            healthz.requests_per_sec * 100.0 / alone.requests_per_sec.max(1e-9),
            during.requests_per_sec
        )),
    );
    Ok(())
}

/// A subscriber's view of the run, sent to the collector.
#[derive(Debug)]
enum Seen {
    /// Subscribed (connected, acknowledged, `subscribe` sent).
    Subscribed,
    /// Could not subscribe, or the server ended the subscription.
    Failed(String),
}

/// Each subscriber's latest `next`: when it arrived and its position,
/// written by the subscriber's task and read by the collector. Not a
/// message per `next`: 10,000 channel sends, and the collector's wake-ups,
/// would compete for the two cores with the delivery they time.
struct Arrivals {
    base: Instant,
    /// Nanoseconds after `base`, plus one (0: none yet).
    at: Vec<AtomicU64>,
    /// The position ([`Arrivals::NO_POSITION`] if the `next` had none).
    position: Vec<AtomicI64>,
}

impl Arrivals {
    const NO_POSITION: i64 = i64::MIN;

    fn new(n: usize) -> Self {
        Self {
            base: Instant::now(),
            at: (0..n).map(|_| AtomicU64::new(0)).collect(),
            position: (0..n).map(|_| AtomicI64::new(Self::NO_POSITION)).collect(),
        }
    }

    fn record(&self, index: usize, at: Instant, position: Option<i64>) {
        let nanos = at.saturating_duration_since(self.base).as_nanos() as u64 + 1;
        self.position[index].store(position.unwrap_or(Self::NO_POSITION), Ordering::Relaxed);
        // Release: whoever sees the time sees the position.
        self.at[index].store(nanos, Ordering::Release);
    }

    /// The latest `next` of subscriber `index`: when, and its position.
    fn get(&self, index: usize) -> Option<(Instant, Option<i64>)> {
        let nanos = self.at[index].load(Ordering::Acquire);
        if nanos == 0 {
            return None;
        }
        let position = self.position[index].load(Ordering::Relaxed);
        Some((
            self.base + Duration::from_nanos(nanos - 1),
            (position != Self::NO_POSITION).then_some(position),
        ))
    }
}

/// The WebSocket scenario; failures become "not available" rows.
async fn ws_scenario(
    args: &BenchApiArgs,
    scratch: &mut Scratch,
    api: &Api,
    agent: &str,
    rows: &mut Vec<Row>,
) {
    let n = args.subscribers;
    let rss_name = format!("ws: API RSS with {n} subscriptions");
    let p99_name = format!("ws: one change → {n} subscribers, p99");
    let rss_target = format!("≤ {WS_RSS_TARGET_MIB:.0} MiB");
    let p99_target = format!("≤ {WS_P99_TARGET_MS:.0} ms, all received");
    if let Err(error) = probe(api, agent).await {
        let why = format!("{error:#}");
        eprintln!("the WebSocket part is not available: {why}");
        rows.push(Row::not_available(&rss_name, rss_target, why.clone()));
        rows.push(Row::not_available(&p99_name, p99_target, why));
        return;
    }
    match subscribers(args, scratch, api, agent).await {
        Ok((rss, delivery)) => {
            rows.push(
                Row::new(&rss_name, mib(rss.rss_kib), "MiB")
                    .target(rss_target, mib(rss.rss_kib) <= WS_RSS_TARGET_MIB)
                    .detail(rss.describe()),
            );
            rows.push(delivery.row(&p99_name, p99_target, n));
        }
        Err(error) => {
            let why = format!("{error:#}");
            eprintln!("the WebSocket part failed: {why}");
            rows.push(Row::not_available(&rss_name, rss_target, why.clone()));
            rows.push(Row::not_available(&p99_name, p99_target, why));
        }
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Connects, initialises (`connection_init` → `connection_ack`) and sends
/// the `subscribe` message.
async fn subscribe(api: &Api, agent: &str) -> anyhow::Result<Socket> {
    let mut request = format!("ws://{}/graphql/ws", api.addr)
        .into_client_request()
        .context("building the WebSocket request")?;
    request
        .headers_mut()
        .insert("sec-websocket-protocol", http_value("graphql-transport-ws"));
    // Small buffers: 10,000 of them live in this process.
    let config = WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0);
    let (mut socket, _) = tokio_tungstenite::connect_async_with_config(request, Some(config), true)
        .await
        .context("opening the WebSocket")?;
    let init = json!({"type": "connection_init", "payload": {"authorization": format!("Bearer {}", api.token)}});
    socket
        .send(Message::text(init.to_string()))
        .await
        .context("sending connection_init")?;
    loop {
        let message = socket
            .next()
            .await
            .context("the server closed the WebSocket before connection_ack")?
            .context("reading connection_ack")?;
        match message {
            Message::Text(text) => {
                let value: Value = serde_json::from_str(text.as_str()).unwrap_or_default();
                match value.get("type").and_then(Value::as_str) {
                    Some("connection_ack") => break,
                    Some("ping") => {
                        let pong = json!({"type": "pong"}).to_string();
                        socket.send(Message::text(pong)).await?;
                    }
                    _ => anyhow::bail!("expected connection_ack, got {text}"),
                }
            }
            Message::Close(frame) => {
                anyhow::bail!("the server closed the WebSocket at connection_init: {frame:?}")
            }
            _ => {}
        }
    }
    let subscribe = json!({
        "id": "1",
        "type": "subscribe",
        "payload": {"query": SUBSCRIPTION, "variables": {"id": agent}},
    });
    socket
        .send(Message::text(subscribe.to_string()))
        .await
        .context("sending subscribe")?;
    Ok(socket)
}

/// A `next` without errors, read into borrowed parts only: the position of
/// the update (`Some(None)` if it carries none); `None` for anything else.
fn plain_next(text: &str) -> Option<Option<i64>> {
    #[derive(serde::Deserialize)]
    struct Message<'a> {
        #[serde(rename = "type")]
        kind: &'a str,
        payload: Option<Payload<'a>>,
    }
    #[derive(serde::Deserialize)]
    struct Payload<'a> {
        #[serde(borrow)]
        data: Option<Data<'a>>,
        errors: Option<serde::de::IgnoredAny>,
    }
    #[derive(serde::Deserialize)]
    struct Data<'a> {
        #[serde(rename = "agentUpdated", borrow)]
        update: Option<Update<'a>>,
    }
    #[derive(serde::Deserialize)]
    struct Update<'a> {
        position: Option<&'a str>,
    }
    let message: Message<'_> = serde_json::from_str(text).ok()?;
    let payload = message.payload?;
    if message.kind != "next" || payload.errors.is_some() {
        return None;
    }
    Some(
        payload
            .data
            .and_then(|d| d.update)
            .and_then(|u| u.position)
            .and_then(|p| p.parse().ok()),
    )
}

/// The messages of a `next` or `error` message's GraphQL errors, if any.
fn errors_of(message: &Value) -> Option<String> {
    let payload = message.get("payload")?;
    let errors = match payload {
        Value::Array(errors) => errors,
        other => other.get("errors")?.as_array()?,
    };
    let messages: Vec<String> = errors
        .iter()
        .map(|e| {
            e.get("message")
                .and_then(Value::as_str)
                .map_or_else(|| e.to_string(), str::to_owned)
        })
        .collect();
    (!messages.is_empty()).then(|| messages.join("; "))
}

fn http_value(value: &'static str) -> tokio_tungstenite::tungstenite::http::HeaderValue {
    tokio_tungstenite::tungstenite::http::HeaderValue::from_static(value)
}

/// One subscription first: if the server refuses it (say the field does not
/// exist), it answers with `error` at once.
async fn probe(api: &Api, agent: &str) -> anyhow::Result<()> {
    let mut socket = subscribe(api, agent).await?;
    let quiet = tokio::time::sleep(Duration::from_secs(2));
    tokio::pin!(quiet);
    let outcome = loop {
        tokio::select! {
            () = &mut quiet => break Ok(()),
            message = socket.next() => match message {
                Some(Ok(Message::Text(text))) => {
                    let value: Value = serde_json::from_str(text.as_str()).unwrap_or_default();
                    if let Some(errors) = errors_of(&value) {
                        break Err(anyhow::anyhow!("the server refused the subscription: {errors}"));
                    }
                    match value.get("type").and_then(Value::as_str) {
                        Some("error") => break Err(anyhow::anyhow!(
                            "the server refused the subscription: {}",
                            value.get("payload").map_or_else(|| text.to_string(), Value::to_string)
                        )),
                        Some("complete") => break Err(anyhow::anyhow!(
                            "the server completed the subscription at once"
                        )),
                        Some("ping") => {
                            let pong = json!({"type": "pong"}).to_string();
                            socket.send(Message::text(pong)).await?;
                        }
                        _ => {}
                    }
                }
                Some(Ok(Message::Close(frame))) => break Err(anyhow::anyhow!(
                    "the server closed the subscription's WebSocket: {frame:?}"
                )),
                Some(Ok(_)) => {}
                Some(Err(error)) => break Err(anyhow::Error::from(error).context("reading the probe subscription")),
                None => break Err(anyhow::anyhow!("the server closed the probe's WebSocket")),
            },
        }
    };
    let _ = socket.close(None).await;
    outcome
}

/// Holds a subscription until `stop`, reporting what it sees.
async fn hold(
    api: Arc<Api>,
    agent: Arc<str>,
    index: usize,
    connecting: Arc<Semaphore>,
    seen: mpsc::Sender<(usize, Seen)>,
    arrivals: Arc<Arrivals>,
    stop: CancellationToken,
) {
    let subscribed = {
        let Ok(_permit) = connecting.acquire().await else {
            return;
        };
        tokio::select! {
            () = stop.cancelled() => return,
            subscribed = tokio::time::timeout(Duration::from_secs(60), subscribe(&api, &agent)) => subscribed,
        }
    };
    let mut socket = match subscribed {
        Ok(Ok(socket)) => socket,
        Ok(Err(error)) => {
            let _ = seen.send((index, Seen::Failed(format!("{error:#}")))).await;
            return;
        }
        Err(_) => {
            let _ = seen
                .send((index, Seen::Failed("no subscription within 60 s".into())))
                .await;
            return;
        }
    };
    if seen.send((index, Seen::Subscribed)).await.is_err() {
        return;
    }
    // One waiter for the connection's life, not one per message: 10,000
    // clients woken together would contend for the token's lock.
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        let message = tokio::select! {
            () = &mut stopped => break,
            message = socket.next() => message,
        };
        let report = match message {
            Some(Ok(Message::Text(text))) => {
                let at = Instant::now();
                // The common case read cheaply (10,000 clients share the
                // API's two cores); anything else through the full parse.
                if let Some(position) = plain_next(text.as_str()) {
                    arrivals.record(index, at, position);
                    continue;
                }
                let value: Value = serde_json::from_str(text.as_str()).unwrap_or_default();
                match value.get("type").and_then(Value::as_str) {
                    Some("next") if errors_of(&value).is_some() => Some(Seen::Failed(format!(
                        "the subscription answered with errors: {}",
                        errors_of(&value).unwrap_or_default()
                    ))),
                    Some("next") => {
                        let position = value
                            .pointer(&format!("/payload/data/{SUBSCRIPTION_FIELD}/position"))
                            .and_then(|p| match p {
                                Value::String(s) => s.parse().ok(),
                                other => other.as_i64(),
                            });
                        arrivals.record(index, at, position);
                        None
                    }
                    Some("ping") => {
                        let pong = json!({"type": "pong"}).to_string();
                        if socket.send(Message::text(pong)).await.is_err() {
                            Some(Seen::Failed("could not answer a ping".into()))
                        } else {
                            None
                        }
                    }
                    Some("error" | "complete") => Some(Seen::Failed(format!(
                        "the server ended the subscription: {text}"
                    ))),
                    _ => None,
                }
            }
            Some(Ok(Message::Close(frame))) => Some(Seen::Failed(format!(
                "the server closed the WebSocket: {frame:?}"
            ))),
            Some(Ok(_)) => None,
            Some(Err(error)) => Some(Seen::Failed(format!("reading: {error}"))),
            None => Some(Seen::Failed("the server closed the WebSocket".into())),
        };
        let Some(report) = report else {
            continue;
        };
        let failed = matches!(report, Seen::Failed(_));
        if seen.send((index, report)).await.is_err() || failed {
            break;
        }
    }
    let _ = socket.close(None).await;
}

/// Delivery of the one change to the subscribers.
struct Delivery {
    latencies: Histogram<u64>,
    received: usize,
    subscribed: usize,
    lost: usize,
    early: usize,
    mutation_ms: f64,
    first_failure: Option<String>,
}

impl Delivery {
    fn row(&self, name: &str, target: String, wanted: usize) -> Row {
        if self.received == 0 {
            return Row::not_available(
                name,
                target,
                format!(
                    "no subscriber received the change ({} of {wanted} subscribed{})",
                    self.subscribed,
                    self.first_failure
                        .as_ref()
                        .map_or(String::new(), |f| format!("; first failure: {f}"))
                ),
            );
        }
        let ms = |q: f64| self.latencies.value_at_quantile(q) as f64 / 1000.0;
        let p99 = ms(0.99);
        let mut detail = format!(
            "received by {} of {wanted} ({} subscribed); first {:.1} ms, p50 {:.1} ms, max {:.1} ms; the mutation took {:.1} ms",
            self.received,
            self.subscribed,
            self.latencies.min() as f64 / 1000.0,
            ms(0.5),
            self.latencies.max() as f64 / 1000.0,
            self.mutation_ms
        );
        if self.lost > 0 {
            detail.push_str(&format!("; {} connection(s) lost", self.lost));
        }
        if self.early > 0 {
            detail.push_str(&format!("; {} `next` before the change", self.early));
        }
        if let Some(failure) = &self.first_failure {
            detail.push_str(&format!("; first failure: {failure}"));
        }
        Row::new(name, p99, "ms")
            .target(target, self.received == wanted && p99 <= WS_P99_TARGET_MS)
            .detail(detail)
    }
}

/// Opens the subscriptions, reads the API's RSS, changes the agent and
/// times its delivery to every subscriber.
async fn subscribers(
    args: &BenchApiArgs,
    scratch: &mut Scratch,
    api: &Api,
    agent: &str,
) -> anyhow::Result<(Memory, Delivery)> {
    let n = args.subscribers;
    let stop = scratch.stop.child_token();
    // Every subscriber sends a few messages at most: room for all of them.
    let (tx, mut rx) = mpsc::channel::<(usize, Seen)>(n * 2 + 16);
    let connecting = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let shared = Arc::new(Api {
        addr: api.addr,
        pid: api.pid,
        token: api.token.clone(),
    });
    let agent_id: Arc<str> = Arc::from(agent);
    let arrivals = Arc::new(Arrivals::new(n));
    eprintln!(
        "opening {n} WebSocket subscriptions ({} handshakes at a time)…",
        args.connect_concurrency.max(1)
    );
    let started = Instant::now();
    let mut clients = Vec::with_capacity(n);
    for index in 0..n {
        clients.push(tokio::spawn(hold(
            shared.clone(),
            agent_id.clone(),
            index,
            connecting.clone(),
            tx.clone(),
            arrivals.clone(),
            stop.clone(),
        )));
    }
    drop(tx);
    let outcome = deliver(n, api, agent, &mut rx, &arrivals, started).await;
    stop.cancel();
    eprintln!("closing the subscriptions…");
    for client in clients {
        let _ = client.await;
    }
    outcome
}

async fn deliver(
    n: usize,
    api: &Api,
    agent: &str,
    rx: &mut mpsc::Receiver<(usize, Seen)>,
    arrivals: &Arrivals,
    started: Instant,
) -> anyhow::Result<(Memory, Delivery)> {
    let mut subscribed = vec![false; n];
    let mut subscribed_count = 0;
    let mut failed = 0;
    let mut first_failure: Option<String> = None;
    let deadline = started + Duration::from_secs(120 + n as u64 / 50);
    while subscribed_count + failed < n {
        let Ok(Some((index, seen))) = tokio::time::timeout_at(deadline.into(), rx.recv()).await
        else {
            anyhow::bail!(
                "{subscribed_count} of {n} subscribed and {failed} failed within {} s",
                deadline.duration_since(started).as_secs()
            );
        };
        match seen {
            Seen::Subscribed => {
                subscribed[index] = true;
                subscribed_count += 1;
                if subscribed_count % 1_000 == 0 {
                    eprintln!(
                        "  {subscribed_count} subscribed ({:.1} s)",
                        started.elapsed().as_secs_f64()
                    );
                }
            }
            Seen::Failed(why) => {
                if subscribed[index] {
                    subscribed[index] = false;
                    subscribed_count -= 1;
                }
                failed += 1;
                first_failure.get_or_insert(why);
            }
        }
    }
    anyhow::ensure!(
        subscribed_count > 0,
        "no subscription opened: {}",
        first_failure.unwrap_or_default()
    );
    eprintln!(
        "{subscribed_count} subscribed, {failed} failed, in {:.1} s; letting them settle…",
        started.elapsed().as_secs_f64()
    );
    // The server registers a subscription after reading `subscribe`; nothing
    // acknowledges it in graphql-transport-ws, so allow it a quiet moment.
    let settle = tokio::time::Instant::now() + SETTLE;
    let mut lost = 0;
    while let Ok(Some((index, seen))) = tokio::time::timeout_at(settle, rx.recv()).await {
        match seen {
            Seen::Failed(why) => {
                if std::mem::take(&mut subscribed[index]) {
                    lost += 1;
                }
                first_failure.get_or_insert(why);
            }
            Seen::Subscribed => {}
        }
    }
    // `next`s before the change (none expected: a live subscription sends
    // nothing until something changes).
    let early = (0..n).filter(|&i| arrivals.get(i).is_some()).count();
    let rss = memory(api.pid)?;
    eprintln!(
        "API RSS with {} subscriptions: {:.1} MiB; pausing agent {agent}…",
        subscribed_count - lost,
        mib(rss.rss_kib)
    );

    let body = json!({"query": PAUSE, "variables": {"id": agent}}).to_string();
    let sent = Instant::now();
    let (status, answer) = http(api.addr, "POST", "/graphql", Some(&api.token), Some(&body))
        .await
        .context("sending pauseAgent")?;
    let answered = Instant::now();
    let value: Value = serde_json::from_str(&answer).unwrap_or_default();
    let position: i64 = value
        .pointer("/data/pauseAgent/position")
        .and_then(|p| match p {
            Value::String(s) => s.parse().ok(),
            other => other.as_i64(),
        })
        .with_context(|| format!("pauseAgent failed (HTTP {status}): {answer}"))?;

    let waiting = subscribed.iter().filter(|s| **s).count();
    let until = tokio::time::Instant::from_std(answered + DELIVERY_LIMIT);
    // The subscribers record their arrivals themselves; look every 2 ms
    // (the times are theirs, so looking adds nothing to them).
    let ours = |i: usize| {
        arrivals
            .get(i)
            .filter(|(_, at_position)| at_position.is_none_or(|p| p >= position))
    };
    loop {
        while let Ok((index, seen)) = rx.try_recv() {
            if let Seen::Failed(why) = seen {
                if std::mem::take(&mut subscribed[index]) {
                    lost += 1;
                }
                first_failure.get_or_insert(why);
            }
        }
        let pending = (0..n).any(|i| subscribed[i] && ours(i).is_none());
        if !pending || tokio::time::Instant::now() >= until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut latencies = histogram();
    let mut received_count = 0;
    for i in (0..n).filter(|&i| subscribed[i]) {
        if let Some((at, _)) = ours(i) {
            // Arrivals before the response count as immediate.
            let micros = at.saturating_duration_since(answered).as_micros();
            let _ = latencies.record(micros.max(1) as u64);
            received_count += 1;
        }
    }
    Ok((
        rss,
        Delivery {
            latencies,
            received: received_count,
            subscribed: waiting,
            lost,
            early,
            mutation_ms: answered.duration_since(sent).as_secs_f64() * 1000.0,
            first_failure,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrivals_keep_each_subscribers_latest_next() {
        let arrivals = Arrivals::new(3);
        assert!(arrivals.get(0).is_none());
        let first = Instant::now();
        arrivals.record(0, first, Some(7));
        arrivals.record(1, first, None);
        let later = first + Duration::from_millis(5);
        arrivals.record(0, later, Some(9));
        let (at, position) = arrivals.get(0).unwrap();
        assert_eq!(position, Some(9));
        assert!(at.duration_since(later) < Duration::from_micros(1));
        assert_eq!(arrivals.get(1).map(|(_, p)| p), Some(None));
        assert!(arrivals.get(2).is_none());
    }

    #[test]
    fn plain_next_reads_the_position_and_leaves_the_rest_to_the_full_parse() {
        let next = r#"{"type":"next","id":"1","payload":{"data":{"agentUpdated":{"position":"42","agent":{"id":"a","status":"paused"}}}}}"#;
        assert_eq!(plain_next(next), Some(Some(42)));
        let errors =
            r#"{"type":"next","id":"1","payload":{"data":null,"errors":[{"message":"x"}]}}"#;
        assert_eq!(plain_next(errors), None);
        assert_eq!(plain_next(r#"{"type":"ping"}"#), None);
        assert_eq!(plain_next("not json"), None);
        // `Data` names the subscription's field literally (serde renames
        // take literals): it must be the field the subscription selects.
        let selected = SUBSCRIPTION
            .split_once('{')
            .and_then(|(_, rest)| rest.trim_start().split('(').next())
            .map(str::trim);
        assert_eq!(selected, Some(SUBSCRIPTION_FIELD));
        let renamed = format!(
            r#"{{"type":"next","id":"1","payload":{{"data":{{"{SUBSCRIPTION_FIELD}":{{"position":"9"}}}}}}}}"#
        );
        assert_eq!(plain_next(&renamed), Some(Some(9)));
    }

    const OUTPUT: &str = "Running 10s test @ http://127.0.0.1:8080/graphql
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.53ms  412.00us   9.87ms   80.00%
    Req/Sec    20.95k     1.10k   22.40k    75.00%
  Latency Distribution
     50%  812.00us
     75%    1.61ms
     90%    1.98ms
     99%    2.50s
  208521 requests in 10.00s, 71.20MB read
  Socket errors: connect 0, read 0, write 0, timeout 3
  Non-2xx or 3xx responses: 7
Requests/sec:  20843.41
Transfer/sec:      7.12MB
";

    #[test]
    fn wrk_latency_output_is_parsed() {
        let run = parse_wrk(OUTPUT).unwrap();
        assert_eq!(run.requests, 208_521);
        assert!((run.requests_per_sec - 20_843.41).abs() < 1e-6);
        assert!((run.p50_ms - 0.812).abs() < 1e-9);
        assert!((run.p90_ms - 1.98).abs() < 1e-9);
        assert!((run.p99_ms - 2_500.0).abs() < 1e-9);
        assert_eq!(run.non_2xx, 7);
        assert_eq!(
            run.socket_errors.as_deref(),
            Some("connect 0, read 0, write 0, timeout 3")
        );
    }

    #[test]
    fn wrk_output_without_a_distribution_is_refused() {
        let plain = OUTPUT.replace("     99%    2.50s\n", "");
        assert!(parse_wrk(&plain).is_err());
    }

    #[test]
    fn wrk_durations_carry_their_units() {
        assert_eq!(wrk_millis("250.00us"), Some(0.25));
        assert_eq!(wrk_millis("3.00ms"), Some(3.0));
        assert_eq!(wrk_millis("1.50s"), Some(1_500.0));
        assert_eq!(wrk_millis("2.00m"), Some(120_000.0));
        assert_eq!(wrk_millis("12"), None);
    }

    #[test]
    fn proc_status_memory_lines_are_read() {
        let status = "Name:\tneurectomy\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\nRssAnon:\t    6144 kB\nRssFile:\t    4096 kB\nThreads:\t5\n";
        let m = parse_status(status);
        assert_eq!(
            (m.rss_kib, m.hwm_kib, m.anon_kib, m.file_kib, m.threads),
            (10_240, 20_480, 6_144, 4_096, 5)
        );
    }
}
