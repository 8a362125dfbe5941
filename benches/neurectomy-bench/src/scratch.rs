//! Scratch resources of a run, from the test kits: a PostgreSQL database
//! (`commands::testkit::TestDatabase`), a JetStream stream and subject
//! prefix (`commands::testkit::TestNats`), a Redis key prefix
//! (`projections::testkit::TestRedis`) and a graph database
//! (`projections::graph_testkit::TestGraph`), each on the server the
//! settings name, each removed when its fixture is dropped.
//!
//! The fixtures only name and remove the resources. What a scenario
//! measures (the pool, the relay's configuration, the read models) is set
//! up from the settings exactly as a `neurectomy` process would be, so a
//! read model is connected anew from the settings under the fixture's
//! prefix or database.
//!
//! Dropping a fixture blocks until its resource is gone (the test kits wait
//! on a thread with a runtime of its own): [`remove`] does it off the
//! runtime's worker threads.

use anyhow::Context as _;
use api::settings::Settings;
use commands::testkit::{TestDatabase, TestNats};
use commands::RelayConfig;
use projections::graph_testkit::{GraphServer, TestGraph};
use projections::testkit::TestRedis;
use projections::{GraphModel, RedisModel};

/// The configured PostgreSQL server's maintenance database (`postgres`),
/// where scratch databases are created from (as sqlx's `create_database`
/// does).
fn admin_url(settings: &Settings) -> String {
    let base = settings
        .database_url
        .rsplit_once('/')
        .map_or(settings.database_url.as_str(), |(base, _)| base);
    format!("{base}/postgres")
}

/// `url` with its password, if any, replaced by `***`.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_owned(),
    }
}

/// A fresh, migrated database on the configured server with a pool of
/// `pool_size` connections (`neurectomy_test_<id>`).
pub async fn database(settings: &Settings, pool_size: u32) -> anyhow::Result<TestDatabase> {
    let admin = admin_url(settings);
    TestDatabase::create_at(&admin, pool_size)
        .await
        // The test kit's message names the URL; not its password.
        .map_err(|error| anyhow::anyhow!("{}", error.to_string().replace(&admin, &redact(&admin))))
        .context("creating a scratch database")
}

/// A JetStream stream name and subject prefix of their own (`TEST_<id>`,
/// `test<id>.events`) and a client of the configured NATS server.
pub async fn nats(settings: &Settings) -> anyhow::Result<TestNats> {
    TestNats::create_at(&settings.nats_url)
        .await
        .context("connecting to NATS for a scratch JetStream stream")
}

/// The relay configuration of the settings on `nats`'s stream and prefix.
pub fn relay_config(settings: &Settings, nats: &TestNats) -> RelayConfig {
    RelayConfig {
        stream_name: nats.relay.stream_name.clone(),
        subject_prefix: nats.relay.subject_prefix.clone(),
        ..settings.relay_config()
    }
}

/// A Redis key prefix of its own (`test:<id>:`) and the read model of the
/// settings under it.
pub async fn redis(settings: &Settings) -> anyhow::Result<(RedisModel, TestRedis)> {
    let scratch = TestRedis::create_at(&settings.redis_url)
        .await
        .map_err(anyhow::Error::msg)
        .context("setting up a scratch Redis prefix")?;
    let model = RedisModel::connect(
        &settings.redis_url,
        projections::RedisModelConfig {
            prefix: scratch.prefix.clone(),
            ..settings.redis_config()
        },
    )
    .await
    .with_context(|| format!("connecting to Redis at {}", settings.redis_url))?;
    Ok((model, scratch))
}

/// A graph database of its own (`test_<id>`, created through ArcadeDB's
/// HTTP API at the settings' `graph_http`, as `root`).
pub async fn graph_database(settings: &Settings) -> anyhow::Result<TestGraph> {
    let server = GraphServer {
        uri: settings.graph_uri.clone(),
        http: settings.graph_http(),
        password: settings.graph_password.expose().to_owned(),
    };
    TestGraph::create_at(&server)
        .await
        .map_err(anyhow::Error::msg)
        .context("creating a scratch graph database (set NEURECTOMY_GRAPH_HTTP to the HTTP API's host:port if it is not on port 2480)")
}

/// A graph database of its own ([`graph_database`]) and the read model of
/// the settings on it.
pub async fn graph(settings: &Settings) -> anyhow::Result<(GraphModel, TestGraph)> {
    let scratch = graph_database(settings).await?;
    let model = GraphModel::connect(projections::GraphConfig {
        database: scratch.database.clone(),
        ..settings.graph_config()
    })
    .await
    .with_context(|| format!("connecting to graph database {}", scratch.database))?;
    Ok((model, scratch))
}

/// Drops `fixtures` (each removes its resource, waiting for it) on a
/// blocking thread; a database's pool is closed first.
pub async fn remove(fixtures: Fixtures) {
    for database in &fixtures.databases {
        database.pool.close().await;
    }
    if tokio::task::spawn_blocking(move || drop(fixtures))
        .await
        .is_err()
    {
        tracing::warn!("removing the scratch resources panicked; some may be left");
    }
}

/// Drops a scratch database (see [`remove`]).
pub async fn drop_database(database: TestDatabase) {
    remove(Fixtures {
        databases: vec![database],
        ..Fixtures::default()
    })
    .await;
}

/// Deletes a scratch JetStream stream (see [`remove`]).
pub async fn drop_stream(nats: TestNats) {
    remove(Fixtures {
        streams: vec![nats],
        ..Fixtures::default()
    })
    .await;
}

/// Every fixture of a run, removed together by [`remove`].
#[derive(Debug, Default)]
pub struct Fixtures {
    /// Scratch databases.
    pub databases: Vec<TestDatabase>,
    /// Scratch JetStream streams (and their clients).
    pub streams: Vec<TestNats>,
    /// Scratch Redis prefixes.
    pub prefixes: Vec<TestRedis>,
    /// Scratch graph databases.
    pub graphs: Vec<TestGraph>,
}
