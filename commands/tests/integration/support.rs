//! Shared fixtures: event builders, a small domain world on top of the
//! command handler, relay and writer tasks, waits for the JetStream mirror
//! (checked by `testkit::mirror`), and a private `nats-server` child
//! process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command as Process, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use domain::{
    AgentCommand, AgentId, AgentKind, Command, TaskCommand, TaskId, WorkflowCommand, WorkflowId,
};
use futures::StreamExt;
use neurectomy_commands::relay::{
    HEADER_EVENT_TYPE, HEADER_POSITION, HEADER_SCHEMA_VERSION, HEADER_STREAM_ID,
    HEADER_STREAM_VERSION, HEADER_TENANT,
};
use neurectomy_commands::testkit::eventually;
use neurectomy_commands::testkit::mirror::{
    assert_messages_mirror, assert_mirror, read_everything, read_stream,
};
use neurectomy_commands::{
    event_store, CommandContext, CommandError, CommandHandler, CommandOutcome, EventMetadata,
    EventStore, ExpectedVersion, HandlerConfig, NewEvent, RecordedEvent, Relay, RelayConfig,
    RelayProgress,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use sqlx::PgPool;
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Upper bound for any effect a test waits for.
pub const WAIT: Duration = Duration::from_secs(30);

/// The seed of the tests' random choices: `NEURECTOMY_TEST_SEED`, or a new
/// one; printed either way, so that a failure can be replayed.
pub fn seed() -> u64 {
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *SEED.get_or_init(|| {
        let seed = std::env::var("NEURECTOMY_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random);
        eprintln!("random choices seeded with {seed} (NEURECTOMY_TEST_SEED={seed} repeats them)");
        seed
    })
}

/// A generator for the `stream`-th sequence of random choices of a test:
/// seeded from [`seed`], different per `stream`.
pub fn rng(stream: u64) -> StdRng {
    StdRng::seed_from_u64(seed() ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Tenant used by tests that need only one.
pub const TENANT: &str = "tenant-a";

// ---------------------------------------------------------------------------
// Raw events
// ---------------------------------------------------------------------------

/// Metadata for the `index`-th event of `command_id`.
pub fn metadata(command_id: Uuid, index: usize, tenant: &str) -> EventMetadata {
    EventMetadata {
        event_id: event_store::event_id(tenant, command_id, index),
        command_id,
        command_type: "TestCommand".to_owned(),
        command_hash: "0".repeat(64),
        correlation_id: command_id,
        causation_id: command_id,
        actor: "integration-test".to_owned(),
        tenant: tenant.to_owned(),
        occurred_at: OffsetDateTime::now_utc(),
        traceparent: None,
    }
}

/// An event type that fits the stream's aggregate kind (the relay derives
/// subjects from both).
pub fn event_type_for(stream_id: &str) -> &'static str {
    match stream_id.split_once('-').map(|(kind, _)| kind) {
        Some("agent") => "AgentPaused",
        Some("workflow") => "WorkflowStarted",
        _ => "TaskProgressReported",
    }
}

/// `count` events of one fresh command for `stream_id`.
pub fn events(stream_id: &str, count: usize, tenant: &str) -> Vec<NewEvent> {
    events_traced(stream_id, count, tenant, None)
}

/// Like [`events`], with a W3C traceparent on every event.
pub fn events_traced(
    stream_id: &str,
    count: usize,
    tenant: &str,
    traceparent: Option<String>,
) -> Vec<NewEvent> {
    let command_id = Uuid::new_v4();
    (0..count)
        .map(|index| NewEvent {
            event_type: event_type_for(stream_id).to_owned(),
            schema_version: 1,
            data: json!({ "stream": stream_id, "index": index, "command": command_id }),
            metadata: EventMetadata {
                traceparent: traceparent.clone(),
                ..metadata(command_id, index, tenant)
            },
        })
        .collect()
}

/// A fresh stream id of the given kind.
pub fn stream_id(kind: &str) -> String {
    format!("{kind}-{}", Uuid::new_v4())
}

/// `SELECT count(*) FROM events`.
pub async fn event_count(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Every position in the table, in order (what a reader must end up with).
pub async fn all_positions(pool: &PgPool) -> Vec<i64> {
    sqlx::query_scalar("SELECT position FROM events ORDER BY position")
        .fetch_all(pool)
        .await
        .unwrap()
}

// ---------------------------------------------------------------------------
// A domain world driven through the command handler
// ---------------------------------------------------------------------------

/// A command handler plus helpers to build agents, workflows and tasks.
#[derive(Clone)]
pub struct World {
    pub handler: CommandHandler,
    pub config: HandlerConfig,
    pub tenant: String,
}

impl World {
    pub fn new(handler: CommandHandler, tenant: &str) -> Self {
        Self {
            handler,
            config: HandlerConfig::default(),
            tenant: tenant.to_owned(),
        }
    }

    /// Records the configuration the handler was built with.
    pub fn with_config(mut self, config: HandlerConfig) -> Self {
        self.config = config;
        self
    }

    /// The same handler acting for another tenant.
    pub fn as_tenant(&self, tenant: &str) -> Self {
        Self {
            tenant: tenant.to_owned(),
            ..self.clone()
        }
    }

    pub fn store(&self) -> &EventStore {
        self.handler.store()
    }

    /// A context with a fresh command id.
    pub fn ctx(&self) -> CommandContext {
        CommandContext::new(Uuid::new_v4(), "integration-test", self.tenant.as_str())
    }

    pub async fn try_run(
        &self,
        command: impl Into<Command>,
    ) -> Result<CommandOutcome, CommandError> {
        self.handler.execute(command.into(), &self.ctx()).await
    }

    pub async fn run(&self, command: impl Into<Command>) -> CommandOutcome {
        let command = command.into();
        let name = command.name();
        self.handler
            .execute(command, &self.ctx())
            .await
            .unwrap_or_else(|e| panic!("{name} failed: {e} ({})", e.code()))
    }

    pub async fn workflow(&self) -> WorkflowId {
        let id = WorkflowId::from_uuid(Uuid::new_v4());
        self.run(WorkflowCommand::StartWorkflow {
            workflow_id: id,
            name: "integration".into(),
            metadata: json!({ "suite": "integration" }),
        })
        .await;
        id
    }

    pub async fn agent(&self, capabilities: &[&str]) -> AgentId {
        let id = AgentId::from_uuid(Uuid::new_v4());
        self.run(AgentCommand::RegisterAgent {
            agent_id: id,
            name: "worker".into(),
            kind: AgentKind::Tool,
            model: None,
            capabilities: capabilities.iter().map(|c| (*c).to_owned()).collect(),
            parent_agent_id: None,
        })
        .await;
        id
    }

    pub fn create_task(
        workflow: WorkflowId,
        capabilities: &[&str],
        depends_on: Vec<TaskId>,
    ) -> (TaskId, TaskCommand) {
        let id = TaskId::from_uuid(Uuid::new_v4());
        let command = TaskCommand::CreateTask {
            task_id: id,
            workflow_id: workflow,
            title: "a task".into(),
            input: json!({ "prompt": "do it" }),
            required_capabilities: capabilities.iter().map(|c| (*c).to_owned()).collect(),
            depends_on,
            priority: 50,
            max_attempts: 3,
        };
        (id, command)
    }

    pub async fn task(
        &self,
        workflow: WorkflowId,
        capabilities: &[&str],
        depends_on: Vec<TaskId>,
    ) -> TaskId {
        let (id, command) = Self::create_task(workflow, capabilities, depends_on);
        self.run(command).await;
        id
    }

    /// A workflow, an agent and a task that is assigned and running
    /// (task stream at version 3).
    pub async fn running_task(&self) -> (TaskId, AgentId) {
        let workflow = self.workflow().await;
        let agent = self.agent(&["code"]).await;
        let task = self.task(workflow, &["code"], Vec::new()).await;
        self.run(TaskCommand::AssignTask {
            task_id: task,
            agent_id: agent,
        })
        .await;
        self.run(TaskCommand::StartTask { task_id: task }).await;
        (task, agent)
    }
}

/// The stable error code of a failed command (panics on success).
pub fn code_of(result: Result<CommandOutcome, CommandError>) -> &'static str {
    match result {
        Ok(outcome) => panic!("expected an error, got {outcome:?}"),
        Err(e) => e.code(),
    }
}

// ---------------------------------------------------------------------------
// Relays and writers
// ---------------------------------------------------------------------------

/// The per-test relay configuration with fast polls and backoff.
pub fn fast(config: &RelayConfig) -> RelayConfig {
    RelayConfig {
        batch_size: 100,
        idle_poll: Duration::from_millis(50),
        standby_poll: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        report_every: Duration::from_secs(3600),
        ..config.clone()
    }
}

/// A relay running in a task of its own.
pub struct RunningRelay {
    pub stop: CancellationToken,
    pub handle: JoinHandle<()>,
    pub progress: watch::Receiver<RelayProgress>,
    /// Events of the batch the relay is publishing now (0 between batches).
    pub in_hand: neurectomy_commands::InHand,
}

impl RunningRelay {
    pub fn spawn(store: &EventStore, client: async_nats::Client, config: RelayConfig) -> Self {
        let relay = Relay::new(store.clone(), client, config);
        let progress = relay.progress();
        let in_hand = relay.in_hand();
        let stop = CancellationToken::new();
        let handle = tokio::spawn({
            let stop = stop.clone();
            async move { relay.run(stop).await }
        });
        Self {
            stop,
            handle,
            progress,
            in_hand,
        }
    }

    pub fn progress(&self) -> RelayProgress {
        *self.progress.borrow()
    }

    /// Graceful shutdown; the relay task must end without panicking.
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.handle.await.expect("relay task panicked");
    }
}

/// A task appending events (1–4 per append, `ExpectedVersion::Any`) to
/// random streams until stopped or until it has written `limit` events.
pub struct Writer {
    pub stop: CancellationToken,
    pub written: Arc<AtomicU64>,
    pub handle: JoinHandle<u64>,
}

impl Writer {
    pub fn spawn(store: &EventStore, streams: Vec<String>, limit: u64) -> Self {
        static WRITERS: AtomicU64 = AtomicU64::new(0);
        let stop = CancellationToken::new();
        let written = Arc::new(AtomicU64::new(0));
        let mut rng = rng(1_000 + WRITERS.fetch_add(1, Ordering::Relaxed));
        let handle = tokio::spawn({
            let (store, stop, written) = (store.clone(), stop.clone(), written.clone());
            async move {
                let mut total = 0u64;
                while total < limit && !stop.is_cancelled() {
                    let stream = &streams[rng.gen_range(0..streams.len())];
                    let count = rng.gen_range(1..=4u64).min(limit - total);
                    let traceparent = rng.gen_bool(0.3).then(|| {
                        format!(
                            "00-{}-{}-01",
                            Uuid::new_v4().simple(),
                            &Uuid::new_v4().simple().to_string()[..16]
                        )
                    });
                    let batch = events_traced(stream, count as usize, TENANT, traceparent);
                    store
                        .append(stream, ExpectedVersion::Any, batch)
                        .await
                        .unwrap();
                    total += count;
                    written.store(total, Ordering::SeqCst);
                }
                total
            }
        });
        Self {
            stop,
            written,
            handle,
        }
    }

    pub fn written(&self) -> u64 {
        self.written.load(Ordering::SeqCst)
    }

    /// Waits until the writer has written `more` events beyond now.
    pub async fn wait_for_more(&self, more: u64) {
        let target = self.written() + more;
        eventually("the writer to append more events", WAIT, || async {
            (self.written() >= target).then_some(())
        })
        .await;
    }

    pub async fn finish(self) -> u64 {
        self.stop.cancel();
        self.handle.await.expect("writer panicked")
    }
}

/// `count` stream ids over all three aggregate kinds.
pub fn mixed_streams(count: usize) -> Vec<String> {
    let kinds = ["task", "agent", "workflow"];
    (0..count)
        .map(|i| stream_id(kinds[i % kinds.len()]))
        .collect()
}

// ---------------------------------------------------------------------------
// The JetStream mirror
// ---------------------------------------------------------------------------

/// Waits until the JetStream stream holds at least as many messages as the
/// store holds events and `relay` (if given) acknowledged the last position,
/// then checks the mirror exactly. Returns the number of events.
pub async fn wait_for_mirror(
    store: &EventStore,
    js: &jetstream::Context,
    config: &RelayConfig,
    relay: Option<&RunningRelay>,
) -> usize {
    let events = read_everything(store).await;
    let n = events.len() as u64;
    let last = events.last().map_or(0, |e| e.position);
    eventually("the relay to publish every event", WAIT, || async {
        if let Some(relay) = relay {
            if relay.progress().position < last {
                return None;
            }
        }
        let stream = js.get_stream(&config.stream_name).await.ok()?;
        let info = stream.get_info().await.ok()?;
        (info.state.last_sequence >= n).then_some(())
    })
    .await;
    assert_mirror(&events, js, config).await;
    events.len()
}

/// Like [`wait_for_mirror`] on a stream that also holds `foreign` (the
/// payloads of messages something else published on the relay's subjects,
/// each once): every message is either one of those or the relay's, and
/// the relay's are exactly the store's events, once each, in order.
pub async fn wait_for_mirror_among(
    store: &EventStore,
    js: &jetstream::Context,
    config: &RelayConfig,
    relay: &RunningRelay,
    foreign: &[bytes::Bytes],
) -> usize {
    let events = read_everything(store).await;
    let total = (events.len() + foreign.len()) as u64;
    let last = events.last().map_or(0, |e| e.position);
    // Once JetStream has acknowledged the last event, every message the
    // relay will ever publish up to it is in the stream (and the foreign
    // ones were flushed before).
    eventually("the relay to publish the last event", WAIT, || async {
        (relay.progress().position >= last).then_some(())
    })
    .await;
    let stream = js.get_stream(&config.stream_name).await.unwrap();
    let info = stream.get_info().await.unwrap();
    assert_eq!(
        (
            info.state.messages,
            info.state.first_sequence,
            info.state.last_sequence
        ),
        (total, 1, total),
        "JetStream must hold the {} events of the store and the {} foreign messages, nothing else",
        events.len(),
        foreign.len()
    );
    let messages = read_stream(&stream, total).await;
    let (theirs, ours): (Vec<_>, Vec<_>) = messages
        .into_iter()
        .partition(|m| foreign.contains(&m.payload));
    let mut seen: Vec<&bytes::Bytes> = theirs.iter().map(|m| &m.payload).collect();
    seen.sort();
    let mut published: Vec<&bytes::Bytes> = foreign.iter().collect();
    published.sort();
    assert_eq!(seen, published, "every foreign message landed once");
    assert_messages_mirror(&events, &ours, config);
    events.len()
}

// ---------------------------------------------------------------------------
// A private nats-server
// ---------------------------------------------------------------------------

/// A `nats-server -js` child process on its own port and store directory;
/// killed (and its directory removed) on drop.
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
}

impl NatsServer {
    fn binary() -> PathBuf {
        let path = std::env::var_os("NEURECTOMY_NATS_SERVER")
            .map_or_else(|| PathBuf::from("/usr/sbin/nats-server"), PathBuf::from);
        assert!(
            path.exists(),
            "nats-server is not installed at {} (set NEURECTOMY_NATS_SERVER to another path); \
             install it with: apt-get install nats-server",
            path.display()
        );
        path
    }

    /// Starts a server on a free port and waits until it accepts connections.
    pub async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("neurectomy-nats-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut server = Self {
            child: None,
            port,
            dir,
        };
        server.restart().await;
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// (Re)starts the server on the same port and store directory.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "the server is already running");
        let child = Process::new(Self::binary())
            .args(["-js", "-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-sd")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start nats-server ({e}); install it with: apt-get install nats-server"
                )
            });
        self.child = Some(child);
        let port = self.port;
        eventually("the private nats-server to listen", WAIT, || async move {
            TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
        })
        .await;
    }

    /// Kills the server (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------
// Something else publishing on the relay's subjects
// ---------------------------------------------------------------------------

/// Publishes messages that are not the relay's on the relay's subjects, with
/// plain NATS publishes on a connection of its own (as a mistyped subject in
/// another service or an operator's test publish would): on demand, and
/// whenever it has seen `every` of the relay's messages go by (a core
/// subscription to the relay's subjects), up to `reactive` times, so that
/// many land between two messages of a pipelined batch. Four kinds in turn:
/// JSON without headers, a garbage body, unrelated headers with a bogus
/// `Neurectomy-Position`, and every header of the relay with a position far
/// ahead and an event id the store does not have.
pub struct Intruder {
    client: async_nats::Client,
    prefix: String,
    published: Arc<std::sync::Mutex<Vec<bytes::Bytes>>>,
    stop: CancellationToken,
    handle: JoinHandle<()>,
}

impl Intruder {
    pub async fn start(url: &str, prefix: &str, every: u64, reactive: u64) -> Self {
        let client = async_nats::connect(url).await.unwrap();
        let mut relayed = client.subscribe(format!("{prefix}.>")).await.unwrap();
        client.flush().await.unwrap();
        let published = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let handle = tokio::spawn({
            let (client, prefix, published, stop) = (
                client.clone(),
                prefix.to_owned(),
                published.clone(),
                stop.clone(),
            );
            async move {
                let (mut seen, mut sent) = (0u64, 0u64);
                while sent < reactive {
                    let message = tokio::select! {
                        () = stop.cancelled() => return,
                        message = relayed.next() => match message {
                            Some(message) => message,
                            None => return,
                        },
                    };
                    // The relay's messages only (not this intruder's own).
                    if serde_json::from_slice::<RecordedEvent>(&message.payload).is_err() {
                        continue;
                    }
                    seen += 1;
                    if seen % every == 0 {
                        publish_foreign(&client, &prefix, &published).await;
                        sent += 1;
                    }
                }
            }
        });
        Self {
            client,
            prefix: prefix.to_owned(),
            published,
            stop,
            handle,
        }
    }

    /// Publishes one foreign message now and waits until the server has it.
    pub async fn publish_one(&self) {
        publish_foreign(&self.client, &self.prefix, &self.published).await;
    }

    /// Stops reacting (it can still [`Intruder::publish_one`]); returns the
    /// payload of every message published so far, all on the server.
    pub async fn stop_reacting(&self) -> Vec<bytes::Bytes> {
        self.stop.cancel();
        eventually("the intruder to stop reacting", WAIT, || async {
            self.handle.is_finished().then_some(())
        })
        .await;
        self.client.flush().await.unwrap();
        self.published.lock().unwrap().clone()
    }

    /// Stops reacting; returns the payload of every message published.
    pub async fn finish(self) -> Vec<bytes::Bytes> {
        self.stop.cancel();
        self.handle.await.unwrap();
        self.client.flush().await.unwrap();
        let published = self.published.lock().unwrap().clone();
        published
    }
}

async fn publish_foreign(
    client: &async_nats::Client,
    prefix: &str,
    published: &std::sync::Mutex<Vec<bytes::Bytes>>,
) {
    let kind = published.lock().unwrap().len() % 4;
    let marker = Uuid::new_v4();
    let (subject, headers, payload): (String, Option<async_nats::HeaderMap>, Vec<u8>) = match kind {
        // Another service's event on a mistyped subject.
        0 => (
            format!("{prefix}.task.TaskCreated"),
            None,
            json!({ "id": marker, "note": "not from the relay" })
                .to_string()
                .into_bytes(),
        ),
        // An operator's test publish: garbage.
        1 => (format!("{prefix}.test"), None, {
            let mut body = vec![0xff, 0xfe, 0x00];
            body.extend_from_slice(marker.as_bytes());
            body
        }),
        // Headers, but not the relay's set.
        2 => {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Content-Type", "application/json");
            headers.insert(HEADER_POSITION, i64::MAX.to_string().as_str());
            (
                format!("{prefix}.agent.AgentPaused"),
                Some(headers),
                json!({ "id": marker }).to_string().into_bytes(),
            )
        }
        // Every header of the relay, naming an event the store does not
        // have, far ahead of the log.
        _ => {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", marker.to_string().as_str());
            headers.insert(HEADER_POSITION, (i64::MAX - 1).to_string().as_str());
            headers.insert(HEADER_STREAM_ID, format!("task-{marker}").as_str());
            headers.insert(HEADER_STREAM_VERSION, "1");
            headers.insert(HEADER_EVENT_TYPE, "TaskCreated");
            headers.insert(HEADER_SCHEMA_VERSION, "1");
            headers.insert(HEADER_TENANT, TENANT);
            (
                format!("{prefix}.task.TaskCreated"),
                Some(headers),
                format!("spoof {marker}").into_bytes(),
            )
        }
    };
    let payload = bytes::Bytes::from(payload);
    published.lock().unwrap().push(payload.clone());
    match headers {
        Some(headers) => client
            .publish_with_headers(subject, headers, payload)
            .await
            .unwrap(),
        None => client.publish(subject, payload).await.unwrap(),
    }
    client.flush().await.unwrap();
}

// ---------------------------------------------------------------------------
// The sealed log
// ---------------------------------------------------------------------------

/// A relay sealing with `key` in blocks of `block_events` events or 50 ms.
pub fn sealing_relay(
    store: &EventStore,
    client: async_nats::Client,
    config: &RelayConfig,
    key: &neurectomy_commands::seal::key::SealKey,
    block_events: usize,
) -> neurectomy_commands::Relay {
    let sealing = neurectomy_commands::seal::sealer::SealerConfig {
        block_events,
        block_time: Duration::from_millis(50),
        ..neurectomy_commands::seal::sealer::SealerConfig::for_relay(config)
    };
    neurectomy_commands::Relay::new(store.clone(), client.clone(), config.clone()).with_sealer(
        neurectomy_commands::seal::sealer::Sealer::new(store.clone(), client, key.clone(), sealing),
    )
}

/// `audit verify` of the test's log, its seal copies included.
pub async fn seal_report(
    db: &neurectomy_commands::testkit::TestDatabase,
    nats: &neurectomy_commands::testkit::TestNats,
    key: &neurectomy_commands::seal::key::SealKey,
) -> neurectomy_commands::seal::verify::Report {
    let options = neurectomy_commands::seal::verify::VerifyOptions {
        log: nats.relay.stream_name.clone(),
        trusted: vec![key.public().clone()],
        copies: Some(format!("{}_SEALS", nats.relay.stream_name)),
        ..neurectomy_commands::seal::verify::VerifyOptions::default()
    };
    neurectomy_commands::seal::verify::verify(&db.pool, Some(&nats.jetstream()), &options, |_| {})
        .await
        .unwrap()
}

/// Waits until every event is sealed and copied, and the log verifies.
pub async fn sealed_and_clean(
    db: &neurectomy_commands::testkit::TestDatabase,
    nats: &neurectomy_commands::testkit::TestNats,
    key: &neurectomy_commands::seal::key::SealKey,
    store: &EventStore,
) {
    let head = store.head().await.unwrap().written;
    eventually("every event sealed and every seal copied", WAIT, || async {
        let report = seal_report(db, nats, key).await;
        assert_eq!(report.problem, None, "{report:?}");
        (report.sealed_to >= head && report.copies_missing == 0).then_some(())
    })
    .await;
    let report = seal_report(db, nats, key).await;
    let events = store.count_after(0, i64::MAX).await.unwrap();
    assert_eq!(report.events as i64, events, "{report:?}");
    assert_eq!(report.unsealed, 0, "{report:?}");
}
