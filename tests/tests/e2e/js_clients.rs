//! The API as clients nobody here wrote see it (`tests/js/`, from the npm
//! registry): graphql-js's introspection and `buildClientSchema` (and the
//! README's examples validated against the schema it builds), the `ws`
//! client reading close frames, graphql-ws receiving a refused subscription
//! as an error, Apollo Client over HTTP, and a graphql-ws dashboard whose
//! short-lived tokens expire while it listens: it reconnects with fresh
//! tokens and resumes where it stopped, missing nothing and seeing nothing
//! twice.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use api::auth::Role;
use neurectomy_e2e::api::{TestApi, SECRET};
use neurectomy_e2e::js;
use serde_json::{json, Value};

/// Longest wait for one step of a script.
const STEP: Duration = Duration::from_secs(90);

/// The GraphQL documents of the README's `curl` examples (`q '{"query":…}'`).
fn readme_documents() -> Vec<String> {
    include_str!("../../../README.md")
        .lines()
        .filter_map(|line| line.trim().strip_prefix("q '"))
        .filter_map(|rest| rest.strip_suffix('\''))
        .map(|body| {
            let request: Value = serde_json::from_str(body)
                .unwrap_or_else(|e| panic!("a README example is not JSON ({e}): {body}"));
            request["query"].as_str().unwrap().to_owned()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_from_the_npm_registry_get_the_protocols_answers() {
    js::require(false);
    let api = TestApi::start().await;
    let token = api.token("clients", &[Role::Operator, Role::Auditor]);
    let documents = readme_documents();
    assert!(documents.len() >= 8, "{documents:?}");
    let documents = serde_json::to_string(&documents).unwrap();
    let script = js::Script::spawn_with(
        "clients.mjs",
        &api.url(""),
        &token,
        &[("NEURECTOMY_TEST_DOCUMENTS", &documents)],
    );
    let (result, status) = script.result(STEP).await;
    assert!(status.success(), "{result}");
    assert!(result["error"].is_null(), "{result}");

    // graphql-js: its standard introspection query passed the limits and
    // built a schema; times are DateTime; the README's examples validate.
    assert!(result["types"].as_u64().unwrap() > 20, "{result}");
    assert_eq!(result["lastEventAt"], "DateTime");
    assert_eq!(result["delegationAt"], "DateTime");
    assert_eq!(result["invalidDocuments"], json!([]), "{result}");
    // The `ws` client read the close codes (it reported 1006 when close
    // reasons were longer than a control frame may be).
    assert_eq!(result["badToken"]["code"], 4403, "{result}");
    assert!(result["badToken"]["reason"]
        .as_str()
        .unwrap()
        .starts_with("Forbidden"));
    assert_eq!(result["unknownMessage"]["code"], 4400, "{result}");
    for close in [&result["badToken"], &result["unknownMessage"]] {
        assert!(close["reason"].as_str().unwrap().len() <= 123, "{close}");
    }
    // graphql-ws: the refused subscription is an error carrying the errors.
    let errors = &result["refused"]["errors"];
    assert!(errors.is_array(), "{result}");
    assert_eq!(
        errors[0]["extensions"]["code"], "GRAPHQL_VALIDATION_FAILED",
        "{result}"
    );
    // Apollo Client.
    assert_eq!(result["apollo"], json!(["graph", "redis"]), "{result}");
    api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dashboard_with_short_lived_tokens_reconnects_and_misses_nothing() {
    js::require(false);
    let api = TestApi::start().await;
    let tenant = "dashboard";
    let operator = api.token(tenant, &[Role::Operator]);
    let start = api.head().await;
    let start_text = start.to_string();
    // Each token is accepted for 3 s; the writes below last 12 s.
    let mut script = js::Script::spawn_with(
        "expiring_token.mjs",
        &api.url(""),
        "minted-by-the-script",
        &[
            ("NEURECTOMY_TEST_JWT_SECRET", SECRET),
            ("NEURECTOMY_TEST_TENANT", tenant),
            ("NEURECTOMY_TEST_TOKEN_SECONDS", "3"),
            ("NEURECTOMY_TEST_AFTER", &start_text),
        ],
    );
    script.until("subscribed", STEP).await.unwrap();

    // Writes in the tenant, while the script's tokens expire under it:
    // each socket is closed with 4403, the client connects again with a
    // new token and resubscribes after its last position.
    let writes = 12 * 8;
    let mut last = 0;
    let mut closes = Vec::new();
    for i in 0..writes {
        let data = api
            .data(
                &operator,
                &format!("mutation {{ registerAgent(name: \"a{i}\", kind: TOOL) {{ position }} }}"),
                json!({}),
            )
            .await;
        last = data["registerAgent"]["position"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(125)).await;
    }
    script.send(&format!("until {last}")).await;
    loop {
        match script.until("closed", STEP).await {
            Ok(close) => closes.push(close),
            Err(result) => {
                assert!(result["error"].is_null(), "{result}");
                let received: Vec<i64> = result["positions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p.as_str().unwrap().parse().unwrap())
                    .collect();
                let stored: Vec<i64> = api
                    .store
                    .read_tenant(tenant, start, last, 10_000, None)
                    .await
                    .unwrap()
                    .iter()
                    .map(|e| e.position)
                    .collect();
                assert_eq!(stored.len(), writes, "the store has not every write");
                // Every event of the tenant, in order, once: no gap at a
                // reconnection and no duplicate.
                assert_eq!(received, stored);
                let expired: Vec<&Value> = closes.iter().filter(|c| c["code"] == 4403).collect();
                assert!(
                    expired.len() >= 2,
                    "the sockets were not closed as their tokens expired: {closes:?}"
                );
                assert!(
                    expired
                        .iter()
                        .all(|c| c["reason"].as_str().unwrap().contains("expired")),
                    "{expired:?}"
                );
                assert!(
                    result["connects"].as_u64().unwrap() > expired.len() as u64,
                    "{result}"
                );
                break;
            }
        }
    }
    api.shutdown().await;
}
