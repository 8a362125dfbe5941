//! The GraphQL API over HTTP on a real port, against real PostgreSQL,
//! JetStream, Redis and the graph server: every query and mutation,
//! read-your-writes, tenant isolation, roles, and bad input of every kind
//! (each answered with the protocol's error while nothing is written).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use api::auth::Role;
use futures::{SinkExt as _, StreamExt as _};
use neurectomy_e2e::api::TestApi;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

const OPERATOR: &[Role] = &[Role::Operator];

const RESULT: &str =
    "streamId version position replayed commandId events { position type version }";

/// Runs a mutation, returning its `CommandResult`.
async fn mutate(api: &TestApi, token: &str, field: &str, args: &str) -> Value {
    let data = api
        .data(
            token,
            &format!("mutation {{ {field}({args}) {{ {RESULT} }} }}"),
            json!({}),
        )
        .await;
    data[field].clone()
}

fn position(result: &Value) -> i64 {
    result["position"].as_str().unwrap().parse().unwrap()
}

/// Agents, a workflow of three tasks (b depends on a, c on b), a run of
/// `a` by agent 0 which delegates `b` to agent 1: the scenario most tests
/// read back.
struct Scenario {
    agents: Vec<String>,
    workflow: String,
    tasks: Vec<String>,
    last: i64,
}

async fn scenario(api: &TestApi, token: &str) -> Scenario {
    let mut agents = Vec::new();
    for (i, caps) in [["code", "test"], ["code", "review"], ["review", "deploy"]]
        .iter()
        .enumerate()
    {
        let id = Uuid::new_v4().to_string();
        let caps = format!("[\"{}\", \"{}\"]", caps[0], caps[1]);
        mutate(
            api,
            token,
            "registerAgent",
            &format!(
                "id: \"{id}\", name: \"agent-{i}\", kind: LLM, model: \"m\", capabilities: {caps}"
            ),
        )
        .await;
        agents.push(id);
    }
    let workflow = Uuid::new_v4().to_string();
    mutate(
        api,
        token,
        "startWorkflow",
        &format!("id: \"{workflow}\", name: \"release\", metadata: {{team: \"x\"}}"),
    )
    .await;
    let mut tasks: Vec<String> = Vec::new();
    for (i, title) in ["build", "review", "ship"].iter().enumerate() {
        let id = Uuid::new_v4().to_string();
        let depends = tasks
            .last()
            .map(|d| format!("[\"{d}\"]"))
            .unwrap_or("[]".into());
        let caps = if i == 1 { "[\"code\"]" } else { "[]" };
        mutate(
            api,
            token,
            "createTask",
            &format!("id: \"{id}\", workflowId: \"{workflow}\", title: \"{title}\", dependsOn: {depends}, requiredCapabilities: {caps}, input: {{n: {i}}}"),
        )
        .await;
        tasks.push(id);
    }
    let (a, b) = (&tasks[0], &tasks[1]);
    mutate(
        api,
        token,
        "assignTask",
        &format!("taskId: \"{a}\", agentId: \"{}\"", agents[0]),
    )
    .await;
    mutate(api, token, "startTask", &format!("taskId: \"{a}\"")).await;
    mutate(
        api,
        token,
        "reportTaskProgress",
        &format!("taskId: \"{a}\", percent: 60, note: \"half\""),
    )
    .await;
    mutate(
        api,
        token,
        "completeTask",
        &format!("taskId: \"{a}\", output: {{ok: true}}"),
    )
    .await;
    mutate(
        api,
        token,
        "assignTask",
        &format!("taskId: \"{b}\", agentId: \"{}\"", agents[0]),
    )
    .await;
    let last = mutate(
        api,
        token,
        "delegateTask",
        &format!(
            "taskId: \"{b}\", fromAgentId: \"{}\", toAgentId: \"{}\"",
            agents[0], agents[1]
        ),
    )
    .await;
    Scenario {
        agents,
        workflow,
        tasks,
        last: position(&last),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutations_write_and_every_query_reads_them_back() {
    let api = TestApi::start().await;
    let token = api.token("acme", OPERATOR);
    let s = scenario(&api, &token).await;
    let vars = json!({ "p": s.last.to_string() });

    // Read-your-writes: no waiting for the projectors by hand.
    let data = api
        .data(
            &token,
            "query($a: ID!, $p: Position) { agent(id: $a, atLeastPosition: $p) { name kind model capabilities status currentTaskId tasksCompleted lastPosition } }",
            json!({ "a": s.agents[1], "p": vars["p"] }),
        )
        .await;
    let agent = &data["agent"];
    assert_eq!(agent["name"], "agent-1");
    assert_eq!(agent["kind"], "llm");
    assert_eq!(agent["capabilities"], json!(["code", "review"]));
    assert_eq!(agent["status"], "active");
    // Delegated while assigned: it holds the task but is not running it.
    assert_eq!(agent["currentTaskId"], Value::Null);
    let data = api
        .data(&token, "query($a: ID!, $p: Position) { agent(id: $a, atLeastPosition: $p) { tasksCompleted currentTaskId } }", json!({ "a": s.agents[0], "p": vars["p"] }))
        .await;
    assert_eq!(data["agent"]["tasksCompleted"], 1);
    assert_eq!(data["agent"]["currentTaskId"], Value::Null);

    let data = api
        .data(
            &token,
            "query($t: ID!, $b: ID!, $w: ID!, $p: Position) {
               task(id: $t, atLeastPosition: $p) { title state progress progressNote assigneeId attempt maxAttempts dependsOn }
               delegated: task(id: $b) { state assigneeId }
               workflow(id: $w) { name status progress { total pending assigned running completed percentComplete } }
               done: tasks(workflowId: $w, state: COMPLETED) { edges { node { id } } }
               all: tasks(workflowId: $w, first: 2) { edges { cursor node { id } } pageInfo { hasNextPage endCursor } }
             }",
            json!({ "t": s.tasks[0], "b": s.tasks[1], "w": s.workflow, "p": vars["p"] }),
        )
        .await;
    assert_eq!(data["task"]["state"], "completed");
    assert_eq!(data["task"]["progress"], 100);
    assert_eq!(data["task"]["assigneeId"], s.agents[0].as_str());
    assert_eq!(data["delegated"]["assigneeId"], s.agents[1].as_str());
    assert_eq!(data["delegated"]["state"], "assigned");
    let progress = &data["workflow"]["progress"];
    assert_eq!(
        (
            progress["total"].as_i64(),
            progress["completed"].as_i64(),
            progress["assigned"].as_i64(),
            progress["pending"].as_i64()
        ),
        (Some(3), Some(1), Some(1), Some(1))
    );
    assert_eq!(data["done"]["edges"][0]["node"]["id"], s.tasks[0].as_str());
    assert_eq!(data["all"]["edges"].as_array().unwrap().len(), 2);
    assert_eq!(data["all"]["pageInfo"]["hasNextPage"], true);
    // The next page holds the rest, without overlap.
    let cursor = data["all"]["pageInfo"]["endCursor"].clone();
    let next = api
        .data(&token, "query($w: ID!, $c: String) { tasks(workflowId: $w, first: 2, after: $c) { edges { node { id } } pageInfo { hasNextPage hasPreviousPage } } }", json!({ "w": s.workflow, "c": cursor }))
        .await;
    let mut seen: Vec<String> = data["all"]["edges"]
        .as_array()
        .unwrap()
        .iter()
        .chain(next["tasks"]["edges"].as_array().unwrap())
        .map(|e| e["node"]["id"].as_str().unwrap().to_owned())
        .collect();
    seen.sort();
    let mut expected = s.tasks.clone();
    expected.sort();
    assert_eq!(seen, expected);
    assert_eq!(next["tasks"]["pageInfo"]["hasNextPage"], false);
    assert_eq!(next["tasks"]["pageInfo"]["hasPreviousPage"], true);

    // Agents by capability and status, one per page.
    let data = api
        .data(&token, "{ agents(filter: {capability: \"review\", status: ACTIVE}, first: 1) { edges { node { name } } pageInfo { hasNextPage endCursor } } }", json!({}))
        .await;
    assert_eq!(data["agents"]["edges"].as_array().unwrap().len(), 1);
    assert_eq!(data["agents"]["pageInfo"]["hasNextPage"], true);
    let data = api
        .data(
            &token,
            "{ agents(first: 50) { edges { node { id } } } }",
            json!({}),
        )
        .await;
    assert_eq!(data["agents"]["edges"].as_array().unwrap().len(), 3);

    // The graph.
    let data = api
        .data(
            &token,
            "query($w: ID!, $b: ID!, $c: ID!, $a: ID!, $p: Position) {
               workflowGraph(id: $w, atLeastPosition: $p) { name tasks { id state } edges { from to } }
               blockedTasks(workflowId: $w, atLeastPosition: $p) { id blockedBy }
               delegationChain(taskId: $b, atLeastPosition: $p) { fromAgentId toAgentId position }
               agentNeighbourhood(id: $a, atLeastPosition: $p) { tasks { id current } collaboratorIds }
               taskLineage(id: $c, atLeastPosition: $p) { id depth }
             }",
            json!({ "w": s.workflow, "b": s.tasks[1], "c": s.tasks[2], "a": s.agents[1], "p": vars["p"] }),
        )
        .await;
    assert_eq!(data["workflowGraph"]["tasks"].as_array().unwrap().len(), 3);
    assert_eq!(data["workflowGraph"]["edges"].as_array().unwrap().len(), 2);
    // b's dependency (a) completed; c waits for b.
    assert_eq!(
        data["blockedTasks"],
        json!([{ "id": s.tasks[2], "blockedBy": [s.tasks[1]] }])
    );
    assert_eq!(
        data["delegationChain"][0]["fromAgentId"],
        s.agents[0].as_str()
    );
    assert_eq!(
        data["delegationChain"][0]["toAgentId"],
        s.agents[1].as_str()
    );
    assert_eq!(data["delegationChain"][0]["position"], vars["p"]);
    assert_eq!(
        data["agentNeighbourhood"]["tasks"][0]["id"],
        s.tasks[1].as_str()
    );
    assert_eq!(
        data["agentNeighbourhood"]["collaboratorIds"],
        json!([s.agents[0]])
    );
    assert_eq!(
        data["taskLineage"],
        json!([{ "id": s.tasks[1], "depth": 1 }, { "id": s.tasks[0], "depth": 2 }])
    );

    let data = api
        .data(
            &token,
            "{ projectionStatus { name checkpoint lag } }",
            json!({}),
        )
        .await;
    assert_eq!(data["projectionStatus"].as_array().unwrap().len(), 2);
    api.shutdown().await;
}

/// Reads `agent(id)` without a position until `check` accepts it.
async fn agent_until(
    api: &TestApi,
    token: &str,
    agent: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let query =
        "query($a: ID!) { agent(id: $a) { status currentTaskId tasksCompleted lastPosition } }";
    commands::testkit::eventually(what, Duration::from_secs(10), || async {
        let data = api.data(token, query, json!({ "a": agent })).await;
        check(&data["agent"]).then(|| data["agent"].clone())
    })
    .await
}

/// `agent(id)` without a position is answered from the API's near cache
/// once it holds the agent; every change of the agent — its own events,
/// a task assigned to or started by it, a task of it ending (which names
/// no agent) — reaches that answer within moments, and a read with the
/// change's position gets it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_read_without_a_position_follow_every_change() {
    let api = TestApi::start().await;
    let token = api.token("acme", OPERATOR);
    let s = scenario(&api, &token).await;
    let agent = s.agents[2].clone();
    let exact = "query($a: ID!, $p: Position) { agent(id: $a, atLeastPosition: $p) { status currentTaskId tasksCompleted } }";
    // Read until the cache follows the tenant and holds the agent (reads
    // before that go to Redis): a read a second later still agrees.
    agent_until(&api, &token, &agent, "the agent", |a| {
        a["status"] == "active"
    })
    .await;
    for _ in 0..20 {
        agent_until(&api, &token, &agent, "the agent", |a| {
            a["status"] == "active"
        })
        .await;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    let paused = mutate(&api, &token, "pauseAgent", &format!("agentId: \"{agent}\"")).await;
    let data = api
        .data(
            &token,
            exact,
            json!({ "a": agent, "p": position(&paused).to_string() }),
        )
        .await;
    assert_eq!(data["agent"]["status"], "paused", "{data}");
    agent_until(&api, &token, &agent, "the pause", |a| {
        a["status"] == "paused"
    })
    .await;
    mutate(
        &api,
        &token,
        "resumeAgent",
        &format!("agentId: \"{agent}\""),
    )
    .await;
    agent_until(&api, &token, &agent, "the resumption", |a| {
        a["status"] == "active"
    })
    .await;

    // A task assigned to and started by the agent, then completed: the
    // completion names the task only.
    let b = Uuid::new_v4().to_string();
    let w = &s.workflow;
    mutate(
        &api,
        &token,
        "createTask",
        &format!("id: \"{b}\", workflowId: \"{w}\", title: \"audit\", dependsOn: [], requiredCapabilities: [], input: {{}}"),
    )
    .await;
    mutate(
        &api,
        &token,
        "assignTask",
        &format!("taskId: \"{b}\", agentId: \"{agent}\""),
    )
    .await;
    mutate(&api, &token, "startTask", &format!("taskId: \"{b}\"")).await;
    let running = agent_until(&api, &token, &agent, "the task started", |a| {
        a["currentTaskId"] == b.as_str()
    })
    .await;
    assert_eq!(running["tasksCompleted"], 0, "{running}");
    mutate(
        &api,
        &token,
        "completeTask",
        &format!("taskId: \"{b}\", output: {{ok: true}}"),
    )
    .await;
    let done = agent_until(&api, &token, &agent, "the task's completion", |a| {
        a["tasksCompleted"] == 1
    })
    .await;
    assert_eq!(done["currentTaskId"], Value::Null, "{done}");
    api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_are_idempotent_and_refusals_carry_codes_and_write_nothing() {
    let api = TestApi::start().await;
    let token = api.token("acme", OPERATOR);
    let agent = Uuid::new_v4().to_string();
    let command = Uuid::new_v4().to_string();
    let register = format!("id: \"{agent}\", name: \"a\", kind: TOOL, commandId: \"{command}\"");
    let first = mutate(&api, &token, "registerAgent", &register).await;
    assert_eq!(first["version"], 1);
    assert_eq!(first["replayed"], false);
    assert_eq!(first["events"][0]["type"], "AgentRegistered");
    let again = mutate(&api, &token, "registerAgent", &register).await;
    assert_eq!(again["replayed"], true);
    assert_eq!(again["position"], first["position"]);
    let head = api.head().await;

    let cases = [
        // Same command id, different command.
        (format!("mutation {{ registerAgent(id: \"{agent}\", name: \"b\", kind: TOOL, commandId: \"{command}\") {{ version }} }}"), "CONFLICT"),
        (format!("mutation {{ pauseAgent(agentId: \"{agent}\", expectedVersion: 7) {{ version }} }}"), "CONFLICT"),
        (format!("mutation {{ registerAgent(id: \"{agent}\", name: \"a\", kind: TOOL) {{ version }} }}"), "ALREADY_EXISTS"),
        (format!("mutation {{ resumeAgent(agentId: \"{agent}\") {{ version }} }}"), "INVALID_TRANSITION"),
        (format!("mutation {{ pauseAgent(agentId: \"{}\") {{ version }} }}", Uuid::new_v4()), "NOT_FOUND"),
        ("mutation { pauseAgent(agentId: \"not-a-uuid\") { version } }".to_owned(), "VALIDATION"),
        ("mutation { registerAgent(name: \"\", kind: LLM) { version } }".to_owned(), "VALIDATION"),
        (format!("mutation {{ reportTaskProgress(taskId: \"{}\", percent: 300) {{ version }} }}", Uuid::new_v4()), "VALIDATION"),
    ];
    for (query, code) in &cases {
        let (got, message) = api.error(Some(&token), query, json!({})).await;
        assert_eq!(&got, code, "{query}: {message}");
        assert!(!message.is_empty());
    }
    assert_eq!(api.head().await, head, "a refused command wrote something");
    // A version the caller pins is honoured.
    let paused = mutate(
        &api,
        &token,
        "pauseAgent",
        &format!("agentId: \"{agent}\", expectedVersion: 1, reason: \"maintenance\""),
    )
    .await;
    assert_eq!(paused["version"], 2);
    api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_isolated_and_roles_enforced() {
    let api = TestApi::start().await;
    let acme = api.token("acme", OPERATOR);
    let s = scenario(&api, &acme).await;
    api.caught_up().await;

    let other = api.token("globex", &[Role::Operator, Role::Auditor]);
    let data = api
        .data(
            &other,
            "query($a: ID!, $t: ID!, $w: ID!) { agent(id: $a) { id } task(id: $t) { id } workflow(id: $w) { id } workflowGraph(id: $w) { id } agentNeighbourhood(id: $a) { id } agents { edges { node { id } } } }",
            json!({ "a": s.agents[0], "t": s.tasks[0], "w": s.workflow }),
        )
        .await;
    assert_eq!(data["agent"], Value::Null);
    assert_eq!(data["task"], Value::Null);
    assert_eq!(data["workflow"], Value::Null);
    assert_eq!(data["workflowGraph"], Value::Null);
    assert_eq!(data["agentNeighbourhood"], Value::Null);
    assert_eq!(data["agents"]["edges"], json!([]));
    for query in [
        format!(
            "{{ tasks(workflowId: \"{}\") {{ edges {{ cursor }} }} }}",
            s.workflow
        ),
        format!(
            "{{ blockedTasks(workflowId: \"{}\") {{ id }} }}",
            s.workflow
        ),
        format!("{{ taskLineage(id: \"{}\") {{ id }} }}", s.tasks[2]),
        format!("{{ delegationChain(taskId: \"{}\") {{ at }} }}", s.tasks[1]),
        format!(
            "mutation {{ pauseAgent(agentId: \"{}\") {{ version }} }}",
            s.agents[0]
        ),
        format!(
            "mutation {{ createTask(workflowId: \"{}\", title: \"x\") {{ version }} }}",
            s.workflow
        ),
    ] {
        let (code, message) = api.error(Some(&other), &query, json!({})).await;
        assert_eq!(code, "NOT_FOUND", "{query}: {message}");
    }

    // Roles: a viewer reads but cannot write.
    let viewer = api.token("acme", &[Role::Viewer]);
    let data = api
        .data(
            &viewer,
            "query($a: ID!) { agent(id: $a) { name } }",
            json!({ "a": s.agents[0] }),
        )
        .await;
    assert_eq!(data["agent"]["name"], "agent-0");
    let (code, message) = api
        .error(
            Some(&viewer),
            &format!(
                "mutation {{ pauseAgent(agentId: \"{}\") {{ version }} }}",
                s.agents[0]
            ),
            json!({}),
        )
        .await;
    assert_eq!(code, "FORBIDDEN");
    assert!(message.contains("operator"), "{message}");

    // No, forged or expired tokens: 401 with UNAUTHENTICATED.
    let forged = api::auth::Authenticator::new(Some("another-secret-another-secret-another"), None)
        .unwrap()
        .mint("eve", "acme", &[Role::Operator], 60)
        .unwrap();
    for token in [None, Some(forged.as_str()), Some("not.a.jwt")] {
        let (status, body) = api
            .graphql(token, "{ agents { edges { cursor } } }", json!({}))
            .await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(body["errors"][0]["extensions"]["code"], "UNAUTHENTICATED");
    }
    api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_protocol_errors_and_the_server_keeps_serving() {
    // A complexity limit below one full page, which a checked configuration
    // refuses: the request-time check on its own.
    let api = TestApi::start_unchecked(&[
        "--api-max-depth",
        "6",
        "--api-max-complexity",
        "1000",
        "--api-consistency-timeout-ms",
        "300",
        "--api-body-limit",
        "4096",
    ])
    .await;
    let token = api.token("acme", OPERATOR);
    let head = api.head().await;
    let post = |body: String, content_type: &'static str, accept: &'static str| {
        api.http
            .post(api.url("/graphql"))
            .bearer_auth(&token)
            .header("content-type", content_type)
            .header("accept", accept)
            .body(body)
            .send()
    };

    // Not JSON; JSON but not a request; wrong media type; too big.
    for (body, content_type, status) in [
        ("{not json".to_owned(), "application/json", 400),
        ("{\"variables\": {}}".to_owned(), "application/json", 400),
        (
            "query { agents { edges { cursor } } }".to_owned(),
            "text/plain",
            415,
        ),
        (
            format!(
                "{{\"query\": \"{{ agents {{ edges {{ cursor }} }} }} #{}\"}}",
                "x".repeat(8_000)
            ),
            "application/json",
            413,
        ),
    ] {
        let response = post(body, content_type, "application/json").await.unwrap();
        assert_eq!(response.status().as_u16(), status);
    }

    // GraphQL errors: syntax, unknown field, wrong type; with the
    // graphql-response+json media type a request that did not run is a 400.
    for query in [
        "{ agents { edges { cursor } }",
        "{ agent(id: \"x\") { nope } }",
        "{ agent(id: [5]) { id } }",
        "{ agents(first: \"many\") { edges { cursor } } }",
    ] {
        let body = json!({ "query": query }).to_string();
        let response = post(body.clone(), "application/json", "application/json")
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
        let json: Value = response.json().await.unwrap();
        assert!(json["errors"][0]["message"].as_str().is_some(), "{json}");
        let response = post(
            body,
            "application/json",
            "application/graphql-response+json",
        )
        .await
        .unwrap();
        assert_eq!(response.status().as_u16(), 400, "{query}");
        assert_eq!(
            response.headers()["content-type"],
            "application/graphql-response+json"
        );
    }

    // A document the schema has accepted is not validated again unless its
    // variables need it: a bad variable gets the same error before and
    // after the document was accepted, and complexity that depends on a
    // variable is counted for each request.
    let by_id = "query($id: ID!) { agent(id: $id) { id status } }";
    let refused = |body: &Value| {
        assert_eq!(body["data"], Value::Null, "{body}");
        body["errors"][0]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("no error: {body}"))
            .to_owned()
    };
    let (_, cold) = api
        .graphql(Some(&token), by_id, json!({ "id": {"not": "an id"} }))
        .await;
    let cold = refused(&cold);
    assert!(cold.contains("Invalid value"), "{cold}");
    let some_id = Uuid::new_v4().to_string();
    let (status, body) = api
        .graphql(Some(&token), by_id, json!({ "id": some_id }))
        .await;
    assert_eq!(status, 200);
    assert!(body.get("errors").is_none(), "{body}");
    for bad in [json!({"not": "an id"}), json!([1.5])] {
        let (_, warm) = api.graphql(Some(&token), by_id, json!({ "id": bad })).await;
        assert_eq!(refused(&warm), cold, "{bad}");
    }
    let paged = "query($n: Int) { agents(first: $n) { edges { node { id name kind model capabilities status } } } }";
    let (_, body) = api.graphql(Some(&token), paged, json!({ "n": 2 })).await;
    assert!(body.get("errors").is_none(), "{body}");
    let (_, body) = api.graphql(Some(&token), paged, json!({ "n": 500 })).await;
    assert!(refused(&body).to_lowercase().contains("complex"), "{body}");

    // Depth and complexity bombs.
    let deep = "{ agentNeighbourhood(id: \"x\") { tasks { id } } projectionStatus { name } agents { edges { node { id } pageInfo: __typename } pageInfo { hasNextPage } } }".to_owned();
    let (_, body) = api.graphql(Some(&token), &deep, json!({})).await;
    assert!(
        body.get("errors").is_none() || body["data"] != Value::Null,
        "a shallow query was refused: {body}"
    );
    let bomb = "{ agents { edges { node { a { b { c { d } } } } } } }";
    let (_, body) = api.graphql(Some(&token), bomb, json!({})).await;
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("deep"),
        "{body}"
    );
    let heavy =
        "{ agents(first: 500) { edges { node { id name kind model capabilities status } } } }";
    let (_, body) = api.graphql(Some(&token), heavy, json!({})).await;
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("complex"),
        "{body}"
    );

    // Out-of-range pages, foreign cursors.
    for first in [0, -1] {
        let (code, _) = api
            .error(
                Some(&token),
                &format!("{{ agents(first: {first}) {{ edges {{ cursor }} }} }}"),
                json!({}),
            )
            .await;
        assert_eq!(code, "VALIDATION");
    }
    let (code, _) = api
        .error(
            Some(&token),
            "{ agents(after: \"bogus\") { edges { cursor } } }",
            json!({}),
        )
        .await;
    assert_eq!(code, "VALIDATION");

    // A position the projections never reach: STALE after the timeout.
    let far = (head + (1 << 40)).to_string();
    let (code, message) = api
        .error(
            Some(&token),
            "query($p: Position) { agent(id: \"0b7e6a4e-1c2d-4f5a-9b8c-3d2e1f0a9b8c\", atLeastPosition: $p) { id } }",
            json!({ "p": far }),
        )
        .await;
    assert_eq!(code, "STALE", "{message}");
    let response = api
        .http
        .post(api.url("/graphql"))
        .bearer_auth(&token)
        .header("x-min-position", "abc")
        .json(&json!({"query": "{ agent(id: \"x\") { id } }"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);

    // GET: queries run, mutations are refused.
    let response = api
        .http
        .get(api.url("/graphql"))
        .bearer_auth(&token)
        .query(&[("query", "{ agents { edges { cursor } } }")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let response = api
        .http
        .get(api.url("/graphql"))
        .bearer_auth(&token)
        .query(&[(
            "query",
            "mutation { registerAgent(name: \"x\", kind: LLM) { version } }",
        )])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 405);

    assert_eq!(api.head().await, head, "bad requests wrote something");
    // Still serving.
    let data = api
        .data(&token, "{ projectionStatus { name } }", json!({}))
        .await;
    assert_eq!(data["projectionStatus"].as_array().unwrap().len(), 2);
    for path in ["/healthz", "/readyz", "/", "/metrics"] {
        let response = api.http.get(api.url(path)).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 200, "{path}");
    }
    // GraphiQL takes a token for its requests and its socket; nothing else.
    let page = api
        .http
        .get(api.url("/"))
        .query(&[("token", token.as_str())])
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        page.matches(&format!("data-authorization=\"Bearer {token}\""))
            .count(),
        1,
        "{page}"
    );
    let page = api
        .http
        .get(api.url("/"))
        .query(&[("token", "x\"</script><script>alert(1)")])
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!page.contains("alert(1)"), "{page}");
    let metrics = api
        .http
        .get(api.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("neurectomy_http_requests_total"),
        "{metrics}"
    );
    assert!(
        metrics.contains("neurectomy_projection_lag_events"),
        "{metrics}"
    );
    api.shutdown().await;
}

/// Opens a WebSocket with `protocol`.
async fn connect(
    api: &TestApi,
    protocol: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let mut request = format!("ws://{}/graphql/ws", api.addr)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", protocol.parse().unwrap());
    tokio_tungstenite::connect_async(request).await.unwrap().0
}

/// The close code the server ends the connection with.
async fn close_code(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> Option<u16> {
    let deadline = tokio::time::sleep(Duration::from_secs(10));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            () = &mut deadline => return None,
            message = ws.next() => match message {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return None,
            },
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_clients_that_misbehave_are_closed_with_the_protocol_codes() {
    let api = TestApi::start_with(&[
        "--api-ws-init-timeout-ms",
        "300",
        "--api-ws-message-limit",
        "2048",
    ])
    .await;
    let token = api.token("acme", &[Role::Viewer]);

    // Never sends connection_init: 4408.
    let mut silent = connect(&api, "graphql-transport-ws").await;
    assert_eq!(close_code(&mut silent).await, Some(4408));

    // A bad token in connection_init: 4403.
    let mut forged = connect(&api, "graphql-transport-ws").await;
    forged
        .send(Message::text(
            json!({"type": "connection_init", "payload": {"authorization": "Bearer nope"}})
                .to_string(),
        ))
        .await
        .unwrap();
    assert_eq!(close_code(&mut forged).await, Some(4403));

    // Garbage after a good init: 4400.
    let mut garbage = connect(&api, "graphql-transport-ws").await;
    garbage.send(Message::text(json!({"type": "connection_init", "payload": {"authorization": format!("Bearer {token}")}}).to_string())).await.unwrap();
    let ack = garbage.next().await.unwrap().unwrap();
    assert!(ack.to_text().unwrap().contains("connection_ack"), "{ack:?}");
    garbage.send(Message::text("{{{ not json")).await.unwrap();
    assert_eq!(close_code(&mut garbage).await, Some(4400));

    // An oversized message: 1009.
    let mut big = connect(&api, "graphql-transport-ws").await;
    big.send(Message::text(json!({"type": "connection_init", "payload": {"authorization": format!("Bearer {token}"), "pad": "x".repeat(4_096)}}).to_string())).await.unwrap();
    assert_eq!(close_code(&mut big).await, Some(1009));

    // No GraphQL subprotocol: refused before the upgrade.
    let request = format!("ws://{}/graphql/ws", api.addr)
        .into_client_request()
        .unwrap();
    assert!(tokio_tungstenite::connect_async(request).await.is_err());

    // The legacy protocol authenticates the same way.
    let mut legacy = connect(&api, "graphql-ws").await;
    legacy.send(Message::text(json!({"type": "connection_init", "payload": {"authorization": format!("Bearer {token}")}}).to_string())).await.unwrap();
    let ack = legacy.next().await.unwrap().unwrap();
    assert!(ack.to_text().unwrap().contains("connection_ack"), "{ack:?}");

    // Everyone else is still served.
    let data = api
        .data(
            &api.token("acme", OPERATOR),
            "{ projectionStatus { name } }",
            json!({}),
        )
        .await;
    assert_eq!(data["projectionStatus"].as_array().unwrap().len(), 2);
    api.shutdown().await;
}
