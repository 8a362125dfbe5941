//! The Redis projection against real PostgreSQL, JetStream and Redis: built
//! from a simulated workload, killed mid-batch, fed redeliveries (by the
//! model and by JetStream), flushed, stopped by an event it cannot apply,
//! and fed messages the relay did not publish (with the graph projection
//! too).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use api::settings::SimulateArgs;
use async_nats::jetstream::consumer::pull;
use commands::testkit::eventually;
use neurectomy_e2e::pipeline::Pipeline;
use projections::graph_testkit::TestGraph;
use projections::testkit::TestRedis;
use projections::verify::{verify_graph, verify_live};
use projections::{
    ApplyError, GraphModel, LiveModel, Projected, Projector, ProjectorConfig, ProjectorState,
    ReadModel,
};
use tokio::sync::Notify;

/// The pipeline plus a Redis read model of the test's own.
struct World {
    pipe: Pipeline,
    redis: TestRedis,
}

impl std::ops::Deref for World {
    type Target = Pipeline;
    fn deref(&self) -> &Pipeline {
        &self.pipe
    }
}

async fn world() -> World {
    let pipe = Pipeline::start().await;
    let redis = TestRedis::create().await.unwrap_or_else(|e| panic!("{e}"));
    World { pipe, redis }
}

impl World {
    fn projector(&self) -> Arc<Projector<LiveModel>> {
        self.pipe.projector(self.redis.model.clone())
    }

    async fn simulate(&self, seconds: u64, seed: u64) {
        self.pipe
            .simulate(Pipeline::workload(seconds, 400, seed))
            .await;
    }

    async fn caught_up(&self) -> i64 {
        self.pipe.caught_up(&self.redis.model).await
    }

    async fn assert_verified(&self) {
        let until = self.caught_up().await;
        let differences = verify_live(&self.store, &self.redis.model, until)
            .await
            .unwrap()
            .differences;
        assert!(
            differences.is_empty(),
            "{} difference(s) between the events and Redis, e.g.:\n{}",
            differences.len(),
            differences
                .iter()
                .take(10)
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }

    async fn shutdown(self) {
        self.pipe.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulated_workload_verifies_clean_and_redelivery_changes_nothing() {
    let world = world().await;
    let projector = world.projector();
    let (stop, task) = world.spawn(&projector);
    world.simulate(3, 11).await;
    world.assert_verified().await;
    let agents: Vec<String> = redis::cmd("KEYS")
        .arg(world.redis.model.key("agent:*"))
        .query_async(&mut world.redis.model.connection())
        .await
        .unwrap();
    assert_eq!(agents.len(), 8, "every registered agent is in Redis");
    // verify can fail: a tampered field is reported.
    let tampered = agents[0].clone();
    let _: () = redis::cmd("HSET")
        .arg(&tampered)
        .arg("status")
        .arg("bogus")
        .query_async(&mut world.redis.model.connection())
        .await
        .unwrap();
    let until = world.caught_up().await;
    let differences = verify_live(&world.store, &world.redis.model, until)
        .await
        .unwrap()
        .differences;
    assert_eq!(differences.len(), 1, "{differences:?}");
    assert_eq!(differences[0].key, tampered);
    assert_eq!(differences[0].actual, "bogus");
    let _: () = redis::cmd("HSET")
        .arg(&tampered)
        .arg("status")
        .arg(&differences[0].expected)
        .query_async(&mut world.redis.model.connection())
        .await
        .unwrap();
    stop.cancel();
    task.await.unwrap().unwrap();

    // Redelivery: batches that were applied already, handed to the model
    // again (as a redelivered JetStream batch would be), change nothing.
    let before = world.redis.dump().await.unwrap();
    let events = world.store.read_all(0, 400).await.unwrap();
    let batch: Vec<Projected> = events
        .into_iter()
        .map(|recorded| {
            let event = recorded.decode().unwrap();
            Projected::new(recorded, event)
        })
        .collect();
    for chunk in batch.chunks(100) {
        world.redis.model.apply(chunk).await.unwrap();
    }
    // And a projector restarted from scratch consumes the stream again.
    let (stop, task) = world.spawn(&projector);
    world.caught_up().await;
    stop.cancel();
    task.await.unwrap().unwrap();
    let after = world.redis.dump().await.unwrap();
    assert_eq!(before.len(), after.len());
    assert_eq!(before, after, "redelivery changed the read model");
    world.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projector_killed_mid_batch_recovers_to_the_same_state() {
    let world = world().await;
    let projector = world.projector();
    let workload = world.spawn_simulation(Pipeline::workload(4, 500, 5));
    for round in 0..8u64 {
        let (_, task) = world.spawn(&projector);
        tokio::time::sleep(Duration::from_millis(150 + round * 37)).await;
        // Dropping the task mid-flight: between a write and its ack, or
        // inside either.
        task.abort();
        let _ = task.await;
    }
    workload.await.unwrap();
    let (stop, task) = world.spawn(&projector);
    world.assert_verified().await;
    stop.cancel();
    task.await.unwrap().unwrap();
    world.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flushed_read_model_and_a_deleted_consumer_are_rebuilt() {
    let world = world().await;
    let projector = world.projector();
    let (stop, task) = world.spawn(&projector);
    world.simulate(2, 3).await;
    world.caught_up().await;
    stop.cancel();
    task.await.unwrap().unwrap();
    let before = world.redis.dump().await.unwrap();

    world.redis.wipe().await.unwrap();
    let js = world.nats.jetstream();
    let stream = js.get_stream(&world.nats.relay.stream_name).await.unwrap();
    let _ = stream.delete_consumer("projection-redis").await;
    let (stop, task) = world.spawn(&projector);
    world.assert_verified().await;
    stop.cancel();
    task.await.unwrap().unwrap();
    // Agents' "recently active" scores and everything else come back equal.
    let after = world.redis.dump().await.unwrap();
    assert_eq!(before, after, "the rebuilt read model differs");
    world.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_it_cannot_decode_stops_the_projection_at_its_position() {
    let world = world().await;
    world.simulate(1, 9).await;
    // An event type written by a newer version of the software.
    let position: i64 = sqlx::query_scalar(
        "INSERT INTO events (position, transaction_id, stream_id, stream_version, event_id, command_id,
                             correlation_id, tenant, event_type, schema_version, data, metadata)
         SELECT (pg_current_xact_id()::text::bigint << 16), pg_current_xact_id(), 'agent-' || gen_random_uuid(), 1,
                gen_random_uuid(), gen_random_uuid(), gen_random_uuid(), 'acme', 'AgentTeleported', 1, '{}'::jsonb,
                (SELECT metadata FROM events LIMIT 1)
         RETURNING position",
    )
    .fetch_one(&world.db.pool)
    .await
    .unwrap();
    let projector = world.projector();
    let (_stop, task) = world.spawn(&projector);
    let error = tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains(&format!("position {position}")),
        "{message}"
    );
    assert!(message.contains("AgentTeleported"), "{message}");
    let status = projector.status().borrow().clone();
    assert_eq!(status.state, ProjectorState::Stopped);
    assert!(
        status.checkpoint < position,
        "the projection applied past the bad event"
    );
    assert_eq!(
        world.redis.model.checkpoint().await.unwrap(),
        status.checkpoint
    );
    world.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_while_commands_flow_ends_with_the_live_state() {
    let world = world().await;
    let projector = world.projector();
    let (stop, task) = world.spawn(&projector);
    world.simulate(2, 21).await;
    world.caught_up().await;
    let first = world.redis.model.generation();

    // Commands keep flowing while the replay builds a new generation.
    let workload = world.spawn_simulation(SimulateArgs {
        agents: 6,
        workflows: 3,
        tasks_per_workflow: 5,
        ..Pipeline::workload(3, 300, 22)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let config = projections::LiveModelConfig {
        prefix: world.redis.prefix.clone(),
        ..projections::LiveModelConfig::default()
    };
    let summary = api::replay::replay_redis_into(
        &world.store,
        &world.nats.client,
        &world.redis.url,
        config,
        100,
        false,
    )
    .await
    .unwrap();
    assert_eq!(summary.previous.as_deref(), Some(first.as_str()));
    assert_ne!(summary.generation, first);
    assert!(
        summary.deleted_keys > 0,
        "the old generation was not deleted"
    );
    workload.await.unwrap();

    // The live projector moved to the new generation and kept it current.
    world.assert_verified().await;
    assert_eq!(world.redis.model.generation(), summary.generation);
    let leftovers: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}{first}:*", world.redis.prefix))
        .query_async(&mut world.redis.model.connection())
        .await
        .unwrap();
    assert!(
        leftovers.len() <= 5,
        "old generation keys left: {leftovers:?}"
    );
    stop.cancel();
    task.await.unwrap().unwrap();
    world.shutdown().await;
}

/// The whole log, decoded.
async fn decoded_log(world: &World) -> Vec<Projected> {
    world.caught_up_store().await;
    world
        .store
        .read_all(0, 100_000)
        .await
        .unwrap()
        .into_iter()
        .map(|recorded| {
            let event = recorded.decode().unwrap();
            Projected::new(recorded, event)
        })
        .collect()
}

impl World {
    /// Waits until every committed event is readable.
    async fn caught_up_store(&self) -> i64 {
        self.pipe.head().await
    }

    /// A second, independent model (its own connection and batch state) on
    /// this world's prefix.
    async fn other_model(&self, feed_max_len: usize) -> LiveModel {
        LiveModel::connect(
            &self.redis.url,
            projections::LiveModelConfig {
                prefix: self.redis.prefix.clone(),
                feed_max_len,
                ..projections::LiveModelConfig::default()
            },
        )
        .await
        .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_taking_turns_build_what_one_builds() {
    // Each model keeps the rows its last batch left for the next one; a batch
    // written in between by another model must make it read them again.
    let world = world().await;
    world.simulate(2, 31).await;
    let log = decoded_log(&world).await;
    assert!(log.len() > 300, "too short a log: {}", log.len());
    let (first, second) = (
        world.other_model(100_000).await,
        world.other_model(100_000).await,
    );
    for (turn, chunk) in log.chunks(37).enumerate() {
        let model = if turn % 3 == 1 { &second } else { &first };
        model.apply(chunk).await.unwrap();
    }
    world.assert_verified().await;
    let alternated = world.redis.dump().await.unwrap();

    // The same log applied by one model, in other batches, from scratch.
    world.redis.wipe().await.unwrap();
    let single = world.other_model(100_000).await;
    for chunk in log.chunks(250) {
        single.apply(chunk).await.unwrap();
    }
    let rebuilt = world.redis.dump().await.unwrap();
    assert_eq!(alternated.len(), rebuilt.len());
    assert_eq!(alternated, rebuilt, "taking turns built another read model");
    world.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_change_feed_holds_the_latest_events_in_order() {
    let world = world().await;
    world.simulate(2, 41).await;
    let log = decoded_log(&world).await;
    let cap = 7;
    let model = world.other_model(cap).await;
    // Batches larger than the cap: entries beyond it are never added.
    for (done, chunk) in log.chunks(50).enumerate() {
        model.apply(chunk).await.unwrap();
        let applied = &log[..((done + 1) * 50).min(log.len())];
        let tenant = &chunk[0].recorded.metadata.tenant;
        let expected: Vec<&Projected> = applied
            .iter()
            .filter(|p| &p.recorded.metadata.tenant == tenant)
            .collect();
        let feed = model.key(&format!("feed:{tenant}"));
        let len: usize = redis::cmd("XLEN")
            .arg(&feed)
            .query_async(&mut model.connection())
            .await
            .unwrap();
        assert!(len >= cap.min(expected.len()), "feed of {len} entries");
        type Entry = (String, Vec<(String, String)>);
        let mut latest: Vec<Entry> = redis::cmd("XREVRANGE")
            .arg(&feed)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(cap)
            .query_async(&mut model.connection())
            .await
            .unwrap();
        latest.reverse();
        let want = &expected[expected.len().saturating_sub(cap)..];
        assert_eq!(latest.len(), want.len());
        for ((id, fields), p) in latest.iter().zip(want) {
            let r = &p.recorded;
            assert_eq!(id, &format!("{}-0", r.position));
            let fields: std::collections::HashMap<_, _> = fields.iter().cloned().collect();
            assert_eq!(fields["position"], r.position.to_string());
            assert_eq!(fields["type"], r.event_type);
            assert_eq!(fields["stream_id"], r.stream_id);
            assert_eq!(fields["stream_version"], r.stream_version.to_string());
            assert_eq!(fields["data"], r.data.to_string());
        }
    }
    world.shutdown().await;
}

/// Publishes, with a plain NATS publish on a connection of its own, a
/// message that is not the relay's on the relay's subjects; `kind` picks one
/// of three: JSON without headers (another service's mistyped subject),
/// a garbage body (an operator's test), unrelated headers with a bogus
/// `Neurectomy-Position`.
async fn publish_foreign(client: &async_nats::Client, prefix: &str, kind: usize) {
    let marker = uuid::Uuid::new_v4();
    match kind % 3 {
        0 => client
            .publish(
                format!("{prefix}.task.TaskCreated"),
                serde_json::json!({ "id": marker }).to_string().into(),
            )
            .await
            .unwrap(),
        1 => client
            .publish(format!("{prefix}.test"), vec![0xff, 0x00, 0xfe].into())
            .await
            .unwrap(),
        _ => {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Content-Type", "application/json");
            headers.insert(commands::relay::HEADER_POSITION, "9000000000000000000");
            client
                .publish_with_headers(
                    format!("{prefix}.agent.AgentPaused"),
                    headers,
                    serde_json::json!({ "id": marker }).to_string().into(),
                )
                .await
                .unwrap()
        }
    }
    client.flush().await.unwrap();
}

/// The value of a counter in Prometheus text, 0 when absent.
fn counter(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_messages_are_passed_over_and_both_projections_verify_clean() {
    const FOREIGN: u64 = 12;
    api::metrics::install();
    let world = world().await;
    let graph = TestGraph::create().await.unwrap_or_else(|e| panic!("{e}"));
    let redis = world.projector();
    let graph_projector = world.pipe.projector(
        GraphModel::connect(graph.model.config().clone())
            .await
            .unwrap(),
    );
    let (stop_redis, redis_task) = world.spawn(&redis);
    let (stop_graph, graph_task) = world.spawn(&graph_projector);
    for projector in [redis.status(), graph_projector.status()] {
        eventually("the projectors to go live", Duration::from_secs(30), || {
            let state = projector.borrow().state;
            async move { (state == ProjectorState::Live).then_some(()) }
        })
        .await;
    }

    // Foreign messages interleaved with a running workload: one each time
    // the relay has published 10 more messages.
    let workload = world.spawn_simulation(Pipeline::workload(4, 300, 17));
    let client = async_nats::connect(world.nats.url.as_str()).await.unwrap();
    let prefix = world.nats.relay.subject_prefix.clone();
    let js = world.nats.jetstream();
    let stream = js.get_stream(&world.nats.relay.stream_name).await.unwrap();
    let mut seen = 0;
    for kind in 0..FOREIGN as usize {
        let stream = &stream;
        seen = eventually(
            "the relay to publish more",
            Duration::from_secs(30),
            || async move {
                let last = stream.get_info().await.ok()?.state.last_sequence;
                (last >= seen + 10).then_some(last)
            },
        )
        .await;
        publish_foreign(&client, &prefix, kind).await;
    }
    workload.await.unwrap();

    // Both reach the head, pass over every foreign message once, never go
    // back to the store for a gap, and hold exactly what the events say.
    assert_passed_over(
        &world,
        &graph,
        [&redis.status(), &graph_projector.status()],
        FOREIGN,
    )
    .await;

    // A projector (re)starting on a stream whose last messages are foreign:
    // its search for the first message after its checkpoint (the head)
    // has to probe them; it starts there, passes over them and goes on.
    stop_redis.cancel();
    redis_task.await.unwrap().unwrap();
    for kind in 0..3 {
        publish_foreign(&client, &prefix, kind).await;
    }
    let (stop_redis, redis_task) = world.spawn(&redis);
    world.simulate(1, 18).await;
    assert_passed_over(
        &world,
        &graph,
        [&redis.status(), &graph_projector.status()],
        FOREIGN + 3,
    )
    .await;

    stop_redis.cancel();
    stop_graph.cancel();
    redis_task.await.unwrap().unwrap();
    graph_task.await.unwrap().unwrap();
    world.shutdown().await;
}

/// Both projections are at the head and verify clean; each projector has
/// passed over `foreign` messages (status and metric), never went back to
/// the store, and is live without an error.
async fn assert_passed_over(
    world: &World,
    graph: &TestGraph,
    projectors: [&tokio::sync::watch::Receiver<projections::ProjectorStatus>; 2],
    foreign: u64,
) {
    world.assert_verified().await;
    let until = world.pipe.caught_up(&graph.model).await;
    let verified = verify_graph(&world.store, &graph.model, until)
        .await
        .unwrap();
    assert!(verified.differences.is_empty(), "graph: {verified:?}");
    for (name, projector) in ["redis", "graph"].into_iter().zip(projectors) {
        eventually(
            "the projector to pass over every foreign message",
            Duration::from_secs(30),
            || {
                let status = projector.borrow().clone();
                async move { (status.foreign == foreign).then_some(()) }
            },
        )
        .await;
        let status = projector.borrow().clone();
        assert_eq!(status.state, ProjectorState::Live, "{name}: {status:?}");
        assert_eq!(status.gaps, 0, "{name}: {status:?}");
        assert_eq!(status.last_error, None, "{name}: {status:?}");
        let text = api::metrics::render();
        let series =
            format!("neurectomy_projector_foreign_messages_total{{projection=\"{name}\"}}");
        assert!(
            counter(&text, &series) >= foreign as f64,
            "{series} in:\n{text}"
        );
    }
}

/// A read model that holds the first batch applied after [`Held::arm`]
/// until [`Held::release`]: meanwhile the consumer's ack wait passes and
/// JetStream delivers the batch's messages again.
#[derive(Clone)]
struct Held {
    inner: LiveModel,
    armed: Arc<AtomicBool>,
    holding: Arc<AtomicBool>,
    release: Arc<Notify>,
}

impl Held {
    fn new(inner: LiveModel) -> Self {
        Self {
            inner,
            armed: Arc::default(),
            holding: Arc::default(),
            release: Arc::default(),
        }
    }

    fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    fn release(&self) {
        self.release.notify_one();
    }

    async fn hold(&self) {
        if self.armed.swap(false, Ordering::SeqCst) {
            self.holding.store(true, Ordering::SeqCst);
            self.release.notified().await;
        }
    }
}

impl ReadModel for Held {
    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn checkpoint(&self) -> Result<i64, ApplyError> {
        self.inner.checkpoint().await
    }

    async fn apply(&self, events: &[Projected]) -> Result<(), ApplyError> {
        self.hold().await;
        self.inner.apply(events).await
    }

    async fn apply_after(&self, after: i64, events: &[Projected]) -> Result<(), ApplyError> {
        self.hold().await;
        self.inner.apply_after(after, events).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_message_is_skipped_not_taken_for_a_gap() {
    let world = world().await;
    let held = Held::new(world.redis.model.clone());
    let projector = Arc::new(Projector::new(
        held.clone(),
        world.store.clone(),
        world.nats.client.clone(),
        ProjectorConfig {
            stream_name: world.nats.relay.stream_name.clone(),
            batch_size: 200,
            ack_wait: Duration::from_secs(1),
            ..ProjectorConfig::default()
        },
    ));
    let (stop, task) = world.spawn(&projector);
    let status = projector.status();
    eventually("the projector to go live", Duration::from_secs(30), || {
        let state = status.borrow().state;
        async move { (state == ProjectorState::Live).then_some(()) }
    })
    .await;

    // The first live batch is held past the ack wait, until JetStream has
    // delivered it again; then it is applied and acknowledged, and the
    // projector reads the redelivered copies.
    held.arm();
    let workload = world.spawn_simulation(Pipeline::workload(1, 200, 23));
    eventually("a live batch to be held", Duration::from_secs(30), || {
        let holding = held.holding.load(Ordering::SeqCst);
        async move { holding.then_some(()) }
    })
    .await;
    let js = world.nats.jetstream();
    let stream = js.get_stream(&world.nats.relay.stream_name).await.unwrap();
    let consumer = &stream
        .get_consumer::<pull::Config>("projection-redis")
        .await
        .unwrap();
    eventually(
        "JetStream to deliver the held batch again",
        Duration::from_secs(30),
        || async move {
            let info = consumer.get_info().await.ok()?;
            (info.num_redelivered > 0).then_some(())
        },
    )
    .await;
    held.release();
    workload.await.unwrap();

    world.assert_verified().await;
    // The projector has read the redelivered copies: it either skipped
    // them or took them for a gap.
    let last = eventually(
        "the projector to meet the redelivered messages",
        Duration::from_secs(30),
        || {
            let status = status.borrow().clone();
            async move { (status.redelivered > 0 || status.gaps > 0).then_some(status) }
        },
    )
    .await;
    assert_eq!(
        last.gaps, 0,
        "a redelivery was taken for a gap (back to the event store): {last:?}"
    );
    assert!(last.redelivered > 0, "{last:?}");
    assert_eq!(last.state, ProjectorState::Live, "{last:?}");
    stop.cancel();
    task.await.unwrap().unwrap();
    world.shutdown().await;
}
