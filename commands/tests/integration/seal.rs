//! The sealer beside the relay leader: killed relays, a standby taking
//! over, sealers of two terms racing for the same seal number, a NATS
//! outage — and one unbroken chain of seals covering every event exactly
//! once, with every seal copied to the seal stream in the end.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use neurectomy_commands::seal::key::SealKey;
use neurectomy_commands::testkit::{eventually, TestDatabase, TestNats};
use neurectomy_commands::{EventStore, RelayConfig};
use rand::Rng;
use tokio_util::sync::CancellationToken;

use crate::support::{
    fast, mixed_streams, sealed_and_clean, sealing_relay, NatsServer, Writer, WAIT,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_killed_and_taking_over_seal_one_unbroken_chain() {
    let db = TestDatabase::create(12).await.unwrap();
    let nats = TestNats::create().await.unwrap();
    let store = EventStore::new(db.pool.clone());
    let config = RelayConfig {
        batch_size: 25,
        ..fast(&nats.relay)
    };
    let key = SealKey::generate();
    // A backlog before any relay: the first sealer reads it from the store.
    let backlog = Writer::spawn(&store, mixed_streams(40), 500);
    assert_eq!(backlog.handle.await.unwrap(), 500);
    let writer = Writer::spawn(&store, mixed_streams(40), u64::MAX);
    let mut rng = crate::support::rng(16);
    // A leader and a standby at all times; the leader is killed (its task
    // aborted: its sealer seals its open block as the feed closes, racing
    // the next leader's sealer for the seal number) five times.
    let spawn = |store: &EventStore| {
        let relay = sealing_relay(store, nats.client.clone(), &config, &key, 37);
        let progress = relay.progress();
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move { relay.run(stop).await }
        });
        (progress, stop, task)
    };
    let mut relays = vec![spawn(&store), spawn(&store)];
    for _ in 0..5 {
        writer.wait_for_more(rng.gen_range(100..400)).await;
        let leader = relays
            .iter()
            .position(|(progress, _, _)| progress.borrow().leader);
        if let Some(leader) = leader {
            let (_, _, task) = relays.remove(leader);
            task.abort();
        }
        relays.push(spawn(&store));
    }
    writer.finish().await;
    sealed_and_clean(&db, &nats, &key, &store).await;
    for (_, stop, task) in relays {
        stop.cancel();
        let _ = task.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seals_stored_during_a_nats_outage_are_copied_when_it_is_back() {
    // Declared first: dropped last, after the NATS fixture cleaned up.
    let mut server = NatsServer::start().await;
    let db = TestDatabase::create(10).await.unwrap();
    let nats = TestNats::create_at(&server.url()).await.unwrap();
    let store = EventStore::new(db.pool.clone());
    let config = fast(&nats.relay);
    let key = SealKey::generate();
    let writer = Writer::spawn(&store, mixed_streams(30), u64::MAX);
    let relay = sealing_relay(&store, nats.client.clone(), &config, &key, 37);
    let sealed = relay.sealer().unwrap().progress();
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { relay.run(stop).await }
    });
    eventually("a first seal", WAIT, || async {
        sealed.borrow().seq.is_some().then_some(())
    })
    .await;
    server.kill();
    let before = sealed.borrow().seq;
    // The batch the relay reads next is fed to the sealer before its
    // publish fails: sealed and stored in PostgreSQL, its copy pending.
    eventually("a seal stored while NATS is down", WAIT, || async {
        (sealed.borrow().seq > before).then_some(())
    })
    .await;
    writer.wait_for_more(100).await;
    server.restart().await;
    writer.wait_for_more(100).await;
    writer.finish().await;
    sealed_and_clean(&db, &nats, &key, &store).await;
    stop.cancel();
    task.await.unwrap();
}
