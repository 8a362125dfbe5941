//! What several test modules share: waits on projectors, the consumer
//! deleted under a live projector (Redis and graph alike), reports of
//! verification differences, and checks of the store and JetStream after a
//! process has stopped.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream};
use commands::relay::HEADER_POSITION;
use commands::testkit::eventually;
use neurectomy_e2e::pipeline::Pipeline;
use projections::verify::Difference;
use projections::{Projector, ProjectorState, ProjectorStatus, ReadModel};
use sqlx::PgPool;
use tokio::sync::watch;

/// Waits until `projector` is live.
pub async fn live<M: ReadModel>(projector: &Projector<M>) {
    let status = projector.status();
    eventually("the projector to go live", Duration::from_secs(60), || {
        let state = status.borrow().state;
        async move { (state == ProjectorState::Live).then_some(()) }
    })
    .await;
}

/// The durable consumer `consumer` deleted under the live projector of
/// `model` (whose status is `status`) while commands flow: its pull stream
/// fails, and the projector must notice (its `last_error` says the consumer
/// was deleted), go back to the store from its checkpoint and make a new
/// consumer; events committed after the deletion reach `model` through it.
/// Returns once they have.
pub async fn delete_consumer_under_live_projector<M: ReadModel + Clone>(
    pipe: &Pipeline,
    model: &M,
    status: &watch::Receiver<ProjectorStatus>,
    consumer: &str,
) {
    let head = pipe.head_beyond(model.checkpoint().await.unwrap()).await;
    pipe.caught_up_to(model, head).await;
    let js = pipe.nats.jetstream();
    let stream = js.get_stream(&pipe.nats.relay.stream_name).await.unwrap();
    stream.delete_consumer(consumer).await.unwrap();
    let deleted_at = pipe.store.head().await.unwrap().written;
    let error = eventually(
        "the projector to notice its consumer is gone",
        Duration::from_secs(30),
        || {
            let error = status.borrow().last_error.clone();
            async move { error }
        },
    )
    .await;
    assert!(error.contains("consumer deleted"), "{error}");
    let stream = &stream;
    eventually(
        "the projector to make a new consumer",
        Duration::from_secs(30),
        || async move { stream.get_consumer::<pull::Config>(consumer).await.ok() },
    )
    .await;
    // Events committed after the deletion reach the model through it.
    let after = pipe.head_beyond(deleted_at).await;
    pipe.caught_up_to(model, after).await;
}

/// A message for `differences` between the events and `model` (e.g.
/// "Redis", "the graph"): how many, and the first ten.
pub fn report(model: &str, differences: &[Difference]) -> String {
    format!(
        "{} difference(s) between the events and {model}, e.g.:\n{}",
        differences.len(),
        differences
            .iter()
            .take(10)
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    )
}

/// Fails unless the Redis model of `redis`, at or past `until`, verifies
/// clean against `pipe`'s log and holds exactly what a clean rebuild up to
/// `until` holds (`what` names the situation in failures).
pub async fn redis_is_the_log(
    pipe: &Pipeline,
    redis: &projections::testkit::TestRedis,
    until: i64,
    what: &str,
) {
    let differences = projections::verify::verify_redis(&pipe.store, &redis.model, until)
        .await
        .unwrap()
        .differences;
    assert!(
        differences.is_empty(),
        "{what}: {}",
        report("Redis", &differences)
    );
    let clean = neurectomy_e2e::read_side::redis_rebuilt(&pipe.store, until).await;
    neurectomy_e2e::read_side::assert_same_redis(
        what,
        &redis.dump_model().await.unwrap(),
        &clean.dump_model().await.unwrap(),
    );
}

/// The JetStream stream `name` and the position of its last message (the
/// relay's `Neurectomy-Position` header); `None` while any of it cannot be
/// read (no message yet, a server restarting).
pub async fn last_published(js: &jetstream::Context, name: &str) -> Option<(stream::Info, i64)> {
    let stream = js.get_stream(name).await.ok()?;
    let info = stream.get_info().await.ok()?;
    let last = stream
        .get_raw_message(info.state.last_sequence)
        .await
        .ok()?;
    let position = last.headers.get(HEADER_POSITION)?.as_str().parse().ok()?;
    Some((info, position))
}

/// How many streams of the store are not versions 1..=n without a gap
/// (something half-written).
pub async fn streams_with_gaps(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT stream_id FROM events GROUP BY stream_id \
         HAVING max(stream_version) <> count(*) OR min(stream_version) <> 1) AS broken",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// The `neurectomy` binary built for these tests.
pub const BINARY: &str = env!("CARGO_BIN_EXE_neurectomy-e2e");

/// The binary on `pipe`'s database and stream.
pub fn target(pipe: &Pipeline) -> neurectomy_e2e::Target {
    neurectomy_e2e::Target {
        binary: BINARY.to_owned(),
        database_url: pipe.db.url.clone(),
        nats_url: pipe.nats.url.clone(),
        stream: pipe.nats.relay.stream_name.clone(),
        subject_prefix: pipe.nats.relay.subject_prefix.clone(),
    }
}

/// `neurectomy project --only redis` number `n` on `pipe`'s database and
/// stream and `redis`'s prefix, with a lease ttl of `ttl` and `extra`
/// settings; its log is kept.
pub fn project(
    pipe: &Pipeline,
    redis: &projections::testkit::TestRedis,
    (n, ttl): (usize, Duration),
    extra: &[(&str, String)],
) -> neurectomy_e2e::instance::Instance {
    let mut command = target(pipe).command(&["project", "--only", "redis"]);
    command
        .env("NEURECTOMY_REDIS_URL", &redis.url)
        .env("NEURECTOMY_REDIS_PREFIX", &redis.prefix)
        .env("NEURECTOMY_PROJECTOR_BATCH_SIZE", "200")
        .env(
            "NEURECTOMY_PROJECTOR_LEASE_TTL_MS",
            ttl.as_millis().to_string(),
        )
        .env("NEURECTOMY_LOG", "info")
        .env("NEURECTOMY_LOG_FORMAT", "json")
        .envs(extra.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    neurectomy_e2e::instance::Instance::spawn(&format!("project process {n}"), command)
}
