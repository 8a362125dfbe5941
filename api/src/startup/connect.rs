//! One place connects pools and clients, each with its timeouts, and names
//! the service and the command that starts it when it cannot.

use std::str::FromStr as _;
use std::time::Duration;

use anyhow::Context as _;
use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::ConnectOptions as _;
use sqlx::{PgPool, Postgres};

use crate::auth::Authenticator;
use crate::settings::secret::redact;
use crate::settings::{ApiSettings, Settings};

/// Connects to the event store (the database must exist).
pub async fn connect_database(settings: &Settings) -> anyhow::Result<PgPool> {
    let statement_timeout = Duration::from_millis(settings.database_statement_timeout_ms);
    pool(settings, Some(statement_timeout).filter(|t| !t.is_zero())).await
}

/// A pool of at most `database_pool_size` connections: getting one (and
/// connecting) waits at most `database_timeout_ms`, and with
/// `statement_timeout` the server cancels any statement running longer.
async fn pool(settings: &Settings, statement_timeout: Option<Duration>) -> anyhow::Result<PgPool> {
    let mut options = PgConnectOptions::from_str(&settings.database_url).with_context(|| {
        format!(
            "reading the PostgreSQL URL {}",
            redact(&settings.database_url)
        )
    })?;
    if let Some(timeout) = statement_timeout {
        options = options.options([("statement_timeout", timeout.as_millis().to_string())]);
    }
    // sqlx's statement log prints whole statements (the append's is ~1.5
    // KB) on every slow one; the store logs slow statements by name.
    options = options.disable_statement_logging();
    PgPoolOptions::new()
        .max_connections(settings.database_pool_size.max(1))
        .acquire_timeout(Duration::from_millis(settings.database_timeout_ms.max(1)))
        .connect_with(options)
        .await
        .with_context(|| {
            format!(
                "connecting to PostgreSQL at {} (is it running, and has `neurectomy migrate` created the database?)",
                redact(&settings.database_url)
            )
        })
}

/// Connects to NATS; the client reconnects by itself after outages.
pub async fn connect_nats(settings: &Settings) -> anyhow::Result<async_nats::Client> {
    let timeout = Duration::from_millis(settings.nats_timeout_ms.max(1));
    let connect = async_nats::ConnectOptions::new()
        .name("neurectomy")
        .connection_timeout(timeout)
        .request_timeout(Some(timeout))
        // The client's default waits up to seconds between attempts; a
        // server that is back is noticed within a second.
        .reconnect_delay_callback(|attempts| Duration::from_millis(100 * attempts.min(10) as u64))
        .connect(&settings.nats_url);
    tokio::time::timeout(timeout * 2, connect)
        .await
        .map_err(|_| anyhow::anyhow!("timed out"))
        .and_then(|r| r.map_err(anyhow::Error::from))
        .with_context(|| {
            format!(
                "connecting to NATS at {} (is nats-server running with -js?)",
                settings.nats_url
            )
        })
}

/// Creates the database if it is missing, connects, runs the migrations and
/// returns the pool (start-up of `all` keeps using it).
pub async fn migrated_pool(settings: &Settings) -> anyhow::Result<PgPool> {
    let url = &settings.database_url;
    let exists = Postgres::database_exists(url)
        .await
        .with_context(|| format!("checking whether the database at {} exists", redact(url)))?;
    if !exists {
        Postgres::create_database(url)
            .await
            .with_context(|| format!("creating the database at {}", redact(url)))?;
        tracing::info!(url = %redact(url), "created the database");
    }
    // Migrations run without the statement timeout: building an index on
    // a large table may take longer.
    let migrating = pool(settings, None).await?;
    commands::migrate(&migrating)
        .await
        .context("running the event-store migrations")?;
    // The partition index of the configured partition count (also built by
    // the partitioned projectors, in the background, when missing).
    let partitions = settings.jetstream_partitions;
    commands::EventStore::with_committers(migrating.clone(), 0)
        .ensure_partition_index(partitions)
        .await
        .with_context(|| {
            format!("building the index for reading one of {partitions} partitions")
        })?;
    migrating.close().await;
    tracing::info!("event store migrated");
    connect_database(settings).await
}

/// Connects the Redis read model.
pub async fn connect_redis(settings: &Settings) -> anyhow::Result<projections::RedisModel> {
    projections::RedisModel::connect(&settings.redis_url, settings.redis_config())
        .await
        .with_context(|| {
            format!(
                "connecting to Redis at {} (is redis-server running?)",
                redact(&settings.redis_url)
            )
        })
}

/// Connects the graph read model (and ensures its constraints exist).
pub async fn connect_graph(settings: &Settings) -> anyhow::Result<projections::GraphModel> {
    projections::GraphModel::connect(settings.graph_config()).await.with_context(|| {
        format!(
            "connecting to the graph at {} (database {}); in development start it with scripts/graph.sh up",
            settings.graph_uri, settings.graph_database
        )
    })
}

/// The token verifier these settings describe.
pub fn authenticator(api: &ApiSettings) -> anyhow::Result<Authenticator> {
    use anyhow::Context as _;
    let pem = api
        .jwt_public_key
        .as_ref()
        .map(|path| {
            std::fs::read(path)
                .with_context(|| format!("reading NEURECTOMY_JWT_PUBLIC_KEY {}", path.display()))
        })
        .transpose()?;
    Ok(Authenticator::new(
        api.jwt_secret
            .as_ref()
            .map(crate::settings::secret::Secret::expose),
        pem.as_deref(),
    )?)
}
