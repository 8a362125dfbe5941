//! The real `neurectomy` binary (built in this package as `neurectomy-e2e`;
//! tests pass `env!("CARGO_BIN_EXE_neurectomy-e2e")`, which only they can
//! read) as a child process on scratch resources: a PostgreSQL database, a
//! JetStream stream and subject prefix, a Redis prefix and a graph database
//! of the test's own (removed at the end), on the shared services or on
//! private ones ([`crate::services`]), with nothing of the test's
//! environment. Its JSON log is kept, for the addresses it listens on and
//! for failure messages.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use commands::testkit::{eventually, TestDatabase, TestNats};
use projections::graph_testkit::{GraphServer, TestGraph};
use projections::testkit::TestRedis;
use serde_json::Value;
use tokio::io::AsyncBufReadExt as _;
use tokio::process::{Child, Command};

/// The HS256 secret processes verify tokens with (`NEURECTOMY_JWT_SECRET`).
pub const SECRET: &str = "operations-tests-secret-of-32-bytes-at-least";

/// Where the services are.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// PostgreSQL admin URL (scratch databases are created there).
    pub postgres: String,
    /// NATS URL.
    pub nats: String,
    /// Redis URL.
    pub redis: String,
    /// The graph server.
    pub graph: GraphServer,
}

impl Endpoints {
    /// The shared services the test kits use (`NEURECTOMY_TEST_*`).
    pub fn shared() -> Self {
        Self {
            postgres: commands::testkit::admin_url(),
            nats: commands::testkit::nats_url(),
            redis: projections::testkit::redis_url(),
            graph: GraphServer::from_env(),
        }
    }
}

/// Everything a test's processes write to, removed when dropped.
pub struct Scratch {
    /// The database.
    pub db: TestDatabase,
    /// The stream and subject prefix.
    pub nats: TestNats,
    /// The Redis prefix.
    pub redis: TestRedis,
    /// The graph database.
    pub graph: TestGraph,
    /// The servers they are on.
    pub endpoints: Endpoints,
    /// The `neurectomy` binary.
    pub binary: &'static str,
}

impl Scratch {
    /// Scratch resources on the shared services, for `binary`.
    pub async fn create(binary: &'static str) -> Self {
        Self::create_on(binary, Endpoints::shared()).await
    }

    /// Scratch resources on `endpoints`, for `binary`; fails naming a
    /// service that is unreachable.
    pub async fn create_on(binary: &'static str, endpoints: Endpoints) -> Self {
        Self {
            db: TestDatabase::create_at(&endpoints.postgres, 4)
                .await
                .unwrap_or_else(|e| panic!("{e}")),
            nats: TestNats::create_at(&endpoints.nats)
                .await
                .unwrap_or_else(|e| panic!("{e}")),
            redis: TestRedis::create_at(&endpoints.redis)
                .await
                .unwrap_or_else(|e| panic!("{e}")),
            graph: TestGraph::create_at(&endpoints.graph)
                .await
                .unwrap_or_else(|e| panic!("{e}")),
            endpoints,
            binary,
        }
    }

    /// `neurectomy <args>` pointed at the scratch resources only, with
    /// `extra` settings on top.
    pub fn command(&self, args: &[&str], extra: &[(&str, &str)]) -> Command {
        let mut command = Command::new(self.binary);
        command
            .args(args)
            .env_clear()
            .env("NEURECTOMY_DATABASE_URL", &self.db.url)
            .env("NEURECTOMY_DATABASE_POOL_SIZE", "8")
            .env("NEURECTOMY_NATS_URL", &self.nats.url)
            .env("NEURECTOMY_JETSTREAM_STREAM", &self.nats.relay.stream_name)
            .env("NEURECTOMY_SUBJECT_PREFIX", &self.nats.relay.subject_prefix)
            .env("NEURECTOMY_RELAY_IDLE_POLL_MS", "100")
            .env("NEURECTOMY_REDIS_URL", &self.redis.url)
            .env("NEURECTOMY_REDIS_PREFIX", &self.redis.prefix)
            .env("NEURECTOMY_GRAPH_URI", &self.endpoints.graph.uri)
            .env("NEURECTOMY_GRAPH_USER", "root")
            .env("NEURECTOMY_GRAPH_PASSWORD", &self.endpoints.graph.password)
            .env("NEURECTOMY_GRAPH_DATABASE", &self.graph.database)
            .env("NEURECTOMY_GRAPH_HTTP", &self.graph.http)
            .env("NEURECTOMY_JWT_SECRET", SECRET)
            .env("NEURECTOMY_API_LISTEN", "127.0.0.1:0")
            .env("NEURECTOMY_LOG", "info")
            .env("NEURECTOMY_LOG_FORMAT", "json")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (name, value) in extra {
            command.env(name, value);
        }
        command
    }

    /// The log's head, once every written event is readable.
    pub async fn head(&self) -> i64 {
        crate::readable_head(&commands::EventStore::new(self.db.pool.clone())).await
    }
}

/// A running `neurectomy` process whose JSON log is kept; killed when
/// dropped.
pub struct Instance {
    /// Its role, for messages.
    pub role: String,
    /// The child.
    pub child: Child,
    /// Every line of its log so far.
    pub log: Arc<Mutex<Vec<String>>>,
    /// Reads the log until the process closes it.
    reader: Option<tokio::task::JoinHandle<()>>,
}

impl Instance {
    /// Spawns `command` (from [`Scratch::command`]) and keeps its log.
    pub fn spawn(role: &str, mut command: Command) -> Self {
        let program = command.as_std().get_program().to_owned();
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {} ({role}): {e}", program.to_string_lossy()));
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let reader = tokio::spawn({
            let log = log.clone();
            async move {
                let mut lines = tokio::io::BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    log.lock().unwrap().push(line);
                }
            }
        });
        Self {
            role: role.to_owned(),
            child,
            log,
            reader: Some(reader),
        }
    }

    /// The log so far, for messages.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// The `addr` of the first log line whose message starts with `message`.
    pub async fn address(&self, message: &str) -> SocketAddr {
        let what = format!("{} to log \"{message}\"", self.role);
        let log = self.log.clone();
        eventually(&what, Duration::from_secs(90), || {
            let log = log.clone();
            async move {
                log.lock().unwrap().iter().find_map(|line| {
                    let line: Value = serde_json::from_str(line).ok()?;
                    let fields = &line["fields"];
                    fields["message"]
                        .as_str()?
                        .starts_with(message)
                        .then(|| fields["addr"].as_str()?.parse().ok())?
                })
            }
        })
        .await
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let pid = self.child.id().expect("the process is running");
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -TERM {pid} failed");
    }

    /// Sends SIGTERM and waits for the exit, at most `within`; returns the
    /// exit code and how long it took.
    pub async fn stop(&mut self, within: Duration) -> (Option<i32>, Duration) {
        let started = Instant::now();
        self.terminate();
        let status = tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{} did not exit within {within:?} of SIGTERM; its log:\n{}",
                    self.role,
                    self.log()
                )
            })
            .unwrap();
        let took = started.elapsed();
        // The whole log, up to its last line.
        if let Some(reader) = self.reader.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), reader).await;
        }
        (status.code(), took)
    }
}
