//! The graph projection against real PostgreSQL, JetStream and the graph
//! server (ArcadeDB over Bolt): built from a simulated workload and verified
//! (and caught out when tampered with), killed inside batches, wiped, its
//! consumer deleted under it while live, fed redeliveries, and replayed
//! into new databases while commands flow. Where a fault could leave a
//! trace, the whole graph is compared with a clean pass.
//!
//! Every workload's seed derives from one per test, logged;
//! `NEURECTOMY_TEST_SEED` repeats a run's choices.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use api::simulate::SimulateArgs;
use neo4rs::query;
use neurectomy_e2e::pipeline::Pipeline;
use neurectomy_e2e::read_side::{self, assert_same_lines};
use projections::graph_testkit::TestGraph;
use projections::verify::{verify_graph, Difference};
use projections::{GraphModel, Projector, ProjectorState, ReadModel};

use crate::support::{delete_consumer_under_live_projector, live, report};

/// The pipeline plus a graph database of the test's own.
struct World {
    pipe: Pipeline,
    graph: TestGraph,
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
    let graph = TestGraph::create().await.unwrap_or_else(|e| panic!("{e}"));
    World { pipe, graph, seed }
}

/// Runs one Cypher write in its own transaction.
async fn write(model: &GraphModel, cypher: &str) {
    let mut txn = model.graph().start_txn().await.unwrap();
    txn.run(query(cypher)).await.unwrap();
    txn.commit().await.unwrap();
}

impl World {
    /// A projector on a model of its own (its own Bolt pool).
    async fn projector(&self) -> Arc<Projector<GraphModel>> {
        let model = GraphModel::connect(self.graph.model.config().clone())
            .await
            .unwrap();
        self.pipe.projector(model)
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
        self.pipe.caught_up(&self.graph.model).await
    }

    async fn verify(&self, until: i64) -> Vec<Difference> {
        verify_graph(&self.store, &self.graph.model, until)
            .await
            .unwrap()
            .differences
    }

    async fn assert_verified(&self) -> i64 {
        let until = self.caught_up().await;
        let differences = self.verify(until).await;
        assert!(
            differences.is_empty(),
            "{}",
            report("the graph", &differences)
        );
        until
    }

    /// Fails unless the test's graph holds exactly what a clean pass over
    /// the events up to `until` (batches of the projector's size, into a
    /// database of its own) builds: every node and relationship with its
    /// properties.
    async fn assert_clean_pass_equal(&self, what: &str, until: i64) {
        let clean = read_side::graph_rebuilt(&self.store, until).await;
        let expected = clean.dump().await.unwrap();
        assert!(expected.len() > 30, "too small a graph: {expected:?}");
        assert_same_lines(what, &self.graph.dump().await.unwrap(), &expected);
    }

    async fn shutdown(self) {
        self.pipe.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulated_workload_verifies_clean_and_redelivery_changes_nothing() {
    let world = world("a_simulated_workload_verifies_clean_and_redelivery_changes_nothing").await;
    let projector = world.projector().await;
    let (stop, task) = world.spawn(&projector);
    // The workload exercises the assignee edge's every move.
    world
        .pipe
        .simulate_until(
            world.workload(0, 400, 0),
            600,
            &["TaskDelegated", "TaskRetried", "TaskCompleted"],
        )
        .await;
    let until = world.assert_verified().await;
    stop.cancel();
    task.await.unwrap().unwrap();

    // verify can fail: a tampered property is reported, and only it.
    let model = &world.graph.model;
    let mut ids = model
        .graph()
        .execute(query(
            "MATCH (t:Task) RETURN t.id AS id ORDER BY id LIMIT 1",
        ))
        .await
        .unwrap();
    let task_id: String = ids.next().await.unwrap().unwrap().get("id").unwrap();
    drop(ids);
    write(
        model,
        &format!("MATCH (t:Task {{id: '{task_id}'}}) SET t.state = 'bogus'"),
    )
    .await;
    let differences = world.verify(until).await;
    assert_eq!(differences.len(), 1, "{differences:?}");
    assert_eq!(differences[0].key, format!("Task {task_id}"));
    assert_eq!(differences[0].field, "state");
    assert_eq!(differences[0].actual, "bogus");
    write(
        model,
        &format!(
            "MATCH (t:Task {{id: '{task_id}'}}) SET t.state = '{}'",
            differences[0].expected
        ),
    )
    .await;
    // So is a node no event created.
    write(model, "CREATE (:Task {id: 'ghost', state: 'running'})").await;
    let differences = world.verify(until).await;
    assert_eq!(differences.len(), 1, "{differences:?}");
    assert_eq!(
        (differences[0].key.as_str(), differences[0].field.as_str()),
        ("Task ghost", "node")
    );
    write(model, "MATCH (t:Task {id: 'ghost'}) DETACH DELETE t").await;
    assert_eq!(world.verify(until).await, Vec::new());

    // Redelivery: batches that were applied already, handed to the model
    // again (as a redelivered JetStream batch would be), change nothing.
    let before = world.graph.dump().await.unwrap();
    let all = read_side::log(&world.store, until).await;
    for kind in ["TaskDelegated", "TaskRetried", "TaskCompleted"] {
        assert!(
            all.iter().any(|p| p.recorded.event_type == kind),
            "no {kind} among {} events",
            all.len()
        );
    }
    for chunk in all.chunks(150) {
        model.apply(chunk).await.unwrap();
    }
    assert_eq!(before, world.graph.dump().await.unwrap());
    // And batches overlapping what was applied (each window re-sends the
    // tail of the previous one, then is sent twice) build the same graph as
    // the projector did.
    let other = TestGraph::create().await.unwrap_or_else(|e| panic!("{e}"));
    let mut start = 0;
    while start < all.len() {
        let window = &all[start.saturating_sub(40)..(start + 100).min(all.len())];
        other.model.apply(window).await.unwrap();
        other.model.apply(window).await.unwrap();
        start += 100;
    }
    let rebuilt = other.dump().await.unwrap();
    assert_eq!(before.len(), rebuilt.len());
    assert_eq!(
        before, rebuilt,
        "overlapping redeliveries changed the graph"
    );
    world.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projector_killed_inside_batches_recovers_to_a_clean_pass() {
    let world = world("a_projector_killed_inside_batches_recovers_to_a_clean_pass").await;
    let workload = world.start_workload(world.workload(0, 400, 0));
    // Eight runs, each killed (its task aborted) with a batch held inside
    // the model, while catching up or live, before or after its
    // transaction committed (see `kill_inside_batches`); batches of 50.
    // The first four restart on one model (one Bolt pool, the killed runs'
    // connections left to it as they were), the last four on a pool of
    // their own.
    let shared = GraphModel::connect(world.graph.model.config().clone())
        .await
        .unwrap();
    read_side::kill_inside_batches(&world.pipe, 8, 50, world.seed, |round| {
        let (world, shared) = (&world, shared.clone());
        async move {
            if round < 4 {
                shared
            } else {
                GraphModel::connect(world.graph.model.config().clone())
                    .await
                    .unwrap()
            }
        }
    })
    .await;
    assert!(workload.is_running(), "the workload ended during the kills");
    let projector = world.projector().await;
    let (stop, task) = world.spawn(&projector);
    workload.stop().await;
    let until = world.assert_verified().await;
    stop.cancel();
    task.await.unwrap().unwrap();
    let status = projector.status().borrow().clone();
    assert_eq!((status.gaps, &status.last_error), (0, &None), "{status:?}");
    world
        .assert_clean_pass_equal("the graph after eight kills", until)
        .await;
    world.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_graph_and_a_consumer_deleted_under_the_live_projector_are_rebuilt() {
    let world =
        world("a_wiped_graph_and_a_consumer_deleted_under_the_live_projector_are_rebuilt").await;
    let projector = world.projector().await;
    let (stop, task) = world.spawn(&projector);
    world.simulate(400, 0).await;
    world.assert_verified().await;
    stop.cancel();
    task.await.unwrap().unwrap();
    let before = world.graph.dump().await.unwrap();

    // Wiped while stopped: the projector finds an empty graph and rebuilds
    // it from the store.
    write(&world.graph.model, "MATCH (n) DETACH DELETE n").await;
    assert_eq!(world.graph.model.checkpoint().await.unwrap(), 0);
    let (stop, task) = world.spawn(&projector);
    world.assert_verified().await;
    assert_same_lines(
        "the graph rebuilt after a wipe",
        &world.graph.dump().await.unwrap(),
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
        &world.graph.model,
        &status,
        "projection-graph",
    )
    .await;
    assert!(workload.is_running());
    workload.stop().await;
    let until = world.assert_verified().await;
    stop.cancel();
    task.await.unwrap().unwrap();
    let status = status.borrow().clone();
    assert_eq!(status.state, ProjectorState::Live, "{status:?}");
    world
        .assert_clean_pass_equal("the graph after its consumer was deleted", until)
        .await;
    world.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_while_commands_flow_switch_to_a_database_with_the_live_state() {
    let world = world("replays_while_commands_flow_switch_to_a_database_with_the_live_state").await;
    let projector = world.projector().await;
    let (stop, task) = world.spawn(&projector);
    world.simulate(400, 0).await;
    let built = world.caught_up().await;
    let home = world.graph.database.clone();

    // Commands keep flowing through both replays, each building a new
    // database while the live projector keeps serving from the active one
    // until the switch: they flow before a replay starts, and the log grows
    // while it runs.
    let workload = world.start_workload(world.workload(0, 300, 1));
    let replay = || {
        projections::replay::replay_graph_into(
            &world.store,
            &world.nats.client,
            world.graph.model.config().clone(),
            &world.graph.http,
            100,
            |_| {},
        )
    };
    let replay_under_load = |after: i64| {
        let replay = &replay;
        let world = &world;
        let workload = &workload;
        async move {
            let started = world.pipe.head_beyond(after).await;
            let summary = replay().await.unwrap();
            let ended = world.store.head().await.unwrap().written;
            assert!(
                ended > started && workload.is_running(),
                "no command landed during the replay (head {started} → {ended})"
            );
            (summary, ended)
        }
    };
    let (first, ended) = replay_under_load(built).await;
    assert_eq!(first.previous.as_deref(), Some(home.as_str()));
    assert!(first.generation.starts_with(&format!("{home}-g")));
    assert!(first.deleted_keys > 0, "the home database was not emptied");

    // The live projector followed the pointer and keeps the new database
    // current.
    world.pipe.caught_up_to(&world.graph.model, ended).await;
    assert_eq!(
        world.graph.model.database(Duration::ZERO).await.unwrap(),
        first.generation
    );
    let mut rows = world
        .graph
        .model
        .graph()
        .execute_on(
            &home,
            query("MATCH (n) WHERE NOT n:ReadModel RETURN count(n) AS n"),
        )
        .await
        .unwrap();
    let left: i64 = rows.next().await.unwrap().unwrap().get("n").unwrap();
    assert_eq!(left, 0, "nodes left in the abandoned home namespace");

    // A second replay, commands still flowing, replaces the first database
    // and drops it.
    let (second, _) = replay_under_load(ended).await;
    assert_eq!(second.previous.as_deref(), Some(first.generation.as_str()));
    let (_, listed) = projections::graph::admin::server_command(
        &world.graph.http,
        "root",
        &world.graph.model.config().password,
        "list databases",
    )
    .await
    .unwrap();
    assert!(listed.contains(&second.generation), "{listed}");
    assert!(!listed.contains(&first.generation), "not dropped: {listed}");
    workload.stop().await;
    let until = world.assert_verified().await;
    assert_eq!(
        world.graph.model.database(Duration::ZERO).await.unwrap(),
        second.generation
    );
    stop.cancel();
    task.await.unwrap().unwrap();
    world
        .assert_clean_pass_equal("the graph after two replays", until)
        .await;
    world.shutdown().await;
}
