//! Erasure through the API (README, "Erasure"): an `eraser` erases a
//! task's and an agent's personal data while a bystander tenant's workload
//! runs; the values go from the store, both read models (and the API's near
//! cache of agents), the Redis change feed and the JetStream log; both read
//! models still verify against the store; every seal still verifies, and an
//! auditor checks the erased events' proofs with the public key alone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use api::auth::Role;
use api::simulate::SimulateArgs;
use commands::seal::key::SealKey;
use commands::seal::verify::{verify, VerifyOptions};
use commands::testkit::eventually;
use neurectomy_e2e::api::TestApi;
use neurectomy_e2e::pipeline::Pipeline;
use neurectomy_e2e::read_side;
use serde_json::{json, Value};

use crate::sealed_log::{auditor_verifies, EVENT_FIELDS, PROOF};

/// The personal values written, searched for everywhere afterwards.
const VALUES: [&str; 6] = [
    "Grace Hopper",
    "Compile for Grace",
    "078-05-1120",
    "Grace's progress",
    "Grace's answer",
    "Grace's pause",
];

const ERASE: &str = "mutation($stream: ID, $event: ID, $actor: String, $fields: [String!]) { \
    erasePersonalData(streamId: $stream, eventId: $event, actor: $actor, fields: $fields) { \
    eventId streamId position events values aggregates replayed } }";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eraser_erases_personal_data_from_everything_that_holds_it() {
    let seed = read_side::seed("erasure_api");
    let key = SealKey::generate();
    let api = TestApi::start_sealed(&key, Duration::from_millis(200)).await;
    let operator = api.token("acme", &[Role::Operator, Role::Auditor]);
    let eraser = api.token("acme", &[Role::Eraser]);
    let stranger = api.token("globex", &[Role::Eraser]);

    let agent = api
        .data(
            &operator,
            "mutation($n: String!) { registerAgent(name: $n, kind: HUMAN, capabilities: [\"code\"]) { streamId } }",
            json!({"n": VALUES[0]}),
        )
        .await["registerAgent"]["streamId"]
        .as_str()
        .unwrap()
        .to_owned();
    let agent_id = agent.trim_start_matches("agent-").to_owned();
    let workflow = api
        .data(
            &operator,
            "mutation { startWorkflow(name: \"w\") { streamId } }",
            json!({}),
        )
        .await["startWorkflow"]["streamId"]
        .as_str()
        .unwrap()
        .trim_start_matches("workflow-")
        .to_owned();
    let task = api
        .data(
            &operator,
            "mutation($w: ID!, $t: String!, $i: JSON!) { createTask(workflowId: $w, title: $t, input: $i, requiredCapabilities: [\"code\"]) { streamId } }",
            json!({"w": workflow, "t": VALUES[1], "i": {"ssn": VALUES[2]}}),
        )
        .await["createTask"]["streamId"]
        .as_str()
        .unwrap()
        .to_owned();
    let task_id = task.trim_start_matches("task-").to_owned();
    for (mutation, variables) in [
        ("mutation($t: ID!, $a: ID!) { assignTask(taskId: $t, agentId: $a) { version } }", json!({"t": task_id, "a": agent_id})),
        ("mutation($t: ID!) { startTask(taskId: $t) { version } }", json!({"t": task_id})),
        ("mutation($t: ID!, $n: String) { reportTaskProgress(taskId: $t, percent: 40, note: $n) { version } }", json!({"t": task_id, "n": VALUES[3]})),
        ("mutation($t: ID!, $o: JSON) { completeTask(taskId: $t, output: $o) { version } }", json!({"t": task_id, "o": {"answer": VALUES[4]}})),
        ("mutation($a: ID!, $r: String) { pauseAgent(agentId: $a, reason: $r) { version } }", json!({"a": agent_id, "r": VALUES[5]})),
    ] {
        api.data(&operator, mutation, variables).await;
    }
    // A bystander tenant's workload around the erasure.
    let bystander = api.pipe.start_workload(SimulateArgs {
        tenant: "globex".into(),
        ..Pipeline::workload(60, 40, seed)
    });
    api.caught_up().await;
    const AGENT: &str = "query($id: ID!, $p: Position) { agent(id: $id, atLeastPosition: $p) { name statusReason } }";
    const TASK: &str = "query($id: ID!, $p: Position) { task(id: $id, atLeastPosition: $p) { title progressNote } }";
    // Read once before: the API's near cache now holds the agent.
    let before = api.data(&operator, AGENT, json!({"id": agent_id})).await;
    assert_eq!(before["agent"]["name"], VALUES[0]);
    let before = api.data(&operator, AGENT, json!({"id": agent_id})).await;
    assert_eq!(before["agent"]["statusReason"], VALUES[5]);

    // Refused, nothing written: a token without the role, no scope or two,
    // `fields` without an event, another tenant's stream.
    let written: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE tenant = 'acme'")
        .fetch_one(&api.pipe.db.pool)
        .await
        .unwrap();
    for (token, variables, code) in [
        (&operator, json!({"stream": task}), "FORBIDDEN"),
        (&eraser, json!({}), "VALIDATION"),
        (
            &eraser,
            json!({"stream": task, "actor": "tester"}),
            "VALIDATION",
        ),
        (
            &eraser,
            json!({"stream": task, "fields": ["title"]}),
            "VALIDATION",
        ),
        (&eraser, json!({"stream": "task-nope"}), "VALIDATION"),
        (&stranger, json!({"stream": task}), "NOT_FOUND"),
    ] {
        let (got, message) = api.error(Some(token), ERASE, variables.clone()).await;
        assert_eq!(got, code, "{variables}: {message}");
    }
    let after: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE tenant = 'acme'")
        .fetch_one(&api.pipe.db.pool)
        .await
        .unwrap();
    assert_eq!(after, written);

    // The task's data, the agent's, and the actor of every event by the tester.
    let erased =
        api.data(&eraser, ERASE, json!({"stream": task})).await["erasePersonalData"].clone();
    assert_eq!(
        (
            erased["events"].as_i64(),
            erased["values"].as_i64(),
            erased["aggregates"].as_i64()
        ),
        (Some(3), Some(4), Some(1)),
        "{erased}"
    );
    let named =
        api.data(&eraser, ERASE, json!({"stream": agent})).await["erasePersonalData"].clone();
    assert_eq!(
        (named["events"].as_i64(), named["values"].as_i64()),
        (Some(2), Some(2)),
        "{named}"
    );
    let actors =
        api.data(&eraser, ERASE, json!({"actor": "tester"})).await["erasePersonalData"].clone();
    // The tester also made the two erasures: their actor goes too.
    assert_eq!(actors["events"].as_i64(), Some(written + 2), "{actors}");
    let last = actors["position"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| actors["position"].to_string());

    // The read models show digests once they reach the erasures — the
    // near-cached agent too.
    let shown = api
        .data(&operator, AGENT, json!({"id": agent_id, "p": last}))
        .await;
    let shown_task = api
        .data(&operator, TASK, json!({"id": task_id, "p": last}))
        .await;
    for value in [
        &shown["agent"]["name"],
        &shown["agent"]["statusReason"],
        &shown_task["task"]["title"],
        &shown_task["task"]["progressNote"],
    ] {
        assert!(
            value.as_str().is_some_and(|v| v.starts_with("sha256:")),
            "{shown} {shown_task}"
        );
    }
    api.caught_up().await;
    // Without a position: the near cache answers, and follows the erasure.
    eventually(
        "the near-cached agent erased",
        Duration::from_secs(10),
        || async {
            let cached = api.data(&operator, AGENT, json!({"id": agent_id})).await;
            assert_ne!(
                cached["agent"]["name"], VALUES[0],
                "the near cache kept the erased name"
            );
            Some(())
        },
    )
    .await;
    bystander.stop().await;
    api.caught_up().await;
    let mut holders = Vec::new();
    let redis = api.redis.dump().await.unwrap();
    let graph = api.graph.dump().await.unwrap();
    for value in VALUES {
        for (key, text) in &redis {
            if text.contains(value) {
                holders.push(format!("Redis {key}"));
            }
        }
        holders.extend(graph.iter().filter(|l| l.contains(value)).cloned());
        let rows: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM events e WHERE strpos(to_jsonb(e)::text, $1) > 0) \
             + (SELECT count(*) FROM snapshots s WHERE strpos(to_jsonb(s)::text, $1) > 0)",
        )
        .bind(value)
        .fetch_one(&api.pipe.db.pool)
        .await
        .unwrap();
        if rows > 0 {
            holders.push(format!("{rows} PostgreSQL rows hold `{value}`"));
        }
    }
    assert!(
        holders.is_empty(),
        "still holding erased values: {holders:#?}"
    );
    // Both read models still match the store.
    let store = api.pipe.store.clone();
    let redis = projections::verify::verify_redis_confirmed(&store, &api.redis.model)
        .await
        .unwrap();
    assert!(redis.differences.is_empty(), "{:#?}", redis.differences);
    let graph = projections::verify::verify_graph_confirmed(&store, &api.graph.model)
        .await
        .unwrap();
    assert!(graph.differences.is_empty(), "{:#?}", graph.differences);

    // JetStream: the erased events' messages are deleted.
    eventually(
        "the erasures purged from JetStream",
        Duration::from_secs(30),
        || async {
            let pending: i64 =
                sqlx::query_scalar("SELECT count(*) FROM erasures WHERE purged_at IS NULL")
                    .fetch_one(&api.pipe.db.pool)
                    .await
                    .unwrap();
            (pending == 0).then_some(())
        },
    )
    .await;
    let js = api.pipe.nats.jetstream();
    let stream = js
        .get_stream(&api.pipe.nats.relay.stream_name)
        .await
        .unwrap();
    let info = stream.get_info().await.unwrap();
    for sequence in info.state.first_sequence..=info.state.last_sequence {
        if let Ok(message) = stream.get_raw_message(sequence).await {
            let body = String::from_utf8_lossy(&message.payload);
            for value in VALUES {
                assert!(
                    !body.contains(value),
                    "JetStream message {sequence} holds `{value}`"
                );
            }
        }
    }

    // Every seal verifies; an auditor checks an erased event's proof.
    let head = api.pipe.head().await;
    let options = VerifyOptions {
        log: api.pipe.nats.relay.stream_name.clone(),
        trusted: vec![key.public().clone()],
        copies: Some(format!("{}_SEALS", api.pipe.nats.relay.stream_name)),
        ..VerifyOptions::default()
    };
    eventually(
        "the log sealed through the erasures",
        Duration::from_secs(30),
        || async {
            let report = verify(&api.pipe.db.pool, Some(&js), &options, |_| {})
                .await
                .unwrap();
            assert_eq!(report.problem, None, "{report:?}");
            (report.sealed_to >= head).then_some(())
        },
    )
    .await;
    let auditor = api.token("acme", &[Role::Auditor]);
    let keys = api
        .data(
            &auditor,
            "{ sealKeys { id algorithm publicKey } }",
            json!({}),
        )
        .await["sealKeys"]
        .clone();
    let log = api
        .data(
            &auditor,
            &format!("{{ eventLog(first: 50) {{ events {{ {EVENT_FIELDS} }} }} }}"),
            json!({}),
        )
        .await;
    let events: Vec<Value> = log["eventLog"]["events"].as_array().unwrap().clone();
    let mut checked = 0;
    for event in events.iter().filter(|e| {
        e["type"] == "TaskCreated"
            || e["type"] == "PersonalDataErased"
            || e["type"] == "AgentRegistered"
    }) {
        let id = event["metadata"]["eventId"].as_str().unwrap();
        let proof = api.data(&auditor, PROOF, json!({"id": id})).await["auditProof"].clone();
        let verdict =
            auditor_verifies(&json!({"event": event, "proof": proof, "keys": keys})).await;
        assert_eq!(verdict["ok"], true, "{verdict}");
        checked += 1;
    }
    assert!(checked >= 5, "{checked}");
    api.shutdown().await;
}
