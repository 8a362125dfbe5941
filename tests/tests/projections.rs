//! The Redis projection against real PostgreSQL, JetStream and Redis: built
//! from a simulated workload, killed mid-batch, fed redeliveries, flushed,
//! and stopped by an event it cannot apply.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use api::settings::SimulateArgs;
use neurectomy_e2e::pipeline::Pipeline;
use projections::testkit::TestRedis;
use projections::verify::verify_live;
use projections::{LiveModel, Projected, Projector, ProjectorState, ReadModel};

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
            .unwrap();
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
        .unwrap();
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
        .map(|recorded| Projected {
            event: recorded.decode().unwrap(),
            recorded,
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
