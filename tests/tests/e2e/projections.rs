//! The Redis projection against real PostgreSQL, JetStream and Redis: built
//! from a simulated workload, killed inside batches (as a task, and as a
//! process mid-catch-up), fed redeliveries (by the model and by JetStream),
//! flushed, its consumer deleted and its stream purged under it, stopped by
//! an event it cannot apply, and fed messages the relay did not publish
//! (with the graph projection too). Where a fault could leave a trace, the
//! whole model is compared with a clean rebuild from the event store.
//!
//! Every workload's seed derives from one per test, logged;
//! `NEURECTOMY_TEST_SEED` repeats a run's choices.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use api::simulate::SimulateArgs;
use async_nats::jetstream::consumer::pull;
use commands::testkit::eventually;
use neurectomy_e2e::pipeline::Pipeline;
use neurectomy_e2e::read_side::{self, assert_same_redis, Gate, Hold};
use projections::graph_testkit::TestGraph;
use projections::testkit::TestRedis;
use projections::verify::{verify_graph, verify_redis};
use projections::{
    GraphModel, Projected, Projector, ProjectorConfig, ProjectorState, ReadModel, RedisModel,
};
use rand::SeedableRng as _;

use crate::support::{delete_consumer_under_live_projector, live, report};

/// The pipeline plus a Redis read model of the test's own.
struct World {
    pipe: Pipeline,
    redis: TestRedis,
    /// The test's seed (logged).
    seed: u64,
}

impl std::ops::Deref for World {
    type Target = Pipeline;
    fn deref(&self) -> &Pipeline {
        &self.pipe
    }
}

/// The world of the test named `test`, with its seed.
async fn world(test: &str) -> World {
    let seed = read_side::seed(test);
    let pipe = Pipeline::start().await;
    let redis = TestRedis::create().await.unwrap_or_else(|e| panic!("{e}"));
    World { pipe, redis, seed }
}

impl World {
    fn projector(&self) -> Arc<Projector<RedisModel>> {
        self.pipe.projector(self.redis.model.clone())
    }

    /// A projector on `model` taking batches of `batch_size` events.
    fn projector_of<M: ReadModel>(&self, model: M, batch_size: usize) -> Arc<Projector<M>> {
        Arc::new(Projector::new(
            model,
            self.store.clone(),
            self.nats.client.clone(),
            ProjectorConfig {
                stream_name: self.nats.relay.stream_name.clone(),
                batch_size,
                ..ProjectorConfig::default()
            },
        ))
    }

    /// The test's `n`-th workload: `seconds` at `rate` commands/s.
    fn workload(&self, seconds: u64, rate: u32, n: u64) -> SimulateArgs {
        Pipeline::workload(seconds, rate, self.seed.wrapping_add(n).max(1))
    }

    /// Runs the test's `n`-th workload (400 commands/s) until the log
    /// holds `events` more events.
    async fn simulate(&self, events: i64, n: u64) {
        self.pipe
            .simulate_until(self.workload(0, 400, n), events, &[])
            .await;
    }

    async fn caught_up(&self) -> i64 {
        self.pipe.caught_up(&self.redis.model).await
    }

    async fn assert_verified(&self) {
        let until = self.caught_up().await;
        let differences = verify_redis(&self.store, &self.redis.model, until)
            .await
            .unwrap()
            .differences;
        assert!(differences.is_empty(), "{}", report("Redis", &differences));
    }

    /// Fails unless the test's model holds exactly what a clean rebuild
    /// from the log up to `until` holds: every key, with its contents.
    async fn assert_rebuilt_equal(&self, what: &str, until: i64) {
        let clean = read_side::redis_rebuilt(&self.store, until).await;
        let expected = clean.dump_model().await.unwrap();
        assert!(expected.len() > 30, "too small a model: {expected:?}");
        let actual = self.redis.dump_model().await.unwrap();
        assert_same_redis(what, &actual, &expected);
    }

    /// The stored checkpoint of the test's model.
    async fn checkpoint(&self) -> i64 {
        self.redis.model.checkpoint().await.unwrap()
    }

    async fn shutdown(self) {
        self.pipe.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulated_workload_verifies_clean_and_redeliveries_change_nothing() {
    let world = world("a_simulated_workload_verifies_clean_and_redeliveries_change_nothing").await;
    let projector = world.projector();
    let (stop, task) = world.spawn(&projector);
    world.simulate(600, 0).await;
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
    let differences = verify_redis(&world.store, &world.redis.model, until)
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
    assert_eq!(world.checkpoint().await, until);
    let clean = read_side::redis_rebuilt(&world.store, until).await;
    let reference = clean.dump_model().await.unwrap();
    assert_same_redis(
        "the projector's model",
        &world.redis.dump_model().await.unwrap(),
        &reference,
    );

    // Every batch applied already, handed to the model again (as a
    // redelivered JetStream batch would be): wholly at or below its
    // checkpoint, it changes nothing.
    let all = read_side::log(&world.store, until).await;
    assert!(all.len() > 300, "too short a log: {}", all.len());
    for chunk in all.chunks(100) {
        world.redis.model.apply(chunk).await.unwrap();
    }
    assert_same_redis(
        "the model after its batches came again",
        &world.redis.dump_model().await.unwrap(),
        &reference,
    );

    // Batches straddling the checkpoint, into a fresh model: each window
    // re-sends the last 40 events of the one before (already applied) with
    // 100 new ones, and is sent twice. Only what lies above the checkpoint
    // may be applied, once.
    let fresh = TestRedis::create().await.unwrap_or_else(|e| panic!("{e}"));
    let mut straddled = 0;
    for start in (0..all.len()).step_by(100) {
        let window = &all[start.saturating_sub(40)..(start + 100).min(all.len())];
        let at = fresh.model.checkpoint().await.unwrap();
        let (first, last) = (
            window[0].recorded.position,
            window[window.len() - 1].recorded.position,
        );
        if start > 0 {
            assert!(
                first <= at && at < last,
                "the window {first}..={last} does not straddle the checkpoint {at}"
            );
            straddled += 1;
        }
        fresh.model.apply(window).await.unwrap();
        assert_eq!(fresh.model.checkpoint().await.unwrap(), last);
        fresh.model.apply(window).await.unwrap();
    }
    assert!(straddled >= 3, "{straddled} straddling windows");
    assert_same_redis(
        "a model fed straddling redeliveries",
        &fresh.dump_model().await.unwrap(),
        &reference,
    );
    world.shutdown().await;
}

/// How many events each projector batch holds in the kill test: a backlog
/// of a few hundred events spans several catch-up batches.
const SMALL_BATCH: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projector_killed_inside_batches_recovers_to_a_clean_rebuild() {
    let world = world("a_projector_killed_inside_batches_recovers_to_a_clean_rebuild").await;
    let workload = world.start_workload(world.workload(0, 400, 0));
    // Eight runs, each killed (its task aborted) with a batch held inside
    // the model, while catching up or live, before or after its write (see
    // `kill_inside_batches`). The first four restart on the model the
    // killed run used (the rows its last batch left are kept, as for a task
    // restarted in the same process); the last four on a connection of
    // their own (as a restarted process, which reads every row back).
    read_side::kill_inside_batches(&world.pipe, 8, SMALL_BATCH, world.seed, |round| {
        let world = &world;
        async move {
            if round < 4 {
                world.redis.model.clone()
            } else {
                world.other_model(100_000).await
            }
        }
    })
    .await;
    assert!(workload.is_running(), "the workload ended during the kills");

    // Restarted once more, for good: it catches up and follows the
    // workload to its end.
    let projector = world.projector();
    let (stop, task) = world.spawn(&projector);
    live(&projector).await;
    let head = world.pipe.head_beyond(world.checkpoint().await).await;
    workload.stop().await;
    let until = world.caught_up().await;
    assert!(until >= head);
    stop.cancel();
    task.await.unwrap().unwrap();
    let status = projector.status().borrow().clone();
    assert_eq!((status.gaps, &status.last_error), (0, &None), "{status:?}");
    world
        .assert_rebuilt_equal("the model after eight kills", until)
        .await;
    world.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flushed_read_model_and_a_consumer_deleted_under_the_live_projector_are_rebuilt() {
    let world =
        world("a_flushed_read_model_and_a_consumer_deleted_under_the_live_projector_are_rebuilt")
            .await;
    let projector = world.projector();
    let (stop, task) = world.spawn(&projector);
    world.simulate(400, 0).await;
    world.caught_up().await;
    stop.cancel();
    task.await.unwrap().unwrap();
    let before = world.redis.dump_model().await.unwrap();

    // Flushed (every key, the generation pointer too) while stopped: the
    // projector finds an empty model and rebuilds it from the store.
    world.redis.wipe().await.unwrap();
    assert_eq!(world.checkpoint().await, 0);
    let (stop, task) = world.spawn(&projector);
    world.caught_up().await;
    assert_same_redis(
        "the model rebuilt after a flush",
        &world.redis.dump_model().await.unwrap(),
        &before,
    );

    // The durable consumer deleted under the live projector while commands
    // flow: its pull stream fails, and the projector must notice, go back
    // to the store from its checkpoint and make a new consumer.
    live(&projector).await;
    let status = projector.status();
    assert_eq!(status.borrow().last_error, None);
    let workload = world.start_workload(world.workload(0, 300, 1));
    delete_consumer_under_live_projector(
        &world.pipe,
        &world.redis.model,
        &status,
        "projection-redis",
    )
    .await;
    assert!(workload.is_running());
    workload.stop().await;
    let until = world.caught_up().await;
    stop.cancel();
    task.await.unwrap().unwrap();
    let status = status.borrow().clone();
    assert_eq!(status.state, ProjectorState::Live, "{status:?}");
    world
        .assert_rebuilt_equal("the model after its consumer was deleted", until)
        .await;
    world.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projector_behind_the_stream_retention_reads_the_store() {
    let test = "a_projector_behind_the_stream_retention_reads_the_store";
    // The stream keeps its newest ~32 KiB: a few dozen events.
    let pipe = Pipeline::start_with(|relay| relay.max_bytes = 32 << 10).await;
    let redis = TestRedis::create().await.unwrap_or_else(|e| panic!("{e}"));
    let world = World {
        pipe,
        redis,
        seed: read_side::seed(test),
    };
    // The log grows while no projector runs; the relay publishes it all and
    // JetStream drops the oldest messages.
    world.simulate(1_000, 0).await;
    let js = world.nats.jetstream();
    let stream = js.get_stream(&world.nats.relay.stream_name).await.unwrap();
    let stream = &stream;
    let first = eventually(
        "JetStream to drop messages beyond the stream's byte limit",
        Duration::from_secs(60),
        || async move {
            let state = stream.get_info().await.ok()?.state;
            (state.first_sequence > 100).then_some(state.first_sequence)
        },
    )
    .await;

    // A new projector (checkpoint 0) needs messages that are gone: it reads
    // the store up to what JetStream still holds, then follows the stream.
    let projector = world.projector();
    let (stop, task) = world.spawn(&projector);
    live(&projector).await;
    world.simulate(200, 1).await;
    let until = world.caught_up().await;
    stop.cancel();
    task.await.unwrap().unwrap();
    let status = projector.status().borrow().clone();
    assert_eq!(
        (status.state, &status.last_error),
        (ProjectorState::Live, &None),
        "{status:?}"
    );
    assert!(first > 100);
    world
        .assert_rebuilt_equal("the model of a projector behind the retention", until)
        .await;
    world.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purged_stream_sends_the_projector_back_to_the_store() {
    let world = world("a_purged_stream_sends_the_projector_back_to_the_store").await;
    // Batches of 50: the consumer stops delivering at 200 unacknowledged
    // messages.
    let gate = Gate::new(world.redis.model.clone());
    let projector = world.projector_of(gate.clone(), SMALL_BATCH);
    let (stop, task) = world.spawn(&projector);
    live(&projector).await;

    // A live batch held while the relay publishes on; once JetStream holds
    // messages the consumer has not delivered, the stream is purged: the
    // next message the projector gets skips sequences.
    gate.arm(Hold::BeforeWrite, 0);
    let workload = world.start_workload(world.workload(0, 400, 0));
    gate.held().await;
    let js = world.nats.jetstream();
    let stream = js.get_stream(&world.nats.relay.stream_name).await.unwrap();
    let consumer: async_nats::jetstream::consumer::PullConsumer =
        stream.get_consumer("projection-redis").await.unwrap();
    let consumer = &consumer;
    let stream_ref = &stream;
    let (delivered, last) = eventually(
        "JetStream to hold messages the consumer has not delivered",
        Duration::from_secs(60),
        || async move {
            let delivered = consumer.get_info().await.ok()?.delivered.stream_sequence;
            let last = stream_ref.get_info().await.ok()?.state.last_sequence;
            (last > delivered + 10).then_some((delivered, last))
        },
    )
    .await;
    let purged = stream.purge().await.unwrap();
    let purged_at = world.store.head().await.unwrap().written;
    let first = stream.get_info().await.unwrap().state.first_sequence;
    assert!(
        purged.purged > 10 && first > last,
        "the purge left messages up to {last} (delivered: {delivered}): {purged:?}, first {first}"
    );
    gate.release();

    // Events committed after the purge reach the model; to get there, the
    // projector went past the skipped sequences.
    let after = world.pipe.head_beyond(purged_at).await;
    world.pipe.caught_up_to(&world.redis.model, after).await;
    let status = projector.status();
    let seen = status.borrow().clone();
    assert!(
        seen.gaps > 0,
        "the skipped sequences were not taken for a gap: {seen:?}"
    );
    assert!(workload.is_running());
    workload.stop().await;
    let until = world.caught_up().await;
    stop.cancel();
    task.await.unwrap().unwrap();
    let status = status.borrow().clone();
    assert_eq!(
        (status.state, &status.last_error),
        (ProjectorState::Live, &None),
        "{status:?}"
    );
    world
        .assert_rebuilt_equal("the model after the purge", until)
        .await;
    world.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_it_cannot_decode_stops_the_projection_at_its_position() {
    let world = world("an_event_it_cannot_decode_stops_the_projection_at_its_position").await;
    world.simulate(200, 0).await;
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
    let world = world("replay_while_commands_flow_ends_with_the_live_state").await;
    let projector = world.projector();
    let (stop, task) = world.spawn(&projector);
    world.simulate(400, 0).await;
    let built = world.caught_up().await;
    let first = world.redis.model.generation();

    // Commands keep flowing while the replay builds a new generation: they
    // flow before it starts, and the log grows while it runs.
    let workload = world.start_workload(SimulateArgs {
        agents: 6,
        workflows: 3,
        tasks_per_workflow: 5,
        ..world.workload(0, 300, 1)
    });
    let started = world.pipe.head_beyond(built).await;
    let config = projections::RedisModelConfig {
        prefix: world.redis.prefix.clone(),
        ..projections::RedisModelConfig::default()
    };
    let summary = projections::replay::replay_redis_into(
        &world.store,
        &world.nats.client,
        &world.redis.url,
        config,
        100,
        |_| {},
    )
    .await
    .unwrap();
    let ended = world.store.head().await.unwrap().written;
    assert!(
        ended > started && workload.is_running(),
        "no command landed during the replay (head {started} → {ended})"
    );
    assert_eq!(summary.previous.as_deref(), Some(first.as_str()));
    assert_ne!(summary.generation, first);
    assert!(
        summary.deleted_keys > 0,
        "the old generation was not deleted"
    );
    workload.stop().await;

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
    let until = world.caught_up().await;
    stop.cancel();
    task.await.unwrap().unwrap();
    // The new generation holds what a clean rebuild holds (the few keys a
    // batch racing the switch may have left in the old one aside).
    let mut actual = world.redis.dump_model().await.unwrap();
    actual.retain(|key, _| !key.starts_with(&format!("outside the generation: {first}:")));
    let clean = read_side::redis_rebuilt(&world.store, until).await;
    assert_same_redis(
        "the replayed generation",
        &actual,
        &clean.dump_model().await.unwrap(),
    );
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
    async fn other_model(&self, feed_max_len: usize) -> RedisModel {
        RedisModel::connect(
            &self.redis.url,
            projections::RedisModelConfig {
                prefix: self.redis.prefix.clone(),
                feed_max_len,
                ..projections::RedisModelConfig::default()
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
    let world = world("two_writers_taking_turns_build_what_one_builds").await;
    world.simulate(400, 0).await;
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
    let world = world("the_change_feed_holds_the_latest_events_in_order").await;
    world.simulate(400, 0).await;
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
    api::telemetry::metrics::install();
    let world = world("foreign_messages_are_passed_over_and_both_projections_verify_clean").await;
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
    let workload = world.start_workload(world.workload(0, 300, 0));
    let client = async_nats::connect(world.nats.url.as_str()).await.unwrap();
    let prefix = world.nats.relay.subject_prefix.clone();
    let js = world.nats.jetstream();
    let stream = js.get_stream(&world.nats.relay.stream_name).await.unwrap();
    let mut seen = 0;
    // The last round publishes nothing: the workload's messages follow the
    // last foreign one too.
    for kind in 0..=FOREIGN as usize {
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
        if kind < FOREIGN as usize {
            publish_foreign(&client, &prefix, kind).await;
        }
    }
    workload.stop().await;

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
    world.simulate(200, 1).await;
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
        let text = api::telemetry::metrics::render();
        let series =
            format!("neurectomy_projector_foreign_messages_total{{projection=\"{name}\"}}");
        assert!(
            counter(&text, &series) >= foreign as f64,
            "{series} in:\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_message_is_skipped_not_taken_for_a_gap() {
    let world = world("a_redelivered_message_is_skipped_not_taken_for_a_gap").await;
    let held = Gate::new(world.redis.model.clone());
    let projector = Arc::new(Projector::new(
        held.clone(),
        world.store.clone(),
        world.nats.client.clone(),
        // Pull requests of 500 messages: while the batch is held (and the
        // pull stream not polled) the workload's 200 commands leave room in
        // the request for JetStream to deliver the held messages again.
        ProjectorConfig {
            stream_name: world.nats.relay.stream_name.clone(),
            batch_size: 500,
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
    held.arm(Hold::BeforeWrite, 0);
    let workload = world.spawn_simulation(world.workload(1, 200, 0));
    held.held().await;
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

/// The `neurectomy` binary built for these tests.
const BINARY: &str = env!("CARGO_BIN_EXE_neurectomy-e2e");

/// Events in the log before the projector processes start: more than four
/// catch-up batches of the Redis projector (2,000 events each), so that its
/// checkpoint can be seen between the first batch and the head.
const BACKLOG: i64 = 8_500;

/// `neurectomy project --only <only>` on the test's database, stream, Redis
/// prefix and graph database (projector batches of 200).
fn project(world: &World, graph: &TestGraph, only: &str) -> neurectomy_e2e::Process {
    let target = neurectomy_e2e::Target {
        binary: BINARY.to_owned(),
        database_url: world.db.url.clone(),
        nats_url: world.nats.url.clone(),
        stream: world.nats.relay.stream_name.clone(),
        subject_prefix: world.nats.relay.subject_prefix.clone(),
    };
    let config = graph.model.config();
    let child = target
        .command(&["project", "--only", only])
        .env("NEURECTOMY_REDIS_URL", &world.redis.url)
        .env("NEURECTOMY_REDIS_PREFIX", &world.redis.prefix)
        .env("NEURECTOMY_GRAPH_URI", &config.uri)
        .env("NEURECTOMY_GRAPH_USER", &config.user)
        .env("NEURECTOMY_GRAPH_PASSWORD", &config.password)
        .env("NEURECTOMY_GRAPH_DATABASE", &graph.database)
        .env("NEURECTOMY_GRAPH_HTTP", &graph.http)
        .env("NEURECTOMY_PROJECTOR_BATCH_SIZE", "200")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {BINARY} project --only {only}: {e}"));
    neurectomy_e2e::Process {
        child,
        role: format!("project --only {only}"),
    }
}

/// Polls `model`'s checkpoint every few milliseconds and SIGKILLs `process`
/// as soon as it lies between 0 and `head` (the catch-up has applied a
/// batch and not the last one); returns the checkpoint the killed process
/// left, which must still be below the head.
async fn kill_mid_catch_up<M: ReadModel>(
    mut process: neurectomy_e2e::Process,
    model: &M,
    head: i64,
) -> i64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    loop {
        if let Some(status) = process.child.try_wait().unwrap() {
            panic!("{} exited on its own: {status}", process.role);
        }
        let checkpoint = model.checkpoint().await.unwrap();
        assert!(
            checkpoint < head,
            "{} caught up ({checkpoint}) before a checkpoint between 0 and the head was seen: \
             raise BACKLOG",
            process.role
        );
        if checkpoint > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} applied nothing for 300 s",
            process.role
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    process.kill().await.unwrap();
    let left = model.checkpoint().await.unwrap();
    assert!(
        0 < left && left < head,
        "{} was not killed mid-catch-up: checkpoint {left}, head {head}",
        process.role
    );
    left
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projector_processes_killed_mid_catch_up_resume_to_a_clean_rebuild() {
    let world = world("projector_processes_killed_mid_catch_up_resume_to_a_clean_rebuild").await;
    let graph = TestGraph::create().await.unwrap_or_else(|e| panic!("{e}"));
    // The backlog: agents' lifecycles appended in bulk (7,000 events)
    // while the simulator, unpaced, runs the realistic mix, until the log
    // holds BACKLOG events.
    let workload = world.start_workload(SimulateArgs {
        agents: 16,
        workflows: 8,
        ..world.workload(0, 0, 0)
    });
    let mut rng = rand::rngs::StdRng::seed_from_u64(world.seed);
    read_side::append_agent_backlog(&world.store, "acme", 70, 100, &mut rng).await;
    let store = &world.store;
    eventually(
        "the backlog to be written",
        Duration::from_secs(300),
        || async move { (store.count_after(0, BACKLOG).await.unwrap() >= BACKLOG).then_some(()) },
    )
    .await;
    workload.stop().await;
    let head = world.pipe.head().await;

    // Both projector processes catch up from the store; each is SIGKILLed
    // half-way, then started again.
    let (redis_left, graph_left) = tokio::join!(
        kill_mid_catch_up(project(&world, &graph, "redis"), &world.redis.model, head),
        kill_mid_catch_up(project(&world, &graph, "graph"), &graph.model, head),
    );
    let total = world.store.count_after(0, i64::MAX).await.unwrap();
    for (name, left) in [("redis", redis_left), ("graph", graph_left)] {
        let applied = total - world.store.count_after(left, i64::MAX).await.unwrap();
        eprintln!(
            "the {name} projector process was killed with {applied} of {total} events applied"
        );
    }
    let mut redis = project(&world, &graph, "redis");
    let mut graph_process = project(&world, &graph, "graph");
    world.pipe.caught_up_to(&world.redis.model, head).await;
    world.pipe.caught_up_to(&graph.model, head).await;
    redis.kill().await.unwrap();
    graph_process.kill().await.unwrap();

    world
        .assert_rebuilt_equal("the model of the killed process", head)
        .await;
    let clean = read_side::graph_rebuilt(&world.store, head).await;
    read_side::assert_same_lines(
        "the graph of the killed process",
        &graph.dump().await.unwrap(),
        &clean.dump().await.unwrap(),
    );
    world.shutdown().await;
}
