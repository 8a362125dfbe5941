//! Fault tests (issue 11, and issue 12's PostgreSQL outage): `neurectomy
//! all` — the relay, both projectors and the GraphQL API in one process, as
//! deployed, with the production timeouts — runs under a load of mutations
//! and reads while one of its services is killed with SIGKILL and started
//! again. That service is a private server of the test's own, on ports and
//! data of its own (`neurectomy_e2e::services`); the others are the shared
//! services, with a scratch database, JetStream stream, Redis prefix and
//! graph database (`neurectomy_e2e::instance`).
//!
//! The load: [`WORKERS`] clients, each registering an agent and starting a
//! workflow, then creating, assigning, starting and completing tasks and
//! pausing and resuming its agent, one mutation at a time, each followed by
//! a read of its agent from Redis (`agent`) and from the graph
//! (`agentNeighbourhood`); and a client reading those agents the same way
//! without pause. A mutation answered `UNAVAILABLE` (or not at all) is sent
//! again with the same `commandId`, as the error tells clients to. Every
//! request is timed. Nothing in the load is random but the ids.
//!
//! Every test asserts, besides its own points:
//! - no request hangs: each one is answered within [`bound`] of what it
//!   touches (that dependency's timeout in the production settings, plus
//!   slack for a busy two-core debug build), and `/readyz` within
//!   [`READYZ_BOUND`] (it waits 2 s per dependency, all at once);
//! - while the service is down `/readyz` says not ready, naming it, and
//!   `neurectomy status` answers within [`STATUS_BOUND`];
//! - what does not need the dead service keeps working: every request that
//!   ran entirely while it was down and does not touch it succeeded;
//! - once the service answers again, within [`RECOVERY`]: both read models
//!   reach the head, `projectionStatus` reports both `live` at the head,
//!   `/readyz` is ready, and reads answer again;
//! - nothing is lost or duplicated: every acknowledged mutation is in the
//!   store, whole, where its answer said, and nothing else is; no stream
//!   has a gap; JetStream mirrors the store exactly (`testkit::mirror`);
//!   `verify` finds both read models equal to the store at the head;
//! - the process still shuts down cleanly on SIGTERM.
//!
//! Recovery times are printed (`cargo test -p neurectomy-e2e --test e2e
//! faults:: -- --nocapture`).
//!
//! What each test proves on top:
//! - `redis_killed_and_restarted_empty`: Redis (keeping nothing on disk)
//!   dies twice. Reads from Redis fail fast with `UNAVAILABLE` while it is
//!   down. The first time the load goes on through the restart. The second
//!   time the writers have stopped and both projections are idle at the
//!   head before the kill, only reads go on, and nothing is written after
//!   Redis comes back empty: only the Redis projector's own look at its
//!   idle model can notice. The model is rebuilt from the store, `/readyz`
//!   never says ready while it is behind, and reads find the agents again.
//!   A subscriber to `events` open throughout (resubscribing from its last
//!   position if the server ends its subscription) receives every event
//!   exactly once, in order.
//! - `graph_server_killed_and_restarted`: the graph server dies for
//!   seconds. Graph reads fail fast with `UNAVAILABLE`; the projector,
//!   which was retrying a batch, applies up to the head within seconds of
//!   the restart and reports `live` again (not `retrying`).
//! - `nats_killed_and_restarted`: NATS dies for seconds. No client
//!   notices but through staleness and `/readyz`; the relay and the
//!   projectors resume, and the stream holds every event once, in order.
//! - `postgres_killed_and_restarted`: PostgreSQL (the server and every
//!   backend) dies for seconds. Mutations fail fast with `UNAVAILABLE`
//!   telling the client to retry with the same commandId; each retry after
//!   the restart succeeds, exactly once: `replayed` exactly when an attempt
//!   during the outage had committed. A mutation acknowledged before the
//!   outage and sent again after it (a client that lost the answer) is
//!   `replayed` with the first run's result.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use api::auth::{Authenticator, Role};
use commands::testkit::eventually;
use commands::EventStore;
use neurectomy_e2e::instance::{Endpoints, Instance, Scratch, SECRET};
use neurectomy_e2e::services::{PrivateGraph, PrivateNats, PrivatePostgres, PrivateRedis};
use projections::ReadModel as _;
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::support::{last_published, streams_with_gaps};

const BINARY: &str = env!("CARGO_BIN_EXE_neurectomy-e2e");
const TENANT: &str = "faults";

/// Clients of the load.
const WORKERS: usize = 3;
/// Least time between two requests of one client (about 50 requests a
/// second each: load, not a benchmark, on two shared cores).
const PACE: Duration = Duration::from_millis(20);
/// How long a service stays down: several seconds, longer than every
/// retry delay and reconnect interval involved (at most 1 s each).
const OUTAGE: Duration = Duration::from_secs(4);
/// Requests that must have failed while a service was down before it is
/// started again (so that the outage was seen).
const FAILED_AT_LEAST: usize = 3;
/// Events written before a service is killed.
const EVENTS_BEFORE: i64 = 150;
/// Longest `/readyz` may take: it waits at most 2 s for any dependency.
const READYZ_BOUND: Duration = Duration::from_secs(5);
/// Longest `neurectomy status` may take: at most 5 s per dependency (four)
/// and its start.
const STATUS_BOUND: Duration = Duration::from_secs(25);
/// Longest recovery after a restart: read models at the head, projections
/// live, `/readyz` ready. Projectors retry at most 1 s apart and check an
/// idle model every second, and a projector's state is re-published at
/// least every 5 s; the rest is slack for a busy two-core debug build.
const RECOVERY: Duration = Duration::from_secs(30);
/// How long a client of the load keeps retrying one mutation.
const RETRY_FOR: Duration = Duration::from_secs(120);

/// What a request touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A mutation: PostgreSQL.
    Mutation,
    /// A read of the Redis model.
    Redis,
    /// A read of the graph model.
    Graph,
}

/// How long a request may take at most: the timeout of what it touches in
/// the production settings (Redis: 2 s per reply and a dropped connection
/// retried three times within ~3 s; PostgreSQL: 3 s to get a connection;
/// the graph: 10 s per unit of work) plus slack.
fn bound(kind: Kind) -> Duration {
    match kind {
        Kind::Mutation | Kind::Redis => Duration::from_secs(10),
        Kind::Graph => Duration::from_secs(15),
    }
}

/// How a request was answered.
#[derive(Debug, Clone)]
enum Outcome {
    /// The field's data.
    Data(Value),
    /// A GraphQL error.
    Refused { code: String, message: String },
    /// No answer.
    Transport(#[expect(dead_code, reason = "shown in failure messages")] String),
}

/// One request of the load.
#[derive(Debug, Clone)]
struct Sent {
    kind: Kind,
    field: &'static str,
    /// The mutation's command id.
    command: Option<Uuid>,
    /// The request (sent again in a test).
    query: String,
    variables: Value,
    started: Instant,
    /// When it was sent, by the wall clock (compared with `recorded_at`).
    wall: SystemTime,
    took: Duration,
    outcome: Outcome,
}

impl Sent {
    fn finished(&self) -> Instant {
        self.started + self.took
    }

    fn unavailable(&self) -> bool {
        matches!(&self.outcome, Outcome::Refused { code, .. } if code == "UNAVAILABLE")
    }

    fn answered(&self) -> bool {
        matches!(self.outcome, Outcome::Data(_))
    }

    /// One line for failure messages.
    fn brief(&self) -> String {
        format!(
            "{} ({:?}, command {:?}) took {:?}: {:?}",
            self.field, self.kind, self.command, self.took, self.outcome
        )
    }
}

/// Requests, one line each.
fn briefly<'a>(sent: impl IntoIterator<Item = &'a Sent>) -> String {
    sent.into_iter()
        .map(Sent::brief)
        .collect::<Vec<_>>()
        .join("\n")
}

/// A GraphQL client of the API.
#[derive(Clone)]
struct Client {
    http: reqwest::Client,
    api: SocketAddr,
    token: String,
}

impl Client {
    fn new(api: SocketAddr) -> Self {
        let token = Authenticator::new(Some(SECRET), None)
            .unwrap()
            .mint("faults", TENANT, &[Role::Operator, Role::Viewer], 3600)
            .unwrap();
        Self {
            // Far above every bound: a hang shows as a slow request.
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
            api,
            token,
        }
    }

    /// Sends `query` and times it; the outcome is `data.<field>` or the
    /// first error.
    async fn send(
        &self,
        kind: Kind,
        field: &'static str,
        command: Option<Uuid>,
        query: &str,
        variables: Value,
    ) -> Sent {
        let (started, wall) = (Instant::now(), SystemTime::now());
        let answer = async {
            self.http
                .post(format!("http://{}/graphql", self.api))
                .bearer_auth(&self.token)
                .json(&json!({ "query": query, "variables": &variables }))
                .send()
                .await?
                .json::<Value>()
                .await
        }
        .await;
        let outcome = match answer {
            Err(e) => Outcome::Transport(e.to_string()),
            Ok(body) => match body["errors"].get(0) {
                Some(error) => Outcome::Refused {
                    code: error["extensions"]["code"]
                        .as_str()
                        .unwrap_or("")
                        .to_owned(),
                    message: error["message"].as_str().unwrap_or("").to_owned(),
                },
                None => Outcome::Data(body["data"][field].clone()),
            },
        };
        Sent {
            kind,
            field,
            command,
            query: query.to_owned(),
            variables,
            started,
            wall,
            took: started.elapsed(),
            outcome,
        }
    }

    /// `GET /readyz`: whether ready, and the body; fails if it takes
    /// longer than [`READYZ_BOUND`].
    async fn readyz(&self) -> (bool, Value) {
        let started = Instant::now();
        let response = self
            .http
            .get(format!("http://{}/readyz", self.api))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap();
        let took = started.elapsed();
        assert!(
            took <= READYZ_BOUND,
            "/readyz took {took:?} (at most {READYZ_BOUND:?}): {body}"
        );
        assert_eq!(status == 200, body["ready"] == true, "{status}: {body}");
        (status == 200, body)
    }

    /// `projectionStatus` by name: (state, checkpoint, head), or `None`
    /// when it failed.
    async fn projections(&self) -> Option<BTreeMap<String, (String, i64, i64)>> {
        let query = "{ projectionStatus { name state checkpoint head } }";
        let sent = self
            .send(Kind::Redis, "projectionStatus", None, query, json!({}))
            .await;
        let Outcome::Data(Value::Array(rows)) = sent.outcome else {
            return None;
        };
        let position = |v: &Value| v.as_str().and_then(|s| s.parse().ok()).unwrap_or(-1);
        Some(
            rows.iter()
                .map(|row| {
                    (
                        row["name"].as_str().unwrap_or("").to_owned(),
                        (
                            row["state"].as_str().unwrap_or("").to_owned(),
                            position(&row["checkpoint"]),
                            position(&row["head"]),
                        ),
                    )
                })
                .collect(),
        )
    }
}

const RESULT: &str = "{ streamId version position replayed events { type } }";

fn mutation(signature: &str, call: &str) -> String {
    format!("mutation({signature}) {{ {call} {RESULT} }}")
}

/// One client of the load.
struct Worker {
    client: Client,
    sent: Arc<Mutex<Vec<Sent>>>,
    pace: tokio::time::Interval,
    agent: String,
}

impl Worker {
    /// Runs `query` until it is answered: again with the same command id
    /// after `UNAVAILABLE` or no answer, for at most [`RETRY_FOR`]. False
    /// if it was refused otherwise, or never answered.
    async fn mutate(&mut self, field: &'static str, query: &str, mut variables: Value) -> bool {
        let command = Uuid::new_v4();
        variables["command"] = json!(command.to_string());
        let give_up = Instant::now() + RETRY_FOR;
        loop {
            self.pace.tick().await;
            let sent = self
                .client
                .send(
                    Kind::Mutation,
                    field,
                    Some(command),
                    query,
                    variables.clone(),
                )
                .await;
            let retry = sent.unavailable() || matches!(sent.outcome, Outcome::Transport(_));
            let answered = sent.answered();
            self.sent.lock().unwrap().push(sent);
            if answered {
                return true;
            }
            if !retry || Instant::now() > give_up {
                return false;
            }
        }
    }

    /// Reads the worker's agent from Redis and from the graph.
    async fn read(&mut self) {
        Self::read_agent(&self.client, &self.sent, &mut self.pace, &self.agent).await;
    }

    /// Reads `agent` from Redis and from the graph.
    async fn read_agent(
        client: &Client,
        log: &Mutex<Vec<Sent>>,
        pace: &mut tokio::time::Interval,
        agent: &str,
    ) {
        let reads = [
            (
                Kind::Redis,
                "agent",
                "query($id: ID!) { agent(id: $id) { id status } }",
            ),
            (
                Kind::Graph,
                "agentNeighbourhood",
                "query($id: ID!) { agentNeighbourhood(id: $id) { id tasks { id } } }",
            ),
        ];
        for (kind, field, query) in reads {
            pace.tick().await;
            let sent = client
                .send(kind, field, None, query, json!({ "id": agent }))
                .await;
            log.lock().unwrap().push(sent);
        }
    }

    /// The script, until `stop` (between two steps).
    async fn run(mut self, stop: CancellationToken) {
        let agent = self.agent.clone();
        let workflow = Uuid::new_v4().to_string();
        let register = mutation(
            "$id: ID!, $command: ID!",
            "registerAgent(id: $id, name: \"worker\", kind: TOOL, capabilities: [\"faults\"], commandId: $command)",
        );
        let start_workflow = mutation(
            "$id: ID!, $command: ID!",
            "startWorkflow(id: $id, name: \"faults\", commandId: $command)",
        );
        let create = mutation(
            "$id: ID!, $workflow: ID!, $command: ID!",
            "createTask(id: $id, workflowId: $workflow, title: \"work\", requiredCapabilities: [\"faults\"], commandId: $command)",
        );
        let assign = mutation(
            "$task: ID!, $agent: ID!, $command: ID!",
            "assignTask(taskId: $task, agentId: $agent, commandId: $command)",
        );
        let start = mutation(
            "$task: ID!, $command: ID!",
            "startTask(taskId: $task, commandId: $command)",
        );
        let complete = mutation(
            "$task: ID!, $command: ID!",
            "completeTask(taskId: $task, commandId: $command)",
        );
        let pause = mutation(
            "$agent: ID!, $command: ID!",
            "pauseAgent(agentId: $agent, commandId: $command)",
        );
        let resume = mutation(
            "$agent: ID!, $command: ID!",
            "resumeAgent(agentId: $agent, commandId: $command)",
        );
        if !self
            .mutate("registerAgent", &register, json!({ "id": agent }))
            .await
            || !self
                .mutate("startWorkflow", &start_workflow, json!({ "id": workflow }))
                .await
        {
            return;
        }
        for round in 0u64.. {
            let task = Uuid::new_v4().to_string();
            let mut steps = vec![
                (
                    "createTask",
                    &create,
                    json!({ "id": task, "workflow": workflow }),
                ),
                (
                    "assignTask",
                    &assign,
                    json!({ "task": task, "agent": agent }),
                ),
                ("startTask", &start, json!({ "task": task })),
                ("completeTask", &complete, json!({ "task": task })),
            ];
            if round % 4 == 3 {
                steps.push(("pauseAgent", &pause, json!({ "agent": agent })));
                steps.push(("resumeAgent", &resume, json!({ "agent": agent })));
            }
            for (field, query, variables) in steps {
                if stop.is_cancelled() || !self.mutate(field, query, variables).await {
                    return;
                }
                self.read().await;
            }
        }
    }
}

/// The clients of the load, running: [`WORKERS`] writers and a reader.
struct Load {
    stop: CancellationToken,
    sent: Arc<Mutex<Vec<Sent>>>,
    workers: Vec<JoinHandle<()>>,
    /// The agent of each worker.
    agents: Vec<String>,
}

impl Load {
    /// [`WORKERS`] writers, and a reader of their agents.
    fn start(client: &Client) -> Self {
        let agents: Vec<String> = (0..WORKERS).map(|_| Uuid::new_v4().to_string()).collect();
        Self::with(client, agents, true)
    }

    /// Only a reader of `agents`.
    fn reader(client: &Client, agents: Vec<String>) -> Self {
        Self::with(client, agents, false)
    }

    fn with(client: &Client, agents: Vec<String>, write: bool) -> Self {
        let stop = CancellationToken::new();
        let sent = Arc::new(Mutex::new(Vec::new()));
        let pace = || {
            let mut pace = tokio::time::interval(PACE);
            pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            pace
        };
        let mut workers = Vec::new();
        for agent in agents.iter().filter(|_| write) {
            let worker = Worker {
                client: client.clone(),
                sent: sent.clone(),
                pace: pace(),
                agent: agent.clone(),
            };
            workers.push(tokio::spawn(worker.run(stop.clone())));
        }
        // A client that only reads: reads go on while the writers wait for
        // PostgreSQL, or after they stopped.
        workers.push(tokio::spawn({
            let (client, sent, stop, agents) =
                (client.clone(), sent.clone(), stop.clone(), agents.clone());
            let mut pace = pace();
            async move {
                for agent in agents.iter().cycle() {
                    if stop.is_cancelled() {
                        return;
                    }
                    Worker::read_agent(&client, &sent, &mut pace, agent).await;
                }
            }
        }));
        Self {
            stop,
            sent,
            workers,
            agents,
        }
    }

    /// Every request so far.
    fn sent(&self) -> Vec<Sent> {
        self.sent.lock().unwrap().clone()
    }

    /// Waits until at least `count` requests of `kind` started at or after
    /// `since` were answered `UNAVAILABLE`.
    async fn failures(&self, kind: Kind, since: Instant, count: usize) {
        let what = format!("{count} {kind:?} requests to be answered UNAVAILABLE");
        eventually(&what, Duration::from_secs(60), || async {
            let failed = self
                .sent
                .lock()
                .unwrap()
                .iter()
                .filter(|s| s.kind == kind && s.started >= since && s.unavailable())
                .count();
            (failed >= count).then_some(())
        })
        .await;
    }

    /// Waits until at least `count` requests of `kind` started at or after
    /// `since` were answered with data.
    async fn answers(&self, kind: Kind, since: Instant, count: usize) {
        let what = format!("{count} {kind:?} requests to be answered");
        eventually(&what, RECOVERY, || async {
            let answered = self
                .sent
                .lock()
                .unwrap()
                .iter()
                .filter(|s| s.kind == kind && s.started >= since && s.answered())
                .count();
            (answered >= count).then_some(())
        })
        .await;
    }

    /// Stops the clients after their current step (a mutation being retried
    /// is retried until answered) and returns every request.
    async fn finish(self) -> Vec<Sent> {
        self.stop.cancel();
        for worker in self.workers {
            tokio::time::timeout(RETRY_FOR + Duration::from_secs(60), worker)
                .await
                .expect("a client of the load did not stop")
                .unwrap();
        }
        let sent = self.sent.lock().unwrap().clone();
        sent
    }
}

/// `neurectomy all` on scratch resources, and a client of its API.
struct Stack {
    scratch: Scratch,
    all: Instance,
    client: Client,
}

impl Stack {
    async fn start(endpoints: Endpoints) -> Self {
        let scratch = Scratch::create_on(BINARY, endpoints).await;
        let all = Instance::spawn("all", scratch.command(&["all"], &[]));
        let api = all.address("GraphQL API listening").await;
        Self {
            scratch,
            all,
            client: Client::new(api),
        }
    }

    fn store(&self) -> EventStore {
        EventStore::new(self.scratch.db.pool.clone())
    }

    async fn events(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&self.scratch.db.pool)
            .await
            .unwrap()
    }

    /// Waits until the load has written [`EVENTS_BEFORE`] events and both
    /// read models applied them. The load keeps writing, so the head is
    /// taken once and the models must reach it: both at the moving head at
    /// the same instant is a race a projector a batch behind can lose for
    /// minutes.
    async fn loaded(&self) {
        eventually(
            "the load to write its first events",
            Duration::from_secs(60),
            || async { (self.events().await >= EVENTS_BEFORE).then_some(()) },
        )
        .await;
        let head = self.scratch.head().await;
        eventually(
            "both read models to apply the first events",
            Duration::from_secs(60),
            || async {
                let redis = self.scratch.redis.model.checkpoint().await.ok()?;
                let graph = self.scratch.graph.model.checkpoint().await.ok()?;
                (redis >= head && graph >= head).then_some(())
            },
        )
        .await;
    }

    /// Waits until `/readyz` is ready, at most [`RECOVERY`] after `since`;
    /// returns how long after `since` it was.
    async fn ready(&self, what: &str, since: Instant) -> Duration {
        loop {
            let (ready, body) = self.client.readyz().await;
            if ready {
                return since.elapsed();
            }
            assert!(
                since.elapsed() < RECOVERY,
                "/readyz not ready {:?} after {what}: {body}\nthe process's log:\n{}",
                since.elapsed(),
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `/readyz` says not ready because `dependency` fails
    /// (a client may take a moment to see its connection gone); then,
    /// optionally, until it reports `projection` in `state`.
    async fn not_ready(&self, dependency: &str, projection: Option<(&str, &str)>) {
        let started = Instant::now();
        loop {
            let (ready, body) = self.client.readyz().await;
            let reported =
                projection.is_none_or(|(name, state)| body["projections"][name] == state);
            if !ready && body[dependency] != "ok" && reported {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "/readyz with {dependency} down (want {projection:?}): {body}\nthe process's log:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `neurectomy status` answers within [`STATUS_BOUND`]; returns its
    /// exit status and output.
    async fn status(&self) -> (bool, String) {
        let started = Instant::now();
        let output = tokio::time::timeout(
            STATUS_BOUND,
            self.scratch.command(&["status"], &[]).output(),
        )
        .await
        .unwrap_or_else(|_| panic!("`neurectomy status` took more than {STATUS_BOUND:?}"))
        .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        eprintln!(
            "`neurectomy status` answered in {:?}:\n{text}",
            started.elapsed()
        );
        (output.status.success(), text)
    }

    /// The process's errors and the end of its log (without the warning
    /// of every read that failed), for failure messages.
    fn log_tail(&self) -> String {
        let log = self.all.log.lock().unwrap();
        let errors = log.iter().filter(|l| l.contains("\"level\":\"ERROR\""));
        let rest: Vec<&String> = log
            .iter()
            .filter(|l| !l.contains("\"read failed\""))
            .collect();
        let tail = rest[rest.len().saturating_sub(40)..].iter().copied();
        errors.chain(tail).cloned().collect::<Vec<_>>().join("\n")
    }

    /// After the load stopped: both read models reach the head, both
    /// projections report `live` at it, `/readyz` is ready — each within
    /// [`RECOVERY`] of `since` — and then everything is checked against the
    /// store. Returns the head.
    async fn settle(&self, what: &str, since: Instant, sent: &[Sent]) -> i64 {
        let head = self.scratch.head().await;
        let redis = self.scratch.redis.model.clone();
        let graph = self.scratch.graph.model.clone();
        let deadline = since + RECOVERY;
        let left = || deadline.saturating_duration_since(Instant::now());
        eventually(
            &format!("both read models at the head {head} after {what}"),
            left(),
            || async {
                let redis = redis.checkpoint().await.ok()?;
                let graph = graph.checkpoint().await.ok()?;
                (redis == head && graph == head).then_some(())
            },
        )
        .await;
        let at_head = since.elapsed();
        let live = loop {
            let statuses = self.client.projections().await;
            let live = statuses.as_ref().is_some_and(|s| {
                s.len() == 2
                    && s.values().all(|(state, checkpoint, h)| {
                        state == "live" && *checkpoint == head && *h == head
                    })
            });
            if live {
                break since.elapsed();
            }
            assert!(
                Instant::now() < deadline,
                "projectionStatus {RECOVERY:?} after {what}: {statuses:?}, not both live at {head}\nthe process's log:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let ready = self.ready(what, since).await;
        eprintln!(
            "{what}: read models at the head after {at_head:?}, both projections live after {live:?}, /readyz ready after {ready:?}"
        );
        self.check(head, sent).await;
        head
    }

    /// Every acknowledged mutation is in the store, whole, where its answer
    /// said, and nothing else is; JetStream mirrors the store; both read
    /// models verify clean at `head`.
    async fn check(&self, head: i64, sent: &[Sent]) {
        let pool = &self.scratch.db.pool;
        let mut acknowledged = 0i64;
        for s in sent.iter().filter(|s| s.kind == Kind::Mutation) {
            let Outcome::Data(result) = &s.outcome else {
                continue;
            };
            acknowledged += 1;
            let command = s.command.unwrap();
            let (count, position, stream): (i64, Option<i64>, Option<String>) = sqlx::query_as(
                "SELECT count(*), max(position), max(stream_id) FROM events WHERE command_id = $1",
            )
            .bind(command)
            .fetch_one(pool)
            .await
            .unwrap();
            let events = result["events"].as_array().unwrap().len() as i64;
            let answered: i64 = result["position"].as_str().unwrap().parse().unwrap();
            assert_eq!(count, events, "events of {} {command}", s.field);
            assert_eq!(
                position,
                Some(answered),
                "position of {} {command}",
                s.field
            );
            assert_eq!(stream.as_deref(), result["streamId"].as_str());
        }
        let commands: i64 = sqlx::query_scalar("SELECT count(DISTINCT command_id) FROM events")
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!(
            commands, acknowledged,
            "the store holds exactly the acknowledged commands"
        );
        let broken = streams_with_gaps(pool).await;
        assert_eq!(broken, 0, "streams with gaps");

        // The relay has published the head (its checkpoint is written at
        // most a second after JetStream acknowledged it), then the stream
        // is checked message by message.
        let nats = &self.scratch.nats;
        let js = nats.jetstream();
        let stream_name = nats.relay.stream_name.clone();
        eventually(
            "the relay to publish and checkpoint the head",
            RECOVERY,
            || async {
                let checkpoint: Option<i64> =
                    sqlx::query_scalar("SELECT position FROM relay_checkpoints WHERE relay = $1")
                        .bind(&stream_name)
                        .fetch_optional(pool)
                        .await
                        .ok()?;
                let (_, published) = last_published(&js, &stream_name).await?;
                (checkpoint == Some(head) && published == head).then_some(())
            },
        )
        .await;
        let store = self.store();
        let events = commands::testkit::mirror::read_everything(&store).await;
        commands::testkit::mirror::assert_mirror(&events, &js, &nats.relay).await;

        let live = projections::verify::verify_redis_confirmed(&store, &self.scratch.redis.model)
            .await
            .unwrap();
        assert!(
            live.differences.is_empty(),
            "Redis differs from the store: {:#?}",
            live.differences
        );
        assert_eq!(live.until, head, "Redis verified up to");
        let graph = projections::verify::verify_graph_confirmed(&store, &self.scratch.graph.model)
            .await
            .unwrap();
        assert!(
            graph.differences.is_empty(),
            "the graph differs from the store: {:#?}",
            graph.differences
        );
        assert_eq!(graph.until, head, "the graph verified up to");
        eprintln!(
            "{} events, {acknowledged} acknowledged mutations: all in the store once, mirrored exactly, both read models verify clean",
            events.len()
        );
    }

    /// SIGTERM: exits 0.
    async fn shut_down(mut self) {
        let (code, took) = self.all.stop(Duration::from_secs(40)).await;
        assert_eq!(code, Some(0), "exit after {took:?}:\n{}", self.log_tail());
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // A failed assertion anywhere shows what the process was doing.
        if std::thread::panicking() {
            eprintln!("the process's log:\n{}", self.log_tail());
        }
    }
}

/// Every request answered within its [`bound`].
fn none_hung(sent: &[Sent]) {
    let slow: Vec<&Sent> = sent.iter().filter(|s| s.took > bound(s.kind)).collect();
    assert!(
        slow.is_empty(),
        "{} request(s) took longer than their bound (mutations and Redis reads {:?}, graph reads {:?}):\n{}",
        slow.len(),
        bound(Kind::Mutation),
        bound(Kind::Graph),
        briefly(slow)
    );
}

/// Requests of `kind` that ran entirely between `from` and `to`.
fn within(sent: &[Sent], kind: Kind, from: Instant, to: Instant) -> Vec<&Sent> {
    sent.iter()
        .filter(|s| s.kind == kind && s.started >= from && s.finished() <= to)
        .collect()
}

/// During the outage `[from, to]`: every request of `kinds` answered
/// `UNAVAILABLE`, at least [`FAILED_AT_LEAST`]. Returns how many, and the
/// slowest.
fn failed_fast(sent: &[Sent], from: Instant, to: Instant, kinds: &[Kind]) -> (usize, Duration) {
    let mut failures = 0;
    let mut slowest = Duration::ZERO;
    for kind in kinds {
        let during = within(sent, *kind, from, to);
        let other: Vec<&Sent> = during
            .iter()
            .copied()
            .filter(|s| !s.unavailable())
            .collect();
        assert!(
            other.is_empty(),
            "{kind:?} requests during the outage not answered UNAVAILABLE:\n{}",
            briefly(other)
        );
        failures += during.len();
        slowest = during.iter().map(|s| s.took).fold(slowest, Duration::max);
    }
    assert!(
        failures >= FAILED_AT_LEAST,
        "only {failures} request(s) of {kinds:?} ran during the outage"
    );
    (failures, slowest)
}

/// During the outage `[from, to]`: every request of `kinds` (which do not
/// need the dead service) answered with data. Returns how many.
fn kept_working(sent: &[Sent], from: Instant, to: Instant, kinds: &[Kind]) -> usize {
    let mut answered = 0;
    for kind in kinds {
        let during = within(sent, *kind, from, to);
        let failed: Vec<&Sent> = during.iter().copied().filter(|s| !s.answered()).collect();
        assert!(
            failed.is_empty(),
            "{kind:?} requests failed during the outage, though they do not need the dead service:\n{}",
            briefly(failed)
        );
        answered += during.len();
    }
    answered
}

/// A subscriber to the tenant's `events` from position 0, resubscribing
/// from its last position whenever the server ends its subscription.
struct Watcher {
    /// Every position received, in order.
    positions: Arc<Mutex<Vec<i64>>>,
    stop: CancellationToken,
    /// Ends with how often it had to subscribe again.
    task: JoinHandle<usize>,
}

impl Watcher {
    fn start(client: &Client) -> Self {
        let (api, token) = (client.api, client.token.clone());
        let positions = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (positions, stop) = (positions.clone(), stop.clone());
            async move {
                let query =
                    "subscription($after: Position) { events(afterPosition: $after) { position } }";
                let mut ws = neurectomy_e2e::ws::Client::connect(api, &token, None).await;
                // Subscriptions are numbered; `resubscribed` is the last one.
                let mut resubscribed = 0usize;
                let mut subscription = resubscribed.to_string();
                ws.subscribe(&subscription, query, json!({ "after": "0" }))
                    .await;
                while !stop.is_cancelled() {
                    let Some(message) = ws.receive(Duration::from_millis(200)).await else {
                        continue;
                    };
                    if message["id"].as_str() != Some(subscription.as_str()) {
                        continue;
                    }
                    match message["type"].as_str() {
                        Some("next") if message["payload"]["errors"].is_null() => {
                            let position = &message["payload"]["data"]["events"]["position"];
                            let position = position.as_str().unwrap().parse().unwrap();
                            positions.lock().unwrap().push(position);
                        }
                        _ => {
                            eprintln!(
                                "subscription {subscription} ended: {message}; subscribing again"
                            );
                            resubscribed += 1;
                            subscription = resubscribed.to_string();
                            let last = positions.lock().unwrap().last().copied().unwrap_or(0);
                            ws.subscribe(
                                &subscription,
                                query,
                                json!({ "after": last.to_string() }),
                            )
                            .await;
                        }
                    }
                }
                resubscribed
            }
        });
        Self {
            positions,
            stop,
            task,
        }
    }

    /// Waits until it received `head`, then stops it; returns every
    /// position received and how often it subscribed again.
    async fn finish(self, head: i64) -> (Vec<i64>, usize) {
        eventually("the subscriber to receive the head", RECOVERY, || async {
            (self.positions.lock().unwrap().last() >= Some(&head)).then_some(())
        })
        .await;
        self.stop.cancel();
        let resubscribed = self.task.await.unwrap();
        let positions = self.positions.lock().unwrap().clone();
        (positions, resubscribed)
    }
}

/// Redis, keeping nothing on disk, killed twice: reads fail fast while it
/// is down; the first time the load goes on through the restart, the
/// second time the projectors are idle at the head and nothing is written
/// after Redis comes back empty, and the model is rebuilt all the same
/// while `/readyz` never says ready before it is; a subscriber loses
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_empty() {
    let mut redis = PrivateRedis::start().await;
    let stack = Stack::start(Endpoints {
        redis: redis.url(),
        ..Endpoints::shared()
    })
    .await;
    let started = Instant::now();
    stack.ready("start-up", started).await;
    let watcher = Watcher::start(&stack.client);
    let load = Load::start(&stack.client);
    stack.loaded().await;

    // 1. Killed and restarted with the load going on.
    redis.kill();
    let killed = Instant::now();
    stack.not_ready("redis", None).await;
    let (ok, status) = stack.status().await;
    assert!(
        ok && status.contains("projection redis") && status.contains("unknown"),
        "{status}"
    );
    load.failures(Kind::Redis, killed, FAILED_AT_LEAST).await;
    tokio::time::sleep_until((killed + OUTAGE).into()).await;
    let restarting = Instant::now();
    redis.restart().await;
    let back = Instant::now();
    let ready = stack.ready("Redis's first restart", back).await;
    load.answers(Kind::Redis, back + ready, 5).await;
    let sent = load.sent();
    let (failed, slowest) = failed_fast(&sent, killed, restarting, &[Kind::Redis]);
    kept_working(&sent, killed, restarting, &[Kind::Mutation, Kind::Graph]);
    eprintln!(
        "Redis down {:?} under load: {failed} reads UNAVAILABLE (slowest {slowest:?}); /readyz ready {ready:?} after it was back",
        restarting - killed
    );

    // 2. The writers stop and both projections apply the head; then Redis
    // is killed with only reads going on, and nothing is written after it
    // comes back empty: only the Redis projector's own look at its idle
    // model can tell that it must be rebuilt.
    let agents = load.agents.clone();
    let mut sent = load.finish().await;
    let head = stack.scratch.head().await;
    let (model, graph) = (
        stack.scratch.redis.model.clone(),
        stack.scratch.graph.model.clone(),
    );
    eventually("both projections to apply the head", RECOVERY, || async {
        let redis = model.checkpoint().await.ok()?;
        let graph = graph.checkpoint().await.ok()?;
        (redis == head && graph == head).then_some(())
    })
    .await;
    let reads = Load::reader(&stack.client, agents.clone());
    redis.kill();
    let killed = Instant::now();
    stack.not_ready("redis", None).await;
    reads.failures(Kind::Redis, killed, FAILED_AT_LEAST).await;
    tokio::time::sleep_until((killed + OUTAGE).into()).await;
    let restarting = Instant::now();
    redis.restart().await;
    let back = Instant::now();
    // `/readyz` is never ready while the model is behind (nothing moves
    // the head any more).
    let mut empty = 0;
    let ready = loop {
        let (ready, body) = stack.client.readyz().await;
        if ready {
            // The test's own connection to Redis sat idle through the
            // outage: its first command fails with the reconnect that
            // failed meanwhile, and starts a new one.
            let model = stack.scratch.redis.model.clone();
            let checkpoint = eventually("the test to read the Redis checkpoint", RECOVERY, || {
                let model = model.clone();
                async move { model.checkpoint().await.ok() }
            })
            .await;
            assert_eq!(
                checkpoint, head,
                "/readyz said ready while the Redis model was at {checkpoint} of {head}: {body}"
            );
            break back.elapsed();
        }
        if body["redis"]
            .as_str()
            .is_some_and(|r| r.contains("no checkpoint"))
        {
            empty += 1;
        }
        assert!(
            back.elapsed() < RECOVERY,
            "/readyz not ready {RECOVERY:?} after Redis came back empty with nothing written: {body}\nthe process's log:\n{}",
            stack.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Reads answer again, from the rebuilt model.
    reads.answers(Kind::Redis, back + ready, 5).await;
    for agent in &agents {
        let read = stack
            .client
            .send(
                Kind::Redis,
                "agent",
                None,
                "query($id: ID!) { agent(id: $id) { id status } }",
                json!({ "id": agent }),
            )
            .await;
        let Outcome::Data(data) = &read.outcome else {
            panic!("reading agent {agent} after the rebuild: {read:?}");
        };
        assert_eq!(data["id"], json!(agent), "{read:?}");
    }
    sent.extend(reads.finish().await);
    eprintln!(
        "Redis down {:?}, back empty with nothing written: /readyz ready {ready:?} after it was back ({empty} answer(s) saying the model had no checkpoint)",
        restarting - killed
    );
    let (failed, slowest) = failed_fast(&sent, killed, restarting, &[Kind::Redis]);
    kept_working(&sent, killed, restarting, &[Kind::Mutation, Kind::Graph]);
    eprintln!("second outage: {failed} reads UNAVAILABLE (slowest {slowest:?})");
    none_hung(&sent);
    let head = stack.settle("Redis's second restart", back, &sent).await;

    // The subscriber saw every event once, in order.
    let (positions, resubscribed) = watcher.finish(head).await;
    let expected: Vec<i64> = sqlx::query_scalar("SELECT position FROM events ORDER BY position")
        .fetch_all(&stack.scratch.db.pool)
        .await
        .unwrap();
    assert_eq!(
        positions, expected,
        "the subscriber received every event once, in order ({resubscribed} resubscription(s))"
    );
    stack.shut_down().await;
}

/// The graph server killed for seconds under load: graph reads fail fast;
/// the projector, retrying meanwhile, applies up to the head within
/// seconds of the restart and reports `live` again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graph_server_killed_and_restarted() {
    let mut graph = PrivateGraph::start().await;
    let stack = Stack::start(Endpoints {
        graph: graph.server(),
        ..Endpoints::shared()
    })
    .await;
    stack.ready("start-up", Instant::now()).await;
    let load = Load::start(&stack.client);
    stack.loaded().await;

    graph.kill();
    let killed = Instant::now();
    // The projector sees it too: events keep coming, and it retries.
    stack.not_ready("graph", Some(("graph", "retrying"))).await;
    let (ok, status) = stack.status().await;
    assert!(
        ok && status.contains("projection graph") && status.contains("unknown"),
        "{status}"
    );
    load.failures(Kind::Graph, killed, FAILED_AT_LEAST).await;
    tokio::time::sleep_until((killed + OUTAGE).into()).await;
    let restarting = Instant::now();
    graph.restart().await;
    let back = Instant::now();
    // With the load going on, the projector applies what was written
    // while the server was down.
    let head = stack.scratch.head().await;
    let model = stack.scratch.graph.model.clone();
    eventually(
        "the graph projector to apply what was written during the outage",
        RECOVERY,
        || async { (model.checkpoint().await.ok()? >= head).then_some(()) },
    )
    .await;
    let caught_up = back.elapsed();
    load.answers(Kind::Graph, back + caught_up, 5).await;
    let sent = load.finish().await;
    let (failed, slowest) = failed_fast(&sent, killed, restarting, &[Kind::Graph]);
    let working = kept_working(&sent, killed, restarting, &[Kind::Mutation, Kind::Redis]);
    eprintln!(
        "graph server down {:?} under load: {failed} graph reads UNAVAILABLE (slowest {slowest:?}), {working} other requests answered; \
         the server took {:?} to start; the projector applied the backlog {caught_up:?} after it was back",
        restarting - killed,
        back - restarting
    );
    none_hung(&sent);
    stack
        .settle("the graph server's restart", back, &sent)
        .await;
    stack.shut_down().await;
}

/// NATS killed for seconds under load: clients notice nothing but
/// staleness; the relay and both projectors resume; the stream mirrors the
/// store exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_and_restarted() {
    let mut nats = PrivateNats::start().await;
    let stack = Stack::start(Endpoints {
        nats: nats.url(),
        ..Endpoints::shared()
    })
    .await;
    stack.ready("start-up", Instant::now()).await;
    let load = Load::start(&stack.client);
    stack.loaded().await;

    nats.kill();
    let killed = Instant::now();
    stack.not_ready("nats", None).await;
    let (ok, status) = stack.status().await;
    assert!(ok && status.contains("unknown"), "{status}");
    tokio::time::sleep_until((killed + OUTAGE).into()).await;
    let restarting = Instant::now();
    nats.restart().await;
    let back = Instant::now();
    // With the load going on, the relay publishes what was written while
    // NATS was down, and both projections follow.
    let head = stack.scratch.head().await;
    let (redis, graph) = (
        stack.scratch.redis.model.clone(),
        stack.scratch.graph.model.clone(),
    );
    eventually(
        "both projections to apply what was written during the outage",
        RECOVERY,
        || async {
            let redis = redis.checkpoint().await.ok()?;
            let graph = graph.checkpoint().await.ok()?;
            (redis >= head && graph >= head).then_some(())
        },
    )
    .await;
    let caught_up = back.elapsed();
    let sent = load.finish().await;
    let working = kept_working(
        &sent,
        killed,
        restarting,
        &[Kind::Mutation, Kind::Redis, Kind::Graph],
    );
    assert!(
        working >= FAILED_AT_LEAST,
        "only {working} request(s) ran during the outage"
    );
    eprintln!(
        "NATS down {:?} under load: all {working} requests meanwhile answered; both projections past the backlog {caught_up:?} after it was back",
        restarting - killed
    );
    none_hung(&sent);
    stack.settle("NATS's restart", back, &sent).await;
    stack.shut_down().await;
}

/// PostgreSQL — the server and every backend — killed for seconds under
/// load: mutations fail fast with `UNAVAILABLE` telling the client to retry
/// with the same commandId; each retry after the restart succeeds exactly
/// once, `replayed` exactly when an attempt during the outage had committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_killed_and_restarted() {
    let mut postgres = PrivatePostgres::start().await;
    let stack = Stack::start(Endpoints {
        postgres: postgres.url(),
        ..Endpoints::shared()
    })
    .await;
    stack.ready("start-up", Instant::now()).await;
    let load = Load::start(&stack.client);
    stack.loaded().await;

    postgres.kill();
    let killed = Instant::now();
    stack.not_ready("postgres", None).await;
    let (ok, status) = stack.status().await;
    assert!(!ok && status.contains("PostgreSQL"), "{status}");
    load.failures(Kind::Mutation, killed, FAILED_AT_LEAST).await;
    tokio::time::sleep_until((killed + OUTAGE).into()).await;
    let restarting = Instant::now();
    postgres.restart().await;
    let back = Instant::now();
    // Each client's mutation in hand goes through, and more after it.
    load.answers(Kind::Mutation, back, 3 * WORKERS).await;
    let recovered = back.elapsed();
    let sent = load.finish().await;
    let (failed, slowest) = failed_fast(&sent, killed, restarting, &[Kind::Mutation]);
    let working = kept_working(&sent, killed, restarting, &[Kind::Redis, Kind::Graph]);
    for s in sent.iter().filter(|s| s.unavailable()) {
        let Outcome::Refused { message, .. } = &s.outcome else {
            unreachable!()
        };
        assert!(
            message.contains("retry with the same commandId"),
            "{} answered: {message}",
            s.field
        );
    }

    // Every command that failed was sent again until it succeeded, once:
    // `replayed` exactly when its events were recorded before that last
    // attempt was sent (an attempt during the outage had committed).
    let mut attempts: BTreeMap<Uuid, Vec<&Sent>> = BTreeMap::new();
    for s in sent.iter().filter(|s| s.kind == Kind::Mutation) {
        attempts.entry(s.command.unwrap()).or_default().push(s);
    }
    let (mut retried, mut replayed) = (0, 0);
    for (command, tries) in attempts.iter().filter(|(_, tries)| tries.len() > 1) {
        retried += 1;
        let (last, earlier) = tries.split_last().unwrap();
        assert!(
            earlier.iter().all(|s| !s.answered()),
            "{command}: answered before its last attempt"
        );
        let Outcome::Data(result) = &last.outcome else {
            panic!(
                "{command} never succeeded:\n{}",
                briefly(tries.iter().copied())
            );
        };
        let recorded: Option<i64> = sqlx::query_scalar(
            "SELECT (extract(epoch FROM min(recorded_at)) * 1000000)::int8 FROM events WHERE command_id = $1",
        )
        .bind(command)
        .fetch_one(&stack.scratch.db.pool)
        .await
        .unwrap();
        let recorded = recorded.unwrap_or_else(|| panic!("{command}: nothing in the store"));
        let sent_at = last.wall.duration_since(UNIX_EPOCH).unwrap().as_micros() as i64;
        let was_replayed = result["replayed"] == true;
        assert_eq!(
            was_replayed,
            recorded < sent_at,
            "{command} ({}): replayed {was_replayed}, events recorded at {recorded} µs, last attempt sent at {sent_at} µs",
            last.field
        );
        replayed += usize::from(was_replayed);
    }
    assert!(retried >= 1, "no mutation was retried");
    // A client that lost the answer to a mutation that did commit sends it
    // again with its commandId: the first run's result, `replayed`.
    let answered_before: Vec<&Sent> = sent
        .iter()
        .filter(|s| s.kind == Kind::Mutation && s.answered() && s.finished() < killed)
        .collect();
    for original in answered_before.iter().rev().take(WORKERS) {
        let again = stack
            .client
            .send(
                Kind::Mutation,
                original.field,
                original.command,
                &original.query,
                original.variables.clone(),
            )
            .await;
        let (Outcome::Data(first), Outcome::Data(second)) = (&original.outcome, &again.outcome)
        else {
            panic!("{} sent again: {again:?}", original.field);
        };
        assert_eq!(second["replayed"], true, "{second}");
        for field in ["streamId", "version", "position", "events"] {
            assert_eq!(
                second[field], first[field],
                "{field} of {} sent again",
                original.field
            );
        }
    }
    eprintln!(
        "PostgreSQL down {:?} under load: {failed} mutations UNAVAILABLE (slowest {slowest:?}), {working} reads answered; \
         {retried} command(s) retried with their commandId, {replayed} of them replayed (committed during the outage); \
         mutations through again {recovered:?} after it was back",
        restarting - killed
    );
    none_hung(&sent);
    stack.settle("PostgreSQL's restart", back, &sent).await;
    stack.shut_down().await;
}
