//! The audit queries (`streamHistory`, `agentAt`/`taskAt`/`workflowAt`,
//! `eventLog`) through the real HTTP server, router, bearer-token checks and
//! schema, against real PostgreSQL (a database per test), Redis (a key prefix
//! per test), the graph (a database per test) and NATS. Commands are sent as
//! GraphQL mutations with an operator's token; answers are checked against
//! the event store itself.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use api::auth::{Authenticator, Role};
use commands::testkit::{eventually, TestDatabase, TestNats};
use commands::{EventStore, RecordedEvent};
use domain::{AgentState, Aggregate, TaskState, WorkflowState};
use projections::graph_testkit::TestGraph;
use projections::testkit::TestRedis;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The page limit of the test server (small, to page often).
const MAX_PAGE: usize = 25;
/// How long to wait for the cluster-wide gap-safe horizon to pass our commits.
const WAIT: Duration = Duration::from_secs(60);

const EVENT_FIELDS: &str = "position streamId version type schemaVersion data \
    metadata { eventId commandId commandType correlationId causationId actor occurredAt recordedAt traceparent }";

/// The API server of one test, on port 0, with its own stores.
struct Api {
    addr: SocketAddr,
    auth: Authenticator,
    store: EventStore,
    stop: CancellationToken,
    server: Option<JoinHandle<anyhow::Result<()>>>,
    // Dropped after the server stops (fields drop in declaration order).
    _graph: TestGraph,
    _redis: TestRedis,
    _nats: TestNats,
    _db: TestDatabase,
}

impl Api {
    /// The production API (`neurectomy serve`'s `Application`, settings
    /// loaded from flags as `neurectomy serve` loads them) on port 0, over this test's database,
    /// Redis prefix, graph database and NATS.
    async fn start() -> Self {
        let db = TestDatabase::create(8)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let nats = TestNats::create().await.unwrap_or_else(|e| panic!("{e}"));
        let redis = TestRedis::create().await.unwrap_or_else(|e| panic!("{e}"));
        let graph = TestGraph::create().await.unwrap_or_else(|e| panic!("{e}"));
        // A secret of this test only.
        let secret = format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple());
        let graph_config = graph.model.config();
        let max_page = MAX_PAGE.to_string();
        let cli = api::cli::load(
            [
                "neurectomy",
                "--database-url",
                &db.url,
                "--nats-url",
                &nats.url,
                "--redis-url",
                &redis.url,
                "--redis-prefix",
                &redis.prefix,
                "--graph-uri",
                &graph_config.uri,
                "--graph-user",
                &graph_config.user,
                "--graph-password",
                &graph_config.password,
                "--graph-database",
                &graph.database,
                "--api-listen",
                "127.0.0.1:0",
                "--jwt-secret",
                &secret,
                "--api-max-page",
                &max_page,
                "serve",
            ],
            &|_| None,
        )
        .unwrap()
        .cli;
        let store = EventStore::new(db.pool.clone());
        let stop = CancellationToken::new();
        let auth = api::startup::connect::authenticator(&cli.settings.api).unwrap();
        let app = neurectomy_e2e::start_api(cli.settings, &stop).await;
        let addr = app.addr().unwrap();
        Self {
            addr,
            auth,
            store,
            stop,
            server: Some(tokio::spawn(app.run_until_stopped())),
            _graph: graph,
            _redis: redis,
            _nats: nats,
            _db: db,
        }
    }

    /// A token of `subject` in `tenant` with `roles`.
    fn token(&self, subject: &str, tenant: &str, roles: &[Role]) -> String {
        self.auth.mint(subject, tenant, roles, 600).unwrap()
    }

    /// An auditor's token in `tenant`.
    fn auditor(&self, tenant: &str) -> String {
        self.token("audrey", tenant, &[Role::Auditor])
    }

    /// An operator's token in `tenant` (the actor of its commands is `ops`).
    fn operator(&self, tenant: &str) -> String {
        self.token("ops", tenant, &[Role::Operator])
    }

    /// POSTs a GraphQL request; returns the HTTP status and the JSON body.
    async fn post(&self, token: Option<&str>, query: &str, variables: Value) -> (u16, Value) {
        let body = json!({ "query": query, "variables": variables }).to_string();
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        let request = format!(
            "POST /graphql HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n{auth}\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        let mut stream = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut raw))
            .await
            .expect("the API answers within 30 s")
            .unwrap();
        let raw = String::from_utf8(raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)
        } else {
            body.to_owned()
        };
        (status, serde_json::from_str(&body).unwrap())
    }

    /// The full GraphQL response (data and errors).
    async fn graphql(&self, token: &str, query: &str, variables: Value) -> Value {
        let (status, body) = self.post(Some(token), query, variables).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// `data`, asserting there are no errors.
    async fn data(&self, token: &str, query: &str, variables: Value) -> Value {
        let body = self.graphql(token, query, variables).await;
        assert!(body.get("errors").is_none(), "{query}: {body}");
        body["data"].clone()
    }

    /// The code and message of the (single) error.
    async fn failure(&self, token: &str, query: &str, variables: Value) -> (String, String) {
        let body = self.graphql(token, query, variables).await;
        let errors = body["errors"].as_array().unwrap_or_else(|| {
            panic!("{query} should fail: {body}");
        });
        let e = &errors[0];
        (
            e["extensions"]["code"].as_str().unwrap_or("").to_owned(),
            e["message"].as_str().unwrap_or("").to_owned(),
        )
    }

    /// Runs one mutation field call (e.g. `pauseAgent(agentId: "…")`);
    /// returns its result.
    async fn command(&self, token: &str, call: &str, correlation: Option<&str>) -> Value {
        let call = match correlation {
            Some(c) => {
                let (name, args) = call.split_once('(').unwrap();
                format!("{name}(correlationId: \"{c}\", {args}")
            }
            None => call.to_owned(),
        };
        let query = format!(
            "mutation {{ r: {call} {{ streamId version position commandId events {{ {EVENT_FIELDS} }} }} }}"
        );
        self.data(token, &query, json!({})).await["r"].clone()
    }

    /// Every event of the store (all tenants), read the way the relay does,
    /// once everything committed is readable.
    async fn read_all(&self) -> Vec<RecordedEvent> {
        let store = self.store.clone();
        let head = eventually("every written event to be readable", WAIT, || {
            let store = store.clone();
            async move {
                let head = store.head().await.unwrap();
                (head.readable >= head.written).then_some(head.written)
            }
        })
        .await;
        let mut all = Vec::new();
        let mut after = 0;
        while after < head {
            let batch = self.store.read_all(after, 1000).await.unwrap();
            after = batch.last().map_or(head, |e| e.position);
            all.extend(batch);
        }
        all
    }

    async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(server) = self.server.take() {
            server.await.unwrap().unwrap();
        }
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        // A failed test stops its server too.
        self.stop.cancel();
    }
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            break;
        }
        out.push_str(&tail[..size]);
        rest = &tail[size + 2..];
    }
    out
}

/// Events `life` appends: a workflow (2), two agents (1 + 5), a task (6).
const LIFE_EVENTS: usize = 14;

fn new_id() -> String {
    Uuid::new_v4().to_string()
}

/// A workflow, two agents and a task walked through a life: returns
/// (workflow, agent, other agent, task).
async fn life(api: &Api, token: &str, correlation: Option<&str>) -> [String; 4] {
    let (wf, agent, other, task) = (new_id(), new_id(), new_id(), new_id());
    let c = correlation;
    api.command(
        token,
        &format!(r#"startWorkflow(id: "{wf}", name: "nightly", metadata: {{owner: "data"}})"#),
        c,
    )
    .await;
    for (id, name) in [(&agent, "planner"), (&other, "coder")] {
        api.command(
            token,
            &format!(
                r#"registerAgent(id: "{id}", name: "{name}", kind: LLM, model: "m1", capabilities: ["code", "plan"])"#
            ),
            c,
        )
        .await;
    }
    api.command(
        token,
        &format!(
            r#"createTask(id: "{task}", workflowId: "{wf}", title: "write it", input: {{spec: 1}}, requiredCapabilities: ["code"], priority: 70)"#
        ),
        c,
    )
    .await;
    api.command(
        token,
        &format!(r#"assignTask(taskId: "{task}", agentId: "{agent}")"#),
        c,
    )
    .await;
    api.command(token, &format!(r#"startTask(taskId: "{task}")"#), c)
        .await;
    api.command(
        token,
        &format!(r#"reportTaskProgress(taskId: "{task}", percent: 40, note: "half-way")"#),
        c,
    )
    .await;
    api.command(
        token,
        &format!(r#"delegateTask(taskId: "{task}", fromAgentId: "{agent}", toAgentId: "{other}")"#),
        c,
    )
    .await;
    api.command(
        token,
        &format!(r#"completeTask(taskId: "{task}", output: {{ok: true}})"#),
        c,
    )
    .await;
    api.command(
        token,
        &format!(r#"pauseAgent(agentId: "{agent}", reason: "rest")"#),
        c,
    )
    .await;
    api.command(token, &format!(r#"resumeAgent(agentId: "{agent}")"#), c)
        .await;
    api.command(
        token,
        &format!(r#"failAgent(agentId: "{agent}", reason: "oom")"#),
        c,
    )
    .await;
    api.command(
        token,
        &format!(r#"retireAgent(agentId: "{agent}", reason: "old")"#),
        c,
    )
    .await;
    api.command(
        token,
        &format!(r#"completeWorkflow(workflowId: "{wf}")"#),
        c,
    )
    .await;
    [wf, agent, other, task]
}

/// The typed fields `agentAt`, `taskAt` and `workflowAt` return, folded here
/// from the stored events' JSON by rules of this test's own (not the
/// domain's `evolve`): what each event of [`life`] says the state becomes.
fn expected_fields(events: &[RecordedEvent]) -> Value {
    let mut fields = serde_json::Map::new();
    let mut set = |name: &str, value: Value| {
        fields.insert(name.to_owned(), value);
    };
    for event in events {
        let d = &event.data;
        match event.event_type.as_str() {
            "AgentRegistered" => {
                set("name", d["name"].clone());
                set("kind", d["kind"].clone());
                set("capabilities", d["capabilities"].clone());
                set("status", json!("ACTIVE"));
                set("statusReason", Value::Null);
            }
            "AgentPaused" => {
                set("status", json!("PAUSED"));
                set("statusReason", d["reason"].clone());
            }
            "AgentResumed" => {
                set("status", json!("ACTIVE"));
                set("statusReason", Value::Null);
            }
            "AgentFailed" => {
                set("status", json!("FAILED"));
                set("statusReason", d["reason"].clone());
            }
            "AgentRetired" => {
                set("status", json!("RETIRED"));
                set("statusReason", d["reason"].clone());
            }
            "TaskCreated" => {
                set("title", d["title"].clone());
                set("workflowId", d["workflow_id"].clone());
                set("input", d["input"].clone());
                set("priority", d["priority"].clone());
                set("status", json!("PENDING"));
                set("assigneeId", Value::Null);
                set("progress", json!(0));
                set("attempt", json!(1));
            }
            "TaskAssigned" => {
                set("status", json!("ASSIGNED"));
                set("assigneeId", d["agent_id"].clone());
            }
            "TaskStarted" => {
                set("status", json!("RUNNING"));
                set("assigneeId", d["agent_id"].clone());
            }
            "TaskProgressReported" => {
                set("progress", d["percent"].clone());
                set("progressNote", d["note"].clone());
            }
            "TaskDelegated" => set("assigneeId", d["to_agent_id"].clone()),
            "TaskCompleted" => {
                set("status", json!("COMPLETED"));
                set("progress", json!(100));
                set("output", d["output"].clone());
            }
            "WorkflowStarted" => {
                set("name", d["name"].clone());
                set("metadata", d["metadata"].clone());
                set("status", json!("RUNNING"));
            }
            "WorkflowCompleted" => set("status", json!("COMPLETED")),
            other => panic!("the test's fold has no rule for {other}"),
        }
    }
    Value::Object(fields)
}

/// The aggregate state after `version` events of `stream`, folded by the
/// domain's `evolve` from the store's own stream read: what the resolvers'
/// `state` JSON must be (the plumbing, not the semantics — those are
/// checked against [`expected_fields`]).
async fn fold<A: Aggregate>(store: &EventStore, stream: &str, version: i64) -> Value {
    let mut state = A::default();
    for e in store.read_stream(stream, 1, version, 10_000).await.unwrap() {
        state.evolve(&A::from_domain(e.decode().unwrap()).unwrap());
    }
    serde_json::to_value(state).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_history_carries_full_metadata_and_honours_version_ranges() {
    let api = Api::start().await;
    let ops = api.operator("acme");
    let audrey = api.auditor("acme");
    let correlation = new_id();
    let [_, _, _, task] = life(&api, &ops, Some(&correlation)).await;
    let stream = format!("task-{task}");
    let query = format!(
        "query($s: ID!, $from: Int, $to: Int, $first: Int) {{
           streamHistory(streamId: $s, fromVersion: $from, toVersion: $to, first: $first) {{
             streamId kind currentVersion hasMore events {{ {EVENT_FIELDS} }} }} }}"
    );

    let all = api.data(&audrey, &query, json!({ "s": stream })).await["streamHistory"].clone();
    assert_eq!(all["streamId"], stream);
    assert_eq!(all["kind"], "task");
    assert_eq!(all["currentVersion"], 6);
    assert_eq!(all["hasMore"], false);
    let events = all["events"].as_array().unwrap();
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "TaskCreated",
            "TaskAssigned",
            "TaskStarted",
            "TaskProgressReported",
            "TaskDelegated",
            "TaskCompleted"
        ]
    );
    // Metadata matches the store, field by field.
    let stored = api.store.read_stream(&stream, 1, 100, 100).await.unwrap();
    for (e, s) in events.iter().zip(&stored) {
        let m = &e["metadata"];
        assert_eq!(e["version"], s.stream_version);
        assert_eq!(e["position"], s.position.to_string());
        assert_eq!(m["eventId"], s.event_id.to_string());
        assert_eq!(m["commandId"], s.metadata.command_id.to_string());
        assert_eq!(m["commandType"], s.metadata.command_type);
        assert_eq!(m["correlationId"], correlation);
        assert_eq!(m["causationId"], s.metadata.causation_id.to_string());
        assert_eq!(m["actor"], "ops");
        assert!(m["recordedAt"].as_str().unwrap().len() >= 20, "{m}");
        assert!(m["occurredAt"].as_str().unwrap().len() >= 20, "{m}");
    }
    assert_eq!(events[0]["metadata"]["commandType"], "CreateTask");
    assert_eq!(events[0]["data"]["title"], "write it");

    // A range, and a page of it.
    let range = api
        .data(&audrey, &query, json!({ "s": stream, "from": 2, "to": 4 }))
        .await["streamHistory"]
        .clone();
    let versions: Vec<i64> = range["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["version"].as_i64().unwrap())
        .collect();
    assert_eq!(versions, [2, 3, 4]);
    assert_eq!(range["hasMore"], false);
    let page = api
        .data(
            &audrey,
            &query,
            json!({ "s": stream, "from": 2, "to": 4, "first": 2 }),
        )
        .await["streamHistory"]
        .clone();
    assert_eq!(page["events"].as_array().unwrap().len(), 2);
    assert_eq!(page["hasMore"], true);
    // Past the end: empty, not an error; the current version says why.
    let past = api
        .data(&audrey, &query, json!({ "s": stream, "from": 7 }))
        .await["streamHistory"]
        .clone();
    assert_eq!(past["events"], json!([]));
    assert_eq!(past["currentVersion"], 6);
    api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_travel_by_version_and_by_time_agrees_with_the_events() {
    let api = Api::start().await;
    let ops = api.operator("acme");
    let audrey = api.auditor("acme");
    let [wf, agent, other, task] = life(&api, &ops, None).await;
    let point = "version position recordedAt currentVersion streamId lastEvent { version type metadata { actor commandType } } state";
    let queries = [
        (
            "agentAt",
            format!("agent-{agent}"),
            format!("query($id: ID!, $v: Int, $t: DateTime) {{ x: agentAt(id: $id, version: $v, asOf: $t) {{ id name kind model capabilities parentId status statusReason {point} }} }}"),
        ),
        (
            "taskAt",
            format!("task-{task}"),
            format!("query($id: ID!, $v: Int, $t: DateTime) {{ x: taskAt(id: $id, version: $v, asOf: $t) {{ id workflowId title status assigneeId input output requiredCapabilities dependsOn priority progress progressNote attempt maxAttempts lastError retryable cancelReason {point} }} }}"),
        ),
        (
            "workflowAt",
            format!("workflow-{wf}"),
            format!("query($id: ID!, $v: Int, $t: DateTime) {{ x: workflowAt(id: $id, version: $v, asOf: $t) {{ id name status reason metadata {point} }} }}"),
        ),
    ];
    let mut typed = Vec::new();
    for (name, stream, query) in &queries {
        let id = stream.split_once('-').unwrap().1;
        let stored = api.store.read_stream(stream, 1, 100, 100).await.unwrap();
        let current = stored.len() as i64;
        for s in &stored {
            let v = s.stream_version;
            let expected = match *name {
                "agentAt" => fold::<AgentState>(&api.store, stream, v).await,
                "taskAt" => fold::<TaskState>(&api.store, stream, v).await,
                _ => fold::<WorkflowState>(&api.store, stream, v).await,
            };
            let by_version =
                api.data(&audrey, query, json!({ "id": id, "v": v })).await["x"].clone();
            assert_eq!(by_version["state"], expected, "{name} at version {v}");
            // The typed fields, against the test's own fold.
            let independent = expected_fields(&stored[..v as usize]);
            for (field, value) in independent.as_object().unwrap() {
                assert_eq!(
                    &by_version[field], value,
                    "{name} at version {v}: `{field}` (the test's own fold says {value})"
                );
            }
            assert_eq!(by_version["version"], v);
            assert_eq!(by_version["position"], s.position.to_string());
            assert_eq!(by_version["currentVersion"], current);
            assert_eq!(by_version["streamId"], stream.as_str());
            assert_eq!(by_version["lastEvent"]["type"], s.event_type);
            assert_eq!(by_version["lastEvent"]["metadata"]["actor"], "ops");
            assert_eq!(by_version["id"], id);
            // The same point by time: the event's own recording time
            // (inclusive) ...
            let at = by_version["recordedAt"].as_str().unwrap().to_owned();
            let by_time = api.data(&audrey, query, json!({ "id": id, "t": at })).await["x"].clone();
            assert_eq!(by_time, by_version, "{name} as of {at}");
            // ... and by the stream id instead of the UUID.
            let by_stream = api
                .data(&audrey, query, json!({ "id": stream, "v": v }))
                .await["x"]
                .clone();
            assert_eq!(by_stream, by_version);
            typed.push((name.to_string(), v, by_version));
        }
        // Neither: the latest state; far in the future: the same.
        let latest = api.data(&audrey, query, json!({ "id": id })).await["x"].clone();
        assert_eq!(latest["version"], current);
        let future = api
            .data(
                &audrey,
                query,
                json!({ "id": id, "t": "2999-01-01T00:00:00Z" }),
            )
            .await["x"]
            .clone();
        assert_eq!(future, latest);
        // Before the first event: it did not exist yet.
        let (code, message) = api
            .failure(
                &audrey,
                query,
                json!({ "id": id, "t": "2000-01-01T00:00:00+01:00" }),
            )
            .await;
        assert_eq!(code, "NOT_FOUND", "{message}");
        assert!(message.contains("did not exist yet"), "{message}");
    }

    // Typed fields at telling points.
    let at = |name: &str, v: i64| {
        typed
            .iter()
            .find(|(n, version, _)| n == name && *version == v)
            .map(|(_, _, x)| x.clone())
            .unwrap()
    };
    let statuses: Vec<Value> = (1..=5)
        .map(|v| at("agentAt", v)["status"].clone())
        .collect();
    assert_eq!(
        statuses,
        [
            json!("ACTIVE"),
            json!("PAUSED"),
            json!("ACTIVE"),
            json!("FAILED"),
            json!("RETIRED")
        ]
    );
    assert_eq!(at("agentAt", 2)["statusReason"], "rest");
    assert_eq!(at("agentAt", 1)["capabilities"], json!(["code", "plan"]));
    assert_eq!(at("agentAt", 1)["kind"], "llm");
    let task1 = at("taskAt", 1);
    assert_eq!(task1["status"], "PENDING");
    assert_eq!(task1["assigneeId"], Value::Null);
    assert_eq!(task1["input"], json!({ "spec": 1 }));
    assert_eq!(task1["priority"], 70);
    assert_eq!(task1["workflowId"], wf);
    assert_eq!(at("taskAt", 2)["assigneeId"], agent);
    assert_eq!(at("taskAt", 4)["progress"], 40);
    assert_eq!(at("taskAt", 4)["progressNote"], "half-way");
    assert_eq!(at("taskAt", 5)["assigneeId"], other);
    assert_eq!(at("taskAt", 5)["status"], "RUNNING");
    assert_eq!(at("taskAt", 6)["status"], "COMPLETED");
    assert_eq!(at("taskAt", 6)["output"], json!({ "ok": true }));
    assert_eq!(at("workflowAt", 1)["status"], "RUNNING");
    assert_eq!(at("workflowAt", 1)["metadata"], json!({ "owner": "data" }));
    assert_eq!(at("workflowAt", 2)["status"], "COMPLETED");
    api.shutdown().await;
}

/// One page of `eventLog(after, first<args>)`: its events, `next` and
/// `hasMore`, after checking that `next` is where the page ended.
async fn log_page(
    api: &Api,
    token: &str,
    args: &str,
    first: usize,
    after: &str,
) -> (Vec<Value>, String, bool) {
    let query = format!(
        "query($after: Position, $first: Int) {{ eventLog(after: $after, first: $first{args}) {{
           next hasMore events {{ {EVENT_FIELDS} }} }} }}"
    );
    let page = api
        .data(token, &query, json!({ "after": after, "first": first }))
        .await["eventLog"]
        .clone();
    let events = page["events"].as_array().unwrap().clone();
    assert!(events.len() <= first, "a page holds at most `first` events");
    let next = page["next"].as_str().unwrap().to_owned();
    match events.last() {
        Some(last) => assert_eq!(last["position"].as_str().unwrap(), next),
        None => assert_eq!(next, after, "an empty page keeps the cursor"),
    }
    (events, next, page["hasMore"] == true)
}

/// Pages from `after` while `hasMore`; returns the events and the cursor.
async fn log_pages(
    api: &Api,
    token: &str,
    args: &str,
    first: usize,
    after: &str,
) -> (Vec<Value>, String) {
    let mut all = Vec::new();
    let mut cursor = after.to_owned();
    loop {
        let (events, next, more) = log_page(api, token, args, first, &cursor).await;
        all.extend(events);
        cursor = next;
        if !more {
            return (all, cursor);
        }
    }
}

/// Pages from `after` until at least `want` events came (the gap-safe
/// horizon is cluster-wide: another test's open transaction can hold our
/// commits back for a moment).
async fn log_until(
    api: &Api,
    token: &str,
    args: &str,
    first: usize,
    after: &str,
    want: usize,
) -> (Vec<Value>, String) {
    eventually(
        &format!("{want} events from eventLog({args})"),
        WAIT,
        || async move {
            let (events, cursor) = log_pages(api, token, args, first, after).await;
            (events.len() >= want).then_some((events, cursor))
        },
    )
    .await
}

fn positions(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["position"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn event_log_pages_match_the_global_log_without_gaps_or_duplicates() {
    let api = Arc::new(Api::start().await);
    let audrey = api.auditor("acme");

    // Two tenants write concurrently while the auditor pages through.
    let writers: Vec<JoinHandle<()>> = ["acme", "acme", "globex"]
        .into_iter()
        .map(|tenant| {
            let api = api.clone();
            tokio::spawn(async move {
                let ops = api.operator(tenant);
                for _ in 0..2 {
                    life(&api, &ops, None).await;
                }
            })
        })
        .collect();
    // Pages taken while commits land (out of position order, across
    // transactions): none may skip or repeat an event. Paged until the
    // writers are done; some pages must have brought events while they
    // still wrote, or this tested nothing.
    let mut concurrent = Vec::new();
    let mut cursor = "0".to_owned();
    let mut pages_while_writing = 0;
    while writers.iter().any(|w| !w.is_finished()) {
        let (events, next, _) = log_page(&api, &audrey, "", 7, &cursor).await;
        if !events.is_empty() && writers.iter().any(|w| !w.is_finished()) {
            pages_while_writing += 1;
        }
        concurrent.extend(events);
        cursor = next;
    }
    for w in writers {
        w.await.unwrap();
    }
    assert!(
        pages_while_writing >= 2,
        "only {pages_while_writing} page(s) with events were read while commits landed"
    );

    let acme: Vec<RecordedEvent> = api
        .read_all()
        .await
        .into_iter()
        .filter(|e| e.metadata.tenant == "acme")
        .collect();
    assert_eq!(acme.len(), 2 * 2 * LIFE_EVENTS, "two lives per acme writer");
    let expected: Vec<String> = acme.iter().map(|e| e.position.to_string()).collect();

    // The concurrent reader continues from its cursor: together, the
    // tenant's log, each event once, in order.
    let want = expected.len() - concurrent.len();
    let (rest, end) = log_until(&api, &audrey, "", 7, &cursor, want).await;
    concurrent.extend(rest);
    assert_eq!(positions(&concurrent), expected);
    assert_eq!(&end, expected.last().unwrap());

    // Paging afterwards, in pages of any size, gives the same sequence,
    // with the store's events.
    for first in [1, 5, MAX_PAGE] {
        let (pages, _) = log_until(&api, &audrey, "", first, "0", expected.len()).await;
        assert_eq!(positions(&pages), expected, "pages of {first}");
        for (e, s) in pages.iter().zip(&acme) {
            assert_eq!(e["streamId"], s.stream_id);
            assert_eq!(e["version"], s.stream_version);
            assert_eq!(e["type"], s.event_type);
            assert_eq!(e["metadata"]["eventId"], s.event_id.to_string());
            assert_eq!(
                e["metadata"]["commandId"],
                s.metadata.command_id.to_string()
            );
        }
    }
    // Caught up: an empty page, the cursor stays.
    let (events, next, more) = log_page(&api, &audrey, "", 5, &end).await;
    assert!(events.is_empty() && next == end && !more);

    // A filter by type is the log with only those types.
    let wanted: Vec<String> = acme
        .iter()
        .filter(|e| ["TaskAssigned", "AgentRetired"].contains(&e.event_type.as_str()))
        .map(|e| e.position.to_string())
        .collect();
    assert_eq!(wanted.len(), 8);
    let args = r#", types: ["TaskAssigned", "AgentRetired"]"#;
    let (filtered, _) = log_until(&api, &audrey, args, 3, "0", wanted.len()).await;
    assert_eq!(positions(&filtered), wanted);

    // Another tenant's auditor pages through its own events only.
    let globex = api.auditor("globex");
    let (theirs, _) = log_until(&api, &globex, "", MAX_PAGE, "0", 2 * LIFE_EVENTS).await;
    assert_eq!(theirs.len(), 2 * LIFE_EVENTS);
    assert!(theirs
        .iter()
        .all(|e| !expected.contains(&e["position"].as_str().unwrap().to_owned())));

    Arc::try_unwrap(api).ok().unwrap().shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_correlation_id_is_followed_across_aggregates() {
    let api = Api::start().await;
    let ops = api.operator("acme");
    let audrey = api.auditor("acme");
    let correlation = new_id();
    // Noise before and after, without the correlation id.
    life(&api, &ops, None).await;
    let [wf, agent, other, task] = life(&api, &ops, Some(&correlation)).await;
    life(&api, &ops, None).await;

    let expected: Vec<String> = api
        .read_all()
        .await
        .iter()
        .filter(|e| e.metadata.correlation_id.to_string() == correlation)
        .map(|e| e.position.to_string())
        .collect();
    assert_eq!(expected.len(), LIFE_EVENTS);
    let args = format!(r#", correlationId: "{correlation}""#);
    let (got, _) = log_until(&api, &audrey, &args, 4, "0", expected.len()).await;
    assert_eq!(positions(&got), expected);
    let streams: HashSet<String> = got
        .iter()
        .map(|e| e["streamId"].as_str().unwrap().to_owned())
        .collect();
    let four: HashSet<String> = [
        format!("workflow-{wf}"),
        format!("agent-{agent}"),
        format!("agent-{other}"),
        format!("task-{task}"),
    ]
    .into();
    assert_eq!(
        streams, four,
        "one intent across the workflow, both agents and the task"
    );
    assert!(got
        .iter()
        .all(|e| e["metadata"]["correlationId"] == correlation.as_str()));

    // Correlation and type together.
    let args =
        format!(r#", correlationId: "{correlation}", types: ["TaskAssigned", "TaskDelegated"]"#);
    let (assigned, _) = log_until(&api, &audrey, &args, MAX_PAGE, "0", 2).await;
    let kinds: Vec<&str> = assigned
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["TaskAssigned", "TaskDelegated"]);
    // An unknown correlation id: an empty page.
    let none = api
        .data(
            &audrey,
            "query($c: ID) { eventLog(correlationId: $c) { next hasMore events { position } } }",
            json!({ "c": new_id() }),
        )
        .await["eventLog"]
        .clone();
    assert_eq!(none, json!({ "next": "0", "hasMore": false, "events": [] }));
    api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenants_history_looks_absent() {
    let api = Api::start().await;
    let correlation = new_id();
    let [wf, agent, _, task] = life(&api, &api.operator("acme"), Some(&correlation)).await;
    let intruder = api.auditor("globex");
    let missing = new_id();

    let cases = [
        (
            "query($id: ID!) { x: streamHistory(streamId: $id) { currentVersion } }",
            "task-",
            &task,
        ),
        (
            "query($id: ID!) { x: agentAt(id: $id) { name } }",
            "",
            &agent,
        ),
        (
            "query($id: ID!) { x: taskAt(id: $id, version: 1) { title } }",
            "",
            &task,
        ),
        (
            "query($id: ID!) { x: workflowAt(id: $id, asOf: \"2999-01-01T00:00:00Z\") { name } }",
            "",
            &wf,
        ),
    ];
    for (query, prefix, uuid) in cases {
        let (code, message) = api
            .failure(&intruder, query, json!({ "id": format!("{prefix}{uuid}") }))
            .await;
        assert_eq!(code, "NOT_FOUND", "{query}: {message}");
        // Word for word what an id that never existed gets.
        let (code, absent) = api
            .failure(
                &intruder,
                query,
                json!({ "id": format!("{prefix}{missing}") }),
            )
            .await;
        assert_eq!(code, "NOT_FOUND");
        assert_eq!(
            message.replace(uuid.as_str(), "?"),
            absent.replace(&missing, "?")
        );
    }
    api.read_all().await;
    let log = api
        .data(
            &intruder,
            r#"query($c: ID) {
                 all: eventLog { events { position } }
                 mine: eventLog(correlationId: $c) { events { position } }
                 typed: eventLog(types: ["TaskCreated"]) { events { position } } }"#,
            json!({ "c": correlation }),
        )
        .await;
    assert_eq!(log["all"]["events"], json!([]));
    assert_eq!(log["mine"]["events"], json!([]));
    assert_eq!(log["typed"]["events"], json!([]));
    // The owner's auditor sees it all.
    let owner = api.auditor("acme");
    let args = format!(r#", correlationId: "{correlation}""#);
    let (mine, _) = log_until(&api, &owner, &args, MAX_PAGE, "0", LIFE_EVENTS).await;
    assert_eq!(mine.len(), LIFE_EVENTS);
    api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_queries_need_the_auditor_role() {
    let api = Api::start().await;
    let [wf, agent, _, task] = life(&api, &api.operator("acme"), None).await;
    let queries = [
        format!(r#"{{ streamHistory(streamId: "task-{task}") {{ currentVersion }} }}"#),
        format!(r#"{{ agentAt(id: "{agent}") {{ name }} }}"#),
        format!(r#"{{ taskAt(id: "{task}") {{ title }} }}"#),
        format!(r#"{{ workflowAt(id: "{wf}") {{ name }} }}"#),
        "{ eventLog { next } }".to_owned(),
    ];
    let viewer = api.token("vic", "acme", &[Role::Viewer]);
    let operator = api.token("ops", "acme", &[Role::Viewer, Role::Operator]);
    let auditor = api.auditor("acme");
    for query in &queries {
        for token in [&viewer, &operator] {
            let (code, message) = api.failure(token, query, json!({})).await;
            assert_eq!(code, "FORBIDDEN", "{query}: {message}");
            assert!(message.contains("auditor"), "{message}");
        }
        api.data(&auditor, query, json!({})).await;
        let (status, body) = api.post(None, query, json!({})).await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(body["errors"][0]["extensions"]["code"], "UNAUTHENTICATED");
    }
    api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_validation_error_that_says_what_to_send() {
    let api = Api::start().await;
    let [wf, agent, _, task] = life(&api, &api.operator("acme"), None).await;
    let audrey = api.auditor("acme");
    let too_many = MAX_PAGE + 1;
    let cases = [
        (
            r#"{ streamHistory(streamId: "nope") { kind } }"#.to_owned(),
            "agent-<uuid>, task-<uuid> or workflow-<uuid>",
        ),
        (
            r#"{ streamHistory(streamId: "task-123") { kind } }"#.to_owned(),
            "must be a stream id",
        ),
        (
            r#"{ streamHistory(streamId: "robot-3f1c2a4e-0000-4000-8000-000000000000") { kind } }"#
                .to_owned(),
            "must be a stream id",
        ),
        (
            format!(
                r#"{{ streamHistory(streamId: "task-{task}", fromVersion: 4, toVersion: 2) {{ kind }} }}"#
            ),
            "fromVersion <= toVersion",
        ),
        (
            format!(r#"{{ streamHistory(streamId: "task-{task}", fromVersion: 0) {{ kind }} }}"#),
            "`fromVersion` must be 1",
        ),
        (
            format!(r#"{{ streamHistory(streamId: "task-{task}", toVersion: -1) {{ kind }} }}"#),
            "`toVersion` must be 1",
        ),
        (
            format!(r#"{{ streamHistory(streamId: "task-{task}", first: 0) {{ kind }} }}"#),
            "between 1 and 25",
        ),
        (
            format!(
                r#"{{ streamHistory(streamId: "task-{task}", first: {too_many}) {{ kind }} }}"#
            ),
            "between 1 and 25",
        ),
        (
            format!(
                r#"{{ taskAt(id: "{task}", version: 1, asOf: "2026-11-24T12:00:00Z") {{ title }} }}"#
            ),
            "either `version` or `asOf`",
        ),
        (
            format!(r#"{{ taskAt(id: "{task}", version: 0) {{ title }} }}"#),
            "`version` must be 1",
        ),
        (
            format!(r#"{{ taskAt(id: "{task}", version: 99) {{ title }} }}"#),
            "between 1 and 6",
        ),
        (
            format!(r#"{{ workflowAt(id: "task-{task}") {{ name }} }}"#),
            "it must be a workflow id",
        ),
        (
            format!(r#"{{ workflowAt(id: "{wf}x") {{ name }} }}"#),
            "a UUID, or workflow-<uuid>",
        ),
        (
            "{ eventLog(first: 0) { next } }".to_owned(),
            "between 1 and 25",
        ),
        (
            format!("{{ eventLog(first: {too_many}) {{ next }} }}"),
            "between 1 and 25",
        ),
        (
            r#"{ eventLog(types: ["TaskExploded"]) { next } }"#.to_owned(),
            "known types: AgentRegistered",
        ),
        (
            "{ eventLog(types: []) { next } }".to_owned(),
            "name at least one event type",
        ),
        (
            r#"{ eventLog(correlationId: "c-1") { next } }"#.to_owned(),
            "`correlationId` must be a UUID",
        ),
    ];
    for (query, hint) in &cases {
        let (code, message) = api.failure(&audrey, query, json!({})).await;
        assert_eq!(code, "VALIDATION", "{query}: {message}");
        assert!(
            message.contains(hint),
            "{query}: {message:?} should say {hint:?}"
        );
    }
    // A time is RFC 3339 with a zone (the DateTime scalar rejects others).
    for when in ["yesterday", "2026-11-24 12:00:00"] {
        let body = api
            .graphql(
                &audrey,
                &format!(r#"{{ agentAt(id: "{agent}", asOf: "{when}") {{ name }} }}"#),
                json!({}),
            )
            .await;
        assert_eq!(
            body["errors"][0]["extensions"]["code"], "GRAPHQL_VALIDATION_FAILED",
            "{body}"
        );
        assert!(
            body["errors"][0]["message"]
                .as_str()
                .unwrap()
                .contains("DateTime"),
            "{body}"
        );
    }
    // A position is a non-negative integer (the scalar rejects others, in
    // validation).
    let body = api
        .graphql(&audrey, r#"{ eventLog(after: "-5") { next } }"#, json!({}))
        .await;
    assert_eq!(
        body["errors"][0]["extensions"]["code"], "GRAPHQL_VALIDATION_FAILED",
        "{body}"
    );
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("Position"),
        "{body}"
    );
    api.shutdown().await;
}
