//! "Why did this happen": commands name the event that caused them
//! (`causationId`), and `why(eventId, depth)` follows the chain back across
//! aggregates — each step the event with its command's type, actor and
//! time. A cause must be an event of the caller's tenant: another tenant's
//! event and an unknown id get the same `VALIDATION`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use api::auth::Role;
use api::simulate::SimulateArgs;
use neurectomy_e2e::api::TestApi;
use neurectomy_e2e::pipeline::Pipeline;
use neurectomy_e2e::read_side;
use serde_json::{json, Value};

const WHY: &str = "query($id: ID!, $depth: Int) { why(eventId: $id, depth: $depth) { \
    position streamId type metadata { eventId commandType actor occurredAt causationId commandId } } }";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn why_follows_the_causes_commands_name_across_aggregates() {
    let seed = read_side::seed("why_follows_causes");
    let api = TestApi::start_with(&[]).await;
    let operator = api.token("acme", &[Role::Operator]);
    let auditor = api.token("acme", &[Role::Auditor]);
    let stranger = api.token("globex", &[Role::Operator]);

    // By hand: an agent registered, a workflow started because of it, a
    // task created because the workflow started.
    const REGISTER: &str = "mutation($cause: ID) { registerAgent(name: \"a\", kind: LLM, capabilities: [\"plan\"], causationId: $cause) { events { metadata { eventId } } } }";
    let first = api.data(&operator, REGISTER, json!({})).await;
    let agent_event = first["registerAgent"]["events"][0]["metadata"]["eventId"].clone();
    let started = api
        .data(
            &operator,
            "mutation($cause: ID) { startWorkflow(name: \"w\", causationId: $cause) { streamId events { metadata { eventId } } } }",
            json!({"cause": agent_event}),
        )
        .await;
    let workflow = started["startWorkflow"]["streamId"]
        .as_str()
        .unwrap()
        .trim_start_matches("workflow-")
        .to_owned();
    let workflow_event = started["startWorkflow"]["events"][0]["metadata"]["eventId"].clone();
    let created = api
        .data(
            &operator,
            "mutation($w: ID!, $cause: ID) { createTask(workflowId: $w, title: \"t\", input: {}, causationId: $cause) { events { metadata { eventId } } } }",
            json!({"w": workflow, "cause": workflow_event}),
        )
        .await;
    let task_event = created["createTask"]["events"][0]["metadata"]["eventId"].clone();
    let chain = api.data(&auditor, WHY, json!({"id": task_event})).await["why"].clone();
    let chain = chain.as_array().unwrap();
    let types: Vec<&str> = chain.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        ["TaskCreated", "WorkflowStarted", "AgentRegistered"],
        "{chain:?}"
    );
    assert_eq!(chain[0]["metadata"]["commandType"], "CreateTask");
    assert_eq!(chain[0]["metadata"]["actor"], "tester");
    assert_eq!(chain[0]["metadata"]["causationId"], workflow_event);
    assert_eq!(chain[1]["metadata"]["causationId"], agent_event);
    // The root named no cause: its causation id is its command id.
    assert_eq!(
        chain[2]["metadata"]["causationId"],
        chain[2]["metadata"]["commandId"]
    );
    // depth bounds the walk.
    let short = api
        .data(&auditor, WHY, json!({"id": task_event, "depth": 1}))
        .await;
    assert_eq!(short["why"].as_array().unwrap().len(), 2);
    let (code, _) = api
        .error(Some(&auditor), WHY, json!({"id": task_event, "depth": 0}))
        .await;
    assert_eq!(code, "VALIDATION");

    // Another tenant's event as a cause: the same VALIDATION as an unknown
    // id, and nothing written.
    let (code, message) = api
        .error(Some(&stranger), REGISTER, json!({"cause": agent_event}))
        .await;
    assert_eq!(code, "VALIDATION", "{message}");
    let nobody = uuid::Uuid::new_v4().to_string();
    let (code2, message2) = api
        .error(Some(&stranger), REGISTER, json!({"cause": nobody}))
        .await;
    assert_eq!(code2, "VALIDATION");
    assert_eq!(
        message.replace(agent_event.as_str().unwrap(), "<id>"),
        message2.replace(&nobody, "<id>")
    );
    let globex: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE tenant = 'globex'")
        .fetch_one(&api.pipe.db.pool)
        .await
        .unwrap();
    assert_eq!(globex, 0);
    let (code, _) = api
        .error(
            Some(&api.token("globex", &[Role::Auditor])),
            WHY,
            json!({"id": task_event}),
        )
        .await;
    assert_eq!(code, "NOT_FOUND");

    // The simulator names causes as an orchestrator does: a task's commands
    // follow each other, a task starts because its dependency completed,
    // a delegation follows its agent's failure. A completed task of a later
    // step explains itself back through an earlier task of its workflow.
    api.pipe
        .simulate_until(
            SimulateArgs {
                tenant: "acme".into(),
                ..Pipeline::workload(0, 400, seed)
            },
            1_500,
            &["TaskCompleted", "TaskDelegated"],
        )
        .await;
    let completed: Vec<String> = sqlx::query_scalar(
        "SELECT event_id::text FROM events WHERE tenant = 'acme' AND event_type = 'TaskCompleted' \
         AND metadata->>'actor' = 'simulator' ORDER BY position DESC LIMIT 60",
    )
    .fetch_all(&api.pipe.db.pool)
    .await
    .unwrap();
    let mut longest: Vec<Value> = Vec::new();
    for id in &completed {
        let chain = api
            .data(&auditor, WHY, json!({"id": id, "depth": 50}))
            .await["why"]
            .clone();
        let chain = chain.as_array().unwrap().clone();
        // Each step is the cause the step before it names.
        for pair in chain.windows(2) {
            assert_eq!(
                pair[0]["metadata"]["causationId"], pair[1]["metadata"]["eventId"],
                "{chain:?}"
            );
        }
        if chain.len() > longest.len() {
            longest = chain;
        }
    }
    let streams: std::collections::HashSet<&str> = longest
        .iter()
        .map(|e| e["streamId"].as_str().unwrap())
        .collect();
    assert!(
        longest.len() >= 6 && streams.len() >= 2,
        "the longest chain of {} completions: {} steps over {} streams",
        completed.len(),
        longest.len(),
        streams.len()
    );
    let types: Vec<&str> = longest
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert!(
        types.contains(&"TaskCompleted") && types.contains(&"TaskStarted"),
        "{types:?}"
    );
    api.shutdown().await;
}

const EFFECTS: &str = "query($id: ID!, $depth: Int, $first: Int) { effects(eventId: $id, depth: $depth, first: $first) { \
    streamId type metadata { eventId causationId } } }";

/// `effects(eventId, depth)`: forward, what an event caused, breadth first,
/// bounded by `depth` and `first`, the caller's tenant only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn effects_follow_what_an_event_caused() {
    let api = TestApi::start_with(&[]).await;
    let operator = api.token("acme", &[Role::Operator]);
    let auditor = api.token("acme", &[Role::Auditor]);
    const REGISTER: &str = "mutation($cause: ID) { registerAgent(name: \"a\", kind: LLM, capabilities: [\"plan\"], causationId: $cause) { events { metadata { eventId } } } }";
    let root = api.data(&operator, REGISTER, json!({})).await["registerAgent"]["events"][0]
        ["metadata"]["eventId"]
        .clone();
    // The root causes two agents; the first of them causes a third.
    let mut children = Vec::new();
    for _ in 0..2 {
        let child = api.data(&operator, REGISTER, json!({"cause": root})).await["registerAgent"]
            ["events"][0]["metadata"]["eventId"]
            .clone();
        children.push(child);
    }
    let grandchild = api
        .data(&operator, REGISTER, json!({"cause": children[0]}))
        .await["registerAgent"]["events"][0]["metadata"]["eventId"]
        .clone();
    // An unrelated agent: not an effect.
    api.data(&operator, REGISTER, json!({})).await;

    let tree = api.data(&auditor, EFFECTS, json!({"id": root})).await["effects"].clone();
    let ids: Vec<&Value> = tree
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["metadata"]["eventId"])
        .collect();
    assert_eq!(ids.len(), 4, "{tree}");
    assert_eq!(ids[0], &root);
    let mut second: Vec<&Value> = ids[1..3].to_vec();
    second.sort_by_key(|v| v.as_str().unwrap().to_owned());
    let mut expected: Vec<&Value> = children.iter().collect();
    expected.sort_by_key(|v| v.as_str().unwrap().to_owned());
    assert_eq!(second, expected, "breadth first: {tree}");
    assert_eq!(ids[3], &grandchild);
    let one = api
        .data(&auditor, EFFECTS, json!({"id": root, "depth": 1}))
        .await;
    assert_eq!(one["effects"].as_array().unwrap().len(), 3);
    let two = api
        .data(&auditor, EFFECTS, json!({"id": root, "first": 2}))
        .await;
    assert_eq!(two["effects"].as_array().unwrap().len(), 2);
    let leaf = api.data(&auditor, EFFECTS, json!({"id": grandchild})).await;
    assert_eq!(leaf["effects"].as_array().unwrap().len(), 1);
    let (code, _) = api
        .error(
            Some(&api.token("globex", &[Role::Auditor])),
            EFFECTS,
            json!({"id": root}),
        )
        .await;
    assert_eq!(code, "NOT_FOUND");
    api.shutdown().await;
}
