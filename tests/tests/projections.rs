//! The Redis projection against real PostgreSQL, JetStream and Redis: built
//! from a simulated workload, killed mid-batch, fed redeliveries, flushed,
//! and stopped by an event it cannot apply.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use api::settings::SimulateArgs;
use commands::testkit::{eventually, TestDatabase, TestNats};
use commands::{CommandHandler, EventStore, HandlerConfig, Relay};
use projections::testkit::TestRedis;
use projections::verify::verify_live;
use projections::{LiveModel, Projected, Projector, ProjectorConfig, ProjectorState, ReadModel};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

struct World {
    db: TestDatabase,
    nats: TestNats,
    redis: TestRedis,
    store: EventStore,
    stop: CancellationToken,
    relay: JoinHandle<()>,
}

async fn world() -> World {
    let db = TestDatabase::create(8)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let nats = TestNats::create().await.unwrap_or_else(|e| panic!("{e}"));
    let redis = TestRedis::create().await.unwrap_or_else(|e| panic!("{e}"));
    let store = EventStore::new(db.pool.clone());
    let stop = CancellationToken::new();
    let relay = Relay::new(store.clone(), nats.client.clone(), nats.relay.clone());
    relay.ensure_stream().await.unwrap();
    let relay = tokio::spawn({
        let stop = stop.clone();
        async move {
            relay.run(stop).await.unwrap();
        }
    });
    World {
        db,
        nats,
        redis,
        store,
        stop,
        relay,
    }
}

impl World {
    fn projector(&self) -> Arc<Projector<LiveModel>> {
        let config = ProjectorConfig {
            stream_name: self.nats.relay.stream_name.clone(),
            batch_size: 200,
            ..ProjectorConfig::default()
        };
        Arc::new(Projector::new(
            self.redis.model.clone(),
            self.store.clone(),
            self.nats.client.clone(),
            config,
        ))
    }

    fn spawn(
        &self,
        projector: &Arc<Projector<LiveModel>>,
    ) -> (
        CancellationToken,
        JoinHandle<Result<(), projections::ProjectorError>>,
    ) {
        let stop = self.stop.child_token();
        let projector = projector.clone();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move { projector.run(stop).await }
        });
        (stop, task)
    }

    async fn simulate(&self, seconds: u64, seed: u64) {
        let handler = CommandHandler::new(self.store.clone(), HandlerConfig::default());
        let args = SimulateArgs {
            agents: 8,
            workflows: 3,
            tasks_per_workflow: 6,
            rate: 400,
            duration: seconds,
            tenant: "acme".to_owned(),
            seed,
        };
        api::simulate::drive(handler, args, self.stop.child_token())
            .await
            .unwrap();
    }

    /// The head of the log once every committed event is readable: the
    /// gap-safe horizon is cluster-wide, so another test's open transaction
    /// can briefly hold it below events this test already committed.
    async fn head(&self) -> i64 {
        let store = self.store.clone();
        eventually(
            "the log head to be readable",
            Duration::from_secs(30),
            || {
                let store = store.clone();
                async move {
                    let head = store.head().await.unwrap();
                    (head.readable >= head.written).then_some(head.written)
                }
            },
        )
        .await
    }

    async fn caught_up(&self) -> i64 {
        let head = self.head().await;
        let model = self.redis.model.clone();
        eventually(
            "the Redis projection to catch up",
            Duration::from_secs(60),
            || {
                let model = model.clone();
                async move { (model.checkpoint().await.unwrap() >= head).then_some(()) }
            },
        )
        .await;
        head
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
        self.stop.cancel();
        self.relay.await.unwrap();
        drop(self.db);
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
    let workload = {
        let handler = CommandHandler::new(world.store.clone(), HandlerConfig::default());
        let stop = world.stop.child_token();
        tokio::spawn(async move {
            let args = SimulateArgs {
                agents: 8,
                workflows: 3,
                tasks_per_workflow: 6,
                rate: 500,
                duration: 4,
                tenant: "acme".to_owned(),
                seed: 5,
            };
            api::simulate::drive(handler, args, stop).await.unwrap();
        })
    };
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
    let workload = {
        let handler = CommandHandler::new(world.store.clone(), HandlerConfig::default());
        let stop = world.stop.child_token();
        tokio::spawn(async move {
            let args = SimulateArgs {
                agents: 6,
                workflows: 3,
                tasks_per_workflow: 5,
                rate: 300,
                duration: 3,
                tenant: "acme".to_owned(),
                seed: 22,
            };
            api::simulate::drive(handler, args, stop).await.unwrap();
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let config = projections::LiveModelConfig {
        prefix: world.redis.prefix.clone(),
        ..projections::LiveModelConfig::default()
    };
    let summary =
        api::replay::replay_redis_into(&world.store, &world.redis.url, config, 100, false)
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
