//! The edges an outside acceptance run found, each against the API on a
//! real port with real PostgreSQL, JetStream, Redis and the graph server:
//! documents whose cost explodes once fragments are expanded, limits that
//! name their numbers, the WebSocket protocol's close frames and `error`
//! messages, subscriptions per socket, tokens that expire on an open
//! socket, one rule for ids, `DateTime` times, tenants that cannot see each
//! other through ids or command ids, retried creations, and input that
//! PostgreSQL cannot store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use api::auth::Role;
use neurectomy_e2e::api::TestApi;
use neurectomy_e2e::ws::{Client, Reply};
use serde_json::{json, Value};
use uuid::Uuid;

const OPERATOR: &[Role] = &[Role::Operator, Role::Auditor];

/// `{ ...F0 } fragment F0 on Query { ...F1 ...F1 } … fragment Fn on Query
/// { __typename }`: about 40 bytes a level, 2^n fields once expanded.
fn doubling(levels: usize) -> String {
    let mut query = "{ ...F0 }".to_owned();
    for level in 0..levels {
        let next = level + 1;
        query.push_str(&format!(
            " fragment F{level} on Query {{ ...F{next} ...F{next} }}"
        ));
    }
    query.push_str(&format!(" fragment F{levels} on Query {{ __typename }}"));
    query
}

/// graphql-js 16's `getIntrospectionQuery()` (what GraphiQL and codegen
/// tools send), nesting `ofType` eight levels deep.
const INTROSPECTION: &str = r"
query IntrospectionQuery {
  __schema {
    queryType { name } mutationType { name } subscriptionType { name }
    types { ...FullType }
    directives { name description locations args { ...InputValue } }
  }
}
fragment FullType on __Type {
  kind name description
  fields(includeDeprecated: true) {
    name description args { ...InputValue } type { ...TypeRef } isDeprecated deprecationReason
  }
  inputFields { ...InputValue }
  interfaces { ...TypeRef }
  enumValues(includeDeprecated: true) { name description isDeprecated deprecationReason }
  possibleTypes { ...TypeRef }
}
fragment InputValue on __InputValue { name description type { ...TypeRef } defaultValue }
fragment TypeRef on __Type {
  kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name
  ofType { kind name ofType { kind name ofType { kind name ofType { kind name } } } } } } } }
}";

fn code(body: &Value) -> &str {
    body["errors"][0]["extensions"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error code in {body}"))
}

fn message(body: &Value) -> &str {
    body["errors"][0]["message"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_are_measured_before_they_run_and_limits_name_their_numbers() {
    let api = TestApi::start().await;
    let token = api.token("acme", OPERATOR);

    // 23 levels: ~900 bytes, 8,388,608 fields once expanded. Refused
    // before validation and execution (no data at all), naming the count.
    let bomb = doubling(23);
    assert!(bomb.len() < 1_100, "{}", bomb.len());
    let (status, body) = api.graphql(Some(&token), &bomb, json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(code(&body), "QUERY_TOO_LARGE", "{body}");
    assert!(body.get("data").is_none_or(Value::is_null), "{body}");
    assert!(
        message(&body).contains("8388608 fields") && message(&body).contains("limit is 2000"),
        "{body}"
    );
    // The same family deeper: still refused, still counted exactly.
    let (_, body) = api.graphql(Some(&token), &doubling(60), json!({})).await;
    assert_eq!(code(&body), "QUERY_TOO_LARGE", "{body}");
    assert!(
        message(&body).contains(&format!("{} fields", 1u64 << 60)),
        "{body}"
    );

    // While such documents keep arriving, /healthz keeps answering: 16
    // clients each sending bombs back to back, 20 probes of /healthz. A
    // generous bound (a benchmark measures anything finer): before the
    // documents were measured, each bomb held a worker thread for seconds.
    let stop = tokio_util::sync::CancellationToken::new();
    let mut senders = Vec::new();
    for _ in 0..16 {
        let (http, url, token, bomb, stop) = (
            api.http.clone(),
            api.url("/graphql"),
            token.clone(),
            bomb.clone(),
            stop.clone(),
        );
        senders.push(tokio::spawn(async move {
            let mut refused = 0u32;
            while !stop.is_cancelled() {
                let response = http
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&json!({ "query": bomb }))
                    .send()
                    .await
                    .unwrap();
                let body: Value = response.json().await.unwrap();
                assert_eq!(code(&body), "QUERY_TOO_LARGE", "{body}");
                refused += 1;
            }
            refused
        }));
    }
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let started = Instant::now();
        let response = api.http.get(api.url("/healthz")).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 200);
        slowest = slowest.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    stop.cancel();
    let mut refused = 0;
    for sender in senders {
        refused += sender.await.unwrap();
    }
    assert!(refused >= 16, "the bombs were not sent: {refused}");
    assert!(
        slowest < Duration::from_secs(5),
        "/healthz took {slowest:?} while {refused} bombs arrived"
    );

    // The page limit and the complexity limit agree: a full page runs, a
    // page above the limit gets the page limit's words, and a page too
    // costly for the complexity limit gets its numbers.
    let full = "{ agents(first: 500) { edges { cursor node { id name kind model capabilities parentId status statusReason currentTaskId tasksCompleted tasksFailed lastPosition lastEventAt } } pageInfo { hasNextPage endCursor } } }";
    let (_, body) = api.graphql(Some(&token), full, json!({})).await;
    assert!(
        body.get("errors").is_none(),
        "a full page was refused: {body}"
    );
    let (_, body) = api
        .graphql(
            Some(&token),
            "{ agents(first: 100000) { edges { node { id } } } }",
            json!({}),
        )
        .await;
    assert_eq!(code(&body), "VALIDATION", "{body}");
    assert!(
        message(&body).contains("between 1 and 500") && message(&body).contains("100000"),
        "{body}"
    );
    let aliases: Vec<String> = (0..60).map(|i| format!("n{i}: name")).collect();
    let heavy = format!(
        "{{ agents(first: 500) {{ edges {{ node {{ {} }} }} }} }}",
        aliases.join(" ")
    );
    let (_, body) = api.graphql(Some(&token), &heavy, json!({})).await;
    assert_eq!(code(&body), "QUERY_TOO_COMPLEX", "{body}");
    assert!(
        message(&body).contains("agents(first: 500) counts 500 × 62")
            && message(&body).contains("limit is 20000"),
        "{body}"
    );
    let deep = "{ a { b { c { d { e { f { g { h { i { j { k { l { m } } } } } } } } } } } } }";
    let (_, body) = api.graphql(Some(&token), deep, json!({})).await;
    assert_eq!(code(&body), "QUERY_TOO_DEEP", "{body}");
    assert!(message(&body).contains("13 levels"), "{body}");

    // The standard introspection query passes the limits (it nests eight
    // levels of ofType below the schema's own depth).
    let body = api.data(&token, INTROSPECTION, json!({})).await;
    let types = body["__schema"]["types"].as_array().unwrap();
    assert!(types.iter().any(|t| t["name"] == "Agent"), "{body}");

    // Parse and validation errors carry codes too.
    let (_, body) = api.graphql(Some(&token), "{ agents(", json!({})).await;
    assert_eq!(code(&body), "GRAPHQL_PARSE_FAILED", "{body}");
    let (_, body) = api.graphql(Some(&token), "{ nope }", json!({})).await;
    assert_eq!(code(&body), "GRAPHQL_VALIDATION_FAILED", "{body}");

    // A document that ran once is measured and checked again with every
    // request's variables (accepted documents skip the extension — see
    // graphql::fast): a page size that makes it too costly is refused with
    // the limit's numbers, and a variable of the wrong value gets exactly
    // the answer it gets on a document never run before.
    let paged = format!(
        "query($n: Int) {{ agents(first: $n) {{ edges {{ node {{ {} }} }} }} }}",
        aliases.join(" ")
    );
    for _ in 0..2 {
        api.data(&token, &paged, json!({ "n": 10 })).await;
    }
    let (_, body) = api.graphql(Some(&token), &paged, json!({ "n": 500 })).await;
    assert_eq!(code(&body), "QUERY_TOO_COMPLEX", "{body}");
    assert!(
        message(&body).contains("counts 500 × 62") && body.get("data").is_none_or(Value::is_null),
        "{body}"
    );
    let by_status = |n: u32| {
        format!("query($s: AgentStatus) {{ agents(filter: {{status: $s}}, first: {n}) {{ edges {{ node {{ id }} }} }} }}")
    };
    let (_, never_run) = api
        .graphql(Some(&token), &by_status(1), json!({ "s": "NOPE" }))
        .await;
    assert!(never_run.get("errors").is_some(), "{never_run}");
    for _ in 0..2 {
        api.data(&token, &by_status(2), json!({ "s": "ACTIVE" }))
            .await;
    }
    let (_, after) = api
        .graphql(Some(&token), &by_status(2), json!({ "s": "NOPE" }))
        .await;
    assert_eq!(
        (code(&after), after.get("data")),
        (code(&never_run), never_run.get("data")),
        "{after} vs {never_run}"
    );
    api.shutdown().await;
}

/// Every field named `…At` or `at` is a `DateTime`, and no `Int` field of
/// the schema carries a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn times_are_date_times_everywhere() {
    let api = TestApi::start().await;
    let token = api.token("acme", OPERATOR);
    let schema = api.data(&token, INTROSPECTION, json!({})).await;
    // The named type under lists and non-nulls, and its kind.
    let named = |ty: &Value| -> (String, String) {
        let mut ty = ty.clone();
        while ty["name"].is_null() && !ty["ofType"].is_null() {
            ty = ty["ofType"].clone();
        }
        (
            ty["name"].as_str().unwrap_or("").to_owned(),
            ty["kind"].as_str().unwrap_or("").to_owned(),
        )
    };
    let mut times = Vec::new();
    for ty in schema["__schema"]["types"].as_array().unwrap() {
        let type_name = ty["name"].as_str().unwrap_or("");
        if type_name.starts_with("__") {
            continue;
        }
        let fields = ty["fields"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|f| (f["name"].as_str().unwrap_or(""), named(&f["type"])));
        let inputs = ty["inputFields"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(
                ty["fields"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|f| f["args"].as_array().into_iter().flatten()),
            )
            .map(|a| (a["name"].as_str().unwrap_or(""), named(&a["type"])));
        for (name, (of, kind)) in fields.chain(inputs) {
            let lower = name.to_ascii_lowercase();
            // Values only: `agentAt` is a query returning an object.
            let value = kind == "SCALAR";
            if value
                && (lower == "at"
                    || name.ends_with("At")
                    || name == "asOf"
                    || lower.contains("time"))
            {
                assert_eq!(of, "DateTime", "{type_name}.{name} is a {of}");
                times.push(format!("{type_name}.{name}"));
            }
        }
    }
    for expected in [
        "Agent.lastEventAt",
        "Delegation.at",
        "EventMetadata.occurredAt",
        "EventMetadata.recordedAt",
        "AgentAt.recordedAt",
        "AuditQuery.asOf",
    ] {
        let found = times
            .iter()
            .any(|t| t == expected || (expected.ends_with(".asOf") && t.ends_with(".asOf")));
        assert!(found, "{expected} is not among the times {times:?}");
    }

    // And they read as RFC 3339 in UTC.
    let agent = Uuid::new_v4();
    api.data(
        &token,
        &format!(
            "mutation {{ registerAgent(id: \"{agent}\", name: \"a\", kind: LLM) {{ position }} }}"
        ),
        json!({}),
    )
    .await;
    let head = api.caught_up().await;
    let data = api
        .data(
            &token,
            "query($id: ID!, $p: Position) { agent(id: $id, atLeastPosition: $p) { lastEventAt } }",
            json!({"id": agent.to_string(), "p": head.to_string()}),
        )
        .await;
    let at = data["agent"]["lastEventAt"].as_str().unwrap();
    let parsed =
        time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339).unwrap();
    assert!(at.ends_with('Z'), "{at}");
    let age = time::OffsetDateTime::now_utc() - parsed;
    assert!(age.whole_seconds().abs() < 600, "{at} is not about now");
    api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_rule_for_ids_everywhere() {
    let api = TestApi::start().await;
    let token = api.token("acme", OPERATOR);
    let registered = api
        .data(
            &token,
            "mutation { registerAgent(name: \"ids\", kind: TOOL) { streamId position } }",
            json!({}),
        )
        .await;
    let stream = registered["registerAgent"]["streamId"]
        .as_str()
        .unwrap()
        .to_owned();
    let uuid = stream.strip_prefix("agent-").unwrap().to_owned();
    let position = registered["registerAgent"]["position"].clone();
    // The stream id, the UUID in capitals and the UUID all name the agent,
    // and `id` is always the UUID.
    for form in [stream.clone(), uuid.to_uppercase(), uuid.clone()] {
        let data = api
            .data(
                &token,
                "query($id: ID!, $p: Position) { agent(id: $id, atLeastPosition: $p) { id } agentAt(id: $id) { id } }",
                json!({"id": form, "p": position}),
            )
            .await;
        assert_eq!(data["agent"]["id"], uuid, "{form}: {data}");
        assert_eq!(data["agentAt"]["id"], uuid, "{form}: {data}");
    }
    let paused = api
        .data(
            &token,
            "mutation($id: ID!) { pauseAgent(agentId: $id) { streamId } }",
            json!({"id": stream}),
        )
        .await;
    assert_eq!(paused["pauseAgent"]["streamId"], stream);
    // Malformed ids, or ids of another kind, are VALIDATION everywhere.
    let task_form = format!("task-{uuid}");
    for (query, bad) in [
        ("query($id: ID!) { agent(id: $id) { id } }", "not-a-uuid"),
        (
            "query($id: ID!) { agent(id: $id) { id } }",
            task_form.as_str(),
        ),
        ("query($id: ID!) { task(id: $id) { id } }", stream.as_str()),
        ("query($id: ID!) { workflow(id: $id) { id } }", "x"),
        ("query($id: ID!) { workflowGraph(id: $id) { id } }", "x"),
        (
            "query($id: ID!) { blockedTasks(workflowId: $id) { id } }",
            "x",
        ),
        (
            "query($id: ID!) { delegationChain(taskId: $id) { at } }",
            "x",
        ),
        (
            "query($id: ID!) { agentNeighbourhood(id: $id) { id } }",
            "x",
        ),
        ("query($id: ID!) { taskLineage(id: $id) { id } }", "x"),
        (
            "query($id: ID!) { tasks(workflowId: $id) { edges { cursor } } }",
            "x",
        ),
        ("query($id: ID!) { agentAt(id: $id) { id } }", "x"),
        (
            "query($id: ID!) { streamHistory(streamId: $id) { kind } }",
            "x",
        ),
        (
            "mutation($id: ID!) { resumeAgent(agentId: $id) { version } }",
            "x",
        ),
        (
            "mutation($id: ID!) { startTask(taskId: $id) { version } }",
            stream.as_str(),
        ),
    ] {
        let (code, message) = api.error(Some(&token), query, json!({"id": bad})).await;
        assert_eq!(code, "VALIDATION", "{query} with {bad}: {message}");
    }
    // Over a WebSocket too.
    let mut ws = Client::connect(api.addr, &token, None).await;
    ws.subscribe(
        "bad",
        "subscription { agentUpdated(id: \"not-a-uuid\") { position } }",
        json!({}),
    )
    .await;
    match ws.reply(Duration::from_secs(10)).await {
        Reply::Error(id, errors) => {
            assert_eq!(id, "bad");
            assert_eq!(errors[0]["extensions"]["code"], "VALIDATION", "{errors}");
        }
        other => panic!("expected an error, got {other:?}"),
    }
    ws.close().await;
    api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_edges_follow_the_protocols() {
    let api = TestApi::start_with(&["--api-ws-max-subscriptions", "3"]).await;
    let token = api.token("acme", OPERATOR);

    // Close reasons fit a control frame (RFC 6455 §5.5), codes are kept:
    // an unknown message type (its reason used to be 233 bytes) and a bad
    // token.
    let mut garbage = Client::connect(api.addr, &token, None).await;
    garbage
        .send(json!({"type": "not-a-message-type-of-this-protocol", "payload": {"x": "y".repeat(200)}}))
        .await;
    let (code, reason) = garbage.closed(Duration::from_secs(10)).await;
    assert_eq!(code, 4400, "{reason}");
    assert!(reason.len() <= 123, "{} bytes: {reason}", reason.len());
    let mut forged = Client::open(api.addr, None).await;
    forged
        .send(json!({"type": "connection_init", "payload": {"authorization": format!("Bearer {}x", "y".repeat(300))}}))
        .await;
    let (code, reason) = forged.closed(Duration::from_secs(10)).await;
    assert_eq!(code, 4403, "{reason}");
    assert!(
        reason.len() <= 123 && reason.starts_with("Forbidden"),
        "{reason}"
    );

    // A subscription refused before it runs gets `error`, not `next` +
    // `complete`: parse errors, validation errors (of a document that
    // would share an execution, and of one that would not), limits.
    let mut ws = Client::connect(api.addr, &token, None).await;
    for (id, query, expected) in [
        ("parse", "subscription {", "GRAPHQL_PARSE_FAILED"),
        (
            "shared",
            "subscription { agentUpdated(id: \"x\") { nope } }",
            "GRAPHQL_VALIDATION_FAILED",
        ),
        (
            "own",
            "subscription { events(afterPosition: \"0\") { nope } }",
            "GRAPHQL_VALIDATION_FAILED",
        ),
        ("bomb", &doubling(23), "QUERY_TOO_LARGE"),
    ] {
        ws.subscribe(id, query, json!({})).await;
        let message = ws.receive(Duration::from_secs(10)).await.unwrap();
        assert_eq!(message["type"], "error", "{id}: {message}");
        assert_eq!(message["id"], id);
        assert_eq!(
            message["payload"][0]["extensions"]["code"], expected,
            "{message}"
        );
        // No `complete` follows: the next message is the answer to a ping.
        ws.send(json!({"type": "ping"})).await;
        let pong = ws.receive(Duration::from_secs(10)).await.unwrap();
        assert_eq!(pong["type"], "pong", "{id}: {pong}");
    }

    // Subscriptions per socket are capped: three run, more are refused
    // with `error` while the socket stays up; completing one makes room.
    let query = "subscription { agentsUpdated { position agent { id } } }";
    for id in ["s1", "s2", "s3"] {
        ws.subscribe(id, query, json!({})).await;
    }
    for extra in 0..20 {
        ws.subscribe(&format!("extra{extra}"), query, json!({}))
            .await;
        let message = ws.receive(Duration::from_secs(10)).await.unwrap();
        assert_eq!(message["type"], "error", "{message}");
        assert_eq!(
            message["payload"][0]["extensions"]["code"],
            "TOO_MANY_SUBSCRIPTIONS"
        );
        assert!(message["payload"][0]["message"]
            .as_str()
            .unwrap()
            .contains("3 subscriptions"));
    }
    ws.send(json!({"type": "complete", "id": "s2"})).await;
    ws.subscribe("s4", query, json!({})).await;
    api.data(
        &token,
        "mutation { registerAgent(name: \"seen\", kind: TOOL) { position } }",
        json!({}),
    )
    .await;
    let mut seen = std::collections::BTreeSet::new();
    let mut others = Vec::new();
    while seen.len() < 3 {
        match ws.reply(Duration::from_secs(20)).await {
            Reply::Next(id, _) => {
                seen.insert(id);
            }
            other => others.push(other),
        }
    }
    assert_eq!(
        seen,
        ["s1", "s3", "s4"].map(str::to_owned).into(),
        "{others:?}"
    );
    ws.close().await;
    api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_ends_when_its_token_expires() {
    let api = TestApi::start().await;
    // Valid for about two more seconds (its `exp` is in the past, within
    // the leeway).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let short = api
        .auth
        .mint_expiring_at(
            "dashboard",
            "acme",
            &[Role::Viewer],
            now + 2 - api::auth::LEEWAY,
        )
        .unwrap();
    let mut ws = Client::connect(api.addr, &short, None).await;
    ws.subscribe("live", "subscription { events { position } }", json!({}))
        .await;
    let opened = Instant::now();
    let (code, reason) = ws.closed(Duration::from_secs(30)).await;
    assert_eq!(code, 4403, "{reason}");
    assert!(reason.contains("expired"), "{reason}");
    assert!(
        opened.elapsed() < Duration::from_secs(20),
        "closed only after {:?}",
        opened.elapsed()
    );
    // A token that stays valid keeps its socket.
    let long = api.token("acme", &[Role::Viewer]);
    let mut ws = Client::connect(api.addr, &long, None).await;
    ws.send(json!({"type": "ping"})).await;
    assert_eq!(
        ws.receive(Duration::from_secs(10)).await.unwrap()["type"],
        "pong"
    );
    ws.close().await;
    api.shutdown().await;
}

/// A mutation's `CommandResult` (stream, version, replayed), or its error.
async fn run(api: &TestApi, token: &str, mutation: &str, variables: Value) -> Value {
    let (status, body) = api.graphql(Some(token), mutation, variables).await;
    assert_eq!(status, 200, "{body}");
    body
}

fn result(body: &Value) -> (String, i64, bool) {
    let data = body["data"]
        .as_object()
        .and_then(|d| d.values().next())
        .unwrap_or_else(|| panic!("no result: {body}"));
    (
        data["streamId"]
            .as_str()
            .unwrap_or_else(|| panic!("{body}"))
            .to_owned(),
        data["version"].as_i64().unwrap(),
        data["replayed"].as_bool().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creations_are_idempotent_and_tenants_learn_nothing_of_each_other() {
    let api = TestApi::start().await;
    let alpha = api.token("alpha", OPERATOR);
    let beta = api.token("beta", OPERATOR);
    const RESULT: &str = "streamId version replayed";

    // A retried creation without an id is the same command: same stream,
    // the first run's result, `replayed`.
    let register = format!(
        "mutation($c: ID) {{ registerAgent(name: \"r\", kind: LLM, capabilities: [\"code\"], commandId: $c) {{ {RESULT} }} }}"
    );
    let start =
        format!("mutation($c: ID) {{ startWorkflow(name: \"w\", commandId: $c) {{ {RESULT} }} }}");
    let c = Uuid::new_v4().to_string();
    let first = result(&run(&api, &alpha, &register, json!({"c": c})).await);
    let again = result(&run(&api, &alpha, &register, json!({"c": c})).await);
    assert_eq!(first.0, again.0);
    assert_eq!(
        (first.1, first.2, again.2),
        (1, false, true),
        "{first:?} {again:?}"
    );
    let c = Uuid::new_v4().to_string();
    let workflow = result(&run(&api, &alpha, &start, json!({"c": c})).await);
    let again = result(&run(&api, &alpha, &start, json!({"c": c})).await);
    assert_eq!(workflow.0, again.0);
    assert!(!workflow.2 && again.2, "{workflow:?} {again:?}");
    let create = format!(
        "mutation($c: ID, $w: ID!) {{ createTask(workflowId: $w, title: \"t\", commandId: $c) {{ {RESULT} }} }}"
    );
    let c = Uuid::new_v4().to_string();
    let task = result(&run(&api, &alpha, &create, json!({"c": c, "w": workflow.0})).await);
    let again = result(&run(&api, &alpha, &create, json!({"c": c, "w": workflow.0})).await);
    assert_eq!(task.0, again.0);
    assert!(!task.2 && again.2);

    // Two identical requests racing: one writes, the other gets its result.
    let c = Uuid::new_v4().to_string();
    let (a, b) = tokio::join!(
        run(&api, &alpha, &register, json!({"c": c})),
        run(&api, &alpha, &register, json!({"c": c}))
    );
    let (a, b) = (result(&a), result(&b));
    assert_eq!(a.0, b.0);
    assert_eq!((a.1, b.1), (1, 1));
    assert!(
        a.2 != b.2,
        "exactly one of the racing requests wrote: {a:?} {b:?}"
    );

    // The same command id in two tenants: two commands, two agents, and
    // neither tenant sees the other's.
    let c = Uuid::new_v4().to_string();
    let in_alpha = result(&run(&api, &alpha, &register, json!({"c": c})).await);
    let in_beta = result(&run(&api, &beta, &register, json!({"c": c})).await);
    assert_ne!(in_alpha.0, in_beta.0);
    assert!(!in_alpha.2 && !in_beta.2, "{in_alpha:?} {in_beta:?}");
    let head = api.caught_up().await;
    let read = "query($id: ID!, $p: Position) { agent(id: $id, atLeastPosition: $p) { id } }";
    let seen = api
        .data(
            &beta,
            read,
            json!({"id": in_alpha.0, "p": head.to_string()}),
        )
        .await;
    assert!(seen["agent"].is_null(), "beta sees alpha's agent: {seen}");
    let seen = api
        .data(&beta, read, json!({"id": in_beta.0, "p": head.to_string()}))
        .await;
    assert!(
        !seen["agent"].is_null(),
        "beta does not see its own: {seen}"
    );

    // A client-chosen id another tenant holds is ALREADY_EXISTS, and the
    // answer tells nothing of the holder: no stream name, state or events.
    let taken = in_alpha.0.strip_prefix("agent-").unwrap().to_owned();
    let body = run(
        &api,
        &beta,
        "mutation($id: ID) { registerAgent(id: $id, name: \"mine\", kind: TOOL) { version } }",
        json!({"id": taken}),
    )
    .await;
    assert_eq!(code(&body), "ALREADY_EXISTS", "{body}");
    assert_eq!(
        body["errors"][0]["extensions"],
        json!({"code": "ALREADY_EXISTS"}),
        "{body}"
    );
    let text = message(&body);
    assert_eq!(text, format!("agent {taken} already exists"));
    for secret in ["alpha", "code", "llm", "agent-"] {
        assert!(!text.contains(secret), "the answer leaks {secret}: {text}");
    }
    // Other commands on it read as absent.
    let body = run(
        &api,
        &beta,
        "mutation($id: ID!) { pauseAgent(agentId: $id) { version } }",
        json!({"id": taken}),
    )
    .await;
    assert_eq!(code(&body), "NOT_FOUND", "{body}");
    api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_the_store_cannot_keep_is_the_callers_error_and_writes_nothing() {
    let api = TestApi::start().await;
    let token = api.token("acme", OPERATOR);
    let workflow = Uuid::new_v4().to_string();
    api.data(
        &token,
        &format!("mutation {{ startWorkflow(id: \"{workflow}\", name: \"w\") {{ version }} }}"),
        json!({}),
    )
    .await;
    let head = api.head().await;
    for (mutation, variables) in [
        (
            "mutation($m: JSON) { startWorkflow(name: \"n\", metadata: $m) { version } }",
            json!({"m": {"k": "a\u{0}b"}}),
        ),
        (
            "mutation($m: JSON, $w: ID!) { createTask(workflowId: $w, title: \"t\", input: $m) { version } }",
            json!({"m": ["x", {"deep": "\u{0}"}], "w": workflow}),
        ),
        (
            "mutation($m: JSON) { startWorkflow(name: \"n\", metadata: $m) { version } }",
            json!({"m": {"a\u{0}": 1}}),
        ),
    ] {
        let (code, message) = api.error(Some(&token), mutation, variables).await;
        assert_eq!(code, "VALIDATION", "{message}");
        assert!(message.contains("NUL"), "{message}");
    }
    // A token naming a tenant the store cannot keep is refused at the door.
    let nul_tenant = api
        .auth
        .mint("t", "ac\u{0}me", &[Role::Operator], 600)
        .unwrap();
    let (status, body) = api
        .graphql(
            Some(&nul_tenant),
            "mutation { startWorkflow(name: \"n\") { version } }",
            json!({}),
        )
        .await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(api.head().await, head, "a refused command wrote something");
    api.shutdown().await;
}
