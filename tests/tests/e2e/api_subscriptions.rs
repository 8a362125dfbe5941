//! GraphQL subscriptions over a real `graphql-transport-ws` connection to
//! the API started as in production (`neurectomy serve`'s `Application`) on the test's
//! own database, JetStream stream, Redis prefix and graph database, fed by a
//! running Redis projector: every subscription delivers; a subscriber that
//! reconnects with its last position misses nothing and sees nothing twice;
//! one that does not read is cut off with a resumable error; a tenant sees
//! nothing of another.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use api::auth::Role;
use commands::{CommandContext, CommandHandler, HandlerConfig};
use domain::{
    AgentCommand, AgentId, AgentKind, Command, TaskCommand, TaskId, WorkflowCommand, WorkflowId,
};
use neurectomy_e2e::pipeline::{Pipeline, Running};
use neurectomy_e2e::ws::{Client, Reply};
use projections::graph_testkit::TestGraph;
use projections::testkit::TestRedis;
use serde_json::{json, Value};
use uuid::Uuid;

const SECRET: &str = "subscription-tests-secret-of-at-least-32-bytes";

/// The pipeline, a Redis projector, and the API on port 0.
struct World {
    pipe: Pipeline,
    redis: TestRedis,
    _graph: TestGraph,
    _projector: Running,
    addr: SocketAddr,
    hub: api::http::hub::Hub,
    auth: api::auth::Authenticator,
    handler: CommandHandler,
}

async fn world(subscriber_buffer: usize) -> World {
    world_keeping(subscriber_buffer, commands::testkit::TestNats::MAX_BYTES).await
}

/// [`world`] with a JetStream stream that keeps `max_bytes`.
async fn world_keeping(subscriber_buffer: usize, max_bytes: u64) -> World {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("TEST_LOG"))
        .with_test_writer()
        .try_init();
    let pipe = Pipeline::start_with(|relay| relay.max_bytes = max_bytes).await;
    let redis = TestRedis::create().await.unwrap_or_else(|e| panic!("{e}"));
    let graph = TestGraph::create().await.unwrap_or_else(|e| panic!("{e}"));
    let projector = pipe.projector(redis.model.clone());
    let running = pipe.spawn(&projector);
    let buffer = subscriber_buffer.to_string();
    let cli = neurectomy_e2e::api_cli(
        &pipe,
        &redis,
        &graph,
        SECRET,
        &["--api-subscriber-buffer", &buffer],
    );
    let app = neurectomy_e2e::start_api(cli.settings.clone(), &pipe.stop.child_token()).await;
    let (addr, hub) = (app.addr().unwrap(), app.hub().unwrap().clone());
    tokio::spawn(app.run_until_stopped());
    let auth = api::startup::connect::authenticator(&cli.settings.api).unwrap();
    let handler = CommandHandler::new(pipe.store.clone(), HandlerConfig::default());
    World {
        pipe,
        redis,
        _graph: graph,
        _projector: running,
        addr,
        hub,
        auth,
        handler,
    }
}

impl World {
    fn token(&self, tenant: &str) -> String {
        self.auth
            .mint("tester", tenant, &[Role::Viewer], 600)
            .unwrap()
    }

    async fn run(&self, tenant: &str, command: Command) -> i64 {
        let ctx = CommandContext::new(Uuid::new_v4(), "tester", tenant);
        let outcome = self.handler.execute(command, &ctx).await.unwrap();
        outcome.position
    }

    async fn register(&self, tenant: &str, capabilities: &[&str]) -> String {
        let id = Uuid::new_v4();
        self.run(
            tenant,
            Command::Agent(AgentCommand::RegisterAgent {
                agent_id: AgentId::from_uuid(id),
                name: "worker".to_owned(),
                kind: AgentKind::Llm,
                model: Some("m".to_owned()),
                capabilities: capabilities.iter().map(|c| (*c).to_owned()).collect(),
                parent_agent_id: None,
            }),
        )
        .await;
        id.to_string()
    }

    async fn pause(&self, tenant: &str, agent: &str) -> i64 {
        self.run(
            tenant,
            Command::Agent(AgentCommand::PauseAgent {
                agent_id: AgentId::from_uuid(agent.parse().unwrap()),
                reason: None,
            }),
        )
        .await
    }

    async fn resume(&self, tenant: &str, agent: &str) -> i64 {
        self.run(
            tenant,
            Command::Agent(AgentCommand::ResumeAgent {
                agent_id: AgentId::from_uuid(agent.parse().unwrap()),
            }),
        )
        .await
    }

    async fn start_workflow(&self, tenant: &str, metadata: Value) -> String {
        let id = Uuid::new_v4();
        self.run(
            tenant,
            Command::Workflow(WorkflowCommand::StartWorkflow {
                workflow_id: WorkflowId::from_uuid(id),
                name: "flow".to_owned(),
                metadata,
            }),
        )
        .await;
        id.to_string()
    }

    async fn create_task(&self, tenant: &str, workflow: &str) -> i64 {
        self.run(
            tenant,
            Command::Task(TaskCommand::CreateTask {
                task_id: TaskId::from_uuid(Uuid::new_v4()),
                workflow_id: WorkflowId::from_uuid(workflow.parse().unwrap()),
                title: "step".to_owned(),
                input: json!({"n": 1}),
                required_capabilities: Vec::new(),
                depends_on: Vec::new(),
                priority: 50,
                max_attempts: 3,
            }),
        )
        .await
    }

    /// Positions of `tenant`'s events in the store after `after`.
    async fn positions(&self, tenant: &str, after: i64) -> Vec<i64> {
        let head = self.pipe.head().await;
        let mut out = Vec::new();
        let mut from = after;
        loop {
            let page = self
                .pipe
                .store
                .read_tenant(tenant, from, head, 1_000, None)
                .await
                .unwrap();
            out.extend(page.iter().map(|e| e.position));
            match page.last() {
                Some(last) if page.len() == 1_000 => from = last.position,
                _ => return out,
            }
        }
    }

    async fn connect(&self, tenant: &str) -> Client {
        Client::connect(self.addr, &self.token(tenant), None).await
    }

    async fn shutdown(self) {
        self.pipe.shutdown().await;
    }
}

/// A `graphql-transport-ws` client speaking the protocol by hand.
fn position(value: &Value) -> i64 {
    value
        .as_str()
        .unwrap_or_else(|| panic!("a position is a string, not {value}"))
        .parse()
        .unwrap()
}

const EVENTS: &str = "subscription($after: Position, $types: [String!]) { events(afterPosition: $after, types: $types) { position type streamId metadata { eventId } } }";
/// With the payload: large events fill the socket buffers.
const EVENTS_WITH_DATA: &str =
    "subscription($after: Position) { events(afterPosition: $after) { position type data } }";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_subscription_delivers_with_positions() {
    let world = world(1_024).await;
    let agent = world.register("acme", &["code"]).await;
    let workflow = world.start_workflow("acme", json!({})).await;
    let first_task = world.create_task("acme", &workflow).await;
    let now = world.pipe.caught_up(&world.redis.model).await.to_string();

    let mut client = world.connect("acme").await;
    client
        .subscribe(
            "one",
            "subscription($id: ID!, $now: Position) { agentUpdated(id: $id, afterPosition: $now) { position agent { id status capabilities lastPosition } } }",
            json!({"id": agent, "now": now}),
        )
        .await;
    client
        .subscribe(
            "many",
            "subscription($now: Position) { agentsUpdated(filter: {status: PAUSED, capability: \"code\"}, afterPosition: $now) { position agent { id status } } }",
            json!({"now": now}),
        )
        .await;
    client
        .subscribe(
            "flow",
            "subscription($w: ID!) { workflowEvents(workflowId: $w, afterPosition: \"0\") { position type streamId } }",
            json!({"w": workflow}),
        )
        .await;
    client
        .subscribe(
            "log",
            EVENTS,
            json!({"after": "0", "types": ["AgentPaused", "TaskCreated"]}),
        )
        .await;
    let mut others = Vec::new();

    // The workflow's history is replayed from the store.
    let started = client.next_of("flow", &mut others).await;
    assert_eq!(started["workflowEvents"]["type"], "WorkflowStarted");
    let created = client.next_of("flow", &mut others).await;
    assert_eq!(created["workflowEvents"]["type"], "TaskCreated");
    assert_eq!(position(&created["workflowEvents"]["position"]), first_task);
    let log = client.next_of("log", &mut others).await;
    assert_eq!(log["events"]["type"], "TaskCreated");
    assert_eq!(position(&log["events"]["position"]), first_task);
    assert!(log["events"]["metadata"]["eventId"].is_string());

    // Live changes, after the subscriptions started.
    let paused = world.pause("acme", &agent).await;
    let second_task = world.create_task("acme", &workflow).await;

    let one = client.next_of("one", &mut others).await;
    assert_eq!(position(&one["agentUpdated"]["position"]), paused);
    assert_eq!(one["agentUpdated"]["agent"]["id"], agent.as_str());
    assert_eq!(one["agentUpdated"]["agent"]["status"], "paused");
    assert_eq!(
        one["agentUpdated"]["agent"]["capabilities"],
        json!(["code"])
    );
    let many = client.next_of("many", &mut others).await;
    assert_eq!(position(&many["agentsUpdated"]["position"]), paused);
    assert_eq!(many["agentsUpdated"]["agent"]["id"], agent.as_str());
    let log = client.next_of("log", &mut others).await;
    assert_eq!(
        log["events"]["type"], "AgentPaused",
        "{log} after {paused} {second_task} {first_task}"
    );
    assert_eq!(position(&log["events"]["position"]), paused);
    let log = client.next_of("log", &mut others).await;
    assert_eq!(position(&log["events"]["position"]), second_task);
    // A task created after the subscription started maps to its workflow.
    let created = client.next_of("flow", &mut others).await;
    assert_eq!(created["workflowEvents"]["type"], "TaskCreated");
    assert_eq!(
        position(&created["workflowEvents"]["position"]),
        second_task
    );

    // Resuming an agent makes it leave the PAUSED filter: not delivered there.
    let resumed = world.resume("acme", &agent).await;
    let one = client.next_of("one", &mut others).await;
    assert_eq!(position(&one["agentUpdated"]["position"]), resumed);
    assert_eq!(one["agentUpdated"]["agent"]["status"], "active");
    assert!(
        !others
            .iter()
            .any(|r| matches!(r, Reply::Next(id, _) if id == "many")),
        "agentsUpdated(PAUSED) delivered more than the pause: {others:?}"
    );
    client.close().await;

    // agentUpdated with afterPosition starts with the current state.
    let mut client = world.connect("acme").await;
    client
        .subscribe(
            "again",
            "subscription($id: ID!) { agentUpdated(id: $id, afterPosition: \"0\") { position agent { status } } }",
            json!({"id": agent}),
        )
        .await;
    let snapshot = client.next_of("again", &mut others).await;
    assert_eq!(position(&snapshot["agentUpdated"]["position"]), resumed);
    assert_eq!(snapshot["agentUpdated"]["agent"]["status"], "active");
    client.close().await;
    world.shutdown().await;
}

/// Reads what a client that did not keep up was still sent (`events`
/// positions) and the error that cut it off, which must be
/// `SUBSCRIBER_TOO_SLOW`.
async fn cut_off(slow: &mut Client) -> (Vec<i64>, Value) {
    let mut got = Vec::new();
    let error = loop {
        match slow.reply(Duration::from_secs(30)).await {
            Reply::Next(_, data) => got.push(position(&data["events"]["position"])),
            Reply::Error(_, errors) => break errors,
            Reply::Complete(_) => panic!("completed without an error after {} events", got.len()),
        }
    };
    assert_eq!(
        error[0]["extensions"]["code"], "SUBSCRIBER_TOO_SLOW",
        "{error}"
    );
    (got, error)
}

/// Reads `events` positions on `client` until `until` is reached or
/// `stop_after` messages arrived.
async fn read_events(
    client: &mut Client,
    id: &str,
    until: Option<i64>,
    stop_after: usize,
) -> Vec<i64> {
    let mut got = Vec::new();
    let mut others = Vec::new();
    while got.len() < stop_after && until.is_none_or(|u| got.last().is_none_or(|l| *l < u)) {
        let data = client.next_of(id, &mut others).await;
        got.push(position(&data["events"]["position"]));
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resumed_subscription_misses_nothing_and_repeats_nothing() {
    // The stream keeps ~32 KiB (a few dozen events): resuming subscribers
    // fall behind its window, which must not matter (they replay the store).
    let world = world_keeping(1_024, 32 << 10).await;
    // Some history before anyone subscribes.
    world.pipe.simulate(Pipeline::workload(1, 200, 7)).await;
    // A workload that runs until the two sessions below are done.
    let keep_going = tokio_util::sync::CancellationToken::new();
    let simulation = tokio::spawn({
        let handler = world.handler.clone();
        let stop = keep_going.clone();
        async move {
            api::simulate::drive(handler, Pipeline::workload(120, 300, 8), stop)
                .await
                .unwrap();
        }
    });

    let history = world.positions("acme", 0).await.len();
    let mut client = world.connect("acme").await;
    client.subscribe("log", EVENTS, json!({"after": "0"})).await;
    // Disconnect mid-stream, while events keep coming: once past the
    // history, live.
    let mut first = read_events(&mut client, "log", None, history + 20).await;
    client.close().await;
    let last = *first.last().unwrap();

    let mut client = world.connect("acme").await;
    client
        .subscribe("log", EVENTS, json!({"after": last.to_string()}))
        .await;
    let mut second = read_events(&mut client, "log", None, 30).await;
    client.close().await;
    let last = *second.last().unwrap();

    // Once more, after the workload ended: replay then live.
    keep_going.cancel();
    simulation.await.unwrap();
    world.pipe.caught_up(&world.redis.model).await;
    let expected = world.positions("acme", 0).await;
    let end = *expected.last().unwrap();
    let mut client = world.connect("acme").await;
    client
        .subscribe("log", EVENTS, json!({"after": last.to_string()}))
        .await;
    let mut third = read_events(&mut client, "log", Some(end), usize::MAX).await;
    let live = world.register("acme", &[]).await;
    let _ = live;
    let mut fourth = read_events(&mut client, "log", None, 1).await;
    client.close().await;

    let mut got = Vec::new();
    got.append(&mut first);
    got.append(&mut second);
    got.append(&mut third);
    got.append(&mut fourth);
    let unique: BTreeSet<i64> = got.iter().copied().collect();
    assert_eq!(unique.len(), got.len(), "a position was delivered twice");
    assert!(
        got.windows(2).all(|w| w[0] < w[1]),
        "positions out of order"
    );
    let expected = world.positions("acme", 0).await;
    assert_eq!(
        got.len(),
        expected.len(),
        "delivered {} events, the store holds {}",
        got.len(),
        expected.len()
    );
    assert_eq!(
        got, expected,
        "the union of the subscriptions is not the log"
    );
    let stream = world
        .pipe
        .nats
        .jetstream()
        .get_stream(&world.pipe.nats.relay.stream_name)
        .await
        .unwrap();
    let first = stream.get_info().await.unwrap().state.first_sequence;
    assert!(
        first > expected.len() as u64 / 2,
        "the stream kept its history (first sequence {first}): the subscriptions were not behind its window"
    );
    world.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscriber_that_cannot_keep_up_is_cut_off_with_a_resumable_error() {
    let world = world(4).await;
    let agent = world.register("acme", &[]).await;
    let start = world.pipe.caught_up(&world.redis.model).await;

    // A client that reads nothing, with a small fixed receive window.
    let token = world.token("acme");
    let mut slow = Client::connect(world.addr, &token, Some(16 * 1024)).await;
    slow.subscribe("log", EVENTS_WITH_DATA, json!({"after": start.to_string()}))
        .await;
    // An observer on another channel: once it sees the last change, the
    // feed has fanned out everything before it.
    let mut observer = world.connect("acme").await;
    observer
        .subscribe(
            "one",
            "subscription($id: ID!, $start: Position) { agentUpdated(id: $id, afterPosition: $start) { position } }",
            json!({"id": agent, "start": start.to_string()}),
        )
        .await;
    let mut others = Vec::new();
    // Let both subscriptions start before the burst: a first change seen
    // by the observer.
    let warm = world.resume_or_pause(&agent, true).await;
    let seen = observer.next_of("one", &mut others).await;
    assert_eq!(position(&seen["agentUpdated"]["position"]), warm);

    // A burst far beyond the socket buffers and the subscriber buffer.
    let metadata = json!({"blob": "x".repeat(60 * 1024)});
    for _ in 0..15 {
        let batch = (0..10).map(|_| world.start_workflow("acme", metadata.clone()));
        futures::future::join_all(batch).await;
    }
    let last = world.resume_or_pause(&agent, false).await;
    let seen = observer.next_of("one", &mut others).await;
    assert_eq!(position(&seen["agentUpdated"]["position"]), last);

    // Now the slow client reads: what the sockets held, then the error.
    let (got, error) = cut_off(&mut slow).await;
    let message = error[0]["message"].as_str().unwrap();
    let resume_at = *got.last().unwrap();
    assert!(
        message.contains(&format!("afterPosition: \"{resume_at}\"")),
        "the error names the last delivered position {resume_at}: {message}"
    );
    assert!(
        got.len() < 152,
        "the slow client was not cut off early: {}",
        got.len()
    );
    match slow.reply(Duration::from_secs(10)).await {
        Reply::Complete(id) => assert_eq!(id, "log"),
        other => panic!("expected complete, got {other:?}"),
    }
    slow.close().await;

    // Resumable: from the last delivered position, the rest arrives.
    let mut client = world.connect("acme").await;
    client
        .subscribe("log", EVENTS, json!({"after": resume_at.to_string()}))
        .await;
    let rest = read_events(&mut client, "log", Some(last), usize::MAX).await;
    client.close().await;
    observer.close().await;
    let expected = world.positions("acme", start).await;
    let union: Vec<i64> = got.iter().chain(rest.iter()).copied().collect();
    assert_eq!(
        union, expected,
        "the cut-off and the resumed subscription do not add up to the log"
    );
    world.shutdown().await;
}

impl World {
    async fn resume_or_pause(&self, agent: &str, pause: bool) -> i64 {
        if pause {
            self.pause("acme", agent).await
        } else {
            self.resume("acme", agent).await
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_sees_nothing_of_another() {
    let world = world(1_024).await;
    let theirs = world.register("tenant-a", &["code"]).await;
    let registered = world.pipe.caught_up(&world.redis.model).await;

    let mut b = world.connect("tenant-b").await;
    b.subscribe("log", EVENTS, json!({"after": "0"})).await;
    b.subscribe(
        "agents",
        "subscription { agentsUpdated(afterPosition: \"0\") { position agent { id } } }",
        json!({}),
    )
    .await;
    b.subscribe(
        "theirs",
        "subscription($id: ID!) { agentUpdated(id: $id, afterPosition: \"0\") { position } }",
        json!({"id": theirs}),
    )
    .await;
    let workflow = Uuid::new_v4().to_string();
    b.subscribe(
        "flow",
        "subscription($w: ID!) { workflowEvents(workflowId: $w, afterPosition: \"0\") { position } }",
        json!({"w": workflow}),
    )
    .await;
    let mut a = world.connect("tenant-a").await;
    a.subscribe("log", EVENTS, json!({"after": registered.to_string()}))
        .await;

    // Tenant A is busy; then tenant B registers one agent.
    world.pause("tenant-a", &theirs).await;
    world.start_workflow("tenant-a", json!({})).await;
    let mut others = Vec::new();
    let seen_by_a = a.next_of("log", &mut others).await;
    assert_eq!(seen_by_a["events"]["type"], "AgentPaused");
    let ours = world.register("tenant-b", &[]).await;

    // B sees its own registration first and only.
    let log = b.next_of("log", &mut others).await;
    assert_eq!(log["events"]["type"], "AgentRegistered");
    assert_eq!(
        log["events"]["streamId"],
        format!("agent-{ours}").as_str(),
        "tenant B saw {log}"
    );
    let agents = b.next_of("agents", &mut others).await;
    assert_eq!(agents["agentsUpdated"]["agent"]["id"], ours.as_str());
    // Nothing else arrives for B: not A's agent, not A's events.
    if let Some(message) = b.receive(Duration::from_secs(1)).await {
        panic!("tenant B received {message}; earlier: {others:?}");
    }
    assert!(others.is_empty(), "tenant B received {others:?}");
    a.close().await;
    b.close().await;
    world.shutdown().await;
}

/// Waits until the API runs `n` shared subscription executions.
async fn executions(world: &World, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while world.hub.executions() != n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "expected {n} shared executions, the API runs {}",
            world.hub.executions()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_of_the_same_live_subscription_share_one_execution() {
    let world = world(256).await;
    let agent = world.register("acme", &[]).await;
    let start = world.pipe.caught_up(&world.redis.model).await;
    let live = "subscription { events { position type data } }";

    // Three clients that read, one that does not (a small receive window),
    // all with the same live subscription; another tenant with the same
    // document; and one resuming client, which runs on its own.
    let mut readers = Vec::new();
    for _ in 0..3 {
        let mut client = world.connect("acme").await;
        client.subscribe("live", live, json!({})).await;
        readers.push(client);
    }
    let token = world.token("acme");
    let mut slow = Client::connect(world.addr, &token, Some(16 * 1024)).await;
    slow.subscribe("live", live, json!({})).await;
    let mut other = world.connect("tenant-b").await;
    other.subscribe("live", live, json!({})).await;
    let mut resuming = world.connect("acme").await;
    resuming
        .subscribe("log", EVENTS, json!({"after": start.to_string()}))
        .await;
    executions(&world, 2).await;

    // Every client sees a first change (the executions are live).
    let warm = world.pause("acme", &agent).await;
    for client in readers.iter_mut().chain([&mut slow]) {
        let data = client.next_of("live", &mut Vec::new()).await;
        assert_eq!(position(&data["events"]["position"]), warm);
    }

    // A burst far beyond the socket buffers and the subscriber buffer,
    // while the readers read.
    let reading: Vec<_> = readers
        .into_iter()
        .map(|mut client| {
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut others = Vec::new();
                loop {
                    let data = client.next_of("live", &mut others).await;
                    let p = position(&data["events"]["position"]);
                    got.push(p);
                    if data["events"]["type"] == "AgentResumed" {
                        return (client, got);
                    }
                }
            })
        })
        .collect();
    let metadata = json!({"blob": "x".repeat(60 * 1024)});
    for _ in 0..40 {
        let batch = (0..10).map(|_| world.start_workflow("acme", metadata.clone()));
        futures::future::join_all(batch).await;
    }
    let last = world.resume("acme", &agent).await;
    let expected = world.positions("acme", warm).await;
    assert_eq!(expected.last(), Some(&last));

    // Each reader got every change once, in order.
    let mut readers = Vec::new();
    for task in reading {
        let (client, got) = tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("a reader did not see the last change")
            .unwrap();
        assert_eq!(
            got, expected,
            "a client of the shared execution missed or repeated changes"
        );
        readers.push(client);
    }
    // The resuming client got the whole log after its position, alone.
    let log = read_events(&mut resuming, "log", Some(last), usize::MAX).await;
    assert_eq!(log, world.positions("acme", start).await);

    // The slow client alone was cut off, with the last position it was sent.
    let (got, error) = cut_off(&mut slow).await;
    let resume_at = got.last().copied().unwrap_or(warm);
    let message = error[0]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("afterPosition: \"{resume_at}\"")),
        "the error names the last position sent {resume_at}: {message}"
    );
    assert!(got.len() < expected.len(), "not cut off: {}", got.len());
    assert_eq!(
        got[..],
        expected[..got.len()],
        "what it was sent is in order"
    );
    match slow.reply(Duration::from_secs(10)).await {
        Reply::Complete(id) => assert_eq!(id, "live"),
        other => panic!("expected complete, got {other:?}"),
    }
    // The other tenant saw none of it.
    assert!(
        other.receive(Duration::from_millis(300)).await.is_none(),
        "another tenant's client received acme's events"
    );

    // The execution ends with its last client; a new client starts another.
    slow.close().await;
    for client in readers {
        client.close().await;
    }
    resuming.close().await;
    executions(&world, 1).await;
    let mut late = world.connect("acme").await;
    late.subscribe("live", live, json!({})).await;
    executions(&world, 2).await;
    let paused = world.pause("acme", &agent).await;
    let data = late.next_of("live", &mut Vec::new()).await;
    assert_eq!(position(&data["events"]["position"]), paused);
    late.close().await;
    other.close().await;
    executions(&world, 0).await;
    world.shutdown().await;
}
