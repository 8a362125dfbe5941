//! Projectors under leases (`projections::lease`), against real PostgreSQL,
//! JetStream, Redis and the graph server: two projectors of one projection
//! share it (one applies, one stands by), the standby takes over a holder
//! killed under load, and a batch written under a lease that is over is
//! refused by the fence inside the read model's atomic write (Redis and
//! graph), writing nothing; and three real `project` processes under load
//! whose lease holder is SIGKILLed or SIGSTOPped past its lease, five
//! rounds, ending with a model equal to a clean rebuild.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use commands::testkit::eventually;
use neurectomy_e2e::instance::Instance;
use neurectomy_e2e::pipeline::Pipeline;
use neurectomy_e2e::read_side::{self, assert_same_lines, assert_same_redis};
use projections::graph_testkit::TestGraph;
use projections::testkit::TestRedis;
use projections::{
    ApplyError, Fence, LeaseConfig, Leases, Projected, Projector, ProjectorConfig, ProjectorState,
    ProjectorStatus, ReadModel, RedisModel, RedisModelConfig,
};
use tokio::sync::watch;

use crate::support::redis_is_the_log;

/// Leases of the Redis projection of `pipe`'s stream, held as `owner`.
fn leases(pipe: &Pipeline, owner: &str, ttl: Duration) -> Leases {
    Leases::new(
        pipe.db.pool.clone(),
        format!("{}/redis", pipe.nats.relay.stream_name),
        LeaseConfig {
            ttl,
            owner: owner.to_owned(),
        },
    )
}

/// A projector of `model` as a `project` process runs it: under a lease.
fn leased(pipe: &Pipeline, model: RedisModel, leases: Leases) -> Arc<Projector<RedisModel>> {
    let config = ProjectorConfig {
        stream_name: pipe.nats.relay.stream_name.clone(),
        batch_size: 200,
        ..ProjectorConfig::default()
    };
    Arc::new(
        Projector::new(model, pipe.store.clone(), pipe.nats.client.clone(), config)
            .with_leases(leases),
    )
}

/// Another connection to the model of `redis` (as a second process has).
async fn same_model(redis: &TestRedis) -> RedisModel {
    let config = RedisModelConfig {
        prefix: redis.prefix.clone(),
        ..RedisModelConfig::default()
    };
    RedisModel::connect(&redis.url, config).await.unwrap()
}

/// Waits until `status` satisfies `ok`; returns it.
async fn status_until(
    what: &str,
    status: &watch::Receiver<ProjectorStatus>,
    ok: impl Fn(&ProjectorStatus) -> bool,
) -> ProjectorStatus {
    eventually(what, Duration::from_secs(60), || {
        let current = status.borrow().clone();
        let ok = ok(&current);
        async move { ok.then_some(current) }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_a_holder_killed_under_load_and_the_model_equals_a_rebuild() {
    let seed = read_side::seed("a_standby_takes_over_a_holder_killed_under_load");
    let pipe = Pipeline::start().await;
    let redis = TestRedis::create().await.unwrap_or_else(|e| panic!("{e}"));
    let ttl = Duration::from_millis(900);
    let a = leased(&pipe, redis.model.clone(), leases(&pipe, "process-a", ttl));
    let b = leased(
        &pipe,
        same_model(&redis).await,
        leases(&pipe, "process-b", ttl),
    );
    let (a_status, b_status) = (a.status(), b.status());

    let workload = pipe.start_workload(Pipeline::workload(0, 300, seed));
    let (_, a_task) = pipe.spawn(&a);
    let held = status_until("process a to take the lease and go live", &a_status, |s| {
        s.state == ProjectorState::Live && s.token.is_some()
    })
    .await;
    let (_b_stop, b_task) = pipe.spawn(&b);
    status_until("process b to stand by", &b_status, |s| {
        s.state == ProjectorState::Standby
    })
    .await;
    // While a holds the lease it applies and b applies nothing.
    let applied = a_status.borrow().applied;
    status_until("process a to apply more batches", &a_status, |s| {
        s.applied > applied
    })
    .await;
    assert_eq!(b_status.borrow().applied, 0, "{:?}", b_status.borrow());
    assert_eq!(b_status.borrow().token, None);

    // Killed: its task is aborted mid-whatever, nothing released.
    a_task.abort();
    let killed = Instant::now();
    let took = status_until("process b to take the lease over", &b_status, |s| {
        s.token.is_some() && s.state == ProjectorState::Live
    })
    .await;
    let after = killed.elapsed();
    assert_eq!(
        took.token,
        held.token.map(|t| t + 1),
        "the fencing token grows by one when the lease changes hands"
    );
    println!("process b took over {after:?} after process a was killed");
    status_until("process b to apply events", &b_status, |s| s.applied > 0).await;

    let holders = leases(&pipe, "observer", ttl).holders().await.unwrap();
    assert_eq!(holders.len(), 1, "{holders:?}");
    assert_eq!(
        (
            holders[0].owner.as_str(),
            Some(holders[0].token),
            holders[0].live
        ),
        ("process-b", took.token, true)
    );

    workload.stop().await;
    let until = pipe.caught_up(&redis.model).await;
    redis_is_the_log(&pipe, &redis, until, "the model after a takeover").await;

    // A clean stop hands the lease over at once: a standby would take it at
    // its next poll, not after the ttl.
    pipe.stop.cancel();
    b_task.await.unwrap().unwrap();
    let holders = leases(&pipe, "observer", ttl).holders().await.unwrap();
    assert!(!holders[0].live, "released at shutdown: {holders:?}");
    pipe.shutdown().await;
}

/// The log of `pipe` (at least 300 events) split in two at an event.
async fn two_batches(pipe: &Pipeline, seed: u64) -> (Vec<Projected>, Vec<Projected>) {
    pipe.simulate_until(Pipeline::workload(0, 400, seed), 300, &[])
        .await;
    let head = pipe.head().await;
    let mut log = read_side::log(&pipe.store, head).await;
    let rest = log.split_off(log.len() / 2);
    (log, rest)
}

/// The fence of `model`: `first` applied under token 2 (the successor),
/// then `rest` under token 1 (the holder paused past its lease, waking up
/// with the next batch planned after the same checkpoint) is refused and
/// writes nothing (`snapshot` is the same before and after), then `rest`
/// under token 2 goes in. Returns the checkpoint between the two.
async fn a_late_batch_is_refused<M, S, F>(
    model: &M,
    (first, rest): (&[Projected], &[Projected]),
    snapshot: S,
) -> i64
where
    M: ReadModel,
    S: Fn() -> F,
    F: std::future::Future<Output = Vec<String>>,
{
    model.apply_after(0, Some(Fence(2)), first).await.unwrap();
    let checkpoint = model.checkpoint().await.unwrap();
    let before = snapshot().await;
    match model.apply_after(checkpoint, Some(Fence(1)), rest).await {
        Err(ApplyError::Fenced {
            token: 1, newer: 2, ..
        }) => {}
        other => panic!("expected the fence to refuse token 1, got {other:?}"),
    }
    assert_same_lines(
        "the model after a refused batch",
        &snapshot().await,
        &before,
    );
    model
        .apply_after(checkpoint, Some(Fence(2)), rest)
        .await
        .unwrap();
    checkpoint
}

/// Every key of `redis` with its contents, as lines.
async fn redis_lines(redis: &TestRedis) -> Vec<String> {
    redis
        .dump()
        .await
        .unwrap()
        .into_iter()
        .map(|(key, value)| format!("{key} = {value}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_batch_under_a_lease_that_is_over_is_refused_and_writes_nothing() {
    let seed = read_side::seed("a_redis_batch_under_a_lease_that_is_over_is_refused");
    let pipe = Pipeline::start().await;
    let redis = TestRedis::create().await.unwrap_or_else(|e| panic!("{e}"));
    let (first, rest) = two_batches(&pipe, seed).await;
    let checkpoint =
        a_late_batch_is_refused(&redis.model, (&first, &rest), || redis_lines(&redis)).await;
    // The model is what one clean pass builds.
    let until = rest.last().unwrap().recorded.position;
    let clean = read_side::redis_rebuilt(&pipe.store, until).await;
    assert_same_redis(
        "the model after a refused batch",
        &redis.dump_model().await.unwrap(),
        &clean.dump_model().await.unwrap(),
    );
    // A batch at or below the stored checkpoint (handed in again) is
    // skipped before anything is planned: nothing written.
    let before = redis_lines(&redis).await;
    redis
        .model
        .apply_after(checkpoint, Some(Fence(2)), &rest)
        .await
        .unwrap();
    assert_same_lines("a batch applied twice", &redis_lines(&redis).await, &before);
    pipe.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graph_batch_under_a_lease_that_is_over_is_refused_and_writes_nothing() {
    let seed = read_side::seed("a_graph_batch_under_a_lease_that_is_over_is_refused");
    let pipe = Pipeline::start().await;
    let graph = TestGraph::create().await.unwrap_or_else(|e| panic!("{e}"));
    let (first, rest) = two_batches(&pipe, seed).await;
    a_late_batch_is_refused(&graph.model, (&first, &rest), || async {
        graph.dump().await.unwrap()
    })
    .await;
    let until = rest.last().unwrap().recorded.position;
    let clean = read_side::graph_rebuilt(&pipe.store, until).await;
    assert_same_lines(
        "the graph after a refused batch",
        &graph.dump().await.unwrap(),
        &clean.dump().await.unwrap(),
    );
    pipe.shutdown().await;
}

/// The lease ttl of the `project` processes below.
const PROCESS_TTL: Duration = Duration::from_millis(1_000);

/// `neurectomy project --only redis` number `n`, with a lease ttl of
/// [`PROCESS_TTL`].
fn project(pipe: &Pipeline, redis: &TestRedis, n: usize) -> Instance {
    crate::support::project(pipe, redis, (n, PROCESS_TTL), &[])
}

/// The live lease of the Redis projection once its owner is not `not`:
/// (owner's pid, token).
async fn holder_other_than(pipe: &Pipeline, not: Option<u32>) -> (u32, u64) {
    let leases = leases(pipe, "observer", PROCESS_TTL);
    eventually(
        &format!("a process other than {not:?} to hold the lease"),
        Duration::from_secs(60),
        || {
            let leases = leases.clone();
            async move {
                let holders = leases.holders().await.ok()?;
                let live = holders.into_iter().find(|h| h.live)?;
                let pid: u32 = live.owner.split(':').nth(1)?.parse().ok()?;
                (Some(pid) != not).then_some((pid, live.token))
            }
        },
    )
    .await
}

/// Sends `signal` to `pid`.
fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid} failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_project_processes_survive_kills_and_a_pause_past_the_lease_under_load() {
    let seed = read_side::seed("three_project_processes_survive_kills_and_a_pause");
    let pipe = Pipeline::start().await;
    let redis = TestRedis::create().await.unwrap_or_else(|e| panic!("{e}"));
    let workload = pipe.start_workload(Pipeline::workload(0, 300, seed));
    let mut processes: Vec<Instance> = (0..3).map(|n| project(&pipe, &redis, n)).collect();
    let mut started = processes.len();
    let mut takeovers = Vec::new();

    // Five rounds: the holder is SIGKILLed (rounds 0, 2, 4; a new process
    // joins in its place) or SIGSTOPped past its lease and resumed (1, 3).
    for round in 0..5 {
        let (holder, token) = holder_other_than(&pipe, None).await;
        let index = processes
            .iter()
            .position(|p| p.child.id() == Some(holder))
            .unwrap_or_else(|| panic!("the holder {holder} is none of the processes"));
        let paused = round % 2 == 1;
        let head = pipe
            .head_beyond(redis.model.checkpoint().await.unwrap())
            .await;
        let cut = Instant::now();
        if paused {
            signal(holder, "STOP");
        } else {
            processes[index].child.kill().await.unwrap();
        }
        let (_, next_token) = holder_other_than(&pipe, Some(holder)).await;
        // The successor applies what was committed before the cut.
        pipe.caught_up_to(&redis.model, head).await;
        let took = cut.elapsed();
        takeovers.push(took);
        assert!(next_token > token, "the fencing token must grow");
        if paused {
            // Resumed after its lease was taken over: it must stand by (its
            // keeper sees the lease could not be renewed in time, or a late
            // batch is refused), never apply again under the old token.
            tokio::time::sleep(PROCESS_TTL).await;
            signal(holder, "CONT");
            let log = processes[index].log.clone();
            eventually(
                "the resumed process to notice its lease is over",
                Duration::from_secs(30),
                || {
                    let log = log.lock().unwrap().join("\n");
                    async move {
                        log.contains("lease of the projection is over")
                            .then_some(())
                    }
                },
            )
            .await;
        } else {
            processes.remove(index);
            processes.push(project(&pipe, &redis, started));
            started += 1;
        }
    }

    workload.stop().await;
    let until = pipe.caught_up(&redis.model).await;
    println!("takeovers (cut → events committed before it applied): {takeovers:?}");
    redis_is_the_log(&pipe, &redis, until, "the model after kills and a pause").await;
    // `neurectomy status` names the holder of the Redis projection's lease.
    let target = crate::support::target(&pipe);
    let (holder, token) = holder_other_than(&pipe, None).await;
    let status = target
        .command(&["status"])
        .env("NEURECTOMY_REDIS_URL", &redis.url)
        .env("NEURECTOMY_REDIS_PREFIX", &redis.prefix)
        .output()
        .await
        .unwrap();
    let printed = String::from_utf8_lossy(&status.stdout);
    let line = printed
        .lines()
        .skip_while(|l| !l.starts_with("projection redis"))
        .nth(1)
        .unwrap_or_default();
    assert!(
        line.starts_with("  lease: held by ")
            && line.contains(&format!(":{holder}:"))
            && line.ends_with(&format!("(fencing token {token})")),
        "status:\n{printed}"
    );
    for process in &mut processes {
        let (code, _) = process.stop(Duration::from_secs(30)).await;
        assert_eq!(
            code,
            Some(0),
            "{} exited badly:\n{}",
            process.role,
            process.log()
        );
    }
    pipe.shutdown().await;
}
