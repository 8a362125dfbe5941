//! A projection consumed one partition at a time (`commands::partition`):
//! on a stream of four partitions, four Redis projectors — each reading only
//! its partition of the store, consuming only its partition's subjects and
//! following the relay's chain of positions, with a checkpoint of its own —
//! are killed mid-flow and started again while commands of six tenants
//! flow; together they build exactly what one projector of the whole log
//! builds. And two processes of partition projectors under leases share
//! the partitions fairly (a joining one takes its half, the survivor of a
//! kill takes the rest), building the same.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use api::simulate::SimulateArgs;
use commands::testkit::eventually;
use neurectomy_e2e::pipeline::{Pipeline, Running};
use neurectomy_e2e::read_side::{self, assert_same_redis};
use projections::testkit::TestRedis;
use projections::{LeaseConfig, Leases, Projector, ProjectorConfig, ReadModel as _, RedisModel};

const PARTITIONS: u32 = 4;

/// A projector of partition `partition` on `model`.
fn partition_projector(
    pipe: &Pipeline,
    model: &RedisModel,
    partition: u32,
) -> Projector<RedisModel> {
    Projector::new(
        model.for_partition(partition),
        pipe.store.clone(),
        pipe.nats.client.clone(),
        ProjectorConfig {
            stream_name: pipe.nats.relay.stream_name.clone(),
            batch_size: 50,
            partitions: PARTITIONS,
            partition,
            ..ProjectorConfig::default()
        },
    )
}

/// Waits until each of `projectors` (partition k the k-th) has applied its
/// partition's last event at or below `head`; returns how many partitions
/// have events.
async fn partitions_reach(
    pipe: &Pipeline,
    projectors: &[Arc<Projector<RedisModel>>],
    head: i64,
) -> usize {
    let mut with_events = 0;
    for (k, projector) in projectors.iter().enumerate() {
        let k = u32::try_from(k).unwrap();
        let last = pipe
            .store
            .last_in_partition(head, PARTITIONS, k)
            .await
            .unwrap();
        with_events += usize::from(last > 0);
        let model = projector.model().clone();
        eventually(
            &format!("partition {k} to reach {last}"),
            Duration::from_secs(60),
            || {
                let model = model.clone();
                async move { (model.checkpoint().await.unwrap() >= last).then_some(()) }
            },
        )
        .await;
    }
    with_events
}

/// A dump of the model without its checkpoints (one per partition here, one
/// for the whole log in a clean rebuild).
async fn without_checkpoints(redis: &TestRedis) -> BTreeMap<String, String> {
    let mut dump = redis.dump_model().await.unwrap();
    dump.retain(|key, _| !key.starts_with("checkpoint"));
    dump
}

/// Waits until the log holds at least `events` events; returns the head.
async fn events_beyond(pipe: &Pipeline, events: i64) -> i64 {
    let store = &pipe.store;
    eventually(
        &format!("the log to hold {events} events"),
        Duration::from_secs(120),
        || async move { (store.count_after(0, events).await.unwrap() >= events).then_some(()) },
    )
    .await;
    pipe.head().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_partition_projectors_killed_mid_flow_build_what_one_builds() {
    let seed = read_side::seed("four_partition_projectors_killed_mid_flow");
    let pipe = Pipeline::start_with(|relay| relay.partitions = PARTITIONS).await;
    let redis = TestRedis::create().await.unwrap_or_else(|e| panic!("{e}"));
    let workload = pipe.start_workload(SimulateArgs {
        // Enough agents per tenant that no tenant's workflows wait long
        // for a capable one: the log grows all along.
        agents: 96,
        tenants: 6,
        ..Pipeline::workload(0, 300, seed)
    });

    let projectors: Vec<_> = (0..PARTITIONS)
        .map(|k| Arc::new(partition_projector(&pipe, &redis.model, k)))
        .collect();
    let running: Vec<Running> = projectors.iter().map(|p| pipe.spawn(p)).collect();
    // Each partition with events applies them, live; then every projector
    // is killed (its task aborted) mid-flow.
    let head = events_beyond(&pipe, 1_200).await;
    partitions_reach(&pipe, &projectors, head).await;
    for (_, task) in running {
        task.abort();
    }
    // Started again while commands still flow: each resumes from its own
    // checkpoint.
    events_beyond(&pipe, 1_800).await;
    let projectors: Vec<_> = (0..PARTITIONS)
        .map(|k| Arc::new(partition_projector(&pipe, &redis.model, k)))
        .collect();
    let running: Vec<Running> = projectors.iter().map(|p| pipe.spawn(p)).collect();
    events_beyond(&pipe, 3_000).await;
    workload.stop().await;

    let head = pipe.head().await;
    let with_events = partitions_reach(&pipe, &projectors, head).await;
    for (k, projector) in projectors.iter().enumerate() {
        let status = projector.status().borrow().clone();
        assert!(
            status.applied > 0 || status.checkpoint == 0,
            "partition {k}: {status:?}"
        );
        // Live, the chain of positions matched message after message: no
        // trip back to the store for a gap that was not there.
        assert_eq!(status.gaps, 0, "partition {k}: {status:?}");
        assert_eq!(
            status.state,
            projections::ProjectorState::Live,
            "{status:?}"
        );
        // Its durable consumer takes the partition's subjects only.
        let js = async_nats::jetstream::new(pipe.nats.client.clone());
        let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
            .get_stream(&pipe.nats.relay.stream_name)
            .await
            .unwrap()
            .get_consumer(&format!("projection-redis-p{k}"))
            .await
            .unwrap();
        assert_eq!(
            consumer.info().await.unwrap().config.filter_subject,
            format!("{}.p{k}.>", pipe.nats.relay.subject_prefix)
        );
    }
    assert!(
        with_events >= 2,
        "six tenants over four partitions: {with_events} with events"
    );
    let clean = read_side::redis_rebuilt(&pipe.store, head).await;
    assert_same_redis(
        "four partitions against one projector of the whole log",
        &without_checkpoints(&redis).await,
        &without_checkpoints(&clean).await,
    );
    for (stop, task) in running {
        stop.cancel();
        task.await.unwrap().unwrap();
    }
    pipe.shutdown().await;
}

/// One `project` process of the test: its partition projectors under its
/// leases, and its membership.
struct Process {
    leases: Leases,
    membership: tokio::task::JoinHandle<()>,
    projectors: Vec<Arc<Projector<RedisModel>>>,
    running: Vec<Running>,
}

impl Process {
    async fn start(pipe: &Pipeline, redis: &TestRedis, owner: &str) -> Self {
        let leases = Leases::new(
            pipe.db.pool.clone(),
            format!("{}/redis", pipe.nats.relay.stream_name),
            LeaseConfig {
                ttl: Duration::from_millis(900),
                owner: owner.to_owned(),
            },
        )
        .with_partitions(PARTITIONS);
        let membership = tokio::spawn({
            let (leases, stop) = (leases.clone(), pipe.stop.child_token());
            async move { leases.keep_membership(stop).await }
        });
        // A connection of its own, as another process has.
        let model = RedisModel::connect(
            &redis.url,
            projections::RedisModelConfig {
                prefix: redis.prefix.clone(),
                ..projections::RedisModelConfig::default()
            },
        )
        .await
        .unwrap();
        let projectors: Vec<_> = (0..PARTITIONS)
            .map(|k| Arc::new(partition_projector(pipe, &model, k).with_leases(leases.clone())))
            .collect();
        let running = projectors.iter().map(|p| pipe.spawn(p)).collect();
        Self {
            leases,
            membership,
            projectors,
            running,
        }
    }

    /// Killed: every task aborted, nothing released or left.
    fn kill(self) {
        self.membership.abort();
        for (_, task) in self.running {
            task.abort();
        }
    }
}

/// Waits until the live leases are held as `shares` says (owner, count);
/// returns how long it took.
async fn shares(pipe: &Pipeline, leases: &Leases, shares: &[(&str, usize)]) -> Duration {
    let started = std::time::Instant::now();
    eventually(
        &format!("the partitions to be held {shares:?}"),
        Duration::from_secs(60),
        || async {
            let holders = leases.holders().await.ok()?;
            let held = |owner: &str| {
                holders
                    .iter()
                    .filter(|h| h.live && h.owner == owner)
                    .count()
            };
            shares
                .iter()
                .all(|(owner, count)| held(owner) == *count)
                .then_some(())
        },
    )
    .await;
    let _ = pipe;
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_share_the_partitions_fairly_and_take_over_a_killed_ones_share() {
    let seed = read_side::seed("processes_share_the_partitions_fairly");
    let pipe = Pipeline::start_with(|relay| relay.partitions = PARTITIONS).await;
    let redis = TestRedis::create().await.unwrap_or_else(|e| panic!("{e}"));
    let workload = pipe.start_workload(SimulateArgs {
        agents: 96,
        tenants: 6,
        ..Pipeline::workload(0, 300, seed)
    });

    // Alone, a process takes every partition.
    let a = Process::start(&pipe, &redis, "process-a").await;
    shares(&pipe, &a.leases, &[("process-a", 4)]).await;
    events_beyond(&pipe, 1_000).await;
    // A second one joins: each ends with two.
    let b = Process::start(&pipe, &redis, "process-b").await;
    let joined = shares(&pipe, &a.leases, &[("process-a", 2), ("process-b", 2)]).await;
    events_beyond(&pipe, 2_000).await;
    // The first is killed: the second takes its share.
    a.kill();
    let taken = shares(&pipe, &b.leases, &[("process-b", 4)]).await;
    println!(
        "join → fair shares: {joined:?}; kill → the survivor holds every partition: {taken:?}"
    );
    events_beyond(&pipe, 3_000).await;
    workload.stop().await;

    let head = pipe.head().await;
    partitions_reach(&pipe, &b.projectors, head).await;
    let clean = read_side::redis_rebuilt(&pipe.store, head).await;
    assert_same_redis(
        "partitions moved between processes against one projector of the whole log",
        &without_checkpoints(&redis).await,
        &without_checkpoints(&clean).await,
    );
    for (stop, task) in b.running {
        stop.cancel();
        task.await.unwrap().unwrap();
    }
    b.membership.abort();
    pipe.shutdown().await;
}
