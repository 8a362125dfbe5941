//! `verify` while the projectors run: a simulated workload keeps both read
//! models moving (through the real command handler, relay and projectors)
//! while verification runs again and again, as `neurectomy verify` does.
//! None of the runs may report a difference, and tampered Redis fields (a
//! task's, a workflow's counter) and a tampered graph node are still found.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use api::simulate::SimulateArgs;
use commands::testkit::eventually;
use commands::{CommandHandler, HandlerConfig};
use neo4rs::query;
use neurectomy_e2e::pipeline::Pipeline;
use projections::graph_testkit::TestGraph;
use projections::testkit::TestRedis;
use projections::verify::{verify_graph_confirmed, verify_redis_confirmed, Confirmed};
use projections::GraphModel;
use tokio_util::sync::CancellationToken;

/// Verification runs per read model.
const RUNS: usize = 20;
/// Commands per second of the workload.
const RATE: u32 = 60;

/// The workload's seed: `NEURECTOMY_TEST_SEED`, or a random one (logged, so
/// a failing run can be repeated).
fn seed() -> u64 {
    let seed = std::env::var("NEURECTOMY_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| (uuid::Uuid::new_v4().as_u128() as u64) | 1);
    eprintln!("workload seed {seed} (NEURECTOMY_TEST_SEED={seed} repeats it)");
    seed
}

struct World {
    pipe: Pipeline,
    redis: TestRedis,
    graph: TestGraph,
}

impl World {
    /// One run of `neurectomy verify` against Redis.
    async fn verify_redis(&self) -> Confirmed {
        verify_redis_confirmed(&self.pipe.store, &self.redis.model)
            .await
            .unwrap()
    }

    /// One run of `neurectomy verify` against the graph.
    async fn verify_graph(&self) -> Confirmed {
        verify_graph_confirmed(&self.pipe.store, &self.graph.model)
            .await
            .unwrap()
    }
}

/// What a run found, for the report.
fn describe(model: &str, run: usize, found: &Confirmed) -> String {
    let mut out = format!(
        "{model} run {run}: up to {}: {} confirmed, {} seen once, {} skipped",
        found.until,
        found.differences.len(),
        found.transient,
        found.skipped
    );
    for d in found.differences.iter().take(3) {
        out.push_str(&format!("\n    {d}"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_under_a_live_workload_reports_nothing_false_and_still_finds_tampering() {
    let seed = seed();
    let pipe = Pipeline::start().await;
    let redis = TestRedis::create().await.unwrap_or_else(|e| panic!("{e}"));
    let graph = TestGraph::create().await.unwrap_or_else(|e| panic!("{e}"));
    let projectors = [
        pipe.spawn(&pipe.projector(redis.model.clone())),
        pipe.spawn(
            &pipe.projector(
                GraphModel::connect(graph.model.config().clone())
                    .await
                    .unwrap(),
            ),
        ),
    ];
    let world = World { pipe, redis, graph };

    // The workload runs until the test stops it.
    let stop_workload = CancellationToken::new();
    let workload = tokio::spawn(api::simulate::drive(
        CommandHandler::new(world.pipe.store.clone(), HandlerConfig::default()),
        SimulateArgs {
            agents: 16,
            workflows: 4,
            tasks_per_workflow: 6,
            rate: RATE,
            duration: 0,
            tenant: "acme".to_owned(),
            tenants: 1,
            seed,
        },
        stop_workload.clone(),
    ));
    // Something to tamper with later: a completed workflow (its tasks are
    // completed too and take no more events) in both read models.
    let (task, workflow) = eventually(
        "a completed workflow in both read models",
        Duration::from_secs(90),
        || async {
            let mut rows = world
                .graph
                .model
                .graph()
                .execute(query(
                    "MATCH (t:Task)-[:PART_OF]->(w:Workflow {status: 'completed'}) \
                     RETURN t.id AS task, w.id AS workflow ORDER BY task LIMIT 1",
                ))
                .await
                .ok()?;
            let row = rows.next().await.ok()??;
            let (task, workflow): (String, String) =
                (row.get("task").ok()?, row.get("workflow").ok()?);
            let status: Option<String> = redis::cmd("HGET")
                .arg(world.redis.model.key(&format!("workflow:{workflow}")))
                .arg("status")
                .query_async(&mut world.redis.model.connection())
                .await
                .ok()?;
            (status.as_deref() == Some("completed")).then_some((task, workflow))
        },
    )
    .await;

    // Verification runs while the read models move.
    let started = Instant::now();
    let mut failures = Vec::new();
    let mut moving = 0;
    let mut skipped = [0, 0];
    for run in 0..RUNS {
        let before = world.pipe.store.head().await.unwrap().written;
        let found = world.verify_redis().await;
        eprintln!("{}", describe("redis", run, &found));
        skipped[0] += found.skipped;
        if !found.differences.is_empty() || found.transient > 0 {
            failures.push(describe("redis", run, &found));
        }
        let found = world.verify_graph().await;
        eprintln!("{}", describe("graph", run, &found));
        skipped[1] += found.skipped;
        if !found.differences.is_empty() || found.transient > 0 {
            failures.push(describe("graph", run, &found));
        }
        if world.pipe.store.head().await.unwrap().written > before {
            moving += 1;
        }
    }
    eprintln!(
        "{RUNS} runs per model in {:?}; the log grew during {moving} of them; \
         skipped as changed after the compared position: {} Redis hashes, {} graph nodes",
        started.elapsed(),
        skipped[0],
        skipped[1]
    );
    // The runs raced the projectors: the log grew while they read, and each
    // model had entities to skip as changed after the compared position.
    assert!(
        moving >= RUNS / 2,
        "the workload stalled: the log grew during only {moving} of {RUNS} runs"
    );
    assert!(
        skipped.iter().all(|&s| s > 0),
        "no run of one model skipped anything ({skipped:?}): it did not race its projector"
    );
    assert!(
        failures.is_empty(),
        "{} of {} runs reported a difference on healthy read models (seed {seed}):\n{}",
        failures.len(),
        2 * RUNS,
        failures.join("\n")
    );

    // Tampering is still found while the workload runs, and only it.
    let task_key = world.redis.model.key(&format!("task:{task}"));
    let workflow_key = world.redis.model.key(&format!("workflow:{workflow}"));
    let _: () = redis::pipe()
        .cmd("HSET")
        .arg(&task_key)
        .arg("progress")
        .arg("13")
        .cmd("HSET")
        .arg(&workflow_key)
        .arg("tasks_total")
        .arg("99")
        .query_async(&mut world.redis.model.connection())
        .await
        .unwrap();
    let mut txn = world.graph.model.graph().start_txn().await.unwrap();
    txn.run(query(&format!(
        "MATCH (t:Task {{id: '{task}'}}) SET t.state = 'bogus'"
    )))
    .await
    .unwrap();
    txn.commit().await.unwrap();
    let before = world.pipe.store.head().await.unwrap().written;
    let found = world.verify_redis().await;
    let found: Vec<_> = found
        .differences
        .iter()
        .map(|d| (d.key.as_str(), d.field.as_str(), d.actual.as_str()))
        .collect();
    assert_eq!(
        found,
        [
            (task_key.as_str(), "progress", "13"),
            (workflow_key.as_str(), "tasks_total", "99")
        ]
    );
    let found = world.verify_graph().await;
    let node = format!("Task {task}");
    let found: Vec<_> = found
        .differences
        .iter()
        .map(|d| (d.key.as_str(), d.field.as_str(), d.actual.as_str()))
        .collect();
    assert_eq!(found, [(node.as_str(), "state", "bogus")]);
    assert!(
        world.pipe.store.head().await.unwrap().written > before,
        "the workload stopped before the tampering was checked"
    );

    stop_workload.cancel();
    workload.await.unwrap().unwrap();
    for (stop, task) in projectors {
        stop.cancel();
        task.await.unwrap().unwrap();
    }
    world.pipe.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_spreads_its_work_over_tenants_with_a_skew() {
    let pipe = Pipeline::start().await;
    pipe.simulate(SimulateArgs {
        agents: 16,
        workflows: 8,
        tasks_per_workflow: 4,
        rate: 0,
        duration: 3,
        tenant: "skew".to_owned(),
        tenants: 8,
        seed: 11,
    })
    .await;
    let counts: Vec<(String, i64)> =
        sqlx::query_as("SELECT tenant, count(*) FROM events GROUP BY tenant ORDER BY tenant")
            .fetch_all(&pipe.db.pool)
            .await
            .unwrap();
    let names: Vec<&str> = counts.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        names,
        (1..=8).map(|k| format!("skew-0{k}")).collect::<Vec<_>>(),
        "every tenant has events, and only they: {counts:?}"
    );
    let total: i64 = counts.iter().map(|(_, n)| n).sum();
    let (first, last) = (counts[0].1, counts[7].1);
    // Shares 1/k of 2.72: the first ~37 %, the last ~5 % (beside the equal
    // share of registrations).
    assert!(
        first * 8 > total * 2 && first > 3 * last,
        "the first tenant must carry the most: {counts:?}"
    );
    pipe.shutdown().await;
}
