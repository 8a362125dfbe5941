//! The outbox relay mirrors the store into JetStream exactly once, in global
//! order, through crashes, leadership changes and NATS outages.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use neurectomy_commands::testkit::{eventually, TestDatabase, TestNats};
use neurectomy_commands::{EventStore, Relay, RelayConfig};
use rand::Rng;

use crate::support::{
    fast, mixed_streams, wait_for_mirror, wait_for_mirror_among, Intruder, NatsServer,
    RunningRelay, Writer, WAIT,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_every_event_once_in_global_order() {
    const BACKLOG: u64 = 1_000;
    const LIVE: u64 = 1_000;
    let db = TestDatabase::create(12).await.unwrap();
    let nats = TestNats::create().await.unwrap();
    let store = EventStore::new(db.pool.clone());
    let config = fast(&nats.relay);
    let streams = mixed_streams(120);

    // A backlog written before the relay starts, from concurrent writers.
    let writers: Vec<Writer> = (0..4)
        .map(|_| Writer::spawn(&store, streams.clone(), BACKLOG / 4))
        .collect();
    for writer in writers {
        assert_eq!(writer.handle.await.unwrap(), BACKLOG / 4);
    }

    // Then the relay, while more events arrive.
    let relay = RunningRelay::spawn(&store, nats.client.clone(), config.clone());
    let writers: Vec<Writer> = (0..4)
        .map(|_| Writer::spawn(&store, streams.clone(), LIVE / 4))
        .collect();
    for writer in writers {
        assert_eq!(writer.handle.await.unwrap(), LIVE / 4);
    }

    let n = wait_for_mirror(&store, &nats.jetstream(), &config, Some(&relay)).await;
    assert_eq!(n as u64, BACKLOG + LIVE);
    let progress = relay.progress();
    assert!(progress.leader);
    assert_eq!(progress.published, BACKLOG + LIVE);
    assert_eq!(progress.jetstream_sequence, BACKLOG + LIVE);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_aborted_at_random_moments_leave_an_exact_mirror() {
    const CRASHES: usize = 6;
    let db = TestDatabase::create(10).await.unwrap();
    let nats = TestNats::create().await.unwrap();
    let store = EventStore::new(db.pool.clone());
    let config = {
        let mut c = fast(&nats.relay);
        // Small batches: the relay is mostly in the middle of one.
        c.batch_size = 20;
        c
    };
    let writer = Writer::spawn(&store, mixed_streams(30), u64::MAX);
    let mut rng = crate::support::rng(0);

    let mut mid_batch = 0;
    for crash in 0..CRASHES {
        let relay = RunningRelay::spawn(&store, nats.client.clone(), config.clone());
        // Let this incarnation publish something, then kill it: every other
        // time while it holds a batch (sent, acknowledgements awaited), else
        // at a random moment (between batches, mid-checkpoint...).
        eventually("the new relay to publish", WAIT, || async {
            (relay.progress().published > 0).then_some(())
        })
        .await;
        if crash % 2 == 0 {
            eventually("the relay to hold a batch", WAIT, || async {
                (relay.in_hand.get() > 0).then_some(())
            })
            .await;
        } else {
            tokio::time::sleep(Duration::from_millis(rng.gen_range(0..40))).await;
        }
        let holding = relay.in_hand.get();
        relay.handle.abort();
        let ended = relay.handle.await;
        assert!(
            ended.as_ref().is_err_and(|e| e.is_cancelled()),
            "crash {crash}: the relay should have been running, got {ended:?}"
        );
        if holding > 0 {
            mid_batch += 1;
        }
    }
    let final_relay = RunningRelay::spawn(&store, nats.client.clone(), config.clone());
    writer.wait_for_more(50).await;
    let written = writer.finish().await;

    let n = wait_for_mirror(&store, &nats.jetstream(), &config, Some(&final_relay)).await;
    assert_eq!(n as u64, written);
    assert!(
        mid_batch >= 1,
        "no abort landed while a relay held a batch: the test did not test that"
    );
    final_relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_relay_takes_over_when_the_leader_stops() {
    let db = TestDatabase::create(10).await.unwrap();
    let nats = TestNats::create().await.unwrap();
    let store = EventStore::new(db.pool.clone());
    let config = fast(&nats.relay);
    let writer = Writer::spawn(&store, mixed_streams(30), u64::MAX);

    let a = RunningRelay::spawn(&store, nats.client.clone(), config.clone());
    let b = RunningRelay::spawn(&store, nats.client.clone(), config.clone());
    writer.wait_for_more(200).await;
    eventually("one relay to lead and publish", WAIT, || async {
        (a.progress().published > 0 || b.progress().published > 0).then_some(())
    })
    .await;
    let (leader, standby) = if a.progress().leader { (a, b) } else { (b, a) };
    // Only the leader publishes while it runs.
    writer.wait_for_more(100).await;
    let (lp, sp) = (leader.progress(), standby.progress());
    assert!(lp.leader && lp.published > 0, "leader: {lp:?}");
    assert!(!sp.leader && sp.published == 0, "standby: {sp:?}");

    // The leader stops; the standby takes over while writes continue.
    leader.shutdown().await;
    eventually("the standby to take over", WAIT, || async {
        let p = standby.progress();
        (p.leader && p.published > 0).then_some(())
    })
    .await;
    writer.wait_for_more(100).await;
    let written = writer.finish().await;

    let n = wait_for_mirror(&store, &nats.jetstream(), &config, Some(&standby)).await;
    assert_eq!(n as u64, written);
    standby.shutdown().await;
}

/// The leader dies rather than stopping: its task is aborted mid-flight and
/// its leadership connection's backend is terminated (what PostgreSQL sees
/// of a process killed or a host gone: the session ends, the advisory lock
/// with it), with no final checkpoint and no release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_relay_takes_over_when_the_leader_dies() {
    let db = TestDatabase::create(10).await.unwrap();
    let nats = TestNats::create().await.unwrap();
    let store = EventStore::new(db.pool.clone());
    let config = fast(&nats.relay);
    let writer = Writer::spawn(&store, mixed_streams(30), u64::MAX);

    let a = RunningRelay::spawn(&store, nats.client.clone(), config.clone());
    let b = RunningRelay::spawn(&store, nats.client.clone(), config.clone());
    eventually("one relay to lead and publish", WAIT, || async {
        (a.progress().published > 0 || b.progress().published > 0).then_some(())
    })
    .await;
    let (leader, standby) = if a.progress().leader { (a, b) } else { (b, a) };
    assert!(!standby.progress().leader, "two leaders");
    // The leader holds the advisory lock: one session of this database does.
    let holders = || async {
        sqlx::query_scalar::<_, i32>(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap()
    };
    let before = holders().await;
    assert_eq!(before.len(), 1, "lock holders: {before:?}");

    // Killed mid-stream: aborted, its session ended by the server.
    eventually("the leader to hold a batch", WAIT, || async {
        (leader.in_hand.get() > 0).then_some(())
    })
    .await;
    leader.handle.abort();
    let _ = sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(before[0])
        .execute(&db.pool)
        .await
        .unwrap();

    eventually("the standby to take over", WAIT, || async {
        let p = standby.progress();
        (p.leader && p.published > 0).then_some(())
    })
    .await;
    let after = holders().await;
    assert!(
        after.len() == 1 && after != before,
        "the lock passed from {before:?} to {after:?}"
    );
    writer.wait_for_more(100).await;
    let written = writer.finish().await;

    let n = wait_for_mirror(&store, &nats.jetstream(), &config, Some(&standby)).await;
    assert_eq!(n as u64, written);
    standby.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_catches_up_after_a_nats_outage() {
    // Declared first: dropped last, after the NATS fixture cleaned up.
    let mut server = NatsServer::start().await;
    let db = TestDatabase::create(10).await.unwrap();
    let nats = TestNats::create_at(&server.url()).await.unwrap();
    let store = EventStore::new(db.pool.clone());
    let config = fast(&nats.relay);
    let writer = Writer::spawn(&store, mixed_streams(30), u64::MAX);
    let relay = RunningRelay::spawn(&store, nats.client.clone(), config.clone());

    eventually("the relay to publish before the outage", WAIT, || async {
        (relay.progress().published >= 100).then_some(())
    })
    .await;
    server.kill();
    // Everything above this head was written while NATS was down.
    let killed_at = store.head().await.unwrap().written;
    writer.wait_for_more(100).await;
    // Nothing written during the outage was acknowledged by a dead server:
    // the relay is stuck at or below the head of the kill.
    let stuck_at = relay.progress().position;
    assert!(
        stuck_at <= killed_at,
        "the relay published position {stuck_at} while NATS was down (killed at {killed_at})"
    );
    server.restart().await;
    writer.wait_for_more(50).await;
    let written = writer.finish().await;

    // The relay reconnects and resynchronizes from the last message that
    // survived in JetStream. (Publishes lost with the connection are only
    // given up after the JetStream request timeout, hence the long wait.)
    let n = wait_for_mirror(&store, &nats.jetstream(), &config, Some(&relay)).await;
    assert_eq!(n as u64, written);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_messages_on_the_relays_subjects_stall_nothing_and_lose_nothing() {
    let db = TestDatabase::create(10).await.unwrap();
    let nats = TestNats::create().await.unwrap();
    let store = EventStore::new(db.pool.clone());
    let config = RelayConfig {
        // Large pipelined batches: the relay is mostly in the middle of one.
        batch_size: 500,
        ..fast(&nats.relay)
    };
    let streams = mixed_streams(60);
    let prefix = &config.subject_prefix;
    // Reacts to every 150th message of the relay it sees, until stopped.
    let intruder = Intruder::start(&nats.url, prefix, 150, u64::MAX).await;

    // The stream starts with a foreign message, then a backlog is written.
    Relay::new(store.clone(), nats.client.clone(), config.clone())
        .ensure_stream()
        .await
        .unwrap();
    intruder.publish_one().await;
    let backlog = Writer::spawn(&store, streams.clone(), 3_000);
    assert_eq!(backlog.handle.await.unwrap(), 3_000);

    // The relay drains the backlog and follows a live workload while the
    // intruder publishes, often between two messages of one batch. Whether
    // a reaction lands inside a batch depends on timing (on a loaded
    // machine the relay's whole batch may reach the server first), so the
    // workload goes on in rounds until three have, at most ten rounds.
    let relay = RunningRelay::spawn(&store, nats.client.clone(), config.clone());
    let mut written = 3_000;
    for _ in 0..10 {
        let live = Writer::spawn(&store, streams.clone(), 1_500);
        written += live.handle.await.unwrap();
        eventually("the relay to publish the round", WAIT, || async {
            (relay.progress().published >= written).then_some(())
        })
        .await;
        if relay.progress().interrupted >= 3 {
            break;
        }
    }
    let progress = relay.progress();
    assert!(
        progress.interrupted >= 3,
        "foreign messages landed inside {} relay batches in {written} events: {progress:?}",
        progress.interrupted
    );
    let foreign = intruder.stop_reacting().await;
    assert!(foreign.len() > 1 + 3, "{} foreign messages", foreign.len());
    wait_for_mirror_among(&store, &nats.jetstream(), &config, &relay, &foreign).await;

    // Foreign messages at the stream's end, then more events: the next
    // batch is rejected and the relay walks back past them.
    for _ in 0..3 {
        intruder.publish_one().await;
    }
    let more = Writer::spawn(&store, streams.clone(), 200);
    assert_eq!(more.handle.await.unwrap(), 200);
    written += 200;
    let foreign = intruder.stop_reacting().await;
    wait_for_mirror_among(&store, &nats.jetstream(), &config, &relay, &foreign).await;
    let progress = relay.progress();
    assert!(progress.leader);
    assert!(progress.passed_over >= 3, "{progress:?}");
    // The acknowledged part of every interrupted batch counted, and nothing
    // was published twice.
    assert_eq!(progress.published, written, "{progress:?}");
    relay.shutdown().await;

    // A relay starting on a stream whose last messages are foreign (the
    // case that used to stop it for good) resynchronizes past them.
    for _ in 0..4 {
        intruder.publish_one().await;
    }
    let relay = RunningRelay::spawn(&store, nats.client.clone(), config.clone());
    let last = Writer::spawn(&store, streams, 200);
    assert_eq!(last.handle.await.unwrap(), 200);
    let reacted = foreign.len();
    let foreign = intruder.finish().await;
    let n = wait_for_mirror_among(&store, &nats.jetstream(), &config, &relay, &foreign).await;
    assert_eq!(n as u64, written + 200);
    assert_eq!(foreign.len(), reacted + 4);
    let progress = relay.progress();
    assert!(progress.passed_over >= 4, "{progress:?}");
    // Every event of this relay's term was published once: nothing twice.
    assert_eq!(progress.published, 200, "{progress:?}");
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_created_anew_with_only_foreign_messages_gets_the_whole_log() {
    let db = TestDatabase::create(10).await.unwrap();
    let nats = TestNats::create().await.unwrap();
    let store = EventStore::new(db.pool.clone());
    let config = fast(&nats.relay);
    let streams = mixed_streams(20);
    let relay = RunningRelay::spawn(&store, nats.client.clone(), config.clone());
    assert_eq!(
        Writer::spawn(&store, streams.clone(), 300)
            .handle
            .await
            .unwrap(),
        300
    );
    wait_for_mirror(&store, &nats.jetstream(), &config, Some(&relay)).await;
    // The final checkpoint names sequence 300 of this stream.
    relay.shutdown().await;

    // The stream is deleted and created anew, and something else publishes
    // on it first: the checkpoint is beyond its last sequence, so it counts
    // nothing this stream holds.
    let js = nats.jetstream();
    js.delete_stream(&config.stream_name).await.unwrap();
    Relay::new(store.clone(), nats.client.clone(), config.clone())
        .ensure_stream()
        .await
        .unwrap();
    let intruder = Intruder::start(&nats.url, &config.subject_prefix, 1, 0).await;
    intruder.publish_one().await;
    intruder.publish_one().await;
    let relay = RunningRelay::spawn(&store, nats.client.clone(), config.clone());
    assert_eq!(Writer::spawn(&store, streams, 50).handle.await.unwrap(), 50);
    let foreign = intruder.finish().await;
    let n = wait_for_mirror_among(&store, &js, &config, &relay, &foreign).await;
    assert_eq!(n, 350);
    assert_eq!(relay.progress().published, 350);
    relay.shutdown().await;
}

/// The stream's limits as JetStream reports them: (max age, max bytes).
async fn limits(nats: &TestNats) -> (Duration, i64) {
    let mut stream = nats
        .jetstream()
        .get_stream(&nats.relay.stream_name)
        .await
        .unwrap();
    let config = &stream.info().await.unwrap().config;
    (config.max_age, config.max_bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_is_given_the_configured_retention_when_it_has_other_limits() {
    let db = TestDatabase::create(4).await.unwrap();
    let nats = TestNats::create().await.unwrap();
    let store = EventStore::new(db.pool.clone());
    // A stream as earlier versions created it: no limits.
    nats.jetstream()
        .create_stream(async_nats::jetstream::stream::Config {
            name: nats.relay.stream_name.clone(),
            subjects: vec![format!("{}.>", nats.relay.subject_prefix)],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(limits(&nats).await, (Duration::ZERO, -1));

    let with = |max_age: Duration, max_bytes: u64| RelayConfig {
        max_age,
        max_bytes,
        ..nats.relay.clone()
    };
    let relay = Relay::new(
        store.clone(),
        nats.client.clone(),
        with(Duration::from_secs(3600), 10 << 20),
    );
    relay.ensure_stream().await.unwrap();
    assert_eq!(limits(&nats).await, (Duration::from_secs(3600), 10 << 20));

    // An age under the duplicate window is raised to it (JetStream refuses
    // a shorter one); zero is no limit.
    let relay = Relay::new(
        store.clone(),
        nats.client.clone(),
        with(Duration::from_secs(5), 0),
    );
    relay.ensure_stream().await.unwrap();
    assert_eq!(limits(&nats).await, (nats.relay.duplicate_window, -1));
    let relay = Relay::new(store, nats.client.clone(), with(Duration::ZERO, 0));
    relay.ensure_stream().await.unwrap();
    assert_eq!(limits(&nats).await, (Duration::ZERO, -1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_resumes_exactly_on_a_stream_that_dropped_its_oldest_messages() {
    let db = TestDatabase::create(8).await.unwrap();
    let nats = TestNats::create().await.unwrap();
    let store = EventStore::new(db.pool.clone());
    // ~16 KiB: a few dozen of the events below; the rest are dropped.
    let config = RelayConfig {
        max_bytes: 16 << 10,
        ..fast(&nats.relay)
    };
    let streams = mixed_streams(20);
    let relay = RunningRelay::spawn(&store, nats.client.clone(), config.clone());
    assert_eq!(
        Writer::spawn(&store, streams.clone(), 400)
            .handle
            .await
            .unwrap(),
        400
    );
    eventually("the relay to publish the 400 events", WAIT, || {
        let published = relay.progress().published;
        async move { (published == 400).then_some(()) }
    })
    .await;
    relay.shutdown().await;
    let js = nats.jetstream();
    let mut stream = js.get_stream(&config.stream_name).await.unwrap();
    let state = stream.info().await.unwrap().state.clone();
    assert!(
        state.first_sequence > 1 && state.last_sequence == 400,
        "the stream kept more than its limit allows: {state:?}"
    );

    // A new leader finds its last message among the kept ones and goes on
    // from there: nothing republished, nothing skipped.
    let relay = RunningRelay::spawn(&store, nats.client.clone(), config.clone());
    assert_eq!(
        Writer::spawn(&store, streams, 100).handle.await.unwrap(),
        100
    );
    eventually("the relay to publish the 100 new events", WAIT, || {
        let published = relay.progress().published;
        async move { (published >= 100).then_some(()) }
    })
    .await;
    let progress = relay.progress();
    relay.shutdown().await;
    assert_eq!(progress.published, 100, "{progress:?}");
    assert_eq!(progress.jetstream_sequence, 500, "{progress:?}");
    let head = store.head().await.unwrap().written;
    assert_eq!(progress.position, head, "{progress:?}");
}

/// Appends `appends` appends of 1–3 events to streams of `tenants` tenants
/// (`tenant-0`…), each append to a fresh stream of a random tenant.
async fn tenants_appends(store: &EventStore, tenants: usize, appends: usize, seed: u64) {
    let mut rng = crate::support::rng(seed);
    for _ in 0..appends {
        let tenant = format!("tenant-{}", rng.gen_range(0..tenants));
        let stream = format!("task-{}", uuid::Uuid::new_v4());
        let count = rng.gen_range(1..=3);
        store
            .append(
                &stream,
                neurectomy_commands::ExpectedVersion::NoStream,
                crate::support::events(&stream, count, &tenant),
            )
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_partition_of_a_tenant_is_the_same_in_rust_and_postgresql() {
    let db = TestDatabase::create(2).await.unwrap();
    for partitions in [1u32, 2, 3, 8, 64] {
        let tenants: Vec<String> = (0..300).map(|t| format!("tenant-{t}-ü")).collect();
        let in_postgres: Vec<i32> = sqlx::query_scalar(
            "SELECT neurectomy_partition(t, $2) FROM unnest($1::text[]) WITH ORDINALITY AS u(t, n) ORDER BY n",
        )
        .bind(&tenants)
        .bind(i32::try_from(partitions).unwrap())
        .fetch_all(&db.pool)
        .await
        .unwrap();
        let in_rust: Vec<i32> = tenants
            .iter()
            .map(|t| i32::try_from(neurectomy_commands::partition::of(t, partitions)).unwrap())
            .collect();
        assert_eq!(in_postgres, in_rust, "{partitions} partitions");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_of_the_log_reads_exactly_its_events_in_order() {
    let db = TestDatabase::create(4).await.unwrap();
    let store = EventStore::new(db.pool.clone());
    tenants_appends(&store, 12, 300, 7).await;
    let all = neurectomy_commands::testkit::mirror::read_everything(&store).await;
    let head = all.last().unwrap().position;
    // Every append stored its tenant's hash, as Rust computes it.
    let stored: Vec<(String, Option<i64>)> =
        sqlx::query_as("SELECT tenant, tenant_hash FROM events ORDER BY position")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    for (tenant, hash) in &stored {
        let expected = i64::from(neurectomy_commands::partition::hash(tenant));
        assert_eq!(*hash, Some(expected), "the stored hash of {tenant}");
    }
    // Every other event as if written before the column existed: read
    // through the tenant's digest instead, into the same partitions.
    sqlx::query("UPDATE events SET tenant_hash = NULL WHERE stream_version % 2 = 0")
        .execute(&db.pool)
        .await
        .unwrap();
    // Read first through the primary key (no partition index), then
    // through the index the partitioned processes build.
    for indexed in [false, true] {
        if indexed {
            build_partition_indexes(&store, &db.pool).await;
        }
        read_each_partition(&store, &all, head).await;
    }
}

/// Builds the partition indexes of 4 partitions by two callers at once (one
/// builds them, the other waits for it and finds them there), and checks
/// that a partition's reads go through its index.
async fn build_partition_indexes(store: &EventStore, pool: &sqlx::PgPool) {
    use neurectomy_commands::event_store::{in_partition, partition_index_name};
    use neurectomy_commands::PartitionIndex;
    let (a, b) = tokio::join!(
        store.ensure_partition_index(4),
        store.ensure_partition_index(4)
    );
    let mut outcomes = [a.unwrap(), b.unwrap()];
    outcomes.sort_by_key(|o| matches!(o, PartitionIndex::Present));
    assert!(
        matches!(
            outcomes,
            [PartitionIndex::Built(4, _), PartitionIndex::Present]
        ),
        "one caller builds the 4 indexes, the other finds them: {outcomes:?}"
    );
    // One dropped (as if never built) is built again, alone.
    sqlx::query(&format!("DROP INDEX {}", partition_index_name(4, 2)))
        .execute(pool)
        .await
        .unwrap();
    assert!(matches!(
        store.ensure_partition_index(4).await.unwrap(),
        PartitionIndex::Built(1, _)
    ));
    assert_eq!(
        store.ensure_partition_index(4).await.unwrap(),
        PartitionIndex::Present
    );
    assert_eq!(
        store.ensure_partition_index(1).await.unwrap(),
        PartitionIndex::Unneeded
    );
    sqlx::query("ANALYZE events").execute(pool).await.unwrap();
    for partition in 0..4 {
        let name = partition_index_name(4, partition);
        let valid: bool = sqlx::query_scalar(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)",
        )
        .bind(&name)
        .fetch_one(pool)
        .await
        .unwrap();
        assert!(valid, "{name} is valid");
        // The read as the store sends it, its parameters as a generic plan
        // sees them.
        let read = include_str!("../../src/event_store/sql/read_partition.sql")
            .replace("{in_partition}", &in_partition(4, partition));
        let mut conn = pool.acquire().await.unwrap();
        sqlx::query("SET plan_cache_mode = force_generic_plan")
            .execute(&mut *conn)
            .await
            .unwrap();
        sqlx::query(&format!("PREPARE partition_read(bigint, bigint) AS {read}"))
            .execute(&mut *conn)
            .await
            .unwrap();
        let plan: Vec<String> = sqlx::query_scalar("EXPLAIN EXECUTE partition_read(0, 100)")
            .fetch_all(&mut *conn)
            .await
            .unwrap();
        for reset in ["DEALLOCATE partition_read", "RESET plan_cache_mode"] {
            sqlx::query(reset).execute(&mut *conn).await.unwrap();
        }
        assert!(
            plan.iter().any(|line| line.contains(&name)),
            "a read of partition {partition} goes through {name}:\n{}",
            plan.join("\n")
        );
    }
}

/// Reads every partition of 4 and of 64 page by page and checks each
/// holds exactly its tenants' events, in order, and its last event.
async fn read_each_partition(
    store: &EventStore,
    all: &[neurectomy_commands::RecordedEvent],
    head: i64,
) {
    for partitions in [4u32, 64] {
        let mut seen = Vec::new();
        for partition in 0..partitions {
            let mut mine = Vec::new();
            loop {
                let after = mine
                    .last()
                    .map_or(0, |e: &neurectomy_commands::RecordedEvent| e.position);
                let page = store
                    .read_partition(after, 7, partitions, partition)
                    .await
                    .unwrap();
                if page.is_empty() {
                    break;
                }
                mine.extend(page);
            }
            let expected: Vec<i64> = all
                .iter()
                .filter(|e| {
                    neurectomy_commands::partition::of(&e.metadata.tenant, partitions) == partition
                })
                .map(|e| e.position)
                .collect();
            let read: Vec<i64> = mine.iter().map(|e| e.position).collect();
            assert_eq!(read, expected, "partition {partition} of {partitions}");
            assert_eq!(
                store
                    .last_in_partition(head, partitions, partition)
                    .await
                    .unwrap(),
                expected.last().copied().unwrap_or(0),
                "the last event of partition {partition} of {partitions}"
            );
            seen.extend(read);
        }
        seen.sort_unstable();
        assert_eq!(
            seen.len(),
            all.len(),
            "every event in exactly one partition"
        );
        // 12 tenants over 64 partitions leave most of them empty.
        if partitions == 64 {
            let empty = (0..64)
                .filter(|p| {
                    !all.iter()
                        .any(|e| neurectomy_commands::partition::of(&e.metadata.tenant, 64) == *p)
                })
                .count();
            assert!(empty > 0);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_of_four_partitions_chains_each_partition_across_restarts() {
    let db = TestDatabase::create(8).await.unwrap();
    let nats = TestNats::create().await.unwrap();
    let store = EventStore::new(db.pool.clone());
    let config = RelayConfig {
        partitions: 4,
        batch_size: 25,
        ..fast(&nats.relay)
    };
    tenants_appends(&store, 9, 200, 11).await;
    // Three incarnations, each stopped after publishing some of what is
    // there, with more appended in between: every restart rebuilds the
    // partitions' chain from the store.
    for round in 0..3u64 {
        let relay = RunningRelay::spawn(&store, nats.client.clone(), config.clone());
        eventually("the relay to publish", WAIT, || async {
            (relay.progress().published > 0).then_some(())
        })
        .await;
        relay.shutdown().await;
        tenants_appends(&store, 9, 100, 20 + round).await;
    }
    let relay = RunningRelay::spawn(&store, nats.client.clone(), config.clone());
    let n = wait_for_mirror(&store, &nats.jetstream(), &config, Some(&relay)).await;
    assert!(n >= 500, "{n}");
    relay.shutdown().await;

    // The partition count is the stream's: a relay configured otherwise
    // refuses it, naming both counts.
    let other = Relay::new(
        store.clone(),
        nats.client.clone(),
        RelayConfig {
            partitions: 2,
            ..config.clone()
        },
    );
    let refused = other.ensure_stream().await.unwrap_err().to_string();
    assert!(
        refused.contains("split into 4 partition(s)") && refused.contains("configured for 2"),
        "{refused}"
    );
}
