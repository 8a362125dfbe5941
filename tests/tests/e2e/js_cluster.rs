//! The write side's transport on a three-node JetStream cluster started by
//! the test (`services::NatsCluster`, nats-server on loopback ports), the
//! stream kept with three replicas: under load, the stream's leader is
//! SIGKILLed (twice) and a follower once, each restarted afterwards. The
//! relay's expected-last-sequence chain and the Redis projector's consumer
//! must survive every leader change: what was committed before and after
//! each kill reaches Redis, the stream holds each event exactly once, and
//! the model ends equal to a clean rebuild. (Subscriptions are fed from the
//! Redis change feed, which the projector writes: what reaches Redis
//! reaches them.) First, on the same cluster, a relay configured for three
//! replicas raises a stream it finds with one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use async_nats::jetstream;
use commands::testkit::eventually;
use neurectomy_e2e::pipeline::Pipeline;
use neurectomy_e2e::read_side;
use neurectomy_e2e::services::NatsCluster;
use projections::testkit::TestRedis;
use projections::ReadModel as _;

use crate::support::{last_published, live, redis_is_the_log};

/// The stream's leader, once its cluster reports one with every replica
/// current (`(leader, replicas)`).
async fn settled(js: &jetstream::Context, name: &str) -> (String, Vec<String>) {
    eventually(
        "the stream to have a leader and every replica current",
        Duration::from_secs(90),
        || async move {
            let mut stream = js.get_stream(name).await.ok()?;
            let info = stream.info().await.ok()?;
            let cluster = info.cluster.clone()?;
            let leader = cluster.leader?;
            let replicas: Vec<String> = cluster.replicas.iter().map(|r| r.name.clone()).collect();
            let current = cluster.replicas.iter().all(|r| r.current && !r.offline);
            (replicas.len() == 2 && current).then_some((leader, replicas))
        },
    )
    .await
}

/// A relay configured for 3 replicas raises a stream it finds with one.
async fn raises_a_single_copy_stream_to_three(cluster: &NatsCluster) {
    let nats = commands::testkit::TestNats::create_at(&cluster.url(0))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // The relay reads nothing of its store here; it needs one to exist.
    let db = commands::testkit::TestDatabase::create(2)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let store = commands::EventStore::new(db.pool.clone());
    let relay = |replicas| {
        commands::Relay::new(
            store.clone(),
            nats.client.clone(),
            commands::RelayConfig {
                replicas,
                ..nats.relay.clone()
            },
        )
    };
    let (one, three) = (relay(1), relay(3));
    let (one, three) = (&one, &three);
    eventually(
        "JetStream to create a one-copy stream",
        Duration::from_secs(60),
        || async move { one.ensure_stream().await.ok().map(|_| ()) },
    )
    .await;
    let js = nats.jetstream();
    let replicas = |js: jetstream::Context, name: String| async move {
        let mut stream = js.get_stream(&name).await.ok()?;
        let info = stream.info().await.ok()?;
        Some(info.config.num_replicas)
    };
    let name = nats.relay.stream_name.clone();
    assert_eq!(replicas(js.clone(), name.clone()).await, Some(1));
    three.ensure_stream().await.unwrap();
    let (_, followers) = settled(&js, &name).await;
    assert_eq!(followers.len(), 2);
    assert_eq!(replicas(js.clone(), name.clone()).await, Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_and_a_projector_survive_killed_jetstream_nodes_leader_included() {
    let seed = read_side::seed("the_relay_and_a_projector_survive_killed_jetstream_nodes");
    let mut cluster = NatsCluster::start(3).await;
    raises_a_single_copy_stream_to_three(&cluster).await;
    let pipe = Pipeline::start_on(&cluster.url(0), |relay| relay.replicas = 3).await;
    let js = jetstream::new(pipe.nats.client.clone());
    let stream = pipe.nats.relay.stream_name.clone();
    let (_, replicas) = settled(&js, &stream).await;
    assert_eq!(replicas.len(), 2, "three copies: a leader and two replicas");

    let redis = TestRedis::create().await.unwrap_or_else(|e| panic!("{e}"));
    let projector = pipe.projector(redis.model.clone());
    let (_stop, task) = pipe.spawn(&projector);
    live(&projector).await;
    // Enough agents that the simulator never waits for a paused one: the
    // log grows all along, so each recovery time below is the transport's.
    let workload = pipe.start_workload(api::simulate::SimulateArgs {
        agents: 32,
        ..Pipeline::workload(0, 300, seed)
    });

    let mut recoveries = Vec::new();
    for round in 0..3 {
        let (leader, replicas) = settled(&js, &stream).await;
        // Rounds 0 and 2: the leader; round 1: a follower.
        let victim = if round == 1 { &replicas[0] } else { &leader };
        let index = cluster.index(victim).unwrap();
        let head = pipe
            .head_beyond(redis.model.checkpoint().await.unwrap())
            .await;
        let killed = Instant::now();
        cluster.kill(index);
        // What was committed before the kill, then what is committed after
        // it, reaches Redis through the remaining two nodes.
        let after = pipe.head_beyond(head).await;
        let (js, stream) = (&js, &stream);
        eventually(
            "the relay to publish an event committed after the kill",
            Duration::from_secs(60),
            || async move {
                let (_, last) = last_published(js, stream).await?;
                (last >= after).then_some(())
            },
        )
        .await;
        let relayed = killed.elapsed();
        pipe.caught_up_to(&redis.model, after).await;
        recoveries.push((victim.clone(), relayed, killed.elapsed()));
        if *victim == leader {
            let (now, _) = eventually(
                "another node to lead the stream",
                Duration::from_secs(60),
                || async {
                    let mut stream = js.get_stream(&stream).await.ok()?;
                    let info = stream.info().await.ok()?;
                    let leader = info.cluster.clone()?.leader?;
                    Some((leader, ()))
                },
            )
            .await;
            assert_ne!(now, leader, "the killed leader still leads");
        }
        cluster.restart(index).await;
    }
    println!(
        "killed node → an event committed after the kill (published, visible in Redis): {recoveries:?}"
    );

    workload.stop().await;
    let until = pipe.caught_up(&redis.model).await;
    settled(&js, &stream).await;
    // The chain held: the stream holds every event once, the last one last.
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pipe.db.pool)
        .await
        .unwrap();
    let (info, last) = eventually(
        "the stream's last message to be the log's last event",
        Duration::from_secs(60),
        || async {
            let (info, last) = last_published(&js, &stream).await?;
            (last == until).then_some((info, last))
        },
    )
    .await;
    assert_eq!(last, until);
    assert_eq!(
        i64::try_from(info.state.messages).unwrap(),
        events,
        "the stream holds each event exactly once: {:?}",
        info.state
    );
    redis_is_the_log(
        &pipe,
        &redis,
        until,
        "the model after JetStream nodes were killed",
    )
    .await;
    pipe.stop.cancel();
    task.await.unwrap().unwrap();
    pipe.shutdown().await;
    drop(cluster);
}
