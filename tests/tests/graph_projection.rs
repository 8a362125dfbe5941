//! The graph projection against real PostgreSQL, JetStream and the graph
//! server (ArcadeDB over Bolt): built from a simulated workload and verified
//! (and caught out when tampered with), killed mid-batch, wiped with its
//! consumer, and fed redeliveries.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use commands::EventStore;
use neo4rs::query;
use neurectomy_e2e::pipeline::Pipeline;
use projections::graph_testkit::TestGraph;
use projections::verify::{verify_graph, Difference};
use projections::{GraphModel, Projected, Projector, ReadModel};

/// The pipeline plus a graph database of the test's own.
struct World {
    pipe: Pipeline,
    graph: TestGraph,
}

impl std::ops::Deref for World {
    type Target = Pipeline;
    fn deref(&self) -> &Pipeline {
        &self.pipe
    }
}

async fn world() -> World {
    let pipe = Pipeline::start().await;
    let graph = TestGraph::create().await.unwrap_or_else(|e| panic!("{e}"));
    World { pipe, graph }
}

/// Runs one Cypher write in its own transaction.
async fn write(model: &GraphModel, cypher: &str) {
    let mut txn = model.graph().start_txn().await.unwrap();
    txn.run(query(cypher)).await.unwrap();
    txn.commit().await.unwrap();
}

/// Every event up to `until`, decoded.
async fn events(store: &EventStore, until: i64) -> Vec<Projected> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let batch = store.read_all(after, 1_000).await.unwrap();
        let Some(last) = batch.last().map(|e| e.position) else {
            return out;
        };
        out.extend(
            batch
                .into_iter()
                .take_while(|recorded| recorded.position <= until)
                .map(|recorded| {
                    let event = recorded.decode().unwrap();
                    Projected::new(recorded, event)
                }),
        );
        if last >= until {
            return out;
        }
        after = last;
    }
}

fn report(differences: &[Difference]) -> String {
    format!(
        "{} difference(s) between the events and the graph, e.g.:\n{}",
        differences.len(),
        differences
            .iter()
            .take(10)
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    )
}

impl World {
    /// A projector on a model of its own (its own Bolt pool).
    async fn projector(&self) -> Arc<Projector<GraphModel>> {
        let model = GraphModel::connect(self.graph.model.config().clone())
            .await
            .unwrap();
        self.pipe.projector(model)
    }

    async fn simulate(&self, seconds: u64, seed: u64) {
        self.pipe
            .simulate(Pipeline::workload(seconds, 400, seed))
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
        assert!(differences.is_empty(), "{}", report(&differences));
        until
    }

    /// The graph built from the events up to `until` in one clean pass (the
    /// catch-up path: batches of the projector's size) into a database of
    /// its own.
    async fn clean_pass(&self, until: i64) -> TestGraph {
        let clean = TestGraph::create().await.unwrap_or_else(|e| panic!("{e}"));
        for batch in events(&self.store, until).await.chunks(200) {
            clean.model.apply(batch).await.unwrap();
        }
        clean
    }

    async fn shutdown(self) {
        self.pipe.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulated_workload_verifies_clean_and_redelivery_changes_nothing() {
    let world = world().await;
    let projector = world.projector().await;
    let (stop, task) = world.spawn(&projector);
    world.simulate(3, 11).await;
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
    let all = events(&world.store, until).await;
    // The workload exercises the assignee edge's every move.
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
async fn a_projector_killed_mid_batch_recovers_to_the_same_graph() {
    let world = world().await;
    let workload = world.spawn_simulation(Pipeline::workload(4, 500, 5));
    // One projector (one Bolt pool) throughout: its runs are dropped
    // mid-flight, leaving their connections to the pool as they are.
    let projector = world.projector().await;
    for round in 0..12u64 {
        // Down for a while (a backlog builds up), then up for a varied
        // moment: mostly inside a catch-up batch's transaction (a batch of
        // 200 takes longer than most of these), sometimes between its commit
        // and the next one, or while live.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (_, task) = world.spawn(&projector);
        tokio::time::sleep(Duration::from_millis(5 + round * 17)).await;
        task.abort();
        let _ = task.await;
    }
    workload.await.unwrap();
    let (stop, task) = world.spawn(&projector);
    let until = world.assert_verified().await;
    stop.cancel();
    task.await.unwrap().unwrap();

    let clean = world.clean_pass(until).await;
    let (recovered, reference) = (
        world.graph.dump().await.unwrap(),
        clean.dump().await.unwrap(),
    );
    assert_eq!(recovered.len(), reference.len());
    assert_eq!(
        recovered, reference,
        "the recovered graph differs from one built in one pass"
    );
    world.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_graph_and_a_deleted_consumer_are_rebuilt() {
    let world = world().await;
    let projector = world.projector().await;
    let (stop, task) = world.spawn(&projector);
    world.simulate(2, 3).await;
    world.assert_verified().await;
    stop.cancel();
    task.await.unwrap().unwrap();
    let before = world.graph.dump().await.unwrap();

    write(&world.graph.model, "MATCH (n) DETACH DELETE n").await;
    assert_eq!(world.graph.model.checkpoint().await.unwrap(), 0);
    let js = world.nats.jetstream();
    let stream = js.get_stream(&world.nats.relay.stream_name).await.unwrap();
    stream.delete_consumer("projection-graph").await.unwrap();
    let (stop, task) = world.spawn(&projector);
    world.assert_verified().await;
    stop.cancel();
    task.await.unwrap().unwrap();
    let after = world.graph.dump().await.unwrap();
    assert_eq!(before.len(), after.len());
    assert_eq!(before, after, "the rebuilt graph differs");
    world.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_while_commands_flow_switches_to_a_database_with_the_live_state() {
    let world = world().await;
    let projector = world.projector().await;
    let (stop, task) = world.spawn(&projector);
    world.simulate(2, 31).await;
    world.caught_up().await;
    let home = world.graph.database.clone();

    // Commands keep flowing while the replay builds a new database; the
    // live projector keeps serving from the home database until the switch.
    let workload = world.spawn_simulation(neurectomy_e2e::pipeline::Pipeline::workload(3, 300, 32));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let replay = |show| {
        api::replay::replay_graph_into(
            &world.store,
            &world.nats.client,
            world.graph.model.config().clone(),
            &world.graph.http,
            100,
            show,
        )
    };
    let first = replay(false).await.unwrap();
    assert_eq!(first.previous.as_deref(), Some(home.as_str()));
    assert!(first.generation.starts_with(&format!("{home}-g")));
    assert!(first.deleted_keys > 0, "the home database was not emptied");
    workload.await.unwrap();

    // The live projector followed the pointer and kept the new one current.
    world.assert_verified().await;
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

    // A second replay replaces the first database and drops it.
    let second = replay(false).await.unwrap();
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
    let until = world.assert_verified().await;
    stop.cancel();
    task.await.unwrap().unwrap();
    let clean = world.clean_pass(until).await;
    assert_eq!(
        world.graph.dump().await.unwrap(),
        clean.dump().await.unwrap()
    );
    world.shutdown().await;
}
