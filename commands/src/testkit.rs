//! Test isolation helpers for this crate's and downstream crates' tests.
//!
//! Every test gets its own PostgreSQL database (created, migrated, and
//! dropped afterwards) and its own JetStream stream and subject prefix, so
//! tests run in parallel against the real services. [`mirror`] checks that
//! a JetStream stream mirrors the event store exactly. When a service is
//! unreachable the helpers fail with a message naming the service and the
//! command that starts it; they never skip.
//!
//! Service addresses come from `NEURECTOMY_TEST_DATABASE_URL` (an admin URL,
//! default `postgres://postgres@127.0.0.1:5432/postgres`) and
//! `NEURECTOMY_TEST_NATS_URL` (default `nats://127.0.0.1:4222`).

use std::future::Future;
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};
use uuid::Uuid;

use crate::relay::RelayConfig;

pub mod mirror;

/// How to start PostgreSQL on a development machine.
pub const START_POSTGRES: &str = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start   (or: scripts/services.sh up)";
/// How to start NATS with JetStream on a development machine.
pub const START_NATS: &str = "start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server   (or: scripts/services.sh up)";

/// Why a test fixture could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    /// PostgreSQL is unreachable or refused a setup statement.
    #[error(
        "PostgreSQL at {url} is not usable ({doing}): {source}. Start it with: {START_POSTGRES}"
    )]
    Postgres {
        /// Admin URL used.
        url: String,
        /// What failed.
        doing: String,
        /// Cause.
        source: sqlx::Error,
    },
    /// Migrations failed.
    #[error("migrating the test database failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// NATS is unreachable.
    #[error(
        "NATS with JetStream at {url} is not reachable: {message}. Start it with: {START_NATS}"
    )]
    Nats {
        /// URL used.
        url: String,
        /// Cause.
        message: String,
    },
}

/// The admin URL of the PostgreSQL server tests use.
pub fn admin_url() -> String {
    std::env::var("NEURECTOMY_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// The NATS URL tests use.
pub fn nats_url() -> String {
    std::env::var("NEURECTOMY_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// A fresh, migrated database, dropped when this value is dropped.
#[derive(Debug)]
pub struct TestDatabase {
    /// Pool on the test database.
    pub pool: PgPool,
    /// Connect options of the test database (for extra connections).
    pub options: PgConnectOptions,
    /// The database's name.
    pub name: String,
    /// Its URL, for processes started by the test.
    pub url: String,
    admin: PgConnectOptions,
}

impl TestDatabase {
    /// Creates and migrates `neurectomy_test_<random>`, with a pool of
    /// `pool_size` connections.
    pub async fn create(pool_size: u32) -> Result<Self, TestkitError> {
        Self::create_at(&admin_url(), pool_size).await
    }

    /// Like [`TestDatabase::create`] on the server of the admin URL `url`
    /// (e.g. a private server a test starts and stops).
    pub async fn create_at(url: &str, pool_size: u32) -> Result<Self, TestkitError> {
        let url = url.to_owned();
        let pg = |doing: &str| {
            let url = url.clone();
            let doing = doing.to_owned();
            move |source| TestkitError::Postgres { url, doing, source }
        };
        let admin: PgConnectOptions = url.parse().map_err(pg("parsing the URL"))?;
        let admin = admin.log_statements(tracing::log::LevelFilter::Trace);
        let mut conn = PgConnection::connect_with(&admin)
            .await
            .map_err(pg("connecting"))?;
        let name = format!("neurectomy_test_{}", Uuid::new_v4().simple());
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .map_err(pg("creating a test database"))?;
        let _ = conn.close().await;
        let options = admin.clone().database(&name);
        let pool = PgPoolOptions::new()
            .max_connections(pool_size)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options.clone())
            .await
            .map_err(pg("connecting to the test database"))?;
        crate::migrate(&pool).await?;
        let base = url.rsplit_once('/').map_or(url.as_str(), |(base, _)| base);
        Ok(Self {
            url: format!("{base}/{name}"),
            pool,
            options,
            name,
            admin,
        })
    }
}

/// Runs a clean-up future to completion from a `Drop` impl and waits for
/// it: on a thread with a runtime of its own, because the test's runtime may
/// be a current-thread runtime blocked in this very call. The future must not
/// use anything driven by the test's runtime (open its own connections).
pub fn clean_up<F>(cleanup: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let handle = std::thread::spawn(move || {
        if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            runtime.block_on(cleanup);
        }
    });
    let _ = handle.join();
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Waits so the database is gone when the test ends. The pool's
        // sessions are driven by the test's runtime: `WITH (FORCE)` ends them
        // instead of closing the pool.
        let admin = self.admin.clone();
        let name = self.name.clone();
        clean_up(async move {
            if let Ok(mut conn) = PgConnection::connect_with(&admin).await {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut conn)
                    .await;
            }
        });
    }
}

/// A NATS connection with a JetStream stream name and subject prefix of its
/// own; the stream is deleted when this value is dropped.
#[derive(Debug)]
pub struct TestNats {
    /// Connected client.
    pub client: async_nats::Client,
    /// Relay configuration with the unique stream name and prefix.
    pub relay: RelayConfig,
    /// URL used.
    pub url: String,
}

impl TestNats {
    /// The byte limit of a test's stream. JetStream reserves a stream's
    /// limit against the server's storage; the default (1 GiB) for each
    /// test stream alive at once could exceed a small disk. No test writes
    /// this much.
    pub const MAX_BYTES: u64 = 256 << 20;

    /// Connects and picks unique names.
    pub async fn create() -> Result<Self, TestkitError> {
        Self::create_at(&nats_url()).await
    }

    /// Connects to `url` and picks unique names.
    pub async fn create_at(url: &str) -> Result<Self, TestkitError> {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .retry_on_initial_connect()
            .connect(url);
        let client = tokio::time::timeout(Duration::from_secs(5), client)
            .await
            .map_err(|_| TestkitError::Nats {
                url: url.to_owned(),
                message: "connection timed out".to_owned(),
            })?
            .map_err(|e| TestkitError::Nats {
                url: url.to_owned(),
                message: e.to_string(),
            })?;
        let id = Uuid::new_v4().simple().to_string();
        let relay = RelayConfig {
            stream_name: format!("TEST_{id}"),
            subject_prefix: format!("test{id}.events"),
            idle_poll: Duration::from_millis(100),
            max_bytes: Self::MAX_BYTES,
            ..RelayConfig::default()
        };
        Ok(Self {
            client,
            relay,
            url: url.to_owned(),
        })
    }

    /// The JetStream context.
    pub fn jetstream(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(self.client.clone())
    }
}

impl Drop for TestNats {
    fn drop(&mut self) {
        // A connection of its own: `self.client` is driven by the test's runtime.
        let url = self.url.clone();
        let stream = self.relay.stream_name.clone();
        clean_up(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                let client = async_nats::connect(url.as_str()).await.ok()?;
                let js = async_nats::jetstream::new(client.clone());
                let _ = js.delete_stream(&stream).await;
                // The seals' copies, when the test's relay sealed the log.
                let _ = js.delete_stream(format!("{stream}_SEALS")).await;
                let _ = client.flush().await;
                Some(())
            })
            .await;
        });
    }
}

/// Polls `check` until it returns `Some`, at most `timeout`; panics with
/// `what` on timeout. Never a bare sleep: the wait ends as soon as the effect
/// is visible.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(5);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(200));
    }
}
