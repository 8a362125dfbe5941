//! Operations, against the real binary and the real services: the
//! Prometheus series every role exports, graceful shutdown under load, and
//! what a shutdown that cannot finish reports.
//!
//! Each test runs `neurectomy` processes on a scratch PostgreSQL database,
//! JetStream stream and subject prefix, Redis prefix and graph database of
//! its own (removed at the end), with nothing of the test's environment.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use api::auth::{Authenticator, Role};
use commands::relay::HEADER_POSITION;
use commands::testkit::eventually;
use futures::{SinkExt as _, StreamExt as _};
use neurectomy_e2e::instance::{Instance, Scratch, SECRET};
use projections::ReadModel as _;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use crate::support::{last_published, streams_with_gaps};

const BINARY: &str = env!("CARGO_BIN_EXE_neurectomy-e2e");
const TENANT: &str = "ops";

fn token() -> String {
    Authenticator::new(Some(SECRET), None)
        .unwrap()
        .mint("ops-test", TENANT, &[Role::Operator, Role::Viewer], 600)
        .unwrap()
}

/// POSTs a GraphQL request; the body, or the transport error.
async fn graphql(
    http: &reqwest::Client,
    api: SocketAddr,
    token: &str,
    query: &str,
    variables: Value,
) -> Result<Value, reqwest::Error> {
    http.post(format!("http://{api}/graphql"))
        .bearer_auth(token)
        .json(&json!({ "query": query, "variables": variables }))
        .send()
        .await?
        .json()
        .await
}

/// `serve` with `settings`, and a request that waits in its resolver (for a
/// position never reached) until the process ends; the request's task
/// ends with the transport error when the process is gone.
async fn serve_with_a_waiting_request(
    scratch: &Scratch,
    settings: &[(&str, &str)],
) -> (
    Instance,
    tokio::task::JoinHandle<Result<Value, reqwest::Error>>,
) {
    let api = Instance::spawn("serve", scratch.command(&["serve"], settings));
    let addr = api.address("GraphQL API listening").await;
    let token = token();
    let waiting = tokio::spawn(async move {
        graphql(
            &reqwest::Client::new(),
            addr,
            &token,
            "query($id: ID!) { agent(id: $id, atLeastPosition: \"999999999999\") { id } }",
            json!({"id": Uuid::new_v4().to_string()}),
        )
        .await
    });
    (api, waiting)
}

const REGISTER: &str = "mutation($id: ID!, $command: ID!) { registerAgent(id: $id, name: \"worker\", kind: TOOL, capabilities: [\"ops\"], commandId: $command) { streamId version position events { type } } }";
const PAUSE: &str = "mutation($id: ID!, $command: ID!, $expected: Int) { pauseAgent(agentId: $id, commandId: $command, expectedVersion: $expected) { streamId version position events { type } } }";
const RESUME: &str = "mutation($id: ID!, $command: ID!) { resumeAgent(agentId: $id, commandId: $command) { streamId version position events { type } } }";

/// A `graphql-transport-ws` client subscribed to the tenant's events; its
/// task ends with the close code the server sent and the events received.
async fn subscriber(api: SocketAddr, token: &str) -> tokio::task::JoinHandle<(Option<u16>, usize)> {
    let mut request = format!("ws://{api}/graphql/ws")
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "graphql-transport-ws".parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let init =
        json!({"type": "connection_init", "payload": {"authorization": format!("Bearer {token}")}});
    ws.send(Message::text(init.to_string())).await.unwrap();
    let subscribe = json!({"id": "1", "type": "subscribe", "payload": {"query": "subscription { events { position type } }"}});
    ws.send(Message::text(subscribe.to_string())).await.unwrap();
    tokio::spawn(async move {
        let mut events = 0;
        loop {
            match tokio::time::timeout(Duration::from_secs(120), ws.next()).await {
                Ok(Some(Ok(Message::Text(text)))) => {
                    let message: Value = serde_json::from_str(text.as_str()).unwrap();
                    match message["type"].as_str() {
                        Some("next") => events += 1,
                        Some("ping") => {
                            let _ = ws
                                .send(Message::text(json!({"type": "pong"}).to_string()))
                                .await;
                        }
                        _ => {}
                    }
                }
                Ok(Some(Ok(Message::Close(frame)))) => {
                    return (frame.map(|f| u16::from(f.code)), events)
                }
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(_)) | None) | Err(_) => return (None, events),
            }
        }
    })
}

/// The samples of a Prometheus text exposition: (name, labels) → value.
fn samples(text: &str) -> Vec<(String, HashMap<String, String>, f64)> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let rest = rest.trim_end_matches('}');
                let labels = rest
                    .split("\",")
                    .filter_map(|pair| {
                        let (k, v) = pair.split_once("=\"")?;
                        Some((k.to_owned(), v.trim_end_matches('"').to_owned()))
                    })
                    .collect();
                (name.to_owned(), labels)
            }
            None => (series.to_owned(), HashMap::new()),
        };
        out.push((name, labels, value));
    }
    out
}

/// The value of the first sample of `name` carrying `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples(text).into_iter().find_map(|(n, l, v)| {
        (n == name
            && labels
                .iter()
                .all(|(k, want)| l.get(*k).is_some_and(|got| got == want)))
        .then_some(v)
    })
}

async fn scrape(http: &reqwest::Client, at: SocketAddr) -> String {
    http.get(format!("http://{at}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Waits until `check` holds for the metrics at `at`.
async fn metrics_until(
    http: &reqwest::Client,
    at: SocketAddr,
    what: &str,
    check: impl Fn(&str) -> bool,
) -> String {
    let mut last = String::new();
    let found = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            last = scrape(http, at).await;
            if check(&last) {
                return last.clone();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("timed out waiting for {what}; the last scrape:\n{last}"))
}

fn dependencies_up(text: &str, dependencies: &[&str]) -> bool {
    dependencies
        .iter()
        .all(|d| sample(text, "neurectomy_dependency_up", &[("dependency", d)]) == Some(1.0))
}

/// The relay, the projectors and the API as separate processes, each
/// scraped: after a mutation, a conflict, a relay publish, projector batches
/// and a change-feed delivery, every series the dashboard reads is there
/// with sensible values; then SIGTERM stops each cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_exports_its_metrics() {
    let scratch = Scratch::create(BINARY).await;
    let listen = [("NEURECTOMY_METRICS_LISTEN", "127.0.0.1:0")];
    let mut relay = Instance::spawn("relay", scratch.command(&["relay"], &listen));
    let mut projector = Instance::spawn("project", scratch.command(&["project"], &listen));
    let relay_metrics = relay.address("metrics listening").await;
    let projector_metrics = projector.address("metrics listening").await;
    let mut api = Instance::spawn("serve", scratch.command(&["serve"], &[]));
    let api_addr = api.address("GraphQL API listening").await;
    let http = reqwest::Client::new();
    let token = token();

    // A subscriber, so that changes are fanned out.
    let watcher = subscriber(api_addr, &token).await;

    // Mutations until the subscriber has surely seen one (it may join the
    // feed after the first), and a conflict.
    let agent = Uuid::new_v4().to_string();
    let registered = graphql(
        &http,
        api_addr,
        &token,
        REGISTER,
        json!({"id": agent, "command": Uuid::new_v4().to_string()}),
    )
    .await
    .unwrap();
    assert!(registered["errors"].is_null(), "{registered}");
    let conflict = graphql(
        &http,
        api_addr,
        &token,
        PAUSE,
        json!({"id": agent, "command": Uuid::new_v4().to_string(), "expected": 7}),
    )
    .await
    .unwrap();
    assert_eq!(
        conflict["errors"][0]["extensions"]["code"], "CONFLICT",
        "{conflict}"
    );
    let mut paused = false;
    let fanned_out = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let query = if paused { RESUME } else { PAUSE };
            paused = !paused;
            let answer = graphql(
                &http,
                api_addr,
                &token,
                query,
                json!({"id": agent, "command": Uuid::new_v4().to_string()}),
            )
            .await
            .unwrap();
            assert!(answer["errors"].is_null(), "{answer}");
            let text = scrape(&http, api_addr).await;
            if sample(&text, "neurectomy_feed_fanout_seconds_count", &[]).unwrap_or(0.0) > 0.0 {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "no change-feed fan-out was recorded; the API's log:\n{}",
            api.log()
        )
    });
    assert!(
        fanned_out.contains("neurectomy_feed_fanout_seconds_bucket{le="),
        "a histogram:\n{fanned_out}"
    );

    // The API: commands by outcome, appends, sockets, every dependency.
    let text = metrics_until(&http, api_addr, "the API's dependencies to be up", |t| {
        dependencies_up(t, &["postgres", "nats", "redis", "graph"])
    })
    .await;
    let commands = |outcome| {
        sample(
            &text,
            "neurectomy_commands_total",
            &[("command", "RegisterAgent"), ("outcome", outcome)],
        )
    };
    assert_eq!(commands("ok"), Some(1.0), "{text}");
    assert!(
        sample(
            &text,
            "neurectomy_commands_total",
            &[("command", "PauseAgent"), ("outcome", "CONFLICT")]
        ) >= Some(1.0),
        "{text}"
    );
    assert!(sample(&text, "neurectomy_appends_total", &[("outcome", "ok")]) >= Some(2.0));
    assert!(sample(&text, "neurectomy_appended_events_total", &[]) >= Some(2.0));
    assert!(sample(&text, "neurectomy_append_seconds_count", &[]) >= Some(2.0));
    assert!(
        sample(&text, "neurectomy_append_seconds_bucket", &[("le", "10")]) >= Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "neurectomy_websocket_connections", &[]),
        Some(1.0)
    );

    // The relay: published everything, lag back to 0, its dependencies up.
    let text = metrics_until(&http, relay_metrics, "the relay to catch up", |t| {
        sample(t, "neurectomy_relay_publish_seconds_count", &[]) >= Some(1.0)
            && sample(t, "neurectomy_relay_lag_events", &[]) == Some(0.0)
            && dependencies_up(t, &["postgres", "nats"])
    })
    .await;
    assert!(
        text.contains("neurectomy_relay_publish_seconds_bucket{le="),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "neurectomy_dependency_up",
            &[("dependency", "redis")]
        ),
        None,
        "the relay does not use Redis"
    );

    // The projectors: batches of both projections as histograms (buckets,
    // not a summary), lag 0 at the head, every dependency up.
    let head = scratch.head().await;
    let text = metrics_until(
        &http,
        projector_metrics,
        "both projections to reach the head",
        |t| {
            ["redis", "graph"].iter().all(|p| {
                sample(t, "neurectomy_projection_checkpoint", &[("projection", p)])
                    == Some(head as f64)
                    && sample(t, "neurectomy_projection_lag_events", &[("projection", p)])
                        == Some(0.0)
            }) && dependencies_up(t, &["postgres", "nats", "redis", "graph"])
        },
    )
    .await;
    // The only `project` process holds both projections' leases, and the
    // API names it as their owner.
    let pid = projector.child.id().unwrap();
    let status = graphql(
        &http,
        api_addr,
        &token,
        "{ projectionStatus { name state owner } }",
        json!({}),
    )
    .await
    .unwrap();
    for entry in status["data"]["projectionStatus"].as_array().unwrap() {
        let owner = entry["owner"].as_str().unwrap_or_default();
        assert_eq!(
            owner.split(':').nth(1),
            Some(pid.to_string().as_str()),
            "the owner names the project process: {status}"
        );
    }
    for projection in ["redis", "graph"] {
        let labels = [("projection", projection)];
        assert_eq!(
            sample(&text, "neurectomy_projector_lease_held", &labels),
            Some(1.0),
            "{projection}: {text}"
        );
        let batches = sample(&text, "neurectomy_projector_batch_events_count", &labels);
        let events = sample(&text, "neurectomy_projector_batch_events_sum", &labels);
        assert!(batches >= Some(1.0), "{projection}: {text}");
        assert!(events >= batches, "{projection}: {text}");
        assert!(
            sample(
                &text,
                "neurectomy_projector_batch_events_bucket",
                &[("projection", projection), ("le", "5000")]
            ) == batches,
            "{projection}: the batch sizes are a histogram with buckets up to 5000:\n{text}"
        );
        assert_eq!(
            sample(&text, "neurectomy_projector_apply_seconds_count", &labels),
            batches,
            "{projection}: {text}"
        );
    }

    // SIGTERM: each exits 0; the subscriber is told "going away".
    for process in [&mut api, &mut relay, &mut projector] {
        let (code, took) = process.stop(Duration::from_secs(30)).await;
        assert_eq!(
            code,
            Some(0),
            "{} exited {code:?}:\n{}",
            process.role,
            process.log()
        );
        assert!(
            took < Duration::from_secs(25),
            "{} took {took:?}",
            process.role
        );
    }
    let (close, events) = watcher.await.unwrap();
    assert_eq!(close, Some(1001), "close code at shutdown");
    assert!(events >= 1);
}

/// What one mutation that got an answer wrote.
#[derive(Debug)]
struct Done {
    command: Uuid,
    stream: String,
    position: i64,
    events: i64,
}

/// Registers agents and pauses and resumes them, one request at a time,
/// until the API stops answering; returns what succeeded.
async fn drive(api: SocketAddr, token: String, http: reqwest::Client) -> Vec<Done> {
    let mut done = Vec::new();
    let mut agent = None;
    let mut paused = false;
    for step in 0.. {
        let command = Uuid::new_v4();
        let (query, variables) = match &agent {
            Some(id) if step % 8 != 0 => {
                paused = !paused;
                let query = if paused { PAUSE } else { RESUME };
                (query, json!({"id": id, "command": command.to_string()}))
            }
            _ => {
                let id = Uuid::new_v4().to_string();
                agent = Some(id.clone());
                paused = false;
                (REGISTER, json!({"id": id, "command": command.to_string()}))
            }
        };
        let Ok(answer) = graphql(&http, api, &token, query, variables).await else {
            // The server is gone (shutting down, or stopped).
            return done;
        };
        let Some(result) = answer["data"]
            .as_object()
            .and_then(|data| data.values().next())
            .filter(|r| !r.is_null())
        else {
            // Refused or not run (e.g. the API was shutting down): nothing
            // to check for it.
            continue;
        };
        done.push(Done {
            command,
            stream: result["streamId"].as_str().unwrap().to_owned(),
            position: result["position"].as_str().unwrap().parse().unwrap(),
            events: result["events"].as_array().unwrap().len() as i64,
        });
    }
    done
}

/// `neurectomy all` under a load of mutations and with open subscriptions
/// gets SIGTERM: it exits 0 within the deadline, every acknowledged command
/// is in the store whole, the WebSockets were told 1001; restarted, it
/// publishes and projects everything, and the read models verify clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_nothing_and_restarts_cleanly() {
    let scratch = Scratch::create(BINARY).await;
    let deadline = Duration::from_secs(20);
    let deadline_ms = deadline.as_millis().to_string();
    let settings = [("NEURECTOMY_SHUTDOWN_DEADLINE_MS", deadline_ms.as_str())];
    let mut all = Instance::spawn("all", scratch.command(&["all"], &settings));
    let api = all.address("GraphQL API listening").await;
    let token = token();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();

    let mut watchers = Vec::new();
    for _ in 0..3 {
        watchers.push(subscriber(api, &token).await);
    }
    let drivers: Vec<_> = (0..6)
        .map(|_| tokio::spawn(drive(api, token.clone(), http.clone())))
        .collect();

    // Under load: events written, published and projected.
    let pool = scratch.db.pool.clone();
    eventually("200 events under load", Duration::from_secs(120), || {
        let pool = pool.clone();
        async move {
            let count: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
                .fetch_one(&pool)
                .await
                .unwrap();
            (count >= 200).then_some(())
        }
    })
    .await;
    let (code, took) = all.stop(deadline + Duration::from_secs(10)).await;
    let first_log = all.log();
    assert_eq!(
        code,
        Some(0),
        "`all` exited {code:?} after SIGTERM:\n{first_log}"
    );
    assert!(took < deadline, "the shutdown took {took:?}");
    assert!(
        !first_log.contains("deadline"),
        "no deadline may pass:\n{first_log}"
    );

    let mut done = Vec::new();
    for driver in drivers {
        done.extend(driver.await.unwrap());
    }
    assert!(done.len() >= 50, "only {} commands succeeded", done.len());
    eprintln!(
        "SIGTERM under load: exit 0 after {took:?}; {} commands acknowledged",
        done.len()
    );
    for watcher in watchers {
        let (close, _) = watcher.await.unwrap();
        assert_eq!(close, Some(1001), "WebSocket close code at shutdown");
    }

    // Every acknowledged command is in the store, whole, where it said.
    for d in &done {
        let (count, position, stream): (i64, Option<i64>, Option<String>) = sqlx::query_as(
            "SELECT count(*), max(position), max(stream_id) FROM events WHERE command_id = $1",
        )
        .bind(d.command)
        .fetch_one(&scratch.db.pool)
        .await
        .unwrap();
        assert_eq!(count, d.events, "events of command {}", d.command);
        assert_eq!(position, Some(d.position), "position of {}", d.command);
        assert_eq!(stream.as_deref(), Some(d.stream.as_str()));
    }
    // Nothing half-written: every stream is versions 1..=n without a gap.
    let broken = streams_with_gaps(&scratch.db.pool).await;
    assert_eq!(broken, 0, "streams with gaps");

    // The relay stopped after a whole batch: its final checkpoint is the
    // position of the last message in JetStream.
    let stream_name = scratch.nats.relay.stream_name.clone();
    let js = scratch.nats.jetstream();
    let stream = js.get_stream(&stream_name).await.unwrap();
    let last = stream.get_info().await.unwrap().state.last_sequence;
    let published: i64 = stream
        .get_raw_message(last)
        .await
        .unwrap()
        .headers
        .get(HEADER_POSITION)
        .unwrap()
        .as_str()
        .parse()
        .unwrap();
    let (checkpoint,): (i64,) =
        sqlx::query_as("SELECT position FROM relay_checkpoints WHERE relay = $1")
            .bind(&stream_name)
            .fetch_one(&scratch.db.pool)
            .await
            .unwrap();
    assert_eq!(checkpoint, published, "the relay's final checkpoint");

    // Restart: the relay publishes the rest, the projectors apply it.
    let mut again = Instance::spawn("all (restarted)", scratch.command(&["all"], &settings));
    again.address("GraphQL API listening").await;
    let head = scratch.head().await;
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&scratch.db.pool)
        .await
        .unwrap();
    eventually(
        "JetStream to hold every event, the last at the head",
        Duration::from_secs(60),
        || {
            let js = js.clone();
            let stream_name = stream_name.clone();
            async move {
                let (info, position) = last_published(&js, &stream_name).await?;
                (info.state.messages == events as u64 && position == head).then_some(())
            }
        },
    )
    .await;
    // Exactly the store, once each, in order, across the SIGTERM.
    let stored = commands::testkit::mirror::read_everything(&commands::EventStore::new(
        scratch.db.pool.clone(),
    ))
    .await;
    commands::testkit::mirror::assert_mirror(&stored, &js, &scratch.nats.relay).await;
    let redis = scratch.redis.model.clone();
    let graph = scratch.graph.model.clone();
    eventually(
        "both read models at the head",
        Duration::from_secs(60),
        || {
            let (redis, graph) = (redis.clone(), graph.clone());
            async move {
                let redis = redis.checkpoint().await.ok()?;
                let graph = graph.checkpoint().await.ok()?;
                (redis == head && graph == head).then_some(())
            }
        },
    )
    .await;

    // `neurectomy verify`: the read models equal the store.
    let verify = scratch
        .command(&["verify"], &[])
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .output()
        .await
        .unwrap();
    assert!(
        verify.status.success(),
        "verify failed:\n{}\n{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );

    let (code, _) = again.stop(deadline + Duration::from_secs(10)).await;
    assert_eq!(code, Some(0), "the restarted process:\n{}", again.log());
    // The relay's own checkpoint, written as it stopped, is the head.
    let (checkpoint,): (i64,) =
        sqlx::query_as("SELECT position FROM relay_checkpoints WHERE relay = $1")
            .bind(&stream_name)
            .fetch_one(&scratch.db.pool)
            .await
            .unwrap();
    assert_eq!(checkpoint, head);
}

/// A request still running when the deadline passes: the process logs, at
/// error level, what was in flight, and exits 1. A second signal does the
/// same at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passed_deadline_or_a_second_signal_reports_what_was_in_flight() {
    let scratch = Scratch::create(BINARY).await;
    let settings = [
        ("NEURECTOMY_SHUTDOWN_DEADLINE_MS", "500"),
        // A read for a position nobody writes waits this long.
        ("NEURECTOMY_API_CONSISTENCY_TIMEOUT_MS", "20000"),
    ];
    let (mut api, waiting) = serve_with_a_waiting_request(&scratch, &settings).await;
    // Nothing outside the process shows that the request has reached the
    // resolver (where it waits); a request not yet read when the signal
    // comes would be dropped with its idle connection, and the process
    // would exit 0 and fail this test, never pass it wrongly.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let (code, took) = api.stop(Duration::from_secs(15)).await;
    assert_eq!(code, Some(1), "exit status:\n{}", api.log());
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let log = api.log();
    let report = log
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|line| {
            line["level"] == "ERROR"
                && line["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("shutdown deadline (500 ms) passed"))
        })
        .unwrap_or_else(|| panic!("no deadline report in the log:\n{log}"));
    let message = report["fields"]["message"].as_str().unwrap();
    assert!(message.contains("1 HTTP request(s)"), "{message}");
    assert!(message.contains("0 command(s)"), "{message}");
    // The client's connection was cut when the process exited.
    assert!(waiting.await.unwrap().is_err());

    // With a long deadline, a second signal does not wait for it.
    let settings = [
        ("NEURECTOMY_SHUTDOWN_DEADLINE_MS", "60000"),
        ("NEURECTOMY_API_CONSISTENCY_TIMEOUT_MS", "60000"),
    ];
    let (mut api, waiting) = serve_with_a_waiting_request(&scratch, &settings).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    api.terminate();
    let log = api.log.clone();
    eventually(
        "the first signal to be seen",
        Duration::from_secs(10),
        || {
            let log = log.clone();
            async move {
                log.lock()
                    .unwrap()
                    .iter()
                    .any(|l| l.contains("shutdown requested"))
                    .then_some(())
            }
        },
    )
    .await;
    let (code, took) = api.stop(Duration::from_secs(15)).await;
    assert_eq!(code, Some(1), "exit status:\n{}", api.log());
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let log = api.log();
    assert!(
        log.contains("second signal: exiting at once") && log.contains("1 HTTP request(s)"),
        "{log}"
    );
    assert!(waiting.await.unwrap().is_err());
}
