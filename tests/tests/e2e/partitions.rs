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
use std::time::{Duration, Instant};

use api::auth::Role;
use api::simulate::SimulateArgs;
use commands::testkit::eventually;
use neurectomy_e2e::api::TestApi;
use neurectomy_e2e::instance::Instance;
use neurectomy_e2e::pipeline::{Pipeline, Running};
use neurectomy_e2e::read_side::{self, assert_same_redis};
use projections::graph_testkit::TestGraph;
use projections::testkit::TestRedis;
use projections::{
    GraphModel, LeaseConfig, Leases, Projector, ProjectorConfig, ReadModel, RedisModel,
};
use serde_json::{json, Value};

const PARTITIONS: u32 = 4;

/// A projector of partition `partition` on `model`.
fn partition_projector(
    pipe: &Pipeline,
    model: &RedisModel,
    partition: u32,
) -> Projector<RedisModel> {
    partition_projector_of(pipe, model.for_partition(partition), partition)
}

/// A projector of partition `partition` applying `model` (that partition's).
fn partition_projector_of<M: ReadModel>(pipe: &Pipeline, model: M, partition: u32) -> Projector<M> {
    Projector::new(
        model,
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
async fn partitions_reach<M: ReadModel + Clone>(
    pipe: &Pipeline,
    projectors: &[Arc<Projector<M>>],
    head: i64,
) -> usize {
    let models = projectors.iter().map(|p| p.model().clone()).collect();
    models_reach(pipe, models, head).await
}

/// Waits until each of `models` (partition k's the k-th) has applied its
/// partition's last event at or below `head`; returns how many partitions
/// have events.
async fn models_reach<M: ReadModel + Clone>(pipe: &Pipeline, models: Vec<M>, head: i64) -> usize {
    let mut with_events = 0;
    for (k, model) in (0u32..).zip(models) {
        let last = pipe
            .store
            .last_in_partition(head, PARTITIONS, k)
            .await
            .unwrap();
        with_events += usize::from(last > 0);
        // Generous: on a busy CI machine a partition restarted mid-flow
        // first catches up its share of the log from the store.
        eventually(
            &format!("{} partition {k} to reach {last}", model.name()),
            Duration::from_secs(120),
            || {
                let model = model.clone();
                async move { (model.checkpoint().await.ok()? >= last).then_some(()) }
            },
        )
        .await;
    }
    with_events
}

/// Fails unless each of `projectors` (partition k the k-th), resumed from
/// `resumed_from[k]`, applied exactly its partition's events up to `head`
/// — none again, none skipped (a partition of a small tenant may have had
/// none meanwhile) —, is live and found no gap (the chain of positions
/// matched message after message), and has a durable consumer of its
/// partition's subjects only.
async fn each_applied_exactly_its_partition<M: ReadModel>(
    pipe: &Pipeline,
    projectors: &[Arc<Projector<M>>],
    resumed_from: &[i64],
    head: i64,
) {
    let js = async_nats::jetstream::new(pipe.nats.client.clone());
    for (k, projector) in projectors.iter().enumerate() {
        let status = projector.status().borrow().clone();
        let expected = partition_events_between(pipe, k, resumed_from[k], head).await;
        assert_eq!(
            status.applied, expected,
            "partition {k} from {}: {status:?}",
            resumed_from[k]
        );
        assert_eq!(status.gaps, 0, "partition {k}: {status:?}");
        assert_eq!(
            status.state,
            projections::ProjectorState::Live,
            "{status:?}"
        );
        let name = projector.model().name();
        assert_eq!(status.name, format!("{name}/p{k}"));
        let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
            .get_stream(&pipe.nats.relay.stream_name)
            .await
            .unwrap()
            .get_consumer(&format!("projection-{name}-p{k}"))
            .await
            .unwrap();
        assert_eq!(
            consumer.info().await.unwrap().config.filter_subject,
            format!("{}.p{k}.>", pipe.nats.relay.subject_prefix)
        );
    }
}

/// How many events of partition `partition` lie in `(after, head]`.
async fn partition_events_between(pipe: &Pipeline, partition: usize, after: i64, head: i64) -> u64 {
    let partition = u32::try_from(partition).unwrap();
    let (mut count, mut at) = (0, after);
    loop {
        let page = pipe
            .store
            .read_partition(at, 1_000, PARTITIONS, partition)
            .await
            .unwrap();
        let within = page.iter().take_while(|e| e.position <= head).count();
        count += within as u64;
        match page.get(within) {
            None if page.len() == 1_000 => at = page[999].position,
            _ => return count,
        }
    }
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

/// 300 commands/s of six tenants, with enough agents per tenant that no
/// tenant's workflows wait long for a capable one: the log grows all along.
fn six_tenants(pipe: &Pipeline, seed: u64) -> neurectomy_e2e::pipeline::Workload {
    pipe.start_workload(SimulateArgs {
        agents: 96,
        tenants: 6,
        ..Pipeline::workload(0, 300, seed)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_partition_projectors_killed_mid_flow_build_what_one_builds() {
    let seed = read_side::seed("four_partition_projectors_killed_mid_flow");
    let pipe = Pipeline::start_with(|relay| relay.partitions = PARTITIONS).await;
    let redis = TestRedis::create().await.unwrap_or_else(|e| panic!("{e}"));
    let workload = six_tenants(&pipe, seed);

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
    // checkpoint (read once the aborted tasks' last writes have landed).
    events_beyond(&pipe, 1_800).await;
    let mut resumed_from = Vec::new();
    for k in 0..PARTITIONS {
        let model = redis.model.for_partition(k);
        resumed_from.push(model.checkpoint().await.unwrap());
    }
    let projectors: Vec<_> = (0..PARTITIONS)
        .map(|k| Arc::new(partition_projector(&pipe, &redis.model, k)))
        .collect();
    let running: Vec<Running> = projectors.iter().map(|p| pipe.spawn(p)).collect();
    events_beyond(&pipe, 3_000).await;
    workload.stop().await;

    let head = pipe.head().await;
    let with_events = partitions_reach(&pipe, &projectors, head).await;
    each_applied_exactly_its_partition(&pipe, &projectors, &resumed_from, head).await;
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

/// The graph in four partitions, as the Redis model above: four graph
/// projectors — each reading only its partition of the store and consuming
/// only its partition's subjects, with a checkpoint node of its own
/// (`graph/p<k>`) written in the transaction of its batch — run side by
/// side on one graph database, are killed mid-flow and started again while
/// commands of six tenants flow; each applies exactly its partition's
/// events, and together they build the graph one projector of the whole log
/// builds. `verify` compares each partition at its own checkpoint, and a
/// replay rebuilds the partitions side by side into a new database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_graph_partition_projectors_killed_mid_flow_build_what_one_builds() {
    let seed = read_side::seed("four_graph_partition_projectors_killed_mid_flow");
    let pipe = Pipeline::start_with(|relay| relay.partitions = PARTITIONS).await;
    let graph = TestGraph::create_partitioned(PARTITIONS)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let workload = six_tenants(&pipe, seed);
    let start = |graph: &GraphModel| -> (Vec<Arc<Projector<GraphModel>>>, Vec<Running>) {
        let projectors: Vec<_> = (0..PARTITIONS)
            .map(|k| Arc::new(partition_projector_of(&pipe, graph.for_partition(k), k)))
            .collect();
        let running = projectors.iter().map(|p| pipe.spawn(p)).collect();
        (projectors, running)
    };
    // Each run on Bolt connections of its own, as a process has: a task
    // aborted mid-transaction leaves its connection in the pool with the
    // transaction open, which a process killed would not (its connections
    // close and the server rolls back).
    let connect = || async {
        GraphModel::connect(graph.model.config().clone())
            .await
            .unwrap()
    };
    let (projectors, running) = start(&connect().await);
    let head = events_beyond(&pipe, 1_200).await;
    partitions_reach(&pipe, &projectors, head).await;
    for (_, task) in running {
        task.abort();
    }
    drop(projectors);
    events_beyond(&pipe, 1_800).await;
    let mut resumed_from = Vec::new();
    for k in 0..PARTITIONS {
        resumed_from.push(graph.model.for_partition(k).checkpoint().await.unwrap());
    }
    let (projectors, running) = start(&connect().await);
    events_beyond(&pipe, 3_000).await;
    // Verified while the partitions apply, each at its own checkpoint.
    let found = projections::verify::verify_graph_confirmed(&pipe.store, &graph.model)
        .await
        .unwrap();
    assert!(found.differences.is_empty(), "{:?}", found.differences);
    workload.stop().await;

    let head = pipe.head().await;
    let with_events = partitions_reach(&pipe, &projectors, head).await;
    assert!(with_events >= 2, "{with_events} partitions with events");
    each_applied_exactly_its_partition(&pipe, &projectors, &resumed_from, head).await;
    // Each partition's checkpoint is its last event; readers of a tenant
    // wait for the tenant's partition; the lowest is the model's.
    let each = graph.model.partition_checkpoints().await.unwrap();
    for (k, checkpoint) in each.iter().enumerate() {
        let last = pipe
            .store
            .last_in_partition(head, PARTITIONS, u32::try_from(k).unwrap())
            .await
            .unwrap();
        assert_eq!(checkpoint.unwrap_or(0), last, "partition {k}");
    }
    let lowest = each.iter().map(|c| c.unwrap_or(0)).min().unwrap();
    assert_eq!(graph.model.read_checkpoint().await.unwrap(), lowest);
    let verified = projections::verify::verify_graph(&pipe.store, &graph.model, head)
        .await
        .unwrap();
    assert!(
        verified.differences.is_empty(),
        "{:?}",
        verified.differences
    );
    let clean = read_side::graph_rebuilt(&pipe.store, head).await;
    let without = |dump: Vec<String>| -> Vec<String> {
        dump.into_iter()
            .filter(|line| !line.contains("Checkpoint"))
            .collect()
    };
    let built = without(graph.dump().await.unwrap());
    read_side::assert_same_lines(
        "four graph partitions against one projector of the whole log",
        &built,
        &without(clean.dump().await.unwrap()),
    );
    for (stop, task) in running {
        stop.cancel();
        task.await.unwrap().unwrap();
    }

    // A replay rebuilds the partitions side by side into a new database,
    // each ending at its partition's last event.
    let replayed = projections::replay::replay_graph_into(
        &pipe.store,
        &pipe.nats.client,
        graph.model.config().clone(),
        &graph.http,
        500,
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(
        graph.model.database(Duration::ZERO).await.unwrap(),
        replayed.generation
    );
    assert_eq!(graph.model.partition_checkpoints().await.unwrap(), each);
    read_side::assert_same_lines(
        "four graph partitions replayed against the graph they replaced",
        &without(graph.dump().await.unwrap()),
        &built,
    );
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
    let workload = six_tenants(&pipe, seed);

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

/// Two tenants of different partitions of `partitions`.
fn tenants_apart(partitions: u32) -> (String, String) {
    let first = "tenant-0".to_owned();
    let home = commands::partition::of(&first, partitions);
    let other = (1..)
        .map(|i| format!("tenant-{i}"))
        .find(|t| commands::partition::of(t, partitions) != home)
        .unwrap();
    (first, other)
}

/// Registers an agent of the token's tenant; returns its id and the
/// position of its event.
async fn register(api: &TestApi, token: &str, name: &str) -> (String, i64) {
    let id = uuid::Uuid::new_v4().to_string();
    let data = api
        .data(
            token,
            &format!(
                "mutation {{ registerAgent(id: \"{id}\", name: \"{name}\", kind: LLM, model: \"m\", capabilities: [\"code\"]) {{ position }} }}"
            ),
            json!({}),
        )
        .await;
    let position = data["registerAgent"]["position"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    (id, position)
}

/// The API on read models projected in four partitions: a read (of Redis
/// or of the graph) waits for its tenant's partition only — even for a position of another partition,
/// on a partition with nothing after it — and `projectionStatus` and
/// `/readyz` follow each partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_wait_for_their_tenants_partition_and_status_shows_each_partition() {
    let api = TestApi::start_partitioned(PARTITIONS).await;
    let (a, b) = tenants_apart(PARTITIONS);
    let (token_a, token_b) = (
        api.token(&a, &[Role::Operator]),
        api.token(&b, &[Role::Operator]),
    );
    // `b` writes once, then `a` writes: `b`'s partition has nothing at or
    // after `a`'s position.
    let (agent_b, _) = register(&api, &token_b, "agent-b").await;
    let (agent_a, at) = register(&api, &token_a, "agent-a").await;
    let read = "query($a: ID!, $p: Position) { agent(id: $a, atLeastPosition: $p) { name } }";
    let data = api
        .data(&token_a, read, json!({ "a": agent_a, "p": at.to_string() }))
        .await;
    assert_eq!(data["agent"]["name"], "agent-a");
    // `b` asks for `a`'s position: its partition applied everything of its
    // own up to there, so it answers at once instead of waiting for a
    // position its partition never reaches (STALE after 5 s).
    let started = Instant::now();
    let data = api
        .data(&token_b, read, json!({ "a": agent_b, "p": at.to_string() }))
        .await;
    let took = started.elapsed();
    assert_eq!(data["agent"]["name"], "agent-b");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    // The graph likewise: `a` waits for its partition's graph projector to
    // apply its agent; `b`, asking for `a`'s position, is answered at once.
    let read =
        "query($a: ID!, $p: Position) { agentNeighbourhood(id: $a, atLeastPosition: $p) { id } }";
    let data = api
        .data(&token_a, read, json!({ "a": agent_a, "p": at.to_string() }))
        .await;
    assert_eq!(data["agentNeighbourhood"]["id"], json!(agent_a));
    let started = Instant::now();
    let data = api
        .data(&token_b, read, json!({ "a": agent_b, "p": at.to_string() }))
        .await;
    let took = started.elapsed();
    assert_eq!(data["agentNeighbourhood"]["id"], json!(agent_b));
    assert!(took < Duration::from_secs(2), "took {took:?}");

    // One entry per partition of each projection; every partition live,
    // its checkpoint the position of its last event, its lag 0.
    let expected: Vec<Value> = ["redis", "graph"]
        .iter()
        .flat_map(|p| (0..PARTITIONS).map(move |k| json!(format!("{p}/p{k}"))))
        .collect();
    let partition_a = commands::partition::of(&a, PARTITIONS);
    let status = eventually(
        "every projection to be live",
        Duration::from_secs(30),
        || async {
            let data = api
                .data(
                    &token_a,
                    "{ projectionStatus { name partition checkpoint lag state } }",
                    json!({}),
                )
                .await;
            let status = data["projectionStatus"].as_array().unwrap().clone();
            status
                .iter()
                .all(|p| p["state"] == "live" && p["lag"] == 0)
                .then_some(status)
        },
    )
    .await;
    let names: Vec<Value> = status.iter().map(|p| p["name"].clone()).collect();
    assert_eq!(names, expected);
    for projection in 0..2 {
        let of_a = &status[(projection * PARTITIONS + partition_a) as usize];
        assert_eq!(of_a["partition"], json!(partition_a));
        assert_eq!(of_a["checkpoint"], json!(at.to_string()), "{status:?}");
    }
    let ready: Value = eventually("/readyz to be ready", Duration::from_secs(30), || async {
        let body: Value = api
            .http
            .get(api.url("/readyz"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (body["ready"] == true).then_some(body)
    })
    .await;
    for k in 0..PARTITIONS {
        for projection in ["redis", "graph"] {
            assert_eq!(
                ready["projections"][format!("{projection}/p{k}")],
                "live",
                "{ready}"
            );
        }
    }
    api.shutdown().await;
}

/// `neurectomy project --only redis` with `NEURECTOMY_JETSTREAM_PARTITIONS`:
/// [`PARTITIONS`] partition projectors under leases (1 s ttl), sharing
/// fairly with the other processes.
fn project(pipe: &Pipeline, redis: &TestRedis, n: usize) -> Instance {
    let partitions = ("NEURECTOMY_JETSTREAM_PARTITIONS", PARTITIONS.to_string());
    crate::support::project(pipe, redis, (n, Duration::from_secs(1)), &[partitions])
}

/// Owners of the live leases, by pid, with how many each holds.
async fn held_by_pid(leases: &Leases) -> BTreeMap<u32, usize> {
    let mut held = BTreeMap::new();
    for holder in leases.holders().await.unwrap_or_default() {
        let pid = holder.owner.split(':').nth(1).and_then(|p| p.parse().ok());
        if let (true, Some(pid)) = (holder.live, pid) {
            *held.entry(pid).or_insert(0) += 1;
        }
    }
    held
}

/// Two `project` processes of `projection` on [`PARTITIONS`] partitions:
/// waits until each holds two, lets the log grow past 1,000 events,
/// SIGKILLs the first and waits until the second holds all four (asserted
/// within 5 s of the kill); returns the second and its pid.
async fn share_then_kill_one(
    pipe: &Pipeline,
    projection: &str,
    [mut first, second]: [Instance; 2],
) -> (Instance, u32) {
    let observer = Leases::new(
        pipe.db.pool.clone(),
        format!("{}/{projection}", pipe.nats.relay.stream_name),
        LeaseConfig::new(Duration::from_secs(1)),
    );
    let (first_pid, second_pid) = (first.child.id().unwrap(), second.child.id().unwrap());
    eventually(
        &format!("two processes to hold two {projection} partitions each"),
        Duration::from_secs(60),
        || async {
            let held = held_by_pid(&observer).await;
            (held.get(&first_pid) == Some(&2) && held.get(&second_pid) == Some(&2)).then_some(())
        },
    )
    .await;
    events_beyond(pipe, 1_000).await;
    first.child.kill().await.unwrap();
    let killed = Instant::now();
    eventually(
        &format!("the survivor to hold every {projection} partition"),
        Duration::from_secs(30),
        || async { (held_by_pid(&observer).await.get(&second_pid) == Some(&4)).then_some(()) },
    )
    .await;
    let taken = killed.elapsed();
    assert!(taken < Duration::from_secs(5), "took {taken:?}");
    (second, second_pid)
}

/// Real `project` processes on four partitions under load: two share them
/// two and two; one SIGKILLed, the other takes all four within seconds;
/// `status` shows each partition and its holder; `verify` compares each
/// partition at its own checkpoint; a replay rebuilds the partitions side
/// by side while the survivor keeps applying, which carries on in the new
/// generation; the model ends equal to a rebuild.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn project_processes_share_partitions_verify_and_replay_them() {
    let seed = read_side::seed("project_processes_share_partitions");
    let pipe = Pipeline::start_with(|relay| relay.partitions = PARTITIONS).await;
    let redis = TestRedis::create().await.unwrap_or_else(|e| panic!("{e}"));
    let workload = six_tenants(&pipe, seed);
    let processes = [project(&pipe, &redis, 0), project(&pipe, &redis, 1)];
    let (second, second_pid) = share_then_kill_one(&pipe, "redis", processes).await;

    // The model, as the API and verify see it: one checkpoint per partition.
    let model = RedisModel::connect(
        &redis.url,
        projections::RedisModelConfig {
            prefix: redis.prefix.clone(),
            partitions: PARTITIONS,
            ..projections::RedisModelConfig::default()
        },
    )
    .await
    .unwrap();
    // Verified and rebuilt while commands flow.
    events_beyond(&pipe, 1_800).await;
    let found = projections::verify::verify_redis_confirmed(&pipe.store, &model)
        .await
        .unwrap();
    assert!(found.differences.is_empty(), "{:?}", found.differences);
    let replayed = projections::replay::replay_redis_into(
        &pipe.store,
        &pipe.nats.client,
        &redis.url,
        model.config().clone(),
        500,
        |_| {},
    )
    .await
    .unwrap();
    assert!(replayed.events > 0, "{replayed:?}");
    events_beyond(&pipe, 2_600).await;
    workload.stop().await;
    let head = pipe.head().await;
    for k in 0..PARTITIONS {
        let last = pipe
            .store
            .last_in_partition(head, PARTITIONS, k)
            .await
            .unwrap();
        let model = model.clone();
        eventually(
            &format!("partition {k} to reach {last}"),
            Duration::from_secs(60),
            || {
                let model = model.clone();
                async move {
                    // Readers follow the replay's switch of generations.
                    model.refresh().await.ok()?;
                    let each = model.partition_checkpoints().await.ok()?;
                    (each[k as usize].unwrap_or(0) >= last).then_some(())
                }
            },
        )
        .await;
    }
    model.refresh().await.unwrap();
    assert_eq!(model.generation(), replayed.generation);
    let found = projections::verify::verify_redis_confirmed(&pipe.store, &model)
        .await
        .unwrap();
    assert!(found.differences.is_empty(), "{:?}", found.differences);
    let clean = read_side::redis_rebuilt(&pipe.store, head).await;
    assert_same_redis(
        "partitions replayed and carried on against one projector of the whole log",
        &without_checkpoints(&redis).await,
        &without_checkpoints(&clean).await,
    );

    // `status`: a line per partition, live, with its holder.
    let target = crate::support::target(&pipe);
    let status = target
        .command(&["status"])
        .env("NEURECTOMY_REDIS_URL", &redis.url)
        .env("NEURECTOMY_REDIS_PREFIX", &redis.prefix)
        .env("NEURECTOMY_JETSTREAM_PARTITIONS", PARTITIONS.to_string())
        .output()
        .await
        .unwrap();
    let printed = String::from_utf8_lossy(&status.stdout).into_owned();
    each_partition_live_and_held(&printed, "redis", &redis.prefix, second_pid);
    let mut second = second;
    let (code, _) = second.stop(Duration::from_secs(30)).await;
    assert_eq!(code, Some(0), "{}", second.log());
    pipe.shutdown().await;
}

/// Fails unless `neurectomy status` printed each partition of `projection`
/// (in `namespace`) live, its lease held by the process of `pid`.
fn each_partition_live_and_held(printed: &str, projection: &str, namespace: &str, pid: u32) {
    for k in 0..PARTITIONS {
        let mut lines = printed
            .lines()
            .skip_while(|l| !l.starts_with(&format!("projection {projection}/p{k} ")));
        let line = lines.next().unwrap_or_default();
        assert!(
            line.contains(&format!("({namespace})")) && line.contains(", live"),
            "status:\n{printed}"
        );
        let lease = lines.next().unwrap_or_default();
        assert!(
            lease.starts_with("  lease: held by ") && lease.contains(&format!(":{pid}:")),
            "status:\n{printed}"
        );
    }
}

/// `neurectomy project --only graph` number `n` on `graph`'s database,
/// projecting the graph in [`PARTITIONS`] partitions under leases (1 s
/// ttl); its state reports go to `redis`.
fn project_graph(pipe: &Pipeline, redis: &TestRedis, graph: &TestGraph, n: usize) -> Instance {
    let server = projections::graph_testkit::GraphServer::from_env();
    let mut command = crate::support::target(pipe).command(&["project", "--only", "graph"]);
    command
        .env("NEURECTOMY_REDIS_URL", &redis.url)
        .env("NEURECTOMY_REDIS_PREFIX", &redis.prefix)
        .env("NEURECTOMY_GRAPH_URI", &server.uri)
        .env("NEURECTOMY_GRAPH_USER", "root")
        .env("NEURECTOMY_GRAPH_PASSWORD", &server.password)
        .env("NEURECTOMY_GRAPH_DATABASE", &graph.database)
        .env("NEURECTOMY_GRAPH_HTTP", &graph.http)
        .env("NEURECTOMY_JETSTREAM_PARTITIONS", PARTITIONS.to_string())
        .env("NEURECTOMY_PROJECTOR_BATCH_SIZE", "200")
        .env("NEURECTOMY_PROJECTOR_LEASE_TTL_MS", "1000")
        .env("NEURECTOMY_LOG", "info")
        .env("NEURECTOMY_LOG_FORMAT", "json")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    Instance::spawn(&format!("graph project process {n}"), command)
}

/// Real `project --only graph` processes on four partitions under load:
/// two share the graph's partitions two and two; one SIGKILLed, the other
/// takes all four within seconds and applies on; `status` shows each graph
/// partition, live, with its holder; the graph ends equal to one projector
/// of the whole log, and `verify` finds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graph_project_processes_share_partitions_and_take_over_a_killed_ones() {
    let seed = read_side::seed("graph_project_processes_share_partitions");
    let pipe = Pipeline::start_with(|relay| relay.partitions = PARTITIONS).await;
    let redis = TestRedis::create().await.unwrap_or_else(|e| panic!("{e}"));
    let graph = TestGraph::create_partitioned(PARTITIONS)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let workload = six_tenants(&pipe, seed);
    let processes = [
        project_graph(&pipe, &redis, &graph, 0),
        project_graph(&pipe, &redis, &graph, 1),
    ];
    let (second, second_pid) = share_then_kill_one(&pipe, "graph", processes).await;
    events_beyond(&pipe, 2_000).await;
    workload.stop().await;
    let head = pipe.head().await;
    let models = (0..PARTITIONS)
        .map(|k| graph.model.for_partition(k))
        .collect();
    models_reach(&pipe, models, head).await;
    let found = projections::verify::verify_graph_confirmed(&pipe.store, &graph.model)
        .await
        .unwrap();
    assert!(found.differences.is_empty(), "{:?}", found.differences);
    let clean = read_side::graph_rebuilt(&pipe.store, head).await;
    let without = |dump: Vec<String>| -> Vec<String> {
        dump.into_iter()
            .filter(|line| !line.contains("Checkpoint"))
            .collect()
    };
    read_side::assert_same_lines(
        "graph partitions of two processes, one killed, against one projector of the whole log",
        &without(graph.dump().await.unwrap()),
        &without(clean.dump().await.unwrap()),
    );

    // `status`: a line per graph partition, live, with its holder.
    let server = projections::graph_testkit::GraphServer::from_env();
    let status = crate::support::target(&pipe)
        .command(&["status"])
        .env("NEURECTOMY_REDIS_URL", &redis.url)
        .env("NEURECTOMY_REDIS_PREFIX", &redis.prefix)
        .env("NEURECTOMY_GRAPH_URI", &server.uri)
        .env("NEURECTOMY_GRAPH_USER", "root")
        .env("NEURECTOMY_GRAPH_PASSWORD", &server.password)
        .env("NEURECTOMY_GRAPH_DATABASE", &graph.database)
        .env("NEURECTOMY_JETSTREAM_PARTITIONS", PARTITIONS.to_string())
        .output()
        .await
        .unwrap();
    let printed = String::from_utf8_lossy(&status.stdout).into_owned();
    let database = format!("database {}", graph.database);
    each_partition_live_and_held(&printed, "graph", &database, second_pid);
    let mut second = second;
    let (code, _) = second.stop(Duration::from_secs(30)).await;
    assert_eq!(code, Some(0), "{}", second.log());
    pipe.shutdown().await;
}

/// Four partition projectors on a Redis Cluster of three primaries with a
/// replica each (`services::RedisCluster`), under 300 commands/s of six
/// tenants: each partition's keys share one hash slot, so a batch and its
/// checkpoint are one `MULTI/EXEC` on the slot's primary. The primary
/// serving a partition's slot is SIGKILLed: its replica is promoted, the
/// projectors write on through the new primary, and the killed node,
/// started again, rejoins. At the end every partition is at its last
/// event, live, and `verify` — every entity read through the cluster
/// client from its tenant's slot — finds the model equal to the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_projectors_write_through_a_redis_cluster_primary_failover() {
    use neurectomy_e2e::services::RedisCluster;
    let seed = read_side::seed("partition_projectors_redis_cluster_failover");
    let mut cluster = RedisCluster::start(3, 1).await;
    let pipe = Pipeline::start_with(|relay| relay.partitions = PARTITIONS).await;
    let model = RedisModel::connect(
        &cluster.urls().join(","),
        projections::RedisModelConfig {
            prefix: format!("test:{}:", uuid::Uuid::new_v4().simple()),
            partitions: PARTITIONS,
            cluster: true,
            ..projections::RedisModelConfig::default()
        },
    )
    .await
    .unwrap();
    let workload = six_tenants(&pipe, seed);
    let projectors: Vec<_> = (0..PARTITIONS)
        .map(|k| pipe.partition_projector(model.for_partition(k), PARTITIONS, k))
        .collect();
    let running: Vec<Running> = projectors.iter().map(|p| pipe.spawn(p)).collect();
    let head = events_beyond(&pipe, 800).await;
    partitions_reach(&pipe, &projectors, head).await;

    // The primary serving the slot of a partition that has events.
    let mut victim = None;
    for k in 0..PARTITIONS {
        if pipe
            .store
            .last_in_partition(head, PARTITIONS, k)
            .await
            .unwrap()
            > 0
        {
            let key = model.key_in(k, &format!("checkpoint:p{k}"));
            victim = Some((k, key.clone(), cluster.primary_of(&key).await.unwrap()));
            break;
        }
    }
    let (partition, key, victim) = victim.unwrap();
    let before = pipe.head().await;
    cluster.kill(victim);
    let killed = Instant::now();
    let promoted = eventually(
        "a replica to be promoted for the killed primary's slots",
        Duration::from_secs(60),
        || async { cluster.primary_of(&key).await.filter(|p| *p != victim) },
    )
    .await;
    let failover = killed.elapsed();
    // The partition's projector writes on through the new primary: what
    // was committed before the kill is applied.
    let last = pipe
        .store
        .last_in_partition(before, PARTITIONS, partition)
        .await
        .unwrap();
    let partition_model = projectors[partition as usize].model().clone();
    eventually(
        &format!("partition {partition} to reach {last} through the new primary"),
        Duration::from_secs(60),
        || {
            let model = partition_model.clone();
            async move { (model.checkpoint().await.ok()? >= last).then_some(()) }
        },
    )
    .await;
    let recovered = killed.elapsed();
    cluster.restart(victim).await;
    cluster.wait_ok().await;
    events_beyond(&pipe, 2_000).await;
    workload.stop().await;
    let head = pipe.head().await;
    partitions_reach(&pipe, &projectors, head).await;
    println!(
        "Redis Cluster primary {victim} killed: node {promoted} promoted after {failover:?}; \
         partition {partition} applied what was committed before the kill {recovered:?} after it"
    );
    for projector in &projectors {
        let status = projector.status().borrow().clone();
        assert_eq!(
            status.state,
            projections::ProjectorState::Live,
            "{status:?}"
        );
    }
    let found = projections::verify::verify_redis_confirmed(&pipe.store, &model)
        .await
        .unwrap();
    assert!(found.differences.is_empty(), "{:?}", found.differences);
    assert!(found.skipped == 0, "{found:?}");
    for (stop, task) in running {
        stop.cancel();
        task.await.unwrap().unwrap();
    }
    pipe.shutdown().await;
}

/// The API on a Redis Cluster of three primaries (`redis.cluster`), the
/// model in four partitions: the partitions' slots spread over more than
/// one primary; mutations are read back with read-your-writes from each
/// tenant's slot (one agent, the agents list with a filter — a multi-key
/// `SINTER` within the slot —, a workflow's tasks), a tenant never sees
/// another's, `projectionStatus` lists every partition; subscribers of two
/// tenants in different partitions each get their own tenant's changes
/// (an upstream reader per partition, on its slot's primary).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_reads_a_partitioned_model_on_a_redis_cluster() {
    use neurectomy_e2e::services::RedisCluster;
    let cluster = RedisCluster::start(3, 0).await;
    let redis = TestRedis::on_cluster(&cluster.urls().join(","), PARTITIONS)
        .await
        .unwrap();
    let mut primaries = std::collections::BTreeSet::new();
    for k in 0..PARTITIONS {
        let key = redis.model.key_in(k, &format!("checkpoint:p{k}"));
        primaries.insert(cluster.primary_of(&key).await.unwrap());
    }
    assert!(primaries.len() > 1, "four partitions on {primaries:?}");
    let api = TestApi::start_partitioned_on(PARTITIONS, redis, &["--redis-cluster", "true"]).await;
    let (a, b) = tenants_apart(PARTITIONS);
    let (token_a, token_b) = (
        api.token(&a, &[Role::Operator]),
        api.token(&b, &[Role::Operator]),
    );
    let (agent_b, _) = register(&api, &token_b, "agent-b").await;
    let (agent_a, _) = register(&api, &token_a, "agent-a").await;
    let workflow = uuid::Uuid::new_v4().to_string();
    api.data(
        &token_a,
        &format!("mutation {{ startWorkflow(id: \"{workflow}\", name: \"w\", metadata: {{}}) {{ position }} }}"),
        json!({}),
    )
    .await;
    let task = uuid::Uuid::new_v4().to_string();
    let created = api
        .data(
            &token_a,
            &format!("mutation {{ createTask(id: \"{task}\", workflowId: \"{workflow}\", title: \"t\", dependsOn: [], requiredCapabilities: [\"code\"], input: {{}}) {{ position }} }}"),
            json!({}),
        )
        .await;
    let at = created["createTask"]["position"].clone();
    let data = api
        .data(
            &token_a,
            "query($a: ID!, $w: ID!, $p: Position) {
               agent(id: $a, atLeastPosition: $p) { name }
               agents(filter: {capability: \"code\", status: ACTIVE}, first: 10, atLeastPosition: $p) { edges { node { id } } }
               tasks(workflowId: $w, first: 10, atLeastPosition: $p) { edges { node { id state } } }
             }",
            json!({ "a": agent_a, "w": workflow, "p": at }),
        )
        .await;
    assert_eq!(data["agent"]["name"], "agent-a", "{data}");
    assert_eq!(
        data["agents"]["edges"],
        json!([{ "node": { "id": agent_a } }]),
        "{data}"
    );
    assert_eq!(
        data["tasks"]["edges"],
        json!([{ "node": { "id": task, "state": "pending" } }]),
        "{data}"
    );
    // Another tenant's agent reads as absent; its own from its own slot.
    let read = "query($a: ID!) { agent(id: $a) { name } }";
    let other = api.data(&token_a, read, json!({ "a": agent_b })).await;
    assert_eq!(other["agent"], Value::Null);
    let own = api.data(&token_b, read, json!({ "a": agent_b })).await;
    assert_eq!(own["agent"]["name"], "agent-b");
    let status = api
        .data(
            &token_a,
            "{ projectionStatus { name checkpoint } }",
            json!({}),
        )
        .await;
    let names: Vec<&str> = status["projectionStatus"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "redis/p0", "redis/p1", "redis/p2", "redis/p3", "graph/p0", "graph/p1", "graph/p2",
            "graph/p3"
        ]
    );
    // Subscriptions: one upstream per partition, each reading its
    // partition's feeds on the primary serving its slot. Two tenants of
    // different partitions subscribe after `at`: each first gets its agent
    // changed since (the snapshot, once its feed is followed), then its next
    // change live from its partition's feed — and nothing of the other.
    let (snap_a, _) = register(&api, &token_a, "agent-a2").await;
    let (snap_b, _) = register(&api, &token_b, "agent-b2").await;
    let subscription =
        "subscription($p: Position) { agentsUpdated(afterPosition: $p) { position agent { id } } }";
    let mut ws_a = neurectomy_e2e::ws::Client::connect(api.addr, &token_a, None).await;
    ws_a.subscribe("a", subscription, json!({ "p": at })).await;
    let mut ws_b = neurectomy_e2e::ws::Client::connect(api.addr, &token_b, None).await;
    ws_b.subscribe("b", subscription, json!({ "p": at })).await;
    assert_eq!(next_agent(&mut ws_a, "a").await, json!(snap_a));
    assert_eq!(next_agent(&mut ws_b, "b").await, json!(snap_b));
    let (live_b, _) = register(&api, &token_b, "agent-b3").await;
    let (live_a, _) = register(&api, &token_a, "agent-a3").await;
    assert_eq!(next_agent(&mut ws_a, "a").await, json!(live_a));
    assert_eq!(next_agent(&mut ws_b, "b").await, json!(live_b));
    ws_b.close().await;
    ws_a.close().await;
    api.shutdown().await;
}

/// The agent id of the next message of subscription `id` on `ws`.
async fn next_agent(ws: &mut neurectomy_e2e::ws::Client, id: &str) -> Value {
    next_agent_within(ws, id, Duration::from_secs(10)).await
}

/// A subscriber on a Redis Cluster (three primaries with a replica each)
/// keeps receiving its tenant's changes when the primary serving its
/// partition's slot is SIGKILLed: its upstream reader reconnects to the
/// promoted replica (the projector writing on through it), and the next
/// change arrives — once, after everything delivered before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_on_a_redis_cluster_follows_a_primary_failover() {
    use neurectomy_e2e::services::RedisCluster;
    let mut cluster = RedisCluster::start(3, 1).await;
    let redis = TestRedis::on_cluster(&cluster.urls().join(","), PARTITIONS)
        .await
        .unwrap();
    let (a, _) = tenants_apart(PARTITIONS);
    let partition = commands::partition::of(&a, PARTITIONS);
    let slot_key = redis
        .model
        .key_in(partition, &format!("checkpoint:p{partition}"));
    let api = TestApi::start_partitioned_on(PARTITIONS, redis, &["--redis-cluster", "true"]).await;
    let token = api.token(&a, &[Role::Operator]);
    let (first, at) = register(&api, &token, "agent-1").await;
    let subscription =
        "subscription($p: Position) { agentsUpdated(afterPosition: $p) { position agent { id } } }";
    let mut ws = neurectomy_e2e::ws::Client::connect(api.addr, &token, None).await;
    ws.subscribe("s", subscription, json!({ "p": (at - 1).to_string() }))
        .await;
    assert_eq!(next_agent(&mut ws, "s").await, json!(first));

    let victim = cluster.primary_of(&slot_key).await.unwrap();
    cluster.kill(victim);
    let killed = Instant::now();
    eventually(
        "a replica to be promoted",
        Duration::from_secs(60),
        || async { cluster.primary_of(&slot_key).await.filter(|p| *p != victim) },
    )
    .await;
    let (second, _) = register(&api, &token, "agent-2").await;
    let got = next_agent_within(&mut ws, "s", Duration::from_secs(30)).await;
    println!(
        "a subscriber's partition primary killed: its next change delivered {:?} after the kill",
        killed.elapsed()
    );
    assert_eq!(got, json!(second));
    ws.close().await;
    api.shutdown().await;
}

/// [`next_agent`] within `timeout`.
async fn next_agent_within(
    ws: &mut neurectomy_e2e::ws::Client,
    id: &str,
    timeout: Duration,
) -> Value {
    match ws.reply(timeout).await {
        neurectomy_e2e::ws::Reply::Next(got, data) => {
            assert_eq!(got, id);
            data["agentsUpdated"]["agent"]["id"].clone()
        }
        other => panic!("subscription {id} on a Redis Cluster: {other:?}"),
    }
}
